"""Signed partition snapshots in a compacted Kafka topic.

A snapshot is everything a partition learner holds (model, scores, counters), pickled,
with the input offset it reflects. It is written as chunks (so any snapshot size fits
the broker's default 1 MB message limit) followed by a manifest:

- manifest: key ``<group>/<topic>/<partition>``, JSON value with the snapshot id, the
  next input offset, the chunk count and size, and an HMAC-SHA256 over the manifest
  fields and the payload;
- chunk *i*: key ``<group>/<topic>/<partition>/<snapshot id>/<i>``, the raw bytes.

Chunks of the previous snapshot are deleted with tombstones once a newer manifest is
written, so compaction keeps about one snapshot per partition. Snapshot *p* of input
partition *p* goes to partition ``p % n`` of the state topic, so a restore reads one
partition. Bytes whose HMAC does not verify are never unpickled.

>>> signer = Signer(b"k" * 32)
>>> m = Manifest("g", "clicks", 0, "s1", next_offset=42, chunks=1, size=3)
>>> m = m.signed(signer, b"abc")
>>> m.verify(signer, b"abc"), m.verify(signer, b"abd")
(True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from worker.errors import ConfigError, RiverlineError

log = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024
STATE_TOPIC_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
INSECURE_KEY = b"riverline-insecure-local-key"
MIN_KEY_BYTES = 16


class SnapshotError(RiverlineError):
    """A snapshot could not be written, read or verified."""


class Signer:
    """HMAC-SHA256 with the snapshot key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, *parts: bytes) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))  # unambiguous concatenation
            mac.update(part)
        return mac.hexdigest()

    def verify(self, signature: str, *parts: bytes) -> bool:
        return hmac.compare_digest(self.sign(*parts), signature)


def load_key(env: Mapping[str, str], key_file: str | None, insecure: bool) -> bytes:
    """The snapshot key: $RIVERLINE_SNAPSHOT_KEY, else --snapshot-key-file, else refuse.

    Without a key the worker refuses to start unless ``--insecure-snapshots`` is given
    (local use only): snapshots are then signed with a well-known key, which still
    catches corruption but not tampering.
    """
    if env.get("RIVERLINE_SNAPSHOT_KEY"):
        key = env["RIVERLINE_SNAPSHOT_KEY"].encode()
        source = "RIVERLINE_SNAPSHOT_KEY"
    elif key_file:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"--snapshot-key-file {key_file}: cannot read it ({exc.strerror})"
            ) from exc
        source = f"--snapshot-key-file {key_file}"
    elif insecure:
        log.warning(
            "snapshots are signed with a well-known key (--insecure-snapshots): anyone who "
            "can write the state topic can make this worker unpickle their bytes; set "
            "RIVERLINE_SNAPSHOT_KEY in production"
        )
        return INSECURE_KEY
    else:
        raise ConfigError(
            "no snapshot key: set RIVERLINE_SNAPSHOT_KEY (at least 16 random bytes, e.g. "
            "`openssl rand -hex 32`) or --snapshot-key-file FILE; for local experiments "
            "only, --insecure-snapshots"
        )
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{source}: the snapshot key must be at least {MIN_KEY_BYTES} bytes")
    return key


@dataclass(frozen=True)
class Manifest:
    group: str
    topic: str
    partition: int
    snapshot_id: str
    next_offset: int
    chunks: int
    size: int
    created: float = 0.0
    hmac: str = ""
    version: int = 1

    def _fields(self) -> bytes:
        body = asdict(self)
        body.pop("hmac")
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def signed(self, signer: Signer, payload: bytes) -> Manifest:
        unsigned = replace(self, hmac="")
        return replace(unsigned, hmac=signer.sign(unsigned._fields(), payload))

    def verify(self, signer: Signer, payload: bytes) -> bool:
        return len(payload) == self.size and signer.verify(self.hmac, self._fields(), payload)

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        try:
            data = orjson.loads(raw)
            return cls(**data)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise SnapshotError(f"unreadable snapshot manifest: {exc}") from exc


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float = 60.0) -> tuple[int, int]:
    """Low and high offsets of a partition. A topic created a moment ago may not be in
    the client's metadata yet ("unknown partition"), and a broker may be restarting:
    anything but a fatal error is retried for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            return int(low), int(high)
        except KafkaException as exc:
            if exc.args[0].fatal() or time.monotonic() > deadline:
                raise SnapshotError(
                    f"cannot read the offsets of {tp.topic}[{tp.partition}]: {exc.args[0].str()}"
                ) from exc
            time.sleep(0.2)


@dataclass
class _Scan:
    manifest: bytes | None = None
    chunks: dict[bytes, bytes] = field(default_factory=dict)
    bytes_read: int = 0


@dataclass
class Restored:
    manifest: Manifest
    payload: bytes  # verified; pickle.loads(payload) is the learner state
    seconds: float
    bytes_read: int


class SnapshotStore:
    """Write and read the snapshots of one consumer group's input partitions."""

    def __init__(
        self,
        bootstrap_conf: dict[str, Any],
        group: str,
        input_topic: str,
        state_topic: str,
        signer: Signer,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.conf = bootstrap_conf
        self.group = group
        self.input_topic = input_topic
        self.state_topic = state_topic
        self.signer = signer
        self.chunk_bytes = chunk_bytes
        self.state_partitions = 1
        # Chunk keys of the last snapshot written per partition, to tombstone later.
        self._previous: dict[int, list[bytes]] = {}

    def key(self, partition: int) -> bytes:
        return f"{self.group}/{self.input_topic}/{partition}".encode()

    def state_partition(self, partition: int) -> int:
        return partition % self.state_partitions

    def ensure_topic(self, partitions: int | None, timeout: float = 30.0) -> None:
        """Create the compacted state topic if missing; learn its partition count."""
        client = AdminClient(self.conf)
        md = client.list_topics(timeout=timeout)
        existing = md.topics.get(self.state_topic)
        if existing is not None and not existing.error:
            self.state_partitions = len(existing.partitions)
            return
        n = max(1, partitions or 1)
        topic = NewTopic(
            self.state_topic,
            num_partitions=n,
            replication_factor=-1,
            config={
                "cleanup.policy": "compact",
                "max.message.bytes": str(STATE_TOPIC_MAX_MESSAGE_BYTES),
                # Compact soon so a restore reads little history.
                "segment.ms": "600000",
                "min.cleanable.dirty.ratio": "0.1",
                "delete.retention.ms": "3600000",
            },
        )
        try:
            client.create_topics([topic])[self.state_topic].result(timeout=timeout)
            log.info("created compacted state topic %r (%d partitions)", self.state_topic, n)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise SnapshotError(
                    f"cannot create state topic {self.state_topic!r}: {exc}"
                ) from exc
        # Wait until the new topic is in the cluster metadata before anyone reads it.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            meta = client.list_topics(self.state_topic, timeout=timeout).topics.get(
                self.state_topic
            )
            if meta is not None and not meta.error and len(meta.partitions) == n:
                break
            time.sleep(0.1)
        self.state_partitions = n

    # -- writing -------------------------------------------------------------------
    def messages(
        self, partition: int, next_offset: int, payload: bytes
    ) -> tuple[list[tuple[bytes, bytes | None]], Manifest]:
        """The (key, value) records of one snapshot: chunks, manifest, then tombstones of
        the previous snapshot's chunks. The caller produces them in this order."""
        snapshot_id = uuid.uuid4().hex
        base = self.key(partition)
        chunks = [
            payload[i : i + self.chunk_bytes] for i in range(0, len(payload), self.chunk_bytes)
        ]
        chunk_keys = [base + f"/{snapshot_id}/{i}".encode() for i in range(len(chunks))]
        manifest = Manifest(
            self.group,
            self.input_topic,
            partition,
            snapshot_id,
            next_offset,
            len(chunks),
            len(payload),
            created=time.time(),
        ).signed(self.signer, payload)
        records: list[tuple[bytes, bytes | None]] = list(zip(chunk_keys, chunks, strict=True))
        records.append((base, manifest.encode()))
        records.extend((k, None) for k in self._previous.get(partition, []))
        self._previous[partition] = chunk_keys
        return records, manifest

    def forget(self, partition: int) -> None:
        self._previous.pop(partition, None)

    # -- reading -------------------------------------------------------------------
    def read_latest(self, partition: int, timeout: float = 120.0) -> Restored | None:
        """The newest verified snapshot of ``partition``, or None when there is none.

        Raises :class:`SnapshotError` when the newest snapshot fails verification or is
        incomplete: its bytes are never unpickled.
        """
        result = self.read_many([partition], timeout)[partition]
        if isinstance(result, SnapshotError):
            raise result
        return result

    def read_many(
        self, partitions: list[int], timeout: float = 120.0
    ) -> dict[int, Restored | SnapshotError | None]:
        """Read the state partitions of ``partitions`` once, with one consumer."""
        started = time.monotonic()
        found: dict[int, _Scan] = {p: _Scan() for p in partitions}
        by_key = {self.key(p): p for p in partitions}
        wanted = sorted({self.state_partition(p) for p in partitions})
        consumer = Consumer(
            {
                **self.conf,
                "group.id": f"{self.group}.riverline-restore",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                # Snapshots from aborted transactions must stay invisible.
                "isolation.level": "read_committed",
                "fetch.max.bytes": 64 * 1024 * 1024,
                "max.partition.fetch.bytes": 8 * 1024 * 1024,
                "fetch.wait.max.ms": 10,
            }
        )
        try:
            pending: set[int] = set()
            assignment = []
            for sp in wanted:
                low, high = _watermarks(consumer, TopicPartition(self.state_topic, sp))
                if high > low:
                    assignment.append(TopicPartition(self.state_topic, sp, low))
                    pending.add(sp)
            if assignment:
                consumer.assign(assignment)
            deadline = started + timeout
            while pending:
                if time.monotonic() > deadline:
                    raise SnapshotError(
                        f"reading snapshots from {self.state_topic!r} took longer than "
                        f"{timeout:.0f}s"
                    )
                for msg in consumer.consume(1000, timeout=0.05):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(msg.partition())  # type: ignore[arg-type]
                            continue
                        raise SnapshotError(f"reading {self.state_topic!r}: {err.str()}")
                    self._collect(msg.key(), msg.value(), by_key, found)
        finally:
            consumer.close()
        elapsed = time.monotonic() - started
        results: dict[int, Restored | SnapshotError | None] = {}
        for p in partitions:
            try:
                results[p] = self._verified(p, found[p], elapsed)
            except SnapshotError as exc:
                results[p] = exc
        return results

    @staticmethod
    def _collect(
        key: bytes | None, value: bytes | None, by_key: dict[bytes, int], found: dict[int, _Scan]
    ) -> None:
        """File one state record under its partition: a manifest, a chunk or a tombstone."""
        if key is None:
            return
        p = by_key.get(key)
        if p is not None:
            found[p].manifest = value
            return
        p = by_key.get(key.rsplit(b"/", 2)[0])  # <manifest key>/<snapshot id>/<i>
        if p is None:
            return  # another group's or another topic's partition
        scan = found[p]
        if value is None:
            scan.chunks.pop(key, None)
        else:
            scan.chunks[key] = value
            scan.bytes_read += len(value)

    def _verified(self, partition: int, scan: _Scan, elapsed: float) -> Restored | None:
        base = self.key(partition)
        chunks = scan.chunks
        manifest_raw = scan.manifest
        bytes_read = scan.bytes_read
        if manifest_raw is None:
            return None
        manifest = Manifest.decode(manifest_raw)
        where = f"snapshot {manifest.snapshot_id} of {self.input_topic}[{partition}]"
        parts = []
        for i in range(manifest.chunks):
            chunk = chunks.get(base + f"/{manifest.snapshot_id}/{i}".encode())
            if chunk is None:
                raise SnapshotError(
                    f"{where} is incomplete: chunk {i} of {manifest.chunks} missing"
                )
            parts.append(chunk)
        payload = b"".join(parts)
        if (
            manifest.group != self.group
            or manifest.topic != self.input_topic
            or manifest.partition != partition
            or not manifest.verify(self.signer, payload)
        ):
            raise SnapshotError(
                f"{where} failed verification (HMAC-SHA256 mismatch: tampered, truncated, or "
                "signed with another key); it was not deserialised"
            )
        # Every chunk still in the topic (this snapshot's and any left by a crash between
        # chunks and manifest) is deleted after the next snapshot.
        self._previous[partition] = sorted(chunks)
        return Restored(manifest, payload, elapsed, bytes_read)
