"""Helpers shared by several test modules."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from worker.config import settings_from_mapping
from worker.learner import LearnerOptions, PartitionLearner
from worker.loop import Worker
from worker.metrics import WorkerStats
from worker.models import model_factory
from worker.scoring import Scores
from worker.simulate import SimulationConfig, generate


def featured_stats() -> WorkerStats:
    """Worker stats holding one learner with every feature on and every metric set."""
    stats = WorkerStats("clicks", "logreg")
    factory = model_factory("logreg", 0)
    opts = LearnerOptions(
        baseline_window=500, drift_detector="adwin", drift_grace=0, data_drift_block=200
    )
    learner = PartitionLearner("clicks", 0, factory(), options=opts, new_model=factory)
    for i, ev in enumerate(generate(SimulationConfig(n_events=3000, drift_at=1500))):
        learner.predict_learn(ev, i)
    learner.end_batch()
    learner.next_offset = learner.committed_offset = learner.high_watermark = 3000
    learner.snapshot_at, learner.restore_seconds = 1.0, 0.1
    learner.dead_lettered["invalid_json"] += 1
    assert learner.drift is not None
    learner.drift.last_alarm_time = learner.drift.last_alarm_time or 1.0
    stats.learners[0] = learner
    stats.beat()
    return stats


def assert_same_scores(mine: Scores, ref: Scores) -> None:
    """Counts (so accuracy and AUC) exactly; float sums folded at other batch boundaries
    may differ in the last bits."""
    assert (mine.labelled, mine.positives, mine.accuracy, mine.roc_auc) == (
        ref.labelled,
        ref.positives,
        ref.accuracy,
        ref.roc_auc,
    )
    assert mine.log_loss == pytest.approx(ref.log_loss, rel=1e-12)
    assert mine.mean_prediction == pytest.approx(ref.mean_prediction, rel=1e-12)


def features_of(event: dict[str, Any]) -> dict[str, Any]:
    """The model input ``x`` of an event dict, built here independently of the worker's
    :meth:`~worker.events.ClickEvent.x` (the tests' oracles use it; a test checks both
    give the same dict, in the same key order).

    >>> features_of({"user_id": "u1", "item_id": "i2", "features": {"device": "ios"}})
    {'device': 'ios', 'user_id': 'u1', 'item_id': 'i2'}
    """
    x = dict(event.get("features") or {})
    x["user_id"] = event["user_id"]
    x["item_id"] = event["item_id"]
    return x


def offline_worker(**options: str) -> Worker:
    """A ``Worker`` for tests that put stand-ins in place of its Kafka clients: the
    broker address is never contacted, snapshots are unsigned, no metrics server.
    ``options`` are further settings (``guarantee="exactly-once"``, ...)."""
    settings = settings_from_mapping(
        {
            "bootstrap_servers": "127.0.0.1:9",  # never contacted
            "group_id": "g",
            "metrics_address": "off",
            "insecure_snapshots": "true",
            **options,
        },
        env={},
    )
    return Worker(settings)


def wait_until_listed(admin: AdminClient, topic: str, partitions: int, timeout: float = 30) -> None:
    """Until the broker's metadata lists a topic just created, with a leader for every
    partition. Created is not yet visible: a consumer subscribing before that may get
    "Unknown topic or partition" (seen once in test_broker_smoke)."""
    deadline = time.monotonic() + timeout
    while True:
        found = admin.list_topics(topic, timeout=10).topics.get(topic)
        if (
            found is not None
            and found.error is None
            and len(found.partitions) == partitions
            and all(p.leader >= 0 for p in found.partitions.values())
        ):
            return
        assert time.monotonic() < deadline, f"topic {topic} not in the metadata after {timeout}s"
        time.sleep(0.05)


BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def load_bench(name: str) -> ModuleType:
    """``bench/run.py`` imported as the module ``name`` (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
