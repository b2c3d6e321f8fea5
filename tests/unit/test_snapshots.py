"""Snapshots without a broker: signing, keys, chunking, reading back, refusing, restoring.

Reading is tested on hand-made record lists fed to ``SnapshotStore._collect`` and
``_verified`` (what ``read_many`` does with the records of the state topic), and the
refusal path through ``Worker._on_assign`` with a stand-in consumer. Bytes that fail
verification must never reach ``pickle.loads``: the tests replace worker.learner's
``pickle`` with one whose ``loads`` fails the test.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import TopicPartition

import worker.learner
from tests.helpers import features_of
from worker.config import settings_from_mapping
from worker.errors import ConfigError
from worker.learner import PartitionLearner
from worker.loop import Worker
from worker.models import make_model
from worker.simulate import SimulationConfig, generate
from worker.snapshots import (
    INSECURE_KEY,
    MIN_KEY_BYTES,
    Manifest,
    Restored,
    Signer,
    SnapshotError,
    SnapshotStore,
    _Scan,
    load_key,
)

KEY = b"unit-test-snapshot-key-0123456789"
Records = list[tuple[bytes, bytes | None]]


def _store(chunk_bytes: int = 10, key: bytes = KEY, group: str = "g") -> SnapshotStore:
    return SnapshotStore({}, group, "clicks", "g.state", Signer(key), chunk_bytes=chunk_bytes)


def _read(store: SnapshotStore, records: Records, partitions: tuple[int, ...] = (0,)) -> Any:
    """What read_many makes of these state records: Restored, None, or the SnapshotError."""
    found = {p: _Scan() for p in partitions}
    by_key = {store.key(p): p for p in partitions}
    for key, value in records:
        SnapshotStore._collect(key, value, by_key, found)
    out: dict[int, Any] = {}
    for p in partitions:
        try:
            out[p] = store._verified(p, found[p], 0.0)
        except SnapshotError as exc:
            out[p] = exc
    return out if len(partitions) > 1 else out[partitions[0]]


class NoUnpickle:
    """Stands in for worker.learner's ``pickle``: ``loads`` fails the test."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    def loads(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise AssertionError("pickle.loads was called on unverified bytes")


@pytest.fixture
def no_unpickle(monkeypatch: pytest.MonkeyPatch) -> NoUnpickle:
    watch = NoUnpickle()
    monkeypatch.setattr(worker.learner, "pickle", watch)
    return watch


# -- Signer and Manifest ------------------------------------------------------------------------
def test_signer_is_hmac_sha256_over_length_prefixed_parts() -> None:
    signer = Signer(KEY)
    want = hmac.new(
        KEY, (3).to_bytes(8, "big") + b"abc" + (2).to_bytes(8, "big") + b"de", hashlib.sha256
    ).hexdigest()
    assert signer.sign(b"abc", b"de") == want
    assert signer.verify(want, b"abc", b"de")
    assert not signer.verify(want, b"abc", b"df")
    assert not Signer(KEY + b"x").verify(want, b"abc", b"de")


def test_moving_bytes_between_parts_breaks_the_signature() -> None:
    signer = Signer(KEY)
    assert signer.sign(b"ab", b"c") != signer.sign(b"a", b"bc")
    assert signer.sign(b"abc", b"") != signer.sign(b"", b"abc")
    # The same for a manifest: its fields and the payload are separate parts, so bytes
    # moved from the end of the fields to the start of the payload do not verify.
    m = Manifest("g", "clicks", 0, "s1", next_offset=42, chunks=1, size=3).signed(signer, b"abc")
    fields = m._fields()
    assert signer.verify(m.hmac, fields, b"abc")
    assert not signer.verify(m.hmac, fields + b"a", b"bc")
    assert not signer.verify(m.hmac, fields[:-1], fields[-1:] + b"abc")
    assert not signer.verify(m.hmac, fields + b"abc")


def test_a_signed_manifest_verifies_its_payload_only() -> None:
    signer = Signer(KEY)
    m = Manifest("g", "clicks", 3, "s1", next_offset=42, chunks=1, size=3, created=1.5)
    signed = m.signed(signer, b"abc")
    assert signed.hmac and signed.verify(signer, b"abc")
    assert not signed.verify(signer, b"abd")
    assert not signed.verify(signer, b"abcd")  # size differs
    assert not signed.verify(Signer(b"another-key-of-enough-bytes"), b"abc")
    assert not m.verify(signer, b"abc")  # unsigned
    # Re-signing ignores any hmac already there.
    assert replace(signed, hmac="00").signed(signer, b"abc") == signed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("group", "h"),
        ("topic", "clicks2"),
        ("partition", 4),
        ("snapshot_id", "s2"),
        ("next_offset", 41),
        ("chunks", 2),
        ("size", 4),
        ("created", 2.5),
        ("version", 2),
    ],
)
def test_every_manifest_field_is_signed(name: str, value: Any) -> None:
    signer = Signer(KEY)
    m = Manifest("g", "clicks", 3, "s1", next_offset=42, chunks=1, size=3, created=1.5)
    signed = m.signed(signer, b"abc")
    assert not replace(signed, **{name: value}).verify(signer, b"abc")


def test_manifest_encode_decode_round_trip_and_garbage() -> None:
    m = Manifest("g", "clicks", 3, "s1", 42, 1, 3, created=1.5).signed(Signer(KEY), b"abc")
    assert Manifest.decode(m.encode()) == m
    for raw in (b"not json", b'{"group": "g"}', b'{"unknown": 1}'):
        with pytest.raises(SnapshotError, match="unreadable snapshot manifest"):
            Manifest.decode(raw)


# -- load_key -------------------------------------------------------------------------------------
def test_load_key_from_the_environment() -> None:
    assert load_key({"RIVERLINE_SNAPSHOT_KEY": "k" * 16}, None, False) == b"k" * 16


def test_the_environment_beats_the_key_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_bytes(b"f" * 32)
    assert load_key({"RIVERLINE_SNAPSHOT_KEY": "e" * 20}, str(f), True) == b"e" * 20


def test_load_key_from_a_file_strips_the_newline(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_bytes(b"0123456789abcdef0123\n")
    assert load_key({}, str(f), False) == b"0123456789abcdef0123"


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--snapshot-key-file .*cannot read it"):
        load_key({}, str(tmp_path / "absent"), False)


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"RIVERLINE_SNAPSHOT_KEY: .*at least {MIN_KEY_BYTES}"):
        load_key({"RIVERLINE_SNAPSHOT_KEY": "k" * (MIN_KEY_BYTES - 1)}, None, False)
    f = tmp_path / "key"
    f.write_bytes(b"short\n")
    with pytest.raises(ConfigError, match=f"--snapshot-key-file .*at least {MIN_KEY_BYTES}"):
        load_key({}, str(f), False)
    # An empty variable counts as unset (then no key at all).
    with pytest.raises(ConfigError, match="no snapshot key"):
        load_key({"RIVERLINE_SNAPSHOT_KEY": ""}, None, False)


def test_insecure_snapshots_use_the_well_known_key() -> None:
    assert load_key({}, None, True) == INSECURE_KEY


def test_no_key_at_all_is_refused_with_the_ways_to_give_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_key({}, None, False)
    text = str(info.value)
    assert "RIVERLINE_SNAPSHOT_KEY" in text
    assert "--snapshot-key-file" in text
    assert "--insecure-snapshots" in text
    assert info.value.exit_code == 2


def test_settings_carry_the_key() -> None:
    base = {"bootstrap_servers": "127.0.0.1:9"}
    s = settings_from_mapping(base, env={"RIVERLINE_SNAPSHOT_KEY": "k" * 32})
    assert s.snapshot_key == b"k" * 32
    assert "k" * 32 not in repr(s) and s.masked()["snapshot_key"] == "***"
    insecure = settings_from_mapping({**base, "insecure_snapshots": "true"}, env={})
    assert insecure.snapshot_key == INSECURE_KEY
    with pytest.raises(ConfigError, match="no snapshot key"):
        settings_from_mapping(base, env={})


# -- writing: chunks, manifest, tombstones -------------------------------------------------------
def test_messages_split_the_payload_into_chunks_then_the_manifest() -> None:
    store = _store(chunk_bytes=10)
    payload = bytes(range(25))
    records, manifest = store.messages(2, 1234, payload)
    base = b"g/clicks/2"
    sid = manifest.snapshot_id.encode()
    assert records == [
        (base + b"/" + sid + b"/0", payload[:10]),
        (base + b"/" + sid + b"/1", payload[10:20]),
        (base + b"/" + sid + b"/2", payload[20:]),
        (base, manifest.encode()),
    ]
    assert (manifest.group, manifest.topic, manifest.partition) == ("g", "clicks", 2)
    assert (manifest.next_offset, manifest.chunks, manifest.size) == (1234, 3, 25)
    assert manifest.verify(Signer(KEY), payload)
    assert Manifest.decode(records[-1][1]) == manifest  # type: ignore[arg-type]


def test_a_payload_of_exactly_n_chunks_has_no_empty_chunk() -> None:
    records, manifest = _store(chunk_bytes=10).messages(0, 1, b"x" * 20)
    assert manifest.chunks == 2
    assert [len(v) for _, v in records[:-1]] == [10, 10]  # type: ignore[arg-type]


def test_the_next_snapshot_tombstones_the_previous_chunks_after_its_manifest() -> None:
    store = _store(chunk_bytes=10)
    first, m1 = store.messages(0, 10, b"a" * 15)
    second, m2 = store.messages(0, 20, b"b" * 25)
    third, _ = store.messages(0, 30, b"c" * 5)
    old_keys = [k for k, _ in first[:-1]]
    assert len(old_keys) == 2
    assert [k for k, v in second if v is None] == old_keys
    manifest_at = [k for k, _ in second].index(b"g/clicks/0")
    assert manifest_at == 3  # three chunks, the manifest, then the tombstones
    assert second[manifest_at + 1 :] == [(k, None) for k in old_keys]
    assert third[2:] == [(k, None) for k, _ in second[:3]]
    assert m1.snapshot_id != m2.snapshot_id
    # Partitions are independent; forget() drops what is to be tombstoned.
    other, _ = store.messages(1, 5, b"z" * 5)
    assert all(v is not None for _, v in other)
    store.forget(0)
    after, _ = store.messages(0, 40, b"d" * 5)
    assert all(v is not None for _, v in after)


def test_state_partition_is_the_input_partition_modulo_the_state_partitions() -> None:
    store = _store()
    assert [store.state_partition(p) for p in range(4)] == [0, 0, 0, 0]
    store.state_partitions = 3
    assert [store.state_partition(p) for p in range(7)] == [0, 1, 2, 0, 1, 2, 0]


# -- reading back ----------------------------------------------------------------------------
def test_the_newest_complete_snapshot_is_read_back() -> None:
    writer = _store(chunk_bytes=10)
    first, _ = writer.messages(0, 10, b"a" * 15)
    second, m2 = writer.messages(0, 20, b"b" * 25)
    restored = _read(_store(chunk_bytes=10), first + second)
    assert isinstance(restored, Restored)
    assert restored.manifest == m2 and restored.payload == b"b" * 25
    assert restored.bytes_read == 15 + 25


def test_no_manifest_means_no_snapshot_and_a_tombstoned_manifest_too() -> None:
    store = _store()
    assert _read(store, []) is None
    records, _ = store.messages(0, 1, b"abc")
    assert _read(store, [*records, (b"g/clicks/0", None)]) is None


def test_other_groups_topics_and_partitions_are_ignored() -> None:
    mine, m = _store().messages(0, 7, b"mine" * 5)
    theirs, _ = _store(group="other").messages(0, 9, b"theirs" * 5)
    other_partition, _ = _store().messages(1, 3, b"p1" * 5)
    foreign = [(b"unrelated-key", b"x"), (b"g/clicks", b"y")]
    restored = _read(_store(), theirs + other_partition + mine + foreign + theirs)
    assert isinstance(restored, Restored)
    assert restored.manifest == m and restored.payload == b"mine" * 5
    both = _read(_store(), mine + other_partition, partitions=(0, 1))
    assert both[0].payload == b"mine" * 5 and both[1].payload == b"p1" * 5


def test_a_missing_chunk_makes_the_snapshot_incomplete() -> None:
    records, _ = _store(chunk_bytes=10).messages(0, 10, b"a" * 25)
    broken = records[:1] + records[2:]
    err = _read(_store(chunk_bytes=10), broken)
    assert isinstance(err, SnapshotError)
    assert "incomplete: chunk 1 of 3 missing" in str(err)
    # A chunk deleted by a tombstone is missing too.
    err = _read(_store(chunk_bytes=10), [*records, (records[0][0], None)])
    assert isinstance(err, SnapshotError) and "chunk 0 of 3 missing" in str(err)


def test_chunks_of_an_unfinished_newer_snapshot_do_not_break_the_older_one() -> None:
    writer = _store(chunk_bytes=10)
    done, m1 = writer.messages(0, 10, b"a" * 25)
    unfinished, _ = writer.messages(0, 20, b"b" * 25)
    chunks_only = [r for r in unfinished if r[0] != b"g/clicks/0" and r[1] is not None]
    assert len(chunks_only) == 3
    reader = _store(chunk_bytes=10)
    restored = _read(reader, done + chunks_only[:2])  # the crash: 2 of 3 chunks, no manifest
    assert isinstance(restored, Restored)
    assert restored.manifest == m1 and restored.payload == b"a" * 25
    # The reader's next snapshot deletes every chunk left in the topic, stale ones too.
    records, _ = reader.messages(0, 30, b"c")
    tombstoned = sorted(k for k, v in records if v is None)
    assert tombstoned == sorted(k for k, _ in done[:3] + chunks_only[:2])


@pytest.mark.parametrize(
    "tamper", ["hmac", "next_offset", "payload", "truncated chunk", "other key", "moved"]
)
def test_tampered_snapshots_fail_verification(tamper: str) -> None:
    writer = _store(chunk_bytes=10)
    records, m = writer.messages(0, 10, b"a" * 25)
    if tamper == "hmac":
        data = orjson.loads(records[-1][1])  # type: ignore[arg-type]
        data["hmac"] = ("0" if data["hmac"][0] != "0" else "1") + data["hmac"][1:]
        records[-1] = (records[-1][0], orjson.dumps(data))
    elif tamper == "next_offset":
        records[-1] = (records[-1][0], replace(m, next_offset=9).encode())
    elif tamper == "payload":
        records[1] = (records[1][0], b"b" * 10)
    elif tamper == "truncated chunk":
        records[2] = (records[2][0], b"a" * 4)
    elif tamper == "other key":
        records, _ = _store(chunk_bytes=10, key=b"other" * 8).messages(0, 10, b"a" * 25)
    elif tamper == "moved":  # partition 1's genuine snapshot filed under partition 0
        records, _ = writer.messages(1, 10, b"a" * 25)
        records = [(k.replace(b"g/clicks/1", b"g/clicks/0"), v) for k, v in records]
    err = _read(_store(chunk_bytes=10), records)
    assert isinstance(err, SnapshotError), err
    assert "failed verification" in str(err) and "not deserialised" in str(err)


# -- the worker's side: refuse, or start fresh; never unpickle ---------------------------------
def _worker(on_invalid: str) -> Worker:
    settings = settings_from_mapping(
        {
            "bootstrap_servers": "127.0.0.1:9",
            "input_topic": "clicks",
            "group_id": "g",
            "metrics_address": "off",
            "on_invalid_snapshot": on_invalid,
        },
        env={"RIVERLINE_SNAPSHOT_KEY": KEY.decode()},
    )
    return Worker(settings)


class FakeConsumer:
    def __init__(self) -> None:
        self.assigned: list[TopicPartition] = []

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned += partitions


def _tampered_records(w: Worker) -> Records:
    learner = PartitionLearner("clicks", 0, make_model("logreg"))
    records, m = w.store.messages(0, 5, learner.snapshot())
    records[-1] = (records[-1][0], replace(m, next_offset=4).encode())  # signed for 5
    w.store.forget(0)
    return records


def _assign_from(w: Worker, records: Records, monkeypatch: pytest.MonkeyPatch) -> FakeConsumer:
    def read_many(partitions: list[int], timeout: float = 0.0) -> dict[int, Any]:
        got = _read(w.store, records, tuple(partitions))
        return got if len(partitions) > 1 else {partitions[0]: got}

    monkeypatch.setattr(w.store, "read_many", read_many)
    consumer = FakeConsumer()
    w._on_assign(consumer, [TopicPartition("clicks", 0)])  # type: ignore[arg-type]
    return consumer


def test_the_worker_refuses_a_tampered_snapshot_without_unpickling_it(
    no_unpickle: NoUnpickle, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _worker("fail")
    records = _tampered_records(w)
    with pytest.raises(SnapshotError, match=r"refusing partition 0: .*not deserialised"):
        _assign_from(w, records, monkeypatch)
    assert no_unpickle.calls == 0
    assert 0 not in w.stats.learners
    assert w.stats.snapshots_rejected == 0


def test_on_invalid_snapshot_fresh_starts_the_partition_anew(
    no_unpickle: NoUnpickle, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _worker("fresh")
    records = _tampered_records(w)
    consumer = _assign_from(w, records, monkeypatch)
    assert no_unpickle.calls == 0
    assert w.stats.snapshots_rejected == 1
    learner = w.stats.learners[0]
    assert learner.learned == 0 and learner.next_offset is None
    # Fresh: the consumer resumes at the group's committed offset (no offset set here).
    assert [(tp.partition, tp.offset) for tp in consumer.assigned] == [
        (0, TopicPartition("clicks", 0).offset)
    ]


def test_a_valid_snapshot_is_restored_at_its_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _worker("fail")
    learner = PartitionLearner("clicks", 0, make_model("logreg"))
    for i, ev in enumerate(_events(50)):
        learner.predict_learn(ev, i)
    records, _ = w.store.messages(0, 50, learner.snapshot())
    w.store.forget(0)
    consumer = _assign_from(w, records, monkeypatch)
    assert [(tp.partition, tp.offset) for tp in consumer.assigned] == [(0, 50)]
    got = w.stats.learners[0]
    assert (got.learned, got.next_offset, got.snapshot_offset) == (learner.learned, 50, 50)


# -- PartitionLearner round trip --------------------------------------------------------------
def _events(n: int, seed: int = 3) -> list[dict[str, Any]]:
    return list(generate(SimulationConfig(n_events=n, seed=seed, label_rate=0.7)))


def test_snapshot_restore_round_trip_predicts_the_same_afterwards() -> None:
    events = _events(800)
    original = PartitionLearner("clicks", 2, make_model("logreg"), window=100)
    for i, ev in enumerate(events[:500]):
        original.predict_learn(ev, i)
    original.next_offset = 500
    payload = original.snapshot()
    restored = PartitionLearner.restore("clicks", 2, payload, 500)
    assert restored.next_offset == 500
    assert (restored.consumed, restored.predicted, restored.learned) == (
        original.consumed,
        original.predicted,
        original.learned,
    )
    assert restored.learned == sum(ev.get("clicked") is not None for ev in events[:500])
    a = [original.predict_learn(ev, 500 + i) for i, ev in enumerate(events[500:])]
    b = [restored.predict_learn(ev, 500 + i) for i, ev in enumerate(events[500:])]
    assert a == b  # probabilities, model versions, everything
    ow = original.model["LogisticRegression"]
    rw = restored.model["LogisticRegression"]
    assert (dict(ow.weights), ow.intercept) == (dict(rw.weights), rw.intercept)
    assert (restored.consumed, restored.learned) == (original.consumed, original.learned)


def test_a_learner_snapshot_signs_and_reads_back_through_the_store() -> None:
    learner = PartitionLearner("clicks", 0, make_model("fm"))
    for i, ev in enumerate(_events(200, seed=4)):
        learner.predict_learn(ev, i)
    store = _store(chunk_bytes=4096)
    records, manifest = store.messages(0, 200, learner.snapshot())
    assert manifest.chunks == -(-manifest.size // 4096) > 1
    restored = _read(_store(chunk_bytes=4096), records)
    assert isinstance(restored, Restored)
    again = PartitionLearner.restore("clicks", 0, restored.payload, restored.manifest.next_offset)
    probes = [features_of(ev) for ev in _events(20, seed=5)]
    assert [again.model.predict_proba_one(x) for x in probes] == [
        learner.model.predict_proba_one(x) for x in probes
    ]
