"""Files the master and ``forksmtp passwd`` replace beside the mail: the password file,
the pidfile and the stats file.  Each is written to a temporary file that nobody can
plant in advance and renamed over the old one."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from daemon import wait_until
from forksmtp import auth, process, stats


def write_password(path: str) -> None:
    auth.set_password(path, "alice", "pw")


WRITERS = [
    ("password-file", write_password, 0o600),
    ("pidfile", process.write_pidfile, 0o644),
    ("stats-file", lambda path: stats.write_atomic(path, "{}"), 0o644),
]


@pytest.mark.parametrize("name, write, mode", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_planted_temporary_file_is_never_used(tmp_path, monkeypatch, name, write, mode):
    """Someone who can write the directory plants, at the temporary name the writer
    draws (the random part made known here) and at the name it would once have used, a
    symlink to a file of theirs, then a world-writable file: neither may be written
    through, the writer draws another name, and the result has its own mode."""
    drawn = iter(["known1", "fresh1", "known2", "fresh2"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: drawn)
    target = tmp_path / name
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    planted = [tmp_path / f".{name}.known1.tmp", tmp_path / f"{name}.{os.getpid()}.tmp"]
    for path in planted:
        path.symlink_to(victim)
    write(str(target))
    assert victim.read_text() == "untouched\n"
    assert all(path.is_symlink() for path in planted)
    assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == mode
    assert target.stat().st_size > 0
    planted.append(tmp_path / f".{name}.known2.tmp")
    for path in planted:
        path.unlink(missing_ok=True)
        path.write_text("")
        path.chmod(0o666)
    write(str(target))
    assert all(path.read_text() == "" for path in planted)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert next(drawn, None) is None  # each write drew the planted name, then a free one
    # Nothing left over.
    assert sorted(os.listdir(tmp_path)) == sorted([name, "victim"] + [p.name for p in planted])


@pytest.mark.parametrize("name, write, mode", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch, name, write, mode):
    target = tmp_path / name
    target.write_text("old\n")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(process.os, "fsync", no_space)
    with pytest.raises((OSError, process.PidfileError)) as info:
        write(str(target))
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == [name]
    if name == "pidfile":  # not the temporary file's name: the operator's key and path
        assert str(info.value) == f"cannot write pidfile {target}: No space left on device"


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")


@root_only
def test_passwd_keeps_an_existing_files_mode_owner_and_group(tmp_path):
    """A password file an operator made 0640 root:<group> for the server to read stays
    so; only a new file is created 0600."""
    target = tmp_path / "passwd"
    target.write_text("bob:x\n")
    os.chown(target, 0, 65534)
    target.chmod(0o640)
    auth.set_password(str(target), "alice", "pw")
    st = target.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 65534)
    assert [line.partition(":")[0] for line in target.read_text().splitlines()] == ["bob", "alice"]


def test_passwd_through_a_symlink_updates_the_file_it_names(tmp_path):
    real = tmp_path / "real"
    real.write_text("bob:x\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    auth.set_password(str(link), "alice", "pw")
    assert link.is_symlink()
    assert "alice:" in real.read_text() and "bob:x" in real.read_text()


@root_only
def test_passwd_refuses_another_users_symlink_and_file(tmp_path):
    """Whoever can write the directory could plant a symlink to a file root may write,
    or a file of their own to read the hashes from: neither is written."""
    victim = tmp_path / "victim"
    victim.write_text("root:x\n")
    link = tmp_path / "passwd"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)
    with pytest.raises(auth.PasswordFileError, match="symlink owned by uid 65534"):
        auth.set_password(str(link), "root", "pw")
    assert victim.read_text() == "root:x\n"
    link.unlink()
    link.write_text("")
    os.chown(link, 65534, 65534)
    with pytest.raises(auth.PasswordFileError, match="owned by uid 65534"):
        auth.set_password(str(link), "root", "pw")
    assert link.read_text() == ""


def test_passwd_refuses_a_fifo_or_a_device_in_the_password_files_place(tmp_path):
    """Reading a FIFO waits for a writer, a device feeds the reader without end: neither
    is a password file to update."""
    fifo = tmp_path / "passwd"
    os.mkfifo(fifo)
    with pytest.raises(auth.PasswordFileError, match="not a regular file"):
        auth.set_password(str(fifo), "alice", "pw")
    with pytest.raises(auth.PasswordFileError, match="not a regular file"):
        auth.set_password("/dev/zero", "alice", "pw")


def test_a_fifo_put_where_the_pidfile_goes_is_neither_waited_on_nor_replaced(tmp_path):
    """Put there after the config was checked (a start, or a reload moving the pidfile):
    reading it for an old pid waited for a writer, with the master doing nothing else.
    Run in a child with a deadline, so that a wait fails the test instead of hanging it."""
    fifo = tmp_path / "run.pid"
    os.mkfifo(fifo)
    code = ("import sys\nfrom forksmtp import process\n"
            "try:\n    process.write_pidfile(sys.argv[1])\n"
            "except process.PidfileError as exc:\n    print(exc)\n"
            "process.remove_pidfile(sys.argv[1])\nprint('removed: done')\n")
    done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=20)
    assert done.stdout == f"pidfile {fifo}: not a regular file: not replaced\nremoved: done\n", done
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_pidfile_holding_junk_or_a_huge_file_is_read_as_no_pid(tmp_path):
    path = tmp_path / "run.pid"
    for content in (b"", b"\xff\xfe junk\n", b"1" * 10_000_000, b"-1\n", b"0\n"):  # -1: kill(-1, 0)
        path.write_bytes(content)
        process.write_pidfile(str(path))
        assert path.read_text() == f"{os.getpid()}\n"
    process.remove_pidfile(str(path))
    assert not path.exists()


def test_a_pidfile_of_a_zombie_or_of_a_reused_pid_is_taken_and_one_of_a_master_is_not(tmp_path):
    """A pidfile nobody holds locked is stale unless the live process it names may be a
    master that took no lock (its title says so).  A master killed with SIGKILL stays a
    zombie until its parent reaps it; a parent slow to (a container's shell as process
    1) kept each restart from its pidfile, "held by running process N".  A pid reused
    after a crash or a reboot by anything else kept each start from it too."""
    path = tmp_path / "run.pid"
    titled = "import setproctitle, time\nsetproctitle.setproctitle('forksmtp: master x')\ntime.sleep(60)"
    master = subprocess.Popen([sys.executable, "-c", titled])
    other = subprocess.Popen(["sleep", "60"])
    try:
        wait_until(lambda: process._may_be_master(master.pid), 10, 0.01, "the master's title")
        path.write_text(f"{master.pid}\n")
        with pytest.raises(process.PidfileError, match=f"held by running process {master.pid}"):
            process.write_pidfile(str(path))
        path.write_text(f"{other.pid}\n")  # alive, and no master
        process.write_pidfile(str(path))
        assert path.read_text() == f"{os.getpid()}\n"
        process.remove_pidfile(str(path))
        path.write_text(f"{master.pid}\n")
        master.kill()
        # Dead, not reaped: Popen waits for nothing.
        wait_until(lambda: process._state(master.pid) == b"Z", 10, 0.01, "the master a zombie")
        process.write_pidfile(str(path))
        assert path.read_text() == f"{os.getpid()}\n"
        process.remove_pidfile(str(path))
    finally:
        for child in (master, other):
            child.kill()
            child.wait()


_RACER = """
import sys, time
from forksmtp import process
rounds, start, root = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
won = []
for i in range(rounds):
    while time.time() < start + i * 0.05:
        pass
    try:
        process.write_pidfile(f"{root}/{i}.pid")
        won.append(i)
    except process.PidfileError:
        pass
print(" ".join(map(str, won)), flush=True)
sys.stdin.read()  # holds every pidfile it took until the test is done
"""


def test_two_masters_started_at_once_never_both_take_a_pidfile(tmp_path):
    """Two starts racing for one pidfile both read it before either wrote it, found no
    pid, and both ran, one of them named nowhere (2 starts in 8 did).  Two processes
    take 40 pidfiles, each at the same instant: each file has one taker, and names it."""
    rounds = 40
    start = time.time() + 1.0
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(rounds), str(start), str(tmp_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        won = [set(map(int, r.stdout.readline().split())) for r in racers]
        assert won[0].isdisjoint(won[1]), sorted(won[0] & won[1])
        assert won[0] | won[1] == set(range(rounds))
        for racer, taken in zip(racers, won):
            for i in taken:
                assert (tmp_path / f"{i}.pid").read_text() == f"{racer.pid}\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.pid" for i in range(rounds))
    finally:
        for r in racers:
            r.kill()
            r.wait()


def test_a_pidfile_replaced_by_others_at_every_try_fails_the_start_past_its_bound(tmp_path, monkeypatch):
    """The placement looks again while other starts keep replacing the file, a bounded
    number of times: past it the start fails, and leaves no temporary file behind."""
    tries = []

    def always_replaced(path, tmp):
        tries.append(tmp)
        return False
    monkeypatch.setattr(process, "_put_in_place", always_replaced)
    with pytest.raises(process.PidfileError, match=f"replaced by others {process._PIDFILE_TRIES} times"):
        process.write_pidfile(str(tmp_path / "run.pid"))
    assert len(tries) == process._PIDFILE_TRIES and os.listdir(tmp_path) == []


def test_a_pidfile_is_locked_while_held_and_removed_with_its_lock(tmp_path):
    """The lock is what another start tests, whatever pid the file names."""
    path = tmp_path / "run.pid"
    process.write_pidfile(str(path))
    try:
        with open(path) as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        taker = subprocess.run([sys.executable, "-c", "import sys\nfrom forksmtp import process\n"
                                "process.write_pidfile(sys.argv[1])", str(path)],
                               capture_output=True, text=True, timeout=20)
        assert f"is held by running process {os.getpid()}" in taker.stderr
    finally:
        process.remove_pidfile(str(path))
    assert not path.exists()
    process.remove_pidfile(str(path))  # not held any more: nothing to do


def test_a_fifo_put_where_the_stats_file_goes_after_the_check_is_left_alone(tmp_path):
    """SIGUSR1 writes the stats file by a rename, which would replace the FIFO."""
    fifo = tmp_path / "stats.json"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as exc:
        stats.write_atomic(str(fifo), "{}")
    assert isinstance(exc.value, process.NotRegularFile) and exc.value.strerror == "not a regular file"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["stats.json"]
    regular = tmp_path / "regular.json"
    stats.write_atomic(str(regular), "{}")
    stats.write_atomic(str(regular), '{"a":1}')
    assert regular.read_text() == '{"a":1}\n'
