"""The TLS server context: built once in the master (before forking, so workers share
it), validated by ``--check``, and rebuilt on SIGHUP so a renewed certificate is served
without a restart; a certificate that does not load keeps the old context."""

from __future__ import annotations

import _ssl
import math
import os
import ssl
import time

from . import process

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
#: A certificate this close to its end is warned about (at a start, a reload, --check,
#: and once a day): renewal jobs run at 30 days left, so 14 means one is failing.
EXPIRY_WARN_DAYS = 14


class TLSError(Exception):
    """A certificate or key that does not load: ``key`` is the config key at fault,
    ``problem`` says why, naming the file it read (``load_security`` names the config
    file and the value as written, as every config error does)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def build_context(tls_cfg) -> ssl.SSLContext:
    """An SSLContext for server sockets; errors name the config key at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls_cfg.min_version]
    # No compression (CRIME), no client-initiated renegotiation (a CPU DoS vector).
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    fds = [_open("tls.cert_file", tls_cfg.cert_file)]
    try:
        fds.append(_open("tls.key_file", tls_cfg.key_file))
        _load(ctx, _by_descriptor(fds[0], tls_cfg.cert_file), _by_descriptor(fds[1], tls_cfg.key_file), tls_cfg)
    finally:
        for fd in fds:
            os.close(fd)
    return ctx


def _open(key: str, path: str) -> int:
    """The file, opened without blocking and only if regular (process.open_regular): a
    FIFO swapped in after the config was checked must not hold the master either."""
    try:
        return process.open_regular(path)
    except OSError as exc:
        raise TLSError(key, f"{path}: {exc.strerror}") from None


def _by_descriptor(fd: int, path: str) -> str:
    """A name for OpenSSL that opens the file ``fd`` holds, not whatever ``path`` names
    by then; the path itself where /proc is missing."""
    name = f"/proc/self/fd/{fd}"
    return name if os.path.exists(name) else path


def _load(ctx: ssl.SSLContext, cert_name: str, key_name: str, tls_cfg) -> None:
    try:
        ctx.load_cert_chain(cert_name, key_name, password=_no_passphrase)
    except _Encrypted:
        raise TLSError("tls.key_file", f"{tls_cfg.key_file}: the key is encrypted with a pass phrase; "
                       "give an unencrypted key readable only by forksmtp") from None
    except ssl.SSLError as exc:
        key, path = _at_fault(cert_name, tls_cfg)
        what = ("holds no certificate in PEM form" if key == "tls.cert_file" else
                "is not the certificate's private key in PEM form")
        raise TLSError(key, f"{path}: {what} (OpenSSL: {exc.reason or exc})") from None
    except OSError as exc:  # gone since it was opened, where /proc is missing
        key, path = _at_fault(cert_name, tls_cfg)
        raise TLSError(key, f"{path}: {exc.strerror or exc}") from None


def _at_fault(cert_name: str, tls_cfg) -> tuple[str, str]:
    """The key, and its path, of the file that failed: OpenSSL's "PEM lib" does not say
    which; a cert file that loads on its own leaves the key (unreadable, or not the
    certificate's)."""
    if _holds_certificate(cert_name):
        return "tls.key_file", tls_cfg.key_file
    return "tls.cert_file", tls_cfg.cert_file


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL prompts on the terminal for the pass phrase: --check,
    # and the master at start or on SIGHUP, would hang there.  There is no setting for
    # one, so an encrypted key is an error.
    raise _Encrypted()


def _holds_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError):
        return False
    return True


def not_after(path: str) -> float | None:
    """When the (first) certificate in ``path`` ends, in seconds of the epoch; None if it
    cannot be read so (loading the context says why)."""
    decode = getattr(_ssl, "_test_decode_cert", None)  # CPython's own X.509 reader
    if decode is None:
        return None
    try:
        fd = process.open_regular(path)
    except OSError:
        return None
    try:
        return ssl.cert_time_to_seconds(decode(_by_descriptor(fd, path))["notAfter"])
    except (OSError, ValueError, KeyError, ssl.SSLError):
        return None
    finally:
        os.close(fd)


def expiry_warning(end: float | None, now: float) -> str:
    """What to tell the operator about a certificate ending at ``end``: "" while it has
    more than EXPIRY_WARN_DAYS left.  Most clients do not verify and go on; those that
    do (MTA-STS, DANE, submission clients) refuse the session once it has ended."""
    if end is None or end - now > EXPIRY_WARN_DAYS * 86400:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(end))
    if end <= now:
        return f"the certificate expired on {when}; clients that verify it refuse the session"
    days = math.ceil((end - now) / 86400)  # "in 1 day" until it has ended
    return f"the certificate expires on {when}, in {days} day{'' if days == 1 else 's'}"


def describe(sock: ssl.SSLSocket) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for logs and the Received header comment."""
    cipher = sock.cipher()
    return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
