"""At-least-once checkpoints: the offsets move only after the snapshots are acknowledged.

The loop writes a checkpoint's snapshots through a producer of their own and goes on;
the offsets are committed at a later turn, once that producer has nothing left in
flight. Checked here with stand-ins that hold the acknowledgements back until told:
this is riverline's own ordering, not Kafka's behaviour (the integration tests kill
workers mid-run against a real broker and count every event).
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from tests.helpers import offline_worker
from worker.learner import PartitionLearner
from worker.loop import Worker
from worker.models import make_model


class PredictionProducer:
    """The predictions' producer: everything is acknowledged at a flush."""

    def __init__(self) -> None:
        self.flushes = 0

    def produce(self, *_: Any, **__: Any) -> None:
        raise AssertionError("snapshots must not go through the predictions' producer")

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        return 0

    def poll(self, timeout: float) -> int:
        return 0


class HeldBackProducer:
    """The snapshots' producer: records stay unacknowledged until ``ack()`` or a flush."""

    def __init__(self) -> None:
        self.produced: list[tuple[bytes | None, int]] = []  # (key, flushes before it)
        self.in_flight = 0
        self.flushes = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **_: Any) -> None:
        self.produced.append((key, self.flushes))
        self.in_flight += 1

    def ack(self) -> None:
        self.in_flight = 0

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        self.in_flight = 0
        return 0

    def poll(self, timeout: float) -> int:
        return 0

    def __len__(self) -> int:
        return self.in_flight


class CommittingConsumer:
    def __init__(self) -> None:
        self.commits: list[tuple[list[tuple[int, int]], bool]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> Any:
        self.commits.append(([(tp.partition, tp.offset) for tp in offsets], asynchronous))
        return None if asynchronous else offsets


def _worker() -> tuple[Worker, PartitionLearner, HeldBackProducer, CommittingConsumer]:
    worker = offline_worker()
    worker.producer = PredictionProducer()  # type: ignore[assignment]
    snapshots = HeldBackProducer()
    worker.snapshot_producer = snapshots  # type: ignore[assignment]
    consumer = CommittingConsumer()
    worker.consumer = consumer  # type: ignore[assignment]
    learner = PartitionLearner("clicks", 0, make_model("logreg"))
    worker.stats.learners[0] = learner
    return worker, learner, snapshots, consumer


def test_offsets_are_committed_once_the_snapshot_is_acknowledged() -> None:
    worker, learner, snapshots, consumer = _worker()
    learner.next_offset = 50
    worker._checkpoint(wait_for_commit=False)
    assert worker.producer.flushes == 1  # type: ignore[union-attr]  # predictions first
    assert snapshots.produced and snapshots.in_flight  # written, not yet acknowledged
    assert learner.snapshot_offset == 50  # not written again by the next checkpoint
    assert consumer.commits == [] and worker.stats.commits == 0
    assert 0 not in worker._committed  # not a rewind point yet

    worker._settle_checkpoint(wait=False)  # a turn of the loop: still in flight
    assert consumer.commits == []

    snapshots.ack()
    worker._settle_checkpoint(wait=False)
    assert consumer.commits == [([(0, 50)], True)]
    assert worker.stats.commits == 1 and worker._committed[0][1] == 50
    assert learner.snapshot_at is not None
    worker._settle_checkpoint(wait=False)
    assert len(consumer.commits) == 1  # settled once


def test_a_checkpoint_that_must_finish_waits_for_the_acknowledgement() -> None:
    worker, learner, snapshots, consumer = _worker()
    learner.next_offset = 80
    worker._checkpoint()  # a revocation or the shutdown
    assert snapshots.flushes == 1 and snapshots.in_flight == 0
    assert consumer.commits == [([(0, 80)], False)]
    assert learner.committed_offset == 80


def test_checkpoints_settle_in_order() -> None:
    worker, learner, snapshots, consumer = _worker()
    learner.next_offset = 100
    worker._checkpoint(wait_for_commit=False)
    first = len(snapshots.produced)
    learner.next_offset = 120
    worker._checkpoint(wait_for_commit=False)  # the first one is still in flight
    # The first was waited for and committed before the second's records were written.
    assert consumer.commits[0] == ([(0, 100)], True)
    assert all(flushes == 1 for _, flushes in snapshots.produced[first:])
    snapshots.ack()
    worker._settle_checkpoint(wait=False)
    assert consumer.commits == [([(0, 100)], True), ([(0, 120)], True)]

    # Nothing new since: a periodic checkpoint writes nothing and commits nothing.
    produced = len(snapshots.produced)
    worker._checkpoint(wait_for_commit=False)
    assert len(snapshots.produced) == produced and len(consumer.commits) == 2


def test_a_partition_lost_meanwhile_is_not_committed() -> None:
    worker, learner, snapshots, consumer = _worker()
    learner.next_offset = 30
    worker._checkpoint(wait_for_commit=False)
    worker._drop(0)  # lost: another member owns it now
    snapshots.ack()
    worker._settle_checkpoint(wait=False)
    assert consumer.commits == [] and 0 not in worker._committed
    assert worker._unsettled is None
