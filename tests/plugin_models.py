"""Plug-in models for the worker tests, loaded with ``--model tests.plugin_models:FACTORY``.

Everything is module level (classes and functions, no lambdas), so every model pickles.
Each takes ``x = {**features, "user_id", "item_id"}`` like the presets.
"""

from __future__ import annotations

import math
import time
from typing import Any

from river import base, compose, linear_model, optim, preprocessing, tree


class Tokens(base.Transformer):
    """Integers (position, hour) are categories in click data: make them strings."""

    def transform_one(self, x: dict[str, Any]) -> dict[str, Any]:
        return {k: (str(v) if type(v) is int else v) for k, v in x.items()}


def small_tree(seed: int = 0) -> Any:
    """A Hoeffding tree over nominal features (splits early, so its output changes)."""
    return compose.Pipeline(
        Tokens(),
        tree.HoeffdingTreeClassifier(grace_period=50, delta=0.01),
    )


def onehot_logreg(seed: int = 0) -> Any:
    """Logistic regression behind a one-hot encoder (no hashing)."""
    return compose.Pipeline(
        Tokens(),
        preprocessing.OneHotEncoder(),
        linear_model.LogisticRegression(optimizer=optim.SGD(0.05)),
    )


class PoisonGuard(base.Classifier):
    """Wraps a classifier; raises (or misbehaves) on poisoned feature values.

    * ``features {"poison": true}``: ``predict_proba_one`` raises;
    * ``features {"poison_learn": true}``: ``learn_one`` raises (before any update);
    * ``features {"poison_half": true}``: ``learn_one`` updates the model with a wrong
      label, then raises (a half-done update the worker must roll back);
    * ``features {"poison_nan": true}``: ``predict_proba_one`` returns NaN.
    """

    def __init__(self, inner: base.Classifier) -> None:
        self.inner = inner

    def learn_one(self, x: dict[str, Any], y: Any) -> None:
        if x.get("poison_learn") is True:
            raise RuntimeError("poisoned event in learn_one")
        if x.get("poison_half") is True:
            for _ in range(20):
                self.inner.learn_one(x, not y)
            raise RuntimeError("poisoned event in learn_one, after changing the model")
        self.inner.learn_one(x, y)

    def predict_proba_one(self, x: dict[str, Any]) -> dict[Any, float]:
        if x.get("poison") is True:
            raise ValueError("poisoned event in predict_proba_one")
        if x.get("poison_nan") is True:
            return {False: math.nan, True: math.nan}
        return self.inner.predict_proba_one(x)  # type: ignore[no-any-return]


def poisonable(seed: int = 0) -> Any:
    return PoisonGuard(onehot_logreg(seed))


class Slow(base.Classifier):
    """A classifier that takes ~0.1 ms per prediction, so a stream takes a while."""

    def __init__(self, inner: base.Classifier, delay: float = 1e-4) -> None:
        self.inner = inner
        self.delay = delay

    def learn_one(self, x: dict[str, Any], y: Any) -> None:
        self.inner.learn_one(x, y)

    def predict_proba_one(self, x: dict[str, Any]) -> dict[Any, float]:
        time.sleep(self.delay)
        return self.inner.predict_proba_one(x)  # type: ignore[no-any-return]


def slow(seed: int = 0) -> Any:
    return Slow(onehot_logreg(seed))
