"""One broker for the whole test session, and unique topics for every test.

The ``kafka_bootstrap`` fixture yields a bootstrap address, in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` when set (an existing cluster);
2. testcontainers' Kafka when a Docker engine answers;
3. the local broker (``worker.broker.LocalBroker``), started here on a free port and
   stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tests.helpers import wait_until_listed

REPO = Path(__file__).resolve().parents[1]


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no socket, no package: all mean "no"
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from worker.broker import LocalBroker, free_port

    # The jars are shared between sessions (Maven is slow to ask); data is per session.
    state = Path(os.environ.get("RIVERLINE_TEST_BROKER_DIR", REPO / ".riverline" / "test-broker"))
    broker = LocalBroker(state_dir=state, port=free_port())
    broker.stop()  # a broker left behind by a killed session
    data = state / "data"
    if data.exists():
        import shutil

        shutil.rmtree(data)
    address = broker.start()
    try:
        yield address
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


TopicFactory = Callable[..., str]


@pytest.fixture
def new_topic(kafka_admin: AdminClient, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Create topics with names unique to this test: ``new_topic("clicks", partitions=4)``."""
    created: list[str] = []

    def make(prefix: str = "t", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
        )
        for fut in futures.values():
            fut.result(timeout=30)
        created.append(name)
        wait_until_listed(kafka_admin, name, partitions)
        return name

    yield make
    if created:
        with contextlib.suppress(Exception):
            for fut in kafka_admin.delete_topics(created).values():
                fut.result(timeout=30)
