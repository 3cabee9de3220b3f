"""The scoreboard: worker slots, global totals and a per-IP table in shared memory.

Modelled on Apache's scoreboard: plain values in an anonymous shared mmap that the master
creates before it forks, so every worker inherits it.  A worker writes only its own slot; the
master reads them all.  Every count a worker holds (one session against ``max_connections``,
one against its client's per-IP count) is recorded in its slot, so when a worker dies, even
by SIGKILL half-way through an update, ``repair()`` drops what it held and rebuilds the shared
counts from the surviving slots: no counter can leak or go negative.

Admission (check-and-increment of the global and per-IP counts) is serialised by flock(2) on a
lock file that every process opens itself.  The kernel drops a flock when its holder dies,
unlike a ``multiprocessing.Lock``; and an fd inherited across fork shares one lock with the
parent, so it excludes nothing: a child must call ``after_fork()`` (before dropping
privileges, since the lock directory is private to the master's user).  Workers wait for the
lock; the master never waits more than ``MASTER_LOCK_WAIT``: a worker stopped or traced
while it holds the lock must not stop the supervisor too.  A worker marks its slot while it
waits for or holds the lock (``in_admission()``), so that the master can find a stopped
one there and kill it.

The per-IP table uses open addressing (linear probing over a bounded window) keyed by the
16-byte packed address, IPv4 as ``::ffff:a.b.c.d``.  A slot holds at most one per-IP count,
so live keys never outnumber slots; stale entries are cleared by a rebuild.  If no bucket is
free within the window even after a rebuild, the connection is admitted under the global limit
only: a full table fails open, as Postfix does when anvil(8) is unreachable.

What a read returns (``Snapshot``, ``SlotInfo``, ``Totals``) and the names readers share with
this module (slot states, reject codes and reasons, events) are in ``forksmtp.snapshot``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from collections import Counter
from typing import Final, Iterator

# The read side and the names shared with it; SlotInfo, STATE_NAMES and key_text are re-exported
# for callers that import them from here.
from .snapshot import (BUSY, CONN_REJECT_REASONS, EVENT_KEYS, FREE, IDLE, MAX_CONNECTIONS,  # noqa: F401
                       MAX_CONNECTION_RATE, MAX_CONNECTIONS_PER_IP, REJECT_CODES,
                       REJECT_KEYS, STARTING, STATE_NAMES, STOPPING, SlotInfo, Snapshot, Totals,
                       _slot_info, _V4_PREFIX, key_text)

# Every module-level name below is Final: the compiled build then reads it from a C static
# (or inlines it) instead of looking it up in the module's dict on every slot update.
_CODE_POS: Final = {c: i for i, c in enumerate(REJECT_CODES)}
_REASON_POS: Final = {r: i for i, r in enumerate(CONN_REJECT_REASONS)}
_EVENT_POS: Final = {e: i for i, e in enumerate(EVENT_KEYS)}
# Counters kept per slot and, for dead workers, folded into the header in the same layout:
# sessions, messages_accepted, bytes_received, rejects by code, connection rejects by
# reason, and the events (EVENT_KEYS).
_NCOUNTERS: Final = 3 + len(REJECT_KEYS) + len(CONN_REJECT_REASONS) + len(EVENT_KEYS)

_MAGIC: Final = b"FKSMTPSB"
_VERSION: Final = 1
_Q: Final = struct.Struct("<q")
_I: Final = struct.Struct("<i")
_D: Final = struct.Struct("<d")
_COUNTERS: Final = struct.Struct(f"<{_NCOUNTERS}q")

# Header: magic, version, nslots, ip_buckets, stress @0; then 8-byte values.
_HDR: Final = struct.Struct("<8sIIII")
H_STRESS: Final = 20
H_GENERATION: Final = 24
H_ACTIVE: Final = 32
H_TOTAL: Final = 40
H_EXITED: Final = 48
H_IDLE: Final = 56  # workers free to take a connection: slots with their S_IDLE mark set
H_COUNTERS: Final = 64
HEADER_SIZE: Final = H_COUNTERS + _COUNTERS.size

# Slot: pid, state, holds_global, port, generation, ip bucket+1 (0 = none), ip key, idle
# beat, client, in-admission and idle marks (in the pad, outside _SLOT's fields), phase,
# last_activity, started, client_wait, counters.  The bucket is stored +1 so a zeroed slot holds none;
# the idle beat is whole monotonic seconds, 0 for none yet.
_SLOT: Final = struct.Struct(f"<iBBHqi16si46s2x16sddd{_NCOUNTERS}q")
SLOT_SIZE: Final = _SLOT.size
S_STATE: Final = 4
S_HOLDS: Final = 5
S_PORT: Final = 6
S_GEN: Final = 8
S_BUCKET: Final = 16
S_KEY: Final = 20
S_BEAT: Final = 36
S_CLIENT: Final = 40
S_IN_LOCK: Final = 86  # 1 while the slot's worker waits for or holds the admission lock
S_IDLE: Final = 87  # 1 while the slot's worker is counted in H_IDLE (changed under the lock)
S_PHASE: Final = 88
S_LAST: Final = 104
S_STARTED: Final = 112
S_WAIT: Final = 120  # since when the worker has waited on its client (0.0: it does not)
S_COUNTERS: Final = 128
S_MESSAGES: Final = S_COUNTERS + 8
S_REJECTS: Final = S_COUNTERS + 24
S_CONN_REJECTS: Final = S_REJECTS + 8 * len(REJECT_KEYS)
S_EVENTS: Final = S_CONN_REJECTS + 8 * len(CONN_REJECT_REASONS)
_HOLD: Final = struct.Struct("<i16s")
_PHASE: Final = struct.Struct("<16sd")
_CLIENT: Final = struct.Struct("<46s")
_QQ: Final = struct.Struct("<qq")
_H: Final = struct.Struct("<H")
_ZERO_SLOT: Final = bytes(SLOT_SIZE)
assert (SLOT_SIZE, S_COUNTERS + _COUNTERS.size) == (384, 384)


def _store(mm: mmap.mmap, off: int, packed: bytes) -> None:
    """Write a field that other processes read without the lock: one copy of the packed
    bytes.  Never ``Struct.pack_into``: CPython's clears the whole target before it
    writes the fields, so a reader could see 0 where no one ever wrote it; the master
    once read a busy worker's last_activity as 0.0 that way and killed it as silent,
    and a counter read in that instant goes back to 0 in the stats."""
    mm[off:off + len(packed)] = packed


# Per-IP bucket: key, state, count.  Tombstones keep probe chains intact after a delete.
_BUCKET: Final = struct.Struct("<16sB3xi")
_EMPTY: Final = 0
_LIVE: Final = 1
_TOMB: Final = 2
_PROBE_WINDOW: Final = 32

#: The longest the master waits for the admission lock (and, once an attempt has failed,
#: it tries once per attempt until one succeeds).  Workers hold it for a few
#: microseconds; one that holds it longer is stopped, traced or wedged, and the master
#: must go on supervising: it then reads what it can without the lock, or tries again on
#: its next tick.
MASTER_LOCK_WAIT: Final = 0.01
_LOCK_RETRY: Final = 0.0005
#: A worker waits for the lock in steps this long, and between them asks whether its
#: master still lives: the master is what kills a holder that stopped, and without it a
#: wait behind one would have no end.
WORKER_LOCK_STEP: Final = 1.0


class LockBusy(Exception):
    """The master could not take the admission lock within MASTER_LOCK_WAIT."""


class MasterGone(Exception):
    """A worker gave up waiting for the admission lock: its master has died."""


class _LockStep(Exception):
    """Raised by the SIGALRM handler to end one step of a worker's wait for the lock."""


def ip_key(ip: str) -> bytes:
    """The 16-byte table key: IPv6 packed, IPv4 as IPv4-mapped IPv6, anything else hashed."""
    host = ip.split("%", 1)[0] if "%" in ip else ip  # fe80::1%eth0: the scope is not the peer
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host)
        return _V4_PREFIX + socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        return hashlib.blake2b(ip.encode("utf-8", "surrogateescape"), digest_size=16).digest()


_LOCK_PREFIX: Final = "forksmtp-scoreboard-"
#: In each lock directory: a file its master and workers hold a shared flock on while
#: any of them lives (the kernel drops it with the last of them, however they die).
_ALIVE: Final = "alive"
#: A directory without that file is left alone this long: its master may be between
#: making the directory and locking the file.
_YOUNG_S: Final = 60.0


def _in_use(path: str) -> bool:
    """Does a master (or one of its workers) still use this lock directory?  Told by the
    flock on its ``alive`` file, which also sees a master in another PID namespace that
    shares /tmp (a container), where a pid says nothing; by the pid in its name only
    for a directory without that file, once it is no longer young."""
    try:
        fd = os.open(os.path.join(path, _ALIVE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pid = os.path.basename(path)[len(_LOCK_PREFIX):].partition("-")[0]
        try:
            if time.time() - os.stat(path).st_mtime < _YOUNG_S:
                return True
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except (OSError, ValueError):
            pass  # alive, owned by someone else; or gone meanwhile
        return True
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def _sweep_stale_lock_dirs() -> None:
    """Remove lock directories of masters that died without an orderly close (SIGKILL)."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if name.startswith(_LOCK_PREFIX) and not _in_use(os.path.join(base, name)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _hold_alive(lock_dir: str) -> int:
    """Create the directory's ``alive`` file and hold a shared flock on it: inherited by
    every worker forked after (one open file description), it lasts while any lives."""
    fd = os.open(os.path.join(lock_dir, _ALIVE), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _reopen(fd: int, path: str) -> int:
    """A new open file description of the file open at ``fd``, read-only.  Through
    /proc, not by ``path``: a tmp cleaner that removed the lock directory of a master
    up for days (systemd-tmpfiles ages /tmp, a service's PrivateTmp included) would
    otherwise leave every worker forked after it unable to start.  By path only where
    there is no /proc."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class Scoreboard:
    def __init__(self, mm: mmap.mmap, nslots: int, ip_buckets: int, lock_path: str,
                 owned_dir: str | None) -> None:
        self._mm = mm
        self.nslots, self.ip_buckets = nslots, ip_buckets
        self._bases = tuple(HEADER_SIZE + i * SLOT_SIZE for i in range(nslots))
        self._table = HEADER_SIZE + nslots * SLOT_SIZE
        self._zero_table = bytes(ip_buckets * _BUCKET.size)
        self._hash_key = os.urandom(16)  # drawn in the master; workers inherit it by fork
        self.lock_path, self._owned_dir = lock_path, owned_dir
        self._owner_pid = os.getpid()
        self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd_pid = self._owner_pid
        self._alive_fd = _hold_alive(owned_dir) if owned_dir else -1
        # In the master every wait for the lock is bounded; workers (after_fork) wait.
        self._lock_wait: float | None = MASTER_LOCK_WAIT
        self._mark = -1  # where a worker marks that it waits for or holds the lock
        self._waiting = False  # inside a worker's timed wait for the lock (_on_alarm)
        #: When the master last began to fail to take the lock; None while it succeeds.
        self.lock_missed_since: float | None = None

    @classmethod
    def create(cls, nslots: int, ip_buckets: int = 4096, lock_dir: str | None = None) -> "Scoreboard":
        """Master, before forking.  Without lock_dir the lock file lives in a private temp dir."""
        if nslots < 1 or ip_buckets < 1:
            raise ValueError("nslots and ip_buckets must be positive")
        size = HEADER_SIZE + nslots * SLOT_SIZE + ip_buckets * _BUCKET.size
        mm = mmap.mmap(-1, size)  # anonymous + MAP_SHARED: one copy shared across fork
        _store(mm, 0, _HDR.pack(_MAGIC, _VERSION, nslots, ip_buckets, 0))
        owned = None
        if lock_dir is None:
            _sweep_stale_lock_dirs()
            lock_dir = owned = tempfile.mkdtemp(prefix=f"{_LOCK_PREFIX}{os.getpid()}-")
        return cls(mm, nslots, ip_buckets, os.path.join(lock_dir, "scoreboard.lock"), owned)

    def after_fork(self, slot: int | None = None) -> None:
        """Child, right after fork: open the lock file anew so flock excludes the parent.
        A worker names its slot, where it marks the time it waits for or holds the lock."""
        old = self._fd
        self._fd = _reopen(old, self.lock_path)
        self._fd_pid = os.getpid()
        self._lock_wait = None
        self._mark = -1 if slot is None else self._bases[slot] + S_IN_LOCK
        os.close(old)  # never flock(LOCK_UN) it: that would release the parent's lock
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum, frame) -> None:
        # Only inside the wait: an alarm that lands after the flock succeeded runs this
        # later, wherever signals are next looked at, and must do nothing there.
        if self._waiting:
            raise _LockStep()

    def close(self) -> None:
        """Release fds and memory; in the creating process also remove the lock file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._alive_fd >= 0:  # never LOCK_UN: the lock is shared with the other processes
            os.close(self._alive_fd)
            self._alive_fd = -1
        if os.getpid() == self._owner_pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
            if self._owned_dir:
                shutil.rmtree(self._owned_dir, ignore_errors=True)
        self._mm.close()

    # -- the lock ---------------------------------------------------------------------------
    def _lock(self) -> None:
        """Take the lock; in the master, raise LockBusy after MASTER_LOCK_WAIT."""
        if self._fd_pid != os.getpid():
            raise RuntimeError("Scoreboard.after_fork() was not called in this process")
        if self._lock_wait is None:
            # Marked before the flock, not after it: a signal that stops the worker
            # takes effect as the syscall returns, before any code after it runs.
            if self._mark >= 0:
                self._mm[self._mark] = 1
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._wait_for_lock()
            return
        # Once an attempt has failed, later ones try once until one succeeds: a tick
        # with many repairs to make must not wait MASTER_LOCK_WAIT for each.
        deadline = time.monotonic() + (self._lock_wait if self.lock_missed_since is None else 0.0)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    if self.lock_missed_since is None:
                        self.lock_missed_since = now
                    raise LockBusy() from None
                time.sleep(_LOCK_RETRY)
                continue
            self.lock_missed_since = None
            return

    def _wait_for_lock(self) -> None:
        """A worker's wait for the lock another process holds, in steps of
        WORKER_LOCK_STEP: raises MasterGone once the master has died.  The timer repeats:
        an alarm that comes between setitimer and flock (the worker off the CPU for the
        step, or stopped) interrupts nothing, and a one-shot timer would leave the flock
        waiting with none to end it.  An alarm after the flock succeeded may still end a
        step; flock again is then a no-op (the lock belongs to this open file already)."""
        while True:
            if os.getppid() != self._owner_pid:  # reparented: the master is gone
                raise MasterGone()
            try:
                self._waiting = True
                signal.setitimer(signal.ITIMER_REAL, WORKER_LOCK_STEP, WORKER_LOCK_STEP)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                return
            except _LockStep:
                pass
            finally:
                self._waiting = False
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        if self._mark >= 0:
            self._mm[self._mark] = 0

    def in_admission(self) -> list[int]:
        """The slots whose workers wait for or hold the lock: the holder is among them,
        however it stopped.  (``/proc/locks`` names a holder by pid and device, but as
        the pid namespace and the filesystem its /proc was mounted in see them, which
        on an overlay or in a pid namespace without its own /proc are not the master's.)
        A dead worker's mark goes with its slot's repair."""
        mm = self._mm
        return [i for i, base in enumerate(self._bases) if mm[base + S_IN_LOCK]]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the admission lock, for a few memory operations only (never across I/O)."""
        self._lock()
        try:
            yield
        finally:
            self._unlock()

    # -- header -----------------------------------------------------------------------------
    def active(self) -> int:
        return _Q.unpack_from(self._mm, H_ACTIVE)[0]

    def generation(self) -> int:
        return _Q.unpack_from(self._mm, H_GENERATION)[0]

    def set_generation(self, generation: int) -> None:
        _store(self._mm, H_GENERATION, _Q.pack(generation))

    def in_stress(self) -> bool:
        """The stress flag the master sets from the busy share (limits.in_stress)."""
        return bool(self._mm[H_STRESS])

    def set_stress(self, on: bool) -> None:
        self._mm[H_STRESS] = 1 if on else 0

    # -- slot life cycle (master) -----------------------------------------------------------
    def free_slot(self) -> int | None:
        mm = self._mm
        for i, base in enumerate(self._bases):
            if mm[base + S_STATE] == FREE:
                return i
        return None

    def claim_slot(self, idx: int, pid: int, generation: int, now: float | None = None) -> None:
        """Take a free slot: STARTING, counters zero.

        The master claims before fork (pid 0) so no second spawn can pick the slot; both
        sides record the child's pid after the fork with ``set_pid``, which leaves the
        state alone (a STOPPING mark set by the master in between survives, so the
        worker is never signalled twice).
        """
        base, mm = self._bases[idx], self._mm
        if mm[base + S_STATE] != FREE:
            raise ValueError(f"scoreboard slot {idx} is in use")
        now = time.monotonic() if now is None else now
        mm[base:base + SLOT_SIZE] = _ZERO_SLOT
        _store(mm, base, _I.pack(pid))
        _store(mm, base + S_GEN, _Q.pack(generation))
        _store(mm, base + S_LAST, _D.pack(now))
        _store(mm, base + S_STARTED, _D.pack(now))
        mm[base + S_STATE] = STARTING

    def set_pid(self, idx: int, pid: int) -> None:
        """Parent and child both call it after fork: same value, so no ordering race."""
        _store(self._mm, self._bases[idx], _I.pack(pid))

    def repair(self, idx: int) -> bool:
        """Master, after reaping the slot's worker: fold its counters, drop its counts, free it.
        Raises LockBusy when the lock stays held (try again later)."""
        base, mm = self._bases[idx], self._mm
        self._lock()
        try:
            if mm[base + S_STATE] == FREE:
                return False
            slot = _COUNTERS.unpack_from(mm, base + S_COUNTERS)
            folded = _COUNTERS.unpack_from(mm, H_COUNTERS)
            _store(mm, H_COUNTERS, _COUNTERS.pack(*map(int.__add__, folded, slot)))
            if _I.unpack_from(mm, base)[0]:  # no pid: claimed for a fork that failed, no worker
                _store(mm, H_EXITED, _Q.pack(_Q.unpack_from(mm, H_EXITED)[0] + 1))
            mm[base:base + SLOT_SIZE] = _ZERO_SLOT
            self._rebuild()
            return True
        finally:
            self._unlock()

    # -- worker state (hot path: a few _store each, no lock) ---------------------------------
    def set_busy(self, idx: int, client: tuple | str, now: float) -> None:
        """A session starts: client is the peername tuple (host, port, ...) or a host."""
        base, mm = self._bases[idx], self._mm
        host, port = (client, 0) if isinstance(client, str) else (client[0], client[1])
        _store(mm, base + S_CLIENT, _CLIENT.pack(host.encode("utf-8", "replace")))
        _store(mm, base + S_PORT, _H.pack(port))
        _store(mm, base + S_PHASE, _PHASE.pack(b"greeting", now))
        _store(mm, base + S_COUNTERS, _Q.pack(_Q.unpack_from(mm, base + S_COUNTERS)[0] + 1))
        if mm[base + S_STATE] != STOPPING:  # stopping is sticky: the master signals once
            mm[base + S_STATE] = BUSY

    def sessions(self, idx: int) -> int:
        """Sessions the slot's worker has begun."""
        return int(_Q.unpack_from(self._mm, self._bases[idx] + S_COUNTERS)[0])

    def set_phase(self, idx: int, phase: str, now: float) -> None:
        _store(self._mm, self._bases[idx] + S_PHASE, _PHASE.pack(phase.encode(), now))

    def touch(self, idx: int, now: float) -> None:
        _store(self._mm, self._bases[idx] + S_LAST, _D.pack(now))

    def set_client_wait(self, idx: int, since: float) -> None:
        """The worker has waited on its client since ``since`` (0.0: no longer).  Written
        only once a wait has lasted connection.CLIENT_WAIT_MARK, so a brisk session never
        writes it: the master reads it to tell workers held by their clients, which will
        not come free soon, from workers that will (growth.Pace)."""
        _store(self._mm, self._bases[idx] + S_WAIT, _D.pack(since))

    def beat(self, idx: int, now: float) -> None:
        """An idle worker's sign of life, once per turn of its accept loop (a second at
        most): last_activity stays the moment it became idle, the pool's max_idle."""
        _store(self._mm, self._bases[idx] + S_BEAT, _I.pack(int(now)))

    def set_idle(self, idx: int, now: float) -> None:
        base, mm = self._bases[idx], self._mm
        _store(mm, base + S_BEAT, _I.pack(int(now)))
        _store(mm, base + S_CLIENT, _CLIENT.pack(b""))
        _store(mm, base + S_PORT, _H.pack(0))
        _store(mm, base + S_PHASE, _PHASE.pack(b"", now))
        if mm[base + S_STATE] != STOPPING:
            mm[base + S_STATE] = IDLE

    def set_available(self, idx: int, available: bool) -> None:
        """Count the slot's worker among the idle ones (``idle_workers``), or stop counting
        it: when its accept loop starts, and when it stops accepting.  Sessions move it
        in ``admit`` and ``release``, under the lock they take anyway."""
        base = self._bases[idx]
        if self._mm[base + S_IDLE] == available:
            return
        self._lock()
        try:
            self._mark_idle(base, available)
        finally:
            self._unlock()

    def idle_workers(self) -> int:
        """Workers free to take a connection now, as they counted themselves."""
        return _Q.unpack_from(self._mm, H_IDLE)[0]

    def _mark_idle(self, base: int, available: bool) -> None:
        mm = self._mm
        if mm[base + S_IDLE] != available:
            mm[base + S_IDLE] = 1 if available else 0  # the mark first: see _rebuild()
            _store(mm, H_IDLE, _Q.pack(_Q.unpack_from(mm, H_IDLE)[0] + (1 if available else -1)))

    def set_stopping(self, idx: int) -> None:
        self._mm[self._bases[idx] + S_STATE] = STOPPING

    def count_message(self, idx: int, nbytes: int) -> None:
        off = self._bases[idx] + S_MESSAGES
        n, total = _QQ.unpack_from(self._mm, off)
        _store(self._mm, off, _QQ.pack(n + 1, total + nbytes))

    def count_reject(self, idx: int, code: int) -> None:
        off = self._bases[idx] + S_REJECTS + 8 * _CODE_POS.get(code, len(REJECT_CODES))
        _store(self._mm, off, _Q.pack(_Q.unpack_from(self._mm, off)[0] + 1))

    def count_event(self, idx: int, name: str) -> None:
        off = self._bases[idx] + S_EVENTS + 8 * _EVENT_POS[name]
        _store(self._mm, off, _Q.pack(_Q.unpack_from(self._mm, off)[0] + 1))

    def count_conn_reject(self, idx: int, reason: str) -> None:
        pos = _REASON_POS.get(reason, len(CONN_REJECT_REASONS) - 1)
        off = self._bases[idx] + S_CONN_REJECTS + 8 * pos
        _store(self._mm, off, _Q.pack(_Q.unpack_from(self._mm, off)[0] + 1))

    # -- admission --------------------------------------------------------------------------
    def admit(self, idx: int, ip: str, max_conn: int, max_per_ip: int, over_rate: bool = False) -> str | None:
        """Count a new session under slot idx, or return why not (the refusal is counted).

        A limit of 0 or less means unlimited.  ``over_rate``: the client is past its
        connections a minute (connrate), refused after the concurrent limits, as Postfix
        checks them.  Counts already held by the slot are dropped first, so a worker that
        forgot release() cannot leak.
        """
        key, base, mm = ip_key(ip), self._bases[idx], self._mm
        self._lock()
        try:
            self._release(base)
            _store(mm, H_TOTAL, _Q.pack(_Q.unpack_from(mm, H_TOTAL)[0] + 1))
            active = _Q.unpack_from(mm, H_ACTIVE)[0]
            if 0 < max_conn <= active:
                return self._refuse(idx, MAX_CONNECTIONS)
            bucket = self._probe(key)
            if bucket < 0:
                self._rebuild()  # clears stale entries; live keys are few
                bucket = self._probe(key)
            count = _I.unpack_from(mm, self._table + bucket * _BUCKET.size + 20)[0] if bucket >= 0 else 0
            if 0 < max_per_ip <= count:
                return self._refuse(idx, MAX_CONNECTIONS_PER_IP)
            if over_rate:
                return self._refuse(idx, MAX_CONNECTION_RATE)
            # The slot records what it holds before the shared counts move (see repair()).
            _store(mm, base + S_BUCKET, _HOLD.pack(bucket + 1, key))
            mm[base + S_HOLDS] = 1
            _store(mm, H_ACTIVE, _Q.pack(active + 1))
            if bucket >= 0:
                _store(mm, self._table + bucket * _BUCKET.size + 20, _I.pack(count + 1))
            self._mark_idle(base, False)
            return None
        finally:
            self._unlock()

    def release(self, idx: int, available: bool = True) -> None:
        """Drop the counts slot idx holds (end of session), and count its worker idle
        again if it goes on accepting (``available``).  Idempotent and cheap when there is
        nothing to change."""
        base, mm = self._bases[idx], self._mm
        if (not mm[base + S_HOLDS] and not _I.unpack_from(mm, base + S_BUCKET)[0]
                and mm[base + S_IDLE] == available):
            return  # holds is set only by the owner; rebuild() never gives a non-holder a bucket
        self._lock()
        try:
            self._release(base)
            self._mark_idle(base, available)
        finally:
            self._unlock()

    def _refuse(self, idx: int, reason: str) -> str:
        self.count_conn_reject(idx, reason)
        return reason

    def _release(self, base: int) -> None:
        mm = self._mm
        stored = _I.unpack_from(mm, base + S_BUCKET)[0]
        if stored > 0:
            self._decrement(stored - 1)
            _store(mm, base + S_BUCKET, _I.pack(0))
        if mm[base + S_HOLDS]:
            active = _Q.unpack_from(mm, H_ACTIVE)[0]
            _store(mm, H_ACTIVE, _Q.pack(max(active - 1, 0)))
            mm[base + S_HOLDS] = 0

    # -- per-IP table (lock held) -----------------------------------------------------------
    def bucket_of(self, key: bytes, n: int) -> int:
        """Where ``key`` starts its probe in a table of ``n`` buckets.  The hash is keyed
        with a secret of this server's, so nobody can pick addresses that crowd one
        neighbourhood of a table: with CRC-32, 32 addresses chosen offline filled a
        client's probe window, and its max_connections_per_ip no longer held."""
        digest = hashlib.blake2b(key, digest_size=8, key=self._hash_key).digest()
        return int.from_bytes(digest, "little") % n

    def _probe(self, key: bytes) -> int:
        """The bucket holding key, else a new one claimed for it, else -1 (window full)."""
        mm, n, size, table = self._mm, self.ip_buckets, _BUCKET.size, self._table
        start, tomb = self.bucket_of(key, n), -1
        for i in range(min(n, _PROBE_WINDOW)):
            b = (start + i) % n
            k, state, _ = _BUCKET.unpack_from(mm, table + b * size)
            if state == _LIVE and k == key:
                return b
            if state == _EMPTY:  # the key is not further on: insert at the first free spot
                tomb = b if tomb < 0 else tomb
                break
            if state == _TOMB and tomb < 0:
                tomb = b
        if tomb >= 0:
            _store(mm, table + tomb * size, _BUCKET.pack(key, _LIVE, 0))
        return tomb

    def _decrement(self, b: int) -> None:
        mm, n, size, table = self._mm, self.ip_buckets, _BUCKET.size, self._table
        key, _, count = _BUCKET.unpack_from(mm, table + b * size)
        if count > 1:
            _store(mm, table + b * size, _BUCKET.pack(key, _LIVE, count - 1))
            return
        if mm[table + ((b + 1) % n) * size + 16] != _EMPTY:
            _store(mm, table + b * size, _BUCKET.pack(b"", _TOMB, 0))  # a chain may pass here
            return
        # Followed by an empty bucket, no chain passes through b: empty it and the tombstones
        # before it, so tombstones do not pile up and lengthen every probe.
        for _ in range(n):
            _store(mm, table + b * size, _BUCKET.pack(b"", _EMPTY, 0))
            b = (b - 1) % n
            if mm[table + b * size + 16] != _TOMB:
                break

    def _rebuild(self) -> None:
        """Recount active sessions, idle workers and the per-IP table from what live slots
        say they hold.  A worker killed between its idle mark and the count (marks move
        first) leaves the count off by one until this runs, in the repair of its slot."""
        mm = self._mm
        mm[self._table:self._table + len(self._zero_table)] = self._zero_table
        active = idle = 0
        for base in self._bases:
            if mm[base + S_STATE] != FREE:
                idle += mm[base + S_IDLE]
            if mm[base + S_STATE] == FREE or not mm[base + S_HOLDS]:
                _store(mm, base + S_BUCKET, _I.pack(0))
                mm[base + S_HOLDS] = 0
                continue
            active += 1
            b = self._probe(mm[base + S_KEY:base + S_KEY + 16])
            if b >= 0:
                off = self._table + b * _BUCKET.size + 20
                _store(mm, off, _I.pack(_I.unpack_from(mm, off)[0] + 1))
            _store(mm, base + S_BUCKET, _I.pack(b + 1))
        _store(mm, H_ACTIVE, _Q.pack(active))
        _store(mm, H_IDLE, _Q.pack(idle))

    def ip_counts(self) -> dict[str, int]:
        """The per-IP table as it stands (diagnostics and tests)."""
        n = self.ip_buckets * _BUCKET.size
        rows = _BUCKET.iter_unpack(self._mm[self._table:self._table + n])
        return {key_text(k): c for k, state, c in rows if state == _LIVE}

    # -- snapshot ---------------------------------------------------------------------------
    def snapshot(self, top: int = 10) -> Snapshot:
        """A consistent copy (taken under the lock, parsed outside it) as plain values.  If
        the master cannot take the lock, the copy is taken as it stands: slots are written
        without it anyway, and a shared count caught mid-update is off by one for a tick."""
        try:
            with self.locked():
                raw = self._mm[:self._table]
        except LockBusy:
            raw = self._mm[:self._table]
        totals = list(_COUNTERS.unpack_from(raw, H_COUNTERS))
        slots: list[SlotInfo] = []
        per_ip: Counter[str] = Counter()
        for i, base in enumerate(self._bases):
            if raw[base + S_STATE] != FREE:
                slots.append(_slot_info(i, _SLOT.unpack_from(raw, base)))
                totals = [a + b for a, b in zip(totals, _COUNTERS.unpack_from(raw, base + S_COUNTERS))]
                if raw[base + S_HOLDS]:
                    per_ip[key_text(raw[base + S_KEY:base + S_KEY + 16])] += 1
        q = lambda off: _Q.unpack_from(raw, off)[0]  # noqa: E731
        return Snapshot(self.nslots, q(H_GENERATION), bool(raw[H_STRESS]), q(H_ACTIVE), q(H_TOTAL),
                        q(H_EXITED), tuple(slots), tuple(per_ip.most_common(top)),
                        Totals.from_counters(totals))

