"""Per-worker session settings, with the replies that depend on them rendered once."""

from __future__ import annotations

from typing import Callable, Final, Optional

from . import replies as R

#: Asked at each RCPT that passed every other check, with the address: a reply that
#: defers it (its Maildir failed a moment ago), or None.
RecipientCheck = Callable[[str], Optional[R.Reply]]

BASE_KEYWORDS: Final = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8")


class SessionConfig:
    """What a session needs to know of the server's configuration.

    ``starttls`` offers STARTTLS (plain listeners with [tls]); ``auth`` enables AUTH
    PLAIN/LOGIN, advertised only over TLS unless ``auth_insecure``; ``require_tls`` and
    ``auth_required`` refuse MAIL (530 5.7.0) until the session has them.
    """

    def __init__(self, hostname: str, *, max_message_size: int = 10485760,
                 max_recipients: int = 100, max_errors: int = 10, max_junk_commands: int = 100,
                 max_received_headers: int = 100, local_domains: tuple[str, ...] = (),
                 normalize_bare_newlines: bool = False, log_commands: bool = True,
                 starttls: bool = False, auth: bool = False, auth_insecure: bool = False,
                 require_tls: bool = False, auth_required: bool = False,
                 recipient_check: RecipientCheck | None = None) -> None:
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.max_junk_commands = max_junk_commands
        self.max_received_headers = max_received_headers
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.normalize_bare_newlines = normalize_bare_newlines
        self.log_commands = log_commands
        self.starttls = starttls
        self.auth = auth
        # require_tls overrides allow_insecure, as Postfix's smtpd_enforce_tls implies
        # smtpd_tls_auth_only: a server that carries no mail in the clear takes no
        # password in it either (AUTH before STARTTLS gets 538).
        self.auth_insecure = auth_insecure and not require_tls
        self.require_tls = require_tls
        self.auth_required = auth_required
        self.recipient_check = recipient_check
        self.greeting = R.greeting(hostname)
        self.helo_reply = R.helo(hostname)
        self._ehlo = {tls: R.ehlo(hostname, self._keywords(tls)) for tls in (False, True)}
        self._help = {tls: R.help_reply(self._commands(tls)) for tls in (False, True)}

    def _keywords(self, tls: bool) -> tuple[str, ...]:
        words = list(BASE_KEYWORDS)
        words.insert(1, f"SIZE {self.max_message_size}")
        return tuple(words) + self._commands(tls, auth="AUTH PLAIN LOGIN")

    def _commands(self, tls: bool, auth: str = "AUTH") -> tuple[str, ...]:
        """STARTTLS and AUTH, where the EHLO reply offers them: STARTTLS on a plain
        connection, AUTH over TLS or where allowed without."""
        words: tuple[str, ...] = ()
        if self.starttls and not tls:
            words += ("STARTTLS",)
        if self.auth and (tls or self.auth_insecure):
            words += (auth,)
        return words

    def ehlo_reply(self, tls: bool) -> R.Reply:
        return self._ehlo[tls]

    def help_reply(self, tls: bool) -> R.Reply:
        return self._help[tls]
