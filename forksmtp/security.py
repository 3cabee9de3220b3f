"""TLS and AUTH material, built by the master before it forks.

Everything a worker needs for STARTTLS, implicit TLS and AUTH is loaded in the master
(at start and on every SIGHUP, re-reading the files even when their paths did not
change) and inherited by the workers: the SSL context with its key, the password table,
which listening sockets speak TLS from the first byte, the shared AUTH limiter, and the
shared table of connections a minute per client address.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from . import auth, tls
from .authlimit import AuthLimiter
from .connrate import ConnectionRate
from .config import key_error
from .config_checks import ConfigError


@dataclass(frozen=True)
class Security:
    """What a worker needs for STARTTLS, AUTH and the connection rate, built by the
    master before forking.  The defaults are a server without TLS, AUTH or rate limit."""

    tls_context: ssl.SSLContext | None = None
    passwords: dict[str, str] = field(default_factory=dict)  # user -> scrypt hash
    implicit_fds: frozenset[int] = frozenset()
    auth_limiter: AuthLimiter | None = None
    conn_rate: ConnectionRate | None = None


def listen_addresses(cfg) -> tuple[set, set]:
    """(every address to bind, the implicit-TLS ones among them)."""
    implicit = set(cfg.tls.implicit_listen) if cfg.tls else set()
    return set(cfg.server.listen) | implicit, implicit


def load_security(cfg) -> tuple[ssl.SSLContext | None, dict[str, str]]:
    """The SSL context and the password table: every file re-read, even if unchanged.
    A file that does not load is a ConfigError, named as every config error is: the
    config file, the key and its value as written, then what is wrong with the file."""
    try:
        context = tls.build_context(cfg.tls) if cfg.tls else None
    except tls.TLSError as exc:
        raise key_error(cfg, exc.key, None, exc.problem) from None
    try:
        passwords = auth.load(cfg.auth.password_file) if cfg.auth else {}
    except auth.PasswordFileError as exc:
        raise key_error(cfg, "auth.password_file", None, str(exc)) from None
    return context, passwords


def certificate_warning(cfg, source: str, end: float | None, now: float) -> str:
    """The line that warns of a certificate near its end or past it, named as config
    errors are (``source``: where tls.cert_file was set); "" when there is nothing to
    say.  The master logs it, --check prints it."""
    text = tls.expiry_warning(end, now) if cfg.tls else ""
    if not text:
        return ""
    return str(ConfigError(source, "tls.cert_file", cfg.tls.cert_file, f"{text}; renew it, then SIGHUP"))
