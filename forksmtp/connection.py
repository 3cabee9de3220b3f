"""One SMTP session over a real socket: read -> feed -> handle events -> send.

This is the only place where the sans-IO ``Session`` meets a socket and the Maildir.
Every wait is a ``poll`` over the client socket, the worker's signal wake-up pipe and
the master's parent-death pipe, with a deadline that depends on the phase:

* between commands: ``timeouts.command`` from the moment our last reply went out
  (a per-request deadline, as Postfix's smtpd_per_request_deadline: trickling one
  byte at a time does not extend it);
* inside DATA: ``data_block`` per read, ``data_done`` for the whole transfer, and a
  minimum rate (``min_data_rate`` bytes/s after the first ``data_block`` seconds);
* sending a reply the client does not read: ``timeouts.command`` from the last part
  of it the client took (one deadline for the whole reply in a session begun under
  stress, and a second for the worker's last reply);
* always: ``timeouts.session`` for the whole connection.

A timeout gets ``421 4.4.2`` and a close.  Replies are sent once all pipelined input
is consumed (RFC 2920), as one ``send``.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import _socket
import ssl
import struct
import time
from typing import TYPE_CHECKING, Callable, Final

from . import auth, authlimit, delivery, maildir, process, tls
from .logs import ERROR, INFO, WARNING
from .scoreboard import MasterGone
from .snapshot import EARLY_TALKER
from .smtp import replies as R
from .smtp.session import (NEED_DATA, PAUSED, AuthRequest, DataChunk, DataEnd, DataStart,
                           Session, StartTLS)

if TYPE_CHECKING:
    from .worker import Worker

RECV_SIZE: Final = 64 * 1024
# One receive buffer per worker process: recv(n) would allocate a fresh n-octet buffer
# on every read.  64 KiB keeps every per-read object (the copy, the CRLF -> LF text)
# below glibc's mmap threshold, so they reuse heap memory instead of faulting in pages.
_recv_buffer: Final = memoryview(bytearray(RECV_SIZE))
#: Inside DATA each read is a fresh bytes object the DATA reader keeps working on.
#: Larger reads mean fewer trips through the loop per MiB, but their buffers are above
#: glibc's default mmap threshold (128 KiB), and a big message's blocks, held until the
#: next write, outgrow its default trim threshold: every round then faults in fresh
#: pages (10 % of a worker's CPU in perf).  So the larger size is used only once malloc
#: is tuned to keep such blocks on the heap (``tune_for_big_reads``).  50 MiB message,
#: alternating runs: 64 KiB reads with malloc untuned 393-580 MiB/s, 128 KiB tuned
#: 528-644; 256 KiB tuned 582-663 but 1.5 MiB of worker RSS growth instead of 0.9.
DATA_RECV_SIZE: Final = 128 * 1024
_data_recv_size = RECV_SIZE
#: A client quiet this long is slow or idle: write the log lines queued so far (they
#: are otherwise written in one syscall at the end of the session) and show the phase in
#: the process title.  A brisk session never waits that long, so it costs neither.
QUIET_DELAY: Final = 0.2
QUIET_DELAY_MS: Final = int(QUIET_DELAY * 1000)
#: A client quiet this long holds its worker: the worker marks its slot so (and clears
#: the mark when the client moves), and the master no longer counts it among the
#: workers that come free at the pool's recent pace (growth.Pace).  Half the pool's
#: wait limit, so that a burst of clients that hold their sessions is seen within it;
#: a brisk session's client answers in milliseconds and never has its worker marked.
CLIENT_WAIT_MARK: Final = 0.05
CLIENT_WAIT_MARK_MS: Final = int(CLIENT_WAIT_MARK * 1000)
#: Seconds between heartbeats (the master's stuck-worker watch) while a session runs.
HEARTBEAT_EVERY: Final = 1.0
#: How long the reply that closes a session may wait for a client that does not read.
LAST_REPLY_WAIT: Final = 1.0
#: The most a TLS send takes at once: one record's plaintext (RFC 8446 5.1).
_TLS_RECORD: Final = 16384
# SO_MEMINFO (Linux 4.6): a socket's memory counters as u32s, of which [3] is the send
# buffer's size (sk_sndbuf) and [5] the memory its queue holds (sk_wmem_queued).
_SO_MEMINFO: Final = getattr(_socket, "SO_MEMINFO", 55)
_MEMINFO: Final = struct.Struct("6I")
#: Free send-buffer memory a last reply needs to go at once: a line of up to 160 octets
#: (the longest closing reply, in a TLS record) in segments of 48 octets, the smallest
#: MSS Linux lets a peer ask for (net.ipv4.tcp_min_snd_mss), at under 1 KiB of memory
#: each with its overhead.
LINE_ROOM: Final = 8192
_POLLIN: Final = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_TCP_QUICKACK: Final = getattr(_socket, "TCP_QUICKACK", 0)
_ids: Final = itertools.count(1)


def tune_for_big_reads() -> bool:
    """Called in the master before it forks workers (which inherit malloc's settings):
    read DATA in DATA_RECV_SIZE blocks where malloc can be tuned for them."""
    global _data_recv_size
    if process.tune_malloc(mmap_threshold=4 * DATA_RECV_SIZE, trim_threshold=8 * DATA_RECV_SIZE):
        _data_recv_size = DATA_RECV_SIZE
        return True
    return False


#: Reads of RECV_SIZE that discard_unread makes at most: 256 KiB thrown away.
DISCARD_READS: Final = 4
#: Why a session ended when the client ended it; any other reason is the server's.
_CLIENT_ENDED: Final = ("client quit", "client disconnected")


def discard_unread(sock: _socket.socket) -> None:
    """Read and drop, without waiting, what the client sent that no reply will answer,
    before a close the server begins (the 521 to an early talker, a 421, a failed
    handshake, a refusal at a connection limit).  A close with unread octets in the
    socket makes the kernel send a reset instead of a FIN, and a client stack that
    throws away its unread input on a reset (Windows does) then loses the reply that
    says why.  The plain socket's own read is used on a TLS socket too: what is left
    there is never decrypted.  At most DISCARD_READS reads, so a client that keeps
    sending cannot keep the process here; octets that come after the close still meet a
    reset, and waiting for them (Apache's lingering close) would hold a worker for
    every bot."""
    try:
        for _ in range(DISCARD_READS):
            if _socket.socket.recv_into(sock, _recv_buffer, 0, _socket.MSG_DONTWAIT) == 0:
                return
    except OSError:  # BlockingIOError: nothing more there; or the client already reset
        pass


def room_for_a_line(sock: _socket.socket) -> bool:
    """Whether the socket's send buffer takes a short line at once.  The kernel takes
    a write while the memory its queue holds is below the buffer's size
    (sk_stream_memory_free), each segment's overhead counted: so the measure is free
    memory, not octets queued.  A client with a small window gets segments of a few
    hundred octets, and 1.7 MB of replies filled a 4 MiB buffer."""
    try:
        info = sock.getsockopt(_socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return False
    if len(info) < _MEMINFO.size:
        return False
    counters = _MEMINFO.unpack(info)
    return counters[3] - counters[5] >= LINE_ROOM


def close_tls(sock: ssl.SSLSocket, discard: bool) -> None:
    """Send our close_notify, then close: without it OpenSSL 3 clients report the end of
    the session as a truncation ("unexpected eof").  The peer's close_notify is not
    awaited (RFC 8446 6.1), so this never blocks; the TLS wrapper owns the descriptor.
    ``discard``: the server ends the session (see discard_unread)."""
    try:
        sock.unwrap()
    except (OSError, ValueError):  # ssl.SSLError is an OSError: not established, peer gone
        pass
    if discard:
        discard_unread(sock)
    sock.close()


def wait_alone(fd: int, deadline: float, events: int) -> bool:
    """Wait until ``fd`` is ready for ``events``, watching nothing else (not the worker's
    signals, not the master's death): False once the monotonic ``deadline`` has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    waiter = select.poll()
    waiter.register(fd, events)
    return bool(waiter.poll(left * 1000))


def drive_handshake(ssock: ssl.SSLSocket, deadline: float, wait: Callable[[float, int], bool]) -> bool:
    """Run the server side of a handshake on a non-blocking TLS socket: True once it is
    done, False when ``wait(deadline, events)`` gives up; TLS and socket errors
    propagate.  A session bounds it by its command timeout, a refusal by a second."""
    while True:
        try:
            ssock.do_handshake()
            return True
        except ssl.SSLWantReadError:
            events = _POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        if not wait(deadline, events):
            return False


def ack_now(sock: ssl.SSLSocket) -> None:
    """Acknowledge at once what the client sent last (TCP_QUICKACK), where the kernel
    would hold the ACK back 40 ms or more (up to 200) for a reply to ride on.

    A handshake that ends on the client's flight leaves the server nothing to say: a
    resumed TLS 1.2 one ends with the client's Finished, and so would TLS 1.3 without
    the session tickets OpenSSL now sends after it.  A client that leaves Nagle's
    algorithm on (Python's smtplib does) then holds its EHLO until that flight is
    acknowledged: on loopback every resumed TLS 1.2 session waited 44 ms for its EHLO,
    and cost more server CPU than a full handshake.  Called after every handshake: where
    no ACK is pending it costs the call and, at most, one bare ACK of the EHLO.  Best
    effort: the socket may already be gone."""
    if not _TCP_QUICKACK:
        return  # not Linux: no such option
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except OSError:
        pass


def _quoted(name: str) -> str:
    """A user name as the log shows it: in single quotes, escaped as ``repr`` escapes,
    which would switch to double quotes for a name that holds a single quote."""
    return "'" + "".join("\\" + c if c in "\\'" else c if c.isprintable()
                         else c.encode("unicode_escape").decode("ascii") for c in name) + "'"


#: A reset seen by the handshake: ENOTCONN where it came before the socket was wrapped.
_RESET_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE, errno.ECONNABORTED})


def _os_reason(exc: Exception) -> str:
    """An error the handshake met, as the log shows it: one wording for a client that
    reset the connection, whichever call saw it; the system's text without Python's
    ``[Errno N]``."""
    if isinstance(exc, OSError) and exc.errno in _RESET_ERRNOS:
        return "connection reset by the client"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class Stop(Exception):
    """The worker must stop now (SIGQUIT or the master died): 421 and close."""


class Connection:
    def __init__(self, worker: Worker, sock: _socket.socket, peer: tuple, session: Session, timeouts,
                 implicit_tls: bool = False) -> None:
        self.worker = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.data_recv_size = _data_recv_size  # read once: a module global is a dict lookup
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
        self._client_readable = [(self.fd, select.POLLIN)]  # what poll() returns most often
        self._beat = now
        for fd in worker.wake_fds:
            self.poller.register(fd, select.POLLIN)
        self.close_reason = "client quit"
        self.implicit_tls = implicit_tls
        self.tls_info = ""
        self._client_wait_marked = False

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        session = self.session
        try:
            if not self._greet():
                return
            while True:
                self._flush()
                if session.closed:
                    self.worker.session_over()
                    reply = session.close_reply
                    if self.close_reason == "client quit" and reply is not None and reply.code != 221:
                        self.close_reason = f"closed by server: {reply}"
                    return
                data = self._recv()
                if data is None:
                    self.close_reason = "timeout"
                    session.close(R.R421_TIMEOUT)
                elif not data:
                    self.close_reason = "client disconnected"
                    return self._drain_session_log()  # the finally clause writes the log
                else:
                    session.receive_data(data)
                    self._pump()
        except (Stop, MasterGone):  # MasterGone: AUTH's failure limit waited for the lock
            self.close_reason = "server stopping"
            session.close(R.R421_SHUTDOWN)
            self._flush(final=True)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self.close_reason = "client disconnected"  # TLS seen to end while replying
        except ssl.SSLError as exc:  # its errno is OpenSSL's code, not a system error
            self.close_reason = f"TLS error: {exc.reason or exc}"
        except OSError as exc:
            self.close_reason = f"I/O error: {os.strerror(exc.errno) if exc.errno else exc}"
        finally:
            if self.txn is not None:
                self.txn.abort()
                self.txn = None
            discard = self.close_reason not in _CLIENT_ENDED
            if isinstance(self.sock, ssl.SSLSocket):
                close_tls(self.sock, discard)
            elif discard:  # the worker closes the plain socket
                discard_unread(self.sock)
            session.end_log()
            self._drain_session_log()
            self.log.queue("CLOSE", f"{self.peer_ip} {self.close_reason}")
            self.log.flush()

    def _greet(self) -> bool:
        if self.implicit_tls and not self._handshake():
            return False
        delay = self.worker.greeting_delay
        if delay > 0 and self._wait(time.monotonic() + delay):
            if self._hung_up():  # no octets: not early talk, and no one to tell
                self.close_reason = "client disconnected"
                return False
            # RFC 5321 4.3.1: the client must wait for the greeting. Early talkers are
            # almost always bots; Postfix's postscreen rejects them the same way.
            self.close_reason = "early talker"
            self.worker.count_conn_reject(EARLY_TALKER)
            self.session.close(R.R521_EARLY_TALKER)
            # A refused connection counts under connections_rejected alone, as the 421s
            # of the limits do, not among the replies of sessions (messages_rejected).
            self.session.error_codes.clear()
            self._flush(final=True)
            return False
        self.session.start()
        return True

    def _hung_up(self) -> bool:
        """The socket turned readable before the greeting: did the client end the
        connection (a FIN, a reset, a TLS close_notify), which wakes a poll as octets do?
        A plain socket is peeked at; a TLS one read, as a record cannot be peeked at and
        what it holds goes unanswered either way."""
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                return self.sock.recv(1) == b""
            return _socket.socket.recv(self.sock, 1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False  # part of a TLS record, or gone again: octets all the same
        except (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
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
                    try:
                        self.txn.write(event.data)
                    except OSError as exc:
                        self._storage_failed(exc)
            elif type(event) is DataStart:
                self._data_start(event)
            elif type(event) is DataEnd:
                self._data_end(event)
            elif type(event) is StartTLS:
                self._starttls()
            elif type(event) is AuthRequest:
                self._authenticate(event)

    # -- STARTTLS and AUTH ---------------------------------------------------------------

    def _starttls(self) -> None:
        """220 goes out in plaintext, then the handshake; the session then starts over."""
        self._flush()
        if self._handshake():
            self.session.tls_started()
            # The wait for the new EHLO starts now: a slow handshake (bounded by the
            # command timeout on its own) must not use up the client's turn as well.
            self.request_start = time.monotonic()
        else:
            self.session.closed = True

    def _handshake(self) -> bool:
        """TLS handshake on the non-blocking socket, bounded by the command timeout."""
        context = self.worker.tls_context
        assert context is not None  # STARTTLS and implicit TLS exist only with a context
        try:
            # ssl wraps the C socket as it wraps socket.socket (typeshed asks for the latter).
            ssock = context.wrap_socket(self.sock, server_side=True,  # type: ignore[arg-type]
                                        do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            return self._tls_failed(exc)
        self.sock = ssock
        # The worker's command timeout is the short one under stress (as Postfix's
        # smtpd_starttls_timeout); a stalled handshake must not hold a worker longer.
        deadline = min(time.monotonic() + self.worker.command_timeout, self.session_deadline)
        try:
            done = drive_handshake(ssock, deadline, self._wait)
        except (ssl.SSLError, OSError) as exc:
            return self._tls_failed(exc)
        if not done:
            return self._tls_failed(TimeoutError("handshake timed out"))
        ack_now(ssock)
        self.tls_info = tls.describe(ssock)
        resumed = bool(ssock.session_reused)
        self.log.queue("TLS", f"{self.peer_ip} {self.tls_info}{' resumed' if resumed else ''}")
        self.worker.count_tls(True, resumed)
        return True

    def _tls_failed(self, exc: Exception) -> bool:
        reason = getattr(exc, "reason", None) or _os_reason(exc)
        self.close_reason = f"TLS handshake failed: {reason}"
        self.log.queue("TLS", f"{self.peer_ip} handshake failed: {reason}", WARNING)
        self.worker.count_tls(False)
        return False

    def _authenticate(self, event: AuthRequest) -> None:
        creds = event.credentials
        w = self.worker
        self._drain_session_log(release=True)  # the AUTH command's line first, then the outcome
        verdict = w.auth_attempt(self.peer_ip)
        if w.quitting:  # SIGQUIT (or the master's death) came while it waited
            if verdict == authlimit.ALLOWED:  # a slot freed in that instant: not kept
                w.auth_finished(self.peer_ip, True)
            raise Stop()
        if verdict == authlimit.REFUSED:
            self.log.queue("AUTH", f"{self.peer_ip} refused: too many failures", WARNING)
            self.session.close(R.R421_AUTH_FAILURES)
            return
        if verdict != authlimit.ALLOWED:  # BUSY or SATURATED for all of AUTH_WAIT
            self.log.queue("AUTH", f"{self.peer_ip} deferred: {authlimit.DEFERRED_TEXT[verdict]}", WARNING)
            w.count_auth_deferred()
            self.session.auth_deferred()
            return
        user: str | None = None
        try:
            user = auth.check(w.passwords, creds.username, creds.password, creds.authzid)
        finally:
            w.auth_finished(self.peer_ip, user is not None)
        ok = user is not None
        w.count_auth(ok)
        outcome = "ok" if ok else "failed"
        if not ok and auth.acts_for_another(creds.username, creds.authzid):
            outcome += f" (authzid={_quoted(creds.authzid[:64])}: no proxy authorization)"
        self.log.queue("AUTH", f"{self.peer_ip} {creds.mechanism} user={_quoted(creds.username[:64])} {outcome}",
                       INFO if ok else WARNING)
        self.session.auth_result(ok, user or creds.username)

    # -- storage -------------------------------------------------------------------------

    def _data_start(self, event: DataStart) -> None:
        session = self.session
        w = self.worker
        info = delivery.HeaderInfo(
            sender=event.envelope.sender.address, helo=session.helo_name, peer_ip=self.peer_ip,
            by=session.config.hostname, protocol=session.protocol,
            queue_id=f"{w.id_prefix}{next(_ids):X}", when=time.time(),
            tls=self.tls_info, auth_user=session.auth_user)
        try:
            self.txn = delivery.Transaction(w.router, event.envelope.recipients, info)
        except OSError as exc:
            session.reply(self._storage_error("cannot open Maildir file", exc))
            return
        declared = event.envelope.params.get("SIZE")
        if declared:
            full = self.txn.room_for(int(declared))
            if full is not None:
                self.txn.abort()
                self.txn = None
                session.reply(self._storage_error("no room for the message", full, forget=False))
                return
        self.data_start = time.monotonic()
        self.data_bytes = 0
        session.accept_data()

    def _storage_failed(self, exc: OSError) -> None:
        """A write failed while the message streams in (a full disk): drop the copies
        now, keep reading to the final dot, then answer 451/452 in step with the client."""
        if self.txn is not None:
            self.txn.abort()
        self.txn = None
        self.txn_error = self._storage_error("delivery failed", exc)

    def _storage_error(self, what: str, exc: OSError, forget: bool = True) -> R.Reply:
        """Log a storage failure, forget cached Maildirs (one may have been removed or
        replaced; the next message re-creates it) unless nothing failed but a check,
        and give the 451/452 to answer."""
        self._drain_session_log(release=True)  # the command that met the failure comes first
        where = maildir.blamed(exc)
        self.log.queue("ERROR", f"{what} in {where}: {exc}" if where else f"{what}: {exc}", ERROR)
        if forget:  # a failure, not a check (room_for) that a smaller message may pass
            self.worker.router.forget()
            if where:
                self.worker.router.defer(where, exc)
        if where and not (os.path.isdir(where + "/tmp") and os.path.isdir(where + "/new")):
            self.worker.call_for_maildirs()  # gone, and this worker could not make it again
        return delivery.storage_reply(exc)

    txn_error: R.Reply | None = None
    stored = False

    def _data_end(self, event: DataEnd) -> None:
        txn, self.txn = self.txn, None
        if txn is None or event.error is not None:
            if txn is not None:
                txn.abort()
            reply, self.txn_error = event.error or self.txn_error or R.R451_STORAGE, None
            self.session.reply(reply)
            return
        # The lines so far (DATA, "<message: N octets>") are stamped now, when the final
        # dot came, not after the fsyncs; and the log stays in order: commands, then the
        # storage error or the store.
        self._drain_session_log(release=True)
        try:
            paths = txn.commit()
        except OSError as exc:
            self.session.reply(self._storage_error("delivery failed", exc))
            return
        for path in paths:
            self.log.queue("STORE", path)
        self.stored = True  # the log is written right after this 250 goes out (_flush)
        self.worker.count_message(event.size)
        self.session.reply(R.R250_ACCEPTED)

    # -- socket I/O ----------------------------------------------------------------------

    def _flush(self, final: bool = False) -> None:
        session = self.session
        out = session.data_to_send()
        if session.log or session.error_codes:
            self._drain_session_log()
        if out:
            try:
                if session.closed:
                    self._send_last(out, final)
                else:
                    self._sendall(out, final)
            except OSError:
                if not final:
                    raise
            # The command timeout runs from the last reply: bytes trickled into a
            # command line with no reply coming must not extend it (a slowloris).
            self.request_start = time.monotonic()
        if final or self.stored:
            # Written right after the 250 that acknowledges a message, not before it: a
            # write held up behind fifty workers' writes to the same file, or by a slow
            # log file system, must not hold the acknowledgement (with the log first, the
            # ack p99 rose by a tenth at 50 sessions), nor turn a hung log into clients
            # that time out and send again mail already stored.  Postfix's logging does
            # not hold its replies either.  The cost: a worker killed in that instant
            # leaves its session unlogged, though the master logs the kill.
            self.stored = False
            self.log.flush()

    def _drain_session_log(self, release: bool = False) -> None:
        """Queue the session's lines.  ``release``: the caller logs an outcome next (a
        store, a storage error, an AUTH verdict); the lines that led to it, which a
        long session holds back until it knows they matter, come first."""
        session = self.session
        if release:
            session.release_log()
        if session.log:
            self.log.queue_many("SMTP", session.log)
            session.log.clear()
        if session.error_codes:
            self.worker.count_rejects(session.error_codes)
            session.error_codes.clear()

    def _send_last(self, out: bytes, final: bool) -> None:
        """Send the session's last replies, giving its counts back before the last one
        (the 221, a closing 421) when that one goes at once: after it, a client that
        connects again the moment it reads the reply races the release (54 and 144 of
        2,000 such reconnections refused at a per-IP limit of 1).  Not when the reply
        has to wait for a client that does not read: the session then holds its worker,
        and still counts.  Replies pipelined before the last one are sent first, since
        only then can the kernel tell whether the last one fits; the second send goes on
        with the deadline the first left (renewed by what the client took), so splitting
        them does not lengthen the wait."""
        deadline = self._send_deadline(final)
        before = out.rfind(b"\r\n", 0, len(out) - 2)  # the last reply is one line
        if before >= 0:
            deadline = self._sendall(out[:before + 2], final, deadline) or deadline
            out = out[before + 2:]
        if room_for_a_line(self.sock):
            self.worker.session_over()
        self._sendall(out, final, deadline)

    def _send_deadline(self, last: bool) -> float:
        """When a send that has to wait gives up.  A client that stops reading holds the
        worker no longer than one that stops writing: the command timeout (the shorter
        one in stress mode), and never past the session deadline.  ``last``: the reply
        that closes the session from the server's side (the 421 of an immediate stop,
        the 521 of an early talker) waits LAST_REPLY_WAIT at most: the worker is on its
        way out, and a client that does not read must not hold it until the master's
        SIGKILL."""
        now = time.monotonic()
        if last:
            return now + LAST_REPLY_WAIT
        return min(now + self.worker.command_timeout, self.session_deadline)

    def _sendall(self, data: bytes, last: bool = False, deadline: float | None = None) -> float | None:
        """Send all of ``data``, or raise OSError once ``deadline`` (by default, from
        _send_deadline now) has passed.  ``last``: the worker is on its way out, so it
        waits for the socket alone, not for the master's signals.  Returns the deadline
        as the send left it (renewed, or as given), for a send that follows."""
        # Over TLS, one record a call: SSLSocket.send takes a whole buffer or raises
        # SSLWantWriteError (and must then be called again with the same buffer), so
        # only a record at a time shows the client's progress to the renewal below.
        step = _TLS_RECORD if self.sock.__class__ is ssl.SSLSocket else len(data)
        try:  # the common case: a reply fits the socket buffer at once
            sent = self.sock.send(data if step >= len(data) else data[:step])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        if sent == len(data):
            return deadline
        view = memoryview(data)[sent:]
        # A client that reads, however slowly, has not stopped reading: each part of the
        # reply it takes gives it the command timeout again for the next, as Postfix
        # times each write.  Not for the worker's last reply, nor in a session begun
        # under stress, where the wait is one deadline for the whole reply.
        renew = not last and not self.worker.stressed
        if deadline is None or (sent and renew):
            deadline = self._send_deadline(last)
        while view:
            try:
                sent = self.sock.send(view[:step])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                events = _POLLIN if isinstance(exc, ssl.SSLWantReadError) else select.POLLOUT
                if not (wait_alone(self.fd, deadline, events) if last else self._wait(deadline, events)):
                    raise OSError(errno.ETIMEDOUT, "send timed out")
                continue
            view = view[sent:]
            if renew:
                deadline = self._send_deadline(False)
        return deadline

    def _poll(self, timeout: float, quiet_after: float = QUIET_DELAY) -> list:
        if timeout > quiet_after:
            ready = self.poller.poll(quiet_after * 1000)
            if ready:
                return ready
            self._quiet()
            timeout -= quiet_after
        return self.poller.poll(timeout * 1000)

    def _quiet(self) -> None:
        """The client is slow: let the operator see the session so far, in the log, in
        ps and in the stats; and tell the master this worker is alive, and held."""
        self._mark_client_wait(time.monotonic() - QUIET_DELAY)
        self.log.flush()
        self.worker.show_phase(self.session.phase)

    def _mark_client_wait(self, since: float) -> None:
        """Mark the slot: this worker has waited on its client since ``since``.  Only
        _wait marks, and it clears the mark as it returns."""
        if not self._client_wait_marked:
            self._client_wait_marked = True
            self.worker.client_waits(since)

    def _deadline(self) -> float:
        t = self.timeouts
        if self.session.in_data:
            deadline = self.data_start + t.data_done
            if t.min_data_rate > 0:  # 0 turns the minimum rate off
                deadline = min(deadline, self.data_start + t.data_block + self.data_bytes / t.min_data_rate)
        else:
            deadline = self.request_start + self.worker.command_timeout
        return min(deadline, self.session_deadline)

    def _recv(self) -> bytes | None:
        """Bytes from the client, b"" at EOF, None when the deadline passed."""
        while True:
            now = time.monotonic()
            if now - self._beat > HEARTBEAT_EVERY:  # a long, brisk session is alive too
                self._beat = now
                self.worker.heartbeat()
            limit = self._deadline() - now
            if self.session.in_data:
                limit = min(limit, self.timeouts.data_block)
            # TLS may hold decrypted bytes the kernel no longer reports as readable.
            if not (self.tls_info and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                if limit <= 0:
                    return None
                # The usual case, first: the client answers within CLIENT_WAIT_MARK and
                # nothing else happened.  Anything else takes the general path.
                ready = self.poller.poll(CLIENT_WAIT_MARK_MS) if limit > QUIET_DELAY else None
                if ready != self._client_readable and not self._wait(now + limit, first=ready):
                    return None
            try:
                if self.session.in_data:  # large reads: one copy, straight into bytes
                    data = self.sock.recv(self.data_recv_size)
                    # The minimum rate counts what arrives, not what is stored: a message
                    # already refused (a bare LF, a long line) stores nothing, yet its
                    # client keeps sending and must reach the final dot to get the 5xx.
                    self.data_bytes += len(data)
                    return data
                n = self.sock.recv_into(_recv_buffer)
                return bytes(_recv_buffer[:n])
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                return b""
            # Any other ssl.SSLError (a record that fails its check, a renegotiation
            # refused) propagates: run() logs it as "TLS error: ...", not as the client's
            # ordinary leave-taking.

    def _wait(self, deadline: float, events: int = _POLLIN, first: list | None = None) -> bool:
        """Wait until the socket is ready: False once the monotonic ``deadline`` has
        passed, Stop when the worker must quit.  A signal (SIGTERM: finish this session)
        is not a timeout.  ``first``: what a poll of CLIENT_WAIT_MARK, begun within the
        same deadline, returned (empty: it timed out)."""
        if events != _POLLIN:
            self.poller.modify(self.fd, events)
        try:
            if first is None and deadline - time.monotonic() > QUIET_DELAY:
                # A send, a handshake, the greeting delay: marked at the same point.
                first = self.poller.poll(CLIENT_WAIT_MARK_MS)
            if first is not None and not first:  # the client has kept us CLIENT_WAIT_MARK
                self._mark_client_wait(time.monotonic() - CLIENT_WAIT_MARK)
                ready = self._poll(max(deadline - time.monotonic(), 0.0), QUIET_DELAY - CLIENT_WAIT_MARK)
            elif first:
                ready = first
            else:
                ready = self._poll(max(deadline - time.monotonic(), 0.0))
            while True:
                self.worker.heartbeat()
                ok = False
                for fd, _ in ready:
                    if fd == self.fd:
                        ok = True
                    else:
                        self.worker.on_wake(fd)
                if self.worker.quitting:
                    raise Stop()
                if ok or time.monotonic() >= deadline:
                    return ok
                ready = self._poll(max(deadline - time.monotonic(), 0.0))
        finally:
            if self._client_wait_marked:
                self._client_wait_marked = False
                self.worker.client_waits(0.0)
            if events != _POLLIN:
                self.poller.modify(self.fd, _POLLIN)
