"""``riverline broker start|stop|status``, run as a real subprocess on its own state dir.

The jars are shared with the session broker (tests/conftest.py) through
RIVERLINE_BROKER_LIBS, so only the first start of a fresh checkout asks Maven.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from worker.broker import LocalBroker, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300.0  # a fresh checkout resolves the jars with Maven on first start


def _shared_libs() -> Path:
    """The jar directory the session fixture uses (LocalBroker's own rule for it)."""
    env = os.environ.get("RIVERLINE_BROKER_LIBS")
    if env:
        return Path(env)
    state = Path(os.environ.get("RIVERLINE_TEST_BROKER_DIR", REPO / ".riverline" / "test-broker"))
    return state / "libs"


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIVERLINE_BROKER_")}
    env["RIVERLINE_BROKER_LIBS"] = str(_shared_libs())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(overrides)
    return env


def _riverline(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "broker", *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _broker_pids(state_dir: Path, marker: str = "kafka.Kafka") -> list[int]:
    """Processes whose command line names both ``marker`` and this state dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = " ".join(_cmdline(int(proc.name)))
        except OSError:
            continue
        if marker in cmd and str(state_dir) in cmd:
            pids.append(int(proc.name))
    return pids


def _cmdline(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")


def test_an_unknown_collector_is_refused(tmp_path: Path) -> None:
    refused = _riverline(tmp_path, "start", "--gc", "cms", "--state-dir", str(tmp_path / "b"))
    assert refused.returncode == 2
    # (argparse quotes the choices in some Python versions and not in others)
    assert "argument --gc: invalid choice: 'cms'" in refused.stderr
    assert "zgc" in refused.stderr and "g1" in refused.stderr
    assert not (tmp_path / "b").exists()


def _wait_gone(state_dir: Path, marker: str = "kafka.Kafka", timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _broker_pids(state_dir, marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _tools_present() -> bool:
    libs = _shared_libs()
    return shutil.which("java") is not None and (
        shutil.which("mvn") is not None or (libs / ".pom.sha256").is_file()
    )


# On a laptop without Java the CLI tests are skipped; in CI (CI=true) they must run.
needs_java = pytest.mark.skipif(
    not _tools_present() and not os.environ.get("CI"),
    reason="the local broker needs Java 17+ and Maven (or resolved jars)",
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A broker state dir; whatever runs from it is stopped at teardown, pass or fail."""
    state = tmp_path / "broker"
    try:
        yield state
    finally:
        with contextlib.suppress(Exception):
            LocalBroker(state_dir=state).stop(timeout=30)
        # Only processes started for this unique tmp dir, i.e. by this test.
        for pid in _broker_pids(state, marker="java"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@needs_java
def test_start_status_stop_lifecycle(tmp_path: Path, state_dir: Path) -> None:
    # Created beforehand: start on a missing state dir is test_start_creates_the_state_dir.
    state_dir.mkdir()
    port = free_port()
    flags = ("--state-dir", str(state_dir), "--port", str(port))
    address = f"127.0.0.1:{port}"

    before = _riverline(tmp_path, "status", *flags)
    assert before.returncode == 3, before.stdout + before.stderr
    assert "not running" in before.stdout

    started = _riverline(tmp_path, "start", *flags, timeout=START_TIMEOUT)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"started: bootstrap {address}" in started.stdout
    pid_file = state_dir / "broker.pid"
    pid = int(pid_file.read_text().split()[0])
    assert _broker_pids(state_dir) == [pid]
    # The default collector, and the JVM's logs of its collections and of its stops
    # (the benchmark reads the latter).
    assert "-XX:+UseZGC" in _cmdline(pid)
    assert "-XX:+UseG1GC" not in _cmdline(pid)

    admin = AdminClient({"bootstrap.servers": address})
    md = admin.list_topics(timeout=15)
    assert [b.port for b in md.brokers.values()] == [port]
    logs = state_dir / "logs"
    assert "Using The Z Garbage Collector" in (logs / "gc.log").read_text()
    assert (logs / "safepoints.log").is_file()

    again = _riverline(tmp_path, "start", *flags)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout
    assert int(pid_file.read_text().split()[0]) == pid
    assert _broker_pids(state_dir) == [pid]

    running = _riverline(tmp_path, "status", *flags)
    assert running.returncode == 0, running.stdout + running.stderr
    assert f"running: pid {pid}" in running.stdout
    assert address in running.stdout

    stopped = _riverline(tmp_path, "stop", *flags)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped" in stopped.stdout
    assert _wait_gone(state_dir) == []
    assert not pid_file.exists()

    after = _riverline(tmp_path, "status", *flags)
    assert after.returncode == 3, after.stdout + after.stderr
    assert "not running" in after.stdout

    stop_again = _riverline(tmp_path, "stop", *flags)
    assert stop_again.returncode == 0, stop_again.stdout + stop_again.stderr
    assert "not running" in stop_again.stdout
    assert "Traceback" not in stop_again.stderr


def test_start_creates_the_state_dir(tmp_path: Path, state_dir: Path) -> None:
    assert not state_dir.exists()
    port = free_port()
    flags = ("--state-dir", str(state_dir), "--port", str(port))
    # Kafka's own collector on request (the default is test_start_status_stop_lifecycle's).
    started = _riverline(tmp_path, "start", *flags, "--gc", "g1", timeout=START_TIMEOUT)
    assert "Traceback" not in started.stderr, started.stderr
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"bootstrap 127.0.0.1:{port}" in started.stdout
    cmd = _cmdline(int((state_dir / "broker.pid").read_text().split()[0]))
    assert "-XX:+UseG1GC" in cmd and "-XX:NewRatio=1" in cmd
    assert "-XX:+UseZGC" not in cmd
    stopped = _riverline(tmp_path, "stop", *flags)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert _wait_gone(state_dir) == []


def test_start_on_a_taken_port_fails_cleanly(tmp_path: Path, state_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = _riverline(tmp_path, "start", "--state-dir", str(state_dir), "--port", str(port))
    assert result.returncode == 1, result.stdout + result.stderr
    assert str(port) in result.stderr
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert _wait_gone(state_dir, marker="java", timeout=2.0) == []
    assert not (state_dir / "broker.pid").exists()


def test_start_without_java_explains_what_to_install(tmp_path: Path, state_dir: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    result = _riverline(
        tmp_path,
        "start",
        "--state-dir",
        str(state_dir),
        "--port",
        str(free_port()),
        env=_env(PATH=str(empty_bin)),
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "Java" in err
    assert "Maven" in err
    assert "KAFKA_BOOTSTRAP_SERVERS" in err
    assert "Docker" in err
    assert _broker_pids(state_dir, marker="java") == []
