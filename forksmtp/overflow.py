"""The master's last resort at the pool ceiling: answer queued clients with 421.

When every worker is busy and the pool is at ``max_workers``, nobody would accept a new
connection and clients would wait silently in the listen backlog.  Once admissions have
stalled for ``GRACE`` seconds, the master accepts them itself and answers ``421 4.3.2``.
While workers keep taking connections (short sessions) nothing is refused: a queued
client is then served within milliseconds.
"""

from __future__ import annotations

import select
import socket

from . import limits
from .scoreboard import IDLE, STARTING

GRACE = 0.3  # admissions stalled this long at the ceiling: the master answers 421
BATCH = 64  # queued clients refused per check and socket


class OverflowGuard:
    def __init__(self, log) -> None:
        self.log = log
        self.since = 0.0
        self.progress = -1
        self.logged = False
        self.rejected = 0

    def check(self, snap, now: float, workers: int, max_workers: int, sockets,
              implicit_tls: frozenset = frozenset()) -> bool:
        """Answer stalled clients if needed; True while the master should poll fast.
        ``implicit_tls``: the sockets (of ``sockets``) whose clients speak TLS first."""
        if workers < max_workers or snap.count(IDLE, STARTING):
            self.since, self.logged = 0.0, False
            return False
        if snap.connections_total != self.progress or not self.since:
            self.progress, self.since = snap.connections_total, now
            return True
        if now - self.since < GRACE:
            return True
        if not self.logged:
            self.logged = True
            self.log.warning("POOL", f"all {workers} workers busy (max_workers reached); answering 421 4.3.2")
        for sock in sockets:
            for _ in range(BATCH):
                if not select.select([sock], [], [], 0)[0]:
                    break
                self._answer(sock, sock in implicit_tls)
        return True

    def _answer(self, sock: socket.socket, tls_first: bool) -> None:
        try:
            conn, peer = sock.accept()
        except OSError:
            return  # a worker took it, or the client left
        try:
            conn.setblocking(False)
            # With its enhanced code, as the contract spells it (Postfix does the same).
            # An SMTPS client expects a TLS handshake first, and the master does no
            # handshake (a slow client would stall the supervisor): it only closes.
            if not tls_first:
                conn.send(limits.reply_for(limits.MAX_CONNECTIONS).wire(True))
        except OSError:
            pass
        finally:
            conn.close()
        self.rejected += 1
        self.log.info("CONN", f"{peer[0]} refused by master: no worker free")
