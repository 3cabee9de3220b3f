"""The master's 421 when no worker can take a connection (overflow.py), on real sockets."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from daemon import read_to_close
from forksmtp.overflow import GRACE, OverflowGuard
from forksmtp.pool import CEILING_WARN_EVERY


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, tag: str, text: str) -> None:
        self.lines.append(f"[{tag}] {text}")

    info = warning


class Snap:
    """What the guard reads of a scoreboard snapshot: no idle worker, no admission."""
    connections_total = 7

    def count(self, *states) -> int:
        return 0


def queued_client(listener: socket.socket) -> socket.socket:
    client = socket.create_connection(listener.getsockname(), timeout=5)
    return client


def run_guard(guard: OverflowGuard, listener: socket.socket, **kw) -> None:
    start = time.monotonic()
    guard.check(Snap(), start, sockets=[listener], **kw)           # the stall starts
    guard.check(Snap(), start + GRACE + 0.01, sockets=[listener], **kw)  # and lasts


def test_held_back_pool_with_no_worker_answers_421_instead_of_silence():
    """Workers failing at start (crash-loop back-off) leave none to accept: queued
    clients get 421 4.3.2 from the master, not a silent backlog."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = queued_client(listener)
        guard = OverflowGuard(Log())
        run_guard(guard, listener, workers=0, max_workers=4, held_back=True)
        assert client.recv(200).startswith(b"421 4.3.2 ")
        assert guard.rejected_held == 1 and guard.rejected == 0
        assert any("back-off after a crash loop or a failed fork" in line for line in guard.log.lines)
        client.close()


def test_a_client_that_talked_first_reads_the_421_and_a_clean_close():
    """Its EHLO is never read: closed with it unread, the connection ended in a reset
    after the 421, which a client stack that drops unread input on a reset (Windows)
    never shows."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with queued_client(listener) as client:
            client.sendall(b"EHLO eager.example\r\n")
            time.sleep(0.1)
            run_guard(OverflowGuard(Log()), listener, workers=4, max_workers=4, held_back=False)
            wire = read_to_close(client, 200)
    assert wire.startswith(b"421 4.3.2 ") and wire.count(b"\r\n") == 1, wire


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6")
def test_an_ipv4_client_of_a_dual_stack_listener_is_logged_as_ipv4():
    """As the workers name it (a "PORT" listen address takes IPv4 as ::ffff:a.b.c.d)."""
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as listener:
        client = socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=5)
        guard = OverflowGuard(Log())
        run_guard(guard, listener, workers=4, max_workers=4)
        assert client.recv(200).startswith(b"421 4.3.2 ")
        assert "[CONN] 127.0.0.1 refused by master: no worker free (421 sent)" in guard.log.lines, guard.log.lines
        client.close()


def test_below_the_ceiling_and_free_to_spawn_nothing_is_refused():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = queued_client(listener)
        guard = OverflowGuard(Log())
        run_guard(guard, listener, workers=0, max_workers=4, held_back=False)
        client.settimeout(0.3)
        try:
            data = client.recv(200)
        except socket.timeout:
            data = None
        assert data is None and guard.rejected == guard.rejected_held == 0
        client.close()


def test_at_the_ceiling_the_421_counts_as_max_connections():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = queued_client(listener)
        guard = OverflowGuard(Log())
        run_guard(guard, listener, workers=4, max_workers=4)
        assert client.recv(200).startswith(b"421 4.3.2 ")
        assert guard.rejected == 1 and guard.rejected_held == 0
        client.close()


def test_each_client_refused_at_the_ceiling_is_told_to_the_count_by_its_address_and_time():
    """For max_connection_rate (the arbiter's count): an SMTPS client too, the time
    being the check's; nothing when no client is there to refuse, and nothing for a
    refusal while spawning is held back (the server's trouble, not the client's)."""
    told: list[tuple[str, float]] = []
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_server(("127.0.0.1", 0)) as smtps:
        sockets, tls_first = [listener, smtps], frozenset([smtps])
        guard = OverflowGuard(Log(), count=lambda ip, now: told.append((ip, now)))
        start = time.monotonic()
        guard.check(Snap(), start, 4, 4, sockets, tls_first)
        guard.check(Snap(), start + GRACE + 0.01, 4, 4, sockets, tls_first)
        assert told == []
        plain, tls = [queued_client(listener) for _ in range(2)], queued_client(smtps)
        guard.check(Snap(), start + GRACE + 0.02, 4, 4, sockets, tls_first)
        held = queued_client(listener)
        guard.check(Snap(), start + GRACE + 0.03, 0, 4, sockets, tls_first, held_back=True)
        for client in plain + [held]:
            assert client.recv(200).startswith(b"421 4.3.2 ")
            client.close()
        assert read_to_close(tls, 200) == b""  # no handshake from the master: only a close
        tls.close()
    assert told == [("127.0.0.1", start + GRACE + 0.02)] * 3
    assert guard.rejected == 3 and guard.rejected_held == 1
    said = [line for line in guard.log.lines if "refused by master" in line]
    assert sorted(said) == sorted(["[CONN] 127.0.0.1 refused by master: no worker free (421 sent)"] * 3 + [
        "[CONN] 127.0.0.1 refused by master: no worker free (closed without a reply: no TLS from the master)"])


def test_a_client_that_reset_before_the_masters_421_is_logged_as_not_sent_it():
    """It is counted as refused all the same (every connection counts), but the log
    said "refused" as if it had been told."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = queued_client(listener)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset, queued before the master looks
        guard = OverflowGuard(Log())
        run_guard(guard, listener, workers=4, max_workers=4)
        assert guard.rejected == 1
        assert "[CONN] 127.0.0.1 refused by master: no worker free (421 not sent: the client left)" in \
            guard.log.lines, guard.log.lines


class Relieved(Snap):
    """A worker is idle again: the stall is over."""

    def count(self, *states) -> int:
        return 1


def test_the_ceiling_warning_comes_once_per_interval_however_often_the_pool_fills():
    """Under steady load the pool fills, a worker frees, it fills again: each stall still
    answers its queued clients, but the warning is written once per CEILING_WARN_EVERY."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        guard = OverflowGuard(Log())
        start = time.monotonic()
        for i, at in enumerate([start, start + 10, start + 20, start + CEILING_WARN_EVERY + 1]):
            client = queued_client(listener)
            guard.check(Snap(), at, 4, 4, [listener])
            guard.check(Snap(), at + GRACE + 0.01, 4, 4, [listener])
            assert client.recv(200).startswith(b"421 4.3.2 ")
            client.close()
            guard.check(Relieved(), at + 1, 4, 4, [listener])
        assert guard.rejected == 4
        warned = [line for line in guard.log.lines if "max_workers reached" in line]
        assert len(warned) == 2, guard.log.lines  # the first stall's and the one an interval later


def test_a_stall_that_refused_nobody_does_not_spend_the_warning():
    """Every worker busy past GRACE with nobody queued refuses nobody: no warning then,
    so the interval's one warning is there for the stall that does refuse a client."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        guard = OverflowGuard(Log())
        start = time.monotonic()
        guard.check(Snap(), start, 4, 4, [listener])
        guard.check(Snap(), start + GRACE + 0.01, 4, 4, [listener])  # nobody waits
        guard.check(Relieved(), start + 1, 4, 4, [listener])
        assert guard.log.lines == []
        client = queued_client(listener)
        guard.check(Snap(), start + 2, 4, 4, [listener])
        guard.check(Snap(), start + 2 + GRACE + 0.01, 4, 4, [listener])
        assert client.recv(200).startswith(b"421 4.3.2 ")
        client.close()
        assert guard.log.lines[0] == "[POOL] all 4 workers busy (max_workers reached); answering 421 4.3.2"


def test_a_stall_that_turns_into_a_back_off_still_says_so():
    """A stall at the ceiling whose warning the interval holds back, then workers crash
    and spawning is held back: that is another reason, and its warning is written."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        guard = OverflowGuard(Log())
        start = time.monotonic()
        run_guard(guard, listener, workers=4, max_workers=4)      # warned; then quiet for a while
        guard.check(Relieved(), start + 1, 4, 4, [listener])
        for at, workers, held in [(start + 2, 4, False), (start + 3, 2, True)]:
            client = queued_client(listener)
            guard.check(Snap(), at, workers, 4, [listener], held_back=held)
            guard.check(Snap(), at + GRACE + 0.01, workers, 4, [listener], held_back=held)
            assert client.recv(200).startswith(b"421 4.3.2 ")
            client.close()
        warnings = [line for line in guard.log.lines if line.startswith("[POOL]")]
        assert len(warnings) == 2 and "back-off after a crash loop" in warnings[1], warnings
