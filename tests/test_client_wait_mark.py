"""The mark a worker writes while its client keeps it waiting (connection._wait): set
once a wait has lasted CLIENT_WAIT_MARK, cleared on every way out of the wait, and
never written by a wait the client answers at once.  The pool reads it (growth.Pace).

It runs on the pure build, where a Connection's attributes take any object (the
compiled class checks their types); CI runs it there.  The live test is
test_supervisor_signals.py's, through the stats."""
from __future__ import annotations

import select
import socket
import threading
import time
import types

import pytest

from forksmtp import _native
from forksmtp import connection as C

pytestmark = pytest.mark.skipif(_native.reason == "", reason="a scripted worker needs the pure build (FORKSMTP_PURE=1)")


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    server.setblocking(False)
    yield server, client
    server.close()
    client.close()


def connection(sock: socket.socket, quitting: bool = False):
    calls: list[float] = []
    conn = C.Connection.__new__(C.Connection)
    conn.sock, conn.fd = sock, sock.fileno()
    conn.poller = select.poll()
    conn.poller.register(conn.fd, select.POLLIN)
    conn._client_wait_marked = False
    conn.log = types.SimpleNamespace(flush=lambda: None)
    conn.session = types.SimpleNamespace(phase="mail")
    conn.worker = types.SimpleNamespace(client_waits=calls.append, heartbeat=lambda: None,
                                        on_wake=lambda fd: None, show_phase=lambda phase: None,
                                        quitting=quitting)
    return conn, calls


def send_later(sock: socket.socket, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), sock.sendall(b"NOOP\r\n")))
    t.start()
    return t


def test_a_client_that_answers_at_once_is_never_marked(pair):
    server, client = pair
    conn, calls = connection(server)
    client.sendall(b"NOOP\r\n")
    assert conn._wait(time.monotonic() + 5)
    assert calls == []


def test_a_quiet_client_is_marked_from_the_start_of_the_wait_and_cleared(pair):
    server, client = pair
    conn, calls = connection(server)
    start = time.monotonic()
    t = send_later(client, 0.15)
    # As _recv calls it once its first poll of CLIENT_WAIT_MARK has timed out.
    assert conn._wait(start + 5 + C.CLIENT_WAIT_MARK, first=[])
    t.join()
    assert len(calls) == 2 and calls[1] == 0.0, calls
    assert start - C.CLIENT_WAIT_MARK - 0.01 <= calls[0] <= start + 0.01
    assert not conn._client_wait_marked
    assert server.recv(100) == b"NOOP\r\n"
    # The next wait marks again, from its own start.
    t = send_later(client, 0.1)
    again = time.monotonic()
    assert conn._wait(again + 5)
    t.join()
    assert len(calls) == 4 and calls[3] == 0.0 and calls[2] >= again - 0.01, calls


def test_the_mark_is_cleared_when_the_deadline_passes(pair):
    server, _client = pair
    conn, calls = connection(server)
    assert not conn._wait(time.monotonic() + 0.3)
    assert len(calls) == 2 and calls[0] > 0 and calls[1] == 0.0, calls


def test_the_mark_is_cleared_when_the_worker_must_stop(pair):
    server, client = pair
    conn, calls = connection(server, quitting=True)
    t = send_later(client, 0.1)
    with pytest.raises(C.Stop):
        conn._wait(time.monotonic() + 5)
    t.join()
    assert len(calls) == 2 and calls[1] == 0.0, calls
