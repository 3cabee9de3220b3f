"""The scoreboard across real processes: shared memory, flock admission, repair after SIGKILL."""
from __future__ import annotations

import fcntl
import os
import shutil
import select
import signal
import struct
import time
import traceback
import zlib
from typing import Callable

import pytest

from daemon import poll_for
from helpers import addresses_sharing_a_start
from forksmtp.authlimit import ALLOWED, LOOK_STALE, REFUSED, RUNNING_STALE, SATURATED, AuthLimiter, cpu_count
from forksmtp.authlimit import BUSY as WAIT
from forksmtp.scoreboard import (BUSY, CONN_REJECT_REASONS, FREE, H_IDLE, IDLE, REJECT_KEYS,
                                 STARTING, STOPPING, Scoreboard, ip_key, key_text)


@pytest.fixture
def sb():
    board = Scoreboard.create(8, ip_buckets=64)
    yield board
    board.close()


def start(board: Scoreboard, fn: Callable[[], int | None], after_fork: bool = True) -> int:
    """Fork a child that runs fn and exits with its return value (99 on an exception)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            if after_fork:
                board.after_fork()
            code = fn() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """Exit status of pid, or -signal when it was killed."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def read_byte(fd: int) -> bytes:
    data = os.read(fd, 1)
    os.close(fd)
    return data


def killed_after(board: Scoreboard, steps: Callable[[], None]) -> None:
    """Fork a worker that takes ``steps`` and waits; SIGKILL it once they are done."""
    ready_r, ready_w = os.pipe()

    def child():
        steps()
        os.write(ready_w, b"x")
        time.sleep(60)

    pid = start(board, child)
    os.close(ready_w)
    try:
        assert read_byte(ready_r) == b"x"
    finally:
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL


def test_create_layout_and_close(tmp_path):
    board = Scoreboard.create(3, ip_buckets=16, lock_dir=str(tmp_path))
    assert os.path.exists(board.lock_path)
    snap = board.snapshot()
    assert (snap.nslots, snap.active, snap.slots, snap.per_ip) == (3, 0, (), ())
    assert snap.totals.messages_rejected == dict.fromkeys(REJECT_KEYS, 0)
    assert snap.totals.connections_rejected == dict.fromkeys(CONN_REJECT_REASONS, 0)
    board.close()
    assert not os.path.exists(board.lock_path) and tmp_path.exists()


def test_private_lock_dir_removed_by_master_only():
    board = Scoreboard.create(2)
    lock_dir = os.path.dirname(board.lock_path)
    assert oct(os.stat(lock_dir).st_mode & 0o777) == "0o700"
    assert wait(start(board, board.close)) == 0  # a child's close() leaves the file alone
    assert os.path.exists(board.lock_path)
    board.close()
    assert not os.path.exists(lock_dir)


def test_client_wait_mark_round_trip(sb):
    """The mark a worker writes while its client keeps it waiting reaches the master's
    snapshot, counts only in a session, and a slot repaired or claimed again holds none."""
    sb.claim_slot(0, 0, 7, now=100.0)
    sb.set_pid(0, 4242)
    sb.set_busy(0, ("192.0.2.1", 40000), 101.0)
    sb.set_client_wait(0, 101.5)
    (slot,) = sb.snapshot().slots
    assert slot.client_wait == 101.5 and slot.held_by_client
    assert slot.counters.sessions == 1  # the counters after the new field are intact
    sb.set_client_wait(0, 0.0)
    (slot,) = sb.snapshot().slots
    assert slot.client_wait == 0.0 and not slot.held_by_client
    sb.set_client_wait(0, 102.0)
    sb.set_idle(0, 103.0)
    (slot,) = sb.snapshot().slots
    assert not slot.held_by_client  # an idle worker is held by no one, whatever its slot says
    assert sb.repair(0)
    sb.claim_slot(0, 0, 7, now=104.0)
    (slot,) = sb.snapshot().slots
    assert slot.client_wait == 0.0


def test_slot_life_cycle(sb):
    assert sb.free_slot() == 0
    sb.claim_slot(0, 0, 7, now=100.0)  # the master, before fork
    assert sb.free_slot() == 1
    sb.set_pid(0, 4242)  # after the fork
    sb.set_busy(0, ("2001:db8::1", 40000, 0, 0), 101.0)
    sb.set_phase(0, "rcpt", 102.0)
    sb.count_message(0, 1234)
    sb.count_reject(0, 552)
    sb.count_reject(0, 299)
    (slot,) = sb.snapshot().slots
    assert (slot.pid, slot.generation, slot.state_name, slot.client, slot.port, slot.phase) == (
        4242, 7, "busy", "2001:db8::1", 40000, "rcpt")
    assert (slot.started, slot.last_activity, slot.counters.sessions) == (100.0, 102.0, 1)
    assert slot.counters.messages_accepted == 1 and slot.counters.bytes_received == 1234
    assert slot.counters.messages_rejected["552"] == 1 and slot.counters.messages_rejected["other"] == 1
    sb.set_idle(0, 103.0)
    sb.touch(0, 104.0)
    (slot,) = sb.snapshot().slots
    assert (slot.state, slot.client, slot.phase, slot.last_activity) == (IDLE, "", "", 104.0)
    with pytest.raises(ValueError):
        sb.claim_slot(0, 1, 7)


def test_stopping_is_sticky(sb):
    sb.claim_slot(0, 0, 1, now=0.0)
    sb.set_stopping(0)  # the master retires it before the child even claimed
    sb.set_pid(0, 555)
    sb.set_busy(0, "10.0.0.1", 1.0)
    sb.set_idle(0, 2.0)
    (slot,) = sb.snapshot().slots
    assert (slot.state, slot.pid) == (STOPPING, 555)


def test_header_flags(sb):
    sb.set_generation(3)
    sb.set_stress(True)
    assert (sb.generation(), sb.in_stress()) == (3, True)
    snap = sb.snapshot()
    assert (snap.generation, snap.stress) == (3, True)
    sb.set_stress(False)
    assert not sb.in_stress()


def test_global_limit_and_release(sb):
    for i in range(3):
        sb.claim_slot(i, 0, 1, now=0.0)
    assert sb.admit(0, "10.0.0.1", 2, 0) is None
    assert sb.admit(1, "10.0.0.2", 2, 0) is None
    assert sb.admit(2, "10.0.0.3", 2, 0) == "max_connections"
    assert sb.active() == 2
    sb.release(0)
    sb.release(0)  # idempotent
    assert sb.active() == 1
    assert sb.admit(2, "10.0.0.3", 2, 0) is None
    snap = sb.snapshot()
    assert snap.connections_total == 4
    assert snap.totals.connections_rejected["max_connections"] == 1
    assert dict(snap.per_ip) == {"10.0.0.2": 1, "10.0.0.3": 1}


def test_admit_twice_without_release_does_not_leak(sb):
    sb.claim_slot(0, 0, 1, now=0.0)
    assert sb.admit(0, "10.0.0.1", 5, 5) is None
    assert sb.admit(0, "10.0.0.9", 5, 5) is None
    assert (sb.active(), sb.ip_counts()) == (1, {"10.0.0.9": 1})


def test_per_ip_limit_ipv4_ipv6(sb):
    for i in range(8):
        sb.claim_slot(i, 0, 1, now=0.0)
    assert sb.admit(0, "192.0.2.1", 0, 2) is None
    assert sb.admit(1, "::ffff:192.0.2.1", 0, 2) is None  # the same client, IPv4-mapped
    assert sb.admit(2, "192.0.2.1", 0, 2) == "max_connections_per_ip"
    assert sb.admit(3, "2001:db8::1", 0, 2) is None
    assert sb.admit(4, "2001:DB8:0::1%eth0", 0, 2) is None  # same address, scope dropped
    assert sb.admit(5, "2001:db8::1", 0, 2) == "max_connections_per_ip"
    assert sb.admit(6, "2001:db8::2", 0, 2) is None
    assert sb.ip_counts() == {"192.0.2.1": 2, "2001:db8::1": 2, "2001:db8::2": 1}
    assert sb.snapshot().totals.connections_rejected["max_connections_per_ip"] == 2
    sb.release(0)
    assert sb.admit(2, "192.0.2.1", 0, 2) is None
    for i in range(8):
        sb.release(i)
    assert (sb.active(), sb.ip_counts()) == (0, {})


def test_ip_keys():
    assert ip_key("127.0.0.1") == ip_key("::ffff:127.0.0.1")
    assert key_text(ip_key("127.0.0.1")) == "127.0.0.1"
    assert key_text(ip_key("2001:db8::1")) == "2001:db8::1"
    assert len(ip_key("not-an-address")) == 16 and ip_key("a") != ip_key("b")


def test_many_distinct_clients_leave_no_stale_entries():
    board = Scoreboard.create(4, ip_buckets=16)  # tiny table: tombstones and rebuilds happen
    try:
        for i in range(4):
            board.claim_slot(i, 0, 1, now=0.0)
        for n in range(3000):
            slot = n % 4
            assert board.admit(slot, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0, 1) is None
            if n % 3:
                board.release((n + 1) % 4)
        for i in range(4):
            board.release(i)
        assert (board.active(), board.ip_counts()) == (0, {})
    finally:
        board.close()


def test_full_table_fails_open_to_global_limit():
    board = Scoreboard.create(6, ip_buckets=2)
    try:
        for i in range(6):
            board.claim_slot(i, 0, 1, now=0.0)
        for i in range(4):  # four distinct clients, two buckets: two get no per-IP count
            assert board.admit(i, f"10.0.0.{i}", 5, 1) is None
        assert board.active() == 4 and sum(board.ip_counts().values()) == 2
        assert board.admit(4, "10.0.0.9", 5, 1) is None  # still admitted, by the global limit
        assert board.admit(5, "10.0.0.8", 5, 1) == "max_connections"
        for i in range(6):
            board.release(i)
        assert (board.active(), board.ip_counts()) == (0, {})
    finally:
        board.close()


def test_sigkilled_worker_counts_restored_by_repair(sb):
    sb.claim_slot(0, 0, 1, now=0.0)
    sb.claim_slot(1, 0, 1, now=0.0)
    assert sb.admit(1, "198.51.100.7", 10, 10) is None  # a live neighbour keeps its count

    def steps():
        sb.set_pid(0, os.getpid())
        assert sb.admit(0, "198.51.100.7", 10, 10) is None
        sb.set_busy(0, ("198.51.100.7", 1025), time.monotonic())
        sb.count_message(0, 500)
        sb.count_reject(0, 550)

    killed_after(sb, steps)
    assert (sb.active(), sb.ip_counts()) == (2, {"198.51.100.7": 2})
    before = sb.snapshot().totals
    assert sb.repair(0) is True
    assert sb.repair(0) is False  # idempotent
    after = sb.snapshot()
    assert (after.active, sb.ip_counts()) == (1, {"198.51.100.7": 1})
    assert after.totals == before and after.workers_exited == 1
    assert after.totals.messages_accepted == 1 and after.totals.messages_rejected["550"] == 1
    assert [s.index for s in after.slots] == [1] and sb.free_slot() == 0
    sb.release(1)
    assert (sb.active(), sb.ip_counts()) == (0, {})


def test_a_slot_freed_after_a_failed_fork_counts_no_exited_worker(sb):
    """The master claims a slot before it forks; when fork() fails it frees the slot,
    which held no worker: none exited."""
    sb.claim_slot(3, 0, 1, time.monotonic())
    assert sb.repair(3) is True
    assert sb.snapshot().workers_exited == 0
    sb.claim_slot(3, 0, 1, time.monotonic())
    sb.set_pid(3, os.getpid())  # forked: a worker, which then exits
    assert sb.repair(3) is True
    assert sb.snapshot().workers_exited == 1


def test_repair_clears_what_a_half_done_admission_left(sb):
    """A worker killed inside admit() may leave a table entry nobody holds: repair drops it."""
    sb.claim_slot(0, 0, 1, now=0.0)
    ready_r, ready_w = os.pipe()

    def child():
        with sb.locked():
            sb._probe(ip_key("203.0.113.9"))  # the first step of an admission, then death
            os.write(ready_w, b"x")
            time.sleep(60)

    pid = start(sb, child)
    os.close(ready_w)
    assert read_byte(ready_r) == b"x"
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    assert sb.ip_counts() == {"203.0.113.9": 0}
    sb.repair(0)
    assert (sb.active(), sb.ip_counts()) == (0, {})


def test_worker_killed_while_holding_the_lock(sb):
    ready_r, ready_w = os.pipe()

    def child():
        with sb.locked():
            os.write(ready_w, b"x")
            time.sleep(60)

    pid = start(sb, child)
    os.close(ready_w)
    assert read_byte(ready_r) == b"x"
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    sb.claim_slot(0, 0, 1, now=0.0)
    assert sb.admit(0, "10.1.1.1", 1, 1) is None  # the kernel dropped the dead holder's flock


def test_the_master_never_waits_long_for_a_lock_a_worker_keeps(sb):
    """A worker stopped while it holds the lock must not stop the master: its reads come
    back within MASTER_LOCK_WAIT, its repairs say to try later (at once, once it has
    waited), and the holder's slot says it is in admission."""
    from forksmtp.scoreboard import MASTER_LOCK_WAIT, LockBusy

    ready_r, ready_w = os.pipe()
    sb.claim_slot(1, 0, 1, now=0.0)
    sb.claim_slot(2, 0, 1, now=0.0)

    def child():
        sb.after_fork(2)
        with sb.locked():
            os.write(ready_w, b"x")
            time.sleep(60)

    pid = start(sb, child, after_fork=False)
    try:
        os.close(ready_w)
        assert read_byte(ready_r) == b"x"
        assert sb.lock_missed_since is None
        began = time.monotonic()
        snap = sb.snapshot()
        took = time.monotonic() - began
        assert snap.nslots == 8 and [s.index for s in snap.slots] == [1, 2]  # read unlocked
        assert MASTER_LOCK_WAIT <= took < 1.0
        assert sb.lock_missed_since is not None and sb.lock_missed_since >= began
        # A tick with many repairs to make: no wait for each.  Waiting, 500 of them would
        # take 500 x MASTER_LOCK_WAIT (5 s) at the least, however fast the machine; not
        # waiting, a few ms, and half of that is room enough for a loaded one.
        began = time.monotonic()
        for _ in range(500):
            with pytest.raises(LockBusy):
                sb.repair(1)
        assert time.monotonic() - began < 250 * MASTER_LOCK_WAIT
        assert [s.index for s in sb.snapshot().slots] == [1, 2]  # nothing freed without the lock
        assert sb.in_admission() == [2]
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    assert sb.repair(1) is True
    assert sb.lock_missed_since is None
    assert sb.in_admission() == [2]  # the dead holder's mark stays with its slot ...
    assert sb.repair(2) is True
    assert sb.in_admission() == [] and sb.snapshot().slots == ()  # ... until its repair


def test_a_worker_marks_its_slot_while_it_waits_for_or_holds_the_lock(sb):
    def solo():
        sb.after_fork(3)
        marks = [sb.in_admission()]
        with sb.locked():
            marks.append(sb.in_admission())
        marks.append(sb.in_admission())
        sb.admit(3, "10.3.3.3", 5, 5)
        marks.append(sb.in_admission())
        return 0 if marks == [[], [3], [], []] else 1

    sb.claim_slot(3, 0, 1, now=0.0)
    assert wait(start(sb, solo, after_fork=False)) == 0

    ready_r, ready_w = os.pipe()

    def holder():
        sb.after_fork(2)
        with sb.locked():
            os.write(ready_w, b"x")
            time.sleep(60)

    def waiter():
        sb.after_fork(4)
        with sb.locked():
            pass

    first = start(sb, holder, after_fork=False)
    os.close(ready_w)
    assert read_byte(ready_r) == b"x"
    second = start(sb, waiter, after_fork=False)
    try:
        assert poll_for(sb.in_admission, [2, 4], interval=0.01) == [2, 4]
    finally:
        os.kill(first, signal.SIGKILL)
    assert wait(first) == -signal.SIGKILL and wait(second) == 0
    assert sb.in_admission() == [2]  # the waiter got the lock and let it go; the dead holder's mark stays


def test_workers_wait_for_the_lock_however_long_it_is_held(sb):
    """Only the master's waits are bounded: a worker's admission waits for the lock.
    The holder lets it go when the test says so, once the admitter is seen waiting and
    a while after (past several of a worker's WORKER_LOCK_STEP); just before it does,
    it says so on a pipe, which the admitter must find written once it is admitted."""
    from forksmtp.scoreboard import WORKER_LOCK_STEP

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    letting_go_r, letting_go_w = os.pipe()

    def holder():
        with sb.locked():
            os.write(ready_w, b"x")
            if not select.select([go_r], [], [], 60)[0]:  # bounded, should the test die
                return 1
            os.write(letting_go_w, b"x")
        return 0

    def admitter():
        sb.after_fork(0)
        assert sb.admit(0, "10.2.2.2", 5, 5) is None
        return 0 if select.select([letting_go_r], [], [], 0)[0] else 3  # 3: admitted too soon

    sb.claim_slot(0, 0, 1, now=0.0)
    first = start(sb, holder)
    os.close(ready_w)
    assert read_byte(ready_r) == b"x"
    second = start(sb, admitter, after_fork=False)
    try:
        assert poll_for(sb.in_admission, [0], interval=0.01) == [0], "the admitter is not waiting for the lock"
        time.sleep(2.5 * WORKER_LOCK_STEP)  # held for this long at the least
    finally:
        os.write(go_w, b"x")
    assert [wait(first), wait(second)] == [0, 0]
    for fd in (go_r, go_w, letting_go_r, letting_go_w):
        os.close(fd)
    assert sb.active() == 1


def _count_under_lock(board: Scoreboard) -> None:
    """Read-modify-write with a yield inside the lock: any overlap would lose increments."""
    for _ in range(300):
        with board.locked():
            value = board.generation()
            os.sched_yield()
            board.set_generation(value + 1)


def test_lock_excludes_processes_that_reopened_it(sb):
    sb.set_generation(0)
    pids = [start(sb, lambda: _count_under_lock(sb)) for _ in range(4)]
    assert [wait(p) for p in pids] == [0, 0, 0, 0]
    assert sb.generation() == 1200


def test_workers_forked_after_a_tmp_cleaner_removed_the_lock_dir_still_exclude_each_other():
    """An age-based tmp cleaner removes the lock directory of a long-lived master: the
    workers forked after it still open the one lock, through the master's descriptor."""
    board = Scoreboard.create(8, ip_buckets=64)
    try:
        shutil.rmtree(os.path.dirname(board.lock_path))
        board.set_generation(0)
        pids = [start(board, lambda: _count_under_lock(board)) for _ in range(4)]
        assert [wait(p) for p in pids] == [0, 0, 0, 0]
        assert board.generation() == 1200
        with board.locked():  # the master's own descriptor is the same lock
            pid = start(board, lambda: 0 if not _try_lock(board) else 1)
            assert wait(pid) == 0
    finally:
        board.close()


def _try_lock(board: Scoreboard) -> bool:
    """Whether this process can take the board's lock at once."""
    try:
        fcntl.flock(board._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(board._fd, fcntl.LOCK_UN)
    return True


def test_lock_without_after_fork_refuses(sb):
    def child():
        try:
            sb.admit(0, "10.0.0.1", 1, 1)
        except RuntimeError:
            return 0
        return 1

    assert wait(start(sb, child, after_fork=False)) == 0


def test_concurrent_admission_never_exceeds_limits():
    board = Scoreboard.create(4, ip_buckets=64)
    ips = ("192.0.2.1", "2001:db8::5")
    try:
        def child(idx: int) -> Callable[[], int]:
            def run() -> int:
                board.set_pid(idx, os.getpid())
                for n in range(500):
                    if board.admit(idx, ips[n % 2], 3, 1) is None:
                        counts = board.ip_counts()  # the table, read while we hold a count
                        if board.active() > 3 or any(c > 1 for c in counts.values()):
                            return 1
                    board.release(idx)
                return 0
            return run

        for i in range(4):
            board.claim_slot(i, 0, 1, now=0.0)
        pids = [start(board, child(i)) for i in range(4)]
        assert [wait(p) for p in pids] == [0, 0, 0, 0]
        snap = board.snapshot()
        assert (snap.active, board.ip_counts(), snap.connections_total) == (0, {}, 2000)
        # The global limit (3) is never reached by 4 children each holding at most one
        # count; how often they overlapped on one address (per-IP refusals) is luck.
        assert snap.totals.connections_rejected["max_connections"] == 0
    finally:
        board.close()


def test_totals_monotonic_across_repair_and_reuse(sb):
    seen = []
    for round_ in range(3):
        sb.claim_slot(0, 0, round_, now=0.0)

        def child():
            sb.set_pid(0, os.getpid())
            for _ in range(5):
                sb.set_busy(0, "10.0.0.1", 1.0)
                sb.count_message(0, 100)
                sb.count_reject(0, 421)
                sb.count_conn_reject(0, "early_talker")
                sb.set_idle(0, 2.0)

        pid = start(sb, child)
        assert wait(pid) == 0
        seen.append(sb.snapshot().totals)
        sb.repair(0)
        seen.append(sb.snapshot().totals)
    messages = [t.messages_accepted for t in seen]
    assert messages == [5, 5, 10, 10, 15, 15]
    assert seen[-1].sessions == 15 and seen[-1].bytes_received == 1500
    assert seen[-1].messages_rejected["421"] == 15
    assert seen[-1].connections_rejected["early_talker"] == 15


def test_a_reader_never_sees_a_field_pass_through_zero(sb):
    """The master reads slots without the lock while their workers write them.  A field
    must go from its old value to its new one, never through a value nobody wrote: a
    busy worker's last_activity read as 0.0 got it killed as silent, and a counter read
    as 0 makes the stats go back.  A worker touches, changes phase and counts as fast
    as it can while this process reads snapshots, as the master's ticks do."""
    sb.claim_slot(0, 0, 1, now=1000.0)
    stop_r, stop_w = os.pipe()
    ready_r, ready_w = os.pipe()

    def child():
        sb.set_pid(0, os.getpid())
        sb.set_busy(0, ("127.0.0.1", 1234), 1001.0)
        sb.count_message(0, 1)
        os.write(ready_w, b"x")  # from here on no field is 0
        now = 1002.0
        while not select.select([stop_r], [], [], 0)[0]:
            for _ in range(200):
                now += 0.001
                sb.touch(0, now)
                sb.set_phase(0, "data", now)
                sb.count_message(0, 1)
                sb.count_event(0, "tls_ok")

    pid = start(sb, child)
    assert read_byte(ready_r) == b"x"
    reads, zeros, backwards, last = 0, [], 0, (0, 0)
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            for slot in sb.snapshot().slots:
                if slot.pid != pid:
                    continue
                reads += 1
                counts = (slot.counters.messages_accepted, slot.counters.bytes_received)
                if slot.last_activity < 1000.0 or 0 in counts:
                    zeros.append((slot.last_activity, counts))
                backwards += counts < last
                last = max(last, counts)
    finally:
        os.write(stop_w, b"x")
        assert wait(pid) == 0
        for fd in (stop_r, stop_w, ready_w):
            os.close(fd)
    assert reads > 1000 and last[0] > 1000  # both sides ran, and at the same time
    assert zeros == [] and backwards == 0


def test_snapshot_states(sb):
    for i, state in enumerate((STARTING, IDLE, BUSY, STOPPING)):
        sb.claim_slot(i, 100 + i, 1, now=0.0)
        if state == IDLE:
            sb.set_idle(i, 1.0)
        elif state == BUSY:
            sb.set_busy(i, "10.0.0.1", 1.0)
        elif state == STOPPING:
            sb.set_stopping(i)
    snap = sb.snapshot()
    assert [s.state for s in snap.slots] == [STARTING, IDLE, BUSY, STOPPING]
    assert snap.count(STARTING, IDLE) == 2 and snap.count(FREE) == 0


def test_many_admissions_and_releases_balance(sb):
    """The per-connection path, many times over: every admission is released, and the
    counts come back to nothing."""
    sb.claim_slot(0, os.getpid(), 1)
    for n in range(5000):
        sb.set_phase(0, "rcpt", 1.0)
        assert sb.admit(0, "192.0.2.1" if n % 2 else "2001:db8::1", 50, 10) is None
        sb.release(0)
    snap = sb.snapshot()
    assert (snap.active, sb.ip_counts(), snap.connections_total) == (0, {}, 5000)


# -- the AUTH failure limit (authlimit.py) -------------------------------------------------

def fail(limiter: AuthLimiter, ip: str, now: float, times: int = 1) -> None:
    """``times`` checks of ``ip`` that end with a wrong password."""
    for _ in range(times):
        assert limiter.attempt(ip, now, 0) == ALLOWED
        limiter.finished(ip, now, ok=False, slot=0)


def test_auth_limit_refuses_after_max_failures_in_the_window(sb):
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    fail(limiter, "192.0.2.1", 10.0, 5)
    assert limiter.attempt("192.0.2.1", 11.0, 0) == REFUSED
    assert limiter.attempt("192.0.2.2", 11.0, 0) == ALLOWED  # another address is not affected
    assert limiter.attempt("192.0.2.1", 310.1, 0) == ALLOWED  # the window is over


def test_auth_limit_window_opens_at_the_first_failure_not_the_first_check(sb):
    """A login that succeeds opened the window: five guesses just before its end and
    five more just after it were all checked, ten in 7 s.  The window opens at the
    first failure, so the second five are refused."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    assert limiter.attempt("192.0.2.1", 0.0, 0) == ALLOWED
    limiter.finished("192.0.2.1", 0.1, ok=True, slot=0)
    fail(limiter, "192.0.2.1", 294.0, 5)
    assert limiter.attempt("192.0.2.1", 301.0, 0) == REFUSED
    assert limiter.attempt("192.0.2.1", 593.9, 0) == REFUSED
    assert limiter.attempt("192.0.2.1", 594.1, 0) == ALLOWED  # 300 s after the first failure


def test_auth_limit_checks_running_as_a_window_ends_count_in_the_next(sb):
    """Checks begun just before a window ends are still running after it: dropping
    them from the count let as many again begin at once."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    fail(limiter, "192.0.2.1", 10.0, 3)
    assert [limiter.attempt("192.0.2.1", 309.9, 0) for _ in range(3)] == [ALLOWED, ALLOWED, WAIT]
    assert [limiter.attempt("192.0.2.1", 310.1, 0) for _ in range(4)] == [ALLOWED] * 3 + [WAIT]
    for _ in range(5):
        limiter.finished("192.0.2.1", 310.2, ok=False, slot=0)
    assert limiter.attempt("192.0.2.1", 310.3, 0) == REFUSED


def test_auth_limit_counts_running_checks_and_makes_the_next_wait_not_fail(sb):
    """Checks running at the same moment count against the limit with the failures:
    never more than max_failures guesses in a window, whatever their order.  One more
    waits (WAIT), it is not refused: a right password is no failure."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    assert [limiter.attempt("192.0.2.1", 10.0, 0) for _ in range(6)] == [ALLOWED] * 5 + [WAIT]
    limiter.finished("192.0.2.1", 10.1, ok=True, slot=0)  # a right password: gone without a trace
    assert limiter.attempt("192.0.2.1", 10.2, 0) == ALLOWED
    assert limiter.attempt("192.0.2.1", 10.2, 0) == WAIT
    for _ in range(5):
        limiter.finished("192.0.2.1", 10.3, ok=False, slot=0)  # all five were wrong
    assert limiter.attempt("192.0.2.1", 10.4, 0) == REFUSED


def test_auth_limit_running_checks_plus_failures_make_the_limit(sb):
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    fail(limiter, "192.0.2.1", 1.0, 3)
    assert [limiter.attempt("192.0.2.1", 2.0, 0) for _ in range(3)] == [ALLOWED, ALLOWED, WAIT]
    limiter.finished("192.0.2.1", 2.1, ok=True, slot=0)
    assert limiter.attempt("192.0.2.1", 2.2, 0) == ALLOWED


def test_auth_limit_right_passwords_in_any_number_are_never_refused(sb):
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    for n in range(100):
        assert limiter.attempt("192.0.2.1", n * 0.1, 0) == ALLOWED
        limiter.finished("192.0.2.1", n * 0.1, ok=True, slot=0)


def test_auth_limit_checks_never_finished_are_dropped_once_stale(sb):
    """A worker killed during a check (the OOM killer picks workers first) never gives
    its count back: once no check of the address has started for RUNNING_STALE, the
    running ones are taken to be gone; failures stay for their window."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    fail(limiter, "192.0.2.1", 1.0, 2)
    for _ in range(3):
        assert limiter.attempt("192.0.2.1", 1.0, 0) == ALLOWED
    assert limiter.attempt("192.0.2.1", 1.0 + RUNNING_STALE - 0.1, 0) == WAIT
    assert limiter.attempt("192.0.2.1", 1.0 + RUNNING_STALE, 0) == ALLOWED
    assert limiter.attempt("192.0.2.1", 1.0 + RUNNING_STALE, 0) == ALLOWED
    assert limiter.attempt("192.0.2.1", 1.0 + RUNNING_STALE, 0) == ALLOWED
    assert limiter.attempt("192.0.2.1", 1.0 + RUNNING_STALE, 0) == WAIT  # 2 failures + 3 running


def test_auth_limit_counts_an_ipv6_client_by_its_64(sb):
    """Addresses in one /64 share a count (whoever holds one holds them all); the next
    /64 and IPv4 addresses count on their own."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    for n in range(1, 6):
        fail(limiter, f"2001:db8:0:7::{n:x}", 1.0)
    assert limiter.attempt("2001:db8:0:7:ffff:ffff:ffff:ffff", 2.0, 0) == REFUSED
    assert limiter.attempt("2001:DB8:0:7::abcd%eth0", 2.0, 0) == REFUSED
    assert limiter.attempt("2001:db8:0:8::1", 2.0, 0) == ALLOWED
    for n in range(1, 5):
        fail(limiter, f"192.0.2.{n}", 5.0)  # four IPv4 neighbours: four counts of one
    fail(limiter, "::ffff:192.0.2.1", 5.0)  # the same client as 192.0.2.1: its second
    assert limiter.attempt("192.0.2.5", 5.0, 0) == ALLOWED
    assert limiter.attempt("192.0.2.1", 5.0, 0) == ALLOWED  # two failures of five


def test_auth_limit_holds_across_processes(sb):
    limiter = AuthLimiter(sb, max_failures=5, window=300.0)
    pids = [start(sb, lambda: 10 + limiter.attempt("192.0.2.9", 1.0, 0)) for _ in range(12)]
    assert sorted(wait(pid) for pid in pids) == [10 + ALLOWED] * 5 + [10 + WAIT] * 7


def test_password_checks_at_once_are_capped_across_addresses(sb):
    """However many addresses ask, no more than ``checks`` run at once: each costs a
    core for 60 ms and 16 MiB.  One more waits (SATURATED), and goes once one ends."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0, checks=2)
    assert limiter.attempt("192.0.2.1", 1.0, 0) == ALLOWED
    assert limiter.attempt("198.51.100.1", 1.0, 1) == ALLOWED
    assert limiter.checks_running(1.0) == 2
    assert limiter.attempt("203.0.113.1", 1.0, 2) == SATURATED
    assert limiter.attempt("2001:db8::1", 1.0, 3) == SATURATED
    assert limiter.place(2, 1.0) == (0, 0) and limiter.place(3, 1.0) == (0, 1)  # read without the lock
    limiter.finished("192.0.2.1", 1.1, ok=False, slot=0)
    assert limiter.checks_running(1.1) == 1 and limiter.place(2, 1.1) == (1, 0)
    assert limiter.attempt("203.0.113.1", 1.2, 2) == ALLOWED
    assert limiter.attempt("2001:db8::1", 1.2, 3) == SATURATED
    # A SATURATED attempt took nothing: the address's own limit is untouched by it.
    limiter.finished("198.51.100.1", 1.3, ok=True, slot=1)
    limiter.finished("203.0.113.1", 1.3, ok=True, slot=2)
    assert [limiter.attempt("2001:db8::1", 1.4, n) for n in range(3, 8)] == [ALLOWED] * 2 + [SATURATED] * 3


def test_password_checks_go_to_waiting_sessions_in_the_order_they_began_to_wait(sb):
    """A check that ends goes to the session that has waited longest, not to whichever
    looks first: guessers polling at once crowded a legitimate client out."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0, checks=1)
    assert limiter.attempt("192.0.2.1", 1.0, 0) == ALLOWED
    for n, slot in enumerate((1, 2, 3)):
        assert limiter.attempt(f"198.51.100.{slot}", 1.1 + n / 10, slot) == SATURATED
    limiter.finished("192.0.2.1", 1.5, ok=True, slot=0)
    assert [limiter.place(slot, 1.5) for slot in (1, 2, 3)] == [(1, 0), (1, 1), (1, 2)]
    assert limiter.attempt("198.51.100.3", 1.5, 3) == SATURATED  # two before it
    assert limiter.attempt("203.0.113.9", 1.5, 4) == SATURATED  # one that just came: behind them all
    assert limiter.place(4, 1.5) == (1, 3)
    assert limiter.attempt("198.51.100.1", 1.5, 1) == ALLOWED
    limiter.finished("198.51.100.1", 1.6, ok=True, slot=1)
    assert limiter.attempt("198.51.100.2", 1.6, 2) == ALLOWED


def test_a_session_that_leaves_the_queue_or_stops_in_it_holds_no_one_up(sb):
    """One that gives up (its 454, a quit) or whose worker dies leaves the queue; one
    stopped in it (SIGSTOP) is passed over once it has not looked at its place for
    LOOK_STALE: well within the 5 s the others wait (it held them all up for 8 s)."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0, checks=1)
    assert limiter.attempt("192.0.2.1", 1.0, 0) == ALLOWED
    for slot in (1, 2, 3):
        assert limiter.attempt(f"198.51.100.{slot}", 1.0 + slot / 10, slot) == SATURATED
    limiter.finished("192.0.2.1", 1.5, ok=True, slot=0)
    limiter.waiting(1, False)  # gave up
    limiter.worker_gone(2)  # died
    assert limiter.place(3, 1.5) == (1, 0)
    assert limiter.attempt("198.51.100.3", 1.5, 3) == ALLOWED
    limiter.finished("198.51.100.3", 1.6, ok=True, slot=3)
    assert limiter.attempt("192.0.2.1", 2.0, 0) == ALLOWED
    assert limiter.attempt("198.51.100.5", 2.1, 5) == SATURATED  # then stopped there
    limiter.finished("192.0.2.1", 2.2, ok=True, slot=0)
    assert limiter.attempt("198.51.100.6", 2.2, 6) == SATURATED
    assert limiter.place(5, 2.9) == (1, 0)  # still looking: still first
    assert limiter.attempt("198.51.100.6", 2.8 + LOOK_STALE, 6) == SATURATED
    assert limiter.attempt("198.51.100.6", 2.9 + LOOK_STALE, 6) == ALLOWED  # then it stopped


def test_a_check_stuck_past_running_stale_is_free_to_the_queue_front(sb):
    """What a waiter reads without the lock leaves a stale check out, as the lock's
    count does: else the front waited for its next look under the lock, 0.5 s a check."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0, checks=1)
    assert limiter.attempt("192.0.2.1", 1.0, 0) == ALLOWED  # then its worker stops
    assert limiter.attempt("198.51.100.1", 1.1, 1) == SATURATED
    assert limiter.place(1, 1.0 + RUNNING_STALE - 0.1) == (0, 0)
    assert limiter.place(1, 1.0 + RUNNING_STALE) == (1, 0)
    assert limiter.attempt("198.51.100.1", 1.0 + RUNNING_STALE, 1) == ALLOWED


def test_password_checks_at_once_a_refusal_and_the_address_limit_come_first(sb):
    """An address over its failures is told so (421) even while the server is at its
    checks; one whose running checks fill its limit waits for its own (BUSY)."""
    limiter = AuthLimiter(sb, max_failures=2, window=300.0, checks=1)
    fail(limiter, "192.0.2.1", 1.0, 2)
    fail(limiter, "192.0.2.3", 1.0, 1)
    assert limiter.attempt("192.0.2.3", 1.0, 0) == ALLOWED  # the server's one check
    assert limiter.attempt("192.0.2.1", 1.0, 1) == REFUSED
    assert limiter.attempt("192.0.2.3", 1.0, 1) == WAIT  # one failure and one running: its limit
    assert limiter.attempt("192.0.2.4", 1.0, 1) == SATURATED


def test_a_dead_workers_password_check_ends_with_its_repair_or_once_stale(sb):
    """A worker killed in a check never calls ``finished``: the master's repair of its
    slot ends the check (``worker_gone``), and, should that not come, RUNNING_STALE."""
    limiter = AuthLimiter(sb, max_failures=5, window=300.0, checks=1)
    assert limiter.attempt("192.0.2.1", 1.0, 0) == ALLOWED
    assert limiter.attempt("192.0.2.2", 2.0, 1) == SATURATED
    limiter.worker_gone(0)
    assert limiter.checks_running(2.0) == 0
    assert limiter.attempt("192.0.2.2", 2.0, 1) == ALLOWED
    assert limiter.attempt("192.0.2.3", 2.0 + RUNNING_STALE - 0.1, 2) == SATURATED
    assert limiter.checks_running(2.0 + RUNNING_STALE) == 0
    assert limiter.attempt("192.0.2.3", 2.0 + RUNNING_STALE, 2) == ALLOWED


def test_password_checks_at_once_default_to_the_cpus_this_process_may_use(sb):
    assert AuthLimiter(sb).checks == cpu_count() == len(os.sched_getaffinity(0))
    assert AuthLimiter(sb, checks=0).checks == cpu_count()
    assert AuthLimiter(sb, checks=7).checks == 7


def test_password_checks_at_once_hold_across_processes():
    """Twelve workers, twelve addresses, at the same moment: three checks run."""
    board = Scoreboard.create(12, ip_buckets=64)
    try:
        limiter = AuthLimiter(board, max_failures=5, window=300.0, checks=3)
        pids = [start(board, lambda n=n: 10 + limiter.attempt(f"192.0.2.{n + 1}", 1.0, n)) for n in range(12)]
        assert sorted(wait(pid) for pid in pids) == [10 + ALLOWED] * 3 + [10 + SATURATED] * 9
        assert limiter.checks_running(1.0) == 3
    finally:
        board.close()


def _blocked_of_eight_thousand(board) -> int:
    """Eight thousand addresses (a /19), each failing five times in one window: how
    many of them a sixth try finds blocked."""
    limiter = AuthLimiter(board, max_failures=5, window=300.0)
    ips = [f"10.0.{n >> 8}.{n & 255}" for n in range(8000)]
    for t in range(1, 6):
        for ip in ips:
            assert limiter.attempt(ip, float(t), 0) == ALLOWED
            limiter.finished(ip, float(t), ok=False, slot=0)
    return sum(limiter.attempt(ip, 6.0, 0) == REFUSED for ip in ips)


def test_auth_limit_holds_for_thousands_of_addresses_failing_at_once(sb):
    """Every one of eight thousand addresses failing at once stays blocked.  With 1,024
    entries, nearly all of them pushed each other out and were checked again."""
    assert _blocked_of_eight_thousand(sb) == 8000


def test_auth_limit_holds_thousands_of_addresses_under_a_crowding_hash_key(sb):
    """As above, under a hash key (drawn anew at every start) that crowds nine of these
    addresses into one window of eight buckets: a probe of 8 let four of them go, about
    one start in 350."""
    sb._hash_key = bytes.fromhex("b1f9566458a34ec16d7bb88d7c67d45d")
    assert _blocked_of_eight_thousand(sb) == 8000


def test_auth_limit_finds_a_blocked_address_behind_an_expired_bucket(sb):
    """Two addresses whose probe chains start at the same bucket: when the first one's
    window ends, the second, blocked, must still be found further down the chain."""
    limiter = AuthLimiter(sb, buckets=64, max_failures=5, window=300.0)
    first, second = addresses_sharing_a_start(sb, 64)
    fail(limiter, first, 0.0)
    fail(limiter, second, 200.0, 5)
    assert limiter.attempt(second, 301.0, 0) == REFUSED  # first's bucket expired; second is still blocked
    assert limiter.attempt(second, 500.1, 0) == ALLOWED


def test_a_lock_dir_in_use_is_never_swept_whatever_its_pid_says(tmp_path, monkeypatch):
    """A master in another PID namespace sharing /tmp (a container) has a pid this one
    cannot see: its lock directory is told in use by the flock on its alive file, held
    by its master and workers, not by the pid in its name."""
    import fcntl
    import subprocess
    import tempfile
    from forksmtp import scoreboard

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    foreign = tmp_path / f"{scoreboard._LOCK_PREFIX}4190000-abc"  # no such pid here
    foreign.mkdir()
    fd = scoreboard._hold_alive(str(foreign))  # as its master holds it
    # ... and a worker of it, forked with the lock, outlives that master.
    child = subprocess.Popen(["sleep", "30"], pass_fds=(fd,))
    os.close(fd)
    try:
        scoreboard._sweep_stale_lock_dirs()
        assert foreign.exists()
    finally:
        child.kill()
        child.wait()
    scoreboard._sweep_stale_lock_dirs()  # the last holder gone: stale
    assert not foreign.exists()
    # Without the file (made by an older version, or a master between its two steps):
    # the pid decides, once the directory is a minute old.
    young = tmp_path / f"{scoreboard._LOCK_PREFIX}4190001-abc"
    young.mkdir()
    scoreboard._sweep_stale_lock_dirs()
    assert young.exists()
    os.utime(young, (time.time() - 120, time.time() - 120))
    scoreboard._sweep_stale_lock_dirs()
    assert not young.exists()
    # A live master of this namespace keeps its directory, of course.
    sb = Scoreboard.create(4)
    try:
        scoreboard._sweep_stale_lock_dirs()
        assert os.path.exists(sb.lock_path)
        probe = os.open(os.path.join(os.path.dirname(sb.lock_path), "alive"), os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        sb.close()


def _colliding_ips(sb: Scoreboard, n: int, buckets: int) -> list[str]:
    """n addresses whose probe chains start at the same bucket."""
    by_start: dict[int, list[str]] = {}
    for i in range(1, 255):
        ip = f"192.0.2.{i}"
        group = by_start.setdefault(sb.bucket_of(ip_key(ip), buckets), [])
        group.append(ip)
        if len(group) == n:
            return group
    raise AssertionError("no collision")


def test_a_released_bucket_keeps_the_probe_chain_behind_it():
    """A and B start at the same bucket, B one further on.  When A leaves, its bucket must
    stay a tombstone: emptied, it would cut the chain, B's count would not be found and
    B's next connection would pass max_connections_per_ip."""
    sb = Scoreboard.create(4, ip_buckets=8)
    try:
        a, b = _colliding_ips(sb, 2, 8)
        for i in range(3):
            sb.claim_slot(i, 0, 1, now=0.0)
        assert sb.admit(0, a, 0, 1) is None
        assert sb.admit(1, b, 0, 1) is None
        sb.release(0)
        assert sb.admit(2, b, 0, 1) == "max_connections_per_ip"
    finally:
        sb.close()


def test_a_rebuild_counts_only_slots_that_hold_a_session():
    """A worker that released its session keeps its key; a rebuild (after any worker
    exits) must not count it, or idle workers would eat into max_connections."""
    sb = Scoreboard.create(4, ip_buckets=64)
    try:
        for i in range(3):
            sb.claim_slot(i, 0, 1, now=0.0)
        assert sb.admit(0, "10.0.0.1", 0, 0) is None
        sb.release(0)
        assert sb.admit(1, "10.0.0.2", 0, 0) is None
        sb.repair(2)  # a third worker exits: the table is rebuilt
        assert (sb.active(), sb.ip_counts()) == (1, {"10.0.0.2": 1})
    finally:
        sb.close()


def test_a_window_full_of_stale_entries_is_rebuilt_before_admission_fails_open():
    """Entries left by admissions a SIGKILL cut short (live, count 0, no owner) fill the
    probe window: admission rebuilds the table and still applies the per-IP limit."""
    sb = Scoreboard.create(4, ip_buckets=4)
    try:
        with sb.locked():
            for i in range(4):
                sb._probe(ip_key(f"198.51.100.{i}"))
        for i in range(2):
            sb.claim_slot(i, 0, 1, now=0.0)
        assert sb.admit(0, "10.0.0.1", 0, 1) is None
        assert sb.admit(1, "10.0.0.1", 0, 1) == "max_connections_per_ip"
    finally:
        sb.close()


def test_addresses_chosen_to_collide_cannot_lift_the_per_ip_limit():
    """An attacker who knows the table's hash picks 32 addresses whose probe chains start
    where a target's does, opens a session from each, and the target's window is full:
    with CRC-32 its admissions then failed open and max_connections_per_ip no longer
    held.  The hash is keyed with a secret drawn at start, so such a crowd scatters."""
    target = "192.0.2.77"
    start = zlib.crc32(ip_key(target)) % 4096
    crowd: list[str] = []
    for i in range(1 << 22):
        ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        if zlib.crc32(ip_key(ip)) % 4096 == start:
            crowd.append(ip)
            if len(crowd) == 32:
                break
    sb = Scoreboard.create(40)
    try:
        for slot, ip in enumerate(crowd):
            sb.claim_slot(slot, 0, 1, now=0.0)
            assert sb.admit(slot, ip, 0, 2) is None
        results = []
        for slot in range(32, 36):
            sb.claim_slot(slot, 0, 1, now=0.0)
            results.append(sb.admit(slot, target, 0, 2))
        assert results == [None, None, "max_connections_per_ip", "max_connections_per_ip"]
    finally:
        sb.close()


def test_each_server_draws_its_own_hash_key():
    one, two = Scoreboard.create(2), Scoreboard.create(2)
    try:
        keys = [ip_key(f"198.51.100.{i}") for i in range(1, 65)]
        assert [one.bucket_of(k, 4096) for k in keys] != [two.bucket_of(k, 4096) for k in keys]
    finally:
        one.close()
        two.close()


def test_an_idle_worker_beats_without_moving_its_idle_clock():
    """The beat says the worker's loop turns; last_activity stays the moment it became
    idle, which the pool's max_idle measures."""
    sb = Scoreboard.create(2)
    try:
        sb.claim_slot(0, 0, 1, now=1.0)
        assert sb.snapshot().slots[0].idle_beat == 0
        sb.set_idle(0, 100.5)
        sb.beat(0, 161.9)
        slot = sb.snapshot().slots[0]
        assert (slot.idle_beat, slot.last_activity, slot.state_name) == (161, 100.5, "idle")
    finally:
        sb.close()


def test_workers_count_themselves_idle_and_a_repair_recounts(sb):
    """The count a worker reads to call for more workers (the pool ran dry): a session
    takes its worker off, its end puts it back unless the worker stops accepting, a
    refusal changes nothing, and a worker that died counted idle stops counting once
    its slot is repaired, whatever the count said."""
    for i in range(3):
        sb.claim_slot(i, 0, 1, now=0.0)
        sb.set_available(i, True)
    sb.set_available(0, True)  # no second count
    assert sb.idle_workers() == 3
    assert sb.admit(0, "198.51.100.7", 2, 10) is None
    assert sb.admit(1, "198.51.100.8", 2, 10) is None
    assert sb.idle_workers() == 1
    assert sb.admit(2, "198.51.100.9", 2, 10) == "max_connections"
    assert sb.idle_workers() == 1  # it refused and stays free
    sb.release(2)
    sb.release(0)
    assert sb.idle_workers() == 2
    sb.release(1, available=False)  # that was its last session
    assert sb.idle_workers() == 2
    sb.set_available(2, False)  # it stopped accepting
    assert sb.idle_workers() == 1

    sb.claim_slot(3, 0, 1, now=0.0)
    killed_after(sb, lambda: (sb.set_pid(3, os.getpid()), sb.set_available(3, True)))
    assert sb.idle_workers() == 2
    struct.pack_into("<q", sb._mm, H_IDLE, 9)  # as if a worker died between mark and count
    assert sb.repair(3) is True
    assert sb.idle_workers() == 1  # slot 0 alone is marked
