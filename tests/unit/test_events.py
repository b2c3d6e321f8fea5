"""The JSON Schemas, their examples, and the codec's dead-letter classification."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import pytest

from worker.events import (
    DEAD_LETTER_SCHEMA,
    REASONS,
    EventCodec,
    InvalidEvent,
    compile_schema,
    features_of,
)
from worker.learner import PartitionLearner
from worker.models import make_model

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
EXAMPLES = SCHEMAS / "examples"
KINDS = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())


def _files(verdict: str) -> list[Path]:
    return sorted(EXAMPLES.glob(f"*/{verdict}/*.json"))


def _validator(kind: str) -> Any:
    schema = SCHEMAS / f"{kind}.schema.json"
    assert schema.is_file(), f"examples/{kind} has no schema {schema.name}"
    return jsonschema_rs.validator_for(json.loads(schema.read_text()))


def _id(path: Path) -> str:
    return f"{path.parts[-3]}/{path.stem}"


def test_every_schema_has_valid_and_invalid_examples() -> None:
    schemas = sorted(p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json"))
    assert schemas == KINDS
    for kind in KINDS:
        assert list((EXAMPLES / kind / "valid").glob("*.json")), f"{kind}: no valid example"
        assert list((EXAMPLES / kind / "invalid").glob("*.json")), f"{kind}: no invalid example"


@pytest.mark.parametrize("path", _files("valid"), ids=_id)
def test_valid_example_validates(path: Path) -> None:
    instance = json.loads(path.read_text())
    _validator(path.parts[-3]).validate(instance)  # raises with the reason


@pytest.mark.parametrize("path", _files("invalid"), ids=_id)
def test_invalid_example_is_rejected(path: Path) -> None:
    instance = json.loads(path.read_text())
    assert not _validator(path.parts[-3]).is_valid(instance)


def test_the_worker_compiles_the_same_dead_letter_schema() -> None:
    validator = compile_schema(DEAD_LETTER_SCHEMA)
    for path in (EXAMPLES / "dead-letter" / "valid").glob("*.json"):
        assert validator.is_valid(json.loads(path.read_text()))
    enum = json.loads((SCHEMAS / DEAD_LETTER_SCHEMA).read_text())["properties"]["riverline.reason"][
        "enum"
    ]
    assert tuple(enum) == REASONS


# -- decoding --------------------------------------------------------------------------------
MAX = 256
GOOD = {"event_id": "e1", "ts": 5, "user_id": "u1", "item_id": "i1"}


def _json(**over: Any) -> bytes:
    return orjson.dumps({**GOOD, **over})


def _without(key: str) -> bytes:
    return orjson.dumps({k: v for k, v in GOOD.items() if k != key})


BAD: list[tuple[str, bytes | None, str]] = [
    ("null", None, "empty_value"),
    ("empty", b"", "empty_value"),
    ("oversized", _json(pad="x" * MAX), "oversized"),
    ("oversized-not-even-json", b"\xff" * (MAX + 1), "oversized"),
    ("latin1", b'{"event_id": "caf\xe9", "ts": 1, "user_id": "u", "item_id": "i"}', "invalid_utf8"),
    ("utf8-truncated", b'{"event_id": "\xc3', "invalid_utf8"),
    ("truncated", b'{"event_id": "e1", "ts": 1,', "invalid_json"),
    ("trailing-garbage", _json() + b"x", "invalid_json"),
    ("words", b"not json", "invalid_json"),
    ("whitespace", b"   ", "invalid_json"),
    ("single-quotes", b"{'event_id': 'e1'}", "invalid_json"),
    ("nan-literal", b'{"event_id":"e1","ts":1,"user_id":"u","item_id":"i","features":{"x":NaN}}', "non_finite_number"),
    ("infinity-literal", b'{"event_id":"e1","ts":1,"user_id":"u","item_id":"i","features":{"x":Infinity}}', "non_finite_number"),
    ("minus-infinity", b'{"event_id":"e1","ts":1,"user_id":"u","item_id":"i","features":{"x":-Infinity}}', "non_finite_number"),
    ("1e999", b'{"event_id":"e1","ts":1,"user_id":"u","item_id":"i","features":{"x":1e999}}', "non_finite_number"),
    ("-1e400", b'{"event_id":"e1","ts":1,"user_id":"u","item_id":"i","features":{"x":-1e400}}', "non_finite_number"),
    ("missing-event-id", _without("event_id"), "schema_violation"),
    ("missing-ts", _without("ts"), "schema_violation"),
    ("feature-user-id", _json(features={"user_id": "u2"}), "schema_violation"),
    ("feature-item-id", _json(features={"item_id": "i2"}), "schema_violation"),
    ("feature-list", _json(features={"tags": ["a"]}), "schema_violation"),
    ("feature-object", _json(features={"o": {"a": 1}}), "schema_violation"),
    ("feature-null", _json(features={"x": None}), "schema_violation"),
    ("clicked-string", _json(clicked="yes"), "schema_violation"),
    ("clicked-int", _json(clicked=1), "schema_violation"),
    ("ts-negative", _json(ts=-1), "schema_violation"),
    ("ts-fraction", _json(ts=1.5), "schema_violation"),
    ("empty-user", _json(user_id=""), "schema_violation"),
    ("array", b"[1, 2]", "schema_violation"),
    ("string", b'"hello"', "schema_violation"),
    ("number", b"42", "schema_violation"),
    ("null-json", b"null", "schema_violation"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_decode_classifies_bad_input(raw: bytes | None, reason: str) -> None:
    codec = EventCodec.load(max_event_bytes=MAX)
    with pytest.raises(InvalidEvent) as info:
        codec.decode(raw)
    assert info.value.reason == reason, str(info.value)
    assert info.value.reason in REASONS
    assert str(info.value)  # a human-readable cause for riverline.error


def test_every_reason_but_model_error_comes_from_the_codec() -> None:
    assert {reason for *_, reason in BAD} == set(REASONS) - {"model_error"}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        # orjson refuses a lone surrogate escape (it cannot become a valid str); the
        # standard library accepts it, so it must not be blamed on NaN or Infinity.
        (b'{"event_id": "\\ud800", "ts": 1, "user_id": "u", "item_id": "i"}', "lone surrogate"),
        # A UTF-8 byte-order mark is not JSON (RFC 8259 section 8.1).
        (b'\xef\xbb\xbf{"event_id": "e1", "ts": 1, "user_id": "u", "item_id": "i"}', "BOM"),
    ],
    ids=["lone-surrogate", "utf8-bom"],
)
def test_json_the_standard_library_accepts_is_not_called_non_finite(raw: bytes, why: str) -> None:
    codec = EventCodec.load()
    with pytest.raises(InvalidEvent) as info:
        codec.decode(raw)
    assert info.value.reason == "invalid_json", f"{why}: {info.value.reason}: {info.value}"


def test_schema_violation_message_names_the_field() -> None:
    codec = EventCodec.load()
    with pytest.raises(InvalidEvent) as info:
        codec.decode(_without("event_id"))
    assert "event_id" in str(info.value)
    with pytest.raises(InvalidEvent) as info:
        codec.decode(_json(clicked="yes"))
    assert "clicked" in str(info.value)


def test_size_limit_is_inclusive() -> None:
    raw = _json(pad="")
    raw = _json(pad="x" * (MAX - len(raw)))
    assert len(raw) == MAX
    assert EventCodec.load(max_event_bytes=MAX).decode(raw)["pad"]
    with pytest.raises(InvalidEvent):
        EventCodec.load(max_event_bytes=MAX - 1).decode(raw)


@pytest.mark.parametrize(
    "path", sorted((EXAMPLES / "click-event" / "valid").glob("*.json")), ids=_id
)
def test_valid_example_events_decode(path: Path) -> None:
    raw = path.read_bytes()
    assert EventCodec.load().decode(raw) == json.loads(raw)


@pytest.mark.parametrize(
    "path", sorted((EXAMPLES / "click-event" / "invalid").glob("*.json")), ids=_id
)
def test_invalid_example_events_are_schema_violations(path: Path) -> None:
    with pytest.raises(InvalidEvent) as info:
        EventCodec.load().decode(path.read_bytes())
    assert info.value.reason == "schema_violation"


def test_features_of() -> None:
    ev = {**GOOD, "features": {"device": "ios", "position": 3}, "clicked": True}
    assert features_of(ev) == {"user_id": "u1", "item_id": "i1", "device": "ios", "position": 3}
    assert features_of(GOOD) == {"user_id": "u1", "item_id": "i1"}
    assert "clicked" not in features_of(ev) and "ts" not in features_of(ev)


# -- predictions -----------------------------------------------------------------------------
def test_predictions_validate_against_the_prediction_schema() -> None:
    validator = _validator("prediction")
    codec = EventCodec.load()
    learner = PartitionLearner("clicks", 3, make_model("logreg"), window=10)
    events = [
        _json(event_id="a", clicked=True, features={"device": "ios", "score": 0.5}),
        _json(event_id="b", clicked=None),
        _json(event_id="c"),  # no label at all
        _json(event_id="d", clicked=False, features={"returning": True}),
        _json(event_id="e", clicked=True),
    ]
    preds = []
    for offset, raw in enumerate(events, start=100):
        pred = learner.predict_learn(codec.decode(raw), offset)
        validator.validate(pred)
        # The worker publishes orjson bytes: those must validate too.
        validator.validate(orjson.loads(orjson.dumps(pred)))
        preds.append(pred)
    assert [p["model_version"] for p in preds] == ["3:0", "3:1", "3:1", "3:1", "3:2"]
    assert [p["offset"] for p in preds] == [100, 101, 102, 103, 104]
    assert {p["partition"] for p in preds} == {3}
    assert preds[0]["click_probability"] == 0.5  # before any learning
    assert preds[1]["click_probability"] > 0.5  # after one click of u1 on i1
    assert learner.learned == 3 and learner.predicted == 5
