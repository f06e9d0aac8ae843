"""The closed loop on this machine: serve + monitor + loop + a scenario, timed end to end.

    .venv/bin/python benchmarks/loop.py                         # rotation, ~8 minutes
    .venv/bin/python benchmarks/loop.py --scenario blur --write-docs

In a fresh workspace it runs `opsloop pipeline` (the champion, v1), starts `opsloop serve`
(following the registry's champion), `opsloop monitor serve` and `opsloop loop serve`, then plays
the scenario (`opsloop.monitor.scenario`): clean traffic, then a shift that hurts the champion,
with true labels posted for half of the answers after a delay. Every second it records the
monitor's drift p-value and label-free estimate; the loop's history gives its events. It reports
the time to detect (the shift's start to the first loop run), to promote, and to an accuracy of
90% on the shifted stream, the recovered accuracy, and the accuracy of the first and the last
champion on shifted images that were never sent (held out from the traffic and from training).

Results go to benchmarks/results/loop.json and docs/images/loop-timeline.png, and with
--write-docs the table into docs/loop.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from docs_block import publish

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "loop.json"
FIGURE = REPO / "docs" / "images" / "loop-timeline.png"
DOCS = REPO / "docs" / "loop.md"
BLOCK = "loop"  # its markers in the docs page: <!-- benchmark:loop:start/end -->
OPSLOOP = [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())"]
GOAL_ACCURACY, GOAL_SECONDS = 0.90, 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], log: Path, ready: str) -> Iterator[None]:
    """A process that is up (its `ready` URL answers 200), stopped by PID at the end."""
    with log.open("ab") as out:
        process = subprocess.Popen([*OPSLOOP, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{args[0]} did not start: see {log}")
            time.sleep(0.5)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


class Sampler:
    """Polls the monitor every second: drift p-value, estimated accuracy, served version."""

    def __init__(self, monitor: str, started_at: float) -> None:
        self.monitor = monitor
        self.started_at = started_at
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            sample: dict[str, Any] = {"t": time.time() - self.started_at}
            try:
                drift = httpx.get(f"{self.monitor}/drift", timeout=5)
                if drift.status_code == 200:
                    sample["p_value"] = drift.json()["p_value"]
                quality = httpx.get(f"{self.monitor}/quality", timeout=5)
                if quality.status_code == 200:
                    estimates = quality.json()["estimates"]
                    if estimates:
                        sample["estimate"] = estimates[-1]["value"]
                else:
                    sample["error"] = quality.text[:200]
            except (httpx.HTTPError, ValueError, KeyError) as exc:  # kept: the plot shows gaps
                sample["error"] = repr(exc)[:200]
            self.samples.append(sample)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def held_out_accuracy(workspace: Path, version: str, images: Any, labels: Any) -> float:
    """A registered version's accuracy on images, with ONNX Runtime (as it is served)."""
    from opsloop.bundle import PROBABILITIES, onnx_session, run_onnx
    from opsloop.config import LoggerConfig
    from opsloop.registry import cached_bundle, get_version
    from opsloop.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(LoggerConfig(), workspace)
    bundle = cached_bundle(get_version(f"digits-cnn/{version}", uri), uri, workspace / "cache")
    probabilities = run_onnx(onnx_session(bundle.model_path), images.astype(np.float32))
    return float((probabilities[PROBABILITIES].argmax(axis=1) == labels).mean())


def run(scenario_name: str, scale: float, workdir: Path) -> dict[str, Any]:
    from opsloop.corruption import get_corruption
    from opsloop.data import load_split
    from opsloop.loop.history import History
    from opsloop.monitor.scenario import get_scenario, run_scenario, split_pool

    scenario = get_scenario(scenario_name).scaled(scale)
    processed = workdir / "data" / "processed"
    base_env = {
        **os.environ,
        "OPSLOOP_CONFIG_DIR": str(REPO / "configs"),
        "OPSLOOP_WORKSPACE": str(workdir),
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{workdir / 'predictions.db'}",
    }
    overrides = [f"workspace={workdir}", f"data.processed_dir={processed}"]
    pipeline = [*OPSLOOP, "pipeline", *overrides]
    subprocess.run(pipeline, env=base_env, cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    ports = {name: free_port() for name in ("serve", "monitor", "loop")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    serve_env = base_env | {"OPSLOOP_PORT": str(ports["serve"]), "OPSLOOP_RELOAD_POLL_SECONDS": "2"}
    monitor_env = base_env | {
        "OPSLOOP_MONITOR_PORT": str(ports["monitor"]),
        "OPSLOOP_MONITOR_INTERVAL_SECONDS": "2",
        "OPSLOOP_MONITOR_WINDOW": "100",
        "OPSLOOP_MONITOR_ACCURACY_WINDOW": "300",
    }
    loop_env = base_env | {
        "OPSLOOP_LOOP_PORT": str(ports["loop"]),
        "OPSLOOP_LOOP_WORKSPACE": str(workdir),
        "OPSLOOP_LOOP_INTERVAL_SECONDS": "5",
        "OPSLOOP_LOOP_COOLDOWN_SECONDS": "20",
        "OPSLOOP_LOOP_MAX_RUNS_PER_DAY": "50",
        "OPSLOOP_LOOP_MIN_NEW_LABELS": "60",
        "OPSLOOP_LOOP_MIN_ACCURACY_LABELS": "30",
        "OPSLOOP_LOOP_TARGET_ACCURACY": "0.98",
        "OPSLOOP_LOOP_ACCURACY_DROP": "0.05",
        "OPSLOOP_LOOP_OVERRIDES": f"data.processed_dir={processed} data.min_labels=40",
    }
    test = load_split(processed / "digits", "test")
    (images, labels), (held_images, held_labels) = split_pool(
        test.images, test.labels, scenario.holdout_fraction, seed=0
    )
    rng = np.random.default_rng(1)
    shifted_held = get_corruption(scenario.corruption)(
        held_images, scenario.severity, pixel_max=16.0, rng=rng
    )
    serve_ready = f"{urls['serve']}/v2/health/ready"
    monitor_ready = f"{urls['monitor']}/health"
    with (
        started(["serve"], serve_env, workdir / "serve.log", serve_ready),
        started(["monitor", "serve"], monitor_env, workdir / "monitor.log", monitor_ready),
        started(["loop", "serve"], loop_env, workdir / "loop.log", f"{urls['loop']}/health"),
    ):
        began = time.time()
        sampler = Sampler(urls["monitor"], began)
        try:
            timeline = run_scenario(
                scenario,
                urls["serve"],
                images,
                labels,
                model_name="digits-cnn",
                input_name="pixels",
                pixel_max=16.0,
            )
        finally:
            sampler.close()
    history = History(f"sqlite:///{workdir / 'loop.db'}")
    runs = [r for r in reversed(history.recent(100)) if r.started_at is not None]
    history.dispose()
    versions = sorted({a.model_version for a in timeline.answers if a.model_version}, key=int)
    first = held_out_accuracy(workdir, versions[0], shifted_held, held_labels)
    last = held_out_accuracy(workdir, versions[-1], shifted_held, held_labels)
    return summarise(scenario, timeline, sampler.samples, runs, began, (first, last))


def summarise(
    scenario: Any,
    timeline: Any,
    samples: list[dict[str, Any]],
    runs: list[Any],
    began: float,
    held_out: tuple[float, float],
) -> dict[str, Any]:
    """The figures, the 10-second accuracy windows and the loop's events, as plain values."""
    shift = timeline.shift_at
    end = shift + scenario.shift_seconds
    windows = [
        {"t": float(start), "accuracy": timeline.accuracy(start, start + 10.0)}
        for start in np.arange(0.0, end, 10.0)
    ]
    events = [
        {
            "t": run.started_at - began,
            "ended": (run.finished_at or run.started_at) - began,
            "run": run.id,
            "trigger": run.trigger,
            "state": run.state,
            "promoted": bool(run.promoted),
            "model_version": run.model_version,
            "labels": run.labels,
        }
        for run in runs
    ]
    promotions = [e for e in events if e["promoted"]]
    swaps = []
    previous = None
    for answer in timeline.answers:
        if answer.model_version and answer.model_version != previous:
            swaps.append({"t": answer.at, "model_version": answer.model_version})
            previous = answer.model_version
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores",
        "rate": scenario.rate,
        "clean_seconds": scenario.clean_seconds,
        "shift_seconds": scenario.shift_seconds,
        "requests": len(timeline.answers),
        "failed": timeline.failed,
        "labels_posted": timeline.labels_posted,
        "clean_accuracy": timeline.accuracy(0, shift),
        "shift_first_minute_accuracy": timeline.accuracy(shift, shift + 60),
        "last_minute_accuracy": timeline.accuracy(end - 60, end),
        "time_to_detect": events[0]["t"] - shift if events else None,
        "time_to_first_promotion": promotions[0]["ended"] - shift if promotions else None,
        "time_to_goal": time_to_goal(windows, shift),
        "held_out_first_champion": held_out[0],
        "held_out_last_champion": held_out[1],
        "windows": windows,
        "samples": samples,
        "events": events,
        "swaps": swaps,
    }


def time_to_goal(windows: list[dict[str, Any]], shift: float) -> float | None:
    """Seconds from the shift to the end of the first 10-second window at the goal accuracy
    after which no window falls more than 5 points below it; None if never."""
    for index, window in enumerate(windows):
        if window["t"] < shift or (window["accuracy"] or 0.0) < GOAL_ACCURACY:
            continue
        later = [w["accuracy"] or 0.0 for w in windows[index:]]
        if min(later) >= GOAL_ACCURACY - 0.05:
            return float(window["t"] + 10.0 - shift)
    return None


def draw(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 4.5))
    shift = result["clean_seconds"]
    windows = [w for w in result["windows"] if w["accuracy"] is not None]
    axis.plot(
        [w["t"] + 5 for w in windows],
        [w["accuracy"] for w in windows],
        "o-",
        color="tab:blue",
        label="online accuracy (10 s windows)",
    )
    estimates = [s for s in result["samples"] if "estimate" in s]
    axis.plot(
        [s["t"] for s in estimates],
        [s["estimate"] for s in estimates],
        "--",
        color="tab:green",
        label="estimated accuracy (no labels)",
    )
    axis.axvspan(
        shift,
        shift + result["shift_seconds"],
        color="tab:red",
        alpha=0.06,
        label=f"shift: {result['description'].split(':')[0]}",
    )
    axis.axhline(GOAL_ACCURACY, color="grey", lw=0.8, ls=":")
    for event in result["events"]:
        colour = "tab:purple" if event["promoted"] else "tab:orange"
        axis.axvline(event["ended"], color=colour, lw=1.2)
        word = f"v{event['model_version']}" if event["promoted"] else event["state"]
        axis.text(event["ended"], 0.03, f" run {event['run']}: {word}", rotation=90, fontsize=7)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("seconds")
    axis.set_ylabel("accuracy")
    drift = [s for s in result["samples"] if s.get("p_value") is not None]
    if drift:
        twin = axis.twinx()
        twin.semilogy(
            [s["t"] for s in drift],
            [max(s["p_value"], 1e-12) for s in drift],
            color="tab:red",
            lw=0.8,
            alpha=0.6,
            label="drift p-value",
        )
        twin.set_ylabel("drift p-value (corrected)")
        twin.legend(loc="lower right", fontsize=8)
    axis.legend(loc="lower left", fontsize=8)
    axis.set_title("opsloop: shift -> detect -> retrain on production labels -> promote -> swap")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(FIGURE, dpi=110)


def table(result: dict[str, Any]) -> str:
    def seconds(value: float | None) -> str:
        return "not reached" if value is None else f"{value:.0f} s"

    def points(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    met = result["time_to_goal"] is not None and result["time_to_goal"] <= GOAL_SECONDS
    rows = {
        "requests / failed": f"{result['requests']} / {result['failed']}",
        "accuracy before the shift": points(result["clean_accuracy"]),
        "accuracy in the shift's first minute": points(result["shift_first_minute_accuracy"]),
        "time to detect (shift -> first loop run)": seconds(result["time_to_detect"]),
        "time to the first promotion": seconds(result["time_to_first_promotion"]),
        f"time to {100 * GOAL_ACCURACY:.0f}% on the shifted stream (and staying)": seconds(
            result["time_to_goal"]
        ),
        "accuracy in the last minute": points(result["last_minute_accuracy"]),
        "held-out shifted images: first -> last champion": (
            f"{points(result['held_out_first_champion'])} -> "
            f"{points(result['held_out_last_champion'])}"
        ),
        "loop runs (promoted)": (
            f"{len(result['events'])} ({sum(e['promoted'] for e in result['events'])})"
        ),
    }
    verdict = "met" if met and not result["failed"] else "MISSED"
    return "\n".join(
        [
            f"Scenario `{result['scenario']}` ({result['description']}), measured "
            f"{result['date']} on {result['machine']}: {result['clean_seconds']:.0f} s clean then "
            f"{result['shift_seconds']:.0f} s shifted at {result['rate']:g} requests/s, labels "
            "for half of the answers, 5 s late.",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {key} | {value} |" for key, value in rows.items()),
            "",
            f"Goal: {100 * GOAL_ACCURACY:.0f}% on the shifted stream within {GOAL_SECONDS:.0f} s "
            f"of the shift, zero failed requests: {verdict}.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="rotation")
    parser.add_argument("--scale", type=float, default=1.0, help="Stretch or shorten the phases.")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--keep", type=Path, help="Work in (and keep) this directory: its logs.")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.scenario, args.scale, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="opsloop-loop-") as scratch:
            result = run(args.scenario, args.scale, Path(scratch))
    draw(result)
    publish(result, RESULTS, table(result), DOCS, BLOCK, write_docs=args.write_docs)


if __name__ == "__main__":
    main()
