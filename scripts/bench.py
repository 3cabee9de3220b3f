#!/usr/bin/env python3
"""Benchmark forksmtp beside the disk's own limit and a peer SMTP server.

One run measures, alternating the systems so that machine drift cancels out:

  loop          the conventional Maildir delivery with no SMTP at all: N processes each
                create a named file in tmp/ (O_CREAT|O_EXCL), write, fsync, rename it
                into new/ and fsync new/, all into one Maildir -- the rate to beat;
  loop-tmpfile  the same with an unnamed O_TMPFILE inode linked into new/ (informational);
  forksmtp      the real daemon, started the README's way, storing real Maildir files;
  aiosmtpd      the peer: aiosmtpd with a Maildir handler as durable as forksmtp's
                (tmp write, fsync, rename into new/, fsync new/, then 250);
  pyfloor       the floor of forksmtp's shape: a minimal pre-forked Python server
                (blocking loop per worker, no checks, no limits, no log) storing exactly
                as forksmtp does -- the most any pre-forked Python server reaches here;
  smtp-sink     Postfix's smtp-sink, a C SMTP server that answers 250 and stores
                nothing: the ceiling of the SMTP exchange itself (client, kernel TCP and
                a server doing no storage) on this machine. Optional: run by default only
                when its binary is found on PATH, as /usr/sbin/smtp-sink or as named by
                $FORKSMTP_BENCH_SMTP_SINK (an unpacked package's lib/postfix beside it is
                put on LD_LIBRARY_PATH).

The SMTP systems share one load generator: our own multi-process client (raw
non-blocking sockets, one message per connection unless --per-conn K), or Postfix's
smtp-source with --client smtp-source.

Definitions
  msgs/s       messages acknowledged with 250, divided by the wall time from the start
               signal to the last 250 (for the loop: to the last delivery).
  ack latency  from the last byte of "<CRLF>.<CRLF>" handed to the kernel to the 250
               read back: the time the server needs to make the message durable.
               For the loop: one delivery, from the create in tmp/ to the end of the
               fsync of new/.
  txn latency  from connect() (first message of a connection) or from sending MAIL
               (later messages on the same connection) to the 250 after the final dot.
  server CPU   CPU of the server's process tree (master and every worker, all threads),
               sampled before and after the load from /proc/PID/task/*/schedstat (ns);
               split into user and system in the proportion of psutil's tick counts.
               CPU of workers the master reaped meanwhile is recovered from the
               master's children_* counters.
  USS          psutil's unique set size of each worker after the run.

Every file in new/ is counted and its Message-ID checked after each run: a run where the
stored messages differ from the acknowledged ones is a failed run (exit status 1).
smtp-sink stores nothing, so its runs count acknowledged messages only.

Examples
  python scripts/bench.py --quick
  python scripts/bench.py                      # 1, 10, 50 sessions, 2 rounds
  python scripts/bench.py --full --rounds 3    # adds 200 sessions
  python scripts/bench.py --systems loop,aiosmtpd --messages 500
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

# The modules of this script live in benchlib/ beside it. scripts/ is no package, and this
# script is run from any working directory (and by its own path, as the aiosmtpd peer):
# put its own directory first on sys.path so that `benchlib` is found whatever the cwd.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib.cells import run_matrix
from benchlib.constants import FLOOR, MODES, NO_DURABILITY_FS, SINK, SYSTEMS
from benchlib.context import Bench
from benchlib.extras import run_extras
from benchlib.floor import serve_pyfloor
from benchlib.helpers import fs_type, log, raise_fd_limit
from benchlib.maildir import tmpfile_supported
from benchlib.peer import serve_aiosmtpd
from benchlib.report import client_description, environment, write_chart, write_markdown
from benchlib.servers import default_forksmtp_cmd, find_smtp_sink, sink_missing_note
from benchlib.summary import check_targets, compute_ratios, summarise

# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--quick", action="store_true", help="under a minute: 1 and 10 sessions, 1 round, "
        "100 messages per cell, no open-sessions check")
    add("--full", action="store_true", help="add 200 sessions")
    add("--sessions", help="comma-separated concurrency levels (overrides --quick/--full)")
    add("--systems", default=",".join(SYSTEMS), help="comma-separated, from "
        + ",".join(SYSTEMS) + f" (default: all; {SINK} is skipped with a note when no "
        f"binary is found)")
    add("--modes", default=",".join(MODES), help="durable,nofsync")
    add("--messages", type=int, help="messages per cell (default 1000; 100 with --quick)")
    add("--rounds", type=int, help="alternating rounds (default 2; 1 with --quick)")
    add("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    add("--per-conn", type=int, default=1, help="messages per connection (default 1)")
    add("--pipelining", action="store_true", help="send MAIL, RCPT, DATA as one group")
    add("--client", choices=("ours", "smtp-source"), default="ours")
    add("--client-procs", type=int, default=0, help="client processes (default: CPU count)")
    add("--maildir-root", help="where the Maildirs go (default: a new dir under /var/tmp)")
    add("--out", help="results folder (default bench-results/<timestamp>)")
    add("--port-base", type=int, default=24250,
        help="forksmtp port; the peer uses +1, smtp-sink +2, pyfloor +3 (keep them below the "
        "ephemeral range, 32768+, where client sockets could hold them)")
    add("--spare-workers", type=int, default=2,
        help="pyfloor's workers beyond the sessions; forksmtp's max_workers is the "
             "sessions, this and 8 (its pool sizes itself below that)")
    add("--warmup", type=int, default=4,
        help="untimed messages per session sent to each SMTP server before its cell")
    add("--big-mib", type=int, default=50, help="size of the streamed message (0: skip)")
    add("--big-repeats", type=int, default=3,
        help="times the big message is sent (the median rate is reported)")
    add("--hold", type=int, help="sessions held open at once (default 500; 0 skips)")
    add("--peer-threads", type=int, default=0, help="aiosmtpd stores in N threads (0: inline)")
    add("--server-log-level", default="info", help="forksmtp [log] level (default info)")
    add("--forksmtp-cmd", help="command starting forksmtp, run in the bench's work directory, so "
        "that an absolute PYTHONPATH in it picks the checkout (default: this script's checkout, "
        "python -m forksmtp with PYTHONPATH on it)")
    add("--io-timeout", type=float, default=60.0, help="seconds to wait for any one reply")
    add("--run-timeout", type=float, default=600.0, help="seconds allowed for one cell")
    add("--keep", action="store_true", help="keep the Maildirs and server logs")
    return apply_presets(p, p.parse_args(argv))


def apply_presets(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    levels = [1, 10] if args.quick else [1, 10, 50, 200] if args.full else [1, 10, 50]
    args.sessions = [int(x) for x in args.sessions.split(",")] if args.sessions else levels
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.messages = args.messages or (100 if args.quick else 1000)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.hold = (0 if args.quick else 500) if args.hold is None else args.hold
    for bad in set(args.systems) - set(SYSTEMS):
        p.error(f"unknown system {bad!r}; choose from {', '.join(SYSTEMS)}")
    for bad in set(args.modes) - set(MODES):
        p.error(f"unknown mode {bad!r}; choose from {', '.join(MODES)}")
    if args.client == "smtp-source" and not shutil.which("smtp-source"):
        p.error("smtp-source is not on PATH (Debian: apt-get install postfix)")
    if min(args.sessions) < 1 or args.size < 512 or args.per_conn < 1 or args.big_repeats < 1:
        p.error("sessions, --per-conn and --big-repeats must be >= 1 and --size >= 512")
    return args


def check_systems(bench: Bench) -> None:
    """Fail early, with a way out, when a selected system cannot run here."""
    if "aiosmtpd" in bench.args.systems:
        try:
            import aiosmtpd  # noqa: F401
        except ImportError:
            raise SystemExit("aiosmtpd is not installed: pip install -e '.[bench]' "
                             "(or leave it out with --systems)")
    if "forksmtp" in bench.args.systems and not bench.args.forksmtp_cmd:
        probe = subprocess.run(bench.forksmtp_cmd + ["--version"], capture_output=True,
                               timeout=30, cwd=bench.root)
        if probe.returncode != 0:
            raise SystemExit(f"forksmtp does not run ({shlex.join(bench.forksmtp_cmd)} "
                             f"--version: {probe.stderr.decode()[-300:]!r}); "
                             f"leave it out with --systems loop,aiosmtpd")
    if "loop-tmpfile" in bench.args.systems and not tmpfile_supported(bench.root):
        bench.args.systems.remove("loop-tmpfile")
        bench.warnings.append(f"O_TMPFILE is not supported on {bench.fs}: loop-tmpfile skipped")
    check_sink(bench)


def check_sink(bench: Bench) -> None:
    """smtp-sink is optional: without a binary it is skipped with a note, never failed."""
    if SINK not in bench.args.systems:
        return
    if bench.smtp_sink:
        log(f"{SINK}: {bench.smtp_sink}")
        return
    bench.args.systems.remove(SINK)
    bench.warnings.append(sink_missing_note())
    log(f"note: {bench.warnings[-1]}")


def make_bench(args: argparse.Namespace) -> Bench:
    """Work dir (on a real disk, not tmpfs), results folder, and the forksmtp command."""
    base = args.maildir_root or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    root = os.path.abspath(tempfile.mkdtemp(prefix="forksmtp-bench-", dir=base))  # servers run in it
    os.makedirs(os.path.join(root, "logs"))
    out = args.out or os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    cmd = shlex.split(args.forksmtp_cmd) if args.forksmtp_cmd else default_forksmtp_cmd()
    bench = Bench(args, root, os.path.join(root, "logs"), out, fs_type(root), cmd,
                  smtp_sink=find_smtp_sink())
    if bench.fs in NO_DURABILITY_FS:
        bench.warnings.append(f"{root} is on {bench.fs}: fsync costs nothing there, so "
                              f"durable figures mean nothing; use --maildir-root on a disk")
        log(f"!!! WARNING: {bench.warnings[-1]}")
    return bench


def build_payload(bench: Bench, argv: list[str], started: str, cells: list[dict],
                  extras: dict) -> dict:
    summary = summarise(cells)
    ratios = compute_ratios(summary)
    return {"command": shlex.join(["python", "scripts/bench.py"] + argv),
            "client": client_description(bench.args), "started": started,
            "environment": environment(bench),
            "options": {k: v for k, v in vars(bench.args).items()},
            "cells": cells, "summary": summary, "ratios": ratios, "extras": extras,
            "targets": check_targets(bench, ratios, extras),
            "failures": bench.failures, "warnings": bench.warnings,
            "ok": not bench.failures}


def write_outputs(bench: Bench, payload: dict) -> None:
    note = write_chart(bench, payload["summary"])
    if note:
        bench.warnings.append(note)
        payload["warnings"] = bench.warnings
    with open(os.path.join(bench.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    print(write_markdown(bench, payload))
    log(f"results: {os.path.abspath(bench.out)}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt   # unwinds through every finally: servers and helpers die


def run(bench: Bench, argv: list[str]) -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    check_systems(bench)
    log(f"Maildirs under {bench.root} ({bench.fs}); client: {client_description(bench.args)}")
    cells = run_matrix(bench)
    extras = run_extras(bench)
    payload = build_payload(bench, argv, started, cells, extras)
    write_outputs(bench, payload)
    if bench.failures:
        log("!!! FAILED: " + "; ".join(bench.failures))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-aiosmtpd"]:
        return serve_aiosmtpd(argv[1:])
    if argv[:1] == [f"serve-{FLOOR}"]:
        return serve_pyfloor(argv[1:])
    args = parse_args(argv)
    raise_fd_limit(4096)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = make_bench(args)
    try:
        return run(bench, argv)
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        return 130
    finally:
        bench.reaper.cleanup()
        if not args.keep:
            shutil.rmtree(bench.root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
