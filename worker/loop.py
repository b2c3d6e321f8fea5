"""The consume → validate → predict → publish → learn loop, per partition, in order.

Reads like the data flow in DESIGN.md: poll a batch; for each message decode and
validate it, predict with its partition's learner, learn from the label, hand the
prediction (or the dead letter) to the producer; every commit interval, wait for the
producer's acknowledgements and then commit the offsets they cover (at-least-once).
Shutdown, in ``finally``: stop polling, flush, commit, leave the group.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from worker import __version__
from worker.config import Settings
from worker.errors import RiverlineError
from worker.events import MODEL_ERROR, EventCodec, InvalidEvent
from worker.kafka import (
    KafkaFatalError,
    consumer_config,
    describe,
    ensure_topics,
    producer_config,
)
from worker.learner import ModelError, PartitionLearner
from worker.metrics import WorkerStats
from worker.models import check_model, model_factory

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 30.0
WATERMARK_INTERVAL = 1.0
_LOGGED_PER_REASON = 10  # dead letters logged one by one, then every 10,000th


class Worker:
    """One riverline worker process: a consumer-group member with one learner per partition."""

    def __init__(self, settings: Settings, stats: WorkerStats | None = None) -> None:
        self.settings = settings
        self.codec = EventCodec.load(max_event_bytes=settings.max_event_bytes)
        self.new_model = model_factory(settings.model, seed=settings.seed)
        check_model(settings.model, self.new_model)
        self.stats = stats or WorkerStats(
            settings.input_topic, settings.model, settings.health_timeout
        )
        self._stop = threading.Event()
        self._signals = 0
        self._delivery_error: KafkaError | None = None
        self._dead_logged: dict[str, int] = {}
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None

    # -- lifecycle -------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batch and stop cleanly; a second one exits at once."""

        def handle(signum: int, frame: FrameType | None) -> None:
            self._signals += 1
            if self._signals > 1:
                os._exit(128 + signum)
            log.info("%s received: finishing the batch, then stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def run(self) -> None:
        """Consume until stopped (signal, ``--exit-when-idle``) or a fatal error."""
        s = self.settings
        ensure_topics(s)
        self.producer = Producer({**producer_config(s), "on_delivery": self._on_delivery})
        self.consumer = Consumer(consumer_config(s))
        self.consumer.subscribe(
            [s.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        s = self.settings
        assert self.consumer is not None and self.producer is not None
        consumer, producer, stats = self.consumer, self.producer, self.stats
        latency = stats.latency
        idle_limit = s.exit_when_idle
        last_event = time.monotonic()
        next_commit = last_event + s.commit_interval
        next_watermarks = last_event
        while not self._stop.is_set():
            msgs = consumer.consume(s.batch_size, timeout=0.2)
            now = time.monotonic()
            stats.beat()
            if msgs:
                self._process(msgs)
                done = time.monotonic()
                latency.observe(done - now, len(msgs))
                last_event = done
            producer.poll(0)
            if self._delivery_error is not None:
                raise KafkaFatalError(
                    f"a prediction or dead letter could not be delivered: "
                    f"{describe(self._delivery_error)}; stopping so that its offset is never "
                    "committed (the restart replays it)"
                )
            now = time.monotonic()
            if now >= next_watermarks:
                self._refresh_lag()
                next_watermarks = now + WATERMARK_INTERVAL
            if now >= next_commit:
                self._commit()
                next_commit = time.monotonic() + s.commit_interval
            if not stats.started:
                last_event = now  # idle time counts from joining the group
            elif idle_limit and now - last_event >= idle_limit:
                log.info("no new event for %.1fs (--exit-when-idle): stopping", idle_limit)
                break

    # -- per batch ---------------------------------------------------------------
    def _process(self, msgs: list[Message]) -> None:
        learners = self.stats.learners
        decode = self.codec.decode
        produce = self._produce
        dumps = orjson.dumps
        out_topic = self.settings.output_topic
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._consume_error(err)
                continue
            learner = learners.get(msg.partition())  # type: ignore[arg-type]
            if learner is None:  # revoked between fetch and now: the new owner reads it
                continue
            learner.consumed += 1
            offset: int = msg.offset()  # type: ignore[assignment]
            try:
                event = decode(msg.value())
                prediction = learner.predict_learn(event, offset)
            except InvalidEvent as exc:
                self._dead_letter(msg, learner, exc.reason, str(exc))
            except ModelError as exc:
                self._dead_letter(msg, learner, MODEL_ERROR, str(exc))
            else:
                produce(out_topic, dumps(prediction), event["user_id"].encode(), None)
            learner.next_offset = offset + 1
        for learner in list(learners.values()):
            learner.end_batch()

    def _produce(self, topic: str, value: bytes | None, key: bytes | None, headers: Any) -> None:
        assert self.producer is not None
        while True:
            try:
                if headers is None:
                    self.producer.produce(topic, value, key)
                else:
                    self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                # The local queue is full: let librdkafka deliver, then retry.
                self.producer.poll(0.05)

    def _dead_letter(self, msg: Message, learner: PartitionLearner, reason: str, text: str) -> None:
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        error = f"{where}: {text}"[:2000]
        _ts_type, ts = msg.timestamp()
        headers = list(msg.headers() or [])
        headers += [
            ("riverline.reason", reason.encode()),
            ("riverline.error", error.encode()),
            ("riverline.source.topic", str(msg.topic()).encode()),
            ("riverline.source.partition", str(msg.partition()).encode()),
            ("riverline.source.offset", str(msg.offset()).encode()),
            ("riverline.source.timestamp", str(ts).encode()),
            ("riverline.worker", f"riverline-{__version__}".encode()),
        ]
        self._produce(self.settings.dead_letter_topic, msg.value(), msg.key(), headers)
        learner.dead_lettered[reason] += 1
        n = self._dead_logged.get(reason, 0) + 1
        self._dead_logged[reason] = n
        if n <= _LOGGED_PER_REASON or n % 10_000 == 0:
            log.warning("dead letter #%d (%s): %s", n, reason, error[:300])

    def _consume_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaFatalError(f"fatal consumer error: {describe(err)}")
        log.warning("consumer error (retrying): %s", describe(err))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None and self._delivery_error is None:
            self._delivery_error = err

    # -- offsets -----------------------------------------------------------------
    def _refresh_lag(self) -> None:
        assert self.consumer is not None
        for lr in list(self.stats.learners.values()):
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(lr.topic, lr.partition), cached=True
                )
            except KafkaException:
                continue
            if high is not None and high >= 0:
                lr.high_watermark = high

    def _commit(self, partitions: list[int] | None = None) -> None:
        """At-least-once checkpoint: acknowledge all output, then commit the offsets."""
        assert self.consumer is not None and self.producer is not None
        learners = self.stats.learners
        chosen = (
            [learners[p] for p in partitions if p in learners]
            if partitions
            else list(learners.values())
        )
        due = [
            lr
            for lr in chosen
            if lr.next_offset is not None and lr.next_offset != lr.committed_offset
        ]
        if not due:
            return
        remaining = self.producer.flush(FLUSH_TIMEOUT)
        if remaining:
            raise KafkaFatalError(
                f"{remaining} predictions/dead letters not acknowledged after "
                f"{FLUSH_TIMEOUT:.0f}s; offsets not committed"
            )
        if self._delivery_error is not None:
            raise KafkaFatalError(f"delivery failed: {describe(self._delivery_error)}")
        offsets = [TopicPartition(lr.topic, lr.partition, lr.next_offset or 0) for lr in due]
        try:
            result = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # E.g. a rebalance in progress: the offsets are committed next time (or by
            # the revocation); events may be replayed, never lost.
            log.warning("offset commit failed, will retry: %s", describe(exc))
            return
        by_partition = {lr.partition: lr for lr in due}
        for tp in result or []:
            if tp.error is not None:
                log.warning(
                    "commit of %s[%d] failed: %s", tp.topic, tp.partition, describe(tp.error)
                )
                continue
            lr = by_partition.get(tp.partition)
            if lr is not None:
                lr.committed_offset = tp.offset
        self.stats.commits += 1

    # -- rebalance callbacks (run inside consume()) -------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)  # from the committed offsets (or the reset)
        for tp in partitions:
            self.stats.learners[tp.partition] = PartitionLearner(
                tp.topic, tp.partition, self.new_model(), window=self.settings.window
            )
        self.stats.rebalances["assigned"] += len(partitions)
        self.stats.started = True
        if partitions:
            log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        if revoked:
            try:
                self._commit(revoked)
            finally:
                for p in revoked:
                    self.stats.learners.pop(p, None)
                consumer.incremental_unassign(partitions)
            log.info("revoked partitions %s", sorted(revoked))
        self.stats.rebalances["revoked"] += len(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns them now: committing would be wrong, keep nothing.
        for tp in partitions:
            self.stats.learners.pop(tp.partition, None)
        if partitions:
            consumer.incremental_unassign(partitions)
        self.stats.rebalances["lost"] += len(partitions)
        log.warning("lost partitions %s", sorted(tp.partition for tp in partitions))

    def _shutdown(self) -> None:
        self.stats.stopping = True
        consumer, producer = self.consumer, self.producer
        try:
            if consumer is not None and producer is not None:
                try:
                    self._commit()
                except RiverlineError as exc:
                    log.error("final checkpoint failed: %s", exc)
                    raise
        finally:
            if consumer is not None:
                consumer.close()  # leaves the group at once (revocation commits again: no-op)
            if producer is not None:
                producer.flush(FLUSH_TIMEOUT)


def run_worker(settings: Settings, on_start: Callable[[Worker], None] | None = None) -> Worker:
    worker = Worker(settings)
    if on_start:
        on_start(worker)
    worker.run()
    return worker
