"""Concept drift (a detector on the online model's loss) and data drift (PSI).

Concept drift: River's ADWIN (default) or Page-Hinkley reads the online model's Brier
loss ``(p - y)²`` — bounded in [0, 1], as ADWIN's guarantee assumes — one value per
labelled event. Only a rise of the loss is an alarm (a model that improves while it
learns is not drifting); the first ``grace`` labelled events are ignored while the
model warms up.

Data drift: the stream is cut into consecutive blocks of ``block`` events. The first
block is the reference (and again the latest block whenever the batch baseline is
retrained, since that is the data the offline model saw); the latest complete block is
"recent". For each tracked feature the population stability index (PSI) between the two
is exported: categorical values as their top values in the reference plus "other",
numbers in bins at the reference's deciles. The label (click rate) and the online
prediction (10 bins on [0, 1]) are tracked the same way. PSI < 0.1 is usually read as
stable, > 0.25 as a significant shift.

>>> d = ConceptDrift("adwin", grace=0)
>>> alarms = [d.update(0.05) for _ in range(2000)] + [d.update(0.8) for _ in range(300)]
>>> any(alarms[:2000]), any(alarms[2000:])
(False, True)
"""

from __future__ import annotations

import bisect
import collections
import math
import time
from collections import Counter
from itertools import islice
from typing import Any

import numpy as np
from river import drift

DETECTORS = ("adwin", "page-hinkley")
OTHER = "__other__"
IDS = frozenset({"user_id", "item_id"})  # watched only when named (see DataDrift)
MISSING = "__missing__"


class ConceptDrift:
    """A drift detector on the online model's per-event Brier loss."""

    def __init__(self, detector: str = "adwin", grace: int = 1000) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        self.detector_name = detector
        self.grace = grace
        self.detector: Any = (
            drift.ADWIN(delta=0.002)  # type: ignore[no-untyped-call]
            if detector == "adwin"
            else drift.PageHinkley(mode="up")
        )
        self.seen = 0
        self.alarms = 0
        self.last_alarm_at: int | None = None  # labelled-event index of the last alarm
        self.last_alarm_time: float | None = None  # wall time
        self._reset_window()

    # Class defaults keep snapshots pickled before these attributes existed restorable.
    _window_sum = 0.0
    _window_n = 0
    _restart = False
    _step: Any = None  # ADWIN's compiled update (see _bind), False for the API; not pickled

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_step", None)
        return state

    def _bind(self) -> Any:
        """ADWIN's own update, to call without River's wrapper: its ``update`` method
        and ``drift_detected`` property are two Python calls per loss around one call of
        the compiled window (0.3 µs against 0.1 here). Only for River's ADWIN as this
        code knows it (a compiled ``_helper`` with ``update``); else False: the API."""
        detector = self.detector
        step = getattr(getattr(detector, "_helper", None), "update", None)
        self._step = step if type(detector) is drift.ADWIN and step is not None else False
        return self._step

    def _reset_window(self) -> None:
        self._window_sum = 0.0
        self._window_n = 0
        self._restart = False

    @property
    def estimate(self) -> float:
        """The detector's current estimate of the mean loss."""
        return float(getattr(self.detector, "estimation", math.nan))

    def update(self, loss: float) -> bool:
        """Feed one loss; True when this loss raised an alarm.

        River's ADWIN starts an empty window after each detection, so until the next
        one its window is every loss fed since: the mean before this loss (to tell a
        rise from a fall) is kept here as a sum, without asking ADWIN per event.
        """
        self.seen += 1
        detector = self.detector
        step = self._step
        if step is None:
            step = self._bind()
        if step is False:
            detector.update(loss)
            if self._restart:  # the detector reset itself in the update above
                self._reset_window()
            detected = detector.drift_detected
        else:
            # What ADWIN.update does: after a detection, a fresh window (a new _helper).
            if self._restart:
                detector._reset()
                step = self._bind()
                self._reset_window()
            detected = detector._drift_detected = step(loss)
        if not detected:
            self._window_sum += loss
            self._window_n += 1
            return False
        before = self._window_sum / self._window_n if self._window_n else 0.0
        self._restart = True
        if self.seen <= self.grace:
            return False
        if self.detector_name == "adwin" and not self.estimate > before:
            return False  # ADWIN also reports improvements; only a worse model is drift
        self.alarms += 1
        self.last_alarm_at = self.seen
        self.last_alarm_time = time.time()
        return True


def psi(reference: Counter[Any], recent: Counter[Any], eps: float = 1e-4) -> float:
    """Population stability index between two histograms over the same buckets.

    >>> psi(Counter(a=50, b=50), Counter(a=50, b=50))
    0.0
    >>> round(psi(Counter(a=90, b=10), Counter(a=10, b=90)), 2)
    3.52
    """
    n_ref = sum(reference.values())
    n_rec = sum(recent.values())
    if n_ref == 0 or n_rec == 0:
        return math.nan
    total = 0.0
    for bucket in set(reference) | set(recent):
        r = max(reference.get(bucket, 0) / n_ref, eps)
        q = max(recent.get(bucket, 0) / n_rec, eps)
        total += (q - r) * math.log(q / r)
    return total


class _Feature:
    """Bucketing of one feature, fixed from the reference block's value counts."""

    def __init__(self, values: Counter[Any], top: int = 20) -> None:
        n = sum(values.values())
        numbers = Counter(
            {
                v: c
                for v, c in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        self.numeric = numbers.total() > n / 2 and len(numbers) > top
        if self.numeric:
            ordered = sorted(numbers.elements())
            self.edges = sorted({ordered[len(ordered) * i // 10] for i in range(1, 10)})
            self.top: set[Any] = set()
        else:
            self.edges = []
            self.top = {v for v, _ in values.most_common(top)}

    def bucket(self, value: Any) -> Any:
        if value is None:
            return MISSING
        if self.numeric:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return OTHER
            return bisect.bisect_right(self.edges, value)
        return value if value in self.top else OTHER

    def count(self, values: Counter[Any]) -> Counter[Any]:
        """Bucket counts from value counts (once per distinct value)."""
        counts: Counter[Any] = Counter()
        bucket = self.bucket
        for value, n in values.items():
            counts[bucket(value)] += n
        return counts


class DataDrift:
    """PSI of tracked features, the label and the prediction: reference vs recent block.

    Per event, one C-level count of the event's (feature, value) pairs, a label count
    and the prediction appended: nothing of the event is kept. Bucketing happens when a
    block closes, once per distinct value.

    The ids (``user_id``, ``item_id``) are watched only when named in ``features``: a
    top-20-values histogram of ids says little (new users arrive all the time), and
    their counts were a third of the per-event work and most of the block's memory.
    The learner passes how many of x's items are the event's features
    (:meth:`ClickEvent.x` appends the ids after them), so the ids are not counted.
    """

    def __init__(self, block: int = 5000, features: tuple[str, ...] = (), top_k: int = 8) -> None:
        if block < 10:
            raise ValueError("the data-drift block must hold at least 10 events")
        self.block = block
        self.configured = tuple(features)
        self.top_k = top_k
        self._count_ids = self.watch_ids  # watch_ids, kept for add() (per event)
        self._pairs: Counter[tuple[str, Any]] = Counter()  # (feature, value) -> events
        self._labels = [0, 0]  # events labelled False, True
        self._ps: list[float] = []  # the block's predictions
        self._has_reference = False
        self.features: tuple[str, ...] = ()
        self._buckets: dict[str, _Feature] = {}
        self._ref_counts: dict[str, Counter[Any]] = {}
        self.scores: dict[str, float] = {}  # feature -> PSI, plus "__label__", "__prediction__"
        self.blocks = 0
        self._rebase = False

    @property
    def watch_ids(self) -> bool:
        """Are user_id or item_id among the configured features (then they are counted)?"""
        return not IDS.isdisjoint(self.configured)

    def add(self, x: dict[str, Any], y: bool | None, p: float, features: int | None = None) -> None:
        """Count one event. ``features``: how many of x's first items to count, the rest
        being ids not watched (see the class); None counts them all."""
        if features is None or self._count_ids:
            _count_pairs(self._pairs, x.items())
        else:
            _count_pairs(self._pairs, islice(x.items(), features))
        if y is not None:
            self._labels[y] += 1
        ps = self._ps
        ps.append(p)
        if len(ps) >= self.block:
            self._close_block()

    def rebase(self) -> None:
        """Make the next complete block the reference (after a batch retrain)."""
        self._rebase = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        rows = state.pop("_rows", None)
        self.__dict__.update(state)
        if rows is not None:  # pickled by an older riverline, which kept the events
            self._pairs, self._labels, self._ps = Counter(), [0, 0], []
            for x, y, p in rows:  # fewer than a block: add() closes none
                self.add(x, y, p)
        if "_count_ids" not in state:  # pickled before the ids were left out by default
            self._count_ids = self.watch_ids  # watch_ids, kept for add() (per event)
            if not self._count_ids:
                self._forget_ids()

    def _forget_ids(self) -> None:
        """Stop watching ids an older riverline watched by default: from here on they
        are not counted, so keeping them would compare every id with "missing"."""
        self.features = tuple(n for n in self.features if n not in IDS)
        for name in IDS:
            self._buckets.pop(name, None)
            self._ref_counts.pop(name, None)
            self.scores.pop(name, None)
        for pair in [pair for pair in self._pairs if pair[0] in IDS]:
            del self._pairs[pair]

    def _close_block(self) -> None:
        pairs, self._pairs = self._pairs, Counter()
        labels, self._labels = self._labels, [0, 0]
        ps, self._ps = self._ps, []
        self.blocks += 1
        values = _by_feature(pairs, len(ps))
        label_counts = Counter({y: n for y, n in ((True, labels[1]), (False, labels[0])) if n})
        if not self._has_reference or self._rebase:
            self._set_reference(values, label_counts, ps)
            self._rebase = False
            return
        empty: Counter[Any] = Counter({None: len(ps)})
        for name in self.features:
            recent = self._buckets[name].count(values.get(name, empty))
            self.scores[name] = psi(self._ref_counts[name], recent)
        self.scores["__label__"] = psi(self._ref_counts["__label__"], label_counts)
        self.scores["__prediction__"] = psi(
            self._ref_counts["__prediction__"], _prediction_bins(ps)
        )

    def _set_reference(
        self, values: dict[str, Counter[Any]], labels: Counter[Any], ps: list[float]
    ) -> None:
        self._has_reference = True
        if not self.features:
            if self.configured:
                self.features = self.configured
            else:
                n = len(ps)
                events = {name: n - c.get(None, 0) for name, c in values.items()}
                # Most frequent first; ties by name, so the choice is deterministic.
                ranked = sorted(events.items(), key=lambda kv: (-kv[1], kv[0]))
                self.features = tuple(k for k, _ in ranked[: self.top_k])
        empty: Counter[Any] = Counter({None: len(ps)})
        self._buckets = {n: _Feature(values.get(n, empty)) for n in self.features}
        self._ref_counts = {n: self._buckets[n].count(values.get(n, empty)) for n in self.features}
        self._ref_counts["__label__"] = labels
        self._ref_counts["__prediction__"] = _prediction_bins(ps)


_count_pairs = getattr(collections, "_count_elements", None) or (
    lambda counter, items: counter.update(items)
)  # collections' own C helper behind Counter.update, without its Mapping check


def _by_feature(pairs: Counter[tuple[str, Any]], n: int) -> dict[str, Counter[Any]]:
    """Value counts per feature from (feature, value) counts; events without the
    feature count as the value None."""
    out: dict[str, Counter[Any]] = {}
    for (name, value), c in pairs.items():
        counts = out.get(name)
        if counts is None:
            counts = out[name] = Counter()
        counts[value] += c
    for counts in out.values():
        missing = n - counts.total()
        if missing:
            counts[None] += missing
    return out


def _prediction_bins(ps: list[float]) -> Counter[Any]:
    """Counts of predictions in 10 bins of width 0.1 (1.0 falls in the last)."""
    bins = np.minimum((np.asarray(ps, dtype=np.float64) * 10).astype(np.int64), 9)
    counts = np.bincount(bins, minlength=10)
    return Counter({int(b): int(n) for b, n in enumerate(counts) if n})
