"""A worker that stops making progress is killed and replaced (issue 3, supervision)."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import glob
import math
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from daemon import (SYSCALL_NR, RawSMTP, connect, held_in, hold_syscall, in_any_syscall,
                    request_stats, send_message, serving_worker, wait_until, worker_pids)
from forksmtp import auth
from helpers import cannot_loop_mount, loop_ext4
from forksmtp.arbiter import LOCK_STALL, silent_for
from forksmtp.scoreboard import _LOCK_PREFIX, WORKER_LOCK_STEP


def test_wedged_worker_is_killed_and_replaced(daemon_factory):
    # Short timeouts: the master's limit is the longest of them plus a grace period.
    d = daemon_factory(workers=2, sections={"timeouts": {"command": 1, "data_block": 1,
                                                         "data_done": 2, "session": 120}})
    client = RawSMTP(d.port)
    try:
        assert client.command(b"EHLO wedged.example") == 250
        worker = serving_worker(d, client.sock)
        os.kill(worker.pid, signal.SIGSTOP)  # wedged: no heartbeat, no timeout of its own
        d.wait_for_log(f"worker {worker.pid} made no progress", timeout=40)
        wait_until(lambda: worker.pid not in {w.pid for w in d.workers()}, 10,
                   what="the wedged worker gone")
    finally:
        client.close()
    wait_until(lambda: len(d.workers()) >= 2, 10, what="the pool refilled")
    send_message(d.port)


def trace_next_admission(pid: int) -> subprocess.Popen:
    """Attach strace to a worker so that its next flock(2), the LOCK_EX of its next
    admission, returns only after a while: the worker holds the admission lock meanwhile."""
    return delay_next(pid, "flock", 30)


def delay_next(pid: int, syscall: str, seconds: float) -> subprocess.Popen:
    """Attach strace to a process so that its next ``syscall`` returns ``seconds`` late."""
    return hold_syscall(pid, syscall, seconds)


#: flock(2)'s and setitimer(2)'s numbers, for /proc/PID/syscall.
FLOCK_NR = SYSCALL_NR.get("flock", (None,))[0]
SETITIMER_NR = SYSCALL_NR.get("setitimer", (None,))[0]


def in_flock_lock_ex(worker: psutil.Process) -> bool:
    """Is the worker stopped by its tracer in flock(fd, LOCK_EX[|LOCK_NB])?"""
    args = held_in(worker, FLOCK_NR) if FLOCK_NR is not None else None
    return args is not None and args[1] & ~fcntl.LOCK_NB == fcntl.LOCK_EX  # tried first without waiting


def holds_flock(pid: int) -> bool:
    """Does process ``pid`` hold an exclusive flock(2) (/proc/locks)?"""
    with open("/proc/locks", encoding="ascii") as f:
        return any(fields[1:5] == ["FLOCK", "ADVISORY", "WRITE", str(pid)]
                   for fields in (line.split() for line in f))


def stop_in_admission(d, worker: psutil.Process) -> socket.socket:
    """Connect a client and stop ``worker`` (the daemon's only idle one) while it holds the
    admission lock for it, as SIGSTOP or a debugger may catch it: strace holds its flock's
    return, and the stop takes effect as the tracer lets go.  The client's socket.

    The worker first tries the lock without waiting; where the master held it at that
    moment (it takes it at each of its looks, every 50 ms while no worker is idle), the
    held return is a refusal, and the worker would be stopped holding nothing: then the
    client goes, the worker is let on, and the next connection tries again."""
    for _ in range(5):
        tracer = trace_next_admission(worker.pid)
        try:
            client = connect(d.port)  # accepted by the worker, which then takes the lock
            wait_until(lambda: in_flock_lock_ex(worker), 10, what="the worker held in flock")
            held = holds_flock(worker.pid)
            if held:
                worker.send_signal(signal.SIGSTOP)
        finally:
            tracer.terminate()
            tracer.wait(10)
        if held:
            wait_until(lambda: worker.status() == "stopped", 10, what="the worker stopped")
            return client
        client.close()
        wait_until(lambda: not holds_flock(worker.pid) and not in_flock_lock_ex(worker), 10,
                   what="the worker past its admission")
        time.sleep(0.5)  # its session over, idle again
    raise AssertionError("the worker never took the admission lock at its first try")


needs_strace = pytest.mark.skipif(shutil.which("strace") is None or FLOCK_NR is None,
                                  reason="needs strace (Debian: strace) on x86_64 or aarch64")


@needs_strace
def test_a_worker_stopped_holding_the_admission_lock_is_killed(daemon_factory):
    # A classic pool (spare_cpu_share = 0): the frozen client is accepted, so nobody
    # queues, and a self-sizing pool starts the spares below only while the CPUs have
    # had time to spare, which on a loaded machine they need not have had.
    d = daemon_factory(workers=1, server={"spare_cpu_share": 0})
    [worker] = d.workers()
    took = time.monotonic()  # no sooner than this does the worker take the lock
    frozen = stop_in_admission(d, worker)
    killing = f"worker {worker.pid} has been stopped in admission while the lock was held for"
    try:
        # The master still answers (it never waits long for the lock) and starts a spare.
        wait_until(lambda: len(d.workers()) >= 2, 10, what="a spare beside the stopped worker")
        spare = next(w for w in d.workers() if w.pid != worker.pid)
        # A worker that dies meanwhile cannot have its slot repaired without the lock;
        # the repair waits, but the pool does not count the dead worker: it starts another.
        spare.kill()
        d.wait_for_log(f"worker {spare.pid} killed by SIGKILL")
        wait_until(lambda: {w.pid for w in d.workers()} - {worker.pid, spare.pid}, 10,
                   what="a spare beside the stopped worker again")
        stats = request_stats(d)
        assert spare.pid not in {w["pid"] for w in stats["workers"]}
        # All this while the lock was held: the master kills the holder LOCK_STALL after
        # it first missed the lock, and says so before it does.  It cannot have said so
        # yet if LOCK_STALL has not passed since the worker took the lock; on a machine
        # slow enough that it has, the steps above prove nothing of the kind.
        log = d.log_text()
        if time.monotonic() - took < LOCK_STALL:
            assert killing not in log
        # Every admission now waits behind the holder, until the master kills it: the
        # message is stored only after the master said it was killing the holder.
        send_message(d.port, timeout=LOCK_STALL + 20)
        lines = d.log_text().splitlines()
        said = [i for i, line in enumerate(lines) if killing in line]
        stored = [i for i, line in enumerate(lines) if "[STORE] " in line and "/new/" in line]
        assert said and stored and said[0] < stored[0], lines[-30:]
        d.wait_for_log(f"worker {worker.pid} killed by SIGKILL (sent by the master: stopped in "
                       f"admission for")
    finally:
        frozen.close()
    assert len(d.new_messages()) == 1
    send_message(d.port)  # the pool goes on serving
    # Both dead workers' slots were repaired once the lock came free: none is left over,
    # and no session count leaked.
    stats = request_stats(d)
    assert {w["pid"] for w in stats["workers"]} <= {w.pid for w in d.workers()}
    # The client has its 221 before the worker releases the session: wait for that.
    wait_until(lambda: request_stats(d)["connections_active"] == 0, 10, 0.2,
               "no session left counted")


@needs_strace
def test_a_graceful_stop_does_not_wait_for_a_worker_stopped_holding_the_lock(daemon_factory):
    d = daemon_factory(workers=1, server={"graceful_timeout": 60})
    [worker] = d.workers()
    frozen = stop_in_admission(d, worker)
    try:
        d.signal(signal.SIGTERM)
        d.proc.wait(LOCK_STALL + 20)  # not the graceful timeout (60 s): the holder is killed
        assert f"worker {worker.pid} has been stopped in admission" in d.log_text()
        assert d.proc.returncode == 0
    finally:
        frozen.close()


def test_silence_is_never_longer_than_the_worker_has_lived():
    # A slot timestamp from before the worker started (0.0: a slot read while reset)
    # must not make a young, healthy worker look wedged for the host's uptime.
    assert silent_for(0.0, started=1000.0, now=1005.0) == 5.0
    assert silent_for(990.0, started=1000.0, now=1005.0) == 5.0
    # A worker that touched its slot after it started is judged by that touch.
    assert silent_for(1003.0, started=1000.0, now=1005.0) == 2.0
    assert silent_for(1000.0, started=1000.0, now=1400.0) == 400.0


def test_no_healthy_wait_outlasts_the_stuck_limit(tmp_path):
    """The greeting delay and the stress-mode command timeout are single waits too: a
    worker in one heartbeats only when it ends, and must not be taken for wedged."""
    from forksmtp.arbiter import STUCK_GRACE, stuck_limit
    from forksmtp.config import load_config

    path = tmp_path / "f.toml"
    path.write_text("[server]\ngreeting_delay = 20\n"
                    "[timeouts]\ncommand = 3\ndata_block = 3\ndata_done = 3\nstress_command = 30\n")
    assert stuck_limit(load_config(str(path))) == 30 + STUCK_GRACE
    path.write_text("[server]\ngreeting_delay = 20\n[timeouts]\ncommand = 3\ndata_block = 3\n"
                    "data_done = 3\nstress_command = 3\n")
    assert stuck_limit(load_config(str(path))) == 20 + STUCK_GRACE
    path.write_text("")
    assert stuck_limit(load_config(str(path))) == 600 + STUCK_GRACE  # data_done, by default


def hold_admission_lock(master: int) -> int:
    """Take the daemon's admission lock from outside, as a stopped holder would keep it."""
    (lock,) = glob.glob(os.path.join(tempfile.gettempdir(), f"{_LOCK_PREFIX}{master}-*",
                                     "scoreboard.lock"))
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sigalrm_pending(proc: psutil.Process) -> bool:
    """Is a SIGALRM pending for the process (sent, not yet delivered)?"""
    bit = 1 << (signal.SIGALRM - 1)
    with open(f"/proc/{proc.pid}/status") as f:
        return any(int(line.split()[1], 16) & bit for line in f
                   if line.startswith(("SigPnd:", "ShdPnd:")))


@needs_strace
def test_an_alarm_before_the_flock_does_not_leave_the_wait_without_end(daemon_factory):
    """The step's alarm comes after setitimer returned but before flock entered the kernel
    (strace holds setitimer's return for three steps, as a worker off the CPU that long
    would be): it interrupts nothing, so a one-shot timer left the flock waiting for
    good, and the master's death went unseen.  The timer repeats."""
    hold = 3 * WORKER_LOCK_STEP  # the alarm comes a step in: two steps to see it pending
    d = daemon_factory(workers=1)
    wait_until(lambda: len(d.workers()) == 1, 10, what="1 worker")
    _wait_idle(d, 1)
    (worker,) = d.workers()
    fd = hold_admission_lock(d.pid)
    try:
        tracer = delay_next(worker.pid, "setitimer", hold)
        try:
            sock = connect(d.port)  # the worker accepts it, arms its alarm, waits for the lock
            wait_until(lambda: held_in(worker, SETITIMER_NR), 10, 0.01, "setitimer's return held")
            # The alarm, a step after setitimer ran, is pending while its return is
            # still held: it comes before the flock.
            wait_until(lambda: sigalrm_pending(worker) and held_in(worker, SETITIMER_NR), 10, 0.01,
                       "the alarm pending while setitimer's return is held")
            # The hold ends (the tracer lets the worker go on), and the worker waits in
            # the flock; it would for good, had that alarm been its only one.
            wait_until(lambda: in_any_syscall(worker, "flock"), 10 + hold, 0.01,
                       "the worker asleep in flock")
        finally:
            tracer.terminate()
            tracer.wait(10)
        # Accepted, not still queued: a connection the worker never took is reset when
        # the workers exit with the listening socket (a loaded machine's first run).
        assert serving_worker(d, sock).pid == worker.pid
        os.kill(d.pid, signal.SIGKILL)
        sock.settimeout(5 * WORKER_LOCK_STEP)
        reply = sock.recv(512)
        assert reply.startswith(b"421 4.3.2 "), reply
        sock.close()
        wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE,
                   10, what="the worker gone")
    finally:
        os.close(fd)


def test_auth_waiting_behind_a_held_lock_when_the_master_dies_sends_what_it_owes(daemon_factory, tmp_path):
    """AUTH counts attempts under the admission lock, mid-session.  A message's text, its
    final dot and AUTH arrive in one segment while the lock is held and the master dies:
    the stored message's 250 is still sent, then 421 4.3.2, and the log says why.  (It
    went without a reply before: a client would send the stored message again.)"""
    passwd = tmp_path / "passwd"
    auth.set_password(str(passwd), "alice", "secret-pass")
    d = daemon_factory(workers=1, sections={"auth": {"password_file": str(passwd), "allow_insecure": True}})
    wait_until(lambda: len(d.workers()) == 1, 10, what="1 worker")
    (worker,) = d.workers()
    client = RawSMTP(d.port, timeout=5 * WORKER_LOCK_STEP)
    assert client.command(b"EHLO client.example") == 250
    assert client.start_data()[0] == 354
    fd = hold_admission_lock(d.pid)
    try:
        credentials = base64.b64encode(b"\0alice\0secret-pass")
        client.sock.sendall(b"Subject: owed\r\n\r\nbody\r\n.\r\nAUTH PLAIN " + credentials + b"\r\n")
        wait_until(lambda: len(d.new_messages()) == 1, 10, what="the message stored")
        os.kill(d.pid, signal.SIGKILL)
        assert client.reply()[0] == 250   # the message's, owed before AUTH ran
        code, text = client.reply()
        assert (code, text[:10]) == (421, b"421 4.3.2 "), text
        wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE,
                   10, what="the worker gone")
    finally:
        os.close(fd)
        client.close()
    assert "127.0.0.1 server stopping" in d.log_text()
    assert "crashed" not in d.log_text()


def _wait_idle(d, count: int) -> None:
    """Every worker in its accept loop: one still starting takes the admission lock to
    mark itself idle, and held there by the test it would never accept the client."""
    wait_until(lambda: [w["state"] for w in request_stats(d)["workers"]] == ["idle"] * count, 10,
               0.1, "every worker idle")


@pytest.mark.skipif(FLOCK_NR is None, reason="needs flock's system call number (x86_64, aarch64)")
def test_workers_waiting_behind_a_held_lock_exit_when_the_master_dies(daemon_factory):
    """The double fault: the admission lock held by a process that does not let it go (a
    stopped worker; here the test) and the master, which alone would kill that holder,
    killed too.  A worker waiting for the lock asks every WORKER_LOCK_STEP whether its
    master lives: its client gets 421 4.3.2, and every worker exits."""
    d = daemon_factory(workers=2)
    wait_until(lambda: len(d.workers()) == 2, 10, what="2 workers")
    _wait_idle(d, 2)
    master = d.pid
    workers = d.workers()
    fd = hold_admission_lock(master)
    try:
        sock = connect(d.port)  # a worker accepts it and waits for the lock
        sock.settimeout(10 + WORKER_LOCK_STEP)
        # Accepted, not still queued: a connection no worker took is reset when the
        # workers exit with the listener.  And asleep in the flock, not on its way to it:
        # a worker that reaches the wait after the master died sees that before it waits.
        waiter = serving_worker(d, sock)
        wait_until(lambda: in_any_syscall(waiter, "flock"), 10, 0.01, "the worker asleep in flock")
        os.kill(master, signal.SIGKILL)
        reply = sock.recv(512)
        assert reply.startswith(b"421 4.3.2 "), reply
        sock.close()
        wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                   for w in workers), 10, what="every worker gone")
        assert "not served: the master is gone" in d.log_text()
        assert "crashed" not in d.log_text()  # they exit, not fall over on the way out
    finally:
        os.close(fd)


@contextlib.contextmanager
def _master_judging_one_slot(tmp_path, state: int, stuck_after: float = 610.0):
    """The master's own check (Arbiter._murder_stuck) of a real process in one scoreboard
    slot of the given state, with a heartbeat at the start: (arbiter, process, snapshot,
    start time, log file)."""
    from forksmtp.arbiter import Arbiter, Child
    from forksmtp.config import load_config
    from forksmtp.scoreboard import _NCOUNTERS, SlotInfo, Snapshot, Totals

    log = tmp_path / "forksmtp.log"
    (tmp_path / "forksmtp.toml").write_text(f'[log]\nfile = "{log}"\n')
    arbiter = Arbiter(load_config(str(tmp_path / "forksmtp.toml")))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        t0 = time.monotonic()
        arbiter.workers[sleeper.pid] = Child(sleeper.pid, 0, 1, t0, stuck_after=stuck_after)
        zero = Totals.from_counters([0] * _NCOUNTERS)
        slot = SlotInfo(0, sleeper.pid, 1, state, "", 0, "", t0, t0, -1, False, zero)
        yield arbiter, sleeper, Snapshot(8, 1, False, 0, 0, 0, (slot,), (), zero), t0, log
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_a_worker_that_never_gets_ready_is_killed_as_a_silent_idle_one_is(tmp_path):
    """A starting worker counts as a spare, so none replaces it: one that never gets
    ready (stopped, a user lookup that hangs before the privilege drop) used to wait for
    the session timeouts' stuck limit (610 s by default) while clients queued."""
    from forksmtp.arbiter import IDLE_SILENCE
    from forksmtp.scoreboard import STARTING

    with _master_judging_one_slot(tmp_path, STARTING) as (arbiter, sleeper, snap, t0, log):
        for step in range(0, int(IDLE_SILENCE) + 1, 5):  # the master looks every few seconds
            arbiter._murder_stuck(snap, t0 + step)
        assert sleeper.poll() is None  # 30 s: not yet
        arbiter._murder_stuck(snap, t0 + IDLE_SILENCE + 4)
        assert sleeper.wait(5) == -signal.SIGKILL
        assert f"starting worker {sleeper.pid} did not get ready for 34s; killing it" in log.read_text()


def test_a_worker_told_to_stop_while_idle_is_judged_by_its_idle_beat(tmp_path):
    """A reload (or a retirement) marks an idle worker stopping.  Its last_activity is
    the moment it became idle: judged by it, a worker idle for longer than the stuck
    limit (610 s by default) was killed at every reload, the instant it was marked.  It
    is judged by its idle beat, and killed only if it then neither leaves its accept
    loop nor exits for IDLE_SILENCE."""
    import dataclasses

    from forksmtp.arbiter import IDLE_SILENCE
    from forksmtp.scoreboard import IDLE, STOPPING

    with _master_judging_one_slot(tmp_path, IDLE) as (arbiter, sleeper, snap, t0, log):
        def look(at: float, state: int, beat: float) -> None:
            slot = dataclasses.replace(snap.slots[0], state=state, idle_beat=int(beat))
            arbiter._murder_stuck(dataclasses.replace(snap, slots=(slot,)), at)

        for step in range(0, 701, 5):  # idle for 700 s, its loop turning
            look(t0 + step, IDLE, t0 + step)
        told = float(math.ceil(t0 + 700))  # the beat is in whole seconds
        for step in range(0, int(IDLE_SILENCE) + 1, 5):  # told to stop; no beat since
            look(told + step, STOPPING, told)
        assert sleeper.poll() is None and "killing it" not in log.read_text()
        look(told + IDLE_SILENCE + 4, STOPPING, told)
        assert sleeper.wait(5) == -signal.SIGKILL
        assert f"stopping worker {sleeper.pid} has not left its accept loop for 34s; killing it" in log.read_text()


def test_a_worker_waiting_on_its_disk_is_spared_up_to_disk_wait_then_killed(tmp_path, monkeypatch):
    """The bound on the disk wait, crossed: a busy worker past its stuck limit is left to
    its disk (one warning) until DISK_WAIT, and killed after it.  The state D itself is
    stubbed here; the slow-disk test below makes it real."""
    from forksmtp import arbiter as arbiter_mod
    from forksmtp.arbiter import DISK_WAIT
    from forksmtp.scoreboard import BUSY

    monkeypatch.setattr(arbiter_mod.process, "waits_on_disk", lambda pid: True)
    with _master_judging_one_slot(tmp_path, BUSY, stuck_after=12.0) as (arbiter, sleeper, snap, t0, log):
        for step in range(0, int(DISK_WAIT), 5):  # the master looks every few seconds
            arbiter._murder_stuck(snap, t0 + step)
        assert sleeper.poll() is None
        assert log.read_text().count("has waited on its disk for") == 1
        arbiter._murder_stuck(snap, t0 + DISK_WAIT + 1)
        assert sleeper.wait(5) == -signal.SIGKILL
        assert f"worker {sleeper.pid} made no progress for {DISK_WAIT + 1:.0f}s; killing it" in log.read_text()


def test_a_look_between_two_system_calls_of_a_slow_commit_does_not_kill_it(tmp_path, monkeypatch):
    """A slow commit leaves its wait on the disk for microseconds between system calls
    (the file's fsync, the link, the directory's fsync).  A look that falls there must
    not kill the worker: not the first look past its stuck limit, which has no earlier
    look to go by, nor one that comes long after the look before (a master slowed by a
    reload).  Two looks in a row out of the wait kill it."""
    from forksmtp import arbiter as arbiter_mod
    from forksmtp.arbiter import DISK_LOOKS_OUT
    from forksmtp.scoreboard import BUSY

    assert DISK_LOOKS_OUT == 2  # the looks below are written for it
    in_d = {"now": False}
    monkeypatch.setattr(arbiter_mod.process, "waits_on_disk", lambda pid: in_d["now"])
    with _master_judging_one_slot(tmp_path, BUSY, stuck_after=12.0) as (arbiter, sleeper, snap, t0, log):
        child = arbiter.workers[sleeper.pid]

        def look(at: float, in_wait: bool) -> None:
            in_d["now"] = in_wait
            arbiter._murder_stuck(snap, t0 + at)
            assert not child.killed_because, f"killed at the look at {at}s"

        for step in range(0, 12):  # below the stuck limit: not judged at all
            look(step, False)
        look(12.5, False)  # the first judged look falls between two system calls
        for step in range(13, 40):
            look(step, step % 7 != 3)  # out of it at every seventh look, from 17 s
        look(42.5, False)  # a look 3.5 s after the one before, between two system calls
        look(43, True)
        assert "killing it" not in log.read_text()
        in_d["now"] = False  # the commit is over, yet the worker makes no progress
        arbiter._murder_stuck(snap, t0 + 44)
        assert not child.killed_because  # one look out of the wait
        arbiter._murder_stuck(snap, t0 + 45)
        assert child.killed_because and sleeper.wait(5) == -signal.SIGKILL
        assert f"worker {sleeper.pid} made no progress for 45s; killing it" in log.read_text()
        assert log.read_text().count("has waited on its disk for") == 1


def test_each_slow_commit_is_warned_about(tmp_path, monkeypatch):
    """The warning about a wait on the disk is one per wait, not one per worker: a
    worker that stores one message slowly, goes on, and meets the slow disk again is
    logged twice, so an operator sees how often the disk held mail up."""
    import dataclasses

    from forksmtp import arbiter as arbiter_mod
    from forksmtp.scoreboard import BUSY

    monkeypatch.setattr(arbiter_mod.process, "waits_on_disk", lambda pid: True)
    with _master_judging_one_slot(tmp_path, BUSY, stuck_after=12.0) as (arbiter, sleeper, snap, t0, log):
        for step in range(0, 30, 2):  # the first slow commit
            arbiter._murder_stuck(snap, t0 + step)
        assert log.read_text().count("has waited on its disk for") == 1
        moved = dataclasses.replace(snap.slots[0], last_activity=t0 + 30)  # it went on
        snap = dataclasses.replace(snap, slots=(moved,))
        for step in range(30, 60, 2):  # then the second
            arbiter._murder_stuck(snap, t0 + step)
        assert sleeper.poll() is None
        assert log.read_text().count("has waited on its disk for") == 2


def test_a_stall_of_the_master_does_not_make_a_disk_wait_a_new_one(tmp_path, monkeypatch):
    """After a stall of the master's own loop, silence counts from its end, and the
    worker in its disk wait looks as if it had just made progress: that is still the
    same wait, and it is not warned about a second time."""
    from forksmtp import arbiter as arbiter_mod
    from forksmtp.arbiter import IDLE_SILENCE
    from forksmtp.scoreboard import BUSY

    monkeypatch.setattr(arbiter_mod.process, "waits_on_disk", lambda pid: True)
    with _master_judging_one_slot(tmp_path, BUSY, stuck_after=12.0) as (arbiter, sleeper, snap, t0, log):
        for step in range(0, 20):
            arbiter._murder_stuck(snap, t0 + step)
        assert log.read_text().count("has waited on its disk for") == 1
        resumed = t0 + 19 + IDLE_SILENCE  # the master did not run for IDLE_SILENCE
        for step in range(0, 20):
            arbiter._murder_stuck(snap, resumed + step)
        assert "killing it" not in log.read_text()
        assert log.read_text().count("has waited on its disk for") == 1


def test_a_busy_worker_is_not_killed_for_a_stall_of_the_whole_host(tmp_path, monkeypatch):
    """A VM paused, a cgroup frozen (`docker pause`) for longer than the stuck limit: the
    master, woken before its workers, judged a busy worker silent for the whole stall
    and killed it (its client reset, not sent its 421).  Silence counts from the end of
    a stall in the master's own loop; a worker silent for the limit after it still goes."""
    from forksmtp import arbiter as arbiter_mod
    from forksmtp.scoreboard import BUSY

    # The stall is the subject, not the disk wait: a process just started can still be
    # paging itself in ("D") on a loaded host, and a look that found it so restarted the
    # two looks out of the wait, so the kill below came one look later than asserted.
    monkeypatch.setattr(arbiter_mod.process, "waits_on_disk", lambda pid: False)
    with _master_judging_one_slot(tmp_path, BUSY, stuck_after=40.0) as (arbiter, sleeper, snap, t0, log):
        arbiter._murder_stuck(snap, t0 + 1)
        arbiter._murder_stuck(snap, t0 + 46)  # the master's first look after a 45 s stall
        for step in range(46, 46 + 40, 5):  # no heartbeat since: the limit counts from 46
            arbiter._murder_stuck(snap, t0 + step)
        assert "made no progress" not in log.read_text() and not arbiter.workers[sleeper.pid].killed_because
        arbiter._murder_stuck(snap, t0 + 46 + 41)  # past the limit: the first look out of a disk wait
        assert not arbiter.workers[sleeper.pid].killed_because
        arbiter._murder_stuck(snap, t0 + 46 + 42)  # the second
        assert sleeper.wait(5) == -signal.SIGKILL
        assert f"worker {sleeper.pid} made no progress for 42s; killing it" in log.read_text()


def test_the_master_marks_again_a_worker_it_sent_sigterm_whose_mark_was_lost(tmp_path):
    """A worker writes busy or idle without the lock after checking for the master's
    stopping mark; a SIGTERM's mark set between its check and its write was lost, and
    the retiring worker counted as one of the pool for the rest of its session."""
    from forksmtp.arbiter import Arbiter, Child
    from forksmtp.config import load_config
    from forksmtp.scoreboard import BUSY, S_STATE, STOPPING, Scoreboard

    (tmp_path / "forksmtp.toml").write_text(f'[log]\nfile = "{tmp_path / "forksmtp.log"}"\n')
    arbiter = Arbiter(load_config(str(tmp_path / "forksmtp.toml")))
    arbiter.board = board = Scoreboard.create(8, ip_buckets=64)
    try:
        board.set_generation(1)
        for idx, pid in ((0, 4_000_001), (1, 4_000_002)):
            board.claim_slot(idx, pid, 1)
            arbiter.workers[pid] = Child(pid, idx, 1, time.monotonic(), 610.0)
        arbiter.workers[4_000_001].term_sent = True
        board.set_stopping(0)
        board.set_busy(0, ("192.0.2.1", 25), time.monotonic())  # respects the mark
        board._mm[board._bases[0] + S_STATE] = BUSY  # the interleaving: check, mark, write
        board.set_busy(1, ("192.0.2.2", 25), time.monotonic())
        states = {s.index: s.state for s in arbiter._snapshot().slots}
        assert states == {0: STOPPING, 1: BUSY}
        assert {s.index: s.state for s in board.snapshot().slots} == {0: STOPPING, 1: BUSY}
    finally:
        board.close()


_BLKIO = Path("/sys/fs/cgroup/blkio")


def _cannot_throttle() -> str:
    if not (_BLKIO / "blkio.throttle.write_bps_device").exists():
        return "no cgroup v1 blkio throttling"
    return cannot_loop_mount()


@pytest.mark.skipif(bool(_cannot_throttle()), reason=_cannot_throttle() or "ok")
def test_a_worker_storing_on_a_slow_disk_is_not_killed_as_wedged(daemon_factory, tmp_path):
    """Storing a message is bounded by no timeout: on a slow disk its fsync may outlast
    the master's stuck limit (the longest timeout plus 10 s).  The master killed such a
    healthy worker as wedged, the message was lost, and so was every retry of it.  Here
    an ext4 on a loop device whose writes the daemon's cgroup may make at 100 KB/s, and
    timeouts of 1-2 s: a 1.5 MB message takes about 15 s to fsync, past the 12 s limit."""
    group = _BLKIO / f"forksmtp-test-{os.getpid()}-{time.monotonic_ns()}"
    d = None
    with loop_ext4(tmp_path) as (mnt, _, loop):
        try:
            group.mkdir()
            rdev = os.stat(loop).st_rdev
            (group / "blkio.throttle.write_bps_device").write_text(f"{os.major(rdev)}:{os.minor(rdev)} 102400\n")
            d = daemon_factory(workers=1, server={"max_workers": 2}, sections={
                "delivery": {"maildir": str(mnt / "Maildir")},
                "timeouts": {"command": 1, "data_block": 1, "data_done": 2, "stress_command": 1}})
            for pid in [d.pid, *worker_pids(d)]:  # workers forked later inherit the master's
                (group / "cgroup.procs").write_text(f"{pid}\n")
            body = b"Subject: slow disk\r\n\r\n" + (b"x" * 78 + b"\r\n") * 19000  # 1.5 MB
            with smtplib.SMTP("127.0.0.1", d.port, timeout=120) as client:
                client.sendmail("a@client.example", ["b@mx.test.example"], body)  # 250, or it raises
            log = d.log_text()
            assert "has waited on its disk for" in log, log[-2000:]  # the stuck limit was passed
            assert "made no progress" not in log, log[-2000:]
            (stored,) = (mnt / "Maildir" / "new").iterdir()
            assert stored.read_bytes().endswith(b"x" * 78 + b"\n")
        finally:
            if d is not None:
                d.stop()  # before the unmount: the daemon's Maildir is on it
            if group.exists():
                group.rmdir()
