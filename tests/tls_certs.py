"""Certificates for the TLS tests, made at test time with the ``openssl`` command.

Nothing secret is ever committed: every key is generated into the test's temporary
directory.  ``make_certs(dir)`` writes a private CA and, signed by it, two server
certificates for ``localhost`` / ``127.0.0.1`` (the second one for the reload test),
plus a key that belongs to neither (the mismatched-pair tests) and the first key under a
pass phrase.  EC P-256 keys keep the
generation fast.

Without ``openssl`` on PATH the TLS tests are skipped with that reason (``require_openssl``).
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
_EC = ["-pkeyopt", "ec_paramgen_curve:prime256v1"]
_SERVER_EXT = ("basicConstraints = critical, CA:FALSE\n"
               "keyUsage = critical, digitalSignature\n"
               "extendedKeyUsage = serverAuth\n"
               "subjectAltName = DNS:localhost, IP:127.0.0.1\n")


def require_openssl() -> str:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed: cannot make test certificates")
    return OPENSSL


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca_cert: Path
    cert: Path          # server certificate "one"
    key: Path
    cert2: Path         # server certificate "two" (a renewal)
    key2: Path
    other_key: Path     # a key that matches neither certificate
    encrypted_key: Path  # server1.key under a pass phrase

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks the host name."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.check_hostname = True
        return ctx

    def fingerprint(self, which: int = 1) -> str:
        """SHA-256 of a server certificate's DER form (as getpeercert(True) returns it)."""
        pem = (self.cert if which == 1 else self.cert2).read_text()
        return sha256(ssl.PEM_cert_to_DER_cert(pem))


def sha256(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _run(*args: str, cwd: Path) -> None:
    proc = subprocess.run([require_openssl(), *args], cwd=cwd, capture_output=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")


def _genkey(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", *_EC, "-out", str(path), cwd=path.parent)
    path.chmod(0o600)


def _server_cert(d: Path, name: str, serial: int) -> tuple[Path, Path]:
    key, csr, cert, ext = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / "server.ext")
    _genkey(key)
    _run("req", "-new", "-key", str(key), "-subj", f"/CN=localhost/O=forksmtp test {name}",
         "-out", str(csr), cwd=d)
    _run("x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca.key",
         "-set_serial", str(serial), "-days", "30", "-sha256", "-extfile", str(ext),
         "-out", str(cert), cwd=d)
    return cert, key


def dated_cert(certs: Certs, name: str, *, start: str = "", end: str = "", days: int = 0) -> Path:
    """A self-signed certificate for ``localhost`` with ``certs.key``, valid from
    ``start`` to ``end`` (``YYYYMMDDHHMMSSZ``; an end in the past makes it expired) or
    for ``days`` from now: ``openssl ca`` is the command that takes the dates."""
    d = certs.dir / name
    d.mkdir()
    (d / "ca.cnf").write_text("[ca]\ndefault_ca = dated\n[dated]\ndir = .\ndatabase = index.txt\n"
                              "new_certs_dir = .\nserial = serial\ndefault_md = sha256\n"
                              "policy = anything\nemail_in_dn = no\n[anything]\ncommonName = supplied\n")
    (d / "index.txt").write_text("")
    (d / "serial").write_text("01\n")
    _run("req", "-new", "-key", str(certs.key), "-subj", "/CN=localhost", "-out", "req.csr", cwd=d)
    dates = ["-startdate", start, "-enddate", end] if end else ["-days", str(days)]
    _run("ca", "-batch", "-notext", "-config", "ca.cnf", "-selfsign", "-keyfile", str(certs.key), "-in", "req.csr",
         *dates, "-out", "cert.pem", cwd=d)
    return d / "cert.pem"


def make_certs(d: Path) -> Certs:
    """Write the CA, two server certificates and a stray key into ``d``."""
    require_openssl()
    d.mkdir(parents=True, exist_ok=True)
    _genkey(d / "ca.key")
    _run("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=forksmtp test CA",
         "-days", "30", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d)
    (d / "server.ext").write_text(_SERVER_EXT)
    cert, key = _server_cert(d, "server1", 1001)
    cert2, key2 = _server_cert(d, "server2", 1002)
    other = d / "other.key"
    _genkey(other)
    encrypted = d / "encrypted.key"
    _run("pkey", "-in", str(key), "-aes256", "-passout", "pass:forksmtp-test", "-out", str(encrypted), cwd=d)
    return Certs(d, d / "ca.pem", cert, key, cert2, key2, other, encrypted)
