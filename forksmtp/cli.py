"""Command line: flags, ``--check``, exit codes.

Exit codes: 0 success, 1 runtime failure (e.g. a port that cannot be bound), 2 usage or
config error.  Flags override the config file; the same overrides are handed to the arbiter
so that a reload (SIGHUP) re-reads the file and still applies them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from forksmtp import __version__, _native, config_checks
from forksmtp.config import ConfigError, key_error, load_config, maildir_keys, source_of, summary

# flag destination -> dotted config key it overrides
_OVERRIDES = {
    "maildir": "delivery.maildir",
    "workers": "server.workers",
    "hostname": "server.hostname",
    "pidfile": "server.pidfile",
    "log_level": "log.level",
}
_PATHS = frozenset({"maildir", "pidfile"})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forksmtp",
        description="A pre-forking SMTP receiver that stores mail in Maildir.",
        epilog="Also: forksmtp [-c FILE] passwd USER [-f FILE]  -- set a password in the password file.",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="TOML config file (default: built-in defaults)")
    p.add_argument("--check", action="store_true", help="validate the config, print a summary and exit")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="PORT, HOST:PORT or [V6ADDR]:PORT; repeatable; replaces the file's list")
    p.add_argument("--maildir", metavar="DIR", help="catch-all Maildir (created if missing)")
    p.add_argument("--workers", type=int, metavar="N", help="workers started at boot")
    p.add_argument("--hostname", metavar="NAME", help="name in the greeting, the EHLO reply and Received headers")
    p.add_argument("--pidfile", metavar="PATH", help="write the master's pid here")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    p.add_argument("--version", action="version",
                   version=f"forksmtp {__version__} ({_native.describe()})")
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """The dotted config keys the given flags replace."""
    out: dict[str, object] = {}
    if args.listen:
        out["server.listen"] = list(args.listen)
    for dest, key in _OVERRIDES.items():
        value = getattr(args, dest)
        if value is not None:
            # Paths are made absolute now, so a reload resolves them as the user meant.
            out[key] = os.path.abspath(value) if dest in _PATHS and value else value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passwd = _split_passwd(argv)
    if passwd is not None:
        return _run_passwd(*passwd)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.config == "":  # -c "$CONF" with CONF unset: not the built-in defaults, in silence
        print("forksmtp: -c: an empty path names no config file (leave -c out for the built-in "
              "defaults)", file=sys.stderr)
        return 2
    overrides = overrides_from(args)
    try:
        # A [mailboxes] Maildir that cannot be used now stops neither a start nor a
        # reload: the master logs it and the other mailboxes' mail goes on
        # (maildirs.prepare).  --check says what a start would do.
        cfg = load_config(args.config, overrides, mailbox_storage=False)
    except ConfigError as exc:
        print(f"forksmtp: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problem = _check_files(cfg) or _check_maildir(cfg, overrides)
        if problem:
            print(f"forksmtp: {problem}", file=sys.stderr)
            return 2
        from forksmtp.process import group_alone_warning
        alone = group_alone_warning(cfg.server.user, cfg.server.group)
        warnings = _mailbox_warnings(cfg) + _certificate_warnings(cfg, overrides) + ([alone] if alone else [])
        for warning in warnings:
            print(f"forksmtp: warning: {warning}", file=sys.stderr)
        print(summary(cfg))
        return 0
    from forksmtp import arbiter  # imported late: --check needs none of the process machinery

    return arbiter.run(cfg, overrides)  # which reports its own start failures


def _split_passwd(argv: list[str]) -> tuple[list[str], str | None] | None:
    """Recognise ``[-c FILE] passwd ARGS...`` (``-c FILE`` may also follow ARGS).

    Returns (ARGS without -c, config path) or None when this is not the passwd command.
    """
    config, head = _leading_config(argv)
    if argv[head:head + 1] != ["passwd"]:
        return None
    later, rest = _take_config(argv[head + 1:])
    return rest, later if later is not None else config


def _leading_config(argv: list[str]) -> tuple[str | None, int]:
    """A -c/--config option at the start of argv: (path, arguments it used)."""
    first = argv[0] if argv else ""
    if first in ("-c", "--config") and len(argv) > 1:
        return argv[1], 2
    if first.startswith("--config="):
        return first.partition("=")[2], 1
    if first.startswith("-c") and len(first) > 2:
        return first[2:], 1
    return None, 0


def _take_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove -c/--config options from argv; return (the last path, the rest)."""
    config, rest, i = None, [], 0
    while i < len(argv):
        path, used = _leading_config(argv[i:])
        if used:
            config, i = path, i + used
        else:
            rest.append(argv[i])
            i += 1
    return config, rest


def _run_passwd(args: list[str], config: str | None) -> int:
    from forksmtp import passwd  # imported late: a server start needs none of it

    return passwd.main(args, config)


def _mailbox_warnings(cfg) -> list[str]:
    """The Maildirs a start could not use now: [mailboxes] ones it could not make, and
    any the workers' user may not write; and any every user may write (each warned
    about at the start too).  They fail no
    --check: run before every start (the systemd unit's ExecStartPre), one user's broken
    Maildir would otherwise keep everyone's mail out, which the start itself avoids."""
    from forksmtp import maildirs, process

    keys = maildir_keys(cfg.delivery)
    ids = process.resolve_ids(cfg.server.user, cfg.server.group)
    warnings = []
    for path in sorted(keys):
        try:
            if path != cfg.delivery.maildir:  # the catch-all's own check fails --check
                config_checks.creatable_dir(path)
                config_checks.makeable_now(path)
            problem = maildirs.unusable_by_workers(path, ids, cfg.server.user)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            warnings.append(f"{keys[path]} = {path}: {problem}; its mail would get 451 until this is fixed")
        exposed = maildirs.open_to_all(path)
        if exposed:
            warnings.append(f"{keys[path]} = {path}: {exposed}")
    return warnings


def _certificate_warnings(cfg, overrides: dict) -> list[str]:
    """A certificate near its end or past it: said, but no failure (it still loads, and
    most clients do not verify it)."""
    from forksmtp import tls
    from forksmtp.security import certificate_warning

    end = tls.not_after(cfg.tls.cert_file) if cfg.tls else None
    text = certificate_warning(cfg, source_of(cfg, "tls.cert_file", overrides), end, time.time())
    return [text] if text else []


def _check_maildir(cfg, overrides: dict) -> str:
    """The catch-all Maildir, made where the start would make it (the config's check
    saw only the permission bits): a start that would fail there fails --check too."""
    try:
        config_checks.makeable_now(cfg.delivery.maildir)
    except ValueError as exc:
        return str(key_error(cfg, "delivery.maildir", overrides, str(exc)))
    return ""


def _check_files(cfg) -> str:
    """--check loads what the server would load: the certificate pair and the passwords."""
    from forksmtp.security import load_security

    try:
        load_security(cfg)
    except ConfigError as exc:  # naming the file, the key and the value, as the start does
        return str(exc)
    return ""
