"""The simulated click stream: deterministic, well-formed, learnable, and drifting as promised."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pytest
from river import linear_model, metrics, optim

from worker.simulate import (
    CATEGORIES,
    DEVICES,
    N_POSITIONS,
    SCENARIOS,
    SimulationConfig,
    click_probability,
    generate,
    new_regime_probability,
)

Event = dict[str, Any]


def _features(event: Event) -> dict[str, float]:
    # What a per-user recommender would use: one-hot user, item, user x category, context.
    f = event["features"]
    user = event["user_id"]
    return {
        f"user={user}": 1.0,
        f"item={event['item_id']}": 1.0,
        f"user_category={user}|{f['category']}": 1.0,
        f"device={f['device']}": 1.0,
        f"position={f['position']}": 1.0,
    }


def _train(events: Sequence[Event]) -> linear_model.LogisticRegression:
    # River's default SGD(0.01) is too slow to learn per-user crosses from 10k events.
    model = linear_model.LogisticRegression(optimizer=optim.SGD(0.1))
    for event in events:
        model.learn_one(_features(event), event["clicked"])
    return model


def _frozen_auc(model: linear_model.LogisticRegression, events: Sequence[Event]) -> float:
    auc = metrics.ROCAUC()
    for event in events:
        auc.update(event["clicked"], model.predict_proba_one(_features(event))[True])
    return float(auc.get())


def _total_variation(
    a: Sequence[Event], b: Sequence[Event], key: Callable[[Event], Hashable]
) -> float:
    ca, cb = Counter(map(key, a)), Counter(map(key, b))
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in ca.keys() | cb.keys())


def _ctr(events: Sequence[Event]) -> float:
    labels: list[bool] = [e["clicked"] for e in events if e["clicked"] is not None]
    return sum(labels) / len(labels)


def _device(e: Event) -> Hashable:
    return str(e["features"]["device"])


def _category(e: Event) -> Hashable:
    return str(e["features"]["category"])


def _position(e: Event) -> Hashable:
    return int(e["features"]["position"])


# --- determinism and shape ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_config_same_events(scenario: str) -> None:
    config = SimulationConfig(n_events=2000, scenario=scenario, label_rate=0.7)
    assert list(generate(config)) == list(generate(config))


def test_different_seed_different_events() -> None:
    a = list(generate(SimulationConfig(n_events=200, seed=1)))
    b = list(generate(SimulationConfig(n_events=200, seed=2)))
    assert [(e["user_id"], e["item_id"]) for e in a] != [(e["user_id"], e["item_id"]) for e in b]


def test_events_are_well_formed() -> None:
    config = SimulationConfig(n_events=5000, scenario="abrupt", label_rate=0.8)
    events = list(generate(config))
    assert len(events) == config.n_events

    for event in events:
        assert set(event) == {"event_id", "ts", "user_id", "item_id", "features", "clicked"}
        assert re.fullmatch(r"e-\d{12}", event["event_id"])
        assert type(event["ts"]) is int
        assert re.fullmatch(r"u\d+", event["user_id"])
        assert 0 <= int(event["user_id"][1:]) < config.n_users
        assert re.fullmatch(r"i\d+", event["item_id"])
        assert 0 <= int(event["item_id"][1:]) < config.n_items
        f = event["features"]
        assert set(f) == {"device", "position", "category", "hour"}
        assert f["device"] in DEVICES
        assert f["category"] in CATEGORIES
        assert type(f["position"]) is int and 1 <= f["position"] <= N_POSITIONS
        assert f["hour"] == event["ts"] // 3_600_000 % 24
        assert event["clicked"] is None or type(event["clicked"]) is bool

    ids = [e["event_id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[123] == "e-000000000123"
    stamps = [e["ts"] for e in events]
    assert stamps[0] >= config.start_ts
    assert all(a <= b for a, b in itertools.pairwise(stamps))
    # 5000 events at 100 events/s of event time: 50 s, give or take one slot of jitter.
    assert abs((stamps[-1] - config.start_ts) - 50_000) <= 10
    # Each item always has the same category.
    pairs = {(e["item_id"], e["features"]["category"]) for e in events}
    assert len(pairs) == len({item for item, _ in pairs})


def test_overall_ctr_is_realistic() -> None:
    events = list(generate(SimulationConfig(n_events=20_000, scenario="none")))
    assert 0.1 <= _ctr(events) <= 0.3


def test_users_and_items_repeat() -> None:
    events = list(generate(SimulationConfig(n_events=10_000, scenario="none")))
    users = Counter(e["user_id"] for e in events)
    # Most traffic comes from users seen often enough for a per-user model to learn...
    assert sum(n for n in users.values() if n >= 20) / len(events) > 0.5
    # ...without one user being the whole stream.
    assert max(users.values()) / len(events) < 0.15
    items = Counter(e["item_id"] for e in events)
    assert max(items.values()) / len(events) < 0.2


def test_events_are_fresh_dicts() -> None:
    config = SimulationConfig(n_events=3)
    first = list(generate(config))
    first[0]["features"]["device"] = "mutated"
    first[1]["user_id"] = "mutated"
    again = list(generate(config))
    assert again[0]["features"]["device"] != "mutated" and again[1]["user_id"] != "mutated"
    assert first[0]["features"] is not first[1]["features"]


def test_event_id_prefix() -> None:
    events = list(generate(SimulationConfig(n_events=2, event_id_prefix="run7-")))
    assert [e["event_id"] for e in events] == ["run7-000000000000", "run7-000000000001"]


def test_generation_is_lazy() -> None:
    # A billion events would not fit in memory: the first few must come without building them.
    stream = generate(SimulationConfig(n_events=10**9, scenario="gradual"))
    assert len(list(itertools.islice(stream, 5))) == 5


def test_start_ts_and_rate() -> None:
    config = SimulationConfig(n_events=1000, start_ts=0, events_per_second=10.0)
    stamps = [e["ts"] for e in generate(config)]
    assert stamps[0] < 100 and abs(stamps[-1] - 99_900) <= 100


# --- labels ------------------------------------------------------------------------------


def test_label_rate_one_labels_everything() -> None:
    events = generate(SimulationConfig(n_events=5000, label_rate=1.0))
    assert all(type(e["clicked"]) is bool for e in events)


def test_label_rate_half_labels_about_half() -> None:
    events = list(generate(SimulationConfig(n_events=10_000, label_rate=0.5)))
    labelled = [e for e in events if e["clicked"] is not None]
    assert 0.47 < len(labelled) / len(events) < 0.53
    assert all(type(e["clicked"]) is bool for e in labelled)
    assert {e["clicked"] for e in labelled} == {True, False}


def test_label_rate_does_not_change_the_inputs() -> None:
    full = list(generate(SimulationConfig(n_events=3000, label_rate=1.0)))
    half = list(generate(SimulationConfig(n_events=3000, label_rate=0.5)))
    assert [{**e, "clicked": None} for e in full] == [{**e, "clicked": None} for e in half]
    assert all(h["clicked"] in (None, f["clicked"]) for f, h in zip(full, half, strict=True))


# --- learnability and drift --------------------------------------------------------------


def test_stationary_stream_is_learnable() -> None:
    events = list(generate(SimulationConfig(n_events=20_000, scenario="none")))
    model = _train(events[:10_000])
    assert _frozen_auc(model, events[10_000:]) > 0.7


def test_abrupt_concept_drift_breaks_a_frozen_model() -> None:
    config = SimulationConfig(n_events=20_000, scenario="abrupt")
    assert config.drift_point == 10_000
    events = list(generate(config))
    model = _train(events[:7000])
    before = _frozen_auc(model, events[7000:10_000])
    after = _frozen_auc(model, events[10_000:13_000])
    assert before > 0.7
    assert before - after > 0.1


def test_abrupt_drift_changes_the_click_probability_of_the_same_input() -> None:
    config = SimulationConfig(n_events=2000, scenario="abrupt")
    events = list(generate(config))
    gaps = [
        abs(click_probability(config, e) - click_probability(config, e, new_regime=True))
        for e in events
    ]
    assert sum(gaps) / len(gaps) > 0.2
    # No drift in the stationary scenario: the old concept explains the labels throughout.
    assert click_probability(config, events[0]) == click_probability(
        SimulationConfig(n_events=2000, scenario="none"), events[0]
    )


def test_abrupt_drift_starts_exactly_at_drift_point() -> None:
    # Draws do not depend on the regime, so streams agree wherever their regimes agree.
    old = list(generate(SimulationConfig(n_events=3000, scenario="none")))
    new = list(generate(SimulationConfig(n_events=3000, scenario="abrupt", drift_at=0)))
    drifted = list(generate(SimulationConfig(n_events=3000, scenario="abrupt", drift_at=1000)))
    assert drifted[:1000] == old[:1000]
    assert drifted[1000:] == new[1000:]
    assert drifted[1000:] != old[1000:]
    # One event rarely tells the regimes apart, so check the boundary at many drift points.
    firsts = [
        list(generate(SimulationConfig(n_events=d + 1, scenario="abrupt", drift_at=d)))[d]
        for d in range(1000, 1100)
    ]
    assert firsts == new[1000:1100]
    assert firsts != old[1000:1100]


def test_abrupt_data_drift_is_on_device_only() -> None:
    config = SimulationConfig(n_events=20_000, scenario="abrupt")
    events = list(generate(config))
    before, after = events[: config.drift_point], events[config.drift_point :]
    assert _total_variation(before, after, _device) > 0.15
    assert _total_variation(before, after, _category) < 0.05
    assert _total_variation(before, after, _position) < 0.05
    web_before = sum(e["features"]["device"] == "web" for e in before) / len(before)
    web_after = sum(e["features"]["device"] == "web" for e in after) / len(after)
    assert web_after - web_before > 0.2


def test_stationary_stream_has_no_data_drift() -> None:
    config = SimulationConfig(n_events=20_000, scenario="none")
    events = list(generate(config))
    assert config.drift_point is None
    assert _total_variation(events[:10_000], events[10_000:], _device) < 0.05


def test_gradual_drift_phases_in() -> None:
    config = SimulationConfig(
        n_events=30_000, scenario="gradual", drift_at=10_000, drift_width=10_000
    )
    assert config.drift_window == (10_000, 20_000)
    assert [new_regime_probability(config, i) for i in (0, 9_999, 10_000, 15_000, 20_000)] == [
        0.0,
        0.0,
        0.0,
        0.5,
        1.0,
    ]
    events = list(generate(config))

    # The device mix follows the regime: the web share climbs across the window.
    def web(part: Sequence[Event]) -> float:
        return sum(_device(e) == "web" for e in part) / len(part)

    quarters = [events[i : i + 2500] for i in range(10_000, 20_000, 2500)]
    shares = [web(events[:10_000]), *map(web, quarters), web(events[20_000:])]
    assert all(a < b for a, b in itertools.pairwise(shares)), shares
    assert shares[-1] - shares[0] > 0.2

    # And so does the concept: a model frozen before the window decays across it.
    model = _train(events[:10_000])
    early = _frozen_auc(model, events[10_000:15_000])
    late = _frozen_auc(model, events[15_000:20_000])
    after = _frozen_auc(model, events[20_000:])
    assert early - after > 0.1
    assert early > late > after - 0.03


def test_seasonal_ctr_follows_the_period() -> None:
    config = SimulationConfig(n_events=24_000, scenario="seasonal", season_period_s=60.0)
    assert config.drift_point is None

    def quarter(e: Event) -> int:
        seconds = (e["ts"] - config.start_ts) / 1000
        return int(seconds / config.season_period_s % 1.0 * 4)

    events = list(generate(config))
    by_quarter = [[e for e in events if quarter(e) == q] for q in range(4)]
    # The sine peaks in the first half of the period and bottoms out in the second.
    peak = _ctr(by_quarter[0] + by_quarter[1])
    trough = _ctr(by_quarter[2] + by_quarter[3])
    assert peak - trough > 0.07

    # Same draws without seasonality: no such difference (the split itself is neutral).
    flat = list(generate(SimulationConfig(n_events=24_000, scenario="none")))
    flat_by_half = [[e for e in flat if (quarter(e) < 2) == first] for first in (True, False)]
    assert abs(_ctr(flat_by_half[0]) - _ctr(flat_by_half[1])) < 0.03


# --- configuration -----------------------------------------------------------------------


def test_drift_point_defaults() -> None:
    abrupt = SimulationConfig(n_events=1000, scenario="abrupt")
    assert abrupt.drift_point == 500 and abrupt.drift_window == (500, 500)
    # The event at drift_point is the first one of the new regime.
    assert [new_regime_probability(abrupt, i) for i in (0, 499, 500, 999)] == [0, 0, 1, 1]
    assert SimulationConfig(n_events=1000, scenario="gradual").drift_window == (500, 600)
    assert SimulationConfig(n_events=1000, scenario="abrupt", drift_at=0).drift_point == 0
    assert SimulationConfig(n_events=1000, scenario="none", drift_at=10).drift_point is None
    assert SimulationConfig(n_events=5, scenario="gradual").drift_window == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenario": "x"}, "scenario must be one of none, abrupt, gradual, seasonal, got 'x'"),
        ({"n_events": -1}, "n_events must be an integer >= 1, got -1"),
        ({"n_events": 0}, "n_events must be an integer >= 1, got 0"),
        ({"n_users": 0}, "n_users must be an integer >= 1"),
        ({"n_items": 2.5}, "n_items must be an integer >= 1"),
        ({"n_events": 100, "drift_at": 101}, "drift_at must be an integer in [0, n_events=100]"),
        ({"drift_at": -1}, "drift_at must be an integer in [0, n_events=10000]"),
        ({"drift_width": 0}, "drift_width must be an integer >= 1"),
        ({"label_rate": 0}, "label_rate must be in (0, 1]"),
        ({"label_rate": 1.5}, "label_rate must be in (0, 1]"),
        ({"label_rate": float("nan")}, "label_rate must be in (0, 1]"),
        ({"events_per_second": 0}, "events_per_second must be a finite number > 0"),
        ({"season_period_s": float("inf")}, "season_period_s must be a finite number > 0"),
        ({"seed": "42"}, "seed must be an integer"),
        ({"n_events": True}, "n_events must be an integer >= 1"),
        ({"start_ts": -5}, "start_ts must be a non-negative integer"),
    ],
)
def test_bad_config_is_rejected_with_a_useful_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SimulationConfig(**kwargs)
