"""The two samples a drift check compares: the bundle's reference and a window of predictions.

`load_reference(bundle)` reads the reference sample that export stored in the bundle and computes
its features once; `window_from_log(url, last=200)` reads recent predictions from the prediction
log (`opsloop.predictions`), `window_from_images` runs images through the bundle's model.
An empty window is an `EmptyWindowError`, an unreadable log a `PredictionLogError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from opsloop.bundle import (
    EMBEDDING,
    PROBABILITIES,
    Bundle,
    LogBasis,
    load_bundle,
    onnx_session,
    run_onnx,
)
from opsloop.errors import EmptyWindowError, MonitorError, redact_url
from opsloop.monitor.features import (
    FloatArray,
    Projection,
    image_statistics,
    softmax_features,
)
from opsloop.predictions import CHAMPION_ROLE, read_predictions

REFERENCE_ARRAYS = ("images", "probabilities", "embeddings")


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
        basis: LogBasis | None = None,
    ) -> ReferenceData:
        """Check the arrays agree in length and precompute every feature.

        `basis` is the bundle's log basis (the projection then also takes logged coordinates);
        without one the projection is fitted here, the same way.
        """
        count = len(images)
        if count == 0 or len(probabilities) != count or len(embeddings) != count:
            raise MonitorError(
                f"reference {source} is empty or inconsistent: {len(images)} images, "
                f"{len(probabilities)} probabilities, {len(embeddings)} embeddings; re-export it"
            )
        projection = Projection.fit(embeddings) if basis is None else Projection.from_basis(basis)
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
    missing = set(REFERENCE_ARRAYS) - set(arrays)
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
        basis=loaded.load_log_basis(),
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
        probabilities=outputs[PROBABILITIES],
        embeddings=outputs[EMBEDDING],
        model_versions=[version] * len(images) if version else [],
        source="images",
    )


def window_from_log(url: str, *, last: int | None = None, since: float | None = None) -> Window:
    """The last `last` answers the champion gave and/or those at or after Unix time `since`.

    Shadow and canary answers are left out: they come from another model, whose embeddings and
    softmax outputs would blend into the champion's (drift is judged per served model).
    """
    if last is not None and last < 1:
        raise MonitorError(f"--last {last} must be at least 1")
    logged = read_predictions(url, limit=last, since=since, roles=[CHAMPION_ROLE])
    if len(logged) == 0:
        where = "" if since is None else f" since {iso_time(since)}"
        raise EmptyWindowError(
            f"the prediction log {redact_url(url)} has no predictions{where}; send traffic to "
            "`opsloop serve` or widen the window"
        )
    # Rows whose embedding has another width than the newest (another model's log basis) read
    # back as NaN; they belong to a model this window does not judge.
    logged = logged.where(np.asarray(np.isfinite(logged.embeddings).all(axis=1)))
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
        source=redact_url(url),
    )


def iso_time(timestamp: float) -> str:
    """Unix seconds as an ISO-8601 UTC time to the second."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
