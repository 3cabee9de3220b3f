"""Network smoke fuzz: hostile and broken clients against the real daemon.

For a few seconds, 20 threads open connections and send random bytes, overlong lines,
bare CR and LF, random sequences of valid and invalid commands, DATA with smuggling
attempts (none of which may ever be stored as a message of its own), and close abruptly
(reset, half-close, mid-line).  Whatever comes back must be well-formed SMTP replies.
Afterwards no worker has crashed or been replaced, the log holds no traceback, and a
normal delivery succeeds.  Both ways of handling bare CR/LF in DATA are fuzzed.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time

import pytest

from daemon import request_stats, run_clients, send_message, wait_until
from helpers import chosen_seed

FUZZ_SECONDS = 5.0
THREADS = 20
REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\Z")

COMMANDS = [
    b"EHLO fuzz.example", b"HELO fuzz", b"EHLO", b"ehlo \xff\xfe", b"HELO " + b"h" * 600,
    b"MAIL FROM:<a@client.example>", b"MAIL FROM:<>", b"MAIL FROM:a@b", b"MAIL FROM:<a@b> SIZE=99999999999",
    b"MAIL FROM:<a@b> BODY=8BITMIME SMTPUTF8", b"MAIL FROM:<\xc3\xa9@b.example> SMTPUTF8", b"MAIL",
    b"RCPT TO:<rcpt@mx.test.example>", b"RCPT TO:<Postmaster>", b"RCPT TO:<../../etc/passwd@x>",
    b"RCPT TO:<a\r@b>", b"RCPT TO:<\"q uoted\"@mx.test.example>", b"RCPT", b"RCPT TO:<>",
    b"DATA", b"DATA x", b"RSET", b"RSET x", b"NOOP", b"NOOP arg", b"VRFY root", b"EXPN list",
    b"HELP", b"QUIT x", b"STARTTLS", b"AUTH PLAIN AGZvbwBiYXI=", b"AUTH LOGIN", b"AUTH PLAIN *",
    b"BDAT 10 LAST", b"TURN", b"\x00\x01\x02", b"", b" ", b"MAIL FROM:<a@b>\x00RCPT TO:<c@d>",
    b"GET / HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00",
]
BODY_PIECES = [b"Subject: fuzz\r\n\r\n", b"line\r\n", b"bare LF\n", b"bare CR\r", b"\n.\n",
               b"\r\n.\n", b"\n.\r\n", b".\r\n", b"..dot\r\n", b"x" * 1200 + b"\r\n",
               b"\r\nMAIL FROM:<smuggled@evil.example>\r\n", b"\x00\xff\xfe", b"\r\n\r\n"]


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 4096))


def overlong_line(rng: random.Random) -> bytes:
    line = bytes([rng.choice(b"AZaz09 :<>@")]) * rng.choice([511, 513, 1001, 5000, 70_000, 300_000])
    return line + rng.choice([b"", b"\r\n", b"\r\nNOOP\r\n", b"\n"])


def command_sequence(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randrange(1, 30)):
        cmd = bytearray(rng.choice(COMMANDS))
        if cmd and rng.random() < 0.2:  # mutate a byte
            cmd[rng.randrange(len(cmd))] = rng.randrange(256)
        if rng.random() < 0.2:
            cmd = cmd.swapcase()
        out.append(bytes(cmd) + rng.choice([b"\r\n"] * 6 + [b"\n", b"\r", b"\n\r", b""]))
    return b"".join(out)


DATA_HEAD = b"EHLO fuzz.example\r\nMAIL FROM:<f@client.example>\r\nRCPT TO:<rcpt@mx.test.example>\r\nDATA\r\n"


def data_body(rng: random.Random) -> bytes:
    """Sent after the 354 (a client that sends it before gets 554, see RFC 2920)."""
    body = b"".join(rng.choice(BODY_PIECES) for _ in range(rng.randrange(1, 40)))
    return body + rng.choice([b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n", b"",
                              b"\r\n.\r\nRSET\r\n" + command_sequence(rng)])


SMUGGLER = b"smuggler@evil.example"
FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


def smuggling(rng: random.Random) -> bytes:
    """A second transaction hidden behind an end-of-data that is not CRLF.CRLF (the 2023
    SMTP smuggling advisories): it must never be delivered on its own."""
    hidden = (b"MAIL FROM:<%s>\r\nRCPT TO:<rcpt@mx.test.example>\r\nDATA\r\n"
              b"Subject: smuggled\r\n\r\nsmuggled\r\n" % SMUGGLER)
    return b"Subject: cover\r\n\r\nhello" + rng.choice(FAKE_ENDS) + hidden + b"\r\n.\r\n"


SCENARIOS = [random_bytes, overlong_line, command_sequence, data_body, data_body, smuggling]


def check_replies(received: bytes, bad: list[bytes]) -> None:
    """Every complete line the server sent is an SMTP reply line (a trailing fragment may
    be cut off by our own abrupt close)."""
    for line in received.split(b"\r\n")[:-1]:
        if not REPLY_LINE.match(line) or len(line) + 2 > 512:
            bad.append(line[:200])


def read_some(sock: socket.socket, seconds: float) -> bytes:
    got = b""
    sock.settimeout(seconds)
    try:
        while len(got) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return got


def until_354(sock: socket.socket) -> bytes:
    sock.sendall(DATA_HEAD)
    got = b""
    deadline = time.monotonic() + 2.0
    while b"\r\n354 " not in got and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def fuzz_connection(port: int, rng: random.Random, bad: list[bytes]) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2.0)
    received = b""
    try:
        if rng.random() < 0.9:
            received += read_some(sock, 0.05) if rng.random() < 0.5 else sock.recv(4096)
        scenario = rng.choice(SCENARIOS)
        if scenario in (data_body, smuggling):
            received += until_354(sock)
        payload = scenario(rng)
        cuts = sorted(rng.randrange(len(payload) + 1) for _ in range(rng.randrange(0, 4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
        for piece in pieces:
            sock.sendall(piece)
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.02)
        ending = rng.random()
        if ending < 0.3:  # reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif ending < 0.6:  # half-close, then read what is left
            sock.shutdown(socket.SHUT_WR)
            received += read_some(sock, 0.3)
        else:
            received += read_some(sock, 0.05)
    except OSError:
        pass  # the server may close on us (421 after too many errors)
    finally:
        sock.close()
    check_replies(received, bad)


def fuzz_client(port: int, deadline: float, bad: list[bytes], seed: int) -> dict:
    rng = random.Random(seed)
    done = refused = 0
    while time.monotonic() < deadline:
        try:
            fuzz_connection(port, rng, bad)
            done += 1
        except OSError:
            refused += 1
            time.sleep(0.01)
    return {"connections": done, "connect_errors": refused}


@pytest.mark.parametrize("bare_newline", ["reject", "normalize"])
def test_hostile_input_from_many_connections(daemon_factory, bare_newline):
    d = daemon_factory(workers=4, server={"max_workers": 2 * THREADS, "max_connections": 5 * THREADS,
                                          "max_connections_per_ip": 5 * THREADS},
                       sections={"limits": {"bare_newline": bare_newline}})
    before = {w.pid for w in d.workers()}
    base = chosen_seed()
    bad: list[bytes] = []
    results = run_clients(THREADS, lambda seed, **kw: fuzz_client(seed=base + seed, **kw),
                          join_timeout=60, port=d.port, deadline=time.monotonic() + FUZZ_SECONDS,
                          bad=bad)
    connections = sum(r.get("connections", 0) for r in results if r)
    print(f"\nnet fuzz ({bare_newline}): {connections} connections from {THREADS} threads, "
          f"{len(d.new_messages())} messages stored (seed {base})")
    assert all(r is not None and "error" not in r for r in results), results
    assert connections > THREADS, results
    assert bad == [], f"malformed reply lines (seed {base}): {bad[:10]}"

    log = d.log_text()
    for needle in ("Traceback", "crashed", "crash loop", "killed by", "exited with status"):
        assert needle not in log, f"{needle!r} in the log (seed {base})"
    assert d.proc.poll() is None
    after = {w.pid for w in d.workers()}
    assert before <= after, f"workers {sorted(before - after)} are gone (seed {base})"

    # A client may send its final dot and leave before the 250: wait until every session
    # is over, so that no commit lands after the count below.
    wait_until(lambda: request_stats(d)["connections_active"] == 0, 30, 0.1, "every session over")
    messages = d.new_messages()
    smuggled = [p.name for p in messages if p.read_bytes().startswith(b"Return-Path: <%s>" % SMUGGLER)]
    assert smuggled == [], f"smuggled messages stored (seed {base}): {smuggled}"

    stored = len(messages)
    send_message(d.port)
    assert len(d.new_messages()) == stored + 1
    for path in d.new_messages():
        assert path.name.endswith(f",S={path.stat().st_size}"), path.name
