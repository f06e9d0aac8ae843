"""Multiple-testing corrections, checked against hand-computed values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from opsloop.monitor.stats import adjust_p_values

if TYPE_CHECKING:
    pass


def test_adjusted_p_values() -> None:
    p = [0.01, 0.04, 0.03]
    assert adjust_p_values(p, "bonferroni") == pytest.approx([0.03, 0.12, 0.09])
    assert adjust_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06])
    assert adjust_p_values(p, "bh") == pytest.approx([0.03, 0.04, 0.04])
