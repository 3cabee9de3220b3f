"""STARTTLS (RFC 3207) and AUTH (RFC 4954) for the sans-IO session.

A mixin of ``Session``: the commands, the AUTH exchange and the two answers the caller
owes (``tls_started`` after the handshake, ``auth_result`` after checking a password).
Kept apart so that session.py reads as plain RFC 5321.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import replies as R
from .commands import CommandError, split_words
from .events import NEW, AuthRequest, StartTLS
from .sasl import MECHANISMS, AuthExchange, Credentials

if TYPE_CHECKING:
    from .buffer import LineBuffer
    from .events import Envelope
    from .settings import SessionConfig


class SecureCommands:
    """STARTTLS and AUTH state and commands (mixed into Session)."""

    # Session's state and helpers that these commands use, declared so that each class
    # type-checks (and compiles) on its own; Session assigns them all in __init__.
    config: SessionConfig
    tls: bool
    phase: str
    helo_name: str
    esmtp: bool
    enhanced: bool
    envelope: Envelope | None
    auth_user: str
    _auth: AuthExchange | None
    _lines: LineBuffer
    _events: list[object]
    _waiting: bool

    def _send(self, reply: R.Reply, always_enhanced: bool = False) -> None:
        raise NotImplementedError  # Session's

    def _log(self, text: str) -> None:
        raise NotImplementedError  # Session's

    def _keep_in_log(self, text: str) -> None:
        raise NotImplementedError  # Session's

    def tls_started(self) -> None:
        """The handshake succeeded: forget everything learned in plaintext (RFC 3207
        4.2) and wait for a fresh EHLO.  No greeting is sent again."""
        self._waiting = False
        self._lines.clear()  # nothing sent before the handshake may count after it
        self.tls = True
        self.phase = NEW
        self.helo_name = ""
        self.esmtp = False
        # self.enhanced stays: the client that sent EHLO before STARTTLS reads RFC 3463
        # codes, and the contract asks for them on every reply after EHLO/HELO (Postfix
        # sends them on every reply).  What RFC 3207 4.2 makes the server forget is what
        # the EHLO negotiated for mail: parameters need the new EHLO (self.esmtp).
        self.envelope = None
        self.auth_user = ""

    def auth_result(self, ok: bool, username: str = "") -> None:
        """Answer the pending AuthRequest."""
        self._waiting = False
        if ok:
            self.auth_user = username
            self._send(R.R235_AUTH_OK)
        else:
            self._send(R.R535_AUTH_FAILED)

    def auth_deferred(self) -> None:
        """Answer the pending AuthRequest with a temporary failure (RFC 4954 6): the
        credentials were not checked; the client may try again."""
        self._waiting = False
        self._send(R.R454_AUTH_TEMPORARY)

    def _cmd_starttls(self, arg: str) -> None:
        if self.tls:
            raise CommandError(R.R503_ALREADY_TLS)
        if arg:
            raise CommandError(R.R501_NO_PARAMS)
        dropped = len(self._lines.take())
        if dropped:
            # CVE-2011-0411 and kin: plaintext pipelined behind STARTTLS must never be
            # executed as if it had arrived over TLS.
            self._keep_in_log(f"<discarded {dropped} octets pipelined after STARTTLS>")
        self._send(R.R220_TLS_READY)
        self._waiting = True
        self._events.append(StartTLS())

    def _cmd_auth(self, arg: str) -> None:
        cfg = self.config
        if not (self.tls or cfg.auth_insecure):
            raise CommandError(R.R538_ENCRYPTION_REQUIRED)
        if self.auth_user:
            raise CommandError(R.R503_ALREADY_AUTH)
        mechanism, initial = split_words(arg.strip())
        # A control character in the name ("PLAIN<DEL>response", where only blanks
        # separate the response) is a syntax error, not a mechanism this server lacks.
        named = mechanism != "" and not any(c < " " or "\x7f" <= c <= "\x9f" for c in mechanism)
        # ASCII only (RFC 4422 3.1): str.upper() maps "ı" (U+0131) to "I", so "PLAıN" would
        # otherwise run PLAIN, as the command verbs guard against too.
        mechanism = mechanism.upper() if mechanism.isascii() else "?"
        if mechanism not in MECHANISMS:
            raise CommandError(R.R504_AUTH_MECHANISM if named else R.R501_SYNTAX)
        exchange = AuthExchange(mechanism)
        self._auth_step(exchange, exchange.start, initial.strip() or None)

    def _auth_line(self, line: bytes) -> None:
        exchange, self._auth = self._auth, None
        assert exchange is not None  # Session routes lines here only while one runs
        self._log("<AUTH response>")
        self._auth_step(exchange, exchange.feed, line.decode("latin-1"))

    def _auth_step(self, exchange: AuthExchange, step: Callable[[Any], Any], value: Any) -> None:
        try:
            result = step(value)
        except CommandError as exc:
            return self._send(exc.reply)
        if isinstance(result, Credentials):
            self._waiting = True
            self._events.append(AuthRequest(result))
        else:
            self._auth = exchange
            self._send(result)
