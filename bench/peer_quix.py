"""The peer: the same job written the way Quix Streams documents it.

An ``Application`` and a ``StreamingDataFrame``: ``apply`` a function that predicts then
learns with the same River model, ``to_topic`` the predictions. Runs in its own virtual
environment (Quix Streams pins an older confluent-kafka than riverline). Stops after
``--count`` events and writes ``{"messages", "seconds", "rate", "peak_rss_bytes"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--model", default="logreg")
    ap.add_argument("--report", required=True)
    args = ap.parse_args()

    from quixstreams import Application

    from worker.models import make_model

    model = make_model(args.model, seed=0)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        loglevel="WARNING",
    )
    clicks = app.topic(args.input, value_deserializer="json")
    predictions = app.topic(args.output, value_serializer="json")
    seen = {"n": 0, "first": 0.0, "last": 0.0}

    def predict_then_learn(event: dict[str, Any]) -> dict[str, Any]:
        if seen["n"] == 0:
            seen["first"] = time.monotonic()
        x = {"user_id": event["user_id"], "item_id": event["item_id"], **event.get("features", {})}
        p = model.predict_proba_one(x).get(True, 0.0)
        y = event.get("clicked")
        if y is not None:
            model.learn_one(x, y)
        seen["n"] += 1
        seen["last"] = time.monotonic()
        if seen["n"] >= args.count:
            app.stop()
        return {"event_id": event["event_id"], "user_id": event["user_id"], "click_probability": p}

    sdf = app.dataframe(clicks)
    sdf = sdf.apply(predict_then_learn)
    sdf.to_topic(predictions)
    app.run()
    seconds = seen["last"] - seen["first"]
    with open(args.report, "w") as f:
        json.dump(
            {
                "messages": seen["n"],
                "seconds": seconds,
                "rate": seen["n"] / seconds if seconds > 0 else 0.0,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
