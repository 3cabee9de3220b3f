"""Drive the sans-IO SMTP core the way a worker does, in the words of an RFC transcript.

    s = new_session()
    assert transcript(s, ["EHLO x", "DATA"]) == [250, 503]

``transcript`` sends one client line at a time (a client that waits for every reply),
``feed`` sends raw bytes as they would come off the socket (pipelining, bare CR/LF,
odd splits).  DataStart is answered with ``accept_data()`` (or a refusal chosen by the
test) and DataEnd with 250 or the reader's verdict, as the worker does; the text of
every accepted message is kept and returned by ``stored``.

Every reply that goes out is checked for RFC 5321 form (three digits, ``-`` on all but
the last line, CRLF, at most 512 octets a line), and in ``transcript`` for RFC 2034/3463
consistency: no enhanced status code before EHLO/HELO, one whose class matches the reply
code on every reply after it (the EHLO/HELO reply itself and 354 carry none).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Iterator

import forksmtp
from forksmtp import _native

from forksmtp.smtp import replies as R
from forksmtp.smtp.session import (NEED_DATA, PAUSED, DataChunk, DataEnd, DataStart,
                                   Session, SessionConfig)

HOSTNAME = "mx.test"
CRLF = b"\r\n"

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)\Z")
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}\Z")


def new_session(**config) -> Session:
    """A started session on ``mx.test`` whose 220 greeting was already read."""
    session = Session(SessionConfig(HOSTNAME, **config))
    session.start()
    check_wire(session.data_to_send())
    return session


class Client:
    """The worker's side of the event API, recording what a test may want to inspect."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.data_start_reply: R.Reply | None = None  # None: accept_data() -> 354
        self.events: list[object] = []
        self.stored: list[bytes] = []  # text of every message answered 250
        self.ends: list[DataEnd] = []
        self._chunks: list[bytes] = []

    def pump(self) -> list[object]:
        """Pull events until the session needs bytes, answering as a worker does."""
        new: list[object] = []
        while True:
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            assert event is not PAUSED, "session paused although every event was answered"
            new.append(event)
            if isinstance(event, DataStart):
                self._data_start(event)
            elif isinstance(event, DataChunk):
                self._chunks.append(event.data)
            elif isinstance(event, DataEnd):
                self._data_end(event)
        self.events += new
        return new

    def _data_start(self, event: DataStart) -> None:
        # RFC 5321 3.3: DATA only after at least one accepted recipient.
        assert event.envelope.recipients, "DataStart without an accepted recipient"
        self._chunks.clear()
        if self.data_start_reply is None:
            self.session.accept_data()
        else:
            self.session.reply(self.data_start_reply)

    def _data_end(self, event: DataEnd) -> None:
        text = b"".join(self._chunks)
        self._chunks.clear()
        self.ends.append(event)
        if event.error is None:
            self.stored.append(text)
        self.session.reply(event.error or R.R250_ACCEPTED)

    def feed(self, data: bytes) -> bytes:
        """Raw client bytes in; everything the server sends in answer out (one write)."""
        self.session.receive_data(data)
        self.pump()
        out = self.session.data_to_send()
        check_wire(out)
        return out

    def send_line(self, line: str | bytes) -> bytes:
        """One client line (CRLF added); replies are checked for RFC 2034 consistency."""
        raw = line.encode("utf-8") if isinstance(line, str) else line
        negotiated = self.session.enhanced
        out = self.feed(raw + CRLF)
        check_enhanced(out, negotiated)
        return out


# Keyed by id(): a compiled Session takes no weak references.  Each Client holds its
# session, so no id is reused while it is here; conftest empties this after each test.
_clients: dict[int, Client] = {}


def client(session: Session) -> Client:
    """The one Client that drives ``session`` (created on first use)."""
    found = _clients.get(id(session))
    if found is None:
        found = _clients[id(session)] = Client(session)
    return found


def forget_clients() -> None:
    _clients.clear()


# -- the transcript vocabulary -----------------------------------------------------------

def transcript(session: Session, lines: Iterable[str | bytes]) -> list[int]:
    """Send each line, waiting for its reply; the reply codes, in order."""
    c = client(session)
    return [code for line in lines for code in codes(c.send_line(line))]


def replies(session: Session, lines: Iterable[str | bytes]) -> list[str]:
    """Like ``transcript`` but each reply as ``"550 5.7.1"`` (``"250"`` without one)."""
    c = client(session)
    return [head for line in lines for head in heads(c.send_line(line))]


def feed(session: Session, data: bytes) -> bytes:
    """Raw bytes in (no CRLF added, no waiting between lines); the wire bytes out."""
    return client(session).feed(data)


def feed_codes(session: Session, data: bytes) -> list[int]:
    return codes(feed(session, data))


def events(session: Session) -> list[object]:
    """Every event the session emitted so far."""
    return client(session).events


def stored(session: Session) -> list[bytes]:
    """The text (LF line ends, dot-unstuffed) of every message accepted so far."""
    return client(session).stored


def data_ends(session: Session) -> list[DataEnd]:
    return client(session).ends


def refuse_data_start(session: Session, reply: R.Reply) -> None:
    """Answer every later DataStart with ``reply`` instead of 354 (storage trouble)."""
    client(session).data_start_reply = reply


# -- reading replies -----------------------------------------------------------------------

def split_replies(wire: bytes) -> list[list[bytes]]:
    """The replies in ``wire``, each a list of its lines without CRLF; checks the form."""
    check_wire(wire)
    groups: list[list[bytes]] = []
    current: list[bytes] = []
    for line in wire.split(CRLF)[:-1]:
        current.append(line)
        if line[3:4] == b" ":
            groups.append(current)
            current = []
    return groups


def codes(wire: bytes) -> list[int]:
    return [int(group[0][:3]) for group in split_replies(wire)]


def heads(wire: bytes) -> list[str]:
    """``"code enhanced"`` per reply, or just ``"code"`` when it carries no enhanced code."""
    result = []
    for group in split_replies(wire):
        code, enhanced = _code_and_enhanced(group[0])
        result.append(f"{code} {enhanced}" if enhanced else str(code))
    return result


def _code_and_enhanced(line: bytes) -> tuple[int, str]:
    word = line[4:].split(b" ", 1)[0].decode("utf-8", "replace")
    return int(line[:3]), (word if _ENHANCED.match(word) else "")


def check_wire(wire: bytes) -> None:
    """RFC 5321 4.2: replies are whole CRLF lines of at most 512 octets, ``NNN-`` on
    every line but the last of a reply, all lines of one reply with the same code."""
    if not wire:
        return
    assert wire.endswith(CRLF), wire
    previous = None  # the code of an unfinished multi-line reply
    for line in wire.split(CRLF)[:-1]:
        assert len(line) + 2 <= 512, line
        m = _REPLY_LINE.match(line)
        assert m is not None, f"malformed reply line {line!r}"
        assert previous is None or previous == m.group(1), f"code changed inside {wire!r}"
        previous = m.group(1) if m.group(2) == b"-" else None
    assert previous is None, f"unfinished multi-line reply in {wire!r}"


def check_enhanced(wire: bytes, negotiated: bool) -> None:
    """RFC 2034: enhanced codes only once negotiated, then on every reply except the
    EHLO/HELO reply and 354, and always in the reply code's class (RFC 3463).  Replies
    that close the session (421, 554) carry theirs even before EHLO."""
    for group in split_replies(wire):
        code, enhanced = _code_and_enhanced(group[0])
        if code == 354 or (code == 250 and group[0][4:] == HOSTNAME.encode()):
            assert not enhanced, group
            continue
        if not negotiated:
            # A reply that closes the session carries its code anyway (421 4.7.0 ...).
            closing = code in (421, 554)
            if not closing:
                assert not enhanced, f"enhanced status code before EHLO/HELO: {group!r}"
                continue
        assert enhanced, f"no enhanced status code after EHLO/HELO: {group!r}"
        assert enhanced[0] == str(code)[0], f"enhanced code of the wrong class: {group!r}"
        for line in group:
            assert line[4:].startswith(enhanced.encode()), group


def chosen_seed() -> int:
    """The seed of a randomised live test: FORKSMTP_TEST_SEED when set (to run a failure
    again with the seed its message printed), else a new one each run."""
    given = os.environ.get("FORKSMTP_TEST_SEED", "")
    return int(given) if given else random.randrange(1 << 30)


def open_fds() -> int:
    """Descriptors this process holds: a leak check for storage code run in-process."""
    return len(os.listdir("/proc/self/fd"))


def copy_package(tmp_path: Path) -> Path:
    """The installed package, and mypyc's shared library beside it, under tmp_path/site
    (to run a build that a test edits or rebuilds without touching the checkout)."""
    root = tmp_path / "site"
    shutil.copytree(Path(forksmtp.__file__).parent, root / "forksmtp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.machinery.PathFinder.find_spec(_native.GROUP + "__mypyc")
    if spec is not None and spec.origin:
        shutil.copy2(spec.origin, root)
    return root


# -- an ext4 file system on a loop device (test_power_loss.py, test_stuck_worker.py) ------

LOOP_TOOLS = ("losetup", "mkfs.ext4", "mount", "umount")


def cannot_loop_mount(tools: Iterable[str] = LOOP_TOOLS) -> str:
    """Why a file system cannot be made and loop-mounted here; "" when it can."""
    if os.geteuid() != 0:
        return "needs root (mount)"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return "missing " + ", ".join(missing)
    if not os.path.exists("/dev/loop-control") and not Path("/dev/loop0").exists():
        return "no loop devices"
    return ""


def run_tool(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


@contextlib.contextmanager
def loop_ext4(directory: Path, *mkfs_options: str) -> Iterator[tuple[Path, Path, str]]:
    """A 64 MiB ext4 file system made in a file in ``directory`` and mounted through a
    loop device: (mount point, backing file, loop device).  Skips the test where no
    loop device is free.  Unmounting it afterwards must succeed: busy means something
    left a descriptor open on it (a leak)."""
    import pytest

    image = directory / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    run_tool("mkfs.ext4", "-q", *mkfs_options, str(image))
    attached = run_tool("losetup", "-f", "--show", str(image), check=False)
    if attached.returncode != 0:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    loop = attached.stdout.strip()
    mnt = directory / "mnt"
    mnt.mkdir()
    try:
        run_tool("mount", loop, str(mnt))
        try:
            yield mnt, image, loop
        finally:
            unmounted = run_tool("umount", str(mnt), check=False)
            if unmounted.returncode != 0:  # a file left open on it: detach it anyway
                run_tool("umount", "-l", str(mnt), check=False)
    finally:
        run_tool("losetup", "-d", loop, check=False)
    assert unmounted.returncode == 0, f"umount: {unmounted.stderr.strip()}"


def addresses_sharing_a_start(board, buckets: int) -> tuple[str, str]:
    """Two IPv4 addresses whose probe chains start at the same bucket of a table of
    ``buckets`` entries, under this board's keyed hash (a test of a shared table's
    collisions needs a real pair: the key is drawn anew for every board)."""
    from forksmtp.scoreboard import ip_key
    seen: dict[int, str] = {}
    for n in range(1, 255):
        ip = f"198.51.100.{n}"
        start = board.bucket_of(ip_key(ip), buckets)
        if start in seen:
            return seen[start], ip
        seen[start] = ip
    raise AssertionError(f"no two of 254 addresses share a start among {buckets} buckets")
