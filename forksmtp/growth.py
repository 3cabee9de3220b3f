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
  seconds, from ``/proc/stat``: the CPUs the master may run on (a cpuset, an affinity),
  not the whole machine's; and, where a cgroup above the server caps its CPU time (a
  container's or a systemd unit's quota, cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``),
  whether that quota had the same share to spare, its use read from the cgroup.
- ``Backlog``: how long the oldest client in the listen queues has waited.  At each look
  the master counts the queues (the accept queue length that ``TCP_INFO`` gives for a
  listening socket) and the connections taken from them so far (by the workers, and by
  the master's own ``421``s at the ceiling); taken plus queued is how many clients have
  come.  A queue is served in order, so the oldest
  client waiting is the one that came after the taken ones, and it was there at the
  first look that counted that many arrivals.
- ``Pace``: how many sessions ended over the last ``PACE_WINDOW`` seconds, each a worker
  come free for the next client waiting.  Those waiting that this pace would take
  within ``WAIT_LIMIT`` need no worker more: a short stall of every worker (a
  disk that held its writes back, a host that ran something else) leaves a queue that
  waited past the limit, and a worker for each client in it grew a pool of 14 workers
  to 46 at 50 sessions, which then never shrank while the load lasted.

Where ``/proc/stat`` cannot be read, the CPUs count as having time to spare (one spare a
WINDOW while every worker is busy); so does a quota whose use cannot be read.  Where ``TCP_INFO`` cannot be read, each readable
listening socket counts as one client waiting.  ``server.spare_cpu_share = 0`` gives a
classic prefork pool instead.

A queue is served in order, but several queues are not served in order with each other:
with several listeners the wait measured is the oldest client's only roughly (a client of
one queue may wait while the workers take another's).  The workers accept from every
ready listener in one turn, so such a client waits about one session more at most.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections import deque
from typing import Callable, Iterable, NamedTuple

WINDOW = 0.25  # seconds of CPU time the gauge judges by
SPARE_SHARE = 0.10  # the CPUs had time to spare when this share of it was idle (server.spare_cpu_share)
WAIT_LIMIT = 0.1  # a client waiting this long in a listen queue grows the pool anyway
PACE_WINDOW = 0.5  # seconds of the workers' recent pace that say which waiting clients they take soon
_PACE_GAP = PACE_WINDOW / 100  # looks kept for the pace are this far apart at least, the latest aside
_PACE_LOOKS = 128  # and no more of them than this (the window holds about 100)

_TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info: eight one-octet fields, then rto, ato, snd_mss, rcv_mss, and unacked,
# which for a listening socket is its accept queue's length (sk_ack_backlog).
_QUEUED = struct.Struct("=I")
_QUEUED_AT = 24
_INFO_LEN = _QUEUED_AT + _QUEUED.size


Counts = tuple[int, ...]  # (spare, total) of one source, cumulative; a quota's adds throttled, epoch


def _ticks(rest: bytes) -> Counts:
    """(spare, total) of one cpu line's fields: user nice system idle iowait irq softirq
    steal.  Steal is time the host gave to another guest, not time this one could use."""
    fields = [int(x) for x in rest.split()[:8]]
    if len(fields) < 5:
        raise ValueError("a cpu line of too few fields")
    return fields[1] + fields[3] + fields[4], sum(fields)


def _read_stat(path: str, per_cpu: bool) -> tuple[Counts, dict[int, Counts]]:
    """The all-CPUs line's (spare, total), and each CPU's where ``per_cpu``.  Raises
    OSError or ValueError where the file cannot be read or parsed."""
    listed: dict[int, Counts] = {}
    with open(path, "rb") as f:
        name, _, rest = f.readline().partition(b" ")
        if name != b"cpu":
            raise ValueError("no all-CPUs line first")
        every = _ticks(rest)
        for line in f if per_cpu else ():
            name, _, rest = line.partition(b" ")
            if not name.startswith(b"cpu"):
                break  # the per-CPU lines come first; the rest (intr) can be long
            listed[int(name[3:])] = _ticks(rest)
    return every, listed


def _narrowed(listed: Iterable[int], cpus: frozenset[int]) -> bool:
    """Whether ``cpus`` are a part of the CPUs the file lists, to be summed alone: it
    lists each of them and others too.  Where it lists only some of them, it is a view
    of its own (LXCFS numbers a container's CPUs from 0), and its all-CPUs line is what
    the container has."""
    present = set(listed)
    return cpus <= present and not present <= cpus


def cpu_times(path: str = "/proc/stat", cpus: frozenset[int] | None = None) -> Counts | None:
    """(spare, total) clock ticks since boot of all CPUs, or of ``cpus`` alone where they
    are a part of them (``_narrowed``); None where the file cannot be read or parsed.
    Spare is idle time, I/O wait (idle while I/O is pending) and the time of niced
    processes (nice > 0), which yield it to the workers when they want it."""
    try:
        every, listed = _read_stat(path, per_cpu=cpus is not None)
    except (OSError, ValueError):
        return None
    if cpus is None or not _narrowed(listed, cpus):
        return every
    mine = [listed[cpu] for cpu in cpus]
    return sum(c[0] for c in mine), sum(c[1] for c in mine)


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on (its affinity: a cpuset, ``taskset``), or None
    where that cannot be told.  Not compared with the count of CPUs online: some C
    libraries (musl) count the affinity's."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def machine_times() -> Counts | None:
    """cpu_times of the CPUs the master may run on, as they are at this look."""
    return cpu_times(cpus=allowed_cpus())


class Mount(NamedTuple):
    fstype: str
    root: str  # the cgroup path the mount shows at its mount point
    point: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """The cgroup (v1) and cgroup2 mounts this process sees."""
    mounts = []
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                head, sep, tail = line.partition(" - ")
                fields, after = head.split(), tail.split()
                if sep and len(fields) >= 5 and len(after) >= 3 and after[0] in ("cgroup", "cgroup2"):
                    mounts.append(Mount(after[0], _unescape(fields[3]), _unescape(fields[4]),
                                        frozenset(after[2].split(","))))
    except OSError:
        return []
    return mounts


def own_cgroups(path: str = "/proc/self/cgroup") -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its cgroup v2 path."""
    groups: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(":", 2)
                if len(parts) == 3:
                    for controller in parts[1].split(",") if parts[1] else [""]:
                        groups[controller] = parts[2]
    except OSError:
        return {}
    return groups


def _levels(mount: Mount, path: str) -> list[str]:
    """The directories of cgroup ``path`` and of each cgroup above it that the mount
    shows, innermost first; [] where it shows none of them.

    Both paths are as this process's cgroup namespace sees them (cgroup_namespaces(7)):
    a container sees its own cgroup as "/", and the mount's root there too.  A root of
    only ".." parts is an ancestor of the namespace's root, with the levels between
    unknown: only the mount's own directory is known to be above this process."""
    root = [p for p in mount.root.split("/") if p]
    own = [p for p in path.split("/") if p]
    if not path.startswith("/") or ".." in own:
        return []  # outside its own namespace's view (or what no kernel writes)
    if root and all(p == ".." for p in root):
        return [mount.point]
    if ".." in root or own[:len(root)] != root:
        return []  # the mount shows another branch of the tree
    levels = [mount.point]
    for part in own[len(root):]:
        levels.append(os.path.join(levels[-1], part))
    return levels[::-1]


def _read_first(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None


class CgroupQuota:
    """One cgroup's CPU quota as a source of (spare, total, throttled) microseconds: the
    CPU time the quota allowed since the first look, what of it the cgroup did not use,
    and the time the kernel held the cgroup back for having spent its quota; then the
    count's epoch, so that counts begun at different looks are not compared.  The quota
    is spent a period (100 ms by default) at a time, so a window of looks holds two or
    three periods' worth of use: the time held back, not the use alone, tells a quota
    spent from one with time to spare.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") and ``cpu.stat``'s
    ``usage_usec`` and ``throttled_usec``; v1: ``cpu.cfs_quota_us`` (-1: none) over
    ``cpu.cfs_period_us``, ``cpu.stat``'s ``throttled_time`` (ns), and ``cpuacct.usage``
    (ns) in the cpuacct hierarchy.  A look finding no quota set gives None (no limit),
    and the count starts again, in a new epoch."""

    def __init__(self, cpu_dir: str, usage_dir: str, v2: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cpu_dir, self.usage_dir, self.v2 = cpu_dir, usage_dir, v2
        self.clock = clock
        self.last: float | None = None  # when the allowance was last added to
        self.allowed = 0.0  # µs the quota allowed since counting began
        self.epoch = 0  # counts of different epochs are not compared

    def cpus(self) -> float | None:
        """The quota in CPUs (0.5: half of one), or None where none is set."""
        if self.v2:
            text = _read_first(os.path.join(self.cpu_dir, "cpu.max"))
            parts = text.split() if text else []
            quota, period = (parts[0], parts[1]) if len(parts) == 2 else ("max", "0")
        else:
            quota = _read_first(os.path.join(self.cpu_dir, "cpu.cfs_quota_us")) or "-1"
            if quota.startswith("-"):
                return None  # -1: none; the period is not read at every look for nothing
            period = _read_first(os.path.join(self.cpu_dir, "cpu.cfs_period_us")) or "0"
        try:
            q, p = int(quota), int(period)
        except ValueError:
            return None  # "max": no quota
        return q / p if q > 0 and p > 0 else None

    def stat(self) -> dict[str, int]:
        """The cpu controller's ``cpu.stat`` (empty where it cannot be read)."""
        values: dict[str, int] = {}
        try:
            with open(os.path.join(self.cpu_dir, "cpu.stat"), encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if value.strip().isdigit():  # a line of another form: not ours to judge
                        values[key] = int(value)
        except (OSError, UnicodeDecodeError):
            return {}
        return values

    def used_and_throttled_us(self) -> tuple[int, int] | None:
        stat = self.stat()
        if self.v2:
            used, throttled = stat.get("usage_usec"), stat.get("throttled_usec")
        else:
            text = _read_first(os.path.join(self.usage_dir, "cpuacct.usage"))
            ns = stat.get("throttled_time")
            used = int(text) // 1000 if text and text.isdigit() else None
            throttled = ns // 1000 if ns is not None else None
        return None if used is None or throttled is None else (used, throttled)

    def __call__(self) -> Counts | None:
        now, cpus = self.clock(), self.cpus()
        counts = self.used_and_throttled_us() if cpus is not None else None
        if cpus is None or counts is None:
            self.last = None
            return None
        used, throttled = counts
        if self.last is not None:
            self.allowed += cpus * (now - self.last) * 1e6
        else:  # counting begins (again): nothing spare so far
            self.allowed = float(used)
            self.epoch += 1
        self.last = now
        return int(self.allowed) - used, int(self.allowed), throttled, self.epoch


def cgroup_quotas(proc_cgroup: str = "/proc/self/cgroup",
                  mountinfo: str = "/proc/self/mountinfo") -> list[CgroupQuota]:
    """A source for this process's cgroup and each above it that a mount shows: v1's cpu
    and cpuacct where the cpu controller is bound to v1 (the two must show the same
    path, as systemd and container runtimes make them), else cgroup v2.  Every level is
    kept, quota or not, since one may be set while the server runs (v1's hierarchy root,
    which takes none, aside)."""
    mounts, groups = cgroup_mounts(mountinfo), own_cgroups(proc_cgroup)

    def levels_in(option: str | None, path: str) -> tuple[Mount | None, list[str]]:
        """The first mount of the kind that shows this process's cgroup, and its levels."""
        fstype = "cgroup2" if option is None else "cgroup"
        for mount in mounts:
            if mount.fstype == fstype and (option is None or option in mount.options):
                levels = _levels(mount, path)
                if levels:
                    return mount, levels
        return None, []

    if "cpu" in groups:
        cpu, cpu_levels = levels_in("cpu", groups["cpu"])
        acct, acct_levels = levels_in("cpuacct", groups.get("cpuacct", ""))
        if cpu is None or acct is None or groups.get("cpuacct") != groups["cpu"]:
            return []
        # A v1 hierarchy's root alone has release_agent; in a container's own cgroup
        # namespace the mount's root is the container's cgroup, which may hold a quota.
        return [CgroupQuota(d, a, v2=False) for d, a in zip(cpu_levels, acct_levels)
                if not os.path.exists(os.path.join(d, "release_agent"))]
    if "" not in groups:
        return []
    # cgroup v2's root has no cpu.max: its look finds none, at the cost of one open.
    return [CgroupQuota(d, d, v2=True) for d in levels_in(None, groups[""])[1]]


def _cpu_list(cpus: frozenset[int]) -> str:
    """0-3,6: CPU numbers as cpuset(7) writes them."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe(quotas: list[CgroupQuota], cpus: frozenset[int] | None = None,
             path: str = "/proc/stat") -> str | None:
    """What narrows the CPUs the pool judges, for the log at start: the master's CPUs
    where they are not every CPU listed, and each quota set now.  None where nothing
    does (every CPU, no quota)."""
    parts = []
    if cpus is not None:
        try:
            listed = _read_stat(path, per_cpu=True)[1]
        except (OSError, ValueError):
            listed = {}
        if _narrowed(listed, cpus):
            parts.append(f"CPU{'s' if len(cpus) > 1 else ''} {_cpu_list(cpus)} of {len(listed)} "
                         "(the master's affinity)")
    for quota in quotas:
        allowed = quota.cpus()
        if allowed is not None:
            parts.append(f"a CPU quota of {allowed:g} CPUs at {quota.cpu_dir}")
    return "spares are judged by " + " and ".join(parts) if parts else None


class CpuGauge:
    """The share of CPU time idle over the last WINDOW, from a sample each look: of the
    machine's CPUs (``read``) and of each quota above the server (``limits``); the CPUs
    have time to spare only when every one of them has."""

    def __init__(self, read: Callable[[], Counts | None] = cpu_times, window: float = WINDOW,
                 limits: tuple[Callable[[], Counts | None], ...] = ()) -> None:
        self.read = read
        self.window = window
        self.limits = limits
        self.samples: deque[tuple[float, tuple[Counts | None, ...]]] = deque()

    def has_spare(self, now: float, since: float = float("-inf"),
                  share: float = SPARE_SHARE) -> bool | None:
        """Did the CPUs have ``share`` of their time to spare over the last WINDOW?
        Judged only over looks taken at ``since`` or later (when the pool ran out of idle
        workers: CPU time idle before then says nothing of what a worker more would get);
        None until a whole WINDOW of such looks is there.  Called at every look, which it
        samples."""
        sample = (self.read(), *(limit() for limit in self.limits))
        if all(counts is None for counts in sample):
            return True
        self.samples.append((now, sample))
        # Keep the newest sample at least WINDOW old as the start of the window.
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        start, first = self.samples[0]
        if start < since or now - start < self.window:
            return None
        return all(_spare(a, b, share) for a, b in zip(first, sample))


def _spare(first: Counts | None, last: Counts | None, share: float) -> bool:
    """Whether one source had ``share`` of its time spare between two samples.  An
    unreadable source fails open, as do the machine's counters going back (a CPU taken
    offline); a quota's spare going back is a quota overspent within the window, and a
    quota that held its cgroup back at all in the window had none to spare."""
    if first is None or last is None or first[3:] != last[3:]:
        return True  # unreadable, or a quota's count begun again within the window
    quota = len(first) > 2  # (spare, total, throttled, epoch); the machine's is a pair
    if quota and last[2] > first[2]:
        return False
    elapsed, idle = last[1] - first[1], last[0] - first[0]
    if elapsed <= 0 or (idle < 0 and not quota):
        return True
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


class Pace:
    """How fast the workers come free: the sessions that ended over about the last
    PACE_WINDOW seconds.  A worker whose session ends takes the next client waiting, so
    at this pace the queue is taken.  Ended, not taken: a worker just started takes a
    client without any session ending, which is the pool's growth, not its pace
    (counted as pace, the 32 workers a tick that a burst of clients holding their
    sessions started made the rest of the queue look as good as taken, and the last of
    200 such clients waited 1.7-1.8 s for its greeting instead of 0.7-0.8)."""

    def __init__(self) -> None:
        # (when, sessions ended by then, workers running free then) of the last looks.
        self.looks: deque[tuple[float, int, int]] = deque(maxlen=_PACE_LOOKS)

    def look(self, now: float, ended: int, running: int) -> None:
        """``ended``: sessions ended so far (a running count); ``running``: workers in
        a session now that are not held by their clients (SlotInfo.held_by_client),
        the ones whose sessions end at the pace."""
        looks = self.looks
        # The master looks at every wake-up (its tick, a child's exit, a worker's report
        # that it took the last idle place): about 18 a second at 50 sessions here, but
        # nothing bounds it.  A look too close to the one before the latest replaces the
        # latest, so that the looks kept span the whole window whatever their rate.
        if len(looks) >= 2 and looks[-1][0] - looks[-2][0] < _PACE_GAP:
            looks[-1] = (now, ended, running)
        else:
            looks.append((now, ended, running))
        # Looks older than the window go, but for the last at or before its start, so
        # that the pace spans the whole window where the looks allow.
        while len(looks) > 2 and looks[1][0] <= now - PACE_WINDOW:
            looks.popleft()

    def running_before(self) -> float:
        """Workers running free (in a session, not held by their clients) over the
        window, on average: each look's count weighted by the time up to the next look
        (the latest aside), so that a look a tick before the window weighs as the
        second it covers, not as one look of a hundred."""
        looks = self.looks
        span = looks[-1][0] - looks[0][0]
        if span <= 0:
            return float(looks[-1][2])
        return sum(a[2] * (b[0] - a[0]) for a, b in zip(looks, list(looks)[1:])) / span

    def running_now(self, limit: float = WAIT_LIMIT) -> int:
        """The most workers running free at any look of the last ``limit`` seconds: one
        look's count, where some clients are always slow, drifts down to none now and
        then (8 workers, three quarters of them held: none at one look in ten); all
        of a burst's do not come back within that time."""
        last = self.looks[-1][0]
        return max(running for when, _, running in self.looks if when >= last - limit)

    def taken_within(self, limit: float = WAIT_LIMIT) -> int:
        """How many clients waiting the workers would take in the next ``limit``
        seconds at the pace of the looks kept: over PACE_WINDOW or a little more (the
        look before it may be a tick, up to a second, older where the pool had a worker
        idle).  0 before two looks.

        The pace is that of the workers that ran free over the window; where fewer run
        free now (their clients went quiet on them: a burst of clients that hold their
        sessions, taken one by one as sessions ended, or a load client that stalls with
        its connections open), it is scaled down to their share now against their mean,
        never above 1.  Without that, the pace of the short sessions before held the
        pool back for up to half a window while such clients waited.  A stall of every
        worker (stopped, or waiting on the disk) leaves none held by its client: the
        pace stands, and the pool does not grow for the queue it left."""
        if len(self.looks) < 2:
            return 0
        (first, before, _), (last, ended, _) = self.looks[0], self.looks[-1]
        if last <= first or ended <= before:
            return 0
        running, mean = self.running_now(limit), self.running_before()
        if running <= 0:
            return 0
        share = min(1.0, running / mean) if mean > 0 else 1.0
        return int((ended - before) / (last - first) * limit * share)
