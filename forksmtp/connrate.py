"""New connections per client address and minute, shared by every worker.

``server.max_connection_rate`` is Postfix's ``smtpd_client_connection_rate_limit``,
counted as its anvil server counts it: per address, the connections since the
address's window began, a window being RATE_WINDOW (anvil's time unit, 60 s) from the
first connection counted in it.  Every connection counts, refused or not, so a client
that keeps hammering stays refused until its window ends, and is then let in again up
to the limit.  The master's own 421, when every worker is busy at max_workers, counts
too (arbiter._count_refused); the master waits for the lock MASTER_LOCK_WAIT at most,
and a count a holder keeps from it goes uncounted.  Not counted, as the server's own
trouble and not the client's: the master's 421 while a crash-loop back-off holds
spawning, and a worker's 421 when it is out of descriptors.

Off (0) by default, as in Postfix: a busy relay may open hundreds of connections a
minute, and where the rate of a flood matters a firewall's per-source limit drops it
before accept(2), which no check in the server can.

A table in anonymous shared memory, created by the master before it forks, as the
AUTH limiter's: keyed the same way (an IPv6 client by its /64, whose 2**64 addresses
are one site's), and updated under the scoreboard's admission lock.  A full
neighbourhood of the table overwrites its oldest window: an attacker with very many
addresses can push another address's count out early, never raise it.  65,536
entries, 1.75 MiB, of which only the pages written take memory.
"""

from __future__ import annotations

import mmap
import struct

from .authlimit import client_key, find_bucket

# Address key, connections in the window, window start (monotonic).
_ENTRY = struct.Struct("<16sId")
RATE_WINDOW = 60.0
BUCKETS = 65536


class ConnectionRate:
    def __init__(self, board, buckets: int = BUCKETS, window: float = RATE_WINDOW) -> None:
        self.board = board
        self.buckets = buckets
        self.window = window
        self._mm = mmap.mmap(-1, buckets * _ENTRY.size)

    def count(self, ip: str, now: float) -> int:
        """Count a new connection from ``ip`` at monotonic time ``now``: the
        connections of its window so far, this one included."""
        key = client_key(ip)
        with self.board.locked():
            off = self._find(key, now) * _ENTRY.size
            k, n, start = _ENTRY.unpack_from(self._mm, off)
            if k != key or now - start >= self.window:
                n, start = 0, now
            _ENTRY.pack_into(self._mm, off, key, n + 1, start)
        return n + 1

    def _find(self, key: bytes, now: float) -> int:
        """The bucket for key; one whose window is over, or that was never used, is
        free to take."""
        return find_bucket(self.board, self._mm, _ENTRY, self.buckets, key,
                           lambda f: f[1] == 0 or now - f[2] >= self.window, 2)
