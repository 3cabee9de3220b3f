"""The worker's accept loop when a stop signal meets a waiting connection.

With EPOLLEXCLUSIVE only one idle worker is woken per connection.  If that worker is
told to stop at the same moment and leaves the connection alone, no other worker is
woken for it until the next connection arrives: the client waits for its greeting.
Here a real worker process is woken for a real pending connection, and SIGTERM is
delivered between its wake-up and its handling of the event.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import socket
import threading
import time

import psutil
import pytest

from daemon import in_any_syscall, wait_until
from forksmtp import config, logs, scoreboard
from forksmtp.worker import TURN, Worker


_epoll = select.epoll


class _SignalAfterFirstWake:
    """An epoll that sends SIGTERM to its own process right after its first wake-up
    with events (as if the signal had arrived during the wait)."""

    def __init__(self, *args) -> None:
        self.epoll, self.first = _epoll(*args), True

    def poll(self, timeout: float = -1, maxevents: int = -1):
        events = self.epoll.poll(timeout, maxevents)
        if self.first and events:
            self.first = False
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the events do
        return events

    def __getattr__(self, name):
        return getattr(self.epoll, name)


class _TermOctetAfterFirstWake(_SignalAfterFirstWake):
    """As above, but only the first half of a signal's delivery: the octet that the C
    handler writes to the wake-up fd, and not the Python handler, which compiled code
    runs only when something looks for pending signals."""

    def poll(self, timeout: float = -1, maxevents: int = -1):
        events = self.epoll.poll(timeout, maxevents)
        if self.first and events:
            self.first = False
            wake_fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(wake_fd)
            os.write(wake_fd, bytes([signal.SIGTERM]))
        return events


def _run_worker(cfg, listener, board, log, epoll=None) -> None:
    """Child process: one worker whose epoll (the only one it makes) signals after its
    first wake-up; exits with the worker's status.  The worker may be compiled, so
    its methods cannot be replaced: the select module's epoll is, in this child only."""
    status = 1
    try:
        select.epoll = epoll or _SignalAfterFirstWake
        worker = Worker(cfg, [listener], board, 0, 1, os.pipe()[0], log)
        worker.prepare()
        status = worker.run()
    finally:
        os._exit(status)


def _exit_status(pid: int, timeout: float = 10.0) -> int:
    """The child's exit code once it ends; one still running after ``timeout`` is
    killed, reaped and reported (TimeoutError), so the test never hangs on it."""
    def ended():
        done, status = os.waitpid(pid, os.WNOHANG)
        return (done, status) if done else None
    try:
        _, status = wait_until(ended, timeout, what="the worker to exit")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status)


def _worker_parts(tmp_path, listener: socket.socket) -> tuple:
    """``listener`` listening on a loopback port; that port, and the configuration,
    scoreboard (slot 0 claimed) and log of a worker serving it."""
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    cfg = config.load_config(None, {"delivery.maildir": str(tmp_path / "md"),
                                    "server.listen": [f"127.0.0.1:{port}"]})
    board = scoreboard.Scoreboard.create(4, lock_dir=str(tmp_path))
    board.claim_slot(0, 0, 1, 0.0)
    return port, cfg, board, logs.Log("info", str(tmp_path / "log"))


def _one_session_in_a_worker(tmp_path, listener: socket.socket, epoll) -> int:
    """A client waiting in the backlog of ``listener``, a worker in a child process with
    ``epoll``: the client must be greeted and get its 221; the worker's exit status."""
    port, cfg, board, log = _worker_parts(tmp_path, listener)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)  # waiting in the backlog
    pid = os.fork()
    if pid == 0:
        _run_worker(cfg, listener, board, log, epoll)
    try:
        # The worker stops after this session; the listener stays open here, as the
        # master's does, so an unserved connection would just wait.
        assert client.recv(512).startswith(b"220 ")
        client.sendall(b"QUIT\r\n")
        assert client.recv(512).startswith(b"221 ")
    finally:
        client.close()
        code = _exit_status(pid)
    return code


@pytest.mark.parametrize("epoll", [_SignalAfterFirstWake, _TermOctetAfterFirstWake],
                         ids=["signal", "octet only"])
def test_a_connection_that_woke_a_stopping_worker_is_served(tmp_path, epoll):
    """Then the worker stops, also when only the wake-up octet of its SIGTERM is there
    (the handler still pending): it must not wait for the master's SIGQUIT."""
    assert _one_session_in_a_worker(tmp_path, socket.socket(), epoll) == 0
    assert "[CLOSE] 127.0.0.1 client quit" in (tmp_path / "log").read_text()


class _SignalAfterSecondWake(_SignalAfterFirstWake):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.wakes = 0

    def poll(self, timeout: float = -1, maxevents: int = -1):
        events = self.epoll.poll(timeout, maxevents)
        if events:
            self.wakes += 1
            if self.wakes == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return events


class _ProtocolErrorFirst(socket.socket):
    """A listener whose first accept() reports an error of the pending connection, as
    Linux does (EPROTO and the like)."""
    failed = False

    def _accept(self):
        if not self.failed:
            self.failed = True
            raise OSError(errno.EPROTO, "Protocol error")
        return super()._accept()


def test_an_error_of_a_pending_connection_is_retried_not_fatal(tmp_path):
    """accept(2): EPROTO, ENETUNREACH and the rest are to be retried like EAGAIN; they
    ended the worker (exit status 1, counted toward a crash loop)."""
    assert _one_session_in_a_worker(tmp_path, _ProtocolErrorFirst(), _SignalAfterSecondWake) == 0


class _FirstWaiter(threading.Thread):
    """A thread that waits on ``listener`` with EPOLLEXCLUSIVE, is woken for the next
    connection and goes away without accepting it: a worker killed between its wake-up
    and its accept (the OOM killer, a debugger, an operator's kill)."""

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(daemon=True)
        self.listener, self.ready, self.events = listener, threading.Event(), None

    def run(self) -> None:
        with select.epoll() as ep:
            ep.register(self.listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self.ready.set()
            self.events = ep.poll(10.0)


def test_connections_whose_woken_workers_went_away_are_taken_by_an_idle_one(tmp_path):
    """With EPOLLEXCLUSIVE the kernel wakes one waiter per connection: the first in the
    listener's queue that is waiting.  If it leaves without accepting, nothing wakes
    another for that connection until the next one arrives, and a quiet server may have
    none for minutes.  An idle worker must find it by itself, within its 1 s turn; and,
    having served one so, look again at once rather than a turn later."""
    listener = socket.socket()
    port, cfg, board, log = _worker_parts(tmp_path, listener)
    # The threads' waiters are queued on the listener before the worker's, so the
    # kernel wakes them, one per connection, not the worker, while all of them wait.
    waiters = [_FirstWaiter(listener) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
        assert waiter.ready.wait(10)
    pid = os.fork()
    if pid == 0:
        _run_worker(cfg, listener, board, log, select.epoll)
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: board.snapshot().slots[0].state == scoreboard.IDLE, what="the worker idle")
        procs = [psutil.Process(w.native_id) for w in waiters] + [psutil.Process(pid)]
        wait_until(lambda: all(in_any_syscall(p, "epoll_wait") for p in procs), what="all waiting in epoll")
        for waiter in waiters:
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            waiter.join(10)
            assert waiter.events, "the waiter was not woken for the connection"
        # Nobody else was woken: the connections wait in the backlog for the worker's turn.
        first, second = clients
        first.settimeout(5.0)
        assert first.recv(512).startswith(b"220 ")
        first.sendall(b"QUIT\r\n")
        assert first.recv(512).startswith(b"221 ")
        quit_at = time.monotonic()
        second.settimeout(5.0)
        assert second.recv(512).startswith(b"220 ")
        # Before, a whole turn passed first (the epoll's timeout, which no event cut short).
        assert time.monotonic() - quit_at < TURN / 2, "the second waited for the worker's next turn"
        second.sendall(b"QUIT\r\n")
        assert second.recv(512).startswith(b"221 ")
    finally:
        for client in clients:
            client.close()
        os.kill(pid, signal.SIGTERM)
        code = _exit_status(pid)
    assert code == 0
