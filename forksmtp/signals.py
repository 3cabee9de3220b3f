"""Signal handling for the master: handlers record, the loop works.

A handler only appends the signal number to a list (safe at any bytecode boundary) and
the C-level ``signal.set_wakeup_fd`` writes a byte to a pipe, which wakes the master's
``select``.  No logging, no ``waitpid``, no I/O in a handler: that is where gunicorn's
reentrancy and deadlock bugs came from, and Postfix's master_sig.c warns the same.
"""

from __future__ import annotations

import os
import select
import signal

HANDLED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
           signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)

NAMES: dict[int, str] = {sig: sig.name[3:].lower() for sig in HANDLED}  # SIGHUP -> "hup"


class SignalQueue:
    def __init__(self) -> None:
        self.pending: list[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        for sig in HANDLED:
            signal.signal(sig, self._record)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # reserved; must not kill the master
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _record(self, signum: int, frame) -> None:
        self.pending.append(signum)

    def reset_in_child(self) -> None:
        """A forked worker must not run the master's handlers or share its pipe."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def wait(self, timeout: float) -> list[int]:
        """Sleep until a signal or the timeout; the signals received, in order, with
        repeated SIGCHLDs collapsed to one."""
        if not self.pending:
            try:
                select.select([self.wake_r], [], [], max(timeout, 0))
            except InterruptedError:
                pass
        self._drain()
        sigs, self.pending = self.pending, []
        if sigs.count(signal.SIGCHLD) > 1:
            sigs = [s for s in sigs if s != signal.SIGCHLD] + [signal.SIGCHLD]
        return sigs

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass

    def _drain(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
