"""pyfloor: the floor of forksmtp's shape, served by `bench.py serve-pyfloor`.

A master binds, pre-forks N workers, and each worker runs a blocking accept/recv/send
loop, as forksmtp's do, and stores every message as forksmtp does by default:
Return-Path and Received added, LF line endings, an unnamed O_TMPFILE inode in tmp/
(a named file and rename() where the filesystem refuses it), write, fsync, link into
new/, fsync the linked file again, fsync new/, then 250.  Nothing else: no command syntax checks, no limits, no
timeouts, no log, no scoreboard, no admission control, no TLS.  Every pre-forked Python
server that stores durably does at least this work per message, so its rate bounds what
any such server reaches here: the yardstick for what forksmtp's rules and guarantees cost.

It trusts its client completely and only ever listens on loopback for the benchmark.
Its reads have no timeout on purpose: a socket timeout makes CPython poll before every
recv, work the floor must not do.  The benchmark bounds them instead: each cell runs
under --run-timeout, and the server's whole process group is killed when it ends.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import os
import signal
import socket
import time

from .messages import to_lf

_TMPFILE = getattr(os, "O_TMPFILE", 0)
_SEQ = itertools.count(1)


class Store:
    """One worker's Maildir writer (the same sequence as forksmtp's maildir module)."""

    def __init__(self, path: str, fsync_on: bool) -> None:
        self.tmp, self.new = os.path.join(path, "tmp"), os.path.join(path, "new")
        self.new_fd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY)
        self.fsync_on = fsync_on
        self.use_tmpfile = bool(_TMPFILE)
        self.pid = os.getpid()
        self.host = socket.gethostname().encode()  # forksmtp's default server.hostname
        self._id_prefix = f"{int(time.time()):X}{self.pid:X}.".encode()
        self._ids = itertools.count(1)

    def queue_id(self) -> bytes:
        """An id as long as forksmtp's: its start time and pid in hex, then a counter."""
        return self._id_prefix + f"{next(self._ids):X}".encode()

    def name(self) -> str:
        secs, nsecs = divmod(time.time_ns(), 1_000_000_000)
        return f"{secs}.M{nsecs // 1000}P{self.pid}Q{next(_SEQ)}.pyfloor"

    def store(self, data: bytes) -> None:
        fd, tmp = self._open()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync_on:
                os.fsync(fd)
            if tmp is None:
                os.link(f"/proc/self/fd/{fd}", self.name(), dst_dir_fd=self.new_fd,
                        follow_symlinks=True)
                if self.fsync_on:  # its link count, as forksmtp does (maildir._sync_link)
                    os.fsync(fd)
            else:
                os.rename(tmp, os.path.join(self.new, self.name()))
            if self.fsync_on:
                os.fsync(self.new_fd)
        finally:
            os.close(fd)

    def _open(self) -> tuple[int, str | None]:
        if self.use_tmpfile:
            try:
                return os.open(self.tmp, _TMPFILE | os.O_WRONLY, 0o600), None
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.use_tmpfile = False
        tmp = os.path.join(self.tmp, self.name())
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp


def _unstuff(body: bytes) -> bytes:
    body = body.replace(b"\r\n..", b"\r\n.")
    return body[1:] if body.startswith(b"..") else body


def serve(conn: socket.socket, store: Store, peer_ip: bytes = b"127.0.0.1") -> None:
    """One session: 250 to every command, 354 to DATA, 250 once the message is stored.

    As forksmtp does, the socket has TCP_NODELAY and the replies to a pipelined group
    (RFC 2920) leave in one send, just before the server waits for more input: sent one
    by one, the second would wait for the client's delayed ACK (Nagle), 40 ms here."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = [b"220 pyfloor ESMTP\r\n"]

    def flush() -> None:
        if out:  # a line that spans reads has no reply to wait for
            conn.sendall(b"".join(out))
            out.clear()

    buf, sender, helo, rcpt = b"", b"", b"", b""
    while True:
        cut = buf.find(b"\r\n")
        if cut < 0:
            flush()
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
            continue
        line, buf = buf[:cut], buf[cut + 2:]
        verb = line[:4].upper()
        if verb == b"DATA":
            out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            flush()
            body, buf = _read_body(conn, buf)
            if body is None:
                return
            # The trace fields forksmtp writes, field for field, so that the files are
            # as big as forksmtp's (a file one 4 KiB block smaller costs less to store).
            head = (b"Return-Path: <" + sender + b">\nReceived: from " + helo + b" ([" + peer_ip
                    + b"])\n\tby " + store.host + b" (forksmtp) with ESMTP id " + store.queue_id()
                    + b"\n\tfor <" + rcpt + b">; "
                    + time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()).encode()
                    + b"\n")
            store.store(head + to_lf(_unstuff(body)))
            out.append(b"250 2.0.0 Message accepted\r\n")
        elif verb == b"QUIT":
            out.append(b"221 2.0.0 Bye\r\n")
            flush()
            return
        elif verb == b"MAIL":
            sender = line.partition(b"<")[2].partition(b">")[0]
            out.append(b"250 2.1.0 Sender ok\r\n")
        elif verb == b"RCPT":
            rcpt = line.partition(b"<")[2].partition(b">")[0]
            out.append(b"250 2.1.5 Recipient ok\r\n")
        elif verb == b"EHLO" or verb == b"HELO":
            helo = line[5:].strip()
            out.append(b"250-pyfloor\r\n250 PIPELINING\r\n")
        else:
            out.append(b"250 ok\r\n")


def _read_body(conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
    """The message up to the final dot (its last CRLF kept), and what follows it."""
    start = 0
    while True:
        if buf.startswith(b".\r\n"):  # an empty message
            return b"", buf[3:]
        end = buf.find(b"\r\n.\r\n", start)
        if end >= 0:
            return buf[:end + 2], buf[end + 5:]
        start = max(len(buf) - 4, 0)
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk


def worker(listener: socket.socket, maildir: str, fsync_on: bool) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:   # as forksmtp's workers (process.batch_scheduling): the same scheduling
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    store = Store(maildir, fsync_on)
    while True:
        conn, peer = listener.accept()
        try:
            serve(conn, store, peer[0].encode())
        except OSError:
            pass
        finally:
            conn.close()


def serve_pyfloor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench.py serve-pyfloor")
    p.add_argument("--listen", required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--no-fsync", action="store_true")
    args = p.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(args.maildir, sub), exist_ok=True)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(1024)
    kids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                worker(listener, args.maildir, not args.no_fsync)
            finally:
                os._exit(1)
        kids.append(pid)

    def stop(signum: int, frame: object) -> None:
        for kid in kids:
            os.kill(kid, signal.SIGTERM)
        for kid in kids:
            os.waitpid(kid, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"[READY] pyfloor on {args.listen} ({args.workers} workers)", flush=True)
    while True:
        signal.pause()
