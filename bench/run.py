"""riverline's benchmark: everything in one run, reported as ratios that survive noise.

    python bench/run.py                      # or: make bench
    python bench/run.py --events 300000 --presets logreg --no-peer

On the real broker (``KAFKA_BOOTSTRAP_SERVERS``, else a local broker it starts), with the
same generated events for every contender:

- floor: the same River model over the same decoded events in a bare loop, in this
  process: what River itself costs;
- ceiling: a Kafka passthrough (consume, decode, produce, commit), no model;
- riverline end to end (``riverline run --exit-when-idle``) per preset and guarantee, with
  its default features (batch baseline, drift detection) and with them off ("core");
- riverline with checkpoints off, for the checkpoint cost;
- the peer: the same job written the Quix Streams way (``bench/peer_quix.py``), in its
  own virtual environment;
- latency: p50/p99 from the click's Kafka timestamp to the prediction's, at half the
  measured maximum rate;
- memory (``--memory-events``): RSS of a worker over a stream of distinct users.

Writes ``bench/results/<time>.md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from worker.events import features_of  # noqa: E402
from worker.feed import ensure_topic  # noqa: E402
from worker.models import make_model  # noqa: E402
from worker.simulate import SimulationConfig, generate  # noqa: E402

PEER_VENV = REPO / "bench" / ".venv-peer"
KEY = "bench-snapshot-key-0123456789abcdef"


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


def floor(preset: str, decoded: list[tuple[dict[str, Any], Any]]) -> float:
    model = make_model(preset, seed=0)
    started = time.perf_counter()
    for x, y in decoded:
        model.predict_proba_one(x)
        if y is not None:
            model.learn_one(x, y)
    return len(decoded) / (time.perf_counter() - started)


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
            ev = orjson.loads(m.value())  # type: ignore[arg-type]
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
            bs, topic, group, "--exit-when-idle", "3", "--report-file", str(report), *extra
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


def latency(bs: str, rate: float, seconds: float, n_users: int) -> dict[str, Any]:
    """Clicks produced at ``rate``; latency = prediction timestamp - click timestamp."""
    topic = f"bench-lat-{uuid.uuid4().hex[:6]}"
    out = f"{topic}-pred"
    ensure_topic(bs, topic, 1)
    group = f"bench-lat-{uuid.uuid4().hex[:6]}"
    from worker.broker import free_port

    port = free_port()
    cmd = worker_cmd(bs, topic, group, "--exit-when-idle", "4")
    cmd[cmd.index("--metrics-address") + 1] = f"127.0.0.1:{port}"
    env = {**os.environ, "RIVERLINE_SNAPSHOT_KEY": KEY}
    worker = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
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
    n = int(rate * seconds)
    events = generate(SimulationConfig(n_events=n, seed=3, scenario="none", n_users=n_users))
    p = Producer({"bootstrap.servers": bs, "linger.ms": 0})
    started = time.monotonic()
    for i, ev in enumerate(events):
        ahead = i / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
        p.produce(topic, orjson.dumps(ev), ev["user_id"].encode())
        p.poll(0)
    p.flush(60)
    worker.wait(timeout=120)
    c = Consumer(
        {"bootstrap.servers": bs, "group.id": f"{group}-read", "enable.auto.commit": False}
    )
    sent: dict[int, int] = {}
    got: dict[int, int] = {}
    for t, store in ((topic, sent), (out, got)):
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
                else:
                    store[orjson.loads(m.value())["offset"]] = m.timestamp()[1]  # type: ignore[arg-type]
    c.close()
    lat = sorted(got[o] - sent[o] for o in got if o in sent)
    if not lat:
        return {"rate": rate, "p50_ms": None, "p99_ms": None, "n": 0}
    return {
        "rate": rate,
        "n": len(lat),
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
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
    steady = samples[len(samples) // 5 :]  # after warm-up (the first fifth)
    mean = sum(steady) / len(steady)
    return {
        "events": n,
        "samples": len(samples),
        "rss_mean_mb": mean / 1e6,
        "rss_min_pct": (min(steady) / mean - 1) * 100,
        "rss_max_pct": (max(steady) / mean - 1) * 100,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--presets", nargs="+", default=["logreg", "fm"])
    ap.add_argument("--guarantees", nargs="+", default=["at-least-once", "exactly-once"])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--memory-events", type=int, default=0, help="e.g. 1000000 (slow)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()

    bs, broker = bootstrap()
    results: dict[str, Any] = {"events": args.events, "machine": os.uname().nodename}
    try:
        log(f"generating {args.events:,} events ({args.users:,} users) and producing them")
        events = list(
            generate(
                SimulationConfig(n_events=args.events, seed=1, scenario="none", n_users=args.users)
            )
        )
        raws = [orjson.dumps(e) for e in events]
        keys = [e["user_id"].encode() for e in events]
        decoded = [(features_of(orjson.loads(r)), orjson.loads(r).get("clicked")) for r in raws]
        topic = f"bench-in-{uuid.uuid4().hex[:6]}"
        ensure_topic(bs, topic, 1)
        produce(bs, topic, raws, keys)

        results["ceiling"] = ceiling(bs, topic, args.events)
        log(f"ceiling (passthrough): {results['ceiling']:,.0f} events/s")
        rows = []
        for preset in args.presets:
            for guarantee in args.guarantees:
                for features in ("default", "core"):
                    extra = ["--model", preset, "--guarantee", guarantee]
                    if features == "core":
                        extra += [
                            "--baseline-window",
                            "0",
                            "--drift-detector",
                            "off",
                            "--data-drift-block",
                            "0",
                        ]
                    fl = floor(preset, decoded)
                    rl = riverline(bs, topic, extra, f"{preset} {guarantee} {features}")
                    rows.append(
                        {
                            "preset": preset,
                            "guarantee": guarantee,
                            "features": features,
                            "floor": fl,
                            "riverline": rl["rate"],
                            "ratio_floor": rl["rate"] / fl,
                            "ratio_ceiling": rl["rate"] / results["ceiling"],
                            "overhead_us": (1 / rl["rate"] - 1 / fl) * 1e6,
                            "peak_rss_mb": rl["peak_rss_bytes"] / 1e6,
                        }
                    )
        results["runs"] = rows
        # Checkpoint cost: the default interval vs no checkpoint until the end.
        with_cp = riverline(bs, topic, [], "logreg at-least-once, default checkpoints")
        without = riverline(
            bs,
            topic,
            ["--commit-interval", "100000", "--commit-events", "0"],
            "logreg at-least-once, no checkpoints",
        )
        results["checkpoint"] = {
            "with": with_cp["rate"],
            "without": without["rate"],
            "cost_pct": (1 - with_cp["rate"] / without["rate"]) * 100,
            "checkpoints": with_cp["checkpoints"],
        }
        if not args.no_peer:
            peers = {}
            for preset in args.presets:
                pr = peer(bs, topic, args.events, preset)
                if pr:
                    peers[preset] = pr["rate"]
            results["peer"] = peers
        alos = [r for r in rows if r["guarantee"] == "at-least-once" and r["features"] == "default"]
        max_rate = alos[0]["riverline"] if alos else 10_000.0
        results["latency"] = latency(bs, max_rate / 2, args.latency_seconds, args.users)
        log(f"latency at {max_rate / 2:,.0f}/s: {results['latency']}")
        if args.memory_events:
            results["memory"] = memory(bs, args.memory_events)
            log(f"memory: {results['memory']}")
    finally:
        if broker is not None:
            broker.stop()

    md = render(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stamp}.md").write_text(md)
    print(md)
    return 0


def render(r: dict[str, Any]) -> str:
    lines = [
        f"Events per run: {r['events']:,} (one partition). Ceiling (Kafka passthrough, no "
        f"model): {r['ceiling']:,.0f} events/s.",
        "",
        "| model | guarantee | features | floor (bare River loop) | riverline | riverline/floor "
        "| overhead per event | riverline/ceiling | riverline/peer | peak RSS |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers = r.get("peer", {})
    for row in r["runs"]:
        peer_rate = peers.get(row["preset"])
        vs_peer = f"{row['riverline'] / peer_rate:.2f}" if peer_rate else "–"
        lines.append(
            f"| {row['preset']} | {row['guarantee']} | {row['features']} | {row['floor']:,.0f}/s | "
            f"{row['riverline']:,.0f}/s | {row['ratio_floor']:.2f} | {row['overhead_us']:.1f} µs | "
            f"{row['ratio_ceiling']:.2f} | {vs_peer} | {row['peak_rss_mb']:.0f} MB |"
        )
    if peers:
        lines.append("")
        lines.append(
            "Peer (Quix Streams, same model, no validation, one model for all partitions): "
            + ", ".join(f"{k} {v:,.0f}/s" for k, v in peers.items())
            + "."
        )
    cp = r["checkpoint"]
    lines.append(
        f"\nCheckpoint cost at the default interval (5 s / 100,000 events): "
        f"{cp['cost_pct']:.1f}% of throughput ({cp['with']:,.0f}/s with, {cp['without']:,.0f}/s "
        f"without; {cp['checkpoints']} checkpoints)."
    )
    lat = r["latency"]
    if lat.get("p50_ms") is not None:
        lines.append(
            f"\nEnd-to-end latency (click timestamp → prediction timestamp) at "
            f"{lat['rate']:,.0f} events/s (half the maximum), logreg, at-least-once: "
            f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms "
            f"over {lat['n']:,} events."
        )
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
