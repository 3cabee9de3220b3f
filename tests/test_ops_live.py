"""Operator-facing behaviour of the running daemon: listen forms, legacy-network
exceptions, signals that must not hurt, log reopening and process titles."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest

from daemon import (Daemon, free_port, gone, poll_for, read_reply, request_stats, send_message,
                    serving_worker, wait_until, worker_pids)


def _has_ipv6_loopback() -> bool:
    """Asked before the daemon starts: once it runs, a refused connection to ::1 is the
    daemon's failure to listen there, not the machine's want of IPv6."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_bare_port_listens_on_ipv4_and_ipv6(daemon_factory):
    port = free_port()
    d = daemon_factory(port=port, server={"listen": [str(port)]})
    send_message(port, host="127.0.0.1")
    send_message(port, host="::1")
    log = d.wait_for_log("[CONN] ::1")
    assert "[CONN] 127.0.0.1" in log  # IPv4 clients are logged as IPv4, not ::ffff:
    assert "::ffff:" not in log
    assert len(d.new_messages()) == 2


LEGACY_BODY = b"Subject: legacy\r\n\r\nline one\nline two\r\n"


def _deliver_raw(port: int, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        read_reply(s)
        for line in (b"EHLO legacy.example", b"MAIL FROM:<a@legacy.example>",
                     b"RCPT TO:<b@mx.test.example>", b"DATA"):
            s.sendall(line + b"\r\n")
            read_reply(s)
        s.sendall(body + b".\r\n")
        return read_reply(s)


def test_normalize_networks_are_exceptions_to_reject(daemon_factory):
    listed = daemon_factory(sections={"limits": {"bare_newline": "reject",
                                                 "normalize_networks": ["127.0.0.0/8"]}})
    assert _deliver_raw(listed.port, LEGACY_BODY).startswith(b"250 ")
    assert listed.new_messages()[0].read_bytes().endswith(b"line one\nline two\n")

    other = daemon_factory(sections={"limits": {"bare_newline": "reject",
                                                "normalize_networks": ["192.0.2.0/24"]}})
    assert _deliver_raw(other.port, LEGACY_BODY).startswith(b"550 5.6.0 ")
    assert other.new_messages() == []


def test_min_data_rate_zero_turns_the_rate_check_off(daemon_factory):
    d = daemon_factory(sections={"timeouts": {"data_block": 2, "min_data_rate": 0}})
    with socket.create_connection((d.host, d.port), timeout=10) as s:
        read_reply(s)
        for line in (b"EHLO slow.example", b"MAIL FROM:<a@x.example>",
                     b"RCPT TO:<b@mx.test.example>", b"DATA"):
            s.sendall(line + b"\r\n")
            read_reply(s)
        for _ in range(12):  # 3 s of 4-byte lines: far below any positive minimum rate
            s.sendall(b"ab\r\n")
            time.sleep(0.25)  # a minimum: the client's slowness is what is tested
        s.sendall(b".\r\n")
        assert read_reply(s).startswith(b"250 ")


def test_sigusr2_does_not_stop_the_master(daemon):
    daemon.signal(signal.SIGUSR2)
    # A dump asked for after it proves the master ran on past it: a SIGUSR2 left to its
    # default action ends the process as soon as it next runs, before it could write
    # one.  (The workers hold the listening socket too, so a delivery alone would not.)
    assert request_stats(daemon)["config_generation"] == 1
    assert daemon.proc.poll() is None
    send_message(daemon.port)


def test_workers_ignore_the_signals_meant_for_the_master(daemon):
    """Ctrl-C on a terminal and `kill` of the whole process group reach the workers too:
    a worker in a session must let it finish (README, Signals)."""
    client = smtplib.SMTP(daemon.host, daemon.port, timeout=10)
    client.ehlo("client.example")
    assert client.mail("a@client.example")[0] == 250
    assert client.rcpt("b@example.test")[0] == 250
    worker = serving_worker(daemon, client.sock)
    ignored = int(next(line for line in open(f"/proc/{worker.pid}/status")
                       if line.startswith("SigIgn:")).split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                signal.SIGTTOU):
        assert ignored & 1 << (sig - 1), sig
        os.kill(worker.pid, sig)
    assert client.data(b"Subject: signals\r\n\r\nstill here\r\n")[0] == 250
    client.quit()
    assert worker.is_running()


def test_command_line_flags_outlive_a_reload(daemon_factory):
    """Flags given with -c override the file, on every reload too (README, Command line)."""
    d = daemon_factory(extra_args=["--hostname", "flag.example"])
    assert d.sections["server"]["hostname"] != "flag.example"
    with smtplib.SMTP(d.host, d.port, timeout=10) as client:
        assert client.ehlo()[1].startswith(b"flag.example")
    old = {w.pid for w in d.workers()}
    d.signal(signal.SIGHUP)
    d.wait_for_log("[RELOAD] configuration generation 2")
    wait_until(lambda: not old & {w.pid for w in d.workers()}, 10, 0.05, "the old workers gone")
    with smtplib.SMTP(d.host, d.port, timeout=10) as client:
        assert client.ehlo()[1].startswith(b"flag.example")


def test_a_pidfile_of_a_running_master_stops_a_second_start(daemon_factory, tmp_path):
    pidfile = tmp_path / "forksmtp.pid"
    first = daemon_factory(server={"pidfile": str(pidfile)})
    assert pidfile.read_text() == f"{first.pid}\n"
    assert stat.S_IMODE(first.log_path.stat().st_mode) == 0o640  # the log it created
    second = Daemon(tmp_path / "second", port=free_port(), server={"pidfile": str(pidfile)})
    second.tmp.mkdir()
    second.write_config()
    done = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(second.config_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"is held by running process {first.pid}" in done.stderr + second.log_text()
    assert pidfile.read_text() == f"{first.pid}\n"
    # Its lock is the master's alone: one a worker held would outlive a master killed
    # with SIGKILL, until its last worker left.
    held = os.stat(pidfile)
    holders = [pid for pid in [first.pid, *worker_pids(first)] if _has_open(pid, held)]
    assert holders == [first.pid]


def _has_open(pid: int, st: os.stat_result) -> bool:
    """Whether ``pid`` has a descriptor of the file ``st`` describes, whatever name it
    was opened by (the pidfile is written under another and linked into place)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            there = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def test_a_reload_naming_a_pidfile_another_process_holds_changes_nothing(daemon_factory, tmp_path, hold_pidfile):
    """README, Reload: if anything fails, nothing changes; the running pidfile included."""
    first, held, third = (tmp_path / n for n in ("first.pid", "held.pid", "third.pid"))
    d = daemon_factory(server={"pidfile": str(first)})
    hold_pidfile(held)  # as a running master holds it: this test's process
    d.sections["server"]["pidfile"] = str(held)
    new_log = tmp_path / "new.log"  # opened by the reload before the pidfile fails it
    d.sections["log"]["file"] = str(new_log)
    d.write_config()
    old = {w.pid for w in d.workers()}
    d.signal(signal.SIGHUP)
    line = _reload_failure(d, f"pidfile {held} is held by running process {os.getpid()}")
    assert f"configuration: {d.config_path}: server.pidfile = " in line, line  # (a long value is cut)
    assert first.read_text() == f"{d.pid}\n" and held.read_text() == f"{os.getpid()}\n"
    assert not new_log.exists()  # nothing changes: no empty log of the failed reload either
    assert old <= {w.pid for w in d.workers()}  # no new generation
    d.sections["server"]["pidfile"] = str(third)
    d.sections["log"]["file"] = str(d.log_path)
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_for_log("[RELOAD] configuration generation 2")
    assert third.read_text() == f"{d.pid}\n" and not first.exists()


def test_hup_reopens_the_log_after_rotation(daemon):
    rotated = daemon.log_path.with_suffix(".log.1")
    old = {w.pid for w in daemon.workers()}
    os.rename(daemon.log_path, rotated)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.log_path.exists() and "[RELOAD]" in daemon.log_text(), 10,
               what="a fresh log file after HUP")
    # An old worker woken for a connection as it was told to stop still serves it, with
    # the log it has (README, Reload): wait until only new workers are left.
    wait_until(lambda: not old & {w.pid for w in daemon.workers()}, 10, 0.05, "the old workers gone")
    send_message(daemon.port)
    daemon.wait_for_log("[STORE]")


def test_a_starting_worker_says_so_in_its_title(daemon_factory):
    """A worker kept the master's title from its fork until it was ready, so that `pgrep
    -f "forksmtp: master"` found it while it started.  Here a new worker is held in its
    set-up (its sched_setscheduler, which the master never calls, delayed 3 s by a
    tracer that follows the master's forks): its title says it is starting."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    d = daemon_factory(workers=1)
    old = {w.pid for w in d.workers()}
    tracer = subprocess.Popen(["strace", "-f", "-p", str(d.pid), "-o", os.devnull,
                               "-e", "trace=sched_setscheduler",
                               "-e", "inject=sched_setscheduler:delay_enter=3s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = tracer.stderr.readline()
        if "attached" not in line:
            pytest.skip(f"strace cannot attach here: {line.strip()}")
        d.signal(signal.SIGTTIN)
        new = wait_until(lambda: [w for w in d.workers() if w.pid not in old], 10, what="a new worker")[0]
        title = wait_until(lambda: " ".join(new.cmdline()).strip() if "forksmtp: master" not in
                           " ".join(new.cmdline()) else "", 2, 0.01, "the new worker's own title")
        assert title == "forksmtp: worker starting (gen 1)"
        time.sleep(0.5)  # still in its set-up
        assert " ".join(new.cmdline()).strip() == title
    finally:
        tracer.terminate()
        tracer.wait()
    wait_until(lambda: " ".join(new.cmdline()).strip() == "forksmtp: worker idle (gen 1)", 10, 0.05, "ready")


def test_a_worker_told_to_stop_in_a_session_says_so_in_its_title(daemon_factory):
    """It still read "busy" where the stats said "stopping"."""
    d = daemon_factory(workers=1)
    with smtplib.SMTP(d.host, d.port, timeout=10) as client:
        client.ehlo("titles.example")
        (old,) = d.workers()
        wait_until(lambda: "busy 127.0.0.1 helo" in " ".join(old.cmdline()), 10, what="a busy title")
        d.signal(signal.SIGHUP)
        wait_until(lambda: "stopping" in " ".join(old.cmdline()), 10, what="the stopping title")
        assert " ".join(old.cmdline()).strip() == "forksmtp: worker stopping 127.0.0.1 helo (gen 1)"
        assert client.noop()[0] == 250  # its session goes on under the old generation
    wait_until(lambda: gone(old.pid), 10, what="the old worker gone")


def test_worker_title_shows_client_and_phase(daemon):
    with smtplib.SMTP(daemon.host, daemon.port, timeout=10) as client:
        client.ehlo("titles.example")
        client.mail("a@x.example")

        def busy_title():
            for w in daemon.workers():
                title = " ".join(w.cmdline())
                if "busy 127.0.0.1 mail" in title:  # set just after the 250 went out
                    return title
            return ""

        title = wait_until(busy_title, 10, what="a busy worker title")
        assert title.startswith("forksmtp: worker busy 127.0.0.1 mail"), title
    master = " ".join(psutil.Process(daemon.pid).cmdline())
    assert master.startswith("forksmtp: master ")


def test_workers_run_under_sched_batch_and_the_master_does_not(daemon):
    """Workers never preempt a running task when a client wakes them (process.py says
    why); the master keeps the normal policy so that signals and the connection ceiling
    are handled at once."""
    with smtplib.SMTP(daemon.host, daemon.port, timeout=10) as client:
        assert client.noop()[0] == 250
        assert daemon.workers()

        def policies() -> set[int]:
            return {os.sched_getscheduler(w.pid) for w in daemon.workers()}

        # A worker takes SCHED_BATCH in its first steps after fork; one forked a moment
        # ago (a spare) may not have taken them yet.
        assert poll_for(policies, {os.SCHED_BATCH}) == {os.SCHED_BATCH}
    assert os.sched_getscheduler(daemon.pid) == os.SCHED_OTHER


def test_workers_are_recycled_after_max_sessions(daemon_factory):
    """max_sessions_per_worker (Postfix's max_use, gunicorn's max_requests): a worker
    leaves after that many sessions and the master starts a fresh one."""
    d = daemon_factory(workers=1, server={"max_workers": 2, "min_spare_workers": 0,
                                          "max_sessions_per_worker": 3, "max_sessions_jitter": 0})
    first = {w.pid for w in d.workers()}
    for _ in range(3):
        send_message(d.port)
    wait_until(lambda: {w.pid for w in d.workers()} and not ({w.pid for w in d.workers()} & first),
               10, what="the recycled worker replaced")
    send_message(d.port)
    assert len(d.new_messages()) == 4
    assert "crash loop" not in d.log_text()


def _data_reply(port: int, rcpt: str) -> int:
    """The reply to a whole message for ``rcpt`` (451 at DATA counts as the reply)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("ops.example")
        client.mail("a@ops.example")
        assert client.rcpt(rcpt)[0] == 250
        try:
            return client.data(b"Subject: one mailbox down\r\n\r\nhello\r\n")[0]
        except smtplib.SMTPDataError as exc:  # refused in answer to DATA
            return exc.smtp_code


def test_a_broken_mailbox_fails_neither_check_nor_the_start_nor_a_reload(daemon_factory, tmp_path):
    """One [mailboxes] Maildir that cannot be made or written (a file in its path here; a
    read-only file system in life) must not keep the server from starting after a
    reboot, or block a reload that rotates a certificate: the master logs it, that
    mailbox's mail gets 451, and everyone else's goes on.  --check, which the systemd
    unit runs before every start, says what the start would do: it names the mailbox
    and passes."""
    blocker = tmp_path / "bob-home"
    blocker.write_text("a file where bob's home directory should be\n")
    boxes = {"bob@mx.test.example": str(blocker / "Maildir"),
             "carol@mx.test.example": str(tmp_path / "carol" / "Maildir")}
    check = Daemon(tmp_path / "check", sections={"mailboxes": boxes})
    (tmp_path / "check").mkdir()
    check.write_config()
    result = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(check.config_path), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    assert result.stderr == (f'forksmtp: warning: mailboxes."bob@mx.test.example" = {blocker}/Maildir: '
                             f"{blocker} is not a directory; its mail would get 451 until this is fixed\n")
    assert len(result.stdout.splitlines()) == 1 and not (tmp_path / "carol").exists()  # makes nothing

    d = daemon_factory(sections={"mailboxes": boxes})
    warning = f'[STORE] mailboxes."bob@mx.test.example" = {blocker}/Maildir: '
    assert warning in d.log_text() and "its mail gets 451 until this is fixed" in d.log_text()
    assert _data_reply(d.port, "bob@mx.test.example") == 451
    assert _data_reply(d.port, "carol@mx.test.example") == 250
    send_message(d.port)  # the catch-all
    assert len(list((tmp_path / "carol" / "Maildir" / "new").iterdir())) == 1

    # A reload for something else entirely goes through, with bob still broken.
    d.sections["server"]["hostname"] = "mx2.test.example"
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration generation 2 loaded")
    assert d.log_text().count(warning) == 2
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        assert b"mx2.test.example" in client.ehlo("ops.example")[1]
    # Fixed: bob's mail is stored again, with no reload needed.
    blocker.unlink()
    assert _data_reply(d.port, "bob@mx.test.example") == 250
    assert len(list((blocker / "Maildir" / "new").iterdir())) == 1
    assert "reload failed" not in d.log_text() and "Traceback" not in d.log_text()


def test_a_reload_whose_log_cannot_be_opened_names_the_file_and_the_key(daemon_factory, tmp_path):
    """A FIFO with no reader as the new log.file: the reload fails, and says where the
    value came from, as every other reload failure does (it read "[Errno 6] No such
    device or address: '...'", naming neither the config file nor the key)."""
    d = daemon_factory()
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    d.sections["log"]["file"] = str(fifo)
    d.write_config()
    d.signal(signal.SIGHUP)
    line = _reload_failure(d, f": cannot open {fifo}: No such device or address")
    assert f"configuration: {d.config_path}: log.file = " in line, line  # (a long value is cut)
    send_message(d.port)


def _reload_failure(d, ending: str) -> str:
    """The log's reload failure line that ends with ``ending``."""
    d.wait_for_log(ending)
    (line,) = [ln for ln in d.log_text().splitlines() if "reload failed" in ln and ln.endswith(ending)]
    return line
