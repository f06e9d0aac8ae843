"""Drift-detection quality: how often `detect_drift` flags clean and shifted windows.

    .venv/bin/python benchmarks/drift.py                         # builds a small bundle first
    .venv/bin/python benchmarks/drift.py --bundle bundles/digits-cnn --repetitions 100 --write-docs

Reference: the bundle's reference sample (the digits val split). Windows come from the digits test
split, which is disjoint from it and never trained on: each window is drawn WITHOUT replacement
from that pool, and each repetition draws a fresh window (the test split has 269 images, so at
n = 200 only one disjoint window fits; windows of different repetitions overlap). The label-prior
shift keeps only classes 0-4, a pool of about 135 images, so its windows are capped at the pool
size. Shifts, on the digits' 0-16 pixel scale: gaussian noise sigma 2, gaussian blur sigma 1 px,
rotation by 20 degrees (random direction), contrast halved around mid-grey, label-prior shift.
Random corruptions are redrawn every repetition. Nothing is trained when --bundle is given.

Results go to benchmarks/results/drift.json and, with --write-docs, into docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from docs_block import fill_block

from opsloop.bundle import Bundle, LogBasis, load_bundle, onnx_session, run_onnx
from opsloop.config import DataConfig, load_config
from opsloop.corruption import CORRUPTIONS, to_dtype
from opsloop.data import load_split, prepare_dataset
from opsloop.monitor import ReferenceData, Window, detect_drift, load_reference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "drift.json"
DOCS = REPO / "docs" / "monitoring.md"
BLOCK = "drift"  # its markers in the docs page: <!-- benchmark:drift:start/end -->
SIZES = (50, 100, 200)
DIGITS_SCALE = 16.0  # the shift parameters below are stated on the digits' 0-16 scale
SHIFTS = ("clean", "gaussian_noise", "gaussian_blur", "rotation", "contrast", "label_prior")
DETECTORS = ("image_stats", "embedding", "softmax")
EPOCHS = 15  # a few seconds each on digits; enough for ~95% test accuracy

logger = logging.getLogger("benchmarks.drift")


@dataclass
class Cell:
    """Detection results of one shift at one window size."""

    shift: str
    n: int
    window: int  # the window size actually drawn (capped by the pool)
    repetitions: int
    flagged: int
    by_detector: dict[str, int] = field(default_factory=dict)
    ms_median: float = 0.0
    ms_p95: float = 0.0

    @property
    def rate(self) -> float:
        return self.flagged / self.repetitions


def shift_images(
    name: str, images: npt.NDArray[np.uint8], pixel_max: float, rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """`images` under one shift, as the integer pixels a client would send."""
    scale = pixel_max / DIGITS_SCALE
    side = min(images.shape[2:])
    levels: dict[str, tuple[str, float]] = {
        "gaussian_noise": ("gaussian_noise", 2.0 * scale / pixel_max),  # sigma 2 of 16
        "gaussian_blur": ("gaussian_blur", 1.0 / side),  # sigma 1 px
        "rotation": ("rotation", 20.0),
        "contrast": ("contrast", 0.5),
    }
    if name not in levels:
        return images
    corruption, level = levels[name]
    changed = CORRUPTIONS[corruption].transform(images.astype(np.float64), level, pixel_max, rng)
    return np.asarray(to_dtype(np.clip(changed, 0.0, pixel_max), images.dtype), dtype=np.uint8)


def run_benchmark(
    bundle: Bundle,
    test_images: npt.NDArray[np.uint8],
    test_labels: npt.NDArray[np.int64],
    *,
    repetitions: int,
    alpha: float,
    correction: str,
    seed: int = 0,
    as_logged: bool = True,
) -> list[Cell]:
    """Every shift x window size cell, `repetitions` seeded windows each.

    With `as_logged` the windows hold the outputs as the prediction log keeps them (half
    precision; embeddings as coordinates on the bundle's log basis), else whole float32 outputs.
    """
    reference = load_reference(bundle)
    session = onnx_session(bundle.model_path)
    basis = bundle.load_log_basis()
    cells = {
        (s, n): Cell(s, n, 0, repetitions, 0, dict.fromkeys(DETECTORS, 0))
        for s in SHIFTS
        for n in SIZES
    }
    times: dict[tuple[str, int], list[float]] = {key: [] for key in cells}
    for repetition in range(repetitions):
        for index, shift in enumerate(SHIFTS):
            rng = np.random.default_rng([seed, repetition, index])
            pool = test_images[test_labels < 5] if shift == "label_prior" else test_images
            shifted = shift_images(shift, pool, reference.pixel_max, rng)
            outputs = run_onnx(session, shifted)
            if as_logged:
                outputs = logged_outputs(outputs, basis)
            for n in SIZES:
                size = min(n, len(pool))
                pick = rng.choice(len(pool), size=size, replace=False)
                window = Window(
                    shifted[pick], outputs["probabilities"][pick], outputs["embedding"][pick]
                )
                started = time.perf_counter()
                report = detect_drift(reference, window, alpha=alpha, correction=correction)
                times[shift, n].append(time.perf_counter() - started)
                cell = cells[shift, n]
                cell.window = size
                cell.flagged += report.drift
                for name in report.fired:
                    cell.by_detector[name] += 1
        if (repetition + 1) % 10 == 0:
            logger.info("%d/%d repetitions", repetition + 1, repetitions)
    for key, cell in cells.items():
        cell.ms_median = float(np.median(times[key]) * 1e3)
        cell.ms_p95 = float(np.percentile(times[key], 95) * 1e3)
    return list(cells.values())


def logged_outputs(
    outputs: dict[str, npt.NDArray[np.float32]], basis: LogBasis | None
) -> dict[str, npt.NDArray[np.float32]]:
    """The outputs as the prediction log stores and returns them."""
    embedding = outputs["embedding"] if basis is None else basis.project(outputs["embedding"])
    return {
        "probabilities": outputs["probabilities"],  # kept in single precision
        "embedding": embedding.astype(np.float16).astype(np.float32),
    }


def largest_difference(first: list[Cell], second: list[Cell]) -> float:
    """The largest difference in flag rate between two runs of the same cells."""
    return max(abs(a.rate - b.rate) for a, b in zip(first, second, strict=True))


def difference_sentence(largest: float) -> str:
    if largest == 0:
        return "the flag rates are the same in every cell."
    return f"the flag rates differ by at most {largest:.0%} in any cell."


def table(cells: list[Cell], meta: dict[str, Any]) -> str:
    """The markdown tables for the docs: detection rate per shift and size, then per detector."""
    by_key = {(c.shift, c.n): c for c in cells}
    lines = [
        f"Measured {meta['date']} on {meta['machine']}: {meta['repetitions']} windows per cell, "
        f"alpha {meta['alpha']}, {meta['correction']} correction over all "
        f"{meta['tests']} tests; reference {meta['reference_size']} images (val split), windows "
        f"from the {meta['pool_size']}-image test split; model test accuracy "
        f"{meta['accuracy']:.3f}. Total run {meta['seconds']:.0f} s.",
        "",
        "Windows hold the outputs as the prediction log keeps them: embeddings as half-precision "
        "coordinates on the bundle's log basis. Run on the whole float32 outputs instead, "
        + difference_sentence(meta["whole_vs_logged_max_difference"]),
        "",
        "| shift | goal | " + " | ".join(f"n = {n}" for n in SIZES) + " |",
        "|---|---|" + "---:|" * len(SIZES),
    ]
    for shift in SHIFTS:
        goal = "≤ 5% flagged" if shift == "clean" else "≥ 90% flagged"
        row = [shift.replace("_", " "), goal]
        for n in SIZES:
            cell = by_key[shift, n]
            met = cell.rate <= 0.05 if shift == "clean" else cell.rate >= 0.9
            note = "" if cell.window == n else f" (n = {cell.window})"
            row.append(f"{cell.rate:.0%}{note}" + ("" if met else " ✗"))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Which detector fired (share of windows; several can fire on one window):",
        "",
        "| shift | n | image stats | embedding | softmax | ms per check (median / p95) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        shares = " | ".join(f"{cell.by_detector[d] / cell.repetitions:.0%}" for d in DETECTORS)
        lines.append(
            f"| {cell.shift.replace('_', ' ')} | {cell.window} | {shares} | "
            f"{cell.ms_median:.1f} / {cell.ms_p95:.1f} |"
        )
    return "\n".join(lines)


def write_docs(text: str) -> None:
    fill_block(DOCS, BLOCK, text)


def build_bundle(data: DataConfig, workdir: Path) -> Bundle:
    """Train a small CNN for a few epochs (as the tests do) and export it: about a minute."""
    from opsloop.export import export_bundle
    from opsloop.train import fit_checkpoint

    checkpoint = fit_checkpoint(data, workdir / "model.ckpt", epochs=EPOCHS)
    return load_bundle(
        export_bundle(checkpoint, data, workdir / "bundle", model_name="digits").path
    )


def accuracy(bundle: Bundle, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64]) -> float:
    probabilities = run_onnx(onnx_session(bundle.model_path), images)["probabilities"]
    return float((probabilities.argmax(axis=1) == labels).mean())


def count_tests(reference: ReferenceData, images: npt.NDArray[np.uint8]) -> int:
    window = Window(
        images, reference.probabilities[: len(images)], reference.embeddings[: len(images)]
    )
    report = detect_drift(reference, window, min_samples=1)
    return sum(len(detector.features) for detector in report.detectors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an exported digits bundle (else build one)")
    parser.add_argument(
        "--workdir", type=Path, help="keep the built bundle here (default: a temporary directory)"
    )
    parser.add_argument("--processed-dir", type=Path, default=REPO / "data" / "processed")
    parser.add_argument("--repetitions", type=int, default=100, help="windows per cell")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--correction", default="holm", choices=("holm", "bonferroni", "bh"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="update docs/monitoring.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    data = load_config([f"data.processed_dir={args.processed_dir}"]).data
    prepared = prepare_dataset(data)  # a no-op when the split is already there
    test = load_split(prepared.path, "test")
    with tempfile.TemporaryDirectory(prefix="opsloop-drift-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        bundle = load_bundle(args.bundle) if args.bundle else build_bundle(data, workdir)
        if bundle.manifest.lineage.dataset_hash not in (prepared.content_hash, "unknown"):
            raise SystemExit(
                f"bundle {bundle.path} was exported from dataset "
                f"{bundle.manifest.lineage.dataset_hash}, not {prepared.content_hash}: its "
                "reference may overlap the test split"
            )
        started = time.perf_counter()
        options = {
            "repetitions": args.repetitions,
            "alpha": args.alpha,
            "correction": args.correction,
            "seed": args.seed,
        }
        cells = run_benchmark(bundle, test.images, test.labels, **options)
        seconds = time.perf_counter() - started
        whole = run_benchmark(bundle, test.images, test.labels, as_logged=False, **options)
        reference = load_reference(bundle)
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{__import__('os').cpu_count()} CPU cores",
            "repetitions": args.repetitions,
            "alpha": args.alpha,
            "correction": args.correction,
            "tests": count_tests(reference, test.images),
            "reference_size": len(reference),
            "pool_size": len(test.labels),
            "accuracy": accuracy(bundle, test.images, test.labels),
            "seconds": seconds,
            "whole_vs_logged_max_difference": largest_difference(cells, whole),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"meta": meta, "cells": [asdict(c) | {"rate": c.rate} for c in cells]}, indent=2)
        + "\n"
    )
    text = table(cells, meta)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
