"""The candidate model beside the champion: shadow answers logged and never returned, a sticky
canary share answered by the candidate and marked as such."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.predictions import read_predictions
from opsloop.serve.app import create_app
from opsloop.serve.state import canary_bucket
from tests.serve.inprocess import INFER, infer_body, make_settings, metric, png, running
from tests.serve.onnx_bundles import write_bundle

pytestmark = pytest.mark.anyio


@pytest.fixture
def candidate_bundle(tmp_path: Path) -> Path:
    """Version "2": the same shapes, other weights (so its answers differ)."""
    return write_bundle(tmp_path / "candidate", version="2", seed=1)


def log_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'predictions.db'}"


async def test_shadow_answers_are_logged_never_returned(
    tmp_path: Path,
    tiny_bundle: Path,
    candidate_bundle: Path,
    pixels: npt.NDArray[np.float32],
) -> None:
    settings = make_settings(
        tmp_path, tiny_bundle, shadow=True, candidate_bundle_path=candidate_bundle
    )
    async for client in running(create_app(settings)):
        for index in range(6):
            response = await client.post(INFER, json=infer_body(pixels[:2], id=f"s{index}"))
            assert response.status_code == 200
            assert response.json()["model_version"] == "1"  # always the champion's answer
            assert "x-model-role" not in response.headers
            assert "parameters" not in response.json()
        predict = await client.post("/predict", files={"file": ("d.png", png(), "image/png")})
        assert predict.json()["role"] == "champion"
        await asyncio.sleep(0.3)
        text = (await client.get("/metrics")).text
    assert metric(text, 'opsloop_shadow_rows_total{outcome="logged"}') == 13
    assert metric(text, 'opsloop_candidate_info{model_name="digits",model_version="2"}') == 1
    logged = read_predictions(log_url(tmp_path))
    by_role = {role: logged.roles.count(role) for role in set(logged.roles)}
    assert by_role == {"champion": 13, "shadow": 13}
    shadow = logged.where(np.array([role == "shadow" for role in logged.roles]))
    assert set(shadow.model_versions) == {"2"}
    champion = logged.where(np.array([role == "champion" for role in logged.roles]))
    # The same requests, as the champion saw them, answered differently by the candidate.
    pairs = sorted(zip(shadow.request_ids, shadow.items, strict=True))
    assert pairs == sorted(zip(champion.request_ids, champion.items, strict=True))
    assert not np.allclose(
        np.sort(shadow.probabilities, axis=0), np.sort(champion.probabilities, axis=0)
    )


async def test_a_full_shadow_backlog_is_skipped_and_counted(
    tmp_path: Path,
    tiny_bundle: Path,
    candidate_bundle: Path,
    pixels: npt.NDArray[np.float32],
) -> None:
    settings = make_settings(
        tmp_path,
        tiny_bundle,
        shadow=True,
        candidate_bundle_path=candidate_bundle,
        shadow_max_pending_rows=1,
    )
    async for client in running(create_app(settings)):
        response = await client.post(INFER, json=infer_body(pixels[:3]))
        assert response.status_code == 200
        await asyncio.sleep(0.2)
        text = (await client.get("/metrics")).text
    assert metric(text, 'opsloop_shadow_rows_total{outcome="skipped"}') == 3


async def test_shadow_answers_that_come_together_reach_the_journal_in_one_write(
    tmp_path: Path,
    tiny_bundle: Path,
    candidate_bundle: Path,
    pixels: npt.NDArray[np.float32],
) -> None:
    settings = make_settings(
        tmp_path,
        tiny_bundle,
        shadow=True,
        candidate_bundle_path=candidate_bundle,
        shadow_batch_wait_ms=200,  # every shadow row of the burst below waits for the others
    )
    app = create_app(settings)
    writes: list[int] = []  # records per journal write of shadow answers
    predlog = app.state.serve.predlog
    append_many = predlog.append_many

    def recording(records: Any) -> None:
        shadow = [record for record in records if record.role == "shadow"]
        if shadow:
            writes.append(len(shadow))
        append_many(records)

    predlog.append_many = recording
    async for client in running(app):
        answers = await asyncio.gather(
            *(client.post(INFER, json=infer_body(pixels[:1], id=f"b{i}")) for i in range(8))
        )
        assert all(answer.status_code == 200 for answer in answers)
        await asyncio.sleep(0.5)
    assert writes == [8]


async def test_the_canary_share_is_sticky_by_request_id_and_marked(
    tmp_path: Path,
    tiny_bundle: Path,
    candidate_bundle: Path,
    pixels: npt.NDArray[np.float32],
) -> None:
    fraction = 0.3
    settings = make_settings(
        tmp_path, tiny_bundle, canary_fraction=fraction, candidate_bundle_path=candidate_bundle
    )
    ids = [f"user-{index}" for index in range(200)]
    answered: dict[str, str] = {}
    async for client in running(create_app(settings)):
        for request_id in ids:
            response = await client.post(INFER, json=infer_body(pixels[:1], id=request_id))
            body = response.json()
            answered[request_id] = body["model_version"]
            canary = body["model_version"] == "2"
            assert (response.headers.get("x-model-role") == "canary") is canary
            assert (body.get("parameters") == {"role": "canary"}) is canary
        again = await client.post(INFER, json=infer_body(pixels[:1], id=ids[0]))
        assert again.json()["model_version"] == answered[ids[0]]  # sticky
        await asyncio.sleep(0.2)
    expected = {rid for rid in ids if canary_bucket(rid) < fraction}
    assert {rid for rid, version in answered.items() if version == "2"} == expected
    assert 0.2 < len(expected) / len(ids) < 0.4
    logged = read_predictions(log_url(tmp_path))
    roles = dict(zip(logged.request_ids, logged.roles, strict=True))
    assert {rid for rid, role in roles.items() if role == "canary"} == expected


async def test_without_a_loadable_candidate_the_champion_answers_everything(
    tmp_path: Path, tiny_bundle: Path, pixels: npt.NDArray[np.float32]
) -> None:
    settings = make_settings(
        tmp_path, tiny_bundle, canary_fraction=1.0, candidate_bundle_path=tmp_path / "missing"
    )
    async for client in running(create_app(settings)):
        assert (await client.get("/v2/health/ready")).status_code == 200
        response = await client.post(INFER, json=infer_body(pixels[:1]))
        assert response.status_code == 200
        assert response.json()["model_version"] == "1"


def test_shadow_rows_wait_to_batch_and_a_canary_does_not(
    tmp_path: Path, tiny_bundle: Path, candidate_bundle: Path
) -> None:
    """Nobody waits for a shadow answer, so its rows wait to batch; a canary's are answers."""

    def candidate_wait(**overrides: object) -> float:
        settings = make_settings(
            tmp_path,
            tiny_bundle,
            candidate_bundle_path=candidate_bundle,
            shadow_batch_wait_ms=7,
            **overrides,
        )
        candidate = create_app(settings).state.serve.candidate
        assert candidate is not None
        return float(candidate.limits.max_wait_s)

    assert candidate_wait(shadow=True) == pytest.approx(0.007)
    assert candidate_wait(canary_fraction=0.5, max_batch_wait_ms=1) == pytest.approx(0.001)
