"""Prequential (test-then-train) scores kept cheaply enough for the hot path.

River's metric objects cost 0.5-50 µs per update (``ROCAUC`` updates one confusion
matrix per threshold). Here an update is two list appends; the pairs are folded into
running counts once per poll batch (numpy), and rolling scores are computed at scrape
time from a ring buffer of the last ``window`` pairs. The numbers are River's:

- accuracy: a prediction counts as a click when ``p > 0.5`` (River's ``predict_one``);
- log loss: River's ``LogLoss`` (probabilities clamped to [1e-15, 1 - 1e-15]);
- ROC AUC: River's ``ROCAUC(n_thresholds=auc_thresholds)``, computed from per-bin counts,
  so the same trapezoid over the same confusion matrices;
- calibration: mean predicted probability beside the observed click rate.

>>> s = PrequentialScores(window=3)
>>> for y, p in [(True, 0.9), (False, 0.2), (True, 0.4), (False, 0.1)]:
...     s.add(y, p)
>>> s.flush()
>>> s.cumulative().accuracy, s.rolling().accuracy
(0.75, 0.6666666666666666)
>>> s.cumulative().roc_auc  # positives 0.9, 0.4 all above negatives 0.2, 0.1
1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CLAMP = 1e-15


@dataclass(frozen=True)
class Scores:
    """One set of scores over some labelled events."""

    labelled: int
    positives: int
    accuracy: float
    log_loss: float
    roc_auc: float
    mean_prediction: float
    click_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def river_thresholds(n: int) -> np.ndarray:
    """The thresholds of River's ``ROCAUC(n_thresholds=n)``."""
    t = [i / (n - 1) for i in range(n)]
    t[0] -= 1e-7
    t[-1] += 1e-7
    return np.asarray(t, dtype=np.float64)  # type: ignore[no-any-return]


def _log_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    pc = np.clip(p, CLAMP, 1.0 - CLAMP)
    return np.where(y, -np.log(pc), -np.log(1.0 - pc))  # type: ignore[no-any-return]


def _auc_from_bins(pos: np.ndarray, neg: np.ndarray) -> float:
    """River's ROCAUC from counts per bin (bin j = number of thresholds below p)."""
    n_pos = pos.sum()
    n_neg = neg.sum()
    # At threshold i a prediction is positive when its bin index is > i.
    tp = n_pos - np.cumsum(pos)[:-1]
    fp = n_neg - np.cumsum(neg)[:-1]
    tpr = tp / n_pos if n_pos else np.zeros_like(tp, dtype=np.float64)
    fpr = fp / n_neg if n_neg else np.zeros_like(fp, dtype=np.float64)
    return float(-np.trapezoid(tpr.astype(np.float64), fpr.astype(np.float64)))


class PrequentialScores:
    """Cumulative and rolling scores of one model on one partition."""

    def __init__(self, window: int = 1000, auc_thresholds: int = 100) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if auc_thresholds < 2:
            raise ValueError("auc_thresholds must be >= 2")
        self.window = window
        self.thresholds = river_thresholds(auc_thresholds)
        n_bins = auc_thresholds + 1
        self._pending_y: list[bool] = []
        self._pending_p: list[float] = []
        self.labelled = 0
        self.positives = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.p_sum = 0.0
        self.pos_bins = np.zeros(n_bins, dtype=np.int64)
        self.neg_bins = np.zeros(n_bins, dtype=np.int64)
        # Ring buffer of the last `window` pairs; `_filled` of them are valid.
        self._ring_y = np.zeros(window, dtype=bool)
        self._ring_p = np.zeros(window, dtype=np.float64)
        self._next = 0
        self._filled = 0

    def add(self, y: bool, p: float) -> None:
        """Record one (label, probability) pair; cheap, for the per-event path."""
        self._pending_y.append(y)
        self._pending_p.append(p)

    def extend(self, ys: Sequence[bool], ps: Sequence[float]) -> None:
        """Record many pairs at once."""
        self._pending_y.extend(ys)
        self._pending_p.extend(ps)

    def flush(self) -> None:
        """Fold the pending pairs into the counts (once per batch, and before reading)."""
        if not self._pending_y:
            return
        y = np.asarray(self._pending_y, dtype=bool)
        p = np.asarray(self._pending_p, dtype=np.float64)
        self._pending_y = []
        self._pending_p = []
        n = len(y)
        self.labelled += n
        self.positives += int(y.sum())
        self.correct += int(((p > 0.5) == y).sum())
        self.loss_sum += float(_log_losses(y, p).sum())
        self.p_sum += float(p.sum())
        bins = np.searchsorted(self.thresholds, p, side="left")
        size = len(self.pos_bins)
        self.pos_bins += np.bincount(bins[y], minlength=size)
        self.neg_bins += np.bincount(bins[~y], minlength=size)
        self._push_ring(y, p)

    def _push_ring(self, y: np.ndarray, p: np.ndarray) -> None:
        w = self.window
        if len(y) >= w:
            self._ring_y[:] = y[-w:]
            self._ring_p[:] = p[-w:]
            self._next = 0
            self._filled = w
            return
        end = self._next + len(y)
        if end <= w:
            self._ring_y[self._next : end] = y
            self._ring_p[self._next : end] = p
        else:
            first = w - self._next
            self._ring_y[self._next :] = y[:first]
            self._ring_p[self._next :] = p[:first]
            self._ring_y[: end - w] = y[first:]
            self._ring_p[: end - w] = p[first:]
        self._next = end % w
        self._filled = min(w, self._filled + len(y))

    def cumulative(self) -> Scores:
        n = self.labelled
        if n == 0:
            return Scores(0, 0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return Scores(
            labelled=n,
            positives=self.positives,
            accuracy=self.correct / n,
            log_loss=self.loss_sum / n,
            roc_auc=_auc_from_bins(self.pos_bins, self.neg_bins),
            mean_prediction=self.p_sum / n,
            click_rate=self.positives / n,
        )

    def rolling(self) -> Scores:
        """Scores over the last ``window`` labelled events."""
        n = self._filled
        if n == 0:
            return Scores(0, 0, math.nan, math.nan, math.nan, math.nan, math.nan)
        y = self._ring_y[:n] if n < self.window else self._ring_y
        p = self._ring_p[:n] if n < self.window else self._ring_p
        bins = np.searchsorted(self.thresholds, p, side="left")
        size = len(self.pos_bins)
        positives = int(y.sum())
        return Scores(
            labelled=n,
            positives=positives,
            accuracy=float(((p > 0.5) == y).sum()) / n,
            log_loss=float(_log_losses(y, p).sum()) / n,
            roc_auc=_auc_from_bins(
                np.bincount(bins[y], minlength=size), np.bincount(bins[~y], minlength=size)
            ),
            mean_prediction=float(p.sum()) / n,
            click_rate=positives / n,
        )
