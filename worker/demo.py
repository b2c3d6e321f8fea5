"""``riverline demo``: broker, simulated clicks with an abrupt drift, a worker, live progress.

Uses ``KAFKA_BOOTSTRAP_SERVERS`` when set, otherwise starts the local broker. Runs the
simulator and the worker side by side in this process, prints progress every second and
ends with a summary table per partition.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TextIO

from worker.broker import DEFAULT_PORT, LocalBroker, free_port, port_in_use
from worker.config import settings_from_mapping
from worker.feed import ensure_topic, publish
from worker.simulate import SimulationConfig, generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    events: int = 40_000
    rate: float = 4000.0
    partitions: int = 2
    bad_rate: float = 0.002
    model: str = "logreg"
    seed: int = 7
    metrics_port: int = 0  # 0: 9400 if free, else any free port
    broker_dir: str = ".riverline/broker"


def _bootstrap(opts: DemoOptions, out: TextIO) -> str:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        print(f"using the Kafka cluster at {env} (KAFKA_BOOTSTRAP_SERVERS)", file=out)
        return env
    broker = LocalBroker(state_dir=opts.broker_dir, port=DEFAULT_PORT)
    if not broker.status().running and port_in_use(DEFAULT_PORT):
        broker = LocalBroker(state_dir=opts.broker_dir, port=free_port())
    started = time.monotonic()
    address = broker.start()
    print(
        f"local Kafka broker at {address} (ready in {time.monotonic() - started:.1f}s; "
        f"stop it with `riverline broker stop`)",
        file=out,
    )
    return address


def _fmt(value: float) -> str:
    return "   -  " if math.isnan(value) else f"{value:6.3f}"


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    # River is imported here, not with the module: `riverline run` builds this command's
    # parser too, and must not wait for it (see worker.cli._cmd_run).
    from worker.loop import Worker
    from worker.metrics import MetricsServer

    # The live view replaces the per-event warnings (dead letters are counted on screen).
    logging.getLogger("worker").setLevel(logging.ERROR)
    bootstrap = _bootstrap(opts, out)
    run_id = uuid.uuid4().hex[:6]
    clicks, preds, dlq = f"demo-clicks-{run_id}", f"demo-predictions-{run_id}", f"demo-dlq-{run_id}"
    ensure_topic(bootstrap, clicks, opts.partitions)
    drift_at = opts.events // 2
    sim = SimulationConfig(
        n_events=opts.events, seed=opts.seed, scenario="abrupt", drift_at=drift_at
    )
    port = opts.metrics_port or (9400 if not port_in_use(9400) else free_port())
    # The demo signs its snapshots with a key of its own (a real deployment sets
    # RIVERLINE_SNAPSHOT_KEY from a secret).
    env = {**os.environ}
    env.setdefault("RIVERLINE_SNAPSHOT_KEY", secrets.token_hex(32))
    settings = settings_from_mapping(
        {
            "bootstrap_servers": bootstrap,
            "input_topic": clicks,
            "output_topic": preds,
            "dead_letter_topic": dlq,
            "group_id": f"demo-{run_id}",
            "model": opts.model,
            "metrics_address": f"127.0.0.1:{port}",
            "exit_when_idle": 4.0,
            "commit_interval": 2.0,
            # A short demo stream: the batch model trains on the first fifth of each
            # partition's events and serves from 30% in, well before the drift (50%).
            "baseline_window": max(100, opts.events // opts.partitions // 5),
            "baseline_deploy_delay": max(10, opts.events // opts.partitions // 10),
        },
        env=env,
    )
    worker = Worker(settings)
    server = MetricsServer("127.0.0.1", port, worker.stats).start()
    print(
        f"topics {clicks} -> {preds} (dead letters: {dlq}); {opts.events:,} events at "
        f"{opts.rate:,.0f}/s, abrupt drift at event {drift_at:,}; metrics on "
        f"http://{server.address}/metrics",
        file=out,
    )
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            publish(
                bootstrap,
                clicks,
                generate(sim),
                rate=opts.rate,
                bad_rate=opts.bad_rate,
                seed=opts.seed,
                progress=None,
                stop=worker.stop_requested,
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def work() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    feeder = threading.Thread(target=feed, name="simulate", daemon=True)
    runner = threading.Thread(target=work, name="worker", daemon=True)
    # Keep the last scores: learners are dropped when the worker leaves the group.
    last: dict[int, tuple[int, int, int, int, float, float, float, int]] = {}
    started = time.monotonic()
    runner.start()
    feeder.start()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker.install_signal_handlers()
    prev_consumed, prev_t = 0, started
    try:
        while runner.is_alive():
            runner.join(1.0)
            now = time.monotonic()
            for p, lr in list(worker.stats.learners.items()):
                with lr.lock:
                    cum, roll = lr.scores.cumulative(), lr.scores.rolling()
                    batch_roll = lr.batch_scores.rolling()
                last[p] = (
                    lr.consumed,
                    lr.predicted,
                    lr.learned,
                    sum(lr.dead_lettered.values()),
                    cum.roc_auc,
                    roll.roc_auc,
                    batch_roll.roc_auc,
                    lr.drift.alarms if lr.drift is not None else 0,
                )
            consumed = sum(v[0] for v in last.values())
            dead = sum(v[3] for v in last.values())
            rate = (consumed - prev_consumed) / max(now - prev_t, 1e-9)
            prev_consumed, prev_t = consumed, now
            aucs = " ".join(
                f"p{p} {_fmt(v[5]).strip()}/{_fmt(v[6]).strip()}" for p, v in sorted(last.items())
            )
            alarms = sum(v[7] for v in last.values())
            phase = "after drift " if consumed > drift_at else "before drift"
            print(
                f"[{now - started:5.1f}s] consumed {consumed:>7,} ({rate:>7,.0f}/s) {phase} | "
                f"rolling AUC online/batch {aucs or '-'} | drift alarms {alarms} | "
                f"dead letters {dead}",
                file=out,
                flush=True,
            )
    finally:
        worker.request_stop()
        runner.join(30)
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if errors:
        raise errors[0]
    print(
        "\nsummary per partition (AUC: ROC AUC; rolling = the last 1,000 labelled events)", file=out
    )
    print(
        "| partition | consumed | predicted | learned | dead-lettered | online AUC | "
        "online rolling AUC | batch rolling AUC | drift alarms |",
        file=out,
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)
    for p, (c, pr, le, d, cum_auc, roll_auc, batch_auc, n_alarms) in sorted(last.items()):
        print(
            f"| {p} | {c:,} | {pr:,} | {le:,} | {d:,} | {_fmt(cum_auc)} | {_fmt(roll_auc)} | "
            f"{_fmt(batch_auc)} | {n_alarms} |",
            file=out,
        )
    total = sum(v[0] for v in last.values())
    accounted = sum(v[1] + v[3] for v in last.values())
    print(
        f"\n{total:,} events consumed in {time.monotonic() - started:.1f}s; "
        f"consumed = predicted + dead-lettered: {'yes' if total == accounted else 'NO'}\n"
        f"/metrics was served at http://{server.address}/metrics while the demo ran; "
        f"predictions are in topic {preds} on {bootstrap}",
        file=out,
    )
    return 0 if total == accounted else 1
