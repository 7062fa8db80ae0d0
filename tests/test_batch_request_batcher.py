"""RequestBatcher: groups concurrent requests (max batch size, max wait), splits results."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from actors.request_batcher import RequestBatcher


class _Recorder:
    """Batch handler that doubles numbers and remembers every batch it was given."""

    def __init__(self, delay_s: float = 0.0, fail_on=None):
        self.batches: list[tuple] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, key, payloads):
        self.threads.add(threading.current_thread().name)
        self.batches.append((key, [list(p) for p in payloads]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and any(self.fail_on in p for p in payloads):
            raise RuntimeError(f"cannot score {self.fail_on}")
        return [[2 * x for x in p] for p in payloads]


def _run(coro):
    return asyncio.run(coro)


def test_full_batch_runs_without_waiting_and_results_go_back_in_order():
    handler = _Recorder()

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=6, max_wait_s=10.0)
        started = time.monotonic()
        results = await asyncio.gather(*[
            batcher.submit("embed", [i, i + 100], size=2) for i in range(3)])
        return results, time.monotonic() - started, batcher

    results, elapsed, batcher = _run(main())
    assert results == [[0, 200], [2, 202], [4, 204]]
    assert elapsed < 5.0  # full at 6 items: did not wait for max_wait_s
    assert handler.batches == [("embed", [[0, 100], [1, 101], [2, 102]])]
    stats = batcher.stats["embed"].as_dict()
    assert stats["batches"] == 1 and stats["requests"] == 3 and stats["items"] == 6
    assert stats["max_requests_per_batch"] == 3
    assert all(name.startswith("batch-handler") for name in handler.threads)


def test_partial_batch_waits_at_most_max_wait_and_keys_are_separate():
    handler = _Recorder()

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=100, max_wait_s=0.05)
        started = time.monotonic()
        a, b = await asyncio.gather(batcher.submit("a", [1]), batcher.submit("b", [2]))
        return a, b, time.monotonic() - started

    a, b, elapsed = _run(main())
    assert (a, b) == ([2], [4])
    assert 0.04 <= elapsed < 2.0
    assert sorted(key for key, _ in handler.batches) == ["a", "b"]


def test_oversized_group_is_split_at_max_batch_size_and_requests_queue_while_busy():
    handler = _Recorder(delay_s=0.05)

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=4, max_wait_s=0.01)
        first = [asyncio.ensure_future(batcher.submit("k", [i, i], size=2)) for i in range(5)]
        await asyncio.sleep(0.02)  # the first batch is running now
        later = [asyncio.ensure_future(batcher.submit("k", [9], size=1)) for _ in range(2)]
        return await asyncio.gather(*first, *later)

    results = _run(main())
    assert results[:5] == [[2 * i, 2 * i] for i in range(5)]
    assert results[5:] == [[18], [18]]
    sizes = [sum(len(p) for p in payloads) for _, payloads in handler.batches]
    assert max(sizes) <= 4
    assert sum(sizes) == 12


def test_a_failing_batch_fails_its_requests_only():
    handler = _Recorder(fail_on=13)

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=2, max_wait_s=0.01)
        bad = asyncio.gather(batcher.submit("k", [13]), batcher.submit("k", [1]),
                             return_exceptions=True)
        bad_results = await bad
        good = await batcher.submit("k", [5])
        return bad_results, good, batcher

    bad_results, good, batcher = _run(main())
    assert all(isinstance(r, RuntimeError) and "13" in str(r) for r in bad_results)
    assert good == [10]
    assert batcher.stats["k"].failed_batches == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        RequestBatcher(lambda k, p: p, max_batch_size=0, max_wait_s=0.1)
    with pytest.raises(ValueError, match="max_wait_s"):
        RequestBatcher(lambda k, p: p, max_batch_size=1, max_wait_s=-1)


def test_requests_that_together_pass_the_limit_are_served_together():
    """Two shots of 3 frames with a limit of 4: the second fills the batch, both run at
    once (requests are not split and nobody waits for max_wait_s)."""
    handler = _Recorder()

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=4, max_wait_s=10.0)
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit("k", [1, 2, 3], size=3))
        await asyncio.sleep(0.05)
        second = await batcher.submit("k", [4, 5, 6], size=3)
        return await first, second, time.monotonic() - started

    first, second, elapsed = _run(main())
    assert (first, second) == ([2, 4, 6], [8, 10, 12])
    assert elapsed < 5.0
    assert handler.batches == [("k", [[1, 2, 3], [4, 5, 6]])]


def test_a_batch_runs_as_soon_as_every_expected_client_is_waiting():
    """Two story workers send to this actor: once both have a request queued nobody else
    can join, so the batch runs without waiting the 10 s max wait; a lone client's request
    waits (the other may still come) and runs alone at max_wait_s."""
    handler = _Recorder()

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=100, max_wait_s=10.0,
                                 expected_clients=2)
        started = time.monotonic()
        first = asyncio.ensure_future(batcher.submit("k", [1], client="worker-0"))
        await asyncio.sleep(0.05)
        assert not first.done()  # worker-1 may still come: keep waiting
        # the same client again does not count twice
        again = asyncio.ensure_future(batcher.submit("k", [2], client="worker-0"))
        await asyncio.sleep(0.05)
        assert not first.done() and not again.done()
        second = await batcher.submit("k", [3], client="worker-1")
        together = time.monotonic() - started
        lone = RequestBatcher(handler, max_batch_size=100, max_wait_s=0.2, expected_clients=2)
        lone_started = time.monotonic()
        alone = await lone.submit("k", [4], client="worker-0")
        return (await first, await again, second, together, alone,
                time.monotonic() - lone_started)

    first, again, second, together, alone, lone_elapsed = _run(main())
    assert (first, again, second, alone) == ([2], [4], [6], [8])
    assert together < 5.0
    assert lone_elapsed >= 0.19
    assert handler.batches[0] == ("k", [[1], [2], [3]])


def test_one_expected_client_never_waits_and_anonymous_requests_keep_the_max_wait():
    handler = _Recorder()

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=100, max_wait_s=10.0,
                                 expected_clients=1)
        started = time.monotonic()
        named = await batcher.submit("k", [1], client="worker-0")
        named_elapsed = time.monotonic() - started
        anonymous = asyncio.ensure_future(batcher.submit("k", [2]))
        await asyncio.sleep(0.1)
        waited = not anonymous.done()
        await batcher.submit("k", [3], client="worker-0")  # the worker's request frees both
        return named, named_elapsed, waited, await anonymous

    named, named_elapsed, waited, anonymous = _run(main())
    assert named == [2] and named_elapsed < 5.0
    assert waited and anonymous == [4]
    with pytest.raises(ValueError, match="expected_clients"):
        RequestBatcher(handler, max_batch_size=1, max_wait_s=0.1, expected_clients=0)


def test_fewer_expected_clients_release_a_waiting_batch():
    """A worker is gone for good: the driver lowers the count and the request of the one
    still running stops waiting for it."""
    handler = _Recorder()

    async def main():
        batcher = RequestBatcher(handler, max_batch_size=100, max_wait_s=10.0,
                                 expected_clients=2)
        started = time.monotonic()
        pending = asyncio.ensure_future(batcher.submit("k", [1], client="worker-0"))
        await asyncio.sleep(0.05)
        assert not pending.done()
        batcher.set_expected_clients(1)
        return await pending, time.monotonic() - started

    result, elapsed = _run(main())
    assert result == [2] and elapsed < 5.0
