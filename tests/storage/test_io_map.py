"""``io_map``: the concurrent map every batch of reads goes through (workers taking items in turn)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from shardstore.storage import io_map
from shardstore.storage.base import _READ_THREADS, io_pool


@pytest.mark.parametrize("count", [0, 1, 2, 17, 500])
def test_results_come_back_in_item_order(count):
    rng = random.Random(count)
    items = [rng.randrange(10**6) for _ in range(count)]
    assert io_map(lambda x: x * 7, items) == [x * 7 for x in items]


def test_a_few_pool_tasks_serve_many_items(monkeypatch):
    """Not a future per item: a thousand small reads would spend more on hand-offs than on reading."""
    pool = io_pool()
    submitted: list[object] = []
    real = pool.submit
    monkeypatch.setattr(pool, "submit", lambda fn, *a: submitted.append(fn) or real(fn, *a))
    assert io_map(lambda x: -x, list(range(1000))) == [-x for x in range(1000)]
    assert 0 < len(submitted) < _READ_THREADS


def test_items_run_concurrently():
    """Four items that each wait for the other three finish only if four run at once."""
    meet = threading.Barrier(4, timeout=10)
    assert io_map(lambda i: meet.wait() is not None, range(4)) == [True] * 4


def test_the_first_failing_item_in_order_is_raised():
    """Item 3 fails late, item 9 at once: item 3's error is the one raised, as a plain map would."""

    def fn(i: int) -> int:
        if i == 3:
            time.sleep(0.05)
            raise KeyError("item 3")
        if i == 9:
            raise ValueError("item 9")
        return i

    with pytest.raises(KeyError, match="item 3"):
        io_map(fn, list(range(20)))


def test_no_new_item_is_taken_after_a_failure():
    ran: list[int] = []

    def fn(i: int) -> None:
        ran.append(i)
        if i == 0:
            raise RuntimeError("stop")
        time.sleep(0.01)

    with pytest.raises(RuntimeError):
        io_map(fn, list(range(1000)))
    assert len(ran) < 100  # the workers in flight finish their item, and take no other


def test_callers_on_a_busy_pool_do_not_wait_for_it():
    """Every pool thread calling io_map at once (a pool worker reading many ranges): each caller works
    through its items itself rather than waiting for helpers the busy pool never starts."""
    started = threading.Barrier(_READ_THREADS, timeout=10)

    def caller(k: int) -> list[int]:
        started.wait()  # every pool thread is now busy in a caller
        return io_map(lambda x: x + k, list(range(50)))

    futures = [io_pool().submit(caller, k) for k in range(_READ_THREADS)]
    assert [f.result(timeout=30) for f in futures] == [[x + k for x in range(50)] for k in range(_READ_THREADS)]
