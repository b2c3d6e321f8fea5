"""Click-event tokens: the features the models and the batch baseline learn from.

A module of its own, importing only ``river.base``, so that the batch baseline's fit
process (:mod:`worker.batchfit`) starts in a fraction of a second: the full River
package takes about a second of CPU to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from river import base

FLOAT_LIMIT = 1e6  # numeric features are clipped to [-FLOAT_LIMIT, FLOAT_LIMIT]


class ClickTokens(base.Transformer):
    """Turn a click event's ``x`` into hashable tokens and add crossed features.

    Integers (position, hour) are categories in click data, so they become tokens;
    floats stay numeric. ``crosses`` name pairs of fields whose combination is a feature
    of its own: ``("user_id", "category")`` learns each user's taste per category.

    >>> t = ClickTokens(crosses=(("user_id", "category"),))
    >>> t.transform_one({"user_id": "u1", "category": "news", "position": 3, "score": 0.5})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'user_id': 'u1', 'category': 'news', 'position': '3', 'score': 0.5,
     'user_id*category': 'u1|news'}
    """

    def __init__(self, crosses: Sequence[tuple[str, str]] = ()) -> None:
        # A list: River's clone() mistakes an empty tuple parameter for a (class, params)
        # pair and raises IndexError (the fm preset has no crosses).
        self.crosses = [tuple(c) for c in crosses]

    def transform_one(self, x: dict[Any, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for k, v in x.items():
            t = type(v)
            if t is int:
                out[k] = str(v)
            elif t is float:
                # The schema allows any finite double, but 1e300 overflows a model's
                # update half-way (FM squares it) and leaves NaN in its weights.
                out[k] = min(max(v, -FLOAT_LIMIT), FLOAT_LIMIT)
            else:
                out[k] = v
        for a, b in self.crosses:
            if a in x and b in x:
                out[f"{a}*{b}"] = f"{x[a]}|{x[b]}"
        return out


DEFAULT_CROSSES: tuple[tuple[str, str], ...] = (
    ("user_id", "category"),
    ("user_id", "device"),
    ("item_id", "position"),
)
