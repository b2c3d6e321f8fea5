"""PrequentialScores gives River's numbers: Accuracy (p > 0.5), LogLoss, ROCAUC(100)."""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import pytest
from river import metrics, utils

from worker.scoring import PrequentialScores, Scores, river_thresholds

N_THRESHOLDS = 100


def _pairs(n: int, seed: int) -> list[tuple[bool, float]]:
    """Labels and probabilities, with plenty of awkward values.

    Probabilities land exactly on River's thresholds (i / 99 and the shifted ends), on
    0.5, 0 and 1, next to thresholds, and anywhere; labels are correlated with them so
    the AUC is neither 0.5 nor trivial.
    """
    rng = random.Random(seed)
    thresholds = [float(t) for t in river_thresholds(N_THRESHOLDS)]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.25:
            p = rng.choice(thresholds) if rng.random() < 0.5 else rng.randrange(100) / 99
        elif kind < 0.35:
            p = rng.choice([0.0, 1.0, 0.5])
        elif kind < 0.45:
            p = min(1.0, max(0.0, rng.choice(thresholds) + rng.choice([-1e-12, 1e-12])))
        else:
            p = rng.random()
        y = rng.random() < 0.2 + 0.6 * p
        out.append((y, p))
    return out


class RiverScores:
    """The same scores computed with River's metric objects."""

    def __init__(self, window: int | None = None) -> None:
        def make(cls: Any, **kw: Any) -> Any:
            if window is None:
                return cls(**kw)
            return utils.Rolling(cls, window_size=window, **kw)

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the class form, not a deprecated instance
            self.accuracy = make(metrics.Accuracy)
            self.log_loss = make(metrics.LogLoss)
            self.roc_auc = make(metrics.ROCAUC, n_thresholds=N_THRESHOLDS)
        self.pairs: list[tuple[bool, float]] = []
        self.window = window

    def update(self, y: bool, p: float) -> None:
        self.accuracy.update(y, p > 0.5)
        self.log_loss.update(y, p)
        self.roc_auc.update(y, p)
        self.pairs.append((y, p))

    def check(self, got: Scores) -> None:
        pairs = self.pairs[-self.window :] if self.window else self.pairs
        assert got.labelled == len(pairs)
        assert got.positives == sum(y for y, _ in pairs)
        assert got.accuracy == self.accuracy.get()
        assert got.log_loss == pytest.approx(self.log_loss.get(), rel=0, abs=1e-9)
        assert got.roc_auc == self.roc_auc.get()
        assert got.mean_prediction == pytest.approx(
            sum(p for _, p in pairs) / len(pairs), rel=1e-12, abs=1e-12
        )
        assert got.click_rate == sum(y for y, _ in pairs) / len(pairs)


@pytest.mark.parametrize("window", [1, 7, 250, 100_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_river_with_random_flush_points(window: int, seed: int) -> None:
    pairs = _pairs(3000, seed)
    rng = random.Random(seed + 100)
    scores = PrequentialScores(window=window, auc_thresholds=N_THRESHOLDS)
    cumulative, rolling = RiverScores(), RiverScores(window=window)
    checked = 0
    i = 0
    while i < len(pairs):
        # Batches of every size: 0 (an empty flush), 1, up to more than the window.
        size = rng.choice([0, 1, 2, 3, 17, 64, min(window, 300), min(window + 1, 301), 400])
        for y, p in pairs[i : i + size]:
            scores.add(y, p)
            cumulative.update(y, p)
            rolling.update(y, p)
        i += size
        scores.flush()
        if cumulative.pairs and rng.random() < 0.3:
            cumulative.check(scores.cumulative())
            rolling.check(scores.rolling())
            checked += 1
    cumulative.check(scores.cumulative())
    rolling.check(scores.rolling())
    assert checked > 5


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5, 1 / 99, 98 / 99, 50 / 99, -1e-7, 1 + 1e-7])
def test_probabilities_on_the_edges(p: float) -> None:
    """Each probability with both labels, next to ordinary ones."""
    pairs = [(True, 0.9), (False, 0.1), (True, p), (False, p), (True, 0.3), (False, 0.7)]
    scores = PrequentialScores(window=4)
    cumulative, rolling = RiverScores(), RiverScores(window=4)
    for y, q in pairs:
        scores.add(y, q)
        cumulative.update(y, q)
        rolling.update(y, q)
    scores.flush()
    cumulative.check(scores.cumulative())
    rolling.check(scores.rolling())


def test_log_loss_is_clamped_like_river() -> None:
    scores = PrequentialScores()
    for y, p in [(True, 0.0), (False, 1.0), (True, 1.0), (False, 0.0)]:
        scores.add(y, p)
    scores.flush()
    loss = metrics.LogLoss()
    for y, p in [(True, 0.0), (False, 1.0), (True, 1.0), (False, 0.0)]:
        loss.update(y, p)
    got = scores.cumulative().log_loss
    assert math.isfinite(got)
    assert got == pytest.approx(loss.get(), abs=1e-9)
    assert got > 17  # -log(1e-15) / 2: two confident mistakes, two confident hits


@pytest.mark.parametrize("label", [True, False])
def test_one_class_only(label: bool) -> None:
    """River's AUC with no positives (or no negatives) is 0.0 (its safe division)."""
    scores = PrequentialScores(window=3)
    river = RiverScores()
    for p in (0.1, 0.6, 0.9, 0.3):
        scores.add(label, p)
        river.update(label, p)
    scores.flush()
    river.check(scores.cumulative())


def test_empty_scores_are_nan() -> None:
    scores = PrequentialScores(window=5)
    scores.flush()  # nothing pending: a no-op
    for got in (scores.cumulative(), scores.rolling()):
        assert got.labelled == 0 and got.positives == 0
        for name in ("accuracy", "log_loss", "roc_auc", "mean_prediction", "click_rate"):
            assert math.isnan(getattr(got, name)), name


def test_pending_pairs_count_only_after_a_flush() -> None:
    scores = PrequentialScores(window=5)
    scores.add(True, 0.9)
    assert scores.cumulative().labelled == 0
    scores.flush()
    assert scores.cumulative().labelled == 1
    scores.flush()  # flushing twice does not count twice
    assert scores.cumulative().labelled == 1
    assert scores.cumulative().as_dict()["accuracy"] == 1.0


def test_rolling_forgets_what_left_the_window() -> None:
    scores = PrequentialScores(window=3)
    for y, p in [(True, 0.1), (True, 0.1), (True, 0.9), (True, 0.9), (True, 0.9)]:
        scores.add(y, p)
        scores.flush()
    assert scores.rolling().accuracy == 1.0
    assert scores.cumulative().accuracy == 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"window": 0}, "window"), ({"auc_thresholds": 1}, "auc_thresholds")]
)
def test_bad_parameters_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrequentialScores(**kwargs)


def test_thresholds_are_rivers() -> None:
    assert (
        list(river_thresholds(N_THRESHOLDS)) == metrics.ROCAUC(n_thresholds=N_THRESHOLDS).thresholds
    )
