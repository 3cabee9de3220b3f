"""The shared count of new connections per client address and minute (connrate)."""
from __future__ import annotations

import os

import pytest

from forksmtp.connrate import RATE_WINDOW, ConnectionRate
from forksmtp.scoreboard import Scoreboard
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
