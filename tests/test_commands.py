"""MAIL/RCPT arguments: RFC 5321 4.1.2 paths, address literals (4.1.3), ESMTP
parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8), directly and through
the session."""

from __future__ import annotations

import pytest

from forksmtp.smtp import replies as R
from forksmtp.smtp.commands import MAX_PATH, CommandError, Path, parse_params, parse_path, split_prefix
from helpers import data_ends, new_session, replies, transcript

E = "EHLO client.test"
M = "MAIL FROM:<alice@example.test>"


def ids(table):
    return [row[0] for row in table]


# -- parse_path: what RFC 5321 4.1.2 admits ------------------------------------------------------

VALID = [
    ("plain", "<user@example.test>", "user@example.test", "example.test"),
    ("case-kept-domain-folded", "<User@Example.TEST>", "User@Example.TEST", "example.test"),
    ("single-label-domain", "<user@localhost>", "user@localhost", "localhost"),
    ("hyphen-and-digits", "<u@a-1.b2-c.test>", "u@a-1.b2-c.test", "a-1.b2-c.test"),
    ("dotted-local", "<first.middle.last@example.test>", "first.middle.last@example.test", "example.test"),
    ("atext-specials", "<!#$%&'*+/=?^_`{|}~-@example.test>", "!#$%&'*+/=?^_`{|}~-@example.test", "example.test"),
    ("plus-tag", "<user+tag@example.test>", "user+tag@example.test", "example.test"),
    ("quoted-gt", '<"a>b"@x.test>', '"a>b"@x.test', "x.test"),
    ("quoted-space-and-at", '<"john doe@home"@x.test>', '"john doe@home"@x.test', "x.test"),
    ("quoted-escaped-quote", r'<"a\"b"@x.test>', r'"a\"b"@x.test', "x.test"),
    ("quoted-escaped-backslash", r'<"a\\b"@x.test>', r'"a\\b"@x.test', "x.test"),
    ("quoted-dots", '<"..a.."@x.test>', '"..a.."@x.test', "x.test"),
    ("quoted-empty", '<""@x.test>', '""@x.test', "x.test"),
    # a quoted string that needs no quotes is that local part (RFC 5321 4.1.2): one form
    ("quoted-atom", '<"alice"@x.test>', "alice@x.test", "x.test"),
    ("quoted-dot-string", '<"a.b"@x.test>', "a.b@x.test", "x.test"),
    ("quoted-needless-backslash", r'<"al\ice"@x.test>', "alice@x.test", "x.test"),
    ("quoted-needless-escape-kept", r'<"a\ b"@x.test>', '"a b"@x.test', "x.test"),
    # Dots where Dot-string has none: taken, and quoted, the form in which they are valid
    # (as Postfix takes them and writes them in its headers); quoted or not, one mailbox.
    ("double-dot-local", "<a..b@x.test>", '"a..b"@x.test', "x.test"),
    ("leading-dot-local", "<.a@x.test>", '".a"@x.test', "x.test"),
    ("trailing-dot-local", "<a.@x.test>", '"a."@x.test', "x.test"),
    ("only-dots-local", "<..@x.test>", '".."@x.test', "x.test"),
    ("dots-local-quoted", '<"a..b"@x.test>', '"a..b"@x.test', "x.test"),
    ("dots-local-utf8", "<jösé..x@x.test>", '"jösé..x"@x.test', "x.test"),
    ("ipv4-literal", "<u@[192.0.2.1]>", "u@[192.0.2.1]", "[192.0.2.1]"),
    ("ipv4-literal-zeros", "<u@[0.0.0.0]>", "u@[0.0.0.0]", "[0.0.0.0]"),
    # Snum = 1*3DIGIT (RFC 5321 4.1.3): leading zeros are allowed, and kept as sent.
    ("ipv4-literal-leading-zeros", "<u@[010.0.0.1]>", "u@[010.0.0.1]", "[010.0.0.1]"),
    ("ipv4-literal-all-padded", "<u@[001.002.003.255]>", "u@[001.002.003.255]", "[001.002.003.255]"),
    ("ipv6-loopback", "<u@[IPv6:::1]>", "u@[IPv6:::1]", "[ipv6:::1]"),
    ("ipv6-tag-any-case", "<u@[ipv6:2001:db8::1]>", "u@[ipv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
    ("ipv6-full", "<u@[IPv6:2001:db8:0:0:0:0:0:1]>", "u@[IPv6:2001:db8:0:0:0:0:0:1]", "[ipv6:2001:db8:0:0:0:0:0:1]"),
    ("ipv6-v4-mapped", "<u@[IPv6:::ffff:192.0.2.1]>", "u@[IPv6:::ffff:192.0.2.1]", "[ipv6:::ffff:192.0.2.1]"),
    # RFC 5321 4.1.3 IPv6-addr, each form at its limit.
    ("ipv6-comp-six-groups", "<u@[IPv6:1:2:3:4:5:6::]>", "u@[IPv6:1:2:3:4:5:6::]", "[ipv6:1:2:3:4:5:6::]"),
    ("ipv6-comp-six-after", "<u@[IPv6:::1:2:3:4:5:6]>", "u@[IPv6:::1:2:3:4:5:6]", "[ipv6:::1:2:3:4:5:6]"),
    ("ipv6-comp-alone", "<u@[IPv6:::]>", "u@[IPv6:::]", "[ipv6:::]"),
    ("ipv6-v4-full", "<u@[IPv6:1:2:3:4:5:6:192.0.2.1]>", "u@[IPv6:1:2:3:4:5:6:192.0.2.1]",
     "[ipv6:1:2:3:4:5:6:192.0.2.1]"),
    ("ipv6-v4-comp-four-groups", "<u@[IPv6:1:2:3:4::192.0.2.1]>", "u@[IPv6:1:2:3:4::192.0.2.1]",
     "[ipv6:1:2:3:4::192.0.2.1]"),
    # Snum allows leading zeros in the IPv4 part too, as in an IPv4 literal.
    ("ipv6-v4-leading-zero", "<u@[IPv6:::ffff:01.2.3.4]>", "u@[IPv6:::ffff:01.2.3.4]", "[ipv6:::ffff:01.2.3.4]"),
    ("label-of-63", f"<u@{'a' * 63}.example>", f"u@{'a' * 63}.example", f"{'a' * 63}.example"),
    ("utf8-label-a-label-of-63", f"<u@{chr(0xfc) * 57}.test>", f"u@{chr(0xfc) * 57}.test",
     f"{chr(0xfc) * 57}.test"),
    ("source-route", "<@a.test,@b.test:u@c.test>", "u@c.test", "c.test"),
    ("source-route-single", "<@a.test:u@c.test>", "u@c.test", "c.test"),
    ("source-route-literal-target", "<@a.test:u@[192.0.2.1]>", "u@[192.0.2.1]", "[192.0.2.1]"),
    ("utf8-local", "<jösé@example.test>", "jösé@example.test", "example.test"),
    ("utf8-domain", "<u@bücher.example>", "u@bücher.example", "bücher.example"),
]


@pytest.mark.parametrize("name, text, address, domain", VALID, ids=ids(VALID))
def test_valid_path(name, text, address, domain):
    path, rest = parse_path(text + " SIZE=1", allow_null=False)
    assert path == Path(address, domain)
    assert rest == " SIZE=1"
    assert not path.is_null


INVALID = [
    ("empty", ""),
    ("no-brackets", "user@example.test"),
    ("no-closing-bracket", "<user@example.test"),
    ("no-opening-bracket", "user@example.test>"),
    ("no-domain", "<user@>"),
    ("no-local-part", "<@example.test>"),
    ("no-at", "<user>"),
    ("two-ats", "<a@b@example.test>"),
    ("trailing-dot-domain", "<u@example.test.>"),
    ("leading-dot-domain", "<u@.example.test>"),
    ("empty-label", "<u@example..test>"),
    ("hyphen-first", "<u@-example.test>"),
    ("hyphen-last", "<u@example-.test>"),
    ("underscore-domain", "<u@ex_ample.test>"),
    ("space-in-local", "<a b@example.test>"),
    ("space-before-bracket", "<a@example.test >"),
    ("comma-in-local", "<a,b@example.test>"),
    ("unterminated-quote", '<"ab@example.test>'),
    ("quote-inside-atom", '<a"b"@example.test>'),
    ("unescaped-quote", '<"a"b"@example.test>'),
    ("control-in-quotes", '<"a\x01b"@example.test>'),
    ("nul", "<a\x00b@example.test>"),
    ("ipv4-three-parts", "<u@[1.2.3]>"),
    ("ipv4-five-parts", "<u@[1.2.3.4.5]>"),
    ("ipv4-octet-too-big", "<u@[1.2.3.256]>"),
    ("ipv4-negative", "<u@[1.2.3.-4]>"),
    ("ipv6-without-tag", "<u@[::1]>"),
    ("ipv6-bad-hex", "<u@[IPv6:::g]>"),
    ("ipv6-too-many-groups", "<u@[IPv6:1:2:3:4:5:6:7:8:9]>"),
    ("ipv6-two-double-colons", "<u@[IPv6:1::2::3]>"),
    ("ipv6-tag-with-v4", "<u@[IPv6:192.0.2.1]>"),
    ("ipv6-zone-id", "<u@[IPv6:fe80::1%eth0]>"),
    # "::" stands for two groups or more: at most 6 beside it (4 and an IPv4 address).
    ("ipv6-comp-seven-groups", "<u@[IPv6:1:2:3:4:5:6:7::]>"),
    ("ipv6-comp-seven-after", "<u@[IPv6:::1:2:3:4:5:6:7]>"),
    ("ipv6-v4-comp-five-groups", "<u@[IPv6:1:2:3:4:5::192.0.2.1]>"),
    ("ipv6-seven-groups", "<u@[IPv6:1:2:3:4:5:6:7]>"),
    ("ipv6-v4-full-six-groups", "<u@[IPv6:1:2:3:4:5:6:7:192.0.2.1]>"),
    ("ipv6-triple-colon", "<u@[IPv6:1:::2]>"),
    ("ipv6-single-leading-colon", "<u@[IPv6::1:2:3:4:5:6:7]>"),
    ("ipv6-five-hex-digits", "<u@[IPv6:12345::]>"),
    ("ipv6-v4-octet-too-big", "<u@[IPv6:::1.2.3.256]>"),
    ("ipv6-v4-four-digits", "<u@[IPv6:::0001.2.3.4]>"),
    ("ipv6-empty", "<u@[IPv6:]>"),
    # A General-address-literal's tag must be registered with IANA: only IPv6 is.
    ("general-literal-unregistered-tag", "<u@[x-tag:foo]>"),
    # RFC 1035 2.3.4: a label is 63 octets at most.
    ("label-of-64", f"<u@{'a' * 64}.example>"),
    ("inner-label-of-64", f"<u@a.{'b' * 64}.example>"),
    # Internationalised, a label is its A-label in DNS: 63 characters here, 69 octets there.
    ("utf8-label-a-label-over-63", f"<u@{chr(0x65e5) * 63}.test>"),
    ("ipv4-four-digits", "<u@[0192.0.2.1]>"),
    ("ipv4-empty-part", "<u@[192..2.1]>"),
    ("ipv4-non-ascii-digit", "<u@[192.0.2.\u0661]>"),
    ("ipv4-trailing-dot", "<u@[192.0.2.1.]>"),
    ("empty-literal", "<u@[]>"),
    ("word-literal", "<u@[localhost]>"),
    ("unclosed-literal", "<u@[1.2.3.4>"),
    ("space-in-literal", "<u@[1.2.3.4 ]>"),
    ("source-route-no-mailbox", "<@a.test:>"),
    ("source-route-no-colon", "<@a.test,u@c.test>"),
    ("source-route-bad-separator", "<@a.test;@b.test:u@c.test>"),
    ("source-route-empty-hop", "<@a.test,:u@c.test>"),
    ("nested-brackets", "<<u@example.test>>"),
    ("postmaster-not-allowed-here", "<Postmaster>"),
]


@pytest.mark.parametrize("name, text", INVALID, ids=ids(INVALID))
def test_invalid_path_is_501(name, text):
    with pytest.raises(CommandError) as info:
        parse_path(text, allow_null=True)
    assert info.value.reply.code == 501
    assert info.value.reply == R.R501_BAD_ADDRESS


@pytest.mark.parametrize("text, address", [("<user>", "user"), ('<"u s">', '"u s"'),
                                           ('<"user">', "user"), ("<@a.test:user>", "user")])
def test_a_path_without_a_domain_only_where_allowed(text, address):
    path, rest = parse_path(text + " SIZE=1", allow_null=True, allow_no_domain=True)
    assert path == Path(address, "") and rest == " SIZE=1" and not path.is_null
    with pytest.raises(CommandError) as info:
        parse_path(text, allow_null=True)
    assert info.value.reply == R.R501_BAD_ADDRESS


def test_null_path_only_where_allowed():
    path, rest = parse_path("<> BODY=7BIT", allow_null=True)
    assert path.is_null and path == Path("", "") and rest == " BODY=7BIT"
    with pytest.raises(CommandError) as info:
        parse_path("<>", allow_null=False)
    assert info.value.reply.code == 501


@pytest.mark.parametrize("text", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "<PostMaster>"])
def test_bare_postmaster_only_where_allowed(text):
    path, rest = parse_path(text, allow_null=False, allow_postmaster=True)
    assert path == Path("Postmaster", "") and rest == ""
    with pytest.raises(CommandError):
        parse_path(text, allow_null=True)


def test_postmaster_with_domain_is_an_ordinary_address():
    path, _ = parse_path("<Postmaster@Example.test>", allow_null=False, allow_postmaster=True)
    assert path == Path("Postmaster@Example.test", "example.test")


def path_of(octets: int, local_char: str = "a") -> str:
    """``<aaa...@example.test>`` of exactly ``octets`` octets, brackets included (a
    multi-octet ``local_char`` repeated as far as it fits, then "a"s)."""
    fixed = len("<@example.test>")
    count, rest = divmod(octets - fixed, len(local_char.encode()))
    local = local_char * count + "a" * rest
    text = f"<{local}@example.test>"
    assert len(text.encode()) == octets
    return text


@pytest.mark.parametrize("local_char", ["a", "é"], ids=["ascii", "utf8"])
@pytest.mark.parametrize("octets, ok", [(255, True), (256, True), (257, False), (400, False)])
def test_path_length_limit(octets, ok, local_char):
    text = path_of(octets, local_char)
    if ok:
        assert parse_path(text, allow_null=False)[0].address == text[1:-1]
    else:
        with pytest.raises(CommandError) as info:
            parse_path(text, allow_null=False)
        assert info.value.reply == R.R501_PATH_TOO_LONG


def test_path_length_counts_octets_not_characters():
    text = path_of(257, "é")  # 121 characters of local part, 242 octets
    assert len(text) < MAX_PATH
    with pytest.raises(CommandError) as info:
        parse_path(text, allow_null=False)
    assert info.value.reply == R.R501_PATH_TOO_LONG


def test_ascii_path_before_utf8_parameters_counts_the_path_only():
    text = path_of(256) + " X-NOTE=\u00e9t\u00e9"
    assert not text.isascii()
    path, rest = parse_path(text, allow_null=False)
    assert len(path.address) == 254 and rest == " X-NOTE=été"


def test_path_length_includes_the_source_route():
    route = "<@" + "r" * 240 + ".test:u@example.test>"
    with pytest.raises(CommandError) as info:
        parse_path(route, allow_null=False)
    assert info.value.reply == R.R501_PATH_TOO_LONG


# -- parse_params / split_prefix --------------------------------------------------------------------

@pytest.mark.parametrize("text, params", [
    ("", {}),
    (" ", {}),
    (" SIZE=10", {"SIZE": "10"}),
    ("  size=10   body=8bitmime  ", {"SIZE": "10", "BODY": "8bitmime"}),
    (" SMTPUTF8", {"SMTPUTF8": None}),
    (" X-Custom=va!ue", {"X-CUSTOM": "va!ue"}),
    ("\tSIZE=10 \tBODY=8BITMIME\t", {"SIZE": "10", "BODY": "8BITMIME"}),
])
def test_parse_params(text, params):
    assert parse_params(text) == params


@pytest.mark.parametrize("text", [" SIZE=", " =10", " -X=1", " SIZE=a=b", " SIZE=1 size=2",
                                  " BODY=7BIT BODY=7BIT", " K\u00e9Y=1", " SIZE=\x01",
                                  # RFC 5321 4.1.2: SP separates parameters (and,
                                  # as in Postfix, a tab), no other white space
                                  " SIZE=10\x0bBODY=8BITMIME",
                                  " SIZE=10\u00a0BODY=8BITMIME", " SIZE=10\u2028BODY=8BITMIME"])
def test_bad_params_are_501(text):
    with pytest.raises(CommandError) as info:
        parse_params(text)
    assert info.value.reply.code == 501


def test_params_must_be_separated_from_the_path():
    with pytest.raises(CommandError) as info:
        parse_params("SIZE=10")
    assert info.value.reply.code == 501


@pytest.mark.parametrize("arg, rest", [("FROM:<a@b.test>", "<a@b.test>"), ("from:<a@b.test>", "<a@b.test>"),
                                       ("From:   <a@b.test>", "<a@b.test>"), ("FROM <a@b.test>", None),
                                       ("FROM=<a@b.test>", None), ("", None), ("TO:<a@b.test>", None)])
def test_split_prefix(arg, rest):
    assert split_prefix(arg, "FROM:") == rest


# -- through the session: MAIL -------------------------------------------------------------------

MAIL = [
    ("quoted-gt", '<"a>b"@x.test>', "250 2.1.0"),
    ("quoted-escaped-quote", r'<"a\"b"@x.test>', "250 2.1.0"),
    ("null-path", "<>", "250 2.1.0"),
    ("ipv4-literal", "<u@[192.0.2.1]>", "250 2.1.0"),
    ("ipv6-literal", "<u@[IPv6:::1]>", "250 2.1.0"),
    ("bad-literal", "<u@[300.1.1.1]>", "501 5.1.7"),
    ("source-route", "<@a.test,@b.test:u@c.test>", "250 2.1.0"),
    ("source-route-without-mailbox", "<@a.test:>", "501 5.1.7"),
    ("double-dot-local", "<taro..yamada@docomo.example>", "250 2.1.0"),
    ("trailing-dot-local", "<taro.@ezweb.example>", "250 2.1.0"),
    # No special case in MAIL: a sender without a domain, like any other (README).
    ("postmaster-as-plain-sender", "<Postmaster>", "250 2.1.0"),
    ("no-domain", "<u>", "250 2.1.0"),
    ("no-domain-utf8-without-smtputf8", "<jösé>", "553 5.6.7"),
    ("no-domain-size-over", "<a> SIZE=1001", "552 5.3.4"),
    ("path-too-long", path_of(257), "501 5.1.7"),
    ("path-at-limit", path_of(256), "250 2.1.0"),
    ("utf8-without-smtputf8", "<jösé@example.test>", "553 5.6.7"),
    ("utf8-domain-without-smtputf8", "<u@bücher.example>", "553 5.6.7"),
    ("utf8-with-smtputf8", "<jösé@example.test> SMTPUTF8", "250 2.1.0"),
    ("size-ok", "<a@x.test> SIZE=1000", "250 2.1.0"),
    ("size-zero", "<a@x.test> SIZE=0", "250 2.1.0"),
    ("size-over", "<a@x.test> SIZE=1001", "552 5.3.4"),
    ("size-20-digits", "<a@x.test> SIZE=" + "9" * 20, "552 5.3.4"),
    ("size-21-digits", "<a@x.test> SIZE=" + "9" * 21, "501 5.5.4"),
    ("size-missing-value", "<a@x.test> SIZE", "501 5.5.4"),
    ("size-empty-value", "<a@x.test> SIZE=", "501 5.5.4"),
    ("size-not-a-number", "<a@x.test> SIZE=ten", "501 5.5.4"),
    ("size-negative", "<a@x.test> SIZE=-1", "501 5.5.4"),
    ("size-fraction", "<a@x.test> SIZE=1.5", "501 5.5.4"),
    ("size-hex", "<a@x.test> SIZE=0x10", "501 5.5.4"),
    ("size-superscript-digit", "<a@x.test> SIZE=\u00b2", "501 5.5.4"),
    ("size-circled-digit", "<a@x.test> SIZE=\u2460", "501 5.5.4"),
    ("size-arabic-indic-digits", "<a@x.test> SIZE=\u0661\u0662", "501 5.5.4"),
    ("size-fullwidth-digits", "<a@x.test> SIZE=\uff11\uff12", "501 5.5.4"),
    ("body-7bit", "<a@x.test> BODY=7BIT", "250 2.1.0"),
    ("body-8bitmime", "<a@x.test> BODY=8BITMIME", "250 2.1.0"),
    ("body-lower-case", "<a@x.test> body=8bitmime", "250 2.1.0"),
    ("body-binarymime-not-offered", "<a@x.test> BODY=BINARYMIME", "555 5.5.4"),  # known, needs CHUNKING
    ("body-binarymime-lower-case", "<a@x.test> body=binarymime", "555 5.5.4"),
    ("body-unknown", "<a@x.test> BODY=9BIT", "501 5.5.4"),
    # ASCII only: "8BıTMIME".upper() is "8BITMIME" in Python.
    ("body-dotless-i", "<a@x.test> BODY=8B\u0131TMIME SMTPUTF8", "501 5.5.4"),
    ("body-missing-value", "<a@x.test> BODY", "501 5.5.4"),
    ("smtputf8", "<a@x.test> SMTPUTF8", "250 2.1.0"),
    ("smtputf8-with-value", "<a@x.test> SMTPUTF8=yes", "501 5.5.4"),
    ("all-three", "<a@x.test> SIZE=10 BODY=8BITMIME SMTPUTF8", "250 2.1.0"),
    ("unknown-param", "<a@x.test> FOO=bar", "555 5.5.4"),
    ("unknown-flag", "<a@x.test> X-FOO", "555 5.5.4"),
    ("dsn-not-offered", "<a@x.test> RET=HDRS", "555 5.5.4"),
    ("auth-not-offered", "<a@x.test> AUTH=<>", "555 5.5.4"),
    ("unknown-after-known", "<a@x.test> SIZE=10 FOO=1", "555 5.5.4"),
    ("duplicate-size", "<a@x.test> SIZE=10 SIZE=10", "501 5.5.4"),
    ("duplicate-any-case", "<a@x.test> BODY=7BIT body=7bit", "501 5.5.4"),
    ("duplicate-smtputf8", "<a@x.test> SMTPUTF8 SMTPUTF8", "501 5.5.4"),
    ("param-syntax", "<a@x.test> =1", "501 5.5.4"),
    ("trailing-space", "<a@x.test> ", "250 2.1.0"),
]


@pytest.mark.parametrize("name, arg, expected", MAIL, ids=ids(MAIL))
def test_mail_argument(name, arg, expected):
    s = new_session(max_message_size=1000)
    got = replies(s, [E, "MAIL FROM:" + arg])[1]
    assert got == expected


def test_mail_envelope_keeps_sender_and_params():
    s = new_session()
    transcript(s, [E, 'MAIL FROM:<@relay.test:"a>b"@X.test> size=10 body=8bitmime SMTPUTF8',
                   "RCPT TO:<r@example.test>", "DATA", "x", "."])
    env = data_ends(s)[0].envelope
    assert env.sender == Path('"a>b"@X.test', "x.test")
    assert env.params == {"SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": None}
    assert env.smtputf8


@pytest.mark.parametrize("param", ["SIZE=10", "BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8", "FOO=1"])
def test_params_after_helo_are_555(param):
    s = new_session()
    assert replies(s, ["HELO client.test", f"MAIL FROM:<a@x.test> {param}", "MAIL FROM:<a@x.test>"]) == [
        "250", "555 5.5.4", "250 2.1.0"]


def test_utf8_sender_after_helo_is_553():
    s = new_session()
    assert replies(s, ["HELO client.test", "MAIL FROM:<jösé@example.test>"])[1] == "553 5.6.7"


# -- through the session: RCPT ------------------------------------------------------------------

RCPT = [
    ("quoted-gt", '<"a>b"@x.test>', "250 2.1.5", '"a>b"@x.test'),
    ("quoted-escaped-quote", r'<"a\"b"@x.test>', "250 2.1.5", r'"a\"b"@x.test'),
    ("null-path", "<>", "501 5.1.3", None),
    ("ipv4-literal", "<u@[127.0.0.1]>", "250 2.1.5", "u@[127.0.0.1]"),
    ("ipv6-literal", "<u@[IPv6:::1]>", "250 2.1.5", "u@[IPv6:::1]"),
    ("bad-ipv4-literal", "<u@[127.0.0.256]>", "501 5.1.3", None),
    ("bad-ipv6-literal", "<u@[IPv6:12345::]>", "501 5.1.3", None),
    ("source-route-ignored", "<@a.test,@b.test:u@c.test>", "250 2.1.5", "u@c.test"),
    ("double-dot-local", "<u..v@x.test>", "250 2.1.5", '"u..v"@x.test'),
    ("leading-dot-local", "<.u@x.test>", "250 2.1.5", '".u"@x.test'),
    ("bare-postmaster", "<Postmaster>", "250 2.1.5", "Postmaster"),
    ("bare-postmaster-lower", "<postmaster>", "250 2.1.5", "Postmaster"),
    ("path-too-long", path_of(257), "501 5.1.3", None),
    ("utf8-without-smtputf8", "<jösé@example.test>", "553 5.6.7", None),
    ("parameter-not-offered", "<u@x.test> NOTIFY=NEVER", "555 5.5.4", None),
    ("orcpt-not-offered", "<u@x.test> ORCPT=rfc822;u@x.test", "555 5.5.4", None),
    ("postmaster-with-parameter", "<Postmaster> FOO=1", "555 5.5.4", None),
    ("trailing-space", "<u@x.test> ", "250 2.1.5", "u@x.test"),
]


@pytest.mark.parametrize("name, arg, expected, address", RCPT, ids=ids(RCPT))
def test_rcpt_argument(name, arg, expected, address):
    s = new_session()
    got = replies(s, [E, M, "RCPT TO:" + arg])[2]
    assert got == expected
    if address is not None:
        assert s.envelope.recipients == [address]
    else:
        assert s.envelope.recipients == []


def test_utf8_recipient_needs_smtputf8_on_mail():
    s = new_session()
    assert transcript(s, [E, "MAIL FROM:<a@x.test> SMTPUTF8", "RCPT TO:<jösé@bücher.example>"]) == [250] * 3
    assert s.envelope.recipients == ["jösé@bücher.example"]
    assert transcript(s, ["RSET", M, "RCPT TO:<jösé@bücher.example>"]) == [250, 250, 553]


def test_rcpt_parameter_after_helo_is_555_like_mail():
    s = new_session()
    assert transcript(s, ["HELO client.test", M, "RCPT TO:<u@x.test> NOTIFY=NEVER"]) == [250, 250, 555]


def test_only_blanks_may_follow_the_colon_of_from():
    """Spaces and tabs after "FROM:" are tolerated (as Postfix does); other white space
    is a syntax error."""
    s = new_session()
    assert transcript(s, ["EHLO client.test", "MAIL FROM:\x0b<a@example.test>"]) == [250, 501]
    assert transcript(s, ["MAIL FROM:\u00a0<a@example.test>"]) == [501]
    assert transcript(s, ["MAIL FROM: \t <a@example.test>"]) == [250]
