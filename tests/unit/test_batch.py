"""The loop hands a poll batch's predictions to the producer after the batch, or after
each chunk of a long batch (about ``PUBLISH_AFTER`` of work: a backlog's first events
do not wait for its last).

What is checked here is riverline's own bookkeeping around that hand-off, with a recording
producer: the order, that an error in the middle of a batch still hands over every
prediction of an event counted as processed (so a checkpoint never commits an offset
whose prediction the producer never got), and that an aborted transaction hands over
none. Kafka's side (delivery, transactions, offsets) is tested against a real broker in
``tests/integration``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from confluent_kafka import Message, TopicPartition

from tests.helpers import offline_worker
from worker import loop
from worker.events import ClickEvent, Prediction
from worker.learner import ModelError, PartitionLearner
from worker.loop import MIN_PUBLISH_EVERY, PUBLISH_AFTER, Worker
from worker.models import make_model
from worker.simulate import SimulationConfig, generate

TOPIC = "clicks"


class RecordingProducer:
    """Records what the loop hands over, and what happened in which order; a
    transaction is a flag."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None, bytes | None]] = []
        self.aborted = 0
        self.log: list[tuple[str, int]] = []  # ("produce", offset) or ("abort", 0)

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **_: Any) -> None:
        self.produced.append((topic, value, key))
        self.log.append(("produce", orjson.loads(value or b"")["offset"]))

    def abort_transaction(self, *_: Any) -> None:
        self.aborted += 1
        self.log.append(("abort", 0))


class SeekingConsumer:
    def __init__(self) -> None:
        self.seeks: list[TopicPartition] = []

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append(tp)


class FailingLearner(PartitionLearner):
    """Raises ``error`` at the event with offset ``at``."""

    at = -1
    error: Exception = RuntimeError("a bug")

    def learn_event(self, event: ClickEvent, offset: int) -> Prediction:
        if offset == self.at:
            raise self.error
        return super().learn_event(event, offset)


def _worker(guarantee: str = "at-least-once") -> tuple[Worker, RecordingProducer]:
    worker = offline_worker(input_topic=TOPIC, output_topic="predictions", guarantee=guarantee)
    producer = RecordingProducer()
    worker.producer = producer  # type: ignore[assignment]
    worker.consumer = SeekingConsumer()  # type: ignore[assignment]
    return worker, producer


def _messages(n: int) -> tuple[list[Message], list[dict[str, Any]]]:
    events = list(generate(SimulationConfig(n_events=n, seed=5, scenario="none")))
    msgs = [
        Message(
            topic=TOPIC,
            partition=0,
            offset=i,
            key=ev["user_id"].encode(),
            value=orjson.dumps(ev),
        )
        for i, ev in enumerate(events)
    ]
    return msgs, events


def _learner(at: int = -1, error: Exception | None = None) -> FailingLearner:
    learner = FailingLearner(TOPIC, 0, make_model("logreg"))
    learner.at = at
    if error is not None:
        learner.error = error
    return learner


def test_a_batchs_predictions_reach_the_producer_in_offset_order() -> None:
    worker, producer = _worker()
    learner = worker.stats.learners[0] = _learner()
    msgs, events = _messages(50)
    worker._process(msgs)
    assert [orjson.loads(v or b"")["offset"] for _, v, _ in producer.produced] == list(range(50))
    assert [k for _, _, k in producer.produced] == [ev["user_id"].encode() for ev in events]
    assert {t for t, _, _ in producer.produced} == {"predictions"}
    assert learner.next_offset == 50


def test_an_error_mid_batch_still_hands_over_every_processed_events_prediction() -> None:
    """The shutdown checkpoint after such an error commits ``next_offset``: each event
    below it must have its prediction with the producer, and none above."""
    worker, producer = _worker()
    learner = worker.stats.learners[0] = _learner(at=30)
    msgs, _ = _messages(50)
    with pytest.raises(RuntimeError, match="a bug"):
        worker._process(msgs)
    assert learner.next_offset == 30
    offsets = [orjson.loads(v or b"")["offset"] for _, v, _ in producer.produced]
    assert offsets == list(range(30))


def test_an_aborted_transaction_hands_over_none_of_the_batch() -> None:
    """Exactly-once: learn_one raising rewinds every partition through an abort; the
    batch's predictions belonged to that transaction and are dropped with it."""
    worker, producer = _worker("exactly-once")
    worker._in_txn = True
    worker.stats.learners[0] = _learner(at=30, error=ModelError("boom", during_learn=True))
    msgs, _ = _messages(50)
    worker._process(msgs)
    assert producer.aborted == 1
    assert producer.produced == []
    rewound = worker.stats.learners[0]
    assert rewound.next_offset is None and rewound.learned == 0  # a fresh model again
    assert [(tp.partition, tp.offset) for tp in worker.consumer.seeks] == [(0, 0)]  # type: ignore[union-attr]


def _offsets(producer: RecordingProducer) -> list[int]:
    return [o for what, o in producer.log if what == "produce"]


def test_a_long_batch_is_handed_over_a_chunk_at_a_time() -> None:
    """A batch longer than the chunk: each chunk's predictions reach the producer before
    the next chunk's events are learned, all of them once and in order."""
    worker, producer = _worker()
    learner = worker.stats.learners[0] = _learner()
    reached: list[int | None] = []  # the learner's next_offset at each produce
    produce = producer.produce

    def watched(topic: str, value: bytes | None, key: bytes | None, **kw: Any) -> None:
        reached.append(worker.stats.learners[0].next_offset)
        produce(topic, value, key, **kw)

    producer.produce = watched  # type: ignore[method-assign]
    worker._publish_every = 16
    msgs, events = _messages(50)
    worker._process(msgs)
    assert _offsets(producer) == list(range(50))
    assert [k for _, _, k in producer.produced] == [ev["user_id"].encode() for ev in events]
    # Offsets 0-15 were handed over once 16 events were learned, not 50; and so on.
    assert reached == [min(50, (o // 16 + 1) * 16) for o in range(50)]
    assert learner.next_offset == 50


def test_a_short_batch_is_one_chunk() -> None:
    worker, producer = _worker()
    worker.stats.learners[0] = _learner()
    worker._publish_every = 64
    calls: list[int] = []
    publish = worker._publish
    worker._publish = lambda out: (calls.append(len(out)), publish(out))  # type: ignore[method-assign]
    worker._process(_messages(50)[0])
    assert calls == [50]
    assert _offsets(producer) == list(range(50))


@pytest.mark.parametrize(
    ("took", "expected"),
    [
        (0.010, 10),  # 200 µs per event: 2 ms is 10 events
        (1e-6, 500),  # fast events: never more than the batch size
        (10.0, MIN_PUBLISH_EVERY),  # a very slow batch: still a few events a chunk
    ],
)
def test_the_chunk_is_publish_after_of_the_last_batchs_pace(
    monkeypatch: pytest.MonkeyPatch, took: float, expected: int
) -> None:
    assert PUBLISH_AFTER == 0.002  # the expected chunks below are 2 ms of work
    worker, _ = _worker()
    worker.stats.learners[0] = _learner()
    clock = iter([100.0, 100.0 + took])

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return next(clock)

    monkeypatch.setattr(loop, "time", Clock)
    worker._process(_messages(50)[0])
    assert worker._publish_every == expected


def test_a_rewind_in_one_chunk_holds_for_the_later_chunks() -> None:
    """At-least-once, learn_one raising sends the partition back to its snapshot (here a
    fresh model) and seeks there: the later chunks of the batch must skip that
    partition too, or the fresh model would learn offsets 32-49 without 0-31."""
    worker, producer = _worker()
    worker.stats.learners[0] = _learner(at=20, error=ModelError("boom", during_learn=True))
    worker._publish_every = 16
    worker._process(_messages(50)[0])
    assert _offsets(producer) == list(range(20))
    fresh = worker.stats.learners[0]
    assert fresh.next_offset is None and fresh.learned == 0
    assert [(tp.partition, tp.offset) for tp in worker.consumer.seeks] == [(0, 0)]  # type: ignore[union-attr]


def test_an_abort_in_a_later_chunk_ends_the_batch() -> None:
    """Exactly-once: the chunks handed over before the abort were part of the aborted
    transaction (dropped with it); nothing of the batch is processed or handed over
    after it."""
    worker, producer = _worker("exactly-once")
    worker._in_txn = True
    worker.stats.learners[0] = _learner(at=40, error=ModelError("boom", during_learn=True))
    worker._publish_every = 16
    worker._process(_messages(50)[0])
    assert producer.log == [("produce", o) for o in range(32)] + [("abort", 0)]
    rewound = worker.stats.learners[0]
    assert rewound.next_offset is None and rewound.learned == 0


def test_each_hand_off_is_timed_from_the_poll_for_the_events_it_covers() -> None:
    """riverline_processing_latency_seconds: per event, from the poll to the hand-off
    of its prediction: per chunk of a long batch, once for a short one."""
    worker, _ = _worker()
    worker.stats.learners[0] = _learner()
    seen: list[tuple[float, int]] = []
    worker.stats.latency.observe = lambda v, n=1: seen.append((v, n))  # type: ignore[method-assign]
    worker._publish_every = 16
    polled_at = time.monotonic() - 1.0  # polled a second ago
    worker._process(_messages(50)[0], polled_at)
    assert [n for _, n in seen] == [16, 16, 16, 2]
    values = [v for v, _ in seen]
    assert values == sorted(values) and 1.0 <= values[0] < values[-1] < 30.0
    seen.clear()
    worker._publish_every = 64
    worker._process(_messages(50)[0], time.monotonic())
    assert [n for _, n in seen] == [50]
