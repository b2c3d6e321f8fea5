"""A child process that runs the batch baseline's fits, off the worker's GIL.

``FitProcess`` is a one-worker :class:`concurrent.futures.Executor` backed by
``python -m worker.fitproc``: each call is pickled down a pipe, run in the child, and its
result (or exception) pickled back. The child is started with ``subprocess`` rather than
``multiprocessing`` so that it never re-imports the parent's ``__main__`` (a script
without a ``__main__`` guard would otherwise run again in the child). It runs at the
loop's CPU priority with one BLAS thread.

>>> pool = FitProcess()
>>> pool.submit(divmod, 7, 2).result(timeout=60)
(3, 1)
>>> pool.shutdown()
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from queue import SimpleQueue
from typing import IO, Any

_LENGTH = struct.Struct("!Q")


def _send(stream: IO[bytes], obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the other side closed the pipe")
    (size,) = _LENGTH.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the other side closed the pipe mid-message")
    return pickle.loads(payload)  # from our own parent or child only


class FitProcess(Executor):
    """Runs submitted calls one after another in a child process."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker.fitproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        )
        self._lock = threading.Lock()
        self._pending: deque[Future[Any]] = deque()
        self._broken: BaseException | None = None
        # Calls are written by a thread of their own: a write blocks while the child
        # (busy with a fit) has not read the previous one, and the caller must not.
        self._outbox: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
        self._outbox = SimpleQueue()
        self._reader = threading.Thread(
            target=self._read, name="riverline-fit-results", daemon=True
        )
        self._writer = threading.Thread(target=self._write, name="riverline-fit-calls", daemon=True)
        self._reader.start()
        self._writer.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._broken is not None:
                future.set_exception(BrokenProcessPool(str(self._broken)))
                return future
            self._pending.append(future)
            self._outbox.put((fn, args, kwargs))
        return future

    def _write(self) -> None:
        assert self._proc.stdin is not None
        while True:
            call = self._outbox.get()
            try:
                _send(self._proc.stdin, call)
            except (OSError, ValueError) as exc:  # the child is gone, or shut down
                with self._lock:
                    self._fail(exc)
                return

    def _read(self) -> None:
        assert self._proc.stdout is not None
        while True:
            try:
                ok, value = _receive(self._proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                with self._lock:
                    self._fail(exc)
                return
            with self._lock:
                future = self._pending.popleft()
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _fail(self, exc: BaseException) -> None:
        """The child died: every pending and later call fails (caller holds the lock)."""
        self._broken = exc
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(BrokenProcessPool(f"the fit process ended: {exc}"))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # the child exits at end of input
        if wait:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        else:
            self._proc.kill()


def _serve() -> None:
    """The child: read calls from stdin, write (ok, result) to stdout, until EOF."""
    # No os.nice(): when the loop reaches a batch model's deploy point before the fit
    # is done, it waits for it, so a fit that yields to everything else stalls the
    # stream. With a broker and a load generator busy on the same two cores
    # at 19,000 events/s, a 130 ms fit at nice 19 took up to 0.9 s and the loop stood
    # still for up to 430 ms (p99 latency 100-500 ms); at nice 10 it still waited
    # 115-185 ms in 2 of 17 runs, at nice 5 197 ms in 1 of 11, at nice 0 in none of 11.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not corrupt the replies
    while True:
        try:
            fn, args, kwargs = _receive(stdin)
        except EOFError:
            return
        try:
            reply = (True, fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 (sent back to the caller, raised there)
            reply = (False, exc)
        _send(stdout, reply)


if __name__ == "__main__":
    _serve()
