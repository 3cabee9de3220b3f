"""The SMTP server session as a sans-IO state machine.

Feed it bytes with ``receive_data``; pull events with ``next_event`` until it says
``NEED_DATA``; send what ``data_to_send`` returns.  No sockets, files or clocks live
here, so every rule of RFC 5321 / 2920 / 1870 / 6531 is checked by table-driven tests
in microseconds.

Phases: new -> helo -> mail -> rcpt -> data.  Which command may run in which phase is
one table (``SEQUENCE``); everything else a command needs is in its ``_cmd_*`` method.
What the session cannot decide alone it asks the caller for with an event, and waits
(``next_event`` returns ``PAUSED``; feed nothing more until it is answered):

* ``DataStart``: open the Maildir copies; answer ``accept_data()`` (-> 354) or
  ``reply(R451...)``.
* ``DataEnd``: commit (or discard, when ``error`` is set); answer ``reply(...)``.
* ``StartTLS`` (secure.py): send the 220, run the handshake; answer ``tls_started()``,
  or close the connection.
* ``AuthRequest`` (secure.py): check the credentials; answer ``auth_result(ok, user)``,
  or ``auth_deferred()`` when they could not be checked.

Message text arrives as ``DataChunk`` events, already LF-terminated and dot-unstuffed.
"""

from __future__ import annotations

import re
from typing import Final
from . import replies as R
from .buffer import BARE_LF, TOO_LONG, DataReader, LineBuffer
from .commands import CommandError, Path, parse_params, parse_path, split_prefix, split_words
from .events import (DATA, HELO, MAIL, NEW, RCPT, AuthRequest, DataChunk, DataEnd, DataStart,
                     Envelope, StartTLS)
from .sasl import AuthExchange, Credentials
from .secure import SecureCommands
from .sessionlog import SessionLog, auth_like, loggable
from .settings import SessionConfig

__all__ = ["Session", "SessionConfig", "Envelope", "DataStart", "DataChunk", "DataEnd",
           "StartTLS", "AuthRequest", "Credentials", "NEED_DATA", "PAUSED"]

MAX_COMMAND: Final = 512  # RFC 5321 4.5.3.1.4, CRLF included
#: What MAIL parameters add to that limit, each at most (see Session._mail_allowance).
_MAIL_ALLOWANCES: Final = {"SIZE": 26, "SMTPUTF8": 10, "AUTH": 500}
#: The longest line read whole where AUTH is not offered: a MAIL line at its limit.
MAX_LINE: Final = MAX_COMMAND + _MAIL_ALLOWANCES["SIZE"] + _MAIL_ALLOWANCES["SMTPUTF8"]
MAX_AUTH_LINE: Final = 12288  # RFC 4954 4: AUTH lines may carry long SASL responses

NEED_DATA: Final = "NEED_DATA"
PAUSED: Final = "PAUSED"


#: (verb, phase) -> the reply when the verb is out of order (RFC 5321 4.1.4).
SEQUENCE: Final[dict[tuple[str, str], R.Reply]] = {
    ("MAIL", NEW): R.R503_NEED_HELO,
    ("MAIL", MAIL): R.R503_NESTED_MAIL,
    ("MAIL", RCPT): R.R503_NESTED_MAIL,
    ("RCPT", NEW): R.R503_NEED_MAIL,
    ("RCPT", HELO): R.R503_NEED_MAIL,
    ("DATA", NEW): R.R503_NEED_MAIL,
    ("DATA", HELO): R.R503_NEED_MAIL,
    ("DATA", MAIL): R.R503_NEED_RCPT,
    ("STARTTLS", NEW): R.R503_NEED_HELO,
    ("STARTTLS", MAIL): R.R503_BAD_SEQUENCE,
    ("STARTTLS", RCPT): R.R503_BAD_SEQUENCE,
    ("AUTH", NEW): R.R503_NEED_HELO,
    ("AUTH", MAIL): R.R503_AUTH_IN_TRANSACTION,
    ("AUTH", RCPT): R.R503_AUTH_IN_TRANSACTION,
}

#: Commands a client may know that this server does not offer (-> 502).
NOT_OFFERED: Final = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "BDAT", "SEND", "SOML", "SAML",
                                "XCLIENT", "XFORWARD", "VERB", "ONEX"})
# (STARTTLS and AUTH, offered only with their configuration, get their 502 from _offered.)

# RFC 3461 4: xtext, printable ASCII but "+" and "=", with "+XX" for any octet.
_XTEXT: Final = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")

#: Replies that do not count toward the error limit: the client did nothing wrong
#: (452 for surplus recipients is the orderly way RFC 5321 4.5.3.1.10 asks for).
#: Storage refusals (451, 452 4.3.1) count, as every failed command does in Postfix's
#: smtpd: the client is not at fault, but a session may not make the server try and
#: fail, and log it, without end while a disk is full.  454 for an AUTH deferred does
#: not: the server checked nothing (other sessions' checks filled the failure limit), and
#: in stress mode (one error allowed) it would close the session of a client told it may
#: try again; each such AUTH costs the session a wait of up to 5 s, which bounds the rate.
#: Nor does a recipient deferred at RCPT because its Maildir failed a moment ago: the
#: server tried nothing, and a client sending a batch of messages for several mailboxes,
#: one of them broken, must not have its session closed for it.
NOT_CLIENT_ERRORS: Final = frozenset({R.R452_TOO_MANY_RCPTS, R.R454_AUTH_TEMPORARY,
                                      R.R451_MAILBOX_DEFERRED, R.R452_MAILBOX_NO_SPACE})

#: Recipients past ``max_recipients`` in one transaction that get their 452 free; each
#: one after counts toward ``max_errors``, as past Postfix's
#: smtpd_recipient_overshoot_limit.  Not Postfix's 1,000: common client libraries
#: (Python's smtplib, PHPMailer, nodemailer) send every RCPT whatever the answer, and a
#: close in mid-transaction would lose the recipients already taken.
MAX_SURPLUS_RECIPIENTS: Final = 10_000

_AUTH_PROTOCOL_SUFFIX: Final = {(False, False): "", (True, False): "S", (False, True): "A", (True, True): "SA"}


#: The verbs after which a client must wait for the reply (RFC 2920 3.1).
_DATA_VERBS: Final = (b"DATA", b"BDAT")


class Session(SecureCommands):
    def __init__(self, config: SessionConfig, *, normalize: bool | None = None,
                 tls: bool = False) -> None:
        self.config = config
        self.tls = tls  # the connection is encrypted (implicit TLS or after STARTTLS)
        self.auth_user = ""
        self._auth: AuthExchange | None = None
        # Lines after an AUTH command that may be SASL responses sent ahead of a refusal
        # (a client pipelining its LOGIN user and password): never logged as they are.
        self._after_auth = 0
        self.phase = NEW
        self.helo_name = ""
        self.esmtp = False
        self.enhanced = False  # RFC 3463 codes once EHLO/HELO succeeded
        self.errors = 0
        self.junk = 0  # EHLO, HELO, NOOP, RSET, VRFY and HELP since the last message stored
        self._surplus = 0  # recipients refused 452 in this transaction
        self.closed = False
        self.close_reply: R.Reply | None = None  # the reply that closed the session
        self.envelope: Envelope | None = None
        self.log: list[str] = []  # command and reply lines for the session log
        self._logbook = SessionLog(self.log)  # what goes into it, and its bound
        self.error_codes: list[int] = []  # 4xx/5xx replies given, for the stats
        self._normalize = config.normalize_bare_newlines if normalize is None else normalize
        self._lines = LineBuffer(MAX_AUTH_LINE if config.auth else MAX_LINE)
        self._reader: DataReader | None = None
        self._out: list[bytes] = []
        self._events: list[object] = []
        self._waiting = False

    # -- I/O facing API -------------------------------------------------------------

    def start(self) -> None:
        """Queue the 220 greeting."""
        self._send(self.config.greeting)

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        if self._reader is not None and not self._waiting:
            self._feed_data(data)
        else:
            self._lines.feed(data)

    def next_event(self):
        """The next event, ``PAUSED`` while an answer is owed, or ``NEED_DATA``."""
        if self._events:
            return self._events.pop(0)
        if self._waiting:
            return PAUSED
        while not self.closed and self._reader is None:
            line = self._lines.next_line()
            if line is None:
                break
            self._handle_line(line)
            if self._events:
                return self._events.pop(0)
        return NEED_DATA

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def accept_data(self) -> None:
        """Storage is ready: send 354 and start reading the message text."""
        self._waiting = False
        self._send(R.R354_DATA)
        cfg = self.config
        self._reader = DataReader(cfg.max_message_size, cfg.max_received_headers, self._normalize)
        self.phase = DATA
        pending = self._lines.take()
        if pending:  # only if the caller fed bytes while the session was PAUSED
            self._feed_data(pending)

    def reply(self, reply: R.Reply) -> None:
        """Answer the pending DataStart (refusal) or DataEnd (verdict)."""
        self._waiting = False
        self._end_transaction()
        if reply.code == 250:
            self.junk = 0  # a client that delivers mail is not idling (as Postfix)
        self._send(reply)

    def close(self, reply: R.Reply) -> None:
        """Send a final reply (421 on timeout or shutdown) and close.

        A closing reply always carries its enhanced code (421 4.4.2, 554 5.5.0 ...), even
        before EHLO: it is the last thing the client learns, and the code says why."""
        if self.closed:
            return  # one closing reply: a closing 554 that spends the error budget ends here
        self.closed = True
        self.close_reply = reply
        self._send(reply, always_enhanced=reply.code >= 400)

    @property
    def in_data(self) -> bool:
        return self._reader is not None

    @property
    def protocol(self) -> str:
        """The WITH keyword of the Received header (RFC 3848 / RFC 6531)."""
        if not self.esmtp:
            return "SMTP"
        base = "UTF8SMTP" if self.envelope is not None and self.envelope.smtputf8 else "ESMTP"
        return base + _AUTH_PROTOCOL_SUFFIX[self.tls, bool(self.auth_user)]

    # -- replies and the error budget -----------------------------------------------

    def _send(self, reply: R.Reply, always_enhanced: bool = False) -> None:
        self._out.append(reply.wire(self.enhanced or always_enhanced))
        if self.config.log_commands:
            self._logbook.reply(reply, self.envelope is not None)
        if reply.code < 400:
            return
        self.error_codes.append(reply.code)
        if reply not in NOT_CLIENT_ERRORS and reply.code != 421:
            self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.config.max_errors and not self.closed:
            self.close(R.R421_TOO_MANY_ERRORS)

    def _junk(self) -> None:
        """A command that moves no mail was answered: counted as Postfix's smtpd counts
        against smtpd_junk_command_limit (``junk_cmds++ > limit``), so that the same
        value means the same here: the first ``max_junk_commands + 1`` since the last
        message stored are free, and each one after counts toward ``max_errors``.  A
        client sending NOOP without end would otherwise keep a worker answering it for
        the whole session."""
        self.junk += 1
        if self.junk > self.config.max_junk_commands + 1:
            self._count_error()

    def _end_transaction(self) -> None:
        self.envelope = None
        self._reader = None
        if self.phase != NEW:
            self.phase = HELO

    # -- command dispatch --------------------------------------------------------------

    def _count_after_auth(self, line: bytes) -> bool:
        """Count ``line`` against the two after an AUTH command; True if it was one.

        LOGIN sends a user name and a password line.  The count starts again at every
        line the log mask takes for AUTH, before any refusal: one refused for its length,
        its octets or its separator may have its response lines pipelined behind it all
        the same."""
        was = self._after_auth > 0
        if was:
            self._after_auth -= 1
        if auth_like(line):
            self._after_auth = 2
        return was

    def _data_with_text_behind(self, line: bytes) -> bool:
        """``line`` is a DATA or BDAT, well formed or not (a NUL, a CR, octets that are
        not UTF-8 or too many of them after the verb), and the client sent more behind
        it without waiting for its reply: the session is closed with 554 5.5.0 (see
        _handle_line), however the DATA itself would have been answered."""
        return line[:4].upper() in _DATA_VERBS and not line[4:5].isalnum() and self._lines.pending() > 0

    def _refuse_overlong(self) -> None:
        # RFC 4954 4: 5.5.6 for a line of an authentication exchange, be it the AUTH
        # command or a response; 5.5.2 for any other command.
        in_auth = self._auth is not None or (self.config.auth and self._lines.head.upper() == b"AUTH ")
        self._auth = None
        self._count_after_auth(self._lines.head)  # LOGIN lines pipelined behind it stay unlogged
        self._log("<command line too long>")
        if not in_auth and self._data_with_text_behind(self._lines.head):
            return self.close(R.R554_SYNC)
        self._send(R.R500_AUTH_LINE_TOO_LONG if in_auth else R.R500_LINE_TOO_LONG)

    def _refuse_bare_lf(self) -> None:
        # Not run, whatever it says (only CRLF ends a command; the buffer drops the rest
        # of the line), and not logged: it may be an AUTH response.  An AUTH exchange
        # ends with it, as with any malformed response (RFC 4954 4).
        head = self._lines.head
        self._auth = None
        self._count_after_auth(head)
        self._log("<command line with a bare LF>")
        if self._data_with_text_behind(head):
            # Text sent behind a DATA that is not run would run as commands: closed as
            # bytes behind any refused DATA are (RFC 2920 3.1, see _handle_line).
            return self.close(R.R554_SYNC)
        self._send(R.R501_BARE_LF)

    def _handle_line(self, line) -> None:
        if line is TOO_LONG:
            return self._refuse_overlong()
        if line is BARE_LF:
            return self._refuse_bare_lf()
        if self._auth is not None:
            return self._auth_line(line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text and (text[-1] == " " or text[-1] == "\t"):
            # Trailing blanks mean nothing, whatever the command: "RSET " and "RSET  "
            # and "QUIT\t" are RSET and QUIT (as Postfix, which splits on any blank).
            text = text.rstrip(" \t")
        verb, _, arg = (text or "").partition(" ")
        if arg and (arg[0] == " " or arg[0] == "\t") or "\t" in verb:
            verb, arg = split_words(text or "")
        # ASCII only: str.upper() maps some other letters onto ASCII ("ı" -> "I",
        # "ſ" -> "S"), which would run "MAıL" as MAIL.
        verb = verb.upper() if verb.isascii() else verb
        # Of the two lines after an AUTH command, one that is no command may be a SASL
        # response sent ahead of the refusal (a LOGIN user name, a password).
        hidden = (self._count_after_auth(line)
                  and verb not in _HANDLERS and verb not in NOT_OFFERED)
        if len(line) > MAX_COMMAND - 2 and not (verb == "AUTH" and self.config.auth) and not (
                verb == "MAIL" and len(line) + 2 - self._mail_allowance(arg) <= MAX_COMMAND):
            # The buffer allows long lines for AUTH (with AUTH offered) and for the
            # parameters that lengthen MAIL; any other is refused unread, and
            # unlogged, like one over the buffer's limit.
            self._log("<command line too long>")
            if self._data_with_text_behind(line):
                return self.close(R.R554_SYNC)
            return self._send(R.R500_LINE_TOO_LONG)
        if hidden:
            self._log(f"<line after AUTH, {len(line)} octets, not logged>")
        elif text is not None:
            self._log(loggable(text))
        else:  # not UTF-8: every octet outside printable ASCII as an escape
            self._log(loggable(line.decode("latin-1"), escape=True))
        if text is None or "\r" in text or "\0" in text:  # (an LF ends the line it is in)
            if self._data_with_text_behind(line):
                return self.close(R.R554_SYNC)
            return self._send(R.R501_BAD_CHARS)
        if (verb == "DATA" or verb == "BDAT") and self._lines.pending():
            # RFC 2920 3.1: DATA ends a pipelining group, whether it succeeds or fails.
            # Bytes behind it before its reply are a client that does not wait, or a
            # smuggling attempt: after a refused DATA, message text would otherwise run
            # as commands (a MAIL FROM of the attacker's choice in the body).  Postfix
            # 3.9's smtpd_forbid_unauth_pipelining closes the same way.  So for BDAT,
            # which is not offered (no CHUNKING) and whose chunk follows at once.
            return self.close(R.R554_SYNC)
        handler = _HANDLERS.get(verb)
        if handler is None:
            return self._send(R.R502_NOT_IMPLEMENTED if verb in NOT_OFFERED else R.R500_UNRECOGNIZED)
        if not self._offered(verb):
            return self._send(R.R502_NOT_IMPLEMENTED)
        refusal = SEQUENCE.get((verb, self.phase))
        if refusal is not None:
            return self._send(refusal)
        try:
            handler(self, arg)
        except CommandError as exc:
            self._send(exc.reply)

    def _mail_allowance(self, arg: str) -> int:
        """Octets a MAIL line may run over MAX_COMMAND for its parameters: up to 26 for
        SIZE= (RFC 1870 6), 10 for SMTPUTF8 (RFC 6531 3.4) and, with AUTH offered, 500
        for AUTH= (RFC 4954 5), each counted once with the space before it."""
        rest = split_prefix(arg, "FROM:")
        try:  # the parameters are what follows the path (a quoted one may hold spaces)
            tail = parse_path(rest, allow_null=True, allow_no_domain=True)[1] if rest else ""
        except CommandError:
            return 0  # refused as too long rather than for its syntax, as any long line
        allowance: dict[str, int] = {}
        for item in tail.split(" "):
            key = item.partition("=")[0]
            key = key.upper() if key.isascii() else ""  # "ſIZE".upper() is "SIZE"
            limit = _MAIL_ALLOWANCES.get(key, 0) if key != "AUTH" or self._auth_usable() else 0
            allowance[key] = min(len(item) + 1, limit)
        return sum(allowance.values())

    def _auth_usable(self) -> bool:
        """AUTH may run now, and so AUTH= is taken: over TLS, or where allowed without."""
        return self.config.auth and (self.tls or self.config.auth_insecure)

    def _offered(self, verb: str) -> bool:
        if verb == "STARTTLS":
            return self.config.starttls or self.tls
        if verb == "AUTH":  # 538 asks for encryption: only where STARTTLS can give it
            cfg = self.config
            return cfg.auth and (self.tls or cfg.starttls or cfg.auth_insecure)
        return True

    def _log(self, text: str) -> None:
        if self.config.log_commands:
            self._logbook.command(text)

    def _keep_in_log(self, text: str) -> None:
        """Log ``text`` even past the free lines (evidence an operator must see)."""
        if self.config.log_commands:
            self._logbook.keep(text)

    def release_log(self) -> None:
        """The caller logs an outcome of what the session holds back: let it out first."""
        if self.config.log_commands:
            self._logbook.release()

    def end_log(self) -> None:
        """The connection is over: log how many lines the bound kept out, if any."""
        if self.config.log_commands:
            self._logbook.end(self.in_data)

    def _cmd_helo(self, arg: str, esmtp: bool = False) -> None:
        # Spaces and tabs only: str.strip() also takes VT, FF, 0x1C-0x1F and NEL off
        # the ends, which would let those unprintable characters through unrefused.
        name = arg.strip(" \t")
        if not name or not name.isprintable():
            raise CommandError(R.R501_HELO_SYNTAX)
        self.helo_name = name.split()[0][:255]
        self.esmtp = esmtp
        self.enhanced = True
        self.envelope = None
        self.phase = HELO
        self._send(self.config.ehlo_reply(self.tls) if esmtp else self.config.helo_reply)
        # Repeatable without end, and the dearest reply to send: junk, as in Postfix's
        # smtpd command table.  A client looping on EHLO kept a core busy for its session.
        self._junk()

    def _cmd_ehlo(self, arg: str) -> None:
        self._cmd_helo(arg, esmtp=True)

    def _cmd_mail(self, arg: str) -> None:
        cfg = self.config
        if cfg.require_tls and not self.tls:
            raise CommandError(R.R530_NEED_TLS)
        if cfg.auth_required and not self.auth_user:
            raise CommandError(R.R530_NEED_AUTH)
        rest = split_prefix(arg, "FROM:")
        if rest is None:
            raise CommandError(R.R501_MAIL_SYNTAX)
        try:
            # A sender without a domain is taken as Postfix takes it by default
            # (README, "Decisions"); a recipient needs one.
            sender, tail = parse_path(rest, allow_null=True, allow_no_domain=True)
            params = self._mail_params(tail)
        except CommandError as exc:  # RFC 3463: X.1.7 is the sender's, X.1.3 a recipient's
            raise CommandError(_AS_SENDER.get(exc.reply, exc.reply)) from None
        utf8 = "SMTPUTF8" in params
        if not utf8 and not sender.address.isascii():
            raise CommandError(R.R553_NON_ASCII)
        self.envelope = Envelope(sender, params, utf8)
        self._surplus = 0
        self.phase = MAIL
        self._send(R.R250_SENDER_OK)

    def _mail_params(self, text: str) -> dict[str, str | None]:
        params = parse_params(text)
        if params and not self.esmtp:
            raise CommandError(R.R555_UNKNOWN_PARAM)
        for key, value in params.items():
            check = _MAIL_PARAMS.get(key)
            if check is None:
                raise CommandError(R.R555_UNKNOWN_PARAM)
            check(self, value)
        return params

    def _param_auth(self, value: str | None) -> None:
        """RFC 4954 5: ``AUTH=<mailbox as xtext>`` or ``AUTH=<>``, where AUTH is offered.
        A receiver that stores mail and relays none has nobody to pass it on to, so the
        value is checked and dropped, as the RFC has a server do when it does not trust
        it (the same as ``AUTH=<>``)."""
        if not self._auth_usable():
            raise CommandError(R.R555_UNKNOWN_PARAM)
        if value is None or not (value == "<>" or _XTEXT.fullmatch(value)):
            raise CommandError(R.R501_BAD_PARAM_VALUE)

    def _param_size(self, value: str | None) -> None:
        # RFC 1870: 1*20DIGIT, ASCII only (str.isdigit also takes "²", which int() refuses)
        if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
            raise CommandError(R.R501_BAD_PARAM_VALUE)
        if int(value) > self.config.max_message_size:
            raise CommandError(R.R552_TOO_BIG)

    def _param_body(self, value: str | None) -> None:
        # ASCII only: str.upper() makes "8BıTMIME" (a dotless i) 8BITMIME.
        if value is None or not value.isascii() or value.upper() not in ("7BIT", "8BITMIME"):
            # BINARYMIME (RFC 3030) is a value known but not offered (it needs CHUNKING):
            # 555, "not implemented", as Postfix answers, where a value unknown is 501.
            raise CommandError(R.R555_UNKNOWN_PARAM if value is not None and value.upper() == "BINARYMIME"
                               else R.R501_BAD_PARAM_VALUE)

    def _param_smtputf8(self, value: str | None) -> None:
        if value is not None:
            raise CommandError(R.R501_BAD_PARAM_VALUE)

    def _cmd_rcpt(self, arg: str) -> None:
        rest = split_prefix(arg, "TO:")
        if rest is None:
            raise CommandError(R.R501_RCPT_SYNTAX)
        env = self.envelope
        assert env is not None  # SEQUENCE admits RCPT only after MAIL
        path, tail = parse_path(rest, allow_null=False, allow_postmaster=True)
        if not env.smtputf8 and not path.address.isascii():
            raise CommandError(R.R553_NON_ASCII)
        if tail and parse_params(tail):  # junk glued to the path: 501, as for MAIL
            # No RCPT parameters are offered (no DSN): RFC 5321 4.1.1.11 gives 555.
            raise CommandError(R.R555_UNKNOWN_PARAM)
        if len(env.recipients) >= self.config.max_recipients:
            self._surplus += 1
            self._send(R.R452_TOO_MANY_RCPTS)
            if self._surplus > MAX_SURPLUS_RECIPIENTS:
                self._count_error()
            return
        if not self._is_local(path):
            raise CommandError(R.R550_NOT_LOCAL)
        check = self.config.recipient_check
        if check is not None:
            deferred = check(path.address)
            # Postmaster is always accepted (RFC 5321 4.5.1); a failure of its Maildir
            # then defers the message at DATA, as before any was known.
            if deferred is not None and path.address.partition("@")[0].lower() != "postmaster":
                raise CommandError(deferred)
        env.recipients.append(path.address)
        self.phase = RCPT
        self._send(R.R250_RCPT_OK)

    def _is_local(self, path: Path) -> bool:
        domains = self.config.local_domains
        # Bare <Postmaster> has no domain and is always ours (RFC 5321 4.5.1).
        return not domains or not path.domain or path.domain in domains

    def _cmd_data(self, arg: str) -> None:
        if arg:
            raise CommandError(R.R501_NO_PARAMS)
        # _handle_line closed the session if bytes came behind DATA (RFC 2920).
        self._waiting = True
        assert self.envelope is not None  # SEQUENCE admits DATA only after RCPT
        self._events.append(DataStart(self.envelope))

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            raise CommandError(R.R501_NO_PARAMS)
        self._end_transaction()
        self._send(R.R250_OK)
        self._junk()

    def _cmd_noop(self, arg: str) -> None:
        self._send(R.R250_OK)
        self._junk()

    def _cmd_quit(self, arg: str) -> None:
        if arg:
            raise CommandError(R.R501_NO_PARAMS)
        self.close(R.R221_BYE)

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg.strip():
            raise CommandError(R.R501_VRFY_SYNTAX)
        self._send(R.R252_VRFY)
        self._junk()

    def _cmd_help(self, arg: str) -> None:
        self._send(self.config.help_reply(self.tls))
        self._junk()

    # -- DATA ------------------------------------------------------------------------

    def _feed_data(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None and self.envelope is not None  # only in the DATA phase
        text, done, rest = reader.feed(data)
        if text:
            self._events.append(DataChunk(text))
        if done:
            self._waiting = True
            self._events.append(DataEnd(self.envelope, reader.size, reader.error))
            self._log(f"<message: {reader.size} octets>")
            if rest:
                self._lines.feed(rest)


_HANDLERS: Final = {
    "HELO": Session._cmd_helo,
    "EHLO": Session._cmd_ehlo,
    "MAIL": Session._cmd_mail,
    "RCPT": Session._cmd_rcpt,
    "DATA": Session._cmd_data,
    "RSET": Session._cmd_rset,
    "NOOP": Session._cmd_noop,
    "QUIT": Session._cmd_quit,
    "VRFY": Session._cmd_vrfy,
    "HELP": Session._cmd_help,
    "STARTTLS": SecureCommands._cmd_starttls,
    "AUTH": SecureCommands._cmd_auth,
}

_MAIL_PARAMS: Final = {
    "SIZE": Session._param_size,
    "BODY": Session._param_body,
    "SMTPUTF8": Session._param_smtputf8,
    "AUTH": Session._param_auth,
}

#: A path refused in MAIL FROM: the same reply, with the sender's enhanced code.
_AS_SENDER: Final = {
    R.R501_BAD_ADDRESS: R.R501_BAD_SENDER,
    R.R501_PATH_TOO_LONG: R.R501_SENDER_TOO_LONG,
}
