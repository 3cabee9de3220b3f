"""Signal handling for the master: handlers record, the loop works.

A handler only appends the signal number to a list (safe at any bytecode boundary) and
the C-level ``signal.set_wakeup_fd`` writes a byte to a pipe, which wakes the master's
``select``.  No logging, no ``waitpid``, no I/O in a handler: that is where gunicorn's
reentrancy and deadlock bugs came from, and Postfix's master_sig.c warns the same.

The same wait also watches a second pipe, the workers' call for more workers: a worker
that takes the last idle place in the pool writes to it (``Worker._pool_dry``), so a
burst of clients gets new workers at once rather than at the master's next tick, a
second away.  Postfix's master does the same through its children's status pipe.  A
worker that meets a Maildir gone which it cannot make again (it runs as ``server.user``
in a directory of root's) calls through the same pipe with ``MAILDIR_CALL``: the master
then runs its pass over the Maildirs within a second (at most once a minute) rather
than within the hour.
"""

from __future__ import annotations

import os
import select
import signal

HANDLED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)

NAMES: dict[int, str] = {sig: sig.name[3:].lower() for sig in HANDLED}  # SIGHUP -> "hup"

POOL_CALL = b"\0"     # a worker took the last idle place: start more workers now
MAILDIR_CALL = b"M"   # a worker met a Maildir it cannot make again: run the pass now
#: Seconds between two passes a worker's call may bring forward: a Maildir that even the
#: master cannot make (a read-only file system) is then tried, and logged, once a minute.
MAILDIR_CALL_EVERY = 60.0


class SignalQueue:
    def __init__(self) -> None:
        self.pending: list[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Workers keep the write end (inherited by fork); see the module's docstring.
        self.want_r, self.want_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wanted = False  # the last wait() was ended by a worker's call
        self.maildirs_wanted = False  # ... and that call was (also) MAILDIR_CALL

    def install(self) -> None:
        for sig in HANDLED:
            signal.signal(sig, self._record)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # reserved; must not kill the master
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _record(self, signum: int, frame) -> None:
        self.pending.append(signum)

    def reset_in_child(self) -> None:
        """A forked worker must not run the master's handlers or share its pipe; it
        keeps ``want_w`` only."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.close(self.want_r)

    def wait(self, timeout: float, want: bool = False) -> list[int]:
        """Sleep until a signal, a worker's call for more workers (if ``want``) or the
        timeout; the signals received, in order, with repeated SIGCHLDs collapsed to
        one.  ``wanted`` tells whether a worker called."""
        self.wanted = self.maildirs_wanted = False
        if not self.pending:
            fds = [self.wake_r, self.want_r] if want else [self.wake_r]
            try:
                ready = select.select(fds, [], [], max(timeout, 0))[0]
            except InterruptedError:
                ready = []
            self.wanted = self.want_r in ready
        # Read after every wait, fast ones too: a fast tick does not wake for the workers'
        # calls (it comes within FAST_TICK anyway, and so does the pool's check), but must
        # not leave a MAILDIR_CALL unread behind them for as long as ticks stay fast (the
        # pool at max_workers: always, with workers = max_workers).
        self.maildirs_wanted = MAILDIR_CALL in _drain(self.want_r)
        _drain(self.wake_r)
        sigs, self.pending = self.pending, []
        if sigs.count(signal.SIGCHLD) > 1:
            sigs = [s for s in sigs if s != signal.SIGCHLD] + [signal.SIGCHLD]
        return sigs


def _drain(fd: int) -> bytes:
    """What a non-blocking pipe holds (at most its 64 KiB), read out."""
    got = b""
    try:
        while chunk := os.read(fd, 4096):
            got += chunk
    except BlockingIOError:
        pass
    return got
