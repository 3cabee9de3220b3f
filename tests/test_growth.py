"""growth.py: the CPU gauge and the listen-queue wait that decide whether a busy pool grows."""
from __future__ import annotations

import socket

from forksmtp import growth
from forksmtp.growth import WINDOW, Backlog, CpuGauge, cpu_times, queued


class Ticks:
    """A /proc/stat stand-in: idle and total ticks that a test advances."""

    def __init__(self) -> None:
        self.idle, self.total = 1000, 5000

    def run(self, busy: int, idle: int) -> None:
        self.idle += idle
        self.total += busy + idle

    def __call__(self):
        return self.idle, self.total


def test_cpu_times_reads_idle_and_iowait_as_idle(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 30 2 3 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert cpu_times(str(stat)) == (1030, 100 + 5 + 50 + 1000 + 30 + 2 + 3 + 7)
    assert cpu_times("/proc/stat") is not None  # the real one parses too


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


def test_backlog_measures_the_wait_of_the_oldest_client_counted():
    b = Backlog()
    assert b.waited(0.0, 0, 100) == 0.0
    assert b.waited(1.0, 3, 100) == 0.0  # three counted now: the mark
    assert b.waited(1.05, 3, 101) == 1.05 - 1.0  # one taken: two of the three still wait
    assert b.waited(1.1, 5, 102) == 1.1 - 1.0  # two taken, more came: the third still waits
    # The third taken: all counted at the mark are served; those waiting now came later.
    assert b.waited(1.2, 2, 103) == 0.0
    assert b.waited(1.3, 2, 103) == 1.3 - 1.2
    assert b.waited(1.4, 0, 105) == 0.0  # the queues empty
    assert b.waited(1.5, 1, 105) == 0.0

