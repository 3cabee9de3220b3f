"""Parsing of MAIL/RCPT arguments: RFC 5321 4.1.2 paths and ESMTP parameters.

Stateless and pure.  Errors are raised as ``CommandError`` carrying the reply to send.
Addresses with non-ASCII characters are parsed only when the caller says SMTPUTF8 is
in effect (RFC 6531); otherwise they get 553 5.6.7.
"""

from __future__ import annotations

import ipaddress
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
    quoted = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{u8}]|\\\\[\\x20-\\x7e])*"'
    let_dig = f"[A-Za-z0-9{u8}]"
    sub_domain = f"{let_dig}(?:[A-Za-z0-9\\-{u8}]*{let_dig})?"
    domain = f"{sub_domain}(?:\\.{sub_domain})*"
    literal = "\\[[\\x21-\\x5a\\x5e-\\x7e]+\\]"
    adl = f"@{domain}(?:,@{domain})*"
    # A source route needs a mailbox after it: "<@a:>" is no null path (RFC 5321 4.1.2).
    # The domain is optional here; parse_path refuses a path without one except where the
    # caller allows it (a sender, as Postfix does).
    path = f"<(?:(?:{adl}:)?(?P<local>{dot_string}|{quoted})(?:@(?P<domain>{domain}|{literal}))?)?>"
    return {"path": path, "dot_string": dot_string, "literal": literal}


_PATH: Final = re.compile(_grammar()["path"])
_LITERAL: Final = re.compile(_grammar()["literal"])
_DOT_STRING: Final = re.compile(_grammar()["dot_string"])
assert _PATH.groups == 2  # parse_path unpacks m.groups() as (local, domain)
_QUOTED_PAIR: Final = re.compile(r"\\(.)")
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE: Final = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")
_GENERAL_LITERAL: Final = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")
_IPV4_LITERAL: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


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
    if domain is None:
        if not allow_no_domain:
            raise CommandError(R.R501_BAD_ADDRESS)
        return Path(local, ""), text[end:]
    if domain[0] == "[":
        _check_literal(domain)
    return Path(f"{local}@{domain}", domain.lower()), text[end:]


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
    """RFC 5321 4.1.3: IPv4, IPv6: or a standardized-tag general literal."""
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:  # ipaddress takes a zone id ("fe80::1%eth0"); RFC 5321 does not
                raise ValueError(inner)
            ipaddress.IPv6Address(inner[5:])
        elif inner[:1].isdigit():
            # Snum = 1*3DIGIT, 0 to 255: leading zeros are allowed, which ipaddress refuses.
            if not _IPV4_LITERAL.fullmatch(inner) or max(map(int, inner.split("."))) > 255:
                raise ValueError(inner)
        elif not _GENERAL_LITERAL.match(inner):
            raise ValueError(inner)
    except ValueError:
        raise CommandError(R.R501_BAD_ADDRESS) from None


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters after a path: `` KEY[=VALUE]`` pairs; keys upper-cased."""
    if not text:
        return {}
    if text[0] != " ":
        raise CommandError(R.R501_BAD_ADDRESS)
    params: dict[str, str | None] = {}
    # RFC 5321 4.1.2: SP between parameters (several are let pass, as many clients send
    # them); str.split() would also split at a TAB, VT, FF, NBSP or U+2028.
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


def split_prefix(arg: str, prefix: str) -> str | None:
    """``FROM:`` / ``TO:`` (any case), then optional spaces as many clients send."""
    n = len(prefix)
    if arg[:n].upper() != prefix:
        return None
    return arg[n:].lstrip(" ")
