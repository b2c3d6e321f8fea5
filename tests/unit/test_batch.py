"""The loop hands a poll batch's predictions to the producer after the batch.

What is checked here is riverline's own bookkeeping around that hand-off, with a recording
producer: the order, that an error in the middle of a batch still hands over every
prediction of an event counted as processed (so a checkpoint never commits an offset
whose prediction the producer never got), and that an aborted transaction hands over
none. Kafka's side (delivery, transactions, offsets) is tested against a real broker in
``tests/integration``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from confluent_kafka import Message, TopicPartition

from tests.helpers import offline_worker
from worker.events import ClickEvent, Prediction
from worker.learner import ModelError, PartitionLearner
from worker.loop import Worker
from worker.models import make_model
from worker.simulate import SimulationConfig, generate

TOPIC = "clicks"


class RecordingProducer:
    """Records what the loop hands over; a transaction is a flag."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None, bytes | None]] = []
        self.aborted = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **_: Any) -> None:
        self.produced.append((topic, value, key))

    def abort_transaction(self, *_: Any) -> None:
        self.aborted += 1


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
