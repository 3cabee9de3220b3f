"""The load generators: our multi-process client (raw non-blocking sockets) and smtp-source."""
from __future__ import annotations

import errno
import itertools
import os
import resource
import selectors
import socket
import subprocess
import time
from collections import Counter
from typing import Any, Callable, Iterator

from .constants import DATA, EHLO, HOLD, HOST, MAIL, QUIT, RCPT, RECIPIENT, SENDER
from .context import Bench
from .helpers import split_evenly
from .measure import cpu_delta, cpu_snapshot, switch_delta
from .messages import body_for_size, message_head
from .processes import run_gated
from .servers import Server

# --------------------------------------------------------------------------- client

class Tally:
    """What one client process saw: acked ids, latencies, refusals and errors."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.ack_lat: list[float] = []
        self.txn_lat: list[float] = []
        self.last_ack = 0.0
        self.rejected: Counter = Counter()
        self.errors: Counter = Counter()
        self.unsettled = 0     # messages whose fate is unknown (connection lost)

    def ack(self, msg_id: str, ack_lat: float, txn_lat: float, at: float) -> None:
        self.acked.append(msg_id)
        self.ack_lat.append(ack_lat)
        self.txn_lat.append(txn_lat)
        self.last_ack = at

    def as_dict(self) -> dict:
        return {"acked": self.acked, "ack_lat": self.ack_lat, "txn_lat": self.txn_lat,
                "last_ack": self.last_ack, "rejected": dict(self.rejected),
                "errors": dict(self.errors), "unsettled": self.unsettled}


def _envelope(pipelining: bool) -> Iterator:
    """MAIL, RCPT, DATA: one round trip each, or one group (RFC 2920). Returns codes."""
    if pipelining:
        codes, _ = yield MAIL + RCPT + DATA, 3
        return codes
    codes = []
    for command, wanted in ((MAIL, 250), (RCPT, 250), (DATA, 354)):
        reply, _ = yield command, 1
        codes.append(reply[0])
        if reply[0] != wanted:
            break
    return codes


def _greet(tally: Tally, count: int) -> Iterator:
    """Read the 220 greeting and say EHLO; False (refusal tallied) unless both succeed."""
    (code, *_), _ = yield b"", 1
    if code == 220:
        (code, *_), _ = yield EHLO, 1
        if code == 250:
            return True
    tally.rejected[f"greeting/EHLO {code}"] += count
    return False


def conversation(ids: list[str], wires: dict, tally: Tally, pipelining: bool,
                 t_open: float) -> Iterator:
    """One SMTP connection carrying len(ids) messages.

    Yields (bytes to send, final replies wanted) and receives (reply codes, time the
    last byte was sent). Messages whose fate is unknown when it is closed are counted."""
    done = 0
    try:
        if not (yield from _greet(tally, len(ids))):
            done = len(ids)
            return
        for msg_id in ids:
            t_txn = t_open if done == 0 else time.monotonic()
            codes = yield from _envelope(pipelining)
            if codes != [250, 250, 354]:
                tally.rejected[f"envelope {codes}"] += len(ids) - done
                done = len(ids)
                break
            (code, *_), t_sent = yield wires[msg_id], 1
            t_ack = time.monotonic()
            if code == 250:
                tally.ack(msg_id, t_ack - t_sent, t_ack - t_txn, t_ack)
            else:
                tally.rejected[f"after data {code}"] += 1
            done += 1
        yield QUIT, 1
    except GeneratorExit:
        tally.unsettled += len(ids) - done
        raise


def hold_conversation(tally: Tally) -> Iterator:
    """Greeting and EHLO, then park the open session until released, then QUIT."""
    if not (yield from _greet(tally, 1)):
        return
    yield HOLD
    yield QUIT, 1


class Conn:
    __slots__ = ("sock", "gen", "slot", "out", "need", "inbuf", "codes", "t_sent",
                 "deadline", "events", "connecting")

    def __init__(self, sock: socket.socket, gen: Iterator, slot: Callable) -> None:
        self.sock, self.gen, self.slot = sock, gen, slot
        self.out: memoryview | None = None
        self.need, self.inbuf, self.codes = 0, b"", []
        self.t_sent = self.deadline = 0.0
        self.events, self.connecting = selectors.EVENT_WRITE, True


class Driver:
    """Runs many conversations over non-blocking sockets in one process (epoll).

    A slot is a callable t_open -> conversation or None; when a slot's connection ends
    the slot is asked for the next one, until it has no more messages."""

    def __init__(self, port: int, tally: Tally, io_timeout: float, deadline: float) -> None:
        self.port, self.tally = port, tally
        self.io_timeout, self.deadline = io_timeout, deadline
        self.sel = selectors.DefaultSelector()
        self.conns: set[Conn] = set()
        self.to_open: list[Callable] = []
        self.held: list[Conn] = []

    def run(self) -> None:
        next_sweep = time.monotonic() + 1.0
        while True:
            while self.to_open:
                self._open(self.to_open.pop())
            if not self.conns:
                return
            for key, _mask in self.sel.select(0.5):
                self._event(key.data)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 1.0

    def release_held(self) -> None:
        held, self.held = self.held, []
        for conn in held:
            self.conns.add(conn)
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ
            self._advance(conn, None)

    def _open(self, slot: Callable) -> None:
        gen = slot(time.monotonic())
        if gen is None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, gen, slot)
        conn.deadline = time.monotonic() + self.io_timeout
        self.conns.add(conn)
        self.sel.register(sock, selectors.EVENT_WRITE, conn)
        err = sock.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            self._finish(conn, f"connect: {os.strerror(err)}")

    def _event(self, conn: Conn) -> None:
        try:
            if conn.connecting:
                self._connected(conn)
            elif conn.out is not None:
                self._send(conn)
            else:
                self._recv(conn)
        except OSError as exc:
            self._finish(conn, f"{type(exc).__name__}: {exc.strerror or exc}")

    def _connected(self, conn: Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        conn.connecting = False
        self._advance(conn, None)

    def _advance(self, conn: Conn, value: Any) -> None:
        """Feed the conversation its replies; start sending what it asks for next."""
        try:
            request = conn.gen.send(value)
        except StopIteration:
            self._finish(conn)
            return
        if request is HOLD:
            self._hold(conn)
            return
        data, conn.need = request
        conn.codes = []
        conn.deadline = time.monotonic() + self.io_timeout
        conn.out = memoryview(data) if data else None
        if conn.out is not None:
            self._send(conn)       # the socket is nearly always writable: try at once
        else:
            self._want(conn, selectors.EVENT_READ)
            self._parse(conn)

    def _send(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        conn.out = conn.out[sent:]
        if conn.out:
            self._want(conn, selectors.EVENT_WRITE)
            return
        conn.out, conn.t_sent = None, time.monotonic()
        self._want(conn, selectors.EVENT_READ)
        self._parse(conn)

    def _recv(self, conn: Conn) -> None:
        data = conn.sock.recv(65536)
        if not data:
            raise ConnectionError(errno.ECONNRESET, "closed by the server")
        conn.inbuf += data
        self._parse(conn)

    def _parse(self, conn: Conn) -> None:
        """Collect final reply lines ("250 ..." not "250-..."); advance when enough."""
        while len(conn.codes) < conn.need:
            end = conn.inbuf.find(b"\r\n")
            if end < 0:
                return
            line, conn.inbuf = conn.inbuf[:end], conn.inbuf[end + 2:]
            if line[3:4] != b"-":
                conn.codes.append(int(line[:3]) if line[:3].isdigit() else 0)
        if conn.need and conn.out is None:
            conn.need = 0
            self._advance(conn, (conn.codes, conn.t_sent))

    def _want(self, conn: Conn, events: int) -> None:
        if conn.events != events:
            self.sel.modify(conn.sock, events, conn)
            conn.events = events

    def _hold(self, conn: Conn) -> None:
        self.sel.unregister(conn.sock)
        self.conns.discard(conn)
        self.held.append(conn)

    def _finish(self, conn: Conn, error: str | None = None) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.sel.unregister(conn.sock)
        conn.sock.close()
        if error:
            self.tally.errors[error] += 1
        conn.gen.close()
        if time.monotonic() < self.deadline:
            self.to_open.append(conn.slot)

    def _sweep(self, now: float) -> None:
        """Bound every wait: per reply (io_timeout) and for the whole run (deadline)."""
        for conn in list(self.conns):
            if now > self.deadline:
                self._finish(conn, "run deadline reached")
            elif now > conn.deadline:
                self._finish(conn, f"no reply within {self.io_timeout:g}s")
        if now > self.deadline:
            self.to_open.clear()


def client_prepare(port: int, ids: list[str], slots: int, opts: dict) -> dict:
    body = body_for_size(opts["size"])
    wires = {i: message_head(i) + body + b".\r\n" for i in ids}
    return {"port": port, "ids": ids, "slots": slots, "wires": wires, **opts}


def client_run(state: dict) -> dict:
    """Run state["slots"] concurrent sessions until this process's messages are sent."""
    tally, pending = Tally(), iter(state["ids"])

    def slot(t_open: float) -> Iterator | None:
        ids = list(itertools.islice(pending, state["per_conn"]))
        return conversation(ids, state["wires"], tally, state["pipelining"],
                            t_open) if ids else None

    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    driver = Driver(state["port"], tally, state["io_timeout"], t0 + state["run_timeout"])
    driver.to_open.extend([slot] * state["slots"])
    driver.run()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"t_start": t0, "t_end": time.monotonic(),
            "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, **tally.as_dict()}


def run_our_client(bench: "Bench", server: Server, ids: list[str], sessions: int) -> dict:
    """Spread the sessions over a few client processes; sample server CPU around them."""
    args = bench.args
    nprocs = min(sessions, args.client_procs or os.cpu_count() or 1)
    opts = {"size": args.size, "per_conn": args.per_conn, "pipelining": args.pipelining,
            "io_timeout": args.io_timeout, "run_timeout": args.run_timeout}
    shares = split_evenly(ids, nprocs)
    slots = [len(s) for s in split_evenly(list(range(sessions)), nprocs)]
    arg_list = [(server.port, shares[i], slots[i], opts) for i in range(nprocs)]
    results, before = run_gated(bench.reaper, client_prepare, client_run, arg_list,
                                args.run_timeout, on_start=lambda: cpu_snapshot(server))
    after = cpu_snapshot(server)
    return merge_client_results(results, before, after)


def merge_client_results(results: list[dict], before: dict, after: dict) -> dict:
    merged: dict[str, Any] = {"acked": [], "ack_lat": [], "txn_lat": [], "unsettled": 0,
                              "rejected": Counter(), "errors": Counter(), "client_cpu": 0.0}
    for r in results:
        for key in ("acked", "ack_lat", "txn_lat"):
            merged[key].extend(r[key])
        merged["rejected"].update(r["rejected"])
        merged["errors"].update(r["errors"])
        merged["unsettled"] += r["unsettled"]
        merged["client_cpu"] += r["cpu"]
    t_start = min(r["t_start"] for r in results)
    last = max([r["last_ack"] for r in results if r["acked"]] or [t_start])
    merged["wall"] = last - t_start
    merged["cpu"] = cpu_delta(before, after)
    merged["switches"] = switch_delta(before, after)
    return merged


def run_smtp_source(bench: "Bench", server: Server, ids: list[str], sessions: int) -> dict:
    """Postfix's smtp-source as the load: no per-message latency, acked = all if exit 0."""
    args = bench.args
    argv = ["smtp-source", "-s", str(sessions), "-m", str(len(ids)),
            "-l", str(len(body_for_size(args.size))), "-f", SENDER, "-t", RECIPIENT,
            "-M", "bench-client.example.test"] + (["-d"] if args.per_conn > 1 else [])
    argv.append(f"{HOST}:{server.port}")
    before = cpu_snapshot(server)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=args.run_timeout)
    wall = time.monotonic() - t0
    after = cpu_snapshot(server)
    ok = proc.returncode == 0
    return {"acked": None if ok else [], "count": len(ids) if ok else 0, "ack_lat": [],
            "txn_lat": [], "rejected": Counter(), "unsettled": 0 if ok else len(ids),
            "errors": Counter() if ok else Counter({proc.stderr.decode()[-200:]: 1}),
            "client_cpu": None, "wall": wall, "cpu": cpu_delta(before, after),
            "switches": switch_delta(before, after)}
