"""Property tests of the sans-IO core: whatever a client sends, and however TCP splits
it, the session never raises, sends only well-formed replies, never starts DATA without
a recipient, keeps its buffers bounded, and answers the same bytes the same way."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forksmtp.smtp import replies as R
from forksmtp.smtp.buffer import BARE_LF, TOO_LONG, DataReader, LineBuffer
from forksmtp.smtp.session import MAX_LINE, DataEnd, DataStart, Session, SessionConfig
from helpers import HOSTNAME, Client

# No example database: the tests leave no files behind; a failure prints its example.
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

CONFIGS = st.fixed_dictionaries({
    "max_errors": st.sampled_from([1, 3, 10, 50, 50]),
    "max_recipients": st.sampled_from([1, 2, 100]),
    "max_message_size": st.sampled_from([40, 2000, 10_000_000]),
    "max_received_headers": st.sampled_from([2, 100]),
    "local_domains": st.sampled_from([(), ("example.test",)]),
    "normalize_bare_newlines": st.booleans(),
})


REFUSED = R.Reply(554, "5.6.0", "Message refused")


class FuzzClient(Client):
    """A worker that refuses chosen DataStarts with 451 and, when ``uniform``, answers
    every refused message alike: which of several problems a reader names first may
    depend on where the reads fell, that it refuses the message may not."""

    def __init__(self, session: Session, refuse: frozenset[int] = frozenset(), uniform: bool = False):
        super().__init__(session)
        self.refuse, self.uniform, self.starts = refuse, uniform, 0

    def _data_start(self, event: DataStart) -> None:
        self.data_start_reply = R.R451_STORAGE if self.starts in self.refuse else None
        self.starts += 1
        super()._data_start(event)

    def _data_end(self, event: DataEnd) -> None:
        if self.uniform and event.error is not None:
            event = DataEnd(event.envelope, 0, REFUSED)
        super()._data_end(event)

    def feed(self, data: bytes) -> bytes:
        was_closed = self.session.closed
        out = super().feed(data)
        assert not (was_closed and out), "reply sent after the session was closed"
        check_invariants(self.session)
        return out


def make_client(config: dict, **kwargs) -> FuzzClient:
    session = Session(SessionConfig(HOSTNAME, **config))
    session.start()
    c = FuzzClient(session, **kwargs)
    assert c.feed(b"") == b"220 mx.test ESMTP\r\n"
    return c


def check_invariants(s: Session) -> None:
    assert s.errors <= s.config.max_errors
    for line in s.log:
        assert "\r" not in line and "\n" not in line and len(line.splitlines()) <= 1, line
    if s.closed:
        return
    if s.in_data:
        assert s._lines.pending() == 0
        assert len(s._reader._pending) <= 1024
    else:
        assert s._lines.pending() <= MAX_LINE


# -- random bytes -----------------------------------------------------------------------------------

PREFIXES = {
    "new": b"",
    "ehlo": b"EHLO client.test\r\n",
    "data": b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n",
}
NOISY = st.lists(st.one_of(st.binary(max_size=200), st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\r\n.\r\n"]),
                           st.integers(0, 3000).map(lambda n: b"x" * n)), max_size=25)


@FUZZ
@given(config=CONFIGS, start=st.sampled_from(sorted(PREFIXES)), chunks=NOISY)
def test_random_bytes_never_break_the_session(config, start, chunks):
    c = make_client(config)
    c.feed(PREFIXES[start])
    if start == "data" and not c.session.closed:
        c.feed(b"DATA\r\n")
    for chunk in chunks:
        c.feed(chunk)


@FUZZ
@given(config=CONFIGS, data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_random_bytes_in_random_pieces(config, data, cuts):
    c = make_client(config)
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        c.feed(data[a:b])


# -- command lines, valid and not, in rounds split at random points --------------------------------

COMMANDS = [
    "EHLO client.test", "HELO client.test", "EHLO", "ehlo other.test extra", "EHLO bücher.example",
    "MAIL FROM:<a@example.test>", "MAIL FROM:<>", "mail from:<a@example.test> SIZE=30",
    "MAIL FROM:<a@example.test> SIZE=99999999", "MAIL FROM:<jösé@example.test> SMTPUTF8",
    "MAIL FROM:<jösé@example.test>", "MAIL FROM:<a@example.test> BODY=8BITMIME", "MAIL FROM:<a@x.test> FOO=1",
    "MAIL FROM:<a@x.test> SIZE=\u00b2", "MAIL FROM:<a@x.test> SIZE=1 SIZE=1", "MAIL FROM:a@x.test", "MAIL",
    "MAIL FROM:<@a.test:>", 'MAIL FROM:<"a>b"@x.test>',
    "RCPT TO:<b@example.test>", "RCPT TO:<b@example.test>", "RCPT TO:<b@example.test>", "RCPT TO:<c@elsewhere.test>",
    "RCPT TO:<Postmaster>", "RCPT TO:<postmaster@example.test>", "RCPT TO:<>", "RCPT TO:<jösé@example.test>",
    "RCPT TO:<u@[IPv6:::1]>", "RCPT TO:<u@[1.2.3]>", "RCPT TO:<u@x.test> NOTIFY=NEVER", "RCPT",
    "RSET", "RSET x", "NOOP", "NOOP x", "VRFY b", "VRFY", "HELP", "EXPN x", "QUIT x", "AUTH PLAIN AGFsaWNl",
    "STARTTLS", "FOO", "", "DATA x", "NOOP " + "x" * 506, "NOOP " + "x" * 507, "MAIL FROM:<" + "a" * 300 + "@x.test>",
]
RAW_COMMANDS = [b"NOOP\nNOOP", b"EHLO \xff", b"NOOP \x00", b"\r", b"\n", b"NOOP\r", b"RSET\rRSET", b"\xc3\x28"]
BODY_LINES = [
    "Subject: fuzz", "", "..dot", ".x", "...", "Received: from a by b", "received: x", "a\nb", "a\rb", "\n.",
    ".\r", "first\n.\nMAIL FROM:<e@x.test>", "x\r.\r", "y" * 997, "y" * 998, "y" * 999, "." + "z" * 998,
    "w" * 3000, "\r", "\n", "DATAX", "LF-only text\n" * 100,
]


def no_crlf(raw: bytes) -> bytes:
    """A line the generator may use: no CRLF inside, not starting a DATA command."""
    while b"\r\n" in raw:
        raw = raw.replace(b"\r\n", b"")
    return b"X" + raw if raw[:4].lower() == b"data" else raw


COMMAND = st.one_of(st.sampled_from(COMMANDS).map(str.encode), st.sampled_from(RAW_COMMANDS),
                    st.binary(max_size=30).map(no_crlf))
BODY_LINE = st.one_of(st.sampled_from(BODY_LINES).map(str.encode), st.binary(max_size=30).map(no_crlf)).filter(
    lambda line: line != b".")
MAILS = ["MAIL FROM:<a@example.test>", "MAIL FROM:<>", "MAIL FROM:<a@example.test> SIZE=30",
         "MAIL FROM:<jösé@example.test> SMTPUTF8", "mail from:<a@example.test> BODY=8BITMIME",
         "MAIL FROM:<a@x.test> SIZE=\u00b2"]
RCPTS = ["RCPT TO:<b@example.test>", "RCPT TO:<Postmaster>", "RCPT TO:<c@elsewhere.test>",
         "RCPT TO:<jösé@example.test>", "rcpt to:<postmaster@example.test>"]
# Mostly well-formed transactions, so that DATA is reached, with noise in between.
TRANSACTION = st.tuples(st.sampled_from(MAILS), st.lists(st.sampled_from(RCPTS), min_size=1, max_size=3)).map(
    lambda t: [line.encode() for line in (t[0], *t[1])])
ROUND_COMMANDS = st.lists(st.one_of(TRANSACTION, TRANSACTION, st.lists(COMMAND, max_size=3)), max_size=3).map(
    lambda groups: [line for group in groups for line in group])
BODY = st.lists(BODY_LINE, max_size=8)
# (commands, body): with a body the round ends in DATA and the next one starts with the text
ROUND = st.tuples(ROUND_COMMANDS, st.one_of(BODY, BODY, st.none()))
GREETING = st.sampled_from([b"EHLO client.test\r\n"] * 3 + [b"HELO client.test\r\n", b""])


def ends_group(line: bytes) -> bool:
    """A line that ends a pipelining group (RFC 2920 3.1): DATA or BDAT, with an argument
    or not, run or refused.  Bytes behind one in the same read close the session (554),
    so where the reads fall decides its reply: the client waits after it."""
    return line[:4].upper() in (b"DATA", b"BDAT")


def groups(lines: list[bytes]) -> list[list[bytes]]:
    """The lines cut after each one that ends a pipelining group (but the last)."""
    cuts = [number for number, line in enumerate(lines[:-1], 1) if ends_group(line)]
    bounds = [0, *cuts, len(lines)]
    return [lines[a:b] for a, b in zip(bounds, bounds[1:])]


def crlf_lines(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


def client_rounds(greeting: bytes, rounds, quit_last: bool) -> list[bytes]:
    """What a client sends between waits for the server: DATA ends a round, as RFC 2920
    asks, and the message text with its dot starts the next (whatever DATA's reply was);
    so does a DATA-like line among the commands."""
    raws, text = [], [greeting.rstrip(b"\r\n")] if greeting else []
    for commands, body in rounds:
        lines = text + commands + ([b"DATA"] if body is not None else [])
        raws += [crlf_lines(group) for group in groups(lines)]
        text = [*body, b"."] if body is not None else []
    if text or quit_last:
        raws.append(crlf_lines(text + ([b"QUIT"] if quit_last else [])))
    return raws


def run_rounds(config, rounds, refuse, pieces_of) -> FuzzClient:
    c = make_client(config, refuse=refuse, uniform=True)
    out = []
    for number, raw in enumerate(rounds):
        out += [c.feed(piece) for piece in pieces_of(number, raw)]
    c.wire = b"".join(out)
    return c


@FUZZ
@given(config=CONFIGS, greeting=GREETING, rounds=st.lists(ROUND, min_size=1, max_size=6),
       refuse=st.frozensets(st.integers(0, 4)), quit_last=st.booleans(), data=st.data())
def test_command_rounds_any_split_same_replies(config, greeting, rounds, refuse, quit_last, data):
    raws = client_rounds(greeting, rounds, quit_last)
    whole = run_rounds(config, raws, refuse, lambda _, raw: [raw])
    cuts = [data.draw(st.lists(st.integers(0, len(raw)), max_size=6)) for raw in raws]

    def split(number, raw):
        bounds = [0, *sorted(cuts[number]), len(raw)]
        return [raw[a:b] for a, b in zip(bounds, bounds[1:])]

    pieces = run_rounds(config, raws, refuse, split)
    assert pieces.wire == whole.wire
    assert pieces.stored == whole.stored
    assert len(pieces.ends) == len(whole.ends)
    assert whole.session.closed or not quit_last, "QUIT did not close the session"


# -- the DATA reader against a reference model ---------------------------------------------------------

ATOMS = [b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"xyz", b"Received: h\r\n", b"\r\n\r\n", b"x" * 400,
         b"\r\n.", b".\r\n", b"\r\n..\r\n", b"\n.\n", b"\r.\r\n", b"q" * 300 + b"\n",
         *[b"bare LF line\n" * 80] * 2]


def reference(data: bytes, max_size: int, max_received: int, normalize: bool):
    """RFC 5321 DATA, the slow and obvious way: (ended, refused, text, rest)."""
    stream = b"\r\n" + data  # the CRLF of the DATA command starts the first line
    end = stream.find(b"\r\n.\r\n")
    if end < 0:
        return False, None, None, None, None
    wire, rest = stream[2:end + 2], stream[end + 5:]
    stuffed = wire.replace(b"\r\n", b"\n")
    bare = stuffed.count(b"\r") or wire.count(b"\n") != wire.count(b"\r\n")
    if bare and normalize:
        stuffed = stuffed.replace(b"\r", b"\n")  # a bare CR or LF is a line break
    text = (stuffed[1:] if stuffed[:1] == b"." else stuffed).replace(b"\n.", b"\n")
    size = len(wire) - (len(stuffed) - len(text))  # RFC 1870: transparency dots excluded
    head = b"" if text[:1] == b"\n" else text.split(b"\n\n", 1)[0]
    received = (b"\n" + head.lower()).count(b"\nreceived:")
    refused = bool(size > max_size or (bare and not normalize)
                   or max(map(len, text.split(b"\n"))) > 998 or received >= max_received)
    return True, refused, text, rest, size


# Before the body: nothing (all of it is header section), or a header section already
# ended, after which the reader hands unfinished lines on instead of holding them.
HEADS = [b"", b"", b"Subject: x\r\n\r\n", b"\r\n"]


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(head=st.sampled_from(HEADS),
       data=st.lists(st.sampled_from(ATOMS), max_size=40).map(b"".join), ended=st.booleans(),
       max_size=st.sampled_from([30, 300, 10**6]), max_received=st.sampled_from([1, 2, 100]),
       normalize=st.booleans(), cuts=st.lists(st.integers(0, 20000), max_size=12))
def test_data_reader_matches_reference(head, data, ended, max_size, max_received, normalize,
                                       cuts):
    data = head + data
    if ended:
        data += b"\r\n.\r\nNOOP\r\n"
    done, refused, text, rest, size = reference(data, max_size, max_received, normalize)
    reader = DataReader(max_size, max_received, normalize)
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    got, got_done, got_rest = [], False, b""
    for a, b in zip(bounds, bounds[1:]):
        if got_done:
            got_rest += data[a:b]
            continue
        chunk, got_done, got_rest = reader.feed(data[a:b])
        got.append(chunk)
        assert len(reader._pending) <= 1024
    assert got_done == done
    if done:
        assert got_rest == rest
        assert (reader.error is not None) == refused, reader.error
        if not refused:
            assert b"".join(got) == text
            assert reader.size == size


# Bodies of mostly well-formed lines, cut into many reads: the reader hands most unfinished
# lines on (see DataReader.feed), and the lines around each cut must still be checked
# for length, unstuffed and scanned for the end exactly as the reference does.
LINE = st.tuples(
    st.sampled_from([b""] * 6 + [b".", b"..", b".x", b"x."]),
    st.integers(0, 1010),
    st.sampled_from([b"\r\n"] * 60 + [b"\n", b"\r", b""]))


def _line(parts) -> bytes:
    lead, length, ending = parts
    return lead + (b"y" * length)[:max(length - len(lead), 0)] + ending


@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(head=st.sampled_from(HEADS[2:]), lines=st.lists(LINE.map(_line), max_size=30),
       ended=st.booleans(), cuts=st.lists(st.integers(0, 40000), max_size=40))
def test_data_reader_hands_on_unfinished_lines_like_the_reference(head, lines, ended, cuts):
    test_data_reader_matches_reference.hypothesis.inner_test(
        head, b"".join(lines), ended, 10**6, 100, False, cuts)


# -- the command line buffer against a reference model ---------------------------------------------

LINE_ATOMS = [b"\r\n", b"\r", b"\n", b"a", b"NOOP", b"x" * 100, b"y" * 509, b"z" * 510, b"w" * 511]


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.sampled_from(LINE_ATOMS), max_size=30).map(b"".join),
       cuts=st.lists(st.integers(0, 20000), max_size=10))
def test_line_buffer_matches_reference(data, cuts):
    # A line ends at its CRLF, and is reported at its first bare LF if it has one (its
    # rest dropped).  The limit counts the line up to that LF, the LF included.
    expected: list = []
    *lines, unfinished = data.split(b"\r\n")
    if b"\n" in unfinished:  # reported at its bare LF, before its CRLF comes
        lines.append(unfinished)
    for line in lines:
        first = line.find(b"\n")
        seen = line if first < 0 else line[:first + 1]
        expected.append(TOO_LONG if len(seen) + (2 if first < 0 else 0) > 512
                        else line if first < 0 else BARE_LF)
    buf = LineBuffer(512)
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    got = []
    for a, b in zip(bounds, bounds[1:]):
        buf.feed(data[a:b])
        while (line := buf.next_line()) is not None:
            got.append(line)
        assert buf.pending() <= 512
    assert got == expected
