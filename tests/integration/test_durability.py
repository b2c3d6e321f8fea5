"""Durability against a real broker: kill -9, rebalances, a broker restart, tampered snapshots.

Every scenario ends with the same two checks against an *uninterrupted* reference, the
bare prequential River loop run over each input partition in offset order:

* the final snapshot of every partition (read with ``SnapshotStore.read_many``) holds a
  model whose parameters equal the reference model's, and counters that say each event
  was consumed and learned exactly once;
* every event has at least one prediction (exactly one under ``read_committed`` in
  exactly-once mode), and every published probability equals the reference probability
  for that event (exact float equality: replays after a restore give identical values).

Input arrives at a steady pace while workers are killed, so each kill lands mid-stream;
some kills are aimed inside a checkpoint: the worker is frozen (SIGSTOP) the moment a
snapshot record appears in the state topic and killed there if its snapshot is written
but the offsets it covers are not committed yet (else it goes on and the next try comes).

The broker-restart test runs last: it fails while ``--exit-when-idle`` counts a broker
outage as idle time (the worker then stops, exit code 0, mid-stream).

The workers run with ``RIVERLINE_KAFKA_SESSION_TIMEOUT_MS=6000`` (the broker's minimum):
with librdkafka's default of 45 s, every restart after a kill -9 would wait 45 s for the
dead member to leave the group. No wait in this file is unbounded.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from tests.helpers import features_of, wait_until_listed
from tests.integration.processes import REPO, WorkerProcess, killed_at_exit, worker_env
from worker.broker import LocalBroker, free_port
from worker.config import settings_from_mapping
from worker.loop import Worker
from worker.models import model_factory
from worker.simulate import SimulationConfig, generate
from worker.snapshots import Manifest, Restored, Signer, SnapshotError, SnapshotStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TopicFactory = Callable[..., str]

SNAPSHOT_KEY = "riverline-durability-key-0123456789abcdef"
SPEC, SEED = "logreg", 0
DEADLINE = 60.0  # seconds; no single wait in this file is longer (except the broker's start)
GROUP_ENV = {
    # The broker's minimum session timeout: a killed member leaves the group after 6 s.
    "RIVERLINE_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "RIVERLINE_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
}
CHECKPOINTS = ["--commit-interval", "0.5", "--commit-events", "1500"]


def _rng() -> random.Random:
    seed = int(os.environ.get("RIVERLINE_TEST_SEED", time.time_ns() % 1_000_000))
    print(f"random seed {seed} (set RIVERLINE_TEST_SEED={seed} to replay the kill timings)")
    return random.Random(seed)


# -- events and topics ---------------------------------------------------------------------
def _events(n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    config = SimulationConfig(
        n_events=n, seed=seed, label_rate=0.8, scenario="abrupt", event_id_prefix=prefix
    )
    return list(generate(config))


@dataclass(frozen=True)
class Run:
    """The topics and group of one scenario."""

    bootstrap: str
    input: str
    output: str
    dlq: str
    state: str
    group: str
    partitions: int

    def store(self, key: str = SNAPSHOT_KEY) -> SnapshotStore:
        store = SnapshotStore(
            {"bootstrap.servers": self.bootstrap},
            self.group,
            self.input,
            self.state,
            Signer(key.encode()),
        )
        store.ensure_topic(self.partitions)  # learns the state topic's partition count
        return store


def _run(bootstrap: str, new_topic: TopicFactory, partitions: int) -> Run:
    return Run(
        bootstrap,
        new_topic("clicks", partitions=partitions),
        new_topic("predictions", partitions=partitions),
        new_topic("dlq", partitions=partitions),
        new_topic("state", partitions=partitions, config={"cleanup.policy": "compact"}),
        f"riverline-durable-{uuid.uuid4().hex[:10]}",
        partitions,
    )


QUIET = {"log_level": 0}  # clients that see the broker go away on purpose


def _producer(bootstrap: str, **extra: Any) -> Producer:
    conf = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    return Producer({**conf, **extra})


def _send(producer: Producer, topic: str, events: list[dict[str, Any]]) -> None:
    for ev in events:
        while True:
            try:
                producer.produce(topic, orjson.dumps(ev), ev["user_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)


class PacedProducer:
    """Produce ``initial`` events at once, then the rest at ``rate`` per second, on a thread.

    :meth:`finish` produces whatever is left at once. The producer rides out broker outages
    (librdkafka buffers; idempotence keeps order without duplicates).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events: list[dict[str, Any]],
        initial: int,
        rate: float,
        **extra: Any,
    ) -> None:
        self.bootstrap, self.topic, self.events = bootstrap, topic, events
        self.extra = extra
        self.initial, self.rate = initial, rate
        self.sent = 0
        self.error: BaseException | None = None
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._main, name="paced-producer", daemon=True)

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            producer = _producer(self.bootstrap, **self.extra)
            _send(producer, self.topic, self.events[: self.initial])
            self.sent = self.initial
            started = time.monotonic()
            while self.sent < len(self.events):
                if self._hurry.is_set():
                    upto = len(self.events)
                else:
                    time.sleep(0.05)
                    due = self.initial + int((time.monotonic() - started) * self.rate)
                    upto = min(len(self.events), due)
                _send(producer, self.topic, self.events[self.sent : upto])
                self.sent = max(self.sent, upto)
            remaining = producer.flush(120)
            if remaining:
                raise AssertionError(f"{remaining} input event(s) not delivered within 120s")
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self.error = exc

    @property
    def done(self) -> bool:
        return self.sent >= len(self.events)

    def finish(self, timeout: float = 150.0) -> None:
        self._hurry.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the input was not delivered within {timeout:.0f}s"
        if self.error is not None:
            raise AssertionError(f"producing the input failed: {self.error!r}") from self.error


# -- worker processes ----------------------------------------------------------------------
def _worker(run: Run, log: Path, *extra: str, key: str = SNAPSHOT_KEY) -> WorkerProcess:
    """``riverline run`` on the run's topics and group, with the short session timeout."""
    args = [
        "--bootstrap-servers",
        run.bootstrap,
        "--input-topic",
        run.input,
        "--output-topic",
        run.output,
        "--dead-letter-topic",
        run.dlq,
        "--state-topic",
        run.state,
        "--group-id",
        run.group,
        "--model",
        SPEC,
        "--seed",
        str(SEED),
        "--metrics-address",
        "off",
        *extra,
    ]
    return WorkerProcess(log, args, worker_env(key, **GROUP_ENV))


# -- reading topics --------------------------------------------------------------------------
def _consumer(bootstrap: str, **extra: Any) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
            **extra,
        }
    )


def _read_all(
    bootstrap: str,
    topic: str,
    committed: bool = True,
    start: Callable[[int, int, int], int] | None = None,
    timeout: float = DEADLINE,
) -> dict[int, list[Message]]:
    """Each partition's records up to its current end (``start(p, low, high)``: from where)."""
    consumer = _consumer(
        bootstrap,
        **{
            "enable.partition.eof": True,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
        },
    )
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        got: dict[int, list[Message]] = {p: [] for p in parts}
        assignment, pending = [], set()
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            offset = max(low, start(p, low, high)) if start else low
            if high > offset:
                assignment.append(TopicPartition(topic, p, offset))
                pending.add(p)
        if assignment:
            consumer.assign(assignment)
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, f"{topic}: partitions {pending} not read in time"
            for msg in consumer.consume(1000, timeout=0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())  # type: ignore[arg-type]
                        continue
                    raise AssertionError(f"reading {topic}: {err}")
                got[msg.partition()].append(msg)  # type: ignore[index]
        return got
    finally:
        consumer.close()


class Tail:
    """Counts a topic's records as they arrive (read_uncommitted: open transactions too)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = _consumer(bootstrap, **{"isolation.level": "read_uncommitted"})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.count = 0
        self.per_partition: Counter[int] = Counter()

    def poll(self, timeout: float = 0.05) -> int:
        n = 0
        for msg in self.consumer.consume(1000, timeout=timeout):
            if msg.error() is None:
                n += 1
                self.per_partition[msg.partition()] += 1  # type: ignore[index]
        self.count += n
        return n

    def drain(self, quiet: float = 0.5, timeout: float = 30.0) -> None:
        """Read until nothing new arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            assert time.monotonic() < deadline, "the topic did not go quiet"
            if self.poll(0.1):
                last = time.monotonic()

    def wait_beyond(self, count: int, proc: WorkerProcess, what: str, timeout: float) -> float:
        """Poll until more than ``count`` records were seen; return when that happened."""
        deadline = time.monotonic() + timeout
        while self.count <= count:
            assert proc.alive(), f"the worker exited before {what}; log:\n{proc.tail()}"
            assert time.monotonic() < deadline, (
                f"timed out after {timeout:.0f}s waiting for {what}; log:\n{proc.tail()}"
            )
            self.poll(0.02)
        return time.monotonic()

    def close(self) -> None:
        self.consumer.close()


def _committed(run: Run) -> dict[int, int]:
    # read_uncommitted: a read_committed consumer would wait for a dead producer's open
    # transaction (KIP-447 stable offsets) before answering.
    consumer = Consumer(
        {
            "bootstrap.servers": run.bootstrap,
            "group.id": run.group,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        tps = consumer.committed(
            [TopicPartition(run.input, p) for p in range(run.partitions)], timeout=30
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in tps}


@dataclass
class StateTail:
    """The newest state records of one input partition (manifest, chunks after it)."""

    manifest: Manifest | None = None
    manifest_raw: bytes | None = None
    chunks_after_manifest: int = 0


def _state_ends(run: Run) -> dict[int, int]:
    # read_uncommitted: the high watermark, not the last stable offset before an open
    # transaction (whose records the killed process wrote before this restart).
    consumer = _consumer(run.bootstrap, **{"isolation.level": "read_uncommitted"})
    try:
        parts = consumer.list_topics(run.state, timeout=10).topics[run.state].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(run.state, p), timeout=10)[1]
            for p in parts
        }
    finally:
        consumer.close()


def _state_tails(
    run: Run, committed: bool, since: dict[int, int] | None = None
) -> dict[int, StateTail]:
    """Per input partition, the newest manifest and the chunks written after it, among the
    state records from ``since`` (state partition → offset; default: the beginning)."""
    store = SnapshotStore({}, run.group, run.input, run.state, Signer(b"-" * 16))
    bases = {store.key(p): p for p in range(run.partitions)}
    records = _read_all(
        run.bootstrap,
        run.state,
        committed=committed,
        start=None if since is None else (lambda p, low, high: since.get(p, 0)),
    )
    out = {p: StateTail() for p in range(run.partitions)}
    for msgs in records.values():
        for msg in msgs:
            key = msg.key() or b""
            if key in bases:
                tail = out[bases[key]]
                value = msg.value()
                tail.manifest = Manifest.decode(value) if value else None
                tail.manifest_raw = value
                tail.chunks_after_manifest = 0
            elif key.rsplit(b"/", 2)[0] in bases and msg.value() is not None:
                out[bases[key.rsplit(b"/", 2)[0]]].chunks_after_manifest += 1
    return out


def _inside_checkpoint(run: Run, since: dict[int, int]) -> list[str]:
    """What a kill interrupted, judging by the state records its process wrote (those
    after ``since``): snapshot chunks without their manifest, or snapshots whose offsets
    were never committed (read_uncommitted, so the killed transaction's count)."""
    committed = _committed(run)
    found = []
    for p, tail in _state_tails(run, committed=False, since=since).items():
        if tail.chunks_after_manifest:
            found.append(f"p{p}: {tail.chunks_after_manifest} chunk(s) without their manifest")
        if tail.manifest is not None and tail.manifest.next_offset > committed[p]:
            found.append(
                f"p{p}: snapshot at {tail.manifest.next_offset}, offset commit at {committed[p]}"
            )
    return found


# -- the reference and the checks ------------------------------------------------------------
@dataclass
class Reference:
    """The uninterrupted prequential loop over each partition, in offset order."""

    events: dict[int, list[dict[str, Any]]]
    want: dict[str, tuple[int, int, float, str]]  # event id -> partition, offset, p, version
    models: dict[int, Any]
    learned: dict[int, int]

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.events.values())


def _reference(run: Run) -> Reference:
    records = _read_all(run.bootstrap, run.input)
    ref = Reference({}, {}, {}, {})
    for p, msgs in sorted(records.items()):
        model = model_factory(SPEC, SEED)()
        learned = 0
        events = []
        for i, msg in enumerate(msgs):
            assert msg.offset() == i, f"input partition {p}: offset {msg.offset()} at index {i}"
            ev = orjson.loads(msg.value())  # type: ignore[arg-type]
            x = features_of(ev)
            proba = model.predict_proba_one(x).get(True, 0.0)
            ref.want[ev["event_id"]] = (p, i, proba, f"{p}:{learned}")
            if ev.get("clicked") is not None:
                model.learn_one(x, ev["clicked"])
                learned += 1
            events.append(ev)
        ref.events[p], ref.models[p], ref.learned[p] = events, model, learned
    return ref


def _probes(n: int = 300) -> list[dict[str, Any]]:
    return [features_of(ev) for ev in _events(n, seed=999, prefix="probe-")]


def _check_final_models(run: Run, ref: Reference) -> dict[int, int]:
    """Every partition's final snapshot equals the reference; returns the snapshot sizes."""
    found = run.store().read_many(list(range(run.partitions)))
    probes = _probes()
    sizes = {}
    for p in range(run.partitions):
        restored = found[p]
        assert isinstance(restored, Restored), f"partition {p}: no valid snapshot ({restored!r})"
        n = len(ref.events[p])
        assert restored.manifest.next_offset == n, (
            f"partition {p}: final snapshot at offset {restored.manifest.next_offset}, "
            f"the partition has {n} events"
        )
        state = pickle.loads(restored.payload)
        assert state["learned"] == ref.learned[p], (
            f"partition {p}: learned {state['learned']}, want {ref.learned[p]} (labelled events)"
        )
        for counter in ("consumed", "predicted"):
            if counter in state:
                assert state[counter] == n, f"partition {p}: {counter} {state[counter]}, want {n}"
        got, want = state["model"]["LogisticRegression"], ref.models[p]["LogisticRegression"]
        gw, ww = dict(got.weights), dict(want.weights)
        differ = [k for k in set(gw) | set(ww) if gw.get(k) != ww.get(k)]
        assert not differ, (
            f"partition {p}: {len(differ)} of {len(ww)} weights differ from the reference, "
            f"e.g. {[(k, gw.get(k), ww.get(k)) for k in differ[:3]]}"
        )
        assert got.intercept == want.intercept, f"partition {p}: intercept differs"
        gp = [state["model"].predict_proba_one(x).get(True, 0.0) for x in probes]
        wp = [ref.models[p].predict_proba_one(x).get(True, 0.0) for x in probes]
        assert gp == wp, f"partition {p}: probe predictions differ"
        sizes[p] = restored.manifest.size
    return sizes


def _check_predictions(run: Run, ref: Reference, exactly_once: bool) -> Counter[str]:
    """Every event predicted with the reference value; returns the count per event id."""
    msgs = [m for ms in _read_all(run.bootstrap, run.output).values() for m in ms]
    counts: Counter[str] = Counter()
    wrong = []
    for msg in msgs:
        pred = orjson.loads(msg.value())  # type: ignore[arg-type]
        eid = pred["event_id"]
        counts[eid] += 1
        want = ref.want.get(eid)
        got = (pred["partition"], pred["offset"], pred["click_probability"], pred["model_version"])
        if want != got:
            wrong.append((eid, got, want))
    assert not wrong, (
        f"{len(wrong)} prediction(s) differ from the uninterrupted reference "
        f"(partition, offset, p, model_version), e.g. {wrong[:3]}"
    )
    missing = set(ref.want) - set(counts)
    assert not missing, f"{len(missing)} event(s) never predicted, e.g. {sorted(missing)[:5]}"
    if exactly_once:
        twice = [eid for eid, c in counts.items() if c > 1]
        assert not twice, f"{len(twice)} event(s) predicted twice (read_committed): {twice[:5]}"
    return counts


# -- kill -9 -----------------------------------------------------------------------------------
@dataclass
class KillReport:
    kills: int = 0
    inside_checkpoint: dict[int, list[str]] = field(default_factory=dict)  # kill → what
    recovery: list[float] = field(default_factory=list)  # restart → first new prediction
    kills_mid_stream: int = 0  # input still arriving when the kill landed

    def summary(self) -> str:
        rec = ", ".join(f"{r:.1f}" for r in self.recovery)
        return (
            f"{self.kills} kills ({self.kills_mid_stream} while input was still arriving), "
            f"{len(self.inside_checkpoint)} inside a checkpoint {self.inside_checkpoint}; "
            f"recovery (restart → first new prediction) s: [{rec}]"
        )


def _freeze_inside_checkpoint(
    run: Run, proc: WorkerProcess, state_tail: Tail, since: dict[int, int], timeout: float = 20.0
) -> list[str]:
    """Stop the worker (SIGSTOP) the moment a new snapshot record appears; keep it stopped
    if it froze inside a checkpoint, else let it go on (SIGCONT) and try the next one.

    Returns what the frozen worker left unfinished (empty when every try missed).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state_tail.poll(0)
        state_tail.wait_beyond(state_tail.count, proc, "a snapshot record", DEADLINE)
        proc.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.1)  # requests already sent settle on the broker
        inside = _inside_checkpoint(run, since)
        if inside:
            return inside
        proc.proc.send_signal(signal.SIGCONT)
    return []


def _kill_cycle(
    run: Run,
    tmp_path: Path,
    producer: PacedProducer,
    extra: list[str],
    rng: random.Random,
    min_kills: int = 5,
    max_kills: int = 8,
) -> KillReport:
    """Start, wait for new predictions, SIGKILL; again and again.

    Odd-numbered kills come after a random 0-1.5 s. Even ones are aimed inside a
    checkpoint: the worker is frozen when a snapshot record appears, and killed if the
    snapshot is written but its offsets are not committed yet. Goes on past ``min_kills``
    until one kill did land inside a checkpoint (or ``max_kills``).
    """
    report = KillReport()
    out_tail = Tail(run.bootstrap, run.output)
    state_tail = Tail(run.bootstrap, run.state)
    try:
        while report.kills < min_kills or (
            not report.inside_checkpoint and report.kills < max_kills
        ):
            out_tail.drain()
            state_tail.drain()
            since = _state_ends(run)
            proc = _worker(run, tmp_path / f"run-{report.kills}.log", *CHECKPOINTS, *extra)
            try:
                first = out_tail.wait_beyond(
                    out_tail.count, proc, "a new prediction after the restart", DEADLINE
                )
                report.recovery.append(first - proc.started)
                if report.kills % 2:
                    _freeze_inside_checkpoint(run, proc, state_tail, since)
                else:
                    time.sleep(rng.uniform(0.0, 1.5))
                assert proc.alive(), f"the worker exited on its own; log:\n{proc.tail()}"
                mid_stream = not producer.done
            finally:
                proc.kill()  # SIGKILL (also when frozen by SIGSTOP)
            report.kills += 1
            report.kills_mid_stream += mid_stream
            interrupted = _inside_checkpoint(run, since)
            if interrupted:
                report.inside_checkpoint[report.kills] = interrupted
    finally:
        out_tail.close()
        state_tail.close()
    return report


def _finish(run: Run, tmp_path: Path, extra: list[str], timeout: float = 120.0) -> float:
    proc = _worker(run, tmp_path / "final.log", *CHECKPOINTS, *extra, "--exit-when-idle", "3")
    rc = proc.wait(timeout)
    assert rc == 0, f"the final run exited with {rc}; log:\n{proc.tail()}"
    return time.monotonic() - proc.started


@pytest.mark.parametrize(
    ("guarantee", "n_events"), [("at-least-once", 20_000), ("exactly-once", 10_000)]
)
def test_kill_9_at_random_moments_loses_and_double_learns_nothing(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    tmp_path: Path,
    guarantee: str,
    n_events: int,
) -> None:
    started = time.monotonic()
    rng = _rng()
    run = _run(kafka_bootstrap, new_topic, partitions=3)
    eos = guarantee == "exactly-once"
    # Restarts reuse the instance id: the new process fences the old one and aborts its
    # open transaction at once.
    extra = ["--guarantee", guarantee, "--instance-id", "w1"]
    events = _events(n_events, seed=21, prefix=f"{guarantee}-")
    # Two minutes of input at this pace, so that every kill lands while events still
    # arrive: the kill cycle took 30-45 s here (a restart waits out the dead member's
    # session), and finish() sends what is left at once, so a slower pace costs no time.
    producer = PacedProducer(run.bootstrap, run.input, events, initial=2000, rate=n_events / 120)
    producer.start()
    try:
        report = _kill_cycle(run, tmp_path, producer, extra, rng)
    finally:
        producer.finish()
    final_s = _finish(run, tmp_path, extra)

    ref = _reference(run)
    assert ref.total == n_events
    sizes = _check_final_models(run, ref)
    counts = _check_predictions(run, ref, exactly_once=eos)
    duplicates = sum(counts.values()) - len(counts)
    extra_info = ""
    if eos:
        everything = _read_all(run.bootstrap, run.output, committed=False)
        aborted = sum(len(v) for v in everything.values()) - sum(counts.values())
        extra_info = f", {aborted} prediction(s) in aborted transactions (invisible)"
    print(
        f"{guarantee}: {n_events} events over {run.partitions} partitions; {report.summary()}; "
        f"{duplicates} duplicate prediction(s){extra_info}; final run {final_s:.1f}s; "
        f"snapshot bytes {sizes}; test took {time.monotonic() - started:.0f}s"
    )
    assert report.kills >= 5
    assert report.kills_mid_stream >= 5, report.summary()
    assert report.inside_checkpoint, f"no kill landed inside a checkpoint: {report.summary()}"


# -- rebalances ---------------------------------------------------------------------------------
def test_rebalances_join_leave_and_kill_neither_skip_nor_repeat_learning(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    started = time.monotonic()
    rng = _rng()
    run = _run(kafka_bootstrap, new_topic, partitions=4)
    events = _events(12_000, seed=5, prefix="rebalance-")
    producer = PacedProducer(run.bootstrap, run.input, events, initial=1000, rate=250)
    producer.start()
    timeline = []
    try:
        with killed_at_exit() as procs:
            tail = Tail(run.bootstrap, run.output)
            try:
                a = _worker(run, tmp_path / "a.log", *CHECKPOINTS, "--instance-id", "a")
                procs.append(a)
                tail.wait_beyond(0, a, "A's first prediction", DEADLINE)
                a.wait_log(lambda w: w.assigned() == {0, 1, 2, 3}, "A owning 4 partitions", 10)
                time.sleep(rng.uniform(0.5, 1.5))

                b = _worker(run, tmp_path / "b.log", *CHECKPOINTS, "--instance-id", "b")
                procs.append(b)
                b.wait_log(lambda w: bool(w.assigned()), "B's first partitions", DEADLINE)
                timeline.append(f"B joined: took {sorted(b.assigned())}")
                n = tail.count
                tail.wait_beyond(n + 200, b, "predictions after B joined", DEADLINE)

                a.terminate()
                rc = a.wait(30)
                assert rc == 0, f"A exited with {rc} after SIGTERM; log:\n{a.tail()}"
                b.wait_log(lambda w: w.assigned() == {0, 1, 2, 3}, "B taking A's partitions", 30)
                timeline.append("A stopped (SIGTERM): B owns all")
                n = tail.count
                tail.wait_beyond(n + 200, b, "predictions after A left", DEADLINE)

                # C's idle clock starts at its first (empty, cooperative) assignment: its
                # limit must outlast the rebalance's second round, B's checkpoint included.
                c = _worker(
                    run, tmp_path / "c.log", *CHECKPOINTS, "--instance-id", "c",
                    "--exit-when-idle", "10",
                )  # fmt: skip
                procs.append(c)
                c.wait_log(lambda w: bool(w.assigned()), "C's first partitions", DEADLINE)
                first_c = c.assigned()
                timeline.append(f"C joined: took {sorted(first_c)}")
                n = tail.count
                tail.wait_beyond(n + 100, c, "predictions after C joined", DEADLINE)
                time.sleep(rng.uniform(0.0, 1.0))
                assert not producer.done, "the input ran out before B was killed"
                b.kill()
                killed = time.monotonic()
                c.wait_log(
                    lambda w: w.assigned() == {0, 1, 2, 3}, "C taking B's partitions", DEADLINE
                )
                timeline.append(
                    f"B killed (SIGKILL): C owns all after {time.monotonic() - killed:.1f}s"
                )
            finally:
                tail.close()
            producer.finish()
            rc = c.wait(120)
            assert rc == 0, f"C exited with {rc}; log:\n{c.tail()}"
    finally:
        producer.finish()

    ref = _reference(run)
    assert ref.total == len(events)
    _check_final_models(run, ref)
    counts = _check_predictions(run, ref, exactly_once=False)
    print(
        f"rebalance: {'; '.join(timeline)}; {sum(counts.values()) - len(counts)} duplicate "
        f"prediction(s); test took {time.monotonic() - started:.0f}s"
    )


# -- tampered snapshots ---------------------------------------------------------------------------
def _produce_state(run: Run, records: list[tuple[bytes, bytes | None]], partition: int) -> None:
    producer = _producer(run.bootstrap)
    for key, value in records:
        producer.produce(run.state, value, key, partition=partition)
    assert producer.flush(30) == 0


class _NoUnpickle:
    """Stands in for the ``pickle`` module of worker.learner: loads() must not be called."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    def loads(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise AssertionError("an unverified snapshot was unpickled")


def test_tampered_snapshots_are_refused_and_never_unpickled(
    kafka_bootstrap: str,
    new_topic: TopicFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    run = _run(kafka_bootstrap, new_topic, partitions=1)
    producer = _producer(run.bootstrap)
    first = _events(2000, seed=13, prefix="tamper-")
    _send(producer, run.input, first)
    assert producer.flush(30) == 0
    proc = _worker(run, tmp_path / "normal.log", *CHECKPOINTS, "--exit-when-idle", "2")
    assert proc.wait(DEADLINE) == 0, proc.tail()

    tail = _state_tails(run, committed=True)[0]
    manifest, original = tail.manifest, tail.manifest_raw
    assert manifest is not None and original is not None
    assert manifest.next_offset == len(first)
    store = run.store()
    good = store.read_latest(0)
    assert good is not None
    chunk0 = store.key(0) + f"/{manifest.snapshot_id}/0".encode()
    size0 = min(store.chunk_bytes, manifest.size)
    sp = store.state_partition(0)

    def flip(raw: bytes, field_name: str) -> bytes:
        data = orjson.loads(raw)
        value = data[field_name]
        if field_name == "hmac":
            swapped = "0" if value[7] != "0" else "1"
            data["hmac"] = value[:7] + swapped + value[8:]
        else:
            data[field_name] = value - 1  # e.g. replay the last event into the model
        return orjson.dumps(data)

    other = SnapshotStore({}, run.group, run.input, run.state, Signer(b"other" * 8))
    forged, _ = other.messages(0, manifest.next_offset, good.payload)
    cases: list[tuple[str, list[tuple[bytes, bytes | None]]]] = [
        ("flipped hmac byte", [(store.key(0), flip(original, "hmac"))]),
        ("altered next_offset", [(store.key(0), flip(original, "next_offset"))]),
        ("signed with another key", forged),
        ("truncated chunk", [(chunk0, good.payload[: size0 - 7])]),
    ]
    restore = [(store.key(0), original), (chunk0, good.payload[:size0])]
    outcomes = []
    for i, (what, records) in enumerate(cases):
        _produce_state(run, records, sp)
        with pytest.raises(SnapshotError, match="failed verification"):
            run.store().read_latest(0)
        proc = _worker(run, tmp_path / f"tampered-{i}.log", "--exit-when-idle", "2")
        rc = proc.wait(DEADLINE)
        text = proc.text
        assert rc == 1, f"{what}: exit code {rc}, want 1; log:\n{proc.tail()}"
        assert "failed verification" in text and "not deserialised" in text, (
            f"{what}: the refusal does not say why; log:\n{proc.tail()}"
        )
        assert "refusing partition 0" in text
        outcomes.append(f"{what}: exit {rc}")
        _produce_state(run, restore, sp)  # the genuine snapshot is the newest again
        again = run.store().read_latest(0)
        assert again is not None and again.payload == good.payload

    # --on-invalid-snapshot fresh: the partition starts anew (in this process, so that the
    # counter can be read and pickle.loads watched).
    _produce_state(run, cases[0][1], sp)
    second = _events(1000, seed=14, prefix="tamper-fresh-")
    _send(producer, run.input, second)
    assert producer.flush(30) == 0
    import worker.learner

    watch = _NoUnpickle()
    monkeypatch.setattr(worker.learner, "pickle", watch)
    settings = settings_from_mapping(
        {
            "bootstrap_servers": run.bootstrap,
            "input_topic": run.input,
            "output_topic": run.output,
            "dead_letter_topic": run.dlq,
            "state_topic": run.state,
            "group_id": run.group,
            "metrics_address": "off",
            "exit_when_idle": 2.0,
            "commit_interval": 1.0,
            "on_invalid_snapshot": "fresh",
        },
        env={"RIVERLINE_SNAPSHOT_KEY": SNAPSHOT_KEY},
    )
    w = Worker(settings)
    error: list[BaseException] = []

    def main() -> None:
        try:
            w.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if thread.is_alive():
        w.request_stop()
        thread.join(30)
        raise AssertionError("the --on-invalid-snapshot fresh worker did not stop by itself")
    assert not error, f"the worker raised {error[0]!r}"
    assert watch.calls == 0
    assert w.stats.snapshots_rejected == 1
    monkeypatch.undo()

    # Fresh model, resuming at the group's committed offset: the new events only.
    preds = [orjson.loads(m.value()) for m in _read_all(run.bootstrap, run.output)[0]]  # type: ignore[arg-type]
    fresh = preds[len(first) :]
    model = model_factory(SPEC, SEED)()
    want = []
    for ev in second:
        x = features_of(ev)
        want.append((ev["event_id"], model.predict_proba_one(x).get(True, 0.0)))
        if ev.get("clicked") is not None:
            model.learn_one(x, ev["clicked"])
    assert [(p["event_id"], p["click_probability"]) for p in fresh] == want
    assert fresh[0]["model_version"] == "0:0"
    final = run.store().read_latest(0)
    assert final is not None and final.manifest.next_offset == len(first) + len(second)
    state = pickle.loads(final.payload)
    assert state["learned"] == sum(ev.get("clicked") is not None for ev in second)
    got_w = dict(state["model"]["LogisticRegression"].weights)
    assert got_w == dict(model["LogisticRegression"].weights)
    print(
        f"tampering: {'; '.join(outcomes)}; fresh: {w.stats.snapshots_rejected} rejected, "
        f"{len(fresh)} predictions from a fresh model; test took "
        f"{time.monotonic() - started:.0f}s"
    )


# -- a broker restart (last: it fails while the idle bug below is open) --------------------------
def _libs_dir() -> Path:
    state = Path(os.environ.get("RIVERLINE_TEST_BROKER_DIR", REPO / ".riverline" / "test-broker"))
    return state / "libs"


def _worker_lines(proc: WorkerProcess, n: int = 8) -> str:
    """The worker's own log lines (not librdkafka's connection errors)."""
    lines = [ln for ln in proc.text.splitlines() if " librdkafka: " not in ln]
    return "\n".join(lines[-n:])


def test_the_worker_rides_out_a_broker_restart(tmp_path: Path) -> None:
    """Stop the broker mid-stream for a while, start it again on the same port and data;
    the worker (never restarted) must carry on and finish with exact models.

    Two workers in two groups read the same input through the same outage: ``w`` with an
    idle limit longer than the outage, ``short`` with ``--exit-when-idle 4``. No event can
    arrive while the broker is down, but that is not the end of the input: both must
    finish the whole stream.
    """
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("no Java, and CI is set: this test starts a broker of its own")
        pytest.skip("no Java: this test starts a broker of its own")
    started = time.monotonic()
    broker = LocalBroker(state_dir=tmp_path / "b", port=free_port(), libs_dir=_libs_dir())
    bootstrap = broker.start()
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap, **QUIET})
        suffix = uuid.uuid4().hex[:8]
        clicks = f"clicks-{suffix}"
        runs = {}
        topics = [NewTopic(clicks, num_partitions=3, replication_factor=1)]
        for name in ("w", "short"):
            runs[name] = Run(
                bootstrap,
                clicks,
                f"predictions-{name}-{suffix}",
                f"dlq-{name}-{suffix}",
                f"state-{name}-{suffix}",
                group=f"riverline-outage-{name}-{suffix}",
                partitions=3,
            )
            topics += [
                NewTopic(t, num_partitions=3, replication_factor=1)
                for t in (runs[name].output, runs[name].dlq)
            ]
            topics.append(
                NewTopic(
                    runs[name].state,
                    num_partitions=3,
                    replication_factor=1,
                    config={"cleanup.policy": "compact"},
                )
            )
        for fut in admin.create_topics(topics).values():
            fut.result(timeout=30)
        for t in topics:
            wait_until_listed(admin, t.topic, t.num_partitions)
        run = runs["w"]
        events = _events(8000, seed=9, prefix="outage-")
        # Its reconnect backoff bounded at 1 s (librdkafka's default grows to 10 s): the
        # test is of the worker's idle limit after the broker is back, not of how long an
        # upstream producer waits before it reconnects.
        producer = PacedProducer(
            bootstrap, clicks, events, initial=1000, rate=400, **QUIET,
            **{"reconnect.backoff.max.ms": 1000},
        )  # fmt: skip
        producer.start()
        with killed_at_exit() as procs:
            w = _worker(run, tmp_path / "w.log", *CHECKPOINTS, "--exit-when-idle", "30")
            short = _worker(
                runs["short"], tmp_path / "short.log", *CHECKPOINTS, "--exit-when-idle", "4"
            )
            procs += [w, short]
            tail = Tail(bootstrap, run.output)
            try:
                # Every partition mid-stream, with predictions not yet checkpointed.
                deadline = time.monotonic() + DEADLINE
                while min(tail.per_partition[p] for p in range(3)) < 300:
                    assert w.alive(), f"the worker exited early; log:\n{w.tail()}"
                    assert time.monotonic() < deadline, f"too few predictions: {tail.per_partition}"
                    tail.poll(0.05)
            finally:
                tail.close()
            before = time.monotonic()
            broker.stop()
            stopped = time.monotonic()
            # Down for 4 s, plus the broker's start (about 3 s): longer than the session
            # timeout (6 s), and ending while the short worker's first idle check (4 s
            # after its last event) still waits for the broker's metadata. That check
            # then succeeds with every partition caught up, before the producer has
            # reconnected: it must not end the run.
            time.sleep(4)
            assert w.alive(), f"the worker died while the broker was down; log:\n{w.tail()}"
            broker.start()
            back = time.monotonic()
            producer.finish()
            rc = w.wait(120)
            assert rc == 0, f"the worker exited with {rc}; log:\n{w.tail()}"
            finished = time.monotonic()
            short_rc = short.wait(60)
        ref = _reference(run)
        assert ref.total == len(events)
        _check_final_models(run, ref)
        counts = _check_predictions(run, ref, exactly_once=False)
        print(
            f"broker restart: stop took {stopped - before:.1f}s, outage {back - before:.1f}s, "
            f"worker done {finished - back:.1f}s after the broker was back (incl. 30s idle); "
            f"{sum(counts.values()) - len(counts)} duplicate prediction(s); "
            f"test took {time.monotonic() - started:.0f}s"
        )
        # The worker with the short idle limit: the outage is not the end of the input.
        assert short_rc == 0, f"exit code {short_rc}; log:\n{short.tail()}"
        short_preds = _read_all(bootstrap, runs["short"].output)
        n_short = len(
            {orjson.loads(m.value())["event_id"] for ms in short_preds.values() for m in ms}
        )  # type: ignore[arg-type]
        assert n_short == len(events), (
            f"--exit-when-idle 4 stopped the worker during the broker outage after "
            f"{n_short} of {len(events)} events, with exit code 0 (idle time counted while "
            f"the broker was unreachable); log:\n{_worker_lines(short)}"
        )
        _check_final_models(runs["short"], ref)
    finally:
        broker.stop()
