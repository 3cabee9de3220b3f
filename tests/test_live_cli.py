"""The ``forksmtp`` command as a user runs it (contract section 1).

The installed console script is run as a real process in its own process group;
every started server is killed with its whole group at the end of its test.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest

import forksmtp
from daemon import free_port, shown, write_config

HOST = "127.0.0.1"


def _command() -> list[str]:
    """The console script next to this interpreter (what `pip install -e .` made)."""
    # Where pip puts scripts: beside the interpreter (a venv), the scheme's scripts
    # directory (/usr/local/bin for a system Python), or the user's (~/.local/bin).
    places = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts")),
              Path(sysconfig.get_path("scripts", f"{os.name}_user"))]
    for place in places:
        if (place / "forksmtp").exists():
            return [str(place / "forksmtp")]
    found = shutil.which("forksmtp")
    return [found] if found else [sys.executable, "-m", "forksmtp"]


FORKSMTP = _command()


def test_the_console_script_is_installed():
    """The contract's command is `forksmtp -c FILE`: the install must make the script,
    not leave these tests to fall back on `python -m forksmtp`."""
    assert FORKSMTP[0] != sys.executable, "no forksmtp script next to this Python or on PATH"
    assert run("--version").stdout.startswith("forksmtp ")


def run(*args: str, cwd: Path | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*FORKSMTP, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Server:
    """A foreground ``forksmtp`` with stdout/stderr in files (its log goes to stderr)."""

    def __init__(self, args: list[str], cwd: Path, tmp: Path) -> None:
        self.err_path = tmp / "server.stderr"
        self.out_path = tmp / "server.stdout"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*FORKSMTP, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stderr()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"forksmtp exited with {self.proc.returncode}:\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not on stderr after {timeout}s:\n{self.stderr()[-3000:]}")

    def workers(self, count: int, timeout: float = 10) -> list[psutil.Process]:
        """The master's live worker processes, once there are at least ``count``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = [c for c in psutil.Process(self.proc.pid).children()
                         if c.status() != psutil.STATUS_ZOMBIE]
            except psutil.NoSuchProcess:
                found = []
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def servers(tmp_path):
    """Start ``forksmtp`` processes; each is killed with its process group afterwards."""
    started: list[Server] = []

    def start(*args: str, cwd: Path | None = None) -> Server:
        sub = tmp_path / f"s{len(started)}"
        sub.mkdir()
        server = Server(list(args), cwd or sub, sub)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def deliver(port: int, marker: str) -> None:
    with smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=10) as client:
        client.sendmail("a@client.test", ["b@example.test"],
                        f"Subject: {marker}\r\n\r\nbody {marker}\r\n".encode())


def gone(procs: list[psutil.Process], timeout: float = 10) -> list[psutil.Process]:
    """Those of ``procs`` still alive (zombies count as gone) after waiting."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# -- --version, --help ---------------------------------------------------------------------

# The daemon runs the same build as this test process (see test_native.py).
VERSION_LINE = f"forksmtp {forksmtp.__version__} ({forksmtp._native.describe()})"


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == VERSION_LINE


def test_module_form_works_too():
    result = subprocess.run([sys.executable, "-m", "forksmtp", "--version"], capture_output=True,
                            text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert result.stdout.strip() == VERSION_LINE


def test_help():
    result = run("--help")
    assert result.returncode == 0
    for flag in ("-c", "--check", "--listen", "--maildir", "--workers", "--hostname",
                 "--pidfile", "--log-level", "--version"):
        assert flag in result.stdout, flag


# -- --check -------------------------------------------------------------------------------

def test_check_valid_file(tmp_path):
    path = write_config(tmp_path / "ok.toml", {
        "server": {"listen": [f"{HOST}:{free_port()}"], "workers": 2},
        "delivery": {"maildir": str(tmp_path / "Maildir")},
        "limits": {"max_recipients": 50},
    })
    result = run("-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    assert str(path) in lines[0]


def test_flags_override_the_file(tmp_path):
    file_port, flag_port = free_port(), free_port()
    path = write_config(tmp_path / "ok.toml", {
        "server": {"listen": [f"{HOST}:{file_port}"], "workers": 2},
        "delivery": {"maildir": str(tmp_path / "FileMaildir")},
    })
    result = run("-c", str(path), "--listen", f"{HOST}:{flag_port}", "--maildir", "FlagMaildir",
                 "--workers", "3", "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{HOST}:{flag_port}" in result.stdout and f":{file_port}" not in result.stdout
    assert str(tmp_path / "FlagMaildir") in result.stdout and "FileMaildir" not in result.stdout


@pytest.mark.parametrize("sections, key", [
    ({"limits": {"max_recipents": 5}}, "max_recipents"),
    ({"limitz": {"max_recipients": 5}}, "limitz"),
    ({"limits": {"max_recipients": "many"}}, "max_recipients"),
    ({"limits": {"max_message_size": -1}}, "max_message_size"),
    ({"server": {"listen": ["127.0.0.1:70000"]}}, "listen"),
    ({"server": {"workers": 2.5}}, "workers"),
    ({"delivery": {"maildir": "@FILE@/Maildir"}}, "maildir"),
], ids=["unknown-key", "unknown-section", "wrong-type", "negative", "bad-port", "float-int",
        "maildir-under-a-file"])
def test_check_invalid_file_names_the_key(tmp_path, sections, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    sections = {name: {k: (v.replace("@FILE@", str(blocker)) if isinstance(v, str) else v)
                       for k, v in values.items()} for name, values in sections.items()}
    sections.setdefault("delivery", {}).setdefault("maildir", str(tmp_path / "Maildir"))
    path = write_config(tmp_path / "bad.toml", sections)
    result = run("-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert str(path) in result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_check_toml_syntax_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[server\nlisten = \n")
    result = run("-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "Traceback" not in result.stderr


def test_check_missing_file(tmp_path):
    path = tmp_path / "missing.toml"
    result = run("-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "Traceback" not in result.stderr


# -- running -----------------------------------------------------------------------------

def test_listen_and_maildir_flags_without_config(servers, tmp_path):
    port = free_port()
    maildir = tmp_path / "flags" / "Maildir"  # does not exist yet
    server = servers("--listen", f"{HOST}:{port}", "--maildir", str(maildir), "--workers", "2")
    log = server.wait_for("[READY]")
    assert f"{HOST}:{port}" in log
    deliver(port, "via-flags")
    files = list((maildir / "new").iterdir())
    assert len(files) == 1
    assert b"body via-flags\n" in files[0].read_bytes()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0


def test_port_in_use_is_a_one_line_error(servers):
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = servers("--listen", f"{HOST}:{port}", "--maildir", "Maildir")
        assert server.proc.wait(20) == 1
        err = server.stderr()
    # Named as a config error is: where the address was set, and the key.
    assert err == f"forksmtp: command line: server.listen: cannot listen on {HOST}:{port}: Address already in use\n"


def test_a_maildir_that_cannot_be_made_fails_the_start_and_check_by_name(servers, tmp_path):
    """Its nearest existing ancestor, /proc, looks writable to root, yet nothing can be
    made in it: the start fails with one line naming where the key was set, the key and
    the value, exits 1 and leaves no pidfile naming a process that is gone; --check,
    which makes and removes a directory where the start would make the Maildir, fails
    with the same line."""
    pidfile = tmp_path / "forksmtp.pid"
    args = ("--listen", f"{HOST}:{free_port()}", "--maildir", "/proc/forksmtp-none/Maildir")
    server = servers(*args, "--pidfile", str(pidfile))
    assert server.proc.wait(20) == 1
    line = ('forksmtp: command line: delivery.maildir = "/proc/forksmtp-none/Maildir": '
            "cannot make the Maildir: /proc/forksmtp-none: No such file or directory\n")
    assert server.stderr() == line
    assert not pidfile.exists()
    result = run(*args, "--check", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", line)
    # Set in a file: the file is named as it was given (-c m.toml), not as an absolute
    # path; and the value as written, a relative one relative, the problem naming the path.
    relative = os.path.relpath("/proc/forksmtp-none/Maildir", tmp_path)
    for name, value in (("m.toml", "/proc/forksmtp-none/Maildir"), ("r.toml", relative)):
        write_config(tmp_path / name, {"server": {"listen": [f"{HOST}:{free_port()}"]},
                                       "delivery": {"maildir": value}})
        line = (f"forksmtp: {name}: delivery.maildir = {shown(value)}: "
                "cannot make the Maildir: /proc/forksmtp-none: No such file or directory\n")
        for check in (["--check"], []):
            result = run("-c", name, *check, cwd=tmp_path)
            assert (result.returncode, result.stdout, result.stderr) == (2 if check else 1, "", line)


def _openssl_says(cert: Path, key: Path) -> str:
    """What OpenSSL says of a certificate pair that does not load (its text names the
    line of CPython's _ssl.c that raised it)."""
    import ssl

    with pytest.raises(ssl.SSLError) as info:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    return str(info.value.reason or info.value)


@pytest.mark.parametrize("case", ["missing-password-file", "bad-password-line", "junk-certificate"])
def test_a_file_the_config_names_that_does_not_load_is_named_by_key_and_value(tmp_path, case):
    """The certificate pair and the password file are loaded by --check and the start,
    and a failure is named as every config error is: the config file as given, the key
    and the value as written, then the file as resolved and what is wrong with it.  It
    read "/abs/f.toml: auth.password_file: /abs/pw: ...", without the value."""
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "pw").write_text("alice:not-a-hash\n")
    section, value = {
        "missing-password-file": ("auth", "missing-pw"),
        "bad-password-line": ("auth", "pw"),
        "junk-certificate": ("tls", "junk.pem"),
    }[case]
    sections: dict = {"server": {"listen": [f"{HOST}:{free_port()}"]}, "delivery": {"maildir": "Maildir"}}
    if section == "auth":
        sections["auth"] = {"password_file": value, "allow_insecure": True}
    else:
        sections["tls"] = {"cert_file": value, "key_file": value}
    write_config(tmp_path / "f.toml", sections)
    problem = {
        "missing-password-file": f"{tmp_path}/missing-pw: no such file (make it with: forksmtp passwd USER "
                                 f"-f {tmp_path}/missing-pw)",
        "bad-password-line": f"{tmp_path}/pw: line 1: expected scrypt$<log2 N>$<r>$<p>$<salt>$<key>, "
                             "got 1 field separated by '$'",
        "junk-certificate": f"{tmp_path}/junk.pem: holds no certificate in PEM form (OpenSSL: "
                            f"{_openssl_says(tmp_path / 'junk.pem', tmp_path / 'junk.pem')})",
    }[case]
    key = "auth.password_file" if section == "auth" else "tls.cert_file"
    line = f'forksmtp: f.toml: {key} = "{value}": {problem}\n'
    result = run("-c", "f.toml", "--check", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", line)
    result = run("-c", "f.toml", cwd=tmp_path)  # the start says the same
    assert (result.returncode, result.stderr) == (1, line)


def test_a_pidfile_held_at_the_start_is_named_by_key_and_value(servers, tmp_path, hold_pidfile):
    """A pidfile another live process holds fails the start (exit 1) as it fails a
    reload: named by where it was set, the key and the value as written (a flag's value
    is made absolute, as every path flag's is).  It read "pidfile PATH is held by
    running process N", naming neither the config file nor the key."""
    held = tmp_path / "held.pid"
    hold_pidfile(held)  # as a running master holds it: this test's process
    write_config(tmp_path / "f.toml", {"server": {"listen": [f"{HOST}:{free_port()}"], "pidfile": "held.pid"},
                                       "delivery": {"maildir": "Maildir"}})
    write_config(tmp_path / "g.toml", {"server": {"listen": [f"{HOST}:{free_port()}"]},
                                       "delivery": {"maildir": "Maildir"}})
    problem = f"pidfile {held} is held by running process {os.getpid()}\n"
    for args, named in ((["-c", "f.toml"], 'f.toml: server.pidfile = "held.pid"'),
                        (["-c", "g.toml", "--pidfile", "held.pid"],
                         f"command line: server.pidfile = {shown(str(held))}")):
        server = servers(*args, cwd=tmp_path)
        assert server.proc.wait(20) == 1
        assert server.stderr() == f"forksmtp: {named}: {problem}"
    assert held.read_text() == f"{os.getpid()}\n"


def test_a_reload_naming_a_held_pidfile_says_the_file_as_given_and_the_value_as_written(servers, tmp_path,
                                                                                       hold_pidfile):
    """The reload's failure line names the config file as -c gave it and the value as
    the file has it, as the start's errors do; it read "/abs/f.toml: server.pidfile =
    "/abs/held.pid": ...", both resolved."""
    held = tmp_path / "held.pid"
    hold_pidfile(held)
    sections = {"server": {"listen": [f"{HOST}:{free_port()}"], "workers": 1, "pidfile": "first.pid"},
                "delivery": {"maildir": "Maildir"}}
    write_config(tmp_path / "f.toml", sections)
    server = servers("-c", "f.toml", cwd=tmp_path)
    server.wait_for("[READY]")
    sections["server"]["pidfile"] = "held.pid"
    write_config(tmp_path / "f.toml", sections)
    server.proc.send_signal(signal.SIGHUP)
    text = server.wait_for("reload failed")
    (line,) = [ln for ln in text.splitlines() if "reload failed" in ln]
    assert line.endswith('reload failed, keeping the running configuration: f.toml: server.pidfile = "held.pid": '
                         f"pidfile {held} is held by running process {os.getpid()}"), line
    assert (tmp_path / "first.pid").read_text() == f"{server.proc.pid}\n"
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0


@pytest.fixture
def full_fs(tmp_path):
    """A file system with no inode left: made (a tmpfs of two inodes, one file in it)
    where the permission bits say every directory may be made."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=2", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (mount / "last-inode").write_text("")
        with pytest.raises(OSError, match="No space left on device"):
            (mount / "one-more").mkdir()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_check_fails_where_a_full_file_system_would_fail_the_start(servers, tmp_path, full_fs):
    """The start makes the Maildir and fails on a full file system (exit 1); --check
    used to pass it, since only the permission bits were looked at.  Both now say the
    same line; a [mailboxes] Maildir there is a warning, as at the start, and the probe
    leaves nothing behind."""
    maildir = full_fs / "Maildir"
    line = (f"forksmtp: command line: delivery.maildir = {shown(str(maildir))}: "
            f"cannot make the Maildir: {maildir}: No space left on device\n")
    args = ("--listen", f"{HOST}:{free_port()}", "--maildir", str(maildir))
    server = servers(*args)
    assert server.proc.wait(20) == 1
    assert server.stderr() == line
    result = run(*args, "--check", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", line)

    path = write_config(tmp_path / "boxes.toml", {
        "server": {"listen": [f"{HOST}:{free_port()}"]},
        "delivery": {"maildir": str(tmp_path / "Maildir")},
        "mailboxes": {"bob@example.org": str(maildir)},
    })
    result = run("-c", str(path), "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f'forksmtp: warning: mailboxes."bob@example.org" = {maildir}: cannot make the '
                             f"Maildir: {maildir}: No space left on device; its mail would get 451 until "
                             "this is fixed\n")
    assert sorted(p.name for p in full_fs.iterdir()) == ["last-inode"]
    assert not (tmp_path / "Maildir").exists()  # --check makes nothing


def test_ctrl_c_stops_master_and_workers(servers, tmp_path):
    port = free_port()
    server = servers("--listen", f"{HOST}:{port}", "--maildir", str(tmp_path / "Maildir"),
                     "--workers", "3")
    server.wait_for("[READY]")
    deliver(port, "before-ctrl-c")
    workers = server.workers(3)
    assert len(workers) >= 3
    master = psutil.Process(server.proc.pid)
    everyone = [master, *master.children(recursive=True)]
    # A terminal sends SIGINT to the whole foreground process group.
    os.killpg(server.proc.pid, signal.SIGINT)
    assert server.proc.wait(20) == 0
    assert gone(everyone) == []
    assert "Traceback" not in server.stderr()
    # Nothing holds the port any more.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((HOST, port))


def _port_2525_free() -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, 2525))
        except OSError:
            return False
    return True


def test_no_arguments_uses_the_built_in_defaults(servers, tmp_path):
    if not _port_2525_free():
        pytest.skip("127.0.0.1:2525 is in use on this machine")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = servers(cwd=cwd)
    try:
        log = server.wait_for("[READY]")
    except AssertionError:
        if "2525" in server.stderr() and server.proc.poll() == 1:
            pytest.skip("127.0.0.1:2525 was taken meanwhile")
        raise
    assert f"{HOST}:2525" in log
    deliver(2525, "defaults")
    files = list((cwd / "Maildir" / "new").iterdir())
    assert len(files) == 1 and b"body defaults\n" in files[0].read_bytes()
    os.killpg(server.proc.pid, signal.SIGINT)
    assert server.proc.wait(20) == 0


@pytest.mark.parametrize("flag", [["-c", ""], ["--config="], ["--config", ""]])
def test_an_empty_config_path_is_an_error_not_the_built_in_defaults(tmp_path, flag):
    """`forksmtp -c "$CONF"` with CONF unset started on the defaults, listening on
    127.0.0.1:2525 with a Maildir in the working directory, and said nothing."""
    for args in ([*flag, "--check"], flag):
        result = run(*args, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (
            2, "forksmtp: -c: an empty path names no config file (leave -c out for the built-in defaults)\n")
    assert os.listdir(tmp_path) == []


def test_a_fifo_where_the_pidfile_goes_fails_check_and_start_at_once(tmp_path):
    """The start read the old pid with an open() that waited for a writer: the master sat
    there before it bound anything, and a rename would then have replaced the FIFO."""
    fifo = tmp_path / "run.pid"
    os.mkfifo(fifo)
    path = write_config(tmp_path / "f.toml", {
        "server": {"listen": [f"{HOST}:{free_port()}"], "workers": 1, "pidfile": str(fifo)},
        "delivery": {"maildir": str(tmp_path / "Maildir")},
    })
    said = f"forksmtp: {path}: server.pidfile = {shown(str(fifo))}: {fifo} is not a regular file\n"
    for args in (["--check"], []):
        result = run("-c", str(path), *args, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (2, said), result
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_log_fifo_with_no_reader_fails_the_start_at_once_and_one_with_a_reader_gets_the_log(tmp_path):
    """Opening a FIFO for writing waits for a reader: the master sat in that open, before
    it bound anything.  It now fails at once, in one line; with a reader the log goes to
    it (a log shipper's pipe)."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    path = write_config(tmp_path / "f.toml", {
        "server": {"listen": [f"{HOST}:{free_port()}"], "workers": 1},
        "delivery": {"maildir": str(tmp_path / "Maildir")},
        "log": {"file": str(fifo)},
    })
    result = run("-c", str(path), cwd=tmp_path)
    assert result.returncode == 1, result
    # the config file, the key and the value, as every configuration error
    assert result.stderr.startswith(f"forksmtp: {path}: log.file = ")  # (a long value is cut)
    assert result.stderr.endswith(f": cannot open {fifo}: No such device or address\n") and result.stderr.count("\n") == 1

    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    proc = subprocess.Popen([*FORKSMTP, "-c", str(path)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        text, deadline = b"", time.monotonic() + 20
        while b"[READY]" not in text and time.monotonic() < deadline:
            try:
                text += os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.05)
        assert b"[READY] Listening on" in text, (text, proc.poll())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        os.close(reader)
    assert proc.returncode == 0
