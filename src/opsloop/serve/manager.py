"""Zero-downtime model reload: load and warm the new bundle aside, then swap one reference.

Requests look up `ModelManager.current` once and queue on that model's own batcher, so a swap
never changes the model under a request: whatever was queued on the old model finishes on it,
then the old batcher stops. Loading runs in a thread, so the event loop keeps serving the old
model meanwhile. A poller follows the source (bundle path or registry alias); a bundle that fails
to load leaves the current model serving and is reported.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from opsloop.errors import OpsloopError, redact_text
from opsloop.serve.batching import MicroBatcher
from opsloop.serve.metrics import ServeMetrics
from opsloop.serve.protocol import ModelSignature
from opsloop.serve.runtime import OnnxModel, SessionTuning, load_model
from opsloop.serve.source import ModelSource, fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """A loaded model with its own batcher, and the fingerprint of the bundle it came from."""

    model: OnnxModel
    batcher: MicroBatcher
    fingerprint: str
    signature: ModelSignature = field(init=False)  # the model's, read several times a request

    def __post_init__(self) -> None:
        object.__setattr__(self, "signature", self.model.signature)


@dataclass(frozen=True)
class ReloadOutcome:
    changed: bool
    version: str
    previous_version: str | None


@dataclass(frozen=True)
class BatchingLimits:
    max_batch_size: int = 32
    max_wait_s: float = 0.0


# A model whose largest batch runs faster than this runs on the event loop when
# OPSLOOP_INFERENCE_THREAD=auto: a thread hand-off costs tens of microseconds per batch.
AUTO_INLINE_S = 0.001


class ModelManager:
    """Owns the current model; loads, warms and swaps in new ones."""

    def __init__(
        self,
        source: ModelSource,
        *,
        executor: Executor | None,
        metrics: ServeMetrics,
        tuning: SessionTuning | None = None,
        limits: BatchingLimits | None = None,
        candidate: bool = False,
        inline_when_faster: bool = False,
    ) -> None:
        self.source = source
        # With `inline_when_faster`, a model whose full batch runs in under AUTO_INLINE_S at
        # warm-up runs on the event loop: its thread hand-off would cost more than it saves.
        self.inline_when_faster = inline_when_faster
        self.candidate = candidate  # the shadow/canary model, reported as such in the metrics
        self.executor = executor
        self.metrics = metrics
        self.tuning = tuning or SessionTuning()
        self.limits = limits or BatchingLimits()
        self.current: ServedModel | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def start(self, poll_seconds: float) -> None:
        """Load the first model (a failure leaves the server up but not ready) and start polling."""
        try:
            await self.reload(force=True)
        except OpsloopError as exc:
            logger.error(
                "no model loaded from %s: %s", self.source.describe(), redact_text(str(exc))
            )
        except Exception as exc:  # the server stays up (not ready) and the poller keeps trying
            self.last_error = redact_text(f"{type(exc).__name__}: {exc}")  # shown by /ready
            logger.exception("no model loaded from %s", self.source.describe())
        if poll_seconds > 0:
            self._poller = asyncio.create_task(self._poll(poll_seconds), name="model-poller")

    async def reload(self, *, force: bool = False) -> ReloadOutcome:
        """Swap in the source's current bundle if it changed (or always, with `force`)."""
        async with self._lock:
            try:
                return await self._reload(force)
            except OpsloopError as exc:
                self.last_error = redact_text(str(exc))  # shown by /v2/health/ready
                self.metrics.reloads.labels("failed").inc()
                raise

    async def _reload(self, force: bool) -> ReloadOutcome:
        bundle_dir = await asyncio.to_thread(self.source.locate)
        new_fingerprint = await asyncio.to_thread(fingerprint, bundle_dir)
        old = self.current
        if old is not None and not force and old.fingerprint == new_fingerprint:
            return ReloadOutcome(False, old.model.version, old.model.version)
        model, batch_seconds = await asyncio.to_thread(self._load_and_warm, bundle_dir)
        executor = self.executor
        if executor is not None and self.inline_when_faster and batch_seconds < AUTO_INLINE_S:
            executor = None
        logger.info(
            "a batch of %d takes %.2f ms: inference runs %s",
            self.limits.max_batch_size,
            batch_seconds * 1000,
            "on the event loop" if executor is None else "in its own thread",
        )
        batcher = MicroBatcher(
            model.serve_batch,
            executor,
            max_batch_size=self.limits.max_batch_size,
            max_wait_s=self.limits.max_wait_s,
            observe=self.metrics.observe_batch,
        )
        batcher.start()
        self.current = ServedModel(model, batcher, new_fingerprint)  # the atomic swap
        self.last_error = None
        previous = None if old is None else (old.signature.name, old.signature.version)
        self.metrics.model_loaded(
            model.signature.name, model.version, previous, candidate=self.candidate
        )
        logger.info(
            "serving %s v%s (was %s)",
            model.signature.name,
            model.version,
            "none" if old is None else f"v{old.model.version}",
        )
        if old is not None:
            await old.batcher.close()  # requests queued on the old model finish on it
        return ReloadOutcome(True, model.version, None if old is None else old.model.version)

    def _load_and_warm(self, bundle_dir: Path) -> tuple[OnnxModel, float]:
        model = load_model(bundle_dir, self.tuning)
        if model.bundle.manifest.quantization and self.limits.max_batch_size > 1:
            # Dynamic int8 quantizes activations with one scale per batch: a request's answer
            # then depends (~1e-3) on what it was batched with.
            logger.warning(
                "%s is dynamically quantized: batched probabilities differ slightly from "
                "unbatched ones; set OPSLOOP_MAX_BATCH_SIZE=1 if they must be identical",
                bundle_dir,
            )
        return model, model.warm(self.limits.max_batch_size)

    async def _poll(self, seconds: float) -> None:
        reported: str | None = None
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.reload()
                reported = None
            except OpsloopError as exc:
                if str(exc) != reported:  # say it once, not every poll
                    logger.warning("model reload from %s failed: %s", self.source.describe(), exc)
                    reported = str(exc)
            except Exception:  # keep polling whatever happens; the current model keeps serving
                logger.exception("model reload from %s crashed", self.source.describe())

    async def close(self) -> None:
        """Stop polling and finish every queued request."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.current is not None:
            await self.current.batcher.close()
