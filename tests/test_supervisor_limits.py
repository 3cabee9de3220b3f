"""Connection limits against a real daemon: a refused client is answered and closed,
never left waiting (contract section 4).

The contract asks for the 421 within a second.  A test must not fail because a shared
machine was slow for a moment, so the client waits up to ANSWER seconds; what the test
tells apart is an answer from a hang, which would last the whole command timeout.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from daemon import (assert_no_zombies, connect, free_port, read_reply, request_stats, send_message,
                    read_to_close, server_end, serving_worker, wait_until, worker_pids, workers_replacing)

ANSWER = 5.0


def greeted(port: int, host: str = "127.0.0.1", source: str | None = None) -> socket.socket:
    """A client that got the 220 greeting and an EHLO reply: a session a worker holds."""
    sock = connect(port, host, source, timeout=ANSWER)
    assert read_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")
    assert read_reply(sock).startswith(b"250")
    return sock


def refused_with(port: int, host: str = "127.0.0.1", source: str | None = None) -> bytes:
    """Connect and return the greeting line, checking that the server then closes."""
    with connect(port, host, source, timeout=ANSWER) as sock:
        reply = read_reply(sock)
        assert reply.startswith(b"421 "), reply
        assert sock.recv(100) == b""  # closed after the 421, not left open
    return reply


def close_all(socks) -> None:
    for sock in socks:
        sock.close()


def test_over_max_connections_gets_421_4_3_2(daemon_factory):
    d = daemon_factory(workers=5, server={"max_connections": 3})
    sessions = [greeted(d.port) for _ in range(3)]
    try:
        assert refused_with(d.port).startswith(b"421 4.3.2 ")
        stats = request_stats(d)
        assert stats["connections_active"] == 3
        assert stats["connections_rejected"]["max_connections"] == 1
        sessions.pop().close()
        # The freed place is usable again (the count went down with the session).
        wait_until(lambda: request_stats(d)["connections_active"] == 2, 10, 0.1, "count down")
        sessions.append(greeted(d.port))
    finally:
        close_all(sessions)
    # The workers see the closes when they next read: until then the places are held.
    wait_until(lambda: request_stats(d)["connections_active"] == 0, 10, 0.1, "sessions released")
    send_message(d.port)
    assert_no_zombies(d)


EAGER_EHLO = b"EHLO eager.example\r\n"


def test_a_refused_client_that_talked_first_reads_its_421_and_a_clean_close(daemon_factory):
    """Its EHLO is never read: closed with it unread, the connection ended in a reset
    after the 421, which a client stack that drops unread input on a reset (Windows)
    never shows.  The idle workers are stopped while the client connects and talks, so
    that its EHLO is there before any worker accepts it."""
    d = daemon_factory(workers=2, server={"max_connections_per_ip": 1, "max_workers": 6})
    holder = greeted(d.port)
    try:
        busy = serving_worker(d, holder).pid
        idle = [pid for pid in worker_pids(d) if pid != busy]
        assert idle
        for pid in idle:
            os.kill(pid, signal.SIGSTOP)
        try:
            talker = connect(d.port, timeout=ANSWER)
            talker.sendall(EAGER_EHLO)
            # The EHLO is there, unread, and no worker has accepted the connection yet.
            wait_until(lambda: server_end(talker)[:3] == (0, len(EAGER_EHLO), False), 10, 0.01,
                       "the EHLO queued before any accept")
        finally:
            for pid in idle:
                os.kill(pid, signal.SIGCONT)
        with talker:
            wire = read_to_close(talker)
        assert wire.startswith(b"421 4.7.0 ") and wire.count(b"\r\n") == 1, wire
    finally:
        holder.close()
    assert request_stats(d)["connections_rejected"]["max_connections_per_ip"] == 1


def test_over_max_connections_per_ip_gets_421_4_7_0_other_address_served(daemon_factory):
    port = free_port()
    # Listen on 127.0.0.2 as well: a client from that address has its own count.
    d = daemon_factory(port=port, workers=4, server={
        "max_connections_per_ip": 2, "listen": [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]})

    sessions = [greeted(port), greeted(port)]
    try:
        assert refused_with(port).startswith(b"421 4.7.0 ")
        sessions.append(greeted(port, "127.0.0.2", source="127.0.0.2"))
        peers = {s.getsockname()[0] for s in sessions}
        assert peers == {"127.0.0.1", "127.0.0.2"}
        stats = request_stats(d)
        assert stats["connections_rejected"]["max_connections_per_ip"] == 1
        assert stats["connections_active"] == 3
    finally:
        close_all(sessions)
    assert_no_zombies(d)


def test_master_answers_421_when_every_worker_is_busy(daemon_factory):
    d = daemon_factory(workers=2, server={"max_workers": 2})
    sessions = [greeted(d.port), greeted(d.port)]
    try:
        # No worker is free and none may be added: the master itself answers.
        assert refused_with(d.port).startswith(b"421 4.3.2 ")
        d.wait_for_log("refused by master")  # logged just after the close
        assert request_stats(d)["connections_rejected"]["max_connections"] == 1
        sessions.pop().close()
        sessions.append(wait_until(lambda: _served_or_none(d.port), 10, 0.1, "a worker free again"))
    finally:
        close_all(sessions)
    assert len(d.workers()) == 2
    assert_no_zombies(d)


def _served_or_none(port: int):
    """A greeted session, or None while the master still answers 421."""
    sock = connect(port, timeout=ANSWER)
    reply = read_reply(sock)
    if reply.startswith(b"220 "):
        return sock
    sock.close()
    return None


@pytest.mark.parametrize("limit", [1, 2])
def test_refusals_do_not_leak_counts(daemon_factory, limit):
    """Many refused connections leave the counts where the open sessions put them."""
    d = daemon_factory(workers=4, server={"max_connections": limit})
    sessions = [greeted(d.port) for _ in range(limit)]
    try:
        for _ in range(10):
            assert refused_with(d.port).startswith(b"421 4.3.2 ")
        stats = request_stats(d)
        assert stats["connections_active"] == limit
        assert stats["connections_rejected"]["max_connections"] == 10
    finally:
        close_all(sessions)
    wait_until(lambda: request_stats(d)["connections_active"] == 0, 10, 0.1, "all released")
    send_message(d.port)


def test_a_max_workers_raised_by_reload_past_the_scoreboard_still_gets_421_at_the_ceiling(daemon_factory):
    """The scoreboard is sized at start for 2 x max_workers + 16 workers.  A reload that
    raises max_workers past that is warned about, and where the slots end the master
    answers 421 4.3.2: it waited for the configured ceiling, never reached, and left the
    clients beyond the slots silent in the backlog."""
    d = daemon_factory(workers=1, server={"max_workers": 1, "max_connections_per_ip": 100})
    d.sections["server"]["max_workers"] = 40
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_for_log("server.max_workers = 40 is more than the 18 workers the scoreboard made at start holds")
    sessions: list[socket.socket] = []
    try:
        for _ in range(19):
            sock = connect(d.port, timeout=ANSWER)
            reply = read_reply(sock)  # a hang would time out here
            if reply.startswith(b"421 "):
                sock.close()
                break
            assert reply.startswith(b"220 "), reply
            sessions.append(sock)
        assert reply.startswith(b"421 4.3.2 ") and 17 <= len(sessions) <= 18, (reply, len(sessions))
        d.wait_for_log("max_workers reached (18 workers)")
    finally:
        close_all(sessions)


RATE_REPLY = b"421 4.7.0 Too many connections from your address this minute, try again later\r\n"


def test_past_max_connection_rate_gets_421_4_7_0_and_every_try_counts(daemon_factory):
    """Three connections a minute from 127.0.0.1: the first three are served, one after
    the other (never two at once, so the concurrent limits play no part); the fourth and
    fifth are refused, and each counts.  127.0.0.2 has its own count."""
    port = free_port()
    d = daemon_factory(port=port, workers=2, server={
        "max_connection_rate": 3, "listen": [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]})
    for _ in range(3):
        send_message(port)
    for _ in range(2):
        assert refused_with(port) == RATE_REPLY
    greeted(port, "127.0.0.2", source="127.0.0.2").close()
    assert d.log_text().count("[CLOSE] 127.0.0.1 refused: max_connection_rate") == 2
    stats = request_stats(d)
    assert stats["connections_rejected"]["max_connection_rate"] == 2
    assert stats["connections_rejected"]["max_connections_per_ip"] == 0
    assert stats["messages_accepted"] == 3
    assert_no_zombies(d)


def test_clients_the_master_refuses_count_toward_max_connection_rate(daemon_factory):
    """One worker, held by a session (the first connection of the minute); the master
    answers the next two 421 4.3.2 itself.  Those count as Postfix's anvil counts every
    connect: once the worker is free, the fourth connection is over the rate of 3 and
    refused, where it would have been served as the second."""
    d = daemon_factory(workers=1, server={"max_workers": 1, "max_connection_rate": 3})
    held = greeted(d.port)
    try:
        for _ in range(2):
            assert refused_with(d.port).startswith(b"421 4.3.2 ")
        d.wait_for_log("refused by master")
    finally:
        held.close()
    wait_until(lambda: request_stats(d)["connections_active"] == 0, 10, 0.1, "the worker free")
    assert refused_with(d.port) == RATE_REPLY
    stats = request_stats(d)
    assert stats["connections_rejected"]["max_connections"] == 2
    assert stats["connections_rejected"]["max_connection_rate"] == 1
    assert d.log_text().count("[CLOSE] 127.0.0.1 refused: max_connection_rate") == 1


def test_max_connection_rate_is_off_by_default_and_a_reload_turns_it_on(daemon_factory):
    d = daemon_factory(workers=2)
    old = worker_pids(d)
    for _ in range(12):  # more than max_connections_per_ip, one after the other
        with connect(d.port, timeout=ANSWER) as sock:
            assert read_reply(sock).startswith(b"220 ")
            sock.sendall(b"QUIT\r\n")
            assert read_reply(sock).startswith(b"221 ")
    d.sections["server"]["max_connection_rate"] = 2
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration generation 2 loaded", 10)
    # The old generation's idle workers leave; the new ones count from the reload.
    wait_until(lambda: workers_replacing(d, old, 2), 10, 0.05, "old workers gone")
    send_message(d.port)
    send_message(d.port)
    assert refused_with(d.port) == RATE_REPLY
    assert request_stats(d)["connections_rejected"]["max_connection_rate"] == 1


def test_limit_exceptions_lift_the_per_address_limits_for_their_networks(daemon_factory):
    """127.0.0.2 is listed: it may hold more sessions at once than max_connections_per_ip
    and open more a minute than max_connection_rate; 127.0.0.1, not listed, may not.
    max_connections still binds everyone."""
    port = free_port()
    d = daemon_factory(port=port, workers=4, server={
        "max_connections_per_ip": 1, "max_connection_rate": 2, "max_connections": 5,
        "limit_exceptions": ["127.0.0.2/32"], "listen": [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]})
    held = [greeted(port, "127.0.0.2", source="127.0.0.2") for _ in range(3)]
    try:
        for _ in range(3):
            greeted(port, "127.0.0.2", source="127.0.0.2").close()
        held.append(greeted(port))  # 127.0.0.1's one session
        assert refused_with(port) == b"421 4.7.0 Too many connections from your address, try again later\r\n"
        held.append(greeted(port, "127.0.0.2", source="127.0.0.2"))  # the fifth session
        assert refused_with(port, "127.0.0.2", source="127.0.0.2").startswith(b"421 4.3.2 ")
    finally:
        close_all(held)
    stats = request_stats(d)["connections_rejected"]
    assert (stats["max_connections_per_ip"], stats["max_connection_rate"], stats["max_connections"]) == (1, 0, 1)
