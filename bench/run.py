"""riverline's benchmark: everything in one run, reported as ratios that survive noise.

    python bench/run.py                      # or: make bench
    python bench/run.py --events 300000 --presets logreg --no-peer

On the real broker (``KAFKA_BOOTSTRAP_SERVERS``, else a local broker it starts), with the
same generated events for every contender:

- floor: the same models over the same decoded events in a bare loop, in this process
  (with the worker's garbage-collector settings): what River itself costs — plus, for
  the default features, the batch baseline's predict and window. Twice: through River's
  API (each of predict_proba_one and learn_one transforms the event), and transforming
  each event once for both, as riverline does; overheads are against the second;
- ceiling: a Kafka passthrough (consume, decode, produce, commit), no model;
- riverline end to end (``riverline run --exit-when-idle``) per preset and guarantee, with
  its default features (batch baseline, drift detection) and with them off ("core");
- checkpoint cost: the share of riverline's busy time spent in checkpoints;
- the peer: the same job written the Quix Streams way (``bench/peer_quix.py``), in its
  own virtual environment;
- latency: p50/p99 from the click's Kafka timestamp to the prediction's, at half the
  measured maximum rate, over ``--latency-runs`` runs (medians, pooled, and each run),
  after ``--latency-warmup`` seconds of the same traffic (reported apart), the clicks
  sent by a producer lingering ``--click-linger-ms`` (5, librdkafka's default);
- memory (``--memory-events``): RSS of a worker over a stream of distinct users.

Every contender runs once per round (``--rounds``, default 5), so a slow spell of this
shared machine slows all of them; the table gives medians, and per-round overheads.
Writes ``bench/results/<time>.md`` and ``.json`` and prints the table. The topics it made
are deleted when it is done with them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402
from confluent_kafka import (  # noqa: E402
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from worker.baseline import BatchBaseline  # noqa: E402
from worker.config import MAX_BUSY_POLL_MS, Settings  # noqa: E402
from worker.events import EventCodec  # noqa: E402
from worker.feed import ensure_topic  # noqa: E402
from worker.loop import tune_gc  # noqa: E402
from worker.models import make_model, split_pipeline  # noqa: E402
from worker.simulate import SimulationConfig, generate  # noqa: E402

PEER_VENV = REPO / "bench" / ".venv-peer"
BASELINE_WINDOW = Settings.baseline_window  # the worker's defaults
BASELINE_DELAY = Settings.baseline_deploy_delay
KEY = "bench-snapshot-key-0123456789abcdef"
CORE_FLAGS = ["--baseline-window", "0", "--drift-detector", "off", "--data-drift-block", "0"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bootstrap() -> tuple[str, Any]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        return env, None
    from worker.broker import LocalBroker, free_port

    broker = LocalBroker(state_dir=REPO / ".riverline" / "bench-broker", port=free_port())
    broker.stop()
    return broker.start(), broker


BENCH_PREFIX = "bench-"  # every topic (and group) the bench makes is named so


def bench_topics(bs: str) -> set[str]:
    """The topics on the broker whose names the bench uses (``bench-…``)."""
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    topics = AdminClient({"bootstrap.servers": bs}).list_topics(timeout=30).topics
    return {t for t in topics if t.startswith(BENCH_PREFIX)}


def drop_topics(bs: str, topics: Iterable[str]) -> list[str]:
    """Delete ``topics`` once the bench is done with them; return those it could not.

    A full run writes a few GB over ~100 topics; left behind, they had piled up to 42 GB
    in 1,400 topics on the broker used for a week of runs (its latency was no different
    on a fresh one, but the broker and its disk are the user's). A failure is logged and
    does not stop the bench: its figures are already taken.
    """
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    names = sorted(topics)
    if not names:
        return []
    failed = []
    admin = AdminClient({"bootstrap.servers": bs})  # kept: its futures die with it
    futures = admin.delete_topics(names, operation_timeout=30)
    for name, future in futures.items():
        try:
            future.result(60)
        except Exception as exc:  # noqa: BLE001 (any failure: report, go on)
            error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue  # never made (a worker that did not start) or gone already
            failed.append(name)
            log(f"could not delete topic {name}: {exc}")
    return failed


def done(bs: str, broker: Any, before: set[str]) -> None:
    """The bench's topics deleted (those not there at its start), its broker stopped."""
    try:
        left = drop_topics(bs, bench_topics(bs) - before)
        if left:
            log(f"{len(left)} of the bench's topics are left on the broker")
    except Exception as exc:  # noqa: BLE001 (a broker gone already: nothing to clean)
        log(f"could not list the bench's topics to delete them: {exc}")
    if broker is not None:
        broker.stop()


def produce(bs: str, topic: str, raws: list[bytes], keys: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bs, "linger.ms": 20, "batch.num.messages": 10000})
    for raw, key in zip(raws, keys, strict=True):
        while True:
            try:
                p.produce(topic, raw, key)
                break
            except BufferError:
                p.poll(0.05)
    p.flush(120)


def floor(
    preset: str,
    decoded: list[tuple[dict[str, Any], Any]],
    baseline: bool = False,
    once: bool = False,
) -> tuple[float, float]:
    """The models alone in a bare loop: the online model's predict then learn, and with
    ``baseline`` the batch baseline's predict and window too (the worker's default).

    With ``once`` the online model's pipeline transforms each event once for both calls,
    as the worker does (:func:`worker.models.split_pipeline`); without it, each call goes
    through River's API and transforms the event again.

    Returns (events per second, CPU µs per event of this thread)."""
    model = make_model(preset, seed=0)
    batch = BatchBaseline(window=BASELINE_WINDOW, deploy_delay=BASELINE_DELAY) if baseline else None
    split = split_pipeline(model) if once else None
    transformers: tuple[Any, ...] = ()
    if split is not None:
        transformers, model = split
    started, cpu = time.perf_counter(), time.thread_time()
    for x, y in decoded:
        xm = x
        for t in transformers:
            xm = t.transform_one(xm)
        model.predict_proba_one(xm)
        if batch is not None:
            batch.predict(x)
        if y is not None:
            model.learn_one(xm, y)
            if batch is not None:
                batch.observe(x, y)
    n = len(decoded)
    return n / (time.perf_counter() - started), (time.thread_time() - cpu) / n * 1e6


def floors(
    preset: str, decoded: list[tuple[dict[str, Any], Any]], features: str
) -> dict[str, float]:
    """The floors of one configuration, as events/s (``*_cpu``: CPU µs per event):

    - ``floor``: the models through River's API (the issue's floor);
    - ``floor_once``: the same, the online pipeline transforming each event once;
    - ``floor_online`` / ``floor_online_once``: the online model alone (no baseline).
    """
    out: dict[str, float] = {}
    for once, suffix in ((False, ""), (True, "_once")):
        online, online_cpu = floor(preset, decoded, once=once)
        both, both_cpu = (
            (online, online_cpu)
            if features == "core"
            else floor(preset, decoded, baseline=True, once=once)
        )
        out[f"floor_online{suffix}"] = online
        out[f"floor{suffix}"] = both
        out[f"floor{suffix}_cpu"] = both_cpu
    return out


class _ConstantModel:
    """Predicts 0.25, learns nothing: what is left is riverline's own per-event work."""

    proba = {True: 0.25, False: 0.75}

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return self.proba

    def learn_one(self, x: dict[str, Any], y: bool) -> None:
        pass


def feature_costs(raws: list[bytes], rounds: int) -> dict[str, float]:
    """CPU µs per event of riverline's per-event path (decode, predict-learn, encode) with
    a constant model, in this process: with no feature, then each default feature alone,
    then all of them; every figure is the best of ``rounds``. The batch baseline is
    measured once deployed: its fit (in the background in the worker) is not counted."""
    from worker.events import encode_prediction
    from worker.learner import LearnerOptions, PartitionLearner

    codec = EventCodec.load()
    window = BASELINE_WINDOW
    baseline = {"baseline_window": window, "baseline_deploy_delay": 0}
    variants = {
        "none": LearnerOptions(),
        "batch baseline": LearnerOptions(**baseline),
        "concept drift (ADWIN)": LearnerOptions(drift_detector="adwin"),
        "data drift": LearnerOptions(data_drift_block=Settings.data_drift_block),
        "all (the default)": LearnerOptions(
            **baseline,
            drift_detector="adwin",
            data_drift_block=Settings.data_drift_block,
        ),
    }
    warm, timed = raws[: 2 * window], raws[2 * window :]
    out: dict[str, float] = {}
    for name, options in variants.items():
        best = float("inf")
        for _ in range(rounds):
            learner = PartitionLearner("bench", 0, _ConstantModel(), options=options)
            for offset, raw in enumerate(warm):  # past the baseline's fit and first block
                learner.predict_learn(codec.decode(raw), offset)
            learner.end_batch()
            decode, encode = codec.decode, encode_prediction
            started = time.thread_time()
            for offset, raw in enumerate(timed, len(warm)):
                event = decode(raw)
                encode(learner.predict_learn(event, offset))
                if offset % 500 == 0:
                    learner.end_batch(force=False)
            learner.end_batch()
            best = min(best, (time.thread_time() - started) / len(timed) * 1e6)
        out[name] = best
    return out


IDLE_BATCH, IDLE_GAP = 55, 0.002  # a 16 KB fetch of clicks, every 2 ms: ~27,000/s


def idle_cost(raws: list[bytes], rounds: int) -> dict[str, float]:
    """CPU µs per event of the worker's per-event path (decode, the ``logreg`` model's
    predict-learn with the default features, encode), in this process, run two ways over
    the same events: batches of ``IDLE_BATCH`` back to back, as on a backlog, and the
    same batches with the thread asleep ``IDLE_GAP`` s between them, as at a paced rate
    (where the worker waits for its next fetch), and the same gaps spent spinning on the
    thread instead (as ``--busy-poll-ms`` does; the spinning itself not counted). No
    Kafka and no other work: what the second costs more is the price of going idle
    between batches on this machine, and the third how much of it staying on the core
    saves. Each figure is the median of ``rounds`` rounds of the three in turn.

    >>> out = idle_cost([orjson.dumps(e) for e in generate(SimulationConfig(n_events=600))], 1)
    >>> sorted(out)
    ['back_to_back_us', 'ratio', 'spin_ratio', 'spinning_gaps_us', 'with_gaps_us']
    >>> out["ratio"] == out["with_gaps_us"] / out["back_to_back_us"]
    True
    """
    from worker.events import encode_prediction
    from worker.learner import LearnerOptions, PartitionLearner
    from worker.models import make_model

    codec = EventCodec.load()
    decode, encode = codec.decode, encode_prediction
    options = LearnerOptions(
        baseline_window=BASELINE_WINDOW,
        drift_detector="adwin",
        data_drift_block=Settings.data_drift_block,
    )
    learner = PartitionLearner("bench", 0, make_model("logreg"), options=options)
    half = len(raws) // 2
    for offset, raw in enumerate(raws[:half]):  # warm: past the baseline's first fit
        learner.predict_learn(decode(raw), offset)
    learner.end_batch()
    timed = raws[half:]
    share = len(timed) // (3 * rounds) or 1

    def one(start: int, gap: float, spin: bool = False) -> float:
        chunk = timed[start : start + share]
        started, spun = time.thread_time(), 0.0
        for i in range(0, len(chunk), IDLE_BATCH):
            for offset, raw in enumerate(chunk[i : i + IDLE_BATCH], half + start + i):
                encode(learner.predict_learn(decode(raw), offset))
            learner.end_batch(force=False)
            if gap and spin:
                spin_started, until = time.thread_time(), time.perf_counter() + gap
                while time.perf_counter() < until:
                    pass
                spun += time.thread_time() - spin_started
            elif gap:
                time.sleep(gap)
        return (time.thread_time() - started - spun) / max(len(chunk), 1) * 1e6

    back, gaps, spins = [], [], []
    for r in range(rounds):
        back.append(one(3 * r * share, 0.0))
        gaps.append(one((3 * r + 1) * share, IDLE_GAP))
        spins.append(one((3 * r + 2) * share, IDLE_GAP, spin=True))
    b, g, sp = median(back), median(gaps), median(spins)
    return {
        "back_to_back_us": b,
        "with_gaps_us": g,
        "ratio": g / b,
        "spinning_gaps_us": sp,
        "spin_ratio": sp / b,
    }


def ceiling(bs: str, topic: str, n: int) -> float:
    """Consume, decode, produce, commit: Kafka I/O and JSON without a model."""
    out = f"{topic}-passthrough-{uuid.uuid4().hex[:6]}"
    c = Consumer(
        {
            "bootstrap.servers": bs,
            "group.id": f"bench-ceiling-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    p = Producer({"bootstrap.servers": bs, "linger.ms": 5, "enable.idempotence": True})
    c.subscribe([topic])
    seen, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + 300
    while seen < n and time.monotonic() < deadline:
        msgs = c.consume(500, timeout=0.1)
        if msgs and not first:
            first = time.monotonic()
        for m in msgs:
            if m.error():
                continue
            ev = orjson.loads(m.value())
            while True:
                try:
                    p.produce(out, orjson.dumps({"event_id": ev["event_id"]}), m.key())
                    break
                except BufferError:
                    p.poll(0.05)
            seen += 1
        p.poll(0)
        if msgs:
            last = time.monotonic()
    p.flush(60)
    c.commit(asynchronous=False)
    c.close()
    return seen / (last - first)


def worker_cmd(bs: str, topic: str, group: str, *extra: str) -> list[str]:
    """``riverline run`` on ``topic`` with fresh output topics and no metrics server."""
    return [
        sys.executable,
        "-m",
        "worker",
        "--log-level",
        "WARNING",
        "run",
        "--bootstrap-servers",
        bs,
        "--input-topic",
        topic,
        "--output-topic",
        f"{topic}-pred",
        "--dead-letter-topic",
        f"{topic}-dlq",
        "--group-id",
        group,
        "--metrics-address",
        "off",
        *extra,
    ]


def riverline(
    bs: str, topic: str, extra: list[str], label: str, n: int | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        group = f"bench-{uuid.uuid4().hex[:8]}"
        cmd = worker_cmd(
            bs, topic, group, "--exit-when-idle", "2", "--report-file", str(report), *extra
        )
        # Fresh output topics per run (the input is shared).
        cmd[cmd.index("--output-topic") + 1] = f"{topic}-pred-{group}"
        cmd[cmd.index("--dead-letter-topic") + 1] = f"{topic}-dlq-{group}"
        env = {**os.environ, "RIVERLINE_SNAPSHOT_KEY": KEY}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"riverline ({label}) failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(report.read_text())
    log(f"riverline {label}: {result['rate']:,.0f} events/s")
    return result


def ensure_peer_venv() -> Path | None:
    python = PEER_VENV / "bin" / "python"
    if python.exists():
        return python
    log("creating the peer's virtual environment (Quix Streams) in bench/.venv-peer")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "quixstreams==3.28.1", "river==0.26.1"],
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        log(f"cannot set up Quix Streams ({exc}); the peer is left out")
        return None
    return python


def peer(bs: str, topic: str, n: int, preset: str) -> dict[str, Any] | None:
    python = ensure_peer_venv()
    if python is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peer.json"
        cmd = [
            str(python),
            str(REPO / "bench" / "peer_quix.py"),
            "--bootstrap",
            bs,
            "--input",
            topic,
            "--output",
            f"{topic}-peer-{uuid.uuid4().hex[:6]}",
            "--group",
            f"bench-peer-{uuid.uuid4().hex[:8]}",
            "--count",
            str(n),
            "--model",
            preset,
            "--report",
            str(report),
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            log(f"peer failed:\n{proc.stderr[-2000:]}")
            return None
        result: dict[str, Any] = json.loads(report.read_text())
    log(f"peer (Quix Streams) {preset}: {result['rate']:,.0f} events/s")
    return result


def percentile(ordered: list[int], q: float) -> int:
    """The ``q`` quantile of an ascending list, as the bench has always taken it: the
    value at index ``int(n * q)`` (the median is ``ordered[n // 2]``).

    >>> percentile(list(range(1, 101)), 0.99), percentile([3, 5, 9], 0.5)
    (100, 5)
    """
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def windowed_max(values: list[int], per_window: float, windows: int) -> list[int]:
    """The largest of each of the first ``windows`` windows of ``per_window`` values
    (0 for an empty one): with clicks in the order sent at a fixed rate, the slowest
    click of each second (``per_window`` = the rate) or of each 100 ms.

    >>> windowed_max([5, 1, 7, 2, 9], 2, 4)
    [5, 7, 9, 0]
    """
    return [
        max(values[int(i * per_window) : int((i + 1) * per_window)], default=0)
        for i in range(windows)
    ]


# A line of the JVM's safepoint log as `riverline broker` writes it (worker/broker.py,
# jvm_options: -Xlog:safepoint with the `time` decorator), e.g.
# [2026-12-03T13:57:12.325+0000] Safepoint "G1CollectForAllocation", Time since last:
# 7071741253 ns, Reaching safepoint: 20210 ns, Cleanup: 1336481 ns, At safepoint:
# 41288582 ns, Total: 42645273 ns
_SAFEPOINT = re.compile(r'^\[([^\]]+)\] Safepoint "([^"]+)".* Total: (\d+) ns')
# The broker's stops of at least this long are listed per latency run.
BROKER_PAUSE_MS = 5.0


def jvm_pauses(
    log_file: str | os.PathLike[str] | None,
    since: float,
    until: float,
    at_least_ms: float = BROKER_PAUSE_MS,
) -> list[tuple[float, float, str]] | None:
    r"""The broker JVM's stops (a collection, or another safepoint) of at least
    ``at_least_ms`` that began between two wall-clock times (seconds since the epoch),
    from its safepoint log and the log's rotated files: ``(seconds after since, ms,
    cause)`` each, in order; None when there is no such log (a broker not started by
    ``riverline broker``).

    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "safepoints.log"
    >>> _ = log.write_text(
    ...     '[2026-12-03T13:57:12.325+0000] Safepoint "G1CollectForAllocation", Time since '
    ...     "last: 7071741253 ns, Reaching safepoint: 20210 ns, Cleanup: 1336481 ns, At "
    ...     "safepoint: 41288582 ns, Total: 42645273 ns\n"
    ...     '[2026-12-03T13:57:13.000+0000] Safepoint "Cleanup", Time since last: 1 ns, '
    ...     "Reaching safepoint: 2 ns, Cleanup: 3 ns, At safepoint: 4 ns, Total: 94560 ns\n"
    ... )
    >>> t0 = dt.datetime(2026, 12, 3, 13, 57, 10, tzinfo=dt.timezone.utc).timestamp()
    >>> jvm_pauses(log, t0, t0 + 5)
    [(2.282, 42.6, 'G1CollectForAllocation')]
    >>> jvm_pauses(log, t0, t0 + 5, at_least_ms=0.05)[1]
    (3.0, 0.1, 'Cleanup')
    >>> jvm_pauses(log, t0 + 3, t0 + 5), jvm_pauses(log.with_name("none.log"), t0, t0 + 5)
    ([], None)
    """
    if log_file is None:
        return None
    log_file = Path(log_file)
    files = [f for f in log_file.parent.glob(log_file.name + "*") if f.is_file()]
    if not files:
        return None
    pauses = []
    for f in files:
        if f.stat().st_mtime < since:
            continue  # rotated out before the run
        with open(f, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                m = _SAFEPOINT.match(line)
                if m is None:
                    continue
                ms = int(m[3]) / 1e6
                if ms < at_least_ms:
                    continue
                try:  # the line is written when the stop ends
                    ended = dt.datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
                except ValueError:
                    continue
                began = ended - ms / 1e3
                if since <= began < until:
                    pauses.append((round(began - since, 3), round(ms, 1), m[2]))
    return sorted(pauses)


def split_warmup(values: list[int], sent: list[int], n_warm: int) -> tuple[list[int], list[int]]:
    """``values`` (one per click read back, ``sent[i]`` the index in which click ``i`` was
    sent) split into the warm-up's (the first ``n_warm`` sent) and the measured ones,
    each in the order read.

    >>> split_warmup([30, 9, 12, 40, 11], [0, 2, 1, 3, 4], 2)
    ([30, 12], [9, 40, 11])
    """
    warm = [v for v, i in zip(values, sent, strict=True) if i < n_warm]
    measured = [v for v, i in zip(values, sent, strict=True) if i >= n_warm]
    return warm, measured


def _present(runs: list[dict[str, Any]], key: str) -> list[Any]:
    """The runs' values of ``key``, where they have one (a run without a warm-up has none).

    >>> _present([{"a": 3}, {"a": None}, {}], "a")
    [3]
    """
    return [r[key] for r in runs if r.get(key) is not None]


# A run during which the hypervisor took more than this share of the machine's CPU time
# (its "steal", all cores) met a busy host: reported with the others, and counted apart.
# Idle, this guest loses ~0.3 %; a latency run (the worker, the broker and the load
# generator on both cores) 0.03-0.6 % in a quiet hour (2.2 % once), and up to 20 % in
# the seconds of a busy one.
QUIET_STEAL_PCT = 2.0

# The load generator's producer lingers as librdkafka's does by default (5 ms), as a
# click producer left at its defaults would. 1 ms (runs 14 to 24) sent ~1,000 small
# produce requests a second at 21,688 clicks/s: over 9 latency-only runs of each,
# taking turns, p99 19-175 ms (median 47; 5 of 9 within 50 ms) against 20-67 ms
# (median 28; 8 of 9) at 5 ms, the broker's CPU 0.27-0.32 of a core against
# 0.22-0.28, for a p50 1 ms higher. `--click-linger-ms 1` measures the old way.
CLICK_LINGER_MS = 5.0


def cpu_times() -> tuple[int, int] | None:
    """The machine's CPU time so far, in ticks: (stolen by the hypervisor, total), all
    cores, from ``/proc/stat``; None where there is none (not Linux).

    >>> t = cpu_times()
    >>> t is None or 0 <= t[0] <= t[1]
    True
    """
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # counted in user time already.
    return ticks[7], sum(ticks[:8])


def steal_pct(
    samples: list[tuple[int, int] | None], first: int = 0, last: int = -1
) -> float | None:
    """The share (%) of the machine's CPU time the hypervisor took between two of
    :func:`cpu_times`' samples (by index); None when either is missing or no time passed.

    >>> steal_pct([(10, 1000), (30, 2000)])
    2.0
    >>> steal_pct([(10, 1000), None]) is None
    True
    """
    a, b = samples[first], samples[last]
    if a is None or b is None or b[1] <= a[1]:
        return None
    return round(100 * (b[0] - a[0]) / (b[1] - a[1]), 2)


def latencies(
    bs: str,
    rate: float,
    seconds: float,
    n_users: int,
    runs: int,
    warmup: float = 0.0,
    busy_poll_ms: tuple[float, ...] = (0.0,),
    click_linger_ms: float = CLICK_LINGER_MS,
    safepoint_log: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """``runs`` latency runs (see :func:`latency`) per worker setting of
    ``--busy-poll-ms``, each with a fresh worker and topics; one summary per setting,
    in the order given. The settings take turns run by run, so that a noisy minute of
    the machine falls on both rather than on one.

    The headline percentiles are the medians over the runs, as the throughput figures
    are medians over rounds: on this shared 2-core machine one run in a few meets a slow
    spell of the machine (or of the broker beside the worker) that sets its p99 alone.
    Every run's figures are kept, and the percentiles of all runs' events pooled are
    given too, so a bad run is reported rather than hidden.
    """
    pooled: dict[float, list[int]] = {ms: [] for ms in busy_poll_ms}
    each: dict[float, list[dict[str, Any]]] = {ms: [] for ms in busy_poll_ms}
    for i in range(runs):
        for ms in busy_poll_ms:
            one = latency(
                bs, rate, seconds, n_users, pooled[ms], warmup, ms, click_linger_ms, safepoint_log
            )
            _log_latency_run(one, i, runs, rate)
            each[ms].append(one)
    return [
        {**_summary(each[ms], pooled[ms], rate, warmup, ms), "click_linger_ms": click_linger_ms}
        for ms in busy_poll_ms
    ]


def _log_latency_run(one: dict[str, Any], i: int, runs: int, rate: float) -> None:
    polled = (
        f", {one['busy_poll_cpu_us_per_click']:.1f} µs polling"
        if one.get("busy_poll_cpu_us_per_click")
        else ""
    )
    log(
        f"latency run {i + 1} of {runs} at {rate:,.0f}/s"
        + (f" (--busy-poll-ms {one['busy_poll_ms']:g})" if one.get("busy_poll_ms") else "")
        + f": p50 {one['p50_ms']} ms, "
        f"p99 {one['p99_ms']} ms, max {one.get('max_ms')} ms (to the click's append: p99 "
        f"{one.get('in_p99_ms')} ms; from it to the prediction's: p99 "
        f"{one.get('worker_p99_ms')} ms; warm-up included: p99 "
        f"{one.get('whole_p99_ms')} ms; the warm-up alone: p99 {one.get('warmup_p99_ms')} "
        f"ms, max {one.get('warmup_max_ms')} ms; the loop's CPU per click: "
        + (
            f"{one['loop_cpu_us_per_click']:.1f} µs{polled}"
            if one.get("loop_cpu_us_per_click") is not None
            else "n/a"
        )
        + f"; the hypervisor's steal: {_pct(one.get('steal_pct'))})"
    )


def _pct(value: float | None) -> str:
    """A share for the report.

    >>> _pct(1.234), _pct(None)
    ('1.2 %', 'n/a')
    """
    return "n/a" if value is None else f"{value:.1f} %"


def _summary(
    each: list[dict[str, Any]], pooled: list[int], rate: float, warmup: float, busy_poll_ms: float
) -> dict[str, Any]:
    """The medians over the runs, the pooled percentiles, and every run."""
    done = [r for r in each if r.get("p99_ms") is not None]
    if not done:
        return {
            "rate": rate,
            "busy_poll_ms": busy_poll_ms,
            "p50_ms": None,
            "p99_ms": None,
            "n": 0,
            "runs": each,
        }
    pooled.sort()
    warm_p99 = _present(done, "warmup_p99_ms")
    warm_max = _present(done, "warmup_max_ms")
    loop_cpu = _present(done, "loop_cpu_us_per_click")
    polling = _present(done, "busy_poll_cpu_us_per_click")
    measured = [r for r in done if r.get("steal_pct") is not None]
    steal = [r["steal_pct"] for r in measured]
    logged = [r for r in done if r.get("broker_pauses") is not None]
    stops = [ms for r in logged for at, ms, _ in r["broker_pauses"] if at >= warmup]
    quiet = [r["p99_ms"] for r in measured if r["steal_pct"] <= QUIET_STEAL_PCT]
    busy = [r["p99_ms"] for r in measured if r["steal_pct"] > QUIET_STEAL_PCT]
    return {
        "rate": rate,
        "busy_poll_ms": busy_poll_ms,
        "achieved_rate": median(r["achieved_rate"] for r in done),
        "n": len(pooled),
        "runs_done": len(done),
        "p50_ms": median(r["p50_ms"] for r in done),
        "p99_ms": median(r["p99_ms"] for r in done),
        "p999_ms": median(r["p999_ms"] for r in done),
        "max_ms": max(r["max_ms"] for r in done),
        "in_p99_ms": median(r["in_p99_ms"] for r in done),
        "worker_p50_ms": median(r["worker_p50_ms"] for r in done),
        "worker_p99_ms": median(r["worker_p99_ms"] for r in done),
        "pooled_p50_ms": percentile(pooled, 0.5),
        "pooled_p99_ms": percentile(pooled, 0.99),
        "pooled_p999_ms": percentile(pooled, 0.999),
        "deploy_wait_s": max((r.get("deploy_wait_s") or 0.0) for r in done),
        "warmup_s": warmup,
        "whole_p99_ms": median(r["whole_p99_ms"] for r in done),
        "warmup_p99_ms": median(warm_p99) if warm_p99 else None,
        "warmup_max_ms": max(warm_max) if warm_max else None,
        "loop_cpu_us_per_click": median(loop_cpu) if loop_cpu else None,
        "busy_poll_cpu_us_per_click": median(polling) if polling else None,
        # Split by the hypervisor's steal during the run (QUIET_STEAL_PCT).
        "steal_pct": median(steal) if steal else None,
        "quiet_steal_pct": QUIET_STEAL_PCT,
        "quiet_runs": len(quiet),
        "quiet_p99_ms": median(quiet) if quiet else None,
        "busy_runs": len(busy),
        "busy_p99_ms": median(busy) if busy else None,
        # The broker JVM's stops of BROKER_PAUSE_MS or more after the warm-ups (None:
        # no safepoint log).
        "broker_pauses_n": len(stops) if logged else None,
        "broker_pause_max_ms": max(stops, default=0.0) if logged else None,
        "runs": each,
    }


def latency(
    bs: str,
    rate: float,
    seconds: float,
    n_users: int,
    pooled: list[int] | None = None,
    warmup: float = 0.0,
    busy_poll_ms: float = 0.0,
    click_linger_ms: float = CLICK_LINGER_MS,
    safepoint_log: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Clicks produced at ``rate`` for ``warmup`` + ``seconds`` seconds, by a producer
    lingering ``click_linger_ms`` (see :data:`CLICK_LINGER_MS`), to a worker run
    with ``--busy-poll-ms busy_poll_ms`` (0: its default); latency = the
    broker's append time of the prediction minus the click's create time, the time the
    load generator handed it to its producer (both from the same clock: this host). The
    percentiles are of the clicks after the first ``warmup`` seconds; those of the
    warm-up, and of the whole run, are given beside them. Each measured click's latency
    is also appended to ``pooled`` when given.

    The warm-up is the worker's start on a partition, not its steady state: in the
    first 100-200 ms of traffic the broker's request threads took 2.5 times their
    steady CPU and the worker's fetches came back up to 52 ms late on two saturated cores
    (sampled from ``/proc/<pid>/task/*/schedstat``), and the batch model's one fit
    (at the 10,000th labelled event) and its deployment (at the 20,000th) fall there
    too. Benchmarks of steady-state latency leave such a start out and say so (the
    OpenMessaging Benchmark's warm-up, JMH's warm-up iterations); this one reports it
    apart instead of dropping it.

    Both topics stamp the broker's append time (``LogAppendTime``), so each click's
    latency splits in two: **in** — from its creation to the broker's append of the
    click (the load generator's producer, its linger and the broker's write), and
    **worker** — from that append to the append of its prediction (the worker's fetch,
    its processing, its producer's linger and the broker's write of the prediction).

    With the broker's ``safepoint_log`` (see :func:`jvm_pauses`), the broker JVM's
    stops of :data:`BROKER_PAUSE_MS` or more while the clicks were sent are listed too.
    """
    # The page cache's dirty data written back before the clock starts, not during the
    # run: the rounds before leave ~1 GB of the broker's logs to write. In 3 alternating
    # pairs of runs at 19,000 events/s, 1.5 GB left dirty just before gave p99 81, 54
    # and 77 ms, the same written back first 133, 37 and 35 ms (the 133 a stall on the
    # worker's side alone): a hint, not proof, and the sync costs nothing measured.
    os.sync()
    topic = f"bench-lat-{uuid.uuid4().hex[:6]}"
    out = f"{topic}-pred"
    # The prediction's time is when the broker appended it (LogAppendTime), so the
    # worker's producer batching (linger.ms) and the broker's write are counted too.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bs})
    append_time = {"message.timestamp.type": "LogAppendTime"}
    created = admin.create_topics(
        [NewTopic(topic, 1, -1, config=append_time), NewTopic(out, 1, -1, config=append_time)]
    )
    for future in created.values():
        future.result(30)
    n_warm = int(rate * warmup)
    n = n_warm + int(rate * seconds)
    # Generated and encoded before the worker starts: it runs with --exit-when-idle 4,
    # and generating 380,000 clicks after it joined took long enough that it sometimes
    # left first, and the run measured nothing. Produced in small bursts on schedule,
    # so the producer (on the same 2 cores) costs as little as it can.
    events = list(generate(SimulationConfig(n_events=n, seed=3, scenario="none", n_users=n_users)))
    records = [(orjson.dumps(ev), ev["user_id"].encode()) for ev in events]
    index_of = {ev["event_id"]: i for i, ev in enumerate(events)}
    group = f"bench-lat-{uuid.uuid4().hex[:6]}"
    from worker.broker import free_port

    port = free_port()
    report_dir = tempfile.TemporaryDirectory()
    report_file = Path(report_dir.name) / "report.json"
    cmd = worker_cmd(
        bs,
        topic,
        group,
        "--exit-when-idle",
        "4",
        "--report-file",
        str(report_file),
        *(("--busy-poll-ms", f"{busy_poll_ms:g}") if busy_poll_ms else ()),
    )
    cmd[cmd.index("--metrics-address") + 1] = f"127.0.0.1:{port}"
    env = {**os.environ, "RIVERLINE_SNAPSHOT_KEY": KEY}
    cmd[cmd.index("--log-level") + 1] = "INFO"  # slow checkpoints are logged with phases
    worker_log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (read after the run)
    worker = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=worker_log)
    # The clock starts once the worker owns the partition: a backlog built while it joins
    # the group would be measured as latency.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if json.loads(r.read())["partitions"]:
                    break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    del events
    # Batches of clicks (CLICK_LINGER_MS) rather than one request per click, which would
    # load the broker (on the same 2 cores) more than the worker does.
    # Each click's creation time, by event id (matched to offsets when read back: an
    # idempotent producer, which would keep the order, put ~300 ms on the p99 here).
    p = Producer({"bootstrap.servers": bs, "linger.ms": click_linger_ms})
    # Connected, and the topic's leader known, before the clock starts: the producer's
    # connection and metadata request are not the worker's latency. (It did not remove
    # the 30-70 ms the first clicks sometimes take to reach their append.)
    p.list_topics(topic, timeout=30)
    # A precaution: the generator holds every click in memory, and a collection
    # mid-run would pause it and send the overdue clicks as one burst.
    gc.collect()
    gc.freeze()
    created_ms = [0] * n
    # The hypervisor's steal, sampled at each second of the run (see QUIET_STEAL_PCT).
    stolen = [cpu_times()]
    started, started_wall = time.monotonic(), time.time()
    next_sample = started + 1.0
    sent = 0
    while sent < n:
        now = time.monotonic()
        if now >= next_sample:
            stolen.append(cpu_times())
            next_sample += 1.0
        due = min(n, int((now - started) * rate) + 1)
        while sent < due:
            value, key = records[sent]
            try:
                p.produce(topic, value, key)
            except BufferError:
                p.poll(0.01)
                continue
            created_ms[sent] = int(time.time() * 1000)
            sent += 1
        p.poll(0)
        time.sleep(0.0005)
    produced_in = time.monotonic() - started
    stolen.append(cpu_times())
    # (the last clicks are predicted within a few ms of being sent: a stop after that
    # does not delay them)
    broker_pauses = jvm_pauses(safepoint_log, started_wall, started_wall + produced_in)
    gc.unfreeze()
    p.flush(60)
    worker.wait(timeout=120)
    # The worker's own account: a wait at the batch model's deploy point (a fit not
    # done in time) or a slow checkpoint shows here as a cause of the slowest clicks.
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        report = {}
    report_dir.cleanup()
    c = Consumer(
        {"bootstrap.servers": bs, "group.id": f"{group}-read", "enable.auto.commit": False}
    )
    sent_at: dict[int, int] = {}  # offset -> the broker's append time of the click
    click_of: dict[int, int] = {}  # offset -> the click's index in created_ms
    got: dict[int, int] = {}
    for t, store in ((topic, sent_at), (out, got)):
        c.assign([TopicPartition(t, 0, 0)])
        _low, high = c.get_watermark_offsets(TopicPartition(t, 0), timeout=10)
        pos = 0
        while pos < high:
            for m in c.consume(1000, timeout=1.0):
                if m.error():
                    continue
                pos = m.offset() + 1  # type: ignore[operator]
                if t == topic:
                    store[m.offset()] = m.timestamp()[1]  # type: ignore[index]
                    click_of[m.offset()] = index_of[orjson.loads(m.value())["event_id"]]  # type: ignore[index, arg-type]
                else:
                    store[orjson.loads(m.value())["offset"]] = m.timestamp()[1]
    c.close()
    # Read back: the run's topics are not needed any more (the bench's end deletes any
    # left by a run that stopped before here).
    drop_topics(bs, [topic, out, f"{topic}-dlq", f"{group}.state"])
    worker_log.seek(0)
    lines = worker_log.readlines()
    worker_log.close()
    slow_lines = [ln.strip() for ln in lines if "slow" in ln or "WARNING" in ln]
    matched = [o for o in sorted(got) if o in sent_at]
    in_order = [got[o] - created_ms[click_of[o]] for o in matched]
    ingest_in_order = [sent_at[o] - created_ms[click_of[o]] for o in matched]
    worker_in_order = [got[o] - sent_at[o] for o in matched]
    # The warm-up's clicks (the first n_warm sent) are reported apart, not measured.
    sent_index = [click_of[o] for o in matched]
    warm_lat, measured_lat = split_warmup(in_order, sent_index, n_warm)
    warm, lat, whole = sorted(warm_lat), sorted(measured_lat), sorted(in_order)
    ingest = sorted(split_warmup(ingest_in_order, sent_index, n_warm)[1])
    in_worker = sorted(split_warmup(worker_in_order, sent_index, n_warm)[1])
    if pooled is not None:
        pooled.extend(lat)
    if not lat:
        log(
            f"latency: no prediction matched a click ({len(sent_at)} clicks, {len(got)} "
            f"predictions, worker exit code {worker.returncode}); the worker's log:"
        )
        for line in lines[-40:]:
            log("  " + line.rstrip())
        return {"rate": rate, "busy_poll_ms": busy_poll_ms, "p50_ms": None, "p99_ms": None, "n": 0}
    messages = report.get("messages")
    polling_cpu = report.get("busy_poll_cpu_seconds") or 0.0
    return {
        "rate": rate,
        "busy_poll_ms": busy_poll_ms,
        "click_linger_ms": click_linger_ms,
        # The first click's wall-clock time (seconds since the epoch): the origin of the
        # run's seconds, to set beside the broker's logs (its collections in gc.log).
        "started_at": started_wall,
        "achieved_rate": n / produced_in,
        "n": len(lat),
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "p999_ms": percentile(lat, 0.999),
        "max_ms": lat[-1],
        "warmup_s": warmup,
        "warmup_n": len(warm),
        "warmup_p99_ms": percentile(warm, 0.99) if warm else None,
        "warmup_max_ms": warm[-1] if warm else None,
        "whole_p99_ms": percentile(whole, 0.99),
        # The two parts (see the docstring): to the click's append, and from it to the
        # prediction's append.
        "in_p50_ms": percentile(ingest, 0.5),
        "in_p99_ms": percentile(ingest, 0.99),
        "in_max_ms": ingest[-1],
        "worker_p50_ms": percentile(in_worker, 0.5),
        "worker_p99_ms": percentile(in_worker, 0.99),
        "worker_max_ms": in_worker[-1],
        # Where the slow ones are: the worst latency in each second of the run, the
        # warm-up's seconds first.
        "max_ms_by_second": windowed_max(in_order, rate, round(warmup + seconds)),
        # The hypervisor's share of the machine's CPU time while the clicks were sent:
        # after the warm-up, and in each second (the warm-up's first).
        "steal_pct": steal_pct(stolen, min(len(stolen) - 1, round(warmup))),
        "steal_pct_by_second": [steal_pct(stolen, i, i + 1) for i in range(len(stolen) - 1)],
        # The broker JVM's stops (a collection, mostly) while the clicks were sent: (s
        # after the first click, warm-up included; ms; cause). None: no safepoint log.
        "broker_pauses": broker_pauses,
        "worker_log": slow_lines[:20],
        "deploy_wait_s": report.get("deploy_wait_seconds"),
        "checkpoints": report.get("checkpoints"),
        "checkpoint_s": report.get("checkpoint_seconds"),
        # The loop thread's CPU per click over its busy time (warm-up included): how much
        # of a core the loop thread needs at this rate (the Kafka client's threads and the
        # fit process apart), steadier than a percentile on a noisy machine. Its own work,
        # then the CPU it spent polling without waiting (--busy-poll-ms) apart.
        "loop_cpu_us_per_click": (
            (report["loop_cpu_seconds"] - polling_cpu) / messages * 1e6 if messages else None
        ),
        "busy_poll_cpu_us_per_click": polling_cpu / messages * 1e6 if messages else None,
        # The worker's slowest loop iterations: its own work (CPU near wall) or waiting.
        "slowest_iterations": (report.get("slowest_iterations") or [])[:5],
        # The first 3 s of traffic (the warm-up's first), by 100 ms.
        "max_ms_by_100ms_first_3s": windowed_max(in_order, rate / 10, 30),
        # The same, split: before the click's append, and after it (the worker's side).
        "in_max_ms_by_100ms_first_3s": windowed_max(ingest_in_order, rate / 10, 30),
        "worker_max_ms_by_100ms_first_3s": windowed_max(worker_in_order, rate / 10, 30),
    }


def memory(bs: str, n: int) -> dict[str, Any]:
    """RSS of a worker over ``n`` events from ``n`` distinct users, sampled every second."""
    topic = f"bench-mem-{uuid.uuid4().hex[:6]}"
    ensure_topic(bs, topic, 1)
    log(f"memory: producing {n:,} events from {n:,} distinct users")
    events = generate(SimulationConfig(n_events=n, seed=4, scenario="none", n_users=n))
    p = Producer({"bootstrap.servers": bs, "linger.ms": 20})
    for ev in events:
        while True:
            try:
                p.produce(topic, orjson.dumps(ev), ev["user_id"].encode())
                break
            except BufferError:
                p.poll(0.05)
    p.flush(300)
    cmd = worker_cmd(bs, topic, f"bench-mem-{uuid.uuid4().hex[:6]}", "--exit-when-idle", "3")
    env = {**os.environ, "RIVERLINE_SNAPSHOT_KEY": KEY}
    worker = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    samples: list[float] = []

    def sample() -> None:
        while worker.poll() is None:
            try:
                status = Path(f"/proc/{worker.pid}/status").read_text()
                rss = int(
                    next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1]
                )
                samples.append(rss * 1024)
            except (OSError, StopIteration):
                pass
            time.sleep(1.0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    worker.wait(timeout=3600)
    t.join(5)
    # After warm-up (the first fifth), and before the idle wait that ends the run
    # (--exit-when-idle 3) and the shutdown, which frees the model.
    steady = samples[len(samples) // 5 : -4] or samples
    mean = sum(steady) / len(steady)
    return {
        "events": n,
        "samples": len(samples),
        "rss_mean_mb": mean / 1e6,
        "rss_min_pct": (min(steady) / mean - 1) * 100,
        "rss_max_pct": (max(steady) / mean - 1) * 100,
        "rss_samples_mb": [round(v / 1e6) for v in samples],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--presets", nargs="+", default=["logreg", "fm"])
    ap.add_argument("--guarantees", nargs="+", default=["at-least-once", "exactly-once"])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="repetitions (medians are reported)")
    ap.add_argument("--latency-seconds", type=float, default=20.0, help="measured, per run")
    ap.add_argument(
        "--latency-warmup",
        type=float,
        default=2.0,
        help="seconds of the same traffic before each latency run's measured window "
        "(the worker's start on its partition; reported apart); 0 measures from the start",
    )
    ap.add_argument(
        "--latency-runs",
        type=int,
        default=5,
        help="latency runs (medians of their percentiles are reported, and each run)",
    )
    ap.add_argument(
        "--latency-busy-poll-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="also run the latency runs with the worker's --busy-poll-ms MS, taking turns "
        "with the default (run 23 used 3; 0, the default: only the worker's default)",
    )
    ap.add_argument(
        "--click-linger-ms",
        type=float,
        default=CLICK_LINGER_MS,
        metavar="MS",
        help=f"the latency runs' load generator: its producer's linger.ms (default "
        f"{CLICK_LINGER_MS:g}, librdkafka's; runs 14 to 24 used 1)",
    )
    ap.add_argument(
        "--broker-safepoint-log",
        metavar="FILE",
        help="the broker JVM's safepoint log, to list its stops in each latency run "
        "(`riverline broker` writes STATE_DIR/logs/safepoints.log; found by itself when "
        "the bench starts its own broker)",
    )
    ap.add_argument("--memory-events", type=int, default=0, help="e.g. 1000000 (slow)")
    ap.add_argument(
        "--memory-only", type=int, metavar="EVENTS", help="only measure memory over EVENTS"
    )
    ap.add_argument(
        "--latency-only",
        type=float,
        metavar="RATE",
        help="only measure latency, at RATE events/s (no throughput rounds)",
    )
    ap.add_argument(
        "--idle-cost-only",
        action="store_true",
        help="only measure, in process, the per-event CPU back to back against with "
        "2 ms idle gaps between batches (no broker)",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    if args.latency_runs < 1:
        ap.error(f"--latency-runs must be at least 1, got {args.latency_runs}")
    if args.latency_warmup < 0:
        ap.error(f"--latency-warmup must be 0 or more seconds, got {args.latency_warmup}")
    if not 0 <= args.latency_busy_poll_ms <= MAX_BUSY_POLL_MS:
        ap.error(
            f"--latency-busy-poll-ms must be between 0 and {MAX_BUSY_POLL_MS:g}, "
            f"got {args.latency_busy_poll_ms:g}"
        )
    if not 0 <= args.click_linger_ms <= 1000:
        ap.error(f"--click-linger-ms must be between 0 and 1000, got {args.click_linger_ms:g}")
    busy_poll = (0.0, args.latency_busy_poll_ms) if args.latency_busy_poll_ms else (0.0,)

    if args.idle_cost_only:
        raws = [
            orjson.dumps(e)
            for e in generate(
                SimulationConfig(n_events=args.events, seed=1, scenario="none", n_users=args.users)
            )
        ]
        tune_gc(preload_baseline=True)
        print(json.dumps(idle_cost(raws, args.rounds)))
        return 0
    bs, broker = bootstrap()
    safepoint_log = args.broker_safepoint_log or (broker.safepoint_log if broker else None)
    before = bench_topics(bs)  # the user's own bench-… topics, if any, are left alone
    results: dict[str, Any] = {"events": args.events, "machine": os.uname().nodename}
    if args.memory_only:
        try:
            print(json.dumps(memory(bs, args.memory_only)))
        finally:
            done(bs, broker, before)
        return 0
    if args.latency_only:
        try:
            series = latencies(
                bs,
                args.latency_only,
                args.latency_seconds,
                args.users,
                args.latency_runs,
                args.latency_warmup,
                busy_poll,
                args.click_linger_ms,
                safepoint_log,
            )
            print(json.dumps(series[0] if len(series) == 1 else series))
        finally:
            done(bs, broker, before)
        return 0
    try:
        log(f"generating {args.events:,} events ({args.users:,} users) and producing them")
        events = list(
            generate(
                SimulationConfig(n_events=args.events, seed=1, scenario="none", n_users=args.users)
            )
        )
        raws = [orjson.dumps(e) for e in events]
        keys = [e["user_id"].encode() for e in events]
        decoded = [(ev.x(), ev.clicked) for ev in map(EventCodec.load().decode, raws)]
        topic = f"bench-in-{uuid.uuid4().hex[:6]}"
        ensure_topic(bs, topic, 1)
        produce(bs, topic, raws, keys)

        # The floor runs in this process with the worker's garbage-collector settings,
        # so both sides pay the same for Python's own bookkeeping.
        tune_gc(preload_baseline=True)
        results["rounds"] = args.rounds
        results["ceiling"] = ceiling(bs, topic, args.events)
        log(f"ceiling (passthrough): {results['ceiling']:,.0f} events/s")
        configs = [
            (preset, guarantee, features)
            for preset in args.presets
            for guarantee in args.guarantees
            for features in ("default", "core")
        ]
        floor_keys = (
            "floor",
            "floor_online",
            "floor_once",
            "floor_online_once",
            "floor_cpu",
            "floor_once_cpu",
        )
        keys = (*floor_keys, "riverline", "rss", "cp", "loop_cpu", "wait")
        samples: dict[tuple[str, str, str], dict[str, list[float]]] = {
            c: {k: [] for k in keys} for c in configs
        }
        peer_samples: dict[str, list[float]] = {p: [] for p in args.presets}
        # Rounds: every contender once per round, so a slow spell of the machine hits
        # all of them; the table gives medians over the rounds.
        for round_no in range(1, args.rounds + 1):
            log(f"round {round_no} of {args.rounds}")
            for preset, guarantee, features in configs:
                extra = ["--model", preset, "--guarantee", guarantee]
                if features == "core":
                    extra += CORE_FLAGS
                smp = samples[(preset, guarantee, features)]
                # The floor runs just before and just after riverline, and the round
                # takes their mean: a slow spell during the round hits both sides.
                before = floors(preset, decoded, features)
                rl = riverline(bs, topic, extra, f"{preset} {guarantee} {features}")
                after = floors(preset, decoded, features)
                for key in floor_keys:
                    if key.endswith("_cpu"):  # mean CPU per event
                        smp[key].append((before[key] + after[key]) / 2)
                    else:  # mean time per event
                        smp[key].append(2 / (1 / before[key] + 1 / after[key]))
                smp["riverline"].append(rl["rate"])
                smp["loop_cpu"].append(rl["loop_cpu_seconds"] / rl["messages"] * 1e6)
                smp["wait"].append(rl["deploy_wait_seconds"])
                smp["rss"].append(rl["peak_rss_bytes"] / 1e6)
                smp["cp"].append(100 * rl["checkpoint_seconds"] / rl["seconds"])
            if not args.no_peer:
                for preset in args.presets:
                    pr = peer(bs, topic, args.events, preset)
                    if pr:
                        peer_samples[preset].append(pr["rate"])
        rows = []
        for (preset, guarantee, features), smp in samples.items():
            fl, rl = median(smp["floor"]), median(smp["riverline"])
            once = median(smp["floor_once"])

            def per_round(floor_key: str, smp: dict[str, list[float]] = smp) -> list[float]:
                return [
                    (1 / r - 1 / f) * 1e6
                    for r, f in zip(smp["riverline"], smp[floor_key], strict=True)
                ]

            rounds_us = per_round("floor_once")
            rows.append(
                {
                    "preset": preset,
                    "guarantee": guarantee,
                    "features": features,
                    "floor": fl,
                    "floor_once": once,
                    "floor_online": median(smp["floor_online"]),
                    "floor_online_once": median(smp["floor_online_once"]),
                    "riverline": rl,
                    "ratio_floor": rl / fl,
                    "ratio_floor_once": rl / once,
                    "ratio_ceiling": rl / results["ceiling"],
                    # What riverline adds on top of the least work the model needs (the
                    # transform-once floor), each round's riverline against that round's
                    # floor (measured just before and after it), then the median: a slow
                    # spell of the machine hits both sides of one difference.
                    "overhead_us": median(rounds_us),
                    "overhead_rounds_us": rounds_us,
                    # The formula as written, against River's API floor: lower
                    # than the above by the transform riverline saves (negative when the
                    # saving is larger than everything riverline adds).
                    "overhead_api_us": median(per_round("floor")),
                    "overhead_online_us": median(per_round("floor_online_once")),
                    # The same difference in CPU time of the working thread: riverline's
                    # loop thread against the floor's, per event (preemption excluded).
                    "cpu_overhead_us": median(
                        lc - fc
                        for lc, fc in zip(smp["loop_cpu"], smp["floor_once_cpu"], strict=True)
                    ),
                    "deploy_wait_s": median(smp["wait"]),
                    "checkpoint_pct": median(smp["cp"]),
                    "peak_rss_mb": max(smp["rss"]),
                    "samples": smp,
                }
            )
        results["runs"] = rows
        results["peer"] = {p: median(v) for p, v in peer_samples.items() if v}
        results["peer_samples"] = peer_samples
        # Checkpoint cost, directly: the share of the busy time spent checkpointing at
        # the default interval (the rate with and without checkpoints differs by less
        # than this machine's noise).
        alos_default = next(
            (r for r in rows if r["guarantee"] == "at-least-once" and r["features"] == "default"),
            None,
        )
        if alos_default is not None:
            results["checkpoint"] = {"cost_pct": alos_default["checkpoint_pct"]}
        results["feature_costs"] = feature_costs(raws, args.rounds)
        log(f"feature costs: {results['feature_costs']}")
        results["idle_cost"] = idle_cost(raws, args.rounds)
        log(f"idle cost: {results['idle_cost']}")
        alos = [r for r in rows if r["guarantee"] == "at-least-once" and r["features"] == "default"]
        max_rate = alos[0]["riverline"] if alos else 10_000.0
        series = latencies(
            bs,
            max_rate / 2,
            args.latency_seconds,
            args.users,
            args.latency_runs,
            args.latency_warmup,
            busy_poll,
            args.click_linger_ms,
            safepoint_log,
        )
        results["latency"] = series[0]
        if len(series) > 1:
            results["latency_busy_poll"] = series[1]
        log(f"latency at {max_rate / 2:,.0f}/s: {series}")
        if args.memory_events:
            results["memory"] = memory(bs, args.memory_events)
            log(f"memory: {results['memory']}")
    finally:
        done(bs, broker, before)

    md = render(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stamp}.md").write_text(md)
    print(md)
    return 0


def render_latency(lat: dict[str, Any]) -> str:
    """The latency paragraph: medians over the runs, the pooled figures, every run."""
    runs = [x for x in lat.get("runs", [lat]) if x.get("p99_ms") is not None]
    head = (
        f"\nEnd-to-end latency (click timestamp → prediction timestamp) at "
        f"{lat['rate']:,.0f} events/s (half the maximum; "
        f"{lat.get('achieved_rate', lat['rate']):,.0f}/s achieved), logreg, "
        f"at-least-once, default features, clicks from a producer lingering "
        f"{lat.get('click_linger_ms', 1):g} ms"
        + (
            f", the worker run with `--busy-poll-ms {lat['busy_poll_ms']:g}`"
            if lat.get("busy_poll_ms")
            else ""
        )
    )
    if len(runs) > 1:
        head += (
            f", {len(runs)} runs of {runs[0]['n']:,} events or so, each with a fresh worker: "
            f"median p50 {lat['p50_ms']} ms, **median p99 {lat['p99_ms']} ms**, median p99.9 "
            f"{lat['p999_ms']} ms, max {lat['max_ms']} ms; all {lat['n']:,} events pooled: "
            f"p50 {lat['pooled_p50_ms']} ms, p99 {lat['pooled_p99_ms']} ms, p99.9 "
            f"{lat['pooled_p999_ms']} ms."
        )
        if lat.get("worker_p99_ms") is not None:
            if lat.get("warmup_s"):
                head += (
                    f" Measured after {lat['warmup_s']:g} s of the same traffic (the "
                    f"worker's start on its partition: its first batches, the batch "
                    f"model's fit and deployment), reported apart: the warm-up's median "
                    f"p99 {lat['warmup_p99_ms']} ms, max {lat['warmup_max_ms']} ms; "
                    f"warm-up included, median p99 {lat['whole_p99_ms']} ms."
                )
            head += (
                f" Split at the broker's append of the click: before it (the load "
                f"generator's producer and the broker) median p99 {lat['in_p99_ms']} ms; "
                f"after it (the worker's fetch, work and producer, and the broker's write "
                f"of the prediction) median p50 {lat['worker_p50_ms']} ms, p99 "
                f"{lat['worker_p99_ms']} ms."
            )
        if lat.get("steal_pct") is not None:
            q = lat["quiet_steal_pct"]
            head += (
                f" The hypervisor took a median {_pct(lat['steal_pct'])} of the machine's "
                f"CPU time during a run (its steal, all cores; per run below). Runs at "
                f"most {q:g} % stolen: {lat['quiet_runs']}"
                + (f", median p99 {lat['quiet_p99_ms']} ms" if lat["quiet_runs"] else "")
                + f"; more: {lat['busy_runs']}"
                + (f", median p99 {lat['busy_p99_ms']} ms" if lat["busy_runs"] else "")
                + "."
            )
        if lat.get("broker_pauses_n") is not None:
            head += (
                f" The broker's JVM stopped for {BROKER_PAUSE_MS:g} ms or more "
                f"{lat['broker_pauses_n']} times after the warm-ups"
                + (
                    f" (the longest {lat['broker_pause_max_ms']:g} ms)."
                    if lat["broker_pauses_n"]
                    else "."
                )
            )
        if lat.get("loop_cpu_us_per_click") is not None:
            head += (
                f" The loop's CPU per click, its own work: median "
                f"{lat['loop_cpu_us_per_click']:.1f} µs"
                + (
                    f"; polling without waiting: {lat['busy_poll_cpu_us_per_click']:.1f} µs."
                    if lat.get("busy_poll_cpu_us_per_click")
                    else "."
                )
            )
    else:
        head += (
            f": p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, p99.9 "
            f"{lat.get('p999_ms', '–')} ms, max {lat['max_ms']} ms over {lat['n']:,} events."
        )
    lines = [head]
    for i, one in enumerate(runs, 1):
        waited = one.get("deploy_wait_s")
        cps = one.get("checkpoints")
        lines.append(
            (f"- run {i}: " if len(runs) > 1 else "")
            + f"p50 {one['p50_ms']} ms, p99 {one['p99_ms']} ms, p99.9 {one['p999_ms']} ms, "
            f"max {one['max_ms']} ms"
            + (
                f" (before the click's append p99 {one['in_p99_ms']} ms, max "
                f"{one['in_max_ms']} ms; after it p99 {one['worker_p99_ms']} ms, max "
                f"{one['worker_max_ms']} ms)"
                if "worker_p99_ms" in one
                else ""
            )
            + (
                f"; the warm-up ({one['warmup_s']:g} s): p99 {one['warmup_p99_ms']} ms, max "
                f"{one['warmup_max_ms']} ms; warm-up included p99 {one['whole_p99_ms']} ms"
                if one.get("warmup_n")
                else ""
            )
            + "; the slowest click of each second"
            + (" (the warm-up's first)" if one.get("warmup_n") else "")
            + ": "
            + ", ".join(str(v) for v in one.get("max_ms_by_second", []))
            + " ms."
            + (
                f" The hypervisor's steal: {_pct(one['steal_pct'])} of the CPU time; "
                "each second: "
                + ", ".join("n/a" if v is None else f"{v:.1f}" for v in one["steal_pct_by_second"])
                + " %."
                if one.get("steal_pct") is not None
                else ""
            )
            + _render_pauses(one.get("broker_pauses"))
            + (
                f" The worker waited {waited:.2f} s at the batch model's deploy point and "
                f"checkpointed {cps} times "
                f"({1000 * one['checkpoint_s'] / max(1, cps):.0f} ms each)."
                if waited is not None and cps is not None
                else ""
            )
            + (
                " The loop's slowest iterations (wall / CPU, when): "
                + ", ".join(
                    f"{it['wall_ms']:.0f} / {it['cpu_ms']:.0f} ms at {it['at_s']:.1f} s"
                    + (" (checkpoint)" if it["checkpoint"] else "")
                    for it in one["slowest_iterations"]
                )
                + "."
                if one.get("slowest_iterations")
                else ""
            )
        )
    return "\n".join(lines)


def _render_pauses(pauses: list[tuple[float, float, str]] | None) -> str:
    """A run's broker stops for the report ('' when the bench had no safepoint log).

    >>> _render_pauses([(11.3, 42.6, "G1CollectForAllocation")])
    " The broker's JVM stopped for 42.6 ms at 11.3 s (G1CollectForAllocation)."
    >>> _render_pauses([]), _render_pauses(None)
    (" The broker's JVM did not stop for 5 ms or more.", '')
    """
    if pauses is None:
        return ""
    if not pauses:
        return f" The broker's JVM did not stop for {BROKER_PAUSE_MS:g} ms or more."
    return (
        " The broker's JVM stopped for "
        + ", ".join(f"{ms:g} ms at {at:.1f} s ({cause})" for at, ms, cause in pauses)
        + "."
    )


def render(r: dict[str, Any]) -> str:
    lines = [
        f"Events per run: {r['events']:,} (one partition); medians of {r.get('rounds', 1)} "
        f"rounds. Ceiling (Kafka passthrough, no model): {r['ceiling']:,.0f} events/s.",
        "",
        "Floor: the same models over the same decoded events in a bare loop, in the bench "
        "process — the online River model, plus for `default` the batch baseline (its "
        "predict and window). Two floors: through River's API (`predict_proba_one` then "
        "`learn_one`, each transforming the event: the floor as the issue defines it), and "
        "transforming each event once for both calls, as riverline does (the least work "
        "the model needs). Each round measures both just before and just after riverline "
        "and takes the mean. Overhead = 1/riverline − 1/floor per event, each round's "
        "riverline against that round's floor, the median of the rounds (the rounds in "
        "brackets): against the transform-once floor, what riverline adds on top of the "
        "model's least work; the column after it applies the formula to River's API floor "
        "(lower by the transform riverline saves). The CPU column is the first difference "
        "in CPU time of the working thread (riverline's loop thread against the floor's), "
        "which leaves out time the thread was preempted; the column after it charges the "
        "baseline to riverline too (floor = the online model alone, transforming once).",
        "",
        "| model | guarantee | features | floor (River API) | floor (transform once) "
        "| riverline | riverline/floor (API) | riverline/floor (once) "
        "| overhead per event (vs once) | overhead vs API floor | CPU overhead per event "
        "| overhead vs online model alone "
        "| riverline/ceiling | riverline/peer | checkpoint time | deploy wait | peak RSS |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers = r.get("peer", {})
    for row in r["runs"]:
        peer_rate = peers.get(row["preset"])
        vs_peer = f"{row['riverline'] / peer_rate:.2f}" if peer_rate else "–"
        rounds = ", ".join(f"{v:.1f}" for v in row.get("overhead_rounds_us", []))
        lines.append(
            f"| {row['preset']} | {row['guarantee']} | {row['features']} | {row['floor']:,.0f}/s "
            f"| {row['floor_once']:,.0f}/s "
            f"| {row['riverline']:,.0f}/s | {row['ratio_floor']:.2f} "
            f"| {row['ratio_floor_once']:.2f} "
            f"| {row['overhead_us']:.1f} µs ({rounds}) "
            f"| {row['overhead_api_us']:.1f} µs "
            f"| {row.get('cpu_overhead_us', float('nan')):.1f} µs "
            f"| {row.get('overhead_online_us', row['overhead_us']):.1f} µs "
            f"| {row['ratio_ceiling']:.2f} | {vs_peer} | {row.get('checkpoint_pct', 0):.1f}% "
            f"| {row.get('deploy_wait_s', 0):.2f} s | {row['peak_rss_mb']:.0f} MB |"
        )
    if peers:
        lines.append("")
        lines.append(
            "Peer (Quix Streams, same online model, no validation, no baseline, no drift "
            "detection): " + ", ".join(f"{k} {v:,.0f}/s" for k, v in peers.items()) + "."
        )
    costs = r.get("feature_costs")
    if costs:
        none = costs["none"]
        lines.append(
            "\nriverline's per-event path (decode, predict-learn, encode) with a constant "
            "model, in process, CPU per event (best of the rounds): "
            + "; ".join(
                f"{k} {v:.2f} µs" + (f" (+{v - none:.2f})" if k != "none" else "")
                for k, v in costs.items()
            )
            + "."
        )
    idle = r.get("idle_cost")
    if idle:
        lines.append(
            f"\nThe same path with the real `logreg` model and the default features, in "
            f"process, in batches of {IDLE_BATCH}: {idle['back_to_back_us']:.1f} µs of CPU per "
            f"event back to back, {idle['with_gaps_us']:.1f} µs with the thread asleep "
            f"{IDLE_GAP * 1000:.0f} ms between batches (×{idle['ratio']:.2f}): the price of "
            "going idle between fetches, which a paced rate pays and a backlog does not"
            + (
                f"; {idle['spinning_gaps_us']:.1f} µs (×{idle['spin_ratio']:.2f}) with the "
                "thread spinning through the gaps instead (`--busy-poll-ms`; the spinning "
                "not counted)."
                if "spinning_gaps_us" in idle
                else "."
            )
        )
    cp = r.get("checkpoint")
    if cp:
        lines.append(
            f"\nCheckpoint cost at the default interval (5 s / 100,000 events), logreg, "
            f"at-least-once, default features: {cp['cost_pct']:.1f}% of the busy time."
        )
    for key in ("latency", "latency_busy_poll"):
        lat = r.get(key) or {}
        if lat.get("p50_ms") is not None:
            lines.append(render_latency(lat))
    if "memory" in r:
        m = r["memory"]
        lines.append(
            f"\nMemory over {m['events']:,} events from as many distinct users: RSS after "
            f"warm-up {m['rss_mean_mb']:.0f} MB on average, within {m['rss_min_pct']:+.1f}% / "
            f"{m['rss_max_pct']:+.1f}%."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
