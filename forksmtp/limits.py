"""Admission policy: which reply a refused connection gets, and when stress mode is on.

The counting lives in the scoreboard (like Postfix's anvil(8), which only counts); the decision
of what a count means lives here, so it can be read and tested without shared memory.
"""

from __future__ import annotations

import math

from .smtp.replies import R421_BUSY, R421_PER_IP, R421_RATE, R421_UNAVAILABLE, R521_EARLY_TALKER, Reply
from .snapshot import (EARLY_TALKER, MAX_CONNECTION_RATE, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP,  # noqa: F401
                       OTHER_REASON)


class Seldom:
    """Lets a thing happen at most once per ``every`` seconds (of time.monotonic()):
    a warning that a lasting condition would otherwise repeat, a call for help."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last = -every

    def allow(self, now: float) -> bool:
        if now - self.last < self.every:
            return False
        self.last = now
        return True

    def reset(self) -> None:
        self.last = -self.every

_REPLIES = {
    MAX_CONNECTIONS: R421_BUSY,  # contract: 421 4.3.2 over max_connections
    MAX_CONNECTIONS_PER_IP: R421_PER_IP,  # contract: 421 4.7.0 over max_connections_per_ip
    MAX_CONNECTION_RATE: R421_RATE,  # as Postfix: the per-address code, 421 4.7.0
    EARLY_TALKER: R521_EARLY_TALKER,
}


def reply_for(reason: str) -> Reply:
    """The reply that ends a refused connection; its (code, enhanced, text) are the contract's."""
    return _REPLIES.get(reason, R421_UNAVAILABLE)


def in_stress(busy: int, max_workers: int, threshold: float) -> bool:
    """Stress mode: at least ``threshold`` of the pool ceiling is busy with sessions.

    Postfix switches to short timeouts and a small error budget when its process limit is
    reached; a threshold below 1 switches earlier, while spare capacity is still there.
    The threshold is compared in whole workers (0.7 of 10 is 7, not 7.000000000000001).
    """
    if max_workers <= 0 or threshold <= 0:
        return False
    return busy >= max(1, math.ceil(threshold * max_workers - 1e-9))


# How long the busy count must stay below the threshold before stress mode ends.
STRESS_HOLD = 5.0


class StressSwitch:
    """Stress mode with a hold: on as soon as the pool is that busy, off only once it has
    stayed below the threshold for ``hold`` seconds (of time.monotonic()).  A load that
    hovers at the threshold would otherwise switch the mode at every pool check: a log
    line each time, and sessions' timeouts chosen by a coin toss."""

    def __init__(self, hold: float = STRESS_HOLD) -> None:
        self.hold = hold
        self.calm_since: float | None = None

    def decide(self, over: bool, on: bool, now: float) -> bool:
        """The mode from now on, given whether the pool is at the threshold (``over``)
        and whether the mode is ``on`` now."""
        if over or not on:
            self.calm_since = None
            return over
        if self.calm_since is None:
            self.calm_since = now
        return now - self.calm_since < self.hold
