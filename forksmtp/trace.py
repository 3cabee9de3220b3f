"""Trace headers written at final delivery: Return-Path, Delivered-To, Received.

RFC 5321 4.4: the FOR clause names exactly one recipient, so it is given only when a
copy has exactly one; the full recipient list never appears (Bcc stays blind, 7.2).
Every client-supplied value (HELO name, addresses) passes through ``clean`` first so
that nothing a client sends can start a new header line or break the comment syntax.
Stored messages use LF line endings (the Maildir convention), so do these headers.
"""

from __future__ import annotations

import re
import time
from typing import Final

# Beside the ASCII controls: the C1 controls (NEL, U+0085, among them) and the Unicode
# line and paragraph separators, which end a line for some readers of stored mail
# (Python's str.splitlines, for one), though not for RFC 5322.
_UNSAFE_HELO: Final = re.compile(r"[^A-Za-z0-9.\-:\[\]_@\u00a0-\u2027\u202a-\U0010ffff]")
# Control characters (so no CR/LF), the line separators, and the bidirectional marks
# and overrides (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069) and U+FEFF: an
# SMTPUTF8 sender's address with U+202E in it reads backwards in the header, one way to
# make "elgoog" show as "google".  No address needs them (RFC 8264's PRECIS classes
# exclude them).
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]")

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clean(value: str, limit: int = 255) -> str:
    """A header-safe copy: no control characters (so no CR/LF), no line separators and
    no bidirectional marks, bounded length."""
    return _CONTROL.sub("?", value[:limit])


def clean_helo(name: str) -> str:
    """HELO names go inside a structured clause: letters, digits and .-:[]_@ only."""
    return _UNSAFE_HELO.sub("?", name[:255]) or "unknown"


def ascii_domain(name: str) -> str:
    """For a message that did not ask for SMTPUTF8, whose header must stay ASCII
    (RFC 6531 3.7.3): a UTF-8 domain name in its A-label form, or with "?" for each
    non-ASCII character where it is no domain name."""
    if name.isascii():
        return name
    try:
        label = name.encode("idna").decode("ascii")
        # Python's codec is IDNA 2003, which maps some names onto others ("straße" to
        # "strasse"): a form that does not convert back is no A-label of this name.
        if label.encode("ascii").decode("idna").lower() == name.lower():
            return label
    except UnicodeError:
        pass
    return _NON_ASCII.sub("?", name)


# A busy worker stamps many messages within one second: the text is built once per
# second (gmtime and its formatting were 1.6 % of a loaded worker's perf samples).
_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(when: float) -> str:
    """``Sun, 29 Nov 2026 00:53:20 +0000`` without locale-dependent strftime."""
    global _last_date
    second = int(when)
    if second == _last_date[0]:
        return _last_date[1]
    t = time.gmtime(second)
    text = (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
    _last_date = (second, text)
    return text


def qualified(recipient: str, postmaster: str, host: str, utf8: bool = False) -> str:
    """A recipient as a trace field names it.  Bare ``Postmaster`` (RFC 5321 4.5.1) is
    the only address a client may give without a domain, and the FOR clause's grammar
    (a Path or Mailbox, 4.4) has no room for one: it is named as ``postmaster``, the
    address it is stored for, or, where there is none, ``Postmaster@<host>``, this
    server's name, as Postfix qualifies the bare name with its own.  Without ``utf8``
    (the message did not ask for SMTPUTF8) its domain is given in ASCII."""
    if "@" in recipient:
        return recipient
    local, _, domain = (postmaster or f"{recipient}@{host}").rpartition("@")
    return f"{local}@{domain if utf8 else ascii_domain(domain)}"


def return_path(sender: str) -> bytes:
    return f"Return-Path: <{clean(sender)}>\n".encode("utf-8")


def delivered_to(recipient: str) -> bytes:
    return f"Delivered-To: {clean(recipient)}\n".encode("utf-8")


def received(*, helo: str, peer_ip: str, by: str, protocol: str, queue_id: str,
             recipient: str | None, when: float, tls: str = "", auth_user: str = "") -> bytes:
    """The Received: field (RFC 5321 4.4, with RFC 3848 protocol names)."""
    if not protocol.startswith("UTF8"):  # no SMTPUTF8: the recipient is ASCII already
        helo, auth_user = ascii_domain(helo), _NON_ASCII.sub("?", auth_user)
    extras = ""
    if tls:
        extras += f"\n\t({clean(tls)})"
    if auth_user:
        extras += f"\n\t(authenticated as {clean(auth_user, 64)})"
    rcpt = f"\n\tfor <{clean(recipient)}>" if recipient else ""
    literal = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    return (f"Received: from {clean_helo(helo)} ([{literal}])\n"
            f"\tby {clean_helo(by)} (forksmtp) with {protocol} id {queue_id}{extras}{rcpt};"
            f" {rfc5322_date(when)}\n").encode("utf-8")
