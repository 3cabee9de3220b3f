"""The SMTP session core, rule by rule: client lines in, exact reply codes out.

Each table row is a transcript as RFC 5321 writes them; ``helpers.transcript`` also
checks every reply's form and its enhanced status code (RFC 2034/3463) as it goes.
"""

from __future__ import annotations

import pytest

from forksmtp.smtp import replies as R
from forksmtp.smtp.session import (NEED_DATA, PAUSED, DataChunk, DataEnd, DataStart, Session, SessionConfig,
                                   StartTLS)
from forksmtp.smtp.session import MAX_LINE, MAX_SURPLUS_RECIPIENTS
from forksmtp.smtp.sessionlog import loggable
from forksmtp.smtp.sessionlog import FREE_LINES
from helpers import (HOSTNAME, codes, data_ends, events, feed, feed_codes, heads, new_session,
                     refuse_data_start, replies, stored, transcript)

E = "EHLO client.test"
H = "HELO client.test"
M = "MAIL FROM:<alice@example.test>"
RC = "RCPT TO:<bob@example.test>"
D = "DATA"
BODY = ["Subject: test", "", "hello", "."]
OK3 = [250, 250, 250]  # EHLO, MAIL, RCPT
MSG = [354, 250]  # DATA, then the verdict after the final dot


def ids(table):
    return [row[0] for row in table]


# -- greeting and EHLO/HELO ----------------------------------------------------------------

def test_greeting_is_220_hostname_esmtp():
    s = Session(SessionConfig("mx.example.test"))
    s.start()
    assert s.data_to_send() == b"220 mx.example.test ESMTP\r\n"


def test_ehlo_advertises_the_contract_keywords():
    s = new_session(max_message_size=12345)
    assert feed(s, b"EHLO client.test\r\n") == (
        b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 12345\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")


def test_helo_answers_plain_250():
    s = new_session()
    assert feed(s, b"HELO client.test\r\n") == b"250 mx.test\r\n"


def test_helo_name_is_the_first_word():
    s = new_session()
    transcript(s, ["EHLO client.test extra words"])
    assert s.helo_name == "client.test"


def test_protocol_keyword_for_the_received_header():
    s = new_session()
    transcript(s, [H])
    assert s.protocol == "SMTP"
    transcript(s, [E])
    assert s.protocol == "ESMTP"
    transcript(s, ["MAIL FROM:<a@example.test> SMTPUTF8"])
    assert s.protocol == "UTF8SMTP"


# -- RFC 5321 4.1.4 order ------------------------------------------------------------------------

ORDER = [
    ("mail-before-ehlo", [M], [503]),
    ("rcpt-before-ehlo", [RC], [503]),
    ("data-before-ehlo", [D], [503]),
    ("rcpt-before-mail", [E, RC], [250, 503]),
    ("data-before-mail", [E, D], [250, 503]),
    ("data-without-rcpt", [E, M, D], [250, 250, 503]),
    ("data-after-refused-rcpt", [E, M, "RCPT TO:<>", D], [250, 250, 501, 503]),
    ("mail-twice", [E, M, M], [250, 250, 503]),
    ("mail-twice-other-sender", [E, M, "MAIL FROM:<>"], [250, 250, 503]),
    ("mail-after-rcpt", [E, M, RC, M], OK3 + [503]),
    ("order-before-syntax", [E, M, "MAIL nonsense"], [250, 250, 503]),
    ("happy-path", [E, M, RC, D, *BODY, "QUIT"], OK3 + MSG + [221]),
    ("helo-happy-path", [H, M, RC, D, *BODY], OK3 + MSG),
    ("lower-case-verbs", ["ehlo x", "mail from:<a@b.test>", "rcpt to:<c@d.test>", "data", "x", ".",
                          "quit"], OK3 + MSG + [221]),
    ("two-recipients", [E, M, RC, "RCPT TO:<carol@example.test>", D, *BODY], OK3 + [250] + MSG),
    ("second-transaction", [E, M, RC, D, *BODY, M, RC, D, *BODY], OK3 + MSG + [250, 250] + MSG),
    ("message-ends-transaction", [E, M, RC, D, *BODY, RC], OK3 + MSG + [503]),
    ("message-ends-transaction-data", [E, M, RC, D, *BODY, D], OK3 + MSG + [503]),
    ("rset-clears-rcpt", [E, M, RC, "RSET", RC], OK3 + [250, 503]),
    ("rset-clears-data", [E, M, RC, "RSET", D], OK3 + [250, 503]),
    ("rset-allows-new-mail", [E, M, "RSET", M], [250, 250, 250, 250]),
    ("rset-keeps-helo", [E, "RSET", M], [250, 250, 250]),
    ("rset-before-helo-is-no-helo", ["RSET", M], [250, 503]),
    ("ehlo-clears-rcpt", [E, M, RC, E, RC], OK3 + [250, 503]),
    ("ehlo-clears-data", [E, M, RC, E, D], OK3 + [250, 503]),
    ("ehlo-allows-new-mail", [E, M, E, M], [250, 250, 250, 250]),
    ("helo-clears-transaction", [E, M, RC, H, D], OK3 + [250, 503]),
    ("failed-ehlo-is-no-greeting", ["EHLO", M], [501, 503]),
    ("failed-ehlo-keeps-transaction", [E, M, "EHLO", RC, D], [250, 250, 501, 250, 354]),
    ("errors-keep-transaction", [E, M, "FOO", "RCPT TO:<>", RC, D], [250, 250, 500, 501, 250, 354]),
    ("rejected-rset-keeps-transaction", [E, M, RC, "RSET now", D], OK3 + [501, 354]),
    ("any-phase-commands-before-helo", ["NOOP", "VRFY bob", "HELP", "EXPN list"], [250, 252, 214, 502]),
    ("any-phase-commands-in-transaction", [E, M, "NOOP", "VRFY bob", "HELP", RC, "NOOP", "HELP", D],
     [250, 250, 250, 252, 214, 250, 250, 214, 354]),
]


@pytest.mark.parametrize("name, lines, expected", ORDER, ids=ids(ORDER))
def test_order(name, lines, expected):
    assert transcript(new_session(), lines) == expected


# -- syntax and commands: 500 / 501 / 502 -----------------------------------------------------------

AFTER_EHLO = [
    # unknown -> 500
    ("unknown", "FOO", 500),
    ("empty-line", "", 500),
    ("leading-space", " NOOP", 500),
    ("verb-run-together", "MAILFROM:<a@example.test>", 500),
    ("verb-with-suffix", "NOOPX", 500),
    ("tab-before-the-verb", "\tNOOP", 500),
    # Any run of blanks separates the verb from its argument, as one space does (as in
    # Postfix, which splits a command on any blank).
    ("tab-separator", "NOOP\tx", 250),
    ("blanks-separator", "NOOP \t x", 250),
    ("mail-two-spaces", "MAIL  FROM:<a@example.test>", 250),
    ("mail-tab-after-verb", "MAIL\tFROM:<a@example.test>", 250),
    ("mail-tab-after-colon", "MAIL FROM:\t<a@example.test>", 250),
    ("mail-tab-before-parameter", "MAIL FROM:<a@example.test>\tSIZE=10", 250),
    ("mail-blanks-between-parameters", "MAIL FROM:<a@example.test> SIZE=10 \tBODY=8BITMIME", 250),
    ("ehlo-tab", "EHLO\tclient.test", 250),
    ("ehlo-two-spaces", "EHLO  client.test", 250),
    ("vrfy-tab", "VRFY\tbob", 252),
    ("rset-tab-parameter", "RSET\tnow", 501),
    ("quit-tab-parameter", "QUIT \tnow", 501),
    # known but not offered -> 502
    ("expn", "EXPN staff", 502),
    ("expn-bare", "EXPN", 502),
    ("starttls-not-offered", "STARTTLS", 502),
    ("auth-not-offered", "AUTH PLAIN", 502),
    ("bdat-not-offered", "BDAT 10 LAST", 502),
    ("etrn", "ETRN example.test", 502),
    ("turn", "TURN", 502),
    # the always-available ones
    ("noop", "NOOP", 250),
    ("noop-with-argument", "NOOP anything at all", 250),
    ("noop-mixed-case", "nOoP", 250),
    ("vrfy", "VRFY bob", 252),
    ("vrfy-path", "vrfy <bob@example.test>", 252),
    ("vrfy-without-argument", "VRFY", 501),
    ("help", "HELP", 214),
    ("help-with-topic", "HELP MAIL", 214),
    ("rset", "RSET", 250),
    # parameters where none are allowed -> 501
    ("rset-with-parameter", "RSET now", 501),
    ("quit-with-parameter", "QUIT now", 501),
    # EHLO/HELO syntax
    ("ehlo-without-name", "EHLO", 501),
    ("ehlo-only-spaces", "EHLO    ", 501),
    ("helo-without-name", "HELO", 501),
    ("ehlo-control-character", "EHLO a\x01b", 501),
    ("ehlo-utf8-name", "EHLO bücher.example", 250),
    ("ehlo-address-literal", "EHLO [192.0.2.1]", 250),
    # MAIL syntax (the path grammar itself is in test_commands.py)
    ("mail-no-argument", "MAIL", 501),
    ("mail-no-colon", "MAIL FROM", 501),
    ("mail-empty-path", "MAIL FROM:", 501),
    ("mail-to", "MAIL TO:<a@example.test>", 501),
    ("mail-without-brackets", "MAIL FROM:a@example.test", 501),
    ("mail-unclosed-bracket", "MAIL FROM:<a@example.test", 501),
    ("mail-junk-after-path", "MAIL FROM:<a@example.test>junk", 501),
    ("mail-space-after-colon", "MAIL FROM: <a@example.test>", 250),
    ("mail-null-path", "MAIL FROM:<>", 250),
    # A sender without a domain, as Postfix takes it (README, "Decisions"); a recipient
    # needs one (IN_TRANSACTION).
    ("mail-no-domain", "MAIL FROM:<a>", 250),
    ("mail-no-domain-quoted", 'MAIL FROM:<"a b">', 250),
    ("mail-no-domain-at", "MAIL FROM:<a@>", 501),
    # verbs are ASCII: str.upper() would turn these letters into the verb's
    ("verb-dotless-i", "MA\u0131L FROM:<a@example.test>", 500),
    ("verb-long-s", "r\u017fet", 500),
    ("verb-dotless-i-quit", "QU\u0131T", 500),
]


@pytest.mark.parametrize("name, line, code", AFTER_EHLO, ids=ids(AFTER_EHLO))
def test_command_after_ehlo(name, line, code):
    s = new_session()
    assert transcript(s, [E, line]) == [250, code]
    assert not s.closed
    assert transcript(s, ["NOOP"]) == [250]  # the session goes on


IN_TRANSACTION = [
    ("rcpt-no-argument", "RCPT", 501),
    ("rcpt-no-colon", "RCPT TO", 501),
    ("rcpt-empty-path", "RCPT TO:", 501),
    ("rcpt-from", "RCPT FROM:<b@example.test>", 501),
    ("rcpt-null-path", "RCPT TO:<>", 501),
    ("rcpt-without-brackets", "RCPT TO:b@example.test", 501),
    ("rcpt-no-domain", "RCPT TO:<b>", 501),
    ("rcpt-space-after-colon", "RCPT TO: <b@example.test>", 250),
    ("rcpt-mixed-case", "rCpT tO:<b@example.test>", 250),
    ("rcpt-trailing-space", "RCPT TO:<b@example.test> ", 250),
    # Trailing blanks mean nothing, whatever their number or kind (as in Postfix).
    ("rcpt-trailing-spaces", "RCPT TO:<b@example.test>   ", 250),
    ("rcpt-trailing-tab", "RCPT TO:<b@example.test>\t", 250),
    ("rset-trailing-spaces", "RSET  ", 250),
    ("rset-trailing-tab", "RSET\t", 250),
    ("noop-trailing-tab", "NOOP \t", 250),
    ("rcpt-tab-after-verb", "RCPT\tTO:<b@example.test>", 250),
    ("rcpt-blanks-after-colon", "RCPT  TO: \t<b@example.test>", 250),
    ("rcpt-junk-after-path", "RCPT TO:<b@example.test>junk", 501),  # as for MAIL
    ("rcpt-parameter", "RCPT TO:<b@example.test> NOTIFY=NEVER", 555),  # no DSN offered
]


PATH_ERRORS = [  # RFC 3463: X.1.7 for the sender's address, X.1.3 for a recipient's
    ("mail-bad-syntax", [E, "MAIL FROM:<bad"], "501 5.1.7"),
    ("mail-path-too-long", [E, f"MAIL FROM:<{'a' * 250}@example.test>"], "501 5.1.7"),
    ("mail-junk-after-path", [E, "MAIL FROM:<a@example.test>x"], "501 5.1.7"),
    ("rcpt-bad-syntax", [E, M, "RCPT TO:<bad"], "501 5.1.3"),
    ("rcpt-path-too-long", [E, M, f"RCPT TO:<{'a' * 250}@example.test>"], "501 5.1.3"),
    ("rcpt-junk-after-path", [E, M, "RCPT TO:<b@example.test>x"], "501 5.1.3"),
]


@pytest.mark.parametrize("name, lines, head", PATH_ERRORS, ids=ids(PATH_ERRORS))
def test_path_errors_name_the_sender_or_the_recipient(name, lines, head):
    s = new_session()
    transcript(s, lines[:-1])
    assert heads(feed(s, lines[-1].encode() + b"\r\n")) == [head]


@pytest.mark.parametrize("name, line, code", IN_TRANSACTION, ids=ids(IN_TRANSACTION))
def test_command_in_transaction(name, line, code):
    assert transcript(new_session(), [E, M, line]) == [250, 250, code]


def test_data_and_quit_with_trailing_blanks_are_data_and_quit():
    s = new_session()
    assert transcript(s, [E, M, RC, "DATA  \t"]) == OK3 + [354]
    s = new_session()
    assert transcript(s, [E, "QUIT\t "]) == [250, 221] and s.closed
    s = new_session()  # blanks before a parameter separate it, as a space does
    assert transcript(s, [E, M, RC, "DATA\tnow", "DATA"]) == OK3 + [501, 354]


def test_data_with_parameter_is_501_and_transaction_survives():
    s = new_session()
    assert transcript(s, [E, M, RC, "DATA now", D]) == OK3 + [501, 354]


def test_quit_with_parameter_is_501_and_session_stays_open():
    s = new_session()
    assert transcript(s, [E, "QUIT now"]) == [250, 501]
    assert not s.closed
    assert transcript(s, ["QUIT"]) == [221]


def test_quit_closes_and_later_input_is_ignored():
    s = new_session()
    assert replies(s, [E, M, "QUIT"]) == ["250", "250 2.1.0", "221 2.0.0"]
    assert s.closed
    assert feed(s, b"NOOP\r\nRSET\r\n") == b""
    assert transcript(s, ["NOOP"]) == []


def test_quit_before_helo_has_no_enhanced_code():
    s = new_session()
    assert feed(s, b"QUIT\r\n") == b"221 Bye\r\n"
    assert s.closed


def test_close_with_timeout_reply():
    s = new_session()
    transcript(s, [E])
    s.close(R.R421_TIMEOUT)
    assert heads(s.data_to_send()) == ["421 4.4.2"]
    assert s.closed
    assert feed(s, b"NOOP\r\n") == b""


# -- bare CR / LF, NUL and invalid UTF-8 inside a command line ------------------------------------

BAD_BYTES = [
    ("bare-cr-inside", b"NOOP\rNOOP\r\n"),
    ("cr-before-crlf", b"NOOP \r\r\n"),
    ("nul", b"NOOP \x00\r\n"),
    ("invalid-utf8-byte", b"NOOP \xff\r\n"),
    ("truncated-utf8", b"EHLO \xc3\r\n"),
    ("invalid-continuation", b"EHLO \xc3\x28\r\n"),
    ("overlong-utf8", b"EHLO \xc0\xaf\r\n"),
    ("utf8-surrogate", b"MAIL FROM:<\xed\xa0\x80@example.test>\r\n"),
    ("latin1-in-verb", b"N\xd6OP\r\n"),
]


@pytest.mark.parametrize("name, raw", BAD_BYTES, ids=ids(BAD_BYTES))
def test_bad_bytes_in_command_line_are_501(name, raw):
    s = new_session()
    assert transcript(s, [E]) == [250]
    assert heads(feed(s, raw)) == ["501 5.5.2"]
    assert feed_codes(s, b"NOOP\r\n") == [250]


@pytest.mark.parametrize("name, raw", BAD_BYTES, ids=ids(BAD_BYTES))
def test_bad_bytes_before_helo_are_501_without_enhanced_code(name, raw):
    s = new_session()
    assert heads(feed(s, raw)) == ["501"]


def test_a_line_with_a_bare_lf_is_answered_at_once_and_not_run():
    # Only CRLF ends a command (RFC 5321 2.3.8), and an LF is known to be bare as soon as
    # it comes: a client typing with LF line ends hears so then, not at the timeout.
    s = new_session()
    wire = feed(s, b"NOOP\n")
    assert wire == b"501 Syntax error: bare LF in command line; end each line with CRLF\r\n"
    assert feed(s, b"NOOP\n") == b""  # the same line still: one reply a line
    assert feed_codes(s, b"\r\n") == []
    assert transcript(s, [E]) == [250]
    assert heads(feed(s, b"QUIT\n")) == ["501 5.5.2"] and not s.closed
    assert feed_codes(s, b"\r\nNOOP\r\n") == [250]
    assert s.log[1:3] == ["<command line with a bare LF>",
                          "501 5.5.2 Syntax error: bare LF in command line; end each line with CRLF"]


@pytest.mark.parametrize("raw, codes", [
    (b"NOOP\nNOOP\r\n", [501]),
    (b"\nNOOP\r\nNOOP\r\n", [501, 250]),
    (b"\n\n\n\r\n", [501]),
    (b"RSET\r\nNOOP \r\n\nNOOP\r\n", [250, 250, 501]),
    # What follows a bare LF never runs: not the second RCPT, so DATA has no recipient.
    (b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\nRCPT TO:<evil@example.test>\r\nDATA\r\n",
     [250, 501, 503]),
], ids=repr)
def test_one_reply_for_each_line_and_nothing_after_a_bare_lf_runs(raw, codes):
    s = new_session()
    assert transcript(s, [E]) == [250]
    assert feed_codes(s, raw) == codes
    assert not [e for e in events(s) if isinstance(e, DataStart)]


@pytest.mark.parametrize("verb", [b"QUIT", b"RSET", b"EHLO x", b"HELO x", b"DATA"])
def test_a_command_with_a_bare_lf_changes_nothing(verb):
    s = new_session()
    assert transcript(s, [E, M, RC]) == [250, 250, 250]
    assert feed_codes(s, verb + b"\n") == [501]
    assert not s.closed and not s.in_data and s.envelope is not None
    assert feed_codes(s, b"\r\n") == []
    assert transcript(s, [D, "Subject: x", "", "body", "."]) == [354, 250]


@pytest.mark.parametrize("raw", [b"DATA\nSubject: x\r\n", b"DATA \nx", b"bdat\n\r\n"], ids=repr)
def test_a_data_with_a_bare_lf_and_text_behind_it_closes_the_session(raw):
    # The text would otherwise run as commands, as behind any refused DATA (RFC 2920).
    s = new_session()
    assert transcript(s, [E, M, RC]) == [250, 250, 250]
    assert heads(feed(s, raw)) == ["554 5.5.0"] and s.closed
    assert not [e for e in events(s) if isinstance(e, DataStart)]


def test_bare_lfs_spend_the_error_budget():
    s = new_session(max_errors=3)
    assert feed_codes(s, b"NOOP\n\r\n" * 5) == [501, 501, 501, 421]
    assert s.closed


def test_crlf_split_between_reads_ends_the_line():
    s = new_session()
    assert feed(s, b"NOOP\r") == b""
    assert feed_codes(s, b"\n") == [250]


# -- command line length: 512 octets including CRLF ------------------------------------------------

def test_command_line_of_512_octets_is_accepted():
    line = "NOOP " + "x" * (510 - 5)
    assert len(line) + 2 == 512
    assert transcript(new_session(), [E, line]) == [250, 250]


def test_command_line_of_513_octets_is_500_and_session_goes_on():
    line = "NOOP " + "x" * (511 - 5)
    s = new_session()
    assert replies(s, [E, line]) == ["250", "500 5.5.2"]
    assert not s.closed
    assert transcript(s, [M, RC, D, *BODY]) == [250, 250] + MSG


def test_a_mail_line_may_run_over_the_limit_by_what_size_and_smtputf8_add():
    """RFC 1870 6 and RFC 6531 3.4: SIZE= lengthens the MAIL line by up to 26 octets and
    SMTPUTF8 by 10; the rest of the line keeps the 512 limit, and other commands too."""
    core = "MAIL FROM:<alice@example.test>"
    core += " " * (510 - len(core))  # 512 octets with the CRLF
    size = " SIZE=" + "0" * 16 + "1000"  # 26 octets
    s = new_session()
    assert transcript(s, [E, core + size + " SMTPUTF8", "RSET"]) == [250, 250, 250]
    assert transcript(s, [core + size + "0", core + "x" + size]) == [500, 500]
    assert transcript(s, [core + " SMTPUTF8 SMTPUTF8"]) == [500]  # counted once
    assert transcript(s, ["NOOP" + " " * (len(core) - 4) + size]) == [500]
    assert transcript(s, [M, RC, D, *BODY]) == [250, 250] + MSG


def test_parameter_words_inside_a_quoted_local_part_lengthen_nothing():
    """The allowance is for the parameters after the path: a quoted local part may hold
    spaces and words that look like them."""
    core = 'MAIL FROM:<"a SIZE=' + "0" * 20 + ' SMTPUTF8 b"@example.test>'
    core += " " * (510 - len(core))
    s = new_session()
    assert transcript(s, [E, core + " x"]) == [250, 500]
    assert transcript(s, [core, "RSET"]) == [250, 250]  # 512 octets: taken


def test_an_auth_line_over_512_octets_is_500_where_auth_is_not_configured():
    """Only with [auth] may an AUTH line be longer (RFC 4954 4); without, AUTH is a
    command like any other here, and the buffer now reads MAIL lines of 548 octets."""
    s = new_session()
    assert transcript(s, [E, "AUTH PLAIN " + "A" * 514, "AUTH PLAIN " + "A" * 499]) == [250, 500, 502]


def test_long_ehlo_before_helo_is_500():
    s = new_session()
    assert transcript(s, ["EHLO " + "a" * 600, E]) == [500, 250]


def test_long_mail_line_keeps_transaction_state():
    s = new_session()
    long_mail = "MAIL FROM:<" + "a" * 600 + "@example.test>"
    assert transcript(s, [E, long_mail, M]) == [250, 500, 250]


def test_huge_line_in_pieces_gives_one_500():
    s = new_session()
    transcript(s, [E])
    for _ in range(200):
        assert feed(s, b"y" * 1000) == b""
        assert s._lines.pending() <= MAX_LINE
    assert feed_codes(s, b"\r\nNOOP\r\n") == [500, 250]


def test_long_line_with_crlf_split_across_reads():
    s = new_session()
    transcript(s, [E])
    assert feed(s, b"z" * 700 + b"\r") == b""
    assert feed_codes(s, b"\nNOOP\r\n") == [500, 250]


def test_command_buffer_stays_bounded_without_crlf():
    s = new_session()
    piece = b"q" * 65536
    for _ in range(20 * 16):  # 20 MiB
        assert feed(s, piece) == b""
        assert s._lines.pending() <= 1024
    assert feed_codes(s, b"\r\n") == [500]


# -- RFC 2920 pipelining ----------------------------------------------------------------------------

def test_pipelined_group_gets_all_replies_in_order_in_one_write():
    s = new_session()
    out = feed(s, b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
                  b"RCPT TO:<>\r\nRCPT TO:<c@example.test>\r\nNOOP\r\nDATA\r\n")
    assert codes(out) == [250, 250, 250, 501, 250, 250, 354]


def test_pipelined_errors_are_answered_in_place():
    s = new_session()
    out = feed(s, b"EHLO c\r\nFOO\r\nRCPT TO:<b@example.test>\r\nMAIL FROM:<a@example.test>\r\n"
                  b"MAIL FROM:<a@example.test>\r\nVRFY x\r\nQUIT\r\nNOOP\r\n")
    assert heads(out) == ["250", "500 5.5.2", "503 5.5.1", "250 2.1.0", "503 5.5.1",
                          "252 2.5.0", "221 2.0.0"]
    assert s.closed


def test_pipelined_group_split_at_every_offset_gives_the_same_replies():
    data = (b"EHLO c\r\nMAIL FROM:<a@example.test> SIZE=10\r\nRCPT TO:<b@example.test>\r\n"
            b"FOO\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
    whole = feed(new_session(), data)
    assert heads(whole) == ["250", "250 2.1.0", "250 2.1.5", "500 5.5.2", "250 2.1.5", "354"]
    for cut in range(1, len(data)):
        s = new_session()
        assert feed(s, data[:cut]) + feed(s, data[cut:]) == whole, cut


def test_bytes_pipelined_behind_data_are_554_and_close():
    s = new_session()
    transcript(s, [E, M, RC])
    out = feed(s, b"DATA\r\nSubject: pipelined\r\n\r\nbody\r\n.\r\n")
    assert heads(out) == ["554 5.5.0"]
    assert s.closed
    assert not [e for e in events(s) if isinstance(e, DataStart)]
    assert feed(s, b"NOOP\r\n") == b""


def test_a_closing_reply_that_spends_the_error_budget_is_the_only_one():
    """The 554 for bytes behind DATA closes the session; that it is also the last error
    the budget allows must not add a 421 behind it."""
    s = new_session(max_errors=10)
    transcript(s, [E] + ["FOO"] * 8 + [M, RC])
    out = feed(s, b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert heads(out) == ["554 5.5.0"] and s.closed and s.errors == 9
    s = new_session(max_errors=10)
    transcript(s, [E] + ["FOO"] * 9 + [M, RC])
    out = feed(s, b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert heads(out) == ["554 5.5.0"] and s.closed and s.close_reply.code == 554


@pytest.mark.parametrize("behind", [b"\r\n", b"Q", b"QUIT\r\n", b"RSET\r\nNOOP\r\n"])
def test_anything_behind_data_is_a_sync_error(behind):
    s = new_session()
    out = feed(s, b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n" + behind)
    assert heads(out) == ["250", "250 2.1.0", "250 2.1.5", "554 5.5.0"]
    assert s.closed


def test_a_bdat_chunk_never_runs_as_commands():
    """BDAT is not offered (no CHUNKING); its chunk follows it at once.  Behind a 502 it
    would run as commands: bytes behind BDAT close the session, as behind DATA."""
    s = new_session()
    out = feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 80 LAST\r\n"
                  b"RSET\r\nMAIL FROM:<ceo@bank.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert heads(out) == ["250", "250 2.1.0", "250 2.1.5", "554 5.5.0"] and s.closed
    s = new_session()  # BDAT alone, the client waiting: the usual 502, and on
    assert feed_codes(s, b"EHLO c\r\nBDAT 80 LAST\r\n") == [250, 502]
    assert feed_codes(s, b"NOOP\r\n") == [250]


@pytest.mark.parametrize("data", [
    b"DATA\x00\r\n", b"DATA \xff\r\n", b"DATA\rx\r\n", b"data\r\r\n", b"BDAT 10\x00\r\n",
    b"DATA" + b" " * 520 + b"\r\n",   # over 512 octets, within the buffer's limit
    b"DATA" + b" " * 700 + b"\r\n",   # over the buffer's limit too
], ids=["NUL", "not UTF-8", "CR", "CR CR LF", "BDAT NUL", "long", "over the buffer"])
def test_bytes_behind_a_malformed_data_are_a_sync_error_too(data):
    """A DATA refused for its form (501, 500) ends its group as any refused DATA does:
    the text behind it ran as commands, a MAIL FROM and RCPT of the text's choosing
    stored as a message of their own."""
    s = new_session(local_domains=("example.test",))
    smuggled = b"RSET\r\nMAIL FROM:<ceo@bank.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nforged\r\n.\r\n"
    out = feed(s, b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n" + data + smuggled)
    assert heads(out) == ["250", "250 2.1.0", "250 2.1.5", "554 5.5.0"] and s.closed
    assert not [e for e in events(s) if isinstance(e, DataStart)]


@pytest.mark.parametrize("line", [b"DATA\x00", b"DATA" + b" " * 520, b"DATAX", b"DATABASE x"], ids=repr)
def test_a_malformed_data_waited_for_gets_its_reply_and_the_session_goes_on(line):
    s = new_session()
    assert feed_codes(s, b"EHLO c\r\n" + line + b"\r\n")[1] in (500, 501)
    assert not s.closed and feed_codes(s, b"NOOP\r\n") == [250]


def test_data_waited_for_may_fail_and_the_session_goes_on():
    s = new_session()
    assert feed_codes(s, b"EHLO c\r\nDATA\r\n") == [250, 503]
    assert feed_codes(s, b"NOOP\r\n") == [250]


@pytest.mark.parametrize("data", [b"DATA\r\n", b"DATA x\r\n"])
@pytest.mark.parametrize("before", [b"", b"MAIL FROM:<a@example.test>\r\n",
                                    b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@elsewhere.test>\r\n"],
                         ids=["no MAIL", "no RCPT", "no valid RCPT"])
def test_bytes_behind_a_refused_data_are_a_sync_error_too(before, data):
    """RFC 2920 3.1: DATA ends its group whether it succeeds or fails.  Otherwise the text
    a client sent behind a refused DATA runs as commands: here a message with a sender
    of the text's choosing."""
    s = new_session(local_domains=("example.test",))
    smuggled = b"RSET\r\nMAIL FROM:<ceo@bank.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nforged\r\n.\r\n"
    out = feed(s, b"EHLO c\r\n" + before + data + smuggled)
    assert heads(out)[-1] == "554 5.5.0" and s.closed
    assert "250 2.1.0" not in heads(out)[1 + before.count(b"\r\n"):]  # the smuggled MAIL never ran
    assert not [e for e in events(s) if isinstance(e, DataStart)]


def test_nothing_is_sent_before_datastart_is_answered():
    s = new_session()
    transcript(s, [E, M, RC])
    s.receive_data(b"DATA\r\n")
    event = s.next_event()
    assert isinstance(event, DataStart)
    assert event.envelope.recipients == ["bob@example.test"]
    assert s.next_event() is PAUSED
    assert s.data_to_send() == b""
    s.accept_data()
    assert s.data_to_send() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert s.in_data


def test_commands_after_the_final_dot_wait_for_the_verdict():
    s = new_session()
    transcript(s, [E, M, RC, D])
    s.receive_data(b"hello\r\n.\r\nMAIL FROM:<x@example.test>\r\nRCPT TO:<y@example.test>\r\nNOOP\r\n")
    assert s.next_event() == DataChunk(b"hello\n")
    end = s.next_event()
    assert isinstance(end, DataEnd) and end.error is None and end.size == 7
    assert s.next_event() is PAUSED
    assert s.data_to_send() == b""  # nothing may overtake the verdict
    s.reply(R.R250_ACCEPTED)
    assert s.next_event() is NEED_DATA
    assert heads(s.data_to_send()) == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "250 2.0.0"]


def test_next_transaction_pipelined_after_the_dot():
    s = new_session()
    transcript(s, [E, M, RC, D])
    out = feed(s, b"one\r\n.\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert codes(out) == [250, 250, 250, 354]
    assert codes(feed(s, b"two\r\n.\r\nQUIT\r\n")) == [250, 221]
    assert stored(s) == [b"one\n", b"two\n"]


# -- DATA: the session side (the reader itself is in test_buffer.py) ------------------------------

def test_message_is_stored_with_lf_and_dots_undone():
    s = new_session()
    lines = ["Subject: dots", "", "..leading", "..", "...", "a.b", ".x", "end"]
    assert transcript(s, [E, M, RC, D, *lines, "."]) == OK3 + MSG
    assert stored(s) == [b"Subject: dots\n\n.leading\n.\n..\na.b\nx\nend\n"]


def test_leading_dot_on_first_line_is_unstuffed():
    s = new_session()
    transcript(s, [E, M, RC, D, "..first", "."])
    assert stored(s) == [b".first\n"]


def test_empty_message():
    s = new_session()
    assert transcript(s, [E, M, RC, D, "."]) == OK3 + MSG
    assert stored(s) == [b""]
    assert data_ends(s)[0].size == 0


def test_data_end_carries_envelope_and_size():
    s = new_session()
    transcript(s, [E, "MAIL FROM:<> BODY=8BITMIME", RC, "RCPT TO:<Postmaster>", D, "abc", "."])
    end = data_ends(s)[0]
    assert end.envelope.sender.is_null
    assert end.envelope.params == {"BODY": "8BITMIME"}
    assert end.envelope.recipients == ["bob@example.test", "Postmaster"]
    assert end.size == 5 and end.error is None


def test_message_over_size_is_552_after_dot_and_session_usable():
    s = new_session(max_message_size=50)
    assert replies(s, [E, M, RC, D, "x" * 60, "."]) == ["250", "250 2.1.0", "250 2.1.5", "354", "552 5.3.4"]
    assert stored(s) == []
    assert transcript(s, [M, RC, D, "small", "."]) == [250, 250] + MSG
    assert stored(s) == [b"small\n"]


@pytest.mark.parametrize("size, code", [(20, 250), (21, 552)])
def test_message_size_exactly_at_limit(size, code):
    s = new_session(max_message_size=20)
    line = "x" * (size - 2)  # the limit counts the CRLF
    assert transcript(s, [E, M, RC, D, line, "."]) == OK3 + [354, code]


@pytest.mark.parametrize("sender", ["<a@example.test>", "<a>"])
@pytest.mark.parametrize("size, code", [(1000, 250), (1001, 552)])
def test_mail_size_parameter_against_limit(size, code, sender):
    # "<a>": the contract's own example of the SIZE refusal is written with that sender.
    s = new_session(max_message_size=1000)
    assert transcript(s, [E, f"MAIL FROM:{sender} SIZE={size}"]) == [250, code]


def test_a_sender_without_a_domain_is_stored_as_sent():
    s = new_session()
    assert transcript(s, [E, "MAIL FROM:<a>", RC, D, "x", "."]) == OK3 + MSG
    [start] = [e for e in events(s) if isinstance(e, DataStart)]
    assert (start.envelope.sender.address, start.envelope.sender.domain) == ("a", "")
    assert stored(s) == [b"x\n"]


def test_text_line_over_1000_octets_is_refused_after_dot():
    s = new_session()
    assert replies(s, [E, M, RC, D, "x" * 999, "."])[-1] == "554 5.6.0"
    assert stored(s) == []
    assert transcript(s, [M, RC, D, "x" * 998, "."]) == [250, 250] + MSG
    assert stored(s) == [b"x" * 998 + b"\n"]


def test_bare_lf_in_data_is_refused_after_dot():
    s = new_session()
    transcript(s, [E, M, RC, D])
    assert heads(feed(s, b"Subject: x\r\n\r\none\ntwo\r\n.\r\n")) == ["550 5.6.0"]
    assert stored(s) == []
    assert transcript(s, [M]) == [250]


def test_bare_lf_in_data_is_normalised_when_configured():
    s = new_session(normalize_bare_newlines=True)
    transcript(s, [E, M, RC, D])
    assert codes(feed(s, b"Subject: x\r\n\r\none\ntwo\r\n.\r\n")) == [250]
    assert stored(s) == [b"Subject: x\n\none\ntwo\n"]


def test_normalise_per_session_overrides_config():
    strict = Session(SessionConfig(HOSTNAME, normalize_bare_newlines=True), normalize=False)
    lenient = Session(SessionConfig(HOSTNAME), normalize=True)
    for s, code in ((strict, 550), (lenient, 250)):
        s.start()
        s.data_to_send()
        transcript(s, [E, M, RC, D])
        assert codes(feed(s, b"a\nb\r\n.\r\n")) == [code]


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\n.\r",
             b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=repr)
@pytest.mark.parametrize("normalize", [False, True], ids=["reject", "normalize"])
def test_smuggled_message_is_never_split(fake_end, normalize):
    smuggled = (b"Subject: first\r\n\r\nfirst" + fake_end + b"MAIL FROM:<evil@example.test>\r\n"
                b"RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nspoof\r\n")
    assert b"\r\n.\r\n" not in smuggled
    s = new_session(normalize_bare_newlines=normalize)
    transcript(s, [E, M, RC, D])
    out = feed(s, smuggled + b".\r\n")
    assert len(data_ends(s)) == 1
    assert len([e for e in events(s) if isinstance(e, DataStart)]) == 1
    if normalize:
        assert codes(out) == [250]
        assert len(stored(s)) == 1 and b"MAIL FROM:<evil@example.test>" in stored(s)[0]
    else:
        assert heads(out) == ["550 5.6.0"]
        assert stored(s) == []
    assert transcript(s, ["NOOP"]) == [250]


def test_mail_loop_is_554_after_dot():
    s = new_session()
    transcript(s, [E, M, RC, D])
    out = feed(s, b"Received: from a by b\r\n" * 100 + b"\r\nbody\r\n.\r\n")
    assert heads(out) == ["554 5.4.6"]
    assert stored(s) == []


def test_99_received_headers_pass():
    s = new_session()
    transcript(s, [E, M, RC, D])
    assert codes(feed(s, b"Received: from a by b\r\n" * 99 + b"\r\nbody\r\n.\r\n")) == [250]


def test_data_buffer_stays_bounded_without_crlf():
    s = new_session()
    transcript(s, [E, M, RC, D])
    piece = b"d" * 65536
    for _ in range(32):  # 2 MiB; the 20 MiB run is in test_buffer.py
        assert feed(s, piece) == b""
        assert len(s._reader._pending) <= 1024
    assert heads(feed(s, b"\r\n.\r\n")) == ["554 5.6.0"]


def test_datastart_refused_with_451_clears_transaction():
    s = new_session(max_errors=3)
    refuse_data_start(s, R.R451_STORAGE)
    assert replies(s, [E, M, RC, D]) == ["250", "250 2.1.0", "250 2.1.5", "451 4.3.0"]
    assert not s.closed
    assert not s.in_data
    refuse_data_start(s, None)
    assert transcript(s, [RC, "NOOP", M, RC, D, "x", "."]) == [503, 250, 250, 250] + MSG


def test_datastart_refused_with_452_no_space():
    s = new_session()
    refuse_data_start(s, R.R452_NO_SPACE)
    assert replies(s, [E, M, RC, D])[-1] == "452 4.3.1"
    assert transcript(s, [D]) == [503]


# -- recipients: max_recipients and local_domains -------------------------------------------------

def test_recipients_past_max_get_452():
    s = new_session(max_recipients=2)
    rcpts = [f"RCPT TO:<r{i}@example.test>" for i in range(4)]
    assert replies(s, [E, M, *rcpts]) == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5",
                                          "452 4.5.3", "452 4.5.3"]
    assert transcript(s, [D, "x", "."]) == MSG
    assert data_ends(s)[0].envelope.recipients == ["r0@example.test", "r1@example.test"]


def test_recipient_count_restarts_with_each_transaction():
    s = new_session(max_recipients=1)
    assert transcript(s, [E, M, RC, RC, "RSET", M, RC, RC]) == [250, 250, 250, 452, 250, 250, 250, 452]


def test_surplus_recipients_are_not_counted_as_errors():
    s = new_session(max_recipients=1, max_errors=2)
    assert transcript(s, [E, M] + [RC] * 10) == [250, 250, 250] + [452] * 9
    assert not s.closed
    assert transcript(s, ["NOOP"]) == [250]


def test_past_ten_thousand_surplus_recipients_each_counts_as_an_error():
    """A sender that ignores 452 gets 10,000 free in a transaction; each one after
    counts toward max_errors (as past Postfix's smtpd_recipient_overshoot_limit)."""
    s = new_session(max_recipients=1, max_errors=2)
    assert transcript(s, [E, M, RC] + [RC] * MAX_SURPLUS_RECIPIENTS) == [250, 250, 250] + [
        452] * MAX_SURPLUS_RECIPIENTS
    assert (s.closed, s.errors) == (False, 0)
    assert replies(s, [RC, RC]) == ["452 4.5.3", "452 4.5.3", "421 4.7.0"]
    assert s.closed


def test_surplus_recipients_are_counted_per_transaction():
    s = new_session(max_recipients=1, max_errors=1)
    assert transcript(s, [E]) == [250]
    for _ in range(3):
        assert transcript(s, [M, RC] + [RC] * MAX_SURPLUS_RECIPIENTS + ["RSET"]) == [250, 250] + [
            452] * MAX_SURPLUS_RECIPIENTS + [250]
    assert (s.closed, s.errors) == (False, 0)


def test_refused_recipients_do_not_count_toward_max():
    s = new_session(max_recipients=1, local_domains=("example.test",))
    assert transcript(s, [E, M, "RCPT TO:<x@elsewhere.test>", RC]) == [250, 250, 550, 250]


LOCAL = [
    ("local", "RCPT TO:<bob@example.test>", "250 2.1.5"),
    ("local-upper-case-domain", "RCPT TO:<bob@EXAMPLE.Test>", "250 2.1.5"),
    ("second-local-domain", "RCPT TO:<bob@other.test>", "250 2.1.5"),
    ("foreign", "RCPT TO:<bob@elsewhere.test>", "550 5.7.1"),
    ("subdomain-is-not-local", "RCPT TO:<bob@sub.example.test>", "550 5.7.1"),
    ("parent-is-not-local", "RCPT TO:<bob@test>", "550 5.7.1"),
    ("address-literal-is-not-local", "RCPT TO:<bob@[192.0.2.1]>", "550 5.7.1"),
    ("postmaster-local", "RCPT TO:<postmaster@example.test>", "250 2.1.5"),
    ("postmaster-local-mixed-case", "RCPT TO:<PostMaster@Example.Test>", "250 2.1.5"),
    ("postmaster-foreign", "RCPT TO:<postmaster@elsewhere.test>", "550 5.7.1"),
    ("bare-postmaster", "RCPT TO:<Postmaster>", "250 2.1.5"),
    ("bare-postmaster-lower", "RCPT TO:<postmaster>", "250 2.1.5"),
    ("bare-postmaster-upper", "RCPT TO:<POSTMASTER>", "250 2.1.5"),
    ("source-route-to-local", "RCPT TO:<@relay.elsewhere.test:bob@example.test>", "250 2.1.5"),
    ("source-route-to-foreign", "RCPT TO:<@example.test:bob@elsewhere.test>", "550 5.7.1"),
]


@pytest.mark.parametrize("name, line, expected", LOCAL, ids=ids(LOCAL))
def test_local_domains(name, line, expected):
    s = new_session(local_domains=("Example.TEST", "other.test"))
    assert replies(s, [E, "MAIL FROM:<anyone@elsewhere.test>", line])[1:] == ["250 2.1.0", expected]


def test_without_local_domains_every_domain_is_accepted():
    s = new_session()
    assert transcript(s, [E, M, "RCPT TO:<x@elsewhere.test>", "RCPT TO:<y@[192.0.2.1]>"]) == [250] * 4


# -- the error budget: 421 4.7.0 and close ----------------------------------------------------------

def test_too_many_errors_default_is_ten():
    s = new_session()
    assert transcript(s, ["FOO"] * 11) == [500] * 10 + [421]
    assert s.closed


def test_too_many_errors_reply_after_ehlo():
    s = new_session(max_errors=3)
    assert replies(s, [E, "FOO", "RCPT TO:<a@example.test>", "MAIL", "NOOP"]) == [
        "250", "500 5.5.2", "503 5.5.1", "501 5.5.4", "421 4.7.0"]
    assert s.closed
    assert feed(s, b"NOOP\r\n") == b""


def test_too_many_errors_before_helo_closes_with_enhanced_code():
    s = new_session(max_errors=2)
    assert replies(s, ["FOO", "BAR"]) == ["500", "500", "421 4.7.0"]


def test_every_error_class_counts():
    s = new_session(max_errors=8, local_domains=("example.test",), max_message_size=10)
    lines = [M, E, "FOO", "EXPN x", "VRFY", "MAIL FROM:<ü@example.test>",
             "MAIL FROM:<a@example.test> SIZE=11", "MAIL FROM:<a@example.test> X=1",
             M, "RCPT TO:<a@elsewhere.test>"]
    assert transcript(s, lines) == [503, 250, 500, 502, 501, 553, 552, 555, 250, 550, 421]


def test_errors_accumulate_across_transactions():
    s = new_session(max_errors=3)
    assert transcript(s, [E, "FOO", "RSET", E, "FOO", M, "RSET", "FOO"]) == [
        250, 500, 250, 250, 500, 250, 250, 500, 421]


# -- junk commands: EHLO, HELO, NOOP, RSET, VRFY, HELP (Postfix's smtpd_junk_command_limit) -----

JUNK = ["NOOP", "RSET", "VRFY someone", "HELP"]


@pytest.mark.parametrize("command", JUNK + [E, H])
def test_past_max_junk_commands_each_still_answered_counts_as_an_error(command):
    """Counted as Postfix counts (``junk_cmds++ > limit``): the first limit + 1 are
    free, the opening EHLO one of them, so that a value carried over from a Postfix
    configuration means the same."""
    ok = {"VRFY someone": 252, "HELP": 214}.get(command, 250)
    s = new_session(max_junk_commands=3, max_errors=2)
    assert transcript(s, [E] + [command] * 3) == [250] + [ok] * 3
    assert s.errors == 0
    assert transcript(s, [command]) == [ok] and (s.errors, s.closed) == (1, False)
    assert transcript(s, [command]) == [ok, 421] and s.closed


def test_a_client_looping_on_ehlo_is_closed_at_the_defaults():
    """Postfix's smtpd counts HELO and EHLO as junk too.  Left out, a loop on EHLO (the
    dearest reply to send) kept a worker's core busy for the whole session."""
    s = new_session()
    assert transcript(s, [E] * 101) == [250] * 101 and s.errors == 0
    assert transcript(s, [E] * 10) == [250] * 10 + [421] and s.closed


def test_junk_commands_of_every_kind_count_together():
    s = new_session(max_junk_commands=3, max_errors=1)
    assert transcript(s, [E] + JUNK) == [250, 250, 250, 252, 214, 421]


def test_a_message_stored_gives_the_junk_commands_back_a_refused_one_does_not():
    s = new_session(max_junk_commands=1, max_errors=1, max_message_size=5)
    assert transcript(s, [E, "NOOP", M, RC, D, "hi", "."]) == [250, 250] + OK3[1:] + MSG
    assert s.junk == 0
    assert transcript(s, ["NOOP", "RSET", M, RC, D, "too long", "."]) == [250, 250] + OK3[1:] + [354, 552, 421]
    s = new_session(max_junk_commands=1, max_errors=2, max_message_size=5)
    assert transcript(s, [E, "NOOP", M, RC, D, "too long", ".", "NOOP"]) == [
        250, 250] + OK3[1:] + [354, 552, 250, 421]


def test_max_junk_commands_zero_leaves_one_free():
    s = new_session(max_junk_commands=0, max_errors=2)
    assert transcript(s, [E, "NOOP", "NOOP"]) == [250, 250, 250, 421]


def test_commands_that_move_mail_are_no_junk():
    s = new_session(max_junk_commands=0, max_errors=1)
    assert transcript(s, [E, M, RC, D] + BODY + [M, RC]) == [250] * 3 + MSG + [250, 250]
    assert (s.closed, s.errors) == (False, 0)


def test_refused_message_counts_as_error():
    s = new_session(max_errors=1, max_message_size=5)
    assert transcript(s, [E, M, RC, D, "too long", "."]) == OK3 + [354, 552, 421]
    assert s.closed


def test_successes_do_not_count():
    s = new_session(max_errors=2)
    lines = [E] + [M, RC, "NOOP", "VRFY x", "HELP", "RSET"] * 20
    assert set(transcript(s, lines)) <= {214, 250, 252}
    assert s.errors == 0


# -- enhanced status codes (RFC 2034 / 3463) ------------------------------------------------------

ENHANCED = [
    # the ones the contract names
    ("relay-denied", [M, "RCPT TO:<x@elsewhere.test>"], "550 5.7.1"),
    ("non-ascii-sender", ["MAIL FROM:<ü@example.test>"], "553 5.6.7"),
    ("non-ascii-recipient", [M, "RCPT TO:<ü@example.test>"], "553 5.6.7"),
    # RFC 3463 / 5248 subjects
    ("bad-sequence", [RC], "503 5.5.1"),
    ("nested-mail", [M, M], "503 5.5.1"),
    ("no-recipients", [M, D], "503 5.5.1"),
    ("not-implemented", ["EXPN x"], "502 5.5.1"),
    ("unrecognized", ["FOO"], "500 5.5.2"),
    ("syntax", ["MAIL FROM:<a@example.test"], "501 5.1.7"),
    ("unknown-parameter", ["MAIL FROM:<a@example.test> FOO=1"], "555 5.5.4"),
    ("size-too-big", ["MAIL FROM:<a@example.test> SIZE=99999999999"], "552 5.3.4"),
    ("too-many-recipients", [M, RC, RC], "452 4.5.3"),
    ("sender-ok", [M], "250 2.1.0"),
    ("recipient-ok", [M, RC], "250 2.1.5"),
    ("noop", ["NOOP"], "250 2.0.0"),
    ("vrfy", ["VRFY bob"], "252 2.5.0"),
    ("help", ["HELP"], "214 2.0.0"),
    ("quit", ["QUIT"], "221 2.0.0"),
]


@pytest.mark.parametrize("name, lines, expected", ENHANCED, ids=ids(ENHANCED))
def test_enhanced_codes(name, lines, expected):
    s = new_session(max_recipients=1, local_domains=("example.test",))
    got = replies(s, [E, *lines])[-1]
    assert got == expected


def test_no_enhanced_codes_before_helo():
    s = new_session()
    out = b"".join(feed(s, line + b"\r\n") for line in
                   [b"NOOP", b"FOO", b"MAIL FROM:<a@example.test>", b"VRFY x", b"HELP", b"RSET", b"EXPN x"])
    assert heads(out) == ["250", "500", "503", "252", "214", "250", "502"]
    assert out.startswith(b"250 Ok\r\n500 Command unrecognized\r\n")


@pytest.mark.parametrize("greeting", [E, H])
def test_enhanced_codes_on_every_reply_after_ehlo_or_helo(greeting):
    # helpers.check_enhanced asserts the code on each reply; this walks many kinds of reply
    s = new_session(max_recipients=1, max_message_size=100, local_domains=("example.test",))
    lines = [greeting, "NOOP", "FOO", "EXPN x", "VRFY x", "HELP", RC, D, M, M, "RCPT TO:<x@elsewhere.test>",
             RC, RC, D, "x" * 200, ".", M, RC, D, "ok", ".", "RSET", "QUIT"]
    assert transcript(s, lines) == [250, 250, 500, 502, 252, 214, 503, 503, 250, 503, 550,
                                    250, 452, 354, 552, 250, 250, 354, 250, 250, 221]


# -- the session log --------------------------------------------------------------------------------

def test_log_reconstructs_the_session():
    s = Session(SessionConfig(HOSTNAME))
    s.start()
    s.data_to_send()
    transcript(s, [E, M, RC, D, "Subject: secret body", "", "do not log me", ".", "QUIT"])
    assert s.log == ["220 mx.test ESMTP", E, "250 mx.test", M, "250 2.1.0 Sender ok", RC,
                     "250 2.1.5 Recipient ok", "DATA", "354 End data with <CR><LF>.<CR><LF>",
                     "<message: 39 octets>", "250 2.0.0 Message accepted", "QUIT", "221 2.0.0 Bye"]


def test_log_never_holds_message_text():
    s = new_session()
    transcript(s, [E, M, RC, D, "Subject: TOPSECRET", "", "TOPSECRET", "."])
    assert not [line for line in s.log if "TOPSECRET" in line]
    assert s.log[-2:] == ["<message: 33 octets>", "250 2.0.0 Message accepted"]  # it was logged


NASTY = [b"NOOP a\rb", b"EHLO \xff\xfe", b"NOOP \xc2\x85next", b"NOOP \xe2\x80\xa8next",
         b"NOOP \x1b[31mred", b"NOOP \x00", b"NOOP \x0bx\x0cy", b"FOO \xed\xa0\x80", b"\x85", b"NOOP \\x0d"]


@pytest.mark.parametrize("raw", NASTY, ids=repr)
def test_log_lines_never_contain_line_breaks(raw):
    s = new_session()
    feed(s, raw + b"\r\n")
    assert len(s.log) == 3  # greeting, the command, its reply
    for line in s.log:
        assert "\r" not in line and "\n" not in line
        assert len(line.splitlines()) == 1, line  # no Unicode line separators either
        assert line.isprintable(), line


@pytest.mark.parametrize("auth", [False, True])
def test_long_command_line_is_logged_as_a_marker(auth):
    # With AUTH offered the line buffer takes longer lines (for AUTH's payload): any other
    # command that long is still refused, and logged as the marker, not in full.
    s = new_session(starttls=True, auth=auth, auth_insecure=auth)
    transcript(s, ["NOOP " + "x" * 600])
    assert s.log[1:] == ["<command line too long>", "500 5.5.2 Line too long"]


@pytest.mark.parametrize("raw, logged", [
    (b"NOOP a\\r\\nb", "NOOP a\\\\r\\\\nb"),   # typed backslashes: doubled
    (b"NOOP a\rb", "NOOP a\\rb"),                  # a real CR: an escape
    (b"NOOP \xe9t\xe9", "NOOP \\xe9t\\xe9"),      # no UTF-8: octets escaped
    (b"NOOP \xc3\xa9t\xc3\xa9", "NOOP \u00e9t\u00e9"),  # UTF-8: as it is
    (b"NOOP \xc3\xa9\\", "NOOP \\u00e9\\\\"),   # UTF-8 in an escaped line: \u00NN ...
    (b"NOOP \xe9\\", "NOOP \\xe9\\\\"),          # ... where octets that are no UTF-8 read \xNN
    (b"NOOP \xc3\xa9\x01", "NOOP \\u00e9\\x01"),
    (b"NOOP \xe9\x01", "NOOP \\xe9\\x01"),
])
def test_log_tells_apart_what_looks_alike(raw, logged):
    s = new_session()
    feed(s, raw + b"\r\n")
    assert s.log[1] == logged


def test_refused_message_is_logged_with_the_octets_sent():
    body = "a\nb\r\nbad line\r\n"  # a bare LF: refused
    s = new_session()
    codes = transcript(s, [E, M, RC, D, body + "."])
    assert codes[-1] == 550
    assert f"<message: {len(body)} octets>" in s.log
    # Octets that came after the refusal, and an overlong line cut away, count too.
    s = new_session(max_message_size=100)
    feed(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    sent = b"x" * 150 + b"\r\n" + b"y" * 3000 + b"\r\n"
    for i in range(0, len(sent), 700):
        feed(s, sent[i:i + 700])
    feed(s, b".\r\n")
    assert s.log[-2] == f"<message: {len(sent)} octets>" and s.log[-1].startswith("552 5.3.4")


AUTH_LINES = ["AUTH PLAIN AGFsaWNlAHNlY3JldA==", "auth plain AGFsaWNlAHNlY3JldA==",
              "AUTH PLAIN  AGFsaWNlAHNlY3JldA==", "AUTH LOGIN AGFsaWNlAHNlY3JldA==",
              "AUTH PLAIN\tAGFsaWNlAHNlY3JldA==", "AUTH PLAIN\x00AGFsaWNlAHNlY3JldA==",
              "AUTH\tPLAIN AGFsaWNlAHNlY3JldA==", "AUTH \tPLAIN AGFsaWNlAHNlY3JldA==",
              " AUTH PLAIN AGFsaWNlAHNlY3JldA==", "\tAUTH PLAIN AGFsaWNlAHNlY3JldA=="]


@pytest.mark.parametrize("line", AUTH_LINES, ids=repr)
def test_auth_line_is_logged_without_its_payload(line):
    s = new_session()
    transcript(s, [E, line])
    assert len(s.log) == 5
    assert not [entry for entry in s.log if "AGFsaWNl" in entry], s.log
    assert s.log[3].upper().lstrip(" ").removeprefix("\\T").startswith("AUTH")  # a tab is logged as \t


@pytest.mark.parametrize("verb", ["AUTH-LOGIN", "AUTHLOGIN", "auth_login"])
def test_a_mistyped_auth_verb_hides_its_payload_and_the_lines_behind_it(verb):
    # The client takes its mistyped verb for AUTH and sends a LOGIN exchange's two lines
    # behind it, unasked: neither may reach the log.
    s = new_session()
    replies = transcript(s, [E, f"{verb} YWxpY2U=", "c2VjcmV0", "aHVudGVyMg==", "NOOP"])
    assert replies[-4:] == [500, 500, 500, 250]
    assert not [entry for entry in s.log if "YWxpY2U" in entry or "c2VjcmV0" in entry
                or "aHVudGVyMg" in entry], s.log
    assert f"{verb} ***" in s.log and "NOOP" in s.log


def test_auth_mechanism_is_kept_in_the_log():
    s = new_session()
    transcript(s, ["AUTH PLAIN AGFsaWNlAHNlY3JldA=="])
    assert s.log[1] == "AUTH PLAIN ***"


@pytest.mark.parametrize("line, logged", [
    ("AUTH PLAIN", "AUTH PLAIN"),        # no initial response: nothing to mask
    ("AUTH LOGIN", "AUTH LOGIN"),
    ("auth cram-md5", "auth cram-md5"),
    ("AUTH PLAIN =", "AUTH PLAIN ***"),  # "=" is an (empty) initial response
    ("AUTH PLAIN\tAGFsaWNl", "AUTH PLAIN ***"),
    ("AUTH PLAIN ", "AUTH PLAIN ***"),   # whatever follows the mechanism is masked
    ("AUTH CRAM-MD5 abc", "AUTH CRAM-MD5 ***"),
    ("AUTH ", "AUTH"),
    # No mechanism name: base64 in its place is a credential, masked whole.  A name is 1
    # to 20 characters (RFC 4422 3.1) in one case, followed by the end or a space.
    ("AUTH AGFsaWNlAExFQUtQVy1ub21lY2g=", "AUTH ***"),
    ("AUTH AGFsaWNlAExFQUtQVy1ub21lY2g", "AUTH ***"),
    ("AUTH AGFsaWNl", "AUTH ***"),
    ("AUTH ABCDEFGHIJKLMNOPQRSTU", "AUTH ***"),
    ("AUTH PLAIN\x00AGFsaWNl", "AUTH ***"),
    # AUTH run into more of a word is another verb (500), yet credentials may follow it
    # or be run into it.
    ("AUTH-PLAIN AGFsaWNlAG5ld3B3", "AUTH-PLAIN ***"),
    ("authplain AGFsaWNlAG5ld3B3", "authplain ***"),
    ("AUTHPLAIN\tAGFsaWNl", "AUTHPLAIN ***"),
    ("AUTHPLAIN=AGFsaWNl", "AUTHPLAIN ***"),
    ("AUTHAGFsaWNlAG5ld3B3", "AUTH ***"),
    ("AUTH_LOGIN", "AUTH_LOGIN"),
    ("AUTHORIZE", "AUTHORIZE"),
    # Blanks before the verb make the line no command (500); its payload is hidden all
    # the same, and so are the LOGIN lines behind it (test_auth_line_is_logged...).
    (" AUTH PLAIN AGFsaWNl", " AUTH PLAIN ***"),
    ("\t auth AGFsaWNl", "\\t auth ***"),
    ("  AUTHPLAIN AGFsaWNl", "  AUTHPLAIN ***"),
    (" NOOP AGFsaWNl", " NOOP AGFsaWNl"),
])
def test_auth_mask_stands_for_an_initial_response(line, logged):
    assert loggable(line) == logged


# -- the bound on a session's log (smtp/sessionlog.py) ---------------------------------------------

def spent_session(**config) -> Session:
    """A session whose free log lines are all spent, and its log emptied.  The greeting,
    EHLO and its reply take 3 lines, so the last NOOP's reply is the first line past
    them: every count below includes it.  NOOPs fill the log here, so the junk-command
    limit (tested on its own) is lifted."""
    s = new_session(**{"max_junk_commands": 10**9, **config})
    transcript(s, [E] + ["NOOP"] * ((FREE_LINES - 3) // 2 + 1))
    assert len(s.log) == FREE_LINES and s.log[-1] == "NOOP"
    s.log.clear()
    return s


def test_every_line_is_logged_up_to_the_free_lines():
    s = new_session(max_junk_commands=10**9)
    transcript(s, [E] + ["NOOP"] * ((FREE_LINES - 3) // 2))
    assert len(s.log) == FREE_LINES - 1 and s.log[-2:] == ["NOOP", "250 2.0.0 Ok"]


def test_past_the_free_lines_chatter_is_counted_not_logged():
    s = spent_session()
    transcript(s, ["NOOP", "RSET", "VRFY x", "HELP", E, "HELO c"] * 100)
    assert s.log == []  # 1,200 lines, none written: the log no longer grows with them
    s.end_log()
    assert s.log == ["<1201 command and reply lines not logged>"]


def test_past_the_free_lines_errors_are_logged_with_their_command():
    s = spent_session(max_errors=100)
    transcript(s, ["NOOP", "FOO", "NOOP", "NOOP", "MAIL FROM:<bad"])
    assert s.log == ["<3 command and reply lines not logged>", "FOO", "500 5.5.2 Command unrecognized",
                     "<4 command and reply lines not logged>", "MAIL FROM:<bad",
                     "501 5.1.7 Bad sender address syntax"]


def test_past_the_free_lines_a_stored_message_keeps_its_transaction():
    s = spent_session(max_recipients=1)
    transcript(s, ["NOOP", M, "NOOP", RC, RC, D, "text", ".", "QUIT"])
    # The counts stand where the lines were: three before the transaction, four
    # inside it (a NOOP, a surplus recipient and their replies).
    assert s.log == ["<3 command and reply lines not logged>", M, "250 2.1.0 Sender ok", RC,
                     "250 2.1.5 Recipient ok", "DATA", "354 End data with <CR><LF>.<CR><LF>",
                     "<4 command and reply lines not logged>",
                     "<message: 6 octets>", "250 2.0.0 Message accepted"]
    s.end_log()
    assert s.log[-1] == "<2 command and reply lines not logged>"  # QUIT and its 221


def test_past_the_free_lines_an_abandoned_transaction_is_counted():
    s = spent_session()
    transcript(s, [M, RC, "RSET"] * 50)
    assert s.log == []
    transcript(s, [M, RC, D, "x", "."])
    assert s.log == ["<301 command and reply lines not logged>", M, "250 2.1.0 Sender ok", RC,
                     "250 2.1.5 Recipient ok", "DATA", "354 End data with <CR><LF>.<CR><LF>",
                     "<message: 3 octets>", "250 2.0.0 Message accepted"]


def test_past_the_free_lines_a_refused_message_keeps_its_transaction():
    s = spent_session(max_message_size=10)
    transcript(s, [M, RC, D, "x" * 20, "."])
    assert s.log == ["<1 command and reply line not logged>", M, "250 2.1.0 Sender ok", RC, "250 2.1.5 Recipient ok", "DATA",
                     "354 End data with <CR><LF>.<CR><LF>", "<message: 22 octets>",
                     "552 5.3.4 Message size exceeds fixed maximum message size"]


def test_past_the_free_lines_the_held_transaction_is_bounded():
    """What waits for a verdict is the transaction's own lines; surplus recipients and
    NOOPs inside it are counted at once, however many."""
    s = spent_session(max_recipients=2)
    transcript(s, [M, RC, RC] + [RC, "NOOP"] * 900)  # (past 1,000 surplus, each is an error)
    assert s.log == [] and len(s._logbook._held) == 6
    s.end_log()
    assert s.log == ["<3607 command and reply lines not logged>"]


def test_past_the_free_lines_the_outcome_follows_what_led_to_it():
    """The connection logs a store, a storage error or an AUTH verdict itself, after it
    lets out what the session held back: the transaction comes before its [STORE]."""
    s = spent_session()
    transcript(s, [M, RC])
    s.receive_data(b"DATA\r\n")
    assert isinstance(s.next_event(), DataStart) and s.log == []
    s.release_log()
    assert s.log == ["<1 command and reply line not logged>", M, "250 2.1.0 Sender ok", RC,
                     "250 2.1.5 Recipient ok", "DATA"]
    s.log.clear()
    s.accept_data()
    assert s.log == []  # the 354 is held again, until the verdict
    s.release_log()
    s.release_log()  # nothing held: nothing written twice
    assert s.log == ["354 End data with <CR><LF>.<CR><LF>"]


def test_storage_refusals_count_toward_max_errors():
    """As every failed command in Postfix's smtpd: a session cannot make the server
    try, fail and log without end while a disk is full."""
    s = new_session(max_errors=3)
    refuse_data_start(s, R.R452_NO_SPACE)
    assert transcript(s, [E, M, RC, D, M, RC, D]) == [250, 250, 250, 452, 250, 250, 452]
    assert not s.closed
    assert transcript(s, [M, RC, D]) == [250, 250, 452, 421]
    assert s.closed


def test_past_the_free_lines_plaintext_discarded_after_starttls_is_still_logged():
    s = spent_session(starttls=True)
    s.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert isinstance(s.next_event(), StartTLS)
    assert s.log == ["<1 command and reply line not logged>", "STARTTLS",
                     "<discarded 25 octets pipelined after STARTTLS>"]


def test_past_the_free_lines_a_transfer_cut_off_keeps_its_transaction():
    """A client gone in the middle of a message's text: its transaction is logged, as
    within the free lines, once (the session is over); one gone before DATA is counted."""
    s = spent_session()
    transcript(s, ["NOOP", M, RC, D])
    feed(s, b"Subject: cut\r\n")
    s.end_log()
    assert s.log == ["<3 command and reply lines not logged>", M, "250 2.1.0 Sender ok", RC,
                     "250 2.1.5 Recipient ok", "DATA", "354 End data with <CR><LF>.<CR><LF>"]
    s = spent_session()
    transcript(s, [M, RC])
    s.end_log()
    assert s.log == ["<5 command and reply lines not logged>"]


def test_a_session_that_ends_within_the_free_lines_logs_no_count():
    s = new_session()
    transcript(s, [E, "NOOP", "QUIT"])
    s.end_log()
    assert not [line for line in s.log if "not logged" in line]


def test_log_can_be_turned_off():
    s = Session(SessionConfig(HOSTNAME, log_commands=False))
    s.start()
    s.data_to_send()
    transcript(s, [E, "FOO", M, RC, D, "x", "."])
    assert s.log == []


# -- the verb table: a handler for each command run, none for the others ----------------------------------------------------


def test_every_verb_has_a_handler_and_no_other_verb_has_one():
    from forksmtp.smtp import commands, session as session_module
    handlers = session_module._HANDLERS
    for handler in handlers.values():
        # In a transaction, where every handler finds the state it may assume.
        session = new_session(starttls=True, auth=True, auth_insecure=True)
        session.receive_data(b"EHLO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        assert session.next_event() is NEED_DATA and session.phase == "rcpt"
        session.data_to_send()  # the three replies so far
        try:
            handler(session, "")
        except commands.CommandError as exc:  # an empty argument may well be a syntax error
            assert 500 <= exc.reply.code < 600, (handler, exc.reply)
            continue
        # Otherwise the handler answered, or handed the socket loop an event (DATA's
        # DataStart, STARTTLS's handshake): never neither, which would leave the
        # client waiting for a reply.
        assert session.data_to_send() or session.next_event() not in (NEED_DATA, PAUSED), handler
    assert handlers.get("EXPN") is None
    assert {verb for verb, _ in session_module.SEQUENCE} <= handlers.keys()
    assert not handlers.keys() & session_module.NOT_OFFERED


def test_4xx_replies_count_in_the_stats_but_not_in_the_error_budget():
    """452 (too many recipients) is a refusal the stats count; the error budget counts
    5xx only (Postfix's smtpd_hard_error_limit)."""
    s = new_session(max_recipients=1)
    rcpt = "RCPT TO:<bob@example.test>"
    assert transcript(s, ["EHLO client.test", "MAIL FROM:<alice@example.test>", rcpt, rcpt]) == [
        250, 250, 250, 452]
    assert s.error_codes == [452] and s.errors == 0


@pytest.mark.parametrize("raw", [b"EHLO x\x0b\r\n", b"EHLO \x0cx\r\n", b"EHLO x\x1c\r\n", b"EHLO x\x1f\r\n",
                                 b"HELO \x1ex\r\n", b"EHLO \xc2\x85x\r\n", b"EHLO x\x01\r\n", b"HELO \x0b\r\n"],
                         ids=["vt-after", "ff-before", "fs-after", "us-after", "rs-before", "nel-before",
                              "soh-after", "vt-alone"])
def test_an_unprintable_character_at_either_end_of_the_helo_name_is_refused(raw):
    """Python's strip() takes these off as white space; the name is refused instead,
    as one with them inside it is, and the session stays before HELO."""
    s = new_session()
    assert feed(s, raw) == b"501 Syntax: EHLO/HELO hostname\r\n"
    assert s.helo_name == ""
    assert feed(s, b"EHLO client.test \t\r\n").startswith(b"250-mx.test\r\n")  # spaces and tabs go
    assert s.helo_name == "client.test"


def test_the_helo_name_is_kept_to_255_characters():
    s = new_session()
    transcript(s, ["EHLO " + "a" * 300])
    assert s.helo_name == "a" * 255


# -- the sans-IO contract where connection.py does not reach it today -----------------------

def _events_until_wait(s) -> list:
    out = []
    while True:
        event = s.next_event()
        out.append(event)
        if event is NEED_DATA or event is PAUSED:
            return out


def _in_data(s) -> None:
    transcript(s, ["EHLO client.test", "MAIL FROM:<alice@example.test>", "RCPT TO:<bob@example.test>"])
    s.receive_data(b"DATA\r\n")
    assert isinstance(s.next_event(), DataStart)


def test_commands_that_come_while_the_verdict_is_owed_stay_commands():
    """After the final dot a later read (QUIT) waits for the verdict; it is never fed to
    the finished DATA reader."""
    s = new_session()
    _in_data(s)
    s.accept_data()
    s.receive_data(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    events = _events_until_wait(s)
    assert isinstance(events[-2], DataEnd) and events[-1] is PAUSED
    s.receive_data(b"QUIT\r\n")
    assert s.next_event() is PAUSED
    s.reply(R.R250_ACCEPTED)
    assert s.next_event() is NEED_DATA and s.closed
    assert s.data_to_send().split(b"\r\n")[-2].startswith(b"221 ")


def test_nothing_that_comes_after_close_reaches_storage():
    s = new_session()
    _in_data(s)
    s.accept_data()
    s.close(R.R421_TIMEOUT)
    s.receive_data(b"hi\r\n.\r\n")
    assert _events_until_wait(s) == [NEED_DATA]


def test_text_sent_before_the_354_is_message_text():
    """Bytes that came while DataStart was unanswered belong to the message (a client
    that does not wait for the 354)."""
    s = new_session()
    _in_data(s)
    s.receive_data(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert s.next_event() is PAUSED
    s.accept_data()
    events = _events_until_wait(s)
    assert b"".join(e.data for e in events if isinstance(e, DataChunk)) == b"Subject: x\n\nhi\n"
    assert any(isinstance(e, DataEnd) for e in events)


# -- recipients whose Maildir failed a moment ago (the caller's recipient_check) ------------------

DEFERRED = {"bob@example.test": R.R451_MAILBOX_DEFERRED, "full@example.test": R.R452_MAILBOX_NO_SPACE}


def test_a_deferred_recipient_is_refused_and_the_message_goes_on_for_the_others():
    asked = []

    def check(address):
        asked.append(address)
        return DEFERRED.get(address)

    s = new_session(recipient_check=check, max_errors=1)
    assert replies(s, [E, M, "RCPT TO:<bob@example.test>", "RCPT TO:<full@example.test>",
                       "RCPT TO:<carol@example.test>", D, "Subject: x", "", "hi", "."]) == [
        "250", "250 2.1.0", "451 4.3.0", "452 4.3.1", "250 2.1.5", "354", "250 2.0.0"]
    assert [end.envelope.recipients for end in data_ends(s)] == [["carol@example.test"]]
    # Asked only for a recipient every other rule took, and not counted as an error:
    # with max_errors = 1 any counted refusal would have closed the session.
    assert asked == ["bob@example.test", "full@example.test", "carol@example.test"] and not s.closed


def test_postmaster_is_never_deferred_at_rcpt():
    """RFC 5321 4.5.1 and the contract: always accepted.  A failure of its Maildir
    defers the message at DATA instead."""
    s = new_session(recipient_check=lambda address: R.R451_MAILBOX_DEFERRED)
    assert transcript(s, [E, M, "RCPT TO:<Postmaster>", "RCPT TO:<POSTMASTER@example.test>",
                          "RCPT TO:<bob@example.test>"]) == [250, 250, 250, 250, 451]


def test_a_transaction_whose_every_recipient_is_deferred_has_no_data():
    s = new_session(recipient_check=DEFERRED.get)
    assert transcript(s, [E, M, "RCPT TO:<bob@example.test>", D]) == [250, 250, 451, 503]
    assert s.errors == 1  # the 503 alone


def test_past_the_free_lines_deferred_recipients_are_counted_not_logged():
    s = spent_session(recipient_check=DEFERRED.get, max_recipients=1000)
    transcript(s, [M] + ["RCPT TO:<bob@example.test>"] * 300 + ["RSET"])
    assert s.log == [] and not s.closed


# -- closing twice, and the log turned off --------------------------------------------------------

def test_a_second_close_sends_no_second_closing_reply():
    """The worker closes on timeout or shutdown whatever the session did just before (a
    221 to QUIT, a 421 for errors): one closing reply only, and close_reply keeps the first."""
    s = new_session()
    assert replies(s, [E, "QUIT"]) == ["250", "221 2.0.0"]
    s.close(R.R421_SHUTDOWN)
    assert s.data_to_send() == b"" and s.close_reply is R.R221_BYE
    s = new_session()
    transcript(s, [E])
    s.close(R.R421_TIMEOUT)
    s.close(R.R421_SHUTDOWN)
    assert heads(s.data_to_send()) == ["421 4.4.2"] and s.close_reply is R.R421_TIMEOUT


def test_log_off_stays_off_for_what_the_connection_asks_of_it():
    """log_commands=False: the discarded-after-STARTTLS line, release_log() and end_log()
    write nothing either (test_log_can_be_turned_off covers only command lines)."""
    s = new_session(log_commands=False, starttls=True)
    transcript(s, [E])
    s.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert isinstance(s.next_event(), StartTLS)
    s.release_log()
    s.end_log()
    assert s.log == []
