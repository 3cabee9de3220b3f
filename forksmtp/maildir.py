"""Maildir delivery: exclusive creation, durable writes, links that never overwrite.

A message is written to an unnamed ``O_TMPFILE`` file in ``tmp/`` (or, where the
filesystem refuses that, to a named file created with ``O_EXCL``), fsynced, then
hard-linked into ``new/`` under a unique name, and ``new/`` itself is fsynced.
Only then does the caller learn the final path, so a 250 is never sent for a
message that a crash could lose. This module knows nothing about SMTP.

Names follow the Maildir convention ``<secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>``:
the pid and the per-process counter make them unique on one host, the host part
across hosts, and ``link()`` fails instead of overwriting if they ever clash.
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import socket
import time
from collections.abc import Sequence
from typing import Final

__all__ = ["Maildir", "Delivery", "commit_all", "clean_tmp", "is_no_space", "escape_host"]

# Text is held until this much has come, then written with one writev(): each write(2)
# to ext4 pays a fixed cost (inode lock, timestamps, delayed-allocation bookkeeping)
# beside the copy.  Measured on this machine, 64 MiB into a new file with writeback
# every MiB: 64 KiB writes 0.40-0.69 ms of CPU per MiB, 256 KiB writes 0.20-0.23.
_FLUSH_AT: Final = 256 * 1024
# A piece this big is held as it is (one more iovec), not copied into the small-piece
# buffer: the DATA reader's blocks of a big message are never copied in user space.
_HOLD_WHOLE: Final = 32 * 1024
# A big message's pages are handed to the disk every this many octets while the rest
# still arrives (POSIX_FADV_DONTNEED starts writeback of dirty pages without waiting),
# so the fsync before the 250 waits for the last stretch only, not the whole message.
# 50 MiB message, same run, alternating: none 363-430 MiB/s, every 4 MiB 441-530,
# every 1 MiB 518-569, every 256 KiB 391-416.  Messages under 1 MiB never pay for it.
_WRITEBACK_EVERY: Final = 1024 * 1024
_MAX_TRIES: Final = 100         # bound on name clashes before giving up
_PID_MAX: Final = 1 << 22       # Linux PID_MAX_LIMIT; larger "pids" are not ours
_TMPFILE = getattr(os, "O_TMPFILE", 0)
# How kernels and filesystems without O_TMPFILE support answer (EISDIR: kernels
# that predate it and see only O_DIRECTORY).
_TMPFILE_REFUSED: Final = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})
_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_EXCL_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_NAME: Final = re.compile(r"\d+\.M\d+P(\d+)Q\d+\.(.+)\Z")

_clock = time.time_ns           # looked up at call time, so tests can pin the clock
_seq = itertools.count(1)       # per-process delivery counter (the Q part)


def escape_host(name: str) -> str:
    """Host part of a Maildir name: no '/' or ':' (djb's escapes), no ',' (which
    would confuse readers of ',S='), and no leading dot (readers skip those)."""
    host = name.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    if host.startswith("."):
        host = "\\056" + host[1:]
    return host or "localhost"


def _unique(pid: int, host: str) -> str:
    secs, nsecs = divmod(_clock(), 1_000_000_000)
    return f"{secs}.M{nsecs // 1000}P{pid}Q{next(_seq)}.{host}"


def _mkdir(path: str, mode: int) -> bool:
    """True if this call made the directory."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):  # a file or a dangling symlink where new/ should be
            raise NotADirectoryError(errno.ENOTDIR, "exists but is not a directory", path) from None
        return False        # never change the mode of a directory we did not make
    if mode != 0o777:
        # mkdir's mode is filtered by the umask.  Through a descriptor that follows no
        # link: the master makes tmp/, new/ and cur/ as root in a directory the
        # workers' user may own, which could swap a link in for the one just made.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return True


def _open_sub(path: str, flags: int, mode: int = 0o600) -> int:
    """Open tmp/ or new/ (or an unnamed file in tmp/) without following a symlink there.

    Workers may run as root, and whoever owns a mailbox's directory could otherwise point
    them at any directory of the host, where the sender's text would be written.  (The
    configured Maildir path itself, and the directories above it, may be links: they
    come from the operator.)  O_NOFOLLOW alone reports a link as ENOTDIR; it is named."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except NotADirectoryError:
        if os.path.islink(path):
            raise _symlink_refused(path) from None
        raise


def _symlink_refused(path: str) -> OSError:
    return OSError(errno.ELOOP, "a symlink, which is not followed", path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> int:
    """Best-effort removal during cleanup; the error being handled matters more."""
    try:
        os.unlink(path)
    except OSError:
        return 0
    return 1


def _unlink_copy(linked: str, md: "Maildir") -> None:
    """Remove a copy linked into new/ by a delivery that then failed, best effort.  A
    mail reader may have moved it into cur/ meanwhile (as NAME:2,FLAGS): it goes there,
    or the client's retry after the 451 would leave the message twice."""
    try:
        os.unlink(linked)
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    name = linked.rpartition("/")[2]
    try:
        with os.scandir(md.cur) as entries:
            moved = [e.path for e in entries if e.name == name or e.name.startswith(name + ":")]
        for path in moved:
            os.unlink(path)
        if moved and md.fsync:
            _fsync_dir(md.cur)
    except OSError:
        pass


def _write_all(fd: int, buf: bytes | bytearray) -> None:
    with memoryview(buf) as view:
        done, total = 0, len(view)
        while done < total:
            done += os.write(fd, view[done:])


def _writev_all(fd: int, pieces: list, total: int) -> None:
    """Write every piece, in order, with one writev() in the usual case."""
    done = os.writev(fd, pieces) if len(pieces) > 1 else os.write(fd, pieces[0])
    if done < total:  # a short write (a signal, a nearly full disk): finish, or raise
        _write_all(fd, b"".join(pieces)[done:])


def blame(exc: BaseException, path: str) -> None:
    """Name the Maildir at ``path`` on a storage error, for the operator's log: an
    fsync's EIO names no file, a link names /proc/self/fd/N, and a transaction may store
    in several."""
    if isinstance(exc, OSError) and not hasattr(exc, "maildir"):
        setattr(exc, "maildir", path)


def blamed(exc: OSError) -> str:
    """The Maildir a storage error happened in, or "" if it is not known."""
    return getattr(exc, "maildir", "")


class Maildir:
    """One Maildir directory. Safe to create in a master and use in forked workers."""

    def __init__(self, path: str, *, fsync: bool = True, hostname: str | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.fsync = fsync
        self.host = escape_host(socket.gethostname() if hostname is None else hostname)
        self.tmp = os.path.join(self.path, "tmp")
        self.new = os.path.join(self.path, "new")
        self.cur = os.path.join(self.path, "cur")
        # O_TMPFILE deliveries are linked through /proc/self/fd, which a chroot may lack.
        self.use_tmpfile = bool(_TMPFILE) and os.path.isdir("/proc/self/fd")
        self._new_fd = -1
        self._new_fd_pid = 0
        self._new_id = (0, 0)  # (st_dev, st_ino) of the directory _new_fd is open on
        self.make()

    def make(self) -> list[str]:
        """Create what is missing of the Maildir and of the directories above it, and
        return what was made.  Each directory made and its parent are fsynced (with
        fsync on): a message fsynced in a new/ whose own entry is not yet on disk would
        be orphaned by a power cut, and without a journal the parent's fsync persists
        the entry but not the directory's own inode, which fsck then clears."""
        above = []
        parent = os.path.dirname(self.path)
        while not os.path.isdir(parent):
            above.append(parent)
            parent = os.path.dirname(parent)
        made = [d for d in reversed(above) if _mkdir(d, 0o777)]  # umask decides, as mkdir -p
        made += [d for d in (self.path, self.tmp, self.new) if _mkdir(d, 0o700)]
        try:
            if _mkdir(self.cur, 0o700):
                made.append(self.cur)
        except PermissionError:
            # Only readers use cur/: a worker that may not make it in a Maildir it does
            # not own still delivers, and the master's pass makes it (README, Layout).
            pass
        for sub in (self.tmp, self.new):  # refused now, not at each message (_open_sub)
            if os.path.islink(sub):
                raise _symlink_refused(sub)
        if self.fsync:
            for directory in dict.fromkeys(made + [os.path.dirname(d) for d in made]):
                _fsync_dir(directory)
        return made

    def __repr__(self) -> str:
        return f"Maildir({self.path!r}, fsync={self.fsync})"

    def begin(self) -> Delivery:
        """Start a delivery; the caller must commit() or abort() it.  A Maildir removed
        while the server runs is made again."""
        try:
            try:
                return self._begin(first=True)
            except FileNotFoundError:
                self.make()
                return self._begin(first=False)
        except OSError as exc:
            blame(exc, self.path)
            raise

    def _begin(self, first: bool) -> Delivery:
        if self.use_tmpfile:
            try:
                fd = _open_sub(self.tmp, _TMPFILE | os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _TMPFILE_REFUSED:
                    raise
                if exc.errno == errno.ENOENT and first:
                    # Most likely tmp/ gone for a moment (a reader renaming the folder,
                    # a remove): begin() makes it and tries again.  Only an ENOENT right
                    # after that is a kernel refusing O_TMPFILE, to remember.
                    raise
                delivery = self._begin_named()
                self.use_tmpfile = False
                return delivery
            return Delivery(self, fd, None)
        return self._begin_named()

    def _begin_named(self) -> Delivery:
        pid = os.getpid()
        tmp_fd = _open_sub(self.tmp, _DIR_FLAGS)
        try:
            for _ in range(_MAX_TRIES):
                name = _unique(pid, self.host)
                try:
                    fd = os.open(name, _EXCL_FLAGS, 0o600, dir_fd=tmp_fd)
                except FileExistsError:
                    continue
                return Delivery(self, fd, os.path.join(self.tmp, name))
        finally:
            os.close(tmp_fd)
        raise FileExistsError(errno.EEXIST, "no unique name available", self.tmp)

    def _dir_fd(self, pid: int) -> int:
        """fd of new/, opened once per process. An fd inherited through fork()
        is left alone rather than closed: the child may already have closed
        that number and reused it for something else."""
        if self._new_fd_pid != pid:
            self._new_fd = _open_sub(self.new, _DIR_FLAGS)
            self._new_fd_pid = pid
            st = os.fstat(self._new_fd)
            self._new_id = (st.st_dev, st.st_ino)
        return self._new_fd

    def _current_dir_fd(self, pid: int) -> int:
        """fd of the directory the path of new/ names now (one stat per message).  The
        fd stays open between messages, so a Maildir moved or replaced meanwhile (an
        operator's mv, a restore) would otherwise go on getting mail, and the log would
        name a file that is not there; one removed is made again."""
        try:
            st = os.stat(self.new, follow_symlinks=False)
        except FileNotFoundError:
            self.make()
            st = os.stat(self.new, follow_symlinks=False)
        if self._new_fd_pid == pid and (st.st_dev, st.st_ino) != self._new_id:
            self.close()
        return self._dir_fd(pid)

    def close(self) -> None:
        """Release the new/ fd held by this process (it is reopened on demand).  Never
        raises: it runs after a commit (the Maildir LRU), where an error would turn a
        stored message's 250 into a 451, and Linux frees the fd whatever close says."""
        fd, pid = self._new_fd, self._new_fd_pid
        self._new_fd, self._new_fd_pid = -1, 0
        if pid == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass


class Delivery:
    """One message being written into one Maildir."""

    __slots__ = ("maildir", "path", "_fd", "_tmp", "_buf", "_pieces", "_held", "_written",
                 "_linked")

    def __init__(self, maildir: Maildir, fd: int, tmp: str | None) -> None:
        self.maildir = maildir
        self.path: str | None = None     # final path, once committed
        self._fd = fd
        self._tmp = tmp                  # named tmp file, or None for O_TMPFILE
        self._buf = bytearray()          # small pieces, copied together
        self._pieces: list = []          # what goes before _buf in the next writev
        self._held = 0                   # octets in _pieces and _buf
        self._written = 0
        self._linked: str | None = None  # in new/ but not yet durable

    @property
    def size(self) -> int:
        return self._written + self._held

    def write(self, data: bytes | bytearray) -> None:
        """Append data. On a failed write the delivery is aborted, then the error raised."""
        if len(data) >= _HOLD_WHOLE:
            if type(data) is not bytes:  # held until the writev: must not change meanwhile
                data = bytes(data)
            if self._buf:  # keep the order: the small pieces so far go first
                self._pieces.append(self._buf)
                self._buf = bytearray()
            self._pieces.append(data)
        else:
            self._buf += data
        self._held += len(data)
        if self._held >= _FLUSH_AT:
            self._flush()

    def free_space(self) -> tuple[int, int | None]:
        """This file's file system (its id) and the octets an unprivileged writer may
        still add to it; None for a file system that reports no size at all (every
        count 0: ramfs, a FUSE one without statfs), which cannot tell."""
        st = os.fstatvfs(self._fd)
        return st.f_fsid, (st.f_bavail * st.f_frsize if st.f_blocks else None)

    def commit(self) -> str:
        """Make the message durable in new/ and return its path; see commit_all()."""
        return commit_all((self,))[0]

    def abort(self) -> None:
        """Discard the message; nothing is left in tmp/ or new/. Idempotent, and a
        no-op after a successful commit."""
        fd, self._fd = self._fd, -1
        self._buf.clear()
        self._pieces.clear()
        self._held = 0
        if self._linked is not None:
            _unlink_copy(self._linked, self.maildir)
        if self._tmp is not None:
            _unlink_quiet(self._tmp)
        self._linked = self._tmp = None
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _flush(self) -> None:
        """Write everything held to the file."""
        if self._fd < 0:
            raise ValueError("delivery already committed or aborted")
        pieces = self._pieces
        if self._buf:
            pieces.append(self._buf)
        try:
            _writev_all(self._fd, pieces, self._held)
        except BaseException as exc:
            self.abort()
            blame(exc, self.maildir.path)
            raise
        pieces.clear()
        self._buf.clear()
        written = self._written
        self._written += self._held
        self._held = 0
        if self.maildir.fsync:
            self._start_writeback(written, self._written)

    def _start_writeback(self, before: int, after: int) -> None:
        """Hand the whole _WRITEBACK_EVERY stretches this write completed to the disk
        (one write of a big block may complete several)."""
        start = before - before % _WRITEBACK_EVERY
        end = after - after % _WRITEBACK_EVERY
        if end > start:
            try:
                os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only a head start for the fsync, which still follows

    def _sync(self) -> None:
        if self._fd < 0:
            raise ValueError("delivery already committed or aborted")
        if self._held:
            self._flush()
        if self.maildir.fsync:
            os.fsync(self._fd)

    def _link(self, pid: int) -> None:
        md = self.maildir
        dir_fd = md._current_dir_fd(pid)
        tmp = self._tmp  # a named tmp file, or None for O_TMPFILE
        src = tmp if tmp is not None else f"/proc/self/fd/{self._fd}"
        suffix = f",S={self._written}"
        for _ in range(_MAX_TRIES):
            name = _unique(pid, md.host) + suffix
            try:
                # dst_dir_fd makes CPython call linkat(); with AT_SYMLINK_FOLLOW it
                # links the file behind /proc/self/fd/N. Plain link() gives EXDEV.
                os.link(src, name, dst_dir_fd=dir_fd, follow_symlinks=tmp is None)
            except FileExistsError:
                continue
            self._linked = f"{md.new}/{name}"  # os.path.join is interpreted code
            if tmp is not None:
                os.unlink(tmp)
                self._tmp = None
            return
        raise FileExistsError(errno.EEXIST, "no unique name available", md.new)

    def _sync_link(self) -> None:
        """fsync an unnamed file once more, now that it is linked.  Its first fsync wrote
        its inode with a link count of 0, and the fsync of new/ persists the entry, not
        the inode it names: where no journal ties the two (ext4 without one, ext2) a
        power cut would leave an entry to an inode that fsck takes for deleted, and
        clears.  With a journal the first of the two fsyncs commits the link, and the
        one of new/ finds nothing left to do."""
        if self.maildir.fsync:
            os.fsync(self._fd)

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)

    def _finish(self) -> str:
        path, self._linked = self._linked, None
        self.path = path
        return path  # type: ignore[return-value]


def _sync_dirs(deliveries: Sequence[Delivery], pid: int, best_effort: bool = False) -> None:
    """fsync each distinct new/ once.  ``best_effort`` after a rollback: the removal of
    copies already linked must be durable too, or a copy whose new/ was fsynced before a
    later copy failed (an EIO on another disk) comes back after a power cut, and the
    client, told 451, sends the message again: a duplicate in that Maildir.  The error
    being reported then matters more than one met on the way."""
    seen: set[str] = set()
    for delivery in deliveries:
        md = delivery.maildir
        if md.fsync and md.new not in seen:
            seen.add(md.new)
            try:
                os.fsync(md._dir_fd(pid))
            except OSError as exc:
                if best_effort:
                    continue
                blame(exc, md.path)
                raise


def commit_all(deliveries: Sequence[Delivery]) -> list[str]:
    """Commit several deliveries (one per destination Maildir) all-or-nothing.

    Every file is flushed and fsynced first, then all are linked, then each
    unnamed (O_TMPFILE) file is fsynced again for its link count, then each
    distinct new/ is fsynced once. If anything fails, every copy already
    linked is removed (and its new/ fsynced again, so the removal outlives a power
    cut), all deliveries are aborted, and the error is re-raised.
    Returns the final paths in order.
    """
    delivery = deliveries[0]  # the one at work when an error comes (_sync_dirs: its own)
    pid = os.getpid()
    try:
        for delivery in deliveries:
            delivery._sync()
        unnamed = [delivery for delivery in deliveries if delivery._tmp is None]
        for delivery in deliveries:
            delivery._link(pid)
        for delivery in unnamed:
            delivery._sync_link()
        _sync_dirs(deliveries, pid)
        for delivery in deliveries:
            delivery._close()
    except BaseException as exc:
        blame(exc, delivery.maildir.path)
        linked = [copy for copy in deliveries if copy._linked is not None]
        for copy in deliveries:
            copy.abort()
        _sync_dirs(linked, pid, best_effort=True)
        raise
    return [delivery._finish() for delivery in deliveries]


def _pid_alive(pid: int) -> bool:
    if pid > _PID_MAX:
        return True         # not a pid of this host: leave it to the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True         # exists, owned by someone else
    return True


def _stale(entry: os.DirEntry[str], cutoff: float, host: str) -> bool:
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    if max(st.st_atime, st.st_mtime) < cutoff:
        return True
    # Only this host's pids can be checked. Hosts sharing a Maildir must have
    # distinct host names, which the Maildir naming scheme requires anyway.
    match = _TMP_NAME.match(entry.name)
    return match is not None and match[2] == host and not _pid_alive(int(match[1]))


def clean_tmp(path: str, *, now: float | None = None, max_age: float = 36 * 3600,
              hostname: str | None = None) -> int:
    """Remove leftovers from tmp/: files untouched (atime and mtime) for max_age
    seconds, and at once those made on this host by a process that is gone.
    Names starting with '.' are skipped. Returns how many files were removed."""
    host = escape_host(socket.gethostname() if hostname is None else hostname)
    cutoff = (time.time() if now is None else now) - max_age
    removed = 0
    tmp_fd = _open_sub(os.path.join(os.fspath(path), "tmp"), _DIR_FLAGS)  # the master is often root
    try:
        with os.scandir(tmp_fd) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and _stale(entry, cutoff, host):
                    try:
                        os.unlink(entry.name, dir_fd=tmp_fd)
                    except OSError:
                        continue
                    removed += 1
    finally:
        os.close(tmp_fd)
    return removed


def is_no_space(exc: BaseException) -> bool:
    """True when a storage error means "full" (452 4.3.1) rather than 451 4.3.0."""
    return getattr(exc, "errno", None) in _NO_SPACE
