"""Serving benchmark: opsloop serve against the plain FastAPI + PyTorch pattern, in one run.

    .venv/bin/python benchmarks/serve.py                       # 1x8x8 digits model, 10 s cells
    .venv/bin/python benchmarks/serve.py --shape 1x28x28 --duration 5 --write-docs

Targets, each loaded by `wrk` (a separate process, POSTing the same V2 JSON body) at concurrency
1, 8, 32 and 64 — all the servers run side by side and the cells interleave, so background load
on the machine hits them alike; each cell starts once the machine is idle (the previous cell's
log ingestion done):

  (a) reference: FastAPI `def` endpoint + pydantic request model + one PyTorch forward per request,
      one uvicorn worker (the pattern courses teach; the baseline for every ratio);
  (b) ceiling: ONNX Runtime called in this process without HTTP, batch = concurrency (<= 32);
  (c) constant: a bare ASGI app that reads the body and returns a constant, 2 SO_REUSEPORT workers;
  (d) opsloop: `opsloop serve`, 2 workers, metrics and the prediction log on;
  (e) opsloop with shadow: (d), and a second copy of the model runs every request in shadow (off
      the response path, its answers logged): (e)/(d) is the cost of shadowing;
  (f) opsloop with fsync: (d) with `OPSLOOP_JOURNAL_FSYNC=true`, every journal record flushed to
      disk before the answer (power-loss durability): (f)/(d) is its cost.

Results go to benchmarks/results/serve-<shape>.json and, with --write-docs, into docs/serving.md.
Needs the `train` extra (torch) and wrk (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from docs_block import fill_block
from fastapi import FastAPI
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "serving.md"
CONCURRENCY = (1, 8, 32, 64)
MAX_BATCH = 32
WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""

logger = logging.getLogger("benchmarks.serve")


@dataclass
class Cell:
    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None = None


# --- the reference: FastAPI + pydantic + one PyTorch forward per request ----------------------


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferIn(BaseModel):
    inputs: list[TensorIn]


def reference_app() -> FastAPI:
    """The plain pattern: a sync endpoint, a pydantic body, torch per request, JSON via FastAPI."""
    import torch

    workdir = Path(os.environ["BENCH_WORKDIR"])
    net = build_net(json.loads((workdir / "hparams.json").read_text()))
    net.load_state_dict(torch.load(workdir / "net.pt", weights_only=True))
    net.eval()
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/digits/infer")
    def infer(request: InferIn) -> dict[str, Any]:
        tensor = request.inputs[0]
        pixels = torch.tensor(tensor.data, dtype=torch.float32).reshape(tensor.shape)
        with torch.no_grad():
            probabilities = torch.softmax(net(pixels), dim=-1)
        return {
            "model_name": "digits",
            "outputs": [
                {
                    "name": "probabilities",
                    "shape": list(probabilities.shape),
                    "datatype": "FP32",
                    "data": probabilities.flatten().tolist(),
                },
                {
                    "name": "label",
                    "shape": [len(probabilities)],
                    "datatype": "INT64",
                    "data": probabilities.argmax(dim=-1).tolist(),
                },
            ],
        }

    return app


# --- the constant-answer app on the same stack as opsloop's hot path --------------------------

CONSTANT = json.dumps(
    {"model_name": "digits", "outputs": [{"name": "label", "shape": [1], "datatype": "INT64",
                                          "data": [0]}]}
).encode()  # fmt: skip


def constant_app() -> Any:
    """A bare ASGI app: read the body, answer a constant (the HTTP stack's own ceiling)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": CONSTANT})

    return app


def run_worker(factory: str, port: int) -> None:
    """One uvicorn worker on a SO_REUSEPORT socket (the same way `opsloop serve` runs them)."""
    import uvicorn

    from opsloop.service import make_socket

    sock = make_socket("127.0.0.1", port)
    config = uvicorn.Config(
        f"benchmarks.serve:{factory}", factory=True, access_log=False, log_level="warning"
    )
    uvicorn.Server(config).run(sockets=[sock])


# --- artifacts ----------------------------------------------------------------------------------


def build_net(hparams: dict[str, Any]) -> Any:
    from opsloop.model import ConvNet

    return ConvNet(
        image_shape=hparams["image_shape"],
        num_classes=len(hparams["class_names"]),
        pixel_mean=hparams["pixel_mean"],
        pixel_std=hparams["pixel_std"],
        channels=32,
        depth=2,
        hidden=128,
        dropout=0.0,
    )


def make_artifacts(workdir: Path, shape: tuple[int, int, int]) -> Path:
    """The default CNN (random weights: speed does not depend on them) as torch and as a bundle."""
    import torch

    from opsloop.bundle import MODEL_FILE
    from opsloop.export import (
        build_bundle_manifest,
        export_onnx,
        finalize_manifest,
        write_reference,
    )

    torch.manual_seed(0)
    pixel_max = 16.0 if shape[1] <= 8 else 255.0
    hparams = {
        "image_shape": list(shape),
        "class_names": [str(i) for i in range(10)],
        "pixel_mean": [pixel_max / 4] * shape[0],
        "pixel_std": [pixel_max / 3] * shape[0],
        "pixel_max": pixel_max,
    }
    net = build_net(hparams).eval()
    (workdir / "hparams.json").write_text(json.dumps(hparams))
    torch.save(net.state_dict(), workdir / "net.pt")
    bundle = workdir / "bundle"
    bundle.mkdir()
    export_onnx(net, shape, bundle / MODEL_FILE)
    # A reference sample, so the bundle carries the log basis the server logs embeddings in.
    rng = np.random.default_rng(1)
    images = (rng.random((500, *shape)) * pixel_max).round().astype(np.uint8)
    write_reference(bundle / MODEL_FILE, images, rng.integers(0, 10, 500), 500, bundle)
    manifest = build_bundle_manifest(
        hparams,
        model_name="digits",
        model_version="1",
        model_file=MODEL_FILE,
        lineage={},
        metrics={},
        quantization=None,
        embedding_size=128,
    )
    finalize_manifest(bundle, manifest)
    pixels = np.random.default_rng(0).random((1, *shape)) * pixel_max
    # The outputs the reference returns (a request naming none gets the embedding too).
    body = {
        "inputs": [
            {"name": "pixels", "shape": [1, *shape], "datatype": "FP32",
             "data": [round(float(v), 3) for v in pixels.ravel()]}
        ],
        "outputs": [{"name": "probabilities"}, {"name": "label"}],
    }  # fmt: skip
    (workdir / "body.json").write_text(json.dumps(body))
    (workdir / "post.lua").write_text(WRK_SCRIPT.format(body=workdir / "body.json"))
    return bundle


# --- servers and load ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started(commands: list[list[str]], env: dict[str, str], url: str) -> Iterator[None]:
    """Start processes, wait until `url` answers 200, stop them (by PID) afterwards."""
    import httpx

    processes = [
        subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        for command in commands
    ]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"{commands[0]} exited during start-up")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{url} not ready")
        time.sleep(3)  # let every worker finish starting (only one answered the probe)
        yield
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def wrk(
    url: str, script: Path, concurrency: int, duration: float
) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, non-2xx + socket errors) from one wrk run."""
    threads = min(2, concurrency)
    seconds = max(1, round(duration))
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s",
         str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)$", output, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", output))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return rate, to_ms(percentiles["50"]), to_ms(percentiles["99"]), errors


def to_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def busy_share(window: float) -> float:
    """The share of all CPUs' time spent busy over the next `window` seconds (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(window)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(threshold: float = 0.1, timeout: float = 120.0) -> None:
    """Wait until the machine is mostly idle (at most `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while busy_share(0.5) > threshold and time.monotonic() < deadline:
        pass


def batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = dict(re.findall(r"^opsloop_batch_size_(sum|count) ([\d.e+]+)$", text, re.MULTILINE))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def ceiling(bundle: Path, concurrency: int, duration: float) -> Cell:
    """ONNX Runtime alone, one thread, batches of min(concurrency, 32) rows."""
    from opsloop.serve.runtime import load_model

    model = load_model(bundle)
    rows = min(concurrency, MAX_BATCH)
    pixels = np.random.default_rng(0).random((rows, *model.signature.item_shape)).astype(np.float32)
    for _ in range(50):
        model.predict(pixels)
    latencies = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        start = time.perf_counter()
        model.predict(pixels)
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    rate = rows * len(latencies) / sum(latencies)
    return Cell(
        "(b) ONNX Runtime in process", concurrency, rate,
        latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000, 0,
    )  # fmt: skip


def run(shape: tuple[int, int, int], duration: float, workdir: Path) -> list[Cell]:
    bundle = make_artifacts(workdir, shape)
    env = {**os.environ, "BENCH_WORKDIR": str(workdir), "PYTHONPATH": str(REPO)}
    ports = {name: free_port() for name in ("reference", "constant", "opsloop", "shadow", "fsync")}
    candidate = workdir / "candidate"
    shutil.copytree(bundle, candidate)
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    serve_env = env | {
        "OPSLOOP_BUNDLE_PATH": str(bundle),
        "OPSLOOP_PORT": str(ports["opsloop"]),
        "OPSLOOP_WORKERS": "2",
        "OPSLOOP_WORKSPACE": str(workdir),
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{workdir / 'predictions.db'}",
        "OPSLOOP_LOG_LEVEL": "warning",
    }
    shadow_env = serve_env | {
        "OPSLOOP_PORT": str(ports["shadow"]),
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{workdir / 'shadow-predictions.db'}",
        "OPSLOOP_SHADOW": "true",
        "OPSLOOP_CANDIDATE_BUNDLE_PATH": str(candidate),
    }
    fsync_env = serve_env | {
        "OPSLOOP_PORT": str(ports["fsync"]),
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{workdir / 'fsync-predictions.db'}",
        "OPSLOOP_JOURNAL_FSYNC": "true",
    }
    opsloop_serve = [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())"]
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    infer = "/v2/models/digits/infer"
    script = workdir / "post.lua"
    cells: list[Cell] = []
    with (
        started(
            [[*worker, "reference_app", str(ports["reference"])]],
            env,
            urls["reference"] + "/v2/health/ready",
        ),
        started(
            [[*worker, "constant_app", str(ports["constant"])]] * 2, env, urls["constant"] + "/"
        ),
        started([[*opsloop_serve, "serve"]], serve_env, urls["opsloop"] + "/v2/health/ready"),
        started([[*opsloop_serve, "serve"]], shadow_env, urls["shadow"] + "/v2/health/ready"),
        started([[*opsloop_serve, "serve"]], fsync_env, urls["fsync"] + "/v2/health/ready"),
    ):
        for name in ports:  # warm-up, not measured
            wrk(urls[name] + infer, script, 8, 2)
        for concurrency in CONCURRENCY:
            for name, label in (
                ("reference", "(a) FastAPI + pydantic + PyTorch, 1 worker"),
                ("constant", "(c) constant answer, bare ASGI, 2 workers"),
                ("opsloop", "(d) opsloop serve, 2 workers, metrics + log"),
                ("shadow", "(e) (d) + the candidate in shadow"),
                ("fsync", "(f) (d) + the journal fsynced before answering"),
            ):
                ours = name in ("opsloop", "shadow", "fsync")
                # The previous cell's ingester may still be writing its log: not this cell's cost.
                wait_until_idle()
                before = batch_stats(urls[name]) if ours else (0.0, 0.0)
                rate, p50, p99, errors = wrk(urls[name] + infer, script, concurrency, duration)
                cell = Cell(label, concurrency, rate, p50, p99, errors)
                if ours:
                    after = batch_stats(urls[name])
                    batches = after[1] - before[1]
                    cell.mean_batch = (after[0] - before[0]) / batches if batches else None
                cells.append(cell)
                logger.info(
                    "%s c=%d: %.0f req/s p50 %.2f ms p99 %.2f ms",
                    label,
                    concurrency,
                    rate,
                    p50,
                    p99,
                )
    for concurrency in CONCURRENCY:
        cells.append(ceiling(bundle, concurrency, min(duration, 3)))
    return cells


# --- reporting ----------------------------------------------------------------------------------


def table(cells: list[Cell], shape: str, duration: float) -> str:
    reference = {c.concurrency: c.requests_per_s for c in cells if c.target.startswith("(a)")}
    lines = [
        f"Model: the default CNN on {shape} inputs. {duration:g} s per cell, wrk on the same "
        f"machine, measured {time.strftime('%Y-%m-%d')}.",
        "",
        "| target | concurrency | req/s | vs (a) | p50 ms | p99 ms | errors | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in sorted(cells, key=lambda c: (c.target[:3], c.concurrency)):
        ratio = cell.requests_per_s / reference[cell.concurrency]
        batch = f"{cell.mean_batch:.1f}" if cell.mean_batch else ""
        lines.append(
            f"| {cell.target} | {cell.concurrency} | {cell.requests_per_s:,.0f} | {ratio:.1f}x | "
            f"{cell.p50_ms:.2f} | {cell.p99_ms:.2f} | {cell.errors} | {batch} |"
        )
    return "\n".join(lines)


def write_docs(text: str, shape: str) -> None:
    fill_block(DOCS, shape, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x8x8", help="CxHxW of the model input")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--write-docs", action="store_true", help="update docs/serving.md")
    parser.add_argument("--worker", nargs=2, metavar=("FACTORY", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker[0], int(args.worker[1]))
        return
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    shape = tuple(int(d) for d in args.shape.split("x"))
    if len(shape) != 3 or math.prod(shape) <= 0:
        raise SystemExit("--shape must be CxHxW, e.g. 1x28x28")
    with tempfile.TemporaryDirectory(prefix="opsloop-bench-") as tmp:
        cells = run(shape, args.duration, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serve-{args.shape}.json").write_text(
        json.dumps([asdict(c) for c in cells], indent=2) + "\n"
    )
    text = table(cells, args.shape, args.duration)
    print(text)
    if args.write_docs:
        write_docs(text, args.shape)


if __name__ == "__main__":
    main()
