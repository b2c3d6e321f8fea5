"""Snapshot size and time per model preset, and restore time of a large snapshot.

    python bench/snapshots.py --events 100000 1000000          # size/time per preset
    python bench/snapshots.py --restore-mb 50 --bootstrap 127.0.0.1:9092

Prints a markdown table; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worker.learner import LearnerOptions, PartitionLearner
from worker.models import PRESETS, make_model
from worker.simulate import SimulationConfig, generate


def worker_options() -> LearnerOptions:
    """The worker's default learner options (batch baseline, drift detectors)."""
    from worker.config import settings_from_mapping

    return settings_from_mapping(
        {"bootstrap_servers": "unused:0"}, env={"RIVERLINE_SNAPSHOT_KEY": "x" * 16}
    ).learner_options()


def preset_sizes(counts: list[int], presets: list[str], full: bool) -> list[dict[str, Any]]:
    rows = []
    options = worker_options() if full else None
    for preset in presets:
        learner = PartitionLearner("clicks", 0, make_model(preset, seed=0), options=options)
        done = 0
        stream = generate(SimulationConfig(n_events=max(counts), seed=1, n_users=100_000))
        for target in sorted(counts):
            for ev in stream:
                learner.predict_learn(ev, done)
                done += 1
                if done >= target:
                    break
            learner.end_batch()
            t0 = time.perf_counter()
            payload = learner.snapshot()
            dump_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            PartitionLearner.restore("clicks", 0, payload, done)
            load_s = time.perf_counter() - t0
            rows.append(
                {
                    "preset": preset,
                    "events": done,
                    "snapshot_bytes": len(payload),
                    "dump_ms": dump_s * 1000,
                    "load_ms": load_s * 1000,
                    "with": "baseline+drift" if full else "model+scores",
                    "max_batch_training_s": learner.baseline.max_training_seconds
                    if learner.baseline
                    else None,
                }
            )
            print(f"{preset} after {done:,} events: {len(payload) / 1e6:.2f} MB", file=sys.stderr)
    return rows


class Ballast:
    """A model padded to a given size: predicts 0.5, learns nothing."""

    def __init__(self, size: int) -> None:
        self.blob = os.urandom(size)

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return {False: 0.5, True: 0.5}

    def learn_one(self, x: dict[str, Any], y: bool) -> None:
        pass


def restore_time(bootstrap: str, megabytes: int) -> dict[str, Any]:
    import uuid

    from confluent_kafka import Producer

    from worker.snapshots import Signer, SnapshotStore

    topic = f"bench-state-{uuid.uuid4().hex[:6]}"
    conf = {"bootstrap.servers": bootstrap}
    store = SnapshotStore(conf, "bench", "clicks", topic, Signer(b"k" * 32))
    store.ensure_topic(1)
    learner = PartitionLearner("clicks", 0, Ballast(megabytes * 1024 * 1024))
    payload = learner.snapshot()
    t0 = time.perf_counter()
    records, manifest = store.messages(0, 123, payload)
    producer = Producer({**conf, "linger.ms": 5, "message.max.bytes": 2 * 1024 * 1024})
    for key, value in records:
        producer.produce(topic, value, key, partition=0)
    producer.flush(120)
    write_s = time.perf_counter() - t0
    reader = SnapshotStore(conf, "bench", "clicks", topic, Signer(b"k" * 32))
    reader.ensure_topic(1)
    t0 = time.perf_counter()
    restored = reader.read_latest(0)
    read_s = time.perf_counter() - t0
    assert restored is not None and restored.manifest.next_offset == 123
    t0 = time.perf_counter()
    PartitionLearner.restore("clicks", 0, restored.payload, 123)
    load_s = time.perf_counter() - t0
    return {
        "snapshot_bytes": len(payload),
        "chunks": manifest.chunks,
        "write_s": write_s,
        "read_verify_s": read_s,
        "unpickle_s": load_s,
        "restore_s": read_s + load_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, nargs="*", default=[100_000])
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--restore-mb", type=int, default=0)
    ap.add_argument(
        "--full", action="store_true", help="with the worker's default baseline and drift state"
    )
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    if args.events:
        rows = preset_sizes(args.events, args.presets, args.full)
        out["presets"] = rows
        print("| preset | events | state | snapshot | pickle | unpickle | worst batch training |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['preset']} | {r['events']:,} | {r['with']} | "
                f"{r['snapshot_bytes'] / 1e6:.2f} MB | {r['dump_ms']:.0f} ms | "
                f"{r['load_ms']:.0f} ms | "
                + (f"{r['max_batch_training_s']:.2f} s |" if r["max_batch_training_s"] else "– |")
            )
    if args.restore_mb:
        if not args.bootstrap:
            ap.error("--restore-mb needs --bootstrap or KAFKA_BOOTSTRAP_SERVERS")
        r = restore_time(args.bootstrap, args.restore_mb)
        out["restore"] = r
        print(
            f"\nrestore of a {r['snapshot_bytes'] / 1e6:.1f} MB snapshot ({r['chunks']} chunks): "
            f"write {r['write_s']:.2f}s, read+verify {r['read_verify_s']:.2f}s, "
            f"unpickle {r['unpickle_s']:.2f}s, restore total {r['restore_s']:.2f}s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
