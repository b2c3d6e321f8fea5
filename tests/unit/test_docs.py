"""The README's configuration and metrics tables are checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

from worker.config import markdown_table
from worker.learner import LearnerOptions, PartitionLearner
from worker.metrics import WorkerCollector, WorkerStats
from worker.models import model_factory
from worker.simulate import SimulationConfig, generate

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_configuration_table_is_the_one_the_code_generates() -> None:
    assert markdown_table() in README, (
        "README's configuration table differs from worker.config.OPTIONS; paste "
        "`python -c 'from worker.config import markdown_table; print(markdown_table())'`"
    )


def _exported_names() -> set[str]:
    """Every sample name a fully featured worker exports, with their family types."""
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
    names = set()
    for family in WorkerCollector(stats).collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
        assert family.samples, f"{family.name} exported no sample"
    return names


def test_the_metrics_table_lists_exactly_the_exported_metrics() -> None:
    documented = set(re.findall(r"^\| `(riverline_[a-z_]+)` \|", README, flags=re.M))
    exported = _exported_names()
    assert exported - documented == set(), "exported but not in README's metrics table"
    assert documented - exported == set(), "in README's metrics table but not exported"
