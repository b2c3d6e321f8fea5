"""The benchmark's own arithmetic (bench/run.py): its percentiles, windows and the
latency runs' warm-up split. The runs themselves need a broker and minutes; these
helpers decide what their figures mean."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


def test_doctests(bench: ModuleType) -> None:
    failed, attempted = doctest.testmod(bench)
    assert attempted >= 3
    assert failed == 0


def test_warmup_clicks_are_left_out_by_send_order_not_read_order(bench: ModuleType) -> None:
    # Read back out of send order (a producer without idempotence may reorder): the
    # click sent third is a warm-up click wherever it was read.
    latencies = [100, 5, 90, 6, 7, 8]
    sent = [0, 3, 2, 1, 4, 5]
    warm, measured = bench.split_warmup(latencies, sent, 3)
    assert warm == [100, 90, 6]
    assert measured == [5, 7, 8]
    # No warm-up: everything is measured.
    assert bench.split_warmup(latencies, sent, 0) == ([], latencies)


def test_p99_of_the_measured_window_excludes_a_slow_start(bench: ModuleType) -> None:
    # 1,000 clicks: the first 100 (the warm-up) slow, the rest at 10 ms but one in 100.
    latencies = [120] * 100 + [10 if i % 100 else 45 for i in range(900)]
    sent = list(range(1000))
    warm, measured = bench.split_warmup(latencies, sent, 100)
    assert bench.percentile(sorted(measured), 0.99) == 45
    assert bench.percentile(sorted(warm), 0.99) == 120
    # Over the whole run the slow start sets the p99 alone.
    assert bench.percentile(sorted(latencies), 0.99) == 120
