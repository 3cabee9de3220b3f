"""Parsing of MAIL/RCPT arguments: RFC 5321 4.1.2 paths and ESMTP parameters.

Stateless and pure.  Errors are raised as ``CommandError`` carrying the reply to send.
Addresses with non-ASCII characters are parsed only when the caller says SMTPUTF8 is
in effect (RFC 6531); otherwise they get 553 5.6.7.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from . import replies as R

MAX_PATH: Final = 256  # RFC 5321 4.5.3.1.3, including the angle brackets


class CommandError(Exception):
    def __init__(self, reply: R.Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _grammar() -> dict[str, str]:
    # RFC 6531 3.3 extends atext, qtext and sub-domains with UTF8-non-ascii.
    u8 = "\u0080-\U0010ffff"
    atext = f"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\\-{u8}]"
    dot_string = f"{atext}+(?:\\.{atext}+)*"
    # What senders use beyond it: dots anywhere (".u", "u.", "u..v": old Japanese mobile
    # carriers' addresses), taken as Postfix, Exim and Sendmail take them (lax_local).
    dots_anywhere = atext[:-1] + "\\.]+"  # one class, not an alternation: sre runs it faster
    quoted = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{u8}]|\\\\[\\x20-\\x7e])*"'
    let_dig = f"[A-Za-z0-9{u8}]"
    sub_domain = f"{let_dig}(?:[A-Za-z0-9\\-{u8}]*{let_dig})?"
    domain = f"{sub_domain}(?:\\.{sub_domain})*"
    literal = "\\[[\\x21-\\x5a\\x5e-\\x7e]+\\]"
    adl = f"@{domain}(?:,@{domain})*"
    # A source route needs a mailbox after it: "<@a:>" is no null path (RFC 5321 4.1.2).
    # The domain is optional here; parse_path refuses a path without one except where the
    # caller allows it (a sender, as Postfix does).
    path = f"<(?:(?:{adl}:)?(?P<local>{dots_anywhere}|{quoted})(?:@(?P<domain>{domain}|{literal}))?)?>"
    return {"path": path, "dot_string": dot_string, "literal": literal}


_PATH: Final = re.compile(_grammar()["path"])
_LITERAL: Final = re.compile(_grammar()["literal"])
_DOT_STRING: Final = re.compile(_grammar()["dot_string"])
assert _PATH.groups == 2  # parse_path unpacks m.groups() as (local, domain)
_QUOTED_PAIR: Final = re.compile(r"\\(.)")
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE: Final = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")
_IPV4_LITERAL: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")
_IPV6_HEX: Final = re.compile(r"[0-9A-Fa-f]{1,4}\Z")
MAX_LABEL: Final = 63  # RFC 1035 2.3.4: octets of one label of a domain name


@dataclass(slots=True, init=False)
class Path:
    """A parsed path: a value (nothing assigns to it after parsing).  Its ``__init__`` is
    written out because a dataclass's generated one is interpreted even when compiled."""

    address: str  # "" for the null reverse-path <>; "Postmaster" for bare <Postmaster>
    domain: str  # lower-cased; "" when there is none

    def __init__(self, address: str, domain: str) -> None:
        self.address = address
        self.domain = domain

    @property
    def is_null(self) -> bool:
        return not self.address


def parse_path(text: str, *, allow_null: bool, allow_postmaster: bool = False,
               allow_no_domain: bool = False) -> tuple[Path, str]:
    """Parse ``<path>`` at the start of ``text``; returns the path and the rest.

    The grammar admits RFC 6531 UTF-8 addresses; the caller refuses them (553 5.6.7)
    when SMTPUTF8 was not requested.  ``allow_no_domain``: a mailbox without ``@domain``
    (``<a>``) is taken as it is, with the domain "".
    """
    if allow_postmaster and text[:12].lower() == "<postmaster>":
        return Path("Postmaster", ""), text[12:]
    m = _PATH.match(text)
    if m is None:
        raise CommandError(R.R501_BAD_ADDRESS)
    end = m.end()
    # The limit is in octets.  An ASCII path (str.isascii() reads a flag) has as many
    # octets as characters; only a UTF-8 one needs encoding to count them.
    if end > MAX_PATH or (not text.isascii() and len(text[:end].encode("utf-8")) > MAX_PATH):
        raise CommandError(R.R501_PATH_TOO_LONG)
    local, domain = m.groups()  # one call for both groups, by position: (local, domain)
    if local is None:
        if not allow_null:
            raise CommandError(R.R501_BAD_ADDRESS)
        return Path("", ""), text[end:]
    if local[0] == '"':
        local = canonical_quoted(local)
    else:
        local = lax_local(local)
    if domain is None:
        if not allow_no_domain:
            raise CommandError(R.R501_BAD_ADDRESS)
        return Path(local, ""), text[end:]
    if domain[0] == "[":
        _check_literal(domain)
    elif (len(domain) > MAX_LABEL or not domain.isascii()) and any(map(_label_too_long, domain.split("."))):
        raise CommandError(R.R501_BAD_ADDRESS)
    return Path(f"{local}@{domain}", domain.lower()), text[end:]


def _label_too_long(label: str) -> bool:
    """Over 63 octets in DNS: an internationalised label is its A-label there
    (RFC 5890 2.3.2.1), "xn--" and the Punycode of its characters."""
    if label.isascii():
        return len(label) > MAX_LABEL
    return 4 + len(label.encode("punycode")) > MAX_LABEL


def lax_local(local: str) -> str:
    """A local part as a path or a ``[mailboxes]`` key has it: one that RFC 5321's
    Dot-string refuses only for its dots (``u..v``, ``.u``, ``u.``) is quoted, the one
    form in which it is valid, as Postfix writes it in the headers it adds.  Senders
    with such addresses exist (old Japanese mobile carriers' are the known case), and a
    501 bounces their mail for good."""
    if local[:1] != '"' and (local[:1] == "." or local[-1:] == "." or ".." in local):
        return f'"{local}"'
    return local


def canonical_quoted(local: str) -> str:
    """A quoted local part in its one form: ``"alice"`` and ``"al\\ice"`` are the mailbox
    ``alice`` (RFC 5321 4.1.2: a quoted string that needs no quoting is the same local
    part), so it meets ``[mailboxes]`` and the log as that; one that does need quoting
    keeps it, with backslashes only before ``"`` and ``\\``, as Postfix writes it."""
    inner = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if _DOT_STRING.fullmatch(inner):
        return inner
    return '"' + inner.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_address_literal(text: str) -> bool:
    """``[...]`` that RFC 5321 4.1.3 allows, as a path's domain would be checked."""
    if not _LITERAL.fullmatch(text):  # the brackets, and what may stand between them
        return False
    try:
        _check_literal(text)
    except CommandError:
        return False
    return True


def _check_literal(literal: str) -> None:
    """RFC 5321 4.1.3: an IPv4 or an IPv6 address literal.  A General-address-literal's
    tag must be registered with IANA, and IPv6 is the only one that is."""
    inner = literal[1:-1]
    ok = _ipv6_literal(inner[5:]) if inner[:5].lower() == "ipv6:" else _ipv4_literal(inner)
    if not ok:
        raise CommandError(R.R501_BAD_ADDRESS)


def _ipv4_literal(text: str) -> bool:
    """Snum "." Snum "." Snum "." Snum; Snum = 1*3DIGIT, 0 to 255 (leading zeros allowed,
    which Python's ipaddress refuses)."""
    return bool(_IPV4_LITERAL.match(text)) and max(map(int, text.split("."))) <= 255


def _ipv6_literal(text: str) -> bool:
    """RFC 5321 4.1.3's IPv6-addr, written out: Python's ipaddress is laxer ("::" for a
    single group, as in 1:2:3:4:5:6:7::, where the RFC allows at most 6 groups beside
    it; a zone id) and stricter (no leading zero in an IPv4 part, which Snum allows)."""
    groups = 8
    if "." in text:  # IPv6v4-full or -comp: the IPv4 address stands for two groups
        text, _, v4 = text.rpartition(":")
        if not _ipv4_literal(v4):
            return False
        groups = 6
        if text.endswith(":"):  # "::" right before the IPv4 part: put its colon back
            text += ":"
    if "::" in text:
        left, _, right = text.partition("::")
        parts = (left.split(":") if left else []) + (right.split(":") if right else [])
        limit = groups - 2  # "::" stands for at least two groups
        return len(parts) <= limit and all(_IPV6_HEX.match(p) for p in parts)
    parts = text.split(":")
    return len(parts) == groups and all(_IPV6_HEX.match(p) for p in parts)


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters after a path: `` KEY[=VALUE]`` pairs; keys upper-cased."""
    if not text:
        return {}
    if "\t" in text:  # a tab separates as a space does (see split_words)
        text = text.replace("\t", " ")
    if text[0] != " ":
        raise CommandError(R.R501_BAD_ADDRESS)
    params: dict[str, str | None] = {}
    # RFC 5321 4.1.2: SP between parameters (several are let pass, as many clients send
    # them); str.split() would also split at a VT, FF, NBSP or U+2028.
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise CommandError(R.R501_SYNTAX)
        key = key.upper()
        if key in params:
            raise CommandError(R.R501_SYNTAX)
        params[key] = value if eq else None
    return params


def split_words(text: str) -> tuple[str, str]:
    """The first word of ``text`` and the rest, where a tab or several blanks follow the
    word: any run of spaces and tabs separates, as one space does, as in Postfix, which
    splits a command on any blank (RFC 5321's and RFC 4954's grammars have one space).
    A line that begins with a blank stays no command (its first word is ""): the checks
    of a line's first octets (DATA with text behind it, the AUTH mask) read it as sent."""
    for i, c in enumerate(text):
        if c == " " or c == "\t":
            return text[:i], text[i:].lstrip(" \t")
    return text, ""


def split_prefix(arg: str, prefix: str) -> str | None:
    """``FROM:`` / ``TO:`` (any case), then optional blanks as many clients send."""
    n = len(prefix)
    if arg[:n].upper() != prefix:
        return None
    return arg[n:].lstrip(" \t")
