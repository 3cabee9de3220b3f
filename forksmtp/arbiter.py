"""The master: bind, fork, then loop: wait for signals -> dispatch -> reap -> kill
stuck workers -> apply the pool plan.  Single-threaded on purpose (fork with threads
deadlocks on locks held by the other threads).

Signals arrive through ``signals.SignalQueue`` and are dispatched to ``handle_<name>``.
Worker bookkeeping: ``self.workers`` maps pid -> ``Child``; a pid leaves the table when
it is reaped, and only pids in the table are ever signalled (no stale-pid accidents).
The scoreboard slot of a reaped worker is repaired, so a worker killed mid-session never
leaves the connection counts inflated.

While the pool is at ``max_workers`` and no worker is idle, the master watches the
listening sockets itself and answers ``421 4.3.2`` once admissions have stalled, so a
client never waits silently in the listen backlog.  (Postfix's master watches an idle
socket to start processes on demand; at its process limit clients wait.  Answering
them is postscreen's job there, and ours here.)
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import (config as config_mod, connection, growth, limits, listeners, maildirs, pool, process,
               stats, tls)
from .authlimit import AuthLimiter
from .connrate import ConnectionRate
from .overflow import OverflowGuard
from .security import Security, certificate_warning, listen_addresses, load_security
from .logs import ALWAYS, Log
from .scoreboard import BUSY, IDLE, STARTING, STATE_NAMES, STOPPING, LockBusy, Scoreboard
from .signals import HANDLED, MAILDIR_CALL_EVERY, NAMES, SignalQueue
from .worker import EXIT_BOOT_ERROR, Worker, in_networks, networks

TICK = 1.0  # seconds between pool checks when nothing happens
#: An idle worker turns its accept loop every second: one silent this long is stopped
#: (SIGSTOP) or wedged.
IDLE_SILENCE = 30.0
FAST_TICK = 0.05  # while spawning or while the master answers overflow connections
TMP_CLEAN_INTERVAL = 3600.0
#: Seconds between two [POOL] lines about workers started for clients kept waiting: under
#: a lasting overload the master starts some at every 50 ms tick, and one line a second
#: sums them.
KEPT_WAITING_LOG_EVERY = 1.0
#: A certificate near its end is warned about at most this often (seconds).
CERT_WARN_EVERY = 86400.0
KILL_GRACE = 3.0  # after SIGQUIT, before SIGKILL
STUCK_GRACE = 10.0  # beyond the longest timeout, a silent busy worker is wedged
#: How long a silent busy worker waiting on its disk is left to it: storing a message is
#: bounded by no timeout of ours, and RFC 5321 4.5.3.2.6 has the client wait 10 minutes
#: for the reply to its final dot.
DISK_WAIT = 600.0 + STUCK_GRACE
#: Looks in a row that must find a silent busy worker out of its disk wait before it is
#: judged wedged: between two system calls of one commit (the file's fsync, the link,
#: the directory's fsync) it is out of that wait for microseconds, and a look may fall
#: there, the first one past its stuck limit included.
DISK_LOOKS_OUT = 2
#: Workers hold the admission lock for microseconds: when the master has failed to take it
#: for this long, its holder is stopped or wedged, and every admission waits behind it.
LOCK_STALL = 5.0


def _is_crash(status: int, served: int) -> bool:
    """An exit that says "this worker could not run": an error status or a fault
    signal.  SIGKILL/SIGTERM/SIGINT/SIGQUIT come from an operator (or the OOM killer)
    and say nothing about whether the next worker can start; except a SIGKILL (the
    master's own aside) of a worker that had not ``served`` a session yet: something
    that kills every new worker at once (the OOM killer under a memory limit, which
    picks workers first) would otherwise have the master fork as fast as it can."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return sig not in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) or (
            sig == signal.SIGKILL and served == 0)
    return os.WEXITSTATUS(status) != 0


#: What a reload reports as its failure, keeping the running config; anything else is a bug.
#: (A certificate, password file or pidfile that fails is a ConfigError by then: see
#: security.load_security and _named_key.  maildirs.MaildirError is an OSError.)
RELOAD_ERRORS = (config_mod.ConfigError, listeners.BindError, OSError)


def stuck_limit(cfg) -> float:
    """How long a worker in a session may show no progress: no wait of a healthy one
    outlasts the longest timeout (config.TimeoutsConfig), the stress-mode command timeout
    included, nor the greeting delay (a worker heartbeats between waits, not in one)."""
    t = cfg.timeouts
    return max(t.command, t.data_block, t.data_done, t.stress_command,
               cfg.server.greeting_delay) + STUCK_GRACE


def silent_for(last_activity: float, started: float, now: float) -> float:
    """Seconds a worker has shown no progress: never more than the master knows it has
    lived.  A slot timestamp older than the worker's start says nothing about the worker
    (one read as 0.0 once got a healthy worker killed as silent for the host's uptime;
    such torn reads are gone, see ``scoreboard._store``, and this bound stays)."""
    return now - max(last_activity, started)


@dataclass
class Child:
    pid: int
    slot: int
    generation: int
    started: float
    stuck_after: float  # silence that proves it wedged, by the config it started with
    term_sent: bool = False
    quit_sent: float = 0.0
    killed_because: str = ""  # why the master itself sent SIGKILL, if it did
    looks_out_of_wait: int = 0  # judged looks in a row that found it out of its disk wait
    disk_wait_warned: float = -1.0  # last_activity of the wait on its disk last warned about


class KeptWaiting:
    """Workers started for clients kept waiting in the listen queues, for the log: the
    first at once, then one line a second at most, summing those started meanwhile, so
    that an operator can tell why the pool grew."""

    def __init__(self) -> None:
        self.started = 0  # since the last line
        self.waited = 0.0  # the longest wait seen among those ticks
        self.first = self.last = 0.0  # when the first and the last of them were started
        self.logged = float("-inf")

    def add(self, now: float, started: int, waited: float) -> None:
        if started <= 0:
            return
        if not self.started:
            self.first = now
        self.started += started
        self.last = now
        self.waited = max(self.waited, waited)

    def line(self, now: float, workers: int, ceiling: int) -> str | None:
        """The line to log now, or None (nothing started, or a line less than
        KEPT_WAITING_LOG_EVERY ago)."""
        if not self.started or now - self.logged < KEPT_WAITING_LOG_EVERY:
            return None
        # Summed lines come at the next look past the second, up to a tick (1 s) late.
        span = f" in {self.last - self.first:.1f}s" if self.last - self.first >= 0.05 else ""
        text = (f"started {self.started} worker{'s' if self.started != 1 else ''}{span} for "
                f"clients kept waiting in the listen queue up to {self.waited:.2f}s; "
                f"{workers} workers of max_workers {ceiling}")
        self.started, self.waited, self.logged = 0, 0.0, now
        return text


#: limit_exceptions, parsed once per config for the master's count of its refusals.
_networks = functools.lru_cache(maxsize=4)(networks)


class Arbiter:
    def __init__(self, cfg, overrides: dict | None = None) -> None:
        self.cfg = cfg
        self.overrides = dict(overrides or {})
        self.log = Log(cfg.log.level, cfg.log.file)
        self.generation = 1
        self.workers: dict[int, Child] = {}
        self.sockets: dict[listeners.ListenAddr, socket.socket] = {}
        self.target = cfg.server.workers
        self.stopping = False
        self.stop_deadline = 0.0
        self.started = time.monotonic()
        self.pool_state = pool.PoolState()
        self.next_tmp_clean = 0.0
        self.last_pass = -MAILDIR_CALL_EVERY
        # Maildirs a reload dropped while workers of the generation before may still
        # write into them: a crash of one leaves its named tmp/ file (the fallback
        # without O_TMPFILE) there, and no later pass would look at them again.
        self.draining_maildirs: set[str] = set()
        self.overflow = OverflowGuard(self.log, count=self._count_refused)
        self._last_stuck_check = float("-inf")
        self._silence_from = 0.0  # silence counts from here at the earliest (the end of a stall)
        self.last_pool_reason = ""
        self.ceiling_warning = limits.Seldom(pool.CEILING_WARN_EVERY)
        self.stress = limits.StressSwitch()
        self.spawn_pending = False
        self.dry = False  # no worker idle or starting at the last look
        self.dry_since = 0.0  # when the pool last ran out of idle workers
        # Whether a busy pool's CPUs have time for a worker more: the CPUs the master may
        # run on, and any cgroup CPU quota above it (found once: a daemon does not move).
        self.quotas = growth.cgroup_quotas()
        self.cpu = growth.CpuGauge(growth.machine_times, limits=tuple(self.quotas))
        self.backlog = growth.Backlog()  # how long clients have waited in the listen queues
        self.pace = growth.Pace()  # how fast the workers come free for those clients
        self.kept_waiting = KeptWaiting()  # workers started for them, for the log
        self.old_pending = False  # a reload's old generation still to be retired
        self.unrepaired: set[int] = set()  # slots of reaped workers, repaired once the lock is free
        self.lock_judged = float("-inf")  # when _watch_lock last judged a stall
        self.cert_end: float | None = None  # when the certificate loaded last ends (epoch s)
        self.cert_warning = limits.Seldom(CERT_WARN_EVERY)
        self.ids: tuple[int | None, int | None] = (None, None)  # workers' uid and gid, with the config

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        # Queued from the start: a signal sent as soon as the pidfile appears (a HUP from
        # a script, a TERM) must not find the default action, which kills the master.
        self.signals = SignalQueue()
        self.signals.install()
        self.tls_context, self.passwords = load_security(cfg)
        self.ids = self._worker_ids(cfg)
        self._note_certificate(cfg)
        for addr in sorted(listen_addresses(cfg)[0], key=str):
            self.sockets[addr] = self._named(cfg, addr, listeners.bind)
        maildirs.prepare(cfg, self.log, self.ids)
        # That made and swept every Maildir: the next pass is due in an hour.  Run again
        # at the first tick, it would race an operator's first change to a Maildir.
        self.next_tmp_clean = time.monotonic() + TMP_CLEAN_INTERVAL
        if cfg.server.pidfile:  # held by another live process: the start fails, named as a reload's
            _named_key(cfg, self.overrides, "server.pidfile", process.write_pidfile)
        nslots = 2 * cfg.server.max_workers + 16  # room for an old generation during reload
        self.board = Scoreboard.create(nslots)
        self.board.set_generation(self.generation)
        self.auth_limiter = AuthLimiter(self.board, checks=_auth_checks(cfg))
        self.conn_rate = ConnectionRate(self.board)  # made whether on or not: a reload may turn it on
        self.death_r, self.death_w = process.parent_death_pipe()
        process.set_title(self._title())
        connection.tune_for_big_reads()
        process.load_session_codecs()
        gc.collect()
        gc.freeze()  # workers share the master's heap pages instead of copying them

    def _title(self) -> str:
        where = self.cfg.path or "built-in defaults"
        return f"forksmtp: master {where} (gen {self.generation})"

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        listen = ", ".join([str(a) for a in self.cfg.server.listen]
                           + [f"SMTPS {a}" for a in (self.cfg.tls.implicit_listen if self.cfg.tls else ())])
        self._manage_pool(time.monotonic())
        self.log.info("READY", f"Listening on {listen} ({self.target} workers)")
        judged = growth.describe(self.quotas, growth.allowed_cpus())
        if judged and self.cfg.server.spare_cpu_share > 0:
            self.log.info("POOL", judged)  # an operator can see the container's limits were found
        process.sd_notify("READY=1")
        self.fast = False
        while True:
            at_ceiling = len(self.workers) >= self._ceiling()
            # A worker's call for more workers (the pool ran dry) ends a slow tick's wait,
            # not a fast one's, and not twice running: at most one extra tick per FAST_TICK
            # however often workers call.
            # With no worker free, the master watches the listen queues (see _manage_pool).
            dry = self.dry and not self.stopping  # a stop starts no worker
            slow = not (self.fast or self.spawn_pending or at_ceiling or dry or self.signals.wanted)
            for sig in self.signals.wait(TICK if slow else FAST_TICK, want=slow):
                self._guarded(getattr(self, f"handle_{NAMES[sig]}"))
            if self.signals.maildirs_wanted:
                self._bring_pass_forward(time.monotonic())
            self._guarded(self.reap)
            if self.stopping:
                if self._stop_step(time.monotonic()):
                    return 0
                self._guarded(self._stopping_tick)
                continue
            self._guarded(self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        snap = self._snapshot()
        self._watch_lock(now)
        self._murder_stuck(snap, now)
        self._manage_pool(now, snap)
        self._retire_old()
        self.fast = self.overflow.check(snap, now, len(self.workers), self._ceiling(),
                                        list(self.sockets.values()), frozenset(self._implicit_sockets()),
                                        held_back=now < self.pool_state.backoff_until)
        self._housekeeping(now)

    def _count_refused(self, ip: str, now: float) -> None:
        """A client the master refused because every worker was busy at max_workers
        counts toward max_connection_rate, as every connect counts in Postfix's anvil: a
        client that hammers a full server is still over its rate when a worker comes
        free, instead of starting afresh.  The master's lock rule holds (MASTER_LOCK_WAIT
        at most, then one try until one succeeds): a count the lock's holder keeps from
        it is given up, not waited for.  The config is the master's own, so a reload
        applies here at once, and to the workers with the generation it forks."""
        server = self.cfg.server
        if server.max_connection_rate <= 0:
            return
        if server.limit_exceptions and in_networks(ip, _networks(server.limit_exceptions)):
            return
        try:
            self.conn_rate.count(ip, now)
        except LockBusy:
            pass

    def _stopping_tick(self) -> None:
        """While sessions drain: a worker stopped holding the admission lock would hold
        every other one at its session's end (release) until the graceful timeout."""
        self._snapshot()
        self._watch_lock(time.monotonic())

    def _snapshot(self):
        """The scoreboard as the master plans with it: slots of reaped workers whose
        repair waits for the lock are left out (their processes are gone)."""
        for slot in sorted(self.unrepaired):
            self._repair(slot)
        snap = self.board.snapshot()
        if self.unrepaired:
            snap = dataclasses.replace(snap, slots=tuple(s for s in snap.slots
                                                         if s.index not in self.unrepaired))
        return self._mark_signalled(snap)

    def _mark_signalled(self, snap):
        """A worker writes its busy or idle state without the lock, after checking that
        the master has not marked it stopping: a SIGTERM's mark set in between is lost,
        and the retiring worker would count as one of the pool for the rest of its
        session (a SIGTTOU spent on it again, its replacement started late).  The master
        knows whom it sent SIGTERM: it marks them again, and plans with them stopping."""
        signalled = {c.slot for c in self.workers.values() if c.term_sent}
        lost = [s for s in snap.slots if s.index in signalled and s.state != STOPPING]
        if not lost:
            return snap
        for s in lost:
            self.board.set_stopping(s.index)
        fixed = {s.index: dataclasses.replace(s, state=STOPPING) for s in lost}
        return dataclasses.replace(snap, slots=tuple(fixed.get(s.index, s) for s in snap.slots))

    def _implicit_sockets(self) -> list[socket.socket]:
        """The listening sockets whose clients speak TLS first (``implicit_listen``)."""
        implicit = listen_addresses(self.cfg)[1]
        return [sock for addr, sock in self.sockets.items() if addr in implicit]

    def _guarded(self, step) -> None:
        """Run one step of the loop; an unexpected error is logged, never fatal: the
        master's death would take every worker's session down with it."""
        try:
            step()
        except Exception:
            self.log.error("ERROR", "master: " + traceback.format_exc().replace("\n", " | "))

    # -- signal handlers (run in the loop, never in signal context) ------------------------

    def handle_chld(self) -> None:
        pass  # reap() runs after every wake-up

    def handle_hup(self) -> None:
        if self.stopping:  # a reload would listen again and start workers for nothing
            self.log.warning("RELOAD", "stopping: reload ignored")
            return
        self.reload()

    def handle_usr1(self) -> None:
        doc = stats.dumps(self._stats())
        self.log.line("STATS", doc, ALWAYS)  # asked for: written whatever the log level
        if self.cfg.server.stats_file:
            try:
                stats.write_atomic(self.cfg.server.stats_file, doc)
            except OSError as exc:
                self.log.error("ERROR", f"cannot write stats_file {self.cfg.server.stats_file}: "
                                        f"{exc.strerror or exc}")

    def handle_term(self) -> None:
        if self.stopping:
            return self.handle_quit()
        self.log.info("STOP", f"graceful stop: draining sessions for up to {self.cfg.server.graceful_timeout:g}s")
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.server.graceful_timeout
        self._close_listeners()
        for child in list(self.workers.values()):
            self._signal(child, signal.SIGTERM)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.log.info("STOP", "immediate stop")
        self.stopping = True
        self.stop_deadline = time.monotonic()
        self._close_listeners()
        for child in list(self.workers.values()):
            self._quit(child, time.monotonic())

    def _pool_count(self, current: list) -> int:
        """The pool's size once what was asked settles: the workers running, or the
        minimum a SIGTTIN raised above them (its worker may not have started yet), less
        the retirements a SIGTTOU asked for.  Both handlers count so, or a SIGTTIN and a
        SIGTTOU handled in one turn would not cancel out."""
        return max(len(current), self.target) - self.pool_state.retire_requests

    def handle_ttin(self) -> None:
        """One worker more, kept: the pool minimum becomes the count plus one.  (Only
        raising the minimum would do nothing while load keeps the pool above it.)"""
        if self.stopping:
            self.log.info("POOL", "SIGTTIN ignored during a stop")
            return
        size = self._pool_count(pool.current_workers(self._snapshot()))
        if size >= self._ceiling():
            self.log.info("POOL", f"SIGTTIN: {size} workers, the max_workers ceiling; none added")
            return
        if self.pool_state.retire_requests:
            self.pool_state.retire_requests -= 1  # an earlier SIGTTOU's worker stays instead
        self.target = max(self.target, size + 1)
        self.log.info("POOL", f"SIGTTIN: {size} workers; one more; pool minimum is now {self.target}")

    def handle_ttou(self) -> None:
        """One worker fewer: the pool minimum drops below the count (never below 1) and,
        unless that only cancels a SIGTTIN's worker not started yet, one is retired (see
        pool._retire_requested)."""
        if self.stopping:
            self.log.info("POOL", "SIGTTOU ignored during a stop")
            return
        current = pool.current_workers(self._snapshot())
        size = self._pool_count(current)
        if size <= 1:
            self.log.info("POOL", f"SIGTTOU: {size} workers; the pool keeps at least one")
            return
        self.target = min(self.target, size - 1)
        running = len(current) - self.pool_state.retire_requests
        spares = self.cfg.server.min_spare_workers
        if running <= self.target:
            what = "one fewer"  # a SIGTTIN's worker, not started yet, will not be
        elif running <= spares and not any(s.state == BUSY for s in current):
            what = f"all idle spares that min_spare_workers = {spares} keeps; none retired"
        else:
            self.pool_state.retire_requests += 1
            what = "retiring one"
        self.log.info("POOL", f"SIGTTOU: {size} workers; {what}; pool minimum is now {self.target}")

    # -- workers -------------------------------------------------------------------------

    def spawn(self) -> int | None:
        slot = self.board.free_slot()
        if slot is None:
            self.log.error("POOL", "no free scoreboard slot; not spawning")
            return None
        now = time.monotonic()
        self.board.claim_slot(slot, 0, self.generation, now)
        try:
            pid = self._fork()
        except OSError as exc:  # EAGAIN/ENOMEM: free the slot, and wait before trying again
            self._repair(slot)
            self.pool_state.record_fork_failure(now)
            self.log.error("POOL", f"cannot fork a worker: {exc.strerror}")
            return None
        if pid == 0:  # child: never return into the master's code
            code = EXIT_BOOT_ERROR
            try:
                code = self._child(slot)
            except BaseException:
                self.log.error("WORKER", "worker crashed: " + traceback.format_exc().replace("\n", " | "))
                code = 1
            finally:
                os._exit(code)
        self.board.set_pid(slot, pid)
        self.workers[pid] = Child(pid, slot, self.generation, now, stuck_limit(self.cfg))
        return pid

    def _fork(self) -> int:
        """fork() with the master's signals blocked.  A signal sent to a new worker before
        its own handlers are in place would otherwise run the master's handler in the
        child and be lost there: the SIGTERM of a quick second reload or a SIGTTOU would
        leave the worker running for good (the master signals each worker once).  Blocked,
        it stays pending until the child unblocks it in ``_child``."""
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        return pid

    def _child(self, slot: int) -> int:
        # First thing, and again after a privilege drop, which clears it: a worker stopped
        # before the call would get no SIGCONT at the master's death (see the function).
        process.continue_when_orphaned()
        # Until then it bore the master's title, and `pgrep -f "forksmtp: master"` found it.
        process.set_title(f"forksmtp: worker starting (gen {self.generation})")
        self.signals.reset_in_child()
        os.close(self.death_w)
        process.release_pidfiles_in_child()
        socks = list(self.sockets.values())
        security = Security(self.tls_context, self.passwords,
                            frozenset(s.fileno() for s in self._implicit_sockets()), self.auth_limiter,
                            self.conn_rate)
        w = Worker(self.cfg, socks, self.board, slot, self.generation, self.death_r, self.log, security,
                   self.signals.want_w)
        w.prepare()  # opens what needs privileges (the scoreboard lock) first
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)  # the worker's handlers are set
        if self.ids != (None, None):
            process.drop_privileges(*self.ids)
            process.continue_when_orphaned()
        return w.run()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.workers.pop(pid, None)
            if child is None:
                continue  # not ours (e.g. a reparented orphan when we run as pid 1)
            served = self.board.sessions(child.slot)  # before the repair clears the slot
            self._repair(child.slot)
            if child.generation != self.generation and all(
                    c.generation == self.generation for c in self.workers.values()):
                self._fresh_ceiling_warnings()  # the drain's ceiling is over (see there)
                # No worker is left that may write into the Maildirs a reload dropped: a
                # last look at them (this one may have died there), then they are not ours.
                maildirs.sweep_dropped(self.draining_maildirs, self.log)
                self.draining_maildirs.clear()
            lifetime = time.monotonic() - child.started
            if not (child.term_sent or child.quit_sent or child.killed_because) and _is_crash(
                    status, served):
                self.pool_state.record_exit(lifetime, time.monotonic())
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
                # A named tmp file (the non-O_TMPFILE fallback) of a dead pid can go now.
                self.next_tmp_clean = 0.0
            self._log_exit(child, status, lifetime)

    def _repair(self, slot: int) -> None:
        """Free a dead worker's slot and drop its counts, or, while the admission lock is
        held, retry on the next tick (``_snapshot`` leaves the slot out meanwhile)."""
        try:
            self.board.repair(slot)
        except LockBusy:
            self.unrepaired.add(slot)
        else:
            self.unrepaired.discard(slot)
            self.auth_limiter.worker_gone(slot)  # before a new worker may claim the slot

    def _watch_lock(self, now: float) -> None:
        """Kill the stopped workers in admission once the master has failed to take the
        admission lock for LOCK_STALL.

        A worker stopped (SIGSTOP, a debugger) while it holds the lock would otherwise
        hold every other worker's next session at its first step, and the master's
        repairs.  Workers that merely wait for the lock sleep in flock; one that is
        stopped while it waits holds nothing, but serves nobody either."""
        since = self.board.lock_missed_since
        if since is None or now - since < LOCK_STALL or now - self.lock_judged < LOCK_STALL:
            return
        self.lock_judged = now  # judged and said once per LOCK_STALL, not every tick
        by_slot = {c.slot: c for c in self.workers.values()}
        waiting = [by_slot[i] for i in self.board.in_admission() if i in by_slot]
        stopped = [c for c in waiting if not c.killed_because and process.is_stopped(c.pid)]
        if not stopped:
            self.log.error("WORKER", f"the admission lock {self.board.lock_path} has been held for "
                                     f"{now - since:.0f}s and no worker in admission is stopped "
                                     f"({len(waiting)} waiting); admissions wait for it")
        for child in stopped:
            self.log.error("WORKER", f"worker {child.pid} has been stopped in admission while the "
                                     f"lock was held for {now - since:.0f}s; killing it (slot {child.slot})")
            child.killed_because = f"stopped in admission for {now - since:.0f}s"
            self._signal(child, signal.SIGKILL)

    def _log_exit(self, child: Child, status: int, lifetime: float) -> None:
        if os.WIFSIGNALED(status):
            sig = process.signal_name(os.WTERMSIG(status))
            hint = ""
            if sig == "SIGKILL":
                hint = (f" (sent by the master: {child.killed_because})" if child.killed_because
                        else " (out of memory, or killed by the operator?)")
            self.log.warning("WORKER", f"worker {child.pid} killed by {sig}{hint}")
        elif os.WEXITSTATUS(status) != 0:
            self.log.warning("WORKER", f"worker {child.pid} exited with status {os.WEXITSTATUS(status)} after {lifetime:.1f}s")
        else:
            self.log.debug("WORKER", f"worker {child.pid} exited after {lifetime:.1f}s")

    def _signal(self, child: Child, sig: int) -> None:
        """Signal a pid we still own; SIGTERM at most once per worker."""
        if sig == signal.SIGTERM:
            if child.term_sent:
                return
            child.term_sent = True
            self.board.set_stopping(child.slot)
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass  # exited; reap() will settle it

    def _quit(self, child: Child, now: float) -> None:
        if not child.quit_sent:
            child.quit_sent = now
            self._signal(child, signal.SIGQUIT)
        elif now - child.quit_sent > KILL_GRACE:
            child.killed_because = f"still running {KILL_GRACE:g}s after SIGQUIT"
            self._signal(child, signal.SIGKILL)

    def _murder_stuck(self, snap, now: float) -> None:
        """Kill workers whose heartbeat stopped beyond every configured timeout.

        A healthy worker in a session touches its slot when a wait for its client ends
        (at most once a second while data flows), and no wait outlasts the longest
        timeout; one silent for longer than that is wedged (a hung filesystem, a bug).
        Idle workers are judged by their idle beat instead (their last_activity says
        since when they are idle, the pool's max_idle): one whose accept loop has not
        turned for IDLE_SILENCE is stopped or wedged, and so is one told to stop while
        idle that has neither left it nor exited in that time.  Each
        worker is judged by the timeouts of the config it started with: a session begun
        before a reload that shortened them may still wait as long as the old ones allow."""
        # A master that itself did not run for a while (the host or the VM was frozen,
        # a cgroup freezer or `docker pause` held every process together) cannot tell
        # a worker's silence apart, idle or busy: woken before its workers, it would
        # kill them for the stall's length.  Silence is then counted from the end of
        # the stall, not from before it.
        if now - self._last_stuck_check >= IDLE_SILENCE / 4:
            self._silence_from = now
        self._last_stuck_check = now
        for slot in snap.slots:
            child = self.workers.get(slot.pid)
            if child is None or child.killed_because:  # killed already: one line, one signal
                continue
            # Told to stop (a reload, a retirement, a graceful stop) while idle: its
            # last_activity is still the moment it became idle, which says nothing of
            # whether it is alive now (one idle for longer than the stuck limit was
            # killed at every reload).  It leaves its accept loop within a second.
            sessionless = slot.state == STOPPING and not slot.in_session
            if slot.state == IDLE or (sessionless and slot.idle_beat):
                silent = now - max(slot.idle_beat, child.started, self._silence_from)
                if slot.idle_beat and silent > IDLE_SILENCE:
                    self._kill_idle(child, slot, silent)
                continue
            if slot.state == STARTING or sessionless:
                # Counted as a spare while it starts, so none replaces it: a worker that
                # does not get ready (stopped, a hung user lookup before the privilege
                # drop) is judged as a silent idle one is, not by the session timeouts.
                silent = now - max(child.started, self._silence_from)
                if silent > IDLE_SILENCE:
                    self._kill_idle(child, slot, silent, "did not get ready")
                continue
            silent = silent_for(max(slot.last_activity, self._silence_from), child.started, now)
            if silent < child.stuck_after:
                child.looks_out_of_wait = 0
                continue
            if silent < DISK_WAIT and self._storing(child):
                # Not wedged: storing on a slow disk (a large message's fsync), which no
                # timeout bounds.  Killed, it would lose the message, and every retry of
                # it the same way.  One warning per wait: a wait is known by the activity
                # that began it (a stall of the master's own restarts the count of
                # silence, not the wait).
                if child.disk_wait_warned != slot.last_activity:
                    child.disk_wait_warned = slot.last_activity
                    self.log.warning("WORKER", f"worker {child.pid} has waited on its disk for "
                                               f"{silent:.0f}s; left to it up to {DISK_WAIT:.0f}s "
                                               f"(slot {slot.index})")
                continue
            self.log.error("WORKER", f"worker {child.pid} made no progress for {silent:.0f}s; killing it "
                                     f"(slot {slot.index} {STATE_NAMES[slot.state]}, last activity "
                                     f"{slot.last_activity:.3f}, started {child.started:.3f})")
            child.killed_because = f"no progress for {silent:.0f}s"
            self._signal(child, signal.SIGKILL)

    @staticmethod
    def _storing(child: Child) -> bool:
        """Is the silent busy worker waiting on its disk?  Taken so until DISK_LOOKS_OUT
        looks in a row, however far apart, have found it out of that wait: one look may
        fall between two system calls of a slow commit."""
        if process.waits_on_disk(child.pid):
            child.looks_out_of_wait = 0
            return True
        child.looks_out_of_wait += 1
        return child.looks_out_of_wait < DISK_LOOKS_OUT

    def _kill_idle(self, child: Child, slot, silent: float, what: str = "") -> None:
        """An idle worker that no longer turns its accept loop (stopped with SIGSTOP,
        wedged) still counts as a spare, so none would replace it, and so does a
        starting one that never gets ready.  (A connection the kernel woke it for just
        before it stopped, EPOLLEXCLUSIVE waking no other, is taken at another idle
        worker's turn: Worker._take_left_behind.)"""
        kind = {IDLE: "idle", STARTING: "starting"}.get(slot.state, "stopping")
        what = what or ("has not left its accept loop" if slot.state == STOPPING
                        else "has not turned its accept loop")
        self.log.error("WORKER", f"{kind} worker {child.pid} {what} for "
                                 f"{silent:.0f}s; killing it (slot {slot.index})")
        child.killed_because = f"{kind} and silent for {silent:.0f}s"
        self._signal(child, signal.SIGKILL)

    def _manage_pool(self, now: float, snap=None) -> None:
        snap = snap or self._snapshot()
        settings = dataclasses.replace(pool.PoolSettings.from_server(self.cfg.server), workers=self.target)
        dry = not snap.count(IDLE, STARTING)
        if dry and not self.dry:
            self.dry_since = now
        self.dry = dry
        # Both sampled at every look: a window ready when the pool runs dry, and the
        # queues' history kept while a worker starts (it takes nobody yet).
        cpu_spare = self.cpu.has_spare(now, self.dry_since, settings.spare_cpu_share) is True
        waiting = self._clients_waiting()
        # Taken from the queues: by workers (counted at admission) and by the master's own
        # overflow 421s, which empty the queues as well.
        taken = snap.connections_total + self.overflow.rejected + self.overflow.rejected_held
        waited = self.backlog.waited(now, waiting, taken)
        stalled = waited >= growth.WAIT_LIMIT
        # Sessions ended so far: begun (counted as a worker takes its client, dead
        # workers' included) less those still running.  The master's own 421s are no
        # part of it: they free no worker.
        in_session = sum(1 for s in snap.slots if s.in_session)
        held = sum(1 for s in snap.slots if s.held_by_client)
        self.pace.look(now, snap.totals.sessions - in_session, in_session - held)
        plan = pool.plan(snap, settings, self.pool_state, now, waiting=waiting,
                         cpu_spare=cpu_spare, stalled=stalled,
                         taken_soon=self.pace.taken_within(growth.WAIT_LIMIT) if stalled else 0)
        # Log a reason once (per back-off step), not every tick: its text carries a
        # countdown and the count of crashes, which grows within a step.  A tick that
        # needs no worker has no reason to give; within a back-off it does not make the
        # step's reason news again (spares come and go with the sessions: one step was
        # logged 16 times).
        if plan.reason:
            reason_key = f"{plan.reason.partition(':')[0]}/{self.pool_state.backoff}"
            if reason_key != self.last_pool_reason:
                self.last_pool_reason = reason_key
                if self._worth_warning(plan.reason, now):
                    self.log.warning("POOL", plan.reason)
        elif not self.pool_state.backoff:
            self.last_pool_reason = ""
        started = 0
        for _ in range(plan.spawn):
            if self.spawn() is None:
                break
            started += 1
        self.kept_waiting.add(now, min(started, plan.for_waiting), waited)
        line = self.kept_waiting.line(now, len(self.workers), settings.max_workers)
        if line:
            self.log.info("POOL", line)
        by_slot = {c.slot: c for c in self.workers.values()}
        for idx in plan.retire:
            child = by_slot.get(idx)
            if child is not None:
                self._signal(child, signal.SIGTERM)
        self.spawn_pending = plan.spawn > 0
        # Workers in a session, those marked stopping (a reload's old generation, a
        # retirement) included: that mark sticks for the rest of their sessions, and
        # counting states alone turned stress off while every worker was still busy.
        busy = in_session
        over = limits.in_stress(busy, self._most_sessions(), self.cfg.server.stress_threshold)
        stress = self.stress.decide(over, snap.stress, now)
        if stress != snap.stress:
            self.board.set_stress(stress)
            self.log.warning("STRESS", f"stress mode {'on' if stress else 'off'}: {busy} busy workers")

    def _ceiling(self) -> int:
        """The most workers there may be: max_workers, unless a reload raised it beyond
        the scoreboard made at start (2 x max_workers + 16 slots), which holds no more.
        The pool's plan stops there too; the master answers 421 from there, where at the
        configured figure it would leave clients waiting silently in the backlog."""
        return min(self.cfg.server.max_workers, self.board.nslots)

    def _most_sessions(self) -> int:
        """The most sessions there can be at once, which stress_threshold is a share of:
        the pool's ceiling, or max_connections where that is lower.  Of max_workers
        alone, the defaults (0.8 of 64 workers, 52, with sessions held to 50) could
        never switch stress on."""
        return min(self._ceiling(), self.cfg.server.max_connections)

    def _clients_waiting(self) -> int:
        """How many clients wait in the listen queues (their accept queues' lengths; one
        for each readable socket whose length is unknown), taking nothing from them."""
        count, unknown = 0, []
        for sock in self.sockets.values():
            n = growth.queued(sock)
            if n is None:
                unknown.append(sock)
            else:
                count += n
        if unknown:
            count += len(select.select(unknown, [], [], 0)[0])
        return count

    def _fresh_ceiling_warnings(self) -> None:
        """After a reload (a new max_workers is a new ceiling) and again once the old
        generation has drained (its workers count towards the ceiling while they finish
        their sessions, which may spend the warning on a ceiling of the reload's making),
        the first time the pool is full is worth a line."""
        self.ceiling_warning.reset()
        self.overflow.ceiling_warning.reset()

    def _worth_warning(self, reason: str, now: float) -> bool:
        """Every reason is logged when it begins, except the ceiling, which comes back with
        each session that ends under steady load: once per CEILING_WARN_EVERY."""
        return not reason.startswith(pool.CEILING) or self.ceiling_warning.allow(now)

    def _bring_pass_forward(self, now: float) -> None:
        """A worker met a Maildir gone that it could not make again: the pass below makes
        it (and hands it to server.user) now, or MAILDIR_CALL_EVERY after the last pass,
        rather than within the hour."""
        self.next_tmp_clean = min(self.next_tmp_clean, max(now, self.last_pass + MAILDIR_CALL_EVERY))

    def _housekeeping(self, now: float) -> None:
        if now < self.next_tmp_clean:
            return
        self.next_tmp_clean = now + TMP_CLEAN_INTERVAL
        self.last_pass = now
        maildirs.look_after(self.cfg, self.log, self.ids)
        maildirs.sweep_dropped(self.draining_maildirs, self.log)
        self._warn_certificate(now)

    def _note_certificate(self, cfg) -> None:
        """At a start and a reload: the end of the certificate just loaded, said at once
        if it is near (a server up for months is told again each day, by the hourly pass).
        And workers that will stay root for want of server.user."""
        alone = process.group_alone_warning(cfg.server.user, cfg.server.group)
        if alone:
            self.log.warning("WORKER", alone)
        self.cert_end = tls.not_after(cfg.tls.cert_file) if cfg.tls else None
        self.cert_warning.reset()
        self._warn_certificate(time.monotonic())

    def _warn_certificate(self, now: float) -> None:
        where = config_mod.source_of(self.cfg, "tls.cert_file", self.overrides)
        text = certificate_warning(self.cfg, where, self.cert_end, time.time())
        if text and self.cert_warning.allow(now):
            self.log.warning("TLS", text)

    # -- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """Parse, open and bind everything new first; touch nothing running until all of
        it worked, and undo what it did if any of it failed: the new log file, sockets
        and pidfile are let go.  The Maildirs come last, as what prepare makes and hands
        to the workers' user is not taken back: a reload that fails before them (an
        address in use, a pidfile held) leaves them as they were."""
        log_fd = -1
        log_created = wrote_pidfile = False
        opened: dict = {}
        try:
            new = config_mod.load_config(self.cfg.path or None, self.overrides, mailbox_storage=False,
                                         shown_as=self.cfg.name)
            context, passwords = load_security(new)
            ids = self._worker_ids(new)
            log_created = bool(new.log.file) and not os.path.lexists(new.log.file)
            log_fd = _named_key(new, self.overrides, "log.file", Log.open_file)
            opened = self._open_new_sockets(new)
            # A pidfile another live process holds fails the reload, the old one kept.
            moved_pidfile = new.server.pidfile != self.cfg.server.pidfile
            if moved_pidfile and new.server.pidfile:
                _named_key(new, self.overrides, "server.pidfile", process.write_pidfile)
                wrote_pidfile = True
            maildirs.prepare(new, self.log, ids)
        except BaseException as exc:
            if log_fd >= 0:
                Log.discard(new.log.file, log_fd, log_created)
            if wrote_pidfile:
                process.remove_pidfile(new.server.pidfile)
            running = set(map(id, self.sockets.values()))
            for sock in opened.values():
                if id(sock) not in running:  # bound by this reload: let go again
                    sock.close()
            if not isinstance(exc, RELOAD_ERRORS):
                raise
            self.log.error("RELOAD", f"reload failed, keeping the running configuration: {exc}")
            return
        self.tls_context, self.passwords, self.ids = context, passwords, ids
        self.auth_limiter.set_checks(_auth_checks(new))
        old_addrs = set(self.sockets) - listen_addresses(new)[0]
        for addr in old_addrs:
            sock = self.sockets.pop(addr)
            if sock not in opened.values():  # not taken over by a new spelling of its address
                listeners.stop_listening(sock)
        self.sockets.update(opened)
        # Reopened even when unchanged: after logrotate renamed the file, HUP starts a new one.
        self.log.reopen(new.log.level, new.log.file, log_fd)
        self.draining_maildirs |= set(config_mod.maildir_keys(self.cfg.delivery)) - set(
            config_mod.maildir_keys(new.delivery))
        old_pidfile, self.cfg = self.cfg.server.pidfile, new
        if moved_pidfile and old_pidfile:
            process.remove_pidfile(old_pidfile)  # scripts read the new one from now on
        self.target = new.server.workers
        self.pool_state.retire_requests = 0  # the new minimum replaces what SIGTTOU asked
        self._fresh_ceiling_warnings()
        self.generation += 1
        self.board.set_generation(self.generation)
        process.set_title(self._title())
        self._manage_pool(time.monotonic())  # the new generation first: see _retire_old
        self.old_pending = True
        self._retire_old()
        self.log.info("RELOAD", f"configuration generation {self.generation} loaded from {new.path or 'defaults'}")
        self._note_certificate(new)
        nslots = self.board.nslots
        if new.server.max_workers > nslots:  # (workers <= max_workers: one line says both)
            self.log.warning("RELOAD", f"server.max_workers = {new.server.max_workers} is more than the "
                                       f"{nslots} workers the scoreboard made at start holds; the pool "
                                       f"stays within {nslots} until a restart")

    def _retire_old(self) -> None:
        """Stop the workers of earlier generations (gracefully: a busy one finishes its
        session) once one of the new generation has been forked, or at once where the
        pool's ceiling leaves the new one no room until they go.  A new worker that
        could not be forked (a process limit reached, EAGAIN) would otherwise leave no
        worker at all, and every client the master's 421, until the back-off ends: the
        old ones serve meanwhile, with the old configuration."""
        if not self.old_pending:
            return
        current = sum(1 for c in self.workers.values() if c.generation == self.generation)
        if not current and len(self.workers) < self._ceiling():
            return
        self.old_pending = False
        for child in list(self.workers.values()):
            if child.generation != self.generation:
                self._signal(child, signal.SIGTERM)

    def _open_new_sockets(self, new) -> dict:
        """The sockets of the new listen addresses.  An address written another way
        (``localhost:2525`` for ``127.0.0.1:2525``) takes over the socket already bound
        there, which binding again would find in use."""
        wanted = listen_addresses(new)[0]
        leaving = {listeners.bound_identity(sock): sock for addr, sock in self.sockets.items()
                   if addr not in wanted}
        opened = {}
        try:
            for addr in sorted(wanted, key=str):
                if addr not in self.sockets:
                    same = self._same_socket(addr, leaving)
                    opened[addr] = (same if same is not None
                                    else self._named(new, addr, lambda a: self._bind_beside(a, leaving)))
        except BaseException:
            for sock in opened.values():
                if sock not in leaving.values():
                    sock.close()
            raise
        return opened

    def _worker_ids(self, cfg) -> tuple[int | None, int | None]:
        """server.user and server.group as numbers, looked up with the config: a worker
        forked later (a respawn, hours on) must not need the user database to answer
        then (an LDAP outage, a userdel), or every respawn would fail its drop."""
        user, group = cfg.server.user, cfg.server.group
        key = "server.user"
        try:
            uid, gid = process.resolve_ids(user, "")
            key = "server.group"
            gid = process.resolve_ids("", group)[1] if group else gid
        except KeyError:  # gone since the config's own check, a moment ago
            value = user if key == "server.user" else group
            raise config_mod.ConfigError(config_mod.source_of(cfg, key, self.overrides), key, value,
                                         f"no such {key.partition('.')[2]}") from None
        return uid, gid

    def _named(self, cfg, addr, bind: Callable[[listeners.ListenAddr], socket.socket]) -> socket.socket:
        """``bind(addr)``, its error naming where the address was set, as config errors
        do: ``FILE: server.listen: cannot listen on ADDR: REASON``."""
        try:
            return bind(addr)
        except listeners.BindError as exc:
            key = "tls.implicit_listen" if addr in listen_addresses(cfg)[1] else "server.listen"
            where = config_mod.source_of(cfg, key, self.overrides)
            raise listeners.BindError(addr, f"{where}: {key}: {exc.message}", exc.errno) from None

    def _bind_beside(self, addr, leaving: dict) -> socket.socket:
        """Bind a new address; if its port is still held by an address this reload
        removes (``0.0.0.0:25`` for ``127.0.0.1:25``, or back), say so.  The old socket
        listens until everything new is bound (a reload that fails keeps it serving),
        and the new one cannot be bound beside it: such a move takes two reloads (remove,
        then add) or a restart, as an inet_interfaces change does in Postfix."""
        try:
            return listeners.bind(addr)
        except listeners.BindError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            held = sorted(str(a) for a, sock in self.sockets.items()
                          if sock in leaving.values() and listeners.bound_identity(sock)[1][1] == addr.port)
            if held:
                raise listeners.BindError(
                    addr, f"{exc.message}: port {addr.port} is still bound to {', '.join(held)}, which "
                          "this reload removes; moving a port between addresses that overlap takes two "
                          "reloads (remove, then add) or a restart", exc.errno) from None
            raise

    @staticmethod
    def _same_socket(addr, leaving: dict) -> socket.socket | None:
        try:
            return leaving.get(listeners.identity(addr))
        except ValueError:  # does not resolve: bind() says so, naming the address
            return None

    # -- stop ----------------------------------------------------------------------------

    def _close_listeners(self) -> None:
        """A stop: new clients are refused from now on, not queued.  A close alone left
        each socket listening while a worker still held it (one in a long fsync, or a
        stopped one, until its SIGKILL): clients connected, waited for a greeting that
        never came, and were reset up to graceful_timeout + 3 s later."""
        for sock in self.sockets.values():
            listeners.stop_listening(sock)
        self.sockets.clear()

    def _stop_step(self, now: float) -> bool:
        """One tick of a stop: True once every worker is gone."""
        if not self.workers:
            return True
        if now >= self.stop_deadline:
            for child in list(self.workers.values()):
                self._quit(child, now)
        return False

    def shutdown(self) -> None:
        if self.cfg.server.pidfile:
            process.remove_pidfile(self.cfg.server.pidfile)
        self.board.close()
        self.log.info("STOP", "stopped")

    def _stats(self) -> dict:
        return stats.build(self._snapshot(), started=self.started,
                           config_generation=self.generation,
                           master_rejected={"max_connections": self.overflow.rejected,
                                            "other": self.overflow.rejected_held},
                           stress=self.board.in_stress(),
                           auth_checks=(self.auth_limiter.checks_running(time.monotonic()),
                                        self.auth_limiter.checks))


def _auth_checks(cfg) -> int:
    """``auth.max_checks``; 0 (one per CPU) without ``[auth]``, where none run."""
    return cfg.auth.max_checks if cfg.auth else 0


def _named_key(cfg, overrides: dict | None, key: str, use: Callable[[str], Any]) -> Any:
    """``use`` the path ``key`` names; a failure is a ConfigError naming the file, the key
    and the value as written, as every other start or reload failure is (it read "[Errno
    6] No such device or address: '/var/log/fifo'", or "pidfile ... is held", naming
    neither)."""
    section, _, name = key.partition(".")
    path = getattr(getattr(cfg, section), name)
    try:
        return use(path)
    except (OSError, process.PidfileError) as exc:
        # The path as opened, resolved: the value as written may be relative, or cut.
        problem = f"cannot open {path}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        raise config_mod.key_error(cfg, key, overrides, problem) from None


def run(cfg, overrides: dict | None = None) -> int:
    """Run the server until it is stopped; the exit status for the CLI."""
    try:
        arbiter = Arbiter(cfg, overrides)
    except OSError as exc:  # the log file: writable when checked, and yet (a FIFO, no reader)
        where: object = exc
        if exc.filename == cfg.log.file:
            where = config_mod.key_error(cfg, "log.file", overrides, f"cannot open {exc.filename}: {exc.strerror}")
        print(f"forksmtp: {where}", file=sys.stderr)
        return 1
    try:
        arbiter.start()
    except (listeners.BindError, config_mod.ConfigError, OSError) as exc:
        print(f"forksmtp: {exc}", file=sys.stderr)
        if cfg.server.pidfile:
            process.remove_pidfile(cfg.server.pidfile)  # ours only: the one this master holds
        return 1
    try:
        return arbiter.run()
    finally:
        arbiter.shutdown()
