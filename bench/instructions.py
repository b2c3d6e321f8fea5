"""Instructions per event, counted by valgrind's cachegrind: riverline against its floors.

    python bench/instructions.py                 # or: make bench-instructions
    python bench/instructions.py --features default

On this shared machine a timing moves by ±20 % between minutes, and by 2.5 times between
days; the number of instructions a program executes does not. This counts them, for the
`logreg` preset at-least-once, on the real broker (``KAFKA_BOOTSTRAP_SERVERS``, else a
local broker it starts):

- floor (River's API): the model over decoded events in a bare loop, predict then learn
  (with ``--features default``, the batch baseline's predict and window too; its first
  model is deployed at the 20,000th event, so count past it, e.g. ``--small 25000
  --large 40000``, to include its predictions);
- floor (transform once): the same, each event transformed once, as the worker does;
- riverline: ``riverline run`` end to end, every thread of the process (the Kafka
  client's included), with periodic checkpoints off (they are timed, and under valgrind
  time runs ~50 times slower, so they would be counted many times too often).

Each is run on a small and a large number of events and the difference is divided by
the difference of events, so start-up and shutdown cancel out. The floors' set-up
(generating, encoding and decoding the events) is counted alone and subtracted. It
takes about 5 minutes and needs ``valgrind``. It reports instructions, not time: a
cache miss counts as one instruction here and costs a hundred on the CPU, so it ranks
changes to riverline's own work, and the timed benchmark (``bench/run.py``) says what
they are worth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

N_USERS = 10_000
SEED = 1


def _events(n: int) -> list[dict[str, Any]]:
    from worker.simulate import SimulationConfig, generate

    config = SimulationConfig(n_events=n, seed=SEED, scenario="none", n_users=N_USERS)
    return list(generate(config))


def child(mode: str, n: int, features: str) -> None:
    """Run in the process valgrind watches: set up ``n`` events, then ``mode`` over them
    (for the ``default`` features, the floor includes the batch baseline, as in
    ``bench/run.py``)."""
    import orjson

    from worker.events import EventCodec
    from worker.loop import tune_gc

    codec = EventCodec.load()
    decoded = [(ev.x(), ev.clicked) for ev in map(codec.decode, map(orjson.dumps, _events(n)))]
    tune_gc(preload_baseline=True)
    if mode == "setup":
        return
    import run as timed  # bench/run.py: the same floor as the timed benchmark's

    timed.floor("logreg", decoded, baseline=features == "default", once=mode == "floor-once")


def counted(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Instructions executed by ``cmd`` (every thread) under cachegrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cachegrind.out"
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                f"--cachegrind-out-file={out}",
                *cmd,
            ],
            cwd=REPO,
            # One BLAS thread (an idle one spins, and its spinning would be counted) and
            # a fixed hash seed (dict layouts, hence probe counts, vary with it: ±0.5 %).
            env={**os.environ, **(env or {}), "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed under valgrind:\n{proc.stderr[-3000:]}")
        for line in out.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise SystemExit(f"no summary in cachegrind's output for {' '.join(cmd)}")


def per_event(counts: tuple[int, int], sizes: tuple[int, int]) -> float:
    return (counts[1] - counts[0]) / (sizes[1] - sizes[0])


def worker_counts(bs: str, sizes: tuple[int, int], features: str) -> tuple[int, int]:
    import orjson
    import run as timed  # bench/run.py

    from worker.feed import ensure_topic

    counts = []
    for n in sizes:
        events = _events(n)
        topic = f"bench-instr-{uuid.uuid4().hex[:6]}"
        ensure_topic(bs, topic, 1)
        timed.produce(
            bs, topic, [orjson.dumps(e) for e in events], [e["user_id"].encode() for e in events]
        )
        extra = ["--model", "logreg", "--commit-interval", "3600", "--commit-events", "0"]
        if features == "core":
            extra += timed.CORE_FLAGS
        cmd = timed.worker_cmd(bs, topic, f"{topic}-g", "--exit-when-idle", "2", *extra)
        counts.append(counted(cmd, {"RIVERLINE_SNAPSHOT_KEY": timed.KEY}))
    return counts[0], counts[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", type=int, default=5_000, help="events in the small run")
    ap.add_argument("--large", type=int, default=20_000, help="events in the large run")
    ap.add_argument("--features", choices=("core", "default"), default="core")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.features)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind (or your OS's)")
    if not 0 < args.small < args.large:
        raise SystemExit("--small must be positive and below --large")
    import run as timed  # bench/run.py

    sizes = (args.small, args.large)
    here = [sys.executable, str(Path(__file__).resolve()), "--features", args.features, "--child"]

    def floor(mode: str) -> tuple[int, int]:
        counts = [counted([*here, mode, str(n)]) for n in sizes]
        return counts[0], counts[1]

    setup = per_event(floor("setup"), sizes)
    result: dict[str, Any] = {"sizes": sizes, "features": args.features}
    result["floor_api"] = per_event(floor("floor"), sizes) - setup
    result["floor_once"] = per_event(floor("floor-once"), sizes) - setup
    bs, broker = timed.bootstrap()
    try:
        result["riverline"] = per_event(worker_counts(bs, sizes, args.features), sizes)
    finally:
        if broker is not None:
            broker.stop()
    result["riverline_own"] = result["riverline"] - result["floor_once"]
    result["ratio_once"] = result["floor_once"] / result["riverline"]
    result["ratio_api"] = result["floor_api"] / result["riverline"]
    print(json.dumps(result))
    print(
        f"instructions per event, logreg, at-least-once, {args.features} features "
        f"({args.small:,} vs {args.large:,} events): floor (River's API) "
        f"{result['floor_api']:,.0f}; floor (transform once) {result['floor_once']:,.0f}; "
        f"riverline {result['riverline']:,.0f}, of which its own work "
        f"{result['riverline_own']:,.0f}; floor/riverline {result['ratio_once']:.2f} "
        f"(transform once), {result['ratio_api']:.2f} (River's API)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
