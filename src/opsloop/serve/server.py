"""`opsloop serve`: a supervisor, its worker processes and the prediction-log ingester.

uvicorn's own multi-worker mode shares one listening socket, and with few long-lived (keep-alive)
connections one worker can end up with most of them while another idles. Here every worker binds
its own socket with SO_REUSEPORT, so the kernel spreads connections evenly across workers. The
supervisor only supervises: it checks the settings (and the bundle) before anything starts,
prepares the Prometheus multiprocess directory and the prediction-log table, runs the ingester
(journal -> SQL, `opsloop.serve.ingest`) as its own process, restarts a worker or the ingester
that dies, and forwards SIGINT/SIGTERM for a graceful shutdown: workers drain first, then the
ingester writes what they journaled. Its children die with it (`PR_SET_PDEATHSIG`), even when it
is killed outright, so a server that is gone never leaves workers answering on its port.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import logging.config
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from opsloop.errors import ConfigError, OpsloopError
from opsloop.serve.metrics import MULTIPROC_ENV
from opsloop.serve.settings import ENV_PREFIX, ServeSettings, get_settings
from opsloop.service import check_port, logging_config, make_socket

logger = logging.getLogger(__name__)

APP_FACTORY = "opsloop.serve.app:app_from_env"
GRACEFUL_SHUTDOWN_SECONDS = 30
# A worker that dies this soon after starting is broken, not unlucky: stop instead of respawning.
MIN_WORKER_LIFETIME_S = 10.0
# How long the ingester may take to write the journal's rest on shutdown (the rest stays on
# disk for the next start if the database is away that long).
INGESTER_DRAIN_SECONDS = 30
METRICS_DIR_PREFIX = "opsloop-metrics-"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def run_server(settings: ServeSettings) -> None:
    """Serve until interrupted; settings problems fail here, before any worker starts."""
    preflight(settings)
    export_settings(settings)
    metrics_dir = prepare_metrics_dir(settings)
    try:
        supervise(settings)
    finally:
        if settings.metrics_dir is None:  # ours, made for this run only
            shutil.rmtree(metrics_dir, ignore_errors=True)


def preflight(settings: ServeSettings) -> None:
    """Fail fast, with the variable to fix, on a bad bundle path or an unusable prediction log."""
    if settings.bundle_path is not None:
        from opsloop.bundle import load_bundle

        try:
            load_bundle(settings.bundle_path)
        except OpsloopError as exc:
            raise ConfigError(f"OPSLOOP_BUNDLE_PATH={settings.bundle_path}: {exc}") from exc
    if settings.predlog_enabled:
        from opsloop.serve.ingest import Ingester
        from opsloop.serve.journal import check_writable

        journal = settings.resolved_journal_dir()
        check_writable(journal)
        ingester = Ingester(journal, settings.resolved_predlog_url())
        ingester.open()  # creates the tables once, so the processes do not race to create them
        ingester.close()
    check_port(settings.host, settings.port, f"{ENV_PREFIX}PORT")


def export_settings(settings: ServeSettings) -> None:
    """Put the effective settings into the environment, where workers (and reloads) read them."""
    for name, value in settings.model_dump().items():
        key = f"{ENV_PREFIX}{name.upper()}"
        if value is None:
            os.environ.pop(key, None)
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        os.environ[key] = str(value).lower() if isinstance(value, bool) else str(value)
    # One ingester process writes every worker's journal; the workers only append to theirs.
    os.environ[f"{ENV_PREFIX}INGEST_IN_PROCESS"] = "false"
    get_settings.cache_clear()


def prepare_metrics_dir(settings: ServeSettings) -> Path:
    """An empty Prometheus multiprocess directory, named in the environment before workers start.

    Without `metrics_dir` it is a fresh temporary directory named after this process, removed
    when the server stops; one left by a server that was killed is removed here.
    """
    if settings.metrics_dir is None:
        remove_stale_metrics_dirs()
        directory = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))
    else:
        directory = settings.metrics_dir
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # samples of a previous run would be added in
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def remove_stale_metrics_dirs() -> None:
    """Delete temporary metrics directories whose server process no longer exists."""
    pattern = re.compile(rf"^{METRICS_DIR_PREFIX}(\d+)-")
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        match = pattern.match(path.name)
        if match is not None and not process_exists(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    # The header size limit and the header/body timeouts live in the HTTP protocol uvicorn runs.
    from opsloop.serve.limits import ConnectionLimits, http_options

    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    return {
        "host": settings.host,
        "port": settings.port,
        "access_log": settings.access_log,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_level),
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        "timeout_keep_alive": settings.keep_alive_s,
        "server_header": False,
        **http_options(limits),
    }


@dataclass
class Child:
    """A supervised process and when it started."""

    process: BaseProcess
    started: float


def supervise(settings: ServeSettings) -> None:
    """Run the workers and the ingester, restart any that die, stop them all on a signal."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[Child] = []
    ingester: Child | None = None
    try:
        if settings.predlog_enabled:
            ingester = start_child(context, ingester_main, "opsloop-ingest")
        workers = [start_worker(context, index) for index in range(settings.workers)]
        logger.info(
            "serving on http://%s:%d with %d workers (pids %s)%s",
            settings.host,
            settings.port,
            len(workers),
            ", ".join(str(w.process.pid) for w in workers),
            "" if ingester is None else f" and the log ingester (pid {ingester.process.pid})",
        )
        while not stopping:
            time.sleep(0.5)
            workers = [restart_if_dead(context, index, w) for index, w in enumerate(workers)]
            if ingester is not None:
                ingester = restart_ingester_if_dead(context, ingester)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_children([w.process for w in workers], GRACEFUL_SHUTDOWN_SECONDS)
        # After the workers: it writes what they journaled while draining.
        if ingester is not None:
            stop_children([ingester.process], INGESTER_DRAIN_SECONDS)


def start_child(context: Any, target: Callable[[int], None], name: str) -> Child:
    """Start `target(supervisor_pid)` in a fresh (spawned) process."""
    process = context.Process(target=target, args=(os.getpid(),), name=name, daemon=False)
    process.start()
    return Child(process, time.monotonic())


def start_worker(context: Any, index: int) -> Child:
    return start_child(context, worker_main, f"opsloop-serve-{index}")


def restart_if_dead(context: Any, index: int, worker: Child) -> Child:
    process = worker.process
    if process.exitcode is None:
        return worker
    mark_dead(process.pid)
    if time.monotonic() - worker.started < MIN_WORKER_LIFETIME_S:
        raise ConfigError(
            f"worker {index} exited with code {process.exitcode} right after starting; "
            "its error is printed above"
        )
    logger.warning(
        "worker %d (pid %s) died with code %s; restarting", index, process.pid, process.exitcode
    )
    return start_worker(context, index)


def restart_ingester_if_dead(context: Any, ingester: Child) -> Child:
    """A dead ingester is restarted (it resumes from the database's offsets); the workers
    keep journaling meanwhile, so nothing waits on it."""
    process = ingester.process
    if process.exitcode is None:
        return ingester
    mark_dead(process.pid)
    logger.warning("ingester (pid %s) died with code %s; restarting", process.pid, process.exitcode)
    if time.monotonic() - ingester.started < MIN_WORKER_LIFETIME_S:
        time.sleep(1.0)  # failing right away (e.g. the database is down): don't spin
    restarted = start_child(context, ingester_main, "opsloop-ingest")
    logger.info("the log ingester restarted (pid %s)", restarted.process.pid)
    return restarted


def stop_children(processes: list[BaseProcess], grace_s: float) -> None:
    """SIGTERM each (workers drain requests; the ingester writes what is left), then wait."""
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 10
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            logger.error("%s (pid %s) did not stop in time; killing it", process.name, process.pid)
            process.kill()
            process.join()
        mark_dead(process.pid)


def mark_dead(pid: int | None) -> None:
    """Drop a dead process's live gauges from the multiprocess metrics."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies, however it dies (Linux).

    The check after `prctl` closes the race where the supervisor died before it took effect.
    Elsewhere there is no such call; the worker then only checks once, here.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(0)


def worker_main(parent_pid: int) -> None:
    """One worker process: bind the shared port with SO_REUSEPORT and run uvicorn on it."""
    import uvicorn

    die_with_parent(parent_pid)
    # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which then sends
    # one SIGTERM (a second signal would make uvicorn skip the graceful drain).
    os.setpgrp()
    settings = get_settings()
    sock = make_socket(settings.host, settings.port)
    options = uvicorn_options(settings)
    del options["host"], options["port"]
    server = uvicorn.Server(uvicorn.Config(APP_FACTORY, factory=True, **options))
    server.run(sockets=[sock])


def ingester_main(parent_pid: int) -> None:
    """The ingester process: journal -> SQL until SIGTERM, then write what is left and exit."""
    from opsloop.serve.ingest import Ingester, ingester_lock
    from opsloop.serve.metrics import ServeMetrics

    die_with_parent(parent_pid)
    os.setpgrp()  # like the workers: only the supervisor hears a terminal's Ctrl-C
    logging.config.dictConfig(logging_config(get_settings().log_level))
    settings = get_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    metrics = ServeMetrics()  # counts in the shared multiprocess directory
    ingester = Ingester(
        settings.resolved_journal_dir(),
        settings.resolved_predlog_url(),
        batch_rows=settings.predlog_batch_rows,
        interval_s=settings.predlog_flush_ms / 1000.0,
        engine_options=settings.predlog_engine_options(),
        on_written=metrics.predlog_rows.inc,
        retention=settings.predlog_retention(),
        on_housekeeping=metrics.record_housekeeping,
    )
    ingester.open()
    try:
        with ingester_lock(ingester.directory, stop) as held:
            if held:
                ingester.run(stop, drain_timeout_s=INGESTER_DRAIN_SECONDS)
    finally:
        ingester.close()
