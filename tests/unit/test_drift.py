"""Online vs offline under drift: detection delay, false alarms, AUC margins, data drift.

The figures asserted here are the ones the README documents.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from functools import cache

import msgspec
import pytest

from tests.helpers import assert_same_scores
from worker.drift import ConceptDrift, DataDrift, psi
from worker.evaluate import Evaluation, encoded, evaluate
from worker.learner import LearnerOptions, PartitionLearner
from worker.models import model_factory
from worker.simulate import SimulationConfig, generate

N_EVENTS = 40_000
DRIFT_AT = 20_000
# Documented bound on the detection delay, in labelled events after the drift point.
MAX_DELAY = 3_000
OPTIONS = LearnerOptions(
    baseline_window=10_000,
    drift_detector="adwin",
    drift_grace=1000,
    data_drift_block=5000,
)


@cache
def run(scenario: str, seed: int) -> Evaluation:
    cfg = SimulationConfig(
        n_events=N_EVENTS, seed=seed, scenario=scenario, drift_at=DRIFT_AT, label_rate=1.0
    )
    return evaluate(
        encoded(generate(cfg)),
        options=OPTIONS,
        drift_point=cfg.drift_point,
        every=1000,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_abrupt_drift_is_detected_within_the_documented_delay_and_not_before(seed: int) -> None:
    result = run("abrupt", seed)
    assert result.drift_labelled == DRIFT_AT
    before = [a for a in result.alarms if a < DRIFT_AT]
    after = [a for a in result.alarms if a >= DRIFT_AT]
    assert before == [], f"false alarms before the drift at {before}"
    assert after, "the drift was not detected"
    assert after[0] - DRIFT_AT <= MAX_DELAY, f"detected {after[0] - DRIFT_AT} events late"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_false_alarms_on_a_stationary_stream_are_bounded(seed: int) -> None:
    result = run("none", seed)
    assert result.events == N_EVENTS
    assert len(result.alarms) <= 1, f"{len(result.alarms)} false alarms: {result.alarms}"


@pytest.mark.parametrize("seed", [1, 2])
def test_online_beats_the_frozen_batch_model_after_the_drift_and_is_close_before(
    seed: int,
) -> None:
    seg = run("abrupt", seed).segments
    before_gap = seg["before"]["batch"].roc_auc - seg["before"]["online"].roc_auc
    after_gap = seg["after"]["online"].roc_auc - seg["after"]["batch"].roc_auc
    assert abs(before_gap) < 0.1, f"before the drift the models differ by {before_gap:.3f}"
    assert after_gap > 0.1, f"after the drift online leads by only {after_gap:.3f}"
    assert seg["after"]["batch"].roc_auc < 0.6  # the frozen model is near chance


def test_the_batch_model_is_frozen_unless_retraining_is_asked_for() -> None:
    result = run("abrupt", 1)
    assert result.trainings == [10_000]
    retrained = evaluate(
        encoded(generate(SimulationConfig(n_events=30_000, seed=1, scenario="none"))),
        options=LearnerOptions(baseline_window=5000, baseline_retrain_every=10_000),
    )
    assert retrained.trainings == [5000, 15_000, 25_000]


def test_retrain_batch_action_retrains_at_the_alarm() -> None:
    cfg = SimulationConfig(n_events=N_EVENTS, seed=1, scenario="abrupt", drift_at=DRIFT_AT)
    result = evaluate(
        encoded(generate(cfg)),
        options=LearnerOptions(
            baseline_window=10_000,
            drift_detector="adwin",
            drift_action="retrain-batch",
            data_drift_block=5000,
        ),
        drift_point=cfg.drift_point,
    )
    assert result.alarms
    # One training at 10,000, one right after the (first) alarm.
    assert result.trainings[0] == 10_000
    assert result.trainings[1] in (result.alarms[0], result.alarms[0] + 1)
    frozen = run("abrupt", 1).segments["after"]["batch"].roc_auc
    assert result.segments["after"]["batch"].roc_auc > frozen + 0.05


def test_data_drift_rises_for_the_shifted_feature_only() -> None:
    psi_after = run("abrupt", 1).psi
    # The event's own features are watched by default; the ids only when named (below).
    assert set(psi_after) == {
        "device",
        "position",
        "category",
        "hour",
        "__label__",
        "__prediction__",
    }
    assert psi_after["device"] > 0.25
    for name in ("category", "position"):
        assert psi_after[name] < 0.1, f"{name}: {psi_after[name]:.3f}"
    # On a stationary stream every feature and the label stay low. (The prediction's
    # distribution is not asserted: it keeps sharpening while the model learns.)
    stationary = run("none", 1).psi
    stationary.pop("__prediction__")
    assert all(v < 0.1 for v in stationary.values()), stationary


def test_psi_matches_its_definition() -> None:
    ref, rec = Counter(a=60, b=40), Counter(a=30, b=70)
    expected = (0.3 - 0.6) * math.log(0.3 / 0.6) + (0.7 - 0.4) * math.log(0.7 / 0.4)
    assert psi(ref, rec) == pytest.approx(expected)
    assert psi(ref, ref) == 0.0
    assert math.isnan(psi(Counter(), rec))


def test_adwin_ignores_an_improving_model_and_the_grace_period() -> None:
    d = ConceptDrift("adwin", grace=0)
    # Loss falls (the model learns): no alarm.
    assert not any(d.update(0.8 if i < 500 else 0.05) for i in range(3000))
    g = ConceptDrift("adwin", grace=10_000)
    assert not any(g.update(0.05 if i < 2000 else 0.9) for i in range(3000))
    ph = ConceptDrift("page-hinkley", grace=0)
    alarms = [ph.update(0.05 if i < 2000 else 0.9) for i in range(3000)]
    assert not any(alarms[:2000]) and any(alarms[2000:])


def test_data_drift_picks_the_most_frequent_features_deterministically() -> None:
    d = DataDrift(block=10, top_k=2)
    for i in range(10):
        d.add({"a": "x", "b": i, "c": "y" if i % 2 else None}, True, 0.5)
    assert d.features == ("a", "b")
    with pytest.raises(ValueError, match="at least 10"):
        DataDrift(block=5)


def test_full_learner_state_survives_a_snapshot_exactly() -> None:
    """Online model, batch baseline and window, scores and detectors: restored exactly."""
    events = list(
        generate(SimulationConfig(n_events=24_000, seed=5, scenario="abrupt", drift_at=12_000))
    )
    factory = model_factory("logreg", 0)
    opts = LearnerOptions(
        baseline_window=4000,
        baseline_retrain_every=6000,
        drift_detector="adwin",
        drift_grace=500,
        drift_action="reset-online",
        data_drift_block=2000,
    )
    straight = PartitionLearner("t", 0, factory(), options=opts, new_model=factory)
    a = [straight.predict_learn(ev, i) for i, ev in enumerate(events)]
    first = PartitionLearner("t", 0, factory(), options=opts, new_model=factory)
    b = [first.predict_learn(ev, i) for i, ev in enumerate(events[:11_111])]
    restored = PartitionLearner.restore(
        "t", 0, first.snapshot(), 11_111, options=opts, new_model=factory
    )
    b += [restored.predict_learn(ev, 11_111 + i) for i, ev in enumerate(events[11_111:])]
    assert msgspec.json.encode(a) == msgspec.json.encode(b)  # bit for bit
    straight.end_batch()
    restored.end_batch()
    assert_same_scores(restored.scores.cumulative(), straight.scores.cumulative())
    assert_same_scores(restored.batch_scores.cumulative(), straight.batch_scores.cumulative())
    assert restored.drift is not None and straight.drift is not None
    assert restored.drift.alarms == straight.drift.alarms
    assert restored.resets == straight.resets
    assert restored.baseline is not None and straight.baseline is not None
    assert restored.baseline.coef == straight.baseline.coef
    assert restored.data_drift is not None and straight.data_drift is not None
    assert restored.data_drift.scores == straight.data_drift.scores


def test_ids_are_watched_when_named_and_change_nothing_else() -> None:
    cfg = SimulationConfig(
        n_events=N_EVENTS, seed=1, scenario="abrupt", drift_at=DRIFT_AT, label_rate=1.0
    )
    named = evaluate(
        encoded(generate(cfg)),
        options=dataclasses.replace(OPTIONS, data_drift_features=("device", "user_id", "item_id")),
        drift_point=cfg.drift_point,
        every=1000,
    ).psi
    assert set(named) == {"device", "user_id", "item_id", "__label__", "__prediction__"}
    for name in ("user_id", "item_id"):
        assert named[name] < 0.1, f"{name}: {named[name]:.3f}"
    # Counting the ids too leaves the other features' histograms as they were.
    default = run("abrupt", 1).psi
    assert named["device"] == default["device"] > 0.25
    assert named["__label__"] == default["__label__"]
