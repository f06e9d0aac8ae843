"""Run the app under uvicorn: one process, or several workers that each own a SO_REUSEPORT socket.

uvicorn's own multi-worker mode shares one listening socket, and with few long-lived (keep-alive)
connections one worker can end up with most of them while another idles. Here every worker binds
its own socket with SO_REUSEPORT, so the kernel spreads connections evenly across workers. The
parent only supervises: it checks the settings (and the bundle) before anything starts, prepares
the Prometheus multiprocess directory and the prediction-log table, restarts a worker that dies,
and forwards SIGINT/SIGTERM for a graceful shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import tempfile
import time
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


def run_server(settings: ServeSettings) -> None:
    """Serve until interrupted; settings problems fail here, before any worker starts."""
    preflight(settings)
    export_settings(settings)
    if settings.workers > 1:
        prepare_metrics_dir(settings)
        supervise(settings)
    else:
        import uvicorn

        uvicorn.run(APP_FACTORY, factory=True, **uvicorn_options(settings))


def preflight(settings: ServeSettings) -> None:
    """Fail fast, with the variable to fix, on a bad bundle path or an unusable prediction log."""
    if settings.bundle_path is not None:
        from opsloop.bundle import load_bundle

        try:
            load_bundle(settings.bundle_path)
        except OpsloopError as exc:
            raise ConfigError(f"OPSLOOP_BUNDLE_PATH={settings.bundle_path}: {exc}") from exc
    if settings.predlog_enabled:
        from opsloop.serve.predlog import PredictionLog

        log = PredictionLog(settings.resolved_predlog_url())
        log.start()  # creates the table once, so the workers do not race to create it
        log.close()
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
    get_settings.cache_clear()


def prepare_metrics_dir(settings: ServeSettings) -> Path:
    """An empty Prometheus multiprocess directory, named in the environment before workers start."""
    if settings.metrics_dir is None:
        directory = Path(tempfile.mkdtemp(prefix="opsloop-metrics-"))
    else:
        directory = settings.metrics_dir
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # samples of a previous run would be added in
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "access_log": settings.access_log,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_level),
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        "server_header": False,
    }


def supervise(settings: ServeSettings) -> None:
    """Start `settings.workers` processes, restart any that die, stop them all on a signal."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[tuple[BaseProcess, float]] = []
    try:
        workers = [start_worker(context, index) for index in range(settings.workers)]
        logger.info(
            "serving on http://%s:%d with %d workers", settings.host, settings.port, len(workers)
        )
        while not stopping:
            time.sleep(0.5)
            workers = [restart_if_dead(context, index, *w) for index, w in enumerate(workers)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_workers([process for process, _ in workers])


def start_worker(context: Any, index: int) -> tuple[BaseProcess, float]:
    process = context.Process(target=worker_main, name=f"opsloop-serve-{index}", daemon=False)
    process.start()
    return process, time.monotonic()


def restart_if_dead(
    context: Any, index: int, process: BaseProcess, started: float
) -> tuple[BaseProcess, float]:
    if process.exitcode is None:
        return process, started
    mark_dead(process.pid)
    if time.monotonic() - started < MIN_WORKER_LIFETIME_S:
        raise ConfigError(
            f"worker {index} exited with code {process.exitcode} right after starting; "
            "run with --workers 1 to see why"
        )
    logger.warning(
        "worker %d (pid %s) died with code %s; restarting", index, process.pid, process.exitcode
    )
    return start_worker(context, index)


def stop_workers(processes: list[BaseProcess]) -> None:
    """SIGTERM each worker (uvicorn then drains requests and flushes the log), then wait."""
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACEFUL_SHUTDOWN_SECONDS + 10
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            logger.error("worker pid %s did not stop in time; killing it", process.pid)
            process.kill()
            process.join()
        mark_dead(process.pid)


def mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def worker_main() -> None:
    """One worker process: bind the shared port with SO_REUSEPORT and run uvicorn on it."""
    import uvicorn

    # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which then sends
    # one SIGTERM (a second signal would make uvicorn skip the graceful drain).
    os.setpgrp()
    settings = get_settings()
    sock = make_socket(settings.host, settings.port)
    options = uvicorn_options(settings)
    del options["host"], options["port"]
    server = uvicorn.Server(uvicorn.Config(APP_FACTORY, factory=True, **options))
    server.run(sockets=[sock])
