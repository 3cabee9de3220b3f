"""STARTTLS and AUTH rules of the sans-IO session, the password hashes and ``forksmtp passwd``.

The session tests drive ``Session`` the way ``connection.Connection`` does: a StartTLS
event is answered with ``tls_started()`` once the (here imaginary) handshake is done, an
AuthRequest with ``auth_result()`` after checking a small user table.  Every reply is
checked for RFC 5321 form; 334 challenges carry no enhanced status code (RFC 4954 4).

The password-file tests use real files, and ``forksmtp passwd`` runs as a real process.
"""

from __future__ import annotations

import base64
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forksmtp import auth
from forksmtp.smtp import replies as R
from forksmtp.smtp.session import (NEED_DATA, PAUSED, AuthRequest, DataEnd, DataStart, Session,
                                   SessionConfig, StartTLS)
from helpers import HOSTNAME, check_wire, heads, new_session

USERS = {"alice": "correct horse", "bob": "s3cret-bob"}
E = "EHLO client.test"
M = "MAIL FROM:<a@client.test>"
RC = "RCPT TO:<b@mx.test>"


def b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


class Peer:
    """The worker's half of the event API for STARTTLS and AUTH.

    ``handshake=False`` leaves a StartTLS unanswered (the session stays paused) so a
    test can look at what happens between the 220 and the end of the handshake."""

    def __init__(self, session: Session, users: dict[str, str] | None = None,
                 handshake: bool = True) -> None:
        self.s = session
        self.users = USERS if users is None else users
        self.handshake = handshake
        self.events: list[object] = []

    def pump(self) -> None:
        s = self.s
        while True:
            event = s.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            self.events.append(event)
            if isinstance(event, StartTLS):
                if not self.handshake:
                    return
                s.tls_started()
            elif isinstance(event, AuthRequest):
                c = event.credentials
                s.auth_result(self.users.get(c.username) == c.password, c.username)
            elif isinstance(event, DataStart):
                s.accept_data()
            elif isinstance(event, DataEnd):
                s.reply(event.error or R.R250_ACCEPTED)

    def feed(self, data: bytes) -> bytes:
        self.s.receive_data(data)
        self.pump()
        out = self.s.data_to_send()
        check_wire(out)
        return out

    def send(self, *lines: str | bytes) -> list[str]:
        """Lines one at a time (a client that waits); each reply as ``"535 5.7.8"``."""
        result = []
        for line in lines:
            raw = line.encode("utf-8") if isinstance(line, str) else line
            result += heads(self.feed(raw + b"\r\n"))
        return result


def peer(tls: bool = False, users=None, handshake: bool = True, **config) -> Peer:
    session = Session(SessionConfig(HOSTNAME, **config), tls=tls)
    session.start()
    check_wire(session.data_to_send())
    return Peer(session, users, handshake)


def ehlo_keywords(p: Peer) -> list[str]:
    wire = p.feed(b"EHLO client.test\r\n").decode()
    return [line[4:] for line in wire.split("\r\n")[1:-1]]


def tls_peer(**config) -> Peer:
    """STARTTLS and AUTH configured; the session is already encrypted and past EHLO."""
    p = peer(starttls=True, auth=True, **config)
    assert p.send(E, "STARTTLS", E) == ["250", "220 2.0.0", "250"]
    assert p.s.tls
    return p


# -- STARTTLS --------------------------------------------------------------------------

def test_starttls_is_not_offered_without_tls_config():
    p = peer()
    assert "STARTTLS" not in ehlo_keywords(p)
    assert p.send("STARTTLS") == ["502 5.5.1"]
    assert not any(isinstance(e, StartTLS) for e in p.events)


def test_starttls_is_offered_on_plain_connections_only():
    p = peer(starttls=True)
    assert "STARTTLS" in ehlo_keywords(p)
    implicit = peer(tls=True, starttls=True)  # an implicit-TLS (SMTPS) listener
    assert "STARTTLS" not in ehlo_keywords(implicit)
    assert implicit.send("STARTTLS") == ["503 5.5.1"]


def help_commands(p: Peer) -> list[str]:
    wire = p.feed(b"HELP\r\n").decode()
    assert wire.startswith("214 2.0.0 Commands: ") and wire.endswith("\r\n") and wire.count("\r\n") == 1
    return wire[len("214 2.0.0 Commands: "):-2].split()


BASE_HELP = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"]


@pytest.mark.parametrize("tls,config,extra", [
    (False, {}, []),
    (False, {"starttls": True}, ["STARTTLS"]),
    (False, {"starttls": True, "auth": True}, ["STARTTLS"]),  # AUTH waits for TLS: 538 now
    (True, {"starttls": True, "auth": True}, ["AUTH"]),  # over TLS: STARTTLS is done
    (True, {"auth": True}, ["AUTH"]),  # an implicit-TLS listener
    (False, {"auth": True, "auth_insecure": True}, ["AUTH"]),
    (False, {"starttls": True, "auth": True, "auth_insecure": True}, ["STARTTLS", "AUTH"]),
])
def test_help_lists_starttls_and_auth_where_ehlo_offers_them(tls, config, extra):
    """HELP names the commands a client can use now, the same set EHLO advertises."""
    p = peer(tls=tls, **config)
    p.send(E)
    assert help_commands(p) == BASE_HELP + extra
    offered = [word.split()[0] for word in ehlo_keywords(p)]
    assert [c for c in ("STARTTLS", "AUTH") if c in offered] == extra


def test_help_after_starttls_names_auth_not_starttls():
    p = tls_peer()
    assert help_commands(p) == BASE_HELP + ["AUTH"]


def test_starttls_with_a_parameter_is_a_syntax_error():
    p = peer(starttls=True)
    assert p.send(E, "STARTTLS now") == ["250", "501 5.5.4"]
    assert not p.s.tls


def test_starttls_before_ehlo_is_out_of_sequence():
    p = peer(starttls=True)
    assert p.send("STARTTLS") == ["503"]  # no enhanced codes before EHLO (RFC 2034)
    assert not p.s.tls


def test_starttls_inside_a_transaction_is_out_of_sequence():
    p = peer(starttls=True)
    assert p.send(E, M, "STARTTLS", RC, "STARTTLS") == ["250", "250 2.1.0", "503 5.5.1", "250 2.1.5", "503 5.5.1"]


def test_bytes_pipelined_after_starttls_are_discarded():
    p = peer(starttls=True, handshake=False)
    p.send(E)
    # CVE-2011-0411: the NOOP arrives in the same packet as STARTTLS.
    assert heads(p.feed(b"STARTTLS\r\nNOOP\r\n")) == ["220 2.0.0"]
    assert isinstance(p.events[-1], StartTLS)
    assert p.s.next_event() is PAUSED  # nothing runs until the handshake is done
    p.s.tls_started()
    p.pump()
    assert p.s.data_to_send() == b""  # the NOOP is never answered
    assert p.send(E) == ["250"]
    assert p.send("NOOP") == ["250 2.0.0"]  # a NOOP sent over TLS is
    assert any("discarded 6 octets pipelined after STARTTLS" in line for line in p.s.log)


def test_ehlo_starttls_and_injection_in_one_write():
    p = peer(starttls=True, handshake=False)
    assert heads(p.feed(b"EHLO a\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<b@mx.test>\r\n")) == [
        "250", "220 2.0.0"]
    p.s.tls_started()
    p.pump()
    assert p.s.data_to_send() == b""
    # The injected MAIL did not start a transaction: RCPT has no MAIL to belong to.
    assert p.send(E, RC) == ["250", "503 5.5.1"]


def test_plaintext_arriving_during_the_handshake_is_discarded_too():
    p = peer(starttls=True, handshake=False)
    p.send(E)
    assert p.send("STARTTLS") == ["220 2.0.0"]
    assert p.feed(b"NOOP\r\nMAIL FROM:<evil@x>\r\n") == b""  # still paused: no reply
    p.s.tls_started()
    p.pump()
    assert p.s.data_to_send() == b""
    assert p.send(E, RC) == ["250", "503 5.5.1"]


def test_after_tls_a_new_ehlo_is_required_and_starttls_is_gone():
    p = peer(starttls=True)
    assert p.send(E, "STARTTLS") == ["250", "220 2.0.0"]
    assert p.s.tls and p.s.helo_name == ""
    # RFC 3207 4.2: back to the greeting state, the codes kept (every reply after EHLO
    # carries one), and MAIL's parameters refused until the new EHLO.
    assert p.send(M, "NOOP", "MAIL FROM:<a@x.test> SIZE=10") == ["503 5.5.1", "250 2.0.0", "503 5.5.1"]
    assert "STARTTLS" not in ehlo_keywords(p)
    assert p.send("STARTTLS") == ["503 5.5.1"]
    assert p.send(M, RC) == ["250 2.1.0", "250 2.1.5"]


def test_tls_forgets_a_plaintext_authentication():
    p = peer(starttls=True, auth=True, auth_insecure=True)
    assert p.send(E, "AUTH PLAIN " + plain("alice", USERS["alice"])) == ["250", "235 2.7.0"]
    assert p.s.auth_user == "alice"
    assert p.send("STARTTLS", E) == ["220 2.0.0", "250"]
    assert p.s.auth_user == ""
    p.send(M)
    assert p.s.protocol == "ESMTPS"


# -- AUTH: offer and sequence ----------------------------------------------------------------

def test_auth_is_offered_only_over_tls():
    p = peer(starttls=True, auth=True)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(p))
    p.send("STARTTLS")
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(p)


def test_auth_before_tls_is_refused_with_538():
    p = peer(starttls=True, auth=True)
    assert p.send(E, "AUTH PLAIN " + plain("alice", USERS["alice"])) == ["250", "538 5.7.11"]
    assert p.send("AUTH LOGIN") == ["538 5.7.11"]
    assert not any(isinstance(e, AuthRequest) for e in p.events)
    assert p.s.auth_user == ""


def test_auth_where_no_tls_can_come_is_not_offered_502():
    """[auth] without [tls] (and without allow_insecure): 538 would ask for encryption
    that this listener cannot give, so AUTH is known but not offered (contract: 502)."""
    p = peer(auth=True)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(p))
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"]), "AUTH LOGIN") == [
        "502 5.5.1", "502 5.5.1"]
    assert not any(isinstance(e, AuthRequest) for e in p.events)
    assert peer(tls=True, auth=True).send(E, "AUTH PLAIN " + plain("alice", USERS["alice"])) == [
        "250", "235 2.7.0"]  # an implicit-TLS listener's session is encrypted from the start


@pytest.mark.parametrize("mechanism", ["PLA\u0131N", "LOG\u0131N", "PLAIN\u200b", "ＰＬＡＩＮ"])
def test_a_mechanism_name_is_ascii_or_unknown(mechanism):
    """RFC 4422 3.1: "PLAıN".upper() is "PLAIN" in Python, and must not run PLAIN."""
    p = tls_peer()
    assert p.send(f"AUTH {mechanism} " + plain("alice", USERS["alice"])) == ["504 5.5.4"]
    assert not any(isinstance(e, AuthRequest) for e in p.events)
    assert p.s.auth_user == ""


def test_auth_insecure_offers_auth_in_plaintext():
    p = peer(auth=True, auth_insecure=True)
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(p)
    assert p.send("AUTH PLAIN " + plain("bob", USERS["bob"])) == ["235 2.7.0"]


def test_auth_without_auth_config_is_not_offered():
    p = peer(tls=True)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(p))
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["502 5.5.1"]


def test_auth_before_ehlo_is_out_of_sequence():
    p = peer(tls=True, auth=True)
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["503"]


def test_auth_twice_is_503():
    p = tls_peer()
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["235 2.7.0"]
    assert p.send("AUTH PLAIN " + plain("bob", USERS["bob"])) == ["503 5.5.1"]
    assert p.s.auth_user == "alice"


def test_auth_after_a_failure_may_be_retried():
    p = tls_peer()
    assert p.send("AUTH PLAIN " + plain("alice", "wrong")) == ["535 5.7.8"]
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["235 2.7.0"]


def test_auth_during_a_transaction_is_503():
    p = tls_peer()
    assert p.send(M, "AUTH PLAIN " + plain("alice", USERS["alice"])) == ["250 2.1.0", "503 5.5.1"]
    assert p.send(RC, "AUTH LOGIN") == ["250 2.1.5", "503 5.5.1"]
    assert p.send("RSET", "AUTH PLAIN " + plain("alice", USERS["alice"])) == ["250 2.0.0", "235 2.7.0"]


# -- AUTH PLAIN and LOGIN exchanges ----------------------------------------------------

def test_plain_with_initial_response():
    p = tls_peer()
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["235 2.7.0"]
    creds = [e.credentials for e in p.events if isinstance(e, AuthRequest)]
    assert [(c.mechanism, c.username, c.password, c.authzid) for c in creds] == [
        ("PLAIN", "alice", USERS["alice"], "")]


def test_plain_with_an_empty_challenge():
    p = tls_peer()
    assert p.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert p.send(plain("alice", USERS["alice"])) == ["235 2.7.0"]
    assert p.s.auth_user == "alice"


def test_plain_mechanism_name_is_case_insensitive():
    p = tls_peer()
    assert p.send("auth plain " + plain("bob", USERS["bob"])) == ["235 2.7.0"]


def test_plain_keeps_the_authzid_for_the_caller():
    p = tls_peer()
    p.send("AUTH PLAIN " + plain("alice", USERS["alice"], authzid="bob"))
    creds = [e.credentials for e in p.events if isinstance(e, AuthRequest)][0]
    assert (creds.authzid, creds.username) == ("bob", "alice")


def test_equals_sign_is_an_empty_initial_response_not_a_request_for_a_challenge():
    # RFC 4954 4: "=" is a zero-length initial response; for PLAIN that is malformed.
    p = tls_peer()
    assert p.send("AUTH PLAIN =") == ["501 5.5.2"]
    # LOGIN: an empty user name; the exchange goes on to the password prompt.
    assert p.feed(b"AUTH LOGIN =\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert p.send(b64("x")) == ["535 5.7.8"]
    creds = [e.credentials for e in p.events if isinstance(e, AuthRequest)]
    assert creds[-1].username == ""


def test_login_with_challenges():
    p = tls_peer()
    assert p.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"  # "Username:"
    assert p.feed(b64("alice").encode() + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
    assert p.send(b64(USERS["alice"])) == ["235 2.7.0"]
    assert p.s.auth_user == "alice"


def test_login_with_initial_user_name():
    p = tls_peer()
    assert p.feed(f"AUTH LOGIN {b64('bob')}\r\n".encode()) == b"334 UGFzc3dvcmQ6\r\n"
    assert p.send(b64(USERS["bob"])) == ["235 2.7.0"]


def test_login_wrong_password_is_535():
    p = tls_peer()
    p.feed(f"AUTH LOGIN {b64('bob')}\r\n".encode())
    assert p.send(b64("guess")) == ["535 5.7.8"]
    assert p.s.auth_user == ""


@pytest.mark.parametrize("start, responses", [
    ("AUTH PLAIN", ["*"]),
    ("AUTH LOGIN", ["*"]),
    ("AUTH LOGIN", [b64("alice"), "*"]),
    ("AUTH PLAIN *", []),
    ("AUTH PLAIN", ["* "]),  # blanks around the star are taken, as around base64
    ("AUTH LOGIN", ["\t*"]),
], ids=["plain", "login-user", "login-password", "plain-initial", "star-blank", "blank-star"])
def test_star_cancels_with_501(start, responses):
    p = tls_peer()
    got = p.send(start, *responses)
    assert got[-1] == "501 5.0.0"  # cancelled (RFC 4954 4), not a base64 error
    assert not any(isinstance(e, AuthRequest) for e in p.events)
    # The exchange is over: the session takes commands and a new AUTH again.
    assert p.send("NOOP", "AUTH PLAIN " + plain("alice", USERS["alice"])) == ["250 2.0.0", "235 2.7.0"]


@pytest.mark.parametrize("lines", [
    ["AUTH PLAIN not!base64"],
    ["AUTH PLAIN AGFsaWNl="],             # bad padding
    ["AUTH PLAIN " + b64("alice:secret")],  # valid base64, no NUL separators
    ["AUTH PLAIN " + b64(b"\0alice\0\xff\xfe")],  # not UTF-8
    ["AUTH PLAIN", "%%%%"],
    ["AUTH LOGIN", "a b c"],
    ["AUTH LOGIN", b64("alice"), "////=x"],
    ["AUTH LOGIN", "YWxpY2U=", "YWJj===="],  # "abc" with padding where none is needed
    ["AUTH LOGIN", "YWxpY2V="],  # "alice", its padding bits not zero (canonical: YWxpY2U=)
], ids=["initial", "padding", "no-nul", "not-utf8", "plain-response", "login-user", "login-password",
        "excess-padding", "nonzero-padding-bits"])
def test_malformed_base64_is_501_5_5_2(lines):
    p = tls_peer()
    assert p.send(*lines)[-1] == "501 5.5.2"
    assert not any(isinstance(e, AuthRequest) for e in p.events)
    assert p.send("NOOP") == ["250 2.0.0"]


@pytest.mark.parametrize("lines, text", [
    (["AUTH PLAIN not!base64"], "Invalid base64 data"),
    (["AUTH PLAIN " + b64("alice:secret")], "Invalid PLAIN response: expected authzid NUL user NUL password"),
    (["AUTH PLAIN ="], "Invalid PLAIN response: expected authzid NUL user NUL password"),  # empty
    (["AUTH PLAIN " + b64(b"\0alice\0secret\0x")], "Invalid PLAIN response: expected authzid NUL user NUL password"),
    (["AUTH PLAIN " + b64(b"\0alice\0\xff\xfe")], "Invalid credentials: not UTF-8"),
    (["AUTH LOGIN", b64(b"al\xe9")], "Invalid credentials: not UTF-8"),
], ids=["base64", "no-nul", "empty", "four-parts", "plain-not-utf8", "login-not-utf8"])
def test_a_malformed_response_is_told_what_is_wrong(lines, text):
    """Each refusal names the fault: an empty PLAIN response (AUTH PLAIN =) is valid
    base64, and "Invalid base64 data" would send its author looking in the wrong place."""
    p = tls_peer()
    for line in lines[:-1]:
        p.send(line)
    assert p.feed(lines[-1].encode() + b"\r\n") == f"501 5.5.2 {text}\r\n".encode()
    assert not any(isinstance(e, AuthRequest) for e in p.events)


def test_unknown_mechanism_is_504_and_a_bare_auth_is_501():
    p = tls_peer()
    assert p.send("AUTH CRAM-MD5", "AUTH GSSAPI abc=", "AUTH") == ["504 5.5.4", "504 5.5.4", "501 5.5.4"]


@pytest.mark.parametrize("separator", ["\t", " \t "])
def test_a_tab_separates_the_response_as_a_space_does(separator):
    """As it separates a command's words (commands.split_words), as in Postfix."""
    p = tls_peer()
    p.send(f"AUTH PLAIN{separator}" + plain("alice", USERS["alice"]))
    assert [(e.credentials.mechanism, e.credentials.username) for e in p.events
            if isinstance(e, AuthRequest)] == [("PLAIN", "alice")]


@pytest.mark.parametrize("separator", ["\x7f", "\x85", "\x0b"])
def test_a_control_character_before_the_response_is_a_syntax_error_not_an_unknown_mechanism(separator):
    """Only blanks separate the response (RFC 4954 4: SP); "PLAIN<DEL>..." names no
    mechanism."""
    p = tls_peer()
    assert p.send(f"AUTH PLAIN{separator}" + plain("alice", USERS["alice"])) == ["501 5.5.4"]
    assert not any(isinstance(e, AuthRequest) for e in p.events)


def test_a_mail_line_may_run_500_octets_over_the_limit_for_its_auth_parameter():
    """RFC 4954 5: AUTH= lengthens the MAIL line by up to 500 octets, where AUTH is taken;
    the rest of the line keeps the 512 limit."""
    core = "MAIL FROM:<a@example.test>"
    core += " " * (510 - len(core))  # 512 octets with the CRLF
    value = "x" * (500 - len(" AUTH="))
    p = tls_peer()
    assert p.send(core + " AUTH=" + value, "RSET") == ["250 2.1.0", "250 2.0.0"]
    assert p.send(core + " AUTH=" + value + "x") == ["500 5.5.2"]
    assert p.send(core + "x AUTH=" + value) == ["500 5.5.2"]
    # Where AUTH= is not taken (before TLS), it adds nothing.
    p = peer(starttls=True, auth=True)
    assert p.send(E, core + " AUTH=<>") == ["250", "500 5.5.2"]


def test_failed_auth_counts_toward_the_error_limit():
    p = tls_peer(max_errors=3)
    assert p.send("AUTH PLAIN " + plain("alice", "x"), "AUTH PLAIN " + plain("alice", "y")) == [
        "535 5.7.8", "535 5.7.8"]
    assert p.send("AUTH PLAIN " + plain("alice", "z")) == ["535 5.7.8", "421 4.7.0"]
    assert p.s.closed


# -- line lengths ------------------------------------------------------------------------

def _plain_line(total: int) -> str:
    """An ``AUTH PLAIN`` line of exactly ``total`` octets with its CRLF (spaces pad it)."""
    head = "AUTH PLAIN"
    payload_len = (total - len(head) - 3) // 4 * 4
    password = "p" * (payload_len * 3 // 4 - len("\0alice\0"))
    payload = plain("alice", password)
    assert len(payload) == payload_len
    return head + " " * (total - 2 - len(head) - payload_len) + payload


def test_long_auth_line_up_to_12288_octets_is_accepted():
    line = _plain_line(12288)
    assert len(line) + 2 == 12288
    password = base64.b64decode(line.split()[-1]).split(b"\0")[2].decode()
    p = tls_peer()
    p.users = {"alice": password}
    assert p.send(line) == ["235 2.7.0"]


def test_auth_line_over_12288_octets_is_500_and_the_session_goes_on():
    p = tls_peer()
    assert p.send(_plain_line(12289)) == ["500 5.5.6"]
    assert not any(isinstance(e, AuthRequest) for e in p.events)
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["235 2.7.0"]


def test_long_response_to_a_challenge_is_accepted():
    p = tls_peer()
    password = "q" * 8000
    p.users = {"alice": password}
    p.feed(b"AUTH LOGIN " + b64("alice").encode() + b"\r\n")
    assert p.send(b64(password)) == ["235 2.7.0"]


def test_other_commands_keep_the_512_octet_limit_when_auth_is_on():
    p = tls_peer()
    assert p.send("NOOP " + "x" * 505) == ["250 2.0.0"]  # 512 with CRLF
    assert p.send("NOOP " + "x" * 506) == ["500 5.5.2"]  # 513
    assert p.send("MAIL FROM:<" + "a" * 600 + "@x>") == ["500 5.5.2"]
    assert p.send("NOOP " + "x" * 13000) == ["500 5.5.2"]  # over the buffer's AUTH limit
    assert p.send(M) == ["250 2.1.0"]


def test_an_authentication_exchange_line_over_12288_octets_is_5_5_6():
    # RFC 4954 4: X.5.6 is the code for a line of the exchange (the command, or a
    # response), sent in one piece or in many; the exchange is cancelled.
    for pieces in (1, 7):
        p = tls_peer()
        assert p.send("AUTH LOGIN") == ["334"]
        line = b"x" * 13000 + b"\r\n"
        cuts = [len(line) * i // pieces for i in range(pieces + 1)]
        out = b"".join(p.feed(line[a:b]) for a, b in zip(cuts, cuts[1:]))
        assert heads(out) == ["500 5.5.6"]
        assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["235 2.7.0"]


# -- require_tls and required auth -------------------------------------------------------

def test_require_tls_refuses_mail_before_starttls():
    p = peer(starttls=True, require_tls=True)
    assert p.send(E, M) == ["250", "530 5.7.0"]
    assert p.send("STARTTLS", E, M) == ["220 2.0.0", "250", "250 2.1.0"]


def test_require_tls_takes_no_password_in_the_clear_even_with_allow_insecure():
    """RFC 3207 4: with TLS required, commands before STARTTLS are refused; credentials
    above all.  allow_insecure let AUTH run in the clear there (235)."""
    p = peer(starttls=True, auth=True, auth_insecure=True, require_tls=True)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(p))
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["538 5.7.11"]
    assert p.send("STARTTLS", E, "AUTH PLAIN " + plain("alice", USERS["alice"])) == [
        "220 2.0.0", "250", "235 2.7.0"]


def test_auth_required_refuses_mail_before_auth():
    p = tls_peer(auth_required=True)
    assert p.send(M) == ["530 5.7.0"]
    assert p.send("AUTH PLAIN " + plain("alice", "wrong"), M) == ["535 5.7.8", "530 5.7.0"]
    assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"]), M) == ["235 2.7.0", "250 2.1.0"]


# -- secrets never reach the log -----------------------------------------------------------

def test_session_log_never_holds_the_payload_or_the_password():
    secret = "Tr0ub4dor&3-unique"
    users = {"alice": secret}
    p = tls_peer()
    p.users = users
    login_user = b64("alice")
    lines = [
        "AUTH PLAIN " + plain("alice", secret + "-wrong"),
        "auth plain " + plain("alice", secret + "-lower"),
        "AUTH LOGIN " + login_user, b64(secret + "-login"),
        "AUTH LOGIN", login_user, b64(secret + "-challenge"),
        "AUTH PLAIN", plain("alice", secret + "-plainchallenge"),
        "AUTH\tPLAIN " + plain("alice", secret + "-tab"),
        "AUTH PLAIN " + plain("alice", secret + "-bad") + "!!",
        "AUTH PLAIN " + plain("alice", secret),
    ]
    got = p.send(*lines)
    assert got[-1] == "235 2.7.0"
    log = "\n".join(p.s.log)
    payloads = [line.split()[-1].rstrip("!") for line in lines if line.split()[-1] not in ("PLAIN", "LOGIN")]
    for text in payloads + [secret, "alice\0"]:
        assert text not in log
    assert "AUTH PLAIN ***" in log and "<AUTH response>" in log
    for event in p.events:  # reprs of the credentials hide the password too
        assert secret not in repr(event)


REFUSED_AUTH = {  # how AUTH is refused -> (the session, the lines before AUTH, the reply)
    "538-before-tls": (lambda: peer(starttls=True, auth=True), [E], "538 5.7.11"),
    "503-before-ehlo": (lambda: peer(tls=True, auth=True), [], "503"),
    "503-in-a-transaction": (tls_peer, ["MAIL FROM:<a@x.test>"], "503 5.5.1"),
    "502-not-offered": (lambda: peer(tls=True), [E], "502 5.5.1"),
}


@pytest.mark.parametrize("refusal", list(REFUSED_AUTH))
def test_responses_pipelined_behind_a_refused_auth_stay_out_of_the_log(refusal):
    """A client that sends its LOGIN user and password lines without waiting for the 334s
    has them read as commands once AUTH is refused: they must not be logged as such."""
    secret = "Tr0ub4dor&3-pipelined"
    make, before, refused = REFUSED_AUTH[refusal]
    p = make()
    p.send(*before)
    wire = "".join(f"{line}\r\n" for line in ["AUTH LOGIN", b64("alice"), b64(secret), "NOOP"])
    replies = heads(p.feed(wire.encode()))
    assert len(replies) == 4 and replies[0] == refused and replies[-1].startswith("250")
    log = "\n".join(p.s.log)
    assert b64(secret) not in log and b64("alice") not in log
    assert log.count("<line after AUTH, ") == 2 and "NOOP" in log


@pytest.mark.parametrize("auth_line, refused", [
    (b" AUTH LOGIN", "500 5.5.2"),                 # a blank before the verb: no command
    (b"AUTH LOGIN " + b"A" * 13000, "500 5.5.6"),  # over the AUTH line limit
    (b"AUTH LOGIN \xff", "501 5.5.2"),             # not UTF-8
    (b"AUTH LOGIN \x01", "501 5.5.2"),             # a control character
    (b"AUTH", "501 5.5.4"),                        # no mechanism
], ids=["blank-before", "too-long", "not-utf8", "control", "bare"])
def test_responses_pipelined_behind_a_malformed_auth_stay_out_of_the_log(auth_line, refused):
    """The mask took these lines for AUTH commands, but the count of response lines to
    hide was set only for well-formed ones: the user name and password behind them
    were logged as unknown commands."""
    secret = "Tr0ub4dor&3-malformed"
    p = tls_peer()
    wire = auth_line + b"\r\n" + "".join(f"{line}\r\n" for line in [b64("alice"), b64(secret), "NOOP"]).encode()
    replies = heads(p.feed(wire))
    assert len(replies) == 4 and replies[0] == refused and replies[-1].startswith("250")
    log = "\n".join(p.s.log)
    assert b64(secret) not in log and b64("alice") not in log
    assert log.count("<line after AUTH, ") == 2 and "NOOP" in log


def test_responses_pipelined_behind_an_auth_with_a_bare_lf_stay_out_of_the_log():
    secret = "Tr0ub4dor&3-bare-lf"
    p = tls_peer()
    wire = b"AUTH LOGIN\n\r\n" + "".join(f"{line}\r\n" for line in [b64("alice"), b64(secret), "NOOP"]).encode()
    replies = heads(p.feed(wire))
    assert len(replies) == 4 and replies[0] == "501 5.5.2" and replies[-1].startswith("250")
    log = "\n".join(p.s.log)
    assert b64(secret) not in log and b64("alice") not in log
    assert log.count("<line after AUTH, ") == 2 and "NOOP" in log and not p.s.auth_user


def test_a_response_with_a_bare_lf_ends_the_exchange_and_nothing_of_it_is_logged():
    """A SASL response base64-wrapped at 76 octets (LF between the pieces): each piece
    ran as a command of its own, and the last one was logged as one."""
    secret = "correct-horse-battery-staple-" * 4
    wrapped = base64.encodebytes(f"\0alice\0{secret}".encode()).rstrip(b"\n")
    assert wrapped.count(b"\n") >= 2
    p = tls_peer()
    assert p.send("AUTH PLAIN") == ["334"]
    assert heads(p.feed(wrapped + b"\r\n")) == ["501 5.5.2"]  # one line, one reply
    assert p.send("NOOP") == ["250 2.0.0"] and not p.s.auth_user
    log = "\n".join(p.s.log)
    for piece in wrapped.split(b"\n"):
        assert piece.decode() not in log
    assert log.count("<command line with a bare LF>") == 1


# -- the Received protocol names (RFC 3848, RFC 6531) ------------------------------------

@pytest.mark.parametrize("tls, auth_user, mail, expected", [
    (False, False, M, "ESMTP"),
    (True, False, M, "ESMTPS"),
    (False, True, M, "ESMTPA"),
    (True, True, M, "ESMTPSA"),
    (True, False, M + " SMTPUTF8", "UTF8SMTPS"),
    (True, True, M + " SMTPUTF8", "UTF8SMTPSA"),
    (False, False, M + " SMTPUTF8", "UTF8SMTP"),
])
def test_protocol_names(tls, auth_user, mail, expected):
    p = peer(starttls=True, auth=True, auth_insecure=True)
    p.send(E)
    if tls:
        p.send("STARTTLS", E)
    if auth_user:
        assert p.send("AUTH PLAIN " + plain("alice", USERS["alice"])) == ["235 2.7.0"]
    assert p.send(mail) == ["250 2.1.0"]
    assert p.s.protocol == expected


def test_protocol_of_implicit_tls_and_of_helo():
    p = peer(tls=True, starttls=True)
    p.send(E, M)
    assert p.s.protocol == "ESMTPS"
    h = new_session()
    Peer(h).send("HELO client.test", M)
    assert h.protocol == "SMTP"


# -- auth.py: hashes and the password file ---------------------------------------------

HASH = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)\Z")


def test_hash_format_is_scrypt_with_salt_and_parameters():
    encoded = auth.hash_password("pw")
    m = HASH.match(encoded)
    assert m, encoded
    assert (int(m[1]), int(m[2]), int(m[3])) == (auth.LOG2_N, auth.R, auth.P)
    assert len(base64.b64decode(m[4])) == 16 and len(base64.b64decode(m[5])) == auth.KEY_LEN
    assert auth.hash_password("pw") != encoded  # a fresh salt each time
    # The secret is not stored.  It has characters base64 never produces, so this cannot
    # match a random salt or key by chance (as "pw" could, once in about 60 runs).
    secret = "open sesame!"
    assert secret not in auth.hash_password(secret)
    assert base64.b64encode(secret.encode()).decode() not in auth.hash_password(secret)


def test_verify():
    encoded = auth.hash_password("correct horse")
    assert auth.verify(encoded, "correct horse")
    assert not auth.verify(encoded, "correct horse ")
    assert not auth.verify(encoded, "")
    assert not auth.verify(None, "correct horse")  # unknown user
    assert not auth.verify(None, "")


def test_verify_non_ascii_password():
    encoded = auth.hash_password("pässwörd✓")
    assert auth.verify(encoded, "pässwörd✓") and not auth.verify(encoded, "passwort")


def test_load_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"# users\n\nalice:{auth.hash_password('a')}\n  # more\nbob:{auth.hash_password('b')}\n")
    users = auth.load(str(f))
    assert sorted(users) == ["alice", "bob"]
    assert auth.verify(users["alice"], "a") and not auth.verify(users["bob"], "a")


def test_a_missing_file_is_an_error_that_says_how_to_make_it(tmp_path):
    """Not an empty table: a typo in the path would shut every user out without a word."""
    path = tmp_path / "nothing"
    with pytest.raises(auth.PasswordFileError, match=f"{path}: no such file .*forksmtp passwd"):
        auth.load(str(path))
    path.write_text("")  # an empty file is no users, as the operator made it
    assert auth.load(str(path)) == {}


@pytest.mark.parametrize("bad", ["alice", "alice:plaintext", ":scrypt$14$8$1$AAAA$AAAA",
                                 "alice:md5$1$2$3$AAAA$AAAA", "alice:scrypt$99$8$1$AAAA$AAAA",
                                 "alice:scrypt$x$8$1$AAAA$AAAA", "alice:scrypt$14$8$1$AA!A$AAAA"])
def test_load_bad_line_names_the_line(tmp_path, bad):
    f = tmp_path / "passwd"
    f.write_text(f"bob:{auth.hash_password('b')}\n{bad}\n")
    with pytest.raises(auth.PasswordFileError) as exc:
        auth.load(str(f))
    assert "line 2" in str(exc.value) and str(f) in str(exc.value)
    # The problem in the file's terms, not Python's.
    assert not any(w in str(exc.value) for w in ("unpack", "invalid literal", "Only base64"))


def test_a_hash_with_fields_missing_says_what_is_expected(tmp_path):
    f = tmp_path / "passwd"
    f.write_text("alice:scrypt$14$8$1$AAAA\n")
    with pytest.raises(auth.PasswordFileError, match=r"line 1: expected scrypt\$<log2 N>\$<r>\$<p>\$<salt>\$<key>, "
                                                     r"got 5 fields separated by '\$'$"):
        auth.load(str(f))


def test_set_password_creates_a_0600_file(tmp_path):
    f = tmp_path / "passwd"
    auth.set_password(str(f), "alice", "pw1")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert auth.verify(auth.load(str(f))["alice"], "pw1")
    assert "pw1" not in f.read_text()
    assert os.listdir(tmp_path) == ["passwd"]  # no temporary file left behind


def test_set_password_replaces_only_that_users_line(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"# managed by forksmtp passwd\nal:{auth.hash_password('x')}\n"
                 f"alice:{auth.hash_password('old')}\nbob:{auth.hash_password('b')}\n")
    f.chmod(0o644)
    before = f.read_text().splitlines()
    auth.set_password(str(f), "alice", "new")
    after = f.read_text().splitlines()
    assert len(after) == 4
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert after[2] != before[2] and after[2].startswith("alice:")
    users = auth.load(str(f))
    assert auth.verify(users["alice"], "new") and not auth.verify(users["alice"], "old")
    assert stat.S_IMODE(f.stat().st_mode) == 0o640  # others lose access; the group keeps it
    auth.set_password(str(f), "carol", "c")
    assert f.read_text().splitlines()[:4] == after
    assert auth.verify(auth.load(str(f))["carol"], "c")


@pytest.mark.parametrize("user", ["", "a:b", "a b", "a\tb", "a\nb", "#admin"])  # "#": a comment line
def test_set_password_refuses_bad_user_names(tmp_path, user):
    with pytest.raises(auth.PasswordFileError):
        auth.set_password(str(tmp_path / "passwd"), user, "pw")
    assert not (tmp_path / "passwd").exists()


# -- SASLprep of names and passwords (RFC 4013, RFC 4616 2) -------------------------------

NFC_USER, NFD_USER = "jos\u00e9", "jose\u0301"
STORED_PW, SENT_PW = "caf\u00e9 cr\u00e8me", "cafe\u0301\u00a0cre\u0300me\u00ad"  # NBSP, soft hyphen


def test_check_compares_the_prepared_forms(tmp_path):
    f = tmp_path / "passwd"
    assert auth.set_password(str(f), NFD_USER, STORED_PW) == (NFC_USER, 0)
    users = auth.load(str(f))
    assert list(users) == [NFC_USER] and f.read_text().startswith(NFC_USER + ":")
    assert auth.check(users, NFD_USER, SENT_PW) == NFC_USER
    assert auth.check(users, NFC_USER, STORED_PW) == NFC_USER
    assert auth.check(users, NFC_USER, STORED_PW, authzid=NFD_USER) == NFC_USER  # itself, spelt otherwise
    assert auth.check(users, NFC_USER, STORED_PW, authzid="bob") is None  # no proxy authorization
    assert auth.check(users, NFC_USER, "cafe creme") is None
    assert auth.check(users, "bob", STORED_PW) is None
    assert auth.check(users, NFC_USER, STORED_PW + "\u0007") is None  # SASLprep refuses it: no match
    assert auth.check(users, NFC_USER + "\u0007", STORED_PW) is None
    assert auth.check(users, NFC_USER, STORED_PW, authzid="\u0007") is None
    # What the log tells apart from a wrong password: an authzid naming someone else.
    assert [auth.acts_for_another(NFC_USER, z) for z in ("", NFC_USER, NFD_USER, "bob", "\u0007")] == [
        False, False, False, True, True]


def test_how_many_hashes_a_check_computes_depends_on_what_was_sent_only(tmp_path, monkeypatch):
    """Timing tells nothing the server holds: for one password sent, a success, a wrong
    password, an unknown user, a refused name and an authzid of someone else cost the
    same number of scrypt checks: one, or two where SASLprep changes the password (its
    prepared form and, for hashes written before forksmtp prepared passwords, as sent)."""
    auth.set_password(str(tmp_path / "passwd"), "alice", "pw")
    f = tmp_path / "passwd"
    auth.set_password(str(f), "prep", SENT_PW)  # its prepared form, matched by the first check
    f.write_text(f.read_text() + f"nfd:{auth.hash_password(SENT_PW)}\n")  # as an older passwd wrote it
    users = auth.load(str(f))
    derive, calls = auth._derive, []
    monkeypatch.setattr(auth, "_derive", lambda *a: calls.append(a) or derive(*a))
    for password, hashes in [("pw", 1), (SENT_PW, 2), ("p\u0000w", 1), ("\u00ad", 1), ("p\ud800w", 1)]:
        for user, authzid in [("alice", ""), ("prep", ""), ("nfd", ""), ("mallory", ""), ("al\u202eice", ""),
                              ("\u200b", ""), ("alice", "bob"), ("alice", "\ue000")]:
            calls.clear()
            auth.check(users, user, password, authzid)
            assert len(calls) == hashes, (user, password, authzid)


def test_a_hash_of_a_password_as_typed_still_matches_it_as_typed(tmp_path):
    """Files written before forksmtp prepared passwords hold hashes of them as typed: a
    tab, full-width letters, a decomposed accent.  Sent as typed, each still logs in."""
    f = tmp_path / "passwd"
    typed = {"tab": "pw\tx", "wide": "\uff50\uff41\uff53\uff53", "nfd": "cafe\u0301", "micro": "mu\u00b5"}
    f.write_text("".join(f"{user}:{auth.hash_password(pw)}\n" for user, pw in typed.items()))
    users = auth.load(str(f))
    for user, pw in typed.items():
        assert auth.check(users, user, pw) == user, user
        assert auth.check(users, user, pw + "x") is None
    assert auth.check(users, "wide", "pass") is None  # the prepared form is not what was hashed


def test_a_name_saslprep_leaves_empty_is_no_one(tmp_path):
    """RFC 4616 2: verification fails when preparation gives an empty string."""
    users = {"": auth.hash_password("pw")}  # no file can hold it (load refuses it), a table could
    assert auth.check(users, "\u200b", "pw") is None and auth.check(users, "", "pw") is None


def test_load_prepares_the_names_written_by_hand(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"{NFD_USER}:{auth.hash_password(STORED_PW)}\n")
    assert auth.check(auth.load(str(f)), NFC_USER, SENT_PW) == NFC_USER


def load_error(f: Path, text: str) -> str:
    f.write_text(text)
    with pytest.raises(auth.PasswordFileError) as exc:
        auth.load(str(f))
    return str(exc.value)


@pytest.mark.parametrize("name, reason", [
    ("b\u0007b", "U+0007 is a control character"),
    ("\u00ad", "nothing is left of it"),
    ("\u05d3\u05d5\u05d3" + "1", "right-to-left text must begin and end with a right-to-left character"),
    ("a\u200eb", "U+200E is a character that changes display properties or is deprecated"),
])
def test_load_refuses_a_name_saslprep_refuses_and_names_the_line(tmp_path, name, reason):
    """No client could log in as it; the file is wrong, as with a bad hash."""
    f = tmp_path / "passwd"
    assert load_error(f, f"alice:{auth.hash_password('a')}\n{name}:{auth.hash_password('b')}\n") == (
        f"{f}: line 2: user name {name!r}: {reason} (SASLprep, RFC 4013)")


def test_a_line_that_is_not_utf8_is_an_error_naming_it_and_passwd_leaves_the_file(tmp_path):
    """Not a traceback at a start, a reload or in `forksmtp passwd`; nothing rewritten."""
    f = tmp_path / "passwd"
    content = f"alice:{auth.hash_password('a')}\n".encode() + b"# caf\xe9 (Latin-1)\n"
    f.write_bytes(content)
    with pytest.raises(auth.PasswordFileError) as exc:
        auth.load(str(f))
    assert str(exc.value) == f"{f}: line 2: not UTF-8 text (octet 0xe9 at position 6)"
    r = passwd("passwd", "bob", "-f", str(f), stdin="pw\n", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (1, b"")
    assert r.stderr.decode() == f"forksmtp passwd: {f}: line 2: not UTF-8 text (octet 0xe9 at position 6)\n"
    assert f.read_bytes() == content


def test_a_byte_order_mark_and_any_line_ending_are_read(tmp_path):
    """Files saved by editors that write a BOM, or CRLF or CR line endings."""
    f = tmp_path / "passwd"
    a, b = auth.hash_password("a"), auth.hash_password("b")
    for text in [f"\ufeff# users\r\nalice:{a}\r\nbob:{b}\r\n", f"\ufeffalice:{a}\rbob:{b}"]:
        f.write_bytes(text.encode())
        users = auth.load(str(f))
        assert (auth.check(users, "alice", "a"), auth.check(users, "bob", "b")) == ("alice", "bob")
    auth.set_password(str(f), "carol", "c")  # rewritten with LF endings and no mark
    lines = f.read_bytes().split(b"\n")
    assert lines[:2] == [f"alice:{a}".encode(), f"bob:{b}".encode()] and lines[2].startswith(b"carol:")


def test_load_refuses_two_lines_of_one_name_in_two_spellings(tmp_path):
    """Whichever line won, one user would be shut out, or log in as the other."""
    f = tmp_path / "passwd"
    assert load_error(f, f"IX:{auth.hash_password('a')}\n# and\n\u2168:{auth.hash_password('b')}\n") == (
        f"{f}: line 3: user name '\u2168' is the user of line 1 too (both are 'IX' in SASLprep form, "
        f"RFC 4013); remove one of the lines, or set the password again with forksmtp passwd to make "
        f"them one")


def test_set_password_replaces_the_users_line_in_any_spelling(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"{NFD_USER}:{auth.hash_password('old')}\nbob:{auth.hash_password('b')}\n"
                 f"{NFC_USER}:{auth.hash_password('older')}\n")
    with pytest.raises(auth.PasswordFileError, match="is the user of line 1 too"):
        auth.load(str(f))
    assert auth.set_password(str(f), NFC_USER, "new") == (NFC_USER, 2)
    lines = f.read_text().splitlines()
    assert [line.partition(":")[0] for line in lines] == [NFC_USER, "bob"]  # in its place, once
    users = auth.load(str(f))
    assert auth.check(users, NFD_USER, "new") == NFC_USER and auth.check(users, "bob", "b") == "bob"


@pytest.mark.parametrize("password, reason", [
    ("pw\u0007", "password refused: U+0007 is a control character (SASLprep, RFC 4013)"),
    ("pw\U0001f600", "password refused: U+1F600 is not assigned in Unicode 3.2, which SASLprep uses "
                      "(SASLprep, RFC 4013)"),
    ("\u00ad\u200b", "password refused: nothing is left of it after SASLprep (RFC 4013)"),
])
def test_set_password_refuses_what_saslprep_refuses(tmp_path, password, reason):
    with pytest.raises(auth.PasswordFileError) as exc:
        auth.set_password(str(tmp_path / "passwd"), "alice", password)
    assert str(exc.value) == reason
    assert not (tmp_path / "passwd").exists()


def test_set_password_stores_the_prepared_password(tmp_path):
    f = tmp_path / "passwd"
    auth.set_password(str(f), "alice", SENT_PW)
    assert auth.verify(auth.load(str(f))["alice"], STORED_PW)  # the hash is of the prepared form


# -- forksmtp passwd, as a process -------------------------------------------------------

def passwd(*args: str, stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forksmtp", *args], input=stdin.encode(),
                          capture_output=True, cwd=cwd, timeout=30)


def test_passwd_command_with_file(tmp_path):
    f = tmp_path / "passwd"
    r = passwd("passwd", "alice", "-f", str(f), stdin="s3cret pass\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert b"s3cret" not in r.stdout + r.stderr
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    r = passwd("passwd", "bob", "-f", str(f), stdin="other\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    users = auth.load(str(f))
    assert auth.verify(users["alice"], "s3cret pass")  # the line as typed, spaces kept
    assert auth.verify(users["bob"], "other")
    assert "s3cret" not in f.read_text()


def test_passwd_command_says_how_it_wrote_a_name_saslprep_changed(tmp_path):
    f = tmp_path / "passwd"
    r = passwd("passwd", "\u2168", "-f", str(f), stdin="pw\n", cwd=tmp_path)  # ROMAN NUMERAL NINE
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == f"password for \u2168 (as 'IX', its SASLprep form) written to {f}\n"
    assert list(auth.load(str(f))) == ["IX"]
    with f.open("a") as out:
        out.write(f"I\u00adX:{auth.hash_password('old')}\n")  # the same name, written by hand
    r = passwd("passwd", "IX", "-f", str(f), stdin="pw2\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == (f"password for IX written to {f}\n"
                                 f"the 2 lines of that name are now this one line\n")
    assert list(auth.load(str(f))) == ["IX"] and len(f.read_text().splitlines()) == 1
    r = passwd("passwd", "bob", "-f", str(f), stdin="pw\u0007\n", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode() == ("forksmtp passwd: password refused: U+0007 is a control character "
                                 "(SASLprep, RFC 4013)\n")
    assert list(auth.load(str(f))) == ["IX"]


def test_passwd_command_uses_the_config_password_file(tmp_path):
    f = tmp_path / "auth" / "passwd"
    f.parent.mkdir()
    conf = tmp_path / "forksmtp.toml"
    conf.write_text(f'[delivery]\nmaildir = "{tmp_path / "Maildir"}"\n\n'
                    f'[auth]\npassword_file = "{f}"\nallow_insecure = true\n')
    r = passwd("-c", str(conf), "passwd", "alice", stdin="pw-one\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = passwd("passwd", "bob", "-c", str(conf), stdin="pw-two\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    users = auth.load(str(f))
    assert auth.verify(users["alice"], "pw-one") and auth.verify(users["bob"], "pw-two")


def test_passwd_command_errors(tmp_path):
    r = passwd("passwd", "alice", stdin="pw\n", cwd=tmp_path)  # neither -f nor -c
    assert r.returncode == 2 and b"-f" in r.stderr
    f = tmp_path / "passwd"
    r = passwd("passwd", "alice", "-f", str(f), stdin="\n", cwd=tmp_path)
    assert r.returncode == 2 and not f.exists()
    conf = tmp_path / "noauth.toml"
    conf.write_text(f'[delivery]\nmaildir = "{tmp_path / "Maildir"}"\n')
    r = passwd("passwd", "alice", "-c", str(conf), stdin="pw\n", cwd=tmp_path)
    assert r.returncode == 2 and b"password_file" in r.stderr
    conf.write_text('[auth]\npassword_file = 5\n')
    r = passwd("passwd", "alice", "-c", str(conf), stdin="pw\n", cwd=tmp_path)
    assert r.returncode == 2 and b"auth.password_file = 5: must be a string" in r.stderr, r.stderr
    missing = tmp_path / "no-such-dir" / "passwd"
    r = passwd("passwd", "alice", "-f", str(missing), stdin="pw\n", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.decode().strip() == f"forksmtp passwd: cannot write {missing}: No such file or directory"


def test_passwd_with_a_config_or_an_input_that_is_no_such_thing_says_so_at_once(tmp_path):
    """A FIFO for -c held it, a config that is not UTF-8 or has a 5,000-digit number gave
    a traceback, and /dev/zero for the password was read without end."""
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "latin1.toml").write_bytes(b'[auth]\npassword_file = "caf\xe9"\n')
    (tmp_path / "digits.toml").write_text("[server]\nworkers = " + "1" * 5000 + "\n")
    for name, said in [("fifo.toml", "cannot read: not a regular file"),
                       ("latin1.toml", "invalid TOML: not UTF-8 text"),
                       ("digits.toml", "invalid TOML: a number of more than 4,300 digits")]:
        r = passwd("-c", str(tmp_path / name), "passwd", "alice", stdin="pw\n", cwd=tmp_path)
        assert (r.returncode, r.stderr.decode()) == (2, f"forksmtp passwd: {tmp_path / name}: {said}\n")
    f = tmp_path / "passwd"
    with open("/dev/zero", "rb") as zero:
        r = subprocess.run([sys.executable, "-m", "forksmtp", "passwd", "alice", "-f", str(f)], stdin=zero,
                           capture_output=True, cwd=tmp_path, timeout=30)
    assert (r.returncode, r.stderr) == (2, b"forksmtp passwd: password of more than 4,096 characters refused\n")
    r = passwd("passwd", "alice", "-f", str(f), stdin="x" * 4096 + "\n", cwd=tmp_path)
    assert r.returncode == 0 and auth.check(auth.load(str(f)), "alice", "x" * 4096) == "alice"
    assert not (tmp_path / "caf\xe9").exists()


def test_a_password_file_past_16_mib_is_refused_unread(tmp_path):
    f = tmp_path / "passwd"
    f.write_text(f"alice:{auth.hash_password('a')}\n")
    os.truncate(f, auth.MAX_FILE_OCTETS)  # sparse: NULs up to the bound, still read
    with pytest.raises(auth.PasswordFileError, match="line 2: expected user:hash"):
        auth.load(str(f))
    os.truncate(f, auth.MAX_FILE_OCTETS + 1)
    with pytest.raises(auth.PasswordFileError) as exc:
        auth.load(str(f))
    assert str(exc.value) == f"{f}: larger than 16 MiB: not a password file"


def test_passwd_with_config_before_the_certificate_exists(tmp_path):
    """The password file is often set up before the [tls] certificate exists: passwd
    reads only [auth] password_file (relative to the config file) and does not refuse."""
    cfg = tmp_path / "forksmtp.toml"
    cfg.write_text('[tls]\ncert_file = "not-yet.pem"\nkey_file = "not-yet.key"\n'
                   '[auth]\npassword_file = "passwd"\n')
    done = subprocess.run([sys.executable, "-m", "forksmtp", "passwd", "carol", "-c", str(cfg)],
                          input="s3cret\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    users = auth.load(str(tmp_path / "passwd"))
    assert auth.verify(users["carol"], "s3cret")


# -- the AUTH parameter of MAIL (RFC 4954 5) ------------------------------------------------

@pytest.mark.parametrize("value", ["<>", "alice@example.test", "a+2Bb@example.test"])
def test_mail_auth_parameter_is_taken_where_auth_is_offered(value):
    p = tls_peer()
    assert p.send(f"MAIL FROM:<a@x.test> AUTH={value}") == ["250 2.1.0"]
    assert p.send("RSET", "AUTH PLAIN " + plain("alice", USERS["alice"])) == ["250 2.0.0", "235 2.7.0"]
    assert p.send(f"MAIL FROM:<a@x.test> AUTH={value}") == ["250 2.1.0"]


@pytest.mark.parametrize("param", ["AUTH=a+b@x.test", "AUTH=a+2b@x.test", "AUTH=", "AUTH"])
def test_mail_auth_parameter_must_be_xtext(param):
    p = tls_peer()
    assert p.send(f"MAIL FROM:<a@x.test> {param}") == ["501 5.5.4"]


def test_mail_auth_parameter_is_unknown_where_auth_is_not_offered():
    p = peer(starttls=True, auth=True)  # offered only after STARTTLS
    assert p.send(E, "MAIL FROM:<a@x.test> AUTH=<>") == ["250", "555 5.5.4"]
    assert peer().send(E, "MAIL FROM:<a@x.test> AUTH=<>") == ["250", "555 5.5.4"]


@pytest.mark.parametrize("log2_n, r, p, loads", [
    (14, 8, 1, True),    # the default: 16 MiB
    (15, 8, 1, True),    # 32 MiB
    (16, 8, 1, False),   # 64 MiB and a little more: OpenSSL would refuse every check
    (20, 1, 1, False),   # 128 MiB
    (10, 32, 16, True),  # 4 MiB
])
def test_a_hash_no_check_could_compute_is_refused_at_load(tmp_path, log2_n, r, p, loads):
    """scrypt parameters within the format's ranges may still need more memory than a
    check may take: such a line used to load, then crash the worker at every AUTH for
    that user (a crash loop any client knowing the name could start)."""
    salt, key = base64.b64encode(b"s" * 16).decode(), base64.b64encode(bytes(32)).decode()
    f = tmp_path / "passwd"
    f.write_text(f"carol:scrypt${log2_n}${r}${p}${salt}${key}\n")
    if loads:
        assert not auth.verify(auth.load(str(f))["carol"], "wrong")
    else:
        with pytest.raises(auth.PasswordFileError, match="line 1: scrypt parameters need .* octets") as info:
            auth.load(str(f))
        # The figures say why: the need, exactly, above the allowance.
        need, allowed = (int(n.replace(",", "")) for n in re.findall(r"[\d,]{6,}", str(info.value)))
        assert need > allowed == 64 << 20
    # Whatever a hash says, a check answers (False) instead of raising.
    assert auth.verify(f"scrypt$16$8$1${salt}${key}", "pw") is False


def _reading_its_terminal(pid: int) -> bool | None:
    """Whether ``pid`` sleeps in a system call on its terminal (/proc/PID/syscall: the
    call a task that is not running is in, and its arguments); None where that cannot
    be read.  After the prompt, that call is getpass's read."""
    try:
        with open(f"/proc/{pid}/syscall", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return None
    try:  # "running", or "-1 SP PC" outside a system call: no fd to look at
        target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
        return target in ("/dev/tty", os.readlink(f"/proc/{pid}/fd/0"))
    except (OSError, ValueError, IndexError):
        return False


def _until_reading_its_terminal(pid: int, limit: float = 10.0) -> None:
    """Waits until ``pid`` blocks reading its terminal.  A key typed the moment the
    prompt shows can come too soon: a Ctrl-C whose SIGINT lands between the prompt's
    write and the read runs CPython's C-level handler, but KeyboardInterrupt is raised
    only once the read returns, which it then never does (the test waited out its 30 s,
    and closing the terminal killed the child with SIGHUP: status -1)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        reading = _reading_its_terminal(pid)
        if reading is None or reading:
            return
        time.sleep(0.005)


def _passwd_at_a_terminal(tmp_path: Path, keys: bytes) -> tuple[int, bytes]:
    """`forksmtp passwd` with a terminal of its own (getpass reads /dev/tty): ``keys``
    typed at the prompt; its exit status and everything it wrote to the terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        # As a shell starts a foreground job: Ctrl-C and Ctrl-\ do what they do at a
        # terminal.  A test run started in the background by a non-interactive shell
        # has SIGINT ignored, the child inherited that, and its Ctrl-C did nothing.
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "forksmtp", "passwd", "alice",
                                  "-f", str(tmp_path / "passwd")])
    out, deadline, typed = b"", time.monotonic() + 30, False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
            if not typed and b"Password: " in out:
                _until_reading_its_terminal(pid)
                os.write(fd, keys)
                typed = True
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


@pytest.mark.parametrize("keys, code", [(b"\x04", 2), (b"\x03", 130)])
def test_passwd_at_a_terminal_ended_by_ctrl_d_or_ctrl_c_writes_nothing_and_no_traceback(
        tmp_path, keys, code):
    status, out = _passwd_at_a_terminal(tmp_path, keys)
    assert b"Traceback" not in out, out.decode(errors="replace")
    assert status == code, out.decode(errors="replace")
    assert not (tmp_path / "passwd").exists()


def test_ctrl_c_at_the_prompt_ends_it_even_where_the_test_run_ignores_sigint(tmp_path):
    """A run started in the background by a non-interactive shell (a CI runner's, say)
    has SIGINT ignored; the terminal's child must not inherit that, or its Ctrl-C does
    nothing and the test waits out its 30 s (status 1, once the terminal closes)."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status, out = _passwd_at_a_terminal(tmp_path, b"\x03")
    finally:
        signal.signal(signal.SIGINT, before)
    assert status == 130, out.decode(errors="replace")
    assert not (tmp_path / "passwd").exists()


def test_passwd_at_a_terminal_asks_once_and_does_not_echo(tmp_path):
    """Contract: the password is read without echo on a terminal, with no confirmation
    line: one prompt, the typed password nowhere in what the terminal shows, and the
    stored hash verifies it."""
    secret = "s3cret-typed-at-a-tty"
    status, out = _passwd_at_a_terminal(tmp_path, secret.encode() + b"\r")
    assert status == 0, out.decode(errors="replace")
    assert out.count(b"Password: ") == 1, out
    assert secret.encode() not in out, out
    name, _, stored = (tmp_path / "passwd").read_text().strip().partition(":")
    assert name == "alice" and auth.verify(stored, secret)


def test_an_auth_deferred_is_454_4_7_0_and_the_client_may_try_again():
    """The worker could not have the credentials checked now (the checks running for the
    client's address fill the failure limit): a temporary failure, RFC 4954 6, and the
    session goes on unauthenticated."""
    p = tls_peer()
    p.s.receive_data(f"AUTH PLAIN {plain('alice', 'correct horse')}\r\n".encode())
    event = p.s.next_event()
    assert isinstance(event, AuthRequest)
    p.s.auth_deferred()
    wire = p.s.data_to_send()
    check_wire(wire)
    assert wire == b"454 4.7.0 Temporary authentication failure\r\n"
    assert p.s.auth_user == ""
    assert p.send(f"AUTH PLAIN {plain('alice', 'correct horse')}") == ["235 2.7.0"]


def test_an_auth_deferred_does_not_count_toward_max_errors():
    """The server checked nothing: in stress mode (one error allowed) the 454 must not
    close the session of a client it told to try again."""
    p = tls_peer(max_errors=1)
    p.s.receive_data(f"AUTH PLAIN {plain('alice', 'correct horse')}\r\n".encode())
    assert isinstance(p.s.next_event(), AuthRequest)
    p.s.auth_deferred()
    assert heads(p.s.data_to_send()) == ["454 4.7.0"]
    assert not p.s.closed
    assert p.send(f"AUTH PLAIN {plain('alice', 'correct horse')}") == ["235 2.7.0"]
