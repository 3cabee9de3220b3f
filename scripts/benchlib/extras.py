"""The checks beside the matrix: one big message streamed, many sessions held open."""
from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

from .clients import Driver, Tally, hold_conversation
from .constants import DATA, EHLO, HOST, QUIT, RCPT, SENDER, SMTP_SYSTEMS, MiB
from .context import Bench, discard_maildir, fresh_maildir
from .helpers import log
from .maildir import check_stored, write_all
from .measure import RssSampler, memory_report
from .messages import make_body, message_head
from .report import fmt
from .servers import start_system

# --------------------------------------------------------------------------- extras

#: Quiet before each write of the big-message check, the disk's own and the server's, per
#: MiB to be written (2 s before 50 MiB).  Right after another such write the disk's own
#: rate swung between about 270 and 2,000 MiB/s here, and the server's transfer always
#: followed the disk's write; after 2 s of quiet both start from an idle disk, and the
#: disk's rate held at 275-333 MiB/s over twelve writes.
QUIET_PER_MIB = 0.04


def disk_write_rate(directory: str, size: int) -> float:
    """Sequential write rate (MiB/s) like dd + fsync: 1 MiB writes, fsync, in directory."""
    chunk = b"\0" * MiB
    path = os.path.join(directory, "seqwrite")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.monotonic()
    try:
        for _ in range(size // MiB):
            write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    rate = size / MiB / (time.monotonic() - t0)
    os.unlink(path)
    return rate


def read_reply(sock: socket.socket, limit: float = 120.0) -> int:
    """Blocking read of one whole (possibly multi-line) reply; returns its code.

    Each recv is bounded by the socket's timeout, the whole reply by limit seconds."""
    buf, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
        lines = buf.split(b"\r\n")
        finals = [ln for ln in lines[:-1] if ln[3:4] != b"-"]
        if finals:
            return int(finals[-1][:3])
    raise TimeoutError(f"no complete reply within {limit:g}s")


def send_big_message(sock: socket.socket, msg_id: str, size: int, sampler: RssSampler) -> float:
    """One transaction streaming size bytes in 1 MiB chunks; returns DATA->250 seconds."""
    for command, wanted in ((None, 220), (EHLO, 250),
                            (f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode(), 250),
                            (RCPT, 250), (DATA, 354)):
        if command:
            sock.sendall(command)
        code = read_reply(sock)
        if code != wanted:
            raise RuntimeError(f"big message: got {code}, wanted {wanted} ({command!r})")
    sampler.sample()          # baseline: the worker holds the session, before the body
    if not sampler.is_alive():
        sampler.start()
    chunk = make_body(MiB)
    t0 = time.monotonic()
    sock.sendall(message_head(msg_id))
    for _ in range(size // MiB):
        sock.sendall(chunk)
    sock.sendall(b".\r\n")
    code = read_reply(sock)
    if code != 250:
        raise RuntimeError(f"big message refused with {code}")
    return time.monotonic() - t0


def stream_big(bench: Bench, system: str) -> dict:
    """The big message, ``--big-repeats`` times, each on its own connection, to a
    one-worker server, each right after a measurement of the disk's own sequential
    write rate in the Maildir's own tmp/ (the same directory, so the same part of the
    file system), each of the two writes after the same quiet (QUIET_PER_MIB), so that
    the two see the same machine state.
    Rates are medians (one transfer swings by 15 % with the machine's state); the RSS
    (sampled all along) grows by the worst transfer's."""
    size, maildir = bench.args.big_mib * MiB, fresh_maildir(bench, f"big-{system}")
    server = start_system(bench, system, True, 1, maildir, workers=1)
    sampler = RssSampler(server)
    ids = [f"big-{system}-{n}" for n in range(bench.args.big_repeats)]
    seconds, disk = [], []
    try:
        for msg_id in ids:
            time.sleep(QUIET_PER_MIB * bench.args.big_mib)
            disk.append(disk_write_rate(os.path.join(maildir, "tmp"), size))
            time.sleep(QUIET_PER_MIB * bench.args.big_mib)
            with socket.create_connection((HOST, server.port),
                                          timeout=bench.args.io_timeout) as s:
                seconds.append(send_big_message(s, msg_id, size, sampler))
                s.sendall(QUIT)
    finally:
        sampler.stop.set()
        if sampler.is_alive():
            sampler.join(5)
        bench.reaper.stop_server(server.popen)
    stored, problem = check_stored(maildir, ids)
    discard_maildir(bench, maildir)
    growth = {pid: (sampler.peak[pid] - sampler.first[pid]) / MiB for pid in sampler.peak}
    worker_growth = [g for pid, g in growth.items() if pid != server.popen.pid] or \
        list(growth.values())
    rates = [size / MiB / t for t in seconds]
    rate, disk_rate = statistics.median(rates), statistics.median(disk)
    return {"size_mib": bench.args.big_mib, "seconds": statistics.median(seconds),
            "mib_per_s": rate, "mib_per_s_each": rates,
            "disk_mib_per_s": disk_rate, "disk_mib_per_s_each": disk,
            "vs_disk": rate / disk_rate,
            "worker_rss_growth_mib": max(worker_growth),
            "master_rss_growth_mib": growth.get(server.popen.pid),
            "stored": stored, "problem": problem}


def hold_sessions(bench: Bench, system: str, count: int) -> dict:
    """count sessions open at once (greeting + EHLO, then idle); memory measured meanwhile."""
    maildir = fresh_maildir(bench, f"hold-{system}")
    server = start_system(bench, system, True, count, maildir,
                          workers=count + bench.args.spare_workers if system == "forksmtp" else None)
    tally = Tally()
    driver = Driver(server.port, tally, bench.args.io_timeout,
                    time.monotonic() + bench.args.run_timeout)
    opened = iter(range(count))
    driver.to_open.extend([lambda t: hold_conversation(tally)
                           if next(opened, None) is not None else None] * count)
    try:
        driver.run()
        memory = memory_report(server)
        held = len(driver.held)
        driver.release_held()
        driver.run()
    finally:
        bench.reaper.stop_server(server.popen)
        discard_maildir(bench, maildir)
    return {"sessions": count, "held": held, "rejected": dict(tally.rejected),
            "errors": dict(tally.errors), **memory}


def run_extras(bench: Bench) -> dict:
    """The big message and the open-sessions checks, for each SMTP system selected."""
    extras: dict[str, Any] = {"stream": {}, "hold": {}}
    systems = [s for s in bench.args.systems if s in SMTP_SYSTEMS]
    if bench.args.big_mib and systems:
        log("big message: each transfer follows a disk sequential write (1 MiB writes "
            "+ fsync) of the same size")
        for system in systems:
            try:
                extras["stream"][system] = result = stream_big(bench, system)
            except Exception as exc:  # the cells measured so far are still reported
                bench.failures.append(f"{system} big message: {exc!r}")
                continue
            each = ", ".join(f"{r:.0f}" for r in result["mib_per_s_each"])
            disk = ", ".join(f"{r:.0f}" for r in result["disk_mib_per_s_each"])
            log(f"  {system}: {bench.args.big_mib} MiB, median {result['mib_per_s']:.0f} MiB/s "
                f"(each: {each}); disk median {result['disk_mib_per_s']:.0f} MiB/s "
                f"(each: {disk}); {result['vs_disk']:.2f} x disk; worker RSS growth "
                f"{result['worker_rss_growth_mib']:.1f} MiB")
            if result["problem"]:
                bench.failures.append(f"{system} big message: {result['problem']}")
    for system in systems if bench.args.hold else ():
        try:
            extras["hold"][system] = result = hold_sessions(bench, system, bench.args.hold)
        except Exception as exc:
            bench.failures.append(f"{system} open sessions: {exc!r}")
            continue
        log(f"  {system}: {result['held']}/{bench.args.hold} sessions held, worker USS max "
            f"{fmt(result['worker_uss_mib_max'], 1)} MiB, master RSS "
            f"{fmt(result['master_rss_mib'], 1)} MiB")
        if result["held"] < bench.args.hold:
            bench.warnings.append(f"{system}: only {result['held']} of {bench.args.hold} "
                                  f"sessions could be held open: {result['rejected']} "
                                  f"{result['errors']}")
    return extras
