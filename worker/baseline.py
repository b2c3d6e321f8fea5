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
- Training starts and the new model deploys at deterministic points of the stream, so
  replays and restores give identical predictions. With ``deploy_delay=0`` the fit
  runs at once, pausing the loop (bounded by the window size; measured: see README,
  "Online versus offline"). With ``deploy_delay=D`` it runs in a background process
  (:mod:`worker.batchfit`) and the model takes over ``D`` labelled events later — as
  an offline model is deployed some time after its data was collected — so the loop
  does not pause unless the fit takes longer than those ``D`` events (then it waits
  there, and ``deploy_wait_seconds`` counts it). A snapshot taken meanwhile holds the
  training rows; a restore fits them again.
- Prediction does not use scikit-learn (per-row calls cost ~50 µs): the fitted
  coefficients are kept per field as value → weight dicts, so a prediction is one or
  two dict look-ups per field, with no token built but the crosses'. Tokens not seen
  in the window weigh nothing.

>>> b = BatchBaseline(window=4)
>>> b.predict({"user_id": "u1"}) is None  # not trained yet
True
>>> [b.observe({"user_id": "u1" if y else "u2", "category": "news"}, y)
...  for y in (True, False, True, False)]  # trains at the 4th labelled event
[False, False, False, True]
>>> b.trainings, round(b.predict({"user_id": "u1", "category": "news"}), 2) > 0.5
(1, True)

In the background, deploying two labelled events after the window closed:

>>> b = BatchBaseline(window=4, deploy_delay=2)
>>> [b.observe({"user_id": "u1" if y else "u2"}, y) for y in (True, False) * 3]
[False, False, False, False, False, True]
>>> b.trained_at_labelled, b.labelled, b.trainings
(4, 6, 1)
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import msgspec

from worker import batchfit
from worker.tokens import DEFAULT_CROSSES, FLOAT_LIMIT, ClickTokens

log = logging.getLogger(__name__)
_NONE: dict[Any, float] = {}  # the weights of a field the window never saw


class PickledOnce:
    """A value that pickles as bytes made once, and unpickles as the value itself.

    >>> import pickle
    >>> weights = {("device", "ios"): 0.5}
    >>> once = PickledOnce(weights)
    >>> pickle.loads(pickle.dumps({"coef": once})) == {"coef": weights}
    True
    """

    __slots__ = ("blob", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return pickle.loads, (self.blob,)


class BatchBaseline:
    def __init__(
        self,
        window: int = 10_000,
        retrain_every: int | None = None,
        c: float = 1.0,
        max_iter: int = 200,
        deploy_delay: int = 0,
        keep_window: bool = True,
    ) -> None:
        if window < 2:
            raise ValueError("the batch window must hold at least 2 labelled events")
        if retrain_every is not None and retrain_every < 1:
            raise ValueError("retrain_every must be >= 1 or None (never)")
        if deploy_delay < 0:
            raise ValueError("deploy_delay must be >= 0")
        self.window = window
        self.deploy_delay = deploy_delay
        # Without retraining (by schedule or by a drift alarm) the window is only needed
        # until the first fit starts: then it is dropped, from memory and snapshots.
        self.keep_window = keep_window or retrain_every is not None
        self.retrain_every = retrain_every
        self.c = c
        self.max_iter = max_iter
        self.tokens = ClickTokens(crosses=DEFAULT_CROSSES)
        self._recent: deque[tuple[dict[str, Any], bool]] = deque(maxlen=window)
        self.coef: dict[tuple[str, Any], float] | None = None
        self.intercept = 0.0
        self.labelled = 0
        self.trainings = 0  # models deployed
        self.trained_at_labelled = 0  # labelled count at the last training's start
        self.last_training_seconds = 0.0
        self.max_training_seconds = 0.0
        self.deploy_wait_seconds = 0.0  # how long the loop waited for fits, in all
        self.retrain_requested = False
        self._index()

    # Class defaults keep snapshots pickled before these attributes existed restorable.
    deploy_delay = 0
    keep_window = True
    _collecting = True  # the window still takes labelled events
    deploy_wait_seconds = 0.0
    # A training in progress: (the window's rows, the labelled count to deploy at).
    _job: tuple[list[tuple[dict[str, Any], bool]], int] | None = None
    _future: Future[batchfit.Fit] | None = None
    _due_at = 0  # labelled count at which observe() must look closer
    _fields: dict[str, dict[Any, float]] | None = None
    _numeric: dict[str, float] = {}
    _crosses: tuple[tuple[str, str, dict[str, float]], ...] = ()

    @property
    def trained(self) -> bool:
        return self.coef is not None

    def _index(self) -> None:
        """Lay the coefficients out for :meth:`predict`: per field, value → weight."""
        self._due_at = (
            self._job[1]
            if self._job is not None
            else self.window
            if self.coef is None
            else self.trained_at_labelled + self.retrain_every
            if self.retrain_every is not None
            else 2**62
        )
        if self.coef is None:
            self._fields = None
            return
        fields: dict[str, dict[Any, float]] = {}
        numeric: dict[str, float] = {}
        for (name, value), w in self.coef.items():
            if value is None:
                numeric[name] = w
            else:
                fields.setdefault(name, {})[value] = w
        self._crosses = tuple((a, b, fields.pop(f"{a}*{b}", {})) for a, b in self.tokens.crosses)
        self._fields, self._numeric = fields, numeric

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._index()  # the look-up tables are derived, not pickled

    def predict(self, x: dict[str, Any]) -> float | None:
        """Probability of a click, or None before the first training.

        The same tokens as :func:`worker.batchfit.token_features`, computed inline:
        this runs per event.
        """
        fields = self._fields
        if fields is None:
            return None
        z = self.intercept
        for k, v in x.items():
            t = type(v)
            if t is str or t is bool:
                z += fields.get(k, _NONE).get(v, 0.0)
            elif t is int:  # ClickTokens makes an int a string token
                z += fields.get(k, _NONE).get(str(v), 0.0)
            else:  # a float, clipped as ClickTokens clips it
                z += self._numeric.get(k, 0.0) * min(max(v, -FLOAT_LIMIT), FLOAT_LIMIT)
        for a, b, weights in self._crosses:
            # (contextlib.suppress would cost more than the look-up)
            try:  # noqa: SIM105
                z += weights.get(f"{x[a]}|{x[b]}", 0.0)
            except KeyError:  # the event lacks a field of this cross
                pass
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def observe(self, x: dict[str, Any], y: bool) -> bool:
        """Remember one labelled event; train or deploy when due.

        True when a newly trained model took over at this event.
        """
        if self._collecting:
            self._recent.append((x, y))
        self.labelled += 1
        if self.labelled < self._due_at and not self.retrain_requested:
            return False
        deployed = False
        job = self._job
        if job is not None:
            if self.labelled < job[1]:
                return False  # still training (in the background) until its deploy point
            self._deploy()
            deployed = True
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
            self._start()
            if self.deploy_delay == 0:
                self._deploy()
                deployed = True
        self._index()
        return deployed

    def request_retrain(self) -> None:
        """Retrain at the next labelled event (e.g. on a drift alarm)."""
        self.retrain_requested = True

    @property
    def training(self) -> bool:
        """A model is being trained and deploys at a later labelled event."""
        return self._job is not None

    # -- the training job ----------------------------------------------------------------------
    def _start(self) -> None:
        """Freeze the window as the training set; fit it in the background."""
        rows = list(self._recent)
        if not self.keep_window:
            self._recent.clear()
            self._collecting = False
        self._job = (rows, self.labelled + self.deploy_delay)
        self.retrain_requested = False
        self.trained_at_labelled = self.labelled
        self._submit()

    def _submit(self) -> None:
        assert self._job is not None
        rows = self._job[0]
        if self.deploy_delay == 0:
            self._future = None  # fitted in _deploy, on this thread
        else:
            # The rows travel as msgpack: encoding 10,000 of them takes ~2 ms here, while
            # pickling them (on the fit process's writer thread) held the GIL, and so
            # stalled the loop, for ~20 ms.
            packed = msgspec.msgpack.encode(rows)
            self._future = batchfit.fit_executor().submit(
                batchfit.fit_packed, packed, self.tokens, self.c, self.max_iter
            )

    def _deploy(self) -> None:
        """Install the job's model, waiting for the fit if it is not done yet."""
        assert self._job is not None
        future = self._future
        if future is None and self.deploy_delay:
            # Restored mid-job: fit again (the same rows give the same model).
            self._submit()
            future = self._future
        if future is None:
            fit = batchfit.fit(self._job[0], self.tokens, self.c, self.max_iter)
        else:
            waited = time.perf_counter()
            fit = batchfit.fit_result(future, self._job[0], self.tokens, self.c, self.max_iter)
            self.deploy_wait_seconds += time.perf_counter() - waited
        self.coef, self.intercept, seconds = fit
        self._job = None
        self._future = None
        self.trainings += 1
        self.last_training_seconds = seconds
        self.max_training_seconds = max(self.max_training_seconds, seconds)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_future"] = None  # a running fit is not state: the job's rows are
        for derived in ("_fields", "_numeric", "_crosses", "_due_at"):
            state.pop(derived, None)  # rebuilt from coef by _index()
        state.pop("_coef_pickled", None)  # a cache, refilled below
        coef = self.coef
        if coef is not None:
            # A deployed model's weights never change (a retrain deploys a new dict): each
            # checkpoint reuses their pickled bytes, a third of a snapshot's pickling
            # (~2 of ~7 ms for 8,000 weights), which pauses the loop.
            cached = self.__dict__.get("_coef_pickled")
            if cached is None or cached.value is not coef:
                cached = self._coef_pickled = PickledOnce(coef)
            state["coef"] = cached
        return state
