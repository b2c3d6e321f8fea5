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


def test_a_message_arriving_inside_the_window_is_returned_at_once() -> None:
    now = time.monotonic()
    consumer = Consumer(ready_at=now + 0.01, messages=["m1", "m2"])
    w = _worker(consumer)
    got = w._busy_poll(until=now + 0.5)
    returned_at = time.monotonic()
    assert got == ["m1", "m2"]
    assert returned_at - (now + 0.01) < 0.2, "it kept polling after the message came"
    assert consumer.calls > 1
    assert 0.005 < w.stats.busy_poll_seconds < 0.25


def test_the_poll_ends_empty_when_the_window_passes() -> None:
    now = time.monotonic()
    consumer = Consumer(ready_at=now + 10, messages=["late"])
    w = _worker(consumer)
    got = w._busy_poll(until=now + 0.03)
    assert got == []
    assert time.monotonic() >= now + 0.03
    assert consumer.messages == ["late"], "nothing taken past the window"
    # The time spent is counted, wall and CPU, and the CPU is no more than the wall.
    assert 0.02 <= w.stats.busy_poll_seconds < 1.0
    assert 0 < w.stats.busy_poll_cpu_seconds <= w.stats.busy_poll_seconds + 0.01


def test_a_window_already_over_does_not_poll_or_count() -> None:
    consumer = Consumer(ready_at=0, messages=["m"])
    w = _worker(consumer)
    assert w._busy_poll(until=time.monotonic() - 1) == []
    assert consumer.calls == 0
    assert w.stats.busy_poll_seconds == 0


def test_a_stop_request_ends_the_poll() -> None:
    now = time.monotonic()
    consumer = Consumer(ready_at=now + 10, messages=["late"])
    w = _worker(consumer)
    w.request_stop()
    assert w._busy_poll(until=now + 5) == []
    assert time.monotonic() - now < 1


def test_the_batch_size_bounds_what_one_poll_takes() -> None:
    consumer = Consumer(ready_at=0, messages=list(range(10)))
    w = offline_worker(busy_poll_ms="3", batch_size="4")
    w.consumer = consumer
    assert w._busy_poll(until=time.monotonic() + 1) == [0, 1, 2, 3]


def test_off_by_default_and_reported() -> None:
    w = offline_worker()
    assert w.settings.busy_poll_ms == 0
    report = w.report()
    assert report["busy_poll_seconds"] == 0 and report["busy_poll_cpu_seconds"] == 0


@pytest.mark.parametrize("value", ["-0.5", "51", "inf"])
def test_out_of_range_stops_at_start(value: str) -> None:
    with pytest.raises(ConfigError, match="--busy-poll-ms must be between 0"):
        offline_worker(busy_poll_ms=value)
