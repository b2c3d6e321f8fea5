"""The benchmark on a real broker: it deletes the topics it made and no others, and a
latency run measures every click."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.helpers import load_bench

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("bench_run_topics")


def _create(admin: AdminClient, *names: str) -> None:
    for future in admin.create_topics([NewTopic(n, 1, 1) for n in names]).values():
        future.result(30)


def _listed(admin: AdminClient) -> set[str]:
    return set(admin.list_topics(timeout=30).topics)


def test_the_bench_deletes_the_topics_it_made_and_no_others(
    bench: ModuleType,
    kafka_bootstrap: str,
    kafka_admin: AdminClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = uuid.uuid4().hex[:8]
    # The bench's prefix narrowed to this test's, so that a bench running on the same
    # broker meanwhile keeps its topics.
    monkeypatch.setattr(bench, "BENCH_PREFIX", f"bench-t{tag}-")
    users = f"bench-t{tag}-users-own"  # a bench-… topic that was there before the bench
    other = f"clicks-{tag}"  # not the bench's name at all
    _create(kafka_admin, users, other)
    try:
        _check(bench, kafka_bootstrap, kafka_admin, tag, users, other)
    finally:
        kafka_admin.delete_topics([users, other])


def _check(
    bench: ModuleType,
    kafka_bootstrap: str,
    kafka_admin: AdminClient,
    tag: str,
    users: str,
    other: str,
) -> None:
    before = bench.bench_topics(kafka_bootstrap)
    assert users in before and other not in before
    made = [f"bench-t{tag}-lat", f"bench-t{tag}-lat-pred", f"bench-t{tag}-1.state"]
    _create(kafka_admin, *made)

    bench.done(kafka_bootstrap, None, before)

    deadline = time.monotonic() + 30
    while set(made) & _listed(kafka_admin) and time.monotonic() < deadline:
        time.sleep(0.2)
    listed = _listed(kafka_admin)
    assert not set(made) & listed
    assert {users, other} <= listed
    # A name never made (a worker that never started leaves no dead-letter topic) is
    # not a failure.
    assert bench.drop_topics(kafka_bootstrap, [f"bench-t{tag}-never"]) == []


def test_a_latency_run_measures_every_click_and_asks_for_the_brokers_stops_in_its_window(
    bench: ModuleType, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One short latency run end to end on the real broker, with a real worker: every
    click sent after the warm-up is matched to its prediction and measured, and the
    broker's safepoint log is read for exactly the window in which the clicks were sent
    (the parsing itself: tests/unit/test_bench.py)."""
    asked: list[tuple[object, float, float]] = []
    stop = (1.25, 42.0, "G1CollectForAllocation")

    def pauses(log: object, since: float, until: float) -> list[tuple[float, float, str]]:
        asked.append((log, since, until))
        return [stop]

    monkeypatch.setattr(bench, "jvm_pauses", pauses)
    log = tmp_path / "safepoints.log"
    before = time.time()
    pooled: list[int] = []
    one = bench.latency(kafka_bootstrap, 2000.0, 3.0, 1000, pooled, warmup=1.0, safepoint_log=log)
    assert one["n"] == 6000 and one["warmup_n"] == 2000, one
    assert len(pooled) == 6000
    assert 0 <= one["p50_ms"] <= one["p99_ms"] <= one["max_ms"]
    assert len(one["max_ms_by_second"]) == 4  # the warm-up's second first
    [(asked_log, since, until)] = asked
    assert asked_log == log
    assert since == one["started_at"] and before < since < time.time()
    assert 3.9 < until - since < 6.0  # the 4 s of clicks, sent on schedule
    assert one["broker_pauses"] == [stop]
    text = bench.render_latency(one)
    assert "The broker's JVM stopped for 42 ms at 1.2 s (G1CollectForAllocation)." in text
