"""The operator's log: one event a line, in the contract's ``[TAG] text`` format.

    2026-11-29T00:53:20.123Z/4711 [SMTP] MAIL FROM:<a@example.com>

A line starts with one field, the UTC timestamp and the pid of the process that wrote it
(a worker serves one session at a time, so the pid and the ``[CONN]`` line before it
identify the session), then the tag and the text: the tag follows the leading field, as
the contract has it follow a timestamp.  Lines are queued and written with one ``write(2)`` per
flush on an ``O_APPEND`` descriptor, so lines from many workers never interleave
mid-line, and a pipelined SMTP exchange costs one syscall of logging, not one per line.
CR and LF from clients are escaped so that nobody can forge a log line.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import stat
import sys
import time
from typing import Final

from . import process

DEBUG: Final = 10
INFO: Final = 20
WARNING: Final = 30
ERROR: Final = 40
ALWAYS: Final = 100  # a line asked for (SIGUSR1's stats): written at every level
LEVELS: Final = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
#: ".mmmZ/" for every millisecond: a busy worker's lines rarely share a millisecond, so
#: the prefix is rebuilt for most of them, and a lookup is cheaper than formatting.
_MILLIS: Final = tuple(f".{ms:03d}Z/" for ms in range(1000))
#: Queued text is written out once it reaches this many characters, whatever the
#: worker's rhythm: a client that pipelines commands without a pause would otherwise
#: grow the queue by a line per command, and a reply, until the session ends.
MAX_PENDING: Final = 64 * 1024
#: How long a flush waits for a log output that takes nothing (a pipe or a socket whose
#: reader has stopped: a stuck journald, a paused pager) before it drops its lines.
#: Once it has, later flushes do not wait until the output takes a line again.
LOG_STALL: Final = 2.0


def _same_file(a: int, b: int) -> bool:
    """Whether two descriptors are open on one file (a reload reopens the same log)."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class Log:
    def __init__(self, level: str = "info", path: str = "") -> None:
        self.level = LEVELS[level]
        self.path = path
        self._fd = self.open_file(path)
        self.pending: list[str] = []
        self._pending_size = 0
        # 1 when a write stopped inside a line (a full disk): the next write starts a new
        # one.  Shared with every process forked from this one, as the file is, since the
        # next to write after a cut line may be the master or another worker.
        self._torn = mmap.mmap(-1, 1)
        self._second = -1
        self._ms = -1
        self._stamp = self._line_prefix = ""
        self.pid = os.getpid()
        self._pid_text = f"{self.pid} "
        # A pipe, a socket or a terminal is written without blocking (see _stream_sink);
        # a regular file is written as it is.
        self._nb_fd = -1
        self._nb_sock: socket.socket | None = None
        self._nb_shared = False  # _nb_fd is the log's own descriptor, made non-blocking
        self._stream = False  # the output is one of those (and _fd is what to poll)
        self._stream_sink(self._fd)
        self._stalled = False  # a wait for the output has timed out; lines were dropped
        self._dropped = 0

    def _stream_sink(self, fd: int) -> None:
        """For a log output that can stop taking data, a way to write to it that never
        blocks: a write to a pipe whose reader has stopped would otherwise freeze the
        master (no signal handled, no worker reaped) and every worker after its reply.
        The descriptor's own flags are shared with whoever else holds it (the service
        manager, a shell), so they stay as they are: a pipe or a terminal is opened
        anew, non-blocking, through /proc, and a socket is sent to with MSG_DONTWAIT.
        Where neither works the output is written as before."""
        self._close_stream_sink()
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return
        if stat.S_ISREG(mode):
            return
        self._stream = True
        if stat.S_ISSOCK(mode):
            try:
                self._nb_sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                self._stream = False
            return
        try:
            self._nb_fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            # Refused (a pipe another user made, for a daemon that is not root; no
            # /proc): the descriptor itself is made non-blocking, its flags shared with
            # whoever holds it too.  A log that can freeze the master is worse.
            try:
                os.set_blocking(fd, False)
            except OSError:
                self._stream = False
                return
            self._nb_fd, self._nb_shared = fd, True

    def _close_stream_sink(self) -> None:
        if self._nb_fd >= 0 and not self._nb_shared:
            os.close(self._nb_fd)
        self._nb_shared = False
        if self._nb_sock is not None:
            self._nb_sock.close()
        self._nb_fd, self._nb_sock, self._stream = -1, None, False

    @staticmethod
    def open_file(path: str) -> int:
        """The descriptor lines go to: the file at ``path``, or stderr for "".

        Opened without blocking: a FIFO with no reader fails at once (ENXIO), where it
        would hold the master's start or reload until one came.  Writes to a FIFO, as
        to any stream, do not block either (see ``_stream_sink``)."""
        if not path:
            return sys.stderr.fileno()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        # Through a link only where root (or this process's user) made it: the master
        # opens the log as root, and a link another user planted (a log in a directory
        # others may write) would have it append the clients' text to any file, or make
        # one.  A link planted after this look fails the O_NOFOLLOW open.
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISLNK(st.st_mode):
            flags |= os.O_NOFOLLOW
        elif process.untrusted_link(st):
            raise PermissionError(errno.EPERM, f"a symlink of uid {st.st_uid}, not followed", path)
        return os.open(path, flags, 0o640)

    @staticmethod
    def discard(path: str, fd: int, created: bool = False) -> None:
        """Close what ``open_file(path)`` returned, when it is not to be used after all;
        ``created``: that open made the file, which goes again while nothing is in it (a
        failed reload changes nothing, and leaves no empty log of its own behind)."""
        if not path:
            return
        try:
            if created and os.fstat(fd).st_size == 0:
                os.unlink(path)
        except OSError:
            pass  # gone already, or not ours to remove: it stays, empty
        finally:
            os.close(fd)

    def reopen(self, level: str | None = None, path: str | None = None, fd: int = -1) -> None:
        """After a reload (new level or file) or log rotation: switch to the file.

        ``fd`` is that file when the caller opened it already with ``open_file``: a
        reload opens it before it changes anything, so that a file which cannot be
        opened fails the reload instead of leaving it half done."""
        new_path = self.path if path is None else path
        new_fd = self.open_file(new_path) if fd < 0 else fd
        self.flush()
        if level is not None:
            self.level = LEVELS[level]
        old_fd, self._fd = self._fd, new_fd
        self._stream_sink(new_fd)
        if self.path and old_fd != new_fd:
            if not _same_file(old_fd, new_fd):
                self._torn[0] = 0  # a new file (rotation): nothing cut in it
            os.close(old_fd)
        self.path = new_path

    def after_fork(self) -> None:
        self.pid = os.getpid()
        self._pid_text = f"{self.pid} "
        self._ms = -1  # the cached prefix carries the parent's pid
        self.pending.clear()
        self._pending_size = 0
        self._stalled, self._dropped = False, 0  # the parent's losses are the parent's to report

    def _prefix(self) -> str:
        """``<timestamp>/<pid> ``, formatted once per millisecond: a session's lines
        mostly share one."""
        ms = time.time_ns() // 1_000_000
        if ms != self._ms:
            self._ms = ms
            sec, frac = divmod(ms, 1000)
            if sec != self._second:
                self._second = sec
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._line_prefix = self._stamp + _MILLIS[frac] + self._pid_text
        return self._line_prefix

    def queue(self, tag: str, text: str, level: int = 20) -> None:
        """Add a line to the next flush (the worker flushes once per exchange)."""
        if level < self.level:
            return
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        self._append(f"{self._prefix()}[{tag}] {text}\n")

    def queue_many(self, tag: str, texts: list[str]) -> None:
        if self.level > 20 or not texts:
            return
        stamp = f"{self._prefix()}[{tag}] "
        self._append(stamp + f"\n{stamp}".join(texts) + "\n")  # one join, in C

    def _append(self, text: str) -> None:
        self.pending.append(text)
        self._pending_size += len(text)
        if self._pending_size >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        note = 0
        if self._stalled:  # say what was lost, first, once the output takes lines again
            self.pending.insert(0, f"{self._prefix()}[ERROR] log output blocked for {LOG_STALL:g}s "
                                   f"or more: {self._dropped} line(s) not logged\n")
            note = len(self.pending[0])  # ASCII: as many octets as characters
        data = "".join(self.pending).encode("utf-8", "backslashreplace")
        torn = self._torn
        ends_cut = torn[0] == 1
        lines_from = note  # where this flush's own lines begin in data
        if ends_cut:
            torn[0] = 0
            data = b"\n" + data
            lines_from += 1
        self.pending.clear()
        self._pending_size = 0
        done = 0
        try:
            if not self._stream:
                while done < len(data):
                    done += os.write(self._fd, data[done:])
            else:
                done = self._write_stream(data, lines_from if note else 0, lines_from)
        except OSError:
            # A full log disk must not stop mail, and there is nowhere to report it.
            pass
        # A write cut short may have stopped inside a line: the next write ends it.
        if done:
            torn[0] = 1 if data[done - 1] != 10 else 0
        elif ends_cut:
            torn[0] = 1

    def _write_stream(self, data: bytes, note_end: int, lines_from: int) -> int:
        """Write to a pipe, socket or terminal without blocking; wait at most LOG_STALL
        for it to take more, and not at all while it is known to be stalled.  The lines
        it does not take are dropped and counted.  ``data`` reports the last count in
        its first ``note_end`` octets (0: no report); the lines to count begin at
        ``lines_from`` (after the report, and after the LF that ends a line another
        write cut).  Returns the octets written."""
        done = 0
        deadline = -1.0
        while done < len(data):
            try:
                if self._nb_sock is not None:
                    done += self._nb_sock.send(data[done:], socket.MSG_DONTWAIT)
                else:
                    done += os.write(self._nb_fd, data[done:])
                continue
            except BlockingIOError:
                pass
            now = time.monotonic()
            if deadline < 0:
                deadline = now + LOG_STALL
            if self._stalled or now >= deadline or not self._writable(deadline - now):
                break
        if done >= note_end:
            self._dropped = 0  # the count went out (or there was none to give)
        self._stalled = done < len(data)
        if self._stalled:
            self._dropped += data.count(b"\n", max(done, lines_from))
        return done

    def _writable(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return bool(poller.poll(max(1, int(timeout * 1000))))

    def line(self, tag: str, text: str, level: int = 20) -> None:
        """Write one line now (master events, rare worker events)."""
        self.queue(tag, text, level)
        self.flush()

    def debug(self, tag: str, text: str) -> None:
        self.line(tag, text, 10)

    def info(self, tag: str, text: str) -> None:
        self.line(tag, text, 20)

    def warning(self, tag: str, text: str) -> None:
        self.line(tag, text, 30)

    def error(self, tag: str, text: str) -> None:
        self.line(tag, text, 40)
