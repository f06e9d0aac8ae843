"""Traffic simulator: replay held-out images, clean then corrupted, against a running server.

`opsloop simulate --clean 200 --corrupted 200 --corruption gaussian_noise --severity 3 --rate 50`
sends the bundle's held-out images (the dataset's test split, or the bundle's reference sample
when the dataset is not there) to `/v2/models/{name}/infer` at a steady rate, so that the drift
monitor sees clean traffic turn into shifted traffic. Bounded in count and time; loopback targets
only unless told otherwise. Torch-free (numpy, scipy and httpx).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from opsloop.bundle import Bundle, load_bundle
from opsloop.corruption import get_corruption
from opsloop.errors import ConfigError, DataError, OpsloopError

logger = logging.getLogger(__name__)

MAX_REQUESTS = 1_000_000
MAX_RATE = 10_000.0
DEFAULT_MAX_SECONDS = 600.0
CONNECT_ATTEMPTS = 3


class TrafficError(OpsloopError):
    """The target server cannot be reached, or refuses the simulator's requests."""


@dataclass(frozen=True)
class TrafficPlan:
    """What to send: `clean` then `corrupted` requests of `batch` images at `rate` per second."""

    url: str
    model_name: str | None  # None: the bundle's model name
    clean: int
    corrupted: int
    corruption: str = "gaussian_noise"
    severity: int = 3
    rate: float = 20.0
    batch: int = 1
    max_seconds: float = DEFAULT_MAX_SECONDS
    seed: int = 0
    allow_remote: bool = False

    def check(self) -> None:
        """Refuse a plan that is unbounded, malformed or aimed off this machine."""
        if self.clean < 0 or self.corrupted < 0 or self.clean + self.corrupted == 0:
            raise ConfigError(
                f"--clean {self.clean} and --corrupted {self.corrupted} must be non-negative and "
                "not both 0"
            )
        if self.clean + self.corrupted > MAX_REQUESTS:
            raise ConfigError(f"at most {MAX_REQUESTS} requests per run; lower --clean/--corrupted")
        if not 0 < self.rate <= MAX_RATE:
            raise ConfigError(f"--rate {self.rate} must lie in (0, {MAX_RATE:g}] requests/second")
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch} must be at least 1")
        if not self.max_seconds > 0:
            raise ConfigError(f"--max-seconds {self.max_seconds} must be positive")
        if self.corrupted:
            get_corruption(self.corruption).level(self.severity)  # names the valid choices
        check_target(self.url, allow_remote=self.allow_remote)


def check_target(url: str, *, allow_remote: bool = False) -> str:
    """The URL without a trailing slash; a ConfigError unless it is http(s) on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r} must be an http(s) URL, e.g. http://127.0.0.1:8000")
    if not allow_remote and not is_loopback(parts.hostname):
        raise ConfigError(
            f"--url {url!r} is not on this machine; the simulator sends only to loopback "
            "(127.0.0.1, ::1, localhost) unless --allow-remote is given"
        )
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class PhaseResult:
    """One phase's outcome: requests and images sent, answered 200, failed."""

    name: str
    requests: int = 0
    images: int = 0
    ok: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: requests, images, answered and failed (with their statuses)."""
        text = (
            f"{self.requests} requests ({self.images} images), {self.ok} ok, {self.failed} failed"
        )
        if self.failed:
            text += f" (statuses {', '.join(f'{k}: {v}' for k, v in self.statuses.items())})"
        return text


@dataclass
class TrafficResult:
    """What a run sent, how fast, and whether it stopped early at the time limit."""

    phases: list[PhaseResult]
    seconds: float
    stopped_early: bool

    @property
    def requests(self) -> int:
        return sum(phase.requests for phase in self.phases)

    @property
    def failed(self) -> int:
        return sum(phase.failed for phase in self.phases)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def held_out_images(bundle: Bundle, data_dir: Path | None) -> tuple[npt.NDArray[Any], str]:
    """The test split of `data_dir` if it exists, else the bundle's reference images."""
    if data_dir is not None and (data_dir / "manifest.json").is_file():
        from opsloop.data import load_split

        images = load_split(data_dir, "test").images
        expected = tuple(bundle.manifest.input.shape[1:])
        if tuple(images.shape[1:]) != expected:
            raise DataError(
                f"the test split of {data_dir} holds images shaped {images.shape[1:]} but model "
                f"{bundle.manifest.model_name} takes {expected}; pass --data for its dataset"
            )
        return images, f"test split of {data_dir}"
    arrays = bundle.load_reference()
    if "images" not in arrays or len(arrays["images"]) == 0:
        raise DataError(
            f"no dataset at {data_dir} and bundle {bundle.path} has no reference images; run "
            "`opsloop data` or pass --data"
        )
    logger.info("no dataset at %s; replaying the bundle's reference images", data_dir)
    return arrays["images"], f"reference sample of {bundle.path}"


def infer_body(pixels: npt.NDArray[Any], request_id: str, input_name: str) -> bytes:
    """An Open Inference Protocol (V2) request for one batch of pixels."""
    return orjson.dumps(
        {
            "id": request_id,
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "data": pixels.astype(np.float32).ravel().tolist(),
                }
            ],
        }
    )


def build_batches(
    images: npt.NDArray[Any], plan: TrafficPlan, pixel_max: float
) -> list[tuple[str, npt.NDArray[Any]]]:
    """(phase, batch) for every request: clean batches first, then corrupted ones.

    Each phase walks a fresh seeded permutation (reshuffled when it runs out), so a window of
    fewer images than the split holds never repeats one.
    """
    rng = np.random.default_rng(plan.seed)
    batches: list[tuple[str, npt.NDArray[Any]]] = []
    for phase, count in (("clean", plan.clean), ("corrupted", plan.corrupted)):
        needed = count * plan.batch
        order = np.concatenate(
            [rng.permutation(len(images)) for _ in range(-(-needed // len(images)) or 1)]
        )[:needed]
        chosen = images[order]
        if phase == "corrupted" and needed:
            corruption = get_corruption(plan.corruption)
            chosen = corruption(chosen, plan.severity, pixel_max=pixel_max, rng=rng)
        batches += [(phase, chosen[i : i + plan.batch]) for i in range(0, needed, plan.batch)]
    return batches


def simulate_traffic(
    plan: TrafficPlan,
    images: npt.NDArray[Any],
    pixel_max: float,
    *,
    input_name: str,
) -> TrafficResult:
    """Send the plan's requests at its rate; stop at `max_seconds`. Non-200 answers are counted."""
    plan.check()
    if not plan.model_name:
        raise ConfigError("no model name to send to; pass --model (or --bundle)")
    base = check_target(plan.url, allow_remote=plan.allow_remote)
    batches = build_batches(images, plan, pixel_max)
    phases = {name: PhaseResult(name) for name in ("clean", "corrupted")}
    path = f"{base}/v2/models/{plan.model_name}/infer"
    started = time.monotonic()
    stopped_early = False
    with httpx.Client(timeout=30.0, headers={"content-type": "application/json"}) as client:
        wait_until_ready(client, base, plan.model_name)
        for index, (phase, pixels) in enumerate(batches):
            due = started + index / plan.rate
            now = time.monotonic()
            if now - started > plan.max_seconds or due - started > plan.max_seconds:
                stopped_early = True
                logger.warning(
                    "stopping at the %gs limit after %d of %d requests",
                    plan.max_seconds,
                    index,
                    len(batches),
                )
                break
            if due > now:
                time.sleep(due - now)
            status = send(client, path, infer_body(pixels, f"sim-{phase}-{index}", input_name))
            result = phases[phase]
            result.requests += 1
            result.images += len(pixels)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.ok += 1
            else:
                result.failed += 1
    seconds = time.monotonic() - started
    outcome = TrafficResult([p for p in phases.values() if p.requests], seconds, stopped_early)
    logger.info(
        "sent %d requests in %.1fs (%.1f/s), %d failed",
        outcome.requests,
        seconds,
        outcome.rate,
        outcome.failed,
    )
    return outcome


def wait_until_ready(client: httpx.Client, base: str, model_name: str) -> None:
    """Fail early, with the fix, when the server is down or serves another model."""
    url = f"{base}/v2/models/{model_name}/ready"
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            response = client.get(url)
        except httpx.TransportError as exc:
            if attempt + 1 == CONNECT_ATTEMPTS:
                raise TrafficError(
                    f"cannot reach {base}: {exc}; start `opsloop serve` or fix --url"
                ) from exc
            time.sleep(1.0)
            continue
        if response.status_code == 200:
            return
        raise TrafficError(
            f"{url} answered {response.status_code}: {response.text.strip()[:200]}; check "
            "--model and that the server has loaded it"
        )


def send(client: httpx.Client, url: str, body: bytes) -> int:
    """POST one request; its status, or 0 when the connection failed (counted, not raised)."""
    try:
        return client.post(url, content=body).status_code
    except httpx.TransportError as exc:
        logger.warning("request failed: %s", exc)
        return 0


def replay_sources(
    bundle_dir: Path | None, data_dir: Path | None, overrides: Sequence[str] = ()
) -> tuple[Bundle, Path]:
    """The bundle and the processed dataset to replay: the arguments, else the workspace's
    champion bundle and the config's dataset (from the config that `overrides` compose)."""
    if bundle_dir is None or data_dir is None:
        from opsloop.config import load_config
        from opsloop.data import dataset_dir
        from opsloop.workspace import Workspace

        cfg = load_config(overrides)
        registry = cfg.registry
        workspace = Workspace(Path(cfg.workspace))
        bundle_dir = bundle_dir or workspace.served_bundle(registry.bundle_dir, registry.model_name)
        data_dir = data_dir or dataset_dir(cfg.data)
    return load_bundle(bundle_dir), data_dir


def run_simulation(
    plan: TrafficPlan,
    bundle_dir: Path | None,
    data_dir: Path | None,
    overrides: Sequence[str] = (),
) -> tuple[TrafficResult, str]:
    """Load the held-out images for the bundle and run `plan`; the result and the image source.

    An unset bundle is the champion's bundle in the workspace and an unset dataset the config's
    processed dataset, both from the config that `overrides` compose.
    """
    bundle, data_dir = replay_sources(bundle_dir, data_dir, overrides)
    images, source = held_out_images(bundle, data_dir)
    if plan.model_name is None:
        plan = dataclasses.replace(plan, model_name=bundle.manifest.model_name)
    manifest = bundle.manifest
    outcome = simulate_traffic(
        plan, images, manifest.preprocessing.pixel_max, input_name=manifest.input.name
    )
    return outcome, source
