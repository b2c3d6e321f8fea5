"""The benchmark deletes the topics it made, on a real broker, and no others."""

from __future__ import annotations

import time
import uuid
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
