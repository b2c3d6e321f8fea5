"""The worker end to end against a real broker: predictions, dead letters, shutdown, groups.

Every test produces its input first (or once the group has settled), runs the worker
(in this process on a thread, or as ``python -m worker run``), then reads the output
topics back from the beginning. No wait is unbounded.

The central check is the prequential oracle: every published ``click_probability`` must
be exactly what a bare River loop (predict, then learn when labelled) gives on the same
events in the same order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jsonschema_rs
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
from prometheus_client.parser import text_string_to_metric_families
from river import metrics, utils

from tests.helpers import features_of
from tests.integration.processes import REPO, WorkerProcess, killed_at_exit, worker_env
from worker.broker import free_port
from worker.config import Settings, settings_from_mapping
from worker.events import REASONS
from worker.kafka import consumer_config
from worker.learner import PartitionLearner
from worker.loop import Worker
from worker.metrics import MetricsServer
from worker.models import model_factory
from worker.simulate import SimulationConfig, generate

pytestmark = pytest.mark.integration

TopicFactory = Callable[..., str]
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]

SCHEMAS = REPO / "schemas"
DEADLINE = 60.0  # seconds: the bound on a wait (restarts that replay a stream get 90)
IDLE = 2.0  # --exit-when-idle of the in-process runs
SNAPSHOT_KEY = "riverline-test-snapshot-key-0123456789"


# -- helpers -------------------------------------------------------------------------------
def _events(n: int, seed: int = 7, label_rate: float = 0.8, prefix: str = "e-") -> list[dict]:
    config = SimulationConfig(
        n_events=n, seed=seed, label_rate=label_rate, scenario="abrupt", event_id_prefix=prefix
    )
    return list(generate(config))


def _event_record(ev: dict[str, Any]) -> Record:
    return ev["user_id"].encode(), orjson.dumps(ev), None


def _produce(bootstrap: str, topic: str, records: Iterable[Record]) -> int:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    n = 0
    for key, value, headers in records:
        while True:
            try:
                if headers is None:
                    producer.produce(topic, value=value, key=key)
                else:
                    producer.produce(topic, value=value, key=key, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
    remaining = producer.flush(30)
    assert remaining == 0, f"{remaining} message(s) not delivered within 30s"
    return n


def _reader(bootstrap: str, **extra: Any) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            **extra,
        }
    )


def _read_topic(
    bootstrap: str, topic: str, at_least: int = 0, timeout: float = DEADLINE
) -> list[Message]:
    """Every record of every partition, from the beginning to the end (read_committed).

    Returns once every partition has reported its end and ``at_least`` records were read.
    """
    consumer = _reader(bootstrap)
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        assert parts, f"topic {topic} has no partitions"
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        got: list[Message] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while not (len(got) >= at_least and at_end == set(parts)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{topic}: read {len(got)} record(s), wanted at least {at_least}, "
                    f"partitions at end {sorted(at_end)} of {parts}, within {timeout:.0f}s"
                )
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())  # type: ignore[arg-type]
                    continue
                raise AssertionError(f"consumer error on {topic}: {err}")
            at_end.discard(msg.partition())  # type: ignore[arg-type]
            got.append(msg)
        return got
    finally:
        consumer.close()


def _predictions(msgs: list[Message]) -> list[dict[str, Any]]:
    return [orjson.loads(m.value()) for m in msgs]  # type: ignore[arg-type]


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=30)
    finally:
        consumer.close()
    return [tp.offset for tp in tps]


Topics = tuple[str, str, str, str]  # input, output, dead letters, state (snapshots)


def _topics(new_topic: TopicFactory, partitions: int = 1) -> Topics:
    return (
        new_topic("clicks", partitions=partitions),
        new_topic("predictions", partitions=partitions),
        new_topic("dlq", partitions=partitions),
        new_topic("state", partitions=partitions, config={"cleanup.policy": "compact"}),
    )


def _settings(bootstrap: str, topics: Topics, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "input_topic": topics[0],
        "output_topic": topics[1],
        "dead_letter_topic": topics[2],
        "state_topic": topics[3],
        "group_id": f"riverline-test-{uuid.uuid4().hex[:12]}",
        "metrics_address": "off",
        "exit_when_idle": IDLE,
        "commit_interval": 1.0,
        "create_topics": "false",
    }
    values.update(extra)
    return settings_from_mapping(values, env={"RIVERLINE_SNAPSHOT_KEY": SNAPSHOT_KEY})


class WorkerThread:
    """A Worker run on a thread; keeps every learner it ever had (revocation drops them)."""

    def __init__(self, settings: Settings) -> None:
        self.worker = Worker(settings)
        self.learners: dict[int, list[PartitionLearner]] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="worker-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def _watch(self) -> None:
        for p, lr in list(self.worker.stats.learners.items()):
            known = self.learners.setdefault(p, [])
            if not any(x is lr for x in known):
                known.append(lr)

    def wait(self, timeout: float = DEADLINE) -> None:
        """Until the worker returns by itself (``--exit-when-idle``), or fail."""
        deadline = time.monotonic() + timeout
        while self.thread.is_alive():
            self._watch()
            if time.monotonic() > deadline:
                self.worker.request_stop()
                self.thread.join(30)
                raise AssertionError(f"the worker did not stop by itself within {timeout:.0f}s")
            self.thread.join(0.02)
        if self.error is not None:
            raise AssertionError(f"the worker raised {self.error!r}") from self.error

    def poll_until(self, cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self._watch()
            assert self.thread.is_alive(), f"the worker stopped ({self.error!r}) before {what}"
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting: {what}"
            time.sleep(0.05)
        self._watch()

    def stop(self, timeout: float = 30.0) -> None:
        self.worker.request_stop()
        self.wait(timeout)

    def only_learner(self, partition: int = 0) -> PartitionLearner:
        self._watch()
        got = self.learners.get(partition, [])
        assert len(got) == 1, f"partition {partition} had {len(got)} learners (want 1)"
        return got[0]


def _calls(worker: Worker, method: str) -> list[tuple[Any, ...]]:
    """The arguments of every call the worker makes to one of its methods, from now on
    (the method still runs). Counted at the call, not sampled from outside."""
    calls: list[tuple[Any, ...]] = []
    inner = getattr(worker, method)

    def recorded(*args: Any) -> Any:
        calls.append(args)
        return inner(*args)

    setattr(worker, method, recorded)
    return calls


def _oracle(spec: str, seed: int, events: list[dict[str, Any]]) -> list[float]:
    """The bare prequential loop: predict, then learn when the label is known."""
    model = model_factory(spec, seed)()
    out: list[float] = []
    for ev in events:
        x = features_of(ev)
        out.append(model.predict_proba_one(x).get(True, 0.0))
        if ev.get("clicked") is not None:
            model.learn_one(x, ev["clicked"])
    return out


def _first_difference(got: list[Any], want: list[Any]) -> str:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"first difference at index {i}: got {g!r}, want {w!r}"
    return f"lengths differ: got {len(got)}, want {len(want)}"


def _versions(partition: int, labels: list[bool | None]) -> list[str]:
    """model_version of each prediction: labelled events learned before it."""
    out, learned = [], 0
    for y in labels:
        out.append(f"{partition}:{learned}")
        learned += y is not None
    return out


def _validator(name: str) -> Any:
    return jsonschema_rs.validator_for(json.loads((SCHEMAS / name).read_text()))


def _check_predictions(
    msgs: list[Message],
    events: list[dict[str, Any]],
    offsets: list[int],
    oracle: list[float],
    partition: int = 0,
) -> None:
    """One partition's predictions against its valid events (in order) and the oracle."""
    preds = _predictions(msgs)
    validator = _validator("prediction.schema.json")
    for pred in preds:
        validator.validate(pred)
    assert [p["event_id"] for p in preds] == [e["event_id"] for e in events], _first_difference(
        [p["event_id"] for p in preds], [e["event_id"] for e in events]
    )
    assert [m.key() for m in msgs] == [e["user_id"].encode() for e in events]
    assert [p["offset"] for p in preds] == offsets
    assert {p["partition"] for p in preds} == {partition}
    assert [(p["user_id"], p["item_id"], p["ts"]) for p in preds] == [
        (e["user_id"], e["item_id"], e["ts"]) for e in events
    ]
    want_versions = _versions(partition, [e.get("clicked") for e in events])
    got_versions = [p["model_version"] for p in preds]
    assert got_versions == want_versions, _first_difference(got_versions, want_versions)
    got_p = [p["click_probability"] for p in preds]
    assert got_p == oracle, _first_difference(got_p, oracle)


# -- a. the prequential oracle --------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", ["logreg", "fm", "tests.plugin_models:small_tree", "tests.plugin_models:onehot_logreg"]
)
def test_predictions_equal_a_bare_river_loop(
    kafka_bootstrap: str, new_topic: TopicFactory, spec: str
) -> None:
    topics = _topics(new_topic)
    events = _events(3000, seed=11)
    seed, window = 5, 400
    _produce(kafka_bootstrap, topics[0], map(_event_record, events))

    run = WorkerThread(_settings(kafka_bootstrap, topics, model=spec, seed=seed, window=window))
    run.start().wait()
    learner = run.only_learner()

    msgs = _read_topic(kafka_bootstrap, topics[1], at_least=len(events))
    oracle = _oracle(spec, seed, events)
    assert len(set(oracle)) > 10, "the model never changed its mind: a weak oracle"
    _check_predictions(msgs, events, list(range(len(events))), oracle)
    assert _read_topic(kafka_bootstrap, topics[2]) == [], "valid events were dead-lettered"

    labelled = [e["clicked"] for e in events if e["clicked"] is not None]
    assert 0 < len(labelled) < len(events)  # some predict-only events
    assert (learner.consumed, learner.predicted, learner.learned) == (
        len(events),
        len(events),
        len(labelled),
    )
    assert sum(learner.dead_lettered.values()) == 0
    assert learner.committed_offset == len(events)
    group = run.worker.settings.group_id
    assert _committed(kafka_bootstrap, group, topics[0], 1) == [len(events)]
    # The run's report (--report-file; the benchmark reads it): the busy time spans the
    # first to the last batch, and the loop thread's CPU time over it cannot exceed it.
    report = run.worker.report()
    assert report["messages"] == len(events)
    assert report["rate"] == pytest.approx(len(events) / report["seconds"])
    assert 0 < report["loop_cpu_seconds"] <= report["seconds"] + 0.01
    assert report["deploy_wait_seconds"] == 0.0  # no fit in the background here
    slowest = report["slowest_iterations"]  # the loop's iterations of 10 ms or more
    assert len(slowest) <= 20
    assert [it["wall_ms"] for it in slowest] == sorted(
        (it["wall_ms"] for it in slowest), reverse=True
    )
    for it in slowest:
        assert it["wall_ms"] >= 10.0 and 0.0 <= it["cpu_ms"] <= it["wall_ms"] + 1.0, it
        # (an idle iteration, a checkpoint's, may come up to the idle limit after the
        # last batch)
        assert 0 <= it["at_s"] <= report["seconds"] + IDLE + 1.0 and it["messages"] >= 0, it

    # The worker's scores are River's, fed the same (label, probability) pairs.
    pairs = [
        (e["clicked"], p) for e, p in zip(events, oracle, strict=True) if e["clicked"] is not None
    ]
    acc, loss, auc = metrics.Accuracy(), metrics.LogLoss(), metrics.ROCAUC(n_thresholds=100)
    r_acc = utils.Rolling(metrics.Accuracy, window_size=window)
    r_loss = utils.Rolling(metrics.LogLoss, window_size=window)
    r_auc = utils.Rolling(metrics.ROCAUC, window_size=window, n_thresholds=100)
    for y, p in pairs:
        for m in (acc, r_acc):
            m.update(y, p > 0.5)
        for m in (loss, auc, r_loss, r_auc):
            m.update(y, p)
    cum, rolling = learner.scores.cumulative(), learner.scores.rolling()
    assert cum.labelled == len(pairs)
    assert cum.positives == sum(y for y, _ in pairs)
    assert cum.accuracy == acc.get()
    assert cum.log_loss == pytest.approx(loss.get(), rel=0, abs=1e-9)
    assert cum.roc_auc == auc.get()
    assert rolling.labelled == window
    assert rolling.accuracy == r_acc.get()
    assert rolling.log_loss == pytest.approx(r_loss.get(), rel=0, abs=1e-9)
    assert rolling.roc_auc == r_auc.get()
    assert cum.mean_prediction == pytest.approx(sum(p for _, p in pairs) / len(pairs), abs=1e-12)


def test_the_batch_model_serves_from_its_fixed_event_and_the_report_counts_the_wait(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """The batch baseline, fitted by the real fit process, serves from window + delay
    labelled events on, whatever the fit took; a delay of one event makes the loop wait
    for the fit there, and the run's report (read after the partition is revoked at
    exit) counts that wait. It once read 0: the revoked learners took it with them."""
    topics = _topics(new_topic)
    events = _events(2500, seed=13)
    window, delay = 500, 1
    _produce(kafka_bootstrap, topics[0], map(_event_record, events))
    run = WorkerThread(
        _settings(
            kafka_bootstrap,
            topics,
            baseline_window=window,
            baseline_deploy_delay=delay,
            drift_detector="off",
        )
    )
    run.start().wait()
    preds = [orjson.loads(m.value()) for m in _read_topic(kafka_bootstrap, topics[1], 2500)]
    assert [p["event_id"] for p in preds] == [e["event_id"] for e in events]
    labelled_before = 0  # labelled events before each event
    for ev, pred in zip(events, preds, strict=True):
        served = pred["batch_click_probability"] is not None
        assert served == (labelled_before >= window + delay), (ev["event_id"], labelled_before)
        labelled_before += ev["clicked"] is not None
    baseline = run.only_learner().baseline
    assert baseline is not None and baseline.trainings == 1
    assert run.worker.stats.learners == {}  # revoked at exit
    report = run.worker.report()
    assert report["deploy_wait_seconds"] == baseline.deploy_wait_seconds > 0


# -- b. dead letters ----------------------------------------------------------------------
def _bad_records(topic_hint: str) -> list[tuple[str, Record]]:
    """(expected reason, record) for every way an input message can be unusable."""

    def event(eid: str, **over: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "event_id": eid,
            "ts": 1_764_000_000_000,
            "user_id": "u1",
            "item_id": "i1",
            "features": {"device": "ios", "position": 1, "category": "news"},
            "clicked": True,
        }
        ev.update(over)
        return ev

    big = event("bad-oversized", padding="x" * 5000)  # a valid event, but too large
    cases: list[tuple[str, bytes | None]] = [
        ("empty_value", None),
        ("empty_value", b""),
        ("oversized", orjson.dumps(big)),
        ("invalid_utf8", b'{"event_id": "bad-\xff\xfe", "ts": 1, "user_id": "u", "item_id": "i"}'),
        ("invalid_json", b'{"event_id": "bad-json", "ts": 1,'),
        ("invalid_json", b"not json at all"),
        (
            "non_finite_number",
            b'{"event_id":"bad-nan","ts":1,"user_id":"u1","item_id":"i1","features":{"x":NaN}}',
        ),
        (
            "non_finite_number",
            b'{"event_id":"bad-inf","ts":1,"user_id":"u1","item_id":"i1","features":{"x":1e999}}',
        ),
        (
            "non_finite_number",
            b'{"event_id":"bad-minf","ts":1,"user_id":"u1","item_id":"i1",'
            b'"features":{"x":-Infinity}}',
        ),
        (
            "schema_violation",
            orjson.dumps({k: v for k, v in event("x").items() if k != "event_id"}),
        ),
        ("schema_violation", orjson.dumps(event("bad-shadow", features={"user_id": "u2"}))),
        # Feature names the fast path's known names do not hold: the codec decides.
        ("schema_violation", orjson.dumps(event("bad-name", features={"device": "a", "": 1}))),
        ("schema_violation", orjson.dumps(event("bad-long-name", features={"k" * 101: 1}))),
        ("schema_violation", orjson.dumps(event("bad-label", clicked="yes"))),
        ("schema_violation", b"[1, 2, 3]"),
        ("model_error", orjson.dumps(event("bad-predict", features={"poison": True}))),
        ("model_error", orjson.dumps(event("bad-learn", features={"poison_learn": True}))),
        # learn_one changes the model, then raises: the worker must roll the update back.
        ("model_error", orjson.dumps(event("bad-half-learn", features={"poison_half": True}))),
        ("model_error", orjson.dumps(event("bad-nan-proba", features={"poison_nan": True}))),
    ]
    out: list[tuple[str, Record]] = []
    for i, (reason, value) in enumerate(cases):
        headers = [("trace-id", f"{topic_hint}-{i}".encode()), ("dup", b"a"), ("dup", b"b")]
        out.append((reason, (f"bad-key-{i}".encode(), value, headers)))
    return out


def test_bad_events_are_dead_lettered_and_the_model_is_untouched(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topics = _topics(new_topic)
    spec, seed = "tests.plugin_models:poisonable", 3
    good = _events(400, seed=5)
    # An unlabelled event with the learn-poison is fine: learn_one is never called for it.
    good.insert(
        200,
        {
            "event_id": "ok-unlabelled-poison-learn",
            "ts": 1_764_000_000_000,
            "user_id": "u3",
            "item_id": "i4",
            "features": {"poison_learn": True},
            "clicked": None,
        },
    )
    bad = _bad_records("dl")
    # Interleave: bad records spread through the stream, good ones after the last bad one.
    stream: list[tuple[str | None, Record]] = []
    step = len(good) // (len(bad) + 1)
    gi = iter(good)
    for reason, rec in bad:
        for _ in range(step):
            stream.append((None, _event_record(next(gi))))
        stream.append((reason, rec))
    stream.extend((None, _event_record(ev)) for ev in gi)
    _produce(kafka_bootstrap, topics[0], (rec for _, rec in stream))

    run = WorkerThread(
        _settings(kafka_bootstrap, topics, model=spec, seed=seed, max_event_bytes=4096)
    )
    # Each learn_one failure returns the partition to its last snapshot (a new learner)
    # and replays from there. Counted at the call: a learner that lives only while its
    # replay runs (a few ms) can fall between two samples of run.learners.
    rewinds = _calls(run.worker, "_rewind_partition")
    run.start().wait()  # returns by --exit-when-idle: the bad events did not stop it
    assert [lr.partition for (lr,) in rewinds] == [0, 0], (
        "one rewind per event whose learn_one raised"
    )
    # The last learner is the one that finished the stream.
    learner = run.learners[0][-1]

    # Dead letters: original key, value and headers, then riverline's headers.
    # A rewind replays dead letters too (at-least-once): keep the first per source offset,
    # every duplicate identical to it.
    dlq_all = _read_topic(kafka_bootstrap, topics[2], at_least=len(bad))
    by_offset: dict[bytes, Message] = {}
    for m in dlq_all:
        src = dict(m.headers() or [])[("riverline.source.offset")]
        if src in by_offset:
            assert by_offset[src].value() == m.value()
            assert by_offset[src].headers() == m.headers()
        else:
            by_offset[src] = m
    dlq = list(by_offset.values())
    assert len(dlq) == len(bad)
    validator = _validator("dead-letter.schema.json")
    bad_offsets = [i for i, (reason, _) in enumerate(stream) if reason is not None]
    for msg, (reason, (key, value, headers)), offset in zip(dlq, bad, bad_offsets, strict=True):
        assert headers is not None
        got_headers = msg.headers() or []
        assert msg.key() == key
        assert msg.value() == value, reason  # byte for byte; null stays null
        assert got_headers[: len(headers)] == headers, f"original headers lost: {got_headers}"
        ours = dict(got_headers[len(headers) :])
        assert all(k.startswith("riverline.") for k in ours), got_headers
        as_text = {k: (v or b"").decode() for k, v in got_headers}
        validator.validate(as_text)
        assert as_text["riverline.reason"] == reason, (offset, as_text)
        assert as_text["riverline.source.topic"] == topics[0]
        assert as_text["riverline.source.partition"] == "0"
        assert as_text["riverline.source.offset"] == str(offset)
        assert as_text["riverline.error"].startswith(f"{topics[0]}[0]@{offset}: ")

    # Counters: every message is either predicted or dead-lettered, once.
    want_reasons = Counter(reason for reason, _ in bad)
    assert set(want_reasons) == set(REASONS), "a dead-letter reason is not exercised"
    assert dict(learner.dead_lettered) == dict(want_reasons)
    assert learner.consumed == len(stream)
    assert learner.predicted == len(good)
    assert learner.committed_offset == len(stream)

    # The model is exactly the one that never saw the bad events.
    # The replays after the rewinds republished some predictions (at-least-once): each
    # duplicate is identical to the first; the first of each is checked in order.
    msgs = _read_topic(kafka_bootstrap, topics[1], at_least=len(good))
    first: dict[bytes, Message] = {}
    for m in msgs:
        value = m.value()
        assert value is not None
        event_id = orjson.loads(value)["event_id"].encode()
        if event_id in first:
            assert first[event_id].value() == value, "a replayed prediction differs"
        else:
            first[event_id] = m
    assert len(msgs) > len(first), "the rewinds replayed nothing"
    good_offsets = [i for i, (reason, _) in enumerate(stream) if reason is None]
    _check_predictions(list(first.values()), good, good_offsets, _oracle(spec, seed, good))


@pytest.mark.parametrize("spec", ["logreg", "fm"])
def test_one_extreme_feature_value_does_not_break_the_partition(
    kafka_bootstrap: str, new_topic: TopicFactory, spec: str
) -> None:
    """The schema accepts any finite double; one huge value must cost at most that event."""
    topics = _topics(new_topic)
    events = _events(1500, seed=8, label_rate=1.0)
    # A click with score 1e300: River's FM overflows half-way through learn_one.
    features = {**events[700]["features"], "score": 1e300}
    events[700] = dict(events[700], features=features, clicked=True)
    _produce(kafka_bootstrap, topics[0], map(_event_record, events))

    run = WorkerThread(_settings(kafka_bootstrap, topics, model=spec))
    run.start().wait()
    learner = run.only_learner()
    assert learner.consumed == len(events)
    assert sum(learner.dead_lettered.values()) <= 1, (
        f"{dict(learner.dead_lettered)}: the model broke after the event with 1e300 "
        "(learn_one raised half-way and left NaN in the model)"
    )
    preds = _predictions(_read_topic(kafka_bootstrap, topics[1], at_least=len(events) - 1))
    assert all(0.0 <= p["click_probability"] <= 1.0 for p in preds)


def test_a_message_too_large_to_republish_is_dead_lettered_without_a_crash(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """Topics may accept messages larger than a producer's default message.max.bytes
    (1,000,000). Such a message is `oversized` for the worker, and copying it into the
    dead-letter topic as it is would fail: the worker must go on all the same."""
    big = {"max.message.bytes": str(8 * 1024 * 1024)}
    topics = (
        new_topic("clicks", config=big),
        new_topic("predictions"),
        new_topic("dlq", config=big),
        new_topic("state", config={"cleanup.policy": "compact"}),
    )
    events = _events(200, seed=12)
    huge = b'{"event_id": "huge", "pad": "' + b"x" * 2_000_000 + b'"}'
    records = [_event_record(e) for e in events[:100]]
    records.append((b"huge-key", huge, [("trace-id", b"huge")]))
    records += [_event_record(e) for e in events[100:]]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4_000_000})
    for key, value, headers in records:
        producer.produce(topics[0], value=value, key=key, headers=headers)
    assert producer.flush(30) == 0

    run = WorkerThread(_settings(kafka_bootstrap, topics))
    run.start().wait()  # fails if the worker raised
    learner = run.only_learner()
    assert dict(learner.dead_lettered) == {"oversized": 1}
    assert learner.predicted == len(events)
    (dead,) = _read_topic(kafka_bootstrap, topics[2], at_least=1)
    headers = dict(dead.headers() or [])
    assert dead.key() == b"huge-key"
    assert headers["trace-id"] == b"huge"
    assert headers["riverline.reason"] == b"oversized"
    assert headers["riverline.source.offset"] == b"100"
    value = dead.value() or b""
    # The whole value, or a prefix of it with the original size in a header.
    assert value == huge or (
        headers.get("riverline.value.truncated") == str(len(huge)).encode()
        and len(value) > 0
        and huge.startswith(value)
    )
    as_text = {k: (v or b"").decode() for k, v in dead.headers() or []}
    _validator("dead-letter.schema.json").validate(as_text)


# -- c. SIGTERM mid-stream ------------------------------------------------------------------
def _worker_process(log: Path, bootstrap: str, topics: Topics, *args: str) -> WorkerProcess:
    """``riverline run`` on the test's topics (created by the test), logging to ``log``."""
    return WorkerProcess(
        log,
        [
            "--bootstrap-servers",
            bootstrap,
            "--input-topic",
            topics[0],
            "--output-topic",
            topics[1],
            "--dead-letter-topic",
            topics[2],
            "--state-topic",
            topics[3],
            "--create-topics",
            "false",
            *args,
        ],
        worker_env(SNAPSHOT_KEY),
    )


def _wait_for_records(bootstrap: str, topic: str, proc: WorkerProcess, n: int = 1) -> None:
    consumer = _reader(bootstrap, **{"enable.partition.eof": False})
    try:
        consumer.subscribe([topic])
        seen = 0
        deadline = time.monotonic() + DEADLINE
        while seen < n:
            assert proc.alive(), f"the worker exited early; log:\n{proc.tail()}"
            assert time.monotonic() < deadline, f"no prediction within {DEADLINE:.0f}s"
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                seen += 1
    finally:
        consumer.close()


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_sigterm_mid_stream_commits_what_was_published_and_a_restart_resumes(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path, guarantee: str
) -> None:
    topics = _topics(new_topic)
    group = f"riverline-sigterm-{uuid.uuid4().hex[:12]}"
    events = _events(30_000, seed=2)
    _produce(kafka_bootstrap, topics[0], map(_event_record, events))
    spec, seed = "fm", 1
    common = ["--group-id", group, "--model", spec, "--seed", str(seed)]
    common += ["--metrics-address", "off", "--guarantee", guarantee]
    if guarantee == "exactly-once":  # predictions become visible at each commit
        common += ["--commit-interval", "0.5"]

    with killed_at_exit() as procs:
        first = _worker_process(tmp_path / "first.log", kafka_bootstrap, topics, *common)
        procs.append(first)
        _wait_for_records(kafka_bootstrap, topics[1], first)
        first.terminate()
        t0 = time.monotonic()
        rc = first.wait(20)
        took = time.monotonic() - t0
        assert rc == 0, f"exit code {rc} after SIGTERM; log:\n{first.tail()}"
        assert took < 20

        published = _predictions(_read_topic(kafka_bootstrap, topics[1], at_least=1))
        n = len(published)
        assert 0 < n < len(events), f"not mid-stream: {n} of {len(events)} predicted"
        assert [p["offset"] for p in published] == list(range(n))
        # The checkpoint covers exactly what was published: no loss, no replay.
        assert _committed(kafka_bootstrap, group, topics[0], 1) == [n]

        second = _worker_process(
            tmp_path / "second.log", kafka_bootstrap, topics, *common, "--exit-when-idle", "3"
        )
        procs.append(second)
        rc = second.wait(90)
        assert rc == 0, f"exit code {rc}; log:\n{second.tail()}"

    everything = _read_topic(kafka_bootstrap, topics[1], at_least=len(events))
    ids = Counter(p["event_id"] for p in _predictions(everything))
    twice = [eid for eid, c in ids.items() if c > 1]
    assert not twice, f"{len(twice)} event(s) predicted twice, e.g. {twice[:5]}"
    assert set(ids) == {e["event_id"] for e in events}
    assert _committed(kafka_bootstrap, group, topics[0], 1) == [len(events)]
    # The restart resumed the model from its snapshot: the two runs together are exactly
    # one uninterrupted prequential loop (probabilities and model_version numbering).
    _check_predictions(everything, events, list(range(len(events))), _oracle(spec, seed, events))


# -- d. two workers in one group ------------------------------------------------------------
def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _by_partition(samples: list[tuple[dict[str, str], float]], **match: str) -> dict[int, float]:
    return {
        int(labels["partition"]): value
        for labels, value in samples
        if all(labels.get(k) == v for k, v in match.items())
    }


def test_two_workers_share_a_group_each_partition_learned_by_one(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> None:
    parts = 4
    topics = _topics(new_topic, partitions=parts)
    group = f"riverline-pair-{uuid.uuid4().hex[:12]}"
    spec, seed = "logreg", 2
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()

    def assigned(port: int) -> list[int] | None:
        with contextlib.suppress(OSError):
            status, body = _get(port, "/health")
            if status == 200:
                return list(orjson.loads(body)["partitions"])
        return None

    def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, body = _get(port, "/metrics")
        assert status == 200
        return _samples(body.decode())

    def rebalances(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
        return {labels["kind"]: v for labels, v in samples["riverline_rebalances_total"]}

    with killed_at_exit() as procs:
        for i, port in enumerate(ports):
            procs.append(
                _worker_process(
                    tmp_path / f"worker{i}.log",
                    kafka_bootstrap,
                    topics,
                    *("--group-id", group, "--metrics-address", f"127.0.0.1:{port}"),
                    *("--model", spec, "--seed", str(seed), "--commit-interval", "1"),
                )
            )
        deadline = time.monotonic() + DEADLINE
        while True:
            for p in procs:
                assert p.alive(), f"a worker exited; log:\n{p.tail()}"
            a, b = assigned(ports[0]), assigned(ports[1])
            if a and b and not set(a) & set(b) and set(a) | set(b) == set(range(parts)):
                break
            assert time.monotonic() < deadline, f"the group did not settle: {a}, {b}"
            time.sleep(0.2)
        settled = [rebalances(scrape(port)) for port in ports]

        events = _events(4000, seed=9)
        _produce(kafka_bootstrap, topics[0], map(_event_record, events))
        _read_topic(kafka_bootstrap, topics[1], at_least=len(events))
        # Both workers' view, before they leave the group.
        scraped = [scrape(port) for port in ports]
        for p in procs:
            p.terminate()
        for p in procs:
            rc = p.wait(30)
            assert rc == 0, f"exit code {rc}; log:\n{p.tail()}"

    # No partition changed hands while the events were processed.
    assert [rebalances(s) for s in scraped] == settled
    msgs = _read_topic(kafka_bootstrap, topics[1], at_least=len(events))
    preds = _predictions(msgs)
    ids = Counter(p["event_id"] for p in preds)
    assert max(ids.values()) == 1, "an event was predicted twice"
    assert set(ids) == {e["event_id"] for e in events}

    by_id = {e["event_id"]: e for e in events}
    counts: dict[int, int] = {}
    for part in range(parts):
        mine = sorted(
            ((m, p) for m, p in zip(msgs, preds, strict=True) if p["partition"] == part),
            key=lambda mp: mp[1]["offset"],
        )
        assert mine, f"partition {part} got no events"
        counts[part] = len(mine)
        part_events = [by_id[p["event_id"]] for _, p in mine]
        # One model per partition, fed that partition's events in offset order: the
        # numbering and the probabilities are those of one uninterrupted loop.
        _check_predictions(
            [m for m, _ in mine],
            part_events,
            list(range(len(mine))),
            _oracle(spec, seed, part_events),
            partition=part,
        )

    owners: dict[int, list[int]] = {}
    for w, samples in enumerate(scraped):
        predicted = _by_partition(samples.get("riverline_events_predicted_total", []))
        assert predicted, f"worker {w} predicted nothing"
        for part, value in predicted.items():
            owners.setdefault(part, []).append(w)
            assert value == counts[part], f"worker {w}, partition {part}: {value} != {counts[part]}"
    assert sorted(owners) == list(range(parts))
    assert all(len(ws) == 1 for ws in owners.values()), owners


# -- e. /metrics, /health, /ready ----------------------------------------------------------
def test_metrics_endpoint_reports_the_run_and_passes_promtool(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    topics = _topics(new_topic)
    events = _events(1500, seed=4)
    bad = [None, b"{", b'{"event_id":"n","ts":1,"user_id":"u","item_id":"i","features":{"a":NaN}}']
    records = [_event_record(e) for e in events] + [(b"k", v, None) for v in bad]
    total = _produce(kafka_bootstrap, topics[0], records)
    window = 300

    run = WorkerThread(_settings(kafka_bootstrap, topics, exit_when_idle=0.0, window=window))
    server = MetricsServer("127.0.0.1", 0, run.worker.stats).start()
    port = int(server.address.rpartition(":")[2])
    try:
        run.start()
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}

        def settled() -> bool:
            nonlocal samples
            samples = _samples(_get(port, "/metrics")[1].decode())
            consumed = _by_partition(samples.get("riverline_events_consumed_total", []))
            committed = _by_partition(samples.get("riverline_committed_offset", []))
            lag = _by_partition(samples.get("riverline_consumer_lag_messages", []))
            return consumed == {0: total} and committed == {0: total} and lag == {0: 0}

        run.poll_until(settled, "all events consumed, committed and lag 0 on /metrics")
        status, body = _get(port, "/metrics")
        assert status == 200
        text = body.decode()
        samples = _samples(text)

        health_status, health = _get(port, "/health")
        assert health_status == 200
        health_body = orjson.loads(health)
        assert health_body["status"] == "ok" and health_body["partitions"] == [0]
        ready_status, ready = _get(port, "/ready")
        assert ready_status == 200 and orjson.loads(ready)["status"] == "ready"
        assert _get(port, "/nope")[0] == 404
    finally:
        with contextlib.suppress(AssertionError):
            run.stop()
        server.close()
    run.wait(1)  # re-raises a worker error

    (build,) = samples["riverline_build_info"]
    assert build[1] == 1.0
    assert build[0]["model"] == "logreg" and build[0]["version"]
    for name in ("river", "python", "confluent_kafka", "librdkafka"):
        assert build[0].get(name), f"riverline_build_info lacks {name}"

    labelled = [e for e in events if e["clicked"] is not None]
    one = {"topic": topics[0]}
    assert _by_partition(samples["riverline_events_consumed_total"], **one) == {0: total}
    assert _by_partition(samples["riverline_events_predicted_total"], **one) == {0: len(events)}
    assert _by_partition(samples["riverline_events_learned_total"], **one) == {0: len(labelled)}
    dead = {
        labels["reason"]: value for labels, value in samples["riverline_events_dead_lettered_total"]
    }
    assert set(dead) == set(REASONS)
    assert {k: v for k, v in dead.items() if v} == {
        "empty_value": 1,
        "invalid_json": 1,
        "non_finite_number": 1,
    }
    assert samples["riverline_assigned_partitions"][0][1] == 1
    rebalances = {labels["kind"]: value for labels, value in samples["riverline_rebalances_total"]}
    assert rebalances == {"assigned": 1, "revoked": 0, "lost": 0}
    assert samples["riverline_commits_total"][0][1] >= 1
    # Checkpoints write a snapshot of the learner; nothing was aborted or rejected.
    assert _by_partition(samples["riverline_snapshot_size_bytes"])[0] > 1000
    assert 0 <= _by_partition(samples["riverline_snapshot_age_seconds"])[0] < DEADLINE
    assert samples["riverline_checkpoint_duration_seconds_count"][0][1] >= 1
    assert samples["riverline_transactions_aborted_total"][0][1] == 0
    assert samples["riverline_snapshots_rejected_total"][0][1] == 0
    assert 0 <= samples["riverline_last_poll_age_seconds"][0][1] < 5
    (count,) = samples["riverline_processing_latency_seconds_count"]
    assert count[1] == total
    buckets = [v for labels, v in samples["riverline_processing_latency_seconds_bucket"]]
    assert buckets == sorted(buckets) and buckets[-1] == total

    # The scores on /metrics are River's over the published predictions.
    preds = _predictions(_read_topic(kafka_bootstrap, topics[1], at_least=len(events)))
    label = {e["event_id"]: e["clicked"] for e in events}
    pairs = [(label[p["event_id"]], p["click_probability"]) for p in preds]
    pairs = [(y, p) for y, p in pairs if y is not None]
    acc, loss, auc = metrics.Accuracy(), metrics.LogLoss(), metrics.ROCAUC(n_thresholds=100)
    r_acc = utils.Rolling(metrics.Accuracy, window_size=window)
    for y, p in pairs:
        acc.update(y, p > 0.5)
        r_acc.update(y, p > 0.5)
        loss.update(y, p)
        auc.update(y, p)

    def score(name: str, window_label: str) -> float:
        got = [
            v
            for labels, v in samples[name]
            if labels["window"] == window_label and labels["model"] == "online"
        ]
        assert len(got) == 1, (name, window_label, samples[name])
        return got[0]

    assert score("riverline_model_accuracy_ratio", "cumulative") == acc.get()
    assert score("riverline_model_log_loss", "cumulative") == pytest.approx(loss.get(), abs=1e-9)
    assert score("riverline_model_roc_auc", "cumulative") == auc.get()
    assert score("riverline_model_accuracy_ratio", "rolling") == r_acc.get()
    assert score("riverline_model_labelled_events", "cumulative") == len(pairs)
    assert score("riverline_model_labelled_events", "rolling") == window
    assert score("riverline_model_positive_events", "cumulative") == sum(y for y, _ in pairs)
    assert 0.5 < auc.get() <= 1.0  # the simulated stream is learnable

    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (make promtool) and CI is set")
        pytest.skip("promtool not installed: the exposition lint is skipped")
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, (
        f"promtool check metrics failed:\n{check.stdout.decode()}{check.stderr.decode()}"
    )


def test_idle_check_reads_the_real_consumers_position_and_steps_over_a_commit_marker(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """What ``--exit-when-idle`` asks the broker before it stops, on a real consumer:

    - a partition not read yet, with events, is unread;
    - a partition read to its end is not, even when its last record is a transaction's
      commit marker (the consumer's position steps over it; the last event's offset + 1
      would not, and the worker would never stop);
    - events appended past the position are unread before they are fetched: the state a
      broker restart leaves while the fetcher is in its reconnect backoff.
    """
    topic = new_topic("idle", partitions=2)
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"idle-{topic}"})
    txn.init_transactions(30)
    txn.begin_transaction()
    for i in range(5):
        txn.produce(topic, b"t%d" % i, partition=0)
    txn.commit_transaction(30)
    plain = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(5):
        plain.produce(topic, b"p%d" % i, partition=1)
    assert plain.flush(30) == 0

    settings = _settings(kafka_bootstrap, (topic, f"{topic}-out", f"{topic}-dlq", f"{topic}-state"))
    worker = Worker(settings)
    consumer = Consumer(consumer_config(settings))
    worker.consumer = consumer
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in (0, 1)])
        assert worker._unread(topic, 0) and worker._unread(topic, 1)
        got: Counter[int] = Counter()
        deadline = time.monotonic() + DEADLINE
        while sum(got.values()) < 10:
            assert time.monotonic() < deadline, f"only {dict(got)} consumed"
            for m in consumer.consume(10, 0.5):
                assert m.error() is None, m.error()
                got[m.partition()] += 1
        assert got == {0: 5, 1: 5}
        # The transactional partition's high watermark is past the last event (the
        # marker): the position, not the last offset + 1, must match it.
        _low, high0 = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        assert high0 == 6
        deadline = time.monotonic() + DEADLINE
        while worker._unread(topic, 0):  # the position steps over the marker once fetched
            assert time.monotonic() < deadline, consumer.position([TopicPartition(topic, 0)])
            consumer.consume(10, 0.2)
        assert not worker._unread(topic, 1)
        # The idle check reads only each assigned partition's topic and number.
        worker.stats.learners = {
            p: cast(PartitionLearner, SimpleNamespace(topic=topic, partition=p, next_offset=None))
            for p in (0, 1)
        }
        assert worker._input_exhausted()

        consumer.pause([TopicPartition(topic, 1)])  # the fetcher does not take them yet
        for i in range(2):
            plain.produce(topic, b"late%d" % i, partition=1)
        assert plain.flush(30) == 0
        assert worker._unread(topic, 1) and not worker._unread(topic, 0)
        assert not worker._input_exhausted()
    finally:
        consumer.close()


def test_busy_polling_between_paced_batches_loses_and_repeats_nothing(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """``--busy-poll-ms``: clicks arriving in bursts, with gaps the loop polls through
    (without waiting in the client) for at most the window after each batch. Every
    prediction is still the bare River loop's, once and in order; the offsets are
    committed; the polling time is counted, and bounded by the window per batch."""
    topics = _topics(new_topic)
    events = _events(1500, seed=13)
    window_ms = 3.0
    run = WorkerThread(_settings(kafka_bootstrap, topics, busy_poll_ms=window_ms))
    batches = _calls(run.worker, "_process")
    run.start()
    run.poll_until(lambda: 0 in run.worker.stats.learners, "the partition's assignment")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    for i in range(0, len(events), 50):  # bursts of 50, 20 ms apart: gaps between fetches
        for ev in events[i : i + 50]:
            producer.produce(topics[0], orjson.dumps(ev), ev["user_id"].encode())
        producer.flush(10)
        time.sleep(0.02)
    run.wait()

    msgs = _read_topic(kafka_bootstrap, topics[1], at_least=len(events))
    _check_predictions(msgs, events, list(range(len(events))), _oracle("logreg", 0, events))
    group = run.worker.settings.group_id
    assert _committed(kafka_bootstrap, group, topics[0], 1) == [len(events)]
    report = run.worker.report()
    assert report["messages"] == len(events)
    assert len(batches) > 1
    # It polled in the gaps (there were 30 bursts), and never longer than the window
    # after a batch (plus the last call's own time and a slack for a preempted thread).
    assert report["busy_poll_seconds"] > 0
    assert report["busy_poll_seconds"] <= len(batches) * (window_ms + 2.0) / 1000
    assert 0 < report["busy_poll_cpu_seconds"] <= report["busy_poll_seconds"] + 0.01


def test_a_backlogs_batch_hands_its_predictions_over_as_it_goes(
    kafka_bootstrap: str, new_topic: TopicFactory
) -> None:
    """A backlog is read in batches of 500: each batch's predictions reach the producer a
    chunk at a time (about 2 ms of work each), not once the whole batch is done. Seen
    from outside: a prediction's timestamp is when the loop handed it to the producer
    (``CreateTime``), so in a batch that took 10 ms or more the first prediction is
    stamped in the batch's first half. Every prediction is still the bare River loop's,
    once and in order, and the offsets are committed."""
    topics = _topics(new_topic)
    events = _events(3000, seed=17)
    _produce(kafka_bootstrap, topics[0], map(_event_record, events))  # the backlog
    run = WorkerThread(_settings(kafka_bootstrap, topics, model="fm", batch_size=500))
    timed: list[tuple[float, float, int]] = []  # (start, end) wall clock ms, first offset
    process = run.worker._process

    def timed_process(msgs: list[Message], *args: Any) -> None:
        started = time.time() * 1000
        try:
            process(msgs, *args)
        finally:
            timed.append((started, time.time() * 1000, msgs[0].offset()))  # type: ignore[arg-type]

    run.worker._process = timed_process  # type: ignore[method-assign]
    run.start()
    run.wait()

    msgs = _read_topic(kafka_bootstrap, topics[1], at_least=len(events))
    _check_predictions(msgs, events, list(range(len(events))), _oracle("fm", 0, events))
    group = run.worker.settings.group_id
    assert _committed(kafka_bootstrap, group, topics[0], 1) == [len(events)]
    stamped = {orjson.loads(m.value())["offset"]: m.timestamp()[1] for m in msgs}  # type: ignore[arg-type]
    long_batches = [(s, e, first) for s, e, first in timed if e - s >= 10]
    assert long_batches, f"no batch took 10 ms or more: {timed}"
    for started, ended, first in long_batches:
        # 1 ms of slack: the timestamps are whole milliseconds.
        assert stamped[first] <= started + (ended - started) / 2 + 1, (
            f"the batch from offset {first} ran {ended - started:.0f} ms; its first "
            f"prediction was handed over {stamped[first] - started:.0f} ms after its start"
        )
