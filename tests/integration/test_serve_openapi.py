"""The served OpenAPI document is true: schemathesis fuzzes a real `opsloop serve` from it.

Every operation, the fast path's infer endpoints included, gets generated requests (valid ones
and broken ones, bounded in number and seeded); each answer must be no 5xx, a status the document
lists for that operation, its documented content type, and a body its schema accepts. The admin
and feedback tokens are set and sent, so the authorised paths run too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (dev group) is missing")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.processes import serving_bundle  # noqa: E402
from tests.serve.onnx_bundles import write_bundle  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "fuzz-token"  # both the admin and the feedback token, so one header opens both
EXAMPLES_PER_OPERATION = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`opsloop serve` of the tiny digits model, one worker, both tokens set."""
    tmp_path = tmp_path_factory.mktemp("serve-openapi")
    bundle = write_bundle(tmp_path / "bundle", version="1", seed=0)
    log = f"sqlite:///{tmp_path / 'predictions.db'}"
    tokens = {"OPSLOOP_ADMIN_TOKEN": TOKEN, "OPSLOOP_FEEDBACK_TOKEN": TOKEN}
    with serving_bundle(bundle, tmp_path, log, OPSLOOP_RELOAD_POLL_SECONDS="0", **tokens) as url:
        yield url


# Every operation the server has; the served document must list exactly these.
OPERATIONS = [
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{model_name}"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}"),
    ("GET", "/v2/models/{model_name}/ready"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}/ready"),
    ("POST", "/v2/models/{model_name}/infer"),
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"),
    ("POST", "/predict"),
    ("POST", "/feedback"),
    ("GET", "/metrics"),
    ("POST", "/admin/reload"),
]


@pytest.fixture(scope="module")
def api_schema(server_url: str) -> Any:
    """The document as the server serves it, with the base URL and the token to call it."""
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    schema.config.update(
        base_url=server_url, headers={"authorization": f"Bearer {TOKEN}"}, request_timeout=30
    )
    return schema


def test_the_document_lists_every_operation(api_schema: Any) -> None:
    listed = {
        (result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()
    }
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_answers_as_documented(api_schema: Any, method: str, path: str) -> None:
    """Valid, invalid and the document's own example requests; every answer checked."""
    operation = api_schema[path][method]
    strategies = [
        operation.as_strategy(generation_mode=mode)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    strategies += api_schema.get_strategies_from_examples(operation)
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def call(case: schemathesis.Case) -> None:
        # Raises on any failed check: a 5xx, or an answer that breaks its documented schema.
        statuses.append(case.call_and_validate(checks=CHECKS).status_code)

    call()
    assert statuses, "no request was generated"
    assert max(statuses) < 500, statuses
