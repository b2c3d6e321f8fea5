"""The JSON Schemas, their examples, and the codec's dead-letter classification."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema_rs
import msgspec
import orjson
import pytest

from tests.helpers import features_of
from worker.events import (
    DEAD_LETTER_SCHEMA,
    REASONS,
    ClickEvent,
    EventCodec,
    InvalidEvent,
    compile_schema,
    encode_prediction,
)
from worker.learner import PartitionLearner
from worker.models import make_model
from worker.simulate import SimulationConfig, generate

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
    assert EventCodec.load(max_event_bytes=MAX).decode(raw).event_id == "e1"
    with pytest.raises(InvalidEvent):
        EventCodec.load(max_event_bytes=MAX - 1).decode(raw)


@pytest.mark.parametrize(
    "path", sorted((EXAMPLES / "click-event" / "valid").glob("*.json")), ids=_id
)
def test_valid_example_events_decode(path: Path) -> None:
    raw = path.read_bytes()
    d = json.loads(raw)
    assert msgspec.structs.asdict(EventCodec.load().decode(raw)) == {
        "event_id": d["event_id"],
        "ts": d["ts"],
        "user_id": d["user_id"],
        "item_id": d["item_id"],
        "features": d.get("features", {}),
        "clicked": d.get("clicked"),
    }


@pytest.mark.parametrize(
    "path", sorted((EXAMPLES / "click-event" / "invalid").glob("*.json")), ids=_id
)
def test_invalid_example_events_are_schema_violations(path: Path) -> None:
    with pytest.raises(InvalidEvent) as info:
        EventCodec.load().decode(path.read_bytes())
    assert info.value.reason == "schema_violation"


# -- the fast path against the schema ---------------------------------------------------------
def _outcome(decode: Any, raw: bytes) -> str:
    """A decode's verdict with every value and its type (repr tells 5 from 5.0)."""
    try:
        return repr(decode(raw))
    except InvalidEvent as exc:
        return f"InvalidEvent({exc.reason})"


def _edge_cases() -> list[bytes]:
    """Valid events pushed one field at a time to and past each limit of the schema."""
    base = {**GOOD, "features": {"device": "ios", "position": 3, "score": 0.5}, "clicked": True}
    swaps: dict[str, list[Any]] = {
        "event_id": ["", "e", "x" * 200, "x" * 201, "é" * 200, "é" * 201, "😀" * 200, 5, None],
        "ts": [0, -1, 5.0, 5.5, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), True, "5", None],
        "user_id": ["", "u", "u" * 201, ["u"], {"u": 1}],
        "item_id": ["i" * 200, "", 0],
        "clicked": [True, False, None, 0, 1, "true", []],
        "features": [
            {},
            None,
            [],
            "ios",
            {"": 1},
            {"k" * 100: 1},
            {"k" * 101: 1},
            {"v": "s" * 1000},
            {"v": "s" * 1001},
            {"v": 2**63 - 1},
            {"v": 2**63},
            {"v": -(2**63)},
            {"v": -(2**63) - 1},
            {"v": 2**64},
            {"v": 1.7976931348623157e308},
            {"v": -0.0},
            {"v": 1e-320},
            {"v": None},
            {"v": [1]},
            {"v": {"w": 1}},
            {"user_id": "u2"},
            {"item_id": "i2", "ok": 1},
            {f"f{i}": i for i in range(64)},
            {f"f{i}": i for i in range(65)},
        ],
        "extra": ["x", 1, None, {"deep": [1, 2]}],
    }
    out = []
    for field, values in swaps.items():
        for value in values:
            # json, not orjson: orjson cannot write integers beyond 64 bits.
            out.append(json.dumps({**base, field: value}, ensure_ascii=False).encode())
        out.append(orjson.dumps({k: v for k, v in base.items() if k != field}))
    text = orjson.dumps(base).decode()
    out += [
        text.replace('"ts":5', '"ts":5,"ts":-1').encode(),  # duplicate keys: the last wins
        text.replace('"ts":5', '"ts":-1,"ts":5').encode(),
        text.replace('"ts":5', '"ts":1e400').encode(),
        text.replace('"score":0.5', '"score":1e400').encode(),
        text.replace('"score":0.5', '"score":-1E+2').encode(),
        text.replace('"score":0.5', '"score":NaN').encode(),
        text.replace('"u1"', '"\\ud800"').encode(),
        text.replace('"u1"', '"\\ud83d\\ude00"').encode(),
        text.replace('"u1"', '"\\u0000"').encode(),
        text.replace('"u1"', '"u\\n1"').encode(),
        text.replace('"u1"', '"u\n1"').encode(),  # a raw control character
        text.replace('"ios"', '"\xff"').encode("latin-1"),
        text.replace("}", ', "extra": 1e999}', 1).encode(),
        (" \n" + text + "\n ").encode(),
        b"\xef\xbb\xbf" + text.encode(),
        text.encode() + b"x",
        text[:-1].encode(),
    ]
    return out


def _fuzzed(n: int, seed: int = 7) -> list[bytes]:
    """Valid encodings with random bytes changed, dropped or repeated."""
    import random

    rng = random.Random(seed)
    events = [
        orjson.dumps({**GOOD, "features": {"device": "ios", "position": 3, "score": 0.25}}),
        orjson.dumps({**GOOD, "clicked": False, "features": {"r": True, "n": -12}}),
    ]
    alphabet = b'{}[]":,.-+0123456789eE truefalsnl\\xuU\xc3\xa9'
    out = []
    for _ in range(n):
        raw = bytearray(rng.choice(events))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(raw))
            op = rng.random()
            if op < 0.5:
                raw[i] = rng.choice(alphabet)
            elif op < 0.75:
                del raw[i]
            else:
                raw[i:i] = raw[i : i + rng.randint(1, 6)]
        out.append(bytes(raw))
    return out


def test_the_fast_path_gives_the_schemas_verdict_and_values() -> None:
    """decode() (msgspec in one pass) and decode_reference() (orjson, then the schema)
    agree on every input: the same reason, or the same event with the same types."""
    codec = EventCodec.load()
    cases = (
        _edge_cases()
        + [raw for _, raw, _ in BAD if raw is not None and len(raw) <= MAX]
        + [p.read_bytes() for p in sorted((EXAMPLES / "click-event").glob("*/*.json"))]
        + _fuzzed(4000)
    )
    verdicts = Counter()
    for raw in cases:
        fast = _outcome(codec.decode, raw)
        assert fast == _outcome(codec.decode_reference, raw), raw
        verdicts[fast.startswith("ClickEvent")] += 1
    # Both kinds are well represented, so the comparison means something.
    assert verdicts[True] > 100 and verdicts[False] > 1000, verdicts


def test_feature_names_are_checked_however_many_the_codec_has_seen(monkeypatch: Any) -> None:
    """The codec remembers valid feature names (msgspec checks none of them, to keep its
    key cache): a name is only remembered once valid, and past the limit new names are
    still checked one by one."""
    import worker.events as events

    monkeypatch.setattr(events, "MAX_KNOWN_NAMES", 3)
    codec = EventCodec.load()
    bad = [{"user_id": "u2"}, {"item_id": "i2"}, {"": 1}, {"k" * 101: 1}]
    for features in bad:  # refused before any name is known...
        with pytest.raises(InvalidEvent) as info:
            codec.decode(_json(features=features))
        assert info.value.reason == "schema_violation"
    assert codec.names == set()
    for i in range(6):  # ...valid names fill the set up to its limit, then no further
        codec.decode(_json(features={f"f{i}": i, "k" * 100: "long but valid"}))
    assert len(codec.names) == 3 and "k" * 100 in codec.names
    assert codec.decode(_json(features={"f5": 5})).features == {"f5": 5}  # f5 not kept
    for features in bad:  # ...and refused as before, alone or beside known names
        for raw in (_json(features=features), _json(features={**features, "f0": 0})):
            with pytest.raises(InvalidEvent) as info:
                codec.decode(raw)
            assert info.value.reason == "schema_violation"
    assert len(codec.names) == 3


def test_simulated_events_take_the_fast_path() -> None:
    """The common case never reaches orjson or jsonschema-rs."""
    from worker.events import _FAST

    for ev in generate(SimulationConfig(n_events=500, seed=2, scenario="abrupt", drift_at=250)):
        _FAST.decode(orjson.dumps(ev))  # raises if the fast path refused it


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
        # What the worker publishes: encode_prediction's bytes.
        published = orjson.loads(encode_prediction(pred))
        validator.validate(published)
        assert published == pred.as_dict()
        preds.append(pred)
    assert [p.model_version for p in preds] == ["3:0", "3:1", "3:1", "3:1", "3:2"]
    assert [p.offset for p in preds] == [100, 101, 102, 103, 104]
    assert {p.partition for p in preds} == {3}
    assert preds[0].click_probability == 0.5  # before any learning
    assert preds[1].click_probability > 0.5  # after one click of u1 on i1
    assert learner.learned == 3 and learner.predicted == 5


def test_the_model_input_is_the_oracles_x_in_the_same_key_order() -> None:
    """ClickEvent.x() (the worker's) equals the tests' own construction of x, key order
    included: a model's float sums follow that order."""
    codec = EventCodec.load()
    events = list(generate(SimulationConfig(n_events=500, seed=3)))
    events.append({"event_id": "bare", "ts": 1, "user_id": "u", "item_id": "i"})
    for ev in events:
        got = codec.decode(orjson.dumps(ev)).x()
        want = features_of(ev)
        assert list(got.items()) == list(want.items())


def test_x_is_built_in_the_events_own_features_never_in_the_callers_dict() -> None:
    """x() adds the ids to the event's features dict (one object less per event): the
    decoder gives each event a dict of its own, and from_dict copies the caller's."""
    codec = EventCodec.load()
    bare = b'{"event_id":"e","ts":1,"user_id":"u","item_id":"i"}'
    first, second = codec.decode(bare), codec.decode(bare)
    assert first.x() is not second.x()  # the {} default is not shared between events
    given = {"event_id": "e", "ts": 1, "user_id": "u", "item_id": "i", "features": {"a": 1}}
    event = ClickEvent.from_dict(given)
    assert event.x() == {"a": 1, "user_id": "u", "item_id": "i"}
    assert given["features"] == {"a": 1}
