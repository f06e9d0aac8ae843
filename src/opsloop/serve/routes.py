"""The FastAPI routes: V2 health and metadata, `POST /predict`, `/metrics`, `POST /admin/reload`.

Thin handlers on an `APIRouter`; each takes the app's state as the typed dependency `get_state`.
`/predict` is decode (`image.decode_predict_request`) -> predict -> encode
(`protocol.encode_predict_response`). The infer endpoint is not here: the fast path answers it.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import SecretStr
from starlette.responses import JSONResponse, PlainTextResponse, Response

from opsloop.errors import OpsloopError
from opsloop.predictions import CHAMPION_ROLE
from opsloop.serve import schemas
from opsloop.serve.cors import check_origin
from opsloop.serve.fastpath import ROLE_HEADER, VERSION_HEADER, read_body
from opsloop.serve.feedback import parse_labels
from opsloop.serve.image import Invert, decode_predict_request_async, parse_invert
from opsloop.serve.manager import ServedModel
from opsloop.serve.openapi import FEEDBACK_BODY, PREDICT_BODY
from opsloop.serve.protocol import (
    RequestError,
    check_content_type,
    encode_predict_response,
    model_metadata,
    new_request_id,
    server_metadata,
)
from opsloop.serve.settings import ServeSettings
from opsloop.serve.state import AppState, get_state


class JSONBytes(JSONResponse):
    """A JSON response rendered with orjson.

    A JSONResponse subclass, so the OpenAPI document shows each route's `response_model` as
    its body; the routes return ready-made responses, so no model validates them at run time.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# Every route that needs the state takes it as this; tests swap `get_state` in dependency_overrides.
StateDep = Annotated[AppState, Depends(get_state)]
Route = Callable[..., Awaitable[Response]]
FEEDBACK_MEDIA_TYPES = ("application/json",)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entries of the error statuses a route really answers: `{"error": "..."}`."""
    return {code: {"model": schemas.ErrorResponse} for code in codes}


# The model routes: 404 for another model or version, 503 while none is loaded.
MODEL_ERRORS = errors(404, 503)

router = APIRouter(default_response_class=JSONBytes)


@router.get("/v2/health/live", response_model=schemas.Liveness, tags=["health"])
async def live() -> Response:
    """The process is up."""
    return JSONBytes({"live": True})


@router.get(
    "/v2/health/ready",
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "No model is loaded yet"}},
    tags=["health"],
)
async def ready(state: StateDep) -> Response:
    """A model is loaded and serving (503 until then)."""
    if state.manager.current is None:
        reason = state.manager.last_error or "the model is still loading"
        return JSONBytes({"ready": False, "error": f"model not loaded yet: {reason}"}, 503)
    return JSONBytes({"ready": True})


@router.get("/v2", response_model=schemas.ServerMetadata, tags=["metadata"])
async def server() -> Response:
    """Server name, version and protocol extensions."""
    return JSONBytes(server_metadata())


def model_route(suffix: str, response_model: type[Any], tag: str) -> Callable[[Route], Route]:
    """Register a GET route under both protocol forms: `/v2/models/{name}` and
    `/v2/models/{name}/versions/{version}`, each followed by `suffix`."""

    def register(endpoint: Route) -> Route:
        for prefix in (
            "/v2/models/{model_name}",
            "/v2/models/{model_name}/versions/{model_version}",
        ):
            router.get(
                prefix + suffix,
                response_model=response_model,
                responses=MODEL_ERRORS,
                tags=[tag],
            )(endpoint)
        return endpoint

    return register


@model_route("", schemas.ModelMetadata, "metadata")
async def model(state: StateDep, model_name: str, model_version: str | None = None) -> Response:
    """The model's input and output tensors, and its class names."""
    served = state.served(model_name, model_version)
    return JSONBytes(model_metadata(served.signature), headers=version_header(served))


@model_route("/ready", schemas.Readiness, "health")
async def model_ready(
    state: StateDep, model_name: str, model_version: str | None = None
) -> Response:
    """This model (version) is loaded and serving."""
    served = state.served(model_name, model_version)
    return JSONBytes({"name": served.signature.name, "ready": True}, headers=version_header(served))


@router.post(
    "/predict",
    response_model=schemas.PredictResponse,
    responses=errors(400, 403, 413, 415, 503),
    openapi_extra=PREDICT_BODY,
    tags=["inference"],
)
async def predict(state: StateDep, request: Request, invert: str = "auto") -> Response:
    """Classify one image file (PNG, JPEG, ...; any size): `curl -F file=@digit.png`.

    `invert`: `auto` (invert dark ink on light paper), `true` or `false`.
    """
    started = time.perf_counter()
    choice = parse_invert(invert)
    check_cross_origin(request, state.settings)
    state.served()  # 503 before reading a body for nothing
    body = await read_body(request.receive, request.headers.get("content-length"), state.settings)
    served, pixels = await decode_upload(
        state, body, request.headers.get("content-type", ""), choice
    )
    request_id = new_request_id()
    served, role = state.route(served, request_id)
    outputs = await served.batcher.predict(pixels)
    state.log_prediction(
        request_id=request_id,
        endpoint="predict",
        served=served,
        pixels=pixels,
        outputs=outputs,
        started=started,
        role=role,
    )
    return JSONBytes(
        encode_predict_response(served.signature, request_id, outputs[0][0], role),
        headers=version_header(served, role),
    )


async def decode_upload(
    state: AppState, body: bytes, content_type: str, invert: Invert
) -> tuple[ServedModel, npt.NDArray[np.float32]]:
    """The upload as the current model's input, decoded off the event loop (a large image takes
    CPU-seconds that other requests must not wait for). A model swapped in meanwhile answers,
    after a second decode if its preprocessing differs: the old one's batcher may be closed."""
    while True:
        served = state.served()
        preprocessing = served.model.bundle.manifest.preprocessing
        pixels = await decode_predict_request_async(
            body, content_type, preprocessing, invert, state.settings.max_image_pixels
        )
        current = state.served()
        if current.model.bundle.manifest.preprocessing == preprocessing:
            return current, pixels


@router.post(
    "/feedback",
    response_model=schemas.FeedbackResponse,
    responses=errors(400, 401, 403, 413, 415, 422, 503),
    openapi_extra=FEEDBACK_BODY,
    tags=["ground truth"],
)
async def post_feedback(state: StateDep, request: Request) -> Response:
    """Labels that arrived later, for predictions the server answered.

    One object or a list: `{"request_id": "...", "item": 0, "label": 3}` (or `"label": "3"`, a
    class name). `request_id` is the `id` of the V2 response (send your own `id` in the request
    to join your labelling system's records), or `request_id` of `/predict`; `item` is the
    example's row in that request. Posting a label again replaces it (the change is kept).
    """
    check_content_type(request.headers.get("content-type"), FEEDBACK_MEDIA_TYPES)
    check_cross_origin(request, state.settings)
    if state.settings.feedback_token is not None:
        check_bearer(
            state.settings.feedback_token,
            request.headers.get("authorization"),
            "feedback",
            "OPSLOOP_FEEDBACK_TOKEN",
        )
    served = state.served()  # labels are checked against the served model's classes
    body = await read_body(request.receive, request.headers.get("content-length"), state.settings)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}", status=400, reason="malformed_json") from None
    try:
        labels = parse_labels(document, served.signature.class_names)
    except RequestError:
        state.metrics.feedback_labels.labels("refused").inc()
        raise
    await asyncio.to_thread(state.feedback.record, labels)
    state.metrics.feedback_labels.labels("stored").inc(len(labels))
    return JSONBytes({"accepted": len(labels)})


@router.get(
    "/metrics",
    tags=["monitoring"],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics (all workers' in multiprocess mode)."""
    content, media_type = state.metrics.render()
    return Response(content, media_type=media_type)


@router.post(
    "/admin/reload",
    response_model=schemas.ReloadResponse,
    responses=errors(401, 403, 409, 503),
    tags=["admin"],
)
async def admin_reload(state: StateDep, request: Request) -> Response:
    """Reload the model from its source now (`Authorization: Bearer <OPSLOOP_ADMIN_TOKEN>`).

    With several workers this reloads the worker that answers; the others follow on their
    next poll (`OPSLOOP_RELOAD_POLL_SECONDS`).
    """
    check_admin(state.settings, request.headers.get("authorization"))
    try:
        outcome = await state.manager.reload(force=True)
    except OpsloopError as exc:
        raise RequestError(
            f"reload failed, still serving the previous model: {exc}",
            status=409,
            reason="reload_failed",
        ) from exc
    served = state.served()
    return JSONBytes(
        {
            "reloaded": outcome.changed,
            "model_name": served.signature.name,
            "model_version": outcome.version,
            "previous_version": outcome.previous_version,
        },
        headers=version_header(served),
    )


def check_cross_origin(request: Request, settings: ServeSettings) -> None:
    """403 for a browser page of another origin posting here (see `opsloop.serve.cors`)."""
    origin = request.headers.get("origin")
    if origin is not None:
        check_origin(origin, request.headers.get("host"), settings.cors_origin_list)


def version_header(served: ServedModel, role: str = CHAMPION_ROLE) -> dict[str, str]:
    """The answering model's version, and its role when it is not the champion."""
    headers = {VERSION_HEADER: served.signature.version}
    if role != CHAMPION_ROLE:
        headers[ROLE_HEADER] = role
    return headers


def check_admin(settings: ServeSettings, authorization: str | None) -> None:
    """401 without a bearer token, 403 with a wrong one (or when no token is configured)."""
    if settings.admin_token is None:
        raise RequestError(
            "admin endpoints are disabled; set OPSLOOP_ADMIN_TOKEN to enable them",
            status=403,
            reason="admin_disabled",
        )
    check_bearer(settings.admin_token, authorization, "admin", "OPSLOOP_ADMIN_TOKEN")


def check_bearer(expected: SecretStr, authorization: str | None, what: str, variable: str) -> None:
    """401 without `Authorization: Bearer <token>`, 403 with a wrong token (compared in
    constant time)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError(
            f"missing {what} token; send 'Authorization: Bearer <{variable}>'",
            status=401,
            reason="unauthenticated",
        )
    if not hmac.compare_digest(token.strip().encode(), expected.get_secret_value().encode()):
        raise RequestError(f"wrong {what} token", status=403, reason="forbidden")
