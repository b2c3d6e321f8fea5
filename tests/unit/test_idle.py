"""``--exit-when-idle``'s decision, given what the consumer reports.

The consumer here is a stand-in: what is under test is riverline's reading of the
answers (an outage, a backlog past the position), not Kafka's. The same decision against
a real broker is in ``tests/integration/test_worker.py`` (positions, transaction
markers) and ``test_durability.py`` (a broker restart).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from tests.helpers import offline_worker

OFFSET_INVALID = -1001


class Consumer:
    """Answers as a consumer would: ``up`` says whether the broker answers; ``high``,
    ``position`` and ``committed`` are per partition."""

    def __init__(self, high: dict[int, int], position: dict[int, int]) -> None:
        self.up = True
        self.high = high
        self.position_ = position
        self.committed_: dict[int, int] = {}

    def _check(self) -> None:
        if not self.up:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))

    def list_topics(self, topic: str, timeout: float) -> None:
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
    w.stats.learners = {p: SimpleNamespace(topic="clicks", partition=p) for p in range(partitions)}
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
