"""SMTP replies as values.

Every reply the server can give is a named ``Reply`` constant here, so the session,
the worker and the tests all speak of ``R503_BAD_SEQUENCE`` rather than of string
literals.  Each reply renders to wire bytes once, in both forms: with the RFC 3463
enhanced status code (after EHLO/HELO, RFC 2034) and without it (before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str  # "" where RFC 2034 gives none (2xx greetings, 354)
    text: str
    lines: tuple[str, ...] = ()  # extra lines for multi-line replies (EHLO)
    _wire: tuple[bytes, bytes] = field(default=(b"", b""), init=False, repr=False, compare=False)
    _log: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Rendered once: every session sends and logs the same few replies over and over.
        object.__setattr__(self, "_wire", (self._render(False), self._render(True)))
        head = f"{self.code} {self.enhanced} {self.text}" if self.enhanced else f"{self.code} {self.text}"
        object.__setattr__(self, "_log", head)

    def _render(self, enhanced: bool) -> bytes:
        texts = (self.text,) + self.lines
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        last = len(texts) - 1
        return "".join(
            f"{self.code}{' ' if i == last else '-'}{prefix}{text}\r\n" for i, text in enumerate(texts)
        ).encode("utf-8")

    def wire(self, enhanced: bool) -> bytes:
        """The reply as bytes to send; enhanced status code only when negotiated."""
        return self._wire[enhanced]

    def __str__(self) -> str:
        """One-line form for the log: code, enhanced code, first line of text."""
        return self._log


def greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP")


def ehlo(hostname: str, keywords: tuple[str, ...]) -> Reply:
    return Reply(250, "", hostname, keywords)


def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)


def help_reply(offered: tuple[str, ...] = ()) -> Reply:
    """HELP's list: the commands always taken, then those the EHLO reply offers now."""
    return Reply(214, "2.0.0", " ".join(("Commands:",) + HELP_COMMANDS + offered))


HELP_COMMANDS: Final = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP")

# 2xx / 3xx
R214_HELP = help_reply()
R221_BYE = Reply(221, "2.0.0", "Bye")
R250_OK = Reply(250, "2.0.0", "Ok")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender ok")
R250_RCPT_OK = Reply(250, "2.1.5", "Recipient ok")
R250_ACCEPTED = Reply(250, "2.0.0", "Message accepted")
R252_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
R354_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

# 4xx: transient
R421_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
R421_BUSY = Reply(421, "4.3.2", "Too many connections, try again later")
R421_PER_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")
R421_RATE = Reply(421, "4.7.0", "Too many connections from your address this minute, try again later")
R421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
R421_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
R421_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing transmission channel")
R451_STORAGE = Reply(451, "4.3.0", "Local error in processing, try again later")
R452_NO_SPACE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
# A recipient whose Maildir failed a moment ago, deferred at RCPT so that the message
# goes on for the others (the server tried nothing: no error of the client's).
R451_MAILBOX_DEFERRED = Reply(451, "4.3.0", "Mailbox temporarily unavailable, try again later")
R452_MAILBOX_NO_SPACE = Reply(452, "4.3.1", "Insufficient system storage for this mailbox, try again later")
R452_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")

# 5xx: permanent
R500_UNRECOGNIZED = Reply(500, "5.5.2", "Command unrecognized")
R500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
# RFC 4954 4: X.5.6 is registered for an authentication exchange's line alone.
R500_AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
R501_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R501_BAD_CHARS = Reply(501, "5.5.2", "Syntax error: bare CR, or invalid characters in command")
R501_BARE_LF = Reply(501, "5.5.2", "Syntax error: bare LF in command line; end each line with CRLF")
R501_NO_PARAMS = Reply(501, "5.5.4", "Syntax error: no parameters allowed")
R501_HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO/HELO hostname")
R501_MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
R501_RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
R501_BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
R501_PATH_TOO_LONG = Reply(501, "5.1.3", "Path too long")
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_SENDER_TOO_LONG = Reply(501, "5.1.7", "Path too long")
R501_BAD_PARAM_VALUE = Reply(501, "5.5.4", "Invalid parameter value")
R501_VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
R502_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
R503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R503_NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
R503_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R503_NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
R503_NEED_RCPT = Reply(503, "5.5.1", "No valid recipients")
# RFC 7504: a 521 greeting may be followed by the close, where a 554 one (RFC 5321 3.1)
# must then wait for QUIT; Postfix's postscreen drops a pregreeting client with a 521.
R521_EARLY_TALKER = Reply(521, "5.5.0", "SMTP protocol violation: data sent before greeting")
R550_NOT_LOCAL = Reply(550, "5.7.1", "Relay access denied: recipient domain is not local")
R550_BARE_NEWLINE = Reply(550, "5.6.0", "Message refused: bare CR or LF in message text")
R552_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R553_NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address not permitted without SMTPUTF8")
R554_LINE_TOO_LONG = Reply(554, "5.6.0", "Message refused: text line longer than 1000 octets")
R554_LOOP = Reply(554, "5.4.6", "Too many hops: mail loop detected")
R554_FOLDED_START = Reply(554, "5.6.0", "Message refused: first line begins with white space "
                                        "(a header continuation)")
R554_SYNC = Reply(554, "5.5.0", "SMTP protocol synchronization error")
R555_UNKNOWN_PARAM = Reply(555, "5.5.4", "Unsupported parameter")

# STARTTLS (RFC 3207) and AUTH (RFC 4954)
R220_TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R334_EMPTY = Reply(334, "", "")
R334_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # base64 "Username:"
R334_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # base64 "Password:"
R421_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, try again later")
R501_AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
R501_BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data")
R501_BAD_PLAIN = Reply(501, "5.5.2", "Invalid PLAIN response: expected authzid NUL user NUL password")
R501_NOT_UTF8 = Reply(501, "5.5.2", "Invalid credentials: not UTF-8")
R503_ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
R503_ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
R503_AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
R504_AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
R530_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R530_NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R454_AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
R538_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
