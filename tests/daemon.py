"""Run the real forksmtp daemon for integration tests.

``Daemon`` starts ``python -m forksmtp -c <generated toml>`` in its own process group on
a free loopback port, waits for the ``[READY]`` line, and on ``stop()`` (always called by
the fixtures, even when a test fails) signals the whole group and reaps it, so no worker
outlives a test.
"""

from __future__ import annotations

import os
import signal
import shutil
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import psutil


#: Every port free_port() has handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel finds free now, never one this process handed out before: a
    test that takes one for a second listener and then starts a daemon, which takes
    another, got the same port twice once in thousands of runs, and the daemon refused
    its config ("... is also in server.listen")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("free_port: no port not handed out before in 100 tries")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def shown(value: str) -> str:
    """A string value as a config error shows it: in TOML's quotes, and cut to its first
    77 characters and "..." past 80, so that a test's expectation does not depend on how
    long its temporary directory's path happens to be."""
    text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text if len(text) <= 80 else text[:77] + "..."


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f'"{key}" = {toml_value(value)}' if "@" in key else f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


#: Starts tried when the port free_port() chose was taken before the daemon bound it.
START_ATTEMPTS = 3


class Daemon:
    """One running forksmtp master and its workers."""

    def __init__(self, tmp: Path, *, port: int | None = None, workers: int = 2,
                 server: dict | None = None, sections: dict | None = None,
                 extra_args: list[str] | None = None, wrapper: list[str] | None = None) -> None:
        self.tmp = tmp
        self.wrapper = wrapper or []  # a command that execs the daemon's (e.g. in a cgroup)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._port_chosen_here = port is None
        self.maildir = tmp / "Maildir"
        self.log_path = tmp / "forksmtp.log"
        self.config_path = tmp / "forksmtp.toml"
        self.sections = {
            "server": {"listen": [f"{self.host}:{self.port}"], "hostname": "mx.test.example",
                       "workers": workers, **(server or {})},
            "delivery": {"maildir": str(self.maildir)},
            "log": {"file": str(self.log_path), "level": "info"},
        }
        for name, values in (sections or {}).items():
            self.sections.setdefault(name, {}).update(values)
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        write_config(self.config_path, self.sections)

    def start(self, timeout: float = 15.0) -> "Daemon":
        for attempt in range(START_ATTEMPTS):
            self.write_config()
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "forksmtp", "-c", str(self.config_path),
                 *self.extra_args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            try:
                self.wait_for_log("[READY]", timeout)
                return self
            except RuntimeError as exc:
                if attempt == START_ATTEMPTS - 1 or not self._take_another_port(str(exc)):
                    raise
        raise AssertionError("unreachable")

    def _take_another_port(self, failure: str) -> bool:
        """free_port() lets its port go before the daemon binds it, and in between another
        test's client may take it as its source port: a start that failed on that alone
        gets a new port (its own, not a port a test chose and may have told a client)."""
        listen = self.sections["server"].get("listen")
        if not (self._port_chosen_here and f"{self.host}:{self.port}: Address already in use" in failure
                and listen == [f"{self.host}:{self.port}"]):
            return False
        self.port = free_port()
        self.sections["server"]["listen"] = [f"{self.host}:{self.port}"]
        self.log_path.unlink(missing_ok=True)  # the failed start's lines are not this daemon's
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 10.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if text.count(needle) >= count:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise RuntimeError(f"forksmtp exited with {self.proc.returncode}: {err.decode()}\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not in the log after {timeout}s:\n{self.log_text()[-4000:]}")

    def workers(self) -> list[psutil.Process]:
        try:
            return [c for c in psutil.Process(self.pid).children() if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def new_messages(self) -> list[Path]:
        new = self.maildir / "new"
        return sorted(new.iterdir()) if new.exists() else []

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group; always reaps."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.proc.returncode


def smtp_exchange(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0,
                  until: bytes | None = None) -> bytes:
    """Send raw bytes after the greeting and read replies until ``until`` or EOF."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return buf
            buf += chunk
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until in buf:
                break
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            buf += chunk
        return buf


# -- helpers for the supervisor tests (real processes, bounded waits) ----------------------

def line_pid(line: str) -> str:
    """The pid of a log line's writer: ``<timestamp>/<pid> [TAG] text``."""
    return line.split(" ", 1)[0].rpartition("/")[2]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Poll ``predicate`` until it returns something true; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not true after {timeout}s: {what or predicate}")
        time.sleep(interval)


def poll_for(read, expected, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``read()`` until it returns ``expected``; what it returned last, so that the
    caller's own assert shows the difference when the timeout passed first."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def worker_pids(d: Daemon) -> set[int]:
    return {w.pid for w in d.workers()}


def workers_replacing(d: Daemon, old: set[int], count: int = 1) -> set[int]:
    """The daemon's workers, from one look, once at least ``count`` run and none of
    ``old`` is among them; else an empty set, for wait_until.  (Two looks could pass
    on a moment with no worker at all, between an old one's exit and a new one's
    fork, as with max_workers = 1.)"""
    now = worker_pids(d)
    return now if len(now) >= count and not old & now else set()


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for whoever adopted it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def request_stats(d: Daemon, timeout: float = 10.0) -> dict:
    """Send SIGUSR1 and return the JSON of the ``[STATS]`` line it produced."""
    import json
    seen = d.log_text().count("[STATS] ")
    d.signal(signal.SIGUSR1)
    text = d.wait_for_log("[STATS] ", timeout, count=seen + 1)
    lines = [line for line in text.splitlines() if "[STATS] " in line]
    return json.loads(lines[seen].split("[STATS] ", 1)[1])


def worker_states(stats: dict) -> list[str]:
    """The states of the workers in a stats dump ("idle", "busy", ...), sorted."""
    return sorted(w["state"] for w in stats["workers"])


def after_a_turn(d: Daemon, timeout: float = 10.0) -> dict:
    """Stats written after a whole turn of the master's loop (its check of the workers,
    its pool plan) that began after this call; the second of two dumps.  The master
    handles the signals it has at the start of a turn, then does its checks; the second
    SIGUSR1 goes only once the first dump is out, so its dump comes in a later turn.

    A test that asserts something did not happen waits for this rather than sleeping:
    however slow the machine, the master has then had its look."""
    request_stats(d, timeout)
    return request_stats(d, timeout)


def zombie_children(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    zombies = []
    for c in children:
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                zombies.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


def assert_no_zombies(d: Daemon, timeout: float = 5.0) -> None:
    """A child is a zombie for a moment between its exit and the master's SIGCHLD
    handling; one that stays a zombie means the master does not reap."""
    wait_until(lambda: not zombie_children(d.pid), timeout, what=f"zombies of {d.pid}")


def unusual_lines(d: Daemon) -> list[str]:
    """The server's log lines other than a normal session's, to explain a failure."""
    usual = ("[SMTP]", "[CONN]", "[STORE]", "client quit", "[READY]")
    return [line for line in d.log_text().splitlines() if not any(u in line for u in usual)][:40]


def send_message(port: int, host: str = "127.0.0.1", body: bytes = b"Subject: t\r\n\r\nhello\r\n",
                 timeout: float = 10.0) -> None:
    """One complete SMTP delivery; raises on any failure."""
    import smtplib
    with smtplib.SMTP(host, port, timeout=timeout) as client:
        refused = client.sendmail("sender@client.example", ["rcpt@mx.test.example"], body)
        assert not refused, refused


def connect(port: int, host: str = "127.0.0.1", source: str | None = None,
            timeout: float = 10.0) -> socket.socket:
    """A client socket (optionally from a chosen loopback source address)."""
    return socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def read_reply(sock: socket.socket) -> bytes:
    """One complete SMTP reply (all its lines), or what came before EOF; raises
    socket.timeout when the server says nothing within the socket's timeout."""
    buf = b""
    while True:
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return buf
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk


def read_to_close(sock: socket.socket, size: int = 4096) -> bytes:
    """Everything the peer sends up to its FIN.  A reset in its place raises
    ConnectionResetError: tests of a clean close rely on that."""
    wire = b""
    while chunk := sock.recv(size):
        wire += chunk
    return wire


def _tcp_address(ip: str, port: int) -> str:
    """An IPv4 address and port as /proc/net/tcp shows them."""
    return "%08X:%04X" % (int.from_bytes(socket.inet_aton(ip), sys.byteorder), port)


class TcpEnd(typing.NamedTuple):
    unsent: int      # octets queued to send, not yet acknowledged by the peer
    unread: int      # octets received, not yet read by the process
    accepted: bool   # False while it waits in its listener's accept queue (no inode)
    state: str       # /proc/net/tcp's st: "01" established, "04" closed with octets to send


def server_end(sock: socket.socket) -> TcpEnd | None:
    """The server's end of the (IPv4) client socket ``sock`` as /proc/net/tcp shows it;
    None when it is not there."""
    server = _tcp_address(*sock.getpeername()[:2])
    client = _tcp_address(*sock.getsockname()[:2])
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == server and fields[2] == client:
                unsent, unread = (int(n, 16) for n in fields[4].split(":"))
                return TcpEnd(unsent, unread, fields[9] != "0", fields[3])
    return None


def connection_refused(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port any more."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


# -- helpers for the fault, crash-consistency, load and network fuzz tests -----------------
# A raw SMTP client (pipelined MAIL/RCPT/DATA, as a bulk sender does), the worker serving a
# given client socket, and a ledger: message ids whose text is a function of the id, so an
# audit of new/ can tell lost, duplicated, truncated and foreign files apart.

import hashlib  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402

LEDGER_RCPT = b"rcpt@mx.test.example"
_LEDGER_ID = re.compile(rb"\nX-Ledger-Id: ([A-Za-z0-9.-]+)\n")
_SIZE_IN_NAME = re.compile(r",S=(\d+)")


class SMTPClosed(ConnectionError):
    """The server closed the connection before a complete reply."""


class RawSMTP:
    """A minimal blocking SMTP client over a real socket."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> tuple[int, bytes]:
        """One complete reply: (code, all its lines)."""
        while True:
            end = 0
            while (nl := self.buf.find(b"\r\n", end)) >= 0:
                line, end = self.buf[end:nl], nl + 2
                if len(line) < 4 or line[3:4] == b" ":
                    text, self.buf = self.buf[:end], self.buf[end:]
                    return int(line[:3]), text
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SMTPClosed(f"closed after {self.buf[-200:]!r}")
            self.buf += chunk

    def command(self, line: bytes) -> int:
        self.sock.sendall(line + b"\r\n")
        return self.reply()[0]

    def start_data(self, sender: bytes = b"ledger@client.example",
                   rcpt: bytes = LEDGER_RCPT) -> tuple[int, bytes]:
        """Pipelined MAIL, RCPT, DATA; the reply that ends it (354 when the body may follow)."""
        self.sock.sendall(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (sender, rcpt))
        replies = [self.reply() for _ in range(3)]
        for code, text in replies:
            if code >= 400:
                return code, text
        return replies[-1]

    def deliver(self, wire: bytes) -> tuple[int, bytes]:
        """One transaction; ``wire`` is the dot-stuffed CRLF text. The final reply."""
        code, text = self.start_data()
        if code != 354:
            return code, text
        self.sock.sendall(wire + b".\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def serving_worker(d: Daemon, sock: socket.socket, timeout: float = 10.0) -> psutil.Process:
    """The worker process holding the server end of the client socket ``sock``."""
    ours = sock.getsockname()[:2]

    def find():
        for w in d.workers():
            try:
                conns = w.net_connections("tcp")
            except psutil.Error:
                continue
            if any(c.raddr and (c.raddr.ip, c.raddr.port) == ours for c in conns):
                return w
        return None
    return wait_until(find, timeout, 0.02, "the worker serving this connection")


def hold_syscall(pid: int, syscall: str, seconds: float, *, when: int = 1,
                 at: str = "exit") -> subprocess.Popen:
    """Attach strace to a process so that its ``when``-th ``syscall`` from now is held
    ``seconds`` at its entry (``at="enter"``: before the kernel runs it) or at its exit
    (after it ran, before the process sees its result).  Skips the test where strace
    cannot attach; the caller terminates the tracer."""
    return inject_syscall(pid, syscall, f"delay_{at}={seconds:g}s:when={when}")


def inject_syscall(pid: int, syscall: str, inject: str) -> subprocess.Popen:
    """Attach strace to a process with ``-e inject=SYSCALL:INJECT`` (a delay, an error,
    a signal).  Skips the test where strace cannot attach; the caller terminates the
    tracer, which detaches."""
    import pytest
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    tracer = subprocess.Popen(["strace", "-p", str(pid), "-o", os.devnull, "-e", f"trace={syscall}",
                               "-e", f"inject={syscall}:{inject}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = tracer.stderr.readline()
    if "attached" not in line:
        tracer.kill()
        tracer.wait()
        pytest.skip(f"strace cannot attach here: {line.strip()}")
    return tracer


def held_in(proc: psutil.Process, number: int, steady: float = 0.05) -> list[int] | None:
    """The arguments of system call ``number`` if ``proc`` is held by its tracer inside
    it, else None.  Traced, it stops at every traced call, so its status alone does not
    say where; /proc/PID/syscall does.  And each of those stops lasts a moment, the
    tracer's look at the call: a look that fell on one (an earlier fsync than the held
    one, seen once in CI) is told from the hold by looking again ``steady`` seconds
    later, the process still stopped there and not switched in or out between."""
    first = in_syscall(proc, number, "tracing-stop")
    if first is None:
        return None
    try:
        switches = proc.num_ctx_switches()
        time.sleep(steady)
        if proc.num_ctx_switches() != switches:
            return None
    except psutil.Error:
        return None
    return first if in_syscall(proc, number, "tracing-stop") == first else None


def in_syscall(proc: psutil.Process, number: int, status: str = psutil.STATUS_SLEEPING,
               ) -> list[int] | None:
    """The arguments of system call ``number`` if ``proc`` is inside it with ``status``,
    else None: by default asleep in it (a wait the call is making), STATUS_STOPPED for a
    process suspended while in it.  A process suspended elsewhere, or running, shows
    another number (-1 between calls) or "running" in /proc/PID/syscall."""
    try:
        with open(f"/proc/{proc.pid}/syscall") as f:
            fields = f.read().split()
        now = proc.status()
    except (OSError, psutil.Error):
        return None
    if now != status or len(fields) < 7 or fields[0] != str(number):
        return None
    return [int(field, 16) for field in fields[1:7]]


#: System call numbers for /proc/PID/syscall, by machine ({} where not listed).  Python's
#: select.select is pselect6 in glibc, select(2) in an older one (x86_64 only has both).
SYSCALL_NR: dict[str, tuple[int, ...]] = {
    "x86_64": {"flock": (73,), "setitimer": (38,), "select": (270, 23), "poll": (7, 271),
               "fsync": (74,), "linkat": (265,), "epoll_wait": (232, 281, 441)},
    "aarch64": {"flock": (32,), "setitimer": (103,), "select": (72,), "poll": (73,),
                "fsync": (82,), "linkat": (37,), "epoll_wait": (22, 441)},
}.get(os.uname().machine, {})


def in_any_syscall(proc: psutil.Process, name: str, status: str = psutil.STATUS_SLEEPING) -> bool:
    """in_syscall() for any of the numbers SYSCALL_NR gives the call ``name``."""
    return any(in_syscall(proc, nr, status) is not None for nr in SYSCALL_NR.get(name, ()))


def open_tmp_files(proc: psutil.Process, maildir: Path) -> list[int]:
    """Sizes of the files the process holds open in maildir/tmp (an O_TMPFILE file is
    shown by /proc as ``tmp/#<inode> (deleted)``)."""
    sizes = []
    prefix = str(maildir / "tmp") + "/"
    for fd in os.listdir(f"/proc/{proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            if target.startswith(prefix):
                sizes.append(os.stat(f"/proc/{proc.pid}/fd/{fd}").st_size)
        except OSError:
            continue
    return sizes


def assert_nothing_left_in_tmp(d: Daemon, maildir: Path) -> None:
    """A failed or cut-off copy leaves nothing in tmp/: no named file (the O_EXCL
    fallback's), and no unnamed O_TMPFILE one still held open by the master or a worker,
    which would keep its space in use until that process ends."""
    assert os.listdir(maildir / "tmp") == []
    for proc in [psutil.Process(d.pid)] + d.workers():
        try:
            assert open_tmp_files(proc, maildir) == [], f"process {proc.pid} holds a tmp/ file open"
        except FileNotFoundError:  # exited meanwhile: its descriptors are closed
            pass


def uss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


def ledger_message(msg_id: str, size: int = 0) -> bytes:
    """The CRLF wire text of message ``msg_id``, about ``size`` bytes long; a function of
    (id, size) alone. No line starts with a dot, so it needs no stuffing."""
    seed = hashlib.sha256(msg_id.encode()).hexdigest().encode()
    head = b"X-Ledger-Id: %s\r\nSubject: ledger %s\r\n\r\n" % (msg_id.encode(), msg_id.encode())
    lines = max(1, size // 78)
    return head + b"".join(b"%07d %s\r\n" % (i, seed[i % 40:i % 40 + 24] * 3) for i in range(lines))


def stored_text(wire: bytes) -> bytes:
    """What the message part of the stored file must be: LF line endings (contract 5)."""
    return wire.replace(b"\r\n", b"\n")


class Ledger:
    """Ids sent and ids acknowledged with 250, shared by client threads."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.sent: dict[str, int] = {}  # id -> size asked for
        self.acked: set[str] = set()
        self._n = 0

    def new_id(self, size: int) -> str:
        with self.lock:
            self._n += 1
            msg_id = f"{self.prefix}-{self._n}"
            self.sent[msg_id] = size
        return msg_id

    def ack(self, msg_id: str) -> None:
        with self.lock:
            self.acked.add(msg_id)

    def audit(self, maildir: Path) -> dict:
        """Read every file in new/: copies per id, and files that are truncated (size
        differs from S=), not byte-exact, or not ours."""
        copies: dict[str, int] = {}
        bad: list[str] = []
        new = maildir / "new"
        for path in sorted(new.iterdir()) if new.exists() else []:
            data = path.read_bytes()
            m = _SIZE_IN_NAME.search(path.name)
            if m is None or int(m[1]) != len(data):
                bad.append(f"{path.name}: {len(data)} bytes, name says {m and m[1]}")
                continue
            found = _LEDGER_ID.search(data)
            msg_id = found[1].decode() if found else ""
            if msg_id not in self.sent:
                bad.append(f"{path.name}: unknown message {data[:300]!r}")
                continue
            copies[msg_id] = copies.get(msg_id, 0) + 1
            expected = stored_text(ledger_message(msg_id, self.sent[msg_id]))
            if not data.startswith(b"Return-Path: ") or data[found.start() + 1:] != expected:
                bad.append(f"{path.name}: {msg_id} not byte-exact ({len(data)} bytes)")
        figures = {"sent": len(self.sent), "acked": len(self.acked), "stored": sum(copies.values()),
                   "duplicates": sum(n - 1 for n in copies.values()),
                   "lost": len(self.acked - copies.keys()),
                   "stored_unacked": len(copies.keys() - self.acked), "bad": len(bad)}
        return {"figures": figures, "bad": bad, "lost_ids": sorted(self.acked - copies.keys())[:20]}


def ledger_client(port: int, ledger: Ledger, *, stop: threading.Event, deadline: float,
                  sizes: tuple[int, ...] = (300,), messages: int | None = None,
                  per_session: int = 5, seed: int = 0, timeout: float = 10.0) -> dict:
    """Deliver ledger messages, ``per_session`` per connection, until ``messages`` were
    tried, ``stop`` is set or ``deadline`` (monotonic) passes; reconnect after any failure.
    Returns what this client saw: tried, acked, refused (non-250 replies), broken sessions."""
    import random
    rng = random.Random(seed)
    seen = {"tried": 0, "acked": 0, "refused": 0, "broken": 0}
    limit = float("inf") if messages is None else messages

    def more() -> bool:
        return seen["tried"] < limit and not stop.is_set() and time.monotonic() < deadline

    while more():
        try:
            client = RawSMTP(port, timeout=timeout)
        except OSError:
            seen["broken"] += 1
            stop.wait(0.05)
            continue
        try:
            if client.greeting[0] != 220 or client.command(b"EHLO ledger.example") != 250:
                seen["broken"] += 1
                continue
            for _ in range(per_session):
                if not more():
                    break
                size = rng.choice(sizes)
                msg_id = ledger.new_id(size)
                seen["tried"] += 1
                code, _ = client.deliver(ledger_message(msg_id, size))
                if code == 250:
                    ledger.ack(msg_id)
                    seen["acked"] += 1
                else:
                    seen["refused"] += 1
            client.command(b"QUIT")
        except OSError:
            seen["broken"] += 1
        finally:
            client.close()
    return seen


def run_clients(n: int, target, join_timeout: float = 120.0, **kwargs) -> list:
    """Run ``target(seed=i, **kwargs)`` in n threads; their results (a dict each, None
    for a thread still running after ``join_timeout``). Each target bounds itself too."""
    results: list = [None] * n

    def body(i: int) -> None:
        try:
            results[i] = target(seed=i, **kwargs)
        except BaseException as exc:  # reported by the caller's assertions
            results[i] = {"error": repr(exc)}
    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    end = time.monotonic() + join_timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return results


#: A host name of 253 octets, the most a domain may have: the EHLO reply that names it
#: is some 350 octets, so a batch of pipelined EHLOs owes many times its own size.
LONG_NAME = ".".join(("a" * 63, "b" * 63, "c" * 63, "d" * 61))


def ehlo_batch(count: int) -> bytes:
    """``count`` pipelined EHLOs and a QUIT: 8 octets a command, one read of the server's
    taking 8,000 of them (a TLS record, 2,000)."""
    return b"EHLO c\r\n" * count + b"QUIT\r\n"


def small_window_socket(rcvbuf: int) -> socket.socket:
    """An unconnected TCP socket that asks for the smallest segments Linux allows and
    keeps a small, fixed receive window: the server's send buffer then holds far fewer
    octets (a few MB on loopback otherwise), so a batch of replies outgrows it."""
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return s


def paced_read(sock, request: bytes, rate: int) -> tuple[bytes, float]:
    """Send ``request``, then read to the close at ``rate`` octets a second, catching
    up after a stall (a slow reader, not a stopped one); at most 60 s.  Returns what
    was read and the seconds it took; a reset raises."""
    sock.sendall(request)
    wire = bytearray()
    started = time.monotonic()
    while (took := time.monotonic() - started) < 60:
        due = int(rate * took) - len(wire)
        if due < 4096:
            time.sleep(0.005)
            continue
        chunk = sock.recv(due)
        if not chunk:
            break
        wire += chunk
    return bytes(wire), took
