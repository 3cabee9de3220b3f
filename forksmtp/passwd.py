"""``forksmtp passwd USER [-f FILE]``: add or replace one user's password hash.

The password is read without echo from a terminal, or as one line from standard input
otherwise (no confirmation line, so scripts can pipe it in).  Without ``-f`` the file
is the ``[auth] password_file`` of ``-c FILE``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from . import auth
from .config import read_toml
from .config_checks import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forksmtp passwd", description="Set a user's SMTP AUTH password.")
    p.add_argument("user")
    p.add_argument("-f", "--file", help="password file (default: [auth] password_file of -c FILE)")
    return p


def _password_file(args: argparse.Namespace, config: str | None) -> str:
    """-f FILE, or the [auth] password_file of -c CONFIG.  Only that key is read: the
    password file is often written before the [tls] certificate exists, and a full
    validation would refuse the config for it."""
    if args.file:
        return args.file
    if not config:
        raise SystemExit("forksmtp passwd: give -f FILE or -c CONFIG with an [auth] section")
    try:
        raw = read_toml(config)
    except ConfigError as exc:
        raise SystemExit(f"forksmtp passwd: {exc}") from None
    path = raw.get("auth", {}).get("password_file") if isinstance(raw.get("auth"), dict) else None
    if path is not None and not isinstance(path, str):
        raise SystemExit(f"forksmtp passwd: {ConfigError(config, 'auth.password_file', path, 'must be a string')}")
    if not path:
        raise SystemExit(f"forksmtp passwd: {config} has no [auth] password_file")
    # Relative paths are relative to the config file, as everywhere in the config.
    return os.path.join(os.path.dirname(os.path.abspath(config)), os.path.expanduser(path))


#: What a client could send at all: RFC 4954 bounds an AUTH line to 12,288 octets, of
#: base64 (9,216 octets of name and password); 4,096 characters is more than anyone types.
MAX_PASSWORD = 4096


def _read_password() -> str:
    """One line; "" at end of input (Ctrl-D at the prompt), which main() refuses."""
    if sys.stdin.isatty():
        try:
            return getpass.getpass("Password: ")
        except EOFError:
            print(file=sys.stderr)  # end the prompt's line
            return ""
    # Read to a bound: stdin may be /dev/zero, or a file that is not a password.
    return sys.stdin.readline(MAX_PASSWORD + 2).rstrip("\r\n")


def main(argv: list[str], config: str | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        path = _password_file(args, config)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code or 0
    try:
        password = _read_password()
    except KeyboardInterrupt:  # Ctrl-C at the prompt: nothing written, no traceback
        print(file=sys.stderr)
        return 130
    if not password:
        print("forksmtp passwd: empty password refused", file=sys.stderr)
        return 2
    if len(password) > MAX_PASSWORD:
        print(f"forksmtp passwd: password of more than {MAX_PASSWORD:,} characters refused", file=sys.stderr)
        return 2
    try:
        user, replaced = auth.set_password(path, args.user, password)
    except auth.PasswordFileError as exc:
        print(f"forksmtp passwd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # named by the file asked for, not by a temporary one beside it
        print(f"forksmtp passwd: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    spelt = "" if user == args.user else f" (as {user!r}, its SASLprep form)"
    print(f"password for {args.user}{spelt} written to {path}")
    if replaced > 1:  # the same name on several lines (in any spelling), which load() refuses
        print(f"the {replaced} lines of that name are now this one line")
    return 0
