"""The benchmark's own arithmetic (bench/run.py): its percentiles, windows and the
latency runs' warm-up split. The runs themselves need a broker and minutes; these
helpers decide what their figures mean."""

from __future__ import annotations

import datetime as dt
import doctest
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import BENCH, load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("bench_run")


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


def _run(p99: int, loop_cpu: float, polling: float | None) -> dict:
    return {
        "rate": 20_000.0,
        "achieved_rate": 19_990.0,
        "n": 400_000,
        "p50_ms": 10,
        "p99_ms": p99,
        "p999_ms": p99 + 10,
        "max_ms": p99 + 20,
        "in_p99_ms": 4,
        "in_max_ms": 9,
        "worker_p50_ms": 9,
        "worker_p99_ms": p99 - 4,
        "worker_max_ms": p99 + 15,
        "whole_p99_ms": p99 + 1,
        "warmup_p99_ms": 60,
        "warmup_max_ms": 70,
        "loop_cpu_us_per_click": loop_cpu,
        "busy_poll_cpu_us_per_click": polling,
        "max_ms_by_second": [p99],
    }


def test_a_busy_poll_series_is_summarised_and_rendered_apart(bench: ModuleType) -> None:
    """The latency runs with --busy-poll-ms are a series of their own: its medians, the
    loop's own CPU per click apart from the CPU it spent polling, and its setting named
    in the paragraph; the default series says nothing of polling."""
    default = bench._summary(
        [_run(80, 29.0, None), _run(60, 28.0, None), _run(70, 30.0, None)],
        [1, 2, 3],
        20_000.0,
        2.0,
        0.0,
    )
    polled = bench._summary(
        [_run(40, 23.0, 9.0), _run(30, 22.0, 11.0), _run(35, 24.0, 10.0)],
        [1, 2, 3],
        20_000.0,
        2.0,
        3.0,
    )
    assert (default["p99_ms"], default["loop_cpu_us_per_click"]) == (70, 29.0)
    assert default["busy_poll_cpu_us_per_click"] is None
    assert (polled["p99_ms"], polled["loop_cpu_us_per_click"]) == (35, 23.0)
    assert polled["busy_poll_cpu_us_per_click"] == 10.0
    text = bench.render_latency(polled)
    assert "`--busy-poll-ms 3`" in text and "**median p99 35 ms**" in text
    assert "its own work: median 23.0 µs; polling without waiting: 10.0 µs." in text
    plain = bench.render_latency(default)
    assert "busy-poll" not in plain and "its own work: median 29.0 µs." in plain


def test_runs_are_split_by_the_hypervisors_steal(bench: ModuleType) -> None:
    """Each run carries the share of the machine's CPU the hypervisor took while it ran:
    the summary counts the runs at most QUIET_STEAL_PCT apart from the others, with each
    group's median p99, and the paragraph says so and gives every run's steal."""
    runs = [_run(30, 30.0, None), _run(200, 30.0, None), _run(40, 30.0, None), _run(90, 30.0, None)]
    for one, steal in zip(runs, (0.4, 9.5, 1.5, 2.5), strict=True):
        one["steal_pct"] = steal
        one["steal_pct_by_second"] = [steal, None]
    lat = bench._summary(runs, [1, 2, 3], 20_000.0, 2.0, 0.0)
    assert bench.QUIET_STEAL_PCT == 2.0
    assert (lat["quiet_runs"], lat["quiet_p99_ms"]) == (2, 35)
    assert (lat["busy_runs"], lat["busy_p99_ms"]) == (2, 145)
    assert lat["steal_pct"] == 2.0  # the median of 0.4, 1.5, 2.5, 9.5
    text = bench.render_latency(lat)
    assert "Runs at most 2 % stolen: 2, median p99 35.0 ms; more: 2, median p99 145.0 ms." in text
    assert "The hypervisor's steal: 9.5 % of the CPU time; each second: 9.5, n/a %." in text
    # Runs without the figure (another OS, older reports) are in neither group.
    del runs[0]["steal_pct"]
    lat = bench._summary(runs, [1, 2, 3], 20_000.0, 2.0, 0.0)
    assert lat["quiet_runs"] + lat["busy_runs"] == 3


def test_steal_is_the_share_of_cpu_time_between_two_samples(bench: ModuleType) -> None:
    samples = [(100, 10_000), (110, 10_200), (150, 10_400), None]
    assert bench.steal_pct(samples, 0, 1) == 5.0
    assert bench.steal_pct(samples, 1, 2) == 20.0
    assert bench.steal_pct(samples, 0, 2) == 12.5
    assert bench.steal_pct(samples, 2, 3) is None
    assert bench.steal_pct([(5, 100), (5, 100)]) is None  # no time passed


def test_the_click_producers_linger_is_named_in_the_paragraph(bench: ModuleType) -> None:
    """The load generator's linger is part of every click's latency: the paragraph says
    which one a run used; reports written before the setting existed used 1 ms."""
    assert bench.CLICK_LINGER_MS == 5.0  # librdkafka's default
    lat = bench._summary([_run(30, 30.0, None), _run(40, 30.0, None)], [1, 2], 20_000.0, 2.0, 0.0)
    text = bench.render_latency({**lat, "click_linger_ms": 5.0})
    assert text.count("clicks from a producer lingering 5 ms") == 1
    assert "clicks from a producer lingering 1 ms" in bench.render_latency(lat)


def test_a_bad_click_linger_stops_the_bench_with_the_flag_named() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--click-linger-ms", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--click-linger-ms must be between 0 and 1000, got -1" in done.stderr


def test_the_brokers_stops_are_counted_after_the_warmup_and_listed_per_run(
    bench: ModuleType, tmp_path: Path
) -> None:
    """A latency run lists the broker JVM's stops of BROKER_PAUSE_MS or more from its
    safepoint log, timed from the run's first click; the summary counts those after the
    warm-up, and the paragraph gives both. Without a log (a broker of the user's own)
    neither is claimed."""
    log = tmp_path / "safepoints.log"
    t0 = 1_800_000_000.0  # the run's first click, seconds since the epoch

    def line(at: float, ns: int, cause: str) -> str:
        ended = dt.datetime.fromtimestamp(t0 + at, dt.UTC)
        stamp = ended.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ended.microsecond // 1000:03d}+0000"
        return (
            f'[{stamp}] Safepoint "{cause}", Time since last: 1 ns, Reaching safepoint: '
            f"1 ns, Cleanup: 1 ns, At safepoint: 1 ns, Total: {ns} ns\n"
        )

    log.write_text(
        line(1.0, 30_000_000, "G1CollectForAllocation")  # in the warm-up (2 s)
        + line(5.0, 94_560, "Cleanup")  # too short to list
        + line(11.3426, 42_600_000, "G1CollectForAllocation")
        + line(25.0, 50_000_000, "G1CollectForAllocation")  # after the last click
    )
    os.utime(log, (t0 + 22.0, t0 + 22.0))  # written during the run
    rotated = log.with_name("safepoints.log.0")
    rotated.write_text(line(3.0, 60_000_000, "G1CollectForAllocation"))
    os.utime(rotated, (t0 - 1.0, t0 - 1.0))  # rotated out before the run: not read
    pauses = bench.jvm_pauses(log, t0, t0 + 22.0)
    assert pauses == [
        (0.97, 30.0, "G1CollectForAllocation"),
        (11.299, 42.6, "G1CollectForAllocation"),  # ms stamps
    ]
    assert bench.jvm_pauses(tmp_path / "other.log", t0, t0 + 22.0) is None

    runs = [_run(30, 30.0, None), _run(90, 30.0, None), _run(40, 30.0, None)]
    runs[0]["broker_pauses"] = []
    runs[1]["broker_pauses"] = pauses
    runs[2]["broker_pauses"] = [(20.5, 7.0, "ZMarkStart")]
    lat = bench._summary(runs, [1, 2, 3], 20_000.0, 2.0, 0.0)
    assert (lat["broker_pauses_n"], lat["broker_pause_max_ms"]) == (2, 42.6)
    text = bench.render_latency(lat)
    assert (
        "The broker's JVM stopped for 5 ms or more 2 times after the warm-ups (the longest 42.6 ms)."
        in text
    )
    assert "The broker's JVM did not stop for 5 ms or more." in text
    assert (
        "The broker's JVM stopped for 30 ms at 1.0 s (G1CollectForAllocation), 42.6 ms at "
        "11.3 s (G1CollectForAllocation)." in text
    )
    for one in runs:
        del one["broker_pauses"]
    lat = bench._summary(runs, [1, 2, 3], 20_000.0, 2.0, 0.0)
    assert lat["broker_pauses_n"] is None
    assert "JVM" not in bench.render_latency(lat)
