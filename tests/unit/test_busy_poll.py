"""``--busy-poll-ms``: after a batch the loop polls without waiting, for a bounded time.

The consumer here is a stand-in that hands out messages on a schedule: what is under
test is the loop's polling (when it stops, what it counts), not Kafka's. A worker run
with the flag against a real broker is in ``tests/integration/test_worker.py``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers import offline_worker
from worker.busypoll import MAX_BACKOFF, BusyPoll
from worker.errors import ConfigError


class Consumer:
    """``consume(n, timeout=0)`` returns nothing until ``ready_at`` (monotonic), then
    ``messages`` once."""

    def __init__(self, ready_at: float, messages: list[Any]) -> None:
        self.ready_at = ready_at
        self.messages = messages
        self.calls = 0

    def consume(self, n: int, timeout: float) -> list[Any]:
        assert timeout == 0, "a busy poll never waits inside the client"
        self.calls += 1
        if time.monotonic() >= self.ready_at and self.messages:
            out, self.messages = self.messages[:n], self.messages[n:]
            return out
        return []


def _worker(consumer: Consumer, busy_poll_ms: str = "3") -> Any:
    w = offline_worker(busy_poll_ms=busy_poll_ms)
    w.consumer = consumer
    return w


def _window(until: float) -> BusyPoll:
    """A poller whose window (after a batch) lasts until ``until``."""
    bp = BusyPoll(window=0.003)
    bp.deadline = until
    return bp


def test_a_message_arriving_inside_the_window_is_returned_at_once() -> None:
    consumer = Consumer(ready_at=0, messages=["m1", "m2"])
    w = _worker(consumer)
    now = time.monotonic()
    consumer.ready_at = now + 0.01
    bp = _window(now + 0.5)
    got = w._busy_poll(bp)
    returned_at = time.monotonic()
    assert got == ["m1", "m2"]
    assert returned_at - (now + 0.01) < 0.2, "it kept polling after the message came"
    assert consumer.calls > 1
    assert 0.005 < w.stats.busy_poll_seconds < 0.25
    assert bp.deadline == 0.0, "one poll per batch"
    bp.after_batch(time.monotonic())
    assert bp.deadline, "a poll that caught its batch does not back off"


def test_the_poll_ends_empty_when_the_window_passes() -> None:
    consumer = Consumer(ready_at=time.monotonic() + 10, messages=["late"])
    w = _worker(consumer)
    now = time.monotonic()
    bp = _window(now + 0.03)
    got = w._busy_poll(bp)
    assert got == []
    assert time.monotonic() >= now + 0.03
    assert consumer.messages == ["late"], "nothing taken past the window"
    # The time spent is counted, wall and CPU, and the CPU is no more than the wall.
    assert 0.02 <= w.stats.busy_poll_seconds < 1.0
    assert 0 < w.stats.busy_poll_cpu_seconds <= w.stats.busy_poll_seconds + 0.01
    # The next batch waits at once (a backoff), the one after polls again.
    bp.after_batch(time.monotonic())
    assert bp.deadline == 0.0
    bp.after_batch(time.monotonic())
    assert bp.deadline > 0


def test_a_window_already_over_does_not_poll_or_count() -> None:
    consumer = Consumer(ready_at=0, messages=["m"])
    w = _worker(consumer)
    bp = _window(time.monotonic() - 1)
    assert w._busy_poll(bp) == []
    assert consumer.calls == 0
    assert w.stats.busy_poll_seconds == 0
    bp.after_batch(time.monotonic())
    assert bp.deadline > 0, "a window the iteration outlasted is no empty poll: no backoff"


def test_a_stop_request_ends_the_poll() -> None:
    consumer = Consumer(ready_at=time.monotonic() + 10, messages=["late"])
    w = _worker(consumer)
    w.request_stop()
    now = time.monotonic()
    assert w._busy_poll(_window(now + 5)) == []
    assert time.monotonic() - now < 1


def test_the_batch_size_bounds_what_one_poll_takes() -> None:
    consumer = Consumer(ready_at=0, messages=list(range(10)))
    w = offline_worker(busy_poll_ms="3", batch_size="4")
    w.consumer = consumer
    assert w._busy_poll(_window(time.monotonic() + 1)) == [0, 1, 2, 3]


def test_off_by_default_and_reported() -> None:
    w = offline_worker()
    assert w.settings.busy_poll_ms == 0
    report = w.report()
    assert report["busy_poll_seconds"] == 0 and report["busy_poll_cpu_seconds"] == 0


@pytest.mark.parametrize("value", ["-0.5", "51", "inf"])
def test_out_of_range_stops_at_start(value: str) -> None:
    with pytest.raises(ConfigError, match="--busy-poll-ms must be between 0"):
        offline_worker(busy_poll_ms=value)


def test_repeated_empty_polls_back_off_up_to_the_cap_and_a_hit_ends_it() -> None:
    """At a low rate every poll ends empty: the batches that wait at once double after
    each (1, 2, 4, ...) up to MAX_BACKOFF, so polling costs about a window per
    MAX_BACKOFF batches; one poll that catches its batch makes every batch poll again."""
    bp = BusyPoll(window=0.003)
    t, polls, batches = 0.0, 0, 0
    while batches < 20 * MAX_BACKOFF:
        t += 1.0
        bp.after_batch(t)
        batches += 1
        if bp.deadline:
            polls += 1
            bp.deadline = 0.0
            bp.missed()
    # 1 + 2 + 4 + ... + 64 batches for the first 7 misses, then 64 for each.
    assert polls <= 7 + 20
    assert polls >= 20 * MAX_BACKOFF // (MAX_BACKOFF + 1)
    bp.hit()
    skipped_before_next_poll = 0
    while True:
        t += 1.0
        bp.after_batch(t)
        if bp.deadline:
            break
        skipped_before_next_poll += 1
    assert skipped_before_next_poll <= MAX_BACKOFF  # the backoff already set runs out
    bp.hit()
    for _ in range(5):
        t += 1.0
        bp.after_batch(t)
        assert bp.deadline == t + 0.003
