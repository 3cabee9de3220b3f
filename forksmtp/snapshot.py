"""What a scoreboard read returns: slot states, counter names and plain value types.

``forksmtp.scoreboard`` keeps the shared memory, its lock and its updates; this module is the
read side that the pool manager and the stats file consume (``Snapshot``, ``SlotInfo``,
``Totals``), plus the names both sides share: slot states, reject codes and reasons, session
events.  It imports nothing from ``forksmtp.scoreboard``: the dependency points one way.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Final

FREE: Final = 0
STARTING: Final = 1
IDLE: Final = 2
BUSY: Final = 3
STOPPING: Final = 4
STATE_NAMES = ("free", "starting", "idle", "busy", "stopping")
REJECT_CODES = (421, 450, 451, 452, 500, 501, 502, 503, 504, 530, 535, 538, 550, 552, 553, 554, 555)
REJECT_KEYS = tuple(str(c) for c in REJECT_CODES) + ("other",)
# Reasons a connection is refused: the counters' layout, the stats' "connections_rejected"
# keys, and (limits.py) which reply each gets.
MAX_CONNECTIONS: Final = "max_connections"
MAX_CONNECTIONS_PER_IP: Final = "max_connections_per_ip"
MAX_CONNECTION_RATE: Final = "max_connection_rate"
EARLY_TALKER: Final = "early_talker"
OTHER_REASON: Final = "other"
CONN_REJECT_REASONS = (MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, MAX_CONNECTION_RATE, EARLY_TALKER, OTHER_REASON)
# Session outcomes for the stats: TLS handshakes and AUTH attempts.
EVENT_KEYS = ("tls_ok", "tls_failed", "auth_ok", "auth_failed", "auth_deferred", "tls_resumed")
# Per-IP keys hold IPv4 as IPv4-mapped IPv6 (scoreboard.ip_key writes them).
_V4_PREFIX = b"\0" * 10 + b"\xff\xff"


def key_text(key: bytes) -> str:
    if key.startswith(_V4_PREFIX):
        return socket.inet_ntop(socket.AF_INET, key[12:])
    return socket.inet_ntop(socket.AF_INET6, key)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Totals:
    sessions: int
    messages_accepted: int
    bytes_received: int
    messages_rejected: dict[str, int]  # "552" -> count, "other" for codes outside REJECT_CODES
    connections_rejected: dict[str, int]  # reason -> count, every reason present
    events: dict[str, int]  # EVENT_KEYS: tls_ok (tls_resumed of them), tls_failed, auth_*

    @classmethod
    def from_counters(cls, c: tuple[int, ...] | list[int]) -> "Totals":
        # c is in the scoreboard's counter layout: sessions, messages, bytes, then the keys.
        rej = c[3:3 + len(REJECT_KEYS)]
        conn_at = 3 + len(REJECT_KEYS)
        conn = c[conn_at:conn_at + len(CONN_REJECT_REASONS)]
        events = c[conn_at + len(CONN_REJECT_REASONS):]
        return cls(c[0], c[1], c[2], dict(zip(REJECT_KEYS, rej)),
                   dict(zip(CONN_REJECT_REASONS, conn)), dict(zip(EVENT_KEYS, events)))


@dataclass(frozen=True, slots=True)
class SlotInfo:
    index: int
    pid: int
    generation: int
    state: int
    client: str
    port: int
    phase: str
    last_activity: float  # time.monotonic() of the last step: the heartbeat
    started: float
    ip_bucket: int  # -1: holds no per-IP count
    holds_global: bool
    counters: Totals
    idle_beat: int = 0  # whole monotonic seconds of an idle worker's last loop; 0: none yet
    client_wait: float = 0.0  # time.monotonic() since which it has waited on its client; 0.0: none

    @property
    def held_by_client(self) -> bool:
        """In a session whose client has kept the worker waiting (for a command, for
        its data, for room to send) for connection.CLIENT_WAIT_MARK at least: a client
        slow or idle, or one holding its session open.  Such a worker does not come
        free at the pool's pace."""
        return self.client_wait > 0.0 and self.in_session

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    @property
    def in_session(self) -> bool:
        """Serving a client: busy, or marked stopping (a reload, a retirement) while it
        finishes a session; that mark sticks for the rest of the session."""
        return self.state == BUSY or (self.state == STOPPING and bool(self.client))


@dataclass(frozen=True, slots=True)
class Snapshot:
    nslots: int
    generation: int
    stress: bool
    active: int
    connections_total: int  # every connection that reached admission, refused ones included
    workers_exited: int
    slots: tuple[SlotInfo, ...]  # occupied slots only
    per_ip: tuple[tuple[str, int], ...]  # busiest client addresses first
    totals: Totals  # live slots + folded counters of dead workers: never decreases

    def count(self, *states: int) -> int:
        return sum(1 for s in self.slots if s.state in states)


def _slot_info(index: int, f: tuple) -> SlotInfo:
    """One slot as unpacked by the scoreboard's ``_SLOT`` struct, as plain values."""
    pid, state, holds, port, gen, bucket, _key, beat, client, phase, last, started, wait = f[:13]
    return SlotInfo(index, pid, gen, state, _text(client), port, _text(phase), last, started,
                    bucket - 1, bool(holds), Totals.from_counters(f[13:]), beat, wait)
