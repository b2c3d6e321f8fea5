"""Decode, validate and encode events against the JSON Schemas in ``schemas/``.

The schema files are the one source of truth: they are compiled once (jsonschema-rs,
in Rust) and every click event is checked against them on the hot path.

>>> codec = EventCodec.load()
>>> ev = codec.decode(b'{"event_id":"e1","ts":1,"user_id":"u1","item_id":"i1","clicked":true}')
>>> ev["clicked"]
True
>>> try:
...     codec.decode(b'{"event_id":"e1"}')
... except InvalidEvent as exc:
...     print(exc.reason)
schema_violation
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jsonschema_rs
import orjson

from worker.errors import ConfigError

# Dead-letter reason codes (also the values of the `reason` label in metrics).
EMPTY_VALUE: Final = "empty_value"
OVERSIZED: Final = "oversized"
INVALID_UTF8: Final = "invalid_utf8"
INVALID_JSON: Final = "invalid_json"
NON_FINITE_NUMBER: Final = "non_finite_number"
SCHEMA_VIOLATION: Final = "schema_violation"
MODEL_ERROR: Final = "model_error"
REASONS: Final = (
    EMPTY_VALUE,
    OVERSIZED,
    INVALID_UTF8,
    INVALID_JSON,
    NON_FINITE_NUMBER,
    SCHEMA_VIOLATION,
    MODEL_ERROR,
)

CLICK_EVENT_SCHEMA: Final = "click-event.schema.json"
PREDICTION_SCHEMA: Final = "prediction.schema.json"
DEAD_LETTER_SCHEMA: Final = "dead-letter.schema.json"


class InvalidEvent(Exception):
    """A message that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def schema_dir() -> Path:
    """Where the schema files are: $RIVERLINE_SCHEMA_DIR, else the checkout's schemas/."""
    env = os.environ.get("RIVERLINE_SCHEMA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "schemas"
    if not (path / CLICK_EVENT_SCHEMA).is_file():
        raise ConfigError(
            f"cannot find {CLICK_EVENT_SCHEMA} in {path}; set RIVERLINE_SCHEMA_DIR to the "
            "directory holding riverline's schemas/"
        )
    return path


def load_schema(name: str, directory: Path | None = None) -> dict[str, Any]:
    path = (directory or schema_dir()) / name
    try:
        schema: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read JSON Schema {path}: {exc}") from exc
    return schema


def compile_schema(name: str, directory: Path | None = None) -> Any:
    """A compiled validator for one schema file."""
    return jsonschema_rs.validator_for(load_schema(name, directory))


def _classify_decode_error(raw: bytes, exc: Exception) -> InvalidEvent:
    """Say why orjson refused the bytes; only runs for bad messages."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as ue:
        return InvalidEvent(INVALID_UTF8, f"value is not valid UTF-8 at byte {ue.start}")
    if "infinity" in str(exc):
        return InvalidEvent(NON_FINITE_NUMBER, f"number out of double range: {exc}")
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return 0.0

    try:
        # The standard library parses NaN and Infinity literals (Python's json.dumps
        # writes them) and reports each one here. Parse the str, not the bytes, so that
        # a byte-order mark is refused as orjson refuses it.
        json.loads(text, parse_constant=constant)
    except ValueError:
        return InvalidEvent(INVALID_JSON, f"value is not valid JSON: {exc}")
    if constants:
        return InvalidEvent(NON_FINITE_NUMBER, f"value contains {constants[0]}, which JSON forbids")
    # Valid for the standard library, no NaN or Infinity, yet refused by orjson: e.g. a
    # lone surrogate escape such as "\ud800", which no UTF-8 string can hold.
    return InvalidEvent(INVALID_JSON, f"value is not valid JSON: {exc}")


@dataclass(frozen=True)
class EventCodec:
    """Decode and validate click events; encode predictions."""

    validator: Any
    max_event_bytes: int = 64 * 1024

    @classmethod
    def load(cls, max_event_bytes: int = 64 * 1024, directory: Path | None = None) -> EventCodec:
        return cls(compile_schema(CLICK_EVENT_SCHEMA, directory), max_event_bytes)

    def decode(self, raw: bytes | None) -> dict[str, Any]:
        """Bytes to a validated click event, or :class:`InvalidEvent`."""
        if not raw:
            raise InvalidEvent(EMPTY_VALUE, "message has no value (null or empty)")
        if len(raw) > self.max_event_bytes:
            raise InvalidEvent(
                OVERSIZED, f"{len(raw)} bytes exceeds --max-event-bytes {self.max_event_bytes}"
            )
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _classify_decode_error(raw, exc) from None
        if not self.validator.is_valid(event):
            raise InvalidEvent(SCHEMA_VIOLATION, self.explain(event))
        return event  # type: ignore[no-any-return]

    def explain(self, event: Any) -> str:
        """The first schema error, as a short sentence with its JSON path."""
        for err in self.validator.iter_errors(event):
            path = "/".join(str(p) for p in err.instance_path) or "(root)"
            return f"{path}: {err.message}"
        return "schema violation"


def features_of(event: dict[str, Any]) -> dict[str, Any]:
    """The model input ``x``: user and item ids plus the event's features.

    >>> features_of({"user_id": "u1", "item_id": "i2", "features": {"device": "ios"}})
    {'user_id': 'u1', 'item_id': 'i2', 'device': 'ios'}
    """
    x = {"user_id": event["user_id"], "item_id": event["item_id"]}
    feats = event.get("features")
    if feats:
        x.update(feats)
    return x
