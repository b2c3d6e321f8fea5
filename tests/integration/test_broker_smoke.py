"""The test broker is a real Kafka: records, consumer groups, commits and transactions work.

Every test talks to the session broker from ``kafka_bootstrap`` (see tests/conftest.py)
through confluent-kafka, on topics of its own from ``new_topic``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

pytestmark = pytest.mark.integration

TopicFactory = Callable[..., str]

DEADLINE = 60.0  # seconds; no wait in this file is unbounded


def _producer(bootstrap: str, **extra: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, **extra})


def _consumer(bootstrap: str, group: str | None = None, **extra: Any) -> Consumer:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group or f"smoke-{uuid.uuid4().hex[:12]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **extra,
    }
    return Consumer(conf)


def _flush(producer: Producer) -> None:
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} message(s) not delivered within 30s"


def _records(consumer: Consumer, deadline: float) -> Iterator[Message]:
    """Poll until the deadline; yield data messages, fail on a real error."""
    while time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                continue
            raise AssertionError(f"consumer error: {err}")
        yield msg


def _consume_n(consumer: Consumer, n: int, timeout: float = DEADLINE) -> list[Message]:
    got: list[Message] = []
    for msg in _records(consumer, time.monotonic() + timeout):
        got.append(msg)
        if len(got) >= n:
            return got
    raise AssertionError(f"only {len(got)} of {n} message(s) arrived within {timeout:.0f}s")


def _consume_until(
    consumer: Consumer, last_value: bytes, timeout: float = DEADLINE
) -> list[Message]:
    """Everything up to and including the message whose value is ``last_value``."""
    got: list[Message] = []
    for msg in _records(consumer, time.monotonic() + timeout):
        got.append(msg)
        if msg.value() == last_value:
            return got
    values = [m.value() for m in got]
    raise AssertionError(f"{last_value!r} did not arrive within {timeout:.0f}s; saw {values}")


def test_round_trip_keeps_keys_values_and_headers(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = new_topic("roundtrip")
    sent = [
        (b"k0", b"v0", [("trace", b"t0"), ("kind", b"click")]),
        (b"k1", b"\x00\x01binary\xff", [("trace", b"t1")]),
        (None, b"no-key", [("empty", b""), ("dup", b"a"), ("dup", b"b")]),
    ]
    producer = _producer(kafka_bootstrap)
    for key, value, headers in sent:
        producer.produce(topic, key=key, value=value, headers=headers)
    _flush(producer)

    consumer = _consumer(kafka_bootstrap)
    try:
        consumer.subscribe([topic])
        got = _consume_n(consumer, len(sent))
    finally:
        consumer.close()

    assert [(m.key(), m.value(), m.headers()) for m in got] == sent
    assert [m.offset() for m in got] == [0, 1, 2]
    assert {m.partition() for m in got} == {0}


def test_two_consumers_in_one_group_split_partitions(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    partitions = 4
    topic = new_topic("group", partitions=partitions)
    group = f"smoke-group-{uuid.uuid4().hex[:12]}"
    extra = {
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 500,  # rebalances are noticed on the next heartbeat
    }
    consumers = [_consumer(kafka_bootstrap, group, **extra) for _ in range(2)]
    seen: list[list[Message]] = [[], []]

    def poll_round() -> None:
        """One short poll of each consumer in turn, so both take part in the rebalance."""
        for i, c in enumerate(consumers):
            msg = c.poll(0.1)
            if msg is None:
                continue
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise AssertionError(f"consumer {i} error: {err}")
            if err is None:
                seen[i].append(msg)

    def assigned() -> list[set[int]]:
        return [{tp.partition for tp in c.assignment() if tp.topic == topic} for c in consumers]

    try:
        for c in consumers:
            c.subscribe([topic])
        # Wait for the group to settle: both members own partitions and all 4 are owned.
        deadline = time.monotonic() + DEADLINE
        while True:
            poll_round()
            a, b = assigned()
            if a and b and not a & b and a | b == set(range(partitions)):
                break
            assert time.monotonic() < deadline, f"group did not settle: assignments {a}, {b}"
        assignment = assigned()

        per_partition = 10
        producer = _producer(kafka_bootstrap)
        expected = set()
        for p in range(partitions):
            for n in range(per_partition):
                value = f"p{p}-n{n}".encode()
                producer.produce(topic, value=value, partition=p)
                expected.add(value)
        _flush(producer)

        deadline = time.monotonic() + DEADLINE
        while sum(len(s) for s in seen) < len(expected) and time.monotonic() < deadline:
            poll_round()
        # A little longer, to catch duplicates that would arrive late.
        grace = time.monotonic() + 1.0
        while time.monotonic() < grace:
            poll_round()
        assert assigned() == assignment, "the group rebalanced while consuming"
    finally:
        for c in consumers:
            c.close()

    values = [m.value() for s in seen for m in s]
    assert len(values) == len(set(values)), "some messages were delivered twice"
    assert set(values) == expected
    for i in range(2):
        assert seen[i], f"consumer {i} received nothing"
        assert {m.partition() for m in seen[i]} <= assignment[i]
        for m in seen[i]:
            assert m.value().startswith(f"p{m.partition()}-".encode())


def test_committed_offsets_survive_a_consumer_restart(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topic = new_topic("commit")
    group = f"smoke-commit-{uuid.uuid4().hex[:12]}"
    total, first = 10, 4
    producer = _producer(kafka_bootstrap)
    for n in range(total):
        producer.produce(topic, value=f"m{n}".encode())
    _flush(producer)

    consumer = _consumer(kafka_bootstrap, group)
    try:
        consumer.subscribe([topic])
        got = _consume_n(consumer, first)
        assert [m.value() for m in got] == [f"m{n}".encode() for n in range(first)]
        committed = consumer.commit(message=got[-1], asynchronous=False)
        assert committed is not None
        assert [(tp.partition, tp.offset) for tp in committed] == [(0, first)]
        on_broker = consumer.committed([TopicPartition(topic, 0)], timeout=30)
        assert on_broker[0].offset == first
    finally:
        consumer.close()

    later = _consumer(kafka_bootstrap, group)
    try:
        later.subscribe([topic])
        rest = _consume_n(later, total - first)
        # Nothing earlier turns up afterwards either.
        extra = list(_records(later, time.monotonic() + 1.0))
    finally:
        later.close()
    assert [m.offset() for m in rest] == list(range(first, total))
    assert [m.value() for m in rest] == [f"m{n}".encode() for n in range(first, total)]
    assert extra == []


def test_transactions_commit_and_abort(kafka_bootstrap: str, new_topic: TopicFactory) -> None:
    topic = new_topic("txn")
    producer = _producer(
        kafka_bootstrap,
        **{"transactional.id": f"smoke-txn-{uuid.uuid4().hex}", "transaction.timeout.ms": 30000},
    )
    committed = [f"committed-{n}".encode() for n in range(3)]
    aborted = [f"aborted-{n}".encode() for n in range(2)]
    # A committed trailer after the aborted batch tells readers they have read past it.
    trailer = [b"trailer"]

    producer.init_transactions(30)
    producer.begin_transaction()
    for v in committed:
        producer.produce(topic, value=v)
    producer.commit_transaction(30)

    producer.begin_transaction()
    for v in aborted:
        producer.produce(topic, value=v)
    _flush(producer)  # the aborted records really reach the log
    producer.abort_transaction(30)

    producer.begin_transaction()
    for v in trailer:
        producer.produce(topic, value=v)
    producer.commit_transaction(30)

    def read(isolation: str) -> list[bytes | None]:
        consumer = _consumer(kafka_bootstrap, **{"isolation.level": isolation})
        try:
            consumer.subscribe([topic])
            return [m.value() for m in _consume_until(consumer, trailer[-1])]
        finally:
            consumer.close()

    assert read("read_committed") == committed + trailer
    assert read("read_uncommitted") == committed + aborted + trailer
