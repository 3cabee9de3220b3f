#!/usr/bin/env python3
"""Benchmark forksmtp beside the disk's own limit and a peer SMTP server.

One run measures, alternating the systems so that machine drift cancels out:

  loop          the conventional Maildir delivery with no SMTP at all: N processes each
                create a named file in tmp/ (O_CREAT|O_EXCL), write, fsync, rename it
                into new/ and fsync new/, all into one Maildir -- the rate to beat;
  loop-tmpfile  the same with an unnamed O_TMPFILE inode linked into new/ (informational);
  forksmtp      the real daemon, started the README's way, storing real Maildir files;
  aiosmtpd      the peer: aiosmtpd with a Maildir handler as durable as forksmtp's
                (tmp write, fsync, rename into new/, fsync new/, then 250);
  smtp-sink     Postfix's smtp-sink, a C SMTP server that answers 250 and stores
                nothing: the ceiling of the SMTP exchange itself (client, kernel TCP and
                a server doing no storage) on this machine. Optional: run by default only
                when its binary is found on PATH, as /usr/sbin/smtp-sink or as named by
                $FORKSMTP_BENCH_SMTP_SINK (an unpacked package's lib/postfix beside it is
                put on LD_LIBRARY_PATH).

The SMTP systems share one load generator: our own multi-process client (raw
non-blocking sockets, one message per connection unless --per-conn K), or Postfix's
smtp-source with --client smtp-source.

Definitions
  msgs/s       messages acknowledged with 250, divided by the wall time from the start
               signal to the last 250 (for the loop: to the last delivery).
  ack latency  from the last byte of "<CRLF>.<CRLF>" handed to the kernel to the 250
               read back: the time the server needs to make the message durable.
               For the loop: one delivery, from the create in tmp/ to the end of the
               fsync of new/.
  txn latency  from connect() (first message of a connection) or from sending MAIL
               (later messages on the same connection) to the 250 after the final dot.
  server CPU   CPU of the server's process tree (master and every worker, all threads),
               sampled before and after the load from /proc/PID/task/*/schedstat (ns);
               split into user and system in the proportion of psutil's tick counts.
               CPU of workers the master reaped meanwhile is recovered from the
               master's children_* counters.
  USS          psutil's unique set size of each worker after the run.

Every file in new/ is counted and its Message-ID checked after each run: a run where the
stored messages differ from the acknowledged ones is a failed run (exit status 1).
smtp-sink stores nothing, so its runs count acknowledged messages only.

Examples
  python scripts/bench.py --quick
  python scripts/bench.py                      # 1, 10, 50 sessions, 2 rounds
  python scripts/bench.py --full --rounds 3    # adds 200 sessions
  python scripts/bench.py --systems loop,aiosmtpd --messages 500
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import psutil

SINK = "smtp-sink"            # stores nothing: the ceiling of the SMTP exchange
SYSTEMS = ("loop", "loop-tmpfile", "forksmtp", "aiosmtpd", SINK)
LOOP_SYSTEMS = ("loop", "loop-tmpfile")
SMTP_SYSTEMS = ("forksmtp", "aiosmtpd")   # the storing servers: big-message and hold checks
SINK_ENV = "FORKSMTP_BENCH_SMTP_SINK"
SINK_PATHS = ("/usr/sbin/smtp-sink",)
MODES = ("durable", "nofsync")
HOST = "127.0.0.1"
MiB = 1 << 20
NO_DURABILITY_FS = ("tmpfs", "ramfs")
RATIO_PAIRS = (("forksmtp", "loop"), ("forksmtp", "aiosmtpd"), ("loop-tmpfile", "loop"),
               ("forksmtp", SINK), ("loop", SINK))
START_TIMEOUT = 60.0          # server boot, worker fork, client/loop process start

SENDER = "bench@example.test"
RECIPIENT = "rcpt@example.test"
EHLO = b"EHLO bench-client.example.test\r\n"
MAIL = f"MAIL FROM:<{SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
HOLD = object()               # a conversation yields this to park its connection
MESSAGE_ID_RE = re.compile(rb"^Message-ID: <([^@>\r\n]+)@", re.MULTILINE | re.IGNORECASE)


# --------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(0, math.ceil(q / 100.0 * len(sorted_vals)) - 1)
    return sorted_vals[k]


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def split_evenly(items: list, parts: int) -> list[list]:
    """Round-robin split, so every share differs in size by at most one."""
    return [items[i::parts] for i in range(parts)]


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding path (longest matching mount point)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def raise_fd_limit(want: int) -> None:
    """500 held sessions need ~1,000 descriptors; servers inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- Maildir

_HOSTNAME = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def maildir_name(seq: int, size: int) -> str:
    """A unique Maildir file name: <secs>.M<usecs>P<pid>Q<seq>.<host>,S=<size>."""
    secs, usecs = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{secs}.M{usecs}P{os.getpid()}Q{seq}.{_HOSTNAME},S={size}"


def make_maildir(path: str) -> str:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    return path


def stored_ids(maildir: str) -> tuple[int, Counter]:
    """Count files in new/ and collect the Message-ID (our unique id) of each."""
    newdir = os.path.join(maildir, "new")
    names = os.listdir(newdir)
    ids: Counter = Counter()
    for name in names:
        with open(os.path.join(newdir, name), "rb") as f:
            match = MESSAGE_ID_RE.search(f.read(16384))
        ids[match.group(1).decode() if match else "<no id>"] += 1
    return len(names), ids


def check_stored(maildir: str, acked: list[str] | None, acked_count: int = 0
                 ) -> tuple[int, str | None]:
    """Return (stored count, problem or None): every acked id stored exactly once, no more.

    acked=None (smtp-source: its messages carry no id of ours) compares counts only."""
    count, ids = stored_ids(maildir)
    if acked is None:
        return count, (None if count == acked_count else
                       f"stored {count} files but {acked_count} messages were acked")
    missing = [i for i in acked if i not in ids]
    dupes = [i for i, n in ids.items() if n > 1]
    extra = count - len(acked)
    if count == len(acked) and not missing and not dupes:
        return count, None
    return count, (f"stored {count} files but {len(acked)} messages were acked; "
                   f"acked but not stored: {missing[:5]} ({len(missing)}), "
                   f"stored twice: {dupes[:5]}, stored minus acked: {extra}")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def tmpfile_supported(directory: str) -> bool:
    try:
        fd = os.open(directory, os.O_WRONLY | os.O_TMPFILE, 0o600)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


# --------------------------------------------------------------------------- messages

FILLER = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
          b"tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam ")


def message_head(msg_id: str) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {msg_id}\r\n"
            f"Message-ID: <{msg_id}@bench.example.test>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n").encode()


def make_body(nbytes: int) -> bytes:
    """CRLF text lines of 76 characters (never starting with a dot), nbytes long."""
    line = FILLER[:74] + b"\r\n"
    body = line * (max(nbytes, 2) // len(line))
    rest = nbytes - len(body)
    if rest >= 3:
        body += b"x" * (rest - 2) + b"\r\n"
    return body


def body_for_size(size: int) -> bytes:
    """A body making the whole message (headers included) about size bytes."""
    return make_body(size - len(message_head("r0-forksmtp-durable-c50.99999")))


def to_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --------------------------------------------------------------------------- processes

class Reaper:
    """Every process this script starts, so that all of them die with it, even on error."""

    def __init__(self) -> None:
        self.servers: list[subprocess.Popen] = []
        self.children: list[mp.process.BaseProcess] = []

    def stop_server(self, popen: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM the server's own process group, then SIGKILL whatever is left of it."""
        if popen.poll() is None:
            self._signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(popen.pid, signal.SIGKILL)
                popen.wait(5)
        # Workers outliving their master would keep ports and CPU: kill the group's rest.
        self._signal_group(popen.pid, signal.SIGKILL)
        if popen in self.servers:
            self.servers.remove(popen)

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_children(self) -> None:
        for proc in self.children:
            if proc.is_alive():
                proc.terminate()
        for proc in self.children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.children.clear()

    def cleanup(self) -> None:
        self.stop_children()
        for popen in list(self.servers):
            self.stop_server(popen, grace=3.0)


def _child_setup() -> None:
    """Forked helpers die on SIGTERM and leave Ctrl-C to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _gated_entry(prepare: Callable, run: Callable, args: tuple,
                 q: Any, start: Any, timeout: float) -> None:
    """Child body: prepare, report ready, wait for the common start, run, report."""
    _child_setup()
    try:
        state = prepare(*args)
        q.put(("ready", os.getpid(), None))
        if start.wait(timeout):
            q.put(("result", os.getpid(), run(state)))
    except BaseException as exc:  # report every failure to the parent, never hang it
        q.put(("error", os.getpid(), f"{type(exc).__name__}: {exc}"))


def run_gated(reaper: Reaper, prepare: Callable, run: Callable, arg_list: list[tuple],
              timeout: float, on_start: Callable[[], Any] | None = None) -> tuple[list, Any]:
    """Fork one process per args, start them together, collect their results.

    on_start runs after every process is ready and right before the start signal, so
    that samples it takes (server CPU) cover exactly the measured work."""
    ctx = mp.get_context("fork")
    q, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_gated_entry, args=(prepare, run, a, q, start, timeout),
                         daemon=True) for a in arg_list]
    for proc in procs:
        proc.start()
        reaper.children.append(proc)
    try:
        _collect(q, procs, "ready", time.monotonic() + START_TIMEOUT)
        before = on_start() if on_start else None
        start.set()
        results = _collect(q, procs, "result", time.monotonic() + timeout + 30)
    finally:
        reaper.stop_children()
    return results, before


def _collect(q: Any, procs: list, kind: str, deadline: float) -> list:
    """Wait for one message of the given kind from every process; raise on errors."""
    got: dict[int, Any] = {}
    while len(got) < len(procs):
        try:
            what, pid, payload = q.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(procs) - len(got)} helper processes gave no {kind}")
            if not any(p.is_alive() for p in procs):
                raise RuntimeError(f"helper processes exited before sending their {kind}")
            continue
        if what == "error":
            raise RuntimeError(f"helper process {pid} failed: {payload}")
        if what == kind:
            got[pid] = payload
    return list(got.values())


# --------------------------------------------------------------------------- the loop

def loop_prepare(maildir: str, ids: list[str], size: int, fsync_on: bool,
                 tmpfile: bool) -> dict:
    body = to_lf(body_for_size(size))
    return {"maildir": maildir, "fsync": fsync_on, "tmpfile": tmpfile, "ids": ids,
            "messages": [to_lf(message_head(i)) + body for i in ids]}


def deliver_named(tmpdir: str, newdir: str, new_fd: int, data: bytes, seq: int,
                  fsync_on: bool) -> None:
    """The textbook Maildir delivery: named file in tmp/, fsync, rename, fsync new/."""
    name = maildir_name(seq, len(data))
    tmp_path = os.path.join(tmpdir, name)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        if fsync_on:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp_path, os.path.join(newdir, name))
    if fsync_on:
        os.fsync(new_fd)


def deliver_tmpfile(tmpdir: str, newdir: str, new_fd: int, data: bytes, seq: int,
                    fsync_on: bool) -> None:
    """Unnamed inode in tmp/, fsync, linkat into new/ (never overwrites), fsync new/."""
    fd = os.open(tmpdir, os.O_WRONLY | os.O_TMPFILE, 0o600)
    try:
        write_all(fd, data)
        if fsync_on:
            os.fsync(fd)
        # CPython calls plain link(2) -- which does not follow the /proc magic link and
        # fails with EXDEV -- unless a dir fd is given; with one it calls linkat(2) with
        # AT_SYMLINK_FOLLOW, which links the unnamed inode.
        os.link(f"/proc/self/fd/{fd}", maildir_name(seq, len(data)), dst_dir_fd=new_fd,
                follow_symlinks=True)
    finally:
        os.close(fd)
    if fsync_on:
        os.fsync(new_fd)


def loop_run(state: dict) -> dict:
    """Deliver every prepared message; time each one and this process's CPU."""
    tmpdir = os.path.join(state["maildir"], "tmp")
    newdir = os.path.join(state["maildir"], "new")
    deliver = deliver_tmpfile if state["tmpfile"] else deliver_named
    new_fd = os.open(newdir, os.O_RDONLY | os.O_DIRECTORY)
    lat, ids_done = [], 0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        for seq, data in enumerate(state["messages"]):
            s = time.perf_counter()
            deliver(tmpdir, newdir, new_fd, data, seq, state["fsync"])
            lat.append(time.perf_counter() - s)
            ids_done += 1
    finally:
        os.close(new_fd)
    t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    return {"done": state["ids"][:ids_done], "lat": lat, "t_start": t0, "t_end": t1,
            "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime}


# --------------------------------------------------------------------------- the peer

class DurableMaildirHandler:
    """An aiosmtpd handler storing like forksmtp: Return-Path and Received added, LF
    line endings, exclusive file in tmp/, fsync, rename into new/, fsync new/, then 250.

    The store is synchronous in the event loop, as aiosmtpd's bundled Mailbox handler
    does; --peer-threads N moves it to a thread pool instead."""

    def __init__(self, path: str, fsync_on: bool, threads: int) -> None:
        self.tmp = os.path.join(make_maildir(path), "tmp")
        self.new = os.path.join(path, "new")
        self.new_fd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY)
        self.fsync_on = fsync_on
        self.seq = itertools.count()
        self.pool = None
        if threads:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(threads)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = self.render(session, envelope)
        try:
            if self.pool:
                await asyncio.get_running_loop().run_in_executor(self.pool, self.store, data)
            else:
                self.store(data)
        except OSError:
            return "451 4.3.0 Storage failure"
        return "250 2.0.0 Message accepted"

    @staticmethod
    def render(session: Any, envelope: Any) -> bytes:
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
        head = (f"Return-Path: <{envelope.mail_from}>\n"
                f"Received: from {session.host_name} ([{session.peer[0]}])\n"
                f"\tby bench-peer.example.test (aiosmtpd) with ESMTP\n"
                f"\tfor <{envelope.rcpt_tos[0]}>; {stamp}\n")
        return head.encode() + to_lf(envelope.original_content)

    def store(self, data: bytes) -> None:
        name = maildir_name(next(self.seq), len(data))
        tmp_path = os.path.join(self.tmp, name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
            if self.fsync_on:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(self.new, name))
        if self.fsync_on:
            os.fsync(self.new_fd)


def serve_aiosmtpd(argv: list[str]) -> int:
    """`bench.py serve-aiosmtpd --listen HOST:PORT --maildir DIR [--no-fsync]`."""
    p = argparse.ArgumentParser(prog="bench.py serve-aiosmtpd")
    p.add_argument("--listen", required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    opts = p.parse_args(argv)
    asyncio.run(_serve_aiosmtpd(opts))
    return 0


async def _serve_aiosmtpd(opts: argparse.Namespace) -> None:
    from aiosmtpd.smtp import SMTP
    loop = asyncio.get_running_loop()
    host, port = opts.listen.rsplit(":", 1)
    handler = DurableMaildirHandler(opts.maildir, not opts.no_fsync, opts.threads)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-peer.example.test", data_size_limit=256 * MiB,
                     loop=loop),
        host, int(port), backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"[READY] aiosmtpd on {opts.listen}", flush=True)
    await stop.wait()
    server.close()


# --------------------------------------------------------------------------- smtp-sink

def find_smtp_sink() -> str | None:
    """The smtp-sink binary: the one $FORKSMTP_BENCH_SMTP_SINK names (and only that one,
    when set), else the one on PATH, else /usr/sbin/smtp-sink; None when there is none."""
    named = os.environ.get(SINK_ENV)
    candidates = [named] if named else [shutil.which("smtp-sink"), *SINK_PATHS]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def sink_missing_note() -> str:
    named = os.environ.get(SINK_ENV)
    where = (f"${SINK_ENV} ({named}) is not an executable file" if named else
             f"no smtp-sink on PATH, at {', '.join(SINK_PATHS)} or in ${SINK_ENV}")
    return f"{SINK} skipped: {where} (Debian: the postfix package)"


def sink_env(binary: str) -> dict[str, str] | None:
    """An unpacked (not installed) Postfix keeps its shared libraries in ../lib/postfix
    beside the binary, not in the /usr/lib/postfix its RUNPATH names: point the loader
    there. None (inherit the environment) for an installed Postfix."""
    bindir = os.path.dirname(os.path.realpath(binary))
    libdir = os.path.normpath(os.path.join(bindir, "..", "lib", "postfix"))
    if libdir == "/usr/lib/postfix" or not os.path.isdir(libdir):
        return None
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, (libdir, env.get("LD_LIBRARY_PATH"))))
    return env


def sink_argv(binary: str, port: int, sessions: int) -> list[str]:
    """smtp-sink as a plain fast receiver: ESMTP and PIPELINING announced (its defaults),
    250 to every command, no -d/-D (nothing written), no -c (no counter output per
    message). -m lifts its default cap of 256 simultaneous connections, which would
    leave the excess queued in the kernel; the last argument is the listen backlog."""
    conns = str(max(1024, 2 * sessions))
    user = ["-u", "nobody"] if os.geteuid() == 0 else []   # it refuses root without -u
    return [binary, "-4", *user, "-m", conns, "-h", "bench-sink.example.test",
            f"{HOST}:{port}", conns]


# --------------------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: str

    def tree(self) -> list[psutil.Process]:
        master = psutil.Process(self.popen.pid)
        return [master] + master.children(recursive=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def start_server(bench: "Bench", name: str, argv: list[str], port: int,
                 env: dict[str, str] | None = None) -> Server:
    """Start a server in its own process group (so it can be killed whole), log to a file."""
    if not port_is_free(port):
        raise RuntimeError(f"port {HOST}:{port} is taken: refusing to benchmark whatever "
                           f"listens there (choose another --port-base)")
    log_path = os.path.join(bench.logs, f"{name}-{next(bench.server_seq)}.log")
    with open(log_path, "wb") as logf:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
    bench.reaper.servers.append(popen)
    return Server(name, popen, port, log_path)


def probe_banner(port: int, timeout: float = 2.0) -> bool:
    """True when the server answers a connection with a 220 greeting."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            banner = sock.recv(512)
            sock.sendall(QUIT)
            return banner.startswith(b"220")
    except OSError:
        return False


def wait_ready(server: Server, min_procs: int) -> None:
    """Wait for the 220 greeting and for min_procs processes (master + workers) to exist."""
    deadline = time.monotonic() + START_TIMEOUT
    while not probe_banner(server.port):
        if server.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not start (exit status "
                               f"{server.popen.poll()}); its log ends with:\n"
                               f"{server.log_tail()}")
        time.sleep(0.1)
    while len(server.tree()) < min_procs and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)   # let the greeting probe's session end before the CPU baseline


def runtime_s(pid: int) -> float | None:
    """CPU time of all threads of pid in seconds, in ns precision (schedstat).

    /proc/PID/stat (psutil's cpu_times) counts 10 ms clock ticks: summed over dozens of
    workers that each ran a few ms, truncation would swallow most of the CPU."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            continue        # the thread ended meanwhile
        except (OSError, ValueError, IndexError):
            return None     # no schedstat on this kernel: the tick counts must do
    return total / 1e9


def cpu_snapshot(server: Server) -> dict:
    """Per live process: (user ticks s, system ticks s, precise run time s or None);
    and the master's counters of reaped children."""
    procs: dict[int, tuple[float, float, float | None]] = {}
    reaped = (0.0, 0.0)
    for proc in server.tree():
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        procs[proc.pid] = (t.user, t.system, runtime_s(proc.pid))
        if proc.pid == server.popen.pid:
            reaped = (t.children_user, t.children_system)
    return {"procs": procs, "reaped": reaped}


def cpu_delta(before: dict, after: dict) -> tuple[float, float, int]:
    """(user s, system s, workers that vanished) spent between two snapshots.

    The total comes from the precise run times when every process has one, and is split
    into user and system in the proportion of the tick counts. Workers reaped meanwhile
    count through the master's children_* ticks (their part before the first snapshot
    is taken off again)."""
    gone = [pid for pid in before["procs"] if pid not in after["procs"]]
    ticks_user = after["reaped"][0] - before["reaped"][0] - sum(before["procs"][p][0] for p in gone)
    ticks_sys = after["reaped"][1] - before["reaped"][1] - sum(before["procs"][p][1] for p in gone)
    reaped_total = ticks_user + ticks_sys
    precise = 0.0
    for pid, (u, s, run) in after["procs"].items():
        u0, s0, run0 = before["procs"].get(pid, (0.0, 0.0, 0.0))
        ticks_user, ticks_sys = ticks_user + u - u0, ticks_sys + s - s0
        precise = None if precise is None or run is None or run0 is None else precise + run - run0
    if precise is None:
        return ticks_user, ticks_sys, len(gone)
    total = precise + reaped_total
    ticks = ticks_user + ticks_sys
    share = ticks_user / ticks if ticks > 0 else 0.5
    return total * share, total * (1 - share), len(gone)


def memory_report(server: Server) -> dict:
    """Master RSS/USS and each worker's USS (MiB). The peer is one process: its own USS."""
    master, workers = None, []
    for proc in server.tree():
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        if proc.pid == server.popen.pid:
            master = info
        else:
            workers.append(info.uss / MiB)
    if not workers and master is not None:
        workers = [master.uss / MiB]
    return {"master_rss_mib": master.rss / MiB if master else None,
            "master_uss_mib": master.uss / MiB if master else None,
            "workers": len(workers),
            "worker_uss_mib_median": median_of(workers),
            "worker_uss_mib_max": max(workers) if workers else None}


def forksmtp_config(path: str, workers: int, sessions: int, fsync_on: bool,
                    max_size: int, log_level: str) -> str:
    """A config raising the pool and connection ceilings above the benchmark's load."""
    cap = 2 * max(workers, sessions) + 20
    text = (f"[server]\nworkers = {workers}\nmax_workers = {workers + 8}\n"
            f"max_connections = {cap}\nmax_connections_per_ip = {cap}\n"
            f"graceful_timeout = 5\n\n"
            f"[limits]\nmax_message_size = {max_size}\n\n"
            f"[delivery]\nfsync = {'true' if fsync_on else 'false'}\n\n"
            f"[log]\nlevel = \"{log_level}\"\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def start_system(bench: "Bench", system: str, fsync_on: bool, sessions: int,
                 maildir: str, workers: int | None = None) -> Server:
    """Start forksmtp, the peer (storing into maildir) or smtp-sink (storing nothing), each
    on its own port; wait until ready."""
    args = bench.args
    if system == "forksmtp":
        workers = workers or sessions + args.spare_workers
        server = start_forksmtp(bench, fsync_on, sessions, maildir, workers)
        min_procs = workers + 1
    elif system == SINK:
        port, binary = args.port_base + 2, bench.smtp_sink or SINK
        server = start_server(bench, system, sink_argv(binary, port, sessions), port,
                              env=sink_env(binary))
        min_procs = 1
    else:
        argv = [sys.executable, os.path.abspath(__file__), "serve-aiosmtpd",
                "--listen", f"{HOST}:{args.port_base + 1}", "--maildir", maildir,
                "--threads", str(args.peer_threads)] + ([] if fsync_on else ["--no-fsync"])
        server, min_procs = start_server(bench, system, argv, args.port_base + 1), 1
    wait_ready(server, min_procs)
    return server


def start_forksmtp(bench: "Bench", fsync_on: bool, sessions: int, maildir: str,
                   workers: int) -> Server:
    args = bench.args
    cfg = forksmtp_config(os.path.join(bench.root, f"forksmtp-{next(bench.server_seq)}.toml"),
                          workers, sessions, fsync_on,
                          max(10 * MiB, 2 * args.big_mib * MiB), args.server_log_level)
    argv = bench.forksmtp_cmd + ["-c", cfg, "--listen", f"{HOST}:{args.port_base}",
                                 "--maildir", maildir, "--workers", str(workers)]
    return start_server(bench, "forksmtp", argv, args.port_base)


# --------------------------------------------------------------------------- client

class Tally:
    """What one client process saw: acked ids, latencies, refusals and errors."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.ack_lat: list[float] = []
        self.txn_lat: list[float] = []
        self.last_ack = 0.0
        self.rejected: Counter = Counter()
        self.errors: Counter = Counter()
        self.unsettled = 0     # messages whose fate is unknown (connection lost)

    def ack(self, msg_id: str, ack_lat: float, txn_lat: float, at: float) -> None:
        self.acked.append(msg_id)
        self.ack_lat.append(ack_lat)
        self.txn_lat.append(txn_lat)
        self.last_ack = at

    def as_dict(self) -> dict:
        return {"acked": self.acked, "ack_lat": self.ack_lat, "txn_lat": self.txn_lat,
                "last_ack": self.last_ack, "rejected": dict(self.rejected),
                "errors": dict(self.errors), "unsettled": self.unsettled}


def _envelope(pipelining: bool) -> Iterator:
    """MAIL, RCPT, DATA: one round trip each, or one group (RFC 2920). Returns codes."""
    if pipelining:
        codes, _ = yield MAIL + RCPT + DATA, 3
        return codes
    codes = []
    for command, wanted in ((MAIL, 250), (RCPT, 250), (DATA, 354)):
        reply, _ = yield command, 1
        codes.append(reply[0])
        if reply[0] != wanted:
            break
    return codes


def _greet(tally: Tally, count: int) -> Iterator:
    """Read the 220 greeting and say EHLO; False (refusal tallied) unless both succeed."""
    (code, *_), _ = yield b"", 1
    if code == 220:
        (code, *_), _ = yield EHLO, 1
        if code == 250:
            return True
    tally.rejected[f"greeting/EHLO {code}"] += count
    return False


def conversation(ids: list[str], wires: dict, tally: Tally, pipelining: bool,
                 t_open: float) -> Iterator:
    """One SMTP connection carrying len(ids) messages.

    Yields (bytes to send, final replies wanted) and receives (reply codes, time the
    last byte was sent). Messages whose fate is unknown when it is closed are counted."""
    done = 0
    try:
        if not (yield from _greet(tally, len(ids))):
            done = len(ids)
            return
        for msg_id in ids:
            t_txn = t_open if done == 0 else time.monotonic()
            codes = yield from _envelope(pipelining)
            if codes != [250, 250, 354]:
                tally.rejected[f"envelope {codes}"] += len(ids) - done
                done = len(ids)
                break
            (code, *_), t_sent = yield wires[msg_id], 1
            t_ack = time.monotonic()
            if code == 250:
                tally.ack(msg_id, t_ack - t_sent, t_ack - t_txn, t_ack)
            else:
                tally.rejected[f"after data {code}"] += 1
            done += 1
        yield QUIT, 1
    except GeneratorExit:
        tally.unsettled += len(ids) - done
        raise


def hold_conversation(tally: Tally) -> Iterator:
    """Greeting and EHLO, then park the open session until released, then QUIT."""
    if not (yield from _greet(tally, 1)):
        return
    yield HOLD
    yield QUIT, 1


class Conn:
    __slots__ = ("sock", "gen", "slot", "out", "need", "inbuf", "codes", "t_sent",
                 "deadline", "events", "connecting")

    def __init__(self, sock: socket.socket, gen: Iterator, slot: Callable) -> None:
        self.sock, self.gen, self.slot = sock, gen, slot
        self.out: memoryview | None = None
        self.need, self.inbuf, self.codes = 0, b"", []
        self.t_sent = self.deadline = 0.0
        self.events, self.connecting = selectors.EVENT_WRITE, True


class Driver:
    """Runs many conversations over non-blocking sockets in one process (epoll).

    A slot is a callable t_open -> conversation or None; when a slot's connection ends
    the slot is asked for the next one, until it has no more messages."""

    def __init__(self, port: int, tally: Tally, io_timeout: float, deadline: float) -> None:
        self.port, self.tally = port, tally
        self.io_timeout, self.deadline = io_timeout, deadline
        self.sel = selectors.DefaultSelector()
        self.conns: set[Conn] = set()
        self.to_open: list[Callable] = []
        self.held: list[Conn] = []

    def run(self) -> None:
        next_sweep = time.monotonic() + 1.0
        while True:
            while self.to_open:
                self._open(self.to_open.pop())
            if not self.conns:
                return
            for key, _mask in self.sel.select(0.5):
                self._event(key.data)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 1.0

    def release_held(self) -> None:
        held, self.held = self.held, []
        for conn in held:
            self.conns.add(conn)
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ
            self._advance(conn, None)

    def _open(self, slot: Callable) -> None:
        gen = slot(time.monotonic())
        if gen is None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, gen, slot)
        conn.deadline = time.monotonic() + self.io_timeout
        self.conns.add(conn)
        self.sel.register(sock, selectors.EVENT_WRITE, conn)
        err = sock.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            self._finish(conn, f"connect: {os.strerror(err)}")

    def _event(self, conn: Conn) -> None:
        try:
            if conn.connecting:
                self._connected(conn)
            elif conn.out is not None:
                self._send(conn)
            else:
                self._recv(conn)
        except OSError as exc:
            self._finish(conn, f"{type(exc).__name__}: {exc.strerror or exc}")

    def _connected(self, conn: Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        conn.connecting = False
        self._advance(conn, None)

    def _advance(self, conn: Conn, value: Any) -> None:
        """Feed the conversation its replies; start sending what it asks for next."""
        try:
            request = conn.gen.send(value)
        except StopIteration:
            self._finish(conn)
            return
        if request is HOLD:
            self._hold(conn)
            return
        data, conn.need = request
        conn.codes = []
        conn.deadline = time.monotonic() + self.io_timeout
        conn.out = memoryview(data) if data else None
        if conn.out is not None:
            self._send(conn)       # the socket is nearly always writable: try at once
        else:
            self._want(conn, selectors.EVENT_READ)
            self._parse(conn)

    def _send(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        conn.out = conn.out[sent:]
        if conn.out:
            self._want(conn, selectors.EVENT_WRITE)
            return
        conn.out, conn.t_sent = None, time.monotonic()
        self._want(conn, selectors.EVENT_READ)
        self._parse(conn)

    def _recv(self, conn: Conn) -> None:
        data = conn.sock.recv(65536)
        if not data:
            raise ConnectionError(errno.ECONNRESET, "closed by the server")
        conn.inbuf += data
        self._parse(conn)

    def _parse(self, conn: Conn) -> None:
        """Collect final reply lines ("250 ..." not "250-..."); advance when enough."""
        while len(conn.codes) < conn.need:
            end = conn.inbuf.find(b"\r\n")
            if end < 0:
                return
            line, conn.inbuf = conn.inbuf[:end], conn.inbuf[end + 2:]
            if line[3:4] != b"-":
                conn.codes.append(int(line[:3]) if line[:3].isdigit() else 0)
        if conn.need and conn.out is None:
            conn.need = 0
            self._advance(conn, (conn.codes, conn.t_sent))

    def _want(self, conn: Conn, events: int) -> None:
        if conn.events != events:
            self.sel.modify(conn.sock, events, conn)
            conn.events = events

    def _hold(self, conn: Conn) -> None:
        self.sel.unregister(conn.sock)
        self.conns.discard(conn)
        self.held.append(conn)

    def _finish(self, conn: Conn, error: str | None = None) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.sel.unregister(conn.sock)
        conn.sock.close()
        if error:
            self.tally.errors[error] += 1
        conn.gen.close()
        if time.monotonic() < self.deadline:
            self.to_open.append(conn.slot)

    def _sweep(self, now: float) -> None:
        """Bound every wait: per reply (io_timeout) and for the whole run (deadline)."""
        for conn in list(self.conns):
            if now > self.deadline:
                self._finish(conn, "run deadline reached")
            elif now > conn.deadline:
                self._finish(conn, f"no reply within {self.io_timeout:g}s")
        if now > self.deadline:
            self.to_open.clear()


def client_prepare(port: int, ids: list[str], slots: int, opts: dict) -> dict:
    body = body_for_size(opts["size"])
    wires = {i: message_head(i) + body + b".\r\n" for i in ids}
    return {"port": port, "ids": ids, "slots": slots, "wires": wires, **opts}


def client_run(state: dict) -> dict:
    """Run state["slots"] concurrent sessions until this process's messages are sent."""
    tally, pending = Tally(), iter(state["ids"])

    def slot(t_open: float) -> Iterator | None:
        ids = list(itertools.islice(pending, state["per_conn"]))
        return conversation(ids, state["wires"], tally, state["pipelining"],
                            t_open) if ids else None

    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    driver = Driver(state["port"], tally, state["io_timeout"], t0 + state["run_timeout"])
    driver.to_open.extend([slot] * state["slots"])
    driver.run()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"t_start": t0, "t_end": time.monotonic(),
            "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, **tally.as_dict()}


def run_our_client(bench: "Bench", server: Server, ids: list[str], sessions: int) -> dict:
    """Spread the sessions over a few client processes; sample server CPU around them."""
    args = bench.args
    nprocs = min(sessions, args.client_procs or os.cpu_count() or 1)
    opts = {"size": args.size, "per_conn": args.per_conn, "pipelining": args.pipelining,
            "io_timeout": args.io_timeout, "run_timeout": args.run_timeout}
    shares = split_evenly(ids, nprocs)
    slots = [len(s) for s in split_evenly(list(range(sessions)), nprocs)]
    arg_list = [(server.port, shares[i], slots[i], opts) for i in range(nprocs)]
    results, before = run_gated(bench.reaper, client_prepare, client_run, arg_list,
                                args.run_timeout, on_start=lambda: cpu_snapshot(server))
    after = cpu_snapshot(server)
    return merge_client_results(results, before, after)


def merge_client_results(results: list[dict], before: dict, after: dict) -> dict:
    merged: dict[str, Any] = {"acked": [], "ack_lat": [], "txn_lat": [], "unsettled": 0,
                              "rejected": Counter(), "errors": Counter(), "client_cpu": 0.0}
    for r in results:
        for key in ("acked", "ack_lat", "txn_lat"):
            merged[key].extend(r[key])
        merged["rejected"].update(r["rejected"])
        merged["errors"].update(r["errors"])
        merged["unsettled"] += r["unsettled"]
        merged["client_cpu"] += r["cpu"]
    t_start = min(r["t_start"] for r in results)
    last = max([r["last_ack"] for r in results if r["acked"]] or [t_start])
    merged["wall"] = last - t_start
    merged["cpu"] = cpu_delta(before, after)
    return merged


def run_smtp_source(bench: "Bench", server: Server, ids: list[str], sessions: int) -> dict:
    """Postfix's smtp-source as the load: no per-message latency, acked = all if exit 0."""
    args = bench.args
    argv = ["smtp-source", "-s", str(sessions), "-m", str(len(ids)),
            "-l", str(len(body_for_size(args.size))), "-f", SENDER, "-t", RECIPIENT,
            "-M", "bench-client.example.test"] + (["-d"] if args.per_conn > 1 else [])
    argv.append(f"{HOST}:{server.port}")
    before = cpu_snapshot(server)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=args.run_timeout)
    wall = time.monotonic() - t0
    after = cpu_snapshot(server)
    ok = proc.returncode == 0
    return {"acked": None if ok else [], "count": len(ids) if ok else 0, "ack_lat": [],
            "txn_lat": [], "rejected": Counter(), "unsettled": 0 if ok else len(ids),
            "errors": Counter() if ok else Counter({proc.stderr.decode()[-200:]: 1}),
            "client_cpu": None, "wall": wall, "cpu": cpu_delta(before, after)}


# --------------------------------------------------------------------------- cells

@dataclass
class Bench:
    args: argparse.Namespace
    root: str
    logs: str
    out: str
    fs: str
    forksmtp_cmd: list[str]
    smtp_sink: str | None = None      # the smtp-sink binary, when one was found
    reaper: Reaper = field(default_factory=Reaper)
    server_seq: Iterator[int] = field(default_factory=itertools.count)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fresh_maildir(bench: Bench, tag: str) -> str:
    path = os.path.join(bench.root, "maildirs", tag)
    shutil.rmtree(path, ignore_errors=True)
    return make_maildir(path)


def discard_maildir(bench: Bench, path: str) -> None:
    """Flush dirty pages so the next cell starts clean.  The cell's Maildir stays until the
    run ends: on ext4 without a journal the inode allocator skips every inode freed in the
    last 60-300 s (ext4 ialloc.c, recently_deleted()), checking each one, so deleting a
    cell's files would tax whichever system runs next -- in one profile it was a quarter of
    a worker's CPU.  The whole bench root is removed at the end (unless --keep)."""
    del path
    os.sync()


def cell_messages(bench: Bench, sessions: int) -> int:
    return max(bench.args.messages, sessions * bench.args.per_conn)


def latency_fields(prefix: str, values: list[float]) -> dict:
    vals = sorted(values)
    return {f"{prefix}_p50_ms": _ms(percentile(vals, 50)),
            f"{prefix}_p99_ms": _ms(percentile(vals, 99))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def rate_fields(acked: int, wall: float, user: float, system: float) -> dict:
    per = 1000.0 / acked if acked else None
    return {"acked": acked, "wall_s": wall,
            "msgs_per_s": acked / wall if acked and wall > 0 else None,
            "cpu_user_ms_per_msg": user * per if per else None,
            "cpu_sys_ms_per_msg": system * per if per else None,
            "cpu_ms_per_msg": (user + system) * per if per else None}


def run_loop_cell(bench: Bench, system: str, mode: str, sessions: int, tag: str) -> dict:
    """N processes delivering into one Maildir, N = the sessions of the SMTP cells."""
    maildir = fresh_maildir(bench, tag)
    ids = [f"{tag}.{i}" for i in range(cell_messages(bench, sessions))]
    arg_list = [(maildir, share, bench.args.size, mode == "durable", system == "loop-tmpfile")
                for share in split_evenly(ids, sessions)]
    results, _ = run_gated(bench.reaper, loop_prepare, loop_run, arg_list,
                           bench.args.run_timeout)
    done = [i for r in results for i in r["done"]]
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    stored, problem = check_stored(maildir, done)
    discard_maildir(bench, maildir)
    return {"sent": len(ids), "stored": stored, "problem": problem,
            **rate_fields(len(done), wall, sum(r["user"] for r in results),
                          sum(r["sys"] for r in results)),
            **latency_fields("ack", lat)}


def run_smtp_cell(bench: Bench, system: str, mode: str, sessions: int, tag: str) -> dict:
    """Start the server fresh, drive the load, measure, stop, check what was stored."""
    maildir = fresh_maildir(bench, tag)
    ids = [f"{tag}.{i}" for i in range(cell_messages(bench, sessions))]
    server = start_system(bench, system, mode == "durable", sessions, maildir)
    drive = run_smtp_source if bench.args.client == "smtp-source" else run_our_client
    try:
        warm = warm_up(bench, server, drive, tag, sessions)
        load = drive(bench, server, ids, sessions)
        memory = memory_report(server)
    finally:
        bench.reaper.stop_server(server.popen)
    acked = load["acked"] if load["acked"] is not None else ids
    stored, problem = (None, None) if system == SINK else \
        check_stored(maildir, None if load["acked"] is None else warm + acked,
                     len(warm) + len(ids))   # smtp-sink stores nothing
    if stored is not None:
        stored -= len(warm)
    if problem:
        keep_log(bench, server, tag)
    discard_maildir(bench, maildir)
    user, system_cpu, vanished = load["cpu"]
    return {"sent": len(ids), "stored": stored, "problem": problem,
            **rate_fields(len(acked), load["wall"], user, system_cpu),
            **latency_fields("ack", load["ack_lat"]), **latency_fields("txn", load["txn_lat"]),
            "rejected": dict(load["rejected"]), "errors": dict(load["errors"]),
            "unsettled": load["unsettled"], "workers_vanished": vanished,
            "client_cpu_ms_per_msg": (1000.0 * load["client_cpu"] / len(acked)
                                      if acked and load["client_cpu"] is not None else None),
            **memory}


def warm_up(bench: Bench, server: Server, drive, tag: str, sessions: int) -> list[str]:
    """Untimed messages first, so that the cell measures the steady state: a fresh
    server's first sessions pay one-off costs (a forked worker's first writes to pages it
    shares with the master copy them) that its long life amortises.  Returns the acked
    ids, which the stored-files check then expects too."""
    ids = [f"{tag}.warm{i}" for i in range(bench.args.warmup * sessions)]
    if not ids:
        return []
    result = drive(bench, server, ids, sessions)
    acked = result["acked"] if result["acked"] is not None else ids[:result.get("count", 0)]
    if len(acked) != len(ids):
        raise RuntimeError(f"warm-up: {len(acked)} of {len(ids)} messages acked")
    return list(acked)


def keep_log(bench: Bench, server: Server, tag: str) -> None:
    """Copy a failing server's log into the results folder for the operator."""
    try:
        shutil.copy(server.log_path, os.path.join(bench.out, f"{tag}.log"))
    except OSError:
        pass


def run_cell(bench: Bench, system: str, mode: str, sessions: int, rnd: int) -> dict:
    """One measurement; a cell that breaks is recorded as failed and the run goes on."""
    tag = f"r{rnd}-{system}-{mode}-c{sessions}"
    runner = run_loop_cell if system in LOOP_SYSTEMS else run_smtp_cell
    cell: dict[str, Any] = {"system": system, "mode": mode, "sessions": sessions,
                            "round": rnd, "sent": 0, "acked": 0, "stored": None,
                            **{m: None for m in METRICS}}
    try:
        cell.update(runner(bench, system, mode, sessions, tag))
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        cell["problem"] = f"{type(exc).__name__}: {exc}"
    report_cell(bench, cell)
    return cell


def report_cell(bench: Bench, cell: dict) -> None:
    """One progress line per cell; loud lines for lost mail and for refused messages."""
    log(f"  {cell['system']:<13} {cell['mode']:<8} c={cell['sessions']:<4} "
        f"r={cell['round']}  {fmt(cell['msgs_per_s'], 0):>6} msgs/s  "
        f"ack p50 {fmt(cell['ack_p50_ms'], 2)} p99 {fmt(cell['ack_p99_ms'], 2)} ms  "
        f"cpu {fmt(cell['cpu_ms_per_msg'], 3)} ms/msg")
    where = f"{cell['system']} {cell['mode']} c={cell['sessions']} round {cell['round']}"
    if cell["problem"]:
        bench.failures.append(f"{where}: {cell['problem']}")
        log(f"!!! FAILED RUN ({where}): {cell['problem']}")
    if cell["acked"] < cell["sent"] and not cell["problem"]:
        note = (f"{where}: {cell['sent'] - cell['acked']} of {cell['sent']} messages not "
                f"acked; rejected {cell.get('rejected')}, errors {cell.get('errors')}")
        bench.warnings.append(note)
        log(f"!!! {note}")


def run_matrix(bench: Bench) -> list[dict]:
    """Rounds x modes x sessions, the systems alternating innermost so drift cancels."""
    cells = []
    for rnd in range(bench.args.rounds):
        for mode in bench.args.modes:
            for sessions in bench.args.sessions:
                for system in bench.args.systems:
                    cells.append(run_cell(bench, system, mode, sessions, rnd))
    return cells


# --------------------------------------------------------------------------- summary

METRICS = ("msgs_per_s", "ack_p50_ms", "ack_p99_ms", "txn_p50_ms", "txn_p99_ms",
           "cpu_user_ms_per_msg", "cpu_sys_ms_per_msg", "cpu_ms_per_msg",
           "worker_uss_mib_median", "worker_uss_mib_max", "master_rss_mib",
           "client_cpu_ms_per_msg")


def summarise(cells: list[dict]) -> dict:
    """Median over rounds of every metric: summary[mode][system][sessions]."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["mode"], cell["system"], cell["sessions"]), []).append(cell)
    summary: dict = {}
    for (mode, system, sessions), group in groups.items():
        good = [c for c in group if not c["problem"]]
        row = {m: median_of([c.get(m) for c in good]) for m in METRICS}
        row["rounds_ok"], row["rounds"] = len(good), len(group)
        summary.setdefault(mode, {}).setdefault(system, {})[str(sessions)] = row
    return summary


def compute_ratios(summary: dict) -> list[dict]:
    """forksmtp/loop, forksmtp/aiosmtpd (and loop-tmpfile/loop) per mode and sessions."""
    rows = []
    for mode, systems in summary.items():
        for top, base in RATIO_PAIRS:
            if top not in systems or base not in systems:
                continue
            for sessions, a in systems[top].items():
                b = systems[base].get(sessions)
                if b is None:
                    continue
                rows.append({"mode": mode, "sessions": int(sessions), "pair": f"{top}/{base}",
                             "msgs_per_s": ratio(a["msgs_per_s"], b["msgs_per_s"]),
                             "cpu_ms_per_msg": ratio(a["cpu_ms_per_msg"], b["cpu_ms_per_msg"]),
                             "cpu_sys_ms_per_msg": ratio(a["cpu_sys_ms_per_msg"],
                                                         b["cpu_sys_ms_per_msg"]),
                             "ack_p99_ms": ratio(a["ack_p99_ms"], b["ack_p99_ms"])})
    return rows


def find_ratio(ratios: list[dict], mode: str, sessions: int, pair: str, key: str):
    for row in ratios:
        if (row["mode"], row["sessions"], row["pair"]) == (mode, sessions, pair):
            return row[key]
    return None


def check_targets(bench: Bench, ratios: list[dict], extras: dict) -> list[dict]:
    """The performance targets, judged at 50 sessions (or the most measured)."""
    at = 50 if 50 in bench.args.sessions else max(bench.args.sessions)

    def r(mode: str, pair: str, key: str) -> float | None:
        return find_ratio(ratios, mode, at, pair, key)

    rows = [
        (f"durable msgs/s vs loop @{at}", r("durable", "forksmtp/loop", "msgs_per_s"), ">=", 1.0),
        (f"durable msgs/s vs aiosmtpd @{at}", r("durable", "forksmtp/aiosmtpd", "msgs_per_s"),
         ">=", 2.5),
        (f"fsync-off msgs/s vs aiosmtpd @{at}",
         r("nofsync", "forksmtp/aiosmtpd", "msgs_per_s"), ">=", 2.0),
        (f"durable CPU/msg vs aiosmtpd @{at}",
         r("durable", "forksmtp/aiosmtpd", "cpu_ms_per_msg"), "<=", 0.5),
        (f"durable ack p99 vs loop p99 @{at}", r("durable", "forksmtp/loop", "ack_p99_ms"),
         "<=", 1.5),
    ]
    stream = extras.get("stream", {}).get("forksmtp") or {}
    big = f"{bench.args.big_mib} MiB message"
    rows.append((f"{big}: worker RSS growth MiB", stream.get("worker_rss_growth_mib"), "<", 2.0))
    rows.append((f"{big}: throughput vs disk", stream.get("vs_disk"), ">=", 0.5))
    hold = extras.get("hold", {}).get("forksmtp") or {}
    rows.append(("open sessions: worker USS max MiB", hold.get("worker_uss_mib_max"), "<=", 8.0))
    rows.append(("open sessions: master RSS MiB", hold.get("master_rss_mib"), "<=", 50.0))
    return [{"target": name, "value": value, "need": f"{op} {limit:g}",
             "met": None if value is None else (value >= limit if op == ">=" else
                                                value <= limit if op == "<=" else value < limit)}
            for name, value, op, limit in rows]


# --------------------------------------------------------------------------- extras

def disk_write_rate(directory: str, size: int, repeats: int = 3) -> float:
    """Sequential write rate (MiB/s) like dd + fsync: 1 MiB writes, fsync, in directory."""
    chunk, rates = b"\0" * MiB, []
    for n in range(repeats):
        path = os.path.join(directory, f"seqwrite-{n}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.monotonic()
        try:
            for _ in range(size // MiB):
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        rates.append(size / MiB / (time.monotonic() - t0))
        os.unlink(path)
    return statistics.median(rates)


class RssSampler(threading.Thread):
    """Samples the RSS of every process of a server every 10 ms until stopped."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop = server, threading.Event()
        self.peak: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.procs: list[psutil.Process] = []

    def sample(self, refresh: bool = True) -> None:
        # Listing the tree reads every process in /proc: done once in a while only, so
        # that the sampler does not steal the CPU the transfer it measures needs.
        if refresh or not self.procs:
            self.procs = self.server.tree()
        for proc in self.procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                self.procs = []
                continue
            self.first.setdefault(proc.pid, rss)
            self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)

    def run(self) -> None:
        for n in itertools.count(1):
            if self.stop.wait(0.01):
                return
            self.sample(refresh=n % 50 == 0)


def read_reply(sock: socket.socket, limit: float = 120.0) -> int:
    """Blocking read of one whole (possibly multi-line) reply; returns its code.

    Each recv is bounded by the socket's timeout, the whole reply by limit seconds."""
    buf, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
        lines = buf.split(b"\r\n")
        finals = [ln for ln in lines[:-1] if ln[3:4] != b"-"]
        if finals:
            return int(finals[-1][:3])
    raise TimeoutError(f"no complete reply within {limit:g}s")


def send_big_message(sock: socket.socket, msg_id: str, size: int, sampler: RssSampler) -> float:
    """One transaction streaming size bytes in 1 MiB chunks; returns DATA->250 seconds."""
    for command, wanted in ((None, 220), (EHLO, 250),
                            (f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode(), 250),
                            (RCPT, 250), (DATA, 354)):
        if command:
            sock.sendall(command)
        code = read_reply(sock)
        if code != wanted:
            raise RuntimeError(f"big message: got {code}, wanted {wanted} ({command!r})")
    sampler.sample()          # baseline: the worker holds the session, before the body
    sampler.start()
    chunk = make_body(MiB)
    t0 = time.monotonic()
    sock.sendall(message_head(msg_id))
    for _ in range(size // MiB):
        sock.sendall(chunk)
    sock.sendall(b".\r\n")
    code = read_reply(sock)
    if code != 250:
        raise RuntimeError(f"big message refused with {code}")
    return time.monotonic() - t0


def stream_big(bench: Bench, system: str, disk_rate: float) -> dict:
    """A big message to a one-worker server; RSS sampled all along the transfer."""
    size, maildir = bench.args.big_mib * MiB, fresh_maildir(bench, f"big-{system}")
    server = start_system(bench, system, True, 1, maildir, workers=1)
    sampler = RssSampler(server)
    try:
        with socket.create_connection((HOST, server.port), timeout=bench.args.io_timeout) as s:
            seconds = send_big_message(s, f"big-{system}", size, sampler)
            s.sendall(QUIT)
    finally:
        sampler.stop.set()
        if sampler.is_alive():
            sampler.join(5)
        bench.reaper.stop_server(server.popen)
    stored, problem = check_stored(maildir, [f"big-{system}"])
    discard_maildir(bench, maildir)
    growth = {pid: (sampler.peak[pid] - sampler.first[pid]) / MiB for pid in sampler.peak}
    worker_growth = [g for pid, g in growth.items() if pid != server.popen.pid] or \
        list(growth.values())
    rate = size / MiB / seconds
    return {"size_mib": bench.args.big_mib, "seconds": seconds, "mib_per_s": rate,
            "disk_mib_per_s": disk_rate, "vs_disk": rate / disk_rate,
            "worker_rss_growth_mib": max(worker_growth),
            "master_rss_growth_mib": growth.get(server.popen.pid),
            "stored": stored, "problem": problem}


def hold_sessions(bench: Bench, system: str, count: int) -> dict:
    """count sessions open at once (greeting + EHLO, then idle); memory measured meanwhile."""
    maildir = fresh_maildir(bench, f"hold-{system}")
    server = start_system(bench, system, True, count, maildir,
                          workers=count + bench.args.spare_workers if system == "forksmtp" else None)
    tally = Tally()
    driver = Driver(server.port, tally, bench.args.io_timeout,
                    time.monotonic() + bench.args.run_timeout)
    opened = iter(range(count))
    driver.to_open.extend([lambda t: hold_conversation(tally)
                           if next(opened, None) is not None else None] * count)
    try:
        driver.run()
        memory = memory_report(server)
        held = len(driver.held)
        driver.release_held()
        driver.run()
    finally:
        bench.reaper.stop_server(server.popen)
        discard_maildir(bench, maildir)
    return {"sessions": count, "held": held, "rejected": dict(tally.rejected),
            "errors": dict(tally.errors), **memory}


def run_extras(bench: Bench) -> dict:
    """The big message and the open-sessions checks, for each SMTP system selected."""
    extras: dict[str, Any] = {"stream": {}, "hold": {}}
    systems = [s for s in bench.args.systems if s in SMTP_SYSTEMS]
    if bench.args.big_mib and systems:
        rate = disk_write_rate(bench.root, bench.args.big_mib * MiB)
        extras["disk_seq_write_mib_per_s"] = rate
        log(f"disk sequential write (1 MiB writes + fsync): {rate:.0f} MiB/s")
        for system in systems:
            extras["stream"][system] = result = stream_big(bench, system, rate)
            log(f"  {system}: {bench.args.big_mib} MiB in {result['seconds']:.2f}s = "
                f"{result['mib_per_s']:.0f} MiB/s ({result['vs_disk']:.2f} x disk), worker RSS "
                f"growth {result['worker_rss_growth_mib']:.1f} MiB")
            if result["problem"]:
                bench.failures.append(f"{system} big message: {result['problem']}")
    for system in systems if bench.args.hold else ():
        extras["hold"][system] = result = hold_sessions(bench, system, bench.args.hold)
        log(f"  {system}: {result['held']}/{bench.args.hold} sessions held, worker USS max "
            f"{fmt(result['worker_uss_mib_max'], 1)} MiB, master RSS "
            f"{fmt(result['master_rss_mib'], 1)} MiB")
        if result["held"] < bench.args.hold:
            bench.warnings.append(f"{system}: only {result['held']} of {bench.args.hold} "
                                  f"sessions could be held open: {result['rejected']} "
                                  f"{result['errors']}")
    return extras


# --------------------------------------------------------------------------- output

def fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def md_results_table(summary: dict, mode: str) -> list[str]:
    lines = ["| system | sessions | msgs/s | ack p50 ms | ack p99 ms | txn p99 ms | "
             "CPU user ms/msg | CPU sys ms/msg | CPU ms/msg | USS/worker MiB | rounds ok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for system, by_sessions in summary.get(mode, {}).items():
        for sessions, row in sorted(by_sessions.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {system} | {sessions} | {fmt(row['msgs_per_s'], 0)} | "
                f"{fmt(row['ack_p50_ms'], 2)} | {fmt(row['ack_p99_ms'], 2)} | "
                f"{fmt(row['txn_p99_ms'], 2)} | {fmt(row['cpu_user_ms_per_msg'], 3)} | "
                f"{fmt(row['cpu_sys_ms_per_msg'], 3)} | {fmt(row['cpu_ms_per_msg'], 3)} | "
                f"{fmt(row['worker_uss_mib_median'], 1)} | {row['rounds_ok']}/{row['rounds']} |")
    return lines


def md_ratio_table(ratios: list[dict]) -> list[str]:
    lines = ["| mode | sessions | ratio | msgs/s | CPU/msg | sys CPU/msg | ack p99 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(ratios, key=lambda r: (r["mode"], r["pair"], r["sessions"])):
        lines.append(f"| {r['mode']} | {r['sessions']} | {r['pair']} | "
                     f"{fmt(r['msgs_per_s'], 2)} | {fmt(r['cpu_ms_per_msg'], 2)} | "
                     f"{fmt(r['cpu_sys_ms_per_msg'], 2)} | {fmt(r['ack_p99_ms'], 2)} |")
    return lines


def md_sink_note(bench: Bench, payload: dict) -> list[str]:
    """What the smtp-sink rows mean, with this run's loop/smtp-sink at the target level."""
    if not any(SINK in systems for systems in payload["summary"].values()):
        return []
    modes = bench.args.modes
    mode = "durable" if "durable" in modes else modes[0]
    at = 50 if 50 in bench.args.sessions else max(bench.args.sessions)
    loop_vs = find_ratio(payload["ratios"], mode, at, f"loop/{SINK}", "msgs_per_s")
    ours_vs = find_ratio(payload["ratios"], mode, at, f"forksmtp/{SINK}", "msgs_per_s")
    verdict = ("" if loop_vs is None else
               f" In this run ({mode}, {at} sessions) loop/{SINK} is {fmt(loop_vs, 2)}: "
               f"{SINK} {'exceeds' if loop_vs < 1 else 'does not exceed'} the loop"
               + ("" if ours_vs is None else f", and forksmtp reaches {fmt(ours_vs, 2)} "
                  f"of {SINK}") + ".")
    return ["", f"### {SINK}: the ceiling of the SMTP exchange", "",
            f"{SINK} is Postfix's C test server ({bench.smtp_sink}): it answers 250 to every "
            "command and stores nothing, so its runs skip the stored = acked check and count "
            "acknowledged messages only (it runs the same way in both modes). Driven by the "
            "same load generator, it is the ceiling of the SMTP exchange itself on this "
            "machine: the client, the kernel's TCP on loopback and a C server doing no "
            "storage, all sharing these CPUs. forksmtp does that exchange and stores every "
            "message durably besides, so forksmtp/loop ≥ 1 is only reachable if "
            f"{SINK} itself exceeds the loop." + verdict]


def md_extras(extras: dict) -> list[str]:
    lines = []
    if extras.get("stream"):
        lines += ["", f"### One big message (disk sequential write: "
                      f"{fmt(extras.get('disk_seq_write_mib_per_s'), 0)} MiB/s)", "",
                  "| system | MiB | seconds | MiB/s | × disk | worker RSS growth MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for system, s in extras["stream"].items():
            lines.append(f"| {system} | {s['size_mib']} | {fmt(s['seconds'], 2)} | "
                         f"{fmt(s['mib_per_s'], 0)} | {fmt(s['vs_disk'], 2)} | "
                         f"{fmt(s['worker_rss_growth_mib'], 2)} |")
    if extras.get("hold"):
        lines += ["", "### Open sessions held at once (greeting + EHLO, idle)", "",
                  "| system | sessions held | workers | USS/worker median MiB | "
                  "USS/worker max MiB | master RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
        for system, h in extras["hold"].items():
            lines.append(f"| {system} | {h['held']}/{h['sessions']} | {h['workers']} | "
                         f"{fmt(h['worker_uss_mib_median'], 2)} | "
                         f"{fmt(h['worker_uss_mib_max'], 2)} | {fmt(h['master_rss_mib'], 1)} |")
    return lines


def md_header(bench: Bench, payload: dict) -> list[str]:
    a, env = bench.args, payload["environment"]
    return [f"## Benchmark ({payload['started']})", "",
            f"Command: `{payload['command']}`  ",
            f"Load generator: {payload['client']}  ",
            f"Machine: {env['cpus']} CPUs, Linux {env['kernel']}, Maildirs on {env['fs']} "
            f"({env['root']}), Python {env['python']}  ",
            f"Messages: {a.size} bytes, {a.messages} per cell (at least one per session), "
            f"{a.per_conn} per connection, {a.rounds} round(s), medians shown; "
            f"forksmtp log level {a.server_log_level}.  ",
            "ack latency: last byte of the final dot sent → 250 read (loop: create in tmp/ → "
            "end of the fsync of new/); txn: connect (or MAIL) → 250; CPU: the server's "
            "whole process tree (loop: its own processes)."] + (
        ["", "smtp-source reports no per-message timing: the latency columns of the SMTP "
             "servers are empty."] if a.client == "smtp-source" else [])


def write_markdown(bench: Bench, payload: dict) -> str:
    lines = md_header(bench, payload)
    titles = {"durable": "Durable (fsync on)", "nofsync": "fsync off"}
    for mode in bench.args.modes:
        lines += ["", f"### {titles[mode]}", ""] + md_results_table(payload["summary"], mode)
    if payload["ratios"]:
        lines += ["", "### Ratios (same run, medians)", ""] + md_ratio_table(payload["ratios"])
    lines += md_sink_note(bench, payload)
    lines += md_extras(payload["extras"])
    lines += ["", "### Targets", "", "| target | value | need | met |", "|---|---:|---|---|"]
    for t in payload["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {fmt(t['value'], 2)} | {t['need']} | {met} |")
    for title, items in (("Failures", bench.failures), ("Warnings", bench.warnings)):
        lines += ["", f"### {title}", ""] + [f"- {i}" for i in items] if items else []
    text = "\n".join(lines) + "\n"
    with open(os.path.join(bench.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def write_chart(bench: Bench, summary: dict) -> str | None:
    """msgs/s against sessions, one panel per mode; None (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install -e '.[bench]')"
    modes = [m for m in bench.args.modes if m in summary]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for system, rows in summary[mode].items():
            points = sorted((int(s), r["msgs_per_s"]) for s, r in rows.items()
                            if r["msgs_per_s"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=system)
        ax.set(title=f"{mode} ({bench.args.size} B messages)", xlabel="concurrent sessions",
               ylabel="messages/s acked", xscale="log")
        ax.set_xticks(bench.args.sessions, [str(s) for s in bench.args.sessions])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(bench.out, "msgs_per_s.png"), dpi=110)
    plt.close(fig)
    return None


def environment(bench: Bench) -> dict:
    return {"cpus": os.cpu_count(), "kernel": os.uname().release, "fs": bench.fs,
            "root": bench.root, "python": sys.version.split()[0],
            "forksmtp_cmd": shlex.join(bench.forksmtp_cmd),
            "smtp_source": shutil.which("smtp-source"), "smtp_sink": bench.smtp_sink}


def client_description(args: argparse.Namespace) -> str:
    if args.client == "smtp-source":
        return f"Postfix smtp-source ({shutil.which('smtp-source')})"
    procs = args.client_procs or os.cpu_count()
    return (f"forksmtp bench client (raw sockets, up to {procs} processes, "
            f"{'pipelined' if args.pipelining else 'one command per round trip'})")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--quick", action="store_true", help="under a minute: 1 and 10 sessions, 1 round, "
        "100 messages per cell, no open-sessions check")
    add("--full", action="store_true", help="add 200 sessions")
    add("--sessions", help="comma-separated concurrency levels (overrides --quick/--full)")
    add("--systems", default=",".join(SYSTEMS), help="comma-separated, from "
        + ",".join(SYSTEMS) + f" (default: all; {SINK} is skipped with a note when no "
        f"binary is found)")
    add("--modes", default=",".join(MODES), help="durable,nofsync")
    add("--messages", type=int, help="messages per cell (default 1000; 100 with --quick)")
    add("--rounds", type=int, help="alternating rounds (default 2; 1 with --quick)")
    add("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    add("--per-conn", type=int, default=1, help="messages per connection (default 1)")
    add("--pipelining", action="store_true", help="send MAIL, RCPT, DATA as one group")
    add("--client", choices=("ours", "smtp-source"), default="ours")
    add("--client-procs", type=int, default=0, help="client processes (default: CPU count)")
    add("--maildir-root", help="where the Maildirs go (default: a new dir under /var/tmp)")
    add("--out", help="results folder (default bench-results/<timestamp>)")
    add("--port-base", type=int, default=24250,
        help="forksmtp port; the peer uses +1 and smtp-sink +2 (keep them below the "
        "ephemeral range, 32768+, where client sockets could hold them)")
    add("--spare-workers", type=int, default=2, help="forksmtp workers beyond the sessions")
    add("--warmup", type=int, default=4,
        help="untimed messages per session sent to each SMTP server before its cell")
    add("--big-mib", type=int, default=50, help="size of the streamed message (0: skip)")
    add("--hold", type=int, help="sessions held open at once (default 500; 0 skips)")
    add("--peer-threads", type=int, default=0, help="aiosmtpd stores in N threads (0: inline)")
    add("--server-log-level", default="info", help="forksmtp [log] level (default info)")
    add("--forksmtp-cmd", help="command starting forksmtp (default: python -m forksmtp)")
    add("--io-timeout", type=float, default=60.0, help="seconds to wait for any one reply")
    add("--run-timeout", type=float, default=600.0, help="seconds allowed for one cell")
    add("--keep", action="store_true", help="keep the Maildirs and server logs")
    return apply_presets(p, p.parse_args(argv))


def apply_presets(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    levels = [1, 10] if args.quick else [1, 10, 50, 200] if args.full else [1, 10, 50]
    args.sessions = [int(x) for x in args.sessions.split(",")] if args.sessions else levels
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.messages = args.messages or (100 if args.quick else 1000)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.hold = (0 if args.quick else 500) if args.hold is None else args.hold
    for bad in set(args.systems) - set(SYSTEMS):
        p.error(f"unknown system {bad!r}; choose from {', '.join(SYSTEMS)}")
    for bad in set(args.modes) - set(MODES):
        p.error(f"unknown mode {bad!r}; choose from {', '.join(MODES)}")
    if args.client == "smtp-source" and not shutil.which("smtp-source"):
        p.error("smtp-source is not on PATH (Debian: apt-get install postfix)")
    if min(args.sessions) < 1 or args.size < 512 or args.per_conn < 1:
        p.error("sessions and --per-conn must be >= 1 and --size >= 512")
    return args


def check_systems(bench: Bench) -> None:
    """Fail early, with a way out, when a selected system cannot run here."""
    if "aiosmtpd" in bench.args.systems:
        try:
            import aiosmtpd  # noqa: F401
        except ImportError:
            raise SystemExit("aiosmtpd is not installed: pip install -e '.[bench]' "
                             "(or leave it out with --systems)")
    if "forksmtp" in bench.args.systems and not bench.args.forksmtp_cmd:
        probe = subprocess.run(bench.forksmtp_cmd + ["--version"], capture_output=True,
                               timeout=30)
        if probe.returncode != 0:
            raise SystemExit(f"forksmtp does not run ({shlex.join(bench.forksmtp_cmd)} "
                             f"--version: {probe.stderr.decode()[-300:]!r}); "
                             f"leave it out with --systems loop,aiosmtpd")
    if "loop-tmpfile" in bench.args.systems and not tmpfile_supported(bench.root):
        bench.args.systems.remove("loop-tmpfile")
        bench.warnings.append(f"O_TMPFILE is not supported on {bench.fs}: loop-tmpfile skipped")
    check_sink(bench)


def check_sink(bench: Bench) -> None:
    """smtp-sink is optional: without a binary it is skipped with a note, never failed."""
    if SINK not in bench.args.systems:
        return
    if bench.smtp_sink:
        log(f"{SINK}: {bench.smtp_sink}")
        return
    bench.args.systems.remove(SINK)
    bench.warnings.append(sink_missing_note())
    log(f"note: {bench.warnings[-1]}")


def make_bench(args: argparse.Namespace) -> Bench:
    """Work dir (on a real disk, not tmpfs), results folder, and the forksmtp command."""
    base = args.maildir_root or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    root = tempfile.mkdtemp(prefix="forksmtp-bench-", dir=base)
    os.makedirs(os.path.join(root, "logs"))
    out = args.out or os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    cmd = shlex.split(args.forksmtp_cmd) if args.forksmtp_cmd else \
        [sys.executable, "-m", "forksmtp"]
    bench = Bench(args, root, os.path.join(root, "logs"), out, fs_type(root), cmd,
                  smtp_sink=find_smtp_sink())
    if bench.fs in NO_DURABILITY_FS:
        bench.warnings.append(f"{root} is on {bench.fs}: fsync costs nothing there, so "
                              f"durable figures mean nothing; use --maildir-root on a disk")
        log(f"!!! WARNING: {bench.warnings[-1]}")
    return bench


def build_payload(bench: Bench, argv: list[str], started: str, cells: list[dict],
                  extras: dict) -> dict:
    summary = summarise(cells)
    ratios = compute_ratios(summary)
    return {"command": shlex.join(["python", "scripts/bench.py"] + argv),
            "client": client_description(bench.args), "started": started,
            "environment": environment(bench),
            "options": {k: v for k, v in vars(bench.args).items()},
            "cells": cells, "summary": summary, "ratios": ratios, "extras": extras,
            "targets": check_targets(bench, ratios, extras),
            "failures": bench.failures, "warnings": bench.warnings,
            "ok": not bench.failures}


def write_outputs(bench: Bench, payload: dict) -> None:
    note = write_chart(bench, payload["summary"])
    if note:
        bench.warnings.append(note)
        payload["warnings"] = bench.warnings
    with open(os.path.join(bench.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    print(write_markdown(bench, payload))
    log(f"results: {os.path.abspath(bench.out)}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt   # unwinds through every finally: servers and helpers die


def run(bench: Bench, argv: list[str]) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    check_systems(bench)
    log(f"Maildirs under {bench.root} ({bench.fs}); client: {client_description(bench.args)}")
    cells = run_matrix(bench)
    extras = run_extras(bench)
    payload = build_payload(bench, argv, started, cells, extras)
    write_outputs(bench, payload)
    if bench.failures:
        log("!!! FAILED: " + "; ".join(bench.failures))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-aiosmtpd"]:
        return serve_aiosmtpd(argv[1:])
    args = parse_args(argv)
    raise_fd_limit(4096)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = make_bench(args)
    try:
        return run(bench, argv)
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        return 130
    finally:
        bench.reaper.cleanup()
        if not args.keep:
            shutil.rmtree(bench.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
