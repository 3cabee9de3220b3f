"""STARTTLS, implicit TLS and AUTH against the real daemon, with real TLS clients.

Certificates come from ``tls_certs`` (made with the openssl command into a temporary
directory).  Clients: smtplib (``starttls()``, ``login()``, ``SMTP_SSL``), ``openssl
s_client -starttls smtp``, swaks, and raw sockets where a test must send what no polite
client sends (the STARTTLS injection, a broken handshake).  Everything is on loopback;
every wait is bounded; every daemon is stopped and reaped by its fixture.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pty
import re
import select
import shutil
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import tls_certs
from daemon import (LONG_NAME, SYSCALL_NR, Daemon, RawSMTP, connect, ehlo_batch, free_port, in_any_syscall,
                    paced_read, read_reply, read_to_close, request_stats, serving_worker, shown,
                    small_window_socket, wait_until, worker_states, workers_replacing, write_config)
from forksmtp import auth, authlimit
from forksmtp.tls import expiry_warning

PASSWORD = "Corr3ct-H0rse-b4ttery"  # distinctive: the log is searched for it
HOST = "127.0.0.1"
FROM, TO = "sender@client.example", "rcpt@mx.test.example"
BODY = b"Subject: tls test\r\n\r\nhello over TLS\r\n"
TIMEOUT = 10.0


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tls_certs.Certs:
    return tls_certs.make_certs(tmp_path_factory.mktemp("certs"))


def password_file(path: Path, **users: str) -> Path:
    for user, password in users.items():
        auth.set_password(str(path), user, password)
    return path


def tls_sections(certs, pw: Path, *, cert: Path | None = None, key: Path | None = None,
                 tls: dict | None = None, auth_cfg: dict | None = None) -> dict:
    return {"tls": {"cert_file": str(cert or certs.cert), "key_file": str(key or certs.key), **(tls or {})},
            "auth": {"password_file": str(pw), **(auth_cfg or {})}}


@pytest.fixture(scope="module")
def server(certs, tmp_path_factory):
    """One daemon for the tests that only read: STARTTLS and SMTPS listeners, AUTH.
    Tests on it fail at most one AUTH each (the per-IP limit is 5)."""
    tmp = tmp_path_factory.mktemp("server")
    pw = password_file(tmp / "passwd", alice=PASSWORD)
    implicit = free_port()
    d = Daemon(tmp, sections=tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]}))
    d.implicit_port = implicit
    try:
        yield d.start()
    finally:
        d.stop()


def starttls_client(d: Daemon, certs, port: int | None = None, source: str | None = None) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port or d.port, timeout=TIMEOUT,
                          source_address=(source, 0) if source else None)
    client.ehlo("client.test")
    code, _ = client.starttls(context=certs.client_context())
    assert code == 220
    client.ehlo("client.test")
    return client


def received_header(path: Path) -> str:
    text = path.read_text()
    m = re.search(r"^Received: .*?;[^\n]*\n", text, re.S | re.M)
    assert m, text
    return m.group(0)


def stored_since(d: Daemon, before: set[Path], count: int = 1) -> list[Path]:
    return wait_until(lambda: len(set(d.new_messages()) - before) >= count and sorted(set(d.new_messages()) - before),
                      TIMEOUT, what="the stored message")


def fingerprint(sock: ssl.SSLSocket) -> str:
    return tls_certs.sha256(sock.getpeercert(binary_form=True))


def log_lines(d: Daemon, tag: str) -> list[str]:
    return [line for line in d.log_text().splitlines() if f"[{tag}]" in line]


def wait_log_count(d: Daemon, needle: str, count: int) -> str:
    return d.wait_for_log(needle, TIMEOUT, count=count)


def replies_until_eof(sock: socket.socket) -> bytes:
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return buf
        if not chunk:
            return buf
        buf += chunk


def reply_lines(wire: bytes) -> list[str]:
    """The final line of each reply in ``wire``."""
    return [line.decode() for line in wire.split(b"\r\n") if line[3:4] == b" "]


# -- real clients ---------------------------------------------------------------------------

def test_smtplib_starttls_login_and_delivery(server, certs):
    before = set(server.new_messages())
    with smtplib.SMTP(HOST, server.port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        assert client.has_extn("auth") and not client.has_extn("starttls")
        assert "PLAIN" in client.esmtp_features["auth"] and "LOGIN" in client.esmtp_features["auth"]
        assert client.login("alice", PASSWORD)[0] == 235
        version, cipher = client.sock.version(), client.sock.cipher()[0]
        assert fingerprint(client.sock) == certs.fingerprint(1)
        assert client.sendmail(FROM, [TO], BODY) == {}
    (path,) = stored_since(server, before)
    header = received_header(path)
    assert " with ESMTPSA id " in header
    assert f"({version} {cipher})" in header
    assert "(authenticated as alice)" in header
    assert path.read_bytes().endswith(b"hello over TLS\n")


def test_smtps_implicit_tls(server, certs):
    # [READY] names every address the server accepts mail on, SMTPS ones marked.
    # ... and the workers it started (contract 6: "(4 workers)"; this daemon has 2).
    assert (f"[READY] Listening on {HOST}:{server.port}, SMTPS {HOST}:{server.implicit_port} (2 workers)\n"
            in server.log_text())
    before = set(server.new_messages())
    with smtplib.SMTP_SSL(HOST, server.implicit_port, timeout=TIMEOUT,
                          context=certs.client_context()) as client:
        code, text = client.ehlo("client.test")
        assert code == 250
        assert not client.has_extn("starttls")
        assert b"AUTH PLAIN LOGIN" in text
        assert client.docmd("STARTTLS")[0] == 503
        assert client.sendmail(FROM, [TO], BODY) == {}  # encrypted, not authenticated
        first = stored_since(server, before)
        assert client.login("alice", PASSWORD)[0] == 235
        assert client.sendmail(FROM, [TO], BODY) == {}
    (second,) = set(stored_since(server, before, 2)) - set(first)
    assert " with ESMTPS id " in received_header(first[0])
    assert "authenticated" not in received_header(first[0])
    header = received_header(second)
    assert " with ESMTPSA id " in header and "(authenticated as alice)" in header


def test_large_utf8_message_over_starttls(server, certs):
    """Megabytes in a few hundred TLS records, stored byte for byte, named UTF8SMTPS."""
    before = set(server.new_messages())
    line = "Grüße aus der Prüfung, über TLS. 0123456789\r\n".encode()
    body = "Subject: grosse Nachricht\r\n\r\n".encode() + line * 60000  # ~2.8 MB
    with starttls_client(server, certs) as client:
        assert client.sendmail("sender@client.example", ["empfänger@mx.test.example"], body,
                               mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    (path,) = stored_since(server, before)
    data = path.read_bytes()
    assert data.endswith(body.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    assert " with UTF8SMTPS id " in received_header(path)


def test_plain_authzid_equal_to_the_user_is_accepted(server, certs):
    with starttls_client(server, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD, authzid="alice"))[0] == 235


def test_plain_authzid_naming_another_user_fails_and_the_log_says_why(server, certs):
    """Refused whatever the password (no proxy authorization), and it was logged as a
    plain "failed", which an operator could not tell from a wrong password."""
    # From an address of its own: the shared daemon's other tests keep 127.0.0.1's
    # failures under the limit of 5, and their lines, logged late, are told apart.
    with starttls_client(server, certs, source="127.0.0.23") as client:
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD, authzid="bob"))[0] == 535
        assert client.docmd("AUTH", "PLAIN " + plain("alice", "wrong"))[0] == 535
    lines = wait_until(lambda: (mine := [line for line in log_lines(server, "AUTH") if "] 127.0.0.23 " in line])
                       and len(mine) >= 2 and mine, 10, 0.05, "both lines")
    assert lines[0].endswith("PLAIN user='alice' failed (authzid='bob': no proxy authorization)"), lines
    assert lines[1].endswith("PLAIN user='alice' failed"), lines


def test_openssl_s_client_starttls(server, certs):
    cmd = [tls_certs.require_openssl(), "s_client", "-starttls", "smtp", "-connect", f"{HOST}:{server.port}",
           "-name", "client.test", "-servername", "localhost", "-CAfile", str(certs.ca_cert),
           "-verify_return_error", "-verify_hostname", "localhost", "-quiet", "-crlf"]
    r = subprocess.run(cmd, input=b"EHLO client.test\nQUIT\n", capture_output=True, timeout=30)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (out, r.stderr.decode(errors="replace"))
    assert "250 AUTH PLAIN LOGIN" in out and "STARTTLS" not in out
    assert "221 2.0.0" in out


def swaks(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("swaks")
    if exe is None:
        pytest.skip("swaks is not installed")
    return subprocess.run([exe, "--server", HOST, "--from", FROM, "--to", TO, "--timeout", "15", *args],
                          capture_output=True, timeout=45, stdin=subprocess.DEVNULL)


def swaks_delivers(server, *args: str) -> tuple[str, object]:
    """Run swaks; it must succeed and store exactly one message: (its output, the file)."""
    before = set(server.new_messages())
    r = swaks(*args)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out + r.stderr.decode(errors="replace")
    (path,) = stored_since(server, before)
    return out, path


def test_swaks_starttls_auth_plain(server, certs):
    out, path = swaks_delivers(server, "--port", str(server.port), "--tls", "--auth", "PLAIN",
                               "--auth-user", "alice", "--auth-password", PASSWORD)
    assert "235 2.7.0" in out and "250 2.0.0 Message accepted" in out
    assert " with ESMTPSA id " in received_header(path)


def test_swaks_implicit_tls_auth_login_verified(server, certs):
    out, path = swaks_delivers(server, "--port", str(server.implicit_port), "--tls-on-connect",
                               "--tls-verify", "--tls-ca-path", str(certs.ca_cert), "--auth",
                               "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD)
    assert "334 VXNlcm5hbWU6" in out and "235 2.7.0" in out
    assert "(authenticated as alice)" in received_header(path)


# -- the first reply after the handshake ---------------------------------------------------

def first_reply_after_handshake(server, certs, implicit: bool) -> float:
    """Seconds from the handshake's end to the first reply read over TLS: the SMTPS
    greeting, or the reply to the EHLO sent right after STARTTLS."""
    ctx = certs.client_context()
    with socket.create_connection((HOST, server.implicit_port if implicit else server.port),
                                  timeout=TIMEOUT) as raw:
        if not implicit:
            assert read_reply(raw).startswith(b"220 ")
            raw.sendall(b"EHLO client.test\r\n")
            assert read_reply(raw).startswith(b"250-")
            raw.sendall(b"STARTTLS\r\n")
            assert read_reply(raw).startswith(b"220 ")
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            start = time.monotonic()
            if not implicit:
                tls.sendall(b"EHLO client.test\r\n")
            reply = read_reply(tls)
            took = time.monotonic() - start
            assert reply.startswith(b"220 " if implicit else b"250-"), reply
            tls.sendall(b"QUIT\r\n")
            read_reply(tls)
    return took


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "smtps"])
def test_first_reply_after_the_handshake_is_not_held_back(server, certs, implicit):
    """With Nagle's algorithm on, that reply waited for the client's delayed ACK of the
    handshake's last flight: 40 ms or more (Linux's shortest delayed ACK) every time, a
    little less from where the client's handshake ends (34 ms at the least in forty
    tries); it comes in a few ms otherwise.  A loaded machine only makes a reply later,
    never earlier: one within 20 ms is proof enough, and up to twenty tries find one
    however busy the machine is now and then."""
    took: list[float] = []
    while len(took) < 20 and (not took or took[-1] >= 0.020):
        took.append(first_reply_after_handshake(server, certs, implicit))
    assert took[-1] < 0.020, " ".join(f"{t * 1000:.1f}" for t in took) + " ms"


# -- STARTTLS injection (CVE-2011-0411 and kin) ----------------------------------------------

class Replies:
    """Reads one reply at a time from a socket, keeping what came after it."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> bytes:
        while True:
            end = 0
            while (nl := self.buf.find(b"\r\n", end)) >= 0:
                line, end = self.buf[end:nl], nl + 2
                if line[3:4] != b"-":
                    reply, self.buf = self.buf[:end], self.buf[end:]
                    return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {self.buf!r}")
            self.buf += chunk


@pytest.mark.parametrize("first, injected", [
    (b"", b"NOOP\r\n"),
    (b"", b"MAIL FROM:<evil@attacker.example>\r\n"),
    (b"EHLO x\r\n", b"NOOP\r\nNOOP\r\n"),
], ids=["noop", "mail", "with-ehlo"])
def test_commands_pipelined_after_starttls_are_never_executed(server, certs, first, injected):
    seen = server.log_text().count("pipelined after STARTTLS")
    sock = connect(server.port, timeout=TIMEOUT)
    try:
        plain_text = Replies(sock)
        assert plain_text.next().startswith(b"220 ")
        if not first:
            sock.sendall(b"EHLO x\r\n")
            assert plain_text.next().startswith(b"250-")
        sock.sendall(first + b"STARTTLS\r\n" + injected)  # one write
        if first:
            assert plain_text.next().startswith(b"250-")
        # Exactly the 220: an answer to the injected line would follow it in plaintext
        # (and break the handshake below) or come over TLS (and show in the count below).
        assert plain_text.next() == b"220 2.0.0 Ready to start TLS\r\n"
        assert plain_text.buf == b""
        tls = certs.client_context().wrap_socket(sock, server_hostname="localhost")
        tls.sendall(b"EHLO again\r\n")
        first_reply = read_reply(tls)
        assert first_reply.startswith(b"250-mx.test.example\r\n"), first_reply
        tls.sendall(b"RCPT TO:<rcpt@mx.test.example>\r\nNOOP\r\nQUIT\r\n")
        rest = replies_until_eof(tls)
        # RCPT: no MAIL ever reached the TLS session; one 250 for the one NOOP sent over TLS.
        assert reply_lines(first_reply + rest) == [
            "250 AUTH PLAIN LOGIN", "503 5.5.1 Need MAIL command first", "250 2.0.0 Ok", "221 2.0.0 Bye"]
    finally:
        sock.close()
    wait_log_count(server, "pipelined after STARTTLS", seen + 1)


# -- downgrades -------------------------------------------------------------------------------

def test_auth_before_tls_is_not_offered_and_refused(server):
    with smtplib.SMTP(HOST, server.port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD)) == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        assert client.docmd("AUTH", "LOGIN")[0] == 538
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login("alice", PASSWORD)  # smtplib itself refuses: AUTH not advertised


def test_starttls_twice_is_503(server, certs):
    with starttls_client(server, certs) as client:
        code, text = client.docmd("STARTTLS")
        assert (code, text[:5]) == (503, b"5.5.1")
        assert client.noop()[0] == 250  # still the same TLS session


@pytest.mark.parametrize("after_220", [b"EHLO plaintext\r\nMAIL FROM:<x@y.example>\r\n", b"", None],
                         ids=["plaintext", "eof", "reset"])
def test_failed_handshake_closes_only_that_session(server, certs, after_220):
    seen = server.log_text().count("handshake failed")
    sock = connect(server.port, timeout=TIMEOUT)
    try:
        read_reply(sock)
        worker = serving_worker(server, sock)
        sock.sendall(b"EHLO x\r\n")
        read_reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock).startswith(b"220 2.0.0")
        if after_220 is None:  # a reset, which the server may meet before or in the handshake
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif after_220:
            sock.sendall(after_220)  # not a ClientHello
        else:
            sock.shutdown(socket.SHUT_WR)
        if after_220 is not None:
            data = replies_until_eof(sock)
            assert not re.search(rb"(^|\n)[2-5]\d\d[ -]", data), data  # no SMTP reply, only EOF (or an alert)
    finally:
        sock.close()
    text = wait_log_count(server, "handshake failed", seen + 1)
    failed = [line for line in text.splitlines() if "[TLS]" in line and "handshake failed" in line]
    assert re.search(r"\[TLS\] 127\.0\.0\.1 handshake failed: \S+", failed[-1]), failed
    assert "[Errno" not in failed[-1]
    if after_220 is None:
        assert failed[-1].endswith("handshake failed: connection reset by the client"), failed
    assert re.search(r"\[CLOSE\] 127\.0\.0\.1 TLS handshake failed: \S+", text)  # the reason again
    with starttls_client(server, certs) as client:  # the server goes on serving
        assert client.login("alice", PASSWORD)[0] == 235
        assert client.sendmail(FROM, [TO], BODY) == {}
    assert worker.is_running() and worker.status() != "zombie"  # its worker lives on


def test_failed_handshake_on_the_smtps_port(server, certs):
    seen = server.log_text().count("handshake failed")
    sock = connect(server.implicit_port, timeout=TIMEOUT)
    try:
        sock.sendall(b"EHLO plaintext\r\n")
        data = replies_until_eof(sock)
        assert b"220" not in data and b"250" not in data
    finally:
        sock.close()
    wait_log_count(server, "handshake failed", seen + 1)
    with smtplib.SMTP_SSL(HOST, server.implicit_port, timeout=TIMEOUT, context=certs.client_context()) as c:
        assert c.noop()[0] == 250


def test_a_tls_record_that_fails_its_check_is_logged_as_a_tls_error(server, certs):
    """A record the server cannot decrypt (tampered with on the way, or forged) ends
    the session with an alert; the log must say so, not "client disconnected"."""
    seen = server.log_text().count(" TLS error: ")
    with smtplib.SMTP_SSL(HOST, server.implicit_port, timeout=TIMEOUT, context=certs.client_context()) as c:
        assert c.ehlo("tampered.example")[0] == 250
        forged = bytes([0x17, 0x03, 0x03, 0x00, 0x30]) + b"A" * 0x30  # application data, bad tag
        socket.socket.send(c.sock, forged)  # beside the TLS layer, on the TCP connection
        with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
            c.noop()  # the server's alert, then its close
    wait_log_count(server, " TLS error: ", seen + 1)
    assert "[CLOSE] 127.0.0.1 TLS error: " in server.log_text()


def test_a_client_that_leaves_right_after_the_handshake_is_logged_as_gone(server, certs):
    """The greeting's send then fails with an SSL error, whose errno is OpenSSL's code,
    not a system one: the log must not read it as one ("Exec format error")."""
    def tally() -> tuple[int, int]:  # (disconnected, errors) among the [CLOSE] lines so far
        closes = log_lines(server, "CLOSE")
        return (sum(line.endswith(" client disconnected") for line in closes),
                sum(" I/O error: " in line or " TLS error: " in line for line in closes))

    gone, errors = tally()
    for _ in range(3):
        sock = connect(server.implicit_port, timeout=TIMEOUT)
        certs.client_context().wrap_socket(sock, server_hostname="localhost").close()
    wait_until(lambda: tally()[0] >= gone + 3, TIMEOUT, what="three sessions logged as disconnected")
    assert tally()[1] == errors, log_lines(server, "CLOSE")


def test_log_shows_tls_and_auth_but_never_secrets(server, certs):
    seen = len(log_lines(server, "AUTH"))
    stored = server.log_text().count("[STORE]")
    payloads = [plain("alice", PASSWORD), b64("alice"), b64(PASSWORD), plain("alice", PASSWORD + "x")]
    with starttls_client(server, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + payloads[3])[0] == 535  # the one failure
        assert client.docmd("AUTH", "LOGIN " + payloads[1])[0] == 334
        assert client.docmd(payloads[2])[0] == 235
    with starttls_client(server, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + payloads[0])[0] == 235
        client.sendmail(FROM, [TO], BODY)
    wait_log_count(server, "[AUTH]", seen + 3)
    wait_log_count(server, "[STORE]", stored + 1)
    text = server.log_text()
    auth_lines = log_lines(server, "AUTH")[seen:]
    assert any("PLAIN user='alice' failed" in line for line in auth_lines), auth_lines
    assert any("LOGIN user='alice' ok" in line for line in auth_lines), auth_lines
    assert re.search(r"\[TLS\] 127\.0\.0\.1 TLSv1\.[23] \S+", text)
    for secret in [PASSWORD, *payloads]:
        assert secret not in text
    assert "scrypt$" not in text


# -- policies: require_tls, required AUTH, minimum version ----------------------------------

def one_smtps_session_per_address(daemon_factory, certs, tmp_path) -> tuple[Daemon, int]:
    """A daemon with an SMTPS port and max_connections_per_ip = 1; returns it and the port."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    implicit = free_port()
    d = daemon_factory(server={"max_connections_per_ip": 1},
                       sections=tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]}))
    return d, implicit


def test_an_smtps_client_reading_a_long_batch_of_replies_slowly_but_steadily_gets_them_all(
        daemon_factory, certs, tmp_path):
    """As test_hardening_live's plain reader, over TLS: SSLSocket.send takes a whole
    buffer or raises until it can, so the worker sends a record at a time, and each one
    the client takes renews the wait.  Each TLS record the server reads holds 2,000 of
    the EHLOs, whose 0.7 MB of replies wait some 1.5 s for room at 450 KB/s, past the
    1 s command timeout; the whole batch as one send was cut off there."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    implicit = free_port()
    sections = tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]})
    d = daemon_factory(server={"hostname": LONG_NAME},  # EHLO is junk: its limit out of the way
                       sections={**sections, "timeouts": {"command": 1, "session": 60},
                                 "limits": {"max_junk_commands": 1_000_000}})
    raw = small_window_socket(1024)
    raw.settimeout(TIMEOUT)
    raw.connect((HOST, implicit))
    with certs.client_context().wrap_socket(raw, server_hostname="localhost") as s:
        assert read_reply(s).startswith(b"220 ")
        wire, took = paced_read(s, ehlo_batch(8000), 450_000)
    assert wire.count(b"\r\n250 ") == 8000, (len(wire), took)
    assert wire.endswith(b"\r\n") and wire.rsplit(b"\r\n", 2)[-2].startswith(b"221 "), wire[-200:]
    assert "[CLOSE] 127.0.0.1 client quit" in d.wait_for_log("[CLOSE]")


def test_an_smtps_early_talker_reads_its_521_and_a_clean_close(daemon_factory, certs, tmp_path):
    """On an SMTPS port the greeting delay starts after the handshake: a client that
    talks first gets 521 inside TLS, then our close_notify and a FIN, not a reset (the
    TLS shutdown reads its early record, or the close throws it away unread)."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    implicit = free_port()
    d = daemon_factory(server={"greeting_delay": 0.5},
                       sections=tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]}))
    with socket.create_connection((HOST, implicit), timeout=TIMEOUT) as raw:
        with certs.client_context().wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"EHLO eager.example\r\n")
            wire = read_to_close(s)
    assert wire == b"521 5.5.0 SMTP protocol violation: data sent before greeting\r\n"
    assert request_stats(d)["connections_rejected"]["early_talker"] == 1


def test_an_smtps_client_that_leaves_during_the_greeting_delay_is_no_early_talker(daemon_factory, certs, tmp_path):
    """Its close_notify (then its FIN) wakes the worker as a record would: it sent no
    command, so it is logged as gone, not sent a 521 and counted as an early talker."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    implicit = free_port()
    d = daemon_factory(server={"greeting_delay": 0.5},
                       sections=tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]}))
    with socket.create_connection((HOST, implicit), timeout=TIMEOUT) as raw:
        s = certs.client_context().wrap_socket(raw, server_hostname="localhost")
        try:
            s.unwrap()  # close_notify, before any greeting; then the server's, or its FIN
        except (OSError, ssl.SSLError):
            pass
    text = d.wait_for_log(f"[CLOSE] {HOST} ")
    assert f"[CLOSE] {HOST} client disconnected" in text and "early talker" not in text
    assert request_stats(d)["connections_rejected"]["early_talker"] == 0


def test_smtps_client_over_the_limit_reads_its_421_inside_tls(daemon_factory, certs, tmp_path):
    """RFC 8314: on an SMTPS port TLS comes first, so a refused client gets the handshake
    and then its 421 4.7.0 encrypted, not plaintext a TLS client reads as garbage."""
    d, implicit = one_smtps_session_per_address(daemon_factory, certs, tmp_path)
    with smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context()) as first:
        assert first.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context())
        assert refused.value.smtp_code == 421 and refused.value.smtp_error.startswith(b"4.7.0 ")
    wait_log_count(d, "refused: max_connections_per_ip", 1)
    wait_until(lambda: request_stats(d)["connections_active"] == 0, TIMEOUT, 0.1,
               "the first session's count released")
    with smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context()) as again:
        assert again.noop()[0] == 250  # the worker is free again


def test_a_refused_smtps_client_that_talked_first_reads_its_421_and_a_clean_close(
        daemon_factory, certs, tmp_path):
    """The client's handshake runs in memory, so that its Finished and an EHLO go out in
    one segment: the worker's handshake reads the Finished and leaves the EHLO's record
    unread.  Closed with it there, the connection ended in a reset after the 421, which a
    client stack that drops unread input on a reset (Windows) never shows."""
    d, implicit = one_smtps_session_per_address(daemon_factory, certs, tmp_path)
    with smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context()) as first:
        assert first.noop()[0] == 250
        with socket.create_connection((HOST, implicit), timeout=TIMEOUT) as raw:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = certs.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
            for _ in range(20):  # a handful of flights; bounded all the same
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    flight = raw.recv(65536)
                    assert flight, "closed during the handshake"
                    incoming.write(flight)
            assert tls.version() == "TLSv1.3"  # the client's Finished is its last word
            tls.write(b"EHLO eager.example\r\n")
            raw.sendall(outgoing.read())  # its Finished and its EHLO together
            incoming.write(read_to_close(raw, 65536))
        wire = b""
        with contextlib.suppress(ssl.SSLZeroReturnError):  # our close_notify ends the text
            while text := tls.read(65536):
                wire += text
        assert wire.startswith(b"421 4.7.0 ") and wire.count(b"\r\n") == 1, wire
        assert first.noop()[0] == 250
    assert request_stats(d)["connections_rejected"]["max_connections_per_ip"] == 1


def test_a_refused_smtps_client_that_never_handshakes_is_let_go(daemon_factory, certs, tmp_path):
    """The refusal's handshake is cut short (worker.REFUSAL_TLS_TIMEOUT, 1 s): a client over
    the limit that says nothing does not keep the worker."""
    d, implicit = one_smtps_session_per_address(daemon_factory, certs, tmp_path)
    with smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context()) as first:
        assert first.noop()[0] == 250
        with socket.create_connection((HOST, implicit), timeout=30) as silent:
            assert replies_until_eof(silent) == b""  # closed by the server, no handshake done
        wait_log_count(d, "refused: max_connections_per_ip", 1)
        assert first.noop()[0] == 250
    # The log says the 421 never went out, and why.
    assert "[SMTP] <421 not sent: the client left, or its TLS handshake failed" in d.log_text()


def test_a_refused_smtps_client_that_trickles_its_hello_is_let_go_within_the_deadline(
        daemon_factory, certs, tmp_path):
    """REFUSAL_TLS_TIMEOUT bounds the whole handshake, not each read: a client over its
    limit that sends its ClientHello an octet at a time cannot hold the worker longer
    (one address could otherwise keep every worker busy with refusals)."""
    d, implicit = one_smtps_session_per_address(daemon_factory, certs, tmp_path)
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)  # a ClientHello's start
    with smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context()) as first:
        assert first.noop()[0] == 250
        with socket.create_connection((HOST, implicit), timeout=TIMEOUT) as slow:
            slow.settimeout(0.2)
            start, closed = time.monotonic(), False
            for octet in hello:  # bounded: 43 octets, one each 0.2 s
                try:
                    slow.sendall(bytes([octet]))
                    closed = slow.recv(4096) == b""
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
            elapsed = time.monotonic() - start
        # About REFUSAL_TLS_TIMEOUT (1 s); the old per-read timeout let the 43 octets
        # take their 8.6 s and more.  The bound leaves room for a loaded machine.
        assert closed and elapsed < 6.0, elapsed
        wait_log_count(d, "refused: max_connections_per_ip", 1)


def test_in_stress_mode_a_refused_smtps_client_is_closed_at_once(daemon_factory, certs, tmp_path):
    """Workers are scarce in stress mode: a refusal on the SMTPS port costs no handshake."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    implicit = free_port()
    d = daemon_factory(workers=2, server={"max_connections_per_ip": 1, "max_workers": 4,
                                          "stress_threshold": 0.25},
                       sections=tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]}))
    with smtplib.SMTP_SSL(HOST, implicit, timeout=TIMEOUT, context=certs.client_context()) as first:
        assert first.noop()[0] == 250
        wait_until(lambda: request_stats(d)["stress"], TIMEOUT, 0.1, "stress mode on")
        with socket.create_connection((HOST, implicit), timeout=TIMEOUT) as refused:
            # A client that does try: the server takes no part in its handshake, which
            # fails (the close); a refusal outside stress mode would complete it and
            # send the 421 inside (a timeout here would be neither).  At once: a bound
            # far above the milliseconds it takes, far below a wait for the client
            # (stress_command, 10 s).
            started = time.monotonic()
            with pytest.raises((ssl.SSLError, ConnectionError)):
                certs.client_context().wrap_socket(refused, server_hostname="localhost")
            assert time.monotonic() - started < 5.0
        wait_log_count(d, "refused: max_connections_per_ip", 1)
    assert "[SMTP] <421 not sent: no TLS handshake in stress mode>" in d.log_text()


def test_master_writes_no_plaintext_to_an_smtps_client_when_every_worker_is_busy(
        daemon_factory, certs, tmp_path):
    """At the ceiling the master answers queued clients itself, but does no TLS (a slow
    handshake would stall the supervisor): on the SMTPS port it closes without a word,
    rather than write a plaintext 421 into what the client reads as TLS."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    implicit = free_port()
    d = daemon_factory(workers=1, server={"max_workers": 1},
                       sections=tls_sections(certs, pw, tls={"implicit_listen": [f"{HOST}:{implicit}"]}))
    with smtplib.SMTP(HOST, d.port, timeout=TIMEOUT) as busy:  # the only worker
        assert busy.noop()[0] == 250
        with socket.create_connection((HOST, implicit), timeout=TIMEOUT) as queued:
            assert replies_until_eof(queued) == b""
        d.wait_for_log("refused by master")


def test_require_tls_and_required_auth(daemon_factory, certs, tmp_path):
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections=tls_sections(certs, pw, tls={"require_tls": True, "min_version": "TLSv1.3"},
                                             auth_cfg={"required": True}))
    before = set(d.new_messages())
    with smtplib.SMTP(HOST, d.port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.docmd("MAIL", f"FROM:<{FROM}>") == (530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=certs.client_context())
        assert client.sock.version() == "TLSv1.3"
        client.ehlo("client.test")
        assert client.docmd("MAIL", f"FROM:<{FROM}>") == (530, b"5.7.0 Authentication required")
        assert client.login("alice", PASSWORD)[0] == 235
        assert client.sendmail(FROM, [TO], BODY) == {}
    assert len(stored_since(d, before)) == 1
    # min_version = TLSv1.3: a client that stops at TLS 1.2 does not get in.
    old = certs.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP(HOST, d.port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=old)
    wait_log_count(d, "handshake failed", 1)


def stall_in_handshake(d: Daemon) -> None:
    """Ask for STARTTLS, then never send a ClientHello: the server must give up by
    itself (socket.timeout here means it waited for its longest timeout instead)."""
    sock = connect(d.port, timeout=TIMEOUT)
    try:
        replies = Replies(sock)
        replies.next()
        sock.sendall(b"EHLO x\r\nSTARTTLS\r\n")
        assert replies.next().startswith(b"250-")
        assert replies.next().startswith(b"220 2.0.0")
        sock.settimeout(TIMEOUT)  # the server, not this bound, must end it
        data = replies_until_eof(sock)
        assert not re.search(rb"(^|\n)[2-5]\d\d[ -]", data), data
    finally:
        sock.close()


def test_handshake_has_its_own_timeout(daemon_factory, certs, tmp_path):
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections={**tls_sections(certs, pw), "timeouts": {"command": 1}})
    stall_in_handshake(d)
    text = wait_log_count(d, "handshake failed", 1)
    assert "handshake timed out" in text


def test_the_wait_for_ehlo_after_starttls_starts_when_the_handshake_ends(daemon_factory, certs, tmp_path):
    """The handshake and the next command each get the command timeout (as Postfix's
    smtpd_starttls_timeout and smtpd_timeout); the time a slow handshake took used to
    come out of the client's wait for its EHLO."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections={**tls_sections(certs, pw), "timeouts": {"command": 4}})
    sock = socket.create_connection((HOST, d.port), timeout=TIMEOUT)
    try:
        read_reply(sock)
        sock.sendall(b"EHLO client.test\r\n")
        read_reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock).startswith(b"220 ")
        time.sleep(2.6)  # a slow client: the handshake ends 2.6 s after the 220
        tls = certs.client_context().wrap_socket(sock, server_hostname="localhost")
        time.sleep(2.6)  # 5.2 s after the 220, 2.6 s after the handshake
        tls.sendall(b"EHLO client.test\r\n")
        assert read_reply(tls).startswith(b"250-"), "timed out during the client's turn"
        tls.sendall(b"QUIT\r\n")
        assert read_reply(tls).startswith(b"221 ")
    finally:
        sock.close()


def test_handshake_timeout_is_short_in_stress_mode(daemon_factory, certs, tmp_path):
    """Under stress the command timeout shrinks (Postfix: smtpd_starttls_timeout is
    ${stress?10}:{300}); a client that stalls in the handshake must not keep the worker
    for the full unstressed timeout."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(server={"workers": 2, "max_workers": 2, "stress_threshold": 0.5},
                       sections={**tls_sections(certs, pw), "timeouts": {"stress_command": 1}})
    idle = smtplib.SMTP(HOST, d.port, timeout=TIMEOUT)  # one of two workers busy: stress
    try:
        idle.ehlo("client.test")
        d.wait_for_log("stress mode on", TIMEOUT)
        stall_in_handshake(d)
        assert "handshake timed out" in wait_log_count(d, "handshake failed", 1)
    finally:
        idle.close()


# -- SASLprep: one password, several spellings -----------------------------------------------

def test_a_password_set_in_one_unicode_spelling_logs_in_from_another(daemon_factory, certs, tmp_path):
    """RFC 4616 2 / RFC 4013: `forksmtp passwd` stores the prepared form and the daemon
    prepares what the client sends, so a decomposed accent, a no-break space or a soft
    hyphen (what another keyboard or a pasted password gives) is the same password."""
    pw = tmp_path / "passwd"
    made = subprocess.run([sys.executable, "-m", "forksmtp", "passwd", "jose\u0301", "-f", str(pw)],
                          input="caf\u00e9 cr\u00e8me\n".encode(), capture_output=True, timeout=30)
    assert made.returncode == 0, made.stderr
    d = daemon_factory(sections=tls_sections(certs, pw))
    before = set(d.new_messages())
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("jose\u0301", "cafe\u0301\u00a0cr\u00e8\u00adme")) == (
            235, b"2.7.0 Authentication successful")
        assert client.sendmail(FROM, [TO], BODY) == {}
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "LOGIN " + b64("jos\u00e9"))[0] == 334
        assert client.docmd(b64("caf\u00e9\u3000cre\u0300me"))[0] == 235  # IDEOGRAPHIC SPACE
    with starttls_client(d, certs) as client:  # another password is still another password
        assert client.docmd("AUTH", "PLAIN " + plain("jos\u00e9", "cafe creme"))[0] == 535
        assert client.docmd("AUTH", "PLAIN " + plain("jos\u00e9", "caf\u00e9 cr\u00e8me\u0007"))[0] == 535
    (path,) = stored_since(d, before)
    # The name as stored (one "?" for "é"), not as sent ("jose?" for "e" + U+0301).
    assert "(authenticated as jos?)" in received_header(path)


# -- AUTH failures and the per-IP limit ---------------------------------------------------------

def test_wrong_password_then_the_per_ip_limit(daemon_factory, certs, tmp_path):
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections=tls_sections(certs, pw))
    with starttls_client(d, certs) as client:  # failures in two sessions count together
        for _ in range(3):
            assert client.docmd("AUTH", "PLAIN " + plain("alice", "guess")) == (
                535, b"5.7.8 Authentication credentials invalid")
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("o'brien", "guess"))[0] == 535
        assert client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD, authzid="root"))[0] == 535
    with starttls_client(d, certs) as client:  # the sixth attempt, with the right password
        code, text = client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))
        assert (code, text[:5]) == (421, b"4.7.0")
        assert replies_until_eof(client.sock) == b""
    wait_log_count(d, "refused: too many failures", 1)
    # The user name in single quotes, whatever it holds; the command before its outcome.
    assert "PLAIN user='o\\'brien' failed" in d.log_text()
    lines = d.log_text().splitlines()
    refused = next(i for i, line in enumerate(lines) if "refused: too many failures" in line)
    assert "[SMTP] AUTH PLAIN ***" in lines[refused - 1], lines[refused - 3:refused + 2]
    assert "[SMTP] 421 4.7.0" in lines[refused + 1], lines[refused - 3:refused + 2]
    # Per address: another loopback address is not blocked.
    client = smtplib.SMTP(HOST, d.port, timeout=TIMEOUT, source_address=("127.0.0.2", 0))
    try:
        client.ehlo("client.test")
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        assert client.login("alice", PASSWORD)[0] == 235
    finally:
        client.close()


def test_right_passwords_sent_at_once_on_many_connections_are_all_taken(daemon_factory, certs,
                                                                         tmp_path):
    """An MTA delivering in parallel logs in on many connections at the same moment.
    The checks running count against the failure limit (5), so the sixth and later wait
    for one to end: each login succeeds, none is told it failed."""
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(workers=8, server={"max_workers": 12}, sections=tls_sections(certs, pw))
    clients = [starttls_client(d, certs) for _ in range(8)]
    barrier = threading.Barrier(len(clients))
    results: list[int] = []

    def login(client: smtplib.SMTP) -> None:
        barrier.wait(TIMEOUT)
        results.append(client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))[0])

    threads = [threading.Thread(target=login, args=(c,)) for c in clients]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * TIMEOUT)
    finally:
        for c in clients:
            c.close()
    assert results == [235] * 8
    assert request_stats(d)["auth"] == {"succeeded": 8, "failed": 0, "deferred": 0, "checks_running": 0,
                                        "checks_max": len(os.sched_getaffinity(0))}
    assert "too many failures" not in d.log_text()


def _slow_password_file(path: Path, user: str, password: str) -> Path:
    """A password file whose hash takes about a second to check (scrypt's p = 16, where
    the default is 1): time enough to stop a worker inside the check, however slow the
    machine is at the moment."""
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=1 << auth.LOG2_N, r=auth.R, p=16,
                         dklen=auth.KEY_LEN, maxmem=64 << 20)
    encoded = "$".join(["scrypt", str(auth.LOG2_N), str(auth.R), "16",
                        base64.b64encode(salt).decode(), base64.b64encode(key).decode()])
    path.write_text(f"{user}:{encoded}\n")
    path.chmod(0o600)
    return path


def _stop_inside_the_check(worker: psutil.Process, before: float) -> None:
    """Suspend ``worker`` once it has spent 30 ms of CPU since ``before`` (its CPU time
    then): it is inside the check, which takes about a second."""
    wait_until(lambda: sum(worker.cpu_times()[:2]) - before >= 0.03, timeout=20, interval=0.002,
               what="the worker to start the password check")
    worker.suspend()


def _five_checks_held(daemon_factory, certs, tmp_path, clients: list, stopped: list):
    """A daemon with AUTH and six STARTTLS sessions (appended to ``clients``): AUTH sent
    on the first five, each one's worker stopped inside its scrypt check (appended to
    ``stopped``), so that five checks of the address stay running (``auth.max_checks``
    leaves room for them).  Returns the daemon and when the fifth AUTH was sent."""
    pw = _slow_password_file(tmp_path / "passwd", "alice", PASSWORD)
    d = daemon_factory(workers=8, server={"max_workers": 12},
                       sections=tls_sections(certs, pw, auth_cfg={"max_checks": 8}))
    clients.extend(starttls_client(d, certs) for _ in range(6))
    sent = 0.0
    for client in clients[:5]:
        worker = serving_worker(d, client.sock)
        before = sum(worker.cpu_times()[:2])
        sent = time.monotonic()
        client.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode())
        _stop_inside_the_check(worker, before)
        stopped.append(worker)
    return d, sent


def _resume(workers: list) -> None:
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.resume()


needs_select_nr = pytest.mark.skipif(
    "select" not in SYSCALL_NR, reason="needs select's system call number (x86_64, aarch64)")


def _in_auth_wait(worker: psutil.Process, status: str = psutil.STATUS_SLEEPING) -> bool:
    """Is the worker in its wait for one of its address's running checks to end
    (Worker.auth_attempt, given BUSY)?  Its select there is the only one a worker makes:
    a session waits in poll, the accept loop in epoll_wait."""
    return in_any_syscall(worker, "select", status)


def _wait_in_auth_wait(worker: psutil.Process) -> None:
    # Seen asleep there, not guessed from a pause: a sixth AUTH not read yet, or not yet
    # told BUSY, would take any signal on another path.
    wait_until(lambda: _in_auth_wait(worker), 10, 0.005, "the sixth AUTH in its wait")


def _suspend_in_auth_wait(worker: psutil.Process) -> None:
    """Suspend the worker inside its AUTH wait's select.  The wait sleeps 20 ms at a
    time, so a stop may land between two sleeps (in attempt(), the admission lock held):
    such a stop is undone and tried again."""
    def suspended_there() -> bool:
        _wait_in_auth_wait(worker)
        worker.suspend()
        wait_until(lambda: worker.status() == psutil.STATUS_STOPPED, 10, 0.005, "the worker stopped")
        if _in_auth_wait(worker, psutil.STATUS_STOPPED):
            return True
        worker.resume()
        return False
    wait_until(suspended_there, 10, 0, "the worker suspended in its AUTH wait")


@needs_select_nr
def test_sigquit_reaches_an_auth_waiting_for_the_checks_of_its_address(daemon_factory, certs,
                                                                         tmp_path):
    """Five checks of one address stay running (their workers stopped mid-check): a
    sixth AUTH waits for one of them to end.  SIGQUIT to the master must still get that
    session its 421 before the master's SIGKILL, 3 s later, not a reset."""
    clients: list = []
    stopped: list = []
    try:
        d, _ = _five_checks_held(daemon_factory, certs, tmp_path, clients, stopped)
        waiting = clients[5]
        waiter = serving_worker(d, waiting.sock)
        waiting.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode())
        _wait_in_auth_wait(waiter)
        d.signal(signal.SIGQUIT)
        waiting.sock.settimeout(2.5)
        assert read_reply(waiting.sock).startswith(b"421 4.3.2 "), "no 421 before the SIGKILL"
    finally:
        _resume(stopped)
        for c in clients:
            c.close()


@needs_select_nr
def test_an_auth_told_to_quit_as_a_check_slot_frees_gives_that_slot_back(daemon_factory, certs,
                                                                          tmp_path):
    """A sixth AUTH waits for one of five running checks of its address to end; one
    ends, and in the same instant its worker is told to quit (a SIGQUIT, as at the end
    of a reload's graceful_timeout).  The slot it was then given must be given back:
    kept, the address had one check fewer until the stale-entry repair, and its next
    AUTH waited 5 s for a 454 while only four checks ran."""
    clients: list = []
    stopped: list = []
    try:
        d, _ = _five_checks_held(daemon_factory, certs, tmp_path, clients, stopped)
        waiting = clients[5]
        waiter = serving_worker(d, waiting.sock)
        waiting.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode())
        _suspend_in_auth_wait(waiter)  # told BUSY once, and to look again when resumed
        stopped[0].resume()  # one check ends: a slot is free when the waiter looks again
        assert read_reply(clients[0].sock).startswith(b"235 ")
        waiter.send_signal(signal.SIGQUIT)
        waiter.resume()
        waiting.sock.settimeout(5)
        assert read_reply(waiting.sock).startswith(b"421 4.3.2 ")
        fresh = starttls_client(d, certs)
        clients.append(fresh)
        started = time.monotonic()
        code, _ = fresh.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))
        # Four checks run (their workers stopped): the fifth slot is the fresh one's.
        assert code == 235, f"{code} after {time.monotonic() - started:.1f}s: the slot was kept"
    finally:
        _resume(stopped)
        for c in clients:
            c.close()


def test_an_auth_that_waits_past_its_bound_gets_454_and_the_session_goes_on(daemon_factory, certs,
                                                                             tmp_path):
    """No running check of the address ends within AUTH_WAIT (5 s): the sixth AUTH gets
    454 4.7.0, its credentials unchecked, and the session goes on.

    The five checks count as running until RUNNING_STALE (10 s) after the last of them
    began, as a worker killed in a check must not hold its count for good.  So a host
    that stalls the test or the sixth worker for 5 s or more lets the sixth AUTH in: a
    235 that comes RUNNING_STALE or more after the fifth AUTH was sent is such a try,
    made again with a daemon of its own.  Sooner, a 235 is a check counted wrongly."""
    for attempt in range(3):
        code, text, waited, since_fifth = _sixth_auth_past_five_checks(daemon_factory, certs,
                                                                       tmp_path / f"try{attempt}")
        if not (code == 235 and since_fifth >= authlimit.RUNNING_STALE):
            break
    timing = f"{waited:.2f}s waited, {since_fifth:.2f}s after the fifth AUTH"
    assert (code, text) == (454, b"4.7.0 Temporary authentication failure"), timing
    assert 4.9 <= waited < 10.0, timing  # AUTH_WAIT, not the checks' end (never, here)


def _sixth_auth_past_five_checks(daemon_factory, certs, tmp_path: Path):
    """The sixth AUTH beside five checks held: its reply, how long it waited for it, and
    how long after the fifth AUTH was sent it came.  A 454 must leave the session going
    on and be logged."""
    tmp_path.mkdir()
    clients: list = []
    stopped: list = []
    try:
        d, fifth_sent = _five_checks_held(daemon_factory, certs, tmp_path, clients, stopped)
        waiting = clients[5]
        started = time.monotonic()
        code, text = waiting.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))
        now = time.monotonic()
        if code == 454:
            assert waiting.noop()[0] == 250
    finally:
        _resume(stopped)
        for c in clients:
            c.close()
    if code == 454:
        d.wait_for_log("deferred: password checks running at once fill the failure limit")
    else:
        d.stop()  # its five resumed checks would load the next try's host
    return code, text, now - started, now - fifth_sent


def _one_check_held(daemon_factory, certs, tmp_path, clients: list, stopped: list):
    """A daemon with ``auth.max_checks = 1`` and two STARTTLS sessions from two
    addresses (appended to ``clients``): AUTH sent on the first, its worker stopped
    inside the check (appended to ``stopped``), so the server's one check is taken."""
    pw = _slow_password_file(tmp_path / "passwd", "alice", PASSWORD)
    d = daemon_factory(workers=3, sections=tls_sections(certs, pw, auth_cfg={"max_checks": 1}))
    clients.append(starttls_client(d, certs))
    clients.append(starttls_client(d, certs, source="127.0.0.2"))
    worker = serving_worker(d, clients[0].sock)
    before = sum(worker.cpu_times()[:2])
    clients[0].send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode())
    _stop_inside_the_check(worker, before)
    stopped.append(worker)
    assert request_stats(d)["auth"] == {"succeeded": 0, "failed": 0, "deferred": 0,
                                        "checks_running": 1, "checks_max": 1}
    return d


def test_an_auth_beyond_the_servers_checks_at_once_waits_then_gets_454(daemon_factory, certs,
                                                                       tmp_path):
    """The server's one check (``auth.max_checks = 1``) is held by another address's
    session: an AUTH from an address under every limit of its own waits AUTH_WAIT (5 s)
    for it, gets 454 4.7.0 with its credentials unchecked, and logs in once the check
    has ended.  (Uncapped, fifty such checks at once took both cores and a gigabyte.)"""
    clients: list = []
    stopped: list = []
    try:
        d = _one_check_held(daemon_factory, certs, tmp_path, clients, stopped)
        holder, other = clients
        started = time.monotonic()
        code, text = other.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))
        waited = time.monotonic() - started
        assert (code, text) == (454, b"4.7.0 Temporary authentication failure")
        assert 4.9 <= waited < 10.0, waited
        stopped[0].resume()
        assert read_reply(holder.sock).startswith(b"235 ")
        assert other.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))[0] == 235
    finally:
        _resume(stopped)
        for c in clients:
            c.close()
    d.wait_for_log("127.0.0.2 deferred: every password check the server runs at once is in use")
    assert request_stats(d)["auth"] == {"succeeded": 2, "failed": 0, "deferred": 1,
                                        "checks_running": 0, "checks_max": 1}


def test_a_check_whose_worker_is_killed_is_given_back_with_its_slot(daemon_factory, certs, tmp_path):
    """A worker killed inside a check (the OOM killer picks workers first) never ends
    it: the master's repair of its slot does, before the worker that replaces it is
    forked, so the server's one check is free at once, not RUNNING_STALE (10 s) later."""
    clients: list = []
    stopped: list = []
    try:
        d = _one_check_held(daemon_factory, certs, tmp_path, clients, stopped)
        killed = stopped.pop()
        killed.kill()
        wait_until(lambda: workers_replacing(d, {killed.pid}, count=3), 10, what="the worker replaced")
        assert request_stats(d)["auth"]["checks_running"] == 0
        assert clients[1].docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))[0] == 235
    finally:
        _resume(stopped)
        for c in clients:
            c.close()


def test_auth_max_checks_defaults_to_the_cpus_the_master_may_run_on(daemon_factory, certs, tmp_path):
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections=tls_sections(certs, pw))
    assert request_stats(d)["auth"]["checks_max"] == len(os.sched_getaffinity(0))  # the daemon's are ours
    d.sections["auth"]["max_checks"] = 3
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration generation 2")
    assert request_stats(d)["auth"]["checks_max"] == 3


# -- --check ---------------------------------------------------------------------------------------

def check(tmp_path: Path, name: str, cert, key) -> subprocess.CompletedProcess:
    conf = write_config(tmp_path / f"{name}.toml", {
        "delivery": {"maildir": str(tmp_path / "Maildir")},
        "tls": {"cert_file": str(cert), "key_file": str(key)}})
    return subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(conf), "--check"],
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def test_check_accepts_the_pair(certs, tmp_path):
    r = check(tmp_path, "good", certs.cert, certs.key)
    assert r.returncode == 0, r.stderr
    assert b"TLS" in r.stdout


@pytest.mark.parametrize("case, expected_key", [
    ("missing-cert", "tls.cert_file"),
    ("missing-key", "tls.key_file"),
    ("mismatched-key", "tls.key_file"),
    ("garbage-cert", "tls.cert_file"),
    ("key-as-cert", "tls.cert_file"),
    ("cert-as-key", "tls.key_file"),
    ("empty-key", "tls.key_file"),
    ("encrypted-key", "tls.key_file"),
])
def test_check_names_the_bad_key(certs, tmp_path, case, expected_key):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cert, key = {
        "missing-cert": (tmp_path / "none.pem", certs.key),
        "missing-key": (certs.cert, tmp_path / "none.key"),
        "mismatched-key": (certs.cert, certs.other_key),
        "garbage-cert": (garbage, certs.key),
        "key-as-cert": (certs.key, certs.key),
        "cert-as-key": (certs.cert, certs.cert),
        "empty-key": (certs.cert, empty),
        "encrypted-key": (certs.cert, certs.encrypted_key),
    }[case]
    r = check(tmp_path, case, cert, key)
    err = r.stderr.decode()
    assert r.returncode == 2, (r.stdout, err)
    assert expected_key in err and f"{case}.toml" in err, err
    other = {"tls.cert_file": "tls.key_file", "tls.key_file": "tls.cert_file"}[expected_key]
    assert other not in err, err
    said = {"missing-cert": "No such file", "missing-key": "No such file",
            "encrypted-key": "encrypted with a pass phrase",
            "garbage-cert": "holds no certificate in PEM form (OpenSSL: ",
            "key-as-cert": "holds no certificate in PEM form (OpenSSL: "}.get(
        case, "is not the certificate's private key in PEM form (OpenSSL: ")
    assert said in err, err


def test_check_with_an_encrypted_key_never_prompts_on_a_terminal(certs, tmp_path):
    """OpenSSL prompts for a pass phrase on the controlling terminal when nobody gives a
    callback: --check (and the master on start or SIGHUP) would hang there."""
    conf = write_config(tmp_path / "enc.toml", {
        "delivery": {"maildir": str(tmp_path / "Maildir")},
        "tls": {"cert_file": str(certs.cert), "key_file": str(certs.encrypted_key)}})
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session with the pty as its controlling terminal
        try:
            os.execv(sys.executable, [sys.executable, "-m", "forksmtp", "-c", str(conf), "--check"])
        finally:
            os._exit(127)
    out, eof = b"", False
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                break
            if eof:
                time.sleep(0.05)
                continue
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                eof = not chunk
                out += chunk
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert pid == 0, f"--check still running after 20 s; terminal shows {out!r}"
    assert os.waitstatus_to_exitcode(status) == 2
    assert b"pass phrase:" not in out.lower()


# -- SIGHUP: certificates and passwords re-read ------------------------------------------------

def install(src_cert: Path, src_key: Path, cert: Path, key: Path) -> None:
    """Replace the served files the way a renewal does (write, then rename)."""
    for src, dst in ((src_cert, cert), (src_key, key)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def reload(d: Daemon, generation: int) -> set[int]:
    """SIGHUP; wait for the new generation; the pids of the workers before it."""
    old = {w.pid for w in d.workers()}
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"configuration generation {generation} loaded", TIMEOUT)
    return old


def live_cert_daemon(daemon_factory, certs, tmp_path, **users) -> tuple[Daemon, Path, Path, Path]:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    install(certs.cert, certs.key, cert, key)
    pw = password_file(tmp_path / "passwd", **(users or {"alice": PASSWORD}))
    d = daemon_factory(sections=tls_sections(certs, pw, cert=cert, key=key))
    return d, cert, key, pw


def test_sighup_swaps_the_certificate_while_a_session_runs(daemon_factory, certs, tmp_path):
    d, cert, key, _ = live_cert_daemon(daemon_factory, certs, tmp_path)
    before = set(d.new_messages())
    a = starttls_client(d, certs)
    try:
        assert fingerprint(a.sock) == certs.fingerprint(1)
        assert a.login("alice", PASSWORD)[0] == 235
        busy = serving_worker(d, a.sock).pid
        install(certs.cert2, certs.key2, cert, key)
        old = reload(d, 2)
        # The idle old workers retire; the one serving A finishes its session first.
        wait_until(lambda: {w.pid for w in d.workers()} & old == {busy}, TIMEOUT, what="old idle workers gone")
        with starttls_client(d, certs) as b:
            assert fingerprint(b.sock) == certs.fingerprint(2)
            assert b.login("alice", PASSWORD)[0] == 235
            assert b.sendmail(FROM, [TO], BODY) == {}
        # The session opened before the reload goes on over its original TLS session.
        assert a.sendmail(FROM, [TO], BODY) == {}
        assert fingerprint(a.sock) == certs.fingerprint(1)
        assert a.noop()[0] == 250
    finally:
        a.close()
    wait_until(lambda: busy not in {w.pid for w in d.workers()}, TIMEOUT, what="the old worker retires")
    stored = stored_since(d, before, 2)
    assert all(" with ESMTPSA id " in received_header(p) for p in stored)


def test_sighup_with_a_bad_certificate_keeps_the_old_one(daemon_factory, certs, tmp_path):
    d, cert, key, _ = live_cert_daemon(daemon_factory, certs, tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    for n, (new_cert, new_key, named) in enumerate([(garbage, certs.key, "tls.cert_file"),
                                                     (certs.cert2, certs.other_key, "tls.key_file")], 1):
        install(new_cert, new_key, cert, key)
        d.signal(signal.SIGHUP)
        text = d.wait_for_log("reload failed", TIMEOUT, count=n)
        failure = [line for line in text.splitlines() if "reload failed" in line][-1]
        assert named in failure, failure
        with starttls_client(d, certs) as client:
            assert fingerprint(client.sock) == certs.fingerprint(1)
            assert client.login("alice", PASSWORD)[0] == 235
            assert client.sendmail(FROM, [TO], BODY) == {}
    assert "configuration generation 2" not in d.log_text()
    # A good pair later is taken.
    install(certs.cert2, certs.key2, cert, key)
    old = reload(d, 2)
    wait_until(lambda: not ({w.pid for w in d.workers()} & old), TIMEOUT, what="old workers gone")
    with starttls_client(d, certs) as client:
        assert fingerprint(client.sock) == certs.fingerprint(2)


def test_sighup_rereads_the_password_file(daemon_factory, certs, tmp_path):
    d, _, _, pw = live_cert_daemon(daemon_factory, certs, tmp_path, alice="old-alice")
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("bob", "bob-pw"))[0] == 535
    password_file(pw, bob="bob-pw", alice="new-alice")
    old = reload(d, 2)
    wait_until(lambda: not ({w.pid for w in d.workers()} & old), TIMEOUT, what="old workers gone")
    before = set(d.new_messages())
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("bob", "bob-pw"))[0] == 235
        assert client.sendmail(FROM, [TO], BODY) == {}
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("alice", "old-alice"))[0] == 535
        assert client.docmd("AUTH", "PLAIN " + plain("alice", "new-alice"))[0] == 235
    (path,) = stored_since(d, before)
    assert "(authenticated as bob)" in received_header(path)


def _hash_of_bob() -> str:
    return auth.hash_password("b")


@pytest.mark.parametrize("break_it, said", [
    (lambda pw: pw.rename(pw.parent / "moved"), "no such file"),
    (lambda pw: pw.write_bytes(b"b\xf6b:" + _hash_of_bob().encode() + b"\n"),
     "line 1: not UTF-8 text (octet 0xf6 at position 2)"),  # Latin-1, from an old editor
    (lambda pw: pw.write_text(f"IX:{_hash_of_bob()}\n\u2168:{_hash_of_bob()}\n"),
     "line 2: user name '\u2168' is the user of line 1 too"),
], ids=["gone", "not-utf-8", "one-name-twice"])
def test_sighup_with_the_password_file_broken_keeps_the_old_users(daemon_factory, certs, tmp_path,
                                                                  break_it, said):
    """A password file moved away (a typo, a deploy) or broken when a reload comes is a
    failed reload, as a bad certificate is, not a server where nobody can authenticate
    any more, nor a master that dies of it."""
    d, _, _, pw = live_cert_daemon(daemon_factory, certs, tmp_path, alice="old-alice")
    break_it(pw)
    d.signal(signal.SIGHUP)
    text = d.wait_for_log("reload failed", TIMEOUT)
    failure = [line for line in text.splitlines() if "reload failed" in line][-1]
    assert f"{d.config_path}: auth.password_file = {shown(str(pw))}: {pw}: {said}" in failure, failure
    with starttls_client(d, certs) as client:
        assert client.docmd("AUTH", "PLAIN " + plain("alice", "old-alice"))[0] == 235
    # --check and a start say the same and refuse.
    done = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(d.config_path), "--check"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"{pw}: {said}" in done.stderr, done
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("left, said", [
    (14 * 86400 + 1, ""),
    (14 * 86400, "the certificate expires on 2023-11-28 22:13:20 UTC, in 14 days"),
    (86400 + 1, "the certificate expires on 2023-11-15 22:13:21 UTC, in 2 days"),
    (1, "the certificate expires on 2023-11-14 22:13:21 UTC, in 1 day"),
    (0, "the certificate expired on 2023-11-14 22:13:20 UTC; clients that verify it refuse the session"),
], ids=["15-days", "14-days", "a-day-and-a-second", "a-second", "ended"])
def test_when_the_end_of_a_certificate_is_said(left, said):
    now = 1_700_000_000.0
    assert expiry_warning(now + left, now) == said
    assert expiry_warning(None, now) == ""  # not read: loading the context says why


def test_a_certificate_past_or_near_its_end_is_warned_about(daemon_factory, certs, tmp_path):
    """It loads and is served (most clients do not verify), but the operator is told, at
    a start, a reload and --check, naming the file, the key and the value; a renewed
    one is not warned about."""
    expired = tls_certs.dated_cert(certs, "expired", start="20200101000000Z", end="20200201000000Z")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    install(expired, certs.key, cert, key)
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections=tls_sections(certs, pw, cert=cert, key=key))
    text = d.wait_for_log("tls.cert_file = ", TIMEOUT)
    problem = (f"{d.config_path}: tls.cert_file = {shown(str(cert))}: the certificate expired on 2020-02-01 00:00:00 UTC; "
               "clients that verify it refuse the session; renew it, then SIGHUP")
    assert [line.split(" [TLS] ", 1)[1] for line in text.splitlines() if "tls.cert_file = " in line] == [problem]
    check = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(d.config_path), "--check"],
                           capture_output=True, text=True, timeout=30)
    assert (check.returncode, check.stderr) == (0, f"forksmtp: warning: {problem}\n")
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(HOST, d.port, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.starttls(context=unverified)[0] == 220
        assert client.sock.getpeercert(True) == ssl.PEM_cert_to_DER_cert(expired.read_text())

    install(certs.cert, certs.key, cert, key)  # renewed: 30 days left
    reload(d, 2)
    install(tls_certs.dated_cert(certs, "ending", days=3), certs.key, cert, key)
    reload(d, 3)
    text = d.wait_for_log("tls.cert_file = ", TIMEOUT, count=2)
    warnings = [line for line in text.splitlines() if " [TLS] " in line and "tls.cert_file = " in line]
    assert len(warnings) == 2 and ": the certificate expires on " in warnings[1], warnings
    assert warnings[1].endswith(", in 3 days; renew it, then SIGHUP"), warnings[1]


def test_a_certificate_near_its_end_is_warned_about_once_a_day_while_it_is_served(certs, tmp_path):
    """A server up for months is told again by the hourly pass, at most once in 24 hours
    (CERT_WARN_EVERY), however often the pass runs; the master's own step, in-process."""
    from forksmtp.arbiter import CERT_WARN_EVERY, Arbiter
    from forksmtp.config import load_config

    assert CERT_WARN_EVERY == 86400.0
    cert = tls_certs.dated_cert(certs, "daily", start="20200101000000Z", end="20200201000000Z")
    log = tmp_path / "forksmtp.log"
    (tmp_path / "forksmtp.toml").write_text(f'[log]\nfile = "{log}"\n[tls]\ncert_file = "{cert}"\n'
                                            f'key_file = "{certs.key}"\n')
    arbiter = Arbiter(load_config(str(tmp_path / "forksmtp.toml")))
    arbiter._note_certificate(arbiter.cfg)  # the start's: said at once
    start = time.monotonic()
    for hours in (1, 2, 23):
        arbiter._warn_certificate(start + hours * 3600)
    assert log.read_text().count("the certificate expired on 2020-02-01") == 1
    arbiter._warn_certificate(start + CERT_WARN_EVERY + 1)  # a day on: said again
    assert log.read_text().count("the certificate expired on 2020-02-01") == 2
    arbiter._note_certificate(arbiter.cfg)  # a reload: said at once, whatever the day's count
    assert log.read_text().count("the certificate expired on 2020-02-01") == 3


def test_sighup_adding_an_smtps_address_in_use_names_its_key(daemon_factory, certs, tmp_path):
    """An implicit-TLS address that cannot be bound is named by its own key, not by
    server.listen, with the file it was set in."""
    d, _, _, _ = live_cert_daemon(daemon_factory, certs, tmp_path)
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        busy = holder.getsockname()[1]
        d.sections["tls"]["implicit_listen"] = [f"{HOST}:{busy}"]
        d.write_config()
        d.signal(signal.SIGHUP)
        text = d.wait_for_log("reload failed", TIMEOUT)
    failure = [line for line in text.splitlines() if "reload failed" in line][-1]
    assert failure.endswith(f"keeping the running configuration: {d.config_path}: tls.implicit_listen: "
                            f"cannot listen on {HOST}:{busy}: Address already in use"), failure
    with starttls_client(d, certs) as client:
        assert client.login("alice", PASSWORD)[0] == 235


@pytest.mark.parametrize("which, key", [("cert", "tls.cert_file"), ("key", "tls.key_file"),
                                        ("passwords", "auth.password_file")])
def test_a_fifo_where_a_tls_or_password_file_belongs_fails_the_reload_at_once(
        daemon_factory, certs, tmp_path, which, key):
    """Opening a FIFO for reading waits for a writer: the master, reloading, sat in that
    open, handling no signal (SIGUSR1, SIGTERM) and reaping no worker until something
    wrote into it; --check hung the same way.  Such a file is not a regular file, and
    the reload fails at once, naming it."""
    d, cert, key_file, pw = live_cert_daemon(daemon_factory, certs, tmp_path)
    path = {"cert": cert, "key": key_file, "passwords": pw}[which]
    path.unlink()
    os.mkfifo(path)
    d.signal(signal.SIGHUP)
    text = d.wait_for_log("reload failed", TIMEOUT)
    failure = [line for line in text.splitlines() if "reload failed" in line][-1]
    assert key in failure and f"{path}" in failure and "not a regular file" in failure, failure
    assert request_stats(d)["config_generation"] == 1  # the master answers signals
    with starttls_client(d, certs) as client:  # and the old files serve on
        assert fingerprint(client.sock) == certs.fingerprint(1)
        assert client.login("alice", PASSWORD)[0] == 235
    done = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(d.config_path), "--check"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done


@pytest.mark.parametrize("which", ["cert", "key"])
def test_the_context_is_built_from_what_was_opened_never_from_a_fifo(certs, tmp_path, which):
    """build_context opens each file without blocking, and OpenSSL reads what it opened:
    a FIFO swapped in after the config was checked fails at once, naming the key."""
    import threading
    from types import SimpleNamespace

    from forksmtp.tls import TLSError, build_context

    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    paths = {"cert_file": certs.cert, "key_file": certs.key, "min_version": "TLSv1.2"}
    paths[f"{which}_file"] = fifo
    outcome: list = []

    def build() -> None:
        try:
            build_context(SimpleNamespace(**paths))
        except TLSError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(10)
    assert outcome == [f"tls.{which}_file: {fifo}: not a regular file"], "still in open()"
    build_context(SimpleNamespace(cert_file=certs.cert, key_file=certs.key, min_version="TLSv1.2"))


def test_stats_count_tls_and_auth_outcomes(daemon_factory, certs, tmp_path):
    """Issue 5: the stats show the TLS and AUTH outcome of sessions."""
    from daemon import request_stats

    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = daemon_factory(sections=tls_sections(certs, pw))
    with starttls_client(d, certs) as client:
        client.login("alice", PASSWORD)
    with starttls_client(d, certs) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice", "wrong password")
    with socket.create_connection((HOST, d.port), timeout=TIMEOUT) as raw:
        assert read_reply(raw).startswith(b"220 ")
        raw.sendall(b"EHLO x\r\n")
        assert read_reply(raw).startswith(b"250")
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(raw).startswith(b"220 ")  # the server now reads a handshake
        raw.sendall(b"this is not a TLS client hello\r\n" * 4)
        # Not a TLS record: the server ends the handshake and closes.
        with contextlib.suppress(ConnectionResetError):
            read_to_close(raw)
    stats = wait_until(lambda: (s := request_stats(d))["tls"]["failed"] == 1 and s, TIMEOUT,
                       what="the failed handshake counted")
    assert stats["tls"] == {"handshakes": 2, "resumed": 0, "failed": 1}
    # smtplib's login() tries PLAIN, then LOGIN: two failed attempts.
    assert {k: stats["auth"][k] for k in ("succeeded", "failed", "deferred")} == {
        "succeeded": 1, "failed": 2, "deferred": 0}


def new_imports(stderr) -> list[str]:
    """The ``-X importtime`` lines the daemon has written to ``stderr`` since the last call."""
    out = b""
    while select.select([stderr], [], [], 0)[0]:
        chunk = os.read(stderr.fileno(), 65536)
        if not chunk:
            break
        out += chunk
    return [line for line in out.decode(errors="replace").splitlines() if line.startswith("import time:")]


def test_a_worker_loads_nothing_after_its_privilege_drop(certs, tmp_path, monkeypatch):
    """A worker runs as ``server.user``, who may be unable to read the interpreter's own
    library (a Python installed under /root, mode 0700).  A module it imported, or a codec
    it looked up, only when a session first needed it would then crash it at that
    session, and at every retry of the same mail.  So every session's path is loaded by
    the master before it forks: with PYTHONPROFILEIMPORTTIME, CPython reports each
    import statement's import, and a worker serving every such path, from its first
    session to its last line, reports none."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    pw = password_file(tmp_path / "passwd", alice=PASSWORD)
    d = Daemon(tmp_path, workers=1, sections=tls_sections(certs, pw))
    d.start()
    try:
        wait_until(lambda: set(worker_states(request_stats(d))) == {"idle"}, TIMEOUT, what="the worker ready")
        assert new_imports(d.proc.stderr), "the start was not reported: nothing to compare"
        with smtplib.SMTP(HOST, d.port, timeout=TIMEOUT) as first:
            first.noop()
        raw = RawSMTP(d.port)
        for line, code in [(b"XYZZY \xff\x01", 501), ("EHLO bücher.example".encode(), 250),
                           (b"MAIL FROM:<\"a b\\\"c\"@example.org>", 250),
                           (b"RCPT TO:<\x01@example.test>", 501), (b"RCPT TO:<r@example.test>", 250),
                           (b"DATA", 354), (b"Subject: x\r\n\r\nx\r\n.", 250), (b"QUIT", 221)]:
            assert raw.command(line) == code, line
        raw.sock.close()
        with starttls_client(d, certs) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("x\x01y", "wrong")
            client.login("alice", PASSWORD)
            client.sendmail("a@example.org", ["ü@bücher.example"], "Subject: x\r\n\r\nü\r\n".encode(),
                            mail_options=["SMTPUTF8"])
        stored_since(d, set(), 2)
        d.wait_for_log("[CLOSE] ", TIMEOUT, count=3)
        wait_until(lambda: set(worker_states(request_stats(d))) == {"idle"}, TIMEOUT,
                   what="the worker back in its accept loop")  # the sessions' last steps taken
        assert new_imports(d.proc.stderr) == []
    finally:
        d.stop()
