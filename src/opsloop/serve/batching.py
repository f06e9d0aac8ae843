"""Dynamic micro-batching across concurrent requests inside one serving process.

Requests queue their rows; one worker task takes everything queued (up to `max_batch_size` rows),
optionally waits up to `max_wait_s` for more, runs the model once in a dedicated thread (ONNX
Runtime releases the GIL, so the event loop keeps parsing requests meanwhile; with no executor it
runs inline on the loop) and hands each request its own slice of the outputs. While one batch runs
the next one queues up, so batches grow with load without adding latency at low load.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
RunBatch = Callable[[Array], Sequence[Array]]
# Called after every batch with (rows, seconds inside the model).
BatchObserver = Callable[[int, float], None]


class BatcherClosedError(RuntimeError):
    """The batcher was closed (its model was replaced) before this request was queued."""


class Waiter(Protocol):
    """Who waits for a request's outputs: an asyncio future, or an object answering directly
    (the connection protocol's exchange, `wire`), which saves a future and a loop turn."""

    def done(self) -> bool: ...

    def set_result(self, result: tuple[Array, ...], /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True)
class _Pending:
    rows: Array
    future: Waiter


@dataclass
class MicroBatcher:
    """Gathers concurrent `predict` calls into batched `run_batch` calls."""

    run_batch: RunBatch
    executor: Executor | None
    max_batch_size: int = 32
    max_wait_s: float = 0.0
    observe: BatchObserver | None = None
    _queue: collections.deque[_Pending] = field(default_factory=collections.deque, init=False)
    _queued_rows: int = field(default=0, init=False)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _closing: bool = field(default=False, init=False)

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def predict(self, rows: Array) -> tuple[Array, ...]:
        """The model's outputs for `rows` (a batch of one or more examples), batched with others.

        Queuing happens before the first await, so a caller that just looked up the current
        model is guaranteed to be served by it even if the model is swapped right after.
        """
        return await self.submit(rows)

    def submit(self, rows: Array) -> asyncio.Future[tuple[Array, ...]]:
        """Queue `rows` now; the future of their outputs (for callers that need no coroutine)."""
        future: asyncio.Future[tuple[Array, ...]] = asyncio.get_running_loop().create_future()
        self.submit_to(rows, future)
        return future

    def submit_to(self, rows: Array, waiter: Waiter) -> None:
        """Queue `rows` now; `waiter` gets their outputs (or the batch's exception)."""
        if self._closing:
            raise BatcherClosedError("the model is being replaced; retry the request")
        self._queue.append(_Pending(rows, waiter))
        self._queued_rows += len(rows)
        self._wakeup.set()

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    @property
    def closed(self) -> bool:
        return self._closing

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s > 0 and self._queued_rows < self.max_batch_size:
                await self._wait_for_more(loop)
            batch = self._take_batch()
            await self._run(loop, batch)

    async def _wait_for_more(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = loop.time() + self.max_wait_s
        while self._queued_rows < self.max_batch_size and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        """Queued requests, oldest first, up to max_batch_size rows (always at least one)."""
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= self.max_batch_size:
            item = self._queue.popleft()
            rows += len(item.rows)
            batch.append(item)
        self._queued_rows -= rows
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        inputs = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        try:
            if self.executor is None:  # inline on the event loop
                outputs, seconds = _timed(self.run_batch, inputs)
            else:
                outputs, seconds = await loop.run_in_executor(
                    self.executor, _timed, self.run_batch, inputs
                )
        except Exception as exc:  # deliver the failure to every waiting request
            logger.exception("inference failed for a batch of %d rows", len(inputs))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        if self.observe is not None:
            self.observe(len(inputs), seconds)
        deliver(batch, outputs)


def _timed(run_batch: RunBatch, inputs: Array) -> tuple[Sequence[Array], float]:
    start = time.perf_counter()
    outputs = run_batch(inputs)
    return outputs, time.perf_counter() - start


def deliver(batch: Sequence[_Pending], outputs: Sequence[Array]) -> None:
    """Hand each request the rows of every output that belong to it."""
    start = 0
    for pending in batch:
        end = start + len(pending.rows)
        if not pending.future.done():  # a client that went away leaves a cancelled future
            pending.future.set_result(tuple([output[start:end] for output in outputs]))
        start = end
