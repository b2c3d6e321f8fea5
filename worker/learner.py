"""Per-partition learner state: one model, its scores and its counters.

A partition's events are keyed by user, so one learner per partition sees every event of
its users, in offset order. Learners are created on assignment and dropped on revocation.

>>> from worker.models import make_model
>>> learner = PartitionLearner("clicks", 0, make_model("logreg"), window=100)
>>> ev = {"event_id": "e1", "ts": 5, "user_id": "u1", "item_id": "i1", "clicked": True}
>>> pred = learner.predict_learn(ev, offset=0)
>>> pred.click_probability, pred.model_version, learner.learned
(0.5, '0:0', 1)
"""

from __future__ import annotations

import pickle
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.baseline import BatchBaseline
from worker.drift import ConceptDrift, DataDrift
from worker.events import ClickEvent, Prediction
from worker.models import split_pipeline
from worker.scoring import PrequentialScores

DRIFT_ACTIONS = ("none", "reset-online", "retrain-batch")
# Pending labelled pairs are folded into the scores (numpy) every 0.5 s or this many pairs:
# the fold's cost is mostly per call (~0.2 ms in the loop), so a few folds a second.
FOLD_PAIRS = 8192


@dataclass(frozen=True)
class LearnerOptions:
    """What runs beside the online model (all of it is part of the snapshot)."""

    baseline_window: int = 0  # 0: no batch baseline
    baseline_retrain_every: int | None = None  # None: never (trained once)
    baseline_deploy_delay: int = 0  # 0: fit synchronously; else in the background
    drift_detector: str | None = None  # "adwin", "page-hinkley" or None
    drift_grace: int = 1000
    drift_action: str = "none"
    data_drift_block: int = 0  # 0: no data-drift tracking
    data_drift_features: tuple[str, ...] = ()


class ModelError(Exception):
    """The model raised on one event; the event is dead-lettered, the worker goes on.

    ``during_learn`` says the model may have changed part of its state before raising:
    the worker then rewinds the partition to its last snapshot (see ``loop.py``).
    """

    def __init__(self, message: str, during_learn: bool = False) -> None:
        super().__init__(message)
        self.during_learn = during_learn


class PartitionLearner:
    """Everything riverline holds for one input partition."""

    def __init__(
        self,
        topic: str,
        partition: int,
        model: Any,
        window: int = 1000,
        auc_thresholds: int = 100,
        *,
        options: LearnerOptions | None = None,
        new_model: Callable[[], Any] | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self._version_prefix = f"{partition}:"  # model_version is "<partition>:<learned>"
        self.model = model  # also sets the transform-once path (see the property)
        self.new_model = new_model  # for the reset-online drift action
        self.options = opts = options or LearnerOptions()
        self.scores = PrequentialScores(window=window, auc_thresholds=auc_thresholds)
        self.batch_scores = PrequentialScores(window=window, auc_thresholds=auc_thresholds)
        self.baseline = (
            BatchBaseline(
                opts.baseline_window,
                opts.baseline_retrain_every,
                deploy_delay=opts.baseline_deploy_delay,
                keep_window=opts.drift_action == "retrain-batch",
            )
            if opts.baseline_window
            else None
        )
        self.drift = (
            ConceptDrift(opts.drift_detector, grace=opts.drift_grace)
            if opts.drift_detector
            else None
        )
        self.data_drift = (
            DataDrift(opts.data_drift_block, opts.data_drift_features)
            if opts.data_drift_block
            else None
        )
        self.resets = 0  # online model resets by the drift action
        # Labelled pairs not yet scored, as plain lists (folded per batch, see end_batch):
        # the online model's (label, probability), and the batch model's once it predicts.
        self._ys: list[bool] = []
        self._ps: list[float] = []
        self._batch_ys: list[bool] = []
        self._batch_ps: list[float] = []
        self._folded_at = 0.0
        # Guards `scores` between the loop (flush) and a scrape (read).
        self.lock = threading.Lock()
        self.predicted = 0
        self.learned = 0
        self.dead_lettered: Counter[str] = Counter()
        self.next_offset: int | None = None  # the offset to commit: last processed + 1
        self.committed_offset: int | None = None
        self.high_watermark: int | None = None
        self.assigned_at = time.time()
        # Checkpoint bookkeeping (exported as metrics).
        self.snapshot_offset: int | None = None  # next_offset of the last snapshot written
        self.snapshot_bytes = 0
        self.snapshot_at: float | None = None  # wall time of the last successful checkpoint
        self.restore_seconds: float | None = None
        # A fresh learner's first offset processed: with no snapshot, a rewind seeks there.
        self.first_offset: int | None = None

    @property
    def model(self) -> Any:
        """The online model. Setting it also decides whether events are transformed once
        for both of its calls (see :func:`~worker.models.split_pipeline`)."""
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        self._model = model
        self._split = split_pipeline(model)

    @property
    def consumed(self) -> int:
        """Events taken from the partition: each is predicted or dead-lettered."""
        return self.predicted + sum(self.dead_lettered.values())

    def predict_learn(self, event: ClickEvent | dict[str, Any], offset: int) -> Prediction:
        """Test then train on one valid event; returns the prediction to publish.

        The probability is computed before the model sees the label. If the model
        raises, nothing is counted and :class:`ModelError` carries the cause. A dict
        event is checked against the schema first (:meth:`ClickEvent.from_dict`).
        """
        if type(event) is not ClickEvent:
            event = ClickEvent.from_dict(event)  # type: ignore[arg-type]
        return self.learn_event(event, offset)

    def learn_event(self, event: ClickEvent, offset: int) -> Prediction:
        """:meth:`predict_learn` for an event the codec decoded (the worker's loop)."""
        x = event.x()
        version = f"{self._version_prefix}{self.learned}"
        y = event.clicked
        split = self._split
        # With a pipeline of transformers that learn nothing, x is transformed once here
        # and the final step gets the result in both calls (see split_pipeline).
        transformers, model = ((), self._model) if split is None else split
        xm = x
        try:
            for t in transformers:
                xm = t.transform_one(xm)
            p = float(model.predict_proba_one(xm).get(True, 0.0))
        except Exception as exc:
            raise ModelError(f"predict_proba_one raised {type(exc).__name__}: {exc}") from exc
        if not 0.0 <= p <= 1.0:  # also catches NaN
            raise ModelError(f"predict_proba_one returned {p!r}, not a probability")
        baseline = self.baseline
        pb = baseline.predict(x) if baseline is not None else None
        if y is not None:
            try:
                model.learn_one(xm, y)
            except Exception as exc:
                raise ModelError(
                    f"learn_one raised {type(exc).__name__}: {exc}", during_learn=True
                ) from exc
            self.learned += 1
            self._ys.append(y)  # scored per batch: see end_batch()
            self._ps.append(p)
            if pb is not None:
                self._batch_ys.append(y)
                self._batch_ps.append(pb)
            if baseline is not None and baseline.observe(x, y) and self.data_drift is not None:
                self.data_drift.rebase()
            # (e * e, not e ** 2: a float power is a call into libm's pow)
            if self.drift is not None and self.drift.update((e := p - y) * e):
                self._on_drift()
        if self.data_drift is not None:
            # x's first items are the event's features; ClickEvent.x() appended the ids.
            self.data_drift.add(x, y, p, len(x) - 2)
        self.predicted += 1
        return Prediction(
            event.event_id,
            event.user_id,
            event.item_id,
            p,
            pb,
            version,
            self.partition,
            offset,
            event.ts,
        )

    def _on_drift(self) -> None:
        action = self.options.drift_action
        if action == "reset-online" and self.new_model is not None:
            self.model = self.new_model()
            self.resets += 1
        elif action == "retrain-batch" and self.baseline is not None:
            self.baseline.request_retrain()

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """Everything this learner holds, pickled (the snapshot records the offset)."""
        with self.lock:  # a scrape must not flush the scores mid-pickle
            self._fold()
            state = {
                "model": self.model,
                "scores": self.scores,
                "batch_scores": self.batch_scores,
                "baseline": self.baseline,
                "drift": self.drift,
                "data_drift": self.data_drift,
                "resets": self.resets,
                "consumed": self.consumed,
                "predicted": self.predicted,
                "learned": self.learned,
                "dead_lettered": dict(self.dead_lettered),
            }
            return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(
        cls,
        topic: str,
        partition: int,
        payload: bytes,
        next_offset: int,
        *,
        options: LearnerOptions | None = None,
        new_model: Callable[[], Any] | None = None,
    ) -> PartitionLearner:
        """A learner from :meth:`snapshot` bytes. Only call it on verified bytes."""
        state = pickle.loads(payload)  # the caller verified the HMAC
        learner = cls(topic, partition, state["model"], options=options, new_model=new_model)
        learner.scores = state["scores"]
        learner.batch_scores = state["batch_scores"]
        learner.baseline = state["baseline"]
        learner.drift = state["drift"]
        learner.data_drift = state["data_drift"]
        learner.resets = state["resets"]
        learner.predicted = state["predicted"]
        learner.learned = state["learned"]
        learner.dead_lettered = Counter(state["dead_lettered"])
        learner.next_offset = next_offset
        return learner

    def end_batch(self, force: bool = True) -> None:
        """Fold pending (label, probability) pairs into the scores. Only the loop thread
        calls this (it alone appends pairs); readers take ``lock`` and never flush.

        With ``force=False`` pairs are folded at most every 0.5 s or ``FOLD_PAIRS`` pairs
        (scrapes see scores at most that old): a fold costs about as much for 10 pairs
        as for 8,000, so folding every poll batch cost 0.5 µs per event.
        """
        if not force and (len(self._ys) < FOLD_PAIRS and time.monotonic() - self._folded_at < 0.5):
            return
        with self.lock:
            self._fold()
        self._folded_at = time.monotonic()

    def _fold(self) -> None:
        """Score the labelled events seen since the last fold (caller holds ``lock``)."""
        if self._ys:
            self.scores.extend(self._ys, self._ps)
            self._ys.clear()
            self._ps.clear()
        if self._batch_ys:
            self.batch_scores.extend(self._batch_ys, self._batch_ps)
            self._batch_ys.clear()
            self._batch_ps.clear()
        self.scores.flush()
        self.batch_scores.flush()

    @property
    def lag(self) -> int | None:
        """Messages in the partition not processed yet (from the last fetched watermark)."""
        if self.high_watermark is None or self.next_offset is None:
            return None
        return max(0, self.high_watermark - self.next_offset)
