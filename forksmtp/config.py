"""The TOML config file -> frozen dataclasses, strictly validated.

Every key lives in one table, ``_KEYS``: (section, key, type, default, validator).  Loading
walks that table, so an unknown key, a wrong type or a value out of range always becomes a
``ConfigError`` naming the file, the key and the value -- never a silent typo.

Paths written in the file are relative to the file's directory; paths given on the command
line and built-in defaults (``./Maildir``) are relative to the working directory.  Every
path comes out absolute, so a later chdir or reload cannot change its meaning.  Validation
only looks: it creates nothing.  How one value is converted and checked is in
``forksmtp.config_checks``; this module holds the key table and the rules across keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from forksmtp import process
from forksmtp.config_checks import (ConfigError, _address, _at_least, _between, _boolean, _convert,
                                    creatable_dir, _domains, _given_path, _group, _hostname, _integer,
                                    _listens, _log_level, _networks, _non_empty, _not_negative,
                                    _other_spelling,
                                    _greeting_delay, _number, _one_of, _parent_exists, _path,
                                    _positive, _readable_file, _share, _share_below_one, _Source,
                                    _string, _strings,
                                    _replaceable_file, _timeout, _user, _writable_file,
                                    _toml_key, working_directory)
from forksmtp.growth import SPARE_SHARE
from forksmtp.listeners import ListenAddr, clash, parse_listen

CLI = "command line"  # the "file" of values that came from flags


def _default_listen() -> tuple[ListenAddr, ...]:
    return (parse_listen("127.0.0.1:2525"),)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[ListenAddr, ...] = field(default_factory=_default_listen)
    hostname: str = field(default_factory=socket.gethostname)
    workers: int = 4
    max_workers: int = 64
    max_connections: int = 50
    max_connections_per_ip: int = 10
    max_connection_rate: int = 0  # new connections per client address and minute; 0: off
    limit_exceptions: tuple[str, ...] = ()  # CIDRs exempt from the two limits above
    graceful_timeout: float = 30.0
    pidfile: str = ""
    stats_file: str = ""
    user: str = ""
    group: str = ""
    min_spare_workers: int = 1
    max_spare_workers: int = 8
    spare_cpu_share: float = SPARE_SHARE  # idle CPU share a busy pool needs for a spare; 0: always
    max_sessions_per_worker: int = 10000
    max_sessions_jitter: int = 1000
    max_idle: float = 300.0  # retire surplus idle workers idle this long
    stress_threshold: float = 0.8  # busy share of max_workers that switches stress mode on
    greeting_delay: float = 0.0  # early-talker detection window before the 220
    reject_early_talkers: bool = True


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_size: int = 10485760
    max_recipients: int = 100
    max_errors: int = 10
    max_received_headers: int = 100
    bare_newline: str = "reject"  # "reject" | "normalize"
    normalize_networks: tuple[str, ...] = ()  # CIDRs where bare LF is normalised instead
    stress_max_errors: int = 1
    max_junk_commands: int = 100  # EHLO, HELO, NOOP, RSET, VRFY, HELP free between messages stored
    stress_max_junk_commands: int = 1


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    command: float = 300.0
    data_block: float = 180.0
    data_done: float = 600.0
    session: float = 3600.0  # whole-session deadline
    min_data_rate: int = 500  # bytes/s below which DATA is cut off
    stress_command: float = 10.0


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    maildir: str = field(default_factory=lambda: os.path.abspath("Maildir"))
    local_domains: tuple[str, ...] = ()  # lower-case; empty: every domain is local
    fsync: bool = True
    mailboxes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    file: str = ""  # empty: stderr


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: str
    key_file: str
    min_version: str = "TLSv1.2"
    implicit_listen: tuple[ListenAddr, ...] = ()
    require_tls: bool = False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    password_file: str
    required: bool = False
    allow_insecure: bool = False
    max_checks: int = 0  # password checks at once, all workers together; 0: one per CPU


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None
    path: str = ""  # absolute path of the config file, "" for built-in defaults
    # What messages show: the file as the operator named it (-c), and each key's value as
    # written in the file or given as a flag (where a key was set, and to what).
    name: str = field(default="", compare=False)
    written: Mapping[str, _Source] = field(default_factory=lambda: MappingProxyType({}), compare=False)


REQUIRED = object()  # default of keys a present section must set

#: Worker processes at most: Apache prefork's ServerLimit is 20,000, and each worker
#: here takes about 2 MiB of memory of its own and a scoreboard slot (twice, for reloads).
MAX_WORKERS = 10_000

# (section, key, type, default as written in TOML, validator).  Defaults go through the same
# conversion as file values; tests check they agree with the dataclass defaults above.
_KEYS: tuple[tuple[str, str, Callable, object, Callable | None], ...] = (
    ("server", "listen", _listens, ["127.0.0.1:2525"], _non_empty),
    ("server", "hostname", _string, socket.gethostname, _hostname),
    ("server", "workers", _integer, 4, _at_least(1)),
    ("server", "max_workers", _integer, 64, _between(1, MAX_WORKERS)),  # a process each
    ("server", "max_connections", _integer, 50, _at_least(1)),
    ("server", "max_connections_per_ip", _integer, 10, _at_least(1)),
    ("server", "max_connection_rate", _integer, 0, _at_least(0)),
    ("server", "limit_exceptions", _strings, [], _networks),
    ("server", "graceful_timeout", _number, 30, _not_negative),
    ("server", "pidfile", _path, "", _replaceable_file),
    ("server", "stats_file", _path, "", _replaceable_file),
    ("server", "user", _string, "", _user),
    ("server", "group", _string, "", _group),
    ("server", "min_spare_workers", _integer, 1, _at_least(0)),
    ("server", "max_spare_workers", _integer, 8, _at_least(1)),
    ("server", "spare_cpu_share", _number, SPARE_SHARE, _share_below_one),
    ("server", "max_sessions_per_worker", _integer, 10000, _at_least(1)),
    ("server", "max_sessions_jitter", _integer, 1000, _at_least(0)),
    ("server", "max_idle", _number, 300, _positive),
    ("server", "stress_threshold", _number, 0.8, _share),
    ("server", "greeting_delay", _number, 0, _greeting_delay),
    ("server", "reject_early_talkers", _boolean, True, None),
    ("limits", "max_message_size", _integer, 10485760, _at_least(1)),
    ("limits", "max_recipients", _integer, 100, _at_least(1)),
    ("limits", "max_errors", _integer, 10, _at_least(1)),
    ("limits", "max_received_headers", _integer, 100, _at_least(1)),
    ("limits", "bare_newline", _string, "reject", _one_of("reject", "normalize")),
    ("limits", "normalize_networks", _strings, [], _networks),
    ("limits", "stress_max_errors", _integer, 1, _at_least(1)),
    ("limits", "max_junk_commands", _integer, 100, _at_least(0)),
    ("limits", "stress_max_junk_commands", _integer, 1, _at_least(0)),
    ("timeouts", "command", _number, 300, _timeout),
    ("timeouts", "data_block", _number, 180, _timeout),
    ("timeouts", "data_done", _number, 600, _timeout),
    ("timeouts", "session", _number, 3600, _timeout),
    ("timeouts", "min_data_rate", _integer, 500, _at_least(0)),
    ("timeouts", "stress_command", _number, 10, _timeout),
    ("delivery", "maildir", _path, "./Maildir", creatable_dir),
    ("delivery", "local_domains", _strings, [], _domains),
    ("delivery", "fsync", _boolean, True, None),
    ("log", "level", _string, "info", _log_level),
    ("log", "file", _path, "", _writable_file),
    ("tls", "cert_file", _path, REQUIRED, _readable_file),
    ("tls", "key_file", _path, REQUIRED, _readable_file),
    ("tls", "min_version", _string, "TLSv1.2", _one_of("TLSv1.2", "TLSv1.3")),
    ("tls", "implicit_listen", _listens, [], None),
    ("tls", "require_tls", _boolean, False, None),
    ("auth", "password_file", _path, REQUIRED, _parent_exists),
    ("auth", "required", _boolean, False, None),
    ("auth", "allow_insecure", _boolean, False, None),
    ("auth", "max_checks", _integer, 0, _at_least(0)),
)

_SECTIONS: dict[str, type] = {
    "server": ServerConfig, "limits": LimitsConfig, "timeouts": TimeoutsConfig,
    "delivery": DeliveryConfig, "log": LogConfig, "tls": TLSConfig, "auth": AuthConfig,
}
_OPTIONAL = frozenset({"tls", "auth"})  # absent section: feature off (None)
_KNOWN = frozenset(f"{s}.{k}" for s, k, *_ in _KEYS)


def load_config(path: str | None, overrides: Mapping[str, object] | None = None, *,
                mailbox_storage: bool = True, shown_as: str = "") -> Config:
    """Read, merge (overrides win) and validate; raises ConfigError.  Without
    ``mailbox_storage``, a ``[mailboxes]`` Maildir that cannot be made or written now is
    no error: a start or a reload goes on without it (its mail gets 451, and the master
    logs why), as one mailbox's storage must not hold up the others' mail.  Errors name
    the file as ``shown_as``, if given (a reload: as the operator named it at the
    start), else as ``path``."""
    label = (shown_as or path) if path else ""
    raw = read_toml(path, label) if path else {}
    base = os.path.dirname(os.path.abspath(path)) if path else working_directory()
    _reject_unknown(raw, label)
    sources = {
        f"{s}.{k}": _Source(v, label, base)
        for s, table in raw.items() if s != "mailboxes" for k, v in table.items()
    }
    for key, value in (overrides or {}).items():
        if key not in _KNOWN:
            raise ConfigError(CLI, key, value, "unknown key" + _suggest_key(key))
        sources[key] = _Source(value, CLI, working_directory())
    # A section turns its feature on by being there, even empty (its required keys
    # then say what is missing), never by having keys.
    present = {key.partition(".")[0] for key in sources} | (raw.keys() & _OPTIONAL)
    built = {name: _build(name, sources, label) for name in _SECTIONS
             if name not in _OPTIONAL or name in present}
    mailboxes = _mailboxes(raw.get("mailboxes", {}), label, base, mailbox_storage)
    built["delivery"] = dataclasses.replace(built["delivery"], mailboxes=mailboxes)
    cfg = Config(**built, path=os.path.abspath(path) if path else "", name=label,
                 written=MappingProxyType(sources))
    _cross_check(cfg, sources, label)
    return cfg


def _line_shown(source: str, message: str) -> str:
    """tomllib names the line, not the key: ': <that line>' shows both (a key given
    twice, a value left out), or "" when the line cannot be had."""
    m = re.search(r"at line (\d+)", message)
    try:
        # Split at LF alone, as tomllib counts lines: splitlines() also breaks at U+2028
        # and U+0085, which TOML allows in comments and strings.
        text = source.split("\n")[int(m.group(1)) - 1].strip() if m else ""
    except IndexError:
        return ""
    if not text:
        return ""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:80])
    return f": {shown}{'...' if len(text) > 80 else ''}"


MAX_CONFIG_OCTETS = 16 << 20  # a few KiB, or some MiB with a [mailboxes] table of 100,000 lines


def read_toml(path: str, label: str = "") -> dict:
    """The TOML table of the file at ``path``; ConfigError naming the file (as ``label``,
    if given) otherwise.
    Opened as the TLS and password files are (a FIFO there would hold a reload, with the
    master handling no signal meanwhile) and read to a bound (/dev/zero has no end).
    A pipe (``-c <(envsubst < tpl)``) is refused too: SIGHUP could never read it again."""
    shown = label or path
    try:
        data = process.read_regular(path, MAX_CONFIG_OCTETS)
    except OSError as exc:
        raise ConfigError(shown, None, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_OCTETS:
        raise ConfigError(shown, None, None, f"larger than {MAX_CONFIG_OCTETS >> 20} MiB: not a config file")
    try:
        # A BOM, as Windows editors save UTF-8, is no TOML: tomllib refuses it as an
        # "invalid statement" at line 1.  Skipped, as the password file skips it.
        source = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ConfigError(shown, None, None, "invalid TOML: not UTF-8 text") from None
    try:
        return tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, None, None, f"invalid TOML: {exc}{_line_shown(source, str(exc))}") from None
    except ValueError:  # Python's own bound on the digits of an int it converts
        raise ConfigError(shown, None, None, f"invalid TOML: a number of more than "
                                            f"{sys.get_int_max_str_digits():,} digits") from None
    except RecursionError:  # arrays or inline tables nested a thousand deep
        raise ConfigError(shown, None, None, "invalid TOML: nested too deeply") from None


def _reject_unknown(raw: dict, file: str) -> None:
    for section, table in raw.items():
        if section not in _SECTIONS and section != "mailboxes":
            if not isinstance(table, dict):  # a key above the first [section]
                raise ConfigError(file, _toml_key(section), table, "key outside any section" + _suggest_key(section))
            hint = _did_you_mean(difflib.get_close_matches(section, [*_SECTIONS, "mailboxes"], 1), "[{}]")
            raise ConfigError(file, f"[{_toml_key(section)}]", None, "unknown section" + hint)
        if not isinstance(table, dict):
            raise ConfigError(file, section, table, f"must be a table, written [{section}]")
        if section == "mailboxes":
            continue
        for key, value in table.items():
            dotted = f"{section}.{key}"
            if dotted not in _KNOWN:
                raise ConfigError(file, f"{section}.{_toml_key(key)}", value, "unknown key" + _suggest_key(dotted))


def _suggest_key(name: str) -> str:
    """Prefer the same key in another section (a key put in the wrong place), else a near miss."""
    leaf = name.rpartition(".")[2]
    moved = sorted(k for k in _KNOWN if k.rpartition(".")[2] == leaf)
    return _did_you_mean(moved or difflib.get_close_matches(name, sorted(_KNOWN), 1, cutoff=0.7))


def _did_you_mean(found: list[str], form: str = "{}") -> str:
    return f" (did you mean {form.format(found[0])}?)" if found else ""


def _build(section: str, sources: dict[str, _Source], file: str) -> Any:
    values = {}
    for sec, key, kind, default, validate in _KEYS:
        if sec != section:
            continue
        dotted = f"{sec}.{key}"
        src = sources.get(dotted)
        default_used = src is None
        if src is None:
            if default is REQUIRED:
                raise ConfigError(file, dotted, None, f"required when [{section}] is present")
            src = _Source(default() if callable(default) else default, file, working_directory())
        try:
            values[key] = _convert(dotted, src, kind, validate)
        except ConfigError as exc:
            if default_used:  # the file did not set it: do not blame the file alone
                where = f", relative to the working directory {src.base}" if kind is _path else ""
                exc.problem += f" (the built-in default: the key is not set{where})"
            raise
    return _SECTIONS[section](**values)


def _mailboxes(table: dict, file: str, base: str, storage: bool = True) -> Mapping[str, str]:
    boxes: dict[str, str] = {}
    for address, maildir in table.items():
        dotted = f"mailboxes.{json.dumps(address, ensure_ascii=False)}"
        try:
            key = _address(address)
            if key in boxes:
                raise ValueError(f"{key} is listed twice (addresses are case-insensitive)")
        except ValueError as exc:
            raise ConfigError(file, dotted, maildir, str(exc)) from None
        boxes[key] = _convert(dotted, _Source(maildir, file, base), _path,
                              creatable_dir if storage else _given_path)
    # An internationalised domain's other spelling (A-label or U-label) names the same
    # mailbox, as it names the same local domain (config_checks._domains): an SMTPUTF8
    # client may write either.  A key written in both spellings must agree.
    for key, path in list(boxes.items()):
        local, _, domain = key.rpartition("@")
        for other in _other_spelling(domain):
            twin = f"{local}@{other}"
            if boxes.setdefault(twin, path) != path:
                raise ConfigError(file, f"mailboxes.{json.dumps(twin, ensure_ascii=False)}", boxes[twin],
                                  f"the same mailbox as {key}, which names another Maildir")
    return MappingProxyType(boxes)


def _addresses(mailboxes: Mapping[str, str]) -> int:
    """How many addresses ``mailboxes`` routes, an internationalised domain's two
    spellings (both keys of the table) counted as the one address they are."""
    return len({frozenset({key, *(f"{local}@{other}" for other in _other_spelling(domain))})
                for key in mailboxes for local, _, domain in [key.rpartition("@")]})


def source_of(cfg: Config, key: str, overrides: Mapping[str, object] | None) -> str:
    """Where the value of ``key`` came from, as errors name it: the command line when a
    flag set it, else the config file as the operator named it (or the built-in
    defaults, without one)."""
    if overrides and key in overrides:
        return CLI
    return cfg.name or cfg.path or "built-in defaults"


def key_error(cfg: Config, key: str, overrides: Mapping[str, object] | None, problem: str) -> ConfigError:
    """A ConfigError for a value that loaded but then failed in use (a certificate that
    does not load, a pidfile another process holds), named as a loading error is: where
    it was set, the key, and the value as written there (for a key left at its built-in
    default, the value it resolved to).  Where it was set is known from the config
    itself; ``overrides`` only names the source of a key it does not record."""
    src = cfg.written.get(key)
    if src is not None:
        return ConfigError(src.file, key, src.value, problem)
    section, _, name = key.partition(".")
    return ConfigError(source_of(cfg, key, overrides), key, getattr(getattr(cfg, section), name), problem)


def maildir_keys(delivery: DeliveryConfig) -> dict[str, str]:
    """Each configured Maildir path and the keys that name it, as messages show them:
    ``mailboxes."a@x.test", "b@x.test"``, or ``delivery.maildir`` for the catch-all's."""
    keys: dict[str, str] = {}
    for address, path in delivery.mailboxes.items():
        keys[path] = f'{keys[path]}, "{address}"' if path in keys else f'mailboxes."{address}"'
    keys[delivery.maildir] = "delivery.maildir"
    return keys


def _cross_check(cfg: Config, sources: dict[str, _Source], file: str) -> None:
    """Rules that involve two keys; the error names the key that is usually changed."""

    def fail(dotted: str, value: object, problem: str) -> None:
        src = sources.get(dotted)
        raise ConfigError(src.file if src else file, dotted, src.value if src else value, problem)

    s = cfg.server
    if s.workers > s.max_workers:
        fail("server.workers", s.workers, f"must be <= server.max_workers ({s.max_workers})")
    if s.min_spare_workers > s.max_spare_workers:
        fail("server.min_spare_workers", s.min_spare_workers,
             f"must be <= server.max_spare_workers ({s.max_spare_workers})")
    if cfg.tls:
        flag = sources.get("server.listen")
        listen = "server.listen (--listen on the command line)" if flag and flag.file == CLI else "server.listen"
        for addr in set(cfg.tls.implicit_listen) & set(s.listen):
            fail("tls.implicit_listen", [str(addr)], f"{addr} is also in {listen}")
        problem = clash(s.listen + cfg.tls.implicit_listen)  # each list alone is clash-free
        if problem:
            fail("tls.implicit_listen", [str(a) for a in cfg.tls.implicit_listen],
                 f"{problem} (server.listen)")
    if cfg.auth and cfg.auth.required and not cfg.tls and not cfg.auth.allow_insecure:
        fail("auth.required", True, "AUTH is offered only over TLS: add [tls] or set auth.allow_insecure")
    files = {"server.pidfile": s.pidfile, "server.stats_file": s.stats_file, "log.file": cfg.log.file,
             "auth.password_file": cfg.auth.password_file if cfg.auth else ""}
    # What the server only reads must not be what it writes either: a pidfile or a stats
    # file named as the configuration file or the TLS key replaced it, and every reload
    # after failed.  (The certificate and the key may be one file.)
    inputs = {"the configuration file": cfg.path}
    if cfg.tls:
        inputs.update({"tls.cert_file": cfg.tls.cert_file, "tls.key_file": cfg.tls.key_file})
    seen: dict[str, str] = {}
    for key, path in files.items():
        if not path:
            continue
        # The pidfile and the stats file are renamed over (a symlink there is replaced):
        # the path itself; the log and the password file are written through one.
        follows = key in ("log.file", "auth.password_file")
        real = os.path.realpath(path) if follows else os.path.abspath(path)
        if real in seen:  # one rename over another's file: the log went to an unlinked inode
            fail(key, path, f"is also {seen[real]}")
        seen[real] = key
        for name, other in inputs.items() if key != "auth.password_file" else ():
            if other and real in (os.path.abspath(other), os.path.realpath(other)):
                fail(key, path, f"is also {name}")
    domains = cfg.delivery.local_domains
    for address in cfg.delivery.mailboxes if domains else ():
        if address.rpartition("@")[2] not in domains:
            fail(f"mailboxes.{json.dumps(address, ensure_ascii=False)}", cfg.delivery.mailboxes[address],
                 "its domain is not in delivery.local_domains")


def summary(cfg: Config) -> str:
    """One line for ``--check``."""
    s, d = cfg.server, cfg.delivery
    parts = [
        "listen " + " ".join(str(a) for a in s.listen),
        f"{s.workers} worker{'s' if s.workers != 1 else ''} (max {s.max_workers})",
        f"maildir {d.maildir}",
    ]
    if d.mailboxes:
        n = _addresses(d.mailboxes)
        parts.append(f"{n} mailbox{'es' if n != 1 else ''}")
    if cfg.tls:
        implicit = " ".join(str(a) for a in cfg.tls.implicit_listen)
        parts.append("TLS" + (f" (implicit {implicit})" if implicit else ""))
    if cfg.auth:
        parts.append("AUTH" + (" required" if cfg.auth.required else ""))
    return f"config OK: {cfg.path or 'built-in defaults'}: " + ", ".join(parts)
