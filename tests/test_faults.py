"""Real faults against a running daemon: nothing acknowledged is lost, nothing half-written
ever shows up in new/, and the server keeps serving.

Every fault is produced for real: a worker or the master is SIGKILLed, a tiny tmpfs fills
up, a Maildir directory loses its write permission or disappears.  No mocks.

The named-file (``O_EXCL``) fallback of maildir.py is not forced here: every filesystem
this machine can mount without extra tools (ext4, tmpfs, ramfs, overlay) supports
``O_TMPFILE``.  What that fallback would leave behind after a crash (``tmp/`` files named
after a dead pid, or old ones) is created by hand instead, and start-up must sweep it.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from daemon import (Ledger, RawSMTP, assert_nothing_left_in_tmp, connection_refused, free_port,
                    ledger_client, ledger_message, line_pid, open_tmp_files, run_clients, send_message,
                    request_stats, serving_worker, wait_until, worker_pids, write_config)
from forksmtp.maildir import escape_host
from helpers import LOOP_TOOLS, cannot_loop_mount, loop_ext4, run_tool

EHLO = b"EHLO client.example"


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_no_crash(d) -> None:
    log = d.log_text()
    for needle in ("Traceback", "crashed", "crash loop"):
        assert needle not in log, log[-3000:]


def deliver_one(port: int, msg_id: str, size: int = 300) -> tuple[int, bytes]:
    client = RawSMTP(port)
    try:
        assert client.command(EHLO) == 250
        return client.deliver(ledger_message(msg_id, size))
    finally:
        client.close()


def reply_after_kill(client: RawSMTP, rest: bytes):
    """What the client gets when it finishes a message whose worker was killed."""
    try:
        client.sock.sendall(rest + b".\r\n")
        return client.reply()
    except socket.timeout:
        return "no answer and no close: the connection hangs"
    except OSError:  # SMTPClosed, reset, broken pipe: the connection is gone
        return None


# -- a worker killed in the middle of DATA ------------------------------------------------

def test_worker_killed_mid_data_stores_nothing_and_leaves_no_tmp_file(daemon_factory):
    """Killed with part of the message in its unnamed tmp/ file: nothing reaches new/, and
    no process is left holding that file (its space freed with the worker)."""
    d = daemon_factory(workers=2)
    client = RawSMTP(d.port)
    assert client.command(EHLO) == 250
    assert client.start_data()[0] == 354
    wire = ledger_message("killed-1", 2_000_000)
    half = len(wire) // 2
    client.sock.sendall(wire[:half])
    worker = serving_worker(d, client.sock)
    # Kill it only once part of the message is really in a tmp/ file.
    wait_until(lambda: any(open_tmp_files(worker, d.maildir)), 10, what="message data in tmp/")
    worker.send_signal(signal.SIGKILL)
    wait_until(lambda: dead(worker.pid), 10, what="the killed worker gone")

    assert reply_after_kill(client, wire[half:]) is None  # above all: never a 250
    client.close()
    d.wait_for_log(f"worker {worker.pid} killed by SIGKILL")
    assert listing(d.maildir / "new") == []
    assert_nothing_left_in_tmp(d, d.maildir)
    # The master replaced the worker, and the next message goes through.
    assert deliver_one(d.port, "after-kill")[0] == 250
    assert len(listing(d.maildir / "new")) == 1
    assert_nothing_left_in_tmp(d, d.maildir)


def test_start_up_and_reload_sweep_orphaned_tmp_files(daemon_factory, tmp_path):
    """What a crash leaves in tmp/ with named tmp files: files of dead pids of this host go
    at once, anything untouched for 36 hours goes, the rest stays."""
    md = tmp_path / "md"
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True)
    host = escape_host(socket.gethostname())
    reaped = subprocess.Popen(["true"])
    reaped.wait()
    now = int(time.time())
    files = {
        "dead_pid": f"{now}.M1P{reaped.pid}Q1.{host}",
        "old": f"{now - 40 * 3600}.M2P{os.getpid()}Q2.{host}",
        "live_pid": f"{now}.M3P{os.getpid()}Q3.{host}",
        "other_host": f"{now}.M4P{reaped.pid}Q4.elsewhere.example",
    }
    for name in files.values():
        (md / "tmp" / name).write_bytes(b"Subject: half a message\n")
    old = time.time() - 37 * 3600
    os.utime(md / "tmp" / files["old"], (old, old))
    (md / "new" / "1.M1P1Q1.delivered,S=3").write_bytes(b"ok\n")
    assert not psutil.pid_exists(reaped.pid)

    d = daemon_factory(sections={"delivery": {"maildir": str(md)}})
    d.wait_for_log("removed 2 stale file(s)")
    assert listing(md / "tmp") == sorted([files["live_pid"], files["other_host"]])
    assert listing(md / "new") == ["1.M1P1Q1.delivered,S=3"]

    # A reload sweeps again (the master also sweeps periodically).
    late = f"{now}.M5P{reaped.pid}Q5.{host}"
    (md / "tmp" / late).write_bytes(b"x")
    d.signal(signal.SIGHUP)
    wait_until(lambda: late not in listing(md / "tmp"), 10, what="the reload's sweep")
    assert files["live_pid"] in listing(md / "tmp")


# -- disk full -------------------------------------------------------------------------------

def mounted(mnt: Path, fstype: str, options: str):
    """A ``fstype`` file system mounted on ``mnt`` (made here) with ``options``, then
    unmounted; skips where it cannot be mounted."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {fstype} needs root")
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {fstype}: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs with 512 inodes, unmounted after the test (request it before daemon_factory, so the
    daemon is stopped first)."""
    yield from mounted(tmp_path / "small", "tmpfs", "size=2m,nr_inodes=512,mode=0755")


def fill(path: Path) -> None:
    """Write until the filesystem is full, down to the last page."""
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            for _ in range(1 << 16):  # bounded: 2 MiB is full long before
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break


def full_disk_daemon(small_tmpfs, daemon_factory):
    md = small_tmpfs / "Maildir"
    d = daemon_factory(sections={"delivery": {"maildir": str(md)},
                                 "limits": {"max_message_size": 4_000_000}})
    assert deliver_one(d.port, "before-full")[0] == 250
    filler = small_tmpfs / "filler"
    fill(filler)
    return d, md, filler


def refused_whole_then_deferred_at_rcpt(client: smtplib.SMTP, rcpts: list[str], times: int) -> None:
    """The first message for ``rcpts``, the last of whose Maildir is broken, is refused
    as a whole (learnt at DATA); the next ``times`` are stored for the others, the last
    recipient deferred at RCPT."""
    with pytest.raises(smtplib.SMTPDataError) as first:
        client.sendmail("s@client.example", rcpts, b"Subject: first\r\n\r\nhi\r\n")
    assert first.value.smtp_code == 451
    client.rset()
    for n in range(times):
        refused = client.sendmail("s@client.example", rcpts, f"Subject: n{n}\r\n\r\nhi\r\n".encode())
        assert refused == {rcpts[-1]: (451, b"4.3.0 Mailbox temporarily unavailable, try again later")}


def use_up_inodes(directory: Path) -> None:
    """Create empty files until the filesystem has no inode left."""
    for i in range(100_000):  # bounded: the small tmpfs has 512
        try:
            (directory / f"inode-{i}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return
    raise AssertionError("the filesystem never ran out of inodes")


def test_a_maildir_a_reload_dropped_is_swept_after_a_crash_of_the_generation_before(daemon_factory, tmp_path):
    """A worker of the generation before a reload may still be writing into a Maildir the
    reload dropped; if it dies there, the named tmp/ file of the fallback it leaves must go
    as it would in any configured Maildir.  Only the new config's Maildirs were swept, so
    it stayed for good."""
    old_md, new_md = tmp_path / "old", tmp_path / "new"
    d = daemon_factory(workers=1, sections={"delivery": {"maildir": str(old_md)}})
    held = RawSMTP(d.port)
    try:
        assert held.command(EHLO) == 250
        worker = serving_worker(d, held.sock)
        d.sections["delivery"]["maildir"] = str(new_md)
        d.write_config()
        d.signal(signal.SIGHUP)
        d.wait_for_log("configuration generation 2 loaded")
        assert psutil.pid_exists(worker.pid)  # still in its session, draining
        # What the worker's named-file fallback would leave if it died mid-message.
        left = old_md / "tmp" / f"{int(time.time())}.M1P{worker.pid}Q1.{escape_host(socket.gethostname())}"
        left.write_bytes(b"Subject: half a message\n")
        worker.send_signal(signal.SIGKILL)
        d.wait_for_log(f"worker {worker.pid} killed by SIGKILL")
        wait_until(lambda: not left.exists(), 10, 0.05, "the dropped Maildir's tmp/ swept")
    finally:
        held.close()
    assert deliver_one(d.port, "after the drain")[0] == 250
    assert len(listing(new_md / "new")) == 1 and listing(old_md / "new") == []
    assert_no_crash(d)


def test_a_reload_whose_catch_all_cannot_be_made_lets_go_of_all_it_took(small_tmpfs, daemon_factory, tmp_path):
    """The Maildirs are a reload's last step: when the new catch-all cannot be made (no
    inode left, which the config's check cannot see), the pidfile and the address the
    reload took are let go again, and no mailbox's Maildir was made before it (the
    catch-all goes first)."""
    d = daemon_factory(workers=1)
    filler = small_tmpfs / "filler"
    filler.mkdir()
    use_up_inodes(filler)
    pidfile, new_box, port = tmp_path / "new.pid", tmp_path / "new-box", free_port()
    d.sections["delivery"]["maildir"] = str(small_tmpfs / "Maildir")
    d.sections["mailboxes"] = {"box@example.test": str(new_box)}
    d.sections["server"].update(pidfile=str(pidfile), listen=[f"127.0.0.1:{d.port}", f"127.0.0.1:{port}"])
    d.write_config()
    d.signal(signal.SIGHUP)
    text = d.wait_for_log("reload failed", 10)
    (line,) = [line for line in text.splitlines() if "reload failed" in line]
    assert 'delivery.maildir = "' in line  # the value may be shown cut short
    assert line.endswith(f'cannot make the Maildir: {small_tmpfs / "Maildir"}: No space left on device'), line
    assert not pidfile.exists() and not new_box.exists()
    assert connection_refused(port)
    assert request_stats(d)["config_generation"] == 1
    assert deliver_one(d.port, "after the failed reload")[0] == 250


def assert_error_logged_in_order(d, mark: int, what: str, reply: str) -> None:
    """The session as logged reads in order: the DATA command, the storage error, the
    reply that reports it.  (Written after ``mark``; a session is one pid's lines.)"""
    def session_lines():
        lines = d.log_text()[mark:].splitlines()
        pid = next((line_pid(line) for line in lines if f"[ERROR] {what}" in line), None)
        mine = [line for line in lines if pid is not None and line_pid(line) == pid]
        return mine if any("[CLOSE]" in line for line in mine) else None
    lines = wait_until(session_lines, 10, 0.05, "the failed session logged")
    at = {key: next((i for i, line in enumerate(lines) if key in line), None)
          for key in ("[SMTP] DATA", f"[ERROR] {what}", f"[SMTP] {reply}")}
    assert None not in at.values() and at["[SMTP] DATA"] < at[f"[ERROR] {what}"] < at[f"[SMTP] {reply}"], lines


@pytest.mark.parametrize("size", [300, 100_000, 1_000_000], ids=["small", "100k", "1M"])
def test_disk_full_452_then_recovers_without_restart(small_tmpfs, daemon_factory, size):
    """ENOSPC at the commit (a message within the write buffer) or while DATA is still
    arriving (1 MB: the buffer is flushed mid-message): 452 4.3.1 after the final dot."""
    d, md, filler = full_disk_daemon(small_tmpfs, daemon_factory)
    pids = {w.pid for w in d.workers()}
    mark = len(d.log_text())
    free = os.statvfs(md).f_bfree
    code, text = deliver_one(d.port, "while-full", size)
    assert code == 452 and b"4.3.1" in text, text
    assert_error_logged_in_order(d, mark, f"delivery failed in {md}: ", "452 4.3.1")
    assert len(listing(md / "new")) == 1  # only the message from before
    assert_nothing_left_in_tmp(d, md)
    assert os.statvfs(md).f_bfree == free  # what the failed copy took is free again

    filler.unlink()
    assert deliver_one(d.port, "after-full", size)[0] == 250
    assert len(listing(md / "new")) == 2
    assert pids <= {w.pid for w in d.workers()}  # no worker died (a spare may join)
    assert_no_crash(d)


def test_a_declared_size_the_disk_cannot_take_gets_452_before_the_text(small_tmpfs, daemon_factory):
    """MAIL FROM SIZE=3000000 on a 2 MiB file system: 452 4.3.1 in answer to DATA, so the
    client sends no 3 MB that could only be refused after the final dot (RFC 1870 6.1:
    452 when the size cannot be accommodated now).  A SIZE that fits goes on; the log
    names the Maildir and the shortfall."""
    md = small_tmpfs / "Maildir"
    d = daemon_factory(sections={"delivery": {"maildir": str(md)},
                                 "limits": {"max_message_size": 4_000_000}})
    mark = len(d.log_text())
    client = RawSMTP(d.port)
    try:
        assert client.command(EHLO) == 250
        client.sock.sendall(b"MAIL FROM:<a@client.example> SIZE=3000000\r\nRCPT TO:<b@mx.test.example>\r\n"
                            b"DATA\r\n")
        assert [client.reply()[0] for _ in range(2)] == [250, 250]
        code, text = client.reply()
        assert code == 452 and b"4.3.1" in text, text
        assert client.command(b"RSET") == 250
        client.sock.sendall(b"MAIL FROM:<a@client.example> SIZE=1000\r\nRCPT TO:<b@mx.test.example>\r\n"
                            b"DATA\r\n")
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
        client.sock.sendall(b"Subject: fits\r\n\r\nsmall\r\n.\r\n")
        assert client.reply()[0] == 250
    finally:
        client.close()
    assert_error_logged_in_order(d, mark, f"no room for the message in {md}: ", "452 4.3.1")
    assert "(SIZE)" in d.log_text()[mark:]
    assert len(listing(md / "new")) == 1
    assert_nothing_left_in_tmp(d, md)


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs, which reports no size at all (statvfs: every count 0), unmounted after
    the test (request it before daemon_factory, so the daemon is stopped first)."""
    yield from mounted(tmp_path / "ram", "ramfs", "mode=0755")


def test_a_file_system_that_reports_no_size_is_not_taken_for_full(ramfs, daemon_factory):
    """A ramfs (or a FUSE file system without statfs) says 0 blocks in all, 0 free: it
    cannot tell.  A declared SIZE was refused there with 452 4.3.1 every time (the mail
    of Postfix and Exim, which always declare it, deferred until it bounced); and a
    mailbox there deferred once stayed deferred after it was mended."""
    assert os.statvfs(ramfs).f_blocks == 0  # the premise
    catch, bob = ramfs / "Maildir", ramfs / "bob"
    d = daemon_factory(workers=1, sections={"delivery": {"maildir": str(catch)},
                                            "mailboxes": {"bob@example.test": str(bob)}})
    rcpts = ["carol@example.test", "bob@example.test"]
    with smtplib.SMTP(d.host, d.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.does_esmtp and "size" in client.esmtp_features
        # smtplib declares SIZE where the server offers it, as Postfix and Exim do
        assert client.sendmail("s@client.example", rcpts, b"Subject: sized\r\n\r\nhi\r\n") == {}
        os.rename(bob / "new", bob / "new.away")
        (bob / "new").write_text("in the way")
        refused_whole_then_deferred_at_rcpt(client, rcpts, 1)
        (bob / "new").unlink()
        os.rename(bob / "new.away", bob / "new")  # mended
        assert client.sendmail("s@client.example", rcpts, b"Subject: mended\r\n\r\nhi\r\n") == {}
    assert len(listing(catch / "new")) == 3 and len(listing(bob / "new")) == 2
    assert_no_crash(d)


def test_a_mailbox_on_a_file_system_in_need_of_fsck_is_deferred_at_rcpt(tmp_path, daemon_factory):
    """A Maildir whose new/ the file system can no longer read (its inode cleared, as a
    crash or a bad disk leaves it: "Structure needs cleaning", EUCLEAN): once it has
    failed, its recipients get 451 at RCPT and the others of the same message get it.
    Only errors on a fixed list deferred a Maildir before, EUCLEAN not among them, so
    every message that named it was refused as a whole, for good."""
    reason = cannot_loop_mount((*LOOP_TOOLS, "debugfs"))
    if reason:
        pytest.skip(reason)
    with loop_ext4(tmp_path) as (mnt, _, loop):
        (mnt / "Maildir").mkdir()
        for sub in ("tmp", "new", "cur"):
            (mnt / "Maildir" / sub).mkdir()
        run_tool("umount", str(mnt))
        run_tool("debugfs", "-w", "-R", "clri Maildir/new", loop)
        run_tool("mount", "-o", "errors=continue", loop, str(mnt))
        with pytest.raises(OSError) as broken:
            os.lstat(mnt / "Maildir" / "new")
        assert broken.value.errno == errno.EUCLEAN  # the premise
        catch = tmp_path / "catch"
        d = daemon_factory(workers=1, sections={"delivery": {"maildir": str(catch)},
                                                "mailboxes": {"bob@example.test": str(mnt / "Maildir")}})
        rcpts = ["carol@example.test", "bob@example.test"]
        try:
            with smtplib.SMTP(d.host, d.port, timeout=10) as client:
                refused_whole_then_deferred_at_rcpt(client, rcpts, 3)
            assert len(listing(catch / "new")) == 3
            assert "Structure needs cleaning" in d.log_text()
            assert_no_crash(d)
        finally:
            d.stop()  # before the file system goes


def test_the_declared_size_is_checked_for_all_the_copies_a_file_system_takes(small_tmpfs, daemon_factory):
    """Three recipients whose Maildirs share one 2 MiB file system: SIZE=500000 fits
    one copy (with its margin, 750 kB) but not three (2.25 MB), which the check adds up
    per file system, not per copy."""
    boxes = {f"{name}@mx.test.example": str(small_tmpfs / name) for name in ("alice", "bob")}
    d = daemon_factory(sections={"delivery": {"maildir": str(small_tmpfs / "all")}, "mailboxes": boxes,
                                 "limits": {"max_message_size": 4_000_000}})
    for rcpts, expected in (([b"alice"], 354), ([b"alice", b"bob", b"carol"], 452)):
        client = RawSMTP(d.port)
        try:
            assert client.command(EHLO) == 250
            assert client.command(b"MAIL FROM:<a@client.example> SIZE=500000") == 250
            for rcpt in rcpts:
                assert client.command(b"RCPT TO:<%s@mx.test.example>" % rcpt) == 250
            client.sock.sendall(b"DATA\r\n")
            code, text = client.reply()
            assert code == expected, (rcpts, text)
        finally:
            client.close()
    d.wait_for_log("octets free for 3 copies of a message of 500000 (SIZE)")  # at the session's end


def test_out_of_inodes_452_at_data_then_recovers(small_tmpfs, daemon_factory):
    """Every message needs an inode, even an unnamed O_TMPFILE one: none left gets 452
    4.3.1 in answer to DATA, before the client sends the message."""
    md = small_tmpfs / "Maildir"
    d = daemon_factory(sections={"delivery": {"maildir": str(md)}})
    assert deliver_one(d.port, "before-inodes")[0] == 250
    fillers = small_tmpfs / "inodes"
    fillers.mkdir()
    for n in range(2000):  # bounded: the tmpfs has 512 inodes
        try:
            (fillers / str(n)).touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
    else:
        pytest.fail("the tmpfs never ran out of inodes")
    pids = {w.pid for w in d.workers()}
    mark = len(d.log_text())
    client = RawSMTP(d.port)
    try:
        assert client.command(EHLO) == 250
        code, text = client.start_data()
        assert code == 452 and b"4.3.1" in text, text
        assert client.command(b"RSET") == 250  # the session goes on
        client.command(b"QUIT")
    finally:
        client.close()
    assert_error_logged_in_order(d, mark, f"cannot open Maildir file in {md}: ", "452 4.3.1")
    client = RawSMTP(d.port)
    try:
        assert client.command(EHLO) == 250
        shutil.rmtree(fillers)
        assert client.deliver(ledger_message("after-inodes"))[0] == 250
    finally:
        client.close()
    assert len(listing(md / "new")) == 2
    assert_nothing_left_in_tmp(d, md)
    assert pids <= {w.pid for w in d.workers()}
    assert_no_crash(d)


# -- the Maildir unwritable or removed -----------------------------------------------------

@pytest.fixture
def nobody_dir():
    """A directory that user nobody can traverse (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("running workers as another user needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="forksmtp-faults-"))
    base.chmod(0o755)
    try:
        yield base, nobody
    finally:
        shutil.rmtree(base, ignore_errors=True)


def storage_failure(d, md: Path, code: int, text: bytes, pids: set[int]) -> None:
    assert code == 451 and b"4.3.0" in text, text
    assert listing(md / "new") == []
    assert pids <= {w.pid for w in d.workers()}  # no worker died (a spare may join)
    assert_no_crash(d)


@pytest.mark.parametrize("subdir", ["tmp", "new"])
def test_unwritable_maildir_451_then_recovers(nobody_dir, daemon_factory, subdir):
    base, nobody = nobody_dir
    md = base / "Maildir"
    d = daemon_factory(server={"user": "nobody"}, sections={"delivery": {"maildir": str(md)}})
    assert (md / "new").stat().st_uid == nobody.pw_uid  # the master handed it over
    pids = {w.pid for w in d.workers()}
    (md / subdir).chmod(0o500)
    try:
        code, text = deliver_one(d.port, f"unwritable-{subdir}")
    finally:
        (md / subdir).chmod(0o700)
    storage_failure(d, md, code, text, pids)
    assert_nothing_left_in_tmp(d, md)
    assert deliver_one(d.port, f"writable-{subdir}")[0] == 250
    assert len(listing(md / "new")) == 1


def test_a_broken_mailbox_is_deferred_at_rcpt_and_the_others_get_the_message(nobody_dir, daemon_factory):
    """SMTP gives a message's text one reply for all its recipients: once a Maildir has
    failed, its recipients get 451 at RCPT while it looks broken, and the message is
    stored for the rest instead of refused as a whole again; once mended, it takes mail."""
    base, nobody = nobody_dir
    catch, bob = base / "Maildir", base / "bob"
    d = daemon_factory(server={"user": "nobody"}, sections={
        "delivery": {"maildir": str(catch)}, "mailboxes": {"bob@example.test": str(bob)}})
    rcpts = ["carol@example.test", "bob@example.test"]
    (bob / "tmp").chmod(0o500)
    try:
        with smtplib.SMTP(d.host, d.port, timeout=10) as client:
            # more than max_errors (10): the deferrals are not counted
            refused_whole_then_deferred_at_rcpt(client, rcpts, 12)
            assert len(listing(catch / "new")) == 12 and listing(bob / "new") == []
            (bob / "tmp").chmod(0o700)  # mended
            assert client.sendmail("s@client.example", rcpts, b"Subject: last\r\n\r\nhi\r\n") == {}
    finally:
        (bob / "tmp").chmod(0o700)
    assert len(listing(catch / "new")) == 13 and len(listing(bob / "new")) == 1
    assert_nothing_left_in_tmp(d, bob)
    assert_nothing_left_in_tmp(d, catch)
    assert_no_crash(d)


@pytest.mark.parametrize("change", ["removed", "moved", "moved-and-replaced"])
def test_a_maildir_removed_or_moved_while_running(daemon_factory, tmp_path, change):
    """Two sessions held open, so both workers have used the Maildir (and hold its new/
    open) before an operator removes it, or moves it away and maybe puts an empty one
    in its place: every next message goes to the configured path, made again if need
    be, without a restart, and the [STORE] lines name files that exist."""
    md, moved = tmp_path / "md", tmp_path / "md.old"
    d = daemon_factory(sections={"delivery": {"maildir": str(md)}})
    clients = [RawSMTP(d.port), RawSMTP(d.port)]
    try:
        for n, client in enumerate(clients):
            assert client.command(EHLO) == 250
            assert client.deliver(ledger_message(f"before-{n}"))[0] == 250
        servers = {serving_worker(d, c.sock).pid for c in clients}
        assert len(servers) == 2
        if change == "removed":
            shutil.rmtree(md)
        else:
            md.rename(moved)
        if change == "moved-and-replaced":
            for sub in ("tmp", "new", "cur"):
                (md / sub).mkdir(parents=True)
        for n, client in enumerate(clients):
            assert client.deliver(ledger_message(f"after-{n}"))[0] == 250
            assert client.deliver(ledger_message(f"again-{n}"))[0] == 250
    finally:
        for client in clients:
            client.close()
    assert {"tmp", "new", "cur"} <= set(listing(md))
    if change != "moved-and-replaced":
        assert (md / "new").stat().st_mode & 0o777 == 0o700
    assert len(listing(md / "new")) == 4
    assert len(listing(moved / "new")) == (0 if change == "removed" else 2)
    stored = [line.rpartition("[STORE] ")[2] for line in d.wait_for_log("[CLOSE]", count=2).splitlines()
              if "[STORE] " in line]
    assert len(stored) == 6 and all(Path(p).exists() for p in stored[2:]), stored
    assert all(psutil.pid_exists(pid) and not dead(pid) for pid in servers)
    assert_no_crash(d)


@pytest.mark.parametrize("max_workers", [64, 2], ids=["room", "at max_workers"])
def test_removed_maildir_it_cannot_recreate_gets_451_until_the_master_makes_it(nobody_dir, daemon_factory,
                                                                              max_workers):
    """Workers running as nobody cannot recreate a Maildir in a directory owned by root:
    451 4.3.0, the worker survives and calls the master, whose pass (due within the hour
    otherwise) makes the Maildir again at once, the workers' own: mail flows again.  Also
    with the pool at max_workers, where the master's ticks are all fast ones."""
    base, nobody = nobody_dir
    md = base / "Maildir"
    d = daemon_factory(workers=2, server={"user": "nobody", "max_workers": max_workers},
                       sections={"delivery": {"maildir": str(md)}})
    pids = {w.pid for w in d.workers()}
    shutil.rmtree(md)
    code, text = deliver_one(d.port, "gone")
    assert code == 451 and b"4.3.0" in text, text
    assert pids <= {w.pid for w in d.workers()}  # no worker died (a spare may join)
    d.wait_for_log(f"[STORE] made again, found missing: {md}", 5)
    assert deliver_one(d.port, "made again")[0] == 250
    assert len(listing(md / "new")) == 1
    assert (md / "new").stat().st_uid == nobody.pw_uid
    assert_no_crash(d)


# -- the master killed during load ---------------------------------------------------------

def scoreboard_dir(pid: int) -> Path | None:
    """The private directory of the master's scoreboard lock file."""
    for f in psutil.Process(pid).open_files():
        if f.path.endswith("/scoreboard.lock"):
            return Path(f.path).parent
    return None


def kill_master(d) -> None:
    """SIGKILL the master; wait until its orphaned workers are gone too."""
    workers = [w.pid for w in d.workers()]
    d.signal(signal.SIGKILL)
    d.proc.wait(10)
    wait_until(lambda: all(dead(pid) for pid in workers), 10, what="the orphaned workers gone")


def test_master_killed_during_load_loses_no_acknowledged_message(daemon_factory):
    d = daemon_factory(workers=4, server={"max_workers": 16})
    lock_dir = scoreboard_dir(d.pid)
    ledger = Ledger("mk")
    stop = threading.Event()
    results: list = []
    load = threading.Thread(target=lambda: results.extend(run_clients(
        6, ledger_client, join_timeout=60, port=d.port, ledger=ledger, stop=stop,
        deadline=time.monotonic() + 60, sizes=(300, 5_000, 120_000), timeout=5.0)), daemon=True)
    load.start()
    try:
        wait_until(lambda: len(ledger.acked) >= 40, 30, what="40 messages acknowledged")
        kill_master(d)
    finally:
        stop.set()
        load.join(30)
        if lock_dir is not None:  # see test_killed_master_leaves_no_scoreboard_directory
            shutil.rmtree(lock_dir, ignore_errors=True)
    assert not load.is_alive()

    # A new master on the same port and Maildir serves at once.
    d2 = daemon_factory(port=d.port, sections={"delivery": {"maildir": str(d.maildir)}})
    last = ledger.new_id(300)
    assert deliver_one(d2.port, last)[0] == 250
    ledger.ack(last)

    audit = ledger.audit(d.maildir)
    print(f"\nmaster kill: {audit['figures']}")
    assert audit["figures"]["lost"] == 0 and audit["figures"]["duplicates"] == 0, audit
    assert audit["bad"] == [], audit


def test_killed_master_leaves_no_scoreboard_directory(daemon_factory):
    d = daemon_factory()
    lock_dir = scoreboard_dir(d.pid)
    assert lock_dir is not None and lock_dir.name.startswith("forksmtp-scoreboard-")
    try:
        kill_master(d)
        daemon_factory(port=d.port, sections={"delivery": {"maildir": str(d.maildir)}})
        assert not lock_dir.exists()
    finally:
        shutil.rmtree(lock_dir, ignore_errors=True)


def test_reload_whose_log_cannot_be_created_changes_nothing(small_tmpfs, daemon_factory):
    """A log file that cannot be created (no inode left: the config check cannot see it)
    fails the reload before anything else changed: the new address is not left bound
    without workers, the old one keeps serving, the old log stays in use."""
    d = daemon_factory(workers=2)
    for n in range(1024):  # bounded: 512 inodes
        try:
            (small_tmpfs / f"filler-{n}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
    old_port, new_port = d.port, free_port()
    d.sections["server"]["listen"] = [f"127.0.0.1:{new_port}"]
    d.sections["log"]["file"] = str(small_tmpfs / "forksmtp.log")
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_for_log("[RELOAD] reload failed, keeping the running configuration")
    assert connection_refused(new_port)
    assert deliver_one(old_port, "after-failed-reload")[0] == 250
    assert "configuration generation 2" not in d.log_text()
    assert_no_crash(d)


def test_storage_errors_are_logged_at_level_warning(daemon_factory, tmp_path):
    """An operator who keeps only problems in the log (level = "warning") still learns
    why a client got 451; the session's own lines stay out."""
    md = tmp_path / "md"
    d = daemon_factory(sections={"delivery": {"maildir": str(md)}})  # info: [READY] is logged
    old = {w.pid for w in d.workers()}
    d.sections["log"]["level"] = "warning"
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_until(lambda: (pids := {w.pid for w in d.workers()}) and not old & pids, 10, 0.05,
               "workers of the reloaded config only")
    mark = len(d.log_text())
    shutil.rmtree(md)
    md.write_text("a file where the Maildir was\n")
    code, text = deliver_one(d.port, "into-a-file")
    assert code == 451 and b"4.3.0" in text, text
    log = wait_until(lambda: "[ERROR] cannot open Maildir file" in (t := d.log_text()[mark:]) and t, 10,
                     0.05, "the storage error logged")
    assert "[SMTP]" not in log and "[CONN]" not in log


def test_directories_the_masters_pass_makes_are_the_workers_even_when_it_fails_part_way(
        nobody_dir, daemon_factory):
    """A pass that made tmp/ and new/ and then failed on cur/ (a file in its place) left
    the two root's: every message got 451 even once cur/ was fixed, and no later pass
    found them missing.  They are handed to server.user whatever happens after."""
    base, nobody = nobody_dir
    md = base / "Maildir"
    d = daemon_factory(server={"user": "nobody", "min_spare_workers": 0},
                       sections={"delivery": {"maildir": str(md)}})
    for sub in ("tmp", "new", "cur"):
        (md / sub).rmdir()
    (md / "cur").write_text("in the way")
    os.kill(next(iter(worker_pids(d))), signal.SIGKILL)  # a crash: the pass runs at once
    d.wait_for_log(f"cannot make {md} again")
    d.wait_for_log(f"made again, found missing: {md / 'tmp'}, {md / 'new'}")
    assert (md / "tmp").stat().st_uid == (md / "new").stat().st_uid == nobody.pw_uid
    (md / "cur").unlink()
    code, text = deliver_one(d.port, "after the fix")
    assert code == 250, text


def test_a_link_the_workers_put_in_a_mailboxs_path_is_not_followed_by_the_master(nobody_dir, daemon_factory):
    """A Maildir++ folder of the catch-all (a [mailboxes] target, README Layout) lies in
    a directory the workers own.  Swapped for a link to a directory of root's, it had
    the master, remaking the Maildir after a crash, make tmp/, new/ and cur/ there and
    give the directory to the workers' user: a worker's bug became root's.  A link of
    root's (the operator's) is still followed."""
    base, nobody = nobody_dir
    catch, victim, real = base / "catch", base / "victim", base / "real-lists"
    lists = catch / ".Lists"
    victim.mkdir(mode=0o755)
    (victim / "secret").write_text("root's")
    d = daemon_factory(workers=1, server={"user": "nobody", "min_spare_workers": 0},
                       sections={"delivery": {"maildir": str(catch)},
                                 "mailboxes": {"lists@example.test": str(lists)}})
    assert lists.stat().st_uid == nobody.pw_uid
    shutil.rmtree(lists)
    lists.symlink_to(victim)
    os.lchown(lists, nobody.pw_uid, nobody.pw_gid)  # as a worker would have made it
    os.kill(next(iter(worker_pids(d))), signal.SIGKILL)  # a crash: the pass runs at once
    line = d.wait_for_log(f"cannot make {lists} again")
    assert f"a symlink of uid {nobody.pw_uid}: not followed by the master" in line
    assert f"not cleaning {lists}/tmp" in d.log_text()
    assert victim.stat().st_uid == 0 and sorted(os.listdir(victim)) == ["secret"]
    lists.unlink()
    real.mkdir()
    lists.symlink_to(real)  # root's own link
    os.kill(next(iter(worker_pids(d))), signal.SIGKILL)
    d.wait_for_log(f"made again, found missing: {lists / 'tmp'}")
    assert [(real / sub).stat().st_uid for sub in ("", "tmp", "new", "cur")] == [nobody.pw_uid] * 4


def test_workers_keep_no_supplementary_group_of_the_master(nobody_dir):
    """Where the workers' group was the master's own, the drop kept the master's
    supplementary groups (root's login may hold disk, adm, shadow)."""
    _, nobody = nobody_dir
    code = ("import os, sys\nfrom forksmtp import process\nos.setgroups([0, 4, 6])\n"
            "process.drop_privileges(int(sys.argv[1]), 0)\nprint(os.getuid(), os.getgid(), os.getgroups())\n")
    done = subprocess.run([sys.executable, "-c", code, str(nobody.pw_uid)], capture_output=True, text=True,
                          timeout=20)
    assert done.stdout == f"{nobody.pw_uid} 0 [0]\n", done


def test_a_group_without_a_user_is_said_to_leave_the_workers_root(nobody_dir, daemon_factory):
    """server.group alone: the workers take the group and stay root.  --check said OK
    and the start said nothing, to an operator who meant to drop privileges."""
    base, nobody = nobody_dir
    group = grp.getgrgid(nobody.pw_gid).gr_name
    said = f'server.group = "{group}" without server.user: the workers run as root (uid 0), in that group'
    d = daemon_factory(workers=1, server={"group": group}, sections={"delivery": {"maildir": str(base / "md")}})
    assert f"[WORKER] {said}" in d.wait_for_log("without server.user")
    assert {psutil.Process(pid).uids().real for pid in worker_pids(d)} == {0}
    check = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(d.config_path), "--check"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and f"forksmtp: warning: {said}\n" in check.stderr, check


@pytest.fixture
def own_user():
    """A user of the test's own, added for it and removed after (or by) it."""
    if os.geteuid() != 0 or not (shutil.which("useradd") and shutil.which("userdel")):
        pytest.skip("adding a user needs root and useradd")
    for stale in [e.pw_name for e in pwd.getpwall() if e.pw_name.startswith("fsmtp-t")]:
        subprocess.run(["userdel", "--force", stale], capture_output=True, timeout=30)  # a killed run's
    name = f"fsmtp-t{os.getpid() % 100000}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--force", name], capture_output=True, timeout=30)


def test_a_worker_forked_after_the_user_went_still_drops_to_it(nobody_dir, daemon_factory, own_user):
    """The workers' user looked up again at each fork: after a userdel (or in an LDAP
    outage) every respawned worker died in its drop, and the pool could not be refilled
    until a restart.  The ids now come with the config, looked up at a start or reload."""
    base, _ = nobody_dir
    uid = pwd.getpwnam(own_user).pw_uid
    d = daemon_factory(workers=1, server={"user": own_user, "min_spare_workers": 0},
                       sections={"delivery": {"maildir": str(base / "Maildir")}})
    before = wait_until(lambda: (p := set(worker_pids(d))) and p, 10, what="a worker")
    subprocess.run(["userdel", "--force", own_user], check=True, capture_output=True, timeout=30)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    after = wait_until(lambda: (p := set(worker_pids(d)) - before) and p, 10, what="a worker forked since")
    # Served first: a worker seen between its fork and its drop is still root.
    code, text = deliver_one(d.port, "after userdel")
    assert code == 250, text
    assert {psutil.Process(pid).uids().real for pid in after} == {uid}
    assert "Traceback" not in d.log_text()
    # A reload now refuses the config, naming the key, and the workers serve on.
    d.signal(signal.SIGHUP)
    line = [x for x in d.wait_for_log("reload failed", 30).splitlines() if "reload failed" in x][-1]
    assert line.endswith(f'server.user = "{own_user}": no such user'), line
    assert deliver_one(d.port, "after the reload")[0] == 250


def test_the_workers_ids_are_looked_up_with_the_config_and_a_name_gone_names_its_key(tmp_path):
    """Arbiter._worker_ids, run at a start and at each reload right after the config's
    own check: a user or group gone in between is that key's error, not a KeyError."""
    from forksmtp.arbiter import Arbiter
    from forksmtp.config import ConfigError, load_config
    config = tmp_path / "f.toml"
    config.write_text('[server]\nuser = "nobody"\n')
    cfg = load_config(str(config))
    nobody = pwd.getpwnam("nobody")
    arbiter = Arbiter(cfg)
    assert arbiter._worker_ids(cfg) == (nobody.pw_uid, nobody.pw_gid)
    root_group = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, group="0"))
    assert arbiter._worker_ids(root_group) == (nobody.pw_uid, 0)
    for key, server in [("server.user", {"user": "fsmtp-no-such-user"}),
                        ("server.group", {"group": "fsmtp-no-such-group"})]:
        gone = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, **server))
        with pytest.raises(ConfigError) as exc:
            arbiter._worker_ids(gone)
        value = server[key.split(".")[1]]
        assert str(exc.value) == f'{config}: {key} = "{value}": no such {key.split(".")[1]}'
    assert arbiter._worker_ids(load_config(None)) == (None, None)


def test_a_mailbox_that_fails_part_way_at_start_is_still_the_workers_once_fixed(
        nobody_dir, daemon_factory):
    """A start that made a [mailboxes] Maildir's tmp/ and new/ and then met a file where
    cur/ belongs goes on without it (451 for its mail) and hands what is there to the
    workers' user: once the file is gone, the mail is stored, with no reload."""
    base, nobody = nobody_dir
    md, box = base / "Maildir", base / "alice" / "Maildir"
    box.mkdir(parents=True)
    (box / "cur").write_text("in the way")
    d = daemon_factory(server={"user": "nobody"},
                       sections={"delivery": {"maildir": str(md)},
                                 "mailboxes": {"alice@example.test": str(box)}})
    d.wait_for_log(f'mailboxes."alice@example.test" = {box}: ')
    assert (box / "tmp").stat().st_uid == (box / "new").stat().st_uid == nobody.pw_uid
    (box / "cur").unlink()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.sendmail("a@client.example", ["alice@example.test"],
                               b"Subject: x\r\n\r\nfor alice\r\n") == {}
    assert len(list((box / "new").iterdir())) == 1


def test_a_maildir_that_was_there_keeps_its_owner_and_so_do_its_folders(nobody_dir, daemon_factory):
    """A mail reader's Maildir (Dovecot's, made as its own user, with Maildir++ folders)
    listed under [mailboxes]: every start and reload chowned the whole tree to
    server.user, and the reader could no longer open it.  Only what the master makes
    goes to the workers' user; a message file is the workers' as always."""
    base, nobody = nobody_dir
    md, box = base / "Maildir", base / "reader" / "Maildir"
    reader = nobody.pw_uid + 1000
    dirs = [box, *(box / sub for sub in ("tmp", "new", "cur", ".Sub", ".Sub/tmp", ".Sub/new", ".Sub/cur"))]
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # a reader that lets the workers write (a shared group, say)
        os.chown(directory, reader, reader)
    d = daemon_factory(server={"user": "nobody"}, sections={"delivery": {"maildir": str(md)},
                                                           "mailboxes": {"reader@example.test": str(box)}})
    assert (md / "new").stat().st_uid == nobody.pw_uid  # made by the master: the workers'
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.sendmail("a@client.example", ["reader@example.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration generation 2 loaded")
    assert {str(p): (p.stat().st_uid, p.stat().st_gid) for p in dirs} == {str(p): (reader, reader) for p in dirs}
    (stored,) = (box / "new").iterdir()
    assert stored.stat().st_uid == nobody.pw_uid


def test_a_maildir_root_made_by_hand_is_given_to_the_workers_but_nothing_below_it(nobody_dir, daemon_factory):
    """A Maildir an operator made as root (mkdir -p .../{tmp,new,cur}), or an earlier run
    without server.user: its own directories go to the workers' user, as they always
    did, so its mail is stored; a folder below it keeps its owner."""
    base, nobody = nobody_dir
    md, box = base / "Maildir", base / "byhand" / "Maildir"
    for sub in ("tmp", "new", "cur", ".Sub/new"):
        (box / sub).mkdir(parents=True)
    d = daemon_factory(server={"user": "nobody"}, sections={"delivery": {"maildir": str(md)},
                                                           "mailboxes": {"byhand@example.test": str(box)}})
    assert [(box / sub).stat().st_uid for sub in ("", "tmp", "new", "cur")] == [nobody.pw_uid] * 4
    assert (box / ".Sub").stat().st_uid == (box / ".Sub" / "new").stat().st_uid == 0
    assert "is not writable" not in d.log_text()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.sendmail("a@client.example", ["byhand@example.test"], b"Subject: x\r\n\r\nhi\r\n") == {}


def test_check_says_nothing_of_root_maildirs_the_start_gives_to_the_workers(nobody_dir, tmp_path):
    """Maildirs an operator made as root (mkdir -p .../{tmp,new,cur}, mode 0700 or 0755)
    are given to the workers' user by the start, which then warns of nothing: --check,
    which changes nothing, must not warn of them either."""
    base, _ = nobody_dir
    md, box = base / "Maildir", base / "box" / "Maildir"
    for top, mode in ((md, 0o700), (box, 0o755)):
        for directory in (top, top / "tmp", top / "new", top / "cur"):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(mode)
    config = write_config(tmp_path / "forksmtp.toml", {
        "server": {"listen": [f"127.0.0.1:{free_port()}"], "user": "nobody"},
        "delivery": {"maildir": str(md)}, "mailboxes": {"bob@example.test": str(box)}})
    check = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(config), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stderr) == (0, ""), check
    assert os.stat(md).st_uid == 0  # --check gave nothing away


def test_a_maildir_the_workers_user_may_not_write_is_named_at_start(nobody_dir, daemon_factory):
    """A Maildir that was there keeps its owner, so one its owner keeps to itself gets
    451 for every message: the start says so, naming the directory, its owner and mode."""
    base, nobody = nobody_dir
    md, box = base / "Maildir", base / "private" / "Maildir"
    other = nobody.pw_uid + 1000
    for directory in (box, box / "tmp", box / "new", box / "cur"):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755 if directory == box else 0o700)
        os.chown(directory, other, other)
    d = daemon_factory(server={"user": "nobody"}, sections={"delivery": {"maildir": str(md)},
                                                           "mailboxes": {"private@example.test": str(box)}})
    text = d.wait_for_log("[READY]")
    assert (f'[STORE] mailboxes."private@example.test" = {box}: {box / "tmp"} is not writable by the '
            f"workers' user nobody (owner {other}:{other}, mode 0700); its mail gets 451") in text
    # --check, run before each start, says it too (and passes: the other mail goes on).
    check = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(d.config_path), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check
    assert check.stderr == (f'forksmtp: warning: mailboxes."private@example.test" = {box}: {box / "tmp"} is '
                            f"not writable by the workers' user nobody (owner {other}:{other}, mode 0700); "
                            "its mail would get 451 until this is fixed\n")
    # Nor may the workers pass through a Maildir its owner keeps to itself, whatever
    # tmp/ and new/ allow: named at the reload.
    for sub in ("tmp", "new"):
        (box / sub).chmod(0o777)
    box.chmod(0o700)
    d.signal(signal.SIGHUP)
    text = d.wait_for_log("configuration generation 2 loaded")
    assert (f'[STORE] mailboxes."private@example.test" = {box}: {box} is not searchable by the '
            f"workers' user nobody (owner {other}:{other}, mode 0700); its mail gets 451") in text
    assert f"{md}" not in text.split("[READY]")[0]  # the catch-all, made by the master: the workers'
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@client.example", ["private@example.test"], b"Subject: x\r\n\r\nhi\r\n")
        assert refused.value.smtp_code == 451


def test_a_maildir_every_user_may_write_is_named_at_start_and_by_check(tmp_path, daemon_factory):
    """A mailbox at a directory like /tmp (mode 1777), or one whose new/ is mode 0777:
    another local user could make its tmp/, new/ or cur/ first and own what is delivered
    there, or plant and take mail.  The start and --check say so, naming the directory
    and its mode; the mail is still delivered (the operator's choice, as ACLs may be)."""
    shared, box = tmp_path / "shared", tmp_path / "box"
    shared.mkdir()
    shared.chmod(0o1777)
    for directory in (box, box / "tmp", box / "new", box / "cur"):
        directory.mkdir()
    (box / "new").chmod(0o777)
    d = daemon_factory(sections={"mailboxes": {"shared@example.test": str(shared),
                                               "box@example.test": str(box)}})
    text = d.wait_for_log("[READY]")
    said = {"shared": f"{shared} is writable by every user (mode 1777): another user could make its "
                      "tmp/, new/ or cur/ first and own the mail delivered there",
            "box": f"{box / 'new'} is writable by every user (mode 0777): another user could put "
                   "mail in it or take mail out"}
    for name, path in (("shared", shared), ("box", box)):
        assert f'[STORE] mailboxes."{name}@example.test" = {path}: {said[name]}\n' in text
    check = subprocess.run([sys.executable, "-m", "forksmtp", "-c", str(d.config_path), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check
    assert check.stderr == "".join(f'forksmtp: warning: mailboxes."{name}@example.test" = {path}: {said[name]}\n'
                                   for name, path in (("box", box), ("shared", shared))), check.stderr
    with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.sendmail("a@client.example", ["shared@example.test", "box@example.test"],
                               b"Subject: x\r\n\r\nhi\r\n") == {}
    assert len(os.listdir(shared / "new")) == len(os.listdir(box / "new")) == 1
    # The Maildirs the server makes are its own: nothing to say of them.
    assert str(d.maildir) not in text.split("[READY]")[0]


def test_a_log_reader_that_stops_reading_stops_neither_mail_nor_the_master(tmp_path):
    """stderr is a pipe whose reader has stopped (a stuck journald): past the pipe's
    64 KiB, every write would block.  Mail still flows, SIGTERM still stops the server,
    and once the reader is back the log says how many lines it lost."""
    port = free_port()
    config = write_config(tmp_path / "forksmtp.toml", {
        "server": {"listen": [f"127.0.0.1:{port}"], "hostname": "mx.test.example", "workers": 2},
        "delivery": {"maildir": str(tmp_path / "Maildir")},
        "log": {"file": "", "level": "info"}})
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "forksmtp", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=w, start_new_session=True)
    os.close(w)
    try:
        wait_until(lambda: not connection_refused(port), 15, what="the server listening")
        for _ in range(150):  # about 1 KiB of log each: twice what the pipe holds
            send_message(port)
        assert len(listing(tmp_path / "Maildir" / "new")) == 150
        os.set_blocking(r, False)
        taken = [os.read(r, 1 << 20)]
        send_message(port)  # the worker's first flush after the reader is back
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        os.set_blocking(r, True)
        while chunk := os.read(r, 1 << 16):
            taken.append(chunk)
        log = b"".join(taken).decode()
        assert "line(s) not logged" in log and "[STOP]" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(r)
