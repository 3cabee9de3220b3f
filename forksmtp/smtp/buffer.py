"""Bounded input buffers: command lines and DATA text.

Only CRLF ends a line (RFC 5321 4.1.1.4): a bare CR or a bare LF never does, which is
what closes the SMTP smuggling family (CVE-2023-51764/5/6): a command line with a bare
LF in it is refused as soon as that LF comes, and nothing of it runs.  Neither buffer
ever holds more than one line plus what the client has pipelined behind it, so memory
per session is O(line length), never O(message size).

The DATA reader works on whole blocks of complete lines with bytes methods that run in C
(``find``, ``replace``, ``translate``, ``count``): per block it costs a handful of calls,
not a Python loop per line.  The compiled build does the per-octet part (CR deletion, the
bare CR/LF proof, the line limit; the search for stuffed lines and the end) in C instead,
``_lftext.c``; the Python here stays the reference it is tested against.
"""

from __future__ import annotations

import re
from typing import Callable, Final

from . import replies as R

CRLF: Final = b"\r\n"
#: Octets of message text after which Received: fields are no longer counted.
HEADER_SCAN_LIMIT: Final = 1024 * 1024
END_OF_DATA: Final = b"\r\n.\r\n"
#: The longest text line, in octets without its CRLF (RFC 5321 4.5.3.1.6: 1000 with it).
LINE_LIMIT: Final = 998

#: What a line buffer yields for a command line over the limit.
TOO_LONG: Final = object()
#: What a line buffer yields for a command line with a bare LF in it.
BARE_LF: Final = object()


LfText = Callable[[bytes, int, int], "tuple[bytes | None, bool]"]
FindDots = Callable[[bytes, int], "tuple[int, int]"]


def _c_passes() -> tuple[LfText | None, FindDots | None]:
    """The compiled build's C passes over a block (``_lftext.c``), or Nones: the pure
    build computes the same in Python (``_delete_crs``, ``_only_crlf`` and
    ``_has_long_line``; ``_find_dots``), and its import hook refuses this module (see
    _native).  ``lf_text`` deletes CRs, proves there is no bare CR or LF and checks the
    line limit in one loop, 0.23 ms per MiB of 76-octet lines where the bytes methods
    take 0.65; ``find_dots`` finds stuffed lines and the end in 0.13 ms per MiB whatever
    the text, where CPython's search for ``CRLF.`` takes 0.8 to 3.2."""
    try:
        from ._lftext import find_dots, lf_text
    except ImportError:
        return None, None
    return lf_text, find_dots


_C_PASSES: Final = _c_passes()
#: None in the pure build.
_LF_TEXT: Final = _C_PASSES[0]
_FIND_DOTS: Final = _C_PASSES[1]


def _has_long_line(text: bytes, carry: int = 0, limit: int = LINE_LIMIT) -> bool:
    """Does ``text`` make any line longer than ``limit`` octets?  (RFC 5321 4.5.3.1.6:
    1000 with the CRLF.)  ``carry`` octets of its first line came before ``text``; its
    last line may be unfinished, and counts as long once it is.  Jumps from line start
    to the last LF within ``limit`` + 1 octets: a window without an LF is a long line;
    a window with one proves every line starting before that LF short.  About
    len/limit C-level searches, no split."""
    n, pos = len(text), 0
    if carry:  # the first line's LF must come within limit - carry octets
        if n + carry <= limit:
            return False
        if carry > limit:
            return True
        pos = text.rfind(b"\n", 0, limit + 1 - carry) + 1
        if pos == 0:
            return True
    rfind, step, end = text.rfind, limit + 1, n - limit
    while pos < end:  # more than ``limit`` octets from this line start to the end
        last = rfind(b"\n", pos, pos + step)
        if last < 0:
            return True
        pos = last + 1
    return False


# Per 64 KiB block, measured on CPython 3.11: ``replace`` of a single octet jumps from one
# to the next with memchr, so its cost follows the number of lines: 13 us on 78-octet lines
# where ``translate`` takes 43 us whatever the text, but 420 us on empty lines.  The DATA
# reader uses it where the lines are long enough, and caps it (the ``count`` argument of
# ``replace``) so that short lines cost at most about twice the line-independent way.
_DELETE_BY_REPLACE = 24  #: octets per CR from which ``replace`` deletes CRs faster
_REBUILD_BY_REPLACE = 8  #: octets per CR from which rebuilding beats counting CRLFs


def _delete_crs(block: bytes) -> bytes:
    """``block`` without its CRs (for a CRLF-only block: CRLF -> LF).  Deletes at most
    one CR per ``_DELETE_BY_REPLACE`` octets with ``replace``; when it hits that cap the
    lines are short and ``translate`` deletes the rest."""
    cap = len(block) // _DELETE_BY_REPLACE + 1
    stuffed = block.replace(b"\r", b"", cap)
    if len(block) - len(stuffed) == cap:
        stuffed = stuffed.translate(None, b"\r")
    return stuffed


def _only_crlf(block: bytes, stuffed: bytes) -> bool:
    """Is each CR in ``block`` followed by an LF and each LF preceded by a CR (no bare
    CR or LF)?  ``stuffed`` is ``block`` without its CRs.  Exact either way."""
    crs = len(block) - len(stuffed)
    if crs * _REBUILD_BY_REPLACE <= len(block):
        # Writing each LF back as CRLF rebuilds the block exactly when it has no bare CR
        # or LF: the rebuilt text has none by construction, and a block without any is
        # runs of other octets joined by CRLFs, which the round trip leaves alone.  A
        # bare CR and a bare LF far apart (equal counts) still differ.  The cap of
        # crs + 1 keeps the cost at one memchr per CR: a block with more LFs than CRs
        # has a bare LF, and the capped result is then one octet too long, never equal.
        return stuffed.replace(b"\n", CRLF, crs + 1) == block
    # Short lines: the CR count, the LF count and the CRLF count agree exactly when each
    # CR pairs with the LF after it (pairs cannot overlap) and no LF is left over.
    return crs == stuffed.count(b"\n") and block.count(CRLF) == crs


#: Dots ``_find_crlf_dot`` checks one by one before it searches for CRLF. outright.
_DOT_WALK: Final = 8
#: A Received: field written with white space before its colon (obsolete syntax).
_RECEIVED_WSP: Final = re.compile(rb"\nreceived[ \t]+:")


def _find_crlf_dot(buf: bytes, dot: int) -> int:
    """The index of the first CRLF. in ``buf`` whose dot is at ``dot`` (a dot's index)
    or later, or -1.  CPython finds a one-octet needle with memchr but a three-octet one
    with a loop that advances about three octets per step: 3.4 us for a 4 KiB body,
    where a memchr takes 0.1.  So the dots are visited with memchr and the two octets
    before each checked: a body with few dots (base64, most generated mail) costs a
    few memchr calls.  Prose has a dot per sentence: after ``_DOT_WALK`` dots the plain
    search takes over, which bounds the detour at about 1 us."""
    find = buf.find
    for _ in range(_DOT_WALK):
        if dot >= 2 and buf[dot - 1] == 10 and buf[dot - 2] == 13:
            return dot - 2
        dot = find(b".", dot + 1)
        if dot < 0:
            return -1
    return find(b"\r\n.", max(dot - 2, 0))


def _find_dots(buf: bytes, start: int) -> tuple[int, int]:
    """``(dot, end)``: the index of the first CRLF. in ``buf`` at ``start`` or later, and
    of the first CRLF.CRLF, the same as ``dot`` when that one is it; -1 for either when
    there is none.  The Python twin of ``_lftext.find_dots``."""
    first = buf.find(b".", start + 2)  # a CRLF.'s dot is two octets after its start
    if first < 0:
        return -1, -1
    dot = _find_crlf_dot(buf, first)
    if dot < 0:
        return -1, -1
    if buf[dot + 3:dot + 5] == CRLF:
        return dot, dot
    return dot, buf.find(END_OF_DATA, dot + 3)


class LineBuffer:
    """Extracts CRLF-terminated command lines, never holding more than ``limit`` octets
    of an unfinished line.  An overlong line is discarded as it arrives and reported
    once, when its CRLF finally comes, so the reply stays in step with the client.

    A line with a bare LF in it is reported at its first one (``BARE_LF``): whether an
    LF is bare is settled the moment it arrives, and a client that ends its lines with
    LF alone (``nc`` without ``-C``) is told so then, not at the command timeout.  The
    rest of that line, up to its CRLF, is dropped unread: one report per line, as the
    client counts lines, and nothing after a bare LF is ever taken for a command (an
    AUTH response wrapped at 76 octets would otherwise run, and be logged, piece by
    piece)."""

    __slots__ = ("_buf", "_limit", "_skipping", "_refused", "head")

    def __init__(self, limit: int = 512) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._skipping = False  # an overlong line, reported at its end
        self._refused = False  # a line reported at a bare LF, dropped up to its CRLF
        #: The first octets of the last line reported ``TOO_LONG`` or ``BARE_LF``.
        self.head = b""

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self):
        """A complete line without its CRLF, ``TOO_LONG``, ``BARE_LF``, or None (need
        more data)."""
        buf = self._buf
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if self._refused:  # nothing of it is kept but a CR that may end it
                    buf[:] = b"\r" if buf.endswith(b"\r") else b""
                elif len(buf) > self._limit:
                    self._discard_unfinished()
                return None
            crlf = end > 0 and buf[end - 1] == 13  # 13: CR
            if self._refused:
                del buf[: end + 1]
                self._refused = not crlf
                continue
            if not crlf:
                return self._bare_lf(end)
            line = bytes(buf[:end - 1])
            del buf[: end + 1]
            if self._skipping or end + 1 > self._limit:
                if not self._skipping:
                    self.head = line[:5]
                self._skipping = False
                return TOO_LONG
            return line

    def _bare_lf(self, end: int):
        """Report the line whose first bare LF is at ``end`` (an overlong one as such:
        its first octets are gone already), and drop the rest of it from there on.
        What the client sent after the LF stays buffered until the next call, so that
        ``pending`` still sees it (a DATA refused so must not have text behind it)."""
        buf = self._buf
        skipping = self._skipping
        if not skipping:
            self.head = bytes(buf[:min(end, 5)])
        del buf[: end + 1]
        self._skipping = False
        self._refused = True
        return TOO_LONG if skipping or end + 1 > self._limit else BARE_LF

    def _discard_unfinished(self) -> None:
        if not self._skipping:
            self.head = bytes(self._buf[:5])
        # Keep a trailing CR: it may be the first half of the CRLF that ends the line.
        keep = b"\r" if self._buf.endswith(b"\r") else b""
        self._buf[:] = keep
        self._skipping = True

    def pending(self) -> int:
        """Octets received but not yet consumed (RFC 2920 synchronisation checks)."""
        return len(self._buf)

    def take(self) -> bytes:
        """Remove and return everything buffered (the switch into DATA mode)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._skipping = self._refused = False
        return data

    def clear(self) -> None:
        self._buf.clear()
        self._skipping = self._refused = False


class DataReader:
    """Turns the DATA stream into stored text: CRLF -> LF, dot-unstuffed, checked.

    ``feed`` returns ``(text, done, rest)``: ``text`` is ready to append to the
    Maildir file, ``done`` says the exact CRLF.CRLF was seen, and ``rest`` is what the
    client pipelined after it.  Problems (size, line length, bare CR/LF, mail loop)
    are recorded in ``error`` and reported after the final dot, as RFC 5321 4.2.5 and
    every production MTA do; the reader keeps scanning for the end so that the session
    never loses sync with the client.
    """

    __slots__ = ("_pending", "_midline", "_carry", "_max_size", "_max_received", "_normalize",
                 "size", "error", "_in_headers", "_received", "_at_start")

    def __init__(self, max_size: int, max_received: int = 100, normalize: bool = False) -> None:
        self._pending = b""
        # True when the pending bytes do not start a line (an overlong line was cut, the
        # last line ended in a bare LF, or the line's start was handed on already): a
        # leading ".\r\n" is then not the end.
        self._midline = False
        # Octets of the current line already handed on (see feed): the next text goes on
        # with that line, so its first octet is no transparency dot and the line-length
        # check counts them in.
        self._carry = 0
        self._max_size = max_size
        self._max_received = max_received
        self._normalize = normalize
        self.size = 0
        self.error: R.Reply | None = None
        self._in_headers = True
        self._received = 0
        self._at_start = True  # no text of the message stored yet

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        buf = self._pending + data if self._pending else data
        end, dot = self._find_end(buf)
        if end >= 0:
            self._pending = b""
            text = self._process(buf[:end], dot)
            if self.size > self._max_size:
                # Every octet counts toward the size whatever else was wrong, so its
                # verdict does not depend on how the reads cut the text, where the first
                # other problem found may: a long line held unfinished at a read's end
                # was refused before the octets that carried the message over the size.
                self.error = R.R552_TOO_BIG
            return text, True, buf[end + 3:]
        # Cut after the last LF, bare or not: with normalize a bare LF ends a line too,
        # and holding LF-only text back as one "line" would refuse it as too long.  So
        # does a bare CR there; a CR that ends the read may be the first half of a CRLF.
        cut = buf.rfind(b"\n")
        if self._normalize:
            cut = max(cut, buf.rfind(b"\r", 0, len(buf) - 1))
        if cut < 0:
            self._hold(buf)
            return b"", False, b""
        tail = len(buf) - cut - 1
        if tail and self._can_hand_on(buf, tail):
            # The usual block of a big body: the unfinished last line goes out with the
            # rest instead of being held, which would copy the block twice (the held
            # line joined to the next read, the complete lines sliced off).
            text = self._process(buf, dot)
            self._pending, self._midline, self._carry = b"", True, tail
            return text, False, b""
        # After a bare LF or CR no line starts: a "." there must not end the data
        # (smuggling).  A LF that opens the read is bare too: a CR before it would have
        # been held.  (Indexing, not buf[cut - 1:cut]: compiled, a slice whose start
        # lies past its end raises instead of giving b"".)
        self._midline = buf[cut] != 10 or cut == 0 or buf[cut - 1] != 13
        text = self._process(buf[: cut + 1], dot)
        self._carry = 0  # the held text starts a line
        self._hold(buf[cut + 1:])
        return text, False, b""

    def _can_hand_on(self, buf: bytes, tail: int) -> bool:
        """May the unfinished line (the last ``tail`` octets of ``buf``) be stored now?
        Not if it might start the end marker or be a stuffed line (a leading dot), nor
        if it ends in a CR (the LF may come next, or not: a bare CR), nor while headers
        are counted (a Received: field may be split), nor in normalize mode (where a
        bare CR or LF may end lines, the leftover is not the rest of a line)."""
        return (buf[-tail] != 0x2E and buf[-1] != 0x0D and not self._in_headers
                and not self._normalize and self.error is None)

    def _find_end(self, buf: bytes) -> tuple[int, int]:
        """``(end, dot)``: the index of the ".\\r\\n" line that ends DATA, or -1; and the
        index of the first dot after a CRLF (a stuffed line) before that end, or -1.

        The end (CRLF.CRLF) and every stuffed line (CRLF.) both hold CRLF., so one scan
        for CRLF. serves both, where a search for the end and another for stuffed lines
        took two: stuffed lines are rare, and after the first one a plain search for the
        end finishes the job, so a block costs at most two scans whatever it holds.
        None of them can come before the first dot in ``buf``: one memchr skips text
        without dots (base64 attachments) outright, or the text up to its first dot."""
        # ``buf`` starts a line unless ``_midline`` says otherwise (see __init__): after
        # a bare LF, or inside a line handed on, a "." must not end the data (smuggling).
        if not self._midline and buf[:3] == b".\r\n":
            return 0, -1
        first = buf.find(b".")
        if first < 0:
            return -1, -1
        start = max(first - 2, 0)
        dot, end = _FIND_DOTS(buf, start) if _FIND_DOTS is not None else _find_dots(buf, start)
        if dot < 0:
            return -1, -1
        if end == dot:  # CRLF.CRLF: the end, with no stuffed line before it
            return dot + 2, -1
        # A stuffed line at dot + 2; the end, if any, comes after it.
        return (end + 2 if end >= 0 else -1), dot + 2

    def _hold(self, tail: bytes) -> None:
        # A legal unfinished line holds at most 1000 octets (998 of text, a transparency
        # dot, the CR of its CRLF); the two more let through here cost nothing, as the
        # line is measured again, exactly, when its LF comes.
        if self._carry + len(tail) > 1002:
            self._fail(R.R554_LINE_TOO_LONG)
            # Octets dropped here are counted now, as _sent_size counts: less the
            # transparency dot if the line starts here with one.
            opens = not (self._carry or self._midline) and tail[:1] == b"."
            self.size += max(len(tail) - 4, 0) - opens
            tail = tail[-4:]  # enough to recognise an END_OF_DATA that spans reads
            self._midline = True
        self._pending = tail

    def _fail(self, reply: R.Reply) -> None:
        if self.error is None:
            self.error = reply

    def _process(self, block: bytes, dot: int) -> bytes:
        """``block`` (a prefix of what ``feed`` scanned) as stored text; ``dot`` is the
        first stuffed line ``_find_end`` saw (-1 if none), maybe past ``block``."""
        if not block:
            return b""
        if self.error is not None:
            self.size += self._sent_size(block)  # nothing stored, but the log says what was sent
            return b""
        stuffed, normalised, long = self._to_lf(block)
        if stuffed is None:
            self.size += self._sent_size(block)
            return b""
        # Unstuff only where a line starts with a dot (no copy per block otherwise).  In a
        # block _to_lf did not normalise every LF follows a CR, so each "\n." is a CRLF.
        # and ``dot`` tells whether there is one; after normalising, a bare CR or LF may
        # have become a line start too.
        if normalised or stuffed[:1] == b"." or 0 <= dot < len(block):
            text = stuffed[1:] if stuffed[:1] == b"." and not self._carry else stuffed
            text = text.replace(b"\n.", b"\n")
        else:
            text = stuffed
        # RFC 1870 size: the message as sent, CRLFs included, transparency dots not.
        self.size += len(block) - (len(stuffed) - len(text))
        if self.size > self._max_size:
            self._fail(R.R552_TOO_BIG)
            return b""
        if long or (long is None and _has_long_line(text, self._carry)):
            self._fail(R.R554_LINE_TOO_LONG)
            return b""
        if self._at_start and text:
            self._at_start = False
            first = text[:1]
            if first == b" " or first == b"\t":
                # Stored after our own trace fields, a first line that starts with white
                # space would continue our Received: field (RFC 5322 2.2.3): the client
                # would write into the server's trace.  Postfix inserts an empty line
                # before it, which turns the headers into body; the message is stored
                # exactly as sent here or not at all.
                self._fail(R.R554_FOLDED_START)
                return b""
        if self._in_headers:
            self._scan_headers(text)
        return text

    def _sent_size(self, block: bytes) -> int:
        """A refused block's size as RFC 1870 counts it, less a transparency dot for each
        line that starts with one: refused text is still sized as if stored, so that
        whether the total passes the limit (552 wins at the end) does not depend on the
        point where the text was refused."""
        return len(block) - block.count(b"\n.") - (block[:1] == b"." and not self._carry)

    def _to_lf(self, block: bytes) -> tuple[bytes | None, bool, bool | None]:
        """CRLF -> LF, whether bare CR/LF were normalised, and whether a line is over
        the limit once unstuffed when the C pass has checked that (None: the caller
        checks); (None, False, None) and the 550 when a bare CR or LF is refused."""
        if _LF_TEXT is not None:
            stuffed, long = _LF_TEXT(block, self._carry, LINE_LIMIT)
            if stuffed is not None:
                return stuffed, False, long
        else:
            stuffed = _delete_crs(block)
            if _only_crlf(block, stuffed):
                return stuffed, False, None
        if not self._normalize:
            self._fail(R.R550_BARE_NEWLINE)
            return None, False, None
        # Legacy senders: a bare CR or LF is a line break in the stored text (LF),
        # never the end of the message (only CRLF.CRLF is).
        return block.replace(CRLF, b"\n").replace(b"\r", b"\n"), True, None

    def _scan_headers(self, text: bytes) -> None:
        """Count Received: fields in the header section (RFC 5321 6.3 loop detection)."""
        # The blank line that ends the headers: at the very start (text begins at a line
        # start) or after some header line; until it comes, the whole block is headers.
        end = 0 if text[:1] == b"\n" else text.find(b"\n\n") + 1
        if end == 0 and text[:1] != b"\n":
            end = len(text)
        else:
            self._in_headers = False
        # A message without a blank line is all header section; scanning all of it would
        # lowercase every block of a big one.  A real loop's 100 Received: fields fit in
        # far less than HEADER_SCAN_LIMIT, so the count stops there.
        if self.size >= HEADER_SCAN_LIMIT:
            self._in_headers = False
        low = b"\n" + text[:end].lower()
        self._received += low.count(b"\nreceived:")
        # RFC 5322 4.5 obsolete syntax allows white space before the colon; Postfix
        # counts such a field as a hop too, so a loop cannot hide behind the spelling.
        if b"\nreceived " in low or b"\nreceived\t" in low:
            self._received += len(_RECEIVED_WSP.findall(low))
        if self._received >= self._max_received:
            self._fail(R.R554_LOOP)
