"""The shipped Prometheus rules and Grafana dashboard against a real Prometheus and worker.

A real Prometheus (Debian's ``prometheus`` package, which ``make test`` installs together
with promtool) loads deploy/prometheus/prometheus.yml, reduced to this worker and to 1 s
intervals, and the alert rules of deploy/prometheus/rules/. It scrapes a real
``riverline run`` that learns from a simulated abrupt drift on the real broker. Then:

- every rule loads and evaluates without error;
- every dashboard query, variable query and annotation query (Grafana variables
  substituted) and every alert expression returns series through the HTTP API, so no
  metric name, label or vector matching is wrong. An alert condition (``x > 0.6``) is
  run with ``bool`` comparisons (``x > bool 0.6``): it must return its series whether or
  not it holds now;
- the concept-drift alert reaches ``firing``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.broker import free_port

pytestmark = pytest.mark.integration

TopicFactory = Callable[..., str]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "riverline-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "riverline.json"

SNAPSHOT_KEY = "riverline-deploy-test-snapshot-key-0123"
# The drift scenario. The simulator and the models are deterministic given the seed, so
# the detector's alarms come at the same events in every run: with these settings both
# partitions alarm some 700-1,900 events after the drift (100 users learn fast, so the
# change of their favourite categories is a clear rise of the loss).
EVENTS, DRIFT_AT, RATE, SEED, USERS = 16_000, 8_000, 1_000, 1, 100
DEADLINE = 60.0  # seconds: the bound on every wait
# Grafana's built-in variables, as Grafana would render them for a 1 s scrape interval.
BUILTINS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "5m"}


# -- processes -----------------------------------------------------------------------------
def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = (
            "the prometheus server is not installed (Debian's prometheus package; "
            "`make promtool` installs it)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message} and CI is set")
        pytest.skip(message)
    return path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe(self) -> str:
        return f"{self.name} (exit {self.popen.poll()}), log tail:\n{_tail(self.log)}"

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def _start(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    out = log.open("wb")
    popen = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env
    )
    out.close()
    return Proc(name, popen, log)


def _wait(condition: Callable[[], bool], what: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                pytest.fail(f"waiting for {what}: {proc.describe()}")
        if condition():
            return
        time.sleep(0.25)
    logs = "\n".join(proc.describe() for proc in procs)
    pytest.fail(f"no {what} within {DEADLINE:.0f}s\n{logs}")


# -- HTTP ----------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class PrometheusAPI:
    def __init__(self, address: str) -> None:
        self.base = f"http://{address}"

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = _get(f"{self.base}/api/v1/{path}{query}")
        if status == 0:
            raise ConnectionError(f"Prometheus at {self.base} does not answer")
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise AssertionError(f"{path} {params}: {reply.get('error', reply)}")
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def targets_up(self) -> bool:
        try:
            active = self.api("targets", state="active")["activeTargets"]
        except ConnectionError:
            return False
        return bool(active) and all(t["health"] == "up" for t in active)


# -- queries -------------------------------------------------------------------------------
def with_bool(expr: str) -> str:
    """Turn every comparison outside label matchers and strings into a ``bool`` one.

    >>> with_bool('a{x=~"1|2", y!="3"} > 0.6 and on (x) b == 0')
    'a{x=~"1|2", y!="3"} > bool 0.6 and on (x) b == bool 0'
    """
    out: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c == "{":
            depth += 1
            out.append(c)
        elif c == "}":
            depth -= 1
            out.append(c)
        elif depth == 0 and expr[i : i + 2] in ("==", "!=", ">=", "<="):
            out.append(expr[i : i + 2] + " bool")
            i += 1
        elif depth == 0 and c in "<>":
            out.append(c + " bool")
        else:
            out.append(c)
        i += 1
    return "".join(out)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable interpolation: ``$name``, ``${name}`` and the built-ins."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(rf"\${name}\b", lambda _m, v=value: v, expr)
    assert "$" not in expr, f"a variable is left in {expr!r}"
    return expr


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) of every panel target and annotation query of the dashboard."""
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            yield f"panel {panel['title']!r} {t['refId']}", t["expr"]
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            yield f"annotation {ann['name']!r}", ann["expr"]


def label_values(definition: str) -> tuple[str, str]:
    """``label_values(metric{...}, label)`` → (``metric{...}``, ``label``)."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    assert m, f"not a label_values() query: {definition!r}"
    return m.group(1), m.group(2)


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def stack(
    kafka_bootstrap: str, new_topic: TopicFactory, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """A worker on a 2-partition topic, scraped by Prometheus with the shipped rules."""
    prometheus_bin = _prometheus_binary()
    clicks = new_topic("clicks", partitions=2)
    worker_address = f"127.0.0.1:{free_port()}"
    prom_address = f"127.0.0.1:{free_port()}"

    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "riverline"]
    job["static_configs"] = [{"targets": [worker_address]}]
    config["scrape_configs"] = [job]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))

    env = {**os.environ, "RIVERLINE_SNAPSHOT_KEY": SNAPSHOT_KEY}
    procs: list[Proc] = []
    try:
        prometheus = _start(
            "prometheus",
            [
                prometheus_bin,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={prom_address}",
                "--log.level=warn",
            ],
            tmp_path / "prometheus.log",
        )
        procs.append(prometheus)
        worker_args = [
            sys.executable,
            "-m",
            "worker",
            "run",
            f"--bootstrap-servers={kafka_bootstrap}",
            f"--input-topic={clicks}",
            f"--output-topic={clicks}.predictions",
            f"--dead-letter-topic={clicks}.dlq",
            f"--group-id=g-{clicks}",
            f"--metrics-address={worker_address}",
            "--exit-when-idle=120",  # a safety net: the test stops it
            "--drift-grace=500",
            "--baseline-window=1000",
            "--baseline-deploy-delay=200",
            "--data-drift-block=1000",
            "--window=500",
            "--commit-interval=1",
        ]
        runs = 0

        def start_worker() -> Proc:
            nonlocal runs
            runs += 1
            worker = _start("worker", worker_args, tmp_path / f"worker-{runs}.log", env)
            procs.append(worker)
            _wait(lambda: _get(f"http://{worker_address}/ready")[0] == 200, "worker /ready", procs)
            return worker

        api = PrometheusAPI(prom_address)
        start_worker()
        _wait(api.targets_up, "worker target up in Prometheus", procs)
        yield {
            "api": api,
            "procs": procs,
            "topic": clicks,
            "bootstrap": kafka_bootstrap,
            "worker_address": worker_address,
            "env": env,
            "tmp": tmp_path,
            "start_worker": start_worker,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


# -- the test ------------------------------------------------------------------------------
def test_dashboard_queries_and_alerts_work_against_a_real_prometheus(
    stack: dict[str, Any],
) -> None:
    api: PrometheusAPI = stack["api"]
    procs: list[Proc] = stack["procs"]
    topic: str = stack["topic"]
    started = time.monotonic()
    simulator = _start(
        "simulator",
        [
            sys.executable,
            "-m",
            "worker",
            "simulate",
            f"--bootstrap-servers={stack['bootstrap']}",
            f"--topic={topic}",
            "--partitions=2",
            f"--count={EVENTS}",
            "--scenario=abrupt",
            f"--drift-at={DRIFT_AT}",
            f"--rate={RATE}",
            f"--seed={SEED}",
            f"--users={USERS}",
            "--bad-rate=0.01",
        ],
        stack["tmp"] / "simulator.log",
        stack["env"],
    )
    procs.append(simulator)
    try:
        simulator.popen.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the simulator did not finish within {DEADLINE:.0f}s")
    assert simulator.popen.returncode == 0, simulator.describe()
    procs.remove(simulator)

    def consumed_all() -> bool:
        result = api.query(f'sum(riverline_events_consumed_total{{topic="{topic}"}})')
        return bool(result) and float(result[0]["value"][1]) == EVENTS

    _wait(consumed_all, f"all {EVENTS} events consumed (seen by Prometheus)", procs)

    def drift_alert_firing() -> bool:
        alerts = api.api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "RiverlineConceptDrift"
            and a["state"] == "firing"
            and a["labels"]["topic"] == topic
            for a in alerts
        )

    _wait(drift_alert_firing, "RiverlineConceptDrift firing", procs)
    firing = [
        a["labels"]
        for a in api.api("alerts")["alerts"]
        if a["labels"]["alertname"] == "RiverlineConceptDrift"
    ]
    assert {labels["partition"] for labels in firing} <= {"0", "1"}
    assert all(labels["job"] == "riverline" for labels in firing)
    alarms = api.query(f'riverline_drift_alarms_total{{topic="{topic}"}} > 0')
    assert alarms, "the alert fired but no partition counted an alarm"

    # A restart (SIGTERM: checkpoint, leave the group) and the restore of both partitions'
    # snapshots: the restore metrics exist only after one.
    (worker,) = [p for p in procs if p.name == "worker"]
    worker.stop()
    assert worker.popen.returncode == 0, worker.describe()
    procs.remove(worker)
    stack["start_worker"]()
    restored = f'riverline_restore_duration_seconds{{topic="{topic}"}}'
    lag = f'riverline_consumer_lag_messages{{topic="{topic}"}}'
    _wait(
        lambda: len(api.query(restored)) == 2 and len(api.query(lag)) == 2,
        "both partitions restored and their lag known, in Prometheus",
        procs,
    )
    # The dashboard's rates over 10 s need two samples of the new worker in that window
    # (a restart slower than 10 s leaves none of the old one's).
    fresh = f'count_over_time(riverline_events_consumed_total{{topic="{topic}"}}[10s]) >= 2'
    _wait(lambda: len(api.query(fresh)) == 2, "two scrapes of both partitions", procs)

    # Every rule loaded and evaluates without error.
    groups = api.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load(RULES.read_text())
    names = [r["alert"] for g in shipped["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(names)
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, f"rules failing to evaluate: {broken}"

    failures: list[str] = []

    def check(where: str, expr: str) -> list[dict[str, Any]]:
        try:
            result = api.query(expr)
        except AssertionError as exc:
            failures.append(f"{where}: {exc}")
            return []
        if not result:
            failures.append(f"{where}: no series for {expr}")
        return result

    # Every alert expression, with its comparisons made `bool`.
    for rule in (r for g in shipped["groups"] for r in g["rules"]):
        api.query(rule["expr"])  # as written: parses and evaluates
        check(f"alert {rule['alert']}", with_bool(rule["expr"]))

    # The dashboard's variables, then every query with the variables set as Grafana would.
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {
        "job": "riverline",
        "instance": stack["worker_address"],
        "partition": "0|1",
    }
    expected = {
        "job": {"riverline"},
        "instance": {stack["worker_address"]},
        "partition": {"0", "1"},
    }
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        selector, label = label_values(var["definition"])
        result = check(
            f"variable {var['name']}", f"count by ({label}) ({substitute(selector, variables)})"
        )
        values = {r["metric"].get(label) for r in result}
        if result and not expected[var["name"]] <= values:
            failures.append(f"variable {var['name']}: {values} lacks {expected[var['name']]}")
    queries = list(dashboard_queries(dashboard))
    assert len(queries) > 30
    for where, expr in queries:
        check(where, with_bool(substitute(expr, variables)))

    assert not failures, "\n".join(failures)
    elapsed = time.monotonic() - started
    print(f"{len(queries)} dashboard queries and {len(names)} alerts checked in {elapsed:.1f}s")
