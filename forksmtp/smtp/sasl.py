"""AUTH PLAIN (RFC 4616) and LOGIN exchanges, as a tiny sans-IO state machine.

An ``AuthExchange`` is fed the client's response lines and answers with either the next
``334`` challenge or the decoded ``Credentials``; a ``*`` cancels (501), and bad base64,
a PLAIN response without its three parts or text that is not UTF-8 is a syntax error
(501 5.5.2), all raised as ``CommandError``.  Checking the password
is the caller's business: it is slow on purpose (scrypt) and has nothing to do with SMTP.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from . import replies as R
from .commands import CommandError

MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class Credentials:
    mechanism: str
    username: str
    password: str
    authzid: str = ""

    def __repr__(self) -> str:  # never let a password reach a log through repr()
        return f"Credentials({self.mechanism!r}, {self.username!r}, password=***)"


def _decode(text: str) -> bytes:
    text = text.strip()  # blanks around the base64 are taken, so around the "*" too
    if text == "*":
        raise CommandError(R.R501_AUTH_CANCELLED)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(R.R501_BAD_BASE64) from None
    # b64decode takes padding beyond the needed ("QUJD====") and padding bits that are
    # not zero ("QR=="); RFC 4648 3.5 lets a decoder refuse both, and one spelling per
    # value is what a client must send.
    if base64.b64encode(data) != text.encode("ascii"):
        raise CommandError(R.R501_BAD_BASE64)
    return data


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(R.R501_NOT_UTF8) from None


class AuthExchange:
    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._username: str | None = None

    def start(self, initial: str | None):
        """The AUTH command itself: a challenge Reply or Credentials."""
        if initial is None:
            return R.R334_EMPTY if self.mechanism == "PLAIN" else R.R334_USERNAME
        return self.feed(initial if initial != "=" else "")

    def feed(self, line: str):
        """One client response line: a challenge Reply or Credentials."""
        if self.mechanism == "PLAIN":
            return self._plain(_decode(line))
        if self._username is None:
            self._username = _utf8(_decode(line))
            return R.R334_PASSWORD
        return Credentials("LOGIN", self._username, _utf8(_decode(line)))

    def _plain(self, data: bytes) -> Credentials:
        parts = data.split(b"\0")
        if len(parts) != 3:  # RFC 4616 2: [authzid] NUL authcid NUL passwd
            raise CommandError(R.R501_BAD_PLAIN)
        authzid, user, password = (_utf8(p) for p in parts)
        return Credentials("PLAIN", user, password, authzid)
