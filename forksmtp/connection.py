"""One SMTP session over a real socket: read -> feed -> handle events -> send.

This is the only place where the sans-IO ``Session`` meets a socket and the Maildir.
Every wait is a ``poll`` over the client socket, the worker's signal wake-up pipe and
the master's parent-death pipe, with a deadline that depends on the phase:

* between commands: ``timeouts.command`` from the moment our last reply went out
  (a per-request deadline, as Postfix's smtpd_per_request_deadline: trickling one
  byte at a time does not extend it);
* inside DATA: ``data_block`` per read, ``data_done`` for the whole transfer, and a
  minimum rate (``min_data_rate`` bytes/s after the first ``data_block`` seconds);
* always: ``timeouts.session`` for the whole connection.

A timeout gets ``421 4.4.2`` and a close.  Replies are sent once all pipelined input
is consumed (RFC 2920), as one ``send``.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import time

from . import delivery
from .smtp import replies as R
from .smtp.session import NEED_DATA, PAUSED, DataChunk, DataEnd, DataStart, Session

RECV_SIZE = 256 * 1024
#: Log lines are queued with their timestamps as they happen but written in one
#: syscall: at the end of the session, or when the client has been quiet this long.
LOG_FLUSH_DELAY = 0.2
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_ids = itertools.count(1)


class Stop(Exception):
    """The worker must stop now (SIGQUIT or the master died): 421 and close."""


class Connection:
    def __init__(self, worker, sock: socket.socket, peer: tuple, session: Session, timeouts) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_ip = peer[0]
        self.session = session
        self.timeouts = timeouts
        self.log = worker.log
        self.txn: delivery.Transaction | None = None
        now = time.monotonic()
        self.session_deadline = now + timeouts.session
        self.request_start = now
        self.data_start = 0.0
        self.data_bytes = 0
        self.poller = select.poll()
        self.poller.register(self.fd, _POLLIN)
        for fd in worker.wake_fds:
            self.poller.register(fd, select.POLLIN)
        self.close_reason = "client quit"

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        session = self.session
        try:
            if not self._greet():
                return
            while True:
                self._flush()
                if session.closed:
                    return
                data = self._recv()
                if data is None:
                    self.close_reason = "timeout"
                    session.close(R.R421_TIMEOUT)
                elif not data:
                    self.close_reason = "client disconnected"
                    return self._flush_log()
                else:
                    session.receive_data(data)
                    self._pump()
        except Stop:
            self.close_reason = "server stopping"
            session.close(R.R421_SHUTDOWN)
            self._flush(final=True)
        except OSError as exc:
            self.close_reason = f"I/O error: {os.strerror(exc.errno) if exc.errno else exc}"
        finally:
            if self.txn is not None:
                self.txn.abort()
                self.txn = None
            self.log.queue("CLOSE", f"{self.peer_ip} {self.close_reason}")
            self.log.flush()

    def _greet(self) -> bool:
        delay = self.worker.greeting_delay
        if delay > 0 and self._wait(delay):
            # RFC 5321 4.3.1: the client must wait for the greeting. Early talkers are
            # almost always bots; Postfix's postscreen rejects them the same way.
            self.close_reason = "early talker"
            self.worker.count_conn_reject("early_talker")
            self.session.close(R.R554_EARLY_TALKER)
            self._flush(final=True)
            return False
        self.session.start()
        return True

    def _pump(self) -> None:
        """Handle every event the buffered input produces."""
        session = self.session
        while True:
            event = session.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            if type(event) is DataChunk:
                if self.txn is not None:
                    self.data_bytes += len(event.data)
                    self.txn.write(event.data)
            elif type(event) is DataStart:
                self._data_start(event)
            elif type(event) is DataEnd:
                self._data_end(event)

    # -- storage -------------------------------------------------------------------------

    def _data_start(self, event: DataStart) -> None:
        session = self.session
        w = self.worker
        info = delivery.HeaderInfo(
            sender=event.envelope.sender.address, helo=session.helo_name, peer_ip=self.peer_ip,
            by=session.config.hostname, protocol=session.protocol,
            queue_id=f"{w.id_prefix}{next(_ids):X}", when=time.time())
        try:
            self.txn = delivery.Transaction(w.router, event.envelope.recipients, info)
        except OSError as exc:
            self.log.queue("ERROR", f"cannot open Maildir file: {exc}")
            session.reply(delivery.storage_reply(exc))
            return
        self.data_start = time.monotonic()
        self.data_bytes = 0
        session.accept_data()

    def _data_end(self, event: DataEnd) -> None:
        txn, self.txn = self.txn, None
        if event.error is not None:
            txn.abort()
            self.session.reply(event.error)
            return
        try:
            paths = txn.commit()
        except OSError as exc:
            self.log.queue("ERROR", f"delivery failed: {exc}")
            self.worker.router.forget()
            self.session.reply(delivery.storage_reply(exc))
            return
        self._drain_session_log()  # keep the log in order: commands, then the store
        for path in paths:
            self.log.queue("STORE", path)
        self.worker.count_message(event.size)
        self.session.reply(R.R250_ACCEPTED)

    # -- socket I/O ----------------------------------------------------------------------

    def _flush(self, final: bool = False) -> None:
        out = self.session.data_to_send()
        self._drain_session_log()
        if final:
            self.log.flush()
        if out:
            try:
                self._sendall(out)
            except OSError:
                if not final:
                    raise
        self.request_start = time.monotonic()
        self.worker.session_progress(self.session)

    def _flush_log(self) -> None:
        self._drain_session_log()
        self.log.flush()

    def _drain_session_log(self) -> None:
        session = self.session
        if session.log:
            self.log.queue_many("SMTP", session.log)
            session.log.clear()
        if session.error_codes:
            self.worker.count_rejects(session.error_codes)
            session.error_codes.clear()

    def _sendall(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.timeouts.command
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                if not self._wait(deadline - time.monotonic(), select.POLLOUT):
                    raise OSError(errno.ETIMEDOUT, "send timed out")
                continue
            view = view[sent:]

    def _poll(self, timeout: float) -> list:
        log = self.log
        if log.pending and timeout > LOG_FLUSH_DELAY:
            ready = self.poller.poll(LOG_FLUSH_DELAY * 1000)
            if ready:
                return ready
            log.flush()  # the client is slow: let the operator see the session so far
            timeout -= LOG_FLUSH_DELAY
        return self.poller.poll(timeout * 1000)

    def _deadline(self) -> float:
        t = self.timeouts
        if self.session.in_data:
            rate_limit = self.data_start + t.data_block + self.data_bytes / max(t.min_data_rate, 1)
            deadline = min(self.data_start + t.data_done, rate_limit)
        else:
            deadline = self.request_start + self.worker.command_timeout
        return min(deadline, self.session_deadline)

    def _recv(self) -> bytes | None:
        """Bytes from the client, b"" at EOF, None when the deadline passed."""
        while True:
            now = time.monotonic()
            limit = self._deadline() - now
            if self.session.in_data:
                limit = min(limit, self.timeouts.data_block)
            if limit <= 0 or not self._wait(limit):
                return None
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except ConnectionError:
                return b""

    def _wait(self, timeout: float, events: int = _POLLIN) -> bool:
        """Wait until the socket is ready; False on timeout; Stop if told to quit."""
        if events != _POLLIN:
            self.poller.modify(self.fd, events)
        try:
            ready = self._poll(max(timeout, 0.0))
        finally:
            if events != _POLLIN:
                self.poller.modify(self.fd, _POLLIN)
        self.worker.heartbeat()
        ok = False
        for fd, _ in ready:
            if fd == self.fd:
                ok = True
            else:
                self.worker.on_wake(fd)
        if self.worker.quitting:
            raise Stop()
        return ok
