"""The command and reply lines of one session, and the bound on them.

A session logs every command and reply (the ``[SMTP]`` lines) for its first
``FREE_LINES``.  Past them a client that keeps talking without storing mail would make
the log grow without end, much faster than it sends: a NOOP of 6 octets is two log
lines of some 40 octets each, so a client pipelining NOOPs for a session's hour could
write hundreds of gigabytes.  From there on only what an operator needs is written:

* every reply that is an error, with its command (``max_errors`` bounds them);
* every transaction that stores a message: its MAIL, RCPT and DATA lines are held
  until the verdict, written with a ``250``, counted if the transaction ends without.

The rest (NOOP, RSET, VRFY, HELP, EHLO, surplus recipients, transactions abandoned) is
counted, and the count written before the next line that is, and at the session's end.
"""

from __future__ import annotations

from typing import Final

from . import replies as R

#: Lines a session logs without condition: a transaction of 100 recipients takes 210.
FREE_LINES: Final = 1000


class SessionLog:
    """Fed each logged command (``command``) and each reply (``reply``); appends what
    is to be written to ``lines``, the list the connection drains."""

    __slots__ = ("lines", "_left", "_pending", "_held", "_unlogged")

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self._left = FREE_LINES
        self._pending: str | None = None  # past the free lines: the command awaiting its reply
        self._held: list[str] = []  # past the free lines: the open transaction's lines
        self._unlogged = 0

    def command(self, text: str) -> None:
        if self._left > 0:
            self._left -= 1
            self.lines.append(text)
            return
        if self._pending is not None:  # a line that no reply answered
            self._unlogged += 1
        self._pending = text

    def reply(self, reply: R.Reply, in_transaction: bool) -> None:
        """``in_transaction``: a transaction is still open once this reply is sent."""
        if self._left > 0:
            self._left -= 1
            self.lines.append(str(reply))
            return
        pending, self._pending = self._pending, None
        pair = [str(reply)] if pending is None else [pending, str(reply)]
        if reply is R.R250_ACCEPTED or (reply.code >= 400 and reply is not R.R452_TOO_MANY_RCPTS):
            held, self._held = self._held, []
            self._write(held + pair)
        elif in_transaction and (reply is R.R250_SENDER_OK or reply is R.R250_RCPT_OK
                                 or reply is R.R354_DATA):
            self._held += pair
        else:
            self._unlogged += len(pair)
            if not in_transaction:  # ended without a message (RSET, EHLO, QUIT)
                self._unlogged += len(self._held)
                self._held = []

    def end(self) -> None:
        """The session is over: write the count of what was not."""
        self._unlogged += len(self._held) + (self._pending is not None)
        self._held, self._pending = [], None
        self._write([])

    def _write(self, lines: list[str]) -> None:
        if self._unlogged:
            n = self._unlogged
            self.lines.append(f"<{n} command and reply line{'s' if n != 1 else ''} not logged>")
            self._unlogged = 0
        self.lines += lines
