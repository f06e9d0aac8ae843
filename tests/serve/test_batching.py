"""Micro-batching across concurrent requests: batches form, results go back to their requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from opsloop.serve.batching import BatcherClosedError, MicroBatcher

pytestmark = pytest.mark.anyio

Array = npt.NDArray[Any]


class SlowDouble:
    """A 'model' that doubles its input and records every batch it is given."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, rows: Array) -> Sequence[Array]:
        self.gate.wait(5)
        self.batches.append(len(rows))
        time.sleep(self.seconds)
        return rows * 2, rows.sum(axis=1)


@pytest.fixture
def executor() -> Any:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def rows(value: float, count: int = 1) -> Array:
    return np.full((count, 3), value, dtype=np.float32)


async def test_concurrent_requests_share_batches_and_get_their_own_rows(executor: Any) -> None:
    model = SlowDouble()
    observed: list[tuple[int, float]] = []
    batcher = MicroBatcher(
        model, executor, max_batch_size=8, observe=lambda n, s: observed.append((n, s))
    )
    batcher.start()
    results = await asyncio.gather(*(batcher.predict(rows(i, 1 + i % 2)) for i in range(20)))
    await batcher.close()
    for i, (doubled, summed) in enumerate(results):
        np.testing.assert_array_equal(doubled, rows(i, 1 + i % 2) * 2)
        np.testing.assert_array_equal(summed, np.full(1 + i % 2, 3 * i, dtype=np.float32))
    assert sum(model.batches) == sum(1 + i % 2 for i in range(20))
    assert max(model.batches) > 1
    assert max(model.batches) <= 8
    assert [n for n, _ in observed] == model.batches
    assert all(seconds >= model.seconds * 0.5 for _, seconds in observed)


async def test_max_wait_gathers_requests_that_arrive_a_little_later(executor: Any) -> None:
    model = SlowDouble(seconds=0.0)
    batcher = MicroBatcher(model, executor, max_batch_size=4, max_wait_s=0.5)
    batcher.start()

    async def late(value: float, delay: float) -> Any:
        await asyncio.sleep(delay)
        return await batcher.predict(rows(value))

    started = time.perf_counter()
    await asyncio.gather(*(late(i, 0.01 * i) for i in range(4)))
    elapsed = time.perf_counter() - started
    await batcher.close()
    assert model.batches == [4]  # full before the wait ran out
    assert elapsed < 0.45


async def test_a_request_larger_than_the_batch_limit_runs_alone(executor: Any) -> None:
    model = SlowDouble(seconds=0.0)
    batcher = MicroBatcher(model, executor, max_batch_size=4)
    batcher.start()
    doubled, _ = await batcher.predict(rows(1.0, count=10))
    await batcher.close()
    assert model.batches == [10]
    assert doubled.shape == (10, 3)


async def test_a_failing_batch_fails_each_of_its_requests(executor: Any) -> None:
    def broken(_rows: Array) -> Sequence[Array]:
        raise RuntimeError("onnxruntime exploded")

    batcher = MicroBatcher(broken, executor)
    batcher.start()
    outcomes = await asyncio.gather(
        *(batcher.predict(rows(i)) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    # ...and the batcher keeps working for the next requests.
    batcher.run_batch = lambda r: (r,)
    (result,) = await batcher.predict(rows(5.0))
    await batcher.close()
    np.testing.assert_array_equal(result, rows(5.0))


async def test_close_finishes_queued_requests_then_refuses_new_ones(executor: Any) -> None:
    model = SlowDouble(seconds=0.0)
    model.gate.clear()  # hold the first batch so the others queue up behind it
    batcher = MicroBatcher(model, executor, max_batch_size=2)
    batcher.start()
    pending = [asyncio.ensure_future(batcher.predict(rows(i))) for i in range(5)]
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.01)
    model.gate.set()
    await closing
    assert [float(p.result()[0][0, 0]) for p in pending] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert batcher.closed
    with pytest.raises(BatcherClosedError, match="being replaced"):
        await batcher.predict(rows(1.0))


async def test_a_cancelled_request_does_not_disturb_the_others(executor: Any) -> None:
    model = SlowDouble(seconds=0.05)
    batcher = MicroBatcher(model, executor, max_batch_size=8)
    batcher.start()
    first = asyncio.ensure_future(batcher.predict(rows(1.0)))
    await asyncio.sleep(0.01)  # the first batch is running; these two queue together
    gone = asyncio.ensure_future(batcher.predict(rows(2.0)))
    kept = asyncio.ensure_future(batcher.predict(rows(3.0)))
    await asyncio.sleep(0)
    gone.cancel()
    result = await kept
    await first
    await batcher.close()
    np.testing.assert_array_equal(result[0], rows(6.0))


async def test_without_an_executor_batches_run_inline_on_the_loop() -> None:
    model = SlowDouble(seconds=0.0)
    batcher = MicroBatcher(model, None, max_batch_size=8)
    batcher.start()
    results = await asyncio.gather(*(batcher.predict(rows(i)) for i in range(5)))
    await batcher.close()
    assert [float(r[0][0, 0]) for r in results] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert model.batches == [5]  # all were queued before the worker task first ran
