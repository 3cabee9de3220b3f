"""The TLS server context: built once in the master (before forking, so workers share
it), validated by ``--check``, and rebuilt on SIGHUP so a renewed certificate is served
without a restart; a certificate that does not load keeps the old context."""

from __future__ import annotations

import ssl

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TLSError(Exception):
    pass


def build_context(tls_cfg, config_file: str = "") -> ssl.SSLContext:
    """An SSLContext for server sockets; errors name the config key at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls_cfg.min_version]
    # No compression (CRIME), no client-initiated renegotiation (a CPU DoS vector).
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    where = f"{config_file}: " if config_file else ""
    try:
        ctx.load_cert_chain(tls_cfg.cert_file, tls_cfg.key_file)
    except FileNotFoundError as exc:
        raise TLSError(f"{where}tls.cert_file/tls.key_file: {exc.filename}: not found") from None
    except ssl.SSLError as exc:
        key = "tls.key_file" if "KEY" in str(exc).upper() else "tls.cert_file"
        raise TLSError(f"{where}{key}: certificate and key do not load together: {exc.reason or exc}") from None
    except OSError as exc:
        raise TLSError(f"{where}tls.cert_file/tls.key_file: {exc.strerror}") from None
    return ctx


def describe(sock: ssl.SSLSocket) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for logs and the Received header comment."""
    cipher = sock.cipher()
    return f"{sock.version()} {cipher[0] if cipher else ''}".strip()
