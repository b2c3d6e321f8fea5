"""Worker processes for the integration tests: ``python -m worker run ...``, logged to a file.

Shared by ``test_worker.py`` and ``test_durability.py``: start, wait, SIGTERM, kill -9,
read the log, and wait for a line in it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def worker_env(snapshot_key: str, **extra: str) -> dict[str, str]:
    """This environment without any ``RIVERLINE_*`` setting or ``KAFKA_BOOTSTRAP_SERVERS``
    (each test passes its own flags), plus the snapshot key and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RIVERLINE_") and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["RIVERLINE_SNAPSHOT_KEY"] = snapshot_key
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m worker run *args``; its stdout and stderr (the log) go to ``log``."""

    def __init__(self, log: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.log = log
        self.args = [sys.executable, "-m", "worker", "run", *args]
        self.started = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """The exit code; kills the worker and fails with its log after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker pid {self.proc.pid} did not exit within {timeout:.0f}s; log:\n{self.tail()}"
            ) from None

    def terminate(self) -> None:
        """SIGTERM: the worker drains, checkpoints and leaves the group."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (kill -9): no checkpoint, no goodbye to the group."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def assigned(self) -> set[int]:
        """Every partition this worker logged as assigned."""
        got: set[int] = set()
        for m in re.finditer(r"assigned partitions \[([\d, ]*)\]", self.text):
            got.update(int(p) for p in m.group(1).split(",") if p.strip())
        return got

    def assignments(self) -> int:
        return len(re.findall(r"assigned partitions \[", self.text))

    def wait_log(self, cond: Callable[[WorkerProcess], bool], what: str, timeout: float) -> None:
        """Poll ``cond`` until true; fail with the log if the worker exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not cond(self):
            assert self.alive(), f"the worker exited before {what}; log:\n{self.tail()}"
            assert time.monotonic() < deadline, (
                f"timed out after {timeout:.0f}s waiting for {what}; log:\n{self.tail()}"
            )
            time.sleep(0.05)


@contextlib.contextmanager
def killed_at_exit() -> Iterator[list[WorkerProcess]]:
    """A list to put worker processes in; whatever is still running at exit is killed."""
    procs: list[WorkerProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
