"""Label-free accuracy estimates against the truth, on clean data and every robustness corruption.

    .venv/bin/python benchmarks/estimate.py                     # trains the default CNN first
    .venv/bin/python benchmarks/estimate.py --bundle bundles/digits-cnn --write-docs

The model is the default config's CNN (what `make run` trains; or the bundle given). Windows of
200 predictions are drawn without replacement from the digits test split, which neither training
nor the estimator's fit ever saw, then corrupted with every corruption of the robustness table at
severities 1-3 (seeded, redrawn per window). For each window: the true accuracy; the estimate the
bundle ships (`opsloop.monitor.estimate`, fitted at export on synthetic shifts of the validation
split); and, for comparison, the average confidence (what CBPE reads after calibration) and ATC
(Garg et al., 2022). A second column refits the estimator without the window's corruption family,
to measure a shift of a kind it never saw (leave-one-family-out).

Results go to benchmarks/results/estimate.json and, with --write-docs, into docs/ground-truth.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from docs_block import fill_block

from opsloop.bundle import EMBEDDING, PROBABILITIES, Bundle, load_bundle, onnx_session, run_onnx
from opsloop.config import ModelConfig, load_config
from opsloop.corruption import CORRUPTIONS, SEVERITIES
from opsloop.data import load_split, prepare_dataset
from opsloop.monitor.estimate import (
    ESTIMATOR_FILE,
    AccuracyEstimator,
    fit_estimator,
    load_estimator,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "estimate.json"
DOCS = REPO / "docs" / "ground-truth.md"
BLOCK = "estimate"  # its markers in the docs page: <!-- benchmark:estimate:start/end -->
WINDOW = 200
EPOCHS = 20
GOAL_SHIFT, GOAL_CLEAN = 0.10, 0.03


@dataclass
class Row:
    """Mean true and estimated accuracy of one condition over its windows."""

    shift: str
    severity: int
    windows: int
    true: float
    estimate: float  # the shipped estimator
    unseen: float  # refitted without this corruption family (leave-one-family-out)
    confidence: float  # mean max-probability
    atc: float

    @property
    def error(self) -> float:
        return self.estimate - self.true


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="Measure this bundle instead of training.")
    parser.add_argument("--windows", type=int, default=10, help="Windows per condition.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="opsloop-estimate-") as scratch:
        workdir = Path(scratch)
        data = load_config([f"data.processed_dir={workdir / 'processed'}"]).data
        prepare_dataset(data)
        bundle = load_bundle(args.bundle) if args.bundle else build_bundle(data, workdir)
        processed = Path(data.processed_dir) / data.name
        test, val = load_split(processed, "test"), load_split(processed, "val")
        started = time.perf_counter()
        rows = measure(bundle, test.images, test.labels, val, args.windows, args.seed)
        seconds = time.perf_counter() - started
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{__import__('os').cpu_count()} CPU cores",
        "window": WINDOW,
        "windows_per_condition": args.windows,
        "pool": len(test.labels),
        "seconds": round(seconds, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) | {"error": r.error} for r in rows]}
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    text = table(rows, meta)
    print(text)
    if args.write_docs:
        write_docs(text)


def build_bundle(data: Any, workdir: Path) -> Bundle:
    """The default config's CNN, trained briefly (untracked), exported: about a minute."""
    from opsloop.export import export_bundle
    from opsloop.train import fit_checkpoint

    checkpoint = fit_checkpoint(data, workdir / "model.ckpt", model=ModelConfig(), epochs=EPOCHS)
    return load_bundle(
        export_bundle(checkpoint, data, workdir / "bundle", model_name="digits-cnn").path
    )


def measure(
    bundle: Bundle,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.int64],
    val: Any,
    windows: int,
    seed: int,
) -> list[Row]:
    session = onnx_session(bundle.model_path)

    basis = bundle.load_log_basis()

    def whole(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        outputs = run_onnx(session, batch)
        return outputs[PROBABILITIES], outputs[EMBEDDING]

    def predict(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """The outputs as the monitor reads them from the log: the embedding in half precision
        on the log basis."""
        probabilities, embeddings = whole(batch)
        if basis is not None:
            embeddings = basis.project(embeddings)
        return probabilities, embeddings.astype(np.float16).astype(np.float32)

    shipped = load_estimator(bundle.path / ESTIMATOR_FILE)
    pixel_max = bundle.manifest.preprocessing.pixel_max
    rows = [condition(predict, shipped, shipped, images, labels, "clean", 0, windows, seed)]
    for name in CORRUPTIONS:
        unseen = fit_estimator(whole, val.images, val.labels, pixel_max, exclude=name, basis=basis)
        for severity in SEVERITIES:
            rows.append(
                condition(predict, shipped, unseen, images, labels, name, severity, windows, seed)
            )
    return rows


def condition(
    predict: Any,
    shipped: AccuracyEstimator,
    unseen: AccuracyEstimator,
    images: npt.NDArray[Any],
    labels: npt.NDArray[np.int64],
    shift: str,
    severity: int,
    windows: int,
    seed: int,
) -> Row:
    rng = np.random.default_rng([seed, severity, len(shift)])
    pixel_max = shipped.stats.pixel_max
    results = []
    for _ in range(windows):
        pick = rng.choice(len(images), size=min(WINDOW, len(images)), replace=False)
        batch = images[pick]
        if shift != "clean":
            batch = CORRUPTIONS[shift](batch, severity, pixel_max=pixel_max, rng=rng)
        probabilities, embeddings = predict(batch.astype(np.float32))
        confidence = probabilities.max(axis=1)
        results.append(
            (
                float((probabilities.argmax(axis=1) == labels[pick]).mean()),
                shipped.estimate(batch, probabilities, embeddings),
                unseen.estimate(batch, probabilities, embeddings),
                float(confidence.mean()),
                float((confidence >= shipped.stats.atc_threshold).mean()),
            )
        )
    mean = np.array(results).mean(axis=0)
    return Row(shift, severity, windows, *(float(v) for v in mean))


def table(rows: list[Row], meta: dict[str, Any]) -> str:
    def points(value: float) -> str:
        return f"{100 * value:.1f}"

    def delta(value: float) -> str:
        return f"{100 * value:+.1f}"

    lines = [
        f"Measured {meta['date']} on {meta['machine']}: windows of {meta['window']} from the "
        f"{meta['pool']}-image digits test split, {meta['windows_per_condition']} windows per "
        f"condition ({meta['seconds']} s). Accuracy in points; error = estimate - truth.",
        "",
        "| shift | severity | true | estimate | error | unseen-kind error | confidence | ATC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.shift} | {row.severity or '-'} | {points(row.true)} | "
            f"{points(row.estimate)} | {delta(row.error)} | {delta(row.unseen - row.true)} | "
            f"{points(row.confidence)} | {points(row.atc)} |"
        )
    shifted = [r for r in rows if r.shift != "clean"]
    clean = rows[0]
    worst = max(shifted, key=lambda r: abs(r.error))
    worst_unseen = max(shifted, key=lambda r: abs(r.unseen - r.true))
    worst_atc = max(shifted, key=lambda r: abs(r.atc - r.true))
    lines += [
        "",
        f"- clean: error {delta(clean.error)} points (goal: within "
        f"{100 * GOAL_CLEAN:.0f}) — {'met' if abs(clean.error) <= GOAL_CLEAN else 'MISSED'}",
        f"- worst shift: {worst.shift} {worst.severity}, error {delta(worst.error)} points "
        f"(goal: within {100 * GOAL_SHIFT:.0f} on every shift) — "
        f"{'met' if abs(worst.error) <= GOAL_SHIFT else 'MISSED'}",
        f"- a kind of shift the estimator never saw (leave-one-family-out): worst "
        f"{worst_unseen.shift} {worst_unseen.severity}, "
        f"{delta(worst_unseen.unseen - worst_unseen.true)} points",
        f"- ATC for comparison: worst {worst_atc.shift} {worst_atc.severity}, "
        f"{delta(worst_atc.atc - worst_atc.true)} points",
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    fill_block(DOCS, BLOCK, text)


if __name__ == "__main__":
    main()
