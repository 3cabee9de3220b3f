"""The log line format: `<UTC timestamp with ms> <pid> [TAG] text`, one event a line."""
from __future__ import annotations

import os
import pwd
import re
import resource
import select
import signal
import socket
import sys
import time

import pytest

from forksmtp import logs

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)/(\d+) \[([A-Z]+)\] (.*)$")


@pytest.fixture
def log_path(tmp_path):
    return str(tmp_path / "forksmtp.log")


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_line_carries_utc_milliseconds_pid_and_tag(log_path, monkeypatch):
    # 2026-11-29T07:05:09.005Z: the millisecond field keeps its leading zeros
    monkeypatch.setattr(logs.time, "time_ns", lambda: 1_795_935_909_005_123_456)
    log = logs.Log("info", log_path)
    log.line("SMTP", "MAIL FROM:<a@example.com>")
    assert read_lines(log_path) == [
        f"2026-11-29T07:05:09.005Z/{os.getpid()} [SMTP] MAIL FROM:<a@example.com>"]


def test_prefix_follows_the_clock_across_milliseconds_and_seconds(log_path, monkeypatch):
    now = [1_795_935_909_999_000_000]
    monkeypatch.setattr(logs.time, "time_ns", lambda: now[0])
    log = logs.Log("info", log_path)
    log.queue("CONN", "192.0.2.1")
    now[0] += 1_000_000          # next millisecond, next second
    log.queue_many("SMTP", ["EHLO client", "250-mx.example.test"])
    now[0] += 1_000_000_000      # a second later, same millisecond of the second
    log.queue("CLOSE", "192.0.2.1 client quit")
    log.flush()
    stamps = [LINE.match(line).group(1) for line in read_lines(log_path)]
    assert stamps == ["2026-11-29T07:05:09.999Z", "2026-11-29T07:05:10.000Z",
                      "2026-11-29T07:05:10.000Z", "2026-11-29T07:05:11.000Z"]


def test_every_line_matches_the_format_and_client_newlines_are_escaped(log_path):
    log = logs.Log("info", log_path)
    log.queue("SMTP", "HELO evil\r\n[STORE] /forged")
    log.queue_many("SMTP", ["NOOP", "250 2.0.0 OK"])
    log.flush()
    lines = read_lines(log_path)
    assert len(lines) == 3
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed)
    assert parsed[0].group(4) == "HELO evil\\r\\n[STORE] /forged"
    assert {m.group(2) for m in parsed} == {str(os.getpid())}


def test_level_filters_lines_below_it(log_path):
    log = logs.Log("warning", log_path)
    log.info("CONN", "192.0.2.1")
    log.queue_many("SMTP", ["EHLO client"])
    log.warning("ERROR", "disk full")
    log.flush()
    assert [LINE.match(line).group(3) for line in read_lines(log_path)] == ["ERROR"]


def test_child_lines_carry_the_child_pid(log_path):
    log = logs.Log("info", log_path)
    log.line("READY", "parent")
    pid = os.fork()
    if pid == 0:  # the child logs through the inherited object, as a worker does
        try:
            log.after_fork()
            log.line("CONN", "child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    pids = {LINE.match(line).group(4): LINE.match(line).group(2) for line in read_lines(log_path)}
    assert pids == {"parent": str(os.getpid()), "child": str(pid)}


@pytest.mark.parametrize("many", [False, True], ids=["queue", "queue_many"])
def test_the_queue_is_written_out_once_it_reaches_its_bound(log_path, many):
    """A session that never pauses must not hold its lines in memory until it ends."""
    log = logs.Log("info", log_path)
    for i in range(20_000):
        if many:
            log.queue_many("SMTP", [f"NOOP {i}", "250 2.0.0 Ok"])
        else:
            log.queue("SMTP", f"NOOP {i}")
        assert sum(map(len, log.pending)) < logs.MAX_PENDING
    written = read_lines(log_path)
    assert len(written) > (40_000 if many else 20_000) - logs.MAX_PENDING // 30
    log.flush()
    lines = read_lines(log_path)
    assert [line.rsplit(" ", 1)[-1] for line in lines if "NOOP" in line] == [str(i) for i in range(20_000)]


def _cut_a_line(log: logs.Log, log_path: str, close: bool = False) -> None:
    """In a child, as a worker: a CONN line, then one a full disk cuts short (the file
    size limit plays the full disk: the kernel writes what fits, then refuses with EFBIG
    as it would with ENOSPC), one it refuses whole, and with ``close`` a CLOSE line once
    there is room again."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log.after_fork()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            log.info("CONN", "198.51.100.7")
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(log_path) + 20, hard))
            log.info("SMTP", "MAIL FROM:<" + "x" * 100 + "@example.test>")  # 20 octets of it
            log.info("SMTP", "lost")  # none of it
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            if close:
                log.info("CLOSE", "198.51.100.7 client quit")
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _assert_cut_then(log_path: str, tag: str) -> None:
    lines = read_lines(log_path)
    assert len(lines) == 3, lines
    assert LINE.match(lines[0]).group(3, 4) == ("CONN", "198.51.100.7")
    assert len(lines[1]) == 20 and not LINE.match(lines[1])
    assert LINE.match(lines[2]).group(3) == tag, lines


def test_a_line_cut_short_by_a_full_disk_is_ended_by_the_next_write_of_any_process(log_path):
    """A full log file system may stop a write inside a line; the next write, by that
    process or another one (the master, another worker: they share the file), starts on a
    line of its own, so no two lines are glued."""
    log = logs.Log("info", log_path)  # as the master's, inherited by its workers
    _cut_a_line(log, log_path, close=True)  # the same process writes next
    _assert_cut_then(log_path, "CLOSE")
    os.truncate(log_path, 0)
    _cut_a_line(log, log_path)
    log.info("STATS", "{}")  # another process writes next
    _assert_cut_then(log_path, "STATS")


def test_a_reload_keeps_the_cut_mark_and_a_rotation_clears_it(log_path):
    """A reload reopens the same file, whose last line is still cut; a rotation starts a
    new file, which must not begin with an empty line."""
    log = logs.Log("info", log_path)
    _cut_a_line(log, log_path)
    log.reopen()  # SIGHUP: the same file
    log.info("RELOAD", "configuration generation 2 loaded")
    _assert_cut_then(log_path, "RELOAD")

    _cut_a_line(log, log_path)
    os.rename(log_path, log_path + ".1")  # logrotate, then SIGHUP
    log.reopen()
    log.info("RELOAD", "configuration generation 3 loaded")
    with open(log_path, "rb") as f:
        assert f.read().startswith(b"20")  # the first line, no empty one before it


class _Stderr:
    """Stands in for sys.stderr: the log's default output is its descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


@pytest.fixture(params=["pipe", "socket"])
def stalled_output(request, monkeypatch):
    """A log on stderr that is a pipe or a socket nobody reads (yet); yields the log and
    the reading end's descriptor, non-blocking."""
    if request.param == "pipe":
        r, w = os.pipe()
    else:
        a, b = socket.socketpair()
        r, w = os.dup(a.fileno()), os.dup(b.fileno())
        a.close()
        b.close()
    os.set_blocking(r, False)
    monkeypatch.setattr(logs.sys, "stderr", _Stderr(w))
    log = logs.Log("info", "")
    yield log, r
    os.close(r)
    os.close(w)


def drain(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.fixture
def output_waits(monkeypatch):
    """The log's waits for its output to take more, as the log asked for them: each poll
    of a descriptor, in order, as (descriptor, timeout in ms, whether it ran out).  What a
    flush waited, told apart from how long a loaded machine took to run it."""
    waits: list[tuple[int, int, bool]] = []
    real_poll = select.poll

    class Poll:
        def __init__(self) -> None:
            self.poller, self.fds = real_poll(), []

        def register(self, fd, *mask) -> None:
            self.fds.append(fd)
            self.poller.register(fd, *mask)

        def poll(self, timeout=None):
            ready = self.poller.poll(timeout)
            waits.extend((fd, timeout, not ready) for fd in self.fds)
            return ready

    monkeypatch.setattr(logs.select, "poll", Poll)
    return waits


def test_an_output_that_takes_nothing_costs_one_bounded_wait_and_the_loss_is_counted(stalled_output,
                                                                                      output_waits):
    """A reader that stops (a stuck journald, a paused pager) must not freeze the master
    or a worker: one wait of LOG_STALL, then lines are dropped without waiting, and the
    first line the output takes again says how many were lost."""
    log, r = stalled_output
    waits = lambda: [(ms, ran_out) for fd, ms, ran_out in output_waits if fd == log._fd]  # noqa: E731
    body = "x" * 90
    started = time.monotonic()
    for i in range(3000):  # about 360 KiB: more than any pipe or socket buffer holds
        log.queue("SMTP", f"{i:05d} {body}")  # (written out every MAX_PENDING on the way)
    log.flush()
    # It waited, however slow the machine, for LOG_STALL at least; in one wait that ran
    # out (not one for each write of the batch), and none for longer.
    assert time.monotonic() - started >= logs.LOG_STALL - 0.1
    assert [ran_out for _, ran_out in waits()].count(True) == 1, waits()
    assert max(ms for ms, _ in waits()) <= logs.LOG_STALL * 1000, waits()
    stalled = len(waits())
    log.line("SMTP", "while stalled")
    assert len(waits()) == stalled, "a line logged while stalled waited for the output"

    taken = drain(r).split("\n")
    log.line("SMTP", "taken again")
    after = drain(r).splitlines()
    whole = [line for line in taken if LINE.match(line) and line.endswith(body)]
    assert whole == [line for line in taken[:len(whole)]]  # in order, none missing inside
    note = LINE.match(after[-2])
    assert note and note.group(3) == "ERROR", after
    lost = int(re.fullmatch(r"log output blocked for 2s or more: (\d+) line\(s\) not logged",
                            note.group(4)).group(1))
    assert len(whole) + lost == 3001  # the line logged while stalled is among the lost
    assert after[-1].endswith("[SMTP] taken again")


def _fill_and_flush(log: logs.Log, tag: str, lines: int = 3000) -> None:
    for i in range(lines):
        log.queue(tag, f"{i:05d} {'x' * 90}")
    log.flush()


def _count_note(text: str) -> list[tuple[int, int]]:
    """(pid, count) of each loss report in text."""
    return [(int(m.group(1)), int(m.group(2))) for m in re.finditer(
        r"/(\d+) \[ERROR\] log output blocked for 2s or more: (\d+) line\(s\) not logged", text)]


def _run_child(step) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            step()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def test_a_worker_forked_during_a_stall_does_not_report_the_masters_loss(stalled_output):
    log, r = stalled_output
    _fill_and_flush(log, "STATS")
    drain(r)

    def child():
        log.after_fork()
        log.line("CONN", "192.0.2.1")

    assert _run_child(child) == 0
    assert _count_note(drain(r)) == []  # the child's line, and no report of the master's loss
    log.line("STOP", "stopping")
    assert [pid for pid, _ in _count_note(drain(r))] == [os.getpid()]


def test_the_loss_after_a_line_another_process_cut_is_counted_exactly(stalled_output):
    """Another process's write stopped inside a line: this one's next write starts with
    the LF that ends it, which is no line of its own to count as lost."""
    log, r = stalled_output

    def child():
        log.after_fork()
        _fill_and_flush(log, "CHILD")  # cuts a line (the shared mark says so)

    assert _run_child(child) == 0
    assert log._torn[0] == 1
    _fill_and_flush(log, "PARENT", lines=10)  # into the output the child left full
    drain(r)
    log.line("STOP", "stopping")
    assert _count_note(drain(r)) == [(os.getpid(), 10)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop to another user")
def test_a_pipe_of_another_user_is_still_written_without_blocking():
    """A daemon that is not root, its stderr a pipe root made (a container's USER, a
    runuser ... | logger): /proc refuses to open the pipe anew, so the descriptor itself
    is made non-blocking rather than left to freeze the process."""
    r, w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = _Stderr(w)
            log = logs.Log("info", "")
            started = time.monotonic()
            _fill_and_flush(log, "SMTP")
            os.write(res_w, f"{time.monotonic() - started:.3f}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(res_w)
    try:
        # A flush that blocks never answers: a generous bound tells it from a slow one.
        ready, _, _ = select.select([res_r], [], [], logs.LOG_STALL + 30)
        assert ready, "the flush blocked"
        assert float(os.read(res_r, 64)) >= logs.LOG_STALL - 0.1  # it waited, then gave up
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (r, w, res_r):
            os.close(fd)


def test_the_log_is_opened_through_a_link_of_roots_only(tmp_path):
    """The master opens the log as root: a link another user planted where the log goes
    (a directory others may write) had it append the clients' text to any file it
    named, or make one there.  A link of root's (the operator's) is still followed."""
    if os.geteuid() != 0:
        pytest.skip("a link of another user's needs root to make")
    nobody = pwd.getpwnam("nobody")
    target, made = tmp_path / "roots-file", tmp_path / "made-by-root"
    target.write_text("root's\n")
    for pointed in (target, made):
        link = tmp_path / "forksmtp.log"
        link.symlink_to(pointed)
        os.lchown(link, nobody.pw_uid, nobody.pw_gid)
        with pytest.raises(PermissionError, match=f"a symlink of uid {nobody.pw_uid}, not followed"):
            logs.Log.open_file(str(link))
        link.unlink()
    assert target.read_text() == "root's\n" and not made.exists()
    link.symlink_to(target)  # root's own link
    fd = logs.Log.open_file(str(link))
    os.write(fd, b"a line\n")
    os.close(fd)
    assert target.read_text() == "root's\na line\n"
