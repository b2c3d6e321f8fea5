"""The README's configuration and metrics tables are checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import featured_stats
from worker.config import markdown_table
from worker.metrics import WorkerCollector

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_configuration_table_is_the_one_the_code_generates() -> None:
    assert markdown_table() in README, (
        "README's configuration table differs from worker.config.OPTIONS; paste "
        "`python -c 'from worker.config import markdown_table; print(markdown_table())'`"
    )


def _exported_names() -> set[str]:
    """Every sample name a fully featured worker exports, with their family types."""
    stats = featured_stats()
    names = set()
    for family in WorkerCollector(stats).collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
        assert family.samples, f"{family.name} exported no sample"
    return names


def test_the_metrics_table_lists_exactly_the_exported_metrics() -> None:
    documented = set(re.findall(r"^\| `(riverline_[a-z_]+)` \|", README, flags=re.M))
    exported = _exported_names()
    assert exported - documented == set(), "exported but not in README's metrics table"
    assert documented - exported == set(), "in README's metrics table but not exported"
