"""``--exit-when-idle``'s decision, given what the consumer reports.

The consumer here is a stand-in: what is under test is riverline's reading of the
answers (an outage, a backlog past the position), not Kafka's. The same decision against
a real broker is in ``tests/integration/test_worker.py`` (positions, transaction
markers) and ``test_durability.py`` (a broker restart).
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

import worker.loop as loop_module
from tests.helpers import offline_worker

OFFSET_INVALID = -1001


class Consumer:
    """Answers as a consumer would: ``up`` says whether the broker answers; ``high``,
    ``position`` and ``committed`` are per partition."""

    def __init__(self, high: dict[int, int], position: dict[int, int]) -> None:
        self.up = True
        self.metadata_delay = 0.0
        self.high = high
        self.position_ = position
        self.committed_: dict[int, int] = {}

    def _check(self) -> None:
        if not self.up:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))

    def list_topics(self, topic: str, timeout: float) -> None:
        time.sleep(self.metadata_delay)
        self._check()

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self._check()
        return 0, self.high[tp.partition]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.position_.get(tp.partition, OFFSET_INVALID))
            for tp in tps
        ]

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self._check()
        return [
            TopicPartition(
                tp.topic, tp.partition, self.committed_.get(tp.partition, OFFSET_INVALID)
            )
            for tp in tps
        ]


def _worker(consumer: Consumer, partitions: int = 2, **options: str) -> Any:
    w = offline_worker(**options)
    w.consumer = consumer
    w.stats.learners = {
        p: SimpleNamespace(topic="clicks", partition=p, next_offset=None) for p in range(partitions)
    }
    return w


def test_caught_up_on_every_partition_is_the_end_of_the_input() -> None:
    w = _worker(Consumer(high={0: 10, 1: 7}, position={0: 10, 1: 7}))
    assert w._input_exhausted()


def test_events_past_the_position_of_a_partition_already_read_are_not_the_end() -> None:
    # The case a broker restart leaves: the broker answers, the producers' backlog is in
    # the log, but the fetcher is still in its reconnect backoff.
    c = Consumer(high={0: 10, 1: 9}, position={0: 10, 1: 7})
    w = _worker(c)
    assert not w._input_exhausted()
    c.position_[1] = 9
    assert w._input_exhausted()


def test_a_partition_not_read_yet_starts_at_its_committed_offset_or_the_reset_point() -> None:
    c = Consumer(high={0: 10, 1: 5}, position={0: 10})
    w = _worker(c)
    assert not w._input_exhausted()  # no commit, earliest: offsets 0-4 unread
    c.committed_[1] = 5
    assert w._input_exhausted()
    latest = _worker(Consumer(high={0: 10, 1: 5}, position={0: 10}), auto_offset_reset="latest")
    assert latest._input_exhausted()


def test_an_outage_is_not_the_end_and_idle_time_counts_again_from_the_brokers_return() -> None:
    c = Consumer(high={0: 10, 1: 7}, position={0: 10, 1: 7})
    w = _worker(c)
    c.up = False
    assert not w._input_exhausted()
    assert not w._input_exhausted()  # still down
    c.up = True
    # The first check that finds it back restarts the idle clock, even when caught up:
    # producers in their reconnect backoff have not delivered their backlog yet.
    assert not w._input_exhausted()
    assert w._input_exhausted()


def test_partitions_lost_and_not_given_back_are_not_the_end() -> None:
    w = _worker(Consumer(high={0: 10, 1: 7}, position={0: 10, 1: 7}))
    w._assigned_at, w._lost_at = 1.0, 2.0
    assert not w._input_exhausted()
    w._assigned_at = 3.0
    assert w._input_exhausted()


def test_the_consumer_reporting_all_brokers_down_since_the_last_event_adds_one_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An outage shorter than the idle limit: over before the check, which then finds the
    # broker answering and every partition caught up, while producers in their reconnect
    # backoff have not delivered yet.
    caplog.set_level(logging.INFO, logger="worker.loop")
    w = _worker(Consumer(high={0: 10, 1: 7}, position={0: 10, 1: 7}))
    last_event = time.monotonic()
    w._on_client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert not w._input_exhausted(since=last_event)
    assert "answers again" in caplog.text
    assert w._input_exhausted(since=time.monotonic())  # once: the next check may stop
    # Reported before the last event: events came after it, so it is not this silence's.
    w._on_client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert w._input_exhausted(since=time.monotonic())
    # One connection's error is not an outage (one broker of many, an idle connection
    # closed): the check itself finds out whether the partitions' leaders answer.
    before = time.monotonic()
    w._on_client_error(KafkaError(KafkaError._TRANSPORT, "disconnected"))
    w._on_client_error(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out"))
    assert w._input_exhausted(since=before)


def test_a_check_whose_metadata_request_waited_for_the_broker_adds_one_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check began during the outage and its metadata request was answered once the
    # broker came back: the seen-failing path never ran, but the outage was there.
    monkeypatch.setattr(loop_module, "SLOW_IDLE_CHECK", 0.5)
    c = Consumer(high={0: 10, 1: 7}, position={0: 10, 1: 7})
    w = _worker(c)
    c.metadata_delay = 0.6
    assert not w._input_exhausted()
    c.metadata_delay = 0.0
    assert w._input_exhausted()


def test_a_restored_partition_not_fetched_yet_starts_at_its_snapshot_not_the_commit() -> None:
    # Restored from a snapshot at offset 10 (the end of the partition) while the group's
    # committed offset lags (a commit lost in a crash): caught up, not 4 events behind.
    c = Consumer(high={0: 10, 1: 7}, position={1: 7})
    c.committed_[0] = 6
    w = _worker(c)
    w.stats.learners[0].next_offset = 10
    w.stats.learners[1].next_offset = 7
    assert w._input_exhausted()
    w.stats.learners[0].next_offset = 8  # the snapshot's offset is behind the end
    assert not w._input_exhausted()


def test_an_error_that_is_not_an_outage_keeps_the_worker_going_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.loop")  # (another test may raise it)
    c = Consumer(high={0: 10, 1: 7}, position={0: 10, 1: 7})
    w = _worker(c)

    def no_leader(tp: TopicPartition, timeout: float) -> tuple[int, int]:
        raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "unknown partition"))

    c.get_watermark_offsets = no_leader  # type: ignore[method-assign]
    assert not w._input_exhausted()
    assert "cannot tell whether the input is exhausted" in caplog.text
    del c.get_watermark_offsets  # the class's again
    assert w._input_exhausted()  # not taken for an outage: no extra wait
