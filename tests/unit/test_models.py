"""The contract every model preset keeps, and what check_model refuses."""

from __future__ import annotations

import contextlib
import math
import pickle
from typing import Any

import pytest
from river import base, compose, dummy, linear_model, preprocessing

from tests.helpers import features_of
from worker.errors import ConfigError
from worker.models import PRESETS, check_model, model_factory, split_pipeline
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


# -- transform once ------------------------------------------------------------------


class _CountingTokens(base.Transformer):
    """A stateless transformer that counts its transforms."""

    def __init__(self) -> None:
        self.calls = 0

    def transform_one(self, x: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {k: str(v) for k, v in x.items()}


def _learner_run(model: Any, events: list[dict[str, Any]]) -> list[float]:
    from worker.events import ClickEvent
    from worker.learner import PartitionLearner

    learner = PartitionLearner("t", 0, model)
    return [
        learner.learn_event(ClickEvent.from_dict(ev), offset).click_probability
        for offset, ev in enumerate(events)
    ]


def test_the_worker_predicts_and_learns_as_the_river_api_does(preset: str) -> None:
    """Transforming once for both calls changes nothing: the same probabilities and the
    same learned state, bit for bit, as predict_proba_one then learn_one."""
    factory = model_factory(preset, seed=3)
    api, worker = factory(), factory()
    assert split_pipeline(worker) is not None  # the presets take the transform-once path
    assert _learner_run(worker, STREAM) == _run(api, STREAM)
    # The learned state is the final step's (the transformers learn nothing).
    assert pickle.dumps(list(worker.steps.values())[-1]) == pickle.dumps(
        list(api.steps.values())[-1]
    )


def test_a_pipeline_of_stateless_transformers_is_transformed_once_per_event() -> None:
    tokens = _CountingTokens()
    model = compose.Pipeline(
        tokens,
        preprocessing.FeatureHasher(n_features=2**10, seed=0),
        linear_model.LogisticRegression(),
    )
    events = STREAM[:100]
    labelled = sum(ev["clicked"] is not None for ev in events)
    _learner_run(model, events)
    assert tokens.calls == len(events)
    _run(model, events)  # River's API: once more for every labelled event
    assert tokens.calls == 2 * len(events) + labelled


@pytest.mark.parametrize(
    "model",
    [
        # A scaler learns in learn_one: its transform at predict time differs from the one
        # at learn time, so the model must go through its own API.
        compose.Pipeline(
            compose.Select("score"),
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(),
        ),
        dummy.PriorClassifier(),  # not a pipeline
    ],
    ids=["learning-transformer", "bare-classifier"],
)
def test_other_models_keep_their_own_api(model: Any) -> None:
    assert split_pipeline(model) is None
    numeric = [
        {**ev, "features": {"score": float(ev["features"].get("position", 0))}} for ev in STREAM
    ]
    api = pickle.loads(pickle.dumps(model))
    assert _learner_run(model, numeric) == _run(api, numeric)


def test_replacing_the_model_replaces_the_transform_once_path() -> None:
    from worker.learner import PartitionLearner

    learner = PartitionLearner("t", 0, model_factory("logreg")())
    fresh = model_factory("fm")()
    learner.model = fresh  # as the reset-online drift action does
    assert learner.model is fresh
    assert learner._split is not None and learner._split[1] is fresh.steps["FMClassifier"]
    learner.model = linear_model.LogisticRegression()
    assert learner._split is None
