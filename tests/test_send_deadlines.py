"""Which deadline each wait to send gets (connection._sendall and _send_last), with a
socket scripted to take a little at a time: the races the live tests cannot pin down.

It runs on the pure build, where a Connection's attributes take any object (the
compiled class checks their types); CI runs it there.  The live tests of the same
rules are test_hardening_live.py's and test_tls_live.py's paced readers."""
from __future__ import annotations

import errno
import time
import types

import pytest

from forksmtp import _native
from forksmtp import connection as C

pytestmark = pytest.mark.skipif(_native.reason == "", reason="scripted sockets need the pure build (FORKSMTP_PURE=1)")

TICK = 0.05  # each wait for room lasts this long, then the client has taken some
PART = 1000  # octets the socket takes once there is room


class SlowReader:
    """A client that takes PART octets each time it has made room, and whose socket
    never has room for a line at once (as one whose buffer is full)."""

    def __init__(self) -> None:
        self.room = False
        self.got = bytearray()

    def send(self, data) -> int:
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, "try again")
        self.room = False
        n = min(PART, len(data))
        self.got += bytes(data[:n])
        return n

    def getsockopt(self, *args):
        raise OSError(errno.ENOPROTOOPT, "no counters")


def connection(command_timeout: float, stressed: bool = False) -> C.Connection:
    conn = C.Connection.__new__(C.Connection)
    conn.sock = SlowReader()
    conn.fd = -1
    conn.worker = types.SimpleNamespace(stressed=stressed, command_timeout=command_timeout,
                                        session_over=lambda: None)
    conn.session_deadline = time.monotonic() + 60

    def wait(deadline: float, events: int = 0, first=None) -> bool:
        time.sleep(TICK)
        conn.sock.room = True
        return time.monotonic() <= deadline

    conn._wait = wait
    return conn


BATCH = b"250 " + b"x" * (6 * PART - 6) + b"\r\n"  # six parts: six waits, 0.3 s in all
BYE = b"221 2.0.0 Bye\r\n"


def test_each_part_the_client_takes_renews_the_wait():
    conn = connection(command_timeout=0.2)
    started = time.monotonic()
    conn._sendall(BATCH)
    assert bytes(conn.sock.got) == BATCH and time.monotonic() - started > 0.25


def test_the_last_reply_waits_from_the_deadline_the_replies_before_it_left():
    """The 221 behind a batch the client read slowly but steadily: its wait starts from
    the deadline the batch's last part renewed, not from the one both began with, which
    had passed by then (the 221 was lost with the client still reading)."""
    conn = connection(command_timeout=0.2)
    conn._send_last(BATCH + BYE, False)
    assert bytes(conn.sock.got) == BATCH + BYE


def test_under_stress_the_whole_reply_has_one_deadline():
    conn = connection(command_timeout=0.2, stressed=True)
    with pytest.raises(OSError) as raised:
        conn._sendall(BATCH)
    assert raised.value.errno == errno.ETIMEDOUT and len(conn.sock.got) < len(BATCH)
