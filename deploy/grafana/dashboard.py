"""Generate the riverline Grafana dashboard: deploy/grafana/dashboards/riverline.json.

    python deploy/grafana/dashboard.py           # (re)write the JSON
    python deploy/grafana/dashboard.py --check   # exit 1 if the JSON is not what this makes

Plain Python, no dependency: the JSON is Grafana's dashboard model (schemaVersion 39,
Grafana 11), provisioned by deploy/grafana/provisioning/dashboards/riverline.yml.
Every query filters on the variables $job, $instance and (where the metric has the label)
$partition; tests/unit/test_deploy_files.py checks the names and labels against the
worker's collector, and tests/integration/test_deploy_live.py runs every query against a
Prometheus scraping a real worker.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "riverline.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
PSEL = SEL + ', partition=~"$partition"'
RATE = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> dict:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }


def targets(*pairs: tuple[str, str]) -> list[dict]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(
    title: str,
    description: str,
    queries: list[dict],
    unit: str = "short",
    *,
    width: int = 12,
    height: int = 8,
    minimum: float | None = None,
    maximum: float | None = None,
    bars: bool = False,
    threshold_steps: tuple[tuple[float | None, str], ...] = (),
    dashed: str | None = None,
    decimals: int | None = None,
) -> Panel:
    """A time series panel; ``dashed`` is a regex of series names drawn dashed."""
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": 60 if bars else 8,
            "showPoints": "never",
            "spanNulls": False,
            "axisSoftMin": 0 if bars else None,
            "thresholdsStyle": {"mode": "dashed" if threshold_steps else "off"},
        },
        "thresholds": thresholds(*threshold_steps) if threshold_steps else thresholds(),
    }
    defaults["custom"] = {k: v for k, v in defaults["custom"].items() if v is not None}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if decimals is not None:
        defaults["decimals"] = decimals
    overrides = []
    if dashed:
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": dashed},
                "properties": [
                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}
                ],
            }
        )
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": queries,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "right" if width >= 12 else "bottom",
                "showLegend": True,
                "calcs": ["lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (width, height),
    }


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str = "short",
    *,
    steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
    decimals: int | None = None,
) -> Panel:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds(*steps),
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
        "_size": (4, 4),
    }


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


def scores(metric: str, window: str = "rolling") -> str:
    return f'{metric}{{{PSEL}, window="{window}"}}'


def histogram_quantile(q: float, metric: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, instance) (rate({metric}_bucket{{{SEL}}}[{RATE}])))"
    )


def panels() -> Iterator[Panel]:
    yield row("Overview")
    yield stat(
        "Workers up",
        "Worker replicas Prometheus scrapes successfully.",
        f"sum(up{{{SEL}}})",
        steps=((None, "red"), (1, "green")),
    )
    yield stat(
        "Assigned partitions",
        "Input partitions assigned across the selected workers.",
        f"sum(riverline_assigned_partitions{{{SEL}}})",
        steps=((None, "red"), (1, "green")),
    )
    yield stat(
        "Events consumed/s",
        "Messages read from the input topic per second.",
        f"sum(rate(riverline_events_consumed_total{{{PSEL}}}[{RATE}]))",
        "suffix: ev/s",
        decimals=0,
    )
    yield stat(
        "Consumer lag",
        "Messages waiting in the selected partitions (high watermark - position).",
        f"sum(riverline_consumer_lag_messages{{{PSEL}}})",
        steps=((None, "green"), (1000, "orange"), (10000, "red")),
    )
    yield stat(
        "Worst online ROC AUC (rolling)",
        "The lowest rolling ROC AUC of the online model over the selected partitions.",
        f'min(riverline_model_roc_auc{{{PSEL}, model="online", window="rolling"}})',
        "none",
        steps=((None, "red"), (0.6, "orange"), (0.7, "green")),
        decimals=3,
    )
    yield stat(
        "Drift alarms in range",
        "Concept-drift alarms raised in the dashboard's time range.",
        f"sum(increase(riverline_drift_alarms_total{{{PSEL}}}[$__range]))",
        steps=((None, "green"), (1, "orange")),
        decimals=0,
    )

    yield row("Model quality: online vs batch")
    yield timeseries(
        "ROC AUC, online vs batch (rolling window)",
        "ROC AUC over the last --window labelled events. The batch baseline (dashed) is "
        "trained once and frozen; after a drift it falls while the online model recovers.",
        targets(
            (scores("riverline_model_roc_auc"), "{{model}} p{{partition}}"),
        ),
        "none",
        maximum=1,
        threshold_steps=((None, "red"), (0.6, "transparent")),
        dashed="^batch.*",
        decimals=3,
    )
    yield timeseries(
        "Log loss, online vs batch (rolling window)",
        "Mean log loss over the last --window labelled events (lower is better).",
        targets((scores("riverline_model_log_loss"), "{{model}} p{{partition}}")),
        "none",
        minimum=0,
        dashed="^batch.*",
        decimals=3,
    )
    yield timeseries(
        "Calibration: mean predicted vs observed click rate (rolling)",
        "A calibrated model's mean predicted probability follows the observed click rate.",
        targets(
            (scores("riverline_model_mean_prediction_ratio"), "predicted {{model}} p{{partition}}"),
            (
                f'riverline_model_click_rate_ratio{{{PSEL}, model="online", window="rolling"}}',
                "observed p{{partition}}",
            ),
        ),
        "percentunit",
        minimum=0,
        dashed="^predicted batch.*",
    )
    yield timeseries(
        "ROC AUC gain of online learning (online - batch, rolling)",
        "Above zero the online model ranks clicks better than the frozen batch baseline.",
        targets(
            (
                f'riverline_model_roc_auc{{{PSEL}, model="online", window="rolling"}}'
                " - ignoring (model) "
                f'riverline_model_roc_auc{{{PSEL}, model="batch", window="rolling"}}',
                "p{{partition}}",
            )
        ),
        "none",
        threshold_steps=((None, "red"), (-0.05, "transparent")),
        decimals=3,
    )
    yield timeseries(
        "Accuracy (rolling window)",
        "Share of labelled events predicted right (p > 0.5 is a click).",
        targets((scores("riverline_model_accuracy_ratio"), "{{model}} p{{partition}}")),
        "percentunit",
        width=8,
        dashed="^batch.*",
    )
    yield timeseries(
        "ROC AUC since start (cumulative)",
        "ROC AUC over every labelled event the partition's model has scored.",
        targets((scores("riverline_model_roc_auc", "cumulative"), "{{model}} p{{partition}}")),
        "none",
        width=8,
        maximum=1,
        dashed="^batch.*",
        decimals=3,
    )
    yield timeseries(
        "Labelled events scored (cumulative)",
        "Labelled events behind each model's scores; the batch model scores once trained.",
        targets(
            (scores("riverline_model_labelled_events", "cumulative"), "{{model}} p{{partition}}")
        ),
        width=8,
        dashed="^batch.*",
    )

    yield row("Drift")
    yield timeseries(
        "Concept-drift alarms",
        "Alarms of the drift detector on the online model's loss (a rise of the loss).",
        targets(
            (
                "sum by (topic, partition, detector) "
                f"(increase(riverline_drift_alarms_total{{{PSEL}}}[{RATE}]))",
                "{{detector}} p{{partition}}",
            )
        ),
        bars=True,
        decimals=0,
    )
    yield timeseries(
        "Drift detector estimate (online mean Brier loss)",
        "The detector's running estimate of the online model's loss; a step up is a drift.",
        targets((f"riverline_drift_estimate{{{PSEL}}}", "{{detector}} p{{partition}}")),
        "none",
        minimum=0,
        decimals=3,
    )
    yield timeseries(
        "Data drift: PSI per feature (latest block vs reference)",
        "Population stability index of each watched feature; below 0.1 stable, above 0.25 a "
        "significant shift.",
        targets((f"riverline_data_drift_psi{{{PSEL}}}", "{{feature}} p{{partition}}")),
        "none",
        minimum=0,
        threshold_steps=((None, "transparent"), (0.1, "orange"), (0.25, "red")),
        decimals=3,
    )
    yield timeseries(
        "Label and prediction drift (PSI)",
        "PSI of the click label (the click rate) and of the online model's predictions.",
        targets(
            (f"riverline_label_drift_psi{{{PSEL}}}", "label p{{partition}}"),
            (f"riverline_prediction_drift_psi{{{PSEL}}}", "prediction p{{partition}}"),
        ),
        "none",
        minimum=0,
        threshold_steps=((None, "transparent"), (0.1, "orange"), (0.25, "red")),
        decimals=3,
    )

    yield row("Throughput and latency")
    yield timeseries(
        "Events/s: consumed, predicted, learned, dead-lettered",
        "consumed = predicted + dead-lettered; learned counts the labelled events.",
        targets(
            (f"sum(rate(riverline_events_consumed_total{{{PSEL}}}[{RATE}]))", "consumed"),
            (f"sum(rate(riverline_events_predicted_total{{{PSEL}}}[{RATE}]))", "predicted"),
            (f"sum(rate(riverline_events_learned_total{{{PSEL}}}[{RATE}]))", "learned"),
            (
                f"sum(rate(riverline_events_dead_lettered_total{{{PSEL}}}[{RATE}]))",
                "dead-lettered",
            ),
        ),
        "suffix: ev/s",
        minimum=0,
    )
    yield timeseries(
        "Events consumed/s by partition",
        "Input messages read per second, per partition and worker.",
        targets(
            (
                f"rate(riverline_events_consumed_total{{{PSEL}}}[{RATE}])",
                "p{{partition}} ({{instance}})",
            )
        ),
        "suffix: ev/s",
        minimum=0,
    )
    yield timeseries(
        "Dead letters/s by reason",
        "Messages sent to the dead-letter topic, by the riverline.reason header.",
        targets(
            (
                f"sum by (reason) (rate(riverline_events_dead_lettered_total{{{PSEL}}}[{RATE}]))",
                "{{reason}}",
            )
        ),
        "suffix: msg/s",
        width=8,
        minimum=0,
    )
    yield timeseries(
        "Processing latency p50 / p99 (poll to prediction)",
        "From poll to the prediction handed to the producer, per event.",
        targets(
            (histogram_quantile(0.5, "riverline_processing_latency_seconds"), "p50 {{instance}}"),
            (histogram_quantile(0.99, "riverline_processing_latency_seconds"), "p99 {{instance}}"),
        ),
        "s",
        width=8,
        minimum=0,
        dashed="^p50.*",
    )
    yield timeseries(
        "Busy polling (share of a core)",
        "Share of each worker's time its loop polled without waiting for the next fetch "
        "(--busy-poll-ms; 0 when off): the CPU it trades for latency. Near 100% the loop "
        "never sleeps.",
        targets((f"rate(riverline_busy_poll_seconds_total{{{SEL}}}[{RATE}])", "{{instance}}")),
        "percentunit",
        width=8,
        minimum=0,
    )

    yield row("Kafka, snapshots and rebalances")
    yield timeseries(
        "Consumer lag (messages)",
        "High watermark minus the worker's position, per partition.",
        targets((f"riverline_consumer_lag_messages{{{PSEL}}}", "p{{partition}} ({{instance}})")),
        minimum=0,
    )
    yield timeseries(
        "Snapshot age",
        "Seconds since each partition's last checkpoint; an idle partition is not "
        "snapshotted again, so its age grows harmlessly.",
        targets((f"riverline_snapshot_age_seconds{{{PSEL}}}", "p{{partition}} ({{instance}})")),
        "s",
        minimum=0,
    )
    yield timeseries(
        "Snapshot size",
        "Size of each partition's last snapshot (pickled learner).",
        targets((f"riverline_snapshot_size_bytes{{{PSEL}}}", "p{{partition}}")),
        "bytes",
        minimum=0,
    )
    yield timeseries(
        "Checkpoint duration p50 / p99",
        "Flush + snapshot write + offset (or transaction) commit. Keep the worst well below "
        "terminationGracePeriodSeconds.",
        targets(
            (histogram_quantile(0.5, "riverline_checkpoint_duration_seconds"), "p50 {{instance}}"),
            (histogram_quantile(0.99, "riverline_checkpoint_duration_seconds"), "p99 {{instance}}"),
        ),
        "s",
        minimum=0,
        dashed="^p50.*",
    )
    yield timeseries(
        "Rebalances",
        "Partitions assigned, revoked or lost per interval, over the selected workers.",
        targets(
            (
                f"sum by (kind) (increase(riverline_rebalances_total{{{SEL}}}[{RATE}]))",
                "{{kind}}",
            )
        ),
        width=8,
        bars=True,
        decimals=0,
    )
    yield timeseries(
        "Assigned partitions per worker",
        "Input partitions each worker owns.",
        targets((f"riverline_assigned_partitions{{{SEL}}}", "{{instance}}")),
        width=8,
        minimum=0,
        decimals=0,
    )
    yield timeseries(
        "Restore, batch-training and deploy-wait durations",
        "Time to restore a partition's snapshot at assignment; the last batch-baseline "
        "training (in the background); and the time the stream paused at a batch model's "
        "deploy point because its fit was not done yet (should stay 0).",
        targets(
            (f"riverline_restore_duration_seconds{{{PSEL}}}", "restore p{{partition}}"),
            (
                f"riverline_batch_training_duration_seconds{{{PSEL}}}",
                "batch training p{{partition}}",
            ),
            (
                f"increase(riverline_batch_deploy_wait_seconds_total{{{PSEL}}}[{RATE}])",
                "deploy wait p{{partition}}",
            ),
        ),
        "s",
        width=8,
        minimum=0,
    )


def layout(items: list[Panel]) -> list[Panel]:
    """Place panels left to right, wrapping at Grafana's 24 columns; number them."""
    x = y = row_height = 0
    out = []
    for n, item in enumerate(items, 1):
        panel = dict(item)
        w, h = panel.pop("_size")
        if x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        panel = {"id": n, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **panel}
        x += w
        row_height = max(row_height, h)
        if panel["type"] == "row":
            x, y, row_height = 0, y + h, 0
        out.append(panel)
    return out


def variable(name: str, label: str, query: str, *, multi: bool, sort: int = 1) -> dict:
    var = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "regex": "",
        "sort": sort,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "hide": 0,
        "options": [],
    }
    if multi:
        var["allValue"] = ".*"  # also matches partitions and workers that appear later
    return var


def dashboard() -> dict:
    return {
        "uid": "riverline",
        "title": "riverline: online learning on Kafka",
        "description": "Online vs batch model quality, drift, throughput, lag and snapshots "
        "of the riverline workers.",
        "tags": ["riverline", "kafka", "online-learning"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "version": 1,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "name": "Concept-drift alarms",
                    "datasource": DS,
                    "enable": True,
                    "hide": False,
                    "iconColor": "red",
                    "expr": f"changes(riverline_drift_alarms_total{{{PSEL}}}[1m]) > 0",
                    "step": "1m",
                    "titleFormat": "Concept-drift alarm",
                    "textFormat": "{{topic}}[{{partition}}] ({{detector}})",
                    "tagKeys": "partition,detector",
                    "useValueForTime": False,
                },
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "regex": "",
                    "refresh": 1,
                    "hide": 0,
                    "current": {},
                    "options": [],
                },
                variable("job", "Job", "label_values(riverline_build_info, job)", multi=False),
                variable(
                    "instance",
                    "Instance",
                    'label_values(riverline_build_info{job=~"$job"}, instance)',
                    multi=True,
                ),
                variable(
                    "partition",
                    "Partition",
                    "label_values(riverline_events_consumed_total"
                    '{job=~"$job", instance=~"$instance"}, partition)',
                    multi=True,
                    sort=3,
                ),
            ]
        },
        "panels": layout(list(panels())),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
