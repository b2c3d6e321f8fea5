"""`riverline evaluate` reports what the worker reports for the same stream (one partition)."""

from __future__ import annotations

import pickle
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from tests.conftest import TopicFactory
from tests.helpers import assert_same_scores
from worker.config import settings_from_mapping
from worker.evaluate import encoded, evaluate
from worker.loop import Worker
from worker.simulate import SimulationConfig, generate
from worker.snapshots import Signer, SnapshotStore

pytestmark = pytest.mark.integration

KEY = "evaluate-equals-worker-key-0123"


def test_evaluate_numbers_equal_the_workers(kafka_bootstrap: str, new_topic: TopicFactory) -> None:
    cfg = SimulationConfig(n_events=40_000, seed=11, scenario="abrupt", drift_at=20_000)
    events = list(generate(cfg))
    clicks = new_topic("clicks", partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 10})
    for ev in events:
        producer.produce(clicks, orjson.dumps(ev), ev["user_id"].encode())
    assert producer.flush(60) == 0

    learner_flags: dict[str, Any] = {
        "baseline_window": 2000,
        "baseline_deploy_delay": 3000,  # serves from 5,000 labelled events on
        "drift_grace": 500,
        "data_drift_block": 1000,
        "window": 500,
    }
    settings = settings_from_mapping(
        {
            "bootstrap_servers": kafka_bootstrap,
            "input_topic": clicks,
            "output_topic": new_topic("predictions"),
            "dead_letter_topic": new_topic("dlq"),
            "state_topic": new_topic("state", config={"cleanup.policy": "compact"}),
            "group_id": f"g-{clicks}",
            "metrics_address": "off",
            "exit_when_idle": 2.0,
            "commit_interval": 1.0,
            **learner_flags,
        },
        env={"RIVERLINE_SNAPSHOT_KEY": KEY},
    )
    worker = Worker(settings)
    worker.run()
    assert settings.state_topic is not None
    store = SnapshotStore(
        {"bootstrap.servers": kafka_bootstrap},
        settings.group_id,
        clicks,
        settings.state_topic,
        Signer(KEY.encode()),
    )
    restored = store.read_latest(0)
    assert restored is not None and restored.manifest.next_offset == len(events)
    state = pickle.loads(restored.payload)

    result = evaluate(
        encoded(events),
        window=500,
        options=settings.learner_options(),
        drift_point=cfg.drift_point,
    )
    assert result.events == len(events)
    assert_same_scores(state["scores"].cumulative(), result.final["online"])
    assert_same_scores(state["scores"].rolling(), result.final["online_rolling"])
    assert_same_scores(state["batch_scores"].cumulative(), result.final["batch"])
    assert_same_scores(state["batch_scores"].rolling(), result.final["batch_rolling"])
    assert state["drift"].alarms == len(result.alarms) >= 1
    assert state["baseline"].trainings == len(result.trainings) == 1
    assert state["data_drift"].scores == result.psi
