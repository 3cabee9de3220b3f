"""The trace headers: the date (RFC 5322 section 3.3, UTC, built once per second), and the
client-supplied values in them."""

from __future__ import annotations

import email.utils
import random

import pytest

from forksmtp import trace
from helpers import new_session, transcript


def reference(when: float) -> str:
    return email.utils.formatdate(int(when), usegmt=True).replace("GMT", "+0000")


def test_known_date():
    assert trace.rfc5322_date(1_700_000_000.75) == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert trace.rfc5322_date(1_704_067_199.0) == "Sun, 31 Dec 2023 23:59:59 +0000"
    assert trace.rfc5322_date(1_704_067_200.0) == "Mon, 01 Jan 2024 00:00:00 +0000"


def test_every_call_gives_its_own_second_whatever_came_before():
    # The per-second cache must never hand out the previous second's text: same second,
    # the next one, one far back, and random times in any order all match the reference.
    rng = random.Random(5322)
    base = 1_795_935_909.0
    times = [base, base + 0.999, base + 1.0, base + 1.5, base - 86_400 * 400, base + 0.2]
    times += [rng.uniform(0, 4_102_444_800) for _ in range(2_000)]
    for when in times:
        assert trace.rfc5322_date(when) == reference(when), when


def test_received_header_carries_the_date():
    header = trace.received(helo="client.test", peer_ip="192.0.2.1", by="mx.test",
                            protocol="ESMTP", queue_id="ABC", recipient="a@b.test",
                            when=1_700_000_000.0)
    assert header.endswith(b"; Tue, 14 Nov 2023 22:13:20 +0000\n")


def received_from(helo: str, protocol: str, auth_user: str = "") -> bytes:
    header = trace.received(helo=helo, peer_ip="192.0.2.1", by="mx.test", protocol=protocol,
                            queue_id="ABC", recipient=None, when=0.0, auth_user=auth_user)
    return header


def test_a_utf8_helo_name_stays_out_of_a_message_without_smtputf8():
    # RFC 6531 3.7.3: only an SMTPUTF8 transaction's headers may carry UTF-8.
    assert received_from("exämple.test", "ESMTP").startswith(b"Received: from xn--exmple-cua.test (")
    assert received_from("b\u00fccher", "ESMTPSA", auth_user="j\u00f6").isascii()
    assert b"(authenticated as j?)" in received_from("x", "ESMTPA", auth_user="j\u00f6")
    utf8 = received_from("exämple.test", "UTF8SMTP", auth_user="j\u00f6").decode()
    assert utf8.startswith("Received: from exämple.test (") and "authenticated as jö" in utf8


# Characters that end a line for some readers of stored mail (str.splitlines, for one):
# the ASCII controls, the C1 controls (NEL among them), the line and paragraph separators.
LINE_ENDERS = ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def test_no_client_value_breaks_a_stored_header_line():
    for char in LINE_ENDERS + ["\x00", "\x7f", "\x9f"]:
        value = f"a{char}b@ex\u00e4mple.test"
        for cleaned in (trace.clean(value), trace.clean_helo(value)):
            assert len(f"X: {cleaned}".splitlines()) == 1 and cleaned.isprintable(), (char, cleaned)
    # Printable non-ASCII stays: SMTPUTF8 addresses and names are legitimate.
    assert trace.clean("j\u00f6@b\u00fccher.test") == "j\u00f6@b\u00fccher.test"
    assert trace.clean_helo("b\u00fccher.test\u00a0") == "b\u00fccher.test\u00a0"


def test_a_helo_name_idna_2003_would_change_is_not_given_as_its_a_label():
    # Python's codec maps "ß" to "ss": strasse.test is another domain than straße.test.
    assert trace.ascii_domain("stra\u00dfe.test") == "stra?e.test"
    assert trace.ascii_domain("B\u00fccher.Test") == "xn--bcher-kva.Test"
    assert trace.ascii_domain("\u00c4\u00d6.test") == "xn--4ca0b.test"


def trace_fields(addr: str) -> list[str]:
    """Return-Path, Delivered-To and Received for ``addr``, which the session accepts
    as an SMTPUTF8 sender."""
    s = new_session()
    assert transcript(s, ["EHLO client.test", f"MAIL FROM:<{addr}> SMTPUTF8"]) == [250, 250]
    fields = [trace.return_path(addr), trace.delivered_to(addr),
              trace.received(helo="h", peer_ip="192.0.2.1", by="mx.test", protocol="UTF8SMTP",
                             queue_id="Q", recipient=addr, when=0.0)]
    return [field.decode("utf-8") for field in fields]


@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200f", "\u061c", "\ufeff"])
def test_bidirectional_marks_do_not_reach_the_trace_fields(char):
    """An SMTPUTF8 sender with U+202E reads backwards in the header ("gro.elgoog"
    shows as "google.org"): the marks are replaced, as control characters are."""
    for text in trace_fields(f"{char}gro.elgoog@x.test"):
        assert char not in text and "?gro.elgoog@x.test" in text
    assert trace.clean("b\u00fccher \u200d\u200b") == "b\u00fccher \u200d\u200b"  # joiners stay


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029"])
def test_addresses_in_trace_fields_cannot_start_a_line(char):
    """The session accepts SMTPUTF8 addresses holding NEL, U+2028 or U+2029 (lines end
    there for some readers): Return-Path, Delivered-To and the FOR clause must not let
    them start a line of their own."""
    for text in trace_fields(f'"a{char}X-Injected: 1"@example.test'):
        assert len(text.splitlines()) == text.count("\n"), repr(text)


def test_an_ipv6_peer_is_an_ipv6_address_literal():
    """RFC 5321 4.1.3: [IPv6:...]."""
    field = trace.received(helo="h", peer_ip="2001:db8::1", by="mx.test", protocol="ESMTP",
                           queue_id="Q", recipient=None, when=0.0)
    assert field.startswith(b"Received: from h ([IPv6:2001:db8::1])\n")


def test_the_authenticated_user_is_cut_to_64_characters():
    field = trace.received(helo="h", peer_ip="192.0.2.1", by="mx.test", protocol="ESMTPA",
                           queue_id="Q", recipient=None, when=0.0, auth_user="u" * 300)
    assert b"(authenticated as " + b"u" * 64 + b")" in field


@pytest.mark.parametrize("host, expected", [
    ("mx.example.test", "Postmaster@mx.example.test"),
    ("mx.bücher.test", "Postmaster@mx.xn--bcher-kva.test"),
])
def test_bare_postmaster_is_named_with_a_domain(host, expected):
    """RFC 5321 4.4: a FOR clause holds a Path or a Mailbox, both with a domain: the
    address it is stored for, else this server's name."""
    assert trace.qualified("Postmaster", "", host) == expected
    assert trace.qualified("Postmaster", "postmaster@a.test", host) == "postmaster@a.test"
    assert trace.qualified("postmaster@b.test", "postmaster@a.test", host) == "postmaster@b.test"
    field = trace.received(helo="c.test", peer_ip="127.0.0.1", by=host, protocol="ESMTP",
                           queue_id="1-1", recipient=trace.qualified("Postmaster", "", host),
                           when=0.0).decode()
    assert f"for <{expected}>;" in field


@pytest.mark.parametrize("helo, shown", [("a..\u00fcber.test", "a..?ber.test"),
                                         ("\u00fc" * 64 + ".test", "?" * 64 + ".test")])
def test_a_utf8_helo_name_with_no_a_label_is_written_with_question_marks(helo, shown):
    """RFC 6531 3.7.3: a message without SMTPUTF8 keeps an ASCII header; a name the IDNA
    codec refuses (an empty label, one over 63 octets) gets "?" per non-ASCII character."""
    field = trace.received(helo=helo, peer_ip="192.0.2.1", by="mx.test", protocol="ESMTP",
                           queue_id="Q", recipient=None, when=0.0)
    assert field.startswith(f"Received: from {shown} ([192.0.2.1])\n".encode())
    assert field.isascii()
