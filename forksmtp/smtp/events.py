"""Events the session hands to its caller.

The classes made for every message (Envelope, DataStart, DataChunk, DataEnd) write their
own ``__init__``: a dataclass's generated one is interpreted Python even in the compiled
build, and frozen ones assign each field through ``object.__setattr__`` (5 % of a busy
worker's user time).  They are values all the same: nothing assigns to their fields after
construction, and ``__eq__`` and ``__repr__`` still come from ``dataclass``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import replies as R
from .commands import Path
from .sasl import Credentials

#: Session phases (RFC 5321 4.1.4 order): also the worker's "SMTP phase" in ps and stats.
NEW, HELO, MAIL, RCPT, DATA = "new", "helo", "mail", "rcpt", "data"


@dataclass(slots=True, init=False)
class Envelope:
    """Transaction state: cleared by RSET, EHLO/HELO and the end of each message."""

    sender: Path
    params: dict[str, str | None]
    smtputf8: bool
    recipients: list[str]

    def __init__(self, sender: Path, params: dict[str, str | None], smtputf8: bool = False) -> None:
        self.sender = sender
        self.params = params
        self.smtputf8 = smtputf8
        self.recipients = []


@dataclass(slots=True, init=False)
class DataStart:
    envelope: Envelope

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope


@dataclass(slots=True, init=False)
class DataChunk:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)
class DataEnd:
    envelope: Envelope
    size: int
    error: R.Reply | None  # set: the message must be discarded and this reply given

    def __init__(self, envelope: Envelope, size: int, error: R.Reply | None) -> None:
        self.envelope = envelope
        self.size = size
        self.error = error




@dataclass(frozen=True, slots=True)
class StartTLS:
    """220 is queued: flush it, run the handshake, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Check the credentials, then call ``auth_result()``."""

    credentials: Credentials
