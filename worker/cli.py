"""The ``riverline`` command line: run, simulate, demo, evaluate, broker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
from confluent_kafka import KafkaException

from worker import __version__
from worker.errors import ConfigError, RiverlineError

log = logging.getLogger("riverline")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_broker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker import broker

    p = sub.add_parser(
        "broker",
        help="start, stop or inspect a local single-node Kafka broker (no Docker needed)",
        description="A real Apache Kafka 4 broker in KRaft mode, run from Maven-resolved jars.",
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument(
        "--state-dir",
        default=os.environ.get("RIVERLINE_BROKER_DIR", str(broker.DEFAULT_STATE_DIR)),
        help="jars, data, logs and pid file (default: .riverline/broker; env RIVERLINE_BROKER_DIR)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("RIVERLINE_BROKER_PORT", broker.DEFAULT_PORT)),
        help="client port on 127.0.0.1 (default 9092; env RIVERLINE_BROKER_PORT)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=broker.DEFAULT_START_TIMEOUT,
        help="seconds to wait for the broker to answer (default 120)",
    )
    p.add_argument(
        "--heap",
        default=broker.DEFAULT_HEAP,
        help=f"JVM heap (default {broker.DEFAULT_HEAP})",
    )
    p.add_argument(
        "--gc",
        choices=broker.COLLECTORS,
        default=broker.DEFAULT_GC,
        help=f"the JVM's garbage collector (default {broker.DEFAULT_GC}: pauses under 10 ms; "
        "g1: Kafka's own, which stops the broker for each young collection)",
    )
    p.set_defaults(func=_cmd_broker)


def _cmd_broker(args: argparse.Namespace) -> int:
    from worker.broker import LocalBroker

    b = LocalBroker(state_dir=args.state_dir, port=args.port, heap=args.heap, gc=args.gc)
    if args.action == "start":
        already = b.status().running
        address = b.start(timeout=args.timeout)
        print(f"{'already running' if already else 'started'}: bootstrap {address}")
        print(f"  export KAFKA_BOOTSTRAP_SERVERS={address}")
        return 0
    if args.action == "stop":
        print("stopped" if b.stop() else f"not running (state {b.state_dir})")
        return 0
    st = b.status()
    print(st.describe())
    return 0 if st.running else 3


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker.config import add_options

    p = sub.add_parser(
        "run",
        help="run the online-learning worker (one member of the consumer group)",
        description=(
            "Consume click events; for each, predict the click probability, publish it, "
            "then learn from the label (test-then-train). Every flag has a RIVERLINE_* "
            "environment variable; librdkafka properties come from --kafka-config or "
            "RIVERLINE_KAFKA_* (RIVERLINE_KAFKA_SASL_MECHANISM=PLAIN is sasl.mechanism)."
        ),
    )
    add_options(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from worker.config import settings_from_mapping

    settings = settings_from_mapping(vars(args))
    if settings.fits_in_background:
        from worker.batchfit import start_fit_process

        # First, so that the fit process imports what it needs while this one imports
        # River and joins the group: then the loop never waits for the first fit.
        start_fit_process()
    from worker.loop import Worker
    from worker.metrics import MetricsServer

    worker = Worker(settings)
    log.info("effective configuration: %s", settings.masked())
    server = None
    hp = settings.metrics_host_port
    if hp is not None:
        try:
            server = MetricsServer(hp[0], hp[1], worker.stats).start()
        except OSError as exc:
            raise ConfigError(
                f"--metrics-address {settings.metrics_address}: cannot listen ({exc.strerror}); "
                "choose another port or 'off'"
            ) from exc
        log.info("serving /metrics, /health and /ready on http://%s", server.address)
    worker.install_signal_handlers()
    try:
        worker.run()
    finally:
        if server is not None:
            server.close()
        report = worker.report()
        log.info(
            "processed %d messages in %.2fs of work (%.0f/s), %d checkpoints",
            report["messages"],
            report["seconds"],
            report["rate"],
            report["checkpoints"],
        )
        if settings.report_file:
            Path(settings.report_file).write_bytes(orjson.dumps(report))
    log.info("stopped cleanly")
    return 0


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker.simulate import SCENARIOS

    p = sub.add_parser(
        "simulate",
        help="publish a realistic recommendation-click stream (with drift scenarios)",
        description=(
            "Users with latent category preferences, position bias and devices; "
            "deterministic given --seed. Key = user_id."
        ),
    )
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("RIVERLINE_BOOTSTRAP_SERVERS")
        or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="Kafka bootstrap servers (env RIVERLINE_BOOTSTRAP_SERVERS or KAFKA_BOOTSTRAP_SERVERS)",
    )
    p.add_argument("--topic", default="clicks", help="topic to publish to (default clicks)")
    p.add_argument("--partitions", type=int, default=4, help="partitions if the topic is created")
    p.add_argument("--output", help="write JSON lines to this file instead of Kafka ('-': stdout)")
    p.add_argument("--count", type=int, default=100_000, help="number of events (default 100000)")
    p.add_argument("--rate", type=float, default=0.0, help="events per second (default 0: max)")
    p.add_argument("--users", type=int, default=1000, help="distinct users (default 1000)")
    p.add_argument("--items", type=int, default=200, help="distinct items (default 200)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--scenario", choices=SCENARIOS, default="abrupt", help="drift scenario")
    p.add_argument("--drift-at", type=int, help="event index where drift starts (default count/2)")
    p.add_argument("--drift-width", type=int, help="gradual drift length (default count/10)")
    p.add_argument("--season-period", type=float, default=3600.0, help="seasonal period, seconds")
    p.add_argument("--label-rate", type=float, default=1.0, help="share of labelled events")
    p.add_argument("--bad-rate", type=float, default=0.0, help="share of malformed messages")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import orjson

    from worker.feed import ensure_topic, publish
    from worker.simulate import SimulationConfig, generate

    try:
        cfg = SimulationConfig(
            n_events=args.count,
            seed=args.seed,
            n_users=args.users,
            n_items=args.items,
            scenario=args.scenario,
            drift_at=args.drift_at,
            drift_width=args.drift_width,
            label_rate=args.label_rate,
            season_period_s=args.season_period,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not 0.0 <= args.bad_rate < 1.0:
        raise ConfigError(f"--bad-rate must be in [0, 1), got {args.bad_rate}")
    if args.output:
        out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
        try:
            for ev in generate(cfg):
                out.write(orjson.dumps(ev, option=orjson.OPT_APPEND_NEWLINE))
        finally:
            if out is not sys.stdout.buffer:
                out.close()
        return 0
    if not args.bootstrap_servers:
        raise ConfigError(
            "no Kafka cluster given: pass --bootstrap-servers host:port (or set "
            "KAFKA_BOOTSTRAP_SERVERS), or --output FILE for JSON lines"
        )
    ensure_topic(args.bootstrap_servers, args.topic, args.partitions)
    stats = publish(
        args.bootstrap_servers,
        args.topic,
        generate(cfg),
        rate=args.rate,
        bad_rate=args.bad_rate,
        seed=args.seed,
        total=args.count,
    )
    drift = f"; true drift at event {cfg.drift_point:,}" if cfg.drift_point is not None else ""
    print(
        f"published {stats.sent:,} events ({stats.bad:,} malformed) to {args.topic} "
        f"at {stats.rate:,.0f}/s{drift}"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker.demo import DemoOptions

    d = DemoOptions()
    p = sub.add_parser(
        "demo",
        help="broker + simulated clicks with drift + worker + live progress + summary",
    )
    p.add_argument("--events", type=int, default=d.events, help=f"default {d.events}")
    p.add_argument("--rate", type=float, default=d.rate, help=f"events/s (default {d.rate:.0f})")
    p.add_argument("--partitions", type=int, default=d.partitions)
    p.add_argument("--bad-rate", type=float, default=d.bad_rate)
    p.add_argument("--model", default=d.model)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import DemoOptions, run_demo

    if args.events < 100:
        raise ConfigError(f"--events must be at least 100, got {args.events}")
    return run_demo(
        DemoOptions(
            events=args.events,
            rate=args.rate,
            partitions=args.partitions,
            bad_rate=args.bad_rate,
            model=args.model,
            seed=args.seed,
        )
    )


LEARNER_OPTIONS = (
    "model",
    "seed",
    "window",
    "baseline_window",
    "baseline_retrain_every",
    "baseline_deploy_delay",
    "drift_detector",
    "drift_action",
    "drift_grace",
    "data_drift_block",
    "data_drift_features",
)


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker.config import add_options
    from worker.simulate import SCENARIOS

    p = sub.add_parser(
        "evaluate",
        help="replay a stream without Kafka; chart and compare online vs offline learning",
        description=(
            "Replays a simulated scenario (or a JSON-lines file of click events) through "
            "the worker's own learner code on one partition, then writes evaluation.png, "
            "evaluation.csv and summary.md to --out-dir."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--scenario", choices=SCENARIOS, default="abrupt", help="simulated stream")
    src.add_argument("--input", help="JSON-lines file of click events instead of a simulation")
    p.add_argument("--count", type=int, default=60_000, help="simulated events (default 60000)")
    p.add_argument("--sim-seed", type=int, default=42, help="simulation seed (default 42)")
    p.add_argument("--users", type=int, default=1000, help="simulated users (default 1000)")
    p.add_argument("--drift-at", type=int, help="true drift point (default count/2)")
    p.add_argument("--every", type=int, default=500, help="a CSV row every N labelled events")
    p.add_argument("--out-dir", default="evaluation", help="where to write (default evaluation/)")
    add_options(p, only=LEARNER_OPTIONS)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.config import settings_from_mapping
    from worker.evaluate import (
        encoded,
        evaluate,
        read_lines,
        summary_markdown,
        write_chart,
        write_csv,
    )
    from worker.simulate import SimulationConfig, generate

    values = {k: getattr(args, k) for k in LEARNER_OPTIONS}
    settings = settings_from_mapping(
        {**values, "bootstrap_servers": "unused:0"},
        # Nothing is snapshotted here: any key will do.
        env={**os.environ, "RIVERLINE_SNAPSHOT_KEY": "evaluate-needs-no-key"},
    )
    if args.every < 1:
        raise ConfigError(f"--every must be >= 1, got {args.every}")
    if args.input:
        if not Path(args.input).is_file():
            raise ConfigError(f"--input {args.input}: no such file")
        messages = read_lines(args.input)
        drift_point = None
        title = f"riverline evaluate: {Path(args.input).name}"
    else:
        try:
            cfg = SimulationConfig(
                n_events=args.count,
                seed=args.sim_seed,
                n_users=args.users,
                scenario=args.scenario,
                drift_at=args.drift_at,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        messages = encoded(generate(cfg))
        drift_point = cfg.drift_point
        title = f"riverline evaluate: {args.scenario} scenario, {args.count:,} events"
    result = evaluate(
        messages,
        model=settings.model,
        seed=settings.seed,
        window=settings.window,
        options=settings.learner_options(),
        drift_point=drift_point,
        every=args.every,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / "evaluation.csv")
    write_chart(result, out / "evaluation.png", title)
    summary = summary_markdown(result, title)
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {out / 'evaluation.png'}, {out / 'evaluation.csv'}, {out / 'summary.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="riverline",
        description="Online machine learning on Kafka: predict, publish, then learn, per event.",
    )
    parser.add_argument("--version", action="version", version=f"riverline {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("RIVERLINE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env RIVERLINE_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_simulate(sub)
    _add_demo(sub)
    _add_evaluate(sub)
    _add_broker(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except RiverlineError as exc:
        print(f"riverline: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KafkaException as exc:
        from worker.kafka import describe

        print(f"riverline: Kafka error: {describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
