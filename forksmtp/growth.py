"""Whether a pool with every worker busy should grow: the two signals the master reads.

A pre-forked pool that starts a worker whenever none is idle grows to one worker per
concurrent session.  Where sessions are short and the CPUs are what limits them, the
workers beyond what the CPUs can run only take turns on the same cores, each woken with
its caches cold, and throughput falls as the pool grows: at 50 sessions on 2 cores,
pools held at 8 to 14 workers stored 2,900 to 3,300 msgs/s at 0.38 to 0.41 ms of CPU per
message, one of 52 workers 2,500 to 2,600 at 0.55.  So the pool keeps its spares only
while a CPU has time for them, and past that grows for clients that wait:

- ``CpuGauge``: whether the CPUs had time to spare (idle, or idle waiting for I/O: a
  worker more could have used it) over the last ``WINDOW`` seconds, from ``/proc/stat``.
- ``Backlog``: how long the oldest client counted in the listen queues has waited.  The
  master counts the queues (the accept queue length that ``TCP_INFO`` gives for a
  listening socket) and the connections the workers have taken; a queue is served in
  order, so the clients counted at one look have all been taken once as many
  connections have been taken since.

Both fail open: where ``/proc/stat`` or ``TCP_INFO`` cannot be read, the CPU counts as
having time to spare, and the pool grows as a classic prefork pool does.
"""

from __future__ import annotations

import socket
import struct
from collections import deque

WINDOW = 0.25  # seconds of CPU time the gauge judges by
SPARE_SHARE = 0.10  # the CPUs had time to spare when this share of it was idle
WAIT_LIMIT = 0.1  # a client waiting this long in a listen queue grows the pool anyway

_TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info: eight one-octet fields, then rto, ato, snd_mss, rcv_mss, and unacked,
# which for a listening socket is its accept queue's length (sk_ack_backlog).
_QUEUED = struct.Struct("=I")
_QUEUED_AT = 24
_INFO_LEN = _QUEUED_AT + _QUEUED.size


def cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(idle, total) clock ticks of all CPUs since boot, idle counting I/O wait; None
    where the file cannot be read or parsed."""
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
    return fields[3] + fields[4], sum(fields)


class CpuGauge:
    """The share of CPU time idle over the last WINDOW, from a sample each look."""

    def __init__(self, read=cpu_times, window: float = WINDOW) -> None:
        self.read = read
        self.window = window
        self.samples: deque[tuple[float, int, int]] = deque()

    def has_spare(self, now: float, since: float = float("-inf")) -> bool | None:
        """Did the CPUs have time to spare over the last WINDOW?  Judged only over looks
        taken at ``since`` or later (when the pool ran out of idle workers: CPU time idle
        before then says nothing of what a worker more would get); None until a whole
        WINDOW of such looks is there.  Called at every look, which it samples."""
        times = self.read()
        if times is None:
            return True
        self.samples.append((now, *times))
        # Keep the newest sample at least WINDOW old as the start of the window.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        start, idle0, total0 = self.samples[0]
        elapsed = times[1] - total0
        if start < since or now - start < self.window or elapsed <= 0:
            return None
        return (times[0] - idle0) >= SPARE_SHARE * elapsed


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
    """How long the oldest client counted in the listen queues has waited."""

    def __init__(self) -> None:
        self.mark: tuple[float, int, int] | None = None  # (when, queued then, taken then)

    def waited(self, now: float, waiting: int, taken: int) -> float:
        """``waiting``: clients in the listen queues now; ``taken``: connections the
        workers have taken so far (a running count).  Returns how long at least one of
        them has been waiting, as far as the looks can tell (0.0 when none waits)."""
        if waiting <= 0:
            self.mark = None
            return 0.0
        if self.mark is None or taken - self.mark[2] >= self.mark[1]:
            # Everyone counted at the mark has been taken: those waiting now came after.
            self.mark = (now, waiting, taken)
            return 0.0
        return now - self.mark[0]
