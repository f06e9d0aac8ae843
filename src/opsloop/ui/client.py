"""The app's HTTP side: the inference server over the Open Inference Protocol, and the monitor.

`ServerClient` asks the server what it serves (`GET /v2/models/{name}`), sends an image file to
`POST /predict` or a tensor to `POST /v2/models/{name}/infer`, and posts the true label to
`POST /feedback`. `read_monitor_status` reads the monitoring service's latest verdict. Every
failure is one `OpsloopError` line that names the URL and what to do: a server that is down is
`ServerUnavailableError`, an answer that refuses the request is `ServerRejectedError` carrying the
server's own message. No Streamlit here, so all of it is tested without a browser.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from opsloop.errors import OpsloopError, first_line

START_HINT = "start it with `make ui` (server and app together) or `opsloop serve`"


class ServerUnavailableError(OpsloopError):
    """The server (or monitor) did not answer: not started, still loading, or unreachable."""


class ServerRejectedError(OpsloopError):
    """The server answered with an error status; the message is the server's own."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedModel:
    """What `GET /v2/models/{name}` says the server serves."""

    name: str
    version: str
    input_name: str
    item_shape: tuple[int, ...]  # one example without the batch axis, e.g. (1, 8, 8)
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Prediction:
    """One answer: the label, every class's probability, and who answered which request."""

    request_id: str
    model_name: str
    model_version: str
    role: str
    label: int
    class_names: tuple[str, ...]
    probabilities: tuple[float, ...]
    endpoint: str  # "predict" (an image file) or "infer" (a V2 tensor)

    @property
    def class_name(self) -> str:
        return self.class_names[self.label]

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


class ServerClient:
    """The inference server at `base_url`, serving `model_name`."""

    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        timeout: float = 10.0,
        feedback_token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.feedback_token = feedback_token
        # No proxy from the environment: the server is usually on loopback or in the same pod.
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def model(self) -> ServedModel:
        """The served model's name, version, input and classes."""
        document = self._call("GET", f"/v2/models/{self.model_name}")
        try:
            tensor = document["inputs"][0]
            return ServedModel(
                name=str(document["name"]),
                version=str(document["versions"][0]),
                input_name=str(tensor["name"]),
                item_shape=tuple(int(d) for d in tensor["shape"][1:]),
                class_names=tuple(str(c) for c in document["parameters"]["class_names"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ServerRejectedError(
                f"{self.base_url} answered model metadata without {exc}; is it an opsloop "
                "server (OPSLOOP_UI_SERVER_URL)?",
                200,
            ) from exc

    def predict_image(self, data: bytes, filename: str = "digit.png") -> Prediction:
        """`POST /predict` with an image file; the server maps it onto the model's input."""
        document = self._call("POST", "/predict", files={"file": (filename, data)})
        names = tuple(document["probabilities"])
        return Prediction(
            request_id=str(document["request_id"]),
            model_name=str(document["model_name"]),
            model_version=str(document["model_version"]),
            role=str(document.get("role", "champion")),
            label=int(document["label"]),
            class_names=names,
            probabilities=tuple(float(document["probabilities"][n]) for n in names),
            endpoint="predict",
        )

    def infer(self, pixels: npt.NDArray[Any], served: ServedModel) -> Prediction:
        """`POST /v2/models/{name}/infer` with one example already on the model's pixel scale."""
        request_id = uuid.uuid4().hex  # ours, so the label sent later joins on it
        body = {
            "id": request_id,
            "inputs": [
                {
                    "name": served.input_name,
                    "shape": [1, *served.item_shape],
                    "datatype": "FP32",
                    "data": np.asarray(pixels, dtype=np.float32).ravel().tolist(),
                }
            ],
        }
        document = self._call("POST", f"/v2/models/{served.name}/infer", json=body)
        outputs = {output["name"]: output["data"] for output in document["outputs"]}
        return Prediction(
            request_id=str(document["id"]),
            model_name=str(document["model_name"]),
            model_version=str(document["model_version"]),
            role=str(document.get("parameters", {}).get("role", "champion")),
            label=int(outputs["label"][0]),
            class_names=served.class_names,
            probabilities=tuple(float(p) for p in outputs["probabilities"]),
            endpoint="infer",
        )

    def send_feedback(self, request_id: str, label: int, item: int = 0) -> int:
        """`POST /feedback` with the true label of one answered example; how many were stored."""
        headers = {}
        if self.feedback_token:
            headers["Authorization"] = f"Bearer {self.feedback_token}"
        body = {"request_id": request_id, "item": item, "label": label}
        document = self._call("POST", "/feedback", json=body, headers=headers)
        return int(document.get("accepted", 0))

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnavailableError(
                f"the inference server at {self.base_url} is not answering "
                f"({first_line(exc)}); {START_HINT}"
            ) from exc
        return checked_json(response, self.base_url)


def checked_json(response: httpx.Response, base_url: str) -> dict[str, Any]:
    """A 2xx JSON object, or the error the server explained (`{"error": ...}`) as one line."""
    try:
        document = response.json()
    except ValueError:
        document = None
    if response.is_success and isinstance(document, dict):
        return document
    said = document.get("error") if isinstance(document, dict) else None
    said = said or response.text[:200] or response.reason_phrase
    if response.status_code == 503:
        raise ServerUnavailableError(f"the server at {base_url} is not ready: {said}")
    if response.status_code == 404:
        raise ServerRejectedError(f"{said} (set OPSLOOP_UI_MODEL_NAME to the served model)", 404)
    raise ServerRejectedError(f"the server at {base_url} refused: {said}", response.status_code)


@dataclass(frozen=True)
class MonitorStatus:
    """The monitoring service's latest drift verdict, or why there is none yet."""

    url: str
    drift: bool | None
    fired: tuple[str, ...]
    checked_at: str | None
    window_size: int | None
    error: str | None


def read_monitor_status(url: str, *, timeout: float = 3.0) -> MonitorStatus:
    """`GET /drift` of the monitor at `url`: its verdict, or the reason it has none."""
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            response = client.get(f"{url.rstrip('/')}/drift")
    except httpx.HTTPError as exc:
        raise ServerUnavailableError(
            f"the monitor at {url} is not answering ({first_line(exc)}); start it with "
            "`opsloop monitor serve` or set OPSLOOP_UI_MONITOR_URL=none"
        ) from exc
    try:
        document: Mapping[str, Any] = response.json()
    except ValueError as exc:
        raise ServerRejectedError(
            f"the monitor at {url} answered {response.status_code} without JSON; is "
            "OPSLOOP_UI_MONITOR_URL an opsloop monitor?",
            response.status_code,
        ) from exc
    if response.status_code != 200:
        return MonitorStatus(url, None, (), None, None, str(document.get("error", "no verdict")))
    return MonitorStatus(
        url=url,
        drift=bool(document.get("drift")),
        fired=tuple(document.get("fired", ())),
        checked_at=document.get("checked_at"),
        window_size=document.get("window_size"),
        error=None,
    )
