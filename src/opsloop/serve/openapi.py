"""The API's OpenAPI document (`/docs`, `/openapi.json`) where FastAPI cannot derive it alone.

The infer endpoint is answered by the fast path, not a FastAPI route, so `install_openapi` adds
it (with the V2 request and response schemas); `PREDICT_BODY` describes `/predict`'s upload.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from opsloop.serve import schemas

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


def install_openapi(app: FastAPI) -> None:
    """Add the infer endpoint (answered by the fast path, not a FastAPI route) to `/docs`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
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
        operation = infer_operation()
        schema["paths"]["/v2/models/{model_name}/infer"] = {"post": operation}
        schema["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"] = {
            "post": operation
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def infer_operation() -> dict[str, Any]:
    """The OpenAPI operation of `POST /v2/models/{name}[/versions/{v}]/infer`."""

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
