"""The HTTP API: `create_app(settings)` builds the FastAPI app that `opsloop serve` runs.

Routes: the Open Inference Protocol (KServe V2) health, metadata and infer endpoints, `POST
/predict` for image files, `/metrics`, `/docs` and `POST /admin/reload`. FastAPI provides the API
surface and its docs; the hot `POST /v2/models/{name}/infer` is answered by a bare ASGI handler in
front of FastAPI's routing (orjson, no per-request pydantic), because on a CPU the per-request
framework overhead, not the model, sets the throughput. The bundle is loaded in the lifespan.
Bad input is a 4xx (or 503 while no model is loaded) with `{"error": "..."}`, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from opsloop import __version__
from opsloop.errors import OpsloopError
from opsloop.serve import schemas
from opsloop.serve.batching import BatcherClosedError
from opsloop.serve.image import decode_image, extract_upload, parse_invert
from opsloop.serve.manager import BatchingLimits, ModelManager, ServedModel
from opsloop.serve.metrics import ServeMetrics
from opsloop.serve.predlog import LogRecord, NullPredictionLog, PredictionLog
from opsloop.serve.protocol import (
    HEADER_LENGTH,
    RequestError,
    decode_infer_request,
    encode_infer_response,
    error_body,
    model_metadata,
    new_request_id,
    output_tensors,
    parse_header_length,
    server_metadata,
)
from opsloop.serve.runtime import SessionTuning
from opsloop.serve.settings import ServeSettings, get_settings
from opsloop.serve.source import ModelSource, source_from_settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODELS_PREFIX = "/v2/models/"
INFER_SUFFIX = "/infer"
VERSION_HEADER = "x-model-version"
# The metrics label of the fast path: the same route template form as every other endpoint's.
INFER_ENDPOINT = "/v2/models/{model_name}/infer"
CLIENT_GONE = 499  # nginx's convention for "the client closed the connection", for metrics only


class JSONBytes(Response):
    """A JSON response rendered with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class AppState:
    """Everything the routes share, built by `create_app` and started in the lifespan."""

    settings: ServeSettings
    metrics: ServeMetrics
    manager: ModelManager
    predlog: PredictionLog
    executor: ThreadPoolExecutor

    def served(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The current model, if it is the one asked for: 503 while loading, 404 for another."""
        served = self.manager.current
        if served is None:
            reason = self.manager.last_error or "the model is still loading"
            raise RequestError(f"model not loaded yet: {reason}", status=503, reason="not_ready")
        signature = served.signature
        if name is not None and name != signature.name:
            raise RequestError(
                f"unknown model {name!r}; this server serves {signature.name!r}",
                status=404,
                reason="unknown_model",
            )
        if version and version != signature.version:
            raise RequestError(
                f"model {name!r} version {version!r} is not loaded; the server has version "
                f"{signature.version!r}",
                status=404,
                reason="unknown_version",
            )
        return served

    def log_prediction(
        self,
        *,
        request_id: str,
        endpoint: str,
        served: ServedModel,
        pixels: npt.NDArray[np.float32],
        outputs: tuple[npt.NDArray[Any], ...],
        started: float,
    ) -> None:
        """Queue the prediction for the log and count it in the metrics (no I/O here)."""
        probabilities, embedding = outputs
        self.predlog.append(
            LogRecord(
                request_id=request_id,
                created_at=time.time(),
                endpoint=endpoint,
                model_name=served.signature.name,
                model_version=served.signature.version,
                inputs=pixels,
                probabilities=probabilities,
                embedding=embedding,
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
        )
        self.metrics.observe_predictions(probabilities, served.signature.class_names)


def create_app(
    settings: ServeSettings | None = None, *, source: ModelSource | None = None
) -> FastAPI:
    """The serving app for `settings` (default: the environment's); `source` overrides the model."""
    settings = settings or get_settings()
    state = build_state(settings, source or source_from_settings(settings))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(state.predlog.start)
        await state.manager.start(settings.reload_poll_seconds)
        logger.info("serving %s", state.manager.source.describe())
        try:
            yield
        finally:
            await state.manager.close()  # every queued request is answered first
            await asyncio.to_thread(state.predlog.close)  # then everything logged is written
            state.executor.shutdown(wait=True)

    app = FastAPI(
        title="opsloop inference API",
        version=__version__,
        description="Open Inference Protocol (KServe V2) over an ONNX model bundle, plus "
        '`POST /predict` for image files. Errors are `{"error": "..."}`.',
        lifespan=lifespan,
        default_response_class=JSONBytes,
    )
    app.state.serve = state
    add_exception_handlers(app, state)
    add_routes(app, state)
    app.add_middleware(InferFastPath, state=state)
    install_openapi(app)
    return app


def build_state(settings: ServeSettings, source: ModelSource) -> AppState:
    metrics = ServeMetrics()
    # One inference thread per process: batches run one at a time, and the next batch queues up
    # while the current one runs, which is what makes batches grow under load.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
    manager = ModelManager(
        source,
        executor=executor if settings.inference_thread else None,
        metrics=metrics,
        tuning=SessionTuning(settings.ort_intra_op_threads, settings.ort_inter_op_threads),
        limits=BatchingLimits(settings.max_batch_size, settings.max_batch_wait_ms / 1000.0),
    )
    predlog = (
        PredictionLog(
            settings.resolved_predlog_url(),
            batch_rows=settings.predlog_batch_rows,
            flush_interval_s=settings.predlog_flush_ms / 1000.0,
            on_written=metrics.predlog_rows.inc,
        )
        if settings.predlog_enabled
        else NullPredictionLog()
    )
    return AppState(settings, metrics, manager, predlog, executor)


# --- the hot path ------------------------------------------------------------------------------


class InferFastPath:
    """Answers `POST /v2/models/{name}[/versions/{v}]/infer` directly; passes the rest on.

    It also counts every other request by endpoint and status for `/metrics`.
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.metrics = state.metrics
        self.settings = state.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if (
            scope["method"] == "POST"
            and path.startswith(MODELS_PREFIX)
            and path.endswith(INFER_SUFFIX)
        ):
            await self.infer(scope, receive, send)
            return
        await self.count(scope, receive, send)

    async def count(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 200
        try:
            name, version = parse_infer_path(scope["path"])
            self.state.served(name, version)  # 503/404 before reading a body for nothing
            headers = header_map(scope)
            body = await read_body(receive, headers.get("content-length"), self.settings)
            served = self.state.served(name, version)
            # From here to queuing on the batcher nothing awaits: the model cannot change under us.
            request = decode_infer_request(
                body,
                served.signature,
                header_length=parse_header_length(headers.get(HEADER_LENGTH)),
                max_rows=self.settings.max_request_rows,
            )
            outputs = await served.batcher.predict(request.pixels)
            payload, header_length = encode_infer_response(
                served.signature, request, output_tensors(*outputs)
            )
            self.state.log_prediction(
                request_id=request.id,
                endpoint="infer",
                served=served,
                pixels=request.pixels,
                outputs=outputs,
                started=started,
            )
            await send_bytes(send, 200, payload, served.signature.version, header_length)
        except RequestError as exc:
            status = exc.status
            self.metrics.reject(INFER_ENDPOINT, exc.reason)
            await send_bytes(send, status, error_body(str(exc)))
        except ClientDisconnect:
            status = CLIENT_GONE
        except BatcherClosedError as exc:  # cannot happen by construction; never a 500 if it does
            status = 503
            await send_bytes(send, status, error_body(str(exc)))
        except Exception:
            status = 500
            logger.exception("infer failed")
            await send_bytes(send, status, error_body("internal error; see the server log"))
        finally:
            self.metrics.observe_request(INFER_ENDPOINT, status, time.perf_counter() - started)


def parse_infer_path(path: str) -> tuple[str, str | None]:
    """(model name, version or None) from `/v2/models/{name}[/versions/{v}]/infer`."""
    middle = path[len(MODELS_PREFIX) : -len(INFER_SUFFIX)]
    parts = middle.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    raise RequestError(
        f"no such endpoint {path}; use /v2/models/{{name}}/infer", status=404, reason="bad_path"
    )


def header_map(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


async def read_body(receive: Receive, content_length: str | None, settings: ServeSettings) -> bytes:
    """The whole body, refusing (413) anything over the payload limit before reading it all."""
    limit = settings.max_payload_bytes
    check_declared_length(content_length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_declared_length(content_length: str | None, limit: int) -> None:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise payload_too_large(limit)


def payload_too_large(limit: int) -> RequestError:
    return RequestError(
        f"payload over the {limit}-byte limit (OPSLOOP_MAX_PAYLOAD_BYTES); send smaller batches",
        status=413,
        reason="payload_too_large",
    )


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    model_version: str | None = None,
    header_length: int | None = None,
) -> None:
    content_type = b"application/json" if header_length is None else b"application/octet-stream"
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if model_version is not None:
        headers.append((VERSION_HEADER.encode(), model_version.encode()))
    if header_length is not None:
        headers.append((HEADER_LENGTH.encode(), str(header_length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the rest of the API -----------------------------------------------------------------------


def add_routes(app: FastAPI, state: AppState) -> None:
    """Health, metadata, /predict, /metrics and /admin/reload."""
    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": schemas.ErrorResponse} for code in (400, 404, 413, 415, 503)
    }

    @app.get("/v2/health/live", response_model=schemas.Liveness, tags=["health"])
    async def live() -> Response:
        """The process is up."""
        return JSONBytes({"live": True})

    @app.get("/v2/health/ready", response_model=schemas.Readiness, tags=["health"])
    async def ready() -> Response:
        """A model is loaded and serving (503 until then)."""
        if state.manager.current is None:
            reason = state.manager.last_error or "the model is still loading"
            return JSONBytes({"ready": False, "error": f"model not loaded yet: {reason}"}, 503)
        return JSONBytes({"ready": True})

    @app.get("/v2", response_model=schemas.ServerMetadata, tags=["metadata"])
    async def server() -> Response:
        """Server name, version and protocol extensions."""
        return JSONBytes(server_metadata())

    @app.get(
        "/v2/models/{model_name}",
        response_model=schemas.ModelMetadata,
        responses=error_responses,
        tags=["metadata"],
    )
    @app.get(
        "/v2/models/{model_name}/versions/{model_version}",
        response_model=schemas.ModelMetadata,
        responses=error_responses,
        tags=["metadata"],
    )
    async def model(model_name: str, model_version: str | None = None) -> Response:
        """The model's input and output tensors, and its class names."""
        served = state.served(model_name, model_version)
        return JSONBytes(model_metadata(served.signature), headers=version_header(served))

    @app.get(
        "/v2/models/{model_name}/ready",
        response_model=schemas.Readiness,
        responses=error_responses,
        tags=["health"],
    )
    @app.get(
        "/v2/models/{model_name}/versions/{model_version}/ready",
        response_model=schemas.Readiness,
        responses=error_responses,
        tags=["health"],
    )
    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        """This model (version) is loaded and serving."""
        served = state.served(model_name, model_version)
        return JSONBytes(
            {"name": served.signature.name, "ready": True}, headers=version_header(served)
        )

    @app.post(
        "/predict",
        response_model=schemas.PredictResponse,
        responses=error_responses,
        openapi_extra=PREDICT_BODY,
        tags=["inference"],
    )
    async def predict(request: Request, invert: str = "auto") -> Response:
        """Classify one image file (PNG, JPEG, ...; any size): `curl -F file=@digit.png`.

        `invert`: `auto` (invert dark ink on light paper), `true` or `false`.
        """
        started = time.perf_counter()
        choice = parse_invert(invert)
        state.served()
        body = await read_body(
            request.receive, request.headers.get("content-length"), state.settings
        )
        image = extract_upload(body, request.headers.get("content-type", ""))
        served = state.served()
        prep = served.model.bundle.manifest.preprocessing
        pixels = decode_image(
            image,
            channels=prep.channels,
            height=prep.height,
            width=prep.width,
            pixel_max=prep.pixel_max,
            invert=choice,
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
            predict_body(served, request_id, outputs[0][0]), headers=version_header(served)
        )

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics (all workers' in multiprocess mode)."""
        content, media_type = state.metrics.render()
        return Response(content, media_type=media_type)

    @app.post(
        "/admin/reload",
        response_model=schemas.ReloadResponse,
        responses={401: {"model": schemas.ErrorResponse}, 403: {"model": schemas.ErrorResponse}},
        tags=["admin"],
    )
    async def admin_reload(request: Request) -> Response:
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


PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def predict_body(
    served: ServedModel, request_id: str, probabilities: npt.NDArray[np.float32]
) -> dict[str, Any]:
    signature = served.signature
    label = int(probabilities.argmax())
    return {
        "request_id": request_id,
        "model_name": signature.name,
        "model_version": signature.version,
        "label": label,
        "class_name": signature.class_names[label],
        "confidence": float(probabilities[label]),
        "probabilities": dict(zip(signature.class_names, probabilities.tolist(), strict=True)),
    }


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


def add_exception_handlers(app: FastAPI, state: AppState) -> None:
    """Every error becomes `{"error": "..."}` with its status; only real bugs are 500s."""

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        route = request.scope.get("route")
        state.metrics.reject(getattr(route, "path", "unmatched"), exc.reason)
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return JSONBytes({"error": str(exc)}, exc.status, headers=headers)

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONBytes({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONBytes({"error": f"invalid {where}: {first.get('msg', 'bad request')}"}, 422)

    async def client_gone(_request: Request, _exc: Exception) -> Response:
        return Response(status_code=CLIENT_GONE)

    async def unexpected(_request: Request, exc: Exception) -> Response:
        logger.error("request failed", exc_info=exc)
        return JSONBytes({"error": "internal error; see the server log"}, 500)

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)


def install_openapi(app: FastAPI) -> None:
    """Add the infer endpoint (answered by the fast path, not a FastAPI route) to `/docs`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (schemas.InferRequest, schemas.InferResponse, schemas.ErrorResponse):
            document = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(document.pop("$defs", {}))
            components[model.__name__] = document
        operation = infer_operation()
        schema["paths"]["/v2/models/{model_name}/infer"] = {"post": operation}
        schema["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"] = {
            "post": operation
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def infer_operation() -> dict[str, Any]:
    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    error = {"content": {"application/json": {"schema": ref("ErrorResponse")}}}
    return {
        "tags": ["inference"],
        "summary": "Infer (Open Inference Protocol V2)",
        "description": "JSON tensors, or Triton's binary tensor extension "
        "(`Inference-Header-Content-Length`). Outputs: probabilities, label, embedding.",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ref("InferRequest")}},
        },
        "responses": {
            "200": {"content": {"application/json": {"schema": ref("InferResponse")}}},
            **{str(code): {"description": "error", **error} for code in (400, 404, 413, 503)},
        },
    }


def app_from_env() -> FastAPI:
    """The app factory uvicorn imports (`opsloop serve`): settings from `OPSLOOP_*`."""
    return create_app(get_settings())
