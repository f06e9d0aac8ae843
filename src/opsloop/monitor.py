"""Drift detection: a window of recent predictions against the bundle's reference sample.

`detect_drift(load_reference(bundle), window_from_log(url, last=200))` runs three detectors —
image statistics of the raw inputs, a PCA projection of the embeddings, and the softmax outputs
(black-box shift detection) — as per-feature two-sample tests, corrects them together for
multiple testing and returns a `DriftReport`. `write_html_report` renders an Evidently report.
Torch-free; Evidently, the only module that imports it, is imported only for the HTML report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from scipy import stats

from opsloop.bundle import Bundle, load_bundle, onnx_session, run_onnx
from opsloop.errors import MonitorError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Correction = Literal["holm", "bonferroni", "bh"]
CORRECTIONS: tuple[str, ...] = ("holm", "bonferroni", "bh")
DEFAULT_MIN_SAMPLES = 30
MAX_PCA_COMPONENTS = 8
PCA_VARIANCE = 0.9
# Pixel levels, as fractions of pixel_max, that separate background, ink and saturated ink.
BACKGROUND_LEVEL = 0.05
INK_LEVEL = 0.5
SATURATED_LEVEL = 0.95
EDGE_LEVEL = 0.25

IMAGE_FEATURES = (
    "brightness",
    "contrast",
    "dynamic_range",
    "sharpness",
    "gradient",
    "edge_density",
    "ink_fraction",
    "background_fraction",
    "saturated_fraction",
    "centroid_row",
    "centroid_col",
    "spread",
    "orientation",
    "eccentricity",
)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def image_statistics(images: npt.NDArray[Any], pixel_max: float) -> FloatArray:
    """Per-image statistics (N, len(IMAGE_FEATURES)) of raw (N, C, H, W) pixels on their scale.

    Pixels are divided by `pixel_max` first, so the features are comparable across datasets;
    channels are averaged (the statistics describe luminance). Chosen so that each common
    corruption moves at least one of them: noise the background fraction and sharpness, blur the
    sharpness and edges, rotation the orientation and spread, contrast the range and brightness.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise MonitorError(f"images must be a non-empty (N, C, H, W) batch; got {images.shape}")
    gray = images.astype(np.float64).mean(axis=1) / float(pixel_max)  # (N, H, W)
    flat = gray.reshape(len(gray), -1)
    grad_rows, grad_cols = np.gradient(gray, axis=(1, 2))
    gradient = np.hypot(grad_rows, grad_cols).reshape(len(gray), -1)
    centroid_row, centroid_col, spread, orientation, eccentricity = _moments(gray)
    columns = (
        flat.mean(axis=1),
        flat.std(axis=1),
        flat.max(axis=1) - flat.min(axis=1),
        np.abs(_laplacian(gray)).reshape(len(gray), -1).mean(axis=1),
        gradient.mean(axis=1),
        (gradient > EDGE_LEVEL).mean(axis=1),
        (flat > INK_LEVEL).mean(axis=1),
        (flat < BACKGROUND_LEVEL).mean(axis=1),
        (flat > SATURATED_LEVEL).mean(axis=1),
        centroid_row,
        centroid_col,
        spread,
        orientation,
        eccentricity,
    )
    return np.stack(columns, axis=1)


def _laplacian(gray: FloatArray) -> FloatArray:
    """The 4-neighbour Laplacian of each (H, W) image; edges replicated, so borders add nothing."""
    padded = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return (
        padded[:, :-2, 1:-1]
        + padded[:, 2:, 1:-1]
        + padded[:, 1:-1, :-2]
        + padded[:, 1:-1, 2:]
        - 4.0 * gray
    )


def _moments(gray: FloatArray) -> tuple[FloatArray, ...]:
    """Intensity-weighted centroid (as a fraction of the side), spread and principal axis."""
    _, height, width = gray.shape
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    mass = gray.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)  # a blank image gets the centre, not a NaN
    weight_rows = gray.sum(axis=2) / safe[:, None]
    weight_cols = gray.sum(axis=1) / safe[:, None]
    mean_row = np.where(mass > 0, weight_rows @ rows, 0.5)
    mean_col = np.where(mass > 0, weight_cols @ cols, 0.5)
    d_row = rows[None, :, None] - mean_row[:, None, None]
    d_col = cols[None, None, :] - mean_col[:, None, None]
    mu20 = (gray * d_row**2).sum(axis=(1, 2)) / safe
    mu02 = (gray * d_col**2).sum(axis=(1, 2)) / safe
    mu11 = (gray * d_row * d_col).sum(axis=(1, 2)) / safe
    spread = np.sqrt(mu20 + mu02)
    # The principal axis angle moves with rotation; digits are mostly upright, so rotated windows
    # widen its distribution. Eccentricity says how elongated the stroke mass is.
    orientation = np.degrees(0.5 * np.arctan2(2.0 * mu11, mu20 - mu02))
    root = np.sqrt((mu20 - mu02) ** 2 + 4.0 * mu11**2)
    eccentricity = root / np.where(mu20 + mu02 > 0, mu20 + mu02, 1.0)
    return mean_row, mean_col, spread, orientation, eccentricity


def softmax_features(probabilities: npt.NDArray[Any]) -> tuple[FloatArray, list[str]]:
    """Per-class probabilities, the confidence (max probability) and the entropy, as columns."""
    probs = probabilities.astype(np.float64)
    confidence = probs.max(axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    names = [f"p_class_{k}" for k in range(probs.shape[1])] + ["confidence", "entropy"]
    return np.column_stack([probs, confidence, entropy]), names


@dataclass(frozen=True)
class Projection:
    """A PCA basis fitted on the reference embeddings; live embeddings are projected onto it."""

    mean: FloatArray
    components: FloatArray  # (k, D)
    explained: FloatArray  # variance share of each kept component

    @classmethod
    def fit(cls, embeddings: npt.NDArray[Any]) -> Projection:
        """Keep the leading components up to `PCA_VARIANCE` of the variance, at most a few.

        Few components keep the multiple-testing family small (power) while still covering
        most of what the embedding varies in.
        """
        data = embeddings.astype(np.float64)
        mean = data.mean(axis=0)
        _, singular, vt = np.linalg.svd(data - mean, full_matrices=False)
        variance = singular**2
        share = variance / variance.sum() if variance.sum() > 0 else np.ones_like(variance)
        keep = int(np.searchsorted(np.cumsum(share), PCA_VARIANCE) + 1)
        keep = max(1, min(keep, MAX_PCA_COMPONENTS, len(share)))
        return cls(mean=mean, components=vt[:keep], explained=share[:keep])

    def transform(self, embeddings: npt.NDArray[Any]) -> FloatArray:
        return np.asarray((embeddings.astype(np.float64) - self.mean) @ self.components.T)

    @property
    def names(self) -> list[str]:
        return [f"pc{i + 1}" for i in range(len(self.components))]


# --------------------------------------------------------------------------------------------
# Reference and window
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceData:
    """The reference sample with its features computed once (reused for every window)."""

    images: npt.NDArray[Any]
    probabilities: npt.NDArray[Any]
    embeddings: npt.NDArray[Any]
    pixel_max: float
    image_stats: FloatArray
    projection: Projection
    projected: FloatArray
    softmax: FloatArray
    softmax_names: list[str]
    model_version: str | None = None
    source: str = "arrays"

    @classmethod
    def from_arrays(
        cls,
        images: npt.NDArray[Any],
        probabilities: npt.NDArray[Any],
        embeddings: npt.NDArray[Any],
        *,
        pixel_max: float,
        model_version: str | None = None,
        source: str = "arrays",
    ) -> ReferenceData:
        """Check the arrays agree in length and precompute every feature."""
        count = len(images)
        if count == 0 or len(probabilities) != count or len(embeddings) != count:
            raise MonitorError(
                f"reference {source} is empty or inconsistent: {len(images)} images, "
                f"{len(probabilities)} probabilities, {len(embeddings)} embeddings; re-export it"
            )
        projection = Projection.fit(embeddings)
        softmax, names = softmax_features(probabilities)
        return cls(
            images=images,
            probabilities=probabilities,
            embeddings=embeddings,
            pixel_max=pixel_max,
            image_stats=image_statistics(images, pixel_max),
            projection=projection,
            projected=projection.transform(embeddings),
            softmax=softmax,
            softmax_names=names,
            model_version=model_version,
            source=source,
        )

    def __len__(self) -> int:
        return len(self.images)


def load_reference(bundle: Bundle | str | Path) -> ReferenceData:
    """The reference sample of a bundle (a directory or a loaded `Bundle`)."""
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    arrays = loaded.load_reference()
    missing = {"images", "probabilities", "embeddings"} - set(arrays)
    if missing:
        raise MonitorError(
            f"reference data of bundle {loaded.path} lacks {', '.join(sorted(missing))}; "
            "re-export it with `opsloop export`"
        )
    return ReferenceData.from_arrays(
        arrays["images"],
        arrays["probabilities"],
        arrays["embeddings"],
        pixel_max=loaded.manifest.preprocessing.pixel_max,
        model_version=loaded.manifest.model_version,
        source=str(loaded.path),
    )


@dataclass(frozen=True)
class Window:
    """Recent predictions: raw inputs with the served model's outputs for them."""

    images: npt.NDArray[Any]  # (N, C, H, W) on the pixel scale
    probabilities: npt.NDArray[Any]  # (N, K)
    embeddings: npt.NDArray[Any]  # (N, D)
    model_versions: Sequence[str] = ()  # one per row, or empty when unknown
    created_at: npt.NDArray[np.float64] | None = None  # Unix seconds, one per row
    source: str = "arrays"

    def __len__(self) -> int:
        return len(self.images)


def window_from_images(
    images: npt.NDArray[Any],
    bundle: Bundle,
    *,
    session: Any = None,
    model_version: str | None = None,
) -> Window:
    """A window of raw images with the bundle model's outputs (ONNX Runtime, as served)."""
    if images.ndim != 4 or len(images) == 0:
        raise MonitorError(f"images must be a non-empty (N, C, H, W) batch; got {images.shape}")
    outputs = run_onnx(session or onnx_session(bundle.model_path), images)
    version = model_version or bundle.manifest.model_version
    return Window(
        images=images,
        probabilities=outputs["probabilities"],
        embeddings=outputs["embedding"],
        model_versions=[version] * len(images) if version else [],
        source="images",
    )


def window_from_log(url: str, *, last: int | None = None, since: float | None = None) -> Window:
    """The last `last` logged predictions and/or those at or after Unix time `since`."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from opsloop.serve.predlog import read_predictions

    if last is not None and last < 1:
        raise MonitorError(f"--last {last} must be at least 1")
    _check_log_exists(url, make_url)
    try:
        logged = read_predictions(url, limit=last, since=since)
    except SQLAlchemyError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MonitorError(
            f"cannot read the prediction log {_safe(url)}: {first}; check the URL (--log or "
            "OPSLOOP_PREDLOG_URL) and that `opsloop serve` has logged to it"
        ) from exc
    if len(logged) == 0:
        where = "" if since is None else f" since {_iso(since)}"
        raise MonitorError(
            f"the prediction log {_safe(url)} has no predictions{where}; send traffic to "
            "`opsloop serve` or widen the window"
        )
    shapes = {item.shape for item in logged.inputs}
    if len(shapes) != 1:
        raise MonitorError(
            f"the window mixes input shapes {sorted(shapes)}; narrow it to one model (--last/"
            "--since)"
        )
    return Window(
        images=np.stack(logged.inputs),
        probabilities=logged.probabilities,
        embeddings=logged.embeddings,
        model_versions=list(logged.model_versions),
        created_at=logged.created_at,
        source=_safe(url),
    )


def _check_log_exists(url: str, make_url: Callable[[str], Any]) -> None:
    """A missing SQLite file is a clear error (connecting would silently create an empty one)."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise MonitorError(f"prediction-log URL {url!r} is invalid: {exc}") from exc
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database).expanduser()
    if not path.is_file():
        raise MonitorError(
            f"prediction log {path} does not exist; start `opsloop serve` (it logs there) or "
            "pass --log with the server's OPSLOOP_PREDLOG_URL"
        )


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return str(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return "<invalid URL>"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Tests and the report
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureTest:
    """One two-sample test on one feature; `p_adjusted` is set by the correction."""

    feature: str
    test: str  # "ks" (Kolmogorov-Smirnov) or "chi2" (contingency table)
    statistic: float
    p_value: float
    distance: float  # Wasserstein / reference std for "ks"; total variation for "chi2"
    p_adjusted: float = 1.0
    drifted: bool = False


@dataclass
class DetectorResult:
    """A detector's tests and its verdict (any feature drifted after the global correction)."""

    name: str
    description: str
    features: list[FeatureTest]
    drift: bool = False
    p_value: float = 1.0  # the smallest corrected p-value among its features
    score: float = 0.0  # the share of its features that drifted
    distance: float = 0.0  # the largest feature distance

    def summarise(self) -> None:
        self.drift = any(test.drifted for test in self.features)
        self.p_value = min((test.p_adjusted for test in self.features), default=1.0)
        drifted = sum(test.drifted for test in self.features)
        self.score = drifted / len(self.features) if self.features else 0.0
        self.distance = max((test.distance for test in self.features), default=0.0)


@dataclass
class DriftReport:
    """The verdict on one window: drifted or not, why, and what the window held."""

    drift: bool
    score: float  # the largest share of drifted features of any detector, 0..1
    p_value: float  # the smallest corrected p-value of all tests
    alpha: float
    correction: str
    window_size: int
    reference_size: int
    time_range: tuple[str | None, str | None]
    model_versions: dict[str, int]
    reference_model_version: str | None
    mixed_versions: bool
    detectors: list[DetectorResult]
    warnings: list[str] = field(default_factory=list)
    source: str = "arrays"
    checked_at: str = ""
    seconds: float = 0.0

    @property
    def fired(self) -> list[str]:
        """The names of the detectors that flagged drift."""
        return [detector.name for detector in self.detectors if detector.drift]

    def detector(self, name: str) -> DetectorResult:
        """The result of the detector called `name`."""
        for result in self.detectors:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (NaN and infinity become None)."""
        result: dict[str, Any] = _finite(dataclasses.asdict(self) | {"fired": self.fired})
        return result

    def to_json(self, *, indent: bool = True) -> str:
        """The report as JSON with a top-level boolean `drift` (for scripts and alerting)."""
        option = orjson.OPT_INDENT_2 if indent else 0
        return orjson.dumps(self.to_dict(), option=option).decode()


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: map them to None so every consumer can parse the report."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def ks_tests(reference: FloatArray, current: FloatArray, names: Sequence[str]) -> list[FeatureTest]:
    """A two-sample Kolmogorov-Smirnov test per column, with a scale-free Wasserstein distance.

    KS is what Evidently's DataDriftPreset uses for numerical columns of this size (same scipy
    call, same p-values); ties on discrete features only make it conservative.
    """
    tests = []
    for column, name in enumerate(names):
        ref, cur = reference[:, column], current[:, column]
        with warnings.catch_warnings():
            # Ties make scipy's exact method fall back to the asymptotic one, with a warning
            # per call; that p-value is the one wanted.
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ks_2samp(ref, cur)
        scale = float(ref.std()) or 1.0
        tests.append(
            FeatureTest(
                feature=name,
                test="ks",
                statistic=float(result.statistic),
                p_value=float(result.pvalue),
                distance=float(stats.wasserstein_distance(ref, cur)) / scale,
            )
        )
    return tests


def class_frequency_test(
    reference: npt.NDArray[Any], current: npt.NDArray[Any], classes: int
) -> FeatureTest:
    """Chi-square test of the predicted-class counts (black-box shift detection on labels)."""
    table = np.stack(
        [np.bincount(reference, minlength=classes), np.bincount(current, minlength=classes)]
    )
    table = table[:, table.sum(axis=0) > 0]  # a class nobody predicted carries no information
    ref_share = table[0] / table[0].sum()
    cur_share = table[1] / table[1].sum()
    distance = 0.5 * float(np.abs(ref_share - cur_share).sum())
    if table.shape[1] < 2:
        return FeatureTest("predicted_class", "chi2", 0.0, 1.0, distance)
    result = stats.chi2_contingency(table, correction=False)
    return FeatureTest(
        "predicted_class", "chi2", float(result.statistic), float(result.pvalue), distance
    )


def adjust_p_values(p_values: Sequence[float], method: str) -> FloatArray:
    """Multiple-testing adjusted p-values: Holm or Bonferroni (FWER) or Benjamini-Hochberg (FDR).

    Under no drift at all, every method keeps the chance of any false flag at or below alpha
    (BH assuming positively dependent tests, as these features are).
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    order = np.argsort(p)
    ranked = p[order]
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(ranked * (m - np.arange(m)), 1.0))
    elif method == "bh":
        scaled = ranked * m / np.arange(1, m + 1)
        adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    else:
        raise MonitorError(f"unknown correction {method!r}; use one of: {', '.join(CORRECTIONS)}")
    out = np.empty(m)
    out[order] = adjusted
    return out


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def detect_drift(
    reference: ReferenceData,
    current: Window,
    *,
    alpha: float = 0.05,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    correction: str = "holm",
) -> DriftReport:
    """Test `current` against `reference` with every detector; drift if any corrected test fires.

    All per-feature tests of all detectors form one family for the correction, so the chance
    that a window without drift is flagged at all stays at or below `alpha`.
    """
    started = time.perf_counter()
    _check_arguments(reference, current, alpha, min_samples, correction)
    detectors = run_detectors(reference, current)
    tests = [test for detector in detectors for test in detector.features]
    for test, adjusted in zip(
        tests, adjust_p_values([t.p_value for t in tests], correction), strict=True
    ):
        test.p_adjusted = float(adjusted)
        test.drifted = bool(adjusted < alpha)
    for detector in detectors:
        detector.summarise()
    versions, warnings = _version_summary(reference, current)
    report = DriftReport(
        drift=any(detector.drift for detector in detectors),
        score=max(detector.score for detector in detectors),
        p_value=min(detector.p_value for detector in detectors),
        alpha=alpha,
        correction=correction,
        window_size=len(current),
        reference_size=len(reference),
        time_range=_time_range(current.created_at),
        model_versions=versions,
        reference_model_version=reference.model_version,
        mixed_versions=len(versions) > 1,
        detectors=detectors,
        warnings=warnings,
        source=current.source,
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
    )
    for warning in warnings:
        logger.warning("%s", warning)
    return report


def run_detectors(reference: ReferenceData, current: Window) -> list[DetectorResult]:
    """The uncorrected tests of the three detectors on one window."""
    softmax, names = softmax_features(current.probabilities)
    classes = reference.probabilities.shape[1]
    return [
        DetectorResult(
            "image_stats",
            "input drift: KS per image statistic of the raw pixels",
            ks_tests(
                reference.image_stats,
                image_statistics(current.images, reference.pixel_max),
                IMAGE_FEATURES,
            ),
        ),
        DetectorResult(
            "embedding",
            "model-based drift: KS per principal component of the embedding (PCA on reference)",
            ks_tests(
                reference.projected,
                reference.projection.transform(current.embeddings),
                reference.projection.names,
            ),
        ),
        DetectorResult(
            "softmax",
            "black-box shift detection: chi-square on predicted classes, KS per class "
            "probability, confidence and entropy",
            [
                class_frequency_test(
                    reference.probabilities.argmax(axis=1),
                    current.probabilities.argmax(axis=1),
                    classes,
                ),
                *ks_tests(reference.softmax, softmax, names),
            ],
        ),
    ]


def _check_arguments(
    reference: ReferenceData, current: Window, alpha: float, min_samples: int, correction: str
) -> None:
    if not 0.0 < alpha < 1.0:
        raise MonitorError(f"alpha={alpha} must lie strictly between 0 and 1 (e.g. 0.05)")
    if correction not in CORRECTIONS:
        raise MonitorError(
            f"unknown correction {correction!r}; use one of: {', '.join(CORRECTIONS)}"
        )
    if len(current) == 0:
        raise MonitorError(
            "the window is empty: there is nothing to compare; widen it (--last/--since)"
        )
    if len(current) < min_samples:
        raise MonitorError(
            f"the window has {len(current)} predictions, fewer than the minimum {min_samples}; "
            "widen it (--last/--since) or lower --min-samples"
        )
    _check_shapes(reference, current)


def _check_shapes(reference: ReferenceData, current: Window) -> None:
    if current.images.shape[1:] != reference.images.shape[1:]:
        raise MonitorError(
            f"window images are shaped {current.images.shape[1:]} but the reference's are "
            f"{reference.images.shape[1:]}: the window belongs to another model"
        )
    for name, ref, cur in (
        ("probabilities", reference.probabilities, current.probabilities),
        ("embeddings", reference.embeddings, current.embeddings),
    ):
        if cur.ndim != 2 or len(cur) != len(current) or cur.shape[1] != ref.shape[1]:
            raise MonitorError(
                f"window {name} are shaped {cur.shape}, expected ({len(current)}, "
                f"{ref.shape[1]}): the window belongs to another model"
            )


def _version_summary(reference: ReferenceData, current: Window) -> tuple[dict[str, int], list[str]]:
    """Model versions seen in the window, and warnings when they cannot be compared cleanly."""
    versions = dict(Counter(current.model_versions))
    warnings = []
    if len(versions) > 1:
        listed = ", ".join(f"{v} ({n})" for v, n in sorted(versions.items()))
        warnings.append(
            f"the window mixes model versions {listed}: model-based detectors compare a blend; "
            "narrow the window to after the last model swap"
        )
    foreign = sorted(set(versions) - {reference.model_version})
    if reference.model_version is not None and foreign:
        warnings.append(
            f"the window holds predictions of model version(s) {', '.join(foreign)} but the "
            f"reference is version {reference.model_version}: embedding and softmax drift may "
            "reflect the model change; monitor with the served version's bundle"
        )
    return versions, warnings


def _time_range(created_at: npt.NDArray[np.float64] | None) -> tuple[str | None, str | None]:
    if created_at is None or len(created_at) == 0:
        return None, None
    return _iso(float(created_at.min())), _iso(float(created_at.max()))


# --------------------------------------------------------------------------------------------
# Evidently HTML report
# --------------------------------------------------------------------------------------------


def feature_table(reference: ReferenceData, images: npt.NDArray[Any], **outputs: Any) -> Any:
    """One pandas row per example: image statistics, embedding components and softmax outputs."""
    import pandas as pd  # type: ignore[import-untyped]  # no stubs installed

    softmax, names = softmax_features(outputs["probabilities"])
    frame = pd.DataFrame(image_statistics(images, reference.pixel_max), columns=IMAGE_FEATURES)
    for name, column in zip(
        reference.projection.names,
        reference.projection.transform(outputs["embeddings"]).T,
        strict=True,
    ):
        frame[name] = column
    for index, name in enumerate(names):
        frame[name] = softmax[:, index]
    # A string column, so Evidently treats the class as categorical (chi-square), not a number.
    frame["predicted_class"] = [f"class {k}" for k in outputs["probabilities"].argmax(axis=1)]
    return frame


def write_html_report(
    reference: ReferenceData,
    current: Window,
    path: str | Path,
    *,
    report: DriftReport | None = None,
) -> Path:
    """Render Evidently's data-drift report of every feature to `path` (HTML), atomically.

    Evidently's per-column flags use its own uncorrected threshold; the verdict that counts is
    `detect_drift`'s, which is recorded in the report's metadata when `report` is given.
    """
    from evidently import Report
    from evidently.presets import DataDriftPreset

    from opsloop.atomic import replace_atomically

    reference_frame = feature_table(
        reference,
        reference.images,
        probabilities=reference.probabilities,
        embeddings=reference.embeddings,
    )
    current_frame = feature_table(
        reference,
        current.images,
        probabilities=current.probabilities,
        embeddings=current.embeddings,
    )
    metadata: dict[str, Any] = {}
    if report is not None:
        metadata = {
            "opsloop_drift": str(report.drift).lower(),
            "opsloop_fired": report.fired,
            "opsloop_correction": f"{report.correction} at alpha {report.alpha}",
        }
    snapshot = Report(
        [DataDriftPreset(num_method="ks", cat_method="chisquare")], metadata=metadata
    ).run(reference_data=reference_frame, current_data=current_frame)
    target = Path(path)
    try:
        replace_atomically(target, lambda scratch: snapshot.save_html(str(scratch)))
    except OSError as exc:
        raise MonitorError(
            f"cannot write the HTML report to {target}: {exc.strerror or exc}; choose a "
            "writable --html path"
        ) from exc
    logger.info("wrote the drift report %s", target)
    return target
