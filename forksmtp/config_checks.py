"""Checking one config value: converters, validators and the ConfigError a bad value becomes.

A converter takes the raw TOML value and the base directory for relative paths and returns the
converted value; a validator takes that converted value and returns it, possibly normalised.
Both raise ``ValueError(problem)``, which ``_convert`` turns into a ``ConfigError`` naming the
file, the key and the value.  Validation only looks: it creates nothing.

The key table that says which key gets which converter and validator is ``forksmtp.config``.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import ipaddress
import json
import math
import os
import pwd
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass

from forksmtp import process
from forksmtp.listeners import ListenAddr, clash, parse_listen
from forksmtp.quoting import toml_string
from forksmtp.smtp.commands import is_address_literal, lax_local


class ConfigError(Exception):
    """An invalid config; ``str()`` is one line: ``FILE: KEY = VALUE: PROBLEM``."""

    def __init__(self, file: str, key: str | None, value: object, problem: str) -> None:
        super().__init__(file, key, value, problem)
        self.file, self.key, self.value, self.problem = file, key, value, problem

    def __str__(self) -> str:
        parts = [self.file or "built-in defaults"]
        if self.key:
            parts.append(self.key if self.value is None else f"{self.key} = {_show(self.value)}")
        parts.append(self.problem)
        return ": ".join(parts)


_SHOWN_BITS = 256  # far below the 4,300 decimal digits Python writes at most
_SHOWN_LENGTH = 80  # a value shown longer than this is cut to its first 77 characters and "..."


def _show(value: object) -> str:
    """A value as it would be written in TOML, cut short for one-line messages."""
    text = ""
    for piece in _toml_pieces(value):  # only as much as is shown: a list may be long, or deep
        text += piece
        if len(text) > _SHOWN_LENGTH:
            return text[:_SHOWN_LENGTH - 3] + "..."
    return text


def _toml_pieces(value: object) -> Iterator[str]:
    """``value`` in TOML's own form (``inf``, ``1979-05-27T07:32:00Z``, ``{a = 1}``), in
    pieces: a TOML datetime is no string, and must not look like one."""
    if isinstance(value, bool):
        yield "true" if value else "false"
    elif isinstance(value, int):
        # Python refuses to write an integer of more than 4,300 digits in decimal, and
        # TOML's hexadecimal, octal and binary ones have no such bound.
        yield str(value) if value.bit_length() <= _SHOWN_BITS else f"<an integer of {value.bit_length():,} bits>"
    elif isinstance(value, float) and not math.isfinite(value):
        yield "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    elif isinstance(value, float):
        yield repr(value)
    elif isinstance(value, str):
        yield toml_string(value[:_SHOWN_LENGTH])  # escapes only lengthen it: cut the same
    elif isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        text = value.isoformat()
        yield (text[:-6] + "Z") if isinstance(value, datetime.datetime) and text.endswith("+00:00") else text
    elif isinstance(value, (list, tuple)):
        yield "["
        for i, item in enumerate(value):
            yield ", " if i else ""
            yield from _toml_pieces(item)
        yield "]"
    elif isinstance(value, Mapping):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield (", " if i else "") + _toml_key(str(key)[:_SHOWN_LENGTH]) + " = "
            yield from _toml_pieces(item)
        yield "}"
    else:
        yield str(value)[:_SHOWN_LENGTH + 1]


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(name: str) -> str:
    """A key as TOML would write it: bare when it can be, else quoted, so that a name
    holding a newline or a dot cannot break or bend the one-line message."""
    return name if _BARE_KEY.fullmatch(name) else toml_string(name)


@dataclass(frozen=True, slots=True)
class _Source:
    """Where one raw value came from: its file (or CLI) and the base for relative paths."""

    value: object
    file: str
    base: str


def _convert(dotted: str, src: _Source, kind: Callable, validate: Callable | None) -> Any:
    try:
        value = kind(src.value, src.base)
        return validate(value) if validate else value
    except ValueError as exc:
        raise ConfigError(src.file, dotted, src.value, str(exc)) from None


# -- types: (raw value, base directory) -> converted value; ValueError(problem) when wrong --

def _integer(value: object, base: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass
        raise ValueError("must be an integer")
    if value.bit_length() > 63:  # what the C calls it ends up in take
        raise ValueError("must be an integer of a sensible size")
    return value


def _number(value: object, base: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    try:
        number = float(value)  # an integer of 400 digits has no float
    except OverflowError:
        raise ValueError("must be a number of a sensible size") from None
    if not math.isfinite(number):
        raise ValueError("must be a number")
    return number


def _boolean(value: object, base: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string(value: object, base: str) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError("must be a string")
    return value


def _strings(value: object, base: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _listens(value: object, base: str) -> tuple[ListenAddr, ...]:
    addrs: list[ListenAddr] = []
    for text in _strings(value, base):
        try:
            addr = parse_listen(text)
        except ValueError as exc:
            raise ValueError(f"{_show(text)}: {exc}") from None
        if addr in addrs:
            raise ValueError(f"{addr} is listed twice")
        addrs.append(addr)
    problem = clash(addrs)
    if problem:
        raise ValueError(problem)
    return tuple(addrs)


def _path(value: object, base: str) -> str:
    text = _string(value, base)
    if not text:
        return ""
    path = os.path.expanduser(text)
    if not base and not os.path.isabs(path):  # relative to a working directory that is gone
        raise ValueError("is a relative path, and the working directory it would be relative "
                         "to no longer exists (removed after the start): give an absolute one")
    return os.path.abspath(os.path.join(base, path))


def working_directory() -> str:
    """The working directory, or "" once it is gone (removed after the start, as a
    deploy replaces a release directory): only a relative path needs it, and _path then
    refuses that path by its key, where os.getcwd() failed a whole reload unnamed."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return ""


# -- validators: converted value -> value (possibly normalised); ValueError(problem) --

# Validators see what the converter made of a TOML value: its type depends on the key.
def _check(ok: Callable[[Any], object], problem: str) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        if not ok(value):
            raise ValueError(problem)
        return value
    return validate


def _at_least(n: int) -> Callable[[Any], Any]:
    return _check(lambda v: v >= n, f"must be an integer >= {n}")


def _between(low: int, high: int) -> Callable[[Any], Any]:
    return _check(lambda v: low <= v <= high, f"must be an integer from {low} to {high}")


def _one_of(*choices: str) -> Callable[[Any], Any]:
    return _check(lambda v: v in choices, "must be one of " + ", ".join(map(json.dumps, choices)))


_non_empty = _check(bool, "must list at least one address")
_given_path = _check(bool, "must not be empty")
_positive = _check(lambda v: v > 0, "must be a number > 0")
_not_negative = _check(lambda v: v >= 0, "must be a number >= 0")
#: The longest timeout taken: a day.  Waits end in poll(2), whose limit is 24.8 days in
#: milliseconds, and no SMTP wait has a reason to approach even a day.
MAX_TIMEOUT = 86400
_timeout = _check(lambda v: 0 < v <= MAX_TIMEOUT, f"must be a number > 0 and <= {MAX_TIMEOUT} (a day)")
#: A client waits 5 minutes for the greeting (RFC 5321 4.5.3.2.1): a longer delay would
#: turn every client away as an early talker or a timeout.
_greeting_delay = _check(lambda v: 0 <= v < 300, "must be a number >= 0 and < 300 (clients wait 5 minutes for the greeting)")
_share = _check(lambda v: 0 < v <= 1, "must be a number > 0 and <= 1")
_share_below_one = _check(lambda v: 0 <= v < 1, "must be a number >= 0 and < 1")
# A name we put in the greeting and Received headers: a domain or an address literal.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?", re.ASCII)


def _is_hostname(value: str) -> bool:
    """A domain name of labels of 63 octets at most (RFC 1035 2.3.4), or an address
    literal that RFC 5321 4.1.3 allows: what a client may have to send back in a path."""
    if value.startswith("["):
        return is_address_literal(value)
    return bool(_HOSTNAME.fullmatch(value)) and all(len(label) <= 63 for label in value.rstrip(".").split("."))


_hostname = _check(_is_hostname, "must be a domain name (labels of 63 octets at most) or an "
                                 "address literal such as [192.0.2.1] or [IPv6:2001:db8::1]")
_DOMAIN = re.compile(r"[^\s@<>\[\]\\\",;:()]+")


def _log_level(value: str) -> str:
    return _one_of("debug", "info", "warning", "error")(value.lower())


def _domains(values: tuple[str, ...]) -> tuple[str, ...]:
    """Lower-cased, each with its other spelling (an internationalised domain as its
    A-label and its U-label): an SMTPUTF8 client may write either."""
    for domain in values:
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(f"{_show(domain)} is not a domain")
    names = [d.lower().rstrip(".") for d in values]
    for domain, name in zip(values, names):
        if "" in name.split("."):  # ".", "..", ".example", "a..b": no domain matches it
            raise ValueError(f"{_show(domain)} is not a domain")
    return tuple(dict.fromkeys(spelling for name in names for spelling in (name, *_other_spelling(name))))


def _other_spelling(name: str) -> tuple[str, ...]:
    """The A-label form of a UTF-8 domain, or the UTF-8 form of one with A-labels; none
    where Python's IDNA 2003 codec does not convert both ways to the same name (it
    maps "ß" to "ss", a different domain under IDNA 2008)."""
    try:
        if not name.isascii():
            other = name.encode("idna").decode("ascii")
            return (other,) if other.encode("ascii").decode("idna") == name else ()
        if "xn--" in name:
            other = name.encode("ascii").decode("idna")
            return (other,) if other.encode("idna").decode("ascii") == name else ()
    except UnicodeError:
        pass
    return ()


def _address(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or not local or not _DOMAIN.fullmatch(domain) or any(c.isspace() or c in "<>" for c in local):
        raise ValueError("not an address (local@domain)")
    # As a client's path has it: u..v@x.test is the mailbox "u..v"@x.test.
    return f"{lax_local(local)}@{domain.rstrip('.')}".lower()


def _networks(values: tuple[str, ...]) -> tuple[str, ...]:
    try:
        nets = [ipaddress.ip_network(v, strict=False) for v in values]
    except ValueError as exc:
        raise ValueError(f"not a network (CIDR): {exc}") from None
    for written, net in zip(values, nets):
        _matchable(written, net)
    return tuple(str(net) for net in nets)


def _matchable(written: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """Refuse a network that would not match what it says: an IPv4 client of a
    dual-stack socket is matched by its IPv4 form, so an IPv4-mapped network matches no
    one; the address accept(2) gives carries no zone, so a zone would be ignored and its
    network matched on every interface."""
    if not isinstance(net, ipaddress.IPv6Network):
        return
    if net.network_address.scope_id:
        unzoned = ipaddress.ip_network(f"{str(net.network_address).partition('%')[0]}/{net.prefixlen}")
        raise ValueError(f"{toml_string(written)}: a zone cannot be matched: clients are matched "
                         f"by address alone, on every interface: write {unzoned}")
    mapped = net.network_address.ipv4_mapped
    if mapped is not None and net.prefixlen >= 96:
        raise ValueError(f"{toml_string(written)}: IPv4 clients are matched by their IPv4 "
                         f"address: write {ipaddress.ip_network(f'{mapped}/{net.prefixlen - 96}')}")


def _user(name: str) -> str:
    return _account(name, pwd.getpwnam, pwd.getpwuid, "user")


def _group(name: str) -> str:
    return _account(name, grp.getgrnam, grp.getgrgid, "group")


def _account(name: str, by_name: Callable, by_id: Callable, what: str) -> str:
    if name:
        try:
            by_id(int(name)) if name.isdigit() else by_name(name)
        except (KeyError, OverflowError):
            raise ValueError(f"no such {what}") from None
    return name


def _parent_exists(path: str) -> str:
    """A file we create later: its directory must exist now."""
    if path and os.path.isdir(path):
        raise ValueError("is a directory")
    if path and not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"directory {os.path.dirname(path)} does not exist")
    return path


def _writable_file(path: str) -> str:
    """A file the server writes: it, or its directory when it is still to be made, must
    be writable now, through any symlink (a dangling one, a read-only filesystem)."""
    if not path:
        return path
    real = os.path.realpath(path)
    _parent_exists(real)
    if os.path.exists(real):
        if not os.access(real, os.W_OK):
            raise ValueError(f"{real} is not writable")
    elif not os.access(os.path.dirname(real), os.W_OK | os.X_OK):
        raise ValueError(f"directory {os.path.dirname(real)} is not writable")
    return path


def _replaceable_file(path: str) -> str:
    """A file the server replaces by renaming a new one over it (the pidfile, the stats
    file): its directory must be writable, whether or not the file exists, and the
    rename replaces a symlink itself, so the directory is the one the path names."""
    if not path:
        return path
    _parent_exists(path)
    directory = os.path.dirname(path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"directory {directory} is not writable (the file is replaced by a rename)")
    try:
        # Through a symlink, as the pidfile is read for an old pid.  The rename would put
        # a regular file in place of a FIFO, a socket or a device (stats_file =
        # "/dev/null" would take /dev/null out of /dev).
        process.refuse_non_regular(path)
    except process.NotRegularFile:
        raise ValueError(f"{path} is not a regular file") from None
    except OSError:
        pass  # none yet, or not to be looked at now: the start says what it meets
    return path


def own_dirs(path: str) -> list[str]:
    """A Maildir's own directories: itself, tmp/, new/ and cur/."""
    return [path, *(os.path.join(path, sub) for sub in ("tmp", "new", "cur"))]


def creatable_dir(path: str) -> str:
    """A Maildir we may create later: the nearest existing ancestor must be a writable dir."""
    if not path:
        raise ValueError("must not be empty")
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    where = "" if existing == path else f"{existing} "
    if not os.path.isdir(existing):
        raise ValueError(f"{where}is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{where}is not writable")
    for sub in ("tmp", "new", "cur"):  # what the server would make inside it
        inner = os.path.join(path, sub)
        if sub != "cur" and os.path.islink(inner):
            raise ValueError(f"{inner} is a symlink, which is not followed")
        if os.path.lexists(inner) and not os.path.isdir(inner):
            raise ValueError(f"{inner} is not a directory")
    return path


def makeable_now(path: str) -> None:
    """What a start would make of the Maildir at ``path`` can be made now: a directory is
    made and removed again where the first missing one would go.  That finds what the
    permission bits do not show (a file system full or out of inodes, /proc).  Raises
    ValueError naming that directory; an existing Maildir needs nothing made."""
    missing = [d for d in own_dirs(path) if not os.path.isdir(d)]
    if not missing:
        return
    first, existing = missing[0], os.path.dirname(missing[0])
    while not os.path.lexists(existing):
        first, existing = existing, os.path.dirname(existing)
    try:
        probe = tempfile.mkdtemp(prefix=".forksmtp-check-", dir=existing)
    except OSError as exc:  # named as the start names it: the directory it would make
        raise ValueError(f"cannot make the Maildir: {first}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # made, so it goes: nothing to tell if it cannot
        os.rmdir(probe)


def _readable_file(path: str) -> str:
    """The resolved path is in the message: a relative name is read beside the config
    file, which is not always where the operator made it."""
    try:
        os.close(process.open_regular(path))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path
