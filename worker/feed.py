"""Publish a click stream to Kafka (``riverline simulate``), optionally with bad messages.

Bad messages exercise the dead-letter path in demos: each is one of the rejected kinds
(invalid JSON, invalid UTF-8, schema violation, non-finite number, empty value).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from worker.errors import RiverlineError
from worker.kafka import describe

log = logging.getLogger(__name__)

BAD_KINDS: tuple[tuple[str, Callable[[bytes], bytes | None]], ...] = (
    ("invalid_json", lambda raw: raw[: len(raw) // 2]),
    ("invalid_utf8", lambda raw: b"\xff\xfe" + raw),
    ("schema_violation", lambda raw: raw.replace(b'"event_id"', b'"eventid"', 1)),
    ("non_finite_number", lambda raw: raw[:-1] + b', "score": NaN}'),
    ("empty_value", lambda raw: None),
)


def corrupt(raw: bytes, rng: random.Random) -> tuple[str, bytes | None]:
    """One bad message made from a good one, and the reason the worker will give.

    >>> corrupt(b'{"event_id": "e1"}', random.Random(3))[0] in dict(BAD_KINDS)
    True
    """
    kind, make = BAD_KINDS[rng.randrange(len(BAD_KINDS))]
    return kind, make(raw)


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 30.0) -> int:
    """Create ``topic`` if missing; return its partition count."""
    client = AdminClient({"bootstrap.servers": bootstrap})
    md = client.list_topics(timeout=timeout)
    existing = md.topics.get(topic)
    if existing is not None and not existing.error:
        return len(existing.partitions)
    fut = client.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1)])
    try:
        fut[topic].result(timeout=timeout)
    except Exception as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise RiverlineError(f"cannot create topic {topic!r}: {exc}") from exc
    return partitions


@dataclass
class FeedStats:
    sent: int = 0
    bad: int = 0
    started: float = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.sent / elapsed if elapsed > 0 else 0.0


def publish(
    bootstrap: str,
    topic: str,
    events: Iterable[dict[str, Any]],
    *,
    rate: float = 0.0,
    bad_rate: float = 0.0,
    seed: int = 0,
    total: int | None = None,
    progress: TextIO | None = sys.stderr,
    stop: Callable[[], bool] | None = None,
) -> FeedStats:
    """Produce ``events`` (key = user_id) at ``rate`` events/s (0: as fast as possible)."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 10,
            "enable.idempotence": True,
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )
    rng = random.Random(seed ^ 0x5EED)
    stats = FeedStats(started=time.monotonic())
    next_report = stats.started + 2.0
    for ev in events:
        if stop is not None and stop():
            break
        raw = orjson.dumps(ev)
        key = ev["user_id"].encode()
        value: bytes | None = raw
        if bad_rate and rng.random() < bad_rate:
            _kind, value = corrupt(raw, rng)
            stats.bad += 1
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
        stats.sent += 1
        producer.poll(0)
        if errors:
            raise RiverlineError(f"could not deliver to {topic!r}: {describe(errors[0])}")
        if rate > 0:
            ahead = stats.sent / rate - (time.monotonic() - stats.started)
            if ahead > 0.001:
                time.sleep(ahead)
        if progress is not None and time.monotonic() >= next_report:
            next_report += 2.0
            of = f"/{total:,}" if total else ""
            print(
                f"simulate: {stats.sent:,}{of} events to {topic} ({stats.rate:,.0f}/s, "
                f"{stats.bad:,} bad)",
                file=progress,
            )
    remaining = producer.flush(60)
    if remaining or errors:
        raise RiverlineError(
            f"{remaining} events not delivered to {topic!r}"
            + (f": {describe(errors[0])}" if errors else "")
        )
    return stats
