"""Run the real forksmtp daemon for integration tests.

``Daemon`` starts ``python -m forksmtp -c <generated toml>`` in its own process group on
a free loopback port, waits for the ``[READY]`` line, and on ``stop()`` (always called by
the fixtures, even when a test fails) signals the whole group and reaps it, so no worker
outlives a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f'"{key}" = {toml_value(value)}' if "@" in key else f"{key} = {toml_value(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Daemon:
    """One running forksmtp master and its workers."""

    def __init__(self, tmp: Path, *, port: int | None = None, workers: int = 2,
                 server: dict | None = None, sections: dict | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.tmp = tmp
        self.host = "127.0.0.1"
        self.port = port or free_port()
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
        self.write_config()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forksmtp", "-c", str(self.config_path), *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.wait_for_log("[READY]", timeout)
        return self

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


def request_stats(d: Daemon, timeout: float = 10.0) -> dict:
    """Send SIGUSR1 and return the JSON of the ``[STATS]`` line it produced."""
    import json
    seen = d.log_text().count("[STATS] ")
    d.signal(signal.SIGUSR1)
    text = d.wait_for_log("[STATS] ", timeout, count=seen + 1)
    lines = [line for line in text.splitlines() if "[STATS] " in line]
    return json.loads(lines[seen].split("[STATS] ", 1)[1])


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


def send_message(port: int, host: str = "127.0.0.1", body: bytes = b"Subject: t\r\n\r\nhello\r\n",
                 timeout: float = 10.0) -> None:
    """One complete SMTP delivery; raises on any failure."""
    import smtplib
    with smtplib.SMTP(host, port, timeout=timeout) as client:
        refused = client.sendmail("sender@client.example", ["rcpt@mx.test.example"], body)
        assert not refused, refused
