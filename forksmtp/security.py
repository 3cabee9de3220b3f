"""TLS and AUTH material, built by the master before it forks.

Everything a worker needs for STARTTLS, implicit TLS and AUTH is loaded in the master
(at start and on every SIGHUP, re-reading the files even when their paths did not
change) and inherited by the workers: the SSL context with its key, the password table,
which listening sockets speak TLS from the first byte, and the shared AUTH limiter.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import auth, tls


@dataclass(frozen=True)
class Security:
    """What a worker needs for STARTTLS and AUTH, built by the master before forking."""

    tls_context: object = None
    passwords: dict | None = None
    implicit_fds: frozenset = frozenset()
    auth_limiter: object = None


def listen_addresses(cfg) -> tuple[set, set]:
    """(every address to bind, the implicit-TLS ones among them)."""
    implicit = set(cfg.tls.implicit_listen) if cfg.tls else set()
    return set(cfg.server.listen) | implicit, implicit


def load_security(cfg) -> tuple[object, dict]:
    """The SSL context and the password table: every file re-read, even if unchanged."""
    context = tls.build_context(cfg.tls, cfg.path) if cfg.tls else None
    try:
        passwords = auth.load(cfg.auth.password_file) if cfg.auth else {}
    except auth.PasswordFileError as exc:  # named as a config error is: file, key, problem
        raise auth.PasswordFileError(f"{cfg.path or 'command line'}: auth.password_file: {exc}") from None
    return context, passwords
