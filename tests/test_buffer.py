"""LineBuffer (command lines) and DataReader (message text): CRLF-only framing, bounded
memory, dot-stuffing, the 1000-octet line limit, the size limit, loop detection, and
every SMTP smuggling variant fed in every possible split."""

from __future__ import annotations

import itertools
import random

import pytest

from forksmtp.smtp import buffer
from forksmtp.smtp import replies as R
from forksmtp.smtp.buffer import BARE_LF, TOO_LONG, DataReader, LineBuffer, _has_long_line

END = b".\r\n"  # the final line; with the CRLF ending the last text line: CRLF.CRLF


# -- LineBuffer ---------------------------------------------------------------------------------------

def lines_of(buf: LineBuffer) -> list:
    found = []
    while (line := buf.next_line()) is not None:
        found.append(line)
    return found


def test_line_buffer_yields_lines_without_crlf():
    buf = LineBuffer()
    buf.feed(b"EHLO x\r\nNOOP\r\n\r\nQUI")
    assert lines_of(buf) == [b"EHLO x", b"NOOP", b""]
    assert buf.pending() == 3
    buf.feed(b"T\r\n")
    assert lines_of(buf) == [b"QUIT"]
    assert buf.pending() == 0


@pytest.mark.parametrize("raw, lines", [
    (b"a\rb\r\n", [b"a\rb"]),
    (b"a\r\r\n", [b"a\r"]),
    (b"a\nb\r\n", [BARE_LF]),  # the rest of the line, after its first bare LF, is dropped
    (b"\n\r\n", [BARE_LF]),
    (b"a\n\rb\r\n", [BARE_LF]),
    (b"\n\n", [BARE_LF]),
    (b"a\nb\nc\r\nNOOP\r\n", [BARE_LF, b"NOOP"]),
    (b"a\r\r\nb\n", [b"a\r", BARE_LF]),
])
def test_only_crlf_ends_a_command_line_and_a_bare_lf_is_reported_at_once(raw, lines):
    buf = LineBuffer()
    buf.feed(raw)
    assert lines_of(buf) == lines
    assert buf.pending() == 0


def test_a_bare_lf_is_told_apart_from_a_crlf_split_between_reads():
    buf = LineBuffer()
    buf.feed(b"NOOP\r")
    assert lines_of(buf) == []
    buf.feed(b"\nNOOP")
    assert lines_of(buf) == [b"NOOP"]
    buf.feed(b"\n")
    assert (lines_of(buf), buf.head) == ([BARE_LF], b"NOOP")
    buf.feed(b"QUIT\n")  # still the same line: until its CRLF, nothing is a line
    assert lines_of(buf) == []
    buf.feed(b"x\r")
    assert lines_of(buf) == [] and buf.pending() == 1  # a CR that may end it, no more
    buf.feed(b"\nQUIT\r\n")
    assert lines_of(buf) == [b"QUIT"]


def test_the_rest_of_a_refused_line_is_never_held():
    buf = LineBuffer(512)
    buf.feed(b"AUTH PLAIN\n")
    assert lines_of(buf) == [BARE_LF] and buf.head == b"AUTH "
    for _ in range(100):
        buf.feed(b"A" * 65536)
        assert lines_of(buf) == [] and buf.pending() == 0
    buf.feed(b"\r\nNOOP\r\n")
    assert lines_of(buf) == [b"NOOP"]


def test_an_overlong_line_ended_by_a_bare_lf_is_reported_too_long():
    for chunks in ([b"x" * 600 + b"\n"], [b"x" * 600, b"\n"], [b"x" * 512, b"\n"]):
        buf = LineBuffer(512)
        got = []
        for chunk in chunks:
            buf.feed(chunk)
            got += lines_of(buf)
        assert got == [TOO_LONG], chunks
    buf = LineBuffer(512)
    buf.feed(b"x" * 510 + b"\n")  # 511 octets with its LF: within the limit
    assert lines_of(buf) == [BARE_LF]
    buf.feed(b"y" * 2000 + b"\r\n")  # its rest, however long, is dropped: no second report
    assert lines_of(buf) == []


def test_line_split_at_every_offset():
    data = b"EHLO x\r\nMAIL FROM:<a@b.test>\r\n\r\nQUIT\r\n"
    for cut in range(len(data) + 1):
        buf = LineBuffer()
        buf.feed(data[:cut])
        got = lines_of(buf)
        buf.feed(data[cut:])
        assert got + lines_of(buf) == [b"EHLO x", b"MAIL FROM:<a@b.test>", b"", b"QUIT"], cut


def test_line_fed_byte_by_byte():
    buf = LineBuffer()
    got = []
    for byte in b"NOOP\r\nRSET\r\n":
        buf.feed(bytes([byte]))
        got += lines_of(buf)
    assert got == [b"NOOP", b"RSET"]


@pytest.mark.parametrize("octets, too_long", [(511, False), (512, False), (513, True), (514, True)])
def test_line_limit_counts_crlf(octets, too_long):
    buf = LineBuffer(512)
    buf.feed(b"x" * (octets - 2) + b"\r\n" + b"NOOP\r\n")
    got = lines_of(buf)
    assert got[0] is TOO_LONG if too_long else got[0] == b"x" * (octets - 2)
    assert got[1:] == [b"NOOP"]


@pytest.mark.parametrize("octets, too_long", [(512, False), (513, True)])
@pytest.mark.parametrize("cut", [1, 255, 509, 510, 511, 512])
def test_line_limit_when_split(octets, too_long, cut):
    data = b"y" * (octets - 2) + b"\r\n"
    buf = LineBuffer(512)
    buf.feed(data[:cut])
    got = lines_of(buf)
    buf.feed(data[cut:])
    got += lines_of(buf)
    assert got == [TOO_LONG] if too_long else got == [data[:-2]]


def test_overlong_line_is_reported_once_when_its_crlf_comes():
    buf = LineBuffer(512)
    for _ in range(10):
        buf.feed(b"z" * 300)
        assert lines_of(buf) == []
        assert buf.pending() <= 512
    buf.feed(b"z\r\nNOOP\r\n")
    assert lines_of(buf) == [TOO_LONG, b"NOOP"]


def test_overlong_line_with_crlf_split_after_the_discard():
    buf = LineBuffer(512)
    buf.feed(b"z" * 600 + b"\r")
    assert lines_of(buf) == []
    assert buf.pending() == 1  # the CR is kept: it may start the CRLF
    buf.feed(b"\nNOOP\r\n")
    assert lines_of(buf) == [TOO_LONG, b"NOOP"]


def test_overlong_line_ending_in_bare_cr_is_not_ended_by_it():
    buf = LineBuffer(512)
    buf.feed(b"z" * 600 + b"\r")
    lines_of(buf)
    buf.feed(b"x\r\nNOOP\r\n")
    assert lines_of(buf) == [TOO_LONG, b"NOOP"]


def test_custom_limit():
    buf = LineBuffer(10)
    buf.feed(b"12345678\r\n123456789\r\n")
    assert lines_of(buf) == [b"12345678", TOO_LONG]


def test_line_buffer_memory_is_bounded_without_crlf():
    buf = LineBuffer(512)
    piece = b"m" * 65536
    for _ in range(20 * 16):  # 20 MiB in 64 KiB reads
        buf.feed(piece)
        assert buf.next_line() is None
        assert buf.pending() <= 1024
    buf.feed(b"\r\nNOOP\r\n")
    assert lines_of(buf) == [TOO_LONG, b"NOOP"]


def test_take_and_clear():
    buf = LineBuffer()
    buf.feed(b"DATA\r\nbody\r\n")
    assert buf.next_line() == b"DATA"
    assert buf.take() == b"body\r\n"
    assert buf.pending() == 0
    buf.feed(b"x" * 600)
    buf.next_line()
    buf.clear()  # also forgets the overlong line in progress
    buf.feed(b"NOOP\r\n")
    assert lines_of(buf) == [b"NOOP"]


# -- DataReader ---------------------------------------------------------------------------------------

class Read:
    """The outcome of feeding pieces to a DataReader until it reports the end."""

    def __init__(self, pieces, **kwargs) -> None:
        self.reader = DataReader(kwargs.pop("max_size", 10_000_000), **kwargs)
        texts, self.done_at, self.rest = [], None, b""
        for i, piece in enumerate(pieces):
            if self.done_at is not None:  # the session reads these as commands again
                self.rest += piece
                continue
            text, done, rest = self.reader.feed(piece)
            texts.append(text)
            if done:
                self.done_at, self.rest = i, rest
        self.text = b"".join(texts)
        self.error = self.reader.error
        self.done = self.done_at is not None


def read(data: bytes, **kwargs) -> Read:
    return Read([data], **kwargs)


def splits(data: bytes, parts: int = 2):
    """``data`` cut into ``parts`` pieces, at every combination of offsets."""
    for cuts in itertools.combinations(range(1, len(data)), parts - 1):
        bounds = (0, *cuts, len(data))
        yield [data[a:b] for a, b in zip(bounds, bounds[1:])]


def test_simple_message():
    r = read(b"Subject: x\r\n\r\nhello\r\n" + END)
    assert (r.text, r.done, r.rest, r.error) == (b"Subject: x\n\nhello\n", True, b"", None)
    assert r.reader.size == 21


def test_empty_message():
    r = read(END + b"QUIT\r\n")
    assert (r.text, r.done, r.rest, r.error) == (b"", True, b"QUIT\r\n", None)
    assert r.reader.size == 0


def test_rest_after_the_end_is_returned_untouched():
    r = read(b"a\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n.\r\npartial")
    assert r.text == b"a\n"
    assert r.rest == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n.\r\npartial"


@pytest.mark.parametrize("normalize", [False, True])
def test_reads_that_open_with_a_lf_match_the_whole(normalize):
    # A LF opening a read after a CRLF is bare: the "." after it starts no line, and
    # the outcome is the one the stream gives in a single read, wherever it is cut.
    # (Text and size counted before a refusal go with the message: not compared.)
    stream = b"line\r\n\n.\r\nmore\r\n.\r\n"
    whole = DataReader(10_000, normalize=normalize)
    one = whole.feed(stream)
    # Refused, or stored with the bare LF as a line end and the dot after it unstuffed.
    assert one == ((b"line\n\n\nmore\n", True, b"") if normalize else (b"", True, b""))
    assert whole.error == (None if normalize else R.R550_BARE_NEWLINE)
    cuts = itertools.combinations(range(1, len(stream)), 2)
    for pieces in ([stream[:i], stream[i:j], stream[j:]] for i, j in cuts):
        split = DataReader(10_000, normalize=normalize)
        results = [split.feed(piece) for piece in pieces]
        if whole.error is None:
            assert b"".join(r[0] for r in results) == one[0]
            assert split.size == whole.size
        assert results[-1][1:] == one[1:]
        assert split.error == whole.error


def test_only_complete_lines_are_returned():
    reader = DataReader(1000)
    assert reader.feed(b"abc") == (b"", False, b"")
    assert reader.feed(b"\r") == (b"", False, b"")
    assert reader.feed(b"\ndef\r\ng") == (b"abc\ndef\n", False, b"")
    assert reader.feed(b"\r\n.\r\n") == (b"g\n", True, b"")


MESSAGE = b"Subject: split\r\n\r\n..dotted\r\nline\r\n" + END + b"NOOP\r\n"


@pytest.mark.parametrize("pieces", list(splits(MESSAGE, 2)), ids=lambda p: str(len(p[0])))
def test_end_split_at_every_offset(pieces):
    r = Read(pieces)
    assert (r.text, r.done, r.rest, r.error) == (b"Subject: split\n\n.dotted\nline\n", True, b"NOOP\r\n", None)
    assert r.done_at == (0 if len(pieces[0]) >= MESSAGE.index(b"NOOP") else 1)


def test_end_split_into_three_at_every_pair_of_offsets():
    data = b"a\r\n..b\r\nc\r\n" + END + b"QUIT\r\n"
    for pieces in splits(data, 3):
        r = Read(pieces)
        assert (r.text, r.done, r.rest, r.error) == (b"a\n.b\nc\n", True, b"QUIT\r\n", None), pieces


def test_message_fed_byte_by_byte():
    data = b"..a\r\n\r\n..\r\nb\r\n" + END
    r = Read([bytes([b]) for b in data])
    assert (r.text, r.done, r.rest, r.error) == (b".a\n\n.\nb\n", True, b"", None)
    assert r.done_at == len(data) - 1


# every way a client (or an attacker) may fake the end with a bare CR or LF
SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\n.\r", b"\r\r\n.\r\r\n",
             b"\r\n.\r\r\n", b"\r\n.\n\r\n", b"\n\r\n.\r"]
SMUGGLED = b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nspoofed\r\n"


def smuggling_message(fake_end: bytes) -> bytes:
    data = b"Subject: hi\r\n\r\nfirst" + fake_end + SMUGGLED
    assert b"\r\n.\r\n" not in data
    return data + END


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
def test_smuggling_variant_is_refused_and_never_ends_data(fake_end):
    data = smuggling_message(fake_end)
    r = read(data)
    assert r.done and r.rest == b""
    assert r.error == R.R550_BARE_NEWLINE
    assert r.text == b""  # nothing of a refused message is handed on


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
def test_smuggling_variant_at_every_split(fake_end):
    data = smuggling_message(fake_end)
    for pieces in splits(data, 2):
        r = Read(pieces)
        assert r.done and r.done_at == 1 and r.rest == b"", pieces
        assert r.error is not None and r.error.code == 550, pieces


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
def test_smuggling_variant_normalised_stays_one_message(fake_end):
    data = smuggling_message(fake_end)
    whole = read(data, normalize=True)
    assert whole.done and whole.rest == b"" and whole.error is None
    assert b"MAIL FROM:<evil@example.test>\nRCPT TO:<victim@example.test>\nDATA\nspoofed\n" in whole.text
    for pieces in splits(data, 2):
        r = Read(pieces, normalize=True)
        assert (r.text, r.done_at, r.rest, r.error) == (whole.text, 1, b"", None), pieces


def test_bare_cr_before_the_real_end_is_refused():
    # "\r\r\n.\r\n" holds CRLF.CRLF: the data ends there, and the bare CR refuses the message
    r = read(b"first\r\r\n" + END + b"QUIT\r\n")
    assert r.done and r.rest == b"QUIT\r\n" and r.error == R.R550_BARE_NEWLINE


@pytest.mark.parametrize("text", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\n\r\n", b"a\n", b"x\r\n\r\r\n"])
def test_bare_cr_or_lf_anywhere_is_refused(text):
    r = read(text + b"\r\n" + END)
    assert r.done and r.error == R.R550_BARE_NEWLINE


def test_normalize_keeps_bare_lf_as_line_end():
    r = read(b"Subject: x\n\none\ntwo\r\nthree\r\n" + END, normalize=True)
    assert (r.text, r.error) == (b"Subject: x\n\none\ntwo\nthree\n", None)


def test_normalize_long_lf_only_text_is_split_invariant():
    # A legacy client's LF-only body is many short lines, however the reads fall.
    body = b"short line\n" * 300 + b"\r\n"
    whole = read(body + END, normalize=True)
    assert whole.error is None and whole.text == body.replace(b"\r\n", b"\n")
    for size in (1, 7, 1000, 1500, 4096):
        pieces = [(body + END)[i:i + size] for i in range(0, len(body) + 3, size)]
        r = Read(pieces, normalize=True)
        assert (r.text, r.error, r.done) == (whole.text, None, True), size


def test_normalize_long_cr_only_text_is_split_invariant():
    # Bare CRs end lines too when normalising: a CR-only body bigger than one read must
    # not be held back as one overlong "line", however the reads fall.
    body = b"a line that ends in a bare CR, as old Mac clients wrote\r" * 40 + b"\r\n"
    whole = read(body + END, normalize=True)
    assert whole.error is None and whole.text == body[:-2].replace(b"\r", b"\n") + b"\n"
    for size in (1, 7, 1000, 1500, 4096):
        pieces = [(body + END)[i:i + size] for i in range(0, len(body) + 3, size)]
        r = Read(pieces, normalize=True)
        assert (r.text, r.error, r.done) == (whole.text, None, True), size


def test_normalize_a_dot_after_a_bare_cr_at_a_read_end_is_no_end():
    # Cut after a bare CR, the next read opens mid-line: its ".\r\n" is text, not the end.
    r = Read([b"x\r.", b"\r\nmore\r\n" + END], normalize=True)
    assert (r.text, r.error, r.done) == (b"x\n\nmore\n", None, True)
    assert read(b"x\r.\r\nmore\r\n" + END, normalize=True).text == r.text


def test_normalize_still_limits_line_length():
    r = read(b"x" * 999 + b"\n" + END, normalize=True)
    assert r.error == R.R554_LINE_TOO_LONG


# -- dot-stuffing (RFC 5321 4.5.2) ------------------------------------------------------------

@pytest.mark.parametrize("wire, text", [
    (b"..\r\n", b".\n"),
    (b"...\r\n", b"..\n"),
    (b"..hello\r\n", b".hello\n"),
    (b".hello\r\n", b"hello\n"),  # a lone leading dot is dropped as well
    (b"a\r\n..\r\nb\r\n", b"a\n.\nb\n"),
    (b"a.b\r\n", b"a.b\n"),
    (b"a..\r\n", b"a..\n"),
    (b"a\r\n .x\r\n", b"a\n .x\n"),
    (b"..\r\n..\r\n..\r\n", b".\n.\n.\n"),
    (b"\r\n..\r\n", b"\n.\n"),
])
def test_dot_stuffing_undone(wire, text):
    r = read(wire + END)
    assert (r.text, r.error) == (text, None)


def test_leading_dot_on_first_line_in_a_later_read():
    reader = DataReader(1000)
    assert reader.feed(b"a\r\n") == (b"a\n", False, b"")
    assert reader.feed(b"..b\r\n") == (b".b\n", False, b"")
    assert reader.feed(b"..\r\n.\r\n") == (b".\n", True, b"")


def test_dot_stuffing_at_every_split():
    data = b"..first\r\n..\r\n...\r\nx\r\n" + END
    for pieces in splits(data, 2):
        r = Read(pieces)
        assert (r.text, r.done, r.error) == (b".first\n.\n..\nx\n", True, None), pieces


# -- text line length: 1000 octets including CRLF (RFC 5321 4.5.3.1.6) --------------------------

@pytest.mark.parametrize("octets, ok", [(999, True), (1000, True), (1001, False), (1002, False), (5000, False)])
def test_line_length_limit(octets, ok):
    r = read(b"x" * (octets - 2) + b"\r\n" + END)
    assert r.done
    assert r.error is None if ok else r.error == R.R554_LINE_TOO_LONG


@pytest.mark.parametrize("octets, ok", [(1000, True), (1001, True), (1002, False)])
def test_transparency_dot_is_not_counted(octets, ok):
    # "." + 998 octets + CRLF is 1001 octets on the wire but a 1000-octet line
    r = read(b"." + b"x" * (octets - 3) + b"\r\n" + END)
    assert r.error is None if ok else r.error == R.R554_LINE_TOO_LONG
    if ok:
        assert r.text == b"x" * (octets - 3) + b"\n"


@pytest.mark.parametrize("octets, ok", [(1000, True), (1001, False)])
def test_line_length_limit_at_every_split(octets, ok):
    data = b"a\r\n" + b"y" * (octets - 2) + b"\r\nb\r\n" + END
    for cut in range(1, len(data)):
        r = Read([data[:cut], data[cut:]])
        assert r.done and r.done_at == 1 and r.rest == b"", cut
        assert (r.error is None) == ok, cut


def test_line_length_limit_byte_by_byte():
    data = b"z" * 999 + b"\r\n" + END
    r = Read([bytes([b]) for b in data])
    assert r.done and r.error == R.R554_LINE_TOO_LONG


def test_long_line_in_the_middle():
    r = read(b"short\r\n" + b"L" * 10000 + b"\r\nshort\r\n" + END + b"NOOP\r\n")
    assert r.error == R.R554_LINE_TOO_LONG and r.rest == b"NOOP\r\n"


@pytest.mark.parametrize("tail_cut", range(1, 12))
def test_end_after_overlong_line_split_near_the_end(tail_cut):
    data = b"L" * 5000 + b"\r\n" + END + b"QUIT\r\n"
    cut = len(data) - 6 - tail_cut
    r = Read([data[:2000], data[2000:cut], data[cut:]])
    assert r.done and r.done_at == 2 and r.rest == b"QUIT\r\n"
    assert r.error == R.R554_LINE_TOO_LONG


# -- message size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size, ok", [(99, True), (100, True), (101, False)])
def test_size_limit_exactly_at_and_one_over(size, ok):
    data = b"x" * 48 + b"\r\n" + b"y" * (size - 52) + b"\r\n"
    assert len(data) == size
    r = read(data + END, max_size=100)
    assert r.done
    assert r.error is None if ok else r.error == R.R552_TOO_BIG
    if ok:
        assert r.reader.size == size


@pytest.mark.parametrize("size, ok", [(100, True), (101, False)])
def test_size_limit_at_every_split(size, ok):
    data = b"x" * 48 + b"\r\n" + b"y" * (size - 52) + b"\r\n" + END
    for pieces in splits(data, 2):
        r = Read(pieces, max_size=100)
        assert r.done and (r.error is None) == ok, pieces


@pytest.mark.parametrize("piece", [1, 7, 500, 1000, 1001, 2999, 3000, 1 << 20])
def test_an_oversized_message_gets_552_however_its_long_line_is_cut(piece):
    """Over the size limit and with a line over 1000 octets: 552 whatever the reads, not
    554 when the long line was still unfinished at the end of one."""
    data = b"Subject: x\r\n\r\n" + b"A" * 3000 + b"\r\n" + END
    pieces = [data[i:i + piece] for i in range(0, len(data), piece)]
    r = Read(pieces, max_size=2000)
    assert (r.error, r.done) == (R.R552_TOO_BIG, True), piece  # (text handed on before: discarded)


@pytest.mark.parametrize("piece", [1, 7, 1000, 1 << 20])
def test_refused_text_is_still_sized_without_its_transparency_dots(piece):
    # A bare LF refuses the message at once; the stuffed lines after it still count as
    # sent, less their dots: 552 only when the text as sent is over the limit.
    body = b"x\ny\r\n" + b"..dot\r\n" * 10
    size = len(body) - 10
    for limit, error in ((size, R.R550_BARE_NEWLINE), (size - 1, R.R552_TOO_BIG)):
        data = body + END
        r = Read([data[i:i + piece] for i in range(0, len(data), piece)], max_size=limit)
        assert (r.error, r.reader.size) == (error, size), (piece, limit)


@pytest.mark.parametrize("cut", [20, 40, 1074, 1100, 1200])
def test_a_long_stuffed_line_is_sized_without_its_dot_wherever_the_reads_cut_it(cut):
    """A line over 1000 octets that starts with a transparency dot: the octets dropped
    with it are counted without the dot, as every other refused text is, so that the
    size, and whether 552 or 554 answers at exactly the limit, do not depend on where
    the reads cut it."""
    data = b"Subject: x\r\n\r\n..." + b"a" * 1196 + b"\r\n" + END
    size = len(data) - len(END) - 1  # one transparency dot
    for limit, error in ((size, R.R554_LINE_TOO_LONG), (size - 1, R.R552_TOO_BIG)):
        r = Read([data[:cut], data[cut:]], max_size=limit)
        assert (r.error, r.reader.size) == (error, size), (cut, limit)


def test_oversized_message_hands_on_no_text_but_still_finds_the_end():
    reader = DataReader(10)
    text, done, _ = reader.feed(b"12345678\r\n")
    assert text == b"12345678\n" and not done
    text, done, rest = reader.feed(b"more text\r\n.\r\nNOOP\r\n")
    assert (text, done, rest) == (b"", True, b"NOOP\r\n")
    assert reader.error == R.R552_TOO_BIG


def test_size_does_not_count_transparency_dots():
    data = b"..x\r\n" * 20  # 100 octets on the wire, 80 of message
    r = read(data + END, max_size=80)
    assert r.error is None
    assert r.reader.size == 80


# -- mail loops: Received header count (RFC 5321 6.3) -----------------------------------------------

def headers(n: int, name: bytes = b"Received") -> bytes:
    return b"".join(name + b": from h%d by mx.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i for i in range(n))


@pytest.mark.parametrize("count, ok", [(0, True), (98, True), (99, True), (100, False), (150, False)])
def test_received_header_count(count, ok):
    r = read(headers(count) + b"Subject: x\r\n\r\nbody\r\n" + END)
    assert r.error is None if ok else r.error == R.R554_LOOP


def test_received_header_count_is_case_insensitive():
    data = headers(50, b"RECEIVED") + headers(50, b"received") + b"\r\nbody\r\n" + END
    assert read(data).error == R.R554_LOOP


def test_received_with_white_space_before_the_colon_is_counted():
    """RFC 5322 4.5.3's obsolete syntax: "Received :" is the same field, a hop all the same."""
    data = (headers(40) + headers(30, b"Received ") + headers(30, b"received\t \t")
            + b"\r\nbody\r\n" + END)
    assert read(data).error == R.R554_LOOP
    assert read(headers(60) + headers(39, b"Received ") + b"\r\nbody\r\n" + END).error is None
    assert read(headers(99) + headers(5, b"Received-From ") + b"\r\nbody\r\n" + END).error is None


def test_received_in_the_body_is_not_counted():
    data = headers(99) + b"\r\n" + headers(500) + END
    assert read(data).error is None


def test_message_without_header_section_counts_nothing():
    assert read(b"\r\n" + headers(200) + END).error is None


def test_other_headers_are_not_counted():
    data = headers(99) + headers(5, b"X-Received") + headers(5, b"Received-SPF") + b"\r\nbody\r\n" + END
    assert read(data).error is None


def test_received_headers_counted_across_reads():
    pieces = [h + b"\r\n" for h in headers(100).split(b"\r\n")[:-1]] + [b"\r\nbody\r\n" + END]
    assert Read(pieces).error == R.R554_LOOP
    data = headers(100) + b"\r\nbody\r\n" + END
    for cut in range(0, len(data), 97):
        assert Read([data[:cut], data[cut:]]).error == R.R554_LOOP, cut


def test_header_end_at_a_read_boundary():
    r = Read([headers(99), b"\r\n" + headers(10), END])
    assert r.error is None
    r = Read([headers(99), headers(1) + b"\r\n", END])
    assert r.error == R.R554_LOOP


def test_received_counting_stops_after_the_header_scan_limit():
    """A message with no blank line is all header section: the count covers its first
    HEADER_SCAN_LIMIT octets (a real loop's fields are far fewer), not all of it."""
    from forksmtp.smtp.buffer import HEADER_SCAN_LIMIT
    filler = b"X-Filler: " + b"f" * 60 + b"\r\n"
    big = filler * (2 * HEADER_SCAN_LIMIT // len(filler))
    feed = lambda data: Read([data[i:i + 65536] for i in range(0, len(data), 65536)])  # noqa: E731
    assert feed(headers(100) + big + END).error == R.R554_LOOP      # within the limit
    assert feed(big + headers(100) + END).error is None              # past it: not counted
    assert feed(big + b"\r\n" + headers(100) + END).error is None


def test_custom_received_limit():
    assert read(headers(2) + b"\r\nb\r\n" + END, max_received=3).error is None
    assert read(headers(3) + b"\r\nb\r\n" + END, max_received=3).error == R.R554_LOOP


# -- a first line that would continue the server's Received: field ----------------------------------

@pytest.mark.parametrize("data", [
    b" leading-space: continued?\r\nSubject: x\r\n\r\nbody\r\n",
    b"\tfrom evil (authenticated)\r\n\r\nbody\r\n",
    b" \r\n",
    b".. x\r\n"[1:],               # ". x" sent unstuffed: the dot is taken for transparency
    b"\t" + b"x" * 70000 + b"\r\n",  # over the line limit too: whichever comes first
], ids=["space", "tab", "blank", "unstuffed-dot", "long"])
def test_a_message_whose_first_line_begins_with_white_space_is_refused(data):
    """Stored after the trace fields, it would continue the server's Received: field
    (RFC 5322 2.2.3), so a client could write into the server's trace."""
    short = data[:40] if data[:40].endswith(b"\r\n") else data[:40] + b"\r\n"
    for pieces in [[data + END]] + list(splits(short + END, 2)):
        r = Read(pieces)
        assert r.done and r.text == b"", pieces
        assert r.error in (R.R554_FOLDED_START, R.R554_LINE_TOO_LONG), pieces
    assert read(short + END).error == R.R554_FOLDED_START
    assert read(short + END, normalize=True).error == R.R554_FOLDED_START


@pytest.mark.parametrize("data", [
    b"Subject: x\r\n folded\r\n\r\n body starts with a space\r\n",
    b"\r\n body without headers\r\n",   # the blank line ends the (empty) header section
    b".. x\r\n",                        # stuffed: stored as ". x"
    b"x\r\n\t\r\n",
])
def test_white_space_after_the_first_octet_is_stored_as_sent(data):
    assert read(data + END).error is None
    for pieces in splits(data + END, 2):
        assert Read(pieces).error is None, pieces


def test_a_message_too_big_and_folded_at_its_start_gets_552():
    assert read(b" x\r\n" + b"y" * 90 + b"\r\n" + END, max_size=50).error == R.R552_TOO_BIG


# -- memory bound -------------------------------------------------------------------------------------

def test_reader_memory_is_bounded_without_crlf():
    reader = DataReader(100_000_000)
    piece = b"n" * 65536
    for _ in range(20 * 16):  # 20 MiB in 64 KiB reads
        assert reader.feed(piece) == (b"", False, b"")
        assert len(reader._pending) <= 1024
    assert reader.feed(b"\r\n.\r\nNOOP\r\n") == (b"", True, b"NOOP\r\n")
    assert reader.error == R.R554_LINE_TOO_LONG


def test_reader_memory_is_bounded_with_bare_lf_only():
    reader = DataReader(100_000_000)
    piece = b"line\n" * 13000
    for _ in range(100):
        reader.feed(piece)
        assert len(reader._pending) <= 1024
    assert reader.feed(b"\r\n.\r\n")[1]
    assert reader.error is not None


def test_reader_memory_is_bounded_with_many_lines():
    reader = DataReader(100_000_000)
    piece = (b"x" * 62 + b"\r\n") * 1024 + b"partial"
    total = 0
    for _ in range(100):
        text, done, _ = reader.feed(piece)
        total += len(text)
        assert not done and len(reader._pending) <= 1024
    assert reader.feed(b"\r\n.\r\n")[1]
    assert reader.error is None


# -- the fast paths: one scan for CRLF dot, CR deletion and the bare CR/LF test ---------------------


def no_bare_cr_or_lf(block: bytes) -> bool:
    """The obvious way: CRLF pairs cannot overlap, so removing them leaves every bare one."""
    rest = block.replace(b"\r\n", b"")
    return b"\r" not in rest and b"\n" not in rest


@pytest.mark.parametrize("delete_by_replace, rebuild_by_replace", [(24, 8), (1, 1), (10**9, 10**9)],
                         ids=["default", "replace-always", "replace-never"])
def test_bare_cr_lf_test_is_exact_on_every_short_block(monkeypatch, delete_by_replace, rebuild_by_replace):
    # Every block of up to 8 octets over {a, CR, LF}, with both ways to delete and to test.
    monkeypatch.setattr(buffer, "_DELETE_BY_REPLACE", delete_by_replace)
    monkeypatch.setattr(buffer, "_REBUILD_BY_REPLACE", rebuild_by_replace)
    for n in range(9):
        for octets in itertools.product(b"a\r\n", repeat=n):
            block = bytes(octets)
            stuffed = buffer._delete_crs(block)
            assert stuffed == block.replace(b"\r", b""), block
            assert buffer._only_crlf(block, stuffed) == no_bare_cr_or_lf(block), block


def test_dot_walk_finds_what_the_plain_search_finds():
    # Every block of up to 9 octets over {a, ., CR, LF} (more dots than the walk visits
    # one by one, so the hand-over to the plain search is covered too), from its first dot.
    assert buffer._DOT_WALK < 9
    for n in range(1, 10):
        for octets in itertools.product(b"a.\r\n", repeat=n):
            block = bytes(octets)
            first = block.find(b".")
            if first >= 0:
                assert buffer._find_crlf_dot(block, first) == block.find(b"\r\n.", max(first - 2, 0)), block


def test_dot_walk_in_prose_and_in_dotless_text():
    prose = b"One. Two. Three.\r\n" * 40 + b".\r\n"
    assert buffer._find_crlf_dot(prose, prose.find(b".")) == len(prose) - 5
    plain = b"x" * 4000 + b"\r\n.\r\n"
    assert buffer._find_crlf_dot(plain, plain.find(b".")) == 4000
    assert buffer._find_crlf_dot(b"a.b.c.d\r\n", 1) == -1


LONG_LINES = b"".join(b"line %04d " % i + b"x" * 60 + b"\r\n" for i in range(400))  # ~28 KiB


@pytest.mark.parametrize("bare_cr, bare_lf", [(b"a\rb", b"c\nd"), (b"a\r", b"\nd"), (b"\r\r\n", b"x\n")])
def test_one_bare_cr_and_one_bare_lf_far_apart_are_refused(bare_cr, bare_lf):
    # As many CRs as LFs in the block: only where they stand gives the bare ones away.
    half = len(LONG_LINES) // 2
    cut = LONG_LINES.index(b"\r\n", half) + 2
    data = LONG_LINES[:100] + bare_cr + LONG_LINES[100:cut] + bare_lf + LONG_LINES[cut:]
    assert data.count(b"\r") == data.count(b"\n")
    r = read(data + b"\r\n" + END)
    assert r.done and r.error == R.R550_BARE_NEWLINE and r.text == b""
    for at in (50, 101, half, cut + 1, len(data) - 1):
        r = Read([data[:at], data[at:] + b"\r\n" + END])
        assert r.done and r.error == R.R550_BARE_NEWLINE, at
    r = read(data + b"\r\n" + END, normalize=True)
    assert r.error is None and b"\r" not in r.text


def test_short_and_long_line_blocks_agree():
    # Empty lines (counting), ordinary lines (replace) and a mixture give the same text.
    for body in (b"\r\n" * 5000, b"ab\r\n" * 3000, LONG_LINES, LONG_LINES + b"\r\n" * 20000):
        r = read(body + END)
        assert (r.text, r.error, r.reader.size) == (body.replace(b"\r\n", b"\n"), None, len(body))


SOME_LINES = LONG_LINES[:LONG_LINES.index(b"\r\n", 2000) + 2]
DOTTED = (b"Subject: dots. Many.\r\n\r\nNo. 1 ends with a dot.\r\n..stuffed\r\n...\r\n..\r\n"
          b"mid.line.dots\r\n.lone dot dropped\r\n" + SOME_LINES + b"..\r\nlast.\r\n")
DOTTED_TEXT = (b"Subject: dots. Many.\n\nNo. 1 ends with a dot.\n.stuffed\n..\n.\nmid.line.dots\n"
               b"lone dot dropped\n" + SOME_LINES.replace(b"\r\n", b"\n") + b".\nlast.\n")


def test_stuffed_lines_and_the_end_at_every_split():
    data = DOTTED + END + b"QUIT\r\n"
    for pieces in splits(data, 2):
        r = Read(pieces)
        assert (r.text, r.done, r.rest, r.error) == (DOTTED_TEXT, True, b"QUIT\r\n", None), len(pieces[0])
        assert r.reader.size == len(DOTTED) - 5  # five transparency dots


def test_end_right_after_a_stuffed_line_in_each_read():
    # The first CRLF dot in a read is a stuffed line: the end after it must still be found.
    for first in (b"..a\r\n", b"a\r\n..\r\n", b"a.\r\n.b\r\n"):
        r = read(first + END + b"NOOP\r\n")
        assert r.done and r.rest == b"NOOP\r\n" and r.error is None, first
        r = Read([b"x\r\n", first + END + b"NOOP\r\n"])
        assert r.done and r.rest == b"NOOP\r\n" and r.error is None, first


def test_stuffed_line_after_the_end_is_not_unstuffed_text():
    # A stuffed line behind the end belongs to the rest, untouched; the text has no dot line.
    r = read(b"a.b\r\n" + END + b"..x\r\n")
    assert (r.text, r.rest, r.reader.size) == (b"a.b\n", b"..x\r\n", 5)


def test_dot_at_a_read_boundary_after_a_bare_lf_never_ends_data():
    # After a bare LF no line starts: ".\r\n" there, in this read or the next, is text.
    for pieces in ([b"x\n", b".\r\nMAIL\r\n"], [b"x\n.", b"\r\nMAIL\r\n"], [b"x\n.\r", b"\nMAIL\r\n"]):
        r = Read(pieces + [b"\r\n" + END])
        assert r.done and r.done_at == 2 and r.error == R.R550_BARE_NEWLINE, pieces
        r = Read(pieces + [b"\r\n" + END], normalize=True)
        assert r.done_at == 2 and r.text == b"x\n\nMAIL\n\n", pieces


def test_end_marker_split_at_every_offset_after_long_lines():
    # The end after a block of ordinary lines (the replace paths), cut anywhere near it.
    data = LONG_LINES + b"..tail\r\n" + END + b"QUIT\r\n"
    for cut in range(len(data) - 20, len(data)):
        r = Read([data[:cut], data[cut:]])
        assert r.done and r.rest == b"QUIT\r\n" and r.error is None, cut
        assert r.text == LONG_LINES.replace(b"\r\n", b"\n") + b".tail\n", cut


# -- unfinished lines handed on (after the header section) --------------------------------------------

BODY_START = b"Subject: x\r\n\r\n"


def test_an_unfinished_body_line_is_handed_on_not_held():
    reader = DataReader(1000)
    assert reader.feed(BODY_START) == (b"Subject: x\n\n", False, b"")
    assert reader.feed(b"abc\r\nde") == (b"abc\nde", False, b"")
    assert reader._pending == b""
    assert reader.feed(b"f\r\n" + END) == (b"f\n", True, b"")
    assert reader.error is None


def test_header_lines_and_dotted_or_cr_ended_leftovers_are_still_held():
    # A Received: field may be split while headers are counted; a leading dot may start
    # the end marker or a stuffed line; a CR may be half of a CRLF or a bare CR.
    for first, held in ((b"Received: fr", b"Received: fr"), (BODY_START + b"a\r\n.", b"."),
                        (BODY_START + b"a\r\nb\r", b"b\r")):
        reader = DataReader(1000)
        reader.feed(first)
        assert reader._pending == held, first


@pytest.mark.parametrize("octets, ok", [(998, True), (999, False)])
def test_line_length_counts_the_octets_handed_on(octets, ok):
    line = b"y" * octets + b"\r\n"
    for cut in (1, 500, octets - 1, octets):
        r = Read([BODY_START, b"x\r\n" + line[:cut], line[cut:] + END])
        assert r.done and (r.error is None) == ok, cut
    r = Read([BODY_START, b"x\r\n" + line[:300], line[300:600], line[600:] + END])
    assert r.done and (r.error is None) == ok


def test_a_line_handed_on_then_continued_without_a_line_end_is_bounded():
    reader = DataReader(10_000)
    reader.feed(BODY_START)
    reader.feed(b"x\r\n" + b"y" * 600)
    assert reader._pending == b"" and reader._carry == 600
    reader.feed(b"y" * 600)  # no LF yet: 1200 octets in one line
    assert reader.error == R.R554_LINE_TOO_LONG and len(reader._pending) <= 1024
    assert reader.feed(b"\r\n" + END)[1]


def test_a_dot_continuing_a_handed_on_line_is_text():
    # Not a line start: neither a transparency dot nor the end marker.
    r = Read([BODY_START, b"x\r\nabc", b".def\r\n" + END])
    assert (r.text, r.error) == (b"Subject: x\n\nx\nabc.def\n", None)
    r = Read([BODY_START, b"x\r\nabc", b".\r\nmore\r\n" + END + b"QUIT\r\n"])
    assert (r.text, r.rest, r.error) == (b"Subject: x\n\nx\nabc.\nmore\n", b"QUIT\r\n", None)


def test_a_bare_lf_right_after_a_handed_on_line_is_refused():
    r = Read([BODY_START, b"x\r\nabc", b"\ndef\r\n" + END])
    assert r.done and r.error == R.R550_BARE_NEWLINE


def test_handed_on_lines_at_every_split_store_the_same_text():
    body = b"".join(b"%d .x..y\r\n" % n + b".dot\r\n" * (n % 3) for n in range(40))
    # Built apart from the reader: each stuffed ".dot" line loses its dot, CRLF becomes LF.
    expected = b"".join(b"%d .x..y\n" % n + b"dot\n" * (n % 3) for n in range(40))
    expected = b"Subject: x\n\n" + expected
    assert read(BODY_START + body + END).text == expected
    for cut in range(0, len(body) + 1, 7):
        for cut2 in (cut + 1, cut + 33, cut + 200):
            r = Read([BODY_START, body[:cut], body[cut:cut2], body[cut2:] + END])
            assert (r.text, r.error) == (expected, None), (cut, cut2)


def test_long_line_check_with_carried_octets_matches_splitting():
    """_has_long_line against the obvious split, on random LF placements, carries
    (including ones already over the limit) and limits."""
    rng = random.Random(5321)
    for _ in range(20_000):
        n = rng.randint(0, 2500)
        text = bytearray(b"a" * n)
        for _ in range(rng.randint(0, 5)):
            if n:
                text[rng.randrange(n)] = 10
        carry, limit = rng.choice([0, rng.randint(0, 1100)]), rng.choice([998, 7, 1])
        lines = bytes(text).split(b"\n")
        expected = max(carry + len(lines[0]), *map(len, lines)) > limit
        assert _has_long_line(bytes(text), carry, limit) == expected, (n, carry, limit)


def test_received_counting_stops_exactly_at_the_header_scan_limit():
    """The header scan ends once HEADER_SCAN_LIMIT octets were counted: Received: fields
    after exactly that many octets of header are not counted."""
    from forksmtp.smtp.buffer import HEADER_SCAN_LIMIT
    line = b"X-Filler: " + b"f" * 52 + b"\r\n"  # 64 octets: the limit is a whole number of lines
    reader = DataReader(10 * HEADER_SCAN_LIMIT, 3)
    reader.feed(line * (HEADER_SCAN_LIMIT // len(line)))
    assert reader.size == HEADER_SCAN_LIMIT
    reader.feed(b"Received: a\r\n" * 5 + b"\r\nbody\r\n.\r\n")
    assert reader.error is None
    # One line less, and the scan is still on: the same fields are counted, a loop.
    reader = DataReader(10 * HEADER_SCAN_LIMIT, 3)
    reader.feed(line * (HEADER_SCAN_LIMIT // len(line) - 1))
    reader.feed(b"Received: a\r\n" * 5 + b"\r\nbody\r\n.\r\n")
    assert reader.error == R.R554_LOOP
