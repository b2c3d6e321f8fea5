"""`riverline demo` runs end to end: simulated clicks, a worker, progress, a summary."""

from __future__ import annotations

import io
import re

import pytest

from worker.demo import DemoOptions, run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_and_accounts_for_every_event(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.delenv("RIVERLINE_SNAPSHOT_KEY", raising=False)  # the demo brings its own
    out = io.StringIO()
    code = run_demo(DemoOptions(events=6000, rate=3000, bad_rate=0.01, metrics_port=0), out)
    text = out.getvalue()
    assert code == 0, text
    assert "rolling AUC online/batch" in text  # the live progress lines
    rows = re.findall(r"^\| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", text, re.M)
    assert [r[0] for r in rows] == ["0", "1"]
    consumed = sum(int(r[1].replace(",", "")) for r in rows)
    predicted = sum(int(r[2].replace(",", "")) for r in rows)
    dead = sum(int(r[4].replace(",", "")) for r in rows)
    assert consumed == 6000 and predicted + dead == consumed and dead > 0
    assert "consumed = predicted + dead-lettered: yes" in text
    assert "/metrics" in text
