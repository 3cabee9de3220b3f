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


def test_cpu_times_counts_idle_iowait_and_nice_as_spare(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 1000 30 2 3 7 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert cpu_times(str(stat)) == (5 + 1000 + 30, 100 + 5 + 50 + 1000 + 30 + 2 + 3 + 7)
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
