"""The real daemon over raw sockets: pipelining, dot-stuffing, smuggling, limits.

These are the byte sequences a careful client never sends and an attacker does:
several commands in one write, bare CR/LF around a dot, the end of data split across
TCP segments, bytes behind DATA, overlong lines, a client that vanishes mid-message.
Every test reads the server's replies in order and then looks at the Maildir.
"""

from __future__ import annotations

import socket
import struct
import time

import psutil
import pytest

from daemon import Daemon, assert_nothing_left_in_tmp

HOST = "127.0.0.1"
CRLF = b"\r\n"
SMUGGLED_SENDER = b"smuggler@evil.test"


class Wire:
    """A raw SMTP client: bytes out, replies (their last line) in, in order."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        # Every send() leaves as its own segment: splits happen where the test puts them.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.greeting = self.replies(1)[0]

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_split(self, parts: list[bytes], pause: float = 0.02) -> None:
        for part in parts:
            self.sock.sendall(part)
            time.sleep(pause)

    def replies(self, n: int) -> list[bytes]:
        """The next ``n`` replies; each is its last line, e.g. b"250 2.0.0 Ok"."""
        out: list[bytes] = []
        while len(out) < n:
            end = self.buf.find(CRLF)
            if end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed after {out!r}, pending {self.buf!r}")
                self.buf += chunk
                continue
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            assert len(line) >= 3 and line[:3].isdigit(), line
            if line[3:4] != b"-":
                out.append(line)
        return out

    def codes(self, n: int) -> list[int]:
        return [int(r[:3]) for r in self.replies(n)]

    def cmd(self, line: bytes | str) -> bytes:
        self.send((line.encode() if isinstance(line, str) else line) + CRLF)
        return self.replies(1)[0]

    def code(self, line: bytes | str) -> int:
        return int(self.cmd(line)[:3])

    def rest_until_eof(self) -> list[bytes]:
        """All further replies, up to the server's close (fails on a timeout)."""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        lines = self.buf.split(CRLF)
        assert lines[-1] == b"", f"unterminated reply {self.buf!r}"
        self.buf = b""
        return [line for line in lines[:-1] if line[3:4] != b"-"]

    def open_data(self, rcpts=("rcpt@example.test",)) -> None:
        assert self.code("EHLO client.test") == 250
        assert self.code("MAIL FROM:<sender@client.test>") == 250
        for rcpt in rcpts:
            assert self.code(f"RCPT TO:<{rcpt}>") == 250
        assert self.code("DATA") == 354


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the tests that need no special config (they only look at what
    their own session added to the Maildir).  The junk-command limit is lifted: tests
    here pipeline and flood NOOPs to fill buffers and logs (the limit has its own)."""
    d = Daemon(tmp_path_factory.mktemp("wire"), sections={"limits": {"max_junk_commands": 10**6}})
    try:
        yield d.start()
    finally:
        d.stop()


class Box:
    """What a test's session added to the Maildir (new/) and what it left in tmp/."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.before = set(d.new_messages())

    def added(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(set(self.d.new_messages()) - self.before)]


def message_text(stored: bytes) -> bytes:
    """The message after forksmtp's Return-Path and Received fields."""
    head, sep, _ = stored.partition(b"\nReceived: ")
    assert sep and head.startswith(b"Return-Path: "), stored[:300]
    received_end = stored.index(b"\n", len(head) + len(sep))
    while stored[received_end + 1:received_end + 2] == b"\t":
        received_end = stored.index(b"\n", received_end + 1)
    return stored[received_end + 1:]


def serving_worker(d: Daemon, w: Wire) -> psutil.Process:
    """The worker that serves ``w``'s connection."""
    client_port = w.sock.getsockname()[1]
    for worker in d.workers():
        for conn in worker.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port:
                return worker
    raise AssertionError("no worker holds the connection")


class Closing:
    """Waits for the [CLOSE] log line of one session.  A worker serves one session at a
    time and logs its close before it accepts again, so once it serves ours, every
    [CLOSE] line of its pid that is not yet in the log is ours."""

    def __init__(self, d: Daemon, w: Wire) -> None:
        self.d = d
        self.needle = f"/{serving_worker(d, w).pid} [CLOSE] "
        self.before = d.log_text().count(self.needle)

    def wait(self) -> str:
        return self.d.wait_for_log(self.needle, timeout=10, count=self.before + 1)


# -- pipelining --------------------------------------------------------------------------

def test_pipelined_transaction_replies_in_order(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        assert w.code("EHLO client.test") == 250
        w.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n"
               b"RCPT TO:<c@example.test>\r\nDATA\r\n")
        assert w.codes(4) == [250, 250, 250, 354]
        w.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert w.codes(2) == [250, 221]
        assert w.rest_until_eof() == []
    stored, = box.added()
    assert message_text(stored) == b"Subject: pipelined\n\nbody\n"


def test_pipelined_group_with_errors_and_reset(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<bad>\r\n"
               b"RCPT TO:<ok@example.test>\r\nNOOP\r\nRSET\r\nRCPT TO:<x@example.test>\r\n"
               b"MAIL FROM:<b@client.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
        assert w.codes(10) == [250, 250, 501, 250, 250, 250, 503, 250, 250, 354]
        w.send(b"Subject: second\r\n\r\n.\r\n")
        assert w.codes(1) == [250]
    stored, = box.added()
    assert stored.startswith(b"Return-Path: <b@client.test>\n")
    assert b"for <c@example.test>" in stored and b"ok@example.test" not in stored


def test_transactions_pipelined_behind_the_final_dot(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        w.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<a@client.test>\r\n"
               b"RCPT TO:<b@example.test>\r\nDATA\r\n")
        assert w.codes(4) == [250, 250, 250, 354]
        w.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        assert w.codes(2) == [250, 221]
    assert sorted(message_text(m) for m in box.added()) == [
        b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n"]


def test_many_pipelined_commands_lose_nothing(shared):
    with Wire(shared.port) as w:
        w.send(b"EHLO client.test\r\n" + b"NOOP\r\n" * 400 + b"VRFY someone\r\nQUIT\r\n")
        assert w.codes(403) == [250] * 401 + [252, 221]
        assert w.rest_until_eof() == []


# -- dot-stuffing --------------------------------------------------------------------------

def test_dot_stuffing_is_undone(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        # The first line is stuffed, and one stuffed line starts a new segment.
        w.send_split([b"..first\r\nSubject: dots\r\n\r\n..\r\n...\r\n", b"..leading\r\n",
                      b"middle.dot\r\n .space\r\n.\r\n"])
        assert w.codes(1) == [250]
    stored, = box.added()
    assert message_text(stored) == b".first\nSubject: dots\n\n.\n..\n.leading\nmiddle.dot\n .space\n"


def test_empty_message(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        w.send(b".\r\n")
        assert w.codes(1) == [250]
    stored, = box.added()
    assert message_text(stored) == b""


# -- SMTP smuggling (CVE-2023-51764/5/6) -------------------------------------------------------

#: Sequences that some software once took for the end of data; only CRLF.CRLF is.
FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRCRLF.CRCRLF": b"\r\r\n.\r\r\n",
}
SMUGGLED = (b"MAIL FROM:<" + SMUGGLED_SENDER + b">\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n")


def smuggle_parts(fake_end: bytes, split: bool) -> list[bytes]:
    head = b"Subject: legit\r\n\r\nlegit body"
    if not split:
        return [head + fake_end + SMUGGLED + b".\r\n"]
    # Every byte of the fake end in its own segment, and the real end split too.
    return [head, *[bytes([b]) for b in fake_end], SMUGGLED[:-1], b"\n", b".", b"\r", b"\n"]


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split"])
@pytest.mark.parametrize("fake_end", list(FAKE_ENDS.values()), ids=list(FAKE_ENDS))
def test_smuggling_is_refused_whole(shared, fake_end, split):
    box = Box(shared)
    with Wire(shared.port) as w:
        closing = Closing(shared, w)
        w.open_data()
        w.send_split(smuggle_parts(fake_end, split), pause=0.01)
        reply, = w.replies(1)
        assert reply[:9] == b"550 5.6.0", reply
        # The smuggled MAIL/RCPT/DATA never got a reply of their own: the next reply
        # is the one to our QUIT.
        assert w.cmd("QUIT")[:3] == b"221"
        assert w.rest_until_eof() == []
    log = closing.wait()
    assert box.added() == []
    assert b"smuggled" not in log.encode() and SMUGGLED_SENDER.decode() not in log


@pytest.mark.parametrize("fake_end", list(FAKE_ENDS.values()), ids=list(FAKE_ENDS))
def test_smuggling_normalised_stays_one_message(daemon_factory, fake_end):
    d = daemon_factory(sections={"limits": {"bare_newline": "normalize"}})
    with Wire(d.port) as w:
        w.open_data()
        w.send_split(smuggle_parts(fake_end, split=True), pause=0.005)
        assert w.codes(1) == [250]
        assert w.code("QUIT") == 221
    stored, = (p.read_bytes() for p in d.new_messages())
    text = message_text(stored)
    assert text.startswith(b"Subject: legit\n") and b"smuggled body" in text
    assert b"MAIL FROM:<" + SMUGGLED_SENDER + b">" in text
    assert b"Return-Path: <" + SMUGGLED_SENDER not in stored


#: The fake ends that carry a bare CR (not only bare LFs).
BARE_CR = {k: e for k, e in FAKE_ENDS.items() if b"\r" in e.replace(CRLF, b"")}


@pytest.mark.parametrize("fake_end", list(BARE_CR.values()), ids=list(BARE_CR))
def test_normalised_message_is_stored_with_lf_endings_only(daemon_factory, fake_end):
    """Normalising means the stored text has LF line ends (contract section 5), with no
    CR left over from a bare CR (a reader would see a stray CR or a CRLF line end)."""
    d = daemon_factory(sections={"limits": {"bare_newline": "normalize"}})
    with Wire(d.port) as w:
        w.open_data()
        w.send_split(smuggle_parts(fake_end, split=False))
        assert w.codes(1) == [250]
    stored, = (p.read_bytes() for p in d.new_messages())
    assert b"\r" not in stored, stored


@pytest.mark.parametrize("start", [b".\n", b".\r", b".\r\r\n"], ids=["dot-LF", "dot-CR", "dot-CRCRLF"])
def test_fake_end_right_after_354(shared, start):
    """A fake end as the very first bytes of the message text (no line before it)."""
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        w.send_split([start[:1], start[1:], SMUGGLED, b".\r\n"])
        reply, = w.replies(1)
        assert reply[:9] == b"550 5.6.0", reply
        assert w.code("QUIT") == 221
    assert box.added() == []


def test_real_end_split_across_segments(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        w.send_split([b"Subject: split\r\n\r\nline one", b"\r", b"\n", b".", b"\r", b"\n"])
        assert w.codes(1) == [250]
        # The session goes on: a second message, split differently.
        assert w.code("MAIL FROM:<a@client.test>") == 250
        assert w.code("RCPT TO:<b@example.test>") == 250
        assert w.code("DATA") == 354
        w.send_split([b"Subject: two\r\n\r\nline two\r", b"\n.\r", b"\nNOOP\r\n"])
        assert w.codes(2) == [250, 250]
    first, second = box.added()
    assert {message_text(first), message_text(second)} == {
        b"Subject: split\n\nline one\n", b"Subject: two\n\nline two\n"}


def test_bare_cr_before_the_real_end_is_refused(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        w.send(b"Subject: cr\r\n\r\nends with a bare CR\r\r\n.\r\n")
        assert w.replies(1)[0][:3] == b"550"
        assert w.code("NOOP") == 250
    assert box.added() == []


def test_bytes_pipelined_behind_data_are_a_sync_error(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        closing = Closing(shared, w)
        w.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n"
               b"DATA\r\nSubject: early\r\n\r\nearly body\r\n.\r\n")
        replies = w.rest_until_eof()
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"554"]
    assert replies[-1][:9] == b"554 5.5.0"
    assert "early body" not in closing.wait()
    assert box.added() == []


@pytest.mark.parametrize("refused", [
    b"MAIL FROM:<a@client.test>\r\nDATA\r\n",  # no RCPT: DATA fails
    b"MAIL FROM:<a@client.test>\r\nDATA\x00\r\n",  # a NUL: DATA refused for its form
    b"MAIL FROM:<a@client.test>\r\nDATA" + b" " * 600 + b"\r\n",  # too long
], ids=["no RCPT", "NUL", "too long"])
def test_text_behind_a_refused_data_never_runs_as_commands(shared, refused):
    box = Box(shared)
    with Wire(shared.port) as w:
        closing = Closing(shared, w)
        w.send(b"EHLO client.test\r\n" + refused +
               b"RSET\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<b@example.test>\r\n"
               b"DATA\r\nSubject: forged\r\n\r\nforged body\r\n.\r\n")
        replies = w.rest_until_eof()
    assert [r[:3] for r in replies] == [b"250", b"250", b"554"], replies
    assert replies[-1][:9] == b"554 5.5.0"
    assert "ceo@bank.example" not in closing.wait()
    assert box.added() == []


# -- line lengths ----------------------------------------------------------------------------

def test_command_line_over_512_octets(shared):
    with Wire(shared.port) as w:
        assert w.code("EHLO client.test") == 250
        assert w.code(b"NOOP " + b"x" * (512 - 7)) == 250  # exactly 512 with CRLF
        reply = w.cmd(b"NOOP " + b"x" * (513 - 7))  # 513 octets
        assert reply[:3] == b"500", reply
        assert w.code("NOOP") == 250
        # A very long line, sent in pieces, is discarded as it comes; one 500 for it.
        w.send_split([b"MAIL FROM:<" + b"a" * 100_000, b"b" * 100_000, b"@example.test>\r\n"])
        assert w.codes(1) == [500]
        assert w.code("MAIL FROM:<a@client.test>") == 250
        assert w.code("RCPT TO:<b@example.test>") == 250


@pytest.mark.parametrize("pieces", [1, 4], ids=["one-write", "split"])
def test_text_line_over_1000_octets(shared, pieces):
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        long_line = b"y" * 999 + CRLF  # 1001 octets
        body = b"Subject: long\r\n\r\n" + long_line + b"after\r\n.\r\n"
        size = -(-len(body) // pieces)
        w.send_split([body[i:i + size] for i in range(0, len(body), size)])
        reply, = w.replies(1)
        assert reply.startswith(b"554 5.6.0 "), reply
        assert box.added() == []
        # The session goes on, and a 1000-octet line is fine.
        assert w.code("MAIL FROM:<a@client.test>") == 250
        assert w.code("RCPT TO:<b@example.test>") == 250
        assert w.code("DATA") == 354
        w.send(b"Subject: ok\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")
        assert w.codes(1) == [250]
    stored, = box.added()
    assert message_text(stored) == b"Subject: ok\n\n" + b"z" * 998 + b"\n"


# -- errors ----------------------------------------------------------------------------------

def test_too_many_errors_close_the_session(shared):
    with Wire(shared.port) as w:
        assert w.code("EHLO client.test") == 250
        w.send(b"".join(b"XYZZY%d\r\n" % i for i in range(11)))
        replies = w.rest_until_eof()
    assert [r[:3] for r in replies] == [b"500"] * 10 + [b"421"], replies
    assert replies[-1][:9] == b"421 4.7.0"


def test_data_rset_quit_with_parameters(shared):
    box = Box(shared)
    with Wire(shared.port) as w:
        assert w.code("EHLO client.test") == 250
        assert w.code("MAIL FROM:<a@client.test>") == 250
        assert w.code("RCPT TO:<b@example.test>") == 250
        assert w.cmd("DATA now")[:9] == b"501 5.5.4"
        assert w.cmd("RSET all")[:9] == b"501 5.5.4"
        assert w.cmd("QUIT now")[:9] == b"501 5.5.4"
        # None of them acted: the transaction is still there.
        assert w.code("DATA") == 354
        w.send(b"Subject: params\r\n\r\n.\r\n")
        assert w.codes(1) == [250]
        assert w.code("QUIT") == 221
        assert w.rest_until_eof() == []
    assert len(box.added()) == 1


def test_a_sender_without_a_domain(shared):
    """The contract's own example of a SIZE refusal, word for word, and the same sender
    without SIZE: taken as Postfix takes it, and stored as sent."""
    box = Box(shared)
    over = 10**12  # past any max_message_size
    with Wire(shared.port) as w:
        assert w.code("EHLO client.test") == 250
        assert w.cmd(f"MAIL FROM:<a> SIZE={over}")[:9] == b"552 5.3.4"
        assert w.cmd("MAIL FROM:<a>")[:9] == b"250 2.1.0"
        assert w.cmd("RCPT TO:<b>")[:9] == b"501 5.1.3"  # a recipient needs a domain
        assert w.code("RCPT TO:<b@example.test>") == 250
        assert w.code("DATA") == 354
        w.send(b"Subject: no domain\r\n\r\n.\r\n")
        assert w.codes(1) == [250]
    stored, = box.added()
    assert stored.startswith(b"Return-Path: <a>\n")


def test_a_flood_of_noops_does_not_flood_the_log(shared):
    """Past a session's free log lines, chatter is counted, not logged: 20,000 pipelined
    NOOPs (120 kB) would otherwise write some 2 MB of log."""
    from forksmtp.smtp.sessionlog import FREE_LINES
    with Wire(shared.port) as w:
        closing = Closing(shared, w)
        pid = serving_worker(shared, w).pid
        assert w.code("EHLO client.test") == 250
        for _ in range(20):  # in groups, so that neither side waits on a full buffer
            w.send(b"NOOP\r\n" * 1000)
            assert w.codes(1000) == [250] * 1000  # every one answered, in order
        assert w.code("QUIT") == 221
        closing.wait()
    # From this session's [CONN] line on: the worker's previous session, begun by the
    # test before, may have been logged after this test began (it logs a session whole
    # at its end, and the test before need not wait for that).
    lines = worker_lines(shared, 0, pid)
    begin = max(i for i, line in enumerate(lines) if line.startswith("[CONN] "))
    ours = [line for line in lines[begin:] if line.startswith("[SMTP] ")]
    assert len(ours) == FREE_LINES + 1, ours[-3:]
    # The greeting, EHLO and its reply, then NOOPs: the 1,000th line is a NOOP, the
    # first one past is its reply, and the count line follows at the end.
    assert ours[-2].endswith("[SMTP] NOOP")
    assert ours[-1].endswith(f"[SMTP] <{2 * 20000 + 2 + 3 - FREE_LINES} command and reply lines not logged>")


def spend_free_lines(w: Wire) -> None:
    """EHLO, then NOOPs until the session has logged its free lines and a little more."""
    from forksmtp.smtp.sessionlog import FREE_LINES
    assert w.code("EHLO client.test") == 250
    w.send(b"NOOP\r\n" * (FREE_LINES // 2))
    assert w.codes(FREE_LINES // 2) == [250] * (FREE_LINES // 2)


def worker_lines(d: Daemon, start: int, pid: int) -> list[str]:
    """The log lines of worker ``pid`` written after offset ``start``, without their stamp."""
    return [line.split(f"/{pid} ", 1)[1] for line in d.log_text()[start:].splitlines() if f"/{pid} [" in line]


def test_past_the_free_lines_each_store_follows_its_own_transaction(shared):
    """The worker logs [STORE] itself; the transaction a long session held back until its
    verdict must come before it, or a reader gives the file to the previous sender."""
    start = len(shared.log_text())
    with Wire(shared.port) as w:
        closing = Closing(shared, w)
        pid = serving_worker(shared, w).pid
        spend_free_lines(w)
        for n in (1, 2):  # pipelined, as a relay sends them
            w.send(f"MAIL FROM:<s{n}@client.test>\r\nRCPT TO:<r{n}@example.test>\r\nDATA\r\n".encode())
            assert w.codes(3) == [250, 250, 354]
            w.send(b"Subject: order\r\n\r\n.\r\n")
            assert w.codes(1) == [250]
        assert w.code("QUIT") == 221
        closing.wait()
    ours = worker_lines(shared, start, pid)
    tail = ours[ours.index("[SMTP] MAIL FROM:<s1@client.test>"):]
    stores = [i for i, line in enumerate(tail) if line.startswith("[STORE] ")]
    assert len(stores) == 2
    for n, at in zip((1, 2), stores):
        assert tail[at - 7:at] == [f"[SMTP] MAIL FROM:<s{n}@client.test>", "[SMTP] 250 2.1.0 Sender ok",
                                   f"[SMTP] RCPT TO:<r{n}@example.test>", "[SMTP] 250 2.1.5 Recipient ok",
                                   "[SMTP] DATA", "[SMTP] 354 End data with <CR><LF>.<CR><LF>",
                                   "[SMTP] <message: 18 octets>"], tail
        assert tail[at + 1] == "[SMTP] 250 2.0.0 Message accepted"


def test_past_the_free_lines_a_transfer_cut_off_is_logged(shared):
    start = len(shared.log_text())
    with Wire(shared.port) as w:
        closing = Closing(shared, w)
        pid = serving_worker(shared, w).pid
        spend_free_lines(w)
        w.open_data()
        w.send(b"Subject: cut off\r\n\r\nhalf a")
    closing.wait()  # the client went in the middle of the text
    ours = worker_lines(shared, start, pid)
    assert ours[-7:-1] == ["[SMTP] MAIL FROM:<sender@client.test>", "[SMTP] 250 2.1.0 Sender ok",
                           "[SMTP] RCPT TO:<rcpt@example.test>", "[SMTP] 250 2.1.5 Recipient ok",
                           "[SMTP] DATA", "[SMTP] 354 End data with <CR><LF>.<CR><LF>"], ours[-12:]
    assert ours[-1].endswith("client disconnected")


# -- a client that goes away ---------------------------------------------------------------

@pytest.mark.parametrize("tail", [b"", b"\r\n.", b"\r\n.\r"], ids=["mid-text", "CRLF-dot", "CRLF-dot-CR"])
@pytest.mark.parametrize("abort", [False, True], ids=["fin", "rst"])
def test_early_eof_in_data_stores_nothing(shared, tail, abort):
    box = Box(shared)
    w = Wire(shared.port)
    try:
        closing = Closing(shared, w)
        w.open_data()
        # More than the Maildir write buffer, so part of it has reached the file.
        w.send(b"Subject: cut\r\n\r\n" + b"line of text that will never be stored\r\n" * 20_000
               + b"last line" + tail)
        time.sleep(0.05)
        if abort:  # RST instead of FIN
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        w.sock.close()
    log = closing.wait()
    assert box.added() == []
    assert_nothing_left_in_tmp(shared, shared.maildir)
    assert "never be stored" not in log


@pytest.mark.parametrize("quit", [True, False], ids=["with-QUIT", "without-QUIT"])
def test_message_then_half_close_is_stored(shared, quit):
    """A client may send its last bytes and shut down its side at once."""
    box = Box(shared)
    with Wire(shared.port) as w:
        w.open_data()
        w.send(b"Subject: half\r\n\r\nthen FIN\r\n.\r\n" + (b"QUIT\r\n" if quit else b""))
        w.sock.shutdown(socket.SHUT_WR)
        replies = w.rest_until_eof()
    assert [r[:3] for r in replies] == ([b"250", b"221"] if quit else [b"250"])
    stored, = box.added()
    assert message_text(stored) == b"Subject: half\n\nthen FIN\n"


# -- memory ----------------------------------------------------------------------------------

# Each text is refused for a different first problem, which the reader then stops
# storing; all are over max_message_size too, and that verdict wins after the dot.
@pytest.mark.parametrize("chunk, refusal", [
    (b"x" * 4096, b"552 5.3.4 "),  # the first line passes 1000 octets first
    (b"x" * 79 + b"\n", b"552 5.3.4 "),  # the first bare LF
    (b"y" * 78 + CRLF, b"552 5.3.4 "),  # good lines, past max_message_size
], ids=["no-newline", "bare-LF", "CRLF-over-size"])
def test_huge_message_keeps_worker_memory_bounded(shared, chunk, refusal):
    box = Box(shared)
    block = chunk * (1024 * 1024 // len(chunk))
    with Wire(shared.port) as w:
        w.open_data()
        worker = serving_worker(shared, w)
        base = peak = worker.memory_info().rss
        sent = 0
        while sent < 50 * 1024 * 1024:
            w.send(block)
            sent += len(block)
            peak = max(peak, worker.memory_info().rss)
        w.send(b"\r\n.\r\n")
        reply, = w.replies(1)
        peak = max(peak, worker.memory_info().rss)
        assert reply.startswith(refusal), reply
        assert w.code("NOOP") == 250
    assert peak - base < 10 * 1024 * 1024, (base, peak)
    assert box.added() == []
