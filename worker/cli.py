"""The ``riverline`` command line: run, simulate, demo, evaluate, broker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

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
    p.add_argument("--heap", default=broker.DEFAULT_HEAP, help="JVM heap (default 512m)")
    p.set_defaults(func=_cmd_broker)


def _cmd_broker(args: argparse.Namespace) -> int:
    from worker.broker import LocalBroker

    b = LocalBroker(state_dir=args.state_dir, port=args.port, heap=args.heap)
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
    from worker.loop import Worker
    from worker.metrics import MetricsServer

    settings = settings_from_mapping(vars(args))
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
    log.info("stopped cleanly")
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
    except KeyboardInterrupt:
        return 130
