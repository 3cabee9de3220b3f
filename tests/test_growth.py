"""growth.py: the CPU gauge and the listen-queue wait that decide whether a busy pool grows."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from forksmtp import growth
from forksmtp.growth import (PACE_WINDOW, WAIT_LIMIT, WINDOW, Backlog, CgroupQuota, CpuGauge, Pace,
                             cgroup_mounts, cgroup_quotas, cpu_times, own_cgroups, queued)


class Ticks:
    """A /proc/stat stand-in: idle and total ticks that a test advances."""

    def __init__(self) -> None:
        self.idle, self.total = 1000, 5000

    def run(self, busy: int, idle: int) -> None:
        self.idle += idle
        self.total += busy + idle

    def __call__(self):
        return self.idle, self.total


def test_cpu_times_counts_idle_iowait_and_nice_as_spare(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 30 2 3 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert cpu_times(str(stat)) == (5 + 1000 + 30, 100 + 5 + 50 + 1000 + 30 + 2 + 3 + 7)
    assert cpu_times("/proc/stat") is not None  # the real one parses too


def test_cpu_times_of_some_cpus_sums_their_lines_alone(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 30 2 3 7 0 0\n"
                    "cpu0 10 1 5 100 3 0 0 1 0 0\n"
                    "cpu1 20 2 10 200 6 1 1 2 0 0\n"
                    "cpu2 30 0 15 300 9 0 1 1 0 0\n"
                    "intr 12345 0 0\nctxt 999\ncpu9 this line is not read\n")
    every = (5 + 1000 + 30, 100 + 5 + 50 + 1000 + 30 + 2 + 3 + 7)
    assert cpu_times(str(stat), frozenset({0, 2})) == (1 + 100 + 3 + 300 + 9, 120 + 356)
    assert cpu_times(str(stat), frozenset({1})) == (2 + 200 + 6, 242)
    assert cpu_times(str(stat), frozenset({0, 1, 2})) == every  # all of them: the sum line
    # CPUs the file does not list: a view of its own (LXCFS numbers a container's CPUs
    # from 0), whose sum line is the container's.
    assert cpu_times(str(stat), frozenset({5, 6})) == every
    assert cpu_times(str(stat), frozenset({2, 5})) == every
    assert cpu_times("/proc/stat", frozenset({min(os.sched_getaffinity(0))})) is not None


def test_allowed_cpus_is_the_affinity():
    """Run in a child, whose affinity the test may narrow (as a cpuset or taskset does)."""
    mine = sorted(os.sched_getaffinity(0))
    code = ("import os; from forksmtp.growth import allowed_cpus; print(sorted(allowed_cpus()));"
            f"os.sched_setaffinity(0, {{{mine[-1]}}}); print(sorted(allowed_cpus()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout.split("\n")
    assert out[:2] == [str(mine), str([mine[-1]])]


def cgroup_files(tmp_path, mountinfo: str, cgroup: str):
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text(cgroup)
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


def test_cgroup_mounts_and_own_cgroups_are_read_as_the_kernel_writes_them(tmp_path):
    proc_cgroup, mountinfo = cgroup_files(
        tmp_path,
        "24 18 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
        "33 31 0:30 /docker/abc /sys/fs/cgroup/cpu\\040acct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 / /proc rw - proc proc rw\n",
        "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/x\n0::/system.slice/mx.service\n")
    mounts = cgroup_mounts(mountinfo)
    assert [(m.fstype, m.root, m.point) for m in mounts] == [
        ("cgroup2", "/", "/sys/fs/cgroup"), ("cgroup", "/docker/abc", "/sys/fs/cgroup/cpu acct")]
    assert {"cpu", "cpuacct"} <= mounts[1].options
    assert own_cgroups(proc_cgroup) == {"cpu": "/docker/abc", "cpuacct": "/docker/abc",
                                        "name=systemd": "/x", "": "/system.slice/mx.service"}
    assert cgroup_mounts(str(tmp_path / "absent")) == [] and own_cgroups(str(tmp_path / "absent")) == {}


def quotas_for(tmp_path, mountinfo: str, cgroup: str) -> list[tuple[str, str, bool]]:
    return [(q.cpu_dir, q.usage_dir, q.v2)
            for q in cgroup_quotas(*cgroup_files(tmp_path, mountinfo, cgroup))]


def test_cgroup_v2_quotas_are_looked_for_from_the_own_cgroup_up(tmp_path):
    root = tmp_path / "cg"
    unit = root / "system.slice" / "mx.service"
    unit.mkdir(parents=True)
    # Every level, with cpu.max or not yet: a quota may be set while the server runs.
    assert quotas_for(tmp_path, f"24 18 0:22 / {root} rw - cgroup2 cgroup2 rw\n",
                      "0::/system.slice/mx.service\n") == [
        (str(unit), str(unit), True), (str(root / "system.slice"),) * 2 + (True,),
        (str(root), str(root), True)]


@pytest.mark.parametrize("mount_root, path, levels", [
    ("/", "/", [""]),                        # a container's own cgroup namespace
    ("/../..", "/", [""]),                   # the mount shows an ancestor of its root
    ("/../..", "/sub", [""]),                # ... with the levels between unknown
    ("/kubepods/pod1", "/kubepods/pod1/c1", ["c1", ""]),
    ("/x", "/", []),                         # the mount shows another branch
    ("/kubepods/pod1", "/kubepods/pod2/c1", []),
    ("/../x", "/", []),
    ("/", "/../x", []),                      # outside its own namespace's view
    ("/", "", []),                           # what no kernel writes
    ("/", "relative", []),
])
def test_the_levels_a_mount_shows(tmp_path, mount_root, path, levels):
    root = tmp_path / "cg"
    assert [d for d, _, _ in quotas_for(tmp_path, f"24 18 0:22 {mount_root} {root} rw - cgroup2 cgroup2 rw\n",
                                        f"0::{path}\n")] == [str(root / lv) if lv else str(root) for lv in levels]


def test_a_container_reads_the_quota_of_its_own_cgroup(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("150000 100000\n")
    quotas = cgroup_quotas(*cgroup_files(tmp_path, f"24 18 0:22 / {root} rw - cgroup2 cgroup2 rw\n", "0::/\n"))
    assert [q.cpu_dir for q in quotas] == [str(root)] and quotas[0].cpus() == 1.5


def v1_tree(tmp_path, root_is_the_hierarchys: bool):
    cpu, acct = tmp_path / "cpu", tmp_path / "cpuacct"
    for d in (cpu / "mx", acct / "mx"):
        d.mkdir(parents=True)
    if root_is_the_hierarchys:  # only a v1 hierarchy's own root has release_agent
        (cpu / "release_agent").write_text("\n")
    return cpu, acct, (f"32 31 0:29 / {cpu} rw - cgroup cgroup rw,cpu\n"
                       f"33 31 0:30 / {acct} rw - cgroup cgroup rw,cpuacct\n"
                       f"41 18 0:22 / {tmp_path / 'unified'} rw - cgroup2 cgroup2 rw\n")


def test_cgroup_v1_quotas_need_cpu_and_cpuacct_at_the_same_path(tmp_path):
    cpu, acct, mounts = v1_tree(tmp_path, root_is_the_hierarchys=True)
    # v1 holds the cpu controller, so the cgroup2 mount beside it is not read; nor is
    # the hierarchy's root, which takes no quota.
    assert quotas_for(tmp_path, mounts, "2:cpuacct:/mx\n1:cpu:/mx\n0::/\n") == [
        (str(cpu / "mx"), str(acct / "mx"), False)]
    assert quotas_for(tmp_path, mounts, "2:cpuacct:/other\n1:cpu:/mx\n") == []  # use unreadable


def test_a_v1_container_in_its_own_cgroup_namespace_reads_its_quota(tmp_path):
    cpu, acct, mounts = v1_tree(tmp_path, root_is_the_hierarchys=False)
    assert quotas_for(tmp_path, mounts, "2:cpuacct:/\n1:cpu:/\n0::/\n") == [(str(cpu), str(acct), False)]


class FakeCgroup:
    """A cgroup's files, v1 or v2, and a clock, advanced by the test."""

    def __init__(self, path, v2: bool, cpus: float | None) -> None:
        self.path, self.v2, self.now = path, v2, 100.0
        self.used = self.throttled = 0
        self.set_quota(cpus)
        self.write()

    def set_quota(self, cpus: float | None) -> None:
        if self.v2:
            (self.path / "cpu.max").write_text("max 100000\n" if cpus is None else f"{int(cpus * 100000)} 100000\n")
        else:
            (self.path / "cpu.cfs_period_us").write_text("100000\n")
            (self.path / "cpu.cfs_quota_us").write_text("-1\n" if cpus is None else f"{int(cpus * 100000)}\n")

    def run(self, seconds: float, used_cpus: float, throttled: float = 0.0) -> None:
        self.now += seconds
        self.used += int(seconds * used_cpus * 1e6)
        self.throttled += int(throttled * 1e6)
        self.write()

    def write(self) -> None:
        if self.v2:
            (self.path / "cpu.stat").write_text(
                f"usage_usec {self.used}\nuser_usec 1\nsystem_usec 2\n"
                f"nr_periods 9\nnr_throttled 1\nthrottled_usec {self.throttled}\n")
        else:
            (self.path / "cpu.stat").write_text(f"nr_periods 9\nnr_throttled 1\nthrottled_time {self.throttled * 1000}\n")
            (self.path / "cpuacct.usage").write_text(f"{self.used * 1000}\n")

    def quota(self) -> CgroupQuota:
        return CgroupQuota(str(self.path), str(self.path), v2=self.v2, clock=lambda: self.now)


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_a_quota_counts_what_it_allowed_and_what_was_used(tmp_path, v2):
    group = FakeCgroup(tmp_path, v2, cpus=0.5)
    quota = group.quota()
    assert quota.cpus() == 0.5
    assert quota() == (0, 0, 0, 1)
    group.run(1.0, used_cpus=0.2, throttled=0.03)
    assert quota() == (300_000, 500_000, 30_000, 1)  # 0.5 s allowed, 0.2 used, 0.03 held back
    group.set_quota(None)
    assert quota() is None  # no quota: no limit, and the count starts again
    group.set_quota(2.0)
    group.run(1.0, used_cpus=1.0)
    assert quota() == (0, group.used, 30_000, 2)  # in a new epoch
    group.run(0.5, used_cpus=1.0)
    assert quota() == (500_000, group.used + 500_000, 30_000, 2)


def test_a_line_of_another_form_in_cpu_stat_leaves_the_others_read(tmp_path):
    group = FakeCgroup(tmp_path, True, cpus=1.0)
    stat = tmp_path / "cpu.stat"
    stat.write_text(stat.read_text() + "some_future_key 1.5 kB\n")
    assert group.quota()() == (0, 0, 0, 1)


def test_a_quota_whose_files_cannot_be_read_gives_nothing(tmp_path):
    quota = CgroupQuota(str(tmp_path / "gone"), str(tmp_path / "gone"), v2=True)
    assert quota.cpus() is None and quota() is None
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # a quota, but no cpu.stat
    assert CgroupQuota(str(tmp_path), str(tmp_path), v2=True)() is None


def quota_gauge(tmp_path, cpus: float = 1.0):
    group = FakeCgroup(tmp_path, v2=True, cpus=cpus)
    machine = Ticks()
    return group, machine, CpuGauge(machine, limits=(group.quota(),))


def run_both(group, machine, seconds: float, used_cpus: float, machine_idle: int,
             throttled: float = 0.0) -> None:
    group.run(seconds, used_cpus, throttled)
    machine.run(busy=100 - machine_idle, idle=machine_idle)


@pytest.mark.parametrize("used, throttled, machine_idle, spare", [
    (0.5, 0.0, 60, True),    # half the quota unused, the machine idle: spare
    (0.95, 0.0, 60, False),  # the quota nearly spent: none, however idle the machine
    (0.5, 0.01, 60, False),  # held back at all in the window: none
    (0.5, 0.0, 5, False),    # the quota has time but the CPUs have none
    (1.3, 0.0, 60, False),   # spent beyond the window's allowance (a period's quota early)
])
def test_the_gauge_needs_both_the_cpus_and_every_quota_to_have_time(
        tmp_path, used, throttled, machine_idle, spare):
    group, machine, gauge = quota_gauge(tmp_path, cpus=1.0)
    assert gauge.has_spare(group.now) is None
    run_both(group, machine, WINDOW, used, machine_idle, throttled)
    assert gauge.has_spare(group.now, since=group.now - WINDOW) is spare


def test_a_quota_counted_afresh_within_the_window_is_not_judged(tmp_path):
    """A quota that went and came back starts a new count: a window reaching over both
    counts compares nothing, and fails open."""
    group, machine, gauge = quota_gauge(tmp_path)
    gauge.has_spare(group.now)
    run_both(group, machine, WINDOW / 2, used_cpus=1.0, machine_idle=50, throttled=0.05)
    group.set_quota(None)
    gauge.has_spare(group.now)
    group.set_quota(1.0)
    run_both(group, machine, WINDOW / 2, used_cpus=1.0, machine_idle=50, throttled=0.05)
    assert gauge.has_spare(group.now) is True
    run_both(group, machine, WINDOW, used_cpus=1.0, machine_idle=50, throttled=0.05)
    assert gauge.has_spare(group.now) is False  # a whole window in the new count


def test_an_unreadable_machine_leaves_the_judgement_to_the_quota(tmp_path):
    group = FakeCgroup(tmp_path, v2=True, cpus=1.0)
    gauge = CpuGauge(lambda: None, limits=(group.quota(),))
    assert gauge.has_spare(group.now) is None  # judged: not the old "unreadable: spare"
    group.run(WINDOW, used_cpus=1.0, throttled=0.01)
    assert gauge.has_spare(group.now) is False
    group.run(WINDOW, used_cpus=0.2)
    assert gauge.has_spare(group.now) is True


def test_what_narrows_the_cpus_is_described_for_the_log(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 1 1 1 1\n" + "".join(f"cpu{i} 1 1 1 1 1\n" for i in range(8)) + "intr 1\n")
    assert growth.describe([], frozenset(range(8)), str(stat)) is None  # every CPU: nothing to say
    assert growth.describe([], None, str(stat)) is None
    assert growth.describe([], frozenset({0, 1, 2, 3, 6}), str(stat)) == (
        "spares are judged by CPUs 0-3,6 of 8 (the master's affinity)")
    assert growth.describe([], frozenset({12}), str(stat)) is None  # a view of its own (LXCFS)
    group = FakeCgroup(tmp_path, v2=True, cpus=1.5)
    assert growth.describe([group.quota()], frozenset({5}), str(stat)) == (
        f"spares are judged by CPU 5 of 8 (the master's affinity) and a CPU quota of 1.5 CPUs at {tmp_path}")
    group.set_quota(None)
    assert growth.describe([group.quota()], None, str(stat)) is None  # no quota set now


def test_an_unreadable_quota_leaves_the_judgement_to_the_cpus(tmp_path):
    group, machine, gauge = quota_gauge(tmp_path)
    gauge.has_spare(group.now)
    run_both(group, machine, WINDOW, used_cpus=1.0, machine_idle=50)
    (tmp_path / "cpu.stat").unlink()  # the quota spent, but that cannot be read
    assert gauge.has_spare(group.now) is True
    machine.run(busy=99, idle=1)
    group.now += WINDOW
    assert gauge.has_spare(group.now) is False


def test_cpu_times_is_none_where_the_file_is_missing_or_not_understood(tmp_path):
    assert cpu_times(str(tmp_path / "absent")) is None
    garbled = tmp_path / "garbled"
    garbled.write_text("cpu  a b c d e\n")
    assert cpu_times(str(garbled)) is None
    short = tmp_path / "short"
    short.write_text("cpu  1 2 3\n")
    assert cpu_times(str(short)) is None


def test_the_gauge_judges_a_whole_window_by_its_idle_share():
    ticks = Ticks()
    gauge = CpuGauge(ticks)
    assert gauge.has_spare(0.0) is None  # one look: no window yet
    ticks.run(busy=46, idle=4)
    assert gauge.has_spare(WINDOW / 2) is None  # half a window
    ticks.run(busy=46, idle=4)
    assert gauge.has_spare(WINDOW) is False  # 8 idle of 100
    ticks.run(busy=40, idle=10)
    ticks.run(busy=40, idle=10)
    assert gauge.has_spare(2 * WINDOW) is True  # the last window: 20 idle of 100


def test_the_share_edge_is_spare_share():
    ticks = Ticks()
    gauge = CpuGauge(ticks)
    gauge.has_spare(0.0)
    ticks.run(busy=90, idle=10)
    assert gauge.has_spare(WINDOW) is (10 >= growth.SPARE_SHARE * 100)
    ticks.run(busy=91, idle=9)
    assert gauge.has_spare(2 * WINDOW) is False


def test_the_gauge_judges_only_looks_since_the_pool_ran_dry():
    """Idle CPU time from before every worker was busy says nothing of what a worker more
    would get: the window must lie wholly after ``since``."""
    ticks = Ticks()
    gauge = CpuGauge(ticks)
    for i in range(5):
        ticks.run(busy=0, idle=50)  # an idle machine, the pool not dry
        gauge.has_spare(i * 0.05)
    dry_at = 0.25
    ticks.run(busy=50, idle=0)
    assert gauge.has_spare(dry_at, since=dry_at) is None
    for t in (0.3, 0.35, 0.4, 0.45):
        ticks.run(busy=50, idle=0)
        assert gauge.has_spare(t, since=dry_at) is None  # the window would reach before dry_at
    ticks.run(busy=50, idle=0)
    assert gauge.has_spare(dry_at + WINDOW, since=dry_at) is False


def test_an_unreadable_gauge_fails_open():
    gauge = CpuGauge(lambda: None)
    assert gauge.has_spare(0.0) is True
    assert gauge.has_spare(10.0, since=5.0) is True


def test_counters_that_go_back_fail_open():
    ticks = Ticks()
    gauge = CpuGauge(ticks)
    gauge.has_spare(0.0)
    ticks.idle -= 10  # a CPU taken offline takes its counts with it
    ticks.total += 5
    assert gauge.has_spare(WINDOW) is True


def test_the_share_is_the_callers():
    ticks = Ticks()
    gauge = CpuGauge(ticks)
    gauge.has_spare(0.0)
    ticks.run(busy=95, idle=5)
    assert gauge.has_spare(WINDOW, share=0.05) is True
    ticks.run(busy=95, idle=5)
    assert gauge.has_spare(2 * WINDOW, share=0.06) is False


def test_queued_counts_a_listening_sockets_accept_queue():
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        clients = [socket.create_connection(server.getsockname(), timeout=5) for _ in range(3)]
        try:
            assert queued(server) == 3
            conn, _ = server.accept()
            conn.close()
            assert queued(server) == 2
        finally:
            for c in clients:
                c.close()


def test_queued_is_none_for_a_socket_that_is_not_tcp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert queued(udp) is None


def test_backlog_measures_the_wait_of_the_oldest_client_waiting():
    b = Backlog()
    assert b.waited(0.0, 0, 100) == 0.0
    assert b.waited(1.0, 3, 100) == 0.0  # clients 101-103, first counted now
    assert b.waited(1.05, 3, 101) == 1.05 - 1.0  # 102 and 103 were there at 1.0; 104 came
    assert b.waited(1.1, 5, 102) == 1.1 - 1.0  # 103 still waits
    assert b.waited(1.2, 2, 103) == 1.2 - 1.05  # 104, first counted at 1.05
    assert b.waited(1.3, 2, 104) == 1.3 - 1.1  # 105 and 106, counted at 1.1
    assert b.waited(1.4, 0, 106) == 0.0  # the queues empty
    assert b.waited(1.5, 1, 106) == 0.0
    assert b.waited(1.6, 1, 106) == 1.6 - 1.5


def test_backlog_keeps_the_wait_of_clients_counted_after_the_first_look():
    """Clients that came between two looks are still waiting when all those of the first
    look have been taken: their wait runs from the look that first counted them, not
    from now (the count restarted there, and a stream of long sessions kept clients
    waiting 0.3-0.9 s where 0.1 s was meant)."""
    b = Backlog()
    b.waited(0.00, 5, 0)  # clients 1-5
    b.waited(0.05, 8, 2)  # 6-10 came
    b.waited(0.10, 10, 5)  # 11-15 came; 1-5 taken
    assert b.waited(0.15, 7, 8) == 0.15 - 0.05  # 9 is the oldest, counted at 0.05
    assert b.waited(0.20, 5, 10) == 0.20 - 0.10  # 11, counted at 0.10
    assert len(b.looks) <= 5  # one look per count that rose, none for clients taken


def test_backlog_bounds_its_history_by_the_clients_waiting():
    b = Backlog()
    for i in range(1000):  # a steady queue of 3, each look one more come and one taken
        b.waited(i * 0.05, 3, i)
    assert len(b.looks) <= 3


def test_pace_says_how_many_waiting_clients_the_workers_take_soon():
    """Sessions ended over about the last PACE_WINDOW seconds, scaled to WAIT_LIMIT: the
    clients waiting that the workers come free for within it."""
    p = Pace()
    assert p.taken_within() == 0  # no look yet
    p.look(0.0, 0, 1)
    assert p.taken_within() == 0  # one look: no pace yet
    for i in range(1, 21):  # 100 sessions ended every 50 ms: 2,000 a second
        p.look(i * 0.05, 100 * i, 1)
    assert p.taken_within() == round(2000 * WAIT_LIMIT)
    assert p.taken_within(0.05) == 100
    # The looks span the window and no more: the last one at or before its start is kept.
    assert p.looks[0][0] <= 1.0 - PACE_WINDOW < p.looks[1][0]


def test_pace_falls_to_nothing_once_a_stall_outlasts_its_window():
    p = Pace()
    for i in range(17):
        p.look(i / 16, 100 * i, 1)  # 1,600 a second up to 1.0
    p.look(1.25, 1600, 1)  # a stall of 0.25 s: half the window's pace
    assert p.taken_within() == round(800 * WAIT_LIMIT)
    p.look(1.25 + PACE_WINDOW, 1600, 1)  # the stall has lasted the whole window
    assert p.taken_within() == 0


def test_pace_is_scaled_to_the_workers_not_held_by_their_clients():
    """A burst of clients that hold their sessions: each worker whose session ends takes
    one of them and is held.  The pace of the short sessions before is the pace of
    workers that ran free; only the share of them still free runs at it."""
    p = Pace()
    for i in range(11):  # 2,000 sessions a second, 20 workers all running free
        p.look(i * 0.05, 100 * i, 20)
    assert p.taken_within() == 200
    p.look(0.55, 1050, 10)  # half of them now wait on clients that hold them
    # The most running free in the last 0.1 s is still all 20: one look is not a trend.
    assert p.running_now() == 20
    p.look(0.6, 1060, 10)
    p.look(0.66, 1065, 10)
    assert p.running_now() == 10
    (first, before, _) = p.looks[0]
    pace = (1065 - before) / (0.66 - first) * WAIT_LIMIT
    assert p.taken_within() == int(pace * 10 / p.running_before())
    for t in (0.7, 0.75, 0.8):  # every worker held: none comes free at any pace
        p.look(t, 1065, 0)
    assert p.running_now() == 0 and p.taken_within() == 0


def test_pace_stands_where_some_clients_are_always_slow():
    """Where three quarters of 8 workers are held by slow clients all the time, one
    look's count of those running free falls to none now and then; the most over the
    last WAIT_LIMIT keeps the pace."""
    p = Pace()
    for i in range(11):
        p.look(i * 0.05, 100 * i, 2)
    p.look(0.55, 1100, 0)  # none running free at this look alone
    assert p.running_now() == 2
    (first, before, _) = p.looks[0]
    assert p.taken_within() == int((1100 - before) / (0.55 - first) * WAIT_LIMIT)


def test_pace_stands_through_a_stall_where_no_client_holds_a_worker():
    """Workers stopped or waiting on the disk are not held by their clients: the pace
    of the window stands, so the queue the stall left is taken by them, as before."""
    p = Pace()
    for i in range(11):
        p.look(i * 0.05, 100 * i, 20)
    p.look(0.65, 1000, 20)  # 0.15 s with nothing ended: the window from 0.15 s
    assert p.taken_within() == int((1000 - 300) / 0.5 * WAIT_LIMIT)


def test_the_mean_weighs_each_look_by_the_time_it_covers():
    """With sparse looks (a tick apart while a worker was idle) the look before the
    window weighs the time up to the next, not one look in many."""
    p = Pace()
    p.look(0.0, 0, 10)
    p.look(1.0, 100, 0)
    p.look(1.05, 110, 0)
    assert p.running_before() == pytest.approx((10 * 1.0 + 0 * 0.05) / 1.05)


def test_pace_is_never_scaled_above_what_was_seen():
    """More workers running free now than over the window (it had idle ones, or held
    ones whose clients moved again) does not raise the pace past what was measured."""
    p = Pace()
    for i in range(11):
        p.look(i * 0.05, 100 * i, 5)
    p.look(0.55, 1100, 30)
    (first, before, _) = p.looks[0]
    assert p.taken_within() == int((1100 - before) / (0.55 - first) * WAIT_LIMIT)


def test_pace_after_sparse_looks_spans_the_last_look_before_the_window():
    """With a worker idle the master looks once a tick (a second): the first look of a
    dry spell measures the pace back to the one before it, not over PACE_WINDOW."""
    p = Pace()
    p.look(0.0, 0, 1)
    p.look(1.0, 500, 1)
    p.look(1.05, 500, 1)
    assert p.taken_within() == int(500 / 1.05 * WAIT_LIMIT)


def test_pace_is_nothing_when_the_count_goes_back_and_its_looks_are_bounded():
    p = Pace()
    p.look(0.0, 100, 1)
    p.look(0.1, 50, 1)  # a count that fell (it never should) gives no pace
    assert p.taken_within() == 0
    p.look(0.2, 50, 1)
    assert p.taken_within() == 0  # nothing ended: nothing soon
    for i in range(10_001):  # looks far more often than the window needs: every 0.1 ms
        p.look(1.0 + i * 1e-4, 100 + i, 1)
    assert 100 <= len(p.looks) <= 103  # about one every PACE_WINDOW / 100, the latest aside
    assert p.looks[0][0] <= 2.0 - PACE_WINDOW < p.looks[1][0]  # they span the whole window
    assert p.looks[-1] == (2.0, 10_100, 1)
    assert 0.99e4 * WAIT_LIMIT <= p.taken_within() <= 1e4 * WAIT_LIMIT  # one every 0.1 ms
