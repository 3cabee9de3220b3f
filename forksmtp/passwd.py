"""``forksmtp passwd USER [-f FILE]``: add or replace one user's password hash.

The password is read without echo from a terminal, or as one line from standard input
otherwise (no confirmation line, so scripts can pipe it in).  Without ``-f`` the file
is the ``[auth] password_file`` of ``-c FILE``.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from . import auth
from .config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forksmtp passwd", description="Set a user's SMTP AUTH password.")
    p.add_argument("user")
    p.add_argument("-f", "--file", help="password file (default: [auth] password_file of -c FILE)")
    return p


def _password_file(args: argparse.Namespace, config: str | None) -> str:
    if args.file:
        return args.file
    if not config:
        raise SystemExit("forksmtp passwd: give -f FILE or -c CONFIG with an [auth] section")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise SystemExit(f"forksmtp passwd: {exc}") from None
    if cfg.auth is None:
        raise SystemExit(f"forksmtp passwd: {config} has no [auth] password_file")
    return cfg.auth.password_file


def _read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\r\n")


def main(argv: list[str], config: str | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        path = _password_file(args, config)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code or 0
    password = _read_password()
    if not password:
        print("forksmtp passwd: empty password refused", file=sys.stderr)
        return 2
    try:
        auth.set_password(path, args.user, password)
    except (auth.PasswordFileError, OSError) as exc:
        print(f"forksmtp passwd: {exc}", file=sys.stderr)
        return 1
    print(f"password for {args.user} written to {path}")
    return 0
