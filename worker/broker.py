"""A real single-node Apache Kafka broker (KRaft) without Docker.

The broker is the real thing: Apache Kafka's own jars, resolved by Maven from
``deploy/local/pom.xml`` and run as a plain JVM process. Everything it writes (jars,
data, logs, pid file) lives under one state directory, by default
``.riverline/broker`` in the working directory.

>>> b = LocalBroker(state_dir="/tmp/rl-doc", port=19092)
>>> b.bootstrap
'127.0.0.1:19092'
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from worker.errors import BrokerError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".riverline") / "broker"
DEFAULT_PORT = 9092
DEFAULT_START_TIMEOUT = 120.0
DEFAULT_HEAP = "1g"  # as Kafka's own kafka-server-start.sh


# The local broker's garbage collector. ZGC collects beside the broker, with pauses
# under 10 ms; G1 (Kafka's own choice) stops it for every young collection.
COLLECTORS = ("zgc", "g1")
DEFAULT_GC = "zgc"
# The JVM's logs, in the broker's logs directory: each collection, and each stop.
GC_LOG = "gc.log"
SAFEPOINT_LOG = "safepoints.log"


def jvm_options(
    heap: str = DEFAULT_HEAP,
    gc: str = DEFAULT_GC,
    logs_dir: str | os.PathLike[str] | None = None,
    java_major: int | None = None,
) -> list[str]:
    """The broker JVM's memory, collector and logging options.

    The broker shares a small machine with its clients here (the worker, the load
    generator), and every stop of the broker's JVM holds up both the clicks and the
    predictions. With ``gc="g1"`` (Kafka's own flags: a 20 ms pause goal) each young
    collection stops it for 15-93 ms on 2 busy cores (median ~30 ms; its safepoint log,
    about every 90 s at 21,500 clicks/s), and a click then waited up to 160 ms; G1's
    young generation is fixed at half the heap (``NewRatio``), because on those cores
    its pause goal had shrunk it to 23 MB after the benchmark's throughput rounds, and it
    collected every 3.5 s. With ``gc="zgc"`` (the default) the collector works beside
    the broker and stops it for under 10 ms (mostly under 1 ms, over 45 minutes of
    latency runs and a full benchmark run).

    With ``logs_dir`` the JVM logs each collection (``gc.log``) and each stop
    (``safepoints.log``, which the benchmark reads), rotated at 3 files of 10 MB.

    >>> jvm_options("2g")
    ['-Xms2g', '-Xmx2g', '-XX:+UseZGC']
    >>> jvm_options("1g", "g1")
    ['-Xms1g', '-Xmx1g', '-XX:+UseG1GC', '-XX:MaxGCPauseMillis=20', '-XX:NewRatio=1']
    >>> jvm_options("1g", java_major=21)[-1]  # generational ZGC (the default from Java 23)
    '-XX:+ZGenerational'
    >>> jvm_options("1g", logs_dir="/var/log/kafka")[-1]
    '-Xlog:safepoint:file="/var/log/kafka/safepoints.log":time:filecount=3,filesize=10m'
    >>> jvm_options("1g", "cms")
    Traceback (most recent call last):
      ...
    worker.errors.BrokerError: --gc must be one of zgc, g1; got 'cms'
    """
    _check_gc(gc)
    opts = [f"-Xms{heap}", f"-Xmx{heap}"]
    if gc == "g1":
        opts += ["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:NewRatio=1"]
    else:
        opts.append("-XX:+UseZGC")
        if java_major in (21, 22):
            opts.append("-XX:+ZGenerational")
    if logs_dir is not None:
        for tags, name in (("gc", GC_LOG), ("safepoint", SAFEPOINT_LOG)):
            path = Path(logs_dir) / name
            opts.append(f'-Xlog:{tags}:file="{path}":time:filecount=3,filesize=10m')
    return opts


def _check_gc(gc: str) -> None:
    if gc not in COLLECTORS:
        raise BrokerError(f"--gc must be one of {', '.join(COLLECTORS)}; got {gc!r}")


_NO_JAVA_HINT = (
    "To run the local broker riverline needs Java 17+ and Maven on PATH "
    "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless maven). "
    "Alternatively point riverline at an existing cluster with "
    "KAFKA_BOOTSTRAP_SERVERS=host:port, or run Kafka in Docker "
    "(deploy/docker-compose.yml; the tests use testcontainers when a Docker engine answers)."
)


def _find_pom() -> Path:
    """The pom that lists the broker's jars: $RIVERLINE_BROKER_POM or the repository's."""
    env = os.environ.get("RIVERLINE_BROKER_POM")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "deploy" / "local" / "pom.xml")
    for path in candidates:
        if path.is_file():
            return path
    raise BrokerError(
        "cannot find deploy/local/pom.xml (the list of Kafka jars); "
        "run from a riverline checkout or set RIVERLINE_BROKER_POM to its path"
    )


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (exited, not yet reaped) is not a running broker.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    state_dir: Path

    def describe(self) -> str:
        if self.running:
            return f"running: pid {self.pid}, bootstrap {self.bootstrap}, state {self.state_dir}"
        return f"not running (state {self.state_dir})"


class LocalBroker:
    """Start, stop and inspect one local Kafka broker in KRaft combined mode."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        port: int = DEFAULT_PORT,
        heap: str = DEFAULT_HEAP,
        libs_dir: str | os.PathLike[str] | None = None,
        gc: str = DEFAULT_GC,
    ) -> None:
        if not 0 < port < 65536:
            raise BrokerError(f"--port must be between 1 and 65535, got {port}")
        _check_gc(gc)
        self.gc = gc
        self.state_dir = Path(state_dir).absolute()
        self.port = port
        self.heap = heap
        # Jars can be shared between state directories (tests start several brokers).
        env_libs = os.environ.get("RIVERLINE_BROKER_LIBS")
        chosen = libs_dir or env_libs
        self.libs_dir = Path(chosen).absolute() if chosen else self.state_dir / "libs"

    # -- paths ---------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "logs" / "broker.out"

    @property
    def safepoint_log(self) -> Path:
        """The JVM's log of its stops (collections among them): see :func:`jvm_options`."""
        return self.log_file.parent / SAFEPOINT_LOG

    # -- public API ----------------------------------------------------------
    def status(self) -> BrokerStatus:
        pid = self._running_pid()
        port = self._recorded_port() if pid else self.port
        return BrokerStatus(pid is not None, pid, f"127.0.0.1:{port}", self.state_dir)

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> str:
        """Start the broker (or find it running) and return its bootstrap address."""
        pid = self._running_pid()
        if pid is not None:
            recorded = self._recorded_port()
            if recorded != self.port:
                raise BrokerError(
                    f"the broker in {self.state_dir} already runs on port {recorded} "
                    f"(pid {pid}); stop it first or use --port {recorded}"
                )
            self._wait_ready(pid, timeout)
            return self.bootstrap
        if port_in_use(self.port):
            raise BrokerError(
                f"port {self.port} is already in use by another process; choose another "
                f"with --port, or use that cluster with KAFKA_BOOTSTRAP_SERVERS={self.bootstrap}"
            )
        java, java_major = self._require_tools()
        self._resolve_jars()
        self.state_dir.mkdir(parents=True, exist_ok=True)  # libs may live elsewhere
        controller_port = self._controller_port()
        props = self._write_config(controller_port)
        self._format_storage(java, props)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            java,
            *jvm_options(self.heap, self.gc, self.log_file.parent, java_major),
            "-Xshare:auto",
            f"-Dlog4j2.configurationFile={self._write_log4j()}",
            f"-Dkafka.logs.dir={self.log_file.parent}",
            f"-Driverline.state.dir={self.state_dir}",
            "-cp",
            str(self.libs_dir / "*"),
            "kafka.Kafka",
            str(props),
        ]
        started = time.monotonic()
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal must not kill it
                cwd=self.state_dir,
            )
        self.pid_file.write_text(f"{proc.pid}\n{self.port}\n")
        try:
            self._wait_ready(proc.pid, timeout)
        except BrokerError:
            self.stop()
            raise
        log.info("broker ready in %.1fs at %s", time.monotonic() - started, self.bootstrap)
        return self.bootstrap

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the broker started from this state directory; True if one was running."""
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # Kafka's controlled shutdown
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            self._reap(pid)
            time.sleep(0.1)
        if _pid_alive(pid):
            log.warning("broker pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                self._reap(pid)
                time.sleep(0.05)
        self._reap(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    # -- internals -----------------------------------------------------------
    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    def _recorded_port(self) -> int:
        try:
            return int(self.pid_file.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return self.port

    def _running_pid(self) -> int | None:
        """The pid in the pid file, if that process is alive and is our broker."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        # Guard against pid reuse: the process must be the JVM we started for this dir.
        cmd = _cmdline(pid)
        if "kafka.Kafka" not in cmd or str(self.state_dir) not in cmd:
            return None
        return pid

    def _require_tools(self) -> tuple[str, int | None]:
        """Java (its path and major version) and Maven, or a message saying what to install."""
        java = shutil.which("java")
        if java is None:
            raise BrokerError(f"Java was not found on PATH. {_NO_JAVA_HINT}")
        if shutil.which("mvn") is None and not self._jars_current():
            raise BrokerError(f"Maven (mvn) was not found on PATH. {_NO_JAVA_HINT}")
        out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
        version = _java_major(out)
        if version is not None and version < 17:
            raise BrokerError(
                f"Kafka 4 needs Java 17 or newer; found Java {version}. {_NO_JAVA_HINT}"
            )
        return java, version

    def _pom_digest(self) -> str:
        return hashlib.sha256(_find_pom().read_bytes()).hexdigest()

    def _jars_current(self) -> bool:
        stamp = self.libs_dir / ".pom.sha256"
        try:
            return stamp.read_text().strip() == self._pom_digest()
        except (OSError, BrokerError):
            return False

    def _resolve_jars(self) -> None:
        if self._jars_current():
            return
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.libs_dir.parent / f".{self.libs_dir.name}.lock"
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two brokers sharing one libs dir resolve once
            if not self._jars_current():
                self._run_maven()

    def _run_maven(self) -> None:
        pom = _find_pom()
        log.info("resolving Kafka jars with Maven (first run only) into %s", self.libs_dir)
        if self.libs_dir.exists():
            shutil.rmtree(self.libs_dir)
        self.libs_dir.mkdir(parents=True)
        proc = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={self.libs_dir}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise BrokerError(f"Maven could not resolve the Kafka jars from {pom}:\n{tail}")
        (self.libs_dir / ".pom.sha256").write_text(self._pom_digest())

    def _controller_port(self) -> int:
        """Keep the controller port stable across restarts while it stays free."""
        path = self.state_dir / "controller.port"
        with contextlib.suppress(OSError, ValueError):
            port = int(path.read_text())
            if port != self.port and not port_in_use(port):
                return port
        port = free_port()
        while port == self.port:
            port = free_port()
        path.write_text(str(port))
        return port

    def _write_config(self, controller_port: int) -> Path:
        data = self.state_dir / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            # One node: the defaults (RF 3, min ISR 2) would leave groups and
            # transactions without a coordinator.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            # The state topic carries snapshots of several MB.
            "message.max.bytes": str(64 * 1024 * 1024),
            "replica.fetch.max.bytes": str(64 * 1024 * 1024),
            "log.retention.hours": "24",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        path = self.state_dir / "server.properties"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _write_log4j(self) -> Path:
        path = self.state_dir / "log4j2.properties"
        path.write_text(
            "status = warn\n"
            "appender.console.type = Console\n"
            "appender.console.name = STDOUT\n"
            "appender.console.layout.type = PatternLayout\n"
            "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\n"
            "rootLogger.appenderRef.stdout.ref = STDOUT\n"
            "logger.raft.name = kafka.server.KafkaRaftServer\n"
            "logger.raft.level = INFO\n"
        )
        return path

    def _format_storage(self, java: str, props: Path) -> None:
        if (self.state_dir / "data" / "meta.properties").exists():
            return
        cluster_id = _new_cluster_id()
        proc = subprocess.run(
            [
                java,
                "-Xmx256m",
                f"-Dlog4j2.configurationFile={self._write_log4j()}",
                "-cp",
                str(self.libs_dir / "*"),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(props),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting the broker's storage failed:\n{proc.stdout}{proc.stderr}"
            )

    def _wait_ready(self, pid: int, timeout: float) -> None:
        """Poll cluster metadata until the broker answers, the process dies, or time is up."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout
        while True:
            if not _pid_alive(pid):
                self._reap(pid)
                raise BrokerError(
                    f"the broker process exited during start-up; see {self.log_file}:\n"
                    + self._log_tail()
                )
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception:  # noqa: BLE001 - any client error means "not ready yet"
                pass
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"the broker did not answer a metadata request within {timeout:.0f}s; "
                    f"see {self.log_file}:\n" + self._log_tail()
                )
            time.sleep(0.25)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log written)"


def _new_cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding; Kafka refuses a leading '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java_major(version_output: str) -> int | None:
    """The major version from ``java -version`` output.

    >>> _java_major('openjdk version "17.0.15" 2025-04-15')
    17
    >>> _java_major('java version "1.8.0_392"')
    8
    """
    for token in version_output.split('"')[1::2]:
        parts = token.split(".")
        try:
            major = int(parts[0])
        except ValueError:
            continue
        return int(parts[1]) if major == 1 and len(parts) > 1 else major
    return None
