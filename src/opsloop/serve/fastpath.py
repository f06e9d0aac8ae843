"""The hot path: `POST /v2/models/{name}[/versions/{v}]/infer` as a bare ASGI handler.

It sits in front of FastAPI's routing and passes every other request on. Decode, predict and
encode are `protocol` functions around the model's micro-batcher; orjson, no per-request pydantic,
because on a CPU the per-request framework overhead, not the model, sets the throughput.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from opsloop.predictions import CHAMPION_ROLE
from opsloop.serve.batching import BatcherClosedError
from opsloop.serve.cors import check_origin
from opsloop.serve.middleware import CLIENT_GONE, ENDPOINT_KEY, STATUS_KEY
from opsloop.serve.protocol import (
    HEADER_LENGTH,
    RequestError,
    check_content_type,
    decode_infer_request,
    encode_infer_response,
    error_body,
    output_tensors,
    parse_header_length,
)
from opsloop.serve.settings import ServeSettings
from opsloop.serve.state import AppState

logger = logging.getLogger(__name__)

MODELS_PREFIX = "/v2/models/"
INFER_SUFFIX = "/infer"
VERSION_HEADER = "x-model-version"
ROLE_HEADER = "x-model-role"  # set on answers not given by the champion (a canary's)
# The metrics label of the fast path: the same route template form as every other endpoint's.
INFER_ENDPOINT = "/v2/models/{model_name}/infer"


class InferFastPath:
    """Answers `POST /v2/models/{name}[/versions/{v}]/infer` directly; passes the rest on.

    For `CountRequests` it records its label and status in the scope (`ENDPOINT_KEY`,
    `STATUS_KEY`; 499 when the client left before the answer). The infer call is answered in
    `__call__` itself, so a request costs no more coroutines than before counting moved out.
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.metrics = state.metrics
        self.settings = state.settings
        self.cors_origins = state.settings.cors_origin_list

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not (
            scope["method"] == "POST"
            and path.startswith(MODELS_PREFIX)
            and path.endswith(INFER_SUFFIX)
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope[ENDPOINT_KEY] = INFER_ENDPOINT
        status = 200
        try:
            name, version = parse_infer_path(path)
            self.state.served(name, version)  # 503/404 before reading a body for nothing
            headers = header_map(scope)
            check_content_type(headers.get("content-type"))
            if "origin" in headers:  # browsers only: refuse another site's page posting here
                check_origin(headers["origin"], headers.get("host"), self.cors_origins)
            body = await read_body(receive, headers.get("content-length"), self.settings)
            served = self.state.served(name, version)
            # From here to queuing on the batcher nothing awaits: the model cannot change under us.
            request = decode_infer_request(
                body,
                served.signature,
                header_length=parse_header_length(headers.get(HEADER_LENGTH)),
                max_rows=self.settings.max_request_rows,
            )
            served, role = self.state.route(served, request.id)
            outputs = await served.batcher.predict(request.pixels)
            payload, header_length = encode_infer_response(
                served.signature, request, output_tensors(*outputs), role
            )
            self.state.log_prediction(
                request_id=request.id,
                endpoint="infer",
                served=served,
                pixels=request.pixels,
                outputs=outputs,
                started=started,
                role=role,
            )
            await send_bytes(send, 200, payload, served.signature.version, header_length, role)
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
            scope[STATUS_KEY] = status


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
    role: str = CHAMPION_ROLE,
) -> None:
    content_type = b"application/json" if header_length is None else b"application/octet-stream"
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if model_version is not None:
        headers.append((VERSION_HEADER.encode(), model_version.encode()))
    if header_length is not None:
        headers.append((HEADER_LENGTH.encode(), str(header_length).encode()))
    if role != CHAMPION_ROLE:
        headers.append((ROLE_HEADER.encode(), role.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
