"""``riverline evaluate``: replay a stream through the worker's learner code, without Kafka.

The events (a ``simulate`` scenario, or a JSON-lines file of click events) go through
the same path as in the worker — decode and validate the bytes, then
:meth:`PartitionLearner.predict_learn` — on one partition, so the final scores equal
what a worker reports for the same stream on a one-partition topic. Writes:

- ``evaluation.csv``: one row every ``--every`` labelled events (rolling and cumulative
  ROC AUC and log loss of the online and batch models, alarms, data-drift PSI);
- ``evaluation.png``: rolling ROC AUC and log loss over time, online vs batch, with the
  drift alarms, the batch trainings and the true drift point marked;
- ``summary.md``: a table of both models before and after the drift, and the detector's
  delay and false alarms.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker.events import EventCodec, InvalidEvent
from worker.learner import LearnerOptions, ModelError, PartitionLearner
from worker.models import model_factory
from worker.scoring import PrequentialScores, Scores


@dataclass
class Evaluation:
    rows: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[int] = field(default_factory=list)  # labelled-event index of each alarm
    trainings: list[int] = field(default_factory=list)  # labelled index of batch trainings
    drift_point: int | None = None  # event index where the true drift starts
    drift_labelled: int | None = None  # the same, in labelled events
    events: int = 0
    rejected: int = 0
    seconds: float = 0.0
    segments: dict[str, dict[str, Scores]] = field(default_factory=dict)
    final: dict[str, Scores] = field(default_factory=dict)
    psi: dict[str, float] = field(default_factory=dict)


def encoded(events: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for ev in events:
        yield orjson.dumps(ev)


def read_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def evaluate(
    messages: Iterable[bytes],
    *,
    model: str = "logreg",
    seed: int = 0,
    window: int = 1000,
    options: LearnerOptions | None = None,
    drift_point: int | None = None,
    every: int = 500,
) -> Evaluation:
    """Replay ``messages`` (raw event bytes) through one partition learner."""
    factory = model_factory(model, seed)
    codec = EventCodec.load()
    learner = PartitionLearner(
        "evaluate", 0, factory(), window=window, options=options, new_model=factory
    )
    result = Evaluation(drift_point=drift_point)
    segment_window = 10**9  # cumulative within the segment
    segments = {
        name: {
            "online": PrequentialScores(segment_window, 100),
            "batch": PrequentialScores(segment_window, 100),
        }
        for name in ("before", "after")
    }
    started = time.perf_counter()
    alarms = trainings = 0
    for index, raw in enumerate(messages):
        result.events += 1
        if drift_point is not None and index == drift_point:
            result.drift_labelled = learner.learned
        try:
            event = codec.decode(raw)
            pred = learner.predict_learn(event, index)
        except (InvalidEvent, ModelError):
            result.rejected += 1
            continue
        y = event.clicked
        if y is None:
            continue
        seg = segments["after" if drift_point is not None and index >= drift_point else "before"]
        seg["online"].add(y, pred.click_probability)
        if pred.batch_click_probability is not None:
            seg["batch"].add(y, pred.batch_click_probability)
        if learner.drift is not None and learner.drift.alarms != alarms:
            alarms = learner.drift.alarms
            result.alarms.append(learner.learned)
        if learner.baseline is not None and learner.baseline.trainings != trainings:
            trainings = learner.baseline.trainings
            result.trainings.append(learner.learned)
        if learner.learned % every == 0:
            learner.end_batch()
            result.rows.append(_row(index, learner))
    learner.end_batch()
    result.seconds = time.perf_counter() - started
    result.final = {
        "online": learner.scores.cumulative(),
        "batch": learner.batch_scores.cumulative(),
        "online_rolling": learner.scores.rolling(),
        "batch_rolling": learner.batch_scores.rolling(),
    }
    for name, seg in segments.items():
        for s in seg.values():
            s.flush()
        result.segments[name] = {m: s.cumulative() for m, s in seg.items()}
    if learner.data_drift is not None:
        result.psi = dict(learner.data_drift.scores)
    return result


def _row(index: int, learner: PartitionLearner) -> dict[str, Any]:
    on, off = learner.scores, learner.batch_scores
    row: dict[str, Any] = {
        "event": index + 1,
        "labelled": learner.learned,
        "online_rolling_auc": on.rolling().roc_auc,
        "batch_rolling_auc": off.rolling().roc_auc,
        "online_rolling_log_loss": on.rolling().log_loss,
        "batch_rolling_log_loss": off.rolling().log_loss,
        "online_auc": on.cumulative().roc_auc,
        "batch_auc": off.cumulative().roc_auc,
        "alarms": learner.drift.alarms if learner.drift else 0,
    }
    if learner.data_drift is not None:
        for name, value in learner.data_drift.scores.items():
            row[f"psi_{name.strip('_')}"] = value
    return row


def write_csv(result: Evaluation, path: Path) -> None:
    columns: list[str] = []
    for row in result.rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.rows)


def write_chart(result: Evaluation, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["labelled"] for r in result.rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    ax1.plot(x, [r["online_rolling_auc"] for r in result.rows], label="online (learns every event)")
    ax1.plot(x, [r["batch_rolling_auc"] for r in result.rows], label="offline batch baseline")
    ax2.plot(x, [r["online_rolling_log_loss"] for r in result.rows], label="online")
    ax2.plot(x, [r["batch_rolling_log_loss"] for r in result.rows], label="offline batch")
    ax1.set_ylabel("rolling ROC AUC")
    ax2.set_ylabel("rolling log loss")
    ax2.set_xlabel("labelled events")
    for ax in (ax1, ax2):
        if result.drift_labelled is not None:
            ax.axvline(result.drift_labelled, color="black", linewidth=1.5, label="true drift")
        for i, a in enumerate(result.alarms):
            ax.axvline(
                a, color="red", linestyle="--", linewidth=1, label="drift alarm" if i == 0 else None
            )
        for i, t in enumerate(result.trainings):
            ax.axvline(
                t,
                color="green",
                linestyle=":",
                linewidth=1,
                label="batch training" if i == 0 else None,
            )
        ax.grid(alpha=0.3)
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def summary_markdown(result: Evaluation, title: str) -> str:
    lines = [f"# {title}", ""]
    lines.append(
        f"{result.events:,} events ({result.rejected:,} rejected) in {result.seconds:.1f}s "
        f"({result.seconds / max(result.events, 1) * 1e6:.1f} µs/event, learner only)."
    )
    lines += [
        "",
        "| model | segment | labelled | ROC AUC | log loss | accuracy | mean p | click rate |",
    ]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for seg_name, seg in result.segments.items():
        if result.drift_point is None and seg_name == "after":
            continue
        label = (
            "whole stream"
            if result.drift_point is None
            else ("before drift" if seg_name == "before" else "after drift")
        )
        for model, sc in seg.items():
            lines.append(
                f"| {model} | {label} | {sc.labelled:,} | {_f(sc.roc_auc)} | {_f(sc.log_loss)} | "
                f"{_f(sc.accuracy)} | {_f(sc.mean_prediction)} | {_f(sc.click_rate)} |"
            )
    lines.append("")
    if result.drift_labelled is not None:
        after = [a for a in result.alarms if a >= result.drift_labelled]
        before = [a for a in result.alarms if a < result.drift_labelled]
        delay = f"{after[0] - result.drift_labelled:,} labelled events" if after else "not detected"
        lines.append(
            f"True drift at labelled event {result.drift_labelled:,}; first alarm after it: "
            f"{delay}; alarms before it (false): {len(before)}; alarms in all: "
            f"{len(result.alarms)}."
        )
    else:
        lines.append(f"Drift alarms: {len(result.alarms)}.")
    if result.psi:
        shown = ", ".join(f"{k.strip('_')} {v:.3f}" for k, v in sorted(result.psi.items()))
        lines.append(f"\nData drift (PSI, last block vs reference): {shown}.")
    return "\n".join(lines) + "\n"
