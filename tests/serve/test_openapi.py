"""The OpenAPI document: every endpoint, the fast path's infer endpoint included, is in `/docs`."""

from __future__ import annotations

import httpx
import pytest

from opsloop.serve.openapi import infer_operation

pytestmark = pytest.mark.anyio


async def test_docs_describe_every_endpoint(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
        "/predict",
        "/metrics",
        "/admin/reload",
    ):
        assert path in paths
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "InferRequest"
    )
    assert paths["/v2/models/{model_name}/versions/{model_version}/infer"]["post"] == infer
    assert infer == infer_operation()
    assert {"InferRequest", "InferResponse", "ErrorResponse"} <= set(
        document["components"]["schemas"]
    )
