"""The FastAPI routes: V2 health and metadata, `POST /predict`, `/metrics`, `POST /admin/reload`.

Thin handlers on an `APIRouter`; each takes the app's state as the typed dependency `get_state`.
`/predict` is decode (`image.decode_predict_request`) -> predict -> encode
(`protocol.encode_predict_response`). The infer endpoint is not here: the fast path answers it.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from opsloop.errors import OpsloopError
from opsloop.serve import schemas
from opsloop.serve.fastpath import VERSION_HEADER, read_body
from opsloop.serve.image import decode_predict_request, parse_invert
from opsloop.serve.manager import ServedModel
from opsloop.serve.openapi import PREDICT_BODY
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
    outputs = await served.batcher.predict(pixels)
    request_id = new_request_id()
    state.log_prediction(
        request_id=request_id,
        endpoint="predict",
        served=served,
        pixels=pixels,
        outputs=outputs,
        started=started,
    )
    return JSONBytes(
        encode_predict_response(served.signature, request_id, outputs[0][0]),
        headers=version_header(served),
    )


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


def version_header(served: ServedModel) -> dict[str, str]:
    return {VERSION_HEADER: served.signature.version}


def check_admin(settings: ServeSettings, authorization: str | None) -> None:
    """401 without a bearer token, 403 with a wrong one (or when no token is configured)."""
    if settings.admin_token is None:
        raise RequestError(
            "admin endpoints are disabled; set OPSLOOP_ADMIN_TOKEN to enable them",
            status=403,
            reason="admin_disabled",
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError(
            "missing admin token; send 'Authorization: Bearer <OPSLOOP_ADMIN_TOKEN>'",
            status=401,
            reason="unauthenticated",
        )
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(token.strip().encode(), expected):
        raise RequestError("wrong admin token", status=403, reason="forbidden")
