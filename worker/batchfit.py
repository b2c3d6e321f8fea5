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
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool as BrokenExecutor
from typing import Any

import msgspec

from worker.tokens import FLOAT_LIMIT, ClickTokens

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
    keys, indices, data, indptr = columns(rows, tokens)
    labels = [y for _, y in rows]
    if len(set(labels)) < 2:
        # One class only: a constant model at the observed rate.
        rate = min(max(float(np.mean(labels)), 1e-6), 1 - 1e-6)
        return {}, math.log(rate / (1 - rate)), time.perf_counter() - started
    matrix = csr_matrix(
        (np.asarray(data), np.asarray(indices), np.asarray(indptr)),
        shape=(len(labels), max(1, len(keys))),
    )
    model = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs")
    # One BLAS thread: a fit must not take both cores from the loop and the broker.
    with threadpool_limits(limits=1):
        model.fit(matrix, np.asarray(labels, dtype=bool))
    weights = model.coef_[0]
    coef = {k: float(w) for k, w in zip(keys, weights.tolist(), strict=True) if w != 0.0}
    return coef, float(model.intercept_[0]), time.perf_counter() - started


def fit_packed(packed: bytes, tokens: ClickTokens, c: float, max_iter: int) -> Fit:
    """:func:`fit` on rows encoded with msgpack (which keeps str, int, float, bool and key
    order, so the rows and the model are the same)."""
    return fit(msgspec.msgpack.decode(packed), tokens, c, max_iter)


def token_features(tokens: ClickTokens, x: dict[str, Any]) -> list[tuple[tuple[str, Any], float]]:
    """The (token, value) pairs of one row: a one-hot ``(field, value)`` token weighs 1.0,
    a numeric field is ``(field, None)`` with its (clipped) value.

    >>> token_features(ClickTokens(crosses=(("user_id", "device"),)),
    ...                {"user_id": "u1", "device": "ios", "position": 3, "score": 0.5})
    ... # doctest: +NORMALIZE_WHITESPACE
    [(('user_id', 'u1'), 1.0), (('device', 'ios'), 1.0), (('position', '3'), 1.0),
     (('score', None), 0.5), (('user_id*device', 'u1|ios'), 1.0)]
    """
    out: list[tuple[tuple[str, Any], float]] = []
    for k, v in tokens.transform_one(x).items():
        if isinstance(v, str | bool):
            out.append(((k, v), 1.0))
        else:
            out.append(((k, None), float(v)))
    return out


def columns(
    rows: list[tuple[dict[str, Any], bool]], tokens: ClickTokens
) -> tuple[list[tuple[str, Any]], list[int], list[float], list[int]]:
    """The rows' tokens as a CSR matrix: (the column tokens, indices, data, indptr).

    Columns are numbered in the order tokens first appear, row by row, each row's tokens
    in :func:`token_features` order, so the matrix (and the fit) is the one that function
    gives. This is :func:`token_features` fused into one pass with one look-up table per
    field instead of a tuple per token: 76 instead of 115 ms for 10,000 rows, and a fit's
    CPU 250 instead of 329 ms, which the fit process takes from the loop and the broker
    on a small machine.

    >>> keys, indices, data, indptr = columns(
    ...     [({"device": "ios", "score": 0.5}, True), ({"device": "web", "score": 2.0}, False),
    ...      ({"device": "ios"}, True)], ClickTokens())
    >>> keys, indices, data, indptr
    ([('device', 'ios'), ('score', None), ('device', 'web')], [0, 1, 2, 1, 0], [1.0, 0.5, 1.0, 2.0, 1.0], [0, 2, 4, 5])
    """
    keys: list[tuple[str, Any]] = []
    one_hot: dict[str, dict[Any, int]] = {}  # field -> value -> column
    numeric: dict[str, int] = {}  # field -> column
    crosses = [(a, b, f"{a}*{b}") for a, b in tokens.crosses]
    indices: list[int] = []
    data: list[float] = []
    indptr = [0]
    column = indices.append
    value = data.append

    def new_column(name: str, token: Any) -> int:
        keys.append((name, token))
        if token is None:
            numeric[name] = len(keys) - 1
        else:
            one_hot.setdefault(name, {})[token] = len(keys) - 1
        return len(keys) - 1

    def general(x: dict[str, Any]) -> None:
        for (name, token), v in token_features(tokens, x):
            table = numeric if token is None else one_hot.get(name, _NO_TOKENS)
            i = table.get(name if token is None else token)
            column(new_column(name, token) if i is None else i)
            value(v)

    for x, _ in rows:
        if any(name in x for _, _, name in crosses):
            # A field named like a cross (transform_one overwrites it in its place).
            general(x)
            indptr.append(len(indices))
            continue
        for k, v in x.items():
            t = type(v)
            if t is str or t is bool:
                token: Any = v
            elif t is int:
                token = str(v)
            elif t is float or not isinstance(v, str | bool):
                # A float, clipped as ClickTokens clips it; another number (a subclass)
                # is left as it is by ClickTokens and made a float by token_features.
                i = numeric.get(k)
                column(new_column(k, None) if i is None else i)
                value(min(max(v, -FLOAT_LIMIT), FLOAT_LIMIT) if t is float else float(v))
                continue
            else:  # a subclass of str
                token = v
            table = one_hot.get(k)
            i = None if table is None else table.get(token)
            column(new_column(k, token) if i is None else i)
            value(1.0)
        for a, b, name in crosses:
            if a in x and b in x:
                token = f"{x[a]}|{x[b]}"
                table = one_hot.get(name)
                i = None if table is None else table.get(token)
                column(new_column(name, token) if i is None else i)
                value(1.0)
        indptr.append(len(indices))
    return keys, indices, data, indptr


_NO_TOKENS: dict[Any, int] = {}


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


_WARM_UP: list[Future[None]] = []


def start_fit_process() -> None:
    """Start the fit process now (it imports scikit-learn, about a second), not at the
    first fit. Once: later calls find it started."""
    if not _EXECUTOR:
        _WARM_UP.append(fit_executor().submit(_warm_up))


def wait_fit_process(timeout: float, stop: Callable[[], bool] = lambda: False) -> bool:
    """Wait until the fit process has imported what it fits with. True once it has, or
    when there is nothing to wait for (started without :func:`start_fit_process`, or
    dead: the first fit then finds that out and fits in the loop, see
    :func:`fit_result`); False if it is still importing after ``timeout`` seconds, or
    when ``stop()`` turns true (checked every 0.25 s).

    The worker calls this before it joins its group. Those imports take a second of
    CPU on one core; while the first events of a partition arrived they competed with
    the loop, the broker and the producers on this machine's two cores, and the first
    150-200 ms of events waited 40-120 ms.
    """
    if not _WARM_UP:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            _WARM_UP[0].result(timeout=max(0.0, min(0.25, deadline - time.monotonic())))
        except FutureTimeout:
            if stop() or time.monotonic() >= deadline:
                return False
            continue
        except Exception:  # noqa: BLE001 (the process died, or its imports failed)
            return True
        return True


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
