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
    versioned = paths["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]
    for served, built in ((infer, infer_operation()), (versioned, infer_operation(versioned=True))):
        assert built["responses"].items() <= served["responses"].items()
        assert served["requestBody"]["content"].keys() == built["requestBody"]["content"].keys()
    assert {"InferRequest", "InferResponse", "ErrorResponse"} <= set(
        document["components"]["schemas"]
    )


async def test_infer_routes_declare_their_path_parameters(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path, names in (
        ("/v2/models/{model_name}/infer", ["model_name"]),
        ("/v2/models/{model_name}/versions/{model_version}/infer", ["model_name", "model_version"]),
    ):
        declared = [p["name"] for p in paths[path]["post"]["parameters"] if p["in"] == "path"]
        assert declared == names


async def test_every_200_body_has_its_model_not_a_string(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            content = operation["responses"]["200"]["content"]
            if path == "/metrics":
                assert content == {"text/plain": {"schema": {"type": "string"}}}
                continue
            schema = content["application/json"]["schema"]
            assert "$ref" in schema, f"{method} {path}: 200 is documented as {schema}"


async def test_errors_are_documented_as_the_error_body(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for operations in document["paths"].values():
        for operation in operations.values():
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")) and code not in ("503",):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
            assert {"408", "431"} <= set(operation["responses"])
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]["responses"]
    assert {"400", "403", "404", "413", "415", "503"} <= set(infer)


async def test_examples_are_the_served_models(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    metadata = paths["/v2/models/{model_name}/versions/{model_version}"]["get"]
    examples = {p["name"]: p.get("example") for p in metadata["parameters"]}
    assert examples == {"model_name": "digits", "model_version": "1"}
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    example = infer["requestBody"]["content"]["application/json"]["example"]
    response = await client.post("/v2/models/digits/infer", json=example)
    assert response.status_code == 200
