"""Failed-AUTH rate limit per client address, shared by every worker.

A table in anonymous shared memory (created by the master before it forks, like the
scoreboard): per address, the number of failures in the current window, the checks
running now, and when the window started.  Updates take the scoreboard's admission
flock for a few memory operations.  After ``max_failures`` failures within ``window``
seconds, AUTH from that address is refused with 421 4.7.0 until the window ends:
guessing passwords costs an attacker the window, not just the 50 ms scrypt check.  A
full neighbourhood of the table (``_PROBE`` entries from where an address's probe
starts) overwrites its oldest window, so an attacker with very many addresses can push
a blocked address out early.  The table has 65,536 entries (2.5 MiB, of which only the
pages written take memory), where 1,024 let most go from about 800.  The hash is keyed
anew at every start, so whether a neighbourhood fills is chance: with 8,000 addresses
failing at once, a probe of 8 entries filled one at about 1 start in 350 (and let a
few addresses go); one of 16 filled none in 20,000 keys with 8,000 addresses, nor
in 2,000 with 16,000.

Checks running at the same moment in several workers count against the limit with the
failures: an address with ``failures + running`` at the limit waits for a running check
to end (``BUSY``) rather than start one more, so that an attacker with many connections
never has more than ``max_failures`` guesses checked in a window.  Waiting, not refusal:
a right password is no failure, and a client that logs in on many connections at once
(an MTA's parallel deliveries) must not be told it failed.

Across addresses, no more checks run at once than ``checks`` (``auth.max_checks``, by
default the CPUs the master may run on): each one is about 60 ms of a core and
16 MiB, and without a cap fifty clients, each under its own address's limit, took
both cores and a gigabyte between them and left no room for mail.  A check holds one
of them from ``attempt`` to ``finished``, recorded in the worker's own entry (by
scoreboard slot) of a small table beside the buckets; when they are all held,
``attempt`` says ``SATURATED`` and the worker waits, as for ``BUSY``,
in a queue: a check that ends goes to the session that has waited longest (one that
stops looking at its place, a stopped process, is passed over after LOOK_STALE).
The master clears a dead worker's entry when it repairs its slot (``worker_gone``), and
an entry older than RUNNING_STALE counts as ended, as a running count does.

An IPv6 client is counted by its /64, not its own address: a /64 is what one site or
one host is given, and an attacker who holds one has 2**64 addresses to rotate through,
which would make a per-address limit no limit at all.  IPv4 clients count per address.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Callable

from .scoreboard import ip_key
from .snapshot import _V4_PREFIX

# Address key, failures, checks running, window start, last check's start (monotonic).
_ENTRY = struct.Struct("<16sIIdd")
#: Running checks of an address none of which has started for this long are taken to be
#: gone: a worker killed in a check (the OOM killer picks workers first) never gives its
#: count back, and a check takes well under a second.
RUNNING_STALE = 10.0
ALLOWED, REFUSED, BUSY, SATURATED = 0, 1, 2, 3  # what attempt() says
#: Why an AUTH was deferred (``454``), as its log line says.
DEFERRED_TEXT = {BUSY: "password checks running at once fill the failure limit",
                 SATURATED: "every password check the server runs at once is in use"}
#: A queued session looks at its place at least every 0.375 s (worker.AUTH_FAR_STEP
#: and its jitter): one that has not looked for LOOK_STALE is stopped (SIGSTOP, a
#: debugger) and is passed over, so that it holds no one up for long.
LOOK_STALE = 1.0
_PROBE = 16  # 8 overflowed for 8,000 addresses about once in 350 keys (see the docstring)
BUCKETS = 65536
_V6_NETWORK = 8  # octets of an IPv6 address that name its /64


def client_key(ip: str) -> bytes:
    """The table key: ``ip_key`` of the address, an IPv6 one cut to its /64."""
    key = ip_key(ip)
    if key.startswith(_V4_PREFIX) or ":" not in ip:
        return key
    return key[:_V6_NETWORK] + bytes(16 - _V6_NETWORK)


def cpu_count() -> int:
    """The CPUs this process may run on (a taskset or a cpuset narrows them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def find_bucket(board, mm: mmap.mmap, entry: struct.Struct, buckets: int, key: bytes,
                spent: Callable[[tuple], bool], started: int) -> int:
    """The bucket for ``key`` in a shared table of ``entry`` records keyed by their
    first field (this module's, and connrate's): its own wherever it is in the probe
    chain (a spent or empty bucket before it must not hide it), else the first that
    ``spent`` says holds nothing left to keep, else the one whose window (field
    ``started``) began first."""
    start = board.bucket_of(key, buckets)  # keyed: nobody picks colliding addresses
    free, oldest, oldest_t = -1, start, float("inf")
    for i in range(min(_PROBE, buckets)):
        b = (start + i) % buckets
        fields = entry.unpack_from(mm, b * entry.size)
        if fields[0] == key:
            return b
        if free < 0 and spent(fields):
            free = b
        if fields[started] < oldest_t:
            oldest, oldest_t = b, fields[started]
    return free if free >= 0 else oldest


class AuthLimiter:
    def __init__(self, board, buckets: int = BUCKETS, max_failures: int = 5, window: float = 300.0,
                 checks: int = 0) -> None:
        self.board = board
        self.buckets = buckets
        self.max_failures = max_failures
        self.window = window
        self.checks = 0
        self.set_checks(checks)
        n = self._nslots = board.nslots
        # Per worker slot, beside the buckets: three numbers (when its running check
        # began, when it joined the queue for a check, when it last looked at its
        # place; 0.0 for none), then two octets (1 while its check runs, 1 while it is
        # queued).  The octets are counted and searched in C (bytes.count, find), so
        # that only the slots they mark are read in Python.
        times_at = buckets * _ENTRY.size
        self._flags_at = times_at + 3 * n * 8
        self._waiting_at = self._flags_at + n
        self._mm = mmap.mmap(-1, self._waiting_at + n)
        times = memoryview(self._mm)[times_at:self._flags_at].cast("d")
        self._starts, self._queued, self._looked = times[:n], times[n:2 * n], times[2 * n:]

    def set_checks(self, checks: int) -> None:
        """Password checks run at once across the server, at most: ``auth.max_checks``,
        0 for one per CPU.  Set anew at a reload: workers forked after it use it."""
        self.checks = checks or cpu_count()

    def _find(self, key: bytes, now: float) -> int:
        return find_bucket(self.board, self._mm, _ENTRY, self.buckets, key,
                           lambda f: self._spent(f[1], f[2], f[3], f[4], now), 3)

    def _spent(self, n: int, running: int, t: float, last: float, now: float) -> bool:
        """An entry with nothing left to keep: no failure in a window still open, and no
        check running (or none started within RUNNING_STALE)."""
        return (n == 0 or now - t >= self.window) and (running == 0 or now - last >= RUNNING_STALE)

    def _flags(self) -> bytes:
        return self._mm[self._flags_at:self._flags_at + self._nslots]

    def _running(self, now: float, but: int = -1) -> int:
        """Checks running now in the workers, the one in slot ``but`` left out.  The
        flags count them, stale ones included; only when that reaches ``checks`` are
        the start times of the flagged slots read, to leave out those older than
        RUNNING_STALE."""
        flags = self._flags()
        busy = flags.count(1) - (flags[but] if but >= 0 else 0)
        if busy < self.checks:
            return busy
        # Loops with find rather than one generator shared with _ahead: a waiter runs
        # them at each look, and the generator's frame cost 10 % more CPU with 300 of them.
        starts, running, i = self._starts, 0, flags.find(1)
        while i >= 0:
            if i != but and now - starts[i] < RUNNING_STALE:
                running += 1
            i = flags.find(1, i + 1)
        return running

    def waiting(self, slot: int, on: bool) -> None:
        """The worker of ``slot`` waits in the queue (``attempt`` puts it there), or no
        longer does and leaves it.  No lock: a worker writes only its own entries,
        and readers only count and compare."""
        self._mm[self._waiting_at + slot] = 1 if on else 0
        if not on:
            self._queued[slot] = self._looked[slot] = 0.0

    def _ahead(self, slot: int, now: float) -> int:
        """Sessions queued for a check before the one of ``slot`` (all of them, if it
        is not queued); those that have not looked at their place for LOOK_STALE are
        stopped, and left out."""
        marks = self._mm[self._waiting_at:self._waiting_at + self._nslots]
        queued, looked = self._queued, self._looked
        mine = (queued[slot] or float("inf"), slot)
        ahead, i = 0, marks.find(1)
        while i >= 0:  # only the slots marked waiting: none, most of the time
            t = queued[i]
            if t and now - looked[i] < LOOK_STALE and (t, i) < mine:
                ahead += 1
            i = marks.find(1, i + 1)
        return ahead

    def place(self, slot: int, now: float) -> tuple[int, int]:
        """The checks free, and the sessions queued before this one: read without the
        lock, for a waiter to tell whether it is its turn.  Looking is also what tells
        the others it is not stopped."""
        self._looked[slot] = now
        return self.checks - self._running(now), self._ahead(slot, now)

    def checks_running(self, now: float) -> int:
        """For the stats: checks holding one of ``checks`` now (read without the lock)."""
        return self._running(now)

    def _set_check(self, slot: int, start: float) -> None:
        self._starts[slot] = start
        self._mm[self._flags_at + slot] = 1 if start else 0

    def attempt(self, ip: str, now: float, slot: int) -> int:
        """May this address have a password checked now, by the worker of scoreboard
        slot ``slot``?  ``ALLOWED`` counts the check as running until ``finished``;
        ``REFUSED``: it has failed ``max_failures`` times in this window; ``BUSY``:
        failures and running checks are at the limit, try again when one has ended;
        ``SATURATED``: the server runs ``checks`` already, or sessions queued before
        this one take those free; it is queued, and tries again likewise.  A worker
        runs one check at a time: its own entry is never counted against it.  Running
        checks none of which started within RUNNING_STALE are dropped: a worker killed
        in a check never gives its count back.  Those still running when a window ends
        count in the next one, so that checks begun just before its end cannot double
        the guesses."""
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
                self.waiting(slot, False)  # it waits for its own address now, not for the server
                return BUSY
            # The server's checks go in the order sessions began to wait for them: a
            # free one to whichever waiter looked first let guessers crowd others out.
            free = self.checks - self._running(now, slot)
            if free <= 0 or self._ahead(slot, now) >= free:
                if not self._queued[slot]:
                    self._queued[slot] = now
                self._looked[slot] = now
                self._mm[self._waiting_at + slot] = 1
                return SATURATED
            _ENTRY.pack_into(self._mm, off, key, n, running + 1, t, now)
            self._set_check(slot, now)
            self._queued[slot] = 0.0
        return ALLOWED

    def worker_gone(self, slot: int) -> None:
        """Master, once it has repaired the slot of a dead worker: a check it was running
        has ended.  Stores into the dead worker's own entry, which no one else writes
        until the slot is claimed again."""
        self._set_check(slot, 0.0)
        self.waiting(slot, False)  # and out of the queue

    def finished(self, ip: str, now: float, ok: bool, slot: int) -> None:
        """The check ``attempt`` allowed the worker of ``slot`` has ended; a wrong
        password is a failure.  The window opens at an address's first failure, not
        at its first check: a login that succeeds (the client's own, or a neighbour's
        behind the same NAT) must not choose where the window of the guesses that
        follow it starts."""
        key = client_key(ip)
        with self.board.locked():
            self._set_check(slot, 0.0)
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
