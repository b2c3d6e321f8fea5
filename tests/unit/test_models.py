"""The contract every model preset keeps, and what check_model refuses."""

from __future__ import annotations

import contextlib
import math
import pickle
from typing import Any

import pytest
from river import base, compose, linear_model, preprocessing

from tests.helpers import features_of
from worker.errors import ConfigError
from worker.models import PRESETS, check_model, model_factory
from worker.simulate import SimulationConfig, generate

STREAM = list(generate(SimulationConfig(n_events=1200, seed=13, label_rate=0.8, scenario="none")))


def _run(model: Any, events: list[dict[str, Any]]) -> list[float]:
    out = []
    for ev in events:
        x = features_of(ev)
        p = model.predict_proba_one(x).get(True, 0.0)
        out.append(p)
        if ev["clicked"] is not None:
            model.learn_one(x, ev["clicked"])
    return out


@pytest.fixture(params=sorted(PRESETS))
def preset(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_preset_passes_check_model(preset: str) -> None:
    check_model(preset, model_factory(preset, seed=3))


def test_deterministic_given_the_seed(preset: str) -> None:
    a = _run(model_factory(preset, seed=3)(), STREAM)
    b = _run(model_factory(preset, seed=3)(), STREAM)
    assert a == b
    assert len(set(a)) > 100, "the model does not learn"
    assert all(0.0 <= p <= 1.0 for p in a)


def test_pickle_round_trip_continues_identically(preset: str) -> None:
    model = model_factory(preset, seed=1)()
    _run(model, STREAM[:600])
    copy = pickle.loads(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    assert _run(copy, STREAM[600:]) == _run(model, STREAM[600:])


def test_clone_gives_an_independent_untrained_copy(preset: str) -> None:
    trained = model_factory(preset, seed=2)()
    _run(trained, STREAM[:600])
    held_out = [features_of(ev) for ev in STREAM[600:700]]
    before = [trained.predict_proba_one(dict(x)).get(True, 0.0) for x in held_out]
    first = trained.predict_proba_one(features_of(STREAM[0])).get(True, 0.0)

    fresh = trained.clone()  # River's clone: same parameters, no learned state
    assert isinstance(fresh, base.Base)
    assert repr(fresh) == repr(trained)
    probs = _run(fresh, STREAM)
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert probs[0] != first, "the clone kept the learned state"
    # Training the clone left the original alone.
    assert [trained.predict_proba_one(dict(x)).get(True, 0.0) for x in held_out] == before


@pytest.mark.parametrize(
    "x",
    [
        {"user_id": "never-seen", "item_id": "never-seen"},
        {"user_id": "u1", "item_id": "i1", "device": "toaster", "position": 99},
        {"user_id": "u1", "item_id": "i1", "score": 0.25, "returning": True, "hour": 0},
        {"user_id": "u1", "item_id": "i1", "score": -1e300, "big": 1e300, "neg": -5},
        {"user_id": "u1", "item_id": "i1", "empty": "", "unicode": "čšž 🚀"},
    ],
    ids=["unseen-ids", "unseen-values", "new-types", "extreme-numbers", "odd-strings"],
)
def test_unseen_and_missing_features_do_not_crash(preset: str, x: dict[str, Any]) -> None:
    model = model_factory(preset, seed=0)()
    _run(model, STREAM[:300])
    p = model.predict_proba_one(dict(x)).get(True, 0.0)
    assert 0.0 <= p <= 1.0 and math.isfinite(p)
    model.learn_one(dict(x), True)
    p = model.predict_proba_one(dict(x)).get(True, 0.0)
    assert 0.0 <= p <= 1.0 and math.isfinite(p)


def test_an_extreme_but_valid_number_does_not_break_the_model(preset: str) -> None:
    """The click-event schema accepts any finite double as a feature value. Learning from
    one such event must leave the model usable: if learn_one raises half-way, the worker
    dead-letters the event but keeps the half-updated model (and snapshots it)."""
    model = model_factory(preset, seed=0)()
    _run(model, STREAM[:600])
    for i, value in enumerate([1e300, -1e300, 1.7e308, 1e12]):
        x = {**features_of(STREAM[i]), "score": value}
        with contextlib.suppress(Exception):  # the worker would dead-letter it
            model.predict_proba_one(dict(x))
            model.learn_one(dict(x), i % 2 == 0)
    later = [model.predict_proba_one(features_of(ev)).get(True, 0.0) for ev in STREAM[600:]]
    broken = [p for p in later if not (0.0 <= p <= 1.0)]  # NaN fails both
    assert not broken, f"{len(broken)} of {len(later)} later predictions are not probabilities"


def _numeric_only(x: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in x.items() if type(v) is float}


def test_check_model_refuses_an_unpicklable_model() -> None:
    def factory() -> Any:
        return compose.Pipeline(
            compose.FuncTransformer(lambda x: _numeric_only(x)),
            linear_model.LogisticRegression(),
        )

    factory().learn_one({"score": 0.5}, True)  # it works as a model...
    with pytest.raises(ConfigError) as info:
        check_model("lambda-pipeline", factory)  # ...but cannot be snapshotted
    assert "pickle" in str(info.value)


def test_check_model_accepts_the_same_model_with_a_module_level_function() -> None:
    check_model(
        "function-pipeline",
        lambda: compose.Pipeline(
            compose.FuncTransformer(_numeric_only), linear_model.LogisticRegression()
        ),
    )


@pytest.mark.parametrize(
    "factory",
    [
        preprocessing.StandardScaler,  # a transformer
        linear_model.LinearRegression,  # a regressor: no probabilities
        dict,  # not a model at all
    ],
    ids=["transformer", "regressor", "dict"],
)
def test_check_model_refuses_a_non_classifier(factory: Any) -> None:
    with pytest.raises(ConfigError) as info:
        check_model("not-a-classifier", factory)
    assert "not-a-classifier" in str(info.value)


def test_check_model_reports_a_factory_that_raises() -> None:
    def factory() -> Any:
        raise RuntimeError("boom")

    with pytest.raises(ConfigError, match="boom"):
        check_model("raising", factory)


@pytest.mark.parametrize(
    "spec",
    ["nope", "no_such_module_xyz:factory", "tests.plugin_models:missing", "tests.plugin_models:"],
)
def test_model_factory_refuses_unknown_specs(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        model_factory(spec, seed=0)
    assert spec.split(":")[0] in str(info.value)


def test_plugin_factory_is_called_with_the_seed() -> None:
    make = model_factory("tests.plugin_models:onehot_logreg", seed=4)
    check_model("tests.plugin_models:onehot_logreg", make)
    assert _run(make(), STREAM[:200]) == _run(make(), STREAM[:200])
