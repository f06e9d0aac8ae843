"""Evidently's HTML report: written atomically, and its p-values equal ours."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from opsloop.monitor import (
    ReferenceData,
    detect_drift,
)
from opsloop.monitor.evidently_report import write_html_report
from opsloop.monitor.features import IMAGE_FEATURES, image_statistics
from tests.monitor.samples import draw, shifted, window

if TYPE_CHECKING:
    from opsloop.export import ExportResult


def test_the_html_report_is_written_and_matches_evidentlys_p_values(
    bundle: ExportResult, reference: ReferenceData, holdout_split: Any, tmp_path: Path
) -> None:
    from evidently import Report
    from evidently.presets import DataDriftPreset

    current = window(bundle, shifted(draw(holdout_split[0], 80, seed=2), "gaussian_noise", 0.125))
    report = detect_drift(reference, current)
    path = write_html_report(reference, current, tmp_path / "out" / "drift.html", report=report)
    assert path.is_file()
    assert "<html" in path.read_text(encoding="utf-8")[:2000].lower()
    # Our image-statistics p-values are the ones Evidently computes for the same columns.
    import pandas as pd

    columns = list(IMAGE_FEATURES)
    snapshot = Report([DataDriftPreset(num_method="ks")]).run(
        reference_data=pd.DataFrame(reference.image_stats, columns=columns),
        current_data=pd.DataFrame(image_statistics(current.images, 16.0), columns=columns),
    )
    evidently = {
        m["config"]["column"]: m["value"]
        for m in snapshot.dict()["metrics"]
        if m["config"].get("type", "").endswith("ValueDrift")
    }
    ours = {t.feature: t.p_value for t in report.detector("image_stats").features}
    assert evidently.keys() == ours.keys()
    for feature, p_value in ours.items():
        assert evidently[feature] == pytest.approx(p_value, rel=1e-6, abs=1e-12), feature
