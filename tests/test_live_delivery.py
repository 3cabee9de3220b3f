"""Delivery through the real daemon: what an SMTP client meets and what lands in Maildir.

Every test starts ``python -m forksmtp`` on a free loopback port (``daemon_factory``),
talks to it with ``smtplib`` (or swaks), and reads the Maildir files and the log that
the daemon wrote.  Contract sections 4, 5 and 6.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import smtplib
import stat
import subprocess
import threading
import time
import uuid
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from daemon import RawSMTP, line_pid, wait_until, worker_pids, workers_replacing
from forksmtp import delivery

HOST = "127.0.0.1"
SENDER = "sender@client.test"

#: <secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>[,W=<crlf size>] (contract section 5)
MAILDIR_NAME = re.compile(
    r"(?P<secs>\d+)\.M(?P<usecs>\d+)P(?P<pid>\d+)Q(?P<n>\d+)\.(?P<host>[^/:,]+)"
    r",S=(?P<size>\d+)(?:,W=(?P<wsize>\d+))?\Z")


# -- helpers -------------------------------------------------------------------------------

def connect(d, timeout: float = 10.0) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, d.port, local_hostname="client.test", timeout=timeout)
    client.ehlo()
    return client


def messages(maildir: Path) -> list[Path]:
    new = maildir / "new"
    return sorted(new.iterdir()) if new.exists() else []


def only_message(maildir: Path) -> bytes:
    files = messages(maildir)
    assert len(files) == 1, files
    return files[0].read_bytes()


def split_trace(stored: bytes) -> tuple[dict[str, str], bytes]:
    """The fields forksmtp puts in front of the message (unfolded), and the message."""
    fields: dict[str, str] = {}
    rest = stored
    while True:
        m = re.match(rb"(Return-Path|Delivered-To|Received): ([^\n]*(?:\n\t[^\n]*)*)\n", rest)
        if m is None:
            break
        name = m.group(1).decode()
        assert name not in fields, f"{name} twice in {stored[:400]!r}"
        fields[name] = re.sub(r"\s+", " ", m.group(2).decode("utf-8"))
        rest = rest[m.end():]
        if name == "Received":  # our Received: is the last field we add
            break
    return fields, rest


def check_received(value: str, *, recipient: str | None, protocol: str = "ESMTP") -> None:
    """RFC 5321 4.4: from, by, with, id, at most one FOR, then the date."""
    clauses, sep, date = value.rpartition(";")
    assert sep, value
    parsedate_to_datetime(date.strip())  # raises on a malformed date
    assert clauses.startswith("from "), value
    assert "[127.0.0.1]" in clauses, value
    assert re.search(r"\bby mx\.test\.example\b", clauses), value
    assert re.search(rf"\bwith {protocol}\b", clauses), value
    # ID = "ID" FWS ( Atom / msg-id ): atext only, so no '.' in an Atom.
    assert re.search(r"\bid [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\s|$)", clauses), value
    fors = re.findall(r"\bfor <([^>]*)>", clauses)
    assert fors == ([recipient] if recipient else []), value


def check_name(path: Path, worker_pids: set[int]) -> None:
    m = MAILDIR_NAME.match(path.name)
    assert m, path.name
    # <secs> is the time of the delivery (the file's own mtime, to the second), <usecs>
    # microseconds
    assert abs(int(m["secs"]) - path.stat().st_mtime) < 2 and int(m["usecs"]) < 10 ** 6, path.name
    size = path.stat().st_size
    assert int(m["size"]) == size
    if m["wsize"] is not None:
        assert int(m["wsize"]) == size + path.read_bytes().count(b"\n")
    assert int(m["pid"]) in worker_pids


def body_text(marker: str) -> bytes:
    """A message (CRLF, as a client sends it) and, for checks, what must be stored."""
    return (f"From: Sender <{SENDER}>\r\nSubject: test {marker}\r\nX-Secret: hdr-{marker}\r\n\r\n"
            f"Hello, body-{marker}\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n").encode()


def stored_form(message: bytes) -> bytes:
    """What the Maildir file must hold after the trace fields: LF endings, unstuffed.
    (smtplib stuffs the dots; the server must undo exactly that.)"""
    return message.replace(b"\r\n", b"\n")


def log_lines_of(log: str, pid: str) -> list[str]:
    return [line for line in log.splitlines() if line_pid(line) == pid]


# -- smtplib delivery ----------------------------------------------------------------------

def test_single_recipient_stored_with_trace_fields(daemon):
    message = body_text("one")
    with connect(daemon) as client:
        assert client.sendmail(SENDER, ["rcpt@example.test"], message) == {}
    path, = daemon.new_messages()
    stored = path.read_bytes()
    fields, rest = split_trace(stored)
    assert list(fields) == ["Return-Path", "Received"]
    assert fields["Return-Path"] == f"<{SENDER}>"
    check_received(fields["Received"], recipient="rcpt@example.test")
    assert rest == stored_form(message)
    assert b"\r" not in stored
    check_name(path, {w.pid for w in daemon.workers()})


def test_several_recipients_one_copy_without_recipient_list(daemon):
    rcpts = ["first@example.test", "second@example.test", "bcc-hidden@example.test"]
    message = b"Subject: several\r\n\r\nfor three\r\n"
    with connect(daemon) as client:
        assert client.sendmail(SENDER, rcpts, message) == {}
    path, = daemon.new_messages()
    stored = path.read_bytes()
    fields, rest = split_trace(stored)
    check_received(fields["Received"], recipient=None)
    assert "Delivered-To" not in fields
    for rcpt in rcpts:  # Bcc stays blind: no recipient address anywhere in the copy
        assert rcpt.encode() not in stored
    assert rest == b"Subject: several\n\nfor three\n"
    check_name(path, {w.pid for w in daemon.workers()})


def test_null_sender_and_8bit_body(daemon):
    message = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGrüße, ½ €\r\n".encode()
    with connect(daemon) as client:
        client.sendmail("<>", ["rcpt@example.test"], message, mail_options=["BODY=8BITMIME"])
    fields, rest = split_trace(only_message(daemon.maildir))
    assert fields["Return-Path"] == "<>"
    assert rest == message.replace(b"\r\n", b"\n")


def test_sequential_messages_in_one_session_get_distinct_files(daemon):
    with connect(daemon) as client:
        for i in range(5):
            client.sendmail(SENDER, [f"r{i}@example.test"], f"Subject: n{i}\r\n\r\nbody {i}\r\n".encode())
    files = daemon.new_messages()
    assert len(files) == 5
    assert sorted(split_trace(p.read_bytes())[1] for p in files) == [
        f"Subject: n{i}\n\nbody {i}\n".encode() for i in range(5)]


def test_large_message_is_stored_byte_exact(daemon):
    """Megabytes of lines of every length, many starting with dots, so that line ends,
    stuffed dots and CRLFs fall on every possible read boundary."""
    rng = random.Random(5321)
    text = bytes(rng.choice(b"abcxyz .-") for _ in range(4000))
    lines = []
    for _ in range(8000):
        start, length = rng.randrange(0, 3000), rng.randrange(0, 990)
        lines.append(b"." * rng.choice((0, 0, 1, 2)) + text[start:start + length])
    message = b"Subject: big\r\n\r\n" + b"".join(line + b"\r\n" for line in lines)
    with connect(daemon, timeout=30) as client:
        assert client.sendmail(SENDER, ["rcpt@example.test"], message) == {}
    assert split_trace(only_message(daemon.maildir))[1] == message.replace(b"\r\n", b"\n")


def test_concurrent_clients_get_distinct_files(daemon_factory):
    d = daemon_factory(workers=4)
    errors: list[BaseException] = []

    def client_thread(n: int) -> None:
        try:
            with connect(d) as client:
                for i in range(10):
                    client.sendmail(SENDER, ["rcpt@example.test"], f"Subject: c{n}-{i}\r\n\r\nx\r\n".encode())
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    files = d.new_messages()
    assert len(files) == 40
    subjects = {re.search(rb"\nSubject: (\S+)\n", p.read_bytes()).group(1) for p in files}
    assert subjects == {f"c{n}-{i}".encode() for n in range(4) for i in range(10)}
    pids = {w.pid for w in d.workers()}
    for path in files:
        check_name(path, pids)


def test_helo_session_and_unusual_addresses(daemon):
    with smtplib.SMTP(HOST, daemon.port, timeout=10) as client:
        assert client.helo("x;y(z)")[0] == 250  # a HELO name that must not break the header
        assert client.docmd('MAIL FROM:<"john doe"@client.test>')[0] == 250
        # A source route is accepted and ignored (RFC 5321 4.1.1.3, C.2).
        assert client.docmd("RCPT TO:<@relay.test,@hop.test:rcpt@example.test>")[0] == 250
        assert client.data(b"Subject: helo\r\n\r\nplain SMTP\r\n")[0] == 250
    fields, rest = split_trace(only_message(daemon.maildir))
    assert fields["Return-Path"] == '<"john doe"@client.test>'
    check_received(fields["Received"], recipient="rcpt@example.test", protocol="SMTP")
    assert "(z)" not in fields["Received"] and "y(" not in fields["Received"]
    assert rest == b"Subject: helo\n\nplain SMTP\n"


def test_maildir_directories_are_private(daemon_factory, tmp_path):
    box = tmp_path / "boxes" / "alice" / "Maildir"
    d = daemon_factory(sections={"mailboxes": {"alice@example.test": str(box)}})
    for root in (d.maildir, box):
        for sub in ("tmp", "new", "cur"):
            assert stat.S_IMODE(os.stat(root / sub).st_mode) == 0o700, root / sub


# -- routing ---------------------------------------------------------------------------------

def test_mailboxes_get_own_copy_and_catch_all_one_per_transaction(daemon_factory, tmp_path):
    alice = tmp_path / "alice" / "Maildir"
    eve = tmp_path / "eve" / "Maildir"
    d = daemon_factory(sections={"mailboxes": {"alice@example.test": str(alice),
                                               "eve@example.test": str(eve)}})
    rcpts = ["bob@example.test", "alice@example.test", "carol@example.test",
             "eve@example.test", "dave@other.test"]
    message = b"Subject: routed\r\n\r\nto five\r\n"
    with connect(d) as client:
        assert client.sendmail(SENDER, rcpts, message) == {}
    for box, who in ((alice, "alice@example.test"), (eve, "eve@example.test")):
        stored = only_message(box)
        fields, rest = split_trace(stored)
        assert list(fields) == ["Return-Path", "Delivered-To", "Received"]
        assert fields["Delivered-To"] == who
        check_received(fields["Received"], recipient=who)
        assert rest == b"Subject: routed\n\nto five\n"
        for other in rcpts:
            if other != who:
                assert other.encode() not in stored
    stored = only_message(d.maildir)  # bob, carol and dave share one catch-all copy
    fields, rest = split_trace(stored)
    assert "Delivered-To" not in fields
    check_received(fields["Received"], recipient=None)
    assert rest == b"Subject: routed\n\nto five\n"
    for rcpt in rcpts:
        assert rcpt.encode() not in stored
    assert d.wait_for_log("[CLOSE]").count("[STORE] ") == 3  # one line per copy


def test_a_mailbox_whose_maildir_is_the_catch_all_still_gets_delivered_to(daemon_factory, tmp_path):
    """A [mailboxes] address routed to the catch-all's own Maildir is still delivered as
    a mailbox: its copy says so; the catch-all recipients sharing that copy are not named."""
    catch_all = tmp_path / "d0" / "Maildir"  # the daemon's catch-all (daemon_factory's layout)
    d = daemon_factory(sections={"mailboxes": {"dave@example.test": str(catch_all)}})
    assert d.maildir == catch_all
    with connect(d) as client:
        client.sendmail(SENDER, ["dave@example.test"], b"Subject: 1\r\n\r\ndave alone\r\n")
        client.sendmail(SENDER, ["bob@example.test", "dave@example.test"],
                        b"Subject: 2\r\n\r\nbob and dave\r\n")
    stored = {rest.rsplit(b"\n\n", 1)[1]: fields
              for fields, rest in (split_trace(m.read_bytes()) for m in messages(catch_all))}
    assert set(stored) == {b"dave alone\n", b"bob and dave\n"}
    assert stored[b"dave alone\n"]["Delivered-To"] == "dave@example.test"
    assert stored[b"bob and dave\n"]["Delivered-To"] == "dave@example.test"
    assert b"bob@" not in b"".join(m.read_bytes() for m in messages(catch_all))


def test_mailbox_only_recipient_leaves_catch_all_empty(daemon_factory, tmp_path):
    alice = tmp_path / "alice" / "Maildir"
    d = daemon_factory(sections={"mailboxes": {"alice@example.test": str(alice)}})
    with connect(d) as client:  # twice the same recipient: still one copy
        client.sendmail(SENDER, ["alice@example.test"] * 2, b"Subject: a\r\n\r\nonly alice\r\n")
    assert messages(d.maildir) == []
    fields, _ = split_trace(only_message(alice))
    assert fields["Delivered-To"] == "alice@example.test"


def test_a_mailbox_is_one_recipient_however_its_address_is_written(daemon_factory, tmp_path):
    """A quoted local part that needs no quoting is the same mailbox (RFC 5321 4.1.2),
    and [mailboxes] addresses match in any case: one copy, for that one recipient."""
    alice = tmp_path / "alice" / "Maildir"
    d = daemon_factory(sections={"mailboxes": {"alice@example.test": str(alice)}})
    with connect(d) as client:
        client.ehlo("client.example")
        assert client.mail(SENDER)[0] == 250
        for rcpt in ('"alice"@example.test', '"al\\ice"@example.test', "Alice@example.test"):
            assert client.docmd("RCPT", f"TO:<{rcpt}>")[0] == 250
        assert client.data(b"Subject: a\r\n\r\none alice\r\n")[0] == 250
    assert messages(d.maildir) == []
    fields, rest = split_trace(only_message(alice))
    assert fields["Delivered-To"] == "alice@example.test"
    check_received(fields["Received"], recipient="alice@example.test")
    assert rest == b"Subject: a\n\none alice\n"


def test_local_parts_with_dots_out_of_place_are_taken_and_quoted(daemon_factory, tmp_path):
    """u..v, .u and u. are no RFC 5321 Dot-string, yet such senders and mailboxes exist
    (old Japanese mobile carriers' addresses): taken, as Postfix takes them, and written
    quoted in the trace fields, the form in which they are valid.  A [mailboxes] key
    written either way is that mailbox."""
    taro = tmp_path / "taro" / "Maildir"
    d = daemon_factory(sections={"mailboxes": {"taro..yamada@example.test": str(taro)}})
    with connect(d) as client:
        assert client.mail("hanako.@docomo.example")[0] == 250
        for rcpt in ("taro..yamada@example.test", '"taro..yamada"@example.test'):
            assert client.rcpt(rcpt)[0] == 250
        assert client.data(b"Subject: dots\r\n\r\nhi\r\n")[0] == 250
    assert messages(d.maildir) == []
    fields, rest = split_trace(only_message(taro))
    assert fields["Return-Path"] == '<"hanako."@docomo.example>'
    assert fields["Delivered-To"] == '"taro..yamada"@example.test'
    check_received(fields["Received"], recipient='"taro..yamada"@example.test')
    assert rest == b"Subject: dots\n\nhi\n"
    assert 'FROM:<hanako.@docomo.example>' in d.log_text()  # the log has it as sent


def to_the_postmaster_mailbox(daemon_factory, tmp_path, rcpts: list[str], message: bytes) -> bytes:
    """Deliver ``message`` to ``rcpts`` with a [mailboxes] entry for postmaster@ the local
    domain; the copy stored there (the catch-all must stay empty)."""
    pm = tmp_path / "postmaster" / "Maildir"
    d = daemon_factory(sections={"delivery": {"local_domains": ["example.test"]},
                                 "mailboxes": {"postmaster@example.test": str(pm)}})
    with connect(d) as client:
        client.ehlo("client.example")
        assert client.mail(SENDER)[0] == 250
        for rcpt in rcpts:
            assert client.docmd("RCPT", f"TO:<{rcpt}>")[0] == 250
        assert client.data(message)[0] == 250
    assert messages(d.maildir) == []
    return only_message(pm)


def test_bare_postmaster_reaches_the_postmaster_mailbox(daemon_factory, tmp_path):
    """<Postmaster> is this host's postmaster (RFC 5321 4.5.1): with a [mailboxes] entry
    for postmaster@ a local domain, that is where it goes, not the catch-all."""
    stored = to_the_postmaster_mailbox(daemon_factory, tmp_path, ["Postmaster"],
                                       b"Subject: pm\r\n\r\nfor the postmaster\r\n")
    fields, rest = split_trace(stored)
    assert rest == b"Subject: pm\n\nfor the postmaster\n"
    # A trace field names a mailbox with its domain (RFC 5321 4.4): the address whose
    # Maildir it reached, which the server accepts, not its hostname, which it refuses.
    assert fields["Delivered-To"] == "postmaster@example.test"
    check_received(fields["Received"], recipient="postmaster@example.test")


def test_bare_postmaster_and_its_address_are_one_copy_and_one_delivered_to(daemon_factory, tmp_path):
    """<Postmaster> and postmaster@domain reach one mailbox: one copy, one Delivered-To:
    line (both are named postmaster@domain), and no FOR clause, which names exactly one
    recipient."""
    stored = to_the_postmaster_mailbox(daemon_factory, tmp_path,
                                       ["postmaster@example.test", "Postmaster"],
                                       b"Subject: pm\r\n\r\ntwice the postmaster\r\n")
    head, _, body = stored.partition(b"\nSubject: ")
    assert body == b"pm\n\ntwice the postmaster\n"
    assert re.findall(rb"^Delivered-To: (.*)$", head, re.M) == [b"postmaster@example.test"]
    assert head.startswith(b"Return-Path: <" + SENDER.encode() + b">\nDelivered-To: ")
    assert b" for <" not in head


@pytest.mark.parametrize("boxes, domains, expected", [
    ({"postmaster@b.test": "B", "postmaster@a.test": "A"}, ("a.test", "b.test"), "A"),
    ({"postmaster@b.test": "B"}, ("a.test", "b.test"), "B"),
    ({"postmaster@other.test": "O"}, ("a.test",), None),
    ({"postmaster@a.test": "A"}, (), "A"),
    ({"postmaster@a.test": "A", "postmaster@b.test": "B"}, (), None),  # which one? neither
    ({"postmaster@ä.test": "A", "postmaster@xn--4ca.test": "A"}, (), "A"),  # one, two spellings
    ({"alice@a.test": "X"}, ("a.test",), None),
])
def test_postmaster_box(boxes, domains, expected):
    # Where the router sends bare <Postmaster>; None: no entry of its own, the catch-all.
    router = delivery.Router("/catch-all", boxes, local_domains=domains)
    assert router.mailboxes.get("postmaster") == expected


def test_postmaster_and_its_address_in_another_case_are_one_delivered_to():
    router = delivery.Router("/nonexistent", {"postmaster@example.test": "/pm"},
                             local_domains=("example.test",))
    info = delivery.HeaderInfo(sender="a@b.test", helo="c.test", peer_ip="127.0.0.1",
                               by="mx.test.example", protocol="ESMTP", queue_id="1-1", when=0.0)
    head = info.render(["Postmaster", "PostMaster@Example.test"],
                       ["Postmaster", "PostMaster@Example.test"], router.postmaster).decode()
    assert re.findall(r"^Delivered-To: (.*)$", head, re.M) == ["postmaster@example.test"]
    # One recipient for the FOR clause too, named as the Delivered-To line names it.
    assert re.findall(r"\tfor <(.*)>;", head) == ["postmaster@example.test"]
    two = info.render(["Postmaster", "alice@example.test"], ["Postmaster"], router.postmaster).decode()
    assert "\tfor <" not in two  # two mailboxes' recipients: no FOR clause, as ever


@pytest.mark.parametrize("protocol, named", [("ESMTP", "postmaster@xn--4ca.test"),
                                             ("UTF8SMTP", "postmaster@ä.test")])
def test_bare_postmaster_at_an_internationalised_domain_is_ascii_unless_smtputf8(protocol, named):
    """A header of a message that did not ask for SMTPUTF8 stays ASCII (RFC 6531 3.7.3)."""
    router = delivery.Router("/nonexistent", {}, local_domains=("ä.test", "xn--4ca.test"))
    info = delivery.HeaderInfo(sender="a@b.test", helo="c.test", peer_ip="127.0.0.1",
                               by="mx.test.example", protocol=protocol, queue_id="1-1", when=0.0)
    head = info.render(["Postmaster"], [], router.postmaster).decode()
    assert f"for <{named}>;" in head, head


@pytest.mark.parametrize("boxes, domains, named", [
    ({"postmaster@b.test": "B"}, ("a.test", "b.test"), "postmaster@b.test"),  # where it goes
    ({}, ("a.test", "b.test"), "postmaster@a.test"),  # the catch-all: a domain we accept
    ({}, (), "Postmaster@mx.test.example"),  # no local domains: the server's own name
])
def test_bare_postmaster_is_named_in_trace_fields_by_an_address_this_server_accepts(
        boxes, domains, named):
    router = delivery.Router("/nonexistent", boxes, local_domains=domains)
    info = delivery.HeaderInfo(sender="a@b.test", helo="c.test", peer_ip="127.0.0.1",
                               by="mx.test.example", protocol="ESMTP", queue_id="1-1", when=0.0)
    head = info.render(["Postmaster"], ["Postmaster"], router.postmaster).decode()
    assert f"Delivered-To: {named}\n" in head and f"for <{named}>;" in head, head


def test_local_domains(daemon_factory):
    d = daemon_factory(sections={"delivery": {"local_domains": ["example.test"]}})
    with connect(d) as client:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("someone@elsewhere.test")[0] == 550
        assert client.docmd("DATA")[0] == 503  # no accepted recipient
        code, text = client.rcpt("someone@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert client.rcpt("postmaster@elsewhere.test")[0] == 550
        assert client.rcpt("user@sub.example.test")[0] == 550
        assert client.rcpt("user@EXAMPLE.test")[0] == 250
        assert client.rcpt("postmaster@example.test")[0] == 250
        assert client.docmd("RCPT TO:<Postmaster>")[0] == 250
        assert client.docmd("RCPT TO:<POSTMASTER>")[0] == 250
        assert client.data(b"Subject: local\r\n\r\nhello postmaster\r\n")[0] == 250
    stored = only_message(d.maildir)
    assert b"elsewhere" not in stored
    assert split_trace(stored)[1] == b"Subject: local\n\nhello postmaster\n"


# -- limits ----------------------------------------------------------------------------------

def test_size_limit_at_mail_and_after_the_dot(daemon_factory):
    d = daemon_factory(sections={"limits": {"max_message_size": 2000}})
    small = b"Subject: small\r\n\r\n" + b"fits\r\n" * 100
    big = b"Subject: big\r\n\r\n" + b"too-big-body-line\r\n" * 200
    with connect(d) as client:
        assert client.esmtp_features["size"] == "2000"
        code, text = client.mail(SENDER, ["SIZE=2001"])
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.mail(SENDER, ["SIZE=2000"])[0] == 250
        client.rset()
        # No SIZE= declared: the server finds out while reading and says so after the dot.
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("rcpt@example.test")[0] == 250
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert d.new_messages() == []
        # The session is still usable for the next message.
        assert client.sendmail(SENDER, ["rcpt@example.test"], small) == {}
    assert split_trace(only_message(d.maildir))[1] == small.replace(b"\r\n", b"\n")


def test_an_oversized_message_with_a_long_line_gets_552_however_it_is_sent(daemon_factory):
    """The same message, over the size limit and with a line over 1000 octets: 552 when
    the long line ends a read unfinished, as when it arrives in small pieces."""
    d = daemon_factory(sections={"limits": {"max_message_size": 2000}})
    client = RawSMTP(d.port)
    try:
        assert client.command(b"EHLO c.example") == 250
        for cut in (None, 1000):
            assert client.start_data()[0] == 354
            text = b"A" * 3000 + b"\r\n"
            for i in range(0, len(text), cut or len(text)):
                client.sock.sendall(text[i:i + (cut or len(text))])
                time.sleep(0.05)  # separate reads: the line is unfinished at each end
            client.sock.sendall(b".\r\n")
            code, reply = client.reply()
            assert (code, reply[4:9]) == (552, b"5.3.4"), cut
    finally:
        client.close()
    assert d.new_messages() == []


def test_recipients_past_the_limit_get_452(daemon_factory):
    d = daemon_factory(sections={"limits": {"max_recipients": 3}})
    with connect(d) as client:
        client.mail(SENDER)
        assert [client.rcpt(f"r{i}@example.test")[0] for i in range(3)] == [250] * 3
        code, text = client.rcpt("r3@example.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        # 452 is the orderly answer (RFC 5321 4.5.3.1.10), not a client error: many of
        # them never use up the error budget.
        for i in range(4, 20):
            assert client.rcpt(f"r{i}@example.test")[0] == 452
        assert client.data(b"Subject: three\r\n\r\nto three\r\n")[0] == 250
    stored = only_message(d.maildir)
    assert b"r3@" not in stored and b"r4@" not in stored and b"r19@" not in stored


def test_a_client_library_that_sends_every_rcpt_still_delivers_to_the_first_hundred(daemon):
    """Python's smtplib (as PHPMailer and nodemailer) sends every RCPT whatever the
    answer: 1,200 recipients get 100 250s and 1,100 452s, and the message reaches the
    first hundred.  (With Postfix's overshoot limit of 1,000 the session was closed at
    the 1,110th, in mid-transaction, and nothing was stored.)"""
    recipients = [f"r{i}@example.test" for i in range(1200)]
    client = smtplib.SMTP(daemon.host, daemon.port, timeout=30)
    try:
        refused = client.sendmail(SENDER, recipients, b"Subject: many\r\n\r\nto many\r\n")
    finally:
        client.close()
    assert sorted(refused) == sorted(recipients[100:])
    assert {code for code, _ in refused.values()} == {452}
    assert only_message(daemon.maildir).endswith(b"\n\nto many\n")


def received_headers(n: int) -> bytes:
    hop = b"Received: from relay%d.test by relay%d.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    return b"".join(hop % (i, i + 1) for i in range(n))


def test_mail_loop_detection(daemon):
    with connect(daemon) as client:
        client.mail(SENDER)
        client.rcpt("rcpt@example.test")
        code, text = client.data(received_headers(100) + b"Subject: loop\r\n\r\nlooping\r\n")
        assert (code, text[:5]) == (554, b"5.4.6")
        assert daemon.new_messages() == []
        ok = received_headers(99) + b"Subject: 99 hops\r\n\r\nstill fine\r\n"
        assert client.sendmail(SENDER, ["rcpt@example.test"], ok) == {}
        # Received: lines in the body are text, not hops.
        body = b"Subject: quoting\r\n\r\n" + received_headers(150)
        assert client.sendmail(SENDER, ["rcpt@example.test"], body) == {}
    assert len(daemon.new_messages()) == 2


def test_a_message_that_would_continue_the_received_field_is_refused(daemon):
    """Its first line, after the server's trace fields, would read as more of the server's
    Received: field: readers (Dovecot, Python's email) take it so."""
    with connect(daemon) as client:
        client.mail(SENDER)
        client.rcpt("rcpt@example.test")
        code, text = client.data(b" (authenticated as admin)\r\nSubject: x\r\n\r\nbody\r\n")
        assert (code, text) == (554, b"5.6.0 Message refused: first line begins with white "
                                      b"space (a header continuation)")
        assert daemon.new_messages() == []
        ok = b"Subject: x\r\n (folded)\r\n\r\n body\r\n"
        assert client.sendmail(SENDER, ["rcpt@example.test"], ok) == {}
    fields, rest = split_trace(only_message(daemon.maildir))
    assert rest == ok.replace(b"\r\n", b"\n")


# -- 8BITMIME / SMTPUTF8 ---------------------------------------------------------------------

def test_extensions_advertised(daemon):
    with connect(daemon) as client:
        for keyword in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8"):
            assert client.has_extn(keyword), keyword
        assert client.esmtp_features["size"] == "10485760"


def test_utf8_addresses_with_smtputf8(daemon):
    sender, rcpt = "jöran@exämple.test", "zoë@example.test"
    message = "Subject: Grüße\r\n\r\nnon-ASCII envelope\r\n".encode()
    with connect(daemon) as client:
        assert client.sendmail(sender, [rcpt], message, mail_options=["SMTPUTF8"]) == {}
    fields, rest = split_trace(only_message(daemon.maildir))
    assert fields["Return-Path"] == f"<{sender}>"
    check_received(fields["Received"], recipient=rcpt, protocol="UTF8SMTP")
    assert rest == message.replace(b"\r\n", b"\n")


def test_utf8_addresses_without_smtputf8_get_553(daemon):
    with connect(daemon) as client:
        client.command_encoding = "utf-8"  # send the bytes without announcing SMTPUTF8
        code, text = client.docmd("MAIL FROM:<jöran@example.test>")
        assert (code, text[:5]) == (553, b"5.6.7")
        assert client.mail(SENDER)[0] == 250
        code, text = client.docmd("RCPT TO:<zoë@example.test>")
        assert (code, text[:5]) == (553, b"5.6.7")
        assert client.docmd("DATA")[0] == 503
    assert daemon.new_messages() == []


# -- another client --------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_delivers(daemon):
    marker = uuid.uuid4().hex
    proc = subprocess.run(
        ["swaks", "--server", f"{HOST}:{daemon.port}", "--helo", "swaks.client.test",
         "--from", SENDER, "--to", "rcpt@example.test",
         "--header", f"Subject: swaks {marker}", "--body", f"hello from swaks {marker}"],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-2000:]
    stored = only_message(daemon.maildir)
    fields, rest = split_trace(stored)
    assert fields["Return-Path"] == f"<{SENDER}>"
    check_received(fields["Received"], recipient="rcpt@example.test")
    assert f"Subject: swaks {marker}\n".encode() in rest
    assert f"hello from swaks {marker}".encode() in rest
    assert b"\r" not in stored


# -- the log ---------------------------------------------------------------------------------

#: What one session (a delivery, then a refused message) leaves in the log, in order.
SESSION_LOG = [
    r"\[CONN\] 127\.0\.0\.1", r"\[SMTP\] 220 .*",
    r"\[SMTP\] EHLO client\.test", r"\[SMTP\] 250 .*",
    rf"\[SMTP\] MAIL FROM:<{re.escape(SENDER)}>.*", r"\[SMTP\] 250 2\.1\.0 .*",
    r"\[SMTP\] RCPT TO:<rcpt@example\.test>.*", r"\[SMTP\] 250 2\.1\.5 .*",
    r"\[SMTP\] DATA", r"\[SMTP\] 354 .*",
    "@STORE@", r"\[SMTP\] 250 2\.0\.0 .*",
    r"\[SMTP\] 552 5\.3\.4 .*",
    r"\[SMTP\] QUIT", r"\[SMTP\] 221 .*",
    r"\[CLOSE\] 127\.0\.0\.1 .+",
]


def test_log_reconstructs_the_session_and_never_holds_message_text(daemon_factory):
    d = daemon_factory(sections={"limits": {"max_message_size": 4000}})
    marker = uuid.uuid4().hex
    with connect(d) as client:
        client.sendmail(SENDER, ["rcpt@example.test"], body_text(marker))
        client.mail(SENDER)
        client.rcpt("rcpt@example.test")
        refused = f"Subject: {marker}\r\n\r\n".encode() + f"big-{marker}\r\n".encode() * 200
        assert client.data(refused)[0] == 552
    text = d.wait_for_log("[CLOSE]")
    assert marker not in text  # neither header nor body text, stored or refused
    path, = d.new_messages()
    conn = re.search(r"^\S+/(\d+) \[CONN\] 127\.0\.0\.1$", text, re.M)
    assert conn, text
    events = [re.sub(r"^\S+ ", "", line) for line in log_lines_of(text, conn.group(1))]
    i = 0
    for pattern in SESSION_LOG:
        pattern = pattern.replace("@STORE@", rf"\[STORE\] {re.escape(str(path))}")
        found = [j for j in range(i, len(events)) if re.fullmatch(pattern, events[j], re.I)]
        assert found, f"{pattern!r} not in the session log after line {i}:\n" + "\n".join(events)
        i = found[0] + 1


def test_a_low_descriptor_limit_bounds_the_open_maildirs_so_mail_never_gets_451(daemon_factory,
                                                                               tmp_path):
    """Under a descriptor limit of 64, 80 mailboxes delivered to in turn: the worker keeps
    a quarter of its limit open between messages, not 64 (which left every fiftieth
    message without a descriptor for its file: 451 for good mail)."""
    boxes = {f"u{i}@mx.test.example": tmp_path / "boxes" / f"u{i}" for i in range(80)}
    d = daemon_factory(workers=1, server={"max_workers": 1, "min_spare_workers": 0},
                       sections={"mailboxes": {a: str(p) for a, p in boxes.items()}})
    hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (64, hard))  # workers forked after inherit it
    old = set(worker_pids(d))
    d.signal(signal.SIGHUP)
    (worker,) = wait_until(lambda: workers_replacing(d, old), 15, what="a new worker")
    assert resource.prlimit(worker, resource.RLIMIT_NOFILE)[0] == 64
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        for n in range(240):
            assert not client.sendmail("s@client.example", [f"u{n % 80}@mx.test.example"],
                                       b"Subject: fd\r\n\r\nx\r\n")
    assert sum(len(os.listdir(p / "new")) for p in boxes.values()) == 240
    assert "delivery failed" not in d.log_text()


def test_a_recipient_address_never_becomes_a_path(daemon_factory):
    """Contract 5: addresses that read as paths (quoted local parts with slashes and
    dots, which RFC 5321 allows) reach the catch-all Maildir, or the mailbox the
    configuration names, and nothing is written anywhere else."""
    d = daemon_factory(sections={"mailboxes": {"alice@mx.test.example": str(Path("boxes") / "alice")}})
    hostile = ['"../../escape"@mx.test.example', '"/tmp/forksmtp-abs"@mx.test.example',
               '"a/../../../b"@mx.test.example', '"..\\\\..\\\\c"@mx.test.example',
               '"alice/../../x"@mx.test.example']
    # "../../escape" and "a/../../../b", taken as paths from the Maildir (d.tmp/Maildir),
    # land beside d.tmp, outside it: the look covers its parent.
    root = d.tmp.parent
    before = {p for p in root.rglob("*")}
    with smtplib.SMTP(HOST, d.port, timeout=10) as c:
        refused = c.sendmail(SENDER, hostile + ["alice@mx.test.example"],
                             b"Subject: paths\r\n\r\nbody\r\n")
    assert refused == {}
    made = {p for p in root.rglob("*") if p not in before and p.is_file()}
    catch_all = set((d.maildir / "new").iterdir())
    alice = d.config_path.parent / "boxes" / "alice" / "new"
    assert len(catch_all) == 1 and len(list(alice.iterdir())) == 1  # one copy per Maildir
    assert made <= catch_all | set(alice.iterdir()) | {d.log_path}, made - catch_all
    assert not os.path.exists("/tmp/forksmtp-abs")
