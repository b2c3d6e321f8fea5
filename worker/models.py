"""Model presets (pure River) and the ``MODULE:FACTORY`` plug-in path.

Every model takes the same input, ``x = {**features, "user_id": ..., "item_id": ...}``,
and is a River binary classifier (``predict_proba_one`` / ``learn_one``).

>>> model = make_model("logreg", seed=0)
>>> x = {"user_id": "u1", "item_id": "i1", "category": "sports", "position": 2}
>>> model.predict_proba_one(x)[True]
0.5
>>> model.learn_one(x, True)
>>> model.predict_proba_one(x)[True] > 0.5
True
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from typing import Any

from river import base, compose, facto, linear_model, optim, preprocessing

from worker.errors import ConfigError
from worker.tokens import DEFAULT_CROSSES, ClickTokens

# A River binary classifier (a Pipeline is one, though not by static type).
Model = Any

SAMPLE_X: dict[str, Any] = {
    "user_id": "u0",
    "item_id": "i0",
    "device": "ios",
    "position": 1,
    "category": "news",
    "score": 0.5,
    "returning": True,
}


def logreg(seed: int = 0, n_features: int = 2**20, lr: float = 0.05) -> Model:
    """Logistic regression on hashed user, item, context and user×context crosses.

    Plain SGD with a constant step (0.05): unlike AdaGrad or Adam, whose steps shrink
    as they see more data, a constant step keeps adapting after concept drift, which is
    what an online CTR model is for. Hashing bounds memory to ``n_features`` weights
    whatever the number of users.
    """
    return compose.Pipeline(
        ClickTokens(crosses=DEFAULT_CROSSES),
        preprocessing.FeatureHasher(n_features=n_features, seed=seed),
        linear_model.LogisticRegression(optimizer=optim.SGD(lr), l2=0.0),
    )


def fm(seed: int = 0, n_features: int = 2**18, n_factors: int = 8) -> Model:
    """Factorization machine: learns the pairwise interactions itself (no crosses).

    Good when interactions between many fields matter and cannot be listed by hand;
    costs several times a logistic regression per event.
    """
    return compose.Pipeline(
        ClickTokens(),
        preprocessing.FeatureHasher(n_features=n_features, seed=seed),
        facto.FMClassifier(
            n_factors=n_factors,
            seed=seed,
            intercept=0.0,
            sample_normalization=False,
        ),
    )


PRESETS: dict[str, Callable[..., Model]] = {"logreg": logreg, "fm": fm}


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"--model {spec!r}: expected a preset ({', '.join(PRESETS)}) or MODULE:FACTORY"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def model_factory(spec: str, seed: int = 0) -> Callable[[], Model]:
    """A zero-argument factory for ``spec``: a preset name or ``MODULE:FACTORY``.

    A plug-in factory is called with ``seed=`` when it accepts it, else with nothing.
    """
    if spec in PRESETS:
        preset = PRESETS[spec]
        return lambda: preset(seed=seed)
    factory = _import_factory(spec)

    def make() -> Model:
        try:
            return factory(seed=seed)
        except TypeError:
            return factory()

    return make


def make_model(spec: str, seed: int = 0) -> Model:
    return model_factory(spec, seed)()


def split_pipeline(model: Model) -> tuple[tuple[Any, ...], Any] | None:
    """A pipeline's transformers and final classifier, when its transformers learn nothing.

    Test-then-train through River's API transforms each event twice: once in
    ``predict_proba_one``, once more in ``learn_one``. When every step before the last
    is a transformer that learns nothing (its ``learn_one`` is River's no-op, as for
    :class:`~worker.tokens.ClickTokens` and ``FeatureHasher``), both transforms give the
    same features, so the worker transforms once and hands the result to the final
    step's ``predict_proba_one`` and ``learn_one``: the same predictions and the same
    weights, bit for bit, for about a third less work per event with the ``logreg``
    preset (a plug-in pipeline of such transformers gets it too; the final step is
    handed the same dict in both calls, and River's classifiers do not change their
    input). Any other model (not a pipeline, a pipeline with a transformer that learns,
    such as a scaler, or a union) returns None and goes through its own API.

    >>> transformers, final = split_pipeline(make_model("logreg"))
    >>> [type(t).__name__ for t in transformers], type(final).__name__
    (['ClickTokens', 'FeatureHasher'], 'LogisticRegression')
    >>> split_pipeline(compose.Pipeline(preprocessing.StandardScaler(),
    ...                                 linear_model.LogisticRegression())) is None
    True
    """
    if not isinstance(model, compose.Pipeline):
        return None
    steps = list(model.steps.values())
    if len(steps) < 2 or not isinstance(steps[-1], base.Classifier):
        return None
    transformers = tuple(steps[:-1])
    for t in transformers:
        if (
            not isinstance(t, base.Transformer)
            or type(t).learn_one is not base.Transformer.learn_one
        ):
            return None
    return transformers, steps[-1]


def check_model(spec: str, factory: Callable[[], Any]) -> None:
    """Refuse at start-up a model that cannot serve: wrong type, no probabilities, or no
    snapshot (pickle) support. Never fail at the first event or checkpoint instead."""
    try:
        model = factory()
    except Exception as exc:
        raise ConfigError(f"--model {spec!r}: the factory raised {exc!r}") from exc
    for method in ("predict_proba_one", "learn_one"):
        if not callable(getattr(model, method, None)):
            raise ConfigError(
                f"--model {spec!r} returned {type(model).__name__}, which has no {method}(); "
                "return a River binary classifier"
            )
    try:
        proba = model.predict_proba_one(dict(SAMPLE_X))
        model.learn_one(dict(SAMPLE_X), True)
        proba = model.predict_proba_one(dict(SAMPLE_X))
    except Exception as exc:
        raise ConfigError(
            f"--model {spec!r} failed on a sample event {SAMPLE_X}: {exc!r}; the model "
            "must accept x = {**features, 'user_id', 'item_id'}"
        ) from exc
    if not isinstance(proba, dict) or not isinstance(proba.get(True, 0.0), float | int):
        raise ConfigError(
            f"--model {spec!r}: predict_proba_one returned {proba!r}; expected a dict with "
            "the probability of True"
        )
    try:
        pickle.loads(pickle.dumps(model))
    except Exception as exc:
        raise ConfigError(
            f"--model {spec!r} cannot be pickled ({exc!r}), so its state could not be "
            "snapshotted; define transformers as module-level functions or classes, not "
            "lambdas or closures"
        ) from exc
