"""The offline (batch) baseline: trained on a window of labelled events, then frozen.

This is classic offline learning, run beside the online model on the same events so
every metric shows what continuous learning buys. The learner is scikit-learn's
``LogisticRegression`` (L-BFGS to convergence, L2) on one-hot tokens of ``x`` and the
same crosses as the ``logreg`` preset: a real full-batch fit, deterministic given the
window, as a data scientist would train it offline.

- It is first trained once ``window`` labelled events have been seen.
- ``retrain_every=None`` ("never") keeps that first model forever; otherwise it is
  retrained on the last ``window`` labelled events every ``retrain_every`` labelled
  events (or when asked, e.g. by a drift alarm).
- Training is synchronous, at a deterministic point of the stream, so replays and
  restores give identical predictions. Its pause is bounded by the window size
  (measured: see README, "Online versus offline").
- Prediction does not use scikit-learn (per-row calls cost ~50 µs): the fitted
  coefficients are kept as a token → weight dict, so a prediction is a few dict
  look-ups. Tokens not seen in the window weigh nothing.

>>> b = BatchBaseline(window=4)
>>> b.predict({"user_id": "u1"}) is None  # not trained yet
True
>>> [b.observe({"user_id": "u1" if y else "u2", "category": "news"}, y)
...  for y in (True, False, True, False)]  # trains at the 4th labelled event
[False, False, False, True]
>>> b.trainings, round(b.predict({"user_id": "u1", "category": "news"}), 2) > 0.5
(1, True)
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from worker.models import DEFAULT_CROSSES, FLOAT_LIMIT, ClickTokens


class BatchBaseline:
    def __init__(
        self,
        window: int = 10_000,
        retrain_every: int | None = None,
        c: float = 1.0,
        max_iter: int = 200,
    ) -> None:
        if window < 2:
            raise ValueError("the batch window must hold at least 2 labelled events")
        if retrain_every is not None and retrain_every < 1:
            raise ValueError("retrain_every must be >= 1 or None (never)")
        self.window = window
        self.retrain_every = retrain_every
        self.c = c
        self.max_iter = max_iter
        self.tokens = ClickTokens(crosses=DEFAULT_CROSSES)
        self._recent: deque[tuple[dict[str, Any], bool]] = deque(maxlen=window)
        self.coef: dict[tuple[str, Any], float] | None = None
        self.intercept = 0.0
        self.labelled = 0
        self.trainings = 0
        self.trained_at_labelled = 0  # labelled count at the last training
        self.last_training_seconds = 0.0
        self.max_training_seconds = 0.0
        self.retrain_requested = False

    @property
    def trained(self) -> bool:
        return self.coef is not None

    def _features(self, x: dict[str, Any]) -> list[tuple[tuple[str, Any], float]]:
        out: list[tuple[tuple[str, Any], float]] = []
        for k, v in self.tokens.transform_one(x).items():
            if isinstance(v, str | bool):
                out.append(((k, v), 1.0))
            else:
                out.append(((k, None), float(v)))
        return out

    def predict(self, x: dict[str, Any]) -> float | None:
        """Probability of a click, or None before the first training.

        The same tokens as :meth:`_features`, computed inline: this runs per event.
        """
        coef = self.coef
        if coef is None:
            return None
        get = coef.get
        z = self.intercept
        for k, v in x.items():
            t = type(v)
            if t is str or t is bool:
                z += get((k, v), 0.0)
            elif t is int:
                z += get((k, str(v)), 0.0)
            else:  # a float, clipped as ClickTokens clips it
                z += get((k, None), 0.0) * min(max(v, -FLOAT_LIMIT), FLOAT_LIMIT)
        for a, b in self.tokens.crosses:
            if a in x and b in x:
                z += get((f"{a}*{b}", f"{x[a]}|{x[b]}"), 0.0)
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def observe(self, x: dict[str, Any], y: bool) -> bool:
        """Remember one labelled event; train when due. True if it (re)trained."""
        self._recent.append((x, y))
        self.labelled += 1
        due = (
            (self.coef is None and self.labelled >= self.window)
            or (
                self.retrain_every is not None
                and self.coef is not None
                and self.labelled - self.trained_at_labelled >= self.retrain_every
            )
            or (self.retrain_requested and len(self._recent) >= 2)
        )
        if due:
            self.train()
        return due

    def request_retrain(self) -> None:
        """Retrain at the next labelled event (e.g. on a drift alarm)."""
        self.retrain_requested = True

    def train(self) -> None:
        """Fit on the labelled events of the window (full batch)."""
        import numpy as np
        from scipy.sparse import csr_matrix
        from sklearn.linear_model import LogisticRegression

        started = time.perf_counter()
        vocab: dict[tuple[str, Any], int] = {}
        indptr = [0]
        indices: list[int] = []
        data: list[float] = []
        labels = []
        for x, y in self._recent:
            for key, v in self._features(x):
                indices.append(vocab.setdefault(key, len(vocab)))
                data.append(v)
            indptr.append(len(indices))
            labels.append(y)
        self.retrain_requested = False
        self.trained_at_labelled = self.labelled
        self.trainings += 1
        if len(set(labels)) < 2:
            # One class only: a constant model at the observed rate.
            rate = min(max(float(np.mean(labels)), 1e-6), 1 - 1e-6)
            self.coef, self.intercept = {}, math.log(rate / (1 - rate))
        else:
            matrix = csr_matrix(
                (np.asarray(data), np.asarray(indices), np.asarray(indptr)),
                shape=(len(labels), max(1, len(vocab))),
            )
            model = LogisticRegression(C=self.c, max_iter=self.max_iter, solver="lbfgs")
            model.fit(matrix, np.asarray(labels, dtype=bool))
            weights = model.coef_[0]
            self.coef = {k: float(weights[i]) for k, i in vocab.items() if weights[i] != 0.0}
            self.intercept = float(model.intercept_[0])
        self.last_training_seconds = time.perf_counter() - started
        self.max_training_seconds = max(self.max_training_seconds, self.last_training_seconds)
