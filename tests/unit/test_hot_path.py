"""The per-event shortcuts give exactly what the plain computation gives.

Each shortcut of the hot path (baseline look-ups per field, the drift detector's window
mean kept as a sum, data-drift counts taken per block, scores folded per batch) is
checked here against the obvious, slow way of computing the same number.
"""

from __future__ import annotations

import math
import pickle
import random
from collections import Counter
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from river import drift

import worker.learner as learner_module
from tests.helpers import assert_same_scores
from worker.baseline import BatchBaseline
from worker.drift import ConceptDrift, DataDrift, _Feature, psi
from worker.learner import FOLD_PAIRS, LearnerOptions, PartitionLearner
from worker.models import make_model
from worker.scoring import PrequentialScores
from worker.simulate import SimulationConfig, generate
from worker.tokens import DEFAULT_CROSSES, FLOAT_LIMIT, ClickTokens


def _events(n: int, seed: int = 3, scenario: str = "abrupt") -> list[dict[str, Any]]:
    return list(generate(SimulationConfig(n_events=n, seed=seed, scenario=scenario)))


def _x(ev: dict[str, Any]) -> dict[str, Any]:
    return {"user_id": ev["user_id"], "item_id": ev["item_id"], **(ev.get("features") or {})}


# -- batch baseline ------------------------------------------------------------------------------
def _reference_predict(b: BatchBaseline, x: dict[str, Any]) -> float:
    """Sum the fitted weight of every token ClickTokens makes of x."""
    assert b.coef is not None
    z = b.intercept
    for k, v in ClickTokens(crosses=DEFAULT_CROSSES).transform_one(x).items():
        if isinstance(v, str | bool):
            z += b.coef.get((k, v), 0.0)
        else:
            z += b.coef.get((k, None), 0.0) * v
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def test_baseline_prediction_equals_the_sum_over_its_tokens() -> None:
    rng = random.Random(1)
    b = BatchBaseline(window=2000)
    events = _events(4000)
    for ev in events[:2000]:
        x = _x(ev)
        x["score"] = rng.uniform(-2, 2)  # a numeric feature
        x["flag"] = rng.random() < 0.5  # a boolean one
        b.observe(x, bool(ev["clicked"]))
    assert b.trained
    assert any(v is None for _, v in b.coef or {})  # the numeric weight is there
    cases = [_x(ev) for ev in events[2000:]]
    cases += [
        {"user_id": "never-seen", "item_id": "nor-this"},
        {"user_id": "u1", "item_id": "i1", "score": 1e300, "flag": True, "position": 3},
        {"user_id": "u1", "item_id": "i1", "position": 1, "flag": 1},  # int 1 is not True
    ]
    for x in cases:
        got = b.predict(x)
        assert got is not None and math.isclose(got, _reference_predict(b, x), rel_tol=1e-12), x
    assert FLOAT_LIMIT < 1e300  # the case above is clipped


def test_baseline_restored_from_an_older_pickle_still_predicts() -> None:
    """A snapshot written before the per-field index existed is re-indexed on load."""
    b = BatchBaseline(window=500)
    for ev in _events(500):
        b.observe(_x(ev), bool(ev["clicked"]))
    state = dict(b.__dict__)
    for name in ("_due_at", "_fields", "_numeric", "_crosses"):
        state.pop(name, None)
    old = BatchBaseline.__new__(BatchBaseline)
    old.__setstate__(state)
    x = _x(_events(1, seed=9)[0])
    assert old.predict(x) == b.predict(x)
    assert pickle.loads(pickle.dumps(b)).predict(x) == b.predict(x)


def test_a_deployed_models_weights_are_pickled_once_per_model() -> None:
    """Snapshots reuse the pickled weights until a new model deploys, and restore them."""
    b = BatchBaseline(window=500, retrain_every=500)
    events = _events(1500)
    for ev in events[:500]:
        b.observe(_x(ev), bool(ev["clicked"]))
    first = b.coef
    assert first is not None
    one, two = pickle.dumps(b), pickle.dumps(b)
    cached = b._coef_pickled
    pickle.dumps(b)
    assert b._coef_pickled is cached  # not pickled again
    assert pickle.loads(one).coef == pickle.loads(two).coef == first
    for ev in events[500:1000]:  # retrains at the 1000th labelled event
        b.observe(_x(ev), bool(ev["clicked"]))
    assert b.trainings == 2 and b.coef is not first and b.coef != first
    restored = pickle.loads(pickle.dumps(b))
    assert restored.coef == b.coef and b._coef_pickled is not cached
    x = _x(events[1200])
    assert restored.predict(x) == b.predict(x)
    assert "_coef_pickled" not in pickle.loads(pickle.dumps(b)).__dict__


# -- concept drift -------------------------------------------------------------------------------
def _reference_alarms(losses: list[float], grace: int) -> list[int]:
    """ADWIN asked for its estimate before and after every loss."""
    det = drift.ADWIN(delta=0.002)  # type: ignore[no-untyped-call]
    alarms = []
    for i, loss in enumerate(losses, start=1):
        before = det.estimation
        det.update(loss)
        if det.drift_detected and i > grace and det.estimation > before:
            alarms.append(i)
    return alarms


def test_adwin_alarms_equal_asking_adwin_each_time() -> None:
    rng = random.Random(4)
    losses = []
    for level in (0.1, 0.4, 0.05, 0.6, 0.2, 0.2, 0.7, 0.1):  # rises and falls
        losses += [min(1.0, rng.random() * 2 * level) for _ in range(3000)]
    d = ConceptDrift("adwin", grace=500)
    got = [i for i, loss in enumerate(losses, start=1) if d.update(loss)]
    assert d._step not in (None, False)  # ADWIN's compiled update, called directly
    assert got == _reference_alarms(losses, 500)
    assert len(got) >= 3  # the rises were seen (the test is not vacuous)


def test_adwin_called_directly_pickles_and_goes_on_as_river_would() -> None:
    """A detector snapshotted at any point, including right after a detection, goes on
    with the same alarms, window and estimate as one never interrupted, and as River's
    own ``update`` gives."""
    rng = random.Random(9)
    losses = []
    for level in (0.1, 0.5, 0.1, 0.6):
        losses += [min(1.0, rng.random() * 2 * level) for _ in range(2500)]
    api = drift.ADWIN(delta=0.002)  # type: ignore[no-untyped-call]
    direct = ConceptDrift("adwin", grace=0)
    detections = []
    for i, loss in enumerate(losses):
        api.update(loss)
        direct.update(loss)
        assert direct.detector.drift_detected == api.drift_detected, i
        if api.drift_detected:
            detections.append(i)
    assert len(detections) >= 2
    assert (direct.detector.width, direct.estimate) == (api.width, api.estimation)

    uninterrupted = ConceptDrift("adwin", grace=0)
    resumed = ConceptDrift("adwin", grace=0)
    cut = detections[0]  # pickled right after a detection: the next loss starts afresh
    alarms: list[list[int]] = [[], []]
    for i, loss in enumerate(losses):
        if uninterrupted.update(loss):
            alarms[0].append(i)
        if resumed.update(loss):
            alarms[1].append(i)
        if i in (cut, cut + 1000):
            payload = pickle.dumps(resumed)
            assert b"update" not in payload  # the bound method is not pickled
            resumed = pickle.loads(payload)
    assert alarms[0] == alarms[1] and alarms[0]
    assert resumed.estimate == uninterrupted.estimate


def test_page_hinkley_keeps_rivers_api() -> None:
    d = ConceptDrift("page-hinkley", grace=0)
    alarms = [d.update(0.05) for _ in range(2000)] + [d.update(0.9) for _ in range(500)]
    assert d._step is False
    assert not any(alarms[:2000]) and any(alarms[2000:])


# -- data drift ----------------------------------------------------------------------------------
def test_data_drift_scores_equal_counting_each_block_directly() -> None:
    rng = random.Random(2)
    block = 500
    d = DataDrift(block=block, features=("device", "score", "missing"))
    rows = []
    for i in range(block * 3):
        shifted = i >= block * 2
        x = {
            "device": rng.choice(["ios", "web"] if shifted else ["ios", "android", "web"]),
            "score": rng.gauss(1.0 if shifted else 0.0, 1.0),
        }
        y = None if i % 7 == 0 else rng.random() < 0.3
        p = 1.0 if i % 97 == 0 else rng.random()
        rows.append((x, y, p))
        d.add(x, y, p)
    ref, last = rows[:block], rows[-block:]
    for name in ("device", "score", "missing"):
        f = _Feature(Counter(x.get(name) for x, _, _ in ref))
        want = psi(
            Counter(f.bucket(x.get(name)) for x, _, _ in ref),
            Counter(f.bucket(x.get(name)) for x, _, _ in last),
        )
        assert d.scores[name] == want, name
    assert d.scores["__label__"] == psi(
        Counter(y for _, y, _ in ref if y is not None),
        Counter(y for _, y, _ in last if y is not None),
    )
    assert d.scores["__prediction__"] == psi(
        Counter(min(int(p * 10), 9) for _, _, p in ref),
        Counter(min(int(p * 10), 9) for _, _, p in last),
    )
    assert d.scores["device"] > 0.1  # the shift shows
    assert d.scores["score"] > 0.1
    assert d.scores["missing"] == 0.0  # never present: all in the "missing" bucket

    # A snapshot from before (it kept the block's events) goes on the same way.
    old = DataDrift(block=block, features=("device", "score", "missing"))
    fresh = DataDrift(block=block, features=("device", "score", "missing"))
    for x, y, p in rows[: block + 100]:
        fresh.add(x, y, p)
        old.add(x, y, p)
    state = dict(old.__dict__)
    state["_rows"] = rows[block : block + 100]
    for name in ("_pairs", "_labels", "_ps"):
        del state[name]
    restored = DataDrift.__new__(DataDrift)
    restored.__setstate__(state)
    for x, y, p in rows[block + 100 :]:
        fresh.add(x, y, p)
        restored.add(x, y, p)
    assert restored.scores == fresh.scores and fresh.scores


# -- scores folded per batch ----------------------------------------------------------------------
def test_learner_scores_equal_scoring_each_event() -> None:
    events = _events(3000)
    opts = LearnerOptions(baseline_window=1000)
    learner = PartitionLearner("t", 0, make_model("logreg"), window=200, options=opts)
    online, batch = PrequentialScores(window=200), PrequentialScores(window=200)
    for i, ev in enumerate(events):
        pred = learner.predict_learn(ev, i)
        if ev.get("clicked") is not None:
            online.add(ev["clicked"], pred.click_probability)
            if pred.batch_click_probability is not None:
                batch.add(ev["clicked"], pred.batch_click_probability)
        if i % 37 == 0:
            learner.end_batch(force=False)  # folds at its own pace
    learner.end_batch()
    online.flush()
    batch.flush()
    assert_same_scores(learner.scores.cumulative(), online.cumulative())
    assert_same_scores(learner.scores.rolling(), online.rolling())
    assert_same_scores(learner.batch_scores.cumulative(), batch.cumulative())
    assert batch.labelled > 1000


def test_scores_fold_every_fold_pairs_or_half_a_second(monkeypatch: Any) -> None:
    """end_batch(force=False) folds once FOLD_PAIRS pairs wait or 0.5 s passed, not per
    poll batch; end_batch() always folds; a fold loses no pair."""
    clock = [1000.0]
    monkeypatch.setattr(learner_module.time, "monotonic", lambda: clock[0])
    learner = PartitionLearner("t", 0, make_model("logreg"))
    learner.end_batch()  # the clock of the last fold starts now
    events = [
        ev for ev in _events(FOLD_PAIRS + 600, scenario="none") if ev.get("clicked") is not None
    ]
    for i, ev in enumerate(events[: FOLD_PAIRS - 1]):
        learner.predict_learn(ev, i)
        learner.end_batch(force=False)
    assert learner.scores.labelled == 0  # pending: fewer than FOLD_PAIRS, no time passed
    learner.predict_learn(events[FOLD_PAIRS - 1], FOLD_PAIRS - 1)
    learner.end_batch(force=False)
    assert learner.scores.labelled == FOLD_PAIRS
    learner.predict_learn(events[FOLD_PAIRS], FOLD_PAIRS)
    learner.end_batch(force=False)
    assert learner.scores.labelled == FOLD_PAIRS
    clock[0] += 0.5
    learner.end_batch(force=False)
    assert learner.scores.labelled == FOLD_PAIRS + 1
    learner.predict_learn(events[FOLD_PAIRS + 1], FOLD_PAIRS + 1)
    learner.end_batch()
    assert learner.scores.labelled == FOLD_PAIRS + 2


# -- the baseline's fit in the background ---------------------------------------------------------
def test_background_fit_deploys_at_its_fixed_event_however_long_it_takes(monkeypatch: Any) -> None:
    """The model trained on the first window serves from window + delay on; the same
    model as a synchronous fit, whether the fit is quick or slower than the delay."""
    import time

    from worker import batchfit

    events = [(_x(ev), bool(ev["clicked"])) for ev in _events(2400)]
    window, delay = 1000, 300

    def run(b: BatchBaseline) -> list[float | None]:
        out = []
        for x, y in events:
            out.append(b.predict(x))
            b.observe(x, y)
        return out

    reference = run(BatchBaseline(window=window))  # fits at once, at event 1000
    quick = run(BatchBaseline(window=window, deploy_delay=delay))
    fit = batchfit.fit

    def slow_fit(*args: Any) -> Any:
        time.sleep(0.3)
        return fit(*args)

    # (A thread here: the slow stand-in cannot be sent to the fit process.)
    monkeypatch.setattr(batchfit, "fit", slow_fit)
    monkeypatch.setattr(batchfit, "fit_executor", lambda: ThreadPoolExecutor(1))
    slow_baseline = BatchBaseline(window=window, deploy_delay=delay)
    slow = run(slow_baseline)
    assert slow == quick
    assert quick[: window + delay] == [None] * (window + delay)
    assert quick[window + delay :] == reference[window + delay :]
    assert reference[window] is not None
    assert slow_baseline.deploy_wait_seconds > 0.05  # it did wait at the fixed point

    # A fit process that dies: the loop fits the same rows itself, with the same result.
    class Killed(Executor):
        def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
            future: Future[Any] = Future()
            future.set_exception(BrokenProcessPool("the fit process was killed"))
            return future

    monkeypatch.setattr(batchfit, "fit", fit)
    monkeypatch.setattr(batchfit, "fit_executor", Killed)
    assert run(BatchBaseline(window=window, deploy_delay=delay)) == quick


def test_rows_sent_to_the_fit_process_as_msgpack_fit_the_same_model() -> None:
    """The window travels as msgpack: str, int, float and bool values and key order come
    back as they were, so the fit is the one on the rows themselves."""
    import msgspec

    from worker.batchfit import fit, fit_packed

    rows = []
    for i, ev in enumerate(_events(1500, seed=9)):
        x = {**_x(ev), "score": (i % 17) / 7, "promoted": i % 3 == 0, "big": 2**62 + i}
        rows.append((x, bool(ev["clicked"])))
    packed = msgspec.msgpack.encode(rows)
    assert [(x, y) for x, y in msgspec.msgpack.decode(packed)] == rows
    assert [[type(v) for v in x.values()] for x, _ in msgspec.msgpack.decode(packed)] == [
        [type(v) for v in x.values()] for x, _ in rows
    ]
    tokens = ClickTokens(crosses=DEFAULT_CROSSES)
    coef, intercept, _ = fit_packed(packed, tokens, 1.0, 200)
    want_coef, want_intercept, _ = fit(rows, tokens, 1.0, 200)
    assert (coef, intercept) == (want_coef, want_intercept)
    assert any(name == "promoted" for name, _ in coef) and ("score", None) in coef


def test_the_fit_matrix_is_the_one_token_features_gives_row_by_row() -> None:
    """columns() (one pass, a table per field) numbers the tokens and fills the matrix
    exactly as looking every token_features() pair up in one vocabulary does; odd rows
    (a field named like a cross, values of other types) included."""
    from worker.batchfit import columns, token_features

    class Text(str):
        pass

    class Number(int):
        pass

    tokens = ClickTokens(crosses=DEFAULT_CROSSES)
    rows: list[tuple[dict[str, Any], bool]] = []
    rng = random.Random(4)
    for i, ev in enumerate(_events(3000, seed=11)):
        x = _x(ev)
        x["score"] = rng.choice([0.5, -3.25, 1e300, -1e300, float(i)])
        x["promoted"] = i % 3 == 0
        x["rank"] = i % 7
        if i % 500 == 1:
            x["user_id*category"] = "shadowed by the cross"
        if i % 500 == 2:
            x["odd"] = Text("a str subclass")
        if i % 500 == 3:
            x["odd"] = Number(5)  # an int subclass: numeric, as token_features has it
        rows.append((x, bool(ev["clicked"])))

    vocab: dict[tuple[str, Any], int] = {}
    want_indices: list[int] = []
    want_data: list[float] = []
    want_indptr = [0]
    for x, _ in rows:
        for key, value in token_features(tokens, x):
            want_indices.append(vocab.setdefault(key, len(vocab)))
            want_data.append(value)
        want_indptr.append(len(want_indices))

    keys, indices, data, indptr = columns(rows, tokens)
    assert keys == list(vocab)
    assert (indices, data, indptr) == (want_indices, want_data, want_indptr)
    assert ("odd", None) in keys and ("odd", "a str subclass") in keys
    assert ("user_id*category", "shadowed by the cross") not in keys  # overwritten, as before
    assert max(data) == FLOAT_LIMIT and min(data) == -FLOAT_LIMIT


def test_a_snapshot_taken_while_the_baseline_trains_restores_exactly() -> None:
    events = _events(3000, seed=5)
    opts = LearnerOptions(baseline_window=1000, baseline_deploy_delay=700)
    factory = lambda: make_model("logreg")  # noqa: E731
    straight = PartitionLearner("t", 0, factory(), options=opts)
    want = [straight.predict_learn(ev, i) for i, ev in enumerate(events)]
    first = PartitionLearner("t", 0, factory(), options=opts)
    got = [first.predict_learn(ev, i) for i, ev in enumerate(events[:1300])]
    assert first.baseline is not None and first.baseline.training  # mid-fit
    restored = PartitionLearner.restore("t", 0, first.snapshot(), 1300, options=opts)
    got += [restored.predict_learn(ev, 1300 + i) for i, ev in enumerate(events[1300:])]
    assert got == want
    assert restored.baseline is not None and restored.baseline.trainings == 1
    assert any(p.batch_click_probability is not None for p in got)


def test_the_window_is_dropped_once_nothing_can_retrain() -> None:
    """Trained once and never again: the window leaves memory and snapshots; with a
    retraining schedule or the retrain-batch drift action it stays."""
    events = [(_x(ev), bool(ev["clicked"])) for ev in _events(1500)]
    once = BatchBaseline(window=1000, keep_window=False)
    scheduled = BatchBaseline(window=1000, retrain_every=2000, keep_window=False)
    on_alarm = BatchBaseline(window=1000, keep_window=True)
    for b in (once, scheduled, on_alarm):
        for x, y in events:
            b.observe(x, y)
        assert b.trained
    assert len(once._recent) == 0
    assert len(pickle.dumps(once)) < len(pickle.dumps(scheduled)) - 10_000
    assert len(scheduled._recent) == len(on_alarm._recent) == 1000
    opts = LearnerOptions(baseline_window=1000)
    learner = PartitionLearner("t", 0, make_model("logreg"), options=opts)
    assert learner.baseline is not None and not learner.baseline.keep_window
    alarmed = LearnerOptions(
        baseline_window=1000, drift_detector="adwin", drift_action="retrain-batch"
    )
    learner = PartitionLearner("t", 0, make_model("logreg"), options=alarmed)
    assert learner.baseline is not None and learner.baseline.keep_window


def test_the_fit_process_returns_errors_and_reports_its_death() -> None:
    import time

    import pytest

    from worker.fitproc import FitProcess

    pool = FitProcess()
    try:
        assert pool.submit(divmod, 7, 2).result(timeout=60) == (3, 1)
        with pytest.raises(ZeroDivisionError):
            pool.submit(divmod, 1, 0).result(timeout=60)
        running = pool.submit(time.sleep, 30)
        pool._proc.kill()
        with pytest.raises(BrokenProcessPool):
            running.result(timeout=30)
        with pytest.raises(BrokenProcessPool):
            pool.submit(divmod, 7, 2).result(timeout=5)
    finally:
        pool.shutdown(wait=False)


def test_the_fit_process_runs_at_the_loops_priority() -> None:
    """Not below it: the loop waits for the fit at the batch model's deploy point, and at
    nice 19 (and at 10 and 5 now and then) the fit starved behind a busy broker while
    the stream stood still."""
    import os

    from worker.fitproc import FitProcess

    pool = FitProcess()
    try:
        child = pool.submit(os.nice, 0).result(timeout=60)
    finally:
        pool.shutdown()
    assert child == os.nice(0)


def test_data_drift_from_before_ids_were_left_out_stops_watching_them() -> None:
    """A snapshot taken when the ids were watched by default restores without them:
    they are no longer counted, so keeping them would show every id as "missing"."""
    rng = random.Random(3)

    def event(i: int) -> dict[str, Any]:
        x: dict[str, Any] = {"device": rng.choice(["ios", "android"]), "hour": i % 24}
        x["user_id"] = f"u{rng.randrange(50)}"  # as ClickEvent.x() appends them
        x["item_id"] = f"i{rng.randrange(20)}"
        return x

    before = DataDrift(block=200)
    for i in range(300):
        before.add(event(i), True, 0.5)  # features=None: every item, as before
    assert {"user_id", "item_id"} <= set(before.features)
    state = dict(before.__dict__)
    del state["_count_ids"]  # what an older riverline pickled
    restored = DataDrift.__new__(DataDrift)
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert set(restored.features) == {"device", "hour"}
    assert not [pair for pair in restored._pairs if pair[0] in ("user_id", "item_id")]
    for i in range(300, 700):
        x = event(i)
        restored.add(x, False, 0.5, len(x) - 2)
    assert restored.blocks == 3
    assert set(restored.scores) == {"device", "hour", "__label__", "__prediction__"}
    assert all(math.isfinite(v) for v in restored.scores.values())


def test_the_worker_can_wait_for_the_fit_process_to_import_what_it_fits_with(
    monkeypatch: Any,
) -> None:
    """``wait_fit_process`` returns once the fit process imported scikit-learn (the
    worker calls it before joining its group); False when it is still importing after
    the timeout or when told to stop; it does not wait for a process never warmed up
    or dead."""
    import time

    import worker.batchfit as batchfit
    from worker.fitproc import FitProcess

    pool = FitProcess()
    monkeypatch.setattr(batchfit, "_EXECUTOR", [pool])
    monkeypatch.setattr(batchfit, "_WARM_UP", [])
    try:
        assert batchfit.wait_fit_process(0.01) is True  # no warm-up: nothing to wait for
        batchfit._WARM_UP.append(pool.submit(batchfit._warm_up))
        assert batchfit.wait_fit_process(120) is True
        assert batchfit._WARM_UP[0].done() and batchfit._WARM_UP[0].exception() is None
    finally:
        pool.shutdown()

    slow: Future[None] = Future()  # a warm-up still running
    monkeypatch.setattr(batchfit, "_WARM_UP", [slow])
    began = time.monotonic()
    assert batchfit.wait_fit_process(0.6) is False
    assert time.monotonic() - began >= 0.6
    began = time.monotonic()
    assert batchfit.wait_fit_process(30, stop=lambda: True) is False  # a stop signal
    assert time.monotonic() - began < 5
    slow.set_exception(BrokenProcessPool("the fit process ended"))
    assert batchfit.wait_fit_process(5) is True  # nothing left to wait for
