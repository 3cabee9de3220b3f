"""The master's signals (contract section 2), sent to a real daemon by pid.

Every wait is bounded; a test never asserts how long something took, only that it
happened before a generous deadline (a hang would never end).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from daemon import (SYSCALL_NR, Daemon, after_a_turn, assert_no_zombies, connect, connection_refused,
                    free_port, gone, in_any_syscall, poll_for, read_reply, read_to_close, request_stats,
                    send_message, server_end, serving_worker, unusual_lines, wait_until, worker_pids,
                    worker_states, workers_replacing, write_config)
from forksmtp.arbiter import STUCK_GRACE
from forksmtp.signals import MAILDIR_CALL, POOL_CALL, SignalQueue

BODY = b"Subject: supervisor\r\n\r\nhello\r\n"
WORKER_KEYS = {"pid", "state", "sessions", "rss", "cpu_s", "generation"}
STATS_KEYS = {"uptime_s", "workers", "connections_active", "connections_total",
              "connections_rejected", "messages_accepted", "messages_rejected",
              "bytes_received", "config_generation"}




def open_transaction(port: int) -> smtplib.SMTP:
    """A session that is in the middle of a transaction: EHLO, MAIL and RCPT done."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("client.example")
    assert client.mail("sender@client.example")[0] == 250
    assert client.rcpt("rcpt@mx.test.example")[0] == 250
    return client


def open_idle_session(port: int):
    sock = connect(port)
    assert read_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")
    assert read_reply(sock).startswith(b"250")
    return sock


def shut_down(sock) -> bool:
    """The server ended the session as a stop does: 421 4.3.2, then the close."""
    return read_reply(sock).startswith(b"421 4.3.2 Service shutting down") and sock.recv(100) == b""


def reloads(d) -> int:
    return d.log_text().count("[RELOAD] configuration generation")


def hup(d) -> None:
    before = reloads(d)
    d.signal(signal.SIGHUP)
    wait_until(lambda: reloads(d) > before, 10, 0.01, "reload logged")


# -- SIGUSR1 -------------------------------------------------------------------------------

def test_a_workers_calls_are_told_apart():
    """Workers call the master through one pipe: for workers, and for a Maildir pass."""
    queue = SignalQueue()
    try:
        for calls, wanted, maildirs in [(POOL_CALL, True, False), (MAILDIR_CALL, True, True),
                                        (POOL_CALL * 3 + MAILDIR_CALL + POOL_CALL, True, True),
                                        (b"", False, False)]:
            if calls:
                os.write(queue.want_w, calls)
            assert queue.wait(0.01, want=True) == []
            assert (queue.wanted, queue.maildirs_wanted) == (wanted, maildirs)
        # A fast tick's wait does not end for a call, but a Maildir call is read all the same.
        os.write(queue.want_w, POOL_CALL + MAILDIR_CALL)
        assert queue.wait(0.01, want=False) == []
        assert (queue.wanted, queue.maildirs_wanted) == (False, True)
        assert queue.wait(0.01, want=True) == [] and not queue.wanted  # nothing left behind
    finally:
        for fd in (queue.wake_r, queue.wake_w, queue.want_r, queue.want_w):
            os.close(fd)


def test_usr1_gives_each_worker_its_own_process_figures(daemon_factory):
    """cpu_s and rss are the worker process's own (psutil), not placeholders: a worker
    made to spend CPU (thousands of pipelined commands) shows it, and what the dump says
    lies between two readings of the process taken around it."""
    d = daemon_factory(workers=1, sections={"limits": {"max_junk_commands": 10**6}})
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        read_reply(s)
        # Enough to show above the clock's tick (10 ms) on a fast machine: 20,000 took
        # 10 ms there, and so often read as one tick or none.
        s.sendall(b"EHLO busy.example\r\n" + b"NOOP\r\n" * 200000 + b"QUIT\r\n")
        got = read_to_close(s, 65536)
    assert got.count(b"\r\n250 2.0.0 ") == 200000 and got.endswith(b"\r\n221 2.0.0 Bye\r\n")
    # The pool's spare too; one started after this look (the session took the last idle
    # worker) is in the dump but not compared.
    procs = {pid: psutil.Process(pid) for pid in worker_pids(d)}
    before = {pid: sum(p.cpu_times()[:2]) for pid, p in procs.items()}
    workers = {w["pid"]: w for w in request_stats(d)["workers"]}
    assert procs.keys() <= workers.keys()
    assert max(before.values()) > 0.01, before  # the work above shows in its worker's figure
    for pid, proc in procs.items():
        after = sum(proc.cpu_times()[:2])
        assert before[pid] - 0.001 <= workers[pid]["cpu_s"] <= after + 0.001, (before, workers, after)
        assert abs(workers[pid]["rss"] - proc.memory_info().rss) < 4 << 20, (workers, proc.memory_info())


def test_usr1_shows_how_long_a_client_has_kept_its_worker_waiting(daemon_factory):
    """A worker whose client goes quiet marks its slot (what the pool reads to tell
    workers held by their clients from those that come free at its pace), and clears
    the mark when the client moves: after a second quiet spell the wait shown is the
    new one's, not counted from the first."""
    d = daemon_factory(workers=1)

    def held(pid: int) -> float:
        return {w["pid"]: w for w in request_stats(d)["workers"]}[pid]["client_wait_s"]

    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        read_reply(s)
        busy = [w["pid"] for w in request_stats(d)["workers"] if w["state"] == "busy"]
        assert len(busy) == 1, busy
        pid = busy[0]
        time.sleep(0.6)
        first = held(pid)
        assert first >= 0.4, first  # since the greeting: 0.6 s, less a late mark
        moved = time.monotonic()
        s.sendall(b"NOOP\r\n")
        assert read_reply(s).startswith(b"250")
        time.sleep(0.3)
        second = held(pid)
        since_moved = time.monotonic() - moved
        # The new wait began after the NOOP's reply.  Not cleared, the mark would still
        # say since the greeting, 0.6 s and the first dump's time more than that bound.
        assert 0.1 <= second <= since_moved, (first, second, since_moved)
        s.sendall(b"QUIT\r\n")
        read_reply(s)
    # An idle worker is held by no one, whatever its slot last said.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and held(pid) != 0.0:
        time.sleep(0.05)
    assert held(pid) == 0.0


def test_usr1_logs_stats_and_writes_stats_file(daemon_factory, tmp_path):
    stats_file = tmp_path / "stats.json"
    d = daemon_factory(server={"stats_file": str(stats_file)},
                       sections={"limits": {"max_message_size": 1000}})
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
        c.sendmail("a@client.example", ["b@mx.test.example"], BODY)
        c.sendmail("a@client.example", ["c@mx.test.example"], BODY + b"more\r\n")
    send_message(d.port, body=BODY)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as c:
        c.ehlo("client.example")
        assert c.mail("a@client.example", ["SIZE=5000"])[0] == 552

    # The last QUIT may still be releasing its count when the first dump is taken.
    stats = wait_until(lambda: (s := request_stats(d))["connections_active"] == 0 and s,
                       10, 0.1, "sessions released")
    assert STATS_KEYS <= stats.keys()
    assert stats["messages_accepted"] == 3 == len(d.new_messages())
    assert stats["bytes_received"] == 3 * len(BODY) + len(b"more\r\n")
    assert stats["messages_rejected"].get("552") == 1
    assert stats["connections_total"] == 3
    assert isinstance(stats["connections_rejected"], dict)
    assert stats["config_generation"] == 1
    assert stats["uptime_s"] > 0
    assert {w["pid"] for w in stats["workers"]} == worker_pids(d)
    for w in stats["workers"]:
        assert WORKER_KEYS <= w.keys()
        assert w["generation"] == 1
        # the figures themselves: test_usr1_gives_each_worker_its_own_process_figures
        assert w["rss"] > 0 and w["cpu_s"] >= 0
    assert sum(w["sessions"] for w in stats["workers"]) == 3
    assert stats["master"]["pid"] == d.pid and stats["master"]["rss"] > 0
    assert stats["per_ip"] == {} and stats["stress"] is False  # nobody connected now
    assert stats["auth"] == {"succeeded": 0, "failed": 0, "deferred": 0, "checks_running": 0,
                             "checks_max": len(os.sched_getaffinity(0))}  # the daemon's CPUs are ours
    assert stats["tls"] == {"handshakes": 0, "resumed": 0, "failed": 0}

    # One SIGUSR1, one line; the file holds the same document as the last line.
    count = d.log_text().count("[STATS] ")
    last = request_stats(d)
    assert d.log_text().count("[STATS] ") == count + 1
    # The file is written right after the log line.
    wait_until(lambda: json.loads(stats_file.read_text()) == last, 10, what="stats_file updated")
    assert [p.name for p in tmp_path.iterdir() if "stats" in p.name] == ["stats.json"]  # no temporary one
    assert_no_zombies(d)


def test_usr1_writes_its_line_at_every_log_level(daemon_factory):
    """The operator asked for the stats: a level that hides info lines must not swallow
    the [STATS] line, the contract's answer to SIGUSR1."""
    d = daemon_factory(workers=1)
    old = wait_until(lambda: worker_pids(d), 10, what="a worker")
    d.sections["log"]["level"] = "error"
    write_config(d.config_path, d.sections)
    d.signal(signal.SIGHUP)  # the reload itself is logged at info: seen by its new worker
    wait_until(lambda: (p := worker_pids(d)) and not p & old, 10, what="the reloaded worker")
    stats = request_stats(d)
    assert stats["config_generation"] == 2


# -- SIGHUP --------------------------------------------------------------------------------

def test_hup_starts_new_generation_and_old_session_finishes(daemon_factory):
    d = daemon_factory(workers=2)
    old = wait_until(lambda: len(p := worker_pids(d)) == 2 and p, 10, what="2 workers")
    client = open_transaction(d.port)
    hup(d)
    wait_until(lambda: len(worker_pids(d) - old) >= 2, 10, what="new generation started")

    # The session opened before the reload completes under the old worker.
    code, _ = client.data(BODY)
    assert code == 250
    client.quit()
    # Reaped, not only exited: the master frees a worker's slot when it reaps it.
    wait_until(lambda: not any(map(psutil.pid_exists, old)), 10, what="old workers reaped")

    stats = request_stats(d)
    assert stats["config_generation"] == 2
    assert {w["generation"] for w in stats["workers"]} == {2}
    assert len(d.new_messages()) == 1
    send_message(d.port)
    assert_no_zombies(d)


def test_hup_with_invalid_config_keeps_running(daemon_factory):
    d = daemon_factory(workers=2)
    before = wait_until(lambda: len(p := worker_pids(d)) == 2 and p, 10, what="2 workers")
    good = d.config_path.read_text()
    d.config_path.write_text(good + "\n[server]\nworkers = \"many\"\n")
    d.signal(signal.SIGHUP)
    text = d.wait_for_log("reload failed")
    assert "[RELOAD]" in text.split("reload failed")[0].splitlines()[-1]
    assert d.proc.poll() is None
    assert worker_pids(d) == before
    assert request_stats(d)["config_generation"] == 1
    send_message(d.port)

    d.config_path.write_text(good)  # fixed: the next HUP loads it
    hup(d)
    assert request_stats(d)["config_generation"] == 2
    send_message(d.port)
    assert_no_zombies(d)


@pytest.mark.parametrize("put", ["fifo", "zero", "digits", "nesting"])
def test_hup_with_a_config_that_is_no_config_file_keeps_running(daemon_factory, put):
    """A FIFO at the config path held the master in open() (signals queued, nothing
    reaped, only SIGKILL ended it); /dev/zero was read without end; a 5,000-digit number
    and arrays nested 2,000 deep were logged as a traceback, not as a failed reload."""
    d = daemon_factory(workers=1)
    good = d.config_path.read_text()
    d.config_path.unlink()
    said = {"fifo": "cannot read: not a regular file", "zero": "cannot read: not a regular file",
            "digits": "invalid TOML: a number of more than 4,300 digits",
            "nesting": "invalid TOML: nested too deeply"}[put]
    if put == "fifo":
        os.mkfifo(d.config_path)
    elif put == "zero":
        d.config_path.symlink_to("/dev/zero")
    else:
        d.config_path.write_text(good + ("\n[limits]\nmax_errors = " + "1" * 5000 if put == "digits" else
                                         "\n[extra]\nx = " + "[" * 2000 + "]" * 2000) + "\n")
    d.signal(signal.SIGHUP)
    text = d.wait_for_log("reload failed", 30)
    (line,) = [line for line in text.splitlines() if "reload failed" in line]
    assert line.endswith(f"[RELOAD] reload failed, keeping the running configuration: {d.config_path}: {said}"), line
    assert "Traceback" not in d.log_text()
    send_message(d.port)
    d.config_path.unlink()
    d.config_path.write_text(good)
    hup(d)
    assert request_stats(d)["config_generation"] == 2


@pytest.mark.parametrize("fails_at", ["listen", "pidfile"])
def test_a_failed_reload_names_the_file_and_the_key_and_makes_no_maildir(daemon_factory, tmp_path, fails_at,
                                                                         hold_pidfile):
    """A bind that fails, or a pidfile another process holds, is the config's problem to
    the operator: the failure names the file and the key, as an invalid value does, and
    the old config serves on.  Nothing of the new config is left behind: its Maildirs,
    which a reload would make and hand to the workers' user, were made (and a missing
    one reported) before those steps, and stayed made and handed over."""
    d = daemon_factory(workers=1)
    pidfile = tmp_path / "new.pid"
    hold_pidfile(pidfile)  # as a running master holds it: this test's process
    new_maildir, new_box = tmp_path / "new-catch-all", tmp_path / "new-box"
    d.sections["delivery"]["maildir"] = str(new_maildir)
    d.sections["mailboxes"] = {"box@example.test": str(new_box)}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        if fails_at == "listen":
            d.sections["server"]["listen"] = [f"127.0.0.1:{d.port}", f"127.0.0.1:{busy}"]
            said = f"server.listen: cannot listen on 127.0.0.1:{busy}: Address already in use"
        else:
            d.sections["server"]["pidfile"] = str(pidfile)
            said = f"pidfile {pidfile} is held by running process {os.getpid()}"
        d.write_config()
        d.signal(signal.SIGHUP)
        text = d.wait_for_log("reload failed", 10)
    (line,) = [line for line in text.splitlines() if "reload failed" in line]
    # (a long value is shown cut short: the key, then the problem in full)
    assert f"[RELOAD] reload failed, keeping the running configuration: {d.config_path}: " in line
    assert f"server.{fails_at}" in line and line.endswith(said), line
    assert request_stats(d)["config_generation"] == 1
    assert not new_maildir.exists() and not new_box.exists()
    assert "[STORE]" not in d.log_text()
    assert pidfile.read_text() == f"{os.getpid()}\n"
    send_message(d.port)
    assert len(d.new_messages()) == 1  # in the running config's Maildir


def test_hup_retires_workers_idle_for_longer_than_the_stuck_limit_gracefully(daemon_factory):
    """Workers idle for longer than the master's stuck limit (the longest timeout plus
    STUCK_GRACE; 610 s by default) were SIGKILLed as wedged the moment a SIGHUP marked
    them stopping, their idle time taken for silence: every reload of a quiet server
    logged errors and killed healthy workers.  They exit by themselves."""
    timeouts = {"command": 1, "data_block": 1, "data_done": 1, "stress_command": 1}
    d = daemon_factory(workers=2, sections={"timeouts": timeouts})
    old = worker_pids(d)
    time.sleep(1 + STUCK_GRACE + 2)  # idle past the stuck limit
    hup(d)
    wait_until(lambda: workers_replacing(d, old, 2), 10, 0.05, "a new generation of workers")
    wait_until(lambda: all(gone(pid) for pid in old), 10, 0.05, "the old workers gone")
    text = d.log_text()
    assert "killing it" not in text and "SIGKILL" not in text, text[-2000:]
    send_message(d.port)


def test_a_session_open_across_a_reload_keeps_the_config_it_started_with(daemon_factory):
    """Contract 2: sessions opened before a reload finish under the config they started
    with: its message size limit, its local domains and its host name, here; new
    sessions get the new ones."""
    d = daemon_factory(workers=2, sections={"limits": {"max_message_size": 100000},
                                            "delivery": {"local_domains": ["mx.test.example"]}})
    old = worker_pids(d)
    before = smtplib.SMTP("127.0.0.1", d.port, timeout=10)
    try:
        before.ehlo("client.example")
        assert before.esmtp_features["size"] == "100000"
        d.sections["limits"]["max_message_size"] = 1000
        d.sections["delivery"]["local_domains"] = ["other.example"]
        d.sections["server"]["hostname"] = "new.test.example"
        d.write_config()
        hup(d)
        # The old worker in this session stays to finish it, beside the new generation.
        wait_until(lambda: len(worker_pids(d) - old) >= 2, 10, 0.05, "a new generation of workers")
        body = b"Subject: begun before\r\n\r\n" + (b"x" * 98 + b"\r\n") * 50  # 5 KB
        assert before.sendmail("a@client.example", ["b@mx.test.example"], body) == {}
        before.quit()
    finally:
        before.close()
    (stored,) = d.new_messages()
    assert "\tby mx.test.example (forksmtp) " in stored.read_text() and stored.stat().st_size > 5000
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as after:
        code, greeting = after.ehlo("client.example")
        assert greeting.startswith(b"new.test.example") and after.esmtp_features["size"] == "1000"
        assert after.mail("a@client.example")[0] == 250
        assert after.rcpt("b@mx.test.example")[0] == 550  # not a local domain any more


def test_hup_that_shortens_timeouts_spares_the_sessions_begun_before(daemon_factory):
    """The master kills a worker silent for longer than its timeouts allow; a worker of
    the old generation is judged by the old ones (contract 2: sessions opened before a
    reload finish under the config they started with)."""
    d = daemon_factory(workers=2, sections={"timeouts": {"command": 60, "data_block": 60,
                                                         "data_done": 120}})
    client = open_transaction(d.port)
    # Every timeout the stuck limit is made of (stress_command's default alone is 10 s).
    d.sections["timeouts"] = {"command": 1, "data_block": 1, "data_done": 1, "stress_command": 1}
    d.write_config()
    hup(d)
    time.sleep(1 + STUCK_GRACE + 2.5)  # silent past the new limit, far inside the old one
    # The master has judged the session's worker since (its check runs every turn); had
    # it used the new limit, it would have killed it then.
    after_a_turn(d)
    assert "made no progress" not in d.log_text()
    code, _ = client.data(BODY)
    assert code == 250
    client.quit()
    assert len(d.new_messages()) == 1


def test_hup_moves_the_pidfile(daemon_factory, tmp_path):
    first, second = tmp_path / "first.pid", tmp_path / "second.pid"
    d = daemon_factory(server={"pidfile": str(first)})
    assert first.read_text() == f"{d.pid}\n"
    d.sections["server"]["pidfile"] = str(second)
    d.write_config()
    hup(d)
    assert second.read_text() == f"{d.pid}\n" and not first.exists()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert not second.exists()


def test_signals_are_caught_before_the_pidfile_appears(tmp_path):
    """A script that signals the master as soon as the pidfile exists (a logrotate
    postrotate HUP, a quick TERM) must meet the master's handlers, not the default
    action, which would kill it."""
    pidfile = tmp_path / "forksmtp.pid"
    d = Daemon(tmp_path, server={"pidfile": str(pidfile)})
    d.write_config()
    d.proc = subprocess.Popen([sys.executable, "-m", "forksmtp", "-c", str(d.config_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(pidfile.exists, 20, 0.001, "the pidfile")
        status = Path(f"/proc/{d.pid}/status").read_text()
        caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
            assert caught & 1 << (sig - 1), sig
        d.signal(signal.SIGHUP)  # at once
        d.wait_for_log("[RELOAD] configuration generation 2", 20)
        send_message(d.port)
    finally:
        d.stop()


def test_hup_binds_new_and_unbinds_removed_listen_address(daemon_factory):
    d = daemon_factory(workers=2)
    old_port, new_port = d.port, free_port()
    d.sections["server"]["listen"] = [f"127.0.0.1:{new_port}"]
    d.write_config()
    hup(d)
    send_message(new_port)
    wait_until(lambda: connection_refused(old_port), 10, 0.1, "old address unbound")
    send_message(new_port)
    assert_no_zombies(d)


def test_a_removed_address_stops_listening_at_once_and_can_be_put_back(daemon_factory):
    """A reload removes an address while a worker of the earlier configuration still
    holds its socket (here: stopped, so it acts on no SIGTERM).  The address refuses
    clients at once, instead of queueing them where nobody accepts, and a reload that
    puts it back binds it at once, where it failed with EADDRINUSE (an editor's second
    save, a HUP sent twice).  The old worker, resumed, lets go of it and exits."""
    d = daemon_factory(workers=1, server={"min_spare_workers": 0})
    extra = free_port()
    both = [f"127.0.0.1:{d.port}", f"127.0.0.1:{extra}"]
    d.sections["server"]["listen"] = both
    d.write_config()
    hup(d)
    send_message(extra)
    first = wait_until(lambda: d.workers() if len(d.workers()) == 1 else None, 10, 0.1, "one worker")[0]
    first.suspend()  # holds both sockets
    try:
        d.sections["server"]["listen"] = both[:1]
        d.write_config()
        hup(d)
        assert connection_refused(extra)
        send_message(d.port)
        d.sections["server"]["listen"] = both
        d.write_config()
        hup(d)
        send_message(extra)
    finally:
        with contextlib.suppress(psutil.Error):
            first.resume()
    wait_until(lambda: gone(first.pid), 10, 0.1, "the old worker gone")
    assert "reload failed" not in d.log_text()
    assert not [line for line in d.log_text().splitlines() if "Traceback" in line or "crashed" in line]
    send_message(extra)
    send_message(d.port)
    assert_no_zombies(d)


def _listening_sockets(pid: int) -> set[str]:
    """The master's listening sockets by inode ("socket:[N]"): a socket closed and bound
    again may get its old descriptor number back, never its inode."""
    fds = {c.fd for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    return {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}


def test_hup_with_an_address_written_another_way_keeps_its_socket(daemon_factory):
    """localhost:P for 127.0.0.1:P is the same socket: the reload takes it over instead
    of failing to bind it again, and no client is refused meanwhile."""
    d = daemon_factory(workers=2)
    listening = _listening_sockets(d.pid)
    assert len(listening) == 1
    d.sections["server"]["listen"] = [f"localhost:{d.port}"]
    d.write_config()
    hup(d)
    assert "reload failed" not in d.log_text()
    assert _listening_sockets(d.pid) == listening  # the same socket, not one bound again
    send_message(d.port)
    d.sections["server"]["listen"] = [f"127.0.0.1:{d.port}"]  # and back
    d.write_config()
    hup(d)
    assert "reload failed" not in d.log_text()
    send_message(d.port)
    assert_no_zombies(d)


def test_hup_moving_a_port_to_the_wildcard_says_why_it_cannot_and_two_reloads_do_it(daemon_factory):
    """127.0.0.1:P to 0.0.0.0:P in one reload: the old socket listens until everything
    new is bound, so the reload fails (the old config keeps serving) with a message that
    says why.  Removing the old address and then adding the new moves it."""
    d = daemon_factory(workers=1)
    other = free_port()
    d.sections["server"]["listen"] = [f"0.0.0.0:{d.port}"]
    d.write_config()
    d.signal(signal.SIGHUP)
    line = d.wait_for_log("reload failed", 10)
    assert (f"keeping the running configuration: {d.config_path}: server.listen: cannot listen on "
            f"0.0.0.0:{d.port}: Address already in use: "
            f"port {d.port} is still bound to 127.0.0.1:{d.port}, which this reload removes; "
            "moving a port between addresses that overlap takes two reloads (remove, then add) "
            "or a restart") in line
    send_message(d.port)
    for listen in ([f"127.0.0.1:{other}"], [f"127.0.0.1:{other}", f"0.0.0.0:{d.port}"]):
        d.sections["server"]["listen"] = listen
        d.write_config()
        hup(d)
    assert d.log_text().count("reload failed") == 1
    send_message(d.port, host="127.0.0.2")  # the wildcard's
    assert_no_zombies(d)


def test_reloads_while_clients_connect_refuse_nothing(daemon_factory):
    d = daemon_factory(workers=2)
    done = threading.Event()
    ok: list[int] = []
    failures: list[str] = []

    def client_loop() -> None:
        deadline = time.monotonic() + 30  # a bound in case the main thread dies
        while not done.is_set() and time.monotonic() < deadline:
            try:
                send_message(d.port)
                ok.append(1)
            except Exception as exc:  # every failure is a finding, whatever its kind
                failures.append(f"{time.strftime('%H:%M:%S', time.gmtime())} {exc!r}")

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()

    def delivering() -> None:
        """Deliveries go on under the generation now running: two more, the second begun
        once the last reload was in place.  (A fixed pause between reloads let a slow
        machine's client deliver nothing in between, and the test proved nothing.)"""
        since = len(ok)
        wait_until(lambda: len(ok) >= since + 2 or failures or not thread.is_alive(), 20, 0.01,
                   "two messages delivered since the last reload")

    try:
        for _ in range(5):
            delivering()
            hup(d)
        delivering()
    finally:
        done.set()
        thread.join(40)
    assert not thread.is_alive()
    assert failures == [], f"{failures}; server log: {unusual_lines(d)}"
    assert len(ok) > 5
    assert len(d.new_messages()) == len(ok)
    assert request_stats(d)["config_generation"] == 6
    assert "Traceback" not in d.log_text()
    assert_no_zombies(d)


def test_hundred_reloads_leak_no_fds_and_no_children(daemon_factory):
    d = daemon_factory(workers=2)
    master = psutil.Process(d.pid)

    def settled() -> int:
        """The master's fd count once exactly two live workers remain, else 0."""
        try:
            kids = master.children()
            titles = [" ".join(k.cmdline()) for k in kids]  # a zombie's is empty
        except psutil.NoSuchProcess:
            return 0
        ready = len(kids) == 2 and all("forksmtp: worker" in t for t in titles)
        return master.num_fds() if ready else 0

    for _ in range(3):  # warm-up: anything opened once and kept is counted before
        hup(d)
    fds = wait_until(settled, 15, 0.1, "pool settled")
    for _ in range(100):
        hup(d)
    # 200 workers started and retired: on a loaded 2-core machine that takes a while.
    fds_after = wait_until(settled, 60, 0.1, "pool settled after 100 reloads")
    assert fds_after <= fds
    assert len(master.children()) == 2
    assert request_stats(d)["config_generation"] == 104
    send_message(d.port)
    assert "Traceback" not in d.log_text()
    assert_no_zombies(d)


# -- SIGTERM / SIGINT / SIGQUIT ------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_lets_open_session_finish(daemon_factory, sig):
    d = daemon_factory(workers=2)
    pids = wait_until(lambda: len(p := worker_pids(d)) == 2 and p, 10, what="2 workers")
    client = open_transaction(d.port)
    d.signal(sig)
    d.wait_for_log("[STOP] graceful stop")
    wait_until(lambda: connection_refused(d.port), 10, 0.1, "listeners closed")

    code, _ = client.data(BODY)
    assert code == 250
    client.quit()
    assert d.proc.wait(15) == 0
    assert len(d.new_messages()) == 1
    assert all(gone(pid) for pid in pids)


def test_a_graceful_stop_refuses_new_clients_though_a_worker_still_holds_the_socket(daemon_factory):
    """README: at a stop new clients are refused, not queued.  The master only closed its
    listening sockets, which go on listening while any worker holds them: with one
    worker slow to let go (stopped here; a long fsync does the same) a client connected,
    had no greeting, and was reset when that worker was killed, graceful_timeout + 3 s
    later."""
    d = daemon_factory(workers=2, server={"graceful_timeout": 5})
    pids = wait_until(lambda: len(p := worker_pids(d)) == 2 and p, 10, what="2 workers")
    stopped = min(pids)
    wait_until(lambda: all("worker idle" in " ".join(psutil.Process(p).cmdline()) for p in pids),
               10, 0.05, "both workers idle")
    os.kill(stopped, signal.SIGSTOP)
    try:
        d.signal(signal.SIGTERM)
        d.wait_for_log("[STOP] graceful stop")
        wait_until(lambda: gone(max(pids)), 10, 0.05, "the other worker gone")
        assert connection_refused(d.port), "a new client was let into a queue nobody serves"
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert d.proc.wait(15) == 0


def test_hup_during_a_graceful_stop_is_ignored(daemon_factory):
    """A HUP (logrotate) in the middle of a stop must not listen again or start workers:
    the stop goes on and ends with the last session, not at graceful_timeout."""
    d = daemon_factory(workers=2, server={"graceful_timeout": 60})
    client = open_transaction(d.port)
    d.signal(signal.SIGTERM)
    d.wait_for_log("[STOP] graceful stop")
    d.signal(signal.SIGHUP)
    d.wait_for_log("reload ignored")
    wait_until(lambda: connection_refused(d.port), 10, 0.1, "listeners closed")
    assert reloads(d) == 0
    code, _ = client.data(BODY)
    assert code == 250
    client.quit()
    assert d.proc.wait(15) == 0
    assert len(d.new_messages()) == 1


def test_graceful_timeout_ends_idle_session(daemon_factory):
    d = daemon_factory(workers=2, server={"graceful_timeout": 1})
    sock = open_idle_session(d.port)
    d.signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    sock.settimeout(5)
    assert shut_down(sock)
    sock.close()


def test_quit_stops_at_once(daemon_factory):
    d = daemon_factory(workers=2, server={"graceful_timeout": 60})
    pids = wait_until(lambda: len(p := worker_pids(d)) == 2 and p, 10, what="2 workers")
    sock = open_idle_session(d.port)
    d.signal(signal.SIGQUIT)
    # Far below graceful_timeout: the session is not waited for.  A stop is a clean exit.
    assert d.proc.wait(15) == 0
    sock.settimeout(5)
    assert shut_down(sock)
    sock.close()
    assert all(gone(pid) for pid in pids)


@pytest.mark.skipif("poll" not in SYSCALL_NR, reason="needs poll's system call number (x86_64, aarch64)")
def test_quit_does_not_wait_for_a_client_that_never_reads(daemon_factory):
    """Its replies fill both socket buffers; the 421 of the stop then cannot go out.
    The worker gives up on it after a second and exits, instead of waiting for the
    command timeout until the master's SIGKILL."""
    d = daemon_factory(workers=1, server={"graceful_timeout": 60},
                       sections={"limits": {"max_junk_commands": 10**6}})  # NOOPs to fill buffers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills at once
    sock.settimeout(10)
    sock.connect(("127.0.0.1", d.port))
    try:
        assert read_reply(sock).startswith(b"220")
        sock.setblocking(False)
        deadline = time.monotonic() + 10
        stalled = 0.0
        while stalled < 1.0 and time.monotonic() < deadline:  # until the server stops taking more
            try:
                sock.send(b"NOOP\r\n" * 4000)
                stalled = 0.0
            except BlockingIOError:
                stalled += 0.05
                time.sleep(0.05)
        assert stalled >= 1.0, "the server kept reading"
        # Not a worker that was only slow for that second: one asleep waiting to send,
        # its replies unsent and the client's commands unread.
        worker = serving_worker(d, sock)
        wait_until(lambda: (end := server_end(sock)) and end.unsent and end.unread
                   and in_any_syscall(worker, "poll"), 10, 0.01, "the worker waiting to send")
        d.signal(signal.SIGQUIT)
        assert d.proc.wait(15) == 0
        # The worker left on its own, before the master's SIGKILL (3 s after SIGQUIT).
        assert "SIGKILL" not in d.log_text()
    finally:
        sock.close()


def test_second_term_stops_at_once(daemon_factory):
    d = daemon_factory(workers=2, server={"graceful_timeout": 60})
    client = open_transaction(d.port)
    d.signal(signal.SIGTERM)
    d.wait_for_log("[STOP] graceful stop")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    code, text = client.getreply()  # sent as the worker stopped, before any command
    assert code == 421 and text.startswith(b"4.3.2 Service shutting down")
    client.close()
    assert d.new_messages() == []


# -- SIGTTIN / SIGTTOU ---------------------------------------------------------------------

def test_ttou_never_takes_the_pool_below_one_worker(daemon_factory):
    d = daemon_factory(workers=1)
    for n in (1, 2):  # one at a time: the kernel merges a signal sent while one is pending
        d.signal(signal.SIGTTOU)
        d.wait_for_log("SIGTTOU: 1 workers; the pool keeps at least one", count=n)
    send_message(d.port)
    assert len(worker_pids(d)) >= 1
    assert request_stats(d)["messages_accepted"] == 1


def test_ttin_adds_and_ttou_removes_a_worker(daemon_factory):
    d = daemon_factory(workers=2)
    wait_until(lambda: len(worker_pids(d)) == 2, 10, what="2 workers")
    d.signal(signal.SIGTTIN)
    wait_until(lambda: len(worker_pids(d)) == 3, 10, what="3 workers after SIGTTIN")
    d.signal(signal.SIGTTIN)
    wait_until(lambda: len(worker_pids(d)) == 4, 10, what="4 workers after SIGTTIN")
    d.signal(signal.SIGTTOU)
    wait_until(lambda: len(worker_pids(d)) == 3, 10, what="3 workers after SIGTTOU")
    d.signal(signal.SIGTTOU)
    wait_until(lambda: len(worker_pids(d)) == 2, 10, what="2 workers after SIGTTOU")
    send_message(d.port)
    assert_no_zombies(d)


def test_ttin_adds_a_worker_while_spares_hold_the_pool_above_its_minimum(daemon_factory):
    """One worker more than run now: raising the minimum alone (1 to 2) would start
    nothing while min_spare_workers keeps three."""
    # max_spare_workers = 3 and max_idle = 1: a fourth idle worker is a surplus spare,
    # which the pool would retire a second after it became idle, were it not one of the
    # pool's minimum now.
    d = daemon_factory(workers=1, server={"min_spare_workers": 3, "max_spare_workers": 3, "max_idle": 1,
                                          "max_workers": 8})
    wait_until(lambda: len(worker_pids(d)) == 3, 10, what="3 workers")
    d.signal(signal.SIGTTIN)
    d.wait_for_log("SIGTTIN: 3 workers; one more; pool minimum is now 4")
    wait_until(lambda: worker_states(request_stats(d)) == ["idle"] * 4, 10, 0.1,
               "4 idle workers after SIGTTIN")
    time.sleep(1.5)  # every one of them idle for longer than max_idle
    # Turns of the pool since: a retirement would show as a worker stopping, or gone.
    for _ in range(2):
        assert worker_states(after_a_turn(d)) == ["idle"] * 4
    assert len(worker_pids(d)) == 4


@pytest.mark.parametrize("first, second", [(signal.SIGTTOU, signal.SIGTTIN),
                                           (signal.SIGTTIN, signal.SIGTTOU)])
def test_a_ttin_and_a_ttou_sent_together_cancel_out(daemon_factory, first, second):
    """Sent back to back, the master mostly handles both in one turn, before the SIGTTIN's
    worker has started or the SIGTTOU's has gone: the pool must end where it began."""
    d = daemon_factory(workers=3, server={"max_workers": 8})
    wait_until(lambda: len(worker_pids(d)) == 3, 10, what="3 workers")
    for n in range(1, 4):
        os.kill(d.pid, first)
        os.kill(d.pid, second)
        d.wait_for_log("SIGTTIN: ", count=n)
        d.wait_for_log("SIGTTOU: ", count=n)
        # A turn of the pool after both: whatever they started or retired has been
        # decided.  Then the pool settles: a worker retired (shown stopping until it has
        # exited) and one started in its place (shown starting) are a pair handled in two
        # turns, which ends where it began too; three idle workers, and no other process.
        after_a_turn(d)
        wait_until(lambda: worker_states(request_stats(d)) == ["idle"] * 3, 10, 0.1,
                   f"3 idle workers after pair {n}")
        assert len(worker_pids(d)) == 3
    assert "max_workers ceiling" not in d.log_text()


def test_ttou_beside_a_session_retires_the_busy_worker_once_its_session_ends(daemon_factory):
    """One session and one spare: retiring the spare would only make the pool start
    another; the busy worker goes instead, after its session, which is not cut."""
    d = daemon_factory(workers=2)
    wait_until(lambda: len(worker_pids(d)) == 2, 10, what="2 workers")
    client = open_transaction(d.port)
    busy = wait_until(lambda: [w["pid"] for w in request_stats(d)["workers"]
                               if w["state"] == "busy"], 10, 0.1, "a busy worker")
    d.signal(signal.SIGTTOU)
    d.wait_for_log("SIGTTOU: 2 workers; retiring one; pool minimum is now 1")
    assert client.data(b"Subject: t\r\n\r\nstill served\r\n")[0] == 250
    client.quit()
    wait_until(lambda: gone(busy[0]), 10, what="the busy worker gone after its session")
    # A turn of the pool after its exit (reaped at the start of the turn): no worker
    # started in its place, neither in the scoreboard nor as a process.
    assert worker_states(after_a_turn(d)) == ["idle"]
    assert len(worker_pids(d)) == 1
    assert len(d.new_messages()) == 1
    send_message(d.port)


def test_the_masters_pass_over_the_maildirs_makes_a_removed_cur_again(daemon_factory):
    """Delivery never looks at cur/ (readers use it): the master's pass over the Maildirs,
    hourly and after a worker's crash, makes it again."""
    d = daemon_factory(workers=1, server={"min_spare_workers": 0})  # one worker, no spare
    send_message(d.port)  # the worker has the Maildir open now
    (d.maildir / "cur").rmdir()
    send_message(d.port)  # delivery never looks at cur/ (the master's first pass may)
    os.kill(next(iter(worker_pids(d))), signal.SIGKILL)  # a crash: the pass runs at once
    wait_until(lambda: (d.maildir / "cur").is_dir(), 10, what="cur/ made again")
    assert stat.S_IMODE((d.maildir / "cur").stat().st_mode) == 0o700
    d.wait_for_log(f"[STORE] made again, found missing: {d.maildir / 'cur'}")


# -- a worker killed -----------------------------------------------------------------------

def test_killed_worker_is_replaced_and_its_session_count_repaired(daemon_factory):
    d = daemon_factory(workers=2)
    client = smtplib.SMTP("127.0.0.1", d.port, timeout=10)
    client.ehlo("client.example")
    busy = wait_until(lambda: [w["pid"] for w in request_stats(d)["workers"] if w["state"] == "busy"],
                      10, 0.1, "a busy worker")
    assert len(busy) == 1
    assert request_stats(d)["connections_active"] == 1
    victim = busy[0]

    os.kill(victim, signal.SIGKILL)
    with pytest.raises(OSError):
        client.noop()
    client.close()
    wait_until(lambda: victim not in worker_pids(d) and len(worker_pids(d)) >= 2, 10,
               what="worker replaced")
    assert gone(victim)
    wait_until(lambda: request_stats(d)["connections_active"] == 0, 10, 0.1, "count repaired")
    assert "killed by SIGKILL" in d.log_text()

    for _ in range(3):
        send_message(d.port)
    assert len(d.new_messages()) == 3
    assert_no_zombies(d)


def test_a_worker_killed_by_a_real_time_signal_is_logged_and_replaced(daemon_factory):
    """wait(2) reports signals the signal module has no name for; the master names them
    and carries on rather than die of the number."""
    d = daemon_factory(workers=2)
    victim = min(worker_pids(d))
    os.kill(victim, signal.SIGRTMIN + 6)
    wait_until(lambda: victim not in worker_pids(d) and len(worker_pids(d)) >= 2, 10,
               what="worker replaced")
    assert d.proc.poll() is None
    assert f"worker {victim} killed by SIGRTMIN+6" in d.log_text()
    send_message(d.port)
    assert len(d.new_messages()) == 1
    assert_no_zombies(d)


def test_workers_start_after_a_tmp_cleaner_removed_the_scoreboard_lock_dir(
        daemon_factory, tmp_path, monkeypatch):
    """systemd-tmpfiles ages /tmp (a service's PrivateTmp included): the lock directory
    of a master up for days goes, and the workers of the next reload must still start."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    d = daemon_factory(workers=2)
    [lock_dir] = list(tmpdir.glob("forksmtp-scoreboard-*"))
    shutil.rmtree(lock_dir)
    old = set(worker_pids(d))
    d.signal(signal.SIGHUP)
    wait_until(lambda: workers_replacing(d, old, 2), 15, what="a new generation of workers")
    for _ in range(3):
        send_message(d.port)
    assert len(d.new_messages()) == 3
    assert "exited with status" not in d.log_text() and "Traceback" not in d.log_text()


def test_workers_are_the_oom_killers_choice_before_the_master(daemon_factory):
    """The master's RSS is above a worker's: without the bonus the kernel picks it first
    under memory pressure, and every session ends with it."""
    d = daemon_factory(workers=2)

    def adj(pid: int) -> int:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())

    master = adj(d.pid)
    expected = [min(1000, master + 200)] * 2

    def workers_adj() -> list[int]:
        return [adj(pid) for pid in sorted(worker_pids(d))]

    # [READY] follows the forks, not each child's first steps: a worker that has not yet
    # run them still shows the value it inherited.
    assert poll_for(workers_adj, expected) == expected


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(not os.access(PIDS_CGROUP, os.W_OK), reason="needs a writable cgroup v1 pids hierarchy")
def test_a_reload_that_cannot_fork_keeps_the_old_workers_serving(daemon_factory, tmp_path):
    """The new generation cannot be forked (a pids cgroup at its limit: EAGAIN).  The
    old workers were retired first, so no worker was left and every client got the
    master's 421 until the back-off ended; now they serve until a new one starts."""
    d = daemon_factory(workers=2)
    group = PIDS_CGROUP / f"forksmtp-test-{os.getpid()}-{d.port}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(d.pid))  # the master: its forks land here
        (group / "pids.max").write_text("1")
        old = set(worker_pids(d))
        d.signal(signal.SIGHUP)
        d.wait_for_log("cannot fork a worker")
        for _ in range(5):
            send_message(d.port)  # an old worker takes each, with the old configuration
        assert set(worker_pids(d)) == old
        (group / "pids.max").write_text("100")
        wait_until(lambda: workers_replacing(d, old), 20, 0.1, "the new generation in place of the old")
        send_message(d.port)
        assert len(d.new_messages()) == 6
    finally:
        (PIDS_CGROUP / "cgroup.procs").write_text(str(d.pid))
        for pid in worker_pids(d):
            with contextlib.suppress(OSError):
                (PIDS_CGROUP / "cgroup.procs").write_text(str(pid))
        group.rmdir()
