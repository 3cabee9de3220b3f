"""Whether a pool with every worker busy should grow: the two signals the master reads.

A pre-forked pool that starts a worker whenever none is idle grows to one worker per
concurrent session.  Where sessions are short and the CPUs are what limits them, the
workers beyond what the CPUs can run only take turns on the same cores, each woken with
its caches cold, and throughput falls as the pool grows: at 50 sessions on 2 cores,
pools held at 8 to 14 workers stored 2,900 to 3,300 msgs/s at 0.38 to 0.41 ms of CPU per
message, one of 52 workers 2,500 to 2,600 at 0.55.  So the pool keeps its spares only
while a CPU has time for them, and past that grows for clients that wait:

- ``CpuGauge``: whether the CPUs had time to spare (idle, idle waiting for I/O, or
  given to niced processes: a worker more could have used it) over the last ``WINDOW``
  seconds, from ``/proc/stat``.
- ``Backlog``: how long the oldest client in the listen queues has waited.  At each look
  the master counts the queues (the accept queue length that ``TCP_INFO`` gives for a
  listening socket) and the connections taken from them so far (by the workers, and by
  the master's own ``421``s at the ceiling); taken plus queued is how many clients have
  come.  A queue is served in order, so the oldest
  client waiting is the one that came after the taken ones, and it was there at the
  first look that counted that many arrivals.

Where ``/proc/stat`` cannot be read, the CPUs count as having time to spare (one spare a
WINDOW while every worker is busy).  Where ``TCP_INFO`` cannot be read, each readable
listening socket counts as one client waiting.  ``server.spare_cpu_share = 0`` gives a
classic prefork pool instead.

A queue is served in order, but several queues are not served in order with each other:
with several listeners the wait measured is the oldest client's only roughly (a client of
one queue may wait while the workers take another's).  The workers accept from every
ready listener in one turn, so such a client waits about one session more at most.
"""

from __future__ import annotations

import socket
import struct
from collections import deque

WINDOW = 0.25  # seconds of CPU time the gauge judges by
SPARE_SHARE = 0.10  # the CPUs had time to spare when this share of it was idle (server.spare_cpu_share)
WAIT_LIMIT = 0.1  # a client waiting this long in a listen queue grows the pool anyway

_TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info: eight one-octet fields, then rto, ato, snd_mss, rcv_mss, and unacked,
# which for a listening socket is its accept queue's length (sk_ack_backlog).
_QUEUED = struct.Struct("=I")
_QUEUED_AT = 24
_INFO_LEN = _QUEUED_AT + _QUEUED.size


def cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(spare, total) clock ticks of all CPUs since boot; None where the file cannot be
    read or parsed.  Spare is idle time, I/O wait (idle while I/O is pending) and the
    time of niced processes (nice > 0), which yield it to the workers when they want it."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        fields = [int(x) for x in first.split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    # user nice system idle iowait irq softirq steal: steal is time the host gave to
    # another guest, not time this one could have used.
    return fields[1] + fields[3] + fields[4], sum(fields)


class CpuGauge:
    """The share of CPU time idle over the last WINDOW, from a sample each look."""

    def __init__(self, read=cpu_times, window: float = WINDOW) -> None:
        self.read = read
        self.window = window
        self.samples: deque[tuple[float, int, int]] = deque()

    def has_spare(self, now: float, since: float = float("-inf"),
                  share: float = SPARE_SHARE) -> bool | None:
        """Did the CPUs have ``share`` of their time to spare over the last WINDOW?
        Judged only over looks taken at ``since`` or later (when the pool ran out of idle
        workers: CPU time idle before then says nothing of what a worker more would get);
        None until a whole WINDOW of such looks is there.  Called at every look, which it
        samples."""
        times = self.read()
        if times is None:
            return True
        self.samples.append((now, *times))
        # Keep the newest sample at least WINDOW old as the start of the window.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        start, idle0, total0 = self.samples[0]
        elapsed, idle = times[1] - total0, times[0] - idle0
        if start < since or now - start < self.window:
            return None
        if elapsed <= 0 or idle < 0:
            return True  # counters that went back (a CPU taken offline): fail open
        return idle >= share * elapsed


def queued(sock: socket.socket) -> int | None:
    """Clients waiting in a listening TCP socket's accept queue; None where unknown."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_LEN)
    except OSError:
        return None
    if len(info) < _INFO_LEN:
        return None
    return _QUEUED.unpack_from(info, _QUEUED_AT)[0]


class Backlog:
    """How long the oldest client in the listen queues has waited."""

    def __init__(self) -> None:
        # (when, clients come by then): one per look that counted more than the last,
        # from the first look at which a client still waiting was there.
        self.looks: deque[tuple[float, int]] = deque()

    def waited(self, now: float, waiting: int, taken: int) -> float:
        """``waiting``: clients in the listen queues now; ``taken``: connections the
        workers have taken so far (a running count).  Returns how long the oldest of
        those waiting has waited at least, as far as the looks can tell (0.0 when none
        waits).  At most one look is kept per client waiting."""
        if waiting <= 0:
            self.looks.clear()
            return 0.0
        come = taken + waiting
        if not self.looks or come > self.looks[-1][1]:
            self.looks.append((now, come))
        # Looks whose clients have all been taken say nothing of those still waiting:
        # the oldest of these, number taken + 1, was there at the first look left.
        while self.looks and self.looks[0][1] <= taken:
            self.looks.popleft()
        return now - self.looks[0][0] if self.looks else 0.0
