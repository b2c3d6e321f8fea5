"""When the loop polls without waiting after a batch (``--busy-poll-ms``), and how long.

Waiting in ``consume()`` puts the loop's thread to sleep, and on a virtual machine an
idle vCPU gives its core away: the next batch then starts on caches that something
else has used. Polling through the short gap between two fetches keeps the core, for
the CPU the polling burns. That pays only when the next fetch comes within the window,
that is at a steady high rate; so a poll that ends empty makes the loop wait at once
after the next batch, then after the next two, four, ... up to ``MAX_BACKOFF`` batches,
and a poll that catches its batch ends the backoff. At a low rate the polling then
costs about one window per ``MAX_BACKOFF`` batches.
"""

from __future__ import annotations

MAX_BACKOFF = 64  # batches without polling after repeated empty polls


class BusyPoll:
    """The polling window after each batch, with a backoff after empty polls.

    >>> bp = BusyPoll(window=0.003)
    >>> bp.after_batch(10.0)
    >>> bp.deadline
    10.003
    >>> bp.missed()  # the next fetch came later than the window
    >>> for done in (11.0, 12.0):  # one batch waits at once, the next one polls again
    ...     bp.after_batch(done)
    ...     print(bp.deadline)
    0.0
    12.003
    >>> bp.missed()  # twice in a row: the next two batches wait at once
    >>> [bp.after_batch(t) or bp.deadline for t in (13.0, 14.0, 15.0)]
    [0.0, 0.0, 15.003]
    >>> bp.hit()  # it caught its batch: every batch polls again
    >>> bp.after_batch(16.0); bp.deadline
    16.003
    """

    def __init__(self, window: float, max_backoff: int = MAX_BACKOFF) -> None:
        self.window = window
        self.max_backoff = max_backoff
        self.deadline = 0.0  # monotonic time the current poll may last until; 0: none
        self._backoff = 0  # batches to skip after an empty poll (doubles, up to the cap)
        self._skip = 0  # batches still to wait at once

    def after_batch(self, done: float) -> None:
        """A batch ended at ``done``: open its window, unless backing off."""
        if self._skip:
            self._skip -= 1
            self.deadline = 0.0
        else:
            self.deadline = done + self.window

    def hit(self) -> None:
        """The poll caught the next batch."""
        self._backoff = 0

    def missed(self) -> None:
        """The poll ended empty: back off."""
        self._backoff = min(max(1, 2 * self._backoff), self.max_backoff)
        self._skip = self._backoff
