"""The worker's settings: one frozen object from flags and ``RIVERLINE_*`` variables.

Every option is declared once in :data:`OPTIONS` (flag, environment variable, default,
help); the CLI, the validation and the README's configuration table come from it.
A flag beats its environment variable, which beats the default.

>>> s = settings_from_mapping(
...     {"bootstrap_servers": "127.0.0.1:9092", "insecure_snapshots": "true"}, env={})
>>> s.input_topic, s.model, s.guarantee
('clicks', 'logreg', 'at-least-once')
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.learner import LearnerOptions

SECRET_WORDS = ("password", "secret", "key", "token", "credential")
# A fetch arrives every few ms at a steady rate (the broker answers at 16 KB or 5 ms):
# polling longer than that between batches only burns CPU, so a larger value is a typo.
MAX_BUSY_POLL_MS = 50.0


@dataclass(frozen=True)
class Option:
    name: str  # the Settings field
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RIVERLINE_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "bootstrap_servers",
        None,
        "Kafka bootstrap servers, host:port[,host:port]; falls back to KAFKA_BOOTSTRAP_SERVERS",
    ),
    Option("input_topic", "clicks", "topic of click events to learn from"),
    Option("output_topic", "predictions", "topic the predictions are published to"),
    Option("dead_letter_topic", "clicks.dlq", "topic for rejected events, with the reason"),
    Option("group_id", "riverline", "Kafka consumer group shared by all replicas"),
    Option("model", "logreg", "preset (logreg, fm) or MODULE:FACTORY returning a River model"),
    Option("seed", 0, "seed for the model presets (deterministic given a seed)", int),
    Option(
        "guarantee",
        "at-least-once",
        "delivery of predictions: at-least-once or exactly-once (Kafka transactions)",
        choices=("at-least-once", "exactly-once"),
    ),
    Option("metrics_address", "0.0.0.0:9400", "host:port serving /metrics and /health; off"),
    Option("window", 1000, "rolling-window size (labelled events) of the rolling scores", int),
    Option(
        "exit_when_idle",
        0.0,
        "stop cleanly after this many seconds without a new event, once every assigned "
        "partition is read to its end and the broker answers (0: never)",
        float,
    ),
    Option(
        "baseline_window",
        10_000,
        "labelled events the offline (batch) baseline trains on (0: no baseline)",
        int,
    ),
    Option(
        "baseline_retrain_every",
        "never",
        "retrain the baseline on the last --baseline-window labelled events every N "
        "labelled events, or never (trained once, classic offline learning)",
    ),
    Option(
        "baseline_deploy_delay",
        10_000,
        "labelled events between the end of a training window and the moment its model "
        "serves; the fit runs in the background meanwhile (0: fit at once, pausing)",
        int,
    ),
    Option(
        "drift_detector",
        "adwin",
        "concept-drift detector on the online model's loss: adwin, page-hinkley or off",
        choices=("adwin", "page-hinkley", "off"),
    ),
    Option(
        "drift_action",
        "none",
        "on a drift alarm: none, reset-online (fresh online model) or retrain-batch",
        choices=("none", "reset-online", "retrain-batch"),
    ),
    Option("drift_grace", 1000, "labelled events before drift alarms count (warm-up)", int),
    Option(
        "data_drift_block",
        5000,
        "events per data-drift block: PSI of the latest block vs the reference (0: off)",
        int,
    ),
    Option(
        "data_drift_features",
        "",
        "comma-separated features to watch for data drift (default: the event's 8 most "
        "frequent `features`; `user_id` and `item_id` only when named)",
    ),
    Option("max_event_bytes", 65536, "larger events are dead-lettered as oversized", int),
    Option(
        "batch_size",
        500,
        "messages taken per poll at most; their predictions go to the producer after the "
        "batch, or about every 2 ms of work in a longer one",
        int,
    ),
    Option(
        "busy_poll_ms",
        0.0,
        "after a batch, poll again without sleeping for up to this many ms before waiting "
        "for the next fetch: at a steady high rate the next batch starts on warm CPU "
        "caches, for lower latency, at the cost of the CPU spent polling (0: wait at once)",
        float,
    ),
    Option(
        "commit_interval",
        5.0,
        "seconds between checkpoints (snapshot + offset commit; in exactly-once mode also "
        "the transaction length, so the delay before predictions are visible)",
        float,
    ),
    Option("commit_events", 100_000, "also checkpoint after this many events (0: time only)", int),
    Option("state_topic", None, "compacted topic of model snapshots (default <group-id>.state)"),
    Option(
        "snapshot_key_file",
        None,
        "file holding the snapshot HMAC key (else RIVERLINE_SNAPSHOT_KEY)",
    ),
    Option(
        "insecure_snapshots",
        "false",
        "allow running without a snapshot key (local use only): true or false",
        choices=("true", "false"),
    ),
    Option(
        "on_invalid_snapshot",
        "fail",
        "a snapshot that fails verification: fail (refuse the partition) or fresh (start it anew)",
        choices=("fail", "fresh"),
    ),
    Option(
        "instance_id",
        None,
        "stable name of this replica (default: host name); exactly-once uses it in the "
        "transactional.id so a restarted replica fences its previous incarnation",
    ),
    Option(
        "auto_offset_reset",
        "earliest",
        "where a group with no committed offset starts: earliest or latest",
        choices=("earliest", "latest"),
    ),
    Option("kafka_config", None, "file of librdkafka properties (key=value), e.g. SASL/SSL"),
    Option(
        "report_file",
        None,
        "at exit, write a JSON summary (messages, seconds, rate, RSS, the loop's slowest "
        "iterations)",
    ),
    Option(
        "create_topics",
        "true",
        "create missing output and dead-letter topics at start: true or false",
        choices=("true", "false"),
    ),
    Option(
        "health_timeout", 60.0, "/health fails when the loop has not polled for this long", float
    ),
)


@dataclass(frozen=True)
class Settings:
    bootstrap_servers: str
    input_topic: str = "clicks"
    output_topic: str = "predictions"
    dead_letter_topic: str = "clicks.dlq"
    group_id: str = "riverline"
    model: str = "logreg"
    seed: int = 0
    guarantee: str = "at-least-once"
    metrics_address: str = "0.0.0.0:9400"
    window: int = 1000
    exit_when_idle: float = 0.0
    baseline_window: int = 10_000
    baseline_retrain_every: str = "never"
    baseline_deploy_delay: int = 10_000
    drift_detector: str = "adwin"
    drift_action: str = "none"
    drift_grace: int = 1000
    data_drift_block: int = 5000
    data_drift_features: str = ""
    max_event_bytes: int = 65536
    batch_size: int = 500
    busy_poll_ms: float = 0.0
    commit_interval: float = 5.0
    commit_events: int = 100_000
    state_topic: str | None = None
    snapshot_key_file: str | None = None
    insecure_snapshots: str = "false"
    on_invalid_snapshot: str = "fail"
    instance_id: str | None = None
    auto_offset_reset: str = "earliest"
    kafka_config: str | None = None
    report_file: str | None = None
    create_topics: str = "true"
    health_timeout: float = 60.0
    # librdkafka properties from --kafka-config and RIVERLINE_KAFKA_*.
    kafka: Mapping[str, str] = field(default_factory=dict, repr=False)
    # HMAC key of the snapshots, from RIVERLINE_SNAPSHOT_KEY or --snapshot-key-file.
    snapshot_key: bytes = field(default=b"", repr=False)

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets replaced by ``***``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["kafka"] = {k: ("***" if is_secret(k) else v) for k, v in self.kafka.items()}
        out["snapshot_key"] = "***"
        return out

    @property
    def fits_in_background(self) -> bool:
        """The batch baseline's fits run in the fit process (:mod:`worker.batchfit`)."""
        return bool(self.baseline_window and self.baseline_deploy_delay)

    def learner_options(self) -> LearnerOptions:
        from worker.learner import LearnerOptions

        every = self.baseline_retrain_every
        return LearnerOptions(
            baseline_window=self.baseline_window,
            baseline_retrain_every=None if every == "never" else int(every),
            baseline_deploy_delay=self.baseline_deploy_delay,
            drift_detector=None if self.drift_detector == "off" else self.drift_detector,
            drift_grace=self.drift_grace,
            drift_action=self.drift_action,
            data_drift_block=self.data_drift_block,
            data_drift_features=tuple(
                f.strip() for f in self.data_drift_features.split(",") if f.strip()
            ),
        )

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        if self.metrics_address == "off":
            return None
        host, _, port = self.metrics_address.rpartition(":")
        return host or "0.0.0.0", int(port)


def markdown_table() -> str:
    """The configuration table of the README (a test keeps the README equal to it)."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for o in OPTIONS:
        default = "—" if o.default in (None, "") else f"`{o.default}`"
        rows.append(f"| `{o.flag}` | `{o.env}` | {default} | {o.help} |")
    return "\n".join(rows) + "\n"


def is_secret(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in SECRET_WORDS)


def add_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add the options as flags; defaults are resolved later (flag > env > default)."""
    for opt in OPTIONS:
        if only is not None and opt.name not in only:
            continue
        shown = "unset" if opt.default is None else opt.default
        if opt.choices == ("true", "false"):
            # A switch: `--insecure-snapshots` alone means true.
            parser.add_argument(
                opt.flag,
                dest=opt.name,
                nargs="?",
                const="true",
                default=None,
                help=f"{opt.help} (env {opt.env}; default {shown})",
            )
            continue
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            help=f"{opt.help} (env {opt.env}; default {shown})",
        )


def read_properties(path: str) -> dict[str, str]:
    """A Java-style properties file: ``key=value`` lines, ``#`` comments."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--kafka-config {path}: cannot read it ({exc.strerror})") from exc
    props: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--kafka-config {path}:{n}: expected key=value, got {line!r}")
        props[key.strip()] = value.strip()
    return props


def kafka_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``RIVERLINE_KAFKA_SASL_MECHANISM=PLAIN`` → ``{"sasl.mechanism": "PLAIN"}``."""
    prefix = "RIVERLINE_KAFKA_"
    return {
        k[len(prefix) :].lower().replace("_", "."): v
        for k, v in env.items()
        if k.startswith(prefix) and k != "RIVERLINE_KAFKA_CONFIG"
    }


def _convert(opt: Option, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    if opt.choices and str(raw) not in opt.choices:
        raise ConfigError(f"{source}: {raw!r} is not one of {', '.join(opt.choices)}")
    try:
        return opt.type(raw) if isinstance(raw, str) else raw
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(opt.type, "valid")  # type: ignore[call-overload]
        raise ConfigError(f"{source}: expected {kind}, got {raw!r}") from None


def settings_from_mapping(
    values: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> Settings:
    """Resolve flag values (None when not given) against the environment and defaults."""
    env = os.environ if env is None else env
    resolved: dict[str, Any] = {}
    for opt in OPTIONS:
        if values.get(opt.name) is not None:
            resolved[opt.name] = _convert(opt, values[opt.name], opt.flag)
        elif opt.env in env:
            resolved[opt.name] = _convert(opt, env[opt.env], opt.env)
        else:
            resolved[opt.name] = opt.default
    if not resolved["state_topic"]:
        resolved["state_topic"] = f"{resolved['group_id']}.state"
    if not resolved["instance_id"]:
        resolved["instance_id"] = socket.gethostname()
    if not resolved["bootstrap_servers"]:
        resolved["bootstrap_servers"] = env.get("KAFKA_BOOTSTRAP_SERVERS")
    kafka: dict[str, str] = {}
    if resolved["kafka_config"]:
        kafka.update(read_properties(resolved["kafka_config"]))
    kafka.update(kafka_from_env(env))
    from worker.snapshots import load_key

    key = load_key(env, resolved["snapshot_key_file"], resolved["insecure_snapshots"] == "true")
    settings = Settings(kafka=kafka, snapshot_key=key, **resolved)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Refuse settings that cannot work, saying which flag to fix."""
    if not s.bootstrap_servers:
        raise ConfigError(
            "no Kafka cluster given: pass --bootstrap-servers host:port "
            "(or set RIVERLINE_BOOTSTRAP_SERVERS or KAFKA_BOOTSTRAP_SERVERS)"
        )
    for name in ("input_topic", "output_topic", "dead_letter_topic", "group_id", "state_topic"):
        value = getattr(s, name)
        if not value or any(c.isspace() for c in value):
            raise ConfigError(
                f"--{name.replace('_', '-')}: must be a non-empty name, got {value!r}"
            )
    if s.state_topic in (s.input_topic, s.output_topic, s.dead_letter_topic):
        raise ConfigError(
            f"--state-topic {s.state_topic!r} must be a topic of its own (it is compacted)"
        )
    if s.commit_events < 0:
        raise ConfigError(f"--commit-events must be >= 0, got {s.commit_events}")
    if s.input_topic in (s.output_topic, s.dead_letter_topic):
        raise ConfigError(
            "--input-topic must differ from --output-topic and --dead-letter-topic "
            f"(all three are {s.input_topic!r}?): the worker would read its own output"
        )
    if s.baseline_window != 0 and s.baseline_window < 2:
        raise ConfigError(
            f"--baseline-window must be 0 (off) or at least 2, got {s.baseline_window}"
        )
    every = s.baseline_retrain_every
    if every != "never" and not (every.isdigit() and int(every) >= 1):
        raise ConfigError(
            f"--baseline-retrain-every must be a positive number of labelled events or "
            f"'never', got {every!r}"
        )
    if s.baseline_deploy_delay < 0:
        raise ConfigError(
            f"--baseline-deploy-delay must be >= 0 labelled events, got {s.baseline_deploy_delay}"
        )
    if s.drift_action == "retrain-batch" and not s.baseline_window:
        raise ConfigError("--drift-action retrain-batch needs a baseline (--baseline-window > 0)")
    if s.drift_grace < 0:
        raise ConfigError(f"--drift-grace must be >= 0, got {s.drift_grace}")
    if s.data_drift_block != 0 and s.data_drift_block < 10:
        raise ConfigError(
            f"--data-drift-block must be 0 (off) or at least 10 events, got {s.data_drift_block}"
        )
    if s.window < 1:
        raise ConfigError(f"--window must be at least 1, got {s.window}")
    if not 1 <= s.batch_size <= 100_000:
        raise ConfigError(f"--batch-size must be between 1 and 100000, got {s.batch_size}")
    if not 0 <= s.busy_poll_ms <= MAX_BUSY_POLL_MS:
        raise ConfigError(
            f"--busy-poll-ms must be between 0 (off) and {MAX_BUSY_POLL_MS:g} ms, "
            f"got {s.busy_poll_ms:g}"
        )
    if s.max_event_bytes < 64:
        raise ConfigError(f"--max-event-bytes must be at least 64, got {s.max_event_bytes}")
    if s.exit_when_idle < 0:
        raise ConfigError(f"--exit-when-idle must be >= 0 seconds, got {s.exit_when_idle}")
    if s.commit_interval <= 0:
        raise ConfigError(f"--commit-interval must be > 0 seconds, got {s.commit_interval}")
    if s.health_timeout <= 0:
        raise ConfigError(f"--health-timeout must be > 0 seconds, got {s.health_timeout}")
    if s.metrics_address != "off":
        _host, sep, port = s.metrics_address.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(
                f"--metrics-address must be host:port (e.g. 0.0.0.0:9400) or off, "
                f"got {s.metrics_address!r}"
            )
    for key in (
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "transactional.id",
        "partition.assignment.strategy",
    ):
        if key in s.kafka:
            raise ConfigError(
                f"librdkafka property {key!r} is set by riverline itself; use the "
                "matching riverline flag instead of --kafka-config or RIVERLINE_KAFKA_*"
            )
