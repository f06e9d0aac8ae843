"""Where a serving worker's time goes under load: py-spy samples of one `opsloop serve` worker.

`opsloop serve` (2 workers, metrics and the prediction log on, the digits bundle) is loaded by
wrk at concurrency 32 while py-spy samples one worker's busy threads (the event loop, the
inference thread). Each sample is charged to the first category its stack matches, leaf first:

    uv run --no-sync python benchmarks/profile_serve.py [--duration 10] [--write-docs]

Needs the `train` extra (to build the bundle), wrk and py-spy (a dev dependency; sampling another
process needs ptrace rights: root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from docs_block import publish  # noqa: E402

from serve import free_port, make_artifacts, started, wait_until_idle, wrk  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "serve-profile.json"
DOCS = REPO / "docs" / "serving.md"
BLOCK = "profile"  # its markers in the docs page: <!-- benchmark:profile:start/end -->
CONCURRENCY = 32
# (category, pattern matched against one frame "function (file)"), checked leaf first: the
# first frame that matches any pattern decides the sample's category.
CATEGORIES = (
    ("ONNX Runtime (the model)", r"Session\.run \(onnxruntime/"),
    ("prediction journal (encode + write)", r"\(opsloop/serve/journal\.py"),
    ("log basis projection", r"LogBasis\.project"),
    ("metrics (prometheus_client)", r"\(prometheus_client/"),
    ("request decode (JSON -> tensor)", r"decode_|parse_json_object|orjson"),
    ("response encode (tensor -> JSON)", r"encode_infer_response|output_tensors|encode_"),
    ("request ids (os.urandom)", r"\(random\.py|\(secrets\.py"),
    ("micro-batcher and its thread hand-off", r"concurrent/futures/|batching\.py|run_in_executor"),
    ("HTTP response write (the socket send)", r"\(opsloop/serve/transport\.py"),
    ("HTTP parse and answer (opsloop's connection protocol)", r"\(opsloop/serve/(wire|limits)\.py"),
    ("opsloop request path (other)", r"\(opsloop/serve/"),
    ("HTTP (uvicorn, httptools)", r"\(uvicorn/|httptools"),
    ("event loop (uvloop, in C)", r"\(asyncio/"),
)


def worker_pids(server_pid: int, port: int) -> list[int]:
    """The supervisor's children that listen on `port` (the workers, not the ingester)."""
    listening = listening_inodes(port)
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != server_pid:
                continue
            sockets = {str(fd.readlink()) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in sockets for inode in listening):
            workers.append(int(entry.name))
    return sorted(workers)


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def categorise(raw: Path) -> tuple[dict[str, float], int]:
    """Share of samples per category from py-spy's raw (collapsed stacks) output."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        counts[category_of(frames)] += int(count)
    return {name: counts[name] / total for name, _ in (*CATEGORIES, ("other", ""))}, total


def category_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # leaf first
        for name, pattern in CATEGORIES:
            if re.search(pattern, frame):
                return name
    return "other"


def run(duration: float, workdir: Path) -> dict[str, object]:
    bundle = make_artifacts(workdir, (1, 8, 8))
    port = free_port()
    env = {
        **os.environ,
        "OPSLOOP_BUNDLE_PATH": str(bundle),
        "OPSLOOP_PORT": str(port),
        "OPSLOOP_WORKERS": "2",
        "OPSLOOP_WORKSPACE": str(workdir),
        "OPSLOOP_PREDLOG_URL": f"sqlite:///{workdir / 'predictions.db'}",
        "OPSLOOP_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-c", "from opsloop.cli import main; raise SystemExit(main())"]
    script = workdir / "post.lua"
    infer = url + "/v2/models/digits/infer"
    raw = workdir / "profile.txt"
    with started([[*serve, "serve"]], env, url + "/v2/health/ready"):
        wrk(infer, script, 8, 2)  # warm-up
        target = worker_pids(server_pid(port), port)[0]
        sampler = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(target),
                "--duration",
                str(int(duration)),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        rate, _p50, p99, errors = wrk(infer, script, CONCURRENCY, duration)
        _, stderr = sampler.communicate(timeout=duration + 60)
        if sampler.returncode != 0 or not raw.exists():
            raise SystemExit(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}")
        split = cpu_split(server_pid(port), port, infer, script, duration)
    shares, samples = categorise(raw)
    (RESULTS.parent / "serve-profile.txt").write_text(raw.read_text())  # the stacks themselves
    return {
        "date": time.strftime("%Y-%m-%d"),
        "concurrency": CONCURRENCY,
        "requests_per_s": rate,
        "p99_ms": p99,
        "errors": errors,
        "samples": samples,
        "shares": shares,
        "cpu_split": split,
    }


def cpu_split(server: int, port: int, infer: str, script: Path, duration: float) -> dict[str, Any]:
    """CPU microseconds per request of each process, from the kernel's accounting (not
    sampled): a second load run without py-spy, then the ingester's catch-up until idle."""
    wait_until_idle()
    workers = worker_pids(server, port)
    ingesters = [pid for pid in children_of(server) if pid not in workers]
    before = {pid: cpu_seconds(pid) for pid in workers + ingesters}
    load_before = os.times()
    rate, _p50, _p99, _errors = wrk(infer, script, CONCURRENCY, duration)
    load_after = os.times()
    wait_until_idle()  # the ingester writes the rest of what was journaled
    used = {pid: cpu_seconds(pid) - before[pid] for pid in before}
    requests = rate * duration
    load = (load_after.children_user + load_after.children_system) - (
        load_before.children_user + load_before.children_system
    )
    return {
        "requests_per_s": rate,
        "workers_us": sum(used[pid] for pid in workers) / requests * 1e6,
        "ingester_us": sum(used[pid] for pid in ingesters) / requests * 1e6,
        "load_us": load / requests * 1e6,
    }


def children_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(port: int) -> int:
    """The `opsloop serve` supervisor this process started on `port` (found in /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()
        if ours and f"OPSLOOP_PORT={port}".encode() in environ:
            return int(entry.name)
    raise SystemExit(f"no opsloop serve on port {port} among this process's children")


def table(result: dict[str, object]) -> str:
    shares = result["shares"]
    assert isinstance(shares, dict)
    lines = [
        f"One worker of `opsloop serve` (2 workers, metrics and the log on) sampled by py-spy "
        f"at 250 Hz (all its threads: the event loop, the inference thread, image decoding) "
        f"while wrk loads the server at concurrency {result['concurrency']} "
        f"({result['requests_per_s']:,.0f} req/s, p99 {result['p99_ms']:.1f} ms), measured "
        f"{result['date']}; {result['samples']} samples of busy threads:",
        "",
        "| where the worker's time goes | share |",
        "|---|---:|",
    ]
    for name, share in sorted(shares.items(), key=lambda item: -item[1]):
        lines.append(f"| {name} | {share:.0%} |")
    split = result["cpu_split"]
    assert isinstance(split, dict)
    total = split["workers_us"] + split["ingester_us"] + split["load_us"]
    lines += [
        "",
        "py-spy counts a thread that is runnable but waiting for a core as busy, so on two shared "
        "cores the send (which wakes the client) looks dearer than it is. The kernel's own "
        f"accounting of CPU time, in a second run without py-spy ({split['requests_per_s']:,.0f} "
        "req/s; the ingester's time includes catching up after the load stops):",
        "",
        "| CPU per request | microseconds | share |",
        "|---|---:|---:|",
    ]
    for name, key in (
        ("the two workers (HTTP, decode, model, answer, journal, metrics)", "workers_us"),
        ("the log ingester (journal -> SQLite)", "ingester_us"),
        ("wrk, the load generator, on the same cores", "load_us"),
    ):
        lines.append(f"| {name} | {split[key]:.0f} | {split[key] / total:.0%} |")
    lines.append(f"| all of it (2 cores = 2,000,000 us per second) | {total:.0f} | 100% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="opsloop-profile-") as scratch:
        result = run(args.duration, Path(scratch))
    publish(result, RESULTS, table(result), DOCS, BLOCK, write_docs=args.write_docs)


if __name__ == "__main__":
    main()
