"""The master's last resort when no worker can take a connection: answer queued clients
with 421.

When every worker is busy and the pool is at ``max_workers``, or while spawning is held
back after workers kept failing at start (the crash-loop back-off, perhaps with no
worker left at all), nobody would accept a new connection and clients would wait
silently in the listen backlog.  Once admissions have stalled for ``GRACE`` seconds, the
master accepts them itself and answers ``421 4.3.2``.  While workers keep taking
connections (short sessions) nothing is refused: a queued client is then served within
milliseconds.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

from . import limits
from .connection import discard_unread
from .listeners import client_ip
from .pool import CEILING_WARN_EVERY
from .scoreboard import IDLE, STARTING
from .smtp.replies import Reply

GRACE = 0.3  # admissions stalled this long at the ceiling: the master answers 421
BATCH = 64  # queued clients refused per check and socket


class OverflowGuard:
    def __init__(self, log, count: Callable[[str, float], None] | None = None) -> None:
        """``count(ip, now)``: told of each client refused at the ceiling, for
        max_connection_rate."""
        self.log = log
        self.count = count
        self.since = 0.0
        self.progress = -1
        self.logged = ""  # the stall's kind whose warning was handled: "ceiling" or "held"
        self.ceiling_warning = limits.Seldom(CEILING_WARN_EVERY)  # see pool.CEILING_WARN_EVERY
        self.rejected = 0          # at the ceiling: counted as max_connections
        self.rejected_held = 0     # while spawning is held back: counted as other

    def check(self, snap, now: float, workers: int, max_workers: int, sockets,
              implicit_tls: frozenset = frozenset(), held_back: bool = False) -> bool:
        """Answer stalled clients if needed; True while the master should poll fast.
        ``implicit_tls``: the sockets (of ``sockets``) whose clients speak TLS first;
        ``held_back``: the pool may not spawn now (crash-loop back-off)."""
        at_ceiling = workers >= max_workers
        if not (at_ceiling or held_back) or snap.count(IDLE, STARTING):
            self.since, self.logged = 0.0, ""
            return False
        if snap.connections_total != self.progress or not self.since:
            self.progress, self.since = snap.connections_total, now
            return True
        if now - self.since < GRACE:
            return True
        reply = limits.reply_for(limits.MAX_CONNECTIONS if at_ceiling else limits.OTHER_REASON)
        kind = "ceiling" if at_ceiling else "held"
        for sock in sockets:
            for _ in range(BATCH):
                if not select.select([sock], [], [], 0)[0]:
                    break
                # Warned only once a client is there to be refused: a stall nobody met
                # must not spend the ceiling's one warning per CEILING_WARN_EVERY.
                if self.logged != kind:
                    self.logged = kind
                    self._warn(at_ceiling, workers, now)
                ip = self._answer(sock, sock in implicit_tls, reply)
                if ip is None:
                    continue
                if not at_ceiling:
                    # Not counted toward max_connection_rate: a crash loop is the
                    # server's trouble, not the client's (nor is a worker's shortage).
                    self.rejected_held += 1
                    continue
                self.rejected += 1
                if self.count is not None:  # after the 421: the client hears at once
                    self.count(ip, now)
        return True

    def _warn(self, at_ceiling: bool, workers: int, now: float) -> None:
        if not at_ceiling:
            self.log.warning("POOL", "no worker free, and none may start now (back-off after a crash loop "
                             "or a failed fork); answering 421 4.3.2")
        elif self.ceiling_warning.allow(now):
            self.log.warning("POOL", f"all {workers} workers busy (max_workers reached); answering 421 4.3.2")

    def _answer(self, sock: socket.socket, tls_first: bool, reply: Reply) -> str | None:
        """Take one queued client and refuse it: its address, None when none was left."""
        try:
            conn, peer = sock.accept()
        except OSError:
            return None  # a worker took it, or the client left
        ip = client_ip(peer[0])
        # The log says what the client got, as a worker's refusal does.
        got = f"{reply.code} not sent: the client left"
        try:
            conn.setblocking(False)
            # With its enhanced code, as the contract spells it (Postfix does the same).
            # An SMTPS client expects a TLS handshake first, and the master does no
            # handshake (a slow client would stall the supervisor): it only closes.
            if tls_first:
                got = "closed without a reply: no TLS from the master"
            elif conn.send(reply.wire(True)) > 0:
                got = f"{reply.code} sent"
            discard_unread(conn)  # a client that talked first: a FIN after the 421, not a reset
        except OSError:
            pass
        finally:
            conn.close()
        self.log.info("CONN", f"{ip} refused by master: no worker free ({got})")
        return ip
