"""The Open Inference Protocol (KServe V2) as small pure functions: decode, validate, encode.

No pydantic on the hot path: requests are parsed with orjson and checked by hand, so an infer call
costs microseconds. Both tensor encodings are supported: JSON `data` (flat or nested, row-major)
and the binary tensor extension Triton's client uses by default (a JSON header of
`Inference-Header-Content-Length` bytes followed by raw little-endian tensor bytes). Every problem
raises `RequestError` with the HTTP status, a message naming what was wrong, and a short reason
used as a metric label.

Why one file of ~450 lines: it is the V2 wire contract, decode and encode of both tensor
encodings with their checks; split in two, the request and response sides would drift apart.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from opsloop import __version__
from opsloop.bundle import EMBEDDING, PROBABILITIES
from opsloop.errors import OpsloopError
from opsloop.predictions import MAX_REQUEST_ID

SERVER_NAME = "opsloop"
# The tensor datatypes the protocol names, and the numpy types they arrive as.
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}
# The model's own outputs keep their graph names; `label` is the argmax, added by the server.
LABEL_OUTPUT = "label"
# What an infer call can return; a request that names no outputs gets all of them, as the
# protocol says (and Triton does): every output the model metadata lists.
OUTPUT_DATATYPES = {PROBABILITIES: "FP32", LABEL_OUTPUT: "INT64", EMBEDDING: "FP32"}
DEFAULT_OUTPUTS = tuple(OUTPUT_DATATYPES)
HEADER_LENGTH = "inference-header-content-length"
# The body types infer takes: JSON, or the binary tensor extension's JSON header + raw bytes.
# Triton's Python client sends no content type at all, so a missing one is JSON (or binary
# when Inference-Header-Content-Length says so); anything else, such as the text/plain and
# form types a web page can post cross-origin without a preflight, is refused.
INFER_MEDIA_TYPES = ("application/json", "application/octet-stream")
NON_FINITE_LITERAL = re.compile(rb"\b(NaN|-?Infinity)\b")


class RequestError(OpsloopError):
    """A request the server rejects: its HTTP status, message and a metric-friendly reason."""

    def __init__(self, message: str, *, status: int = 400, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What the served model takes and returns, as the protocol needs to know it."""

    name: str
    version: str
    input_name: str
    item_shape: tuple[int, ...]  # one example, without the batch axis, e.g. (1, 8, 8)
    class_names: tuple[str, ...]
    embedding_size: int

    @property
    def item_size(self) -> int:
        return math.prod(self.item_shape)


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)  # not frozen: made per request, and a frozen init costs 4x
class InferRequest:
    """A validated infer call: float32 pixels of shape (rows, *item_shape) and what to return."""

    id: str
    pixels: npt.NDArray[np.float32]
    outputs: tuple[RequestedOutput, ...]


def decode_infer_request(
    body: bytes,
    signature: ModelSignature,
    *,
    header_length: int | None = None,
    max_rows: int = 1024,
) -> InferRequest:
    """Parse and validate an infer body against the model's input; raise RequestError if bad."""
    header, binary = split_binary_body(body, header_length)
    request = parse_json_object(header)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(
            f"'inputs' must be a list with exactly one tensor, '{signature.input_name}'",
            reason="bad_inputs",
        )
    tensor = inputs[0]
    pixels = decode_input_tensor(tensor, signature, binary, max_rows)
    binary_default = "parameters" in request and bool(
        _parameters(request).get("binary_data_output", False)
    )
    outputs = decode_requested_outputs(request.get("outputs"), binary_default)
    return InferRequest(
        id=decode_request_id(request.get("id")) or new_request_id(),
        pixels=pixels,
        outputs=outputs,
    )


def decode_request_id(request_id: object) -> str | None:
    """The client's `id`: a string of at most MAX_REQUEST_ID characters (it joins labels)."""
    if request_id is None:
        return None
    if not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, not {request_id!r:.40}", reason="bad_id")
    if len(request_id) > MAX_REQUEST_ID:
        raise RequestError(
            f"'id' of {len(request_id)} characters is over the limit of {MAX_REQUEST_ID}; "
            "send a shorter id",
            reason="bad_id",
        )
    return request_id


def check_content_type(
    content_type: str | None, accepted: tuple[str, ...] = INFER_MEDIA_TYPES
) -> None:
    """415 unless the body is one of `accepted` (infer's by default); none counts as JSON."""
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media not in accepted:
        raise RequestError(
            f"unsupported content type {media or content_type!r}; send "
            f"{' or '.join(accepted)} (curl: -H 'Content-Type: application/json')",
            status=415,
            reason="unsupported_media_type",
        )


# URL-safe base64's 64 characters in ASCII order, so that ids sort as the bytes they encode.
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SORTABLE = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_SORTABLE = bytes.maketrans(_BASE64, _SORTABLE)


def new_request_id() -> str:
    """16 URL-safe characters: the time in milliseconds (48 bits) then 48 random bits, encoded
    so that ids sort by the time they were made (like a UUIDv7 or ULID, in half the bytes of a
    UUID's hex). Sorted ids go in at the end of the log's request-id index instead of at a
    random place in it, which kept the ingester's cost per row growing with the log's size.
    Unique in practice: two ids of the same millisecond differ in 48 random bits."""
    prefix = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    raw = base64.urlsafe_b64encode(prefix + secrets.token_bytes(6))
    return raw.translate(_TO_SORTABLE).decode("ascii")


def split_binary_body(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tail of a binary-extension body (all JSON without one)."""
    if header_length is None:
        return body, b""
    if header_length < 0 or header_length > len(body):
        raise RequestError(
            f"Inference-Header-Content-Length {header_length} does not fit the {len(body)}-byte "
            "body",
            reason="bad_header_length",
        )
    return body[:header_length], body[header_length:]


def parse_header_length(value: str | None) -> int | None:
    """The binary extension's header length from its HTTP header value."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(
            f"Inference-Header-Content-Length must be an integer, not {value!r}",
            reason="bad_header_length",
        ) from None


def parse_json_object(payload: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 naming the JSON problem."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        # Python's json module writes NaN/Infinity literals, which JSON (and orjson) reject.
        if NON_FINITE_LITERAL.search(payload) or "infinity" in str(exc):
            raise RequestError(
                "the request contains NaN or infinity; send finite pixel values",
                reason="non_finite",
            ) from None
        raise RequestError(f"malformed JSON: {exc}", reason="malformed_json") from None
    if not isinstance(document, dict):
        raise RequestError("the request body must be a JSON object", reason="malformed_json")
    return document


def decode_input_tensor(
    tensor: dict[str, Any], signature: ModelSignature, binary: bytes, max_rows: int
) -> npt.NDArray[np.float32]:
    """One V2 input tensor as a finite float32 array of shape (rows, *item_shape)."""
    name = tensor.get("name")
    if name != signature.input_name:
        raise RequestError(
            f"unknown input {name!r}; model '{signature.name}' takes '{signature.input_name}'",
            reason="bad_input_name",
        )
    dtype = decode_datatype(tensor.get("datatype"))
    shape = decode_shape(tensor.get("shape"), signature, max_rows)
    expected = math.prod(shape)
    parameters = _parameters(tensor)
    if "binary_data_size" in parameters:
        array = decode_binary_data(binary, parameters["binary_data_size"], dtype, expected)
    else:
        array = decode_json_data(tensor.get("data"), dtype, expected, shape)
    # Values beyond float32's range become inf here and are rejected with the NaNs just below.
    with np.errstate(over="ignore", invalid="ignore"):
        pixels = array.reshape(shape).astype(np.float32, copy=False)
    if dtype.kind == "f" and not np.isfinite(pixels).all():
        raise RequestError(
            f"input '{signature.input_name}' contains NaN, infinity or null (or a value beyond "
            "float32); send finite pixel values",
            reason="non_finite",
        )
    return pixels


def decode_datatype(datatype: object) -> np.dtype[Any]:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            f"unsupported datatype {datatype!r}; use FP32 (or another numeric type: "
            f"{', '.join(DATATYPES)})",
            reason="bad_datatype",
        )
    return DATATYPES[datatype]


def decode_shape(shape: object, signature: ModelSignature, max_rows: int) -> tuple[int, ...]:
    """The tensor shape: a batch of 1..max_rows examples of the model's item shape."""
    if (
        type(shape) is not list
        or list(map(type, shape)).count(int) != len(shape)  # ints only: not 1.0, not True
        or tuple(shape[1:]) != signature.item_shape
        or not shape
        or shape[0] < 1
    ):
        expected = ["N", *signature.item_shape]
        raise RequestError(
            f"input shape {shape!r} does not match the model's {expected} (N >= 1 examples)",
            reason="bad_shape",
        )
    if shape[0] > max_rows:
        raise RequestError(
            f"input batch of {shape[0]} examples exceeds the limit of {max_rows} "
            "(OPSLOOP_MAX_REQUEST_ROWS); split it",
            status=413,
            reason="too_many_rows",
        )
    return tuple(shape)


def decode_json_data(
    data: object, dtype: np.dtype[Any], expected: int, shape: Sequence[int]
) -> npt.NDArray[Any]:
    """JSON `data` (flat or nested row-major lists of numbers) as a flat array of `expected`."""
    if not isinstance(data, list):
        raise RequestError(
            "input 'data' must be a list of numbers (or use the binary tensor extension)",
            reason="bad_data",
        )
    try:
        array = np.asarray(data, dtype=np.float64 if dtype.kind == "f" else dtype).ravel()
    except (ValueError, TypeError, OverflowError):
        raise RequestError(
            f"input 'data' must hold only numbers, flat or nested like the shape {list(shape)}",
            reason="bad_data",
        ) from None
    if array.size != expected:
        raise RequestError(
            f"input 'data' has {array.size} values but shape {list(shape)} needs {expected}",
            reason="data_size_mismatch",
        )
    return array


def decode_binary_data(
    binary: bytes, size: object, dtype: np.dtype[Any], expected: int
) -> npt.NDArray[Any]:
    """A binary-extension tensor: exactly `expected` little-endian values of `dtype`."""
    needed = expected * dtype.itemsize
    if type(size) is not int or size != needed or len(binary) < needed:
        raise RequestError(
            f"binary_data_size {size!r} (with {len(binary)} binary bytes sent) does not match "
            f"the {needed} bytes the shape and datatype need",
            reason="data_size_mismatch",
        )
    return np.frombuffer(binary, dtype=dtype, count=expected)


def decode_requested_outputs(outputs: object, binary_default: bool) -> tuple[RequestedOutput, ...]:
    """Which outputs to return and in which encoding; every name must be one the server offers.

    None (or an empty list) asks for every output, as the protocol says.
    """
    if outputs is None or outputs == []:
        return _named_outputs(DEFAULT_OUTPUTS, binary_default)
    if type(outputs) is list and len(outputs) <= len(OUTPUT_DATATYPES):
        # The usual request names a few outputs and nothing else: its answer is known.
        names = [o.get("name") if type(o) is dict and len(o) == 1 else None for o in outputs]
        # (A name is checked as a string first: a list or an object cannot be looked up.)
        if all(type(name) is str and name in OUTPUT_DATATYPES for name in names):
            return _named_outputs(tuple(names), binary_default)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise RequestError(
            "'outputs' must be a list of {'name': ...} objects", reason="bad_outputs"
        )
    requested = []
    for output in outputs:
        name = output.get("name")
        # Checked as a string first: a list or an object cannot even be looked up in a dict.
        if not isinstance(name, str) or name not in OUTPUT_DATATYPES:
            raise RequestError(
                f"unknown output {name!r:.60}; choose from {', '.join(OUTPUT_DATATYPES)}",
                reason="bad_outputs",
            )
        binary = bool(_parameters(output).get("binary_data", binary_default))
        requested.append(RequestedOutput(name, binary))
    return tuple(requested)


@functools.lru_cache(maxsize=64)
def _named_outputs(names: tuple[str, ...], binary: bool) -> tuple[RequestedOutput, ...]:
    """The outputs `names`, each in the request's default encoding (shared; never changed)."""
    return tuple(RequestedOutput(name, binary) for name in names)


def _parameters(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be a JSON object", reason="bad_parameters")
    return parameters


def output_tensors(
    probabilities: npt.NDArray[np.float32], embedding: npt.NDArray[np.float32]
) -> dict[str, npt.NDArray[Any]]:
    """Every output the server offers for one request's rows."""
    return {
        PROBABILITIES: probabilities,
        LABEL_OUTPUT: probabilities.argmax(axis=1).astype(np.int64),
        EMBEDDING: embedding,
    }


def encode_infer_response(
    signature: ModelSignature,
    request: InferRequest,
    tensors: Mapping[str, npt.NDArray[Any]],
    role: str = "champion",
) -> tuple[bytes, int | None]:
    """The V2 response body, and the JSON header's length when binary outputs follow it.

    An answer by a canary says so in the response's `parameters` (`{"role": "canary"}`).
    """
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in request.outputs:
        array = np.ascontiguousarray(tensors[output.name])
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": OUTPUT_DATATYPES[output.name],
            "shape": list(array.shape),
        }
        if output.binary:
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel()
        described.append(entry)
    document: dict[str, Any] = {
        "model_name": signature.name,
        "model_version": signature.version,
        "id": request.id,
        "outputs": described,
    }
    if role != "champion":
        document["parameters"] = {"role": role}
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def encode_predict_response(
    signature: ModelSignature,
    request_id: str,
    probabilities: npt.NDArray[np.float32],
    role: str = "champion",
) -> dict[str, Any]:
    """The `/predict` answer for one image's probabilities: label, class name, confidence."""
    label = int(probabilities.argmax())
    return {
        "request_id": request_id,
        "model_name": signature.name,
        "model_version": signature.version,
        "role": role,
        "label": label,
        "class_name": signature.class_names[label],
        "confidence": float(probabilities[label]),
        "probabilities": dict(zip(signature.class_names, probabilities.tolist(), strict=True)),
    }


def error_body(message: str) -> bytes:
    """Every error the server returns: `{"error": "..."}`."""
    return orjson.dumps({"error": message})


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(signature: ModelSignature, platform: str = "onnxruntime_onnx") -> dict[str, Any]:
    """The V2 model metadata: versions, platform, input and output tensors."""
    classes = len(signature.class_names)
    return {
        "name": signature.name,
        "versions": [signature.version],
        "platform": platform,
        "inputs": [
            {"name": signature.input_name, "datatype": "FP32", "shape": [-1, *signature.item_shape]}
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
            {"name": LABEL_OUTPUT, "datatype": "INT64", "shape": [-1]},
            {"name": EMBEDDING, "datatype": "FP32", "shape": [-1, signature.embedding_size]},
        ],
        "parameters": {"class_names": list(signature.class_names)},
    }
