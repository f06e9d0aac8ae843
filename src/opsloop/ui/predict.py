"""The Predict page: draw, upload or pick a digit; see the answer; send the true label.

Drawings and uploads go to `POST /predict` as image files (the server maps them onto the model's
input); the sample digits, already on the model's pixel scale, go to `POST /v2/models/{name}/infer`
as V2 tensors. The answer shows the label, every class's probability, the model version and the
request id; the label sent back goes to `POST /feedback` and joins this prediction in the log.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import streamlit as st
from PIL import Image

from opsloop.ui.client import Prediction, ServedModel, ServerClient
from opsloop.ui.data import grey_image, read_samples
from opsloop.ui.layout import percent, reported
from opsloop.ui.settings import UISettings, get_settings
from opsloop.ui.sketch import decode_data_url, draw_pad, frame_drawing

UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"]
SAMPLES = 10
ANSWER_KEY = "predict.answer"
UPLOADED_KEY = "predict.uploaded"


@dataclass(frozen=True)
class Answer:
    """The latest prediction with what was sent, kept across reruns (the feedback click)."""

    prediction: Prediction
    image: npt.NDArray[np.uint8]  # what to show beside the answer
    source: str  # "drawing", an upload's file name, or "sample"
    true_label: int | None = None  # known for the held-out samples


def client_for(settings: UISettings) -> ServerClient:
    token = settings.feedback_token.get_secret_value() if settings.feedback_token else None
    return ServerClient(
        settings.server_url,
        settings.model_name,
        timeout=settings.timeout_seconds,
        feedback_token=token,
    )


def render() -> None:
    """The page."""
    settings = get_settings()
    st.title("Predict")
    st.caption(
        f"Draw, upload or pick a digit: the inference server at {settings.server_url} answers "
        "over the Open Inference Protocol, logs the prediction and takes the true label back."
    )
    with client_for(settings) as client:
        served: ServedModel | None = None
        with reported():
            served = client.model()
        if served is None:
            return
        st.markdown(f"Serving **{served.name}** version **{served.version}**.")
        draw, upload, samples = st.tabs(["Draw", "Upload", "Samples"])
        with draw, reported():
            drawn = draw_pad()
            if drawn is not None:
                classify_drawing(client, drawn)
        with upload, reported():
            classify_upload(client)
        with samples, reported():
            classify_sample(client, served, settings)
        answer = st.session_state.get(ANSWER_KEY)
        if isinstance(answer, Answer):
            show_answer(client, answer)


def classify_drawing(client: ServerClient, data_url: str) -> None:
    framed = frame_drawing(decode_data_url(data_url))
    if framed is None:
        st.warning("The pad is empty: draw a digit, then press Classify drawing.")
        return
    image = np.asarray(Image.open(io.BytesIO(framed)).convert("L").resize((128, 128)))
    remember(Answer(client.predict_image(framed, "drawing.png"), image, "drawing"))


def classify_upload(client: ServerClient) -> None:
    upload = st.file_uploader("An image of one digit", type=UPLOAD_TYPES, key="predict.upload")
    if upload is None:
        st.caption("Any size; dark ink on light paper is inverted to the model's white-on-black.")
        return
    # Reruns (a click anywhere) hand the same file back: classify each upload once, so every
    # prediction in the log is one a person asked for.
    if st.session_state.get(UPLOADED_KEY) == upload.file_id:
        return
    data = upload.getvalue()
    prediction = client.predict_image(data, upload.name)
    st.session_state[UPLOADED_KEY] = upload.file_id
    preview = Image.open(io.BytesIO(data)).convert("L")
    preview.thumbnail((128, 128))
    remember(Answer(prediction, np.asarray(preview), upload.name))


def classify_sample(client: ServerClient, served: ServedModel, settings: UISettings) -> None:
    samples = read_samples(settings.resolved_bundle_path(), SAMPLES)
    st.caption(
        "Held-out digits from the model bundle's reference sample, sent as V2 tensors; their "
        "true label is known, so the feedback is filled in for you."
    )
    columns = st.columns(len(samples))
    for index, column in enumerate(columns):
        label = int(samples.labels[index])
        with column:
            st.image(grey_image(samples.images[index], samples.pixel_max, scale=6))
            if st.button(f"Try {samples.class_names[label]}", key=f"predict.sample.{index}"):
                prediction = client.infer(samples.images[index], served)
                image = grey_image(samples.images[index], samples.pixel_max, scale=16)
                remember(Answer(prediction, image, "sample", true_label=label))


def remember(answer: Answer) -> None:
    st.session_state[ANSWER_KEY] = answer


def show_answer(client: ServerClient, answer: Answer) -> None:
    """The answer, the probabilities chart, and the feedback form."""
    prediction = answer.prediction
    st.divider()
    st.subheader("Answer")
    picture, numbers = st.columns([1, 3])
    with picture:
        st.image(answer.image, caption=answer.source, width=128)
    with numbers:
        st.metric("Predicted label", prediction.class_name)
        st.markdown(
            f"Model **{prediction.model_name}** version **{prediction.model_version}** "
            f"({prediction.role}) · confidence {percent(prediction.confidence)} · "
            f"via `/{prediction.endpoint}`"
        )
        st.markdown(f"Request id `{prediction.request_id}`")
    st.bar_chart(
        {"probability": dict(zip(prediction.class_names, prediction.probabilities, strict=True))},
        x_label="class",
        y_label="probability",
        height=220,
    )
    send_label(client, answer)


def send_label(client: ServerClient, answer: Answer) -> None:
    """The true label, posted to /feedback for this request (the newest label counts)."""
    prediction = answer.prediction
    names = list(prediction.class_names)
    known = answer.true_label if answer.true_label is not None else prediction.label
    st.markdown("**Was it right?** Send the true label; it joins this prediction in the log.")
    choice, button = st.columns([2, 1], vertical_alignment="bottom")
    with choice:
        truth = st.selectbox(
            "True label", names, index=known, key=f"predict.truth.{prediction.request_id}"
        )
    with button:
        clicked = st.button("Send label", key=f"predict.send.{prediction.request_id}")
    if clicked:
        with reported():
            label = names.index(truth)
            client.send_feedback(prediction.request_id, label)
            st.success(
                f"Label {truth} stored for request {prediction.request_id}: online accuracy "
                "on the Monitoring page counts it.",
                icon=":material/check_circle:",
            )
