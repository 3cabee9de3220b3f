"""TLS session resumption against the real daemon: across the pool, across a reload, and
without a delayed ACK holding the client's EHLO.

A resumed handshake skips the key exchange and the certificate's signature: the server's
CPU per STARTTLS session falls by about half, which is why senders such as Postfix keep a
session cache.  The tickets are sealed with keys the SSL context draws when it is built;
the master builds it before it forks, so every worker of a generation accepts the tickets
of every other.  Raw sockets with Python's ssl as the client, on loopback; every wait is
bounded.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import statistics
import time

import psutil
import pytest

import tls_certs
from daemon import Daemon, read_reply, request_stats, wait_until

HOST = "127.0.0.1"
TIMEOUT = 10.0
WORKERS = 4


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tls_certs.Certs:
    return tls_certs.make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def server(certs, daemon_factory) -> Daemon:
    return daemon_factory(workers=WORKERS, sections={
        "tls": {"cert_file": str(certs.cert), "key_file": str(certs.key)}})


def client_context(certs, version: str) -> ssl.SSLContext:
    ctx = certs.client_context()
    if version == "TLSv1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class Session:
    """A STARTTLS session up to the first EHLO over TLS, timed.  The socket keeps Nagle's
    algorithm on, as most clients' do."""

    def __init__(self, ctx: ssl.SSLContext, port: int, resume: ssl.SSLSession | None) -> None:
        plain = socket.create_connection((HOST, port), timeout=TIMEOUT)
        try:
            assert read_reply(plain).startswith(b"220")
            plain.sendall(b"EHLO client.test\r\n")
            assert read_reply(plain).startswith(b"250")
            plain.sendall(b"STARTTLS\r\n")
            assert read_reply(plain).startswith(b"220")
            self.sock = ctx.wrap_socket(plain, server_hostname="localhost", session=resume)
        except BaseException:
            plain.close()
            raise
        try:
            start = time.monotonic()
            self.sock.sendall(b"EHLO client.test\r\n")
            reply = read_reply(self.sock)
            #: From the EHLO sent over TLS to its reply read.
            self.ehlo_s = time.monotonic() - start
            assert reply.startswith(b"250"), reply
        except BaseException:
            self.sock.close()
            raise
        self.reused = self.sock.session_reused
        self.version = self.sock.version()

    def session(self) -> ssl.SSLSession:
        """The session to resume; a TLS 1.3 ticket has come by the EHLO's reply."""
        assert self.sock.session is not None
        return self.sock.session

    def close(self) -> None:
        """QUIT, then close; best effort, since it runs in ``finally`` blocks, where a
        failure of its own would hide the test's."""
        try:
            self.sock.sendall(b"QUIT\r\n")
            read_reply(self.sock)
        except OSError:
            pass
        finally:
            self.sock.close()


def first_session(ctx: ssl.SSLContext, port: int, version: str) -> ssl.SSLSession:
    """A full handshake's session; Python resumes a session only through the client
    context that made it."""
    s = Session(ctx, port, None)
    try:
        assert not s.reused and s.version == version
        return s.session()
    finally:
        s.close()


def resumed_at_once(ctx: ssl.SSLContext, port: int, resume: ssl.SSLSession) -> list[bool]:
    """WORKERS sessions held open together, so that each takes a worker of its own:
    whether each resumed ``resume``."""
    held: list[Session] = []
    try:
        for _ in range(WORKERS):
            held.append(Session(ctx, port, resume))
        return [s.reused for s in held]
    finally:
        for s in held:
            s.close()


def tls_pids(d: Daemon, version: str) -> list[int]:
    """The worker pid of each handshake the log shows for ``version``, in order."""
    return [int(m.group(1)) for m in re.finditer(rf"/(\d+) \[TLS\] {HOST} {version} ", d.log_text())]


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_a_session_resumes_on_every_worker_of_the_pool(server, certs, version):
    """Every worker takes the ticket another worker issued."""
    ctx = client_context(certs, version)
    resume = first_session(ctx, server.port, version)
    assert resumed_at_once(ctx, server.port, resume) == [True] * WORKERS
    server.wait_for_log("[TLS]", TIMEOUT, count=WORKERS + 1)
    pids = tls_pids(server, version)
    assert len(pids) == WORKERS + 1 and len(set(pids[1:])) == WORKERS, pids
    # The log marks each resumed session, and the stats count them among the handshakes.
    lines = [line for line in server.log_text().splitlines() if " [TLS] " in line]
    assert [line.endswith(" resumed") for line in lines] == [False] + [True] * WORKERS, lines
    # A session's counts reach the scoreboard as it ends: the last may still be closing.
    stats = wait_until(lambda: (s := request_stats(server))["tls"]["handshakes"] == WORKERS + 1 and s,
                       TIMEOUT, what="every handshake counted")
    assert stats["tls"] == {"handshakes": WORKERS + 1, "resumed": WORKERS, "failed": 0}


def test_a_reload_draws_new_ticket_keys(server, certs):
    """The new generation's context is built anew: a ticket from before the reload is
    refused by each of its workers, and the client gets a full handshake instead of an
    error.  The new keys then serve as the old did."""
    ctx = client_context(certs, "TLSv1.3")
    resume = first_session(ctx, server.port, "TLSv1.3")
    server.signal(signal.SIGHUP)
    server.wait_for_log("configuration generation 2 loaded", TIMEOUT)
    # The old workers, idle, leave at once; then every worker is of the new generation.
    wait_until(lambda: generations(server) == {2}, TIMEOUT, what="only new workers")
    assert resumed_at_once(ctx, server.port, resume) == [False] * WORKERS
    again = first_session(ctx, server.port, "TLSv1.3")
    s = Session(ctx, server.port, again)
    try:
        assert s.reused
    finally:
        s.close()


def generations(d: Daemon) -> set[int]:
    """The generations the workers' titles name ("forksmtp: worker idle (gen 2)")."""
    found = set()
    for worker in d.workers():
        try:
            title = " ".join(worker.cmdline())
        except psutil.Error:
            continue  # gone meanwhile
        m = re.search(r"\(gen (\d+)\)", title)
        if m:
            found.add(int(m.group(1)))
    return found


def test_a_resumed_tls12_session_gets_its_ehlo_answered_at_once(server, certs):
    """A resumed TLS 1.2 handshake ends with the client's Finished, which the server has
    no reply to.  Unless the server acknowledges it at once, the kernel holds the ACK for
    a reply to ride on (40 ms at least on Linux), and the client's Nagle holds its EHLO
    until then: every resumed session would wait that long before its first command."""
    ctx = client_context(certs, "TLSv1.2")
    resume = first_session(ctx, server.port, "TLSv1.2")
    waits = []
    for _ in range(9):
        s = Session(ctx, server.port, resume)
        try:
            assert s.reused
            waits.append(s.ehlo_s)
        finally:
            s.close()
    # Without the prompt ACK every one of these waits 40 ms or more; the median of nine
    # leaves a loaded machine room for a few slow ones.
    assert statistics.median(waits) < 0.02, [round(w * 1000, 1) for w in waits]
