"""SMTP AUTH credentials: the password file and its hashes.

The file holds ``user:hash`` lines written by ``forksmtp passwd USER``.  Hashes are
scrypt (RFC 7914) from Python's own hashlib: memory-hard like argon2, which costs an
attacker with a stolen file GPU/ASIC time, and it needs no extra dependency.  Format:

    scrypt$<log2 N>$<r>$<p>$<salt, base64>$<key, base64>

User names and passwords are prepared with SASLprep (RFC 4013, ``saslprep.py``) both
when they are written and when a client presents them, so that two spellings of one
string (composed and decomposed accents, a no-break space) are one.

Verification compares in constant time, and an unknown user is checked against a
dummy hash of the same cost, so timing tells nothing about which users exist.
Neither passwords nor hashes are ever logged.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import hmac
import os
import stat

from . import process, saslprep

LOG2_N, R, P, KEY_LEN = 14, 8, 1, 32  # 16 MiB and ~50 ms per check on a 2020s core
_MAXMEM = 64 * 1024 * 1024
MAX_FILE_OCTETS = 16 << 20  # about 150,000 users' lines


class PasswordFileError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derive(password: bytes, salt: bytes, log2_n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=1 << log2_n, r=r, p=p, dklen=dklen, maxmem=_MAXMEM)


def hash_password(password: str) -> str:
    """The hash of an already prepared password (``stored_password``)."""
    salt = os.urandom(16)
    key = _derive(password.encode("utf-8"), salt, LOG2_N, R, P, KEY_LEN)
    return f"scrypt${LOG2_N}${R}${P}${_b64(salt)}${_b64(key)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    fields = encoded.split("$")
    if len(fields) != 6:
        raise ValueError(f"expected scrypt$<log2 N>$<r>$<p>$<salt>$<key>, got {len(fields)} "
                         f"field{'s' if len(fields) != 1 else ''} separated by '$'")
    scheme, log2_n, r, p, salt, key = fields
    if scheme != "scrypt":
        raise ValueError(f"unknown hash scheme {scheme!r}")
    try:
        values = int(log2_n), int(r), int(p)
    except ValueError:
        raise ValueError(f"log2 N, r and p must be integers, got {log2_n!r}, {r!r}, {p!r}") from None
    if not (1 <= values[0] <= 20 and 1 <= values[1] <= 32 and 1 <= values[2] <= 16):
        raise ValueError("scrypt parameters out of range")
    # What OpenSSL allocates for them (B and V of RFC 7914): more than _MAXMEM and every
    # check of this user would fail with an error instead of an answer.
    need = 128 * values[1] * values[2] + 128 * values[1] * ((1 << values[0]) + 2)
    if need > _MAXMEM:
        raise ValueError(f"scrypt parameters need {need:,} octets per check, more than the "
                         f"{_MAXMEM:,} ({_MAXMEM >> 20} MiB) allowed")
    try:
        return (*values, base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True))
    except ValueError:  # binascii.Error is one
        raise ValueError("the salt and the key must be base64") from None


_DUMMY = f"scrypt${LOG2_N}${R}${P}${_b64(b'forksmtp-dummy!!')}${_b64(bytes(KEY_LEN))}"


def verify(encoded: str | None, password: str) -> bool:
    """True when ``password`` matches; an unknown user (None) costs the same time."""
    try:
        log2_n, r, p, salt, key = _parse(encoded or _DUMMY)
        # surrogatepass: even a string no UTF-8 decoder returns costs its hash.
        got = _derive(password.encode("utf-8", "surrogatepass"), salt, log2_n, r, p, len(key))
    except ValueError:  # load() refuses what cannot be checked; never a dead worker
        return False
    return hmac.compare_digest(got, key) and encoded is not None


def check(users: dict[str, str], username: str, password: str, authzid: str = "") -> str | None:
    """The user's name in its prepared form when ``password`` is theirs, else None.

    The password is checked in its SASLprep form and, where that differs, as sent too:
    files written before forksmtp prepared passwords hold hashes of them as typed.  So
    how many hashes are computed depends on what the client sent and on nothing the
    server holds (whether the user exists, which check failed), and timing tells
    nothing.  A name SASLprep refuses, or that it leaves empty (RFC 4616 2), is no one's."""
    try:
        user = saslprep.prepare(username)
        # No proxy authorization: an authzid naming anyone else is refused.
        acting = saslprep.prepare(authzid) if authzid else user
    except saslprep.PrepError:
        user = acting = ""
    encoded = users.get(user) if user else None
    ok = False
    for secret in _spellings(password):
        ok = verify(encoded, secret) or ok  # each one checked, whatever the first said
    return user if ok and acting == user else None


def acts_for_another(username: str, authzid: str) -> bool:
    """Whether ``authzid`` names someone other than ``username`` (SASLprep'd, as
    ``check`` compares them): such a PLAIN always fails, whatever the password, and the
    log says why, so that an operator can tell it from a wrong password."""
    if not authzid:
        return False
    try:
        return saslprep.prepare(authzid) != saslprep.prepare(username)
    except saslprep.PrepError:
        return authzid != username


def _spellings(password: str) -> list[str]:
    """The SASLprep form of a password a client sent (when it has one, and it is not
    empty), and the password as sent when that differs."""
    try:
        prepared = saslprep.prepare(password)
    except saslprep.PrepError:
        return [password]
    return [prepared, password] if prepared and prepared != password else [password]


def stored_user(user: str) -> str:
    """``user`` as the password file holds it: prepared, and a name load() reads back."""
    try:
        user = saslprep.prepare(user, stored=True)
    except saslprep.PrepError as exc:
        raise PasswordFileError(f"invalid user name {user!r}: {exc}") from None
    if not user or ":" in user or any(c.isspace() for c in user) or user.startswith("#"):
        # "#..." would be written, then read back as a comment: a user who never logs in.
        raise PasswordFileError(f"invalid user name {user!r}: no ':', no spaces, not starting with '#'")
    return user


def stored_password(password: str) -> str:
    """``password`` prepared for hashing; refused when SASLprep refuses it or leaves nothing."""
    try:
        prepared = saslprep.prepare(password, stored=True)
    except saslprep.PrepError as exc:
        raise PasswordFileError(f"password refused: {exc} (SASLprep, RFC 4013)") from None
    if not prepared:
        raise PasswordFileError("password refused: nothing is left of it after SASLprep (RFC 4013)")
    return prepared


def _read_lines(path: str) -> list[str]:
    """The file's lines, split at LF, CR or CRLF only (SASLprep judges any other character
    in a name).  A line that is not UTF-8 is an error naming it; a byte order mark, which
    some editors write, is skipped."""
    data = process.read_regular(path, MAX_FILE_OCTETS)
    if len(data) > MAX_FILE_OCTETS:  # the master reads it whole at each start and reload
        raise PasswordFileError(f"{path}: larger than {MAX_FILE_OCTETS >> 20} MiB: not a password file")
    raw = data.removeprefix(codecs.BOM_UTF8).splitlines()
    lines = []
    for number, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PasswordFileError(f"{path}: line {number}: not UTF-8 text (octet 0x{line[exc.start]:02x} "
                                    f"at position {exc.start + 1})") from None
    return lines


def load(path: str) -> dict[str, str]:
    """user -> hash; blank lines and ``#`` comments are skipped; errors name the line.  A
    missing file is an error, not an empty table: a typo in the path, or a file moved
    away when a reload came, would otherwise shut every user out without a word."""
    users: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    try:
        lines = _read_lines(path)
    except FileNotFoundError:
        raise PasswordFileError(f"{path}: no such file (make it with: forksmtp passwd USER "
                                f"-f {path})") from None
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot read: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        try:
            if not sep or not user:
                raise ValueError("expected user:hash")
            _parse(encoded)
            # Prepared as a client's name is, so a line written by hand in another
            # spelling still matches; one SASLprep refuses could never log in.
            prepared = saslprep.prepare(user)
            if not prepared:
                raise saslprep.PrepError("nothing is left of it")
        except saslprep.PrepError as exc:
            raise PasswordFileError(f"{path}: line {number}: user name {user!r}: {exc} "
                                    f"(SASLprep, RFC 4013)") from None
        except ValueError as exc:
            raise PasswordFileError(f"{path}: line {number}: {exc}") from None
        if prepared in lines_of:
            # Two spellings of one name (as "Ⅸ" and "IX"): whichever line won, the other
            # user would be shut out, or log in as the first.
            raise PasswordFileError(f"{path}: line {number}: user name {user!r} is the user of line "
                                    f"{lines_of[prepared]} too (both are {prepared!r} in SASLprep form, "
                                    f"RFC 4013); remove one of the lines, or set the password again with "
                                    f"forksmtp passwd to make them one")
        users[prepared], lines_of[prepared] = encoded, number
    return users


def _line_user(line: str) -> str:
    """The prepared user name of a password file line (as written when SASLprep refuses it)."""
    user = line.partition(":")[0]
    try:
        return saslprep.prepare(user)
    except saslprep.PrepError:
        return user


def set_password(path: str, user: str, password: str) -> tuple[str, int]:
    """Add or replace ``user``'s line, keep the others, and return the name as written
    (its SASLprep form) and how many lines of it there were; the file is replaced atomically so
    a crash never leaves it half-written.  A new file is 0600; an existing one keeps its
    owner, group and mode (an operator's 0640 root:forksmtp stays so), except that others
    lose any access: hashes are never world-readable.  A symlink of root's or the
    caller's is followed, so the file it names is the one updated and the link stays;
    another user's symlink, or a file another user owns, is refused."""
    user, password = stored_user(user), stored_password(password)
    trusted = (0, os.geteuid())
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        link = None
    if link is not None and process.untrusted_link(link):
        # Whoever can write the directory could point it at any file root may write.
        raise PasswordFileError(f"{path} is a symlink owned by uid {link.st_uid}: not followed")
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        mode, owner = 0o600, None
    else:
        if not stat.S_ISREG(st.st_mode):  # a FIFO would hold the reader; a device, feed it
            raise PasswordFileError(f"{path} is not a regular file: not written")
        if st.st_uid not in trusted:  # its owner would read every hash written into it
            raise PasswordFileError(f"{path} is owned by uid {st.st_uid}, neither root nor you: not written")
        mode, owner = stat.S_IMODE(st.st_mode) & 0o770, (st.st_uid, st.st_gid)
    try:
        lines = _read_lines(path)  # a line that is not UTF-8 stops it: nothing is rewritten
    except FileNotFoundError:
        lines = []
    entry = f"{user}:{hash_password(password)}"
    # The user's line is replaced where it stood; further lines of the same user (the
    # same name in another spelling, written by hand) go: load() refuses two.
    mine = [_line_user(line) == user for line in lines]
    out = [line for line, is_mine in zip(lines, mine) if not is_mine]
    out.insert(mine.index(True) if True in mine else len(out), entry)
    process.write_atomic(path, "\n".join(out) + "\n", mode, owner)
    return user, mine.count(True)
