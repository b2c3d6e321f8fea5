"""Settings: flag > environment > default, librdkafka properties, secrets, validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.config import OPTIONS, Settings, settings_from_mapping
from worker.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
KEY = "unit-test-snapshot-key-0123456789abcdef"
BASE_ENV = {"RIVERLINE_SNAPSHOT_KEY": KEY}


def _settings(env: dict[str, str] | None = None, **flags: Any) -> Settings:
    values = {"bootstrap_servers": "127.0.0.1:9092", **flags}
    return settings_from_mapping(values, env={**BASE_ENV, **(env or {})})


def test_flag_beats_env_beats_default() -> None:
    s = _settings(
        env={"RIVERLINE_WINDOW": "9", "RIVERLINE_BATCH_SIZE": "33", "RIVERLINE_MODEL": "fm"},
        window="7",
    )
    assert s.window == 7  # flag over env
    assert s.batch_size == 33  # env over default
    assert s.model == "fm"
    assert s.commit_interval == 5.0  # default
    assert s.input_topic == "clicks"
    assert isinstance(s.window, int) and isinstance(s.exit_when_idle, float)


def test_every_option_reads_its_environment_variable() -> None:
    for opt in OPTIONS:
        assert opt.env == "RIVERLINE_" + opt.name.upper()
        assert opt.flag == "--" + opt.name.replace("_", "-")


def test_bootstrap_servers_fall_back_to_kafka_bootstrap_servers() -> None:
    env = {**BASE_ENV, "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}
    assert settings_from_mapping({}, env=env).bootstrap_servers == "kafka:9092"
    env["RIVERLINE_BOOTSTRAP_SERVERS"] = "riverline:9092"
    assert settings_from_mapping({}, env=env).bootstrap_servers == "riverline:9092"


def test_kafka_properties_from_the_environment() -> None:
    s = _settings(
        env={
            "RIVERLINE_KAFKA_SASL_MECHANISM": "PLAIN",
            "RIVERLINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "RIVERLINE_KAFKA_SASL_PASSWORD": "hunter2",
        }
    )
    assert s.kafka["sasl.mechanism"] == "PLAIN"
    assert s.kafka["security.protocol"] == "SASL_SSL"
    assert s.kafka["sasl.password"] == "hunter2"
    assert "config" not in _settings(env={"RIVERLINE_KAFKA_CONFIG": ""}).kafka


def test_the_consumer_fetches_in_batches_unless_told_otherwise() -> None:
    """The fetch defaults are librdkafka properties it accepts, and the user's own
    values (RIVERLINE_KAFKA_*) win over them."""
    from confluent_kafka import Consumer

    from worker.kafka import FETCH_MIN_BYTES, FETCH_WAIT_MAX_MS, consumer_config

    conf = consumer_config(_settings())
    assert (conf["fetch.min.bytes"], conf["fetch.wait.max.ms"]) == (16384, 5)
    assert (FETCH_MIN_BYTES, FETCH_WAIT_MAX_MS) == (16384, 5)
    Consumer(conf).close()  # an unknown property or a bad value raises here
    env = {"RIVERLINE_KAFKA_FETCH_MIN_BYTES": "1", "RIVERLINE_KAFKA_FETCH_WAIT_MAX_MS": "500"}
    mine = consumer_config(_settings(env=env))
    assert (mine["fetch.min.bytes"], mine["fetch.wait.max.ms"]) == ("1", "500")
    Consumer(mine).close()


def test_kafka_config_file(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text(
        "# comment\n"
        "! also a comment\n"
        "\n"
        "security.protocol=SASL_SSL\n"
        "  sasl.mechanism = SCRAM-SHA-512  \n"
        "sasl.username=svc\n"
        "sasl.password=pa=ss#word\n"
    )
    s = _settings(kafka_config=str(path))
    assert dict(s.kafka) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "pa=ss#word",
    }


def test_kafka_config_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("security.protocol=SSL\n# fine\nthis line has no equals sign\n")
    with pytest.raises(ConfigError) as info:
        _settings(kafka_config=str(path))
    assert f"{path}:3" in str(info.value)


def test_kafka_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.properties"
    with pytest.raises(ConfigError) as info:
        _settings(kafka_config=str(path))
    assert "--kafka-config" in str(info.value) and str(path) in str(info.value)


def test_masked_hides_secrets() -> None:
    s = _settings(
        env={
            "RIVERLINE_KAFKA_SASL_PASSWORD": "hunter2",
            "RIVERLINE_KAFKA_SSL_KEY_PASSWORD": "k3y",
            "RIVERLINE_KAFKA_SASL_MECHANISM": "PLAIN",
        }
    )
    masked = s.masked()
    assert masked["kafka"]["sasl.password"] == "***"
    assert masked["kafka"]["ssl.key.password"] == "***"
    assert masked["kafka"]["sasl.mechanism"] == "PLAIN"
    assert masked["bootstrap_servers"] == "127.0.0.1:9092"
    text = repr(masked)
    assert "hunter2" not in text and "k3y" not in text and KEY not in text


def test_repr_of_settings_hides_secrets() -> None:
    """Settings end up in logs and tracebacks; the snapshot key is repr=False, and the
    librdkafka passwords must not leak either."""
    s = _settings(env={"RIVERLINE_KAFKA_SASL_PASSWORD": "hunter2"})
    assert KEY not in repr(s)
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(
    ("flags", "env", "needle"),
    [
        ({"bootstrap_servers": None}, {}, "--bootstrap-servers"),
        ({"output_topic": "clicks"}, {}, "--input-topic"),
        ({"dead_letter_topic": "clicks"}, {}, "--input-topic"),
        ({"input_topic": "has space"}, {}, "--input-topic"),
        ({"group_id": ""}, {"RIVERLINE_GROUP_ID": ""}, "--group-id"),
        ({"window": "0"}, {}, "--window"),
        ({"window": "-3"}, {}, "--window"),
        ({"window": "many"}, {}, "--window"),
        ({}, {"RIVERLINE_WINDOW": "many"}, "RIVERLINE_WINDOW"),
        ({"batch_size": "0"}, {}, "--batch-size"),
        ({"busy_poll_ms": "-1"}, {}, "--busy-poll-ms"),
        ({"busy_poll_ms": "3000"}, {}, "--busy-poll-ms"),
        ({"busy_poll_ms": "nan"}, {}, "--busy-poll-ms"),
        ({}, {"RIVERLINE_BUSY_POLL_MS": "fast"}, "RIVERLINE_BUSY_POLL_MS"),
        ({"max_event_bytes": "10"}, {}, "--max-event-bytes"),
        ({"exit_when_idle": "-1"}, {}, "--exit-when-idle"),
        ({"commit_interval": "0"}, {}, "--commit-interval"),
        ({"metrics_address": "localhost"}, {}, "--metrics-address"),
        ({"metrics_address": "0.0.0.0:http"}, {}, "--metrics-address"),
        ({"metrics_address": "0.0.0.0:70000"}, {}, "--metrics-address"),
        ({"guarantee": "at-most-once"}, {}, "--guarantee"),
        ({"auto_offset_reset": "middle"}, {}, "--auto-offset-reset"),
        ({}, {"RIVERLINE_KAFKA_GROUP_ID": "other"}, "group.id"),
        ({}, {"RIVERLINE_KAFKA_BOOTSTRAP_SERVERS": "x:1"}, "bootstrap.servers"),
        ({}, {"RIVERLINE_KAFKA_ENABLE_AUTO_COMMIT": "true"}, "enable.auto.commit"),
    ],
)
def test_validation_errors_name_the_flag(
    flags: dict[str, Any], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(env=env, **flags)
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_forbidden_kafka_key_in_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "client.properties"
    path.write_text("group.id=sneaky\n")
    with pytest.raises(ConfigError) as info:
        _settings(kafka_config=str(path))
    assert "group.id" in str(info.value)


def test_metrics_address() -> None:
    assert _settings(metrics_address="off").metrics_host_port is None
    assert _settings(metrics_address="127.0.0.1:9500").metrics_host_port == ("127.0.0.1", 9500)
    assert _settings(metrics_address=":9500").metrics_host_port == ("0.0.0.0", 9500)


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RIVERLINE_", "KAFKA_"))}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    base.update(BASE_ENV)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", *args],
        cwd=REPO,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--window", "0"], {}, "--window"),
        (["--window", "lots"], {}, "--window"),
        (["--metrics-address", "nowhere"], {}, "--metrics-address"),
        ([], {"RIVERLINE_BATCH_SIZE": "0"}, "--batch-size"),
        (["--busy-poll-ms", "3000"], {}, "--busy-poll-ms"),
        (["--model", "no_such_module:factory"], {}, "--model"),
    ],
)
def test_bad_flag_exits_2_with_one_line(args: list[str], env: dict[str, str], needle: str) -> None:
    proc = _run("--bootstrap-servers", "127.0.0.1:1", *args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("riverline: error: "), lines[0]
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
