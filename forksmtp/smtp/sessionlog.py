"""The command and reply lines of one session, and the bound on them.

A session logs every command and reply (the ``[SMTP]`` lines) for its first
``FREE_LINES``.  Past them a client that keeps talking without storing mail would make
the log grow without end, much faster than it sends: a NOOP of 6 octets is two log
lines of some 40 octets each, so a client pipelining NOOPs for a session's hour could
write hundreds of gigabytes.  From there on only what an operator needs is written:

* every reply that is an error, with its command (``max_errors`` bounds them);
* every transaction that stores a message: its MAIL, RCPT and DATA lines are held
  until the verdict, written with a ``250``, counted if the transaction ends without;
* what the session keeps as evidence (``keep``: plaintext discarded after STARTTLS);
* a transaction whose text was cut off by the session's end.

The rest (NOOP, RSET, VRFY, HELP, EHLO, surplus recipients, transactions abandoned
before their text) is counted, and the count written where the lines would have been,
before the next line that is written and at the session's end.

What of a command line may be written is decided here too (``loggable``): never an AUTH
payload, never a control character.
"""

from __future__ import annotations

import re
from typing import Final

from . import replies as R

#: Lines a session logs without condition: a transaction of 100 recipients takes 210.
FREE_LINES: Final = 1000


def _skipped(n: int) -> str:
    return f"<{n} command and reply line{'s' if n != 1 else ''} not logged>"


def _unbounded(reply: R.Reply) -> bool:
    """Refusals that past the free lines are counted, not written, as lines that are no
    error are: nothing bounds them (none counts toward max_errors), so a client that
    repeats the RCPT could otherwise write without end."""
    return (reply is R.R452_TOO_MANY_RCPTS or reply is R.R451_MAILBOX_DEFERRED
            or reply is R.R452_MAILBOX_NO_SPACE)


class SessionLog:
    """Fed each logged command (``command``) and each reply (``reply``); appends what
    is to be written to ``lines``, the list the connection drains."""

    __slots__ = ("lines", "_left", "_pending", "_held", "_before", "_within")

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self._left = FREE_LINES
        # Past the free lines:
        self._pending: str | None = None  # the command awaiting its reply
        self._held: list[str] = []  # the open transaction's own lines
        self._before = 0  # lines not logged before the held ones ...
        self._within = 0  # ... and among them (a NOOP inside the transaction)

    def command(self, text: str) -> None:
        if self._left > 0:
            self._left -= 1
            self.lines.append(text)
            return
        if self._pending is not None:  # a line that no reply answered
            self._skip(1)
        self._pending = text

    def keep(self, text: str) -> None:
        """A line written whatever the count, with the command it follows."""
        if self._left > 0:
            self._left -= 1
            self.lines.append(text)
            return
        self.release()
        self._write([text])

    def reply(self, reply: R.Reply, in_transaction: bool) -> None:
        """``in_transaction``: a transaction is still open once this reply is sent."""
        if self._left > 0:
            self._left -= 1
            self.lines.append(str(reply))
            return
        pending, self._pending = self._pending, None
        pair = [str(reply)] if pending is None else [pending, str(reply)]
        if reply is R.R250_ACCEPTED or (reply.code >= 400 and not _unbounded(reply)):
            self._write(pair)
        elif in_transaction and (reply is R.R250_SENDER_OK or reply is R.R250_RCPT_OK
                                 or reply is R.R354_DATA):
            self._held += pair
        else:
            self._skip(len(pair))
            if not in_transaction and self._held:  # ended without a message
                self._before += len(self._held) + self._within
                self._held, self._within = [], 0

    def release(self) -> None:
        """Write what is held now: the caller is about to log the outcome it leads to
        (the stored file, a storage error, an AUTH verdict), which must follow it."""
        if self._left > 0 or (self._pending is None and not self._held):
            return
        pending, self._pending = self._pending, None
        self._write([] if pending is None else [pending])

    def end(self, in_data: bool = False) -> None:
        """The session is over: write the count of what was not.  ``in_data``: it ended
        inside a message's text (the client went, or the server stopped): the lines of
        that transaction are written, once, as they would be within the free lines."""
        if in_data:
            self.release()
        self._before += len(self._held) + self._within + (self._pending is not None)
        self._held, self._within, self._pending = [], 0, None
        self._write([])

    def _skip(self, n: int) -> None:
        if self._held:
            self._within += n
        else:
            self._before += n

    def _write(self, lines: list[str]) -> None:
        out = self.lines
        if self._before:
            out.append(_skipped(self._before))
            self._before = 0
        if self._held:
            out += self._held
            self._held = []
            if self._within:
                out.append(_skipped(self._within))
                self._within = 0
        out += lines


# -- what of a command line may be logged -------------------------------------------------

#: All of an AUTH line that may be logged after the verb: the SASL mechanism name.
_MECHANISM: Final = re.compile(r"[A-Za-z0-9_-]*")


def _is_mechanism(name: str) -> bool:
    """A SASL mechanism name (RFC 4422 3.1: 1 to 20 of A-Z, 0-9, "-", "_"), sent in one
    case as clients do; base64 sent where the name goes is nearly always mixed case or
    longer, and is masked."""
    return 0 < len(name) <= 20 and (name == name.upper() or name == name.lower())


def auth_like(line: bytes) -> bool:
    """Whether the log mask takes ``line`` for an AUTH command: any line that begins
    with AUTH, a mistyped one ("AUTH-LOGIN", "AUTHPLAIN") included, since its client
    may send its credentials behind it all the same, and one with blanks before it."""
    if line and (line[0] == 32 or line[0] == 9):  # a space or a tab first
        line = line.lstrip(b" \t")
    return line[:4].upper() == b"AUTH"


def _auth_masked(text: str) -> str:
    """An AUTH line, or a line that begins with AUTH, as it may be logged."""
    if _MECHANISM.fullmatch(text[4:5]):
        # AUTH run into more of a word: a mistyped verb ("AUTHPLAIN", "AUTH-LOGIN",
        # refused 500) whose client still sent its credentials behind it, or base64
        # with no separator at all.  The word is kept only where it reads as a name.
        run = _MECHANISM.match(text, 4)
        assert run is not None  # the pattern matches the empty string too
        word, rest = run.group(), text[run.end():]
        head = text[:run.end()] if _is_mechanism(word) else text[:4]
        return head + (" ***" if rest or head == text[:4] else "")
    # Any separator after AUTH (a TAB, a NUL) still hides what follows the mechanism.
    run = _MECHANISM.match(text, 5)
    assert run is not None
    name, rest = run.group(), text[run.end():]
    if not name and not rest:
        return text[:4]
    if _is_mechanism(name) and rest[:1] in ("", " ", "\t"):
        # The mask stands for an initial response, so only where one was sent.
        return f"{text[:4]} {name}" + (" ***" if rest else "")
    return f"{text[:4]} ***"  # no mechanism name there: base64 in its place is a credential


def loggable(text: str, escape: bool = False) -> str:
    """Command line for the log: never an AUTH payload, never a control character.
    A line with a control character or a backslash is written with Python escapes, its
    backslashes doubled, so that ``\\r`` in the log always means a CR was sent;
    ``escape``: whatever the line holds (octets that are no UTF-8)."""
    if text[:4].upper() == "AUTH" and text[4:5]:
        text = _auth_masked(text)
    elif text and (text[0] == " " or text[0] == "\t"):  # no command (500), masked all the same
        verb = text.lstrip(" \t")
        if verb[:4].upper() == "AUTH" and verb[4:5]:
            text = text[:len(text) - len(verb)] + _auth_masked(verb)
    if escape:  # one character per octet: \xNN for each octet outside printable ASCII
        return text.encode("unicode_escape").decode("ascii")
    if "\\" in text or not text.isprintable():
        # \u00NN, never \xNN, for U+0080..U+00FF: a UTF-8 line must not read like one
        # whose octets were no UTF-8.
        return "".join(c if " " <= c <= "~" and c != "\\" else
                       f"\\u{ord(c):04x}" if 0x80 <= ord(c) <= 0xFF else
                       c.encode("unicode_escape").decode("ascii") for c in text)
    return text
