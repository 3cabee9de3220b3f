"""The shared count of new connections per client address and minute (connrate)."""
from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from forksmtp.arbiter import Arbiter
from forksmtp.connrate import RATE_WINDOW, ConnectionRate
from forksmtp.scoreboard import MASTER_LOCK_WAIT, Scoreboard
from helpers import addresses_sharing_a_start


@pytest.fixture
def board():
    b = Scoreboard.create(4, ip_buckets=16)
    yield b
    b.close()


def test_connections_count_up_within_the_window_and_start_again_after_it(board):
    rate = ConnectionRate(board)
    assert [rate.count("192.0.2.1", t) for t in (100.0, 110.0, 159.9)] == [1, 2, 3]
    # The window runs from its first connection, as anvil's: 60 s from 100.0.
    assert rate.count("192.0.2.1", 100.0 + RATE_WINDOW) == 1
    assert rate.count("192.0.2.1", 161.0) == 2


def test_each_address_has_its_own_count(board):
    rate = ConnectionRate(board)
    for _ in range(5):
        rate.count("192.0.2.1", 1.0)
    assert rate.count("192.0.2.2", 1.0) == 1
    assert rate.count("::ffff:192.0.2.3", 1.0) == 1
    assert rate.count("192.0.2.1", 1.0) == 6


def test_an_ipv6_client_counts_by_its_slash_64(board):
    """Whoever holds a /64 holds 2**64 addresses to rotate through."""
    rate = ConnectionRate(board)
    assert rate.count("2001:db8:1:2::1", 1.0) == 1
    assert rate.count("2001:db8:1:2:ffff:ffff:ffff:ffff", 1.0) == 2
    assert rate.count("2001:db8:1:3::1", 1.0) == 1


def test_the_count_holds_for_thousands_of_addresses_at_once(board):
    """Eight thousand addresses, each connecting three times in one window: every one
    keeps its own count."""
    rate = ConnectionRate(board)
    ips = [f"10.0.{n >> 8}.{n & 255}" for n in range(8000)]
    for t in (1.0, 2.0, 3.0):
        for ip in ips:
            rate.count(ip, t)
    assert sorted({rate.count(ip, 4.0) for ip in ips}) == [4]


def test_a_full_neighbourhood_gives_up_its_oldest_window(board):
    """More addresses than the probe reaches: a newcomer takes the oldest entry, whose
    address then starts a new count, lower, never higher."""
    rate = ConnectionRate(board, buckets=8)
    for n in range(8):
        for _ in range(3):
            rate.count(f"198.51.100.{n}", float(n))
    assert rate.count("198.51.100.200", 10.0) == 1
    counts = [rate.count(f"198.51.100.{n}", 11.0) for n in range(8)]
    assert counts.count(1) >= 1 and all(c in (1, 4) for c in counts), counts


def test_an_address_behind_an_expired_entry_of_its_chain_is_still_found(board):
    """Two addresses whose probes start at the same bucket: the first one's window ends;
    the second's count must be found further down the chain, not begun again."""
    rate = ConnectionRate(board, buckets=64)
    first, second = addresses_sharing_a_start(board, 64)
    rate.count(first, 0.0)
    for _ in range(4):
        rate.count(second, 30.0)
    assert rate.count(second, 61.0) == 5


def test_workers_share_the_count(board):
    """The table is shared memory made before the fork: a child's connections count
    for the parent, and the child sees the parent's."""
    rate = ConnectionRate(board)
    rate.count("192.0.2.9", 1.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        board.after_fork(0)
        code = 0 if rate.count("192.0.2.9", 2.0) == 2 else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert rate.count("192.0.2.9", 3.0) == 3


def master_with(rate: ConnectionRate, limit: int, exceptions: tuple[str, ...] = ()) -> SimpleNamespace:
    """What Arbiter._count_refused reads of its master: the config's two keys and the table."""
    server = SimpleNamespace(max_connection_rate=limit, limit_exceptions=exceptions)  # a tuple, as in Config
    return SimpleNamespace(cfg=SimpleNamespace(server=server), conn_rate=rate)


def test_a_client_the_master_refuses_counts_unless_the_limit_is_off_or_it_is_exempt(board):
    """The master's own 421 (every worker busy at max_workers) counts as a worker's
    refusal does; not while max_connection_rate is 0, nor for limit_exceptions."""
    rate = ConnectionRate(board)
    Arbiter._count_refused(master_with(rate, 3), "192.0.2.1", 1.0)
    Arbiter._count_refused(master_with(rate, 3), "192.0.2.1", 2.0)
    Arbiter._count_refused(master_with(rate, 0), "192.0.2.1", 3.0)
    Arbiter._count_refused(master_with(rate, 3, ("10.0.0.0/8", "192.0.2.0/24")), "192.0.2.1", 4.0)
    Arbiter._count_refused(master_with(rate, 3, ("10.0.0.0/8",)), "2001:db8::1", 5.0)
    assert rate.count("192.0.2.1", 6.0) == 3
    assert rate.count("2001:db8::2", 6.0) == 2  # the same /64


def test_the_master_skips_the_count_rather_than_wait_for_a_worker_holding_the_lock(board):
    """A worker stopped holding the admission lock must not stall the master's refusals:
    the count is given up within MASTER_LOCK_WAIT, and the next ones at once."""
    rate = ConnectionRate(board)
    ready_r, ready_w = os.pipe()
    board.claim_slot(1, 0, 1, now=0.0)
    pid = os.fork()
    if pid == 0:
        try:
            board.after_fork(1)
            with board.locked():
                os.write(ready_w, b"x")
                time.sleep(60)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        began = time.monotonic()
        for _ in range(50):
            Arbiter._count_refused(master_with(rate, 3), "192.0.2.1", 1.0)
        assert time.monotonic() - began < 25 * MASTER_LOCK_WAIT  # waiting, 50 x at the least
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert rate.count("192.0.2.1", 1.0) == 1  # none of the skipped ones counted
