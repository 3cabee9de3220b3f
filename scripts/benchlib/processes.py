"""Helper processes: the Reaper that kills everything started, and fork-gated runs."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import subprocess
import time
from typing import Any, Callable

from .constants import START_TIMEOUT

# --------------------------------------------------------------------------- processes

class Reaper:
    """Every process this script starts, so that all of them die with it, even on error."""

    def __init__(self) -> None:
        self.servers: list[subprocess.Popen] = []
        self.children: list[mp.process.BaseProcess] = []

    def stop_server(self, popen: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the server's own process group, then SIGKILL whatever is left of it."""
        if popen.poll() is None:
            self._signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(popen.pid, signal.SIGKILL)
                popen.wait(5)
        # Workers outliving their master would keep ports and CPU: kill the group's rest.
        self._signal_group(popen.pid, signal.SIGKILL)
        if popen in self.servers:
            self.servers.remove(popen)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_children(self) -> None:
        for proc in self.children:
            if proc.is_alive():
                proc.terminate()
        for proc in self.children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.children.clear()

    def cleanup(self) -> None:
        self.stop_children()
        for popen in list(self.servers):
            self.stop_server(popen, grace=3.0)


def _child_setup() -> None:
    """Forked helpers die on SIGTERM and leave Ctrl-C to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _gated_entry(prepare: Callable, run: Callable, args: tuple,
                 q: Any, start: Any, timeout: float) -> None:
    """Child body: prepare, report ready, wait for the common start, run, report."""
    _child_setup()
    try:
        state = prepare(*args)
        q.put(("ready", os.getpid(), None))
        if start.wait(timeout):
            q.put(("result", os.getpid(), run(state)))
    except BaseException as exc:  # report every failure to the parent, never hang it
        q.put(("error", os.getpid(), f"{type(exc).__name__}: {exc}"))


def run_gated(reaper: Reaper, prepare: Callable, run: Callable, arg_list: list[tuple],
              timeout: float, on_start: Callable[[], Any] | None = None) -> tuple[list, Any]:
    """Fork one process per args, start them together, collect their results.

    on_start runs after every process is ready and right before the start signal, so
    that samples it takes (server CPU) cover exactly the measured work."""
    ctx = mp.get_context("fork")
    q, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_gated_entry, args=(prepare, run, a, q, start, timeout),
                         daemon=True) for a in arg_list]
    for proc in procs:
        proc.start()
        reaper.children.append(proc)
    try:
        _collect(q, procs, "ready", time.monotonic() + START_TIMEOUT)
        before = on_start() if on_start else None
        start.set()
        results = _collect(q, procs, "result", time.monotonic() + timeout + 30)
    finally:
        reaper.stop_children()
    return results, before


def _collect(q: Any, procs: list, kind: str, deadline: float) -> list:
    """Wait for one message of the given kind from every process; raise on errors."""
    got: dict[int, Any] = {}
    while len(got) < len(procs):
        try:
            what, pid, payload = q.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(procs) - len(got)} helper processes gave no {kind}")
            if not any(p.is_alive() for p in procs):
                raise RuntimeError(f"helper processes exited before sending their {kind}")
            continue
        if what == "error":
            raise RuntimeError(f"helper process {pid} failed: {payload}")
        if what == kind:
            got[pid] = payload
    return list(got.values())
