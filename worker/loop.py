"""The consume → validate → predict → publish → learn loop, per partition, in order.

Reads like the data flow in DESIGN.md: poll a batch; for each message decode and
validate it, predict with its partition's learner, learn from the label, hand the
prediction (or the dead letter) to the producer. Every checkpoint (by time or events,
and before a partition is released) writes a signed snapshot of each changed learner
to the compacted state topic, together with the input offset it reflects:

- at-least-once: wait until the broker acknowledged every prediction, write the
  snapshots and wait for their acknowledgement, then commit the offsets;
- exactly-once: predictions, dead letters, snapshots and the consumer offsets of one
  checkpoint interval are one Kafka transaction; on an abortable error the transaction is
  aborted and every learner is rewound to its last committed snapshot.

On assignment a partition's newest verified snapshot is restored and consumption resumes
at the offset it records. Shutdown, in ``finally``: stop polling, checkpoint, leave the
group.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from worker import __version__
from worker.batchfit import start_fit_process, wait_fit_process
from worker.busypoll import BusyPoll
from worker.config import Settings
from worker.errors import RiverlineError
from worker.events import (
    FAST_DECODE,
    MODEL_ERROR,
    EventCodec,
    InvalidEvent,
    encode_prediction,
)
from worker.kafka import (
    NO_ANSWER,
    KafkaFatalError,
    common_config,
    consumer_config,
    describe,
    ensure_topics,
    log_client_error,
    producer_config,
)
from worker.learner import ModelError, PartitionLearner
from worker.metrics import WorkerStats
from worker.models import check_model, model_factory
from worker.snapshots import Restored, Signer, SnapshotError, SnapshotStore

log = logging.getLogger(__name__)

WATERMARK_INTERVAL = 1.0
FIT_PROCESS_START_TIMEOUT = 30.0  # seconds the worker waits for its fit process at start
TXN_TIMEOUT = 60.0
# An --exit-when-idle check whose metadata request took this long waited for a broker:
# it began during an outage (healthy answers take milliseconds).
SLOW_IDLE_CHECK = 2.0
_LOGGED_PER_REASON = 10  # dead letters logged one by one, then every 10,000th
# librdkafka refuses to produce a record above message.max.bytes (default 1,000,000),
# yet the input topic may hold larger ones: their dead letters carry a prefix only.
DEAD_LETTER_HEADROOM = 64 * 1024  # for the key and the headers


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
        self.eos = settings.guarantee == "exactly-once"
        self.learner_options = settings.learner_options()
        self.store = SnapshotStore(
            common_config(settings),
            settings.group_id,
            settings.input_topic,
            settings.state_topic or f"{settings.group_id}.state",
            Signer(settings.snapshot_key),
        )
        self._stop = threading.Event()
        self._signals = 0
        self._delivery_error: KafkaError | None = None
        self._dead_logged: dict[str, int] = {}
        self._in_txn = False
        self._since_checkpoint = 0
        self._publish_every = 64  # events per chunk of a batch; see _process
        # Exactly-once rewinds to these: per partition, the last committed snapshot
        # (payload or None for "fresh model") and the input offset it reflects.
        self._committed: dict[int, tuple[bytes | None, int | None]] = {}
        # Events whose learn_one raised: (partition, offset) -> error. Replays dead-letter
        # them instead of learning from them again.
        self._poisoned: dict[tuple[int, int], str] = {}
        self._assigned_at = 0.0
        self._lost_at = 0.0
        # Set when an --exit-when-idle check finds the broker not answering: the idle
        # time then counts again from the first check that finds it back.
        self._broker_unreachable = False
        self._unreachable_at = 0.0  # when the consumer last reported all brokers down
        self._dropped_deploy_wait = 0.0  # deploy waits of partitions no longer ours
        self._error_logged: dict[int, float] = {}
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None
        # At-least-once, snapshots go through a producer of their own, so that a
        # checkpoint can wait for their acknowledgement (before it commits the offsets)
        # while the loop goes on; see _checkpoint.
        self.snapshot_producer: Producer | None = None
        # A checkpoint whose snapshots are written but not yet acknowledged: the offsets
        # to commit then, and the payloads that become the partitions' rewind points.
        self._unsettled: tuple[list[TopicPartition], dict[int, tuple[bytes, int]]] | None
        self._unsettled = None

    # -- lifecycle -------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What this process did: messages, busy seconds (first to last batch), rate, RSS."""
        st = self.stats
        busy = (
            st.last_batch_at - st.first_batch_at
            if st.first_batch_at is not None and st.last_batch_at is not None
            else 0.0
        )
        return {
            "messages": st.messages,
            "seconds": busy,
            "rate": st.messages / busy if busy > 0 else 0.0,
            "checkpoints": st.commits,
            "checkpoint_seconds": st.checkpoint_duration.total,
            # The loop thread's CPU time over the busy time: what riverline's own work
            # costs, apart from time this thread waited or was preempted.
            "loop_cpu_seconds": st.last_batch_cpu - st.first_batch_cpu,
            # The CPU and wall time the loop polled without waiting (--busy-poll-ms);
            # all but the window after the last batch falls within loop_cpu_seconds.
            "busy_poll_cpu_seconds": st.busy_poll_cpu_seconds,
            "busy_poll_seconds": st.busy_poll_seconds,
            # Time the loop waited for a background fit at a batch model's deploy point.
            "deploy_wait_seconds": self._dropped_deploy_wait
            + sum(
                lr.baseline.deploy_wait_seconds
                for lr in st.learners.values()
                if lr.baseline is not None
            ),
            "peak_rss_bytes": peak_rss(),
            # The loop's slowest iterations (10 ms or more), the slowest first.
            "slowest_iterations": st.slowest.as_list(),
        }

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
        partitions = ensure_topics(s)
        self.store.ensure_topic(partitions)
        pconf = {**producer_config(s), "on_delivery": self._on_delivery}
        if self.eos:
            # One stable id per replica: a restarted replica fences its previous
            # incarnation and aborts its open transaction at once (no timeout wait).
            pconf["transactional.id"] = f"riverline-{s.group_id}-{s.instance_id}"
            pconf["transaction.timeout.ms"] = int(TXN_TIMEOUT * 1000)
        self.producer = Producer(pconf)
        if self.eos:
            self._txn_call("init_transactions", self.producer.init_transactions, TXN_TIMEOUT)
        else:
            self.snapshot_producer = Producer({**pconf, "linger.ms": 0})
        if s.fits_in_background:
            start_fit_process()  # unless `riverline run` started it already
            # Its imports done before the first partition arrives, not beside its first
            # events (see wait_fit_process).
            ready = wait_fit_process(FIT_PROCESS_START_TIMEOUT, stop=self._stop.is_set)
            if not ready and not self._stop.is_set():
                log.warning(
                    "the baseline's fit process is still starting after %.0fs; joining "
                    "the group without waiting for it",
                    FIT_PROCESS_START_TIMEOUT,
                )
        # Offset commits of the periodic checkpoints are asynchronous; their results
        # arrive here, inside consume() on this thread.
        self.consumer = Consumer(
            {
                **consumer_config(s),
                "on_commit": self._on_commit,
                "error_cb": self._on_client_error,
            }
        )
        self.consumer.subscribe(
            [s.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        opts = self.learner_options
        # The parent needs scikit-learn only when it fits in the loop itself.
        tune_gc(preload_baseline=opts.baseline_window > 0 and not opts.baseline_deploy_delay)
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        s = self.settings
        assert self.consumer is not None and self.producer is not None
        consumer, producer, stats = self.consumer, self.producer, self.stats
        idle_limit = s.exit_when_idle
        last_event = time.monotonic()
        next_checkpoint = last_event + s.commit_interval
        next_watermarks = last_event
        busy_poll = BusyPoll(s.busy_poll_ms / 1000) if s.busy_poll_ms else None
        while not self._stop.is_set():
            if self.eos and not self._in_txn:
                self._txn_call("begin_transaction", producer.begin_transaction)
                self._in_txn = True
            # Take what is already fetched without waiting; only when nothing is, block
            # until the next message. (consume(n, timeout) waits for n messages or the
            # whole timeout, which would add up to the timeout to every event's latency.)
            msgs = consumer.consume(s.batch_size, timeout=0)
            if not msgs and busy_poll is not None and busy_poll.deadline:
                msgs = self._busy_poll(busy_poll)
            if not msgs:
                msgs = consumer.consume(1, timeout=0.1)
                if msgs and s.batch_size > 1:
                    # The rest of the fetch that woke it: one batch, not a batch of one
                    # and then the rest (each poll batch has its own bookkeeping).
                    msgs += consumer.consume(s.batch_size - 1, timeout=0)
            now = time.monotonic()
            # The iteration is timed from here (after the poll, which may wait for a
            # message) to its checkpoint's end: see SlowestIterations.
            began, began_cpu, checkpointed = now, time.thread_time(), False
            stats.beat()
            if msgs:
                if stats.first_batch_at is None:
                    stats.first_batch_at = now
                    stats.first_batch_cpu = time.thread_time()
                self._process(msgs, now)
                done = time.monotonic()
                stats.messages += len(msgs)
                stats.last_batch_at = done
                stats.last_batch_cpu = time.thread_time()
                last_event = done
                if busy_poll is not None:
                    busy_poll.after_batch(done)
                self._since_checkpoint += len(msgs)
            for learner in list(stats.learners.values()):
                learner.end_batch(force=False)  # also while idle: scrapes stay fresh
            producer.poll(0)
            if self._unsettled is not None:
                self._settle_checkpoint(wait=False)
            self._check_delivery()
            now = time.monotonic()
            if now >= next_watermarks:
                self._refresh_lag()
                next_watermarks = now + WATERMARK_INTERVAL
            if now >= next_checkpoint or (
                s.commit_events and self._since_checkpoint >= s.commit_events
            ):
                self._checkpoint(wait_for_commit=False)
                next_checkpoint = time.monotonic() + s.commit_interval
                checkpointed = True
            took = time.monotonic() - began
            if took >= stats.slowest.threshold and stats.first_batch_at is not None:
                stats.slowest.note(
                    took,
                    time.thread_time() - began_cpu,
                    began - stats.first_batch_at,
                    len(msgs),
                    checkpointed,
                )
            if not stats.started or self._assigned_at > last_event:
                last_event = now  # idle time counts from the last (re)assignment
            elif idle_limit and now - last_event >= idle_limit:
                if not self._input_exhausted(since=last_event):
                    # The idle time counts again from now.
                    last_event = time.monotonic()
                    continue
                log.info("no new event for %.1fs (--exit-when-idle): stopping", idle_limit)
                break

    def _busy_poll(self, busy_poll: BusyPoll) -> list[Message]:
        """Poll without waiting until a message arrives or the window after the last
        batch passes (``--busy-poll-ms``, see :mod:`worker.busypoll`); the messages, or
        none. Its wall and CPU time are counted (``riverline_busy_poll_seconds_total``).
        """
        until, busy_poll.deadline = busy_poll.deadline, 0.0  # one poll per batch
        now = time.monotonic()
        if now >= until:
            return []  # the iteration outlasted the window (a checkpoint): no poll
        assert self.consumer is not None
        consume, n, stop = self.consumer.consume, self.settings.batch_size, self._stop.is_set
        started, cpu = now, time.thread_time()
        msgs: list[Message] = []
        while now < until and not stop():
            msgs = consume(n, timeout=0)
            if msgs:
                break
            now = time.monotonic()
        if msgs:
            busy_poll.hit()
        elif now >= until:
            busy_poll.missed()
        stats = self.stats
        stats.busy_poll_seconds += time.monotonic() - started
        stats.busy_poll_cpu_seconds += time.thread_time() - cpu
        return msgs

    # -- per batch --------------------------------------------------------------------
    def _process(self, msgs: list[Message], polled_at: float | None = None) -> None:
        """Predict and learn from a poll batch, handing its predictions to the producer
        a chunk at a time.

        The predictions go to the producer in chunks, not one by one: producing between
        two events' model calls made the model itself about 1 µs per event slower (the
        Kafka client's work evicts the model's data from the CPU caches). Nor after the
        whole batch: a backlog's batch of 500 is 12-20 ms of work with ``logreg`` and
        90 ms with ``fm``, and its first predictions waited for its last. A chunk is
        about ``PUBLISH_AFTER`` of work, as many events as the previous batch took that
        long for; a batch at a paced rate (a 16 KB fetch, ~50 clicks) is one chunk.
        Predictions are handed over even when the batch stops on an error, so an event
        counted as processed (``next_offset``) has its prediction with the producer
        before any checkpoint; an aborted transaction drops them with everything else
        it held.

        Each hand-off is timed from ``polled_at`` (when the batch was polled; by default
        now) for the messages it covers: ``riverline_processing_latency_seconds``.
        """
        started = time.monotonic()
        since = started if polled_at is None else polled_at
        observe = self.stats.latency.observe
        out: list[tuple[bytes, bytes]] = []
        rewound: set[int] = set()  # partitions sent back to a snapshot in this batch
        n, chunk, timed = len(msgs), self._publish_every, 0
        try:
            if n <= chunk:
                self._predict_batch(msgs, out, rewound)
                return
            # A long batch (a backlog) is published a chunk at a time, so that its first
            # events do not wait for its last ones (see PUBLISH_AFTER).
            for i in range(0, n, chunk):
                if not self._predict_batch(msgs[i : i + chunk], out, rewound):
                    return  # the transaction was aborted: the rest is read again
                if i + chunk < n:
                    self._publish(out)
                    out.clear()
                    observe(time.monotonic() - since, chunk)
                    timed += chunk
        finally:
            if out:
                self._publish(out)
            now = time.monotonic()
            observe(now - since, n - timed)
            # The next batch's chunk: PUBLISH_AFTER's worth of this one's events.
            took = now - started
            if took > 0:
                self._publish_every = min(
                    max(round(PUBLISH_AFTER * n / took), MIN_PUBLISH_EVERY),
                    self.settings.batch_size,
                )

    def _predict_batch(
        self, msgs: list[Message], out: list[tuple[bytes, bytes]], rewound: set[int]
    ) -> bool:
        """Each message to a prediction (appended to ``out`` with its key) or a dead
        letter; False when the batch must stop (an aborted transaction)."""
        learners = self.stats.learners
        codec = self.codec
        decode, limit = codec.decode, codec.max_event_bytes
        known_names, check_names = codec.names, codec.check_names
        encode = encode_prediction
        publish = out.append
        poisoned_at = self._poisoned
        # A batch holds runs of messages from one partition: look its learner up once a run.
        current, learner = -1, None
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._consume_error(err)
                continue
            partition: int = msg.partition()  # type: ignore[assignment]
            if partition != current:
                current = partition
                learner = None if partition in rewound else learners.get(partition)
            if learner is None:
                continue  # revoked meanwhile (the new owner reads it) or seeking back
            offset: int = msg.offset()  # type: ignore[assignment]
            next_offset = learner.next_offset
            if next_offset is None:  # the first event of a fresh learner
                learner.first_offset = offset
            elif offset < next_offset:
                continue  # already reflected in the restored model (e.g. after a seek)
            try:
                if poisoned_at and (partition, offset) in poisoned_at:
                    raise ModelError(poisoned_at[(partition, offset)])
                # EventCodec.decode, inlined (one Python call less per event): msgspec's
                # one pass, then the size and the feature names; a refused event goes to
                # the codec, which decides and says why.
                raw = msg.value()
                try:
                    event = FAST_DECODE(raw)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 (DecodeError, TypeError for None...)
                    event = decode(raw)
                else:
                    features = event.features
                    if len(raw) > limit or (  # type: ignore[arg-type]
                        not known_names.issuperset(features) and not check_names(features)
                    ):
                        event = decode(raw)
                prediction = learner.learn_event(event, offset)
            except InvalidEvent as exc:
                self._dead_letter(msg, learner, exc.reason, str(exc))
            except ModelError as exc:
                if exc.during_learn:
                    # The model may be half-updated: return the partition to its last
                    # snapshot and replay; this event is then dead-lettered, unlearned.
                    poisoned_at[(partition, offset)] = str(exc)
                    if self.eos:
                        out.clear()  # part of the transaction being aborted
                        self._abort_and_rewind(f"learn_one raised at {where(msg)}")
                        return False
                    log.warning("%s: %s; rewinding the partition", where(msg), exc)
                    self._rewind_partition(learner)
                    rewound.add(partition)
                    learner = None  # the rest of the partition's run is read again
                    continue
                self._dead_letter(msg, learner, MODEL_ERROR, str(exc))
            else:
                publish((encode(prediction), event.user_id.encode()))
            learner.next_offset = offset + 1
        return True

    def _publish(self, out: list[tuple[bytes, bytes]]) -> None:
        """Hand predictions (value, key) to the producer, in order."""
        assert self.producer is not None
        produce, topic = self.producer.produce, self.settings.output_topic
        for value, key in out:
            try:
                produce(topic, value, key)
            except BufferError:
                self._produce(topic, value, key, None)

    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Any,
        partition: int = -1,
        producer: Producer | None = None,
    ) -> None:
        if producer is None:  # (not `or`: a Producer with nothing queued is falsy)
            producer = self.producer
        assert producer is not None
        while True:
            try:
                if headers is None:
                    producer.produce(topic, value, key, partition=partition)
                else:
                    producer.produce(topic, value, key, partition=partition, headers=headers)
                return
            except BufferError:
                # The local queue is full: let librdkafka deliver, then retry.
                producer.poll(0.05)

    def _dead_letter(self, msg: Message, learner: PartitionLearner, reason: str, text: str) -> None:
        error = f"{where(msg)}: {text}"[:2000]
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
        value = msg.value()
        limit = int(self.settings.kafka.get("message.max.bytes", 1_000_000)) - DEAD_LETTER_HEADROOM
        if value is not None and len(value) > limit:
            headers.append(("riverline.value.truncated", str(len(value)).encode()))
            value = value[:limit]
        self._produce(self.settings.dead_letter_topic, value, msg.key(), headers)
        learner.dead_lettered[reason] += 1
        n = self._dead_logged.get(reason, 0) + 1
        self._dead_logged[reason] = n
        if n <= _LOGGED_PER_REASON or n % 10_000 == 0:
            log.warning("dead letter #%d (%s): %s", n, reason, error[:300])

    def _consume_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaFatalError(f"fatal consumer error: {describe(err)}")
        # During a broker outage every poll returns an error: log each kind every 10 s.
        now = time.monotonic()
        if now - self._error_logged.get(err.code(), -1e9) >= 10.0:
            self._error_logged[err.code()] = now
            log.warning("consumer error (librdkafka retries by itself): %s", describe(err))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None and self._delivery_error is None:
            self._delivery_error = err

    def _check_delivery(self) -> None:
        if self._delivery_error is not None:
            raise KafkaFatalError(
                f"a prediction, dead letter or snapshot could not be delivered: "
                f"{describe(self._delivery_error)}; stopping so that its offset is never "
                "committed (the restart replays it)"
            )

    def _on_client_error(self, err: KafkaError) -> None:
        """The consumer's ``error_cb`` (served inside ``consume()``, on the loop thread)."""
        log_client_error(err)
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._unreachable_at = time.monotonic()

    def _input_exhausted(self, since: float = 0.0) -> bool:
        """May ``--exit-when-idle`` stop now (no event since ``since``)? Not while
        partitions lost in a session timeout are not given back yet, nor while an
        assigned partition holds events past this worker's position, nor while the
        broker does not answer: no event can arrive then, but that is not the end of the
        input.

        After an outage the idle time counts again from the first check that finds the
        broker back, so that producers (and this consumer's fetcher) still in their
        reconnect backoff can catch up. An outage is known three ways: the check fails;
        the check is slow (its metadata request waited for a broker: it began during the
        outage and ended after it); or the consumer reported all brokers down since the
        last event (an outage shorter than the idle limit, over before the check). Any
        other error of the check (a leader election, an authorization error) is logged
        and the worker goes on: it cannot tell whether the input is exhausted."""
        assert self.consumer is not None
        if self._lost_at > self._assigned_at:
            return False
        try:
            began = time.monotonic()
            self.consumer.list_topics(self.settings.input_topic, timeout=5.0)
            waited = time.monotonic() - began
            for lr in list(self.stats.learners.values()):
                if self._unread(lr.topic, lr.partition, lr.next_offset):
                    return False
        except KafkaException as e:
            err = e.args[0] if e.args else None
            if not isinstance(err, KafkaError) or err.code() not in NO_ANSWER:
                log.warning(
                    "--exit-when-idle: cannot tell whether the input is exhausted (%s); going on",
                    describe(e),
                )
                return False
            if not self._broker_unreachable:
                log.info(
                    "--exit-when-idle: the broker does not answer (%s); the idle time "
                    "counts again once it does",
                    describe(err),
                )
            self._broker_unreachable = True
            return False
        if self._broker_unreachable or self._unreachable_at > since or waited >= SLOW_IDLE_CHECK:
            self._broker_unreachable = False
            self._unreachable_at = 0.0
            log.info(
                "--exit-when-idle: the broker answers again after an outage; the idle time "
                "counts from now"
            )
            return False
        return True

    def _unread(self, topic: str, partition: int, next_offset: int | None = None) -> bool:
        """Does an assigned partition hold events past this worker's position? (After a
        broker outage the fetcher may still be in its reconnect backoff while the broker
        already answers: silence then is not the end of the input.)

        The position is the consumer's own, which steps over a transaction's commit
        marker once fetched. A partition not fetched from yet has no position: it starts
        at its learner's ``next_offset`` (a restored learner's is its snapshot's offset,
        which the group's committed offset may lag), else at its committed offset, else
        where ``auto.offset.reset`` says."""
        assert self.consumer is not None
        tp = TopicPartition(topic, partition)
        low, high = self.consumer.get_watermark_offsets(tp, timeout=5.0)
        (position,) = self.consumer.position([tp])
        if position.offset >= 0:
            start = position.offset
        elif next_offset is not None:
            start = next_offset
        else:
            (committed,) = self.consumer.committed([tp], timeout=5.0)
            if committed.offset >= 0:
                start = committed.offset
            else:
                start = high if self.settings.auto_offset_reset == "latest" else low
        return bool(start < high)

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

    # -- checkpoints -------------------------------------------------------------------
    def _flush(self, producer: Producer | None = None) -> None:
        """Wait until the broker acknowledged everything ``producer`` (by default the
        predictions' producer) produced; rides out outages."""
        if producer is None:  # (not `or`: a Producer with nothing queued is falsy)
            producer = self.producer
        assert producer is not None
        # librdkafka gives up on a message after message.timeout.ms (5 min by default)
        # and reports it through the delivery callback, which ends the wait below.
        waited = 0.0
        while True:
            remaining = producer.flush(5.0)
            self._check_delivery()
            if not remaining:
                return
            waited += 5.0
            log.warning(
                "%d messages not yet acknowledged after %.0fs (broker unreachable?); waiting",
                remaining,
                waited,
            )

    def _write_snapshots(
        self, due: list[PartitionLearner]
    ) -> tuple[int, dict[int, tuple[bytes, int]]]:
        """Produce a snapshot of each learner; return the bytes written, and per
        partition the payload and its offset (the rewind point once it is durable)."""
        total = 0
        payloads: dict[int, tuple[bytes, int]] = {}
        producer = self.snapshot_producer
        if producer is None:  # exactly-once: the transaction's producer
            producer = self.producer
        for lr in due:
            assert lr.next_offset is not None
            payload = lr.snapshot()
            records, manifest = self.store.messages(lr.partition, lr.next_offset, payload)
            state_partition = self.store.state_partition(lr.partition)
            for key, value in records:
                self._produce(self.store.state_topic, value, key, None, state_partition, producer)
            lr.snapshot_bytes = manifest.size
            total += manifest.size
            payloads[lr.partition] = (payload, lr.next_offset)
        return total, payloads

    def _checkpoint(self, wait_for_commit: bool = True) -> None:
        """Snapshot every changed learner and commit the offsets they reflect.

        At-least-once, the loop waits until the broker acknowledged every prediction and
        dead letter, then writes the snapshots (through their own producer) and goes on:
        the offsets are committed once the snapshots are acknowledged too, which
        :meth:`_settle_checkpoint` notices at a later turn of the loop. Waiting for that
        acknowledgement in the checkpoint took a third of its pause (2-14 ms of 13-28 ms
        on 2 busy cores), and every event arriving meanwhile waited with it. A restore
        resumes from the newest snapshot's own offset, and a snapshot is only written
        once the predictions before it are acknowledged, so a worker that dies with a
        snapshot or a commit in flight replays from the checkpoint before: nothing is
        lost. Periodic checkpoints (``wait_for_commit=False``) do not wait for the
        commit's answer either (:meth:`_on_commit` records it). Before partitions are
        released (revocation, shutdown) everything is waited for.
        """
        assert self.consumer is not None and self.producer is not None
        started = time.monotonic()
        due = [
            lr
            for lr in list(self.stats.learners.values())
            if lr.next_offset is not None and lr.next_offset != lr.snapshot_offset
        ]
        self._since_checkpoint = 0
        if not self.eos:
            # The checkpoint before, if its snapshots are still in flight (normally not:
            # it was written an interval ago). Waited for before this one writes, so
            # that offsets are committed in order.
            self._settle_checkpoint(wait=wait_for_commit or bool(due), sync_commit=wait_for_commit)
        if not due:
            return  # nothing consumed since the last checkpoint, so nothing produced
        offsets = [TopicPartition(lr.topic, lr.partition, lr.next_offset or 0) for lr in due]
        if self.eos:
            if not self._in_txn:  # e.g. a revocation right after a commit
                self._txn_call("begin_transaction", self.producer.begin_transaction)
                self._in_txn = True
            _, payloads = self._write_snapshots(due)
            try:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), TXN_TIMEOUT
                )
                self._commit_transaction()
            except _AbortNeeded as exc:
                self._abort_and_rewind(str(exc))
                return
            for lr in due:
                lr.committed_offset = lr.next_offset
            self._settled(payloads)
        else:
            self._flush()  # predictions and dead letters acknowledged
            t_flushed = time.monotonic()
            size, payloads = self._write_snapshots(due)
            self._unsettled = (offsets, payloads)
            self._settle_checkpoint(wait=wait_for_commit)
        for lr in due:
            lr.snapshot_offset = lr.next_offset
        took = time.monotonic() - started
        self.stats.checkpoint_duration.observe(took)
        if took > SLOW_CHECKPOINT and not self.eos:
            log.info(
                "slow checkpoint: %.0f ms (flush %.0f, snapshot %.0f for %d bytes%s)",
                took * 1e3,
                (t_flushed - started) * 1e3,
                (time.monotonic() - t_flushed) * 1e3,
                size,
                ", acknowledged and committed" if wait_for_commit else "",
            )

    def _settle_checkpoint(self, wait: bool, sync_commit: bool | None = None) -> None:
        """Commit the offsets of the checkpoint in flight once its snapshots are
        acknowledged: at once if they are (or, with ``wait``, once they are), else at a
        later call. The commit waits for its answer with ``sync_commit`` (by default
        ``wait``). A snapshot that cannot be delivered stops the worker (through the
        delivery callback) before its offsets move."""
        unsettled = self._unsettled
        if unsettled is None:
            return
        assert self.consumer is not None and self.snapshot_producer is not None
        if wait:
            self._flush(self.snapshot_producer)
        else:
            self.snapshot_producer.poll(0)  # delivery reports (failures only)
            self._check_delivery()
            if len(self.snapshot_producer):
                return  # not all acknowledged yet
        self._unsettled = None
        offsets, payloads = unsettled
        ours = self.stats.learners
        offsets = [tp for tp in offsets if tp.partition in ours]  # not lost meanwhile
        payloads = {p: v for p, v in payloads.items() if p in ours}
        if offsets:
            try:
                if wait if sync_commit is None else sync_commit:
                    result = self.consumer.commit(offsets=offsets, asynchronous=False)
                    self._on_commit(None, result or [])  # a sync commit calls no callback
                else:
                    self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                self._on_commit(exc, [])
        self._settled(payloads)

    def _settled(self, payloads: dict[int, tuple[bytes, int]]) -> None:
        """A checkpoint is durable: its snapshots are the partitions' rewind points (an
        aborted transaction, or a model that raised in learn_one, returns there)."""
        self._committed.update(payloads)
        for p, offset in list(self._poisoned):
            if p in self._committed and offset < (self._committed[p][1] or 0):
                del self._poisoned[(p, offset)]
        now = time.time()
        for p in payloads:
            lr = self.stats.learners.get(p)
            if lr is not None:
                lr.snapshot_at = now
        self.stats.commits += 1

    def _commit_transaction(self) -> None:
        assert self.producer is not None
        self._txn_call("commit_transaction", self.producer.commit_transaction, TXN_TIMEOUT)
        self._in_txn = False

    def _txn_call(self, name: str, fn: Any, *args: Any) -> None:
        """Call a transactional producer method: retry the retriable, surface the rest."""
        deadline = time.monotonic() + 5 * TXN_TIMEOUT
        while True:
            try:
                fn(*args)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal():
                    raise KafkaFatalError(
                        f"{name} failed fatally ({describe(err)}); another instance with "
                        f"transactional.id riverline-{self.settings.group_id}-"
                        f"{self.settings.instance_id} may have fenced this one"
                    ) from exc
                if err.txn_requires_abort():
                    raise _AbortNeeded(f"{name}: {describe(err)}") from exc
                if err.retriable() and time.monotonic() < deadline:
                    log.warning("%s failed, retrying: %s", name, describe(err))
                    time.sleep(0.5)
                    continue
                raise KafkaFatalError(f"{name} failed: {describe(err)}") from exc

    def _abort_and_rewind(self, why: str) -> None:
        """Abort the open transaction; every learner returns to its last committed state."""
        assert self.producer is not None
        log.warning("aborting the transaction (%s); rewinding to the last checkpoint", why)
        self._txn_call("abort_transaction", self.producer.abort_transaction, TXN_TIMEOUT)
        self._in_txn = False
        self._delivery_error = None
        self.stats.aborts += 1
        for lr in list(self.stats.learners.values()):
            self._rewind_partition(lr)

    def _rewind_partition(self, lr: PartitionLearner) -> None:
        """Replace a learner by its last committed snapshot and seek back to its offset."""
        assert self.consumer is not None
        p = lr.partition
        payload, offset = self._committed.get(p, (None, None))
        if payload is not None and offset is not None:
            fresh = PartitionLearner.restore(
                lr.topic, p, payload, offset, options=self.learner_options, new_model=self.new_model
            )
            fresh.snapshot_offset = offset
        else:  # no snapshot yet: a fresh model from the first offset processed
            fresh = self._fresh_learner(lr.topic, p)
            offset = lr.first_offset
        fresh.snapshot_bytes, fresh.snapshot_at = lr.snapshot_bytes, lr.snapshot_at
        fresh.committed_offset, fresh.high_watermark = lr.committed_offset, lr.high_watermark
        self.stats.learners[p] = fresh
        if offset is not None:
            self.consumer.seek(TopicPartition(lr.topic, p, offset))

    # -- rebalance callbacks (run inside consume()) -------------------------------------
    def _fresh_learner(self, topic: str, partition: int) -> PartitionLearner:
        return PartitionLearner(
            topic,
            partition,
            self.new_model(),
            window=self.settings.window,
            options=self.learner_options,
            new_model=self.new_model,
        )

    def _restore(
        self, tp: TopicPartition, restored: Restored | SnapshotError | None
    ) -> PartitionLearner:
        if isinstance(restored, SnapshotError):
            exc = restored
            if self.settings.on_invalid_snapshot != "fresh":
                raise SnapshotError(
                    f"refusing partition {tp.partition}: {exc}. Check RIVERLINE_SNAPSHOT_KEY "
                    "(every replica needs the same key), or start the partition anew with "
                    "--on-invalid-snapshot fresh"
                ) from exc
            log.error(
                "SNAPSHOT REJECTED for partition %d, starting it with a fresh model "
                "(--on-invalid-snapshot fresh): %s",
                tp.partition,
                exc,
            )
            self.stats.snapshots_rejected += 1
            restored = None
        if restored is None:
            self._committed[tp.partition] = (None, None)
            return self._fresh_learner(tp.topic, tp.partition)
        m = restored.manifest
        learner = PartitionLearner.restore(
            tp.topic,
            tp.partition,
            restored.payload,
            m.next_offset,
            options=self.learner_options,
            new_model=self.new_model,
        )
        learner.snapshot_offset = m.next_offset
        learner.snapshot_bytes = m.size
        learner.snapshot_at = m.created
        learner.restore_seconds = restored.seconds
        self._committed[tp.partition] = (restored.payload, m.next_offset)
        tp.offset = m.next_offset
        log.info(
            "restored partition %d from snapshot at offset %d (%d bytes, %.2fs)",
            tp.partition,
            m.next_offset,
            m.size,
            restored.seconds,
        )
        return learner

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        found = self.store.read_many([tp.partition for tp in partitions]) if partitions else {}
        for tp in partitions:
            self.stats.learners[tp.partition] = self._restore(tp, found[tp.partition])
        # Restored partitions resume at their snapshot's offset; the others at the
        # group's committed offset (or --auto-offset-reset).
        consumer.incremental_assign(partitions)
        self.stats.rebalances["assigned"] += len(partitions)
        self.stats.started = True
        self._assigned_at = time.monotonic()
        if partitions:
            log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        if revoked:
            try:
                self._checkpoint()  # before the partitions are released
            finally:
                for p in revoked:
                    self._drop(p)
                consumer.incremental_unassign(partitions)
            log.info("revoked partitions %s", sorted(revoked))
        self.stats.rebalances["revoked"] += len(revoked)

    def _on_commit(
        self, err: KafkaError | Exception | None, partitions: list[TopicPartition]
    ) -> None:
        """Record an offset commit's result (the consumer calls this for asynchronous
        commits, :meth:`_checkpoint` for synchronous ones). A failed commit costs
        nothing unless the snapshot is lost too (restores resume from the snapshot's
        offset); the next checkpoint commits again."""
        if err is not None:
            log.warning("offset commit failed, will retry: %s", describe(err))
            return
        for tp in partitions:
            learner = self.stats.learners.get(tp.partition)
            if tp.error is not None:
                log.warning(
                    "commit of %s[%d] failed: %s", tp.topic, tp.partition, describe(tp.error)
                )
            elif learner is not None and tp.offset >= 0:
                learner.committed_offset = max(learner.committed_offset or 0, tp.offset)

    def _drop(self, partition: int) -> None:
        """Forget a partition that is no longer ours (revoked or lost)."""
        learner = self.stats.learners.pop(partition, None)
        if learner is not None and learner.baseline is not None:
            # Kept for the run's report, which is read after the last revocation.
            self._dropped_deploy_wait += learner.baseline.deploy_wait_seconds
        self._committed.pop(partition, None)
        self.store.forget(partition)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._lost_at = time.monotonic()
        # Another member owns them now: checkpointing would be wrong.
        if self.eos and self._in_txn:
            self._abort_and_rewind("partitions lost")
        for tp in partitions:
            self._drop(tp.partition)
        if partitions:
            consumer.incremental_unassign(partitions)
        self.stats.rebalances["lost"] += len(partitions)
        log.warning("lost partitions %s", sorted(tp.partition for tp in partitions))

    def _shutdown(self) -> None:
        self.stats.stopping = True
        consumer, producer = self.consumer, self.producer
        try:
            if consumer is not None and producer is not None:
                self._checkpoint()
        finally:
            if consumer is not None:
                consumer.close()  # leaves the group at once (revocation: nothing left to do)
            if producer is not None:
                if self.eos and self._in_txn:
                    self._txn_call("abort_transaction", producer.abort_transaction, TXN_TIMEOUT)
                    self._in_txn = False
                producer.flush(30)
            if self.snapshot_producer is not None:
                self.snapshot_producer.flush(30)  # settled already, unless the checkpoint failed


GC_YOUNG_THRESHOLD = 10_000
# A long batch's predictions go to the producer after about this much work (seconds),
# in chunks of at least MIN_PUBLISH_EVERY events: see Worker._process.
PUBLISH_AFTER = 0.002
MIN_PUBLISH_EVERY = 4
SLOW_CHECKPOINT = 0.1  # seconds: a longer checkpoint is logged with its phases


def tune_gc(preload_baseline: bool = False) -> None:
    """Keep the cyclic garbage collector off the hot path.

    After start-up the process holds ~110k container objects (River, numpy, scikit-learn)
    that live until exit; each full collection walked them all (~50 ms here, one every
    ~20k events). ``gc.freeze()`` moves them out of the collector's sight, and a higher
    young-generation threshold (10,000 allocations instead of 700) makes collections
    rarer. Objects created later are collected as before; reference counting, which
    frees nearly everything, is untouched.
    """
    if preload_baseline:
        # Import now rather than at the first training: no import inside that pause,
        # and scikit-learn's objects are frozen with the rest.
        import scipy.sparse  # noqa: F401
        import sklearn.linear_model  # noqa: F401
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    sys.setswitchinterval(0.0005)


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, reset by exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def where(msg: Message) -> str:
    """``topic[partition]@offset`` of a message."""
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


class _AbortNeeded(RiverlineError):
    """The transaction must be aborted (and the learners rewound)."""
