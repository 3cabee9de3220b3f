"""What a server costs: CPU of its process tree, its memory, RSS sampled over a transfer."""
from __future__ import annotations

import itertools
import os
import threading
from typing import Callable, TypeVar

import psutil

from .constants import MiB
from .helpers import median_of
from .servers import Server

T = TypeVar("T")


def per_thread(pid: int, name: str, parse: Callable[[str], T]) -> dict[str, T] | None:
    """``parse`` applied to /proc/PID/task/TID/<name> of every thread of pid, by thread
    id; None when pid is gone or a file cannot be read or parsed.  A thread that ended
    meanwhile is left out; a process with no thread left to read was reaped meanwhile
    (a live one has at least its leader), and gives None too, not an empty sum."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    values = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}", encoding="ascii") as f:
                values[tid] = parse(f.read())
        except FileNotFoundError:
            continue        # the thread ended meanwhile
        except (OSError, ValueError, IndexError, KeyError):
            return None     # e.g. a kernel without the field
    return values or None


def runtime_s(pid: int) -> float | None:
    """CPU time of all threads of pid in seconds, in ns precision (schedstat); None
    where there is no schedstat on this kernel: the tick counts must do.

    /proc/PID/stat (psutil's cpu_times) counts 10 ms clock ticks: summed over dozens of
    workers that each ran a few ms, truncation would swallow most of the CPU."""
    ns = per_thread(pid, "schedstat", lambda text: int(text.split()[0]))
    return None if ns is None else sum(ns.values()) / 1e9


def _switch_counts(status: str) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return (int(fields["voluntary_ctxt_switches"]),
            int(fields["nonvoluntary_ctxt_switches"]))


def thread_switches(pid: int) -> dict[str, tuple[int, int]] | None:
    """(voluntary, involuntary) context switches of each thread of pid, by thread id.

    A voluntary switch is a sleep: a wait for the client, the disk or a lock.  psutil's
    num_ctx_switches reads the main thread's counts only."""
    return per_thread(pid, "status", _switch_counts)


def context_switches(pid: int) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches of all live threads of pid, or None."""
    counts = thread_switches(pid)
    return None if counts is None else (sum(c[0] for c in counts.values()),
                                        sum(c[1] for c in counts.values()))


def reaped_faults(pid: int) -> int | None:
    """The minor faults of pid's reaped children (cminflt, /proc/PID/stat): it rises
    whenever the process reaps a child, since every process faults pages in."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[8])   # field 11 of stat(5): fields[0] here is field 3, the state
    except (OSError, ValueError, IndexError):
        return None


def cpu_snapshot(server: Server) -> dict:
    """Per live process: (user ticks s, system ticks s, precise run time s or None) and
    its threads' context switches; and the master's counters of reaped children."""
    procs: dict[int, tuple[float, float, float | None]] = {}
    switches: dict[int, dict[str, tuple[int, int]] | None] = {}
    reaped = (0.0, 0.0)
    for proc in server.tree():
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        procs[proc.pid] = (t.user, t.system, runtime_s(proc.pid))
        switches[proc.pid] = thread_switches(proc.pid)
        if proc.pid == server.popen.pid:
            reaped = (t.children_user, t.children_system)
    return {"procs": procs, "switches": switches, "reaped": reaped,
            "reaped_faults": reaped_faults(server.popen.pid)}


def switch_delta(before: dict, after: dict) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches of the server's threads between two
    snapshots, or None wherever some went uncounted: a count that could not be read; a
    process or thread of the first snapshot gone by the second (the kernel keeps an
    ended thread's or a reaped child's counts nowhere /proc shows); a child reaped
    meanwhile at all, even one forked after the first snapshot (the master's reaped
    faults moved).  A process or thread that started meanwhile counts from zero, as the
    kernel starts it."""
    if (before.get("reaped_faults") is None
            or before["reaped_faults"] != after.get("reaped_faults")):
        return None
    vol = invol = 0
    for pid, threads_then in before["switches"].items():
        if threads_then is None or after["switches"].get(pid) is None:
            return None
        if not threads_then.keys() <= after["switches"][pid].keys():
            return None
    for pid, threads_now in after["switches"].items():
        if threads_now is None:
            return None
        threads_then = before["switches"].get(pid) or {}
        for tid, (v, i) in threads_now.items():
            v0, i0 = threads_then.get(tid, (0, 0))
            if v < v0 or i < i0:
                return None     # not the same thread: a reused id
            vol, invol = vol + v - v0, invol + i - i0
    return vol, invol


#: Below this much tick-sampled CPU time (seconds; summed over a cell's rounds) the
#: user/system split is not reported: the kernel samples it a tick at a time, and a few
#: ticks say nothing.  0.1 s is 25 ticks at 250 Hz (this kernel), 10 at 100 Hz.
MIN_SPLIT_S = 0.1


def cpu_delta(before: dict, after: dict) -> tuple[float, float, float, int]:
    """(CPU s, user ticks s, system ticks s, workers that vanished) between two snapshots.

    The total comes from the precise run times when every process has one; the tick
    counts give the proportion of user and system time (see user_share).  Workers
    reaped meanwhile count through the master's children_* ticks (their part before the
    first snapshot is taken off again)."""
    gone = [pid for pid in before["procs"] if pid not in after["procs"]]
    ticks_user = after["reaped"][0] - before["reaped"][0] - sum(before["procs"][p][0] for p in gone)
    ticks_sys = after["reaped"][1] - before["reaped"][1] - sum(before["procs"][p][1] for p in gone)
    reaped_total = ticks_user + ticks_sys
    precise = 0.0
    for pid, (u, s, run) in after["procs"].items():
        u0, s0, run0 = before["procs"].get(pid, (0.0, 0.0, 0.0))
        ticks_user, ticks_sys = ticks_user + u - u0, ticks_sys + s - s0
        precise = None if precise is None or run is None or run0 is None else precise + run - run0
    total = ticks_user + ticks_sys if precise is None else precise + reaped_total
    return total, ticks_user, ticks_sys, len(gone)


def user_share(user: float, system: float) -> float | None:
    """The user part of tick-sampled CPU time, or None below MIN_SPLIT_S."""
    ticks = user + system
    return user / ticks if ticks >= MIN_SPLIT_S else None


def memory_report(server: Server) -> dict:
    """Master RSS/USS and each worker's USS (MiB). The peer is one process: its own USS."""
    master, workers = None, []
    for proc in server.tree():
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        if proc.pid == server.popen.pid:
            master = info
        else:
            workers.append(info.uss / MiB)
    if not workers and master is not None:
        workers = [master.uss / MiB]
    return {"master_rss_mib": master.rss / MiB if master else None,
            "master_uss_mib": master.uss / MiB if master else None,
            "workers": len(workers),
            "worker_uss_mib_median": median_of(workers),
            "worker_uss_mib_max": max(workers) if workers else None}


class RssSampler(threading.Thread):
    """Samples the RSS of every process of a server every 10 ms until stopped."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop = server, threading.Event()
        self.peak: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.procs: list[psutil.Process] = []

    def sample(self, refresh: bool = True) -> None:
        # Listing the tree reads every process in /proc: done once in a while only, so
        # that the sampler does not steal the CPU the transfer it measures needs.
        if refresh or not self.procs:
            self.procs = self.server.tree()
        for proc in self.procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                self.procs = []
                continue
            self.first.setdefault(proc.pid, rss)
            self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)

    def run(self) -> None:
        for n in itertools.count(1):
            if self.stop.wait(0.01):
                return
            self.sample(refresh=n % 50 == 0)
