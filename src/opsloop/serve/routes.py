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

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import SecretStr
from starlette.responses import Response

from opsloop.errors import OpsloopError
from opsloop.predictions import CHAMPION_ROLE
from opsloop.serve import schemas
from opsloop.serve.fastpath import ROLE_HEADER, VERSION_HEADER, read_body
from opsloop.serve.feedback import parse_labels
from opsloop.serve.image import decode_predict_request, parse_invert
from opsloop.serve.manager import ServedModel
from opsloop.serve.openapi import FEEDBACK_BODY, PREDICT_BODY
from opsloop.serve.protocol import (
    RequestError,
    encode_predict_response,
    model_metadata,
    new_request_id,
    server_metadata,
)
from opsloop.serve.settings import ServeSettings
from opsloop.serve.state import AppState, get_state


class JSONBytes(Response):
    """A JSON response rendered with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# Every route that needs the state takes it as this; tests swap `get_state` in dependency_overrides.
StateDep = Annotated[AppState, Depends(get_state)]
Route = Callable[..., Awaitable[Response]]
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse} for code in (400, 404, 413, 415, 503)
}

router = APIRouter(default_response_class=JSONBytes)


@router.get("/v2/health/live", response_model=schemas.Liveness, tags=["health"])
async def live() -> Response:
    """The process is up."""
    return JSONBytes({"live": True})


@router.get("/v2/health/ready", response_model=schemas.Readiness, tags=["health"])
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
                responses=ERROR_RESPONSES,
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
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_BODY,
    tags=["inference"],
)
async def predict(state: StateDep, request: Request, invert: str = "auto") -> Response:
    """Classify one image file (PNG, JPEG, ...; any size): `curl -F file=@digit.png`.

    `invert`: `auto` (invert dark ink on light paper), `true` or `false`.
    """
    started = time.perf_counter()
    choice = parse_invert(invert)
    state.served()  # 503 before reading a body for nothing
    body = await read_body(request.receive, request.headers.get("content-length"), state.settings)
    served = state.served()
    pixels = decode_predict_request(
        body,
        request.headers.get("content-type", ""),
        served.model.bundle.manifest.preprocessing,
        choice,
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


@router.post(
    "/feedback",
    response_model=schemas.FeedbackResponse,
    responses={code: {"model": schemas.ErrorResponse} for code in (401, 403, 413, 422, 503)},
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


@router.get("/metrics", tags=["monitoring"], response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics (all workers' in multiprocess mode)."""
    content, media_type = state.metrics.render()
    return Response(content, media_type=media_type)


@router.post(
    "/admin/reload",
    response_model=schemas.ReloadResponse,
    responses={401: {"model": schemas.ErrorResponse}, 403: {"model": schemas.ErrorResponse}},
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
