"""A worker process: accept a connection, serve its SMTP session, repeat.

Workers are simple and disposable.  Each one waits in its own epoll on the shared
listening sockets with ``EPOLLEXCLUSIVE``, so a new connection wakes one idle worker
instead of the whole pool (the thundering herd of a plain ``select`` loop), plus the
signal wake-up pipe and the master's parent-death pipe.  Its state lives in its own
scoreboard slot, which the master reads for stats, pool decisions and the stuck-worker
check; the counts it holds there are repaired by the master if it dies.

Signals (handlers only set a flag; the wake-up fd interrupts any wait):
  SIGTERM  finish the current session, then exit (graceful stop, reload, retire)
  SIGQUIT  answer 421 to the current session at once and exit
  SIGINT and the master's other signals are ignored: Ctrl-C reaches the whole process
  group, and it is the master's job to turn it into an orderly stop.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import random
import select
import signal
import socket
import _socket
import time
from typing import Any, Callable, Final, Protocol, Sequence

from . import authlimit, delivery, limits, process
from .connection import Connection, close_tls, discard_unread, drive_handshake, wait_alone
from .listeners import client_ip
from .logs import WARNING, Log
from .scoreboard import MasterGone, Scoreboard
from .security import Security
from .signals import MAILDIR_CALL, MAILDIR_CALL_EVERY, POOL_CALL
from .smtp.replies import R421_SHUTDOWN
from .smtp.session import Session, SessionConfig

EXIT_OK: Final = 0
#: The exit status of a worker that failed so early that not even its crash line could
#: be written.  The master treats every non-zero status alike (a crash; worker lifetimes,
#: not statuses, decide the back-off); this one only tells the case apart in a trace.
EXIT_BOOT_ERROR: Final = 3
#: Seconds a refused SMTPS client gets, all told, to finish its handshake and read its
#: 421: each refusal holds a worker that long at most, so one address over its limit
#: cannot keep the pool busy with connections that never finish a handshake.
REFUSAL_TLS_TIMEOUT: Final = 1.0
#: accept() failing for want of a resource (fds, memory): the connection stays queued for
#: a worker that can take it, and this one pauses so as not to spin on it.
_ACCEPT_SHORTAGE: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Errors of the connection being accepted, which Linux reports through accept(): accept(2)
#: asks that they be retried like EAGAIN (the next connection is unaffected), and lists
#: the others a kernel may give for one connection (EPERM: firewall rules forbid it).
#: Any other error ends the worker, loudly, through the crash-loop back-off.
_ACCEPT_RETRY: Final = frozenset({errno.EPROTO, errno.ENOPROTOOPT, errno.ENETDOWN, errno.ENETUNREACH,
                                  errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                                  getattr(errno, "ENONET", errno.ENETDOWN), errno.EPERM,
                                  errno.ETIMEDOUT, getattr(errno, "ENOSR", errno.EPROTO),
                                  errno.ESOCKTNOSUPPORT, errno.EPROTONOSUPPORT})
ACCEPT_PAUSE: Final = 0.1
# Longest wait in the accept loop: the heartbeat's period, and how long a connection that
# no wake-up announced can wait for an idle worker (Worker._take_left_behind).
TURN: Final = 1.0
# How long an AUTH waits while the password checks running for its address fill the
# failure limit (then 454 4.7.0), and how often it looks again.
AUTH_WAIT: Final = 5.0
AUTH_WAIT_STEP: Final = 0.02
AUTH_RELOOK: Final = 0.5
#: Sessions within AUTH_NEAR x max_checks of the queue's front look every
#: AUTH_WAIT_STEP; the rest every AUTH_FAR_STEP, far less than the time the queue takes
#: to bring them near (at about 60 ms a check, 16 of them take a second).
AUTH_NEAR: Final = 16
AUTH_FAR_STEP: Final = 0.25

# What set_wakeup_fd writes for each signal: its number, one octet.
_TERM_OCTET: Final = bytes([signal.SIGTERM])
_QUIT_OCTET: Final = bytes([signal.SIGQUIT])
_IGNORED: Final = (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGTTIN, signal.SIGTTOU)


def networks(cidrs: Sequence[str]) -> list:
    """A config's networks (its checks have already parsed each), as in_networks takes
    them."""
    return [ipaddress.ip_network(n, strict=False) for n in cidrs]


def in_networks(ip: str, nets: list) -> bool:
    """``ip`` (as client_ip gives it: an IPv4 client of a dual-stack socket in its IPv4
    form) is in one of ``nets``."""
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in nets)


class Poller(Protocol):
    """What the accept loop uses of ``select.epoll`` (a test wraps one to time a signal)."""

    def register(self, fd: int, eventmask: int, /) -> None: ...
    def unregister(self, fd: int, /) -> None: ...
    def poll(self, timeout: float, /) -> list[tuple[int, int]]: ...


class Worker:
    def __init__(self, cfg, listeners: list[socket.socket], board: Scoreboard, slot: int,
                 generation: int, parent_fd: int, log: Log, security: Security = Security(),
                 want_fd: int = -1) -> None:
        self.cfg = cfg
        # TLS context, password table, implicit-TLS listener fds and the AUTH limiter,
        # all built by the master before it forked (see security.Security).
        self.tls_context = security.tls_context
        self.passwords = security.passwords
        self.implicit_fds = security.implicit_fds
        self.auth_limiter = security.auth_limiter
        self.conn_rate = security.conn_rate
        # Per listening fd: the socket, its C-level accept, and the family, type and
        # protocol of what it accepts.  socket.socket.accept() is Python code that converts
        # the family and the type to enums on every call, and socket.socket.close() is
        # Python code too: 8 % of a busy worker's user time.  Connections are plain C
        # sockets (_socket.socket), which ssl wraps as it wraps any socket.
        self.listeners: dict[int, tuple[socket.socket, Callable[[], tuple[int, Any]], int, int, int]] = {
            s.fileno(): (s, s._accept, int(s.family), int(s.type), s.proto)  # type: ignore[attr-defined]
            for s in listeners}
        self.board = board
        self.slot = slot
        self.generation = generation
        self.parent_fd = parent_fd
        self.want_fd = want_fd  # the master's pipe for a call for more workers (_pool_dry)
        self.log = log
        self.stopping = False
        self.quitting = False
        self.served = 0
        # The session being served began in stress mode: its timeouts are the short ones,
        # and a wait to send counts as one deadline however the client reads (stricter
        # than Postfix's smtpd_per_record_deadline under stress, which times each reply:
        # workers are scarce then, and a batch is bounded by one read's replies).
        self.stressed = False
        self._shortage_warning = limits.Seldom(60.0)
        self._maildirs_call = limits.Seldom(MAILDIR_CALL_EVERY)
        self._reserve_fd = -1  # opened in _setup: spent to answer 421 when accept() finds no fd
        self.pid = 0

    # -- set-up in the child -------------------------------------------------------------

    def prepare(self) -> None:
        """First steps after fork, before any privilege drop (the scoreboard lock file
        lives in the master's private directory)."""
        self.pid = os.getpid()
        process.batch_scheduling()  # workers only: the master stays prompt to signals
        process.oom_first()
        self.log.after_fork()
        self.board.after_fork(self.slot)
        self.board.set_pid(self.slot, self.pid)
        self._signals()

    def _setup(self) -> None:
        cfg = self.cfg
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.router = delivery.Router(cfg.delivery.maildir, cfg.delivery.mailboxes, cfg.delivery.fsync,
                                      cfg.delivery.local_domains)
        self.router.on_gone = self.call_for_maildirs
        self.session_cfg = self._session_config(cfg.limits.max_errors, cfg.limits.max_junk_commands)
        self.stress_cfg = self._session_config(cfg.limits.stress_max_errors,
                                               cfg.limits.stress_max_junk_commands)
        self.normalize_nets = networks(cfg.limits.normalize_networks)
        self.exempt_nets = networks(cfg.server.limit_exceptions)
        # The greeting delay only exists to catch early talkers (a postscreen-style
        # pregreet test); without the rejection there is no reason to make clients wait.
        self.greeting_delay = cfg.server.greeting_delay if cfg.server.reject_early_talkers else 0.0
        self.command_timeout = cfg.timeouts.command
        # Called when dry: to restore the spares, or, with none kept, to have the master
        # watch the listen queues at once rather than from its next tick (up to a second
        # away) while a client waits there; not where the pool cannot grow.
        self.call_when_dry = (cfg.server.min_spare_workers > 0
                              or cfg.server.max_workers > cfg.server.workers)
        # The Received: id is an RFC 5321 Atom, so no '.' (not atext) in it.
        self.id_prefix = f"{int(time.time()):X}{self.pid:X}-"
        jitter = cfg.server.max_sessions_jitter
        self.max_sessions = cfg.server.max_sessions_per_worker + random.randint(0, max(jitter, 0))
        self.epoll: Poller = select.epoll()
        exclusive = select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0)
        for fd in self.listeners:
            self.epoll.register(fd, exclusive)
        self.wake_fds = (self.wake_r, self.parent_fd)
        for fd in self.wake_fds:
            self.epoll.register(fd, select.EPOLLIN)
        # The listen queues as they are, looked at without joining their wait queues
        # (a poll of no time): see _take_left_behind.
        self.backlogs = select.poll()
        for fd in self.listeners:
            self.backlogs.register(fd, select.POLLIN)

    def _session_config(self, max_errors: int, max_junk_commands: int) -> SessionConfig:
        cfg = self.cfg
        return SessionConfig(
            cfg.server.hostname, max_message_size=cfg.limits.max_message_size,
            max_recipients=cfg.limits.max_recipients, max_errors=max_errors,
            max_junk_commands=max_junk_commands,
            max_received_headers=cfg.limits.max_received_headers,
            local_domains=cfg.delivery.local_domains,
            normalize_bare_newlines=cfg.limits.bare_newline == "normalize",
            log_commands=self.log.level <= 20,
            starttls=self.tls_context is not None,
            require_tls=cfg.tls is not None and cfg.tls.require_tls,
            auth=cfg.auth is not None,
            auth_insecure=cfg.auth is not None and cfg.auth.allow_insecure,
            auth_required=cfg.auth is not None and cfg.auth.required,
            recipient_check=self.router.deferral)

    def _signals(self) -> None:
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGQUIT, self._on_quit)
        for sig in _IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(wake_w)

    def _on_term(self, signum, frame) -> None:
        self.stopping = True

    def _on_quit(self, signum, frame) -> None:
        self.quitting = True

    # -- the accept loop -----------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except MasterGone:
            # Waited for the admission lock behind a holder only the master could kill,
            # and the master is gone: nobody reads the scoreboard any more.
            self.log.flush()
            return EXIT_OK

    def _run(self) -> int:
        self._setup()
        # Ready: idle from now on (a worker left STARTING would never be retired by the
        # pool).  An idle worker does not touch its slot while it waits: last_activity is
        # then the moment it became idle, the clock of the pool's max_idle.
        self.board.set_idle(self.slot, time.monotonic())
        self.board.set_available(self.slot, True)
        self._title("idle")  # only now: the master counts it as starting until here
        took = False  # the last turn served a connection found in a listen queue
        while self._accepting():
            # After such a session, look again at once: more may have been left there.
            events = self.epoll.poll(0.0 if took else TURN)
            self.board.beat(self.slot, time.monotonic())
            if not events:
                took = self._take_left_behind()
                continue
            took = False
            # Listeners first.  With EPOLLEXCLUSIVE this worker alone was woken for the
            # connection waiting there; if a SIGTERM (a reload, a graceful stop) came at
            # the same moment and the worker let it be, nothing would wake another
            # worker for it until the next connection arrived.  So it is served: only
            # SIGQUIT (stop now) leaves it.
            for fd, _ in events:
                if fd in self.listeners and not self.quitting:
                    self._accept(fd)
            for fd, _ in events:
                if fd in self.wake_fds:
                    self.on_wake(fd)
        self.board.set_available(self.slot, False)
        self.board.set_stopping(self.slot)
        return EXIT_OK

    def _take_left_behind(self) -> bool:
        """A turn with nothing to wake this worker: take a connection waiting in a listen
        queue all the same; whether it served one.  With EPOLLEXCLUSIVE the kernel wakes
        one waiting worker per connection, and no other for it; if that one is killed,
        stopped or stalled before it accepts (the OOM killer, a debugger, an operator's
        kill), the connection waits until the next one arrives, minutes on a quiet
        server, while every other worker sleeps.  Idle workers look each turn, so it
        waits about a second at most.  The look costs a poll(2) of no time a second per
        idle worker."""
        # self.backlogs holds exactly the listeners (_drop_listener takes a fd from both).
        for fd, _ in self.backlogs.poll(0):
            if not (self.stopping or self.quitting) and self._accept(fd):
                return True  # one session, then back to the signals and the wake-ups
        return False

    def _accepting(self) -> bool:
        """Whether this worker takes another connection after the current one."""
        return not (self.stopping or self.quitting) and self.served < self.max_sessions

    def _accept(self, fd: int) -> bool:
        """Accept a connection waiting on listener ``fd`` and serve its session; whether
        there was one to serve."""
        _, accept, family, type_, proto = self.listeners[fd]
        try:
            conn_fd, peer = accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False  # another worker took it, or the client already left
        except OSError as exc:
            if exc.errno in _ACCEPT_RETRY:
                return False
            if exc.errno == errno.EINVAL:  # a reload removed it (listeners.stop_listening)
                self._drop_listener(fd)
                return False
            if exc.errno not in _ACCEPT_SHORTAGE:
                raise
            # Out of fds or memory: exiting would only start a crash loop.
            if self._shortage_warning.allow(time.monotonic()):
                self.log.line("WORKER", f"cannot accept a connection: {exc.strerror}", WARNING)
            if not self._refuse_with_reserve(accept):
                time.sleep(ACCEPT_PAUSE)
            return False  # not to be tried again at once
        try:
            sock = _socket.socket(family, type_, proto, conn_fd)
        except BaseException:
            os.close(conn_fd)
            raise
        try:
            sock.setblocking(False)
            self._serve(sock, peer, fd in self.implicit_fds)
        finally:
            sock.close()
        return True

    def _refuse_with_reserve(self, accept: Callable) -> bool:
        """Out of fds: give up the one held in reserve for this, accept the connection
        and answer it 421 4.3.2, so that its client hears at once rather than waiting
        (with EPOLLEXCLUSIVE this worker alone was woken for it).  False when there is
        no reserve, or the accept failed all the same."""
        if self._reserve_fd < 0:
            return False
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        try:
            try:
                conn_fd, peer = accept()
            except OSError:
                return False
            try:
                os.write(conn_fd, limits.reply_for(limits.OTHER_REASON).wire(True))
            except OSError:
                pass
            finally:
                os.close(conn_fd)
        finally:  # taken back at once, in the number the connection just gave up
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        self.count_conn_reject(limits.OTHER_REASON)
        self.log.queue("CLOSE", f"{client_ip(peer[0])} refused: out of file descriptors or memory", WARNING)
        self.log.flush()
        return True

    def _serve(self, sock: _socket.socket, peer: tuple, implicit_tls: bool = False) -> None:
        ip = client_ip(peer[0])
        if ip != peer[0]:
            peer = (ip, *peer[1:])
        now = time.monotonic()
        self.board.set_busy(self.slot, peer, now)
        self._client = ip
        # The title says "busy" only once the client goes quiet (show_phase): a brisk
        # session is over before anyone could read it, and each title write is a prctl.
        self.titled_phase = ""
        self.log.queue("CONN", ip)
        self.served += 1  # counted from its start: _accepting() then speaks of the next one
        try:
            try:
                server = self.cfg.server
                exempt = bool(self.exempt_nets) and in_networks(ip, self.exempt_nets)
                # Counted before the concurrent limits and whatever they decide: a client
                # that hammers stays refused (as Postfix's anvil counts every connect).
                over_rate = (server.max_connection_rate > 0 and not exempt and self.conn_rate is not None
                             and self.conn_rate.count(ip, now) > server.max_connection_rate)
                refused = self.board.admit(self.slot, ip, server.max_connections,
                                           0 if exempt else server.max_connections_per_ip, over_rate)
            except MasterGone:  # waited behind a stopped holder the master can no longer kill
                return self._master_gone(sock, ip, implicit_tls)
            if refused is not None:
                return self._refuse(sock, ip, refused, implicit_tls)
            if self.call_when_dry and self.board.idle_workers() <= 0:
                self._pool_dry()
            stress = self.stressed = self.board.in_stress()
            self.command_timeout = self.cfg.timeouts.stress_command if stress else self.cfg.timeouts.command
            session = Session(self.stress_cfg if stress else self.session_cfg,
                              normalize=self._normalize_for(ip), tls=implicit_tls)
            Connection(self, sock, peer, session, self.cfg.timeouts, implicit_tls).run()
        finally:
            self.board.release(self.slot, self._accepting())  # MasterGone: see run()
            self.board.set_idle(self.slot, time.monotonic())
            if self.titled_phase:  # the title went busy during this session
                self._title("idle")

    def session_over(self) -> None:
        """The session is over: give its connection counts back now rather than after
        its log is written, so that a client that connects again as soon as it reads
        the last reply (at its max_connections_per_ip) is not refused for a session
        that is over (the connection calls it just before that reply when the reply
        goes at once, else right after it).  The release after the session is then a
        no-op.  A master gone while the lock is held (MasterGone) must not cost the
        client that reply: nobody reads the counts any more."""
        try:
            self.board.release(self.slot, self._accepting())
        except MasterGone:
            pass

    def _pool_dry(self) -> None:
        """This session took the last idle worker: call the master, which starts more at
        once instead of at its next tick, up to a second away, while the clients of a
        burst wait in the listen queue for a greeting."""
        self._call_master(POOL_CALL)

    def call_for_maildirs(self) -> None:
        """A Maildir is gone and this worker could not make it again: ask the master,
        which can, for its pass now (at most once per MAILDIR_CALL_EVERY from here)."""
        if self._maildirs_call.allow(time.monotonic()):
            self._call_master(MAILDIR_CALL)

    def _call_master(self, call: bytes) -> None:
        try:
            os.write(self.want_fd, call)
        except OSError:
            pass  # the pipe is full (the master has calls to read already), or no master

    def _master_gone(self, sock: _socket.socket, ip: str, implicit_tls: bool) -> None:
        """The master died while this worker waited for the admission lock: the client
        hears 421 at once (a plaintext one; an SMTPS client just sees the close), and
        the worker exits after it, as every worker does when its master is gone."""
        self.quitting = True
        self.log.queue("CLOSE", f"{ip} not served: the master is gone", WARNING)
        if not implicit_tls:
            try:
                sock.send(R421_SHUTDOWN.wire(True))
            except OSError:
                pass

    def _refuse(self, sock: _socket.socket, ip: str, reason: str, implicit_tls: bool = False) -> None:
        """Over a connection limit: answer 421 at once and close (never a silent wait).
        The reply carries its enhanced code (``421 4.3.2``, ``421 4.7.0``) as the contract
        spells it, although no EHLO came first: it tells the client why it was refused.
        An SMTPS client (RFC 8314) reads it inside TLS, after a handshake cut short at
        REFUSAL_TLS_TIMEOUT all told; in stress mode, when workers are scarce, it is
        closed without one: a refused client must not hold a worker for long."""
        reply = limits.reply_for(reason)
        sent, why = False, "the client left"
        try:
            if not implicit_tls:
                sent = sock.send(reply.wire(True)) > 0
                discard_unread(sock)  # a client that talked first: a FIN, not a reset
            elif self.tls_context is None or self.board.in_stress():
                why = "no TLS handshake in stress mode"
            else:
                why = "the client left, or its TLS handshake failed or took over a second"
                sent = self._reply_in_tls(sock, reply.wire(True))
        except (OSError, ValueError):
            pass  # the client left, or its handshake failed or was too slow
        # The log says what the client got: the reply, or why it got none.
        self.log.queue("SMTP", str(reply) if sent else f"<{reply.code} not sent: {why}>")
        self.log.queue("CLOSE", f"{ip} refused: {reason}", WARNING)
        self.log.flush()

    def _reply_in_tls(self, sock: _socket.socket, wire: bytes) -> bool:
        """Handshake (the socket is non-blocking) within REFUSAL_TLS_TIMEOUT, a deadline
        for the whole of it: a timeout per read would let a client that trickles its
        ClientHello hold the worker indefinitely.  Then the reply, our close_notify, and a
        close with what the client sent unread discarded (connection.discard_unread): a
        FIN, not a reset.  True once the reply went out."""
        assert self.tls_context is not None
        deadline = time.monotonic() + REFUSAL_TLS_TIMEOUT
        # ssl wraps the C socket as it wraps socket.socket (typeshed asks for the latter).
        tls = self.tls_context.wrap_socket(sock, server_side=True,  # type: ignore[arg-type]
                                           do_handshake_on_connect=False)
        try:
            # The wait watches the socket alone: the worker is refusing, not serving.
            if not drive_handshake(tls, deadline, functools.partial(wait_alone, tls.fileno())):
                return False
            return tls.send(wire) > 0
        finally:
            close_tls(tls, discard=True)

    def _normalize_for(self, ip: str) -> bool | None:
        """normalize_networks are exceptions to bare_newline = "reject" (legacy senders
        on listed networks get their bare LF normalised, as Postfix's
        smtpd_forbid_bare_newline_exclusions); None lets the session config decide."""
        if not self.normalize_nets or self.cfg.limits.bare_newline == "normalize":
            return None
        return True if in_networks(ip, self.normalize_nets) else None

    # -- called by Connection ------------------------------------------------------------

    def heartbeat(self) -> None:
        self.board.touch(self.slot, time.monotonic())

    def client_waits(self, since: float) -> None:
        """The client has kept this worker waiting since ``since`` (0.0: no longer)."""
        self.board.set_client_wait(self.slot, since)

    def on_wake(self, fd: int) -> None:
        if fd == self.parent_fd:
            try:
                gone = os.read(fd, 64) == b""
            except BlockingIOError:
                gone = False
            if gone:  # EOF: the master is gone; nobody will reap or limit us
                self.quitting = True
            return
        try:
            signals = os.read(fd, 512)
        except BlockingIOError:
            signals = b""
        # The octets name the signals, and they are read here rather than left to the
        # Python handlers.  Compiled code does not look for pending signals: a handler
        # runs only when something does (an interrupted system call, interpreted code),
        # which a brisk accept loop may never do.  A SIGTERM would then wait until the
        # master's SIGQUIT at graceful_timeout, and the worker serve new clients
        # meanwhile.  (The handlers still set the same flags when they run.)
        if _TERM_OCTET in signals:
            self.stopping = True
        if _QUIT_OCTET in signals:
            self.quitting = True
        if self.stopping and self.listeners:
            self._drop_listeners()

    def _drop_listeners(self) -> None:
        """A stopping worker lets go of the listening sockets at once: after a stop
        nothing else holds them open, so new clients are refused instead of queued."""
        for fd in list(self.listeners):
            self._drop_listener(fd)
        self.board.set_available(self.slot, False)
        self._title(f"busy {self._client} {self.titled_phase}" if self.titled_phase else "idle")

    def _drop_listener(self, fd: int) -> None:
        sock = self.listeners.pop(fd)[0]
        self.epoll.unregister(fd)
        self.backlogs.unregister(fd)
        sock.close()

    def show_phase(self, phase: str) -> None:
        """The client has gone quiet: publish the phase, in the scoreboard (stats) and
        in the process title.  Not done on every phase change: a brisk session goes
        through five in a millisecond, faster than anyone reads ps or the stats, and a
        title write costs a prctl(2)."""
        self.board.set_phase(self.slot, phase, time.monotonic())
        if phase != self.titled_phase:
            self.titled_phase = phase
            self._title(f"busy {self._client} {phase}")

    titled_phase = ""

    def count_message(self, size: int) -> None:
        self.board.count_message(self.slot, size)

    def count_rejects(self, codes: list[int]) -> None:
        for code in codes:
            self.board.count_reject(self.slot, code)

    def count_tls(self, ok: bool, resumed: bool = False) -> None:
        """A handshake done or failed; ``resumed``: done by resuming a session, with no
        signature by the certificate's key."""
        self.board.count_event(self.slot, "tls_ok" if ok else "tls_failed")
        if resumed:
            self.board.count_event(self.slot, "tls_resumed")

    def count_auth(self, ok: bool) -> None:
        self.board.count_event(self.slot, "auth_ok" if ok else "auth_failed")

    def count_auth_deferred(self) -> None:
        self.board.count_event(self.slot, "auth_deferred")

    def auth_attempt(self, ip: str) -> int:
        """May ``ip`` have a password checked now (the AUTH failure limit, and the
        server's checks at once)?  While the checks already running for it fill the
        limit, or the server's, wait for one to end, a check taking about 60 ms, for
        at most AUTH_WAIT.  ``authlimit.ALLOWED`` counts the check as running until
        ``auth_finished``."""
        limiter = self.auth_limiter
        if limiter is None:
            return authlimit.ALLOWED
        deadline = time.monotonic() + AUTH_WAIT
        verdict: int = authlimit.BUSY
        relook = 0.0
        free = ahead = 0
        try:
            while True:
                now = time.monotonic()
                if verdict == authlimit.SATURATED:
                    free, ahead = limiter.place(self.slot, now)
                # Queued for one of the server's checks, a waiter reads, without the
                # lock, whether its turn has come (a check free for it, with no more
                # sessions queued before it than checks free): hundreds of sessions in
                # this wait each taking the admission lock fifty times a second slowed
                # every connection's admission.  The lock is taken at its turn, and
                # every AUTH_RELOOK anyway: a check stuck past RUNNING_STALE counts as
                # ended only there.
                if not (verdict == authlimit.SATURATED and ahead >= free and now < relook
                        and now < deadline and not self.quitting):
                    verdict = limiter.attempt(ip, now, self.slot)
                    if verdict not in (authlimit.BUSY, authlimit.SATURATED) or now >= deadline or self.quitting:
                        return verdict
                    relook = now + AUTH_RELOOK
                # Asleep, but awake to SIGQUIT and the master's death (on_wake), so that
                # the session still gets its 421 before the master's SIGKILL.  Near the
                # front of the queue it looks often, so that no check stays free for
                # long; further back seldom (300 sessions looking every 20 ms took a
                # core).  Random lengths, so that waiters do not look together.
                near = verdict != authlimit.SATURATED or ahead < AUTH_NEAR * limiter.checks
                step = AUTH_WAIT_STEP if near else AUTH_FAR_STEP
                for fd in select.select(self.wake_fds, [], [], step * (0.5 + random.random()))[0]:
                    self.on_wake(fd)
        finally:
            limiter.waiting(self.slot, False)

    def auth_finished(self, ip: str, ok: bool) -> None:
        if self.auth_limiter is not None:
            self.auth_limiter.finished(ip, time.monotonic(), ok, self.slot)

    def count_conn_reject(self, reason: str) -> None:
        self.board.count_conn_reject(self.slot, reason)

    def _title(self, state: str) -> None:
        if self.stopping and not state.startswith("stopping"):
            # As the stats say: "stopping", with the client it still serves, if any.
            state = "stopping" + state[4:] if state.startswith("busy") else "stopping"
        process.set_title(f"forksmtp: worker {state} (gen {self.generation})")
