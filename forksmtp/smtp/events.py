"""Events the session hands to its caller."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import replies as R
from .commands import Path
from .sasl import Credentials

#: Session phases (RFC 5321 4.1.4 order): also the worker's "SMTP phase" in ps and stats.
NEW, HELO, MAIL, RCPT, DATA = "new", "helo", "mail", "rcpt", "data"


@dataclass(slots=True)
class Envelope:
    """Transaction state: cleared by RSET, EHLO/HELO and the end of each message."""

    sender: Path
    params: dict[str, str | None]
    smtputf8: bool = False
    recipients: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DataStart:
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    envelope: Envelope
    size: int
    error: R.Reply | None  # set: the message must be discarded and this reply given




@dataclass(frozen=True, slots=True)
class StartTLS:
    """220 is queued: flush it, run the handshake, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Check the credentials, then call ``auth_result()``."""

    credentials: Credentials
