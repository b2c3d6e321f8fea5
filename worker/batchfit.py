"""The batch baseline's fit, and the background process that runs it.

This module imports only msgspec and ``river.base`` (numpy and scikit-learn inside a
fit), so the fit process (:mod:`worker.fitproc`), which ``riverline run`` starts before
it imports River itself, has scikit-learn loaded (about a second) by the time the worker
reads its first event. It used to import all of River first, through
``worker.baseline``: ~2 s of CPU (then at nice 19), and at full speed the loop then
waited 0.23–0.45 s for the first model at its deploy point.
"""

from __future__ import annotations

import atexit
import logging
import math
import time
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool as BrokenExecutor
from typing import Any

import msgspec

from worker.tokens import ClickTokens

log = logging.getLogger(__name__)

Fit = tuple[dict[tuple[str, Any], float], float, float]  # (coef, intercept, seconds)


def fit(
    rows: list[tuple[dict[str, Any], bool]], tokens: ClickTokens, c: float, max_iter: int
) -> Fit:
    """Full-batch logistic regression on one-hot tokens: (coef, intercept, seconds).

    A pure function of its arguments, so a fit run again after a restore gives the same
    model, on whichever thread it runs.
    """
    import numpy as np
    from scipy.sparse import csr_matrix
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    vocab: dict[tuple[str, Any], int] = {}
    indptr = [0]
    indices: list[int] = []
    data: list[float] = []
    labels = []
    for x, y in rows:
        for key, v in token_features(tokens, x):
            indices.append(vocab.setdefault(key, len(vocab)))
            data.append(v)
        indptr.append(len(indices))
        labels.append(y)
    if len(set(labels)) < 2:
        # One class only: a constant model at the observed rate.
        rate = min(max(float(np.mean(labels)), 1e-6), 1 - 1e-6)
        return {}, math.log(rate / (1 - rate)), time.perf_counter() - started
    matrix = csr_matrix(
        (np.asarray(data), np.asarray(indices), np.asarray(indptr)),
        shape=(len(labels), max(1, len(vocab))),
    )
    model = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs")
    # One BLAS thread: a fit must not take both cores from the loop and the broker.
    with threadpool_limits(limits=1):
        model.fit(matrix, np.asarray(labels, dtype=bool))
    weights = model.coef_[0]
    coef = {k: float(weights[i]) for k, i in vocab.items() if weights[i] != 0.0}
    return coef, float(model.intercept_[0]), time.perf_counter() - started


def fit_packed(packed: bytes, tokens: ClickTokens, c: float, max_iter: int) -> Fit:
    """:func:`fit` on rows encoded with msgpack (which keeps str, int, float, bool and key
    order, so the rows and the model are the same)."""
    return fit(msgspec.msgpack.decode(packed), tokens, c, max_iter)


def token_features(tokens: ClickTokens, x: dict[str, Any]) -> list[tuple[tuple[str, Any], float]]:
    out: list[tuple[tuple[str, Any], float]] = []
    for k, v in tokens.transform_one(x).items():
        if isinstance(v, str | bool):
            out.append(((k, v), 1.0))
        else:
            out.append(((k, None), float(v)))
    return out


_EXECUTOR: list[Executor] = []


def fit_executor() -> Executor:
    """One background process fits every partition's baseline, one after another.

    A process, not a thread: on a thread the fit shared the GIL with the loop and halved
    its speed while it ran (p99 latency 250 ms at 15,000 events/s on this machine). The
    process (:mod:`worker.fitproc`) runs at the loop's priority, since the loop waits
    for it at a deploy point, with one BLAS thread, so it never takes both cores.
    """
    if not _EXECUTOR:
        from worker.fitproc import FitProcess

        _EXECUTOR.append(FitProcess())
        atexit.register(_EXECUTOR[0].shutdown)
    return _EXECUTOR[0]


def start_fit_process() -> None:
    """Start the fit process now (it imports scikit-learn, about a second), not at the
    first fit. Once: later calls find it started."""
    if not _EXECUTOR:
        fit_executor().submit(_warm_up)


def _warm_up() -> None:
    import scipy.sparse  # noqa: F401
    import sklearn.linear_model  # noqa: F401


def fit_result(
    future: Future[Fit],
    rows: list[tuple[dict[str, Any], bool]],
    tokens: ClickTokens,
    c: float,
    max_iter: int,
) -> Fit:
    """The background fit's result; if its process died (killed, out of memory), fit
    here instead — the same rows give the same model — and start a new process."""
    try:
        return future.result()
    except BrokenExecutor as exc:
        log.warning("the baseline's fit process failed (%s); fitting in the loop instead", exc)
        _EXECUTOR.clear()
        return fit(rows, tokens, c, max_iter)
