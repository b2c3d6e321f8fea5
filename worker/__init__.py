"""riverline: online machine learning on Kafka, one event at a time."""

from __future__ import annotations

__version__ = "0.1.0"
