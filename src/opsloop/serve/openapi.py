"""The API's OpenAPI document (`/docs`, `/openapi.json`) where FastAPI cannot derive it alone.

The infer endpoint is answered by the fast path, not a FastAPI route, so `install_openapi` adds
it (with its path parameters and the V2 request and response schemas); `PREDICT_BODY` describes
`/predict`'s upload. Every status the server really answers is documented with its body: errors
are `{"error": "..."}` (FastAPI's own 422 schema is replaced by that), and the connection limits
(`opsloop.serve.limits`: 408, 431) apply to every operation. `tests/integration/
test_serve_openapi.py` fuzzes the served document with schemathesis to keep it true.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from opsloop.serve import schemas
from opsloop.serve.protocol import ModelSignature

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

# `POST /feedback` reads its body by hand (one label or a list): documented here.
FEEDBACK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/FeedbackLabel"},
                        {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/FeedbackLabel"},
                        },
                    ]
                }
            }
        },
    }
}


def install_openapi(app: FastAPI, served: Callable[[], ModelSignature | None]) -> None:
    """Add the infer endpoint (answered by the fast path, not a FastAPI route) to `/docs`, with
    examples for the model `served()` returns (built again when another model is loaded)."""
    built: dict[tuple[object, ...] | None, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        signature = served()
        key = (
            None if signature is None else (signature.name, signature.version, signature.item_shape)
        )
        if key not in built:
            built.clear()
            built[key] = build_document(app, signature)
        app.openapi_schema = built[key]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI, signature: ModelSignature | None) -> dict[str, Any]:
    """FastAPI's document of the routes, plus the infer endpoint, errors and examples."""
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (
        schemas.InferRequest,
        schemas.InferResponse,
        schemas.ErrorResponse,
        schemas.FeedbackLabel,
    ):
        document = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(document.pop("$defs", {}))
        components[model.__name__] = document
    schema["paths"]["/v2/models/{model_name}/infer"] = {"post": infer_operation(signature)}
    schema["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"] = {
        "post": infer_operation(signature, versioned=True)
    }
    document_errors(schema)
    if signature is not None:
        add_model_examples(schema, signature)
    return schema


# What each error status of the infer endpoint means (all are `{"error": "..."}`).
INFER_ERRORS = {
    400: "The request is not a valid infer request for this model (the message says why)",
    403: "A browser page of an origin not in OPSLOOP_CORS_ORIGINS",
    404: "Another model or version than the one served",
    413: "Over OPSLOOP_MAX_PAYLOAD_BYTES or OPSLOOP_MAX_REQUEST_ROWS",
    415: "A content type other than application/json or application/octet-stream",
    503: "No model loaded yet",
}
# Answered before any route, for any operation (`opsloop.serve.limits`).
CONNECTION_ERRORS = {
    408: "Headers or body not received in time (OPSLOOP_HEADER_TIMEOUT_S, OPSLOOP_BODY_TIMEOUT_S)",
    431: "Request headers over OPSLOOP_MAX_HEADER_BYTES",
}
# Inputs up to this many values get an example request (a blank image) in the document.
MAX_EXAMPLE_VALUES = 4096


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": ref("ErrorResponse")}},
    }


def path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "title": name},
        "description": description,
    }


def infer_operation(
    signature: ModelSignature | None = None, *, versioned: bool = False
) -> dict[str, Any]:
    """The OpenAPI operation of `POST /v2/models/{name}[/versions/{v}]/infer`, with an example
    request for `signature`'s model when it is small enough to show."""
    parameters = [path_parameter("model_name", "The served model's name")]
    if versioned:
        parameters.append(path_parameter("model_version", "The served version"))
    parameters.append(
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Binary tensor extension: the length of the JSON header that starts "
            "the body; raw little-endian tensor bytes follow it",
        }
    )
    binary = {"schema": {"type": "string", "format": "binary"}}
    json_body: dict[str, Any] = {"schema": ref("InferRequest")}
    if signature is not None and signature.item_size <= MAX_EXAMPLE_VALUES:
        json_body["example"] = infer_example(signature)
    return {
        "tags": ["inference"],
        "summary": "Infer (Open Inference Protocol V2)",
        "operationId": "infer_versioned" if versioned else "infer",
        "description": "JSON tensors, or Triton's binary tensor extension "
        "(`Inference-Header-Content-Length`). Outputs: probabilities, label and embedding; a "
        "request that names none gets all three. A request without a content type is JSON.",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": json_body,
                "application/octet-stream": binary,
            },
        },
        "responses": {
            "200": {
                "description": "The requested outputs (binary ones follow the JSON header, whose "
                "length the Inference-Header-Content-Length response header gives)",
                "content": {
                    "application/json": {"schema": ref("InferResponse")},
                    "application/octet-stream": binary,
                },
            },
            **{str(code): error_response(text) for code, text in INFER_ERRORS.items()},
        },
    }


def infer_example(signature: ModelSignature) -> dict[str, Any]:
    """One blank example for `signature`'s model: what `/docs` offers to try."""
    tensor = {
        "name": signature.input_name,
        "shape": [1, *signature.item_shape],
        "datatype": "FP32",
        "data": [0.0] * signature.item_size,
    }
    return {"id": "example-1", "inputs": [tensor]}


def add_model_examples(schema: dict[str, Any], signature: ModelSignature) -> None:
    """The served model's name and version: the example, and the only value, of each such
    parameter (any other is a 404, and says so)."""
    served = {"model_name": signature.name, "model_version": signature.version}
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                value = served.get(parameter["name"])
                if value is not None:
                    parameter["example"] = value
                    parameter["schema"] = {**parameter["schema"], "enum": [value]}


def document_errors(schema: dict[str, Any]) -> None:
    """Every operation: its 422 is `{"error": ...}` (our handler's), plus the connection limits."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = error_response("The request's parameters are invalid")
            for code, text in CONNECTION_ERRORS.items():
                responses.setdefault(str(code), error_response(text))
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
