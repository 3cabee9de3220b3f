"""Maildir delivery against real files: names, content, durability paths, cleanup."""
from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
import time

import pytest

from forksmtp import maildir
from forksmtp.maildir import Maildir, clean_tmp, commit_all, escape_host, is_no_space
from helpers import open_fds

NAME_RE = re.compile(r"^\d+\.M\d+P\d+Q\d+\.[^/:]+,S=(\d+)$")
MODES = ["tmpfile", "named"]


def make(path, mode: str = "tmpfile", **kwargs) -> Maildir:
    md = Maildir(str(path), **kwargs)
    if mode == "named":
        md.use_tmpfile = False      # force the O_EXCL named-file fallback
    return md


def record_fsyncs(monkeypatch) -> list[str]:
    """The paths maildir.py fsyncs from now on, in order (the descriptors' targets)."""
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(maildir.os, "fsync",
                        lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    return synced


def deliver(md: Maildir, *chunks: bytes) -> str:
    delivery = md.begin()
    for chunk in chunks:
        delivery.write(chunk)
    return delivery.commit()


def listing(md: Maildir) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(md.tmp)), sorted(os.listdir(md.new))


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_creates_missing_directories_0700(tmp_path):
    old = os.umask(0o277)           # mkdir alone would give 0500
    try:
        md = Maildir(str(tmp_path / "a" / "b" / "Maildir"))
    finally:
        os.umask(old)
    for sub in ("", "tmp", "new", "cur"):
        assert mode_of(os.path.join(md.path, sub)) == 0o700


def test_leaves_existing_directories_alone(tmp_path):
    root = tmp_path / "Maildir"
    (root / "cur").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "cur", 0o750)
    Maildir(str(root))
    assert mode_of(root) == 0o755 and mode_of(root / "cur") == 0o750
    assert mode_of(root / "tmp") == 0o700 and mode_of(root / "new") == 0o700


@pytest.mark.parametrize("kind", ["file", "dangling symlink"])
def test_a_file_where_new_goes_is_refused_when_the_maildir_is_made(tmp_path, kind):
    """Not taken as the directory it should be: the server would start and refuse every
    message after its DATA."""
    root = tmp_path / "Maildir"
    root.mkdir()
    if kind == "file":
        (root / "new").write_text("x\n")
    else:
        (root / "new").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError) as info:
        Maildir(str(root))
    assert info.value.filename == str(root / "new")


@pytest.mark.parametrize("mode", MODES)
def test_content_name_and_size(tmp_path, mode):
    md = make(tmp_path / "md", mode)
    body = b"Return-Path: <a@example.org>\nSubject: hi\n\nbody\n"
    before = int(time.time())
    path = deliver(md, body[:10], body[10:], b"")
    secs, usecs = re.match(r"(\d+)\.M(\d+)P", os.path.basename(path)).groups()
    assert before <= int(secs) <= time.time() and int(usecs) < 10 ** 6
    assert os.path.dirname(path) == md.new
    name = os.path.basename(path)
    match = NAME_RE.match(name)
    assert match, name
    assert int(match[1]) == os.path.getsize(path) == len(body)
    assert f"P{os.getpid()}Q" in name and name.split(",")[0].endswith("." + md.host)
    with open(path, "rb") as f:
        assert f.read() == body
    assert mode_of(path) == 0o600
    assert listing(md) == ([], [name])


@pytest.mark.parametrize("mode", MODES)
def test_large_message_in_odd_chunks(tmp_path, mode):
    md = make(tmp_path / "md", mode)
    body = os.urandom(3 * 1024 * 1024 + 12345)
    delivery = md.begin()
    for start in range(0, len(body), 65521):
        delivery.write(body[start:start + 65521])
    assert delivery.size == len(body)
    path = delivery.commit()
    assert NAME_RE.match(os.path.basename(path))[1] == str(len(body))
    with open(path, "rb") as f:
        assert f.read() == body
    assert listing(md)[0] == []


@pytest.mark.parametrize("mode", MODES)
def test_small_and_large_writes_interleaved_keep_their_order(tmp_path, mode):
    """Small writes are copied into one buffer, big blocks held whole beside it,
    and writeback is started every MiB: none of it may reorder or drop a byte."""
    md = make(tmp_path / "md", mode)
    rng = random.Random(7)
    sizes = [100, 70_000, 50, 40_000, 300_000, 10, 33_000, 1_100_000, 7, 65_536, 1, 2_600_000, 3]
    pieces = [rng.randbytes(n) for n in sizes]
    delivery = md.begin()
    for piece in pieces:
        delivery.write(piece)
    path = delivery.commit()
    with open(path, "rb") as f:
        assert f.read() == b"".join(pieces)
    assert NAME_RE.match(os.path.basename(path))[1] == str(sum(sizes))


def test_writes_are_gathered_into_few_large_syscalls(tmp_path, monkeypatch):
    """A big message reaches the file in writes of at least 256 KiB (each write(2)
    to ext4 has a fixed cost), and a big piece is held without a copy."""
    sizes = []
    real_write, real_writev = os.write, os.writev
    monkeypatch.setattr(maildir.os, "write", lambda fd, b: sizes.append(len(b)) or real_write(fd, b))
    monkeypatch.setattr(maildir.os, "writev",
                        lambda fd, bs: sizes.append(sum(map(len, bs))) or real_writev(fd, bs))
    md = make(tmp_path / "md")
    delivery = md.begin()
    block = os.urandom(65_000)
    for _ in range(40):
        delivery.write(block)
    path = delivery.commit()
    assert sum(sizes) == 40 * 65_000 == os.path.getsize(path)
    assert len(sizes) <= 40 * 65_000 // (256 * 1024) + 1
    assert all(n >= 256 * 1024 for n in sizes[:-1])


def test_a_written_buffer_may_be_reused_by_the_caller(tmp_path):
    """Big pieces are held until the next writev: a bytearray the caller changes
    after write() returns must still be stored as it was."""
    md = make(tmp_path / "md")
    delivery = md.begin()
    buf = bytearray(b"a" * 40_000)
    delivery.write(buf)
    buf[:] = b"b" * 40_000
    delivery.write(buf)
    with open(delivery.commit(), "rb") as f:
        assert f.read() == b"a" * 40_000 + b"b" * 40_000


@pytest.mark.parametrize("fsync", [True, False])
def test_writeback_is_started_once_per_completed_mib(tmp_path, monkeypatch, fsync):
    """Each whole MiB is handed to the disk once, in order, however the writes fall
    (one big write may complete several); with fsync off nothing is started."""
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(maildir.os, "posix_fadvise",
                        lambda fd, off, n, advice: calls.append((off, n)) or real(fd, off, n, advice))
    md = make(tmp_path / "md", fsync=fsync)
    delivery = md.begin()
    for size in (100, 900_000, 300_000, 2_600_000, 50, 40_000, 1_000_000):
        delivery.write(b"x" * size)
    delivery.commit()
    mib = 1024 * 1024
    if not fsync:
        assert calls == []
        return
    assert calls[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
    assert sum(n for _, n in calls) == (100 + 900_000 + 300_000 + 2_600_000 + 50 + 40_000
                                         + 1_000_000) // mib * mib
    assert all(n % mib == 0 and n > 0 for _, n in calls)


def test_host_escaping():
    assert escape_host("a/b:c.d") == "a\\057b\\072c.d"
    assert escape_host(".x,y") == "\\056x\\054y"
    assert escape_host("") == "localhost"


def test_escaped_host_in_name(tmp_path):
    md = Maildir(str(tmp_path / "md"), hostname="mx/1:25.example")
    name = os.path.basename(deliver(md, b"x\n"))
    assert NAME_RE.match(name)
    assert ".mx\\0571\\07225.example,S=2" in name


def test_fsync_off(tmp_path):
    md = Maildir(str(tmp_path / "md"), fsync=False)
    path = deliver(md, b"no fsync\n")
    with open(path, "rb") as f:
        assert f.read() == b"no fsync\n"
    assert listing(md)[0] == []


def test_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "_clock", lambda: 1_700_000_000_123_456_000)
    md = Maildir(str(tmp_path / "md"))
    first = os.path.basename(deliver(md, b"one\n"))
    # <secs>.M<usecs>P<pid>Q<n>: seconds and microseconds of the clock, not nanoseconds
    assert first.startswith(f"1700000000.M123456P{os.getpid()}Q"), first
    n = int(re.search(r"Q(\d+)\.", first)[1])
    taken = first.replace(f"Q{n}.", f"Q{n + 1}.")
    with open(os.path.join(md.new, taken), "wb") as f:
        f.write(b"old\n")           # same length, so the name really clashes
    second = os.path.basename(deliver(md, b"two\n"))
    assert second not in (first, taken)
    with open(os.path.join(md.new, taken), "rb") as f:
        assert f.read() == b"old\n"
    with open(os.path.join(md.new, second), "rb") as f:
        assert f.read() == b"two\n"


def _child_deliveries(md: Maildir, count: int) -> None:
    for i in range(count):
        deliver(md, b"Subject: %d %d\n\n" % (os.getpid(), i), b"x" * (i % 7) + b"\n")


@pytest.mark.parametrize("clock", ["real", "frozen"])
def test_unique_under_concurrency(tmp_path, monkeypatch, clock):
    if clock == "frozen":           # all names share secs and usecs: only P and Q differ
        monkeypatch.setattr(maildir, "_clock", lambda: 1_700_000_000_000_000_000)
    md = Maildir(str(tmp_path / "md"), fsync=False)
    os.unlink(deliver(md, b"opens new/ in the parent\n"))
    pids = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _child_deliveries(md, 200)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    tmp, new = listing(md)
    assert tmp == [] and len(new) == len(set(new)) == 1600
    for name in new:
        with open(os.path.join(md.new, name), "rb") as f:
            data = f.read()
        assert data.startswith(b"Subject: ") and data.endswith(b"\n")
        assert int(NAME_RE.match(name)[1]) == len(data)


@pytest.mark.parametrize("mode", MODES)
def test_abort_is_idempotent(tmp_path, mode):
    md = make(tmp_path / "md", mode)
    delivery = md.begin()
    delivery.write(b"x" * 300_000)  # past the buffer: really on disk
    delivery.abort()
    delivery.abort()
    assert listing(md) == ([], [])
    with pytest.raises(ValueError):
        delivery.commit()


@pytest.mark.parametrize("mode", MODES)
def test_a_failed_delivery_takes_back_a_copy_a_reader_already_moved_to_cur(tmp_path, mode):
    """Between the link into new/ and the fsync that makes it durable, a mail reader
    (Dovecot, on a SELECT) may move the copy into cur/ as NAME:2,FLAGS.  If the commit
    then fails, the copy must go from there: the client is told 451 and sends again."""
    md = make(tmp_path / "md", mode)
    kept = deliver(md, b"Subject: an earlier message\n\n")
    os.rename(kept, os.path.join(md.cur, os.path.basename(kept) + ":2,S"))
    delivery = md.begin()
    delivery.write(b"Subject: x\n\nbody\n")
    delivery._sync()
    delivery._link(os.getpid())  # as commit_all does before its fsyncs
    linked = delivery._linked
    assert linked is not None
    os.rename(linked, os.path.join(md.cur, os.path.basename(linked) + ":2,"))  # the reader
    delivery.abort()  # what commit_all does when a later step fails
    assert listing(md) == ([], [])
    assert os.listdir(md.cur) == [os.path.basename(kept) + ":2,S"]


@pytest.mark.parametrize("refusals, tmpfile_kept", [(1, True), (2, False)],
                         ids=["tmp-gone-for-a-moment", "o_tmpfile-refused"])
def test_an_enoent_on_the_unnamed_open_gives_o_tmpfile_up_only_if_it_comes_again(
        tmp_path, monkeypatch, refusals, tmpfile_kept):
    """ENOENT from the O_TMPFILE open is a kernel without O_TMPFILE, or tmp/ gone for a
    moment (a reader renaming the folder, another worker remaking it): the worker used
    named tmp/ files for that Maildir until it exited.  The Maildir is made and the
    open tried again; only a second ENOENT is remembered as a refusal."""
    md = make(tmp_path / "md")
    if not md.use_tmpfile:
        pytest.skip("no O_TMPFILE here")
    real_open, failed = os.open, []

    def open_(path, flags, *args, **kwargs):
        if flags & maildir._TMPFILE == maildir._TMPFILE and len(failed) < refusals:
            failed.append(path)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(maildir.os, "open", open_)
    deliver(md, b"Subject: x\n\nbody\n")
    assert len(failed) == refusals and md.use_tmpfile is tmpfile_kept
    assert listing(md)[0] == [] and len(listing(md)[1]) == 1


def test_abort_after_commit_keeps_message(tmp_path):
    md = Maildir(str(tmp_path / "md"))
    delivery = md.begin()
    delivery.write(b"keep\n")
    path = delivery.commit()
    delivery.abort()
    assert os.path.exists(path) and delivery.path == path
    with pytest.raises(ValueError):
        delivery.commit()


@pytest.mark.parametrize("mode", MODES)
def test_commit_syncs_each_file_then_links_then_syncs_each_new(tmp_path, monkeypatch, mode):
    """The order a 250 rests on: every file's data on disk, then every name in new/, then
    (unnamed files) each file's link count, then those names on disk (one fsync per
    distinct new/).  See test_power_loss.py for what the second fsync of a file saves."""
    calls = []
    real_fsync, real_link = os.fsync, os.link
    monkeypatch.setattr(maildir.os, "fsync",
                        lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino))
                        or real_fsync(fd))
    monkeypatch.setattr(maildir.os, "link",
                        lambda src, dst, **kw: calls.append(("link", dst)) or real_link(src, dst, **kw))
    a, b = make(tmp_path / "a", mode), make(tmp_path / "b", mode)
    deliveries = [a.begin(), b.begin()]
    for delivery in deliveries:
        delivery.write(b"durable\n")
    calls.clear()  # making the Maildirs synced their parents
    paths = commit_all(deliveries)
    relinked = 2 if mode == "tmpfile" else 0
    assert [call[0] for call in calls] == ["fsync", "fsync", "link", "link"] + ["fsync"] * (2 + relinked)
    assert calls[0][1].startswith(a.tmp + "/") and calls[1][1].startswith(b.tmp + "/")
    assert [call[1] for call in calls[2:4]] == [os.path.basename(p) for p in paths]
    # an unnamed file's fd still reads as tmp/#N (deleted) after its link: compare inodes
    assert [call[2] for call in calls[4:4 + relinked]] == [os.stat(p).st_ino for p in paths][:relinked]
    assert [call[1] for call in calls[4 + relinked:]] == [a.new, b.new]


@pytest.mark.parametrize("mode", MODES)
def test_new_removed_during_a_delivery_is_made_again(tmp_path, mode):
    md = make(tmp_path / "md", mode)
    delivery = md.begin()
    delivery.write(b"kept\n")
    os.rmdir(md.new)
    path = delivery.commit()
    assert os.path.dirname(path) == md.new and mode_of(md.new) == 0o700
    with open(path, "rb") as f:
        assert f.read() == b"kept\n"
    assert listing(md) == ([], [os.path.basename(path)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("replaced", [False, True], ids=["moved", "moved-and-replaced"])
def test_a_moved_maildir_never_gets_the_next_message(tmp_path, mode, replaced):
    """new/ is held open between messages: after an operator moves the Maildir away
    (and perhaps puts a fresh one in its place), the next message must land under the
    configured path, where the returned path says, not in the moved directory."""
    md = make(tmp_path / "md", mode)
    first = deliver(md, b"first\n")
    os.rename(md.path, str(tmp_path / "moved"))
    if replaced:
        for sub in ("", "tmp", "new", "cur"):
            os.mkdir(os.path.join(md.path, sub))
    second = deliver(md, b"second\n")
    assert os.path.dirname(second) == md.new
    with open(second, "rb") as f:
        assert f.read() == b"second\n"
    assert os.listdir(md.new) == [os.path.basename(second)]
    assert os.listdir(tmp_path / "moved" / "new") == [os.path.basename(first)]
    assert sorted(os.listdir(md.path)) == ["cur", "new", "tmp"]
    assert deliver(md, b"third\n").startswith(md.new + "/")


@pytest.mark.parametrize("fsync", [True, False])
def test_every_directory_made_and_its_parent_are_fsynced(tmp_path, monkeypatch, fsync):
    """A message fsynced into a new/ whose own directory entry is not on disk yet would
    be orphaned by a power cut, and so would one whose new/ inode is not (without a
    journal): making a Maildir syncs what it made and each parent of it."""
    synced = record_fsyncs(monkeypatch)
    (tmp_path / "a").mkdir()
    md = Maildir(str(tmp_path / "a" / "b" / "md"), fsync=fsync)
    assert all(os.path.isdir(d) for d in (md.tmp, md.new, md.cur))
    if not fsync:
        assert synced == []
        return
    made = {str(tmp_path / "a" / "b"), md.path, md.tmp, md.new, md.cur}
    assert sorted(synced) == sorted(made | {str(tmp_path / "a")})
    synced.clear()
    os.rmdir(md.cur)
    assert md.make() == [md.cur] and sorted(synced) == sorted([md.cur, md.path])


def _commit_into_readonly_new(md: Maildir) -> None:
    delivery = md.begin()
    delivery.write(b"denied\n")
    os.chmod(md.new, 0o500)
    try:
        with pytest.raises(PermissionError):
            delivery.commit()
    finally:
        os.chmod(md.new, 0o700)


@contextlib.contextmanager
def unprivileged_dir():
    """As root, permissions are only enforced on an unprivileged uid: yield a
    directory owned by nobody, for use in a forked child that setuid()s."""
    root = tempfile.mkdtemp(prefix="forksmtp-maildir-")
    try:
        os.chmod(root, 0o755)
        os.chown(root, 65534, 65534)
        yield root
    finally:
        shutil.rmtree(root)


def _run_as_nobody(func, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            func(*args)
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize("mode", MODES)
def test_commit_fails_when_new_is_readonly(tmp_path, mode):
    if os.geteuid() != 0:
        md = make(tmp_path / "md", mode)
        _commit_into_readonly_new(md)
        assert listing(md) == ([], [])
        return
    with unprivileged_dir() as root:
        status = _run_as_nobody(lambda: _commit_into_readonly_new(make(root + "/md", mode)))
        assert status == 0
        assert os.listdir(root + "/md/tmp") == [] and os.listdir(root + "/md/new") == []


def test_commit_all(tmp_path):
    a = Maildir(str(tmp_path / "a"))
    b = make(tmp_path / "b", "named")
    deliveries = [a.begin(), b.begin(), a.begin()]
    for i, delivery in enumerate(deliveries):
        delivery.write(b"copy %d\n" % i)
    paths = commit_all(deliveries)
    assert [os.path.dirname(p) for p in paths] == [a.new, b.new, a.new]
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            assert f.read() == b"copy %d\n" % i
    assert listing(a)[0] == [] and listing(b)[0] == []


@pytest.mark.parametrize("mode", MODES)
def test_commit_all_is_all_or_nothing(tmp_path, mode):
    a = make(tmp_path / "a", mode)
    b = make(tmp_path / "b", mode)
    deliveries = [a.begin(), b.begin()]
    for delivery in deliveries:
        delivery.write(b"both or neither\n")
    os.rmdir(b.new)
    open(b.new, "w").close()  # the second link fails after the first one was made
    with pytest.raises(NotADirectoryError) as failed:
        commit_all(deliveries)
    assert listing(a) == ([], []) and os.listdir(b.tmp) == []
    assert maildir.blamed(failed.value) == b.path  # the log names the Maildir that failed


@pytest.mark.parametrize("mode", MODES)
def test_a_rollback_after_a_synced_new_syncs_the_removal_too(tmp_path, monkeypatch, mode):
    """The second Maildir's new/ fails its fsync (an EIO) after the first's has made that
    copy durable: the copy is unlinked and the first new/ fsynced again after the unlink,
    so that a power cut cannot bring back a copy whose client was told 451."""
    a, b = make(tmp_path / "a", mode), make(tmp_path / "b", mode)
    deliveries = [a.begin(), b.begin()]
    for delivery in deliveries:
        delivery.write(b"both or neither\n")
    events = []
    real_fsync, real_unlink = os.fsync, os.unlink
    bad = os.stat(b.new).st_ino

    def fsync(fd):
        ino = os.fstat(fd).st_ino
        events.append(("fsync", ino))
        if ino == bad:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(maildir.os, "fsync", fsync)
    monkeypatch.setattr(maildir.os, "unlink", lambda path: events.append(("unlink", path)) or real_unlink(path))
    with pytest.raises(OSError) as failed:
        commit_all(deliveries)
    monkeypatch.undo()
    assert failed.value.errno == errno.EIO and maildir.blamed(failed.value) == b.path
    assert listing(a) == ([], []) and listing(b) == ([], [])
    a_new = os.stat(a.new).st_ino
    unlinked = [i for i, event in enumerate(events) if event[0] == "unlink" and event[1].startswith(a.new + "/")]
    assert len(unlinked) == 1
    assert ("fsync", a_new) in events[:unlinked[0]]       # the copy was durable in new/ ...
    assert ("fsync", a_new) in events[unlinked[0] + 1:]   # ... and so is its removal


def test_tmpfile_refusal_falls_back_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "_TMPFILE", os.O_DIRECTORY)  # open(tmp, O_DIRECTORY|O_WRONLY) -> EISDIR
    md = Maildir(str(tmp_path / "md"))
    md.use_tmpfile = True
    path = deliver(md, b"fallback\n")
    assert md.use_tmpfile is False
    assert NAME_RE.match(os.path.basename(path))
    assert listing(md)[0] == []


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_clean_tmp(tmp_path):
    md = Maildir(str(tmp_path / "md"), hostname="mx.example")
    now = time.time()
    dead, live = _dead_pid(), os.getpid()
    orphan = f"{int(now)}.M1P{dead}Q1.mx.example"          # dead writer on this host
    files = {
        "old": now - 37 * 3600,
        orphan: now,
        f"{int(now)}.M1P{live}Q1.mx.example": now,         # in progress
        f"{int(now)}.M1P{dead}Q2.other.example": now,      # another host: age rule only
        ".hidden": now - 99 * 3600,
        "fresh": now - 3600,
    }
    for name, when in files.items():
        path = os.path.join(md.tmp, name)
        with open(path, "wb") as f:
            f.write(b"partial")
        os.utime(path, (when, when))
    os.mkdir(os.path.join(md.tmp, "olddir"))
    os.utime(os.path.join(md.tmp, "olddir"), (0, 0))
    assert clean_tmp(md.path, now=now, hostname="mx.example") == 2
    assert set(os.listdir(md.tmp)) == set(files) - {"old", orphan} | {"olddir"}
    assert clean_tmp(md.path, now=now + 40 * 3600, hostname="mx.example") == 3


def test_clean_tmp_default_host_matches_named_fallback(tmp_path):
    md = make(tmp_path / "md", "named")
    pid = os.fork()
    if pid == 0:                    # a worker that dies mid-delivery
        try:
            md.begin().write(b"x" * 300_000)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(os.listdir(md.tmp)) == 1
    assert clean_tmp(md.path) == 1 and os.listdir(md.tmp) == []


def test_is_no_space():
    assert is_no_space(OSError(errno.ENOSPC, "full"))
    assert is_no_space(OSError(errno.EDQUOT, "quota"))
    assert not is_no_space(OSError(errno.EIO, "io"))
    assert not is_no_space(ValueError("x"))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # never leave a mount behind


@pytest.mark.parametrize("mode", MODES)
def test_no_space(tiny_tmpfs, mode):
    md = make(tiny_tmpfs / "md", mode)
    try:
        delivery = md.begin()
        with pytest.raises(OSError) as info:
            for _ in range(32):
                delivery.write(b"x" * 65536)
            delivery.commit()
        assert is_no_space(info.value)
        delivery.abort()
        assert listing(md) == ([], [])
        assert deliver(md, b"room again\n")   # the space was given back
    finally:
        md.close()                  # its new/ fd would keep the mount busy


@pytest.mark.parametrize("mode", MODES)
def test_short_writes_are_finished_not_dropped(tmp_path, monkeypatch, mode):
    """write(2) and writev(2) may write less than asked (a signal, a nearly full disk):
    the rest must follow, or a 250 would be given for a truncated message."""
    md = make(tmp_path / "md", mode)
    real_write, calls = os.write, []

    def short(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, data[:1000])

    monkeypatch.setattr(maildir.os, "write", lambda fd, data: short(fd, bytes(data)))
    monkeypatch.setattr(maildir.os, "writev",
                        lambda fd, pieces: short(fd, b"".join(bytes(p) for p in pieces)))
    body = b"".join(b"line %06d\n" % i for i in range(40_000))  # 480 KB: a flush, then the tail
    path = deliver(md, body[:100], body[100:300_000], body[300_000:])
    monkeypatch.undo()
    assert len(calls) >= len(body) // 1000  # cut short every time, and finished
    with open(path, "rb") as f:
        assert f.read() == body
    assert path.endswith(f",S={len(body)}")


def test_a_named_tmp_file_never_takes_over_an_existing_one(tmp_path, monkeypatch):
    """The named fallback creates its tmp/ file with O_EXCL: a name already there (another
    delivery in progress) is skipped, never truncated and written over."""
    monkeypatch.setattr(maildir, "_clock", lambda: 1_700_000_000_123_456_000)
    md = make(tmp_path / "md", "named", hostname="h")
    probe = md.begin()
    name = os.path.basename(probe._tmp)
    probe.abort()
    n = int(re.search(r"Q(\d+)\.", name)[1])
    victim = os.path.join(md.tmp, name.replace(f"Q{n}.", f"Q{n + 1}."))  # the next begin's name
    with open(victim, "wb") as f:
        f.write(b"another delivery in progress\n")
    delivery = md.begin()
    assert delivery._tmp != victim
    delivery.write(b"mine\n")
    with open(delivery.commit(), "rb") as f:
        assert f.read() == b"mine\n"
    with open(victim, "rb") as f:
        assert f.read() == b"another delivery in progress\n"


@pytest.mark.parametrize("mode", MODES)
def test_commit_and_abort_leave_no_descriptor_open(tmp_path, mode):
    """A worker stores thousands of messages: one descriptor left open per message would
    end in EMFILE and a 451 for every message after it."""
    md = make(tmp_path / "md", mode)
    deliver(md, b"opens new/ once\n")
    before = open_fds()
    for _ in range(20):
        deliver(md, b"x\n")
        md.begin().abort()
    assert open_fds() == before


def test_a_failed_write_aborts_the_delivery_itself(tmp_path, monkeypatch):
    """write() aborts the delivery before it raises: nothing stays in tmp/ even where the
    caller never calls abort()."""
    md = make(tmp_path / "md", "named")
    delivery = md.begin()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir.os, "writev", full)
    monkeypatch.setattr(maildir.os, "write", full)
    with pytest.raises(OSError):
        delivery.write(b"x" * 300_000)
    monkeypatch.undo()
    assert os.listdir(md.tmp) == [] and os.listdir(md.new) == []


def test_close_never_raises_and_a_later_message_reopens_new(tmp_path):
    """close() runs right after a commit (the worker's Maildir LRU): a failing close(2)
    there must not turn the stored message's 250 into a 451."""
    md = Maildir(str(tmp_path / "md"))
    md.begin().commit()
    os.close(md._new_fd)  # the fd gone behind its back: close(2) now fails with EBADF
    md.close()
    d = md.begin()
    d.write(b"Subject: again\n\nbody\n")
    assert os.path.exists(d.commit())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_a_tmp_or_new_replaced_by_a_symlink_is_refused_not_followed(tmp_path, mode, sub):
    """Whoever owns a mailbox's directory must not be able to point a worker, perhaps
    running as root, at another directory of the host through a symlinked tmp/ or new/:
    the delivery fails (451) and nothing is written behind the link."""
    md = make(tmp_path / "md", mode)
    deliver(md, b"before\n")  # new/ is open and cached from here on
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = tmp_path / f"old-{sub}"
    os.rename(getattr(md, sub), moved)
    os.symlink(elsewhere, getattr(md, sub))
    with pytest.raises(OSError) as refused:
        deliver(md, b"through the link\n")
    assert refused.value.errno == errno.ELOOP and "symlink" in str(refused.value)
    assert maildir.blamed(refused.value) == md.path
    assert os.listdir(elsewhere) == []
    os.unlink(getattr(md, sub))
    os.rename(moved, getattr(md, sub))
    deliver(md, b"after\n")
    assert len(os.listdir(md.new)) == 2


def test_clean_tmp_does_not_follow_a_symlinked_tmp(tmp_path):
    md = make(tmp_path / "md")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "1700000000.M1P99999999Q1.host"
    victim.write_bytes(b"not ours")
    os.utime(victim, (0, 0))  # old enough for the age rule
    os.rmdir(md.tmp)
    os.symlink(elsewhere, md.tmp)
    with pytest.raises(OSError):
        clean_tmp(md.path)
    assert victim.exists()


def test_a_maildir_path_that_is_a_symlink_or_below_one_is_made_and_used(tmp_path, monkeypatch):
    """Only tmp/ and new/ are never followed: the configured path, and the directories
    above it (Debian's /var/spool/mail -> ../mail), come from the operator, and a first
    start must make the Maildir behind them, fsyncing each directory it made and its
    parent (where they really are, behind the link)."""
    synced = record_fsyncs(monkeypatch)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for path, made in ((link, []), (link / "alice" / "Maildir", ["alice", "alice/Maildir"])):
        synced.clear()
        md = Maildir(str(path), fsync=True)
        behind = real / os.path.relpath(path, link)
        made_dirs = {str(real / m) for m in made} | {str(behind / sub) for sub in ("tmp", "new", "cur")}
        assert sorted(synced) == sorted(made_dirs | {os.path.dirname(m) for m in made_dirs})
        deliver(md, b"through the operator's link\n")
        assert len(os.listdir(md.new)) == 1


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_a_symlinked_tmp_or_new_is_refused_when_the_maildir_is_made(tmp_path, sub):
    """Refused at start (the master makes every Maildir), named as a link, not at each
    message with a misleading 'Not a directory'."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / sub).symlink_to(elsewhere)
    with pytest.raises(OSError) as refused:
        Maildir(str(tmp_path / "md"))
    assert refused.value.errno == errno.ELOOP and "symlink" in str(refused.value)


def test_a_write_after_abort_is_refused_not_written(tmp_path):
    md = Maildir(str(tmp_path / "md"), fsync=False)
    copy = md.begin()
    copy.abort()
    with pytest.raises(ValueError, match="already committed or aborted"):
        copy.write(b"x" * maildir._FLUSH_AT)


def test_abort_of_a_named_copy_whose_tmp_file_is_gone_is_quiet(tmp_path):
    md = Maildir(str(tmp_path / "md"), fsync=False)
    md.use_tmpfile = False
    copy = md.begin()
    (name,) = os.listdir(md.tmp)
    os.unlink(os.path.join(md.tmp, name))  # a tmp/ sweep, an operator
    copy.abort()
    assert os.listdir(md.tmp) == []


def test_clean_tmp_leaves_a_recent_file_of_a_pid_beyond_pid_max_to_the_age_rule(tmp_path):
    md = Maildir(str(tmp_path / "md"), fsync=False)
    now = int(time.time())
    foreign = f"{now}.M1P{maildir._PID_MAX + 1}Q1.{escape_host('h.test')}"
    old = f"{now - 40 * 3600}.M2P{maildir._PID_MAX + 1}Q2.{escape_host('h.test')}"
    for name in (foreign, old):
        (tmp_path / "md" / "tmp" / name).write_text("")
    os.utime(tmp_path / "md" / "tmp" / old, (now - 40 * 3600,) * 2)
    assert clean_tmp(md.path, hostname="h.test") == 1
    assert os.listdir(md.tmp) == [foreign]
