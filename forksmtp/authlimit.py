"""Failed-AUTH rate limit per client address, shared by every worker.

A small table in anonymous shared memory (created by the master before it forks, like
the scoreboard): per address, the number of failures in the current window, the checks
running now, and when the window started.  Updates take the scoreboard's admission flock for a few memory
operations.  After ``max_failures`` failures within ``window`` seconds, AUTH from that
address is refused with 421 4.7.0 until the window ends: guessing passwords costs an
attacker the window, not just the 50 ms scrypt check.  A full neighbourhood of the
table overwrites its oldest window, so an attacker with very many addresses can push a
blocked address out early; the table is sized (1024 entries) for the addresses one
server sees in a window, and every attempt still costs a full scrypt check.

Checks running at the same moment in several workers count against the limit with the
failures: an address with ``failures + running`` at the limit waits for a running check
to end (``BUSY``) rather than start one more, so that an attacker with many connections
never has more than ``max_failures`` guesses checked in a window.  Waiting, not refusal:
a right password is no failure, and a client that logs in on many connections at once
(an MTA's parallel deliveries) must not be told it failed.

An IPv6 client is counted by its /64, not its own address: a /64 is what one site or
one host is given, and an attacker who holds one has 2**64 addresses to rotate through,
which would make a per-address limit no limit at all.  IPv4 clients count per address.
"""

from __future__ import annotations

import mmap
import struct

from .scoreboard import ip_key
from .snapshot import _V4_PREFIX

# Address key, failures, checks running, window start, last check's start (monotonic).
_ENTRY = struct.Struct("<16sIIdd")
#: Running checks of an address none of which has started for this long are taken to be
#: gone: a worker killed in a check (the OOM killer picks workers first) never gives its
#: count back, and a check takes well under a second.
RUNNING_STALE = 10.0
ALLOWED, REFUSED, BUSY = 0, 1, 2  # what attempt() says
BUSY_TEXT = "password checks running at once fill the failure limit"
_PROBE = 8
_V6_NETWORK = 8  # octets of an IPv6 address that name its /64


def client_key(ip: str) -> bytes:
    """The table key: ``ip_key`` of the address, an IPv6 one cut to its /64."""
    key = ip_key(ip)
    if key.startswith(_V4_PREFIX) or ":" not in ip:
        return key
    return key[:_V6_NETWORK] + bytes(16 - _V6_NETWORK)


class AuthLimiter:
    def __init__(self, board, buckets: int = 1024, max_failures: int = 5, window: float = 300.0) -> None:
        self.board = board
        self.buckets = buckets
        self.max_failures = max_failures
        self.window = window
        self._mm = mmap.mmap(-1, buckets * _ENTRY.size)

    def _find(self, key: bytes, now: float) -> int:
        """The bucket for key: its own wherever it is in the probe chain (an expired or
        empty bucket before it must not hide it), else the first empty or expired one,
        else the oldest."""
        start = self.board.bucket_of(key, self.buckets)  # keyed: nobody picks colliding addresses
        free, oldest, oldest_t = -1, start, float("inf")
        for i in range(_PROBE):
            b = (start + i) % self.buckets
            k, n, running, t, last = _ENTRY.unpack_from(self._mm, b * _ENTRY.size)
            if k == key:
                return b
            if free < 0 and self._spent(n, running, t, last, now):
                free = b
            if t < oldest_t:
                oldest, oldest_t = b, t
        return free if free >= 0 else oldest

    def _spent(self, n: int, running: int, t: float, last: float, now: float) -> bool:
        """An entry with nothing left to keep: no failure in a window still open, and no
        check running (or none started within RUNNING_STALE)."""
        return (n == 0 or now - t >= self.window) and (running == 0 or now - last >= RUNNING_STALE)

    def attempt(self, ip: str, now: float) -> int:
        """May this address have a password checked now?  ``ALLOWED`` counts the check
        as running until ``finished``; ``REFUSED``: it has failed ``max_failures`` times
        in this window; ``BUSY``: failures and running checks are at the limit, try
        again when one has ended.  Running checks none of which started within
        RUNNING_STALE are dropped: a worker killed in a check never gives its count
        back.  Those still running when a window ends count in the next one, so that
        checks begun just before its end cannot double the guesses."""
        key = client_key(ip)
        with self.board.locked():
            off = self._find(key, now) * _ENTRY.size
            k, n, running, t, last = _ENTRY.unpack_from(self._mm, off)
            if k != key:
                n, running, t = 0, 0, now
            else:
                if now - last >= RUNNING_STALE:
                    running = 0
                if now - t >= self.window:
                    n, t = 0, now
            if n >= self.max_failures:
                return REFUSED
            if n + running >= self.max_failures:
                return BUSY
            _ENTRY.pack_into(self._mm, off, key, n, running + 1, t, now)
        return ALLOWED

    def finished(self, ip: str, now: float, ok: bool) -> None:
        """The check ``attempt`` allowed has ended; a wrong password is a failure.  The
        window opens at an address's first failure, not at its first check: a login
        that succeeds (the client's own, or a neighbour's behind the same NAT) must not
        choose where the window of the guesses that follow it starts."""
        key = client_key(ip)
        with self.board.locked():
            off = self._find(key, now) * _ENTRY.size
            k, n, running, t, last = _ENTRY.unpack_from(self._mm, off)
            if k != key:  # the entry is gone, pushed out of its neighbourhood
                if ok:
                    return
                n, running, t, last = 0, 1, now, now
            elif now - t >= self.window:  # the window is over
                n, t = 0, now
            if not ok and n == 0:
                t = now
            _ENTRY.pack_into(self._mm, off, key, n + (0 if ok else 1), max(0, running - 1), t, last)
