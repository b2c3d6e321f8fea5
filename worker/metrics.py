"""Prometheus exposition: a collector that reads plain counters at scrape time.

Nothing here runs per event. The loop keeps plain Python counters in each
:class:`~worker.learner.PartitionLearner`; a scrape walks them and yields metric
families into the worker's own registry (never the global one). ``/health`` is the
liveness probe (the loop polled recently), ``/ready`` the readiness probe.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker import __version__
from worker.events import REASONS
from worker.learner import PartitionLearner

log = logging.getLogger(__name__)

CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Bucket counts filled once per batch (weighted), exported at scrape time."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.total += value * count

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == math.inf else repr(bound), running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)


class SlowestIterations:
    """The ``keep`` slowest iterations of the worker's loop that took ``threshold``
    seconds or more: wall time, the loop thread's CPU time, when (seconds after the
    first batch), messages processed and whether it checkpointed. An iteration whose
    CPU time is near its wall time was riverline's own work; one far below it waited
    (the Kafka client, a lock) or was preempted. For ``--report-file``.

    >>> slow = SlowestIterations(keep=2, threshold=0.01)
    >>> for wall in (0.005, 0.03, 0.02, 0.05):
    ...     slow.note(wall, wall / 2, at=1.0, messages=500, checkpoint=False)
    >>> [it["wall_ms"] for it in slow.as_list()]
    [50.0, 30.0]
    """

    def __init__(self, keep: int = 20, threshold: float = 0.01) -> None:
        self.keep = keep
        self.threshold = threshold
        self._heap: list[tuple[float, float, float, int, bool]] = []  # the fastest first

    def note(self, wall: float, cpu: float, at: float, messages: int, checkpoint: bool) -> None:
        if wall < self.threshold:
            return
        entry = (wall, cpu, at, messages, checkpoint)
        if len(self._heap) < self.keep:
            heapq.heappush(self._heap, entry)
        elif entry > self._heap[0]:
            heapq.heapreplace(self._heap, entry)

    def as_list(self) -> list[dict[str, Any]]:
        """The slowest first."""
        return [
            {
                "wall_ms": round(wall * 1000, 1),
                "cpu_ms": round(cpu * 1000, 1),
                "at_s": round(at, 2),
                "messages": messages,
                "checkpoint": checkpoint,
            }
            for wall, cpu, at, messages, checkpoint in sorted(self._heap, reverse=True)
        ]


class WorkerStats:
    """What the loop exposes to the collector and the probes (read from other threads)."""

    def __init__(self, input_topic: str, model: str, health_timeout: float = 60.0) -> None:
        self.input_topic = input_topic
        self.model = model
        self.health_timeout = health_timeout
        self.learners: dict[int, PartitionLearner] = {}
        self.latency = Histogram()
        self.rebalances: dict[str, int] = {"assigned": 0, "revoked": 0, "lost": 0}
        self.heartbeat = 0.0  # monotonic time of the last completed poll
        self.messages = 0  # messages processed by this process
        self.first_batch_at: float | None = None  # monotonic, start of the first batch
        self.last_batch_at: float | None = None  # monotonic, end of the last batch
        # CPU time of the loop's thread at those two points: with the busy time, how
        # much of it the loop ran rather than waited or was preempted.
        self.first_batch_cpu = 0.0
        self.last_batch_cpu = 0.0
        self.started = False  # first assignment handled
        self.commits = 0
        self.aborts = 0
        self.snapshots_rejected = 0
        self.checkpoint_duration = Histogram(CHECKPOINT_BUCKETS)
        self.slowest = SlowestIterations()
        self.stopping = False
        # Time the loop polled without waiting between batches (--busy-poll-ms).
        self.busy_poll_seconds = 0.0
        self.busy_poll_cpu_seconds = 0.0

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.heartbeat if self.heartbeat else math.inf
        ok = age < self.health_timeout and not self.stopping
        return ok, {
            "status": "ok" if ok else "stalled",
            "last_poll_age_seconds": None if math.isinf(age) else round(age, 3),
            "partitions": sorted(self.learners),
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        ok, body = self.healthy()
        ok = ok and self.started
        body["status"] = "ready" if ok else ("starting" if not self.started else body["status"])
        return ok, body


def _versions() -> dict[str, str]:
    import confluent_kafka
    import river

    return {
        "version": __version__,
        "python": platform.python_version(),
        "river": river.__version__,  # type: ignore[attr-defined]
        "confluent_kafka": str(confluent_kafka.__version__),
        "librdkafka": confluent_kafka.libversion()[0],
    }


SCORE_FIELDS = (
    ("accuracy", "riverline_model_accuracy_ratio", "Share of labelled events predicted right (p > 0.5 means click)."),
    ("log_loss", "riverline_model_log_loss", "Mean binary log loss of the predicted click probability."),
    ("roc_auc", "riverline_model_roc_auc", "ROC AUC of the click probability (River's ROCAUC, 100 thresholds)."),
    ("mean_prediction", "riverline_model_mean_prediction_ratio", "Mean predicted click probability (calibration)."),
    ("click_rate", "riverline_model_click_rate_ratio", "Observed click rate of the labelled events (calibration)."),
    ("labelled", "riverline_model_labelled_events", "Labelled events the scores are computed over."),
    ("positives", "riverline_model_positive_events", "Clicks among the labelled events the scores cover."),
)  # fmt: skip


def _baseline(
    value: Callable[[Any], float | None],
) -> Callable[[PartitionLearner, float], float | None]:
    return lambda lr, wall: value(lr.baseline) if lr.baseline is not None else None


def _psi(key: str) -> Callable[[PartitionLearner, float], float | None]:
    return lambda lr, wall: lr.data_drift.scores.get(key) if lr.data_drift is not None else None


# Per-partition metrics with one value each (labels: topic, partition): (family type,
# name, help, the value from a learner and the wall time; None or NaN exports no sample).
_Family = type[CounterMetricFamily] | type[GaugeMetricFamily]
PARTITION_METRICS: tuple[
    tuple[_Family, str, str, Callable[[PartitionLearner, float], float | None]], ...
] = (
    (CounterMetricFamily, "riverline_events_consumed", "Messages read from the input topic.",
     lambda lr, wall: lr.consumed),
    (CounterMetricFamily, "riverline_events_predicted",
     "Valid events a prediction was published for.", lambda lr, wall: lr.predicted),
    (CounterMetricFamily, "riverline_events_learned",
     "Labelled events the online model learned from.", lambda lr, wall: lr.learned),
    (GaugeMetricFamily, "riverline_consumer_lag_messages",
     "Messages in the partition not processed yet (high watermark - position).",
     lambda lr, wall: lr.lag),
    (GaugeMetricFamily, "riverline_committed_offset",
     "Last offset committed for the partition.", lambda lr, wall: lr.committed_offset),
    (GaugeMetricFamily, "riverline_snapshot_size_bytes",
     "Size of the partition's last snapshot (pickled learner).",
     lambda lr, wall: lr.snapshot_bytes if lr.snapshot_at is not None else None),
    (GaugeMetricFamily, "riverline_snapshot_age_seconds",
     "Seconds since the partition's last successful checkpoint (or restored snapshot).",
     lambda lr, wall: max(0.0, wall - lr.snapshot_at) if lr.snapshot_at is not None else None),
    (GaugeMetricFamily, "riverline_restore_duration_seconds",
     "Time taken to read, verify and load the partition's snapshot at assignment.",
     lambda lr, wall: lr.restore_seconds),
    (GaugeMetricFamily, "riverline_drift_last_alarm_timestamp_seconds",
     "Unix time of the last concept-drift alarm.",
     lambda lr, wall: lr.drift.last_alarm_time if lr.drift is not None else None),
    (CounterMetricFamily, "riverline_online_model_resets",
     "Online models replaced by a fresh one (--drift-action reset-online).",
     lambda lr, wall: lr.resets),
    (CounterMetricFamily, "riverline_batch_trainings",
     "Trainings of the offline (batch) baseline.", _baseline(lambda b: b.trainings)),
    (GaugeMetricFamily, "riverline_batch_training_duration_seconds",
     "Duration of the last batch-baseline training (in the background unless "
     "--baseline-deploy-delay is 0, when the stream pauses for it).",
     _baseline(lambda b: b.last_training_seconds if b.trainings else None)),
    (CounterMetricFamily, "riverline_batch_deploy_wait_seconds",
     "Time the stream paused at a batch model's deploy point, its fit not done yet.",
     _baseline(lambda b: b.deploy_wait_seconds)),
    (GaugeMetricFamily, "riverline_label_drift_psi",
     "PSI of the click label (click rate): latest block vs reference block.",
     _psi("__label__")),
    (GaugeMetricFamily, "riverline_prediction_drift_psi",
     "PSI of the online model's predicted probability (10 bins): latest vs reference.",
     _psi("__prediction__")),
)  # fmt: skip


class WorkerCollector:
    """Yields every riverline metric family from :class:`WorkerStats` at scrape time."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats
        self.info = {**_versions(), "model": stats.model}

    def describe(self) -> Iterable[Metric]:
        return []  # collected only on scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        st = self.stats
        topic = st.input_topic
        learners = sorted(list(st.learners.values()), key=lambda lr: lr.partition)
        info = InfoMetricFamily("riverline_build", "riverline build and runtime versions.")
        info.add_metric([], self.info)
        yield info

        wall = time.time()
        plain = [
            (kind(name, doc, labels=["topic", "partition"]), value)
            for kind, name, doc, value in PARTITION_METRICS
        ]
        dead = CounterMetricFamily(
            "riverline_events_dead_lettered",
            "Messages sent to the dead-letter topic, by reason.",
            labels=["topic", "partition", "reason"],
        )
        by_detector = ["topic", "partition", "detector"]
        alarms = CounterMetricFamily(
            "riverline_drift_alarms",
            "Concept-drift alarms on the online model's loss (a rise of the loss).",
            labels=by_detector,
        )
        estimate = GaugeMetricFamily(
            "riverline_drift_estimate",
            "The detector's estimate of the online model's mean Brier loss.",
            labels=by_detector,
        )
        data_psi = GaugeMetricFamily(
            "riverline_data_drift_psi",
            "Population stability index of a feature: latest block vs reference block.",
            labels=["topic", "partition", "feature"],
        )
        scores = {
            key: GaugeMetricFamily(name, doc, labels=["model", "topic", "partition", "window"])
            for key, name, doc in SCORE_FIELDS
        }
        for lr in learners:
            pl = [topic, str(lr.partition)]
            for family, value_of in plain:
                value = value_of(lr, wall)
                if value is not None and not math.isnan(value):
                    family.add_metric(pl, value)
            for reason in REASONS:
                dead.add_metric([*pl, reason], lr.dead_lettered.get(reason, 0))
            with lr.lock:  # the loop folds pending pairs; a scrape only reads
                per_model = {
                    "online": (lr.scores.cumulative(), lr.scores.rolling()),
                    "batch": (lr.batch_scores.cumulative(), lr.batch_scores.rolling()),
                }
            for model, (cum, roll) in per_model.items():
                if not cum.labelled:
                    continue  # e.g. the batch baseline before its first training
                for window, sc in (("cumulative", cum), ("rolling", roll)):
                    for key, _, _ in SCORE_FIELDS:
                        value = getattr(sc, key)
                        if not (isinstance(value, float) and math.isnan(value)):
                            scores[key].add_metric([model, *pl, window], value)
            if lr.drift is not None:
                alarms.add_metric([*pl, lr.drift.detector_name], lr.drift.alarms)
                if not math.isnan(lr.drift.estimate):
                    estimate.add_metric([*pl, lr.drift.detector_name], lr.drift.estimate)
            if lr.data_drift is not None:
                for feature, value in list(lr.data_drift.scores.items()):
                    if feature not in ("__label__", "__prediction__") and not math.isnan(value):
                        data_psi.add_metric([*pl, feature], value)
        yield from (family for family, _ in plain)
        yield from (dead, alarms, estimate, data_psi)
        yield from scores.values()
        yield GaugeMetricFamily(
            "riverline_assigned_partitions",
            "Input partitions assigned to this worker.",
            value=len(learners),
        )
        reb = CounterMetricFamily(
            "riverline_rebalances",
            "Partition assignment changes seen by this worker.",
            labels=["kind"],
        )
        for kind, n in st.rebalances.items():
            reb.add_metric([kind], n)
        yield reb
        yield CounterMetricFamily(
            "riverline_commits", "Successful checkpoints (snapshots + offsets).", value=st.commits
        )
        yield CounterMetricFamily(
            "riverline_transactions_aborted",
            "Exactly-once transactions aborted (learners rewound to the last checkpoint).",
            value=st.aborts,
        )
        yield CounterMetricFamily(
            "riverline_snapshots_rejected",
            "Snapshots that failed verification and were replaced by a fresh model.",
            value=st.snapshots_rejected,
        )
        yield st.checkpoint_duration.family(
            "riverline_checkpoint_duration_seconds",
            "The loop's pause for a checkpoint: flush and snapshot write (at-least-once; the "
            "acknowledgement and offset commit follow while the loop goes on), or snapshot "
            "write and transaction commit (exactly-once).",
        )
        yield CounterMetricFamily(
            "riverline_busy_poll_seconds",
            "Time the loop polled without waiting for the next fetch (--busy-poll-ms).",
            value=st.busy_poll_seconds,
        )
        age = time.monotonic() - st.heartbeat if st.heartbeat else math.nan
        yield GaugeMetricFamily(
            "riverline_last_poll_age_seconds",
            "Seconds since the consume loop last polled.",
            value=age,
        )
        yield st.latency.family(
            "riverline_processing_latency_seconds",
            "Time from poll to prediction handed to the producer, per event (measured per batch, "
            "or per chunk of a long batch).",
        )


def make_registry(stats: WorkerStats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(stats))  # type: ignore[arg-type]
    return registry


def _handler(registry: CollectorRegistry, stats: WorkerStats) -> type[BaseHTTPRequestHandler]:
    probes: dict[str, Callable[[], tuple[bool, dict[str, Any]]]] = {
        "/health": stats.healthy,
        "/ready": stats.ready,
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path in probes:
                ok, info = probes[path]()
                body, status, ctype = orjson.dumps(info), 200 if ok else 503, "application/json"
            else:
                body, status, ctype = b"try /metrics, /health or /ready\n", 404, "text/plain"
            body = bytes(body)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would flood the log

    return Handler


class MetricsServer:
    """``/metrics``, ``/health`` and ``/ready`` on a background thread."""

    def __init__(self, host: str, port: int, stats: WorkerStats) -> None:
        self.registry = make_registry(stats)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.registry, stats))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
