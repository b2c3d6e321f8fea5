"""The collector exports each partition's plain values from its learner, and nothing
for a value not known yet (None or NaN)."""

from __future__ import annotations

import random

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import featured_stats
from worker.metrics import SlowestIterations, make_registry


def _samples(stats: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(make_registry(stats)).decode()  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_partition_metrics_are_the_learners_values() -> None:
    stats = featured_stats()
    learner = stats.learners[0]
    assert learner.baseline is not None and learner.data_drift is not None
    learner.baseline.deploy_wait_seconds = 0.25
    learner.resets = 3
    part = (("partition", "0"), ("topic", "clicks"))
    got = _samples(stats)
    want = {
        "riverline_events_consumed_total": learner.consumed,
        "riverline_events_predicted_total": learner.predicted,
        "riverline_events_learned_total": learner.learned,
        "riverline_committed_offset": 3000,
        "riverline_consumer_lag_messages": 0,
        "riverline_restore_duration_seconds": 0.1,
        "riverline_online_model_resets_total": 3,
        "riverline_batch_trainings_total": learner.baseline.trainings,
        "riverline_batch_training_duration_seconds": learner.baseline.last_training_seconds,
        "riverline_batch_deploy_wait_seconds_total": 0.25,
        "riverline_label_drift_psi": learner.data_drift.scores["__label__"],
        "riverline_prediction_drift_psi": learner.data_drift.scores["__prediction__"],
    }
    assert {name: got[(name, part)] for name in want} == want
    assert learner.predicted == 3000 and learner.baseline.trainings == 1  # not all zeros


def test_values_not_known_yet_export_no_sample() -> None:
    stats = featured_stats()
    learner = stats.learners[0]
    learner.high_watermark = None  # lag unknown
    learner.snapshot_at = None  # no checkpoint yet
    assert learner.drift is not None and learner.data_drift is not None
    learner.drift.last_alarm_time = None
    learner.data_drift.scores["__label__"] = float("nan")
    names = {name for name, _ in _samples(stats)}
    for gone in (
        "riverline_consumer_lag_messages",
        "riverline_snapshot_size_bytes",
        "riverline_snapshot_age_seconds",
        "riverline_drift_last_alarm_timestamp_seconds",
        "riverline_label_drift_psi",
    ):
        assert gone not in names
    assert "riverline_prediction_drift_psi" in names
    learner.baseline = None  # --baseline-window 0
    names = {name for name, _ in _samples(stats)}
    assert not any(n.startswith("riverline_batch_") for n in names)


def test_slowest_iterations_keeps_the_slowest_above_the_threshold() -> None:
    rng = random.Random(5)
    slow = SlowestIterations(keep=5, threshold=0.01)
    noted = []
    for i in range(500):
        wall = rng.random() * 0.05
        cpu = wall * rng.random()
        slow.note(wall, cpu, at=i / 10, messages=i, checkpoint=i % 7 == 0)
        noted.append((wall, cpu, i))
    want = sorted((n for n in noted if n[0] >= 0.01), reverse=True)[:5]
    got = slow.as_list()
    assert [it["messages"] for it in got] == [i for _, _, i in want]
    assert [it["wall_ms"] for it in got] == [round(w * 1000, 1) for w, _, _ in want]
    assert [it["cpu_ms"] for it in got] == [round(c * 1000, 1) for _, c, _ in want]
    assert [it["checkpoint"] for it in got] == [i % 7 == 0 for _, _, i in want]
    assert SlowestIterations(threshold=0.01).as_list() == []
    few = SlowestIterations(keep=5, threshold=0.01)
    few.note(0.009, 0.009, at=0.0, messages=1, checkpoint=False)  # under the threshold
    assert few.as_list() == []
