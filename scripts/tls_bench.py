#!/usr/bin/env python3
"""What STARTTLS costs forksmtp and its peer, with full and with resumed handshakes.

Most mail between MTAs now comes over STARTTLS, and a sender that keeps a TLS session
cache (Postfix does) resumes its sessions: no key exchange signed by the certificate's
key. This script measures, alternating the systems in every round so that machine drift
cancels out:

  forksmtp   the real daemon, started the README's way, with [tls] and a fresh
             self-signed certificate (P-256 by default, RSA-2048 with --key rsa);
  aiosmtpd   the peer of scripts/bench.py (the same durable Maildir handler), offering
             STARTTLS with the same certificate;

each with every client handshake full, then resumed from a session the client process
took before the timed part, and, as the baseline, with no TLS at all ("plain"). Each
client process runs its sessions one after another: connect, EHLO, STARTTLS, the
handshake, EHLO (plain: connect, EHLO), MAIL, RCPT, DATA, one message, QUIT.

Reported per cell: sessions/s (one message each), the server's CPU per session from
/proc/PID/task/*/schedstat, split into user and system by the kernel's ticks, its sleeps
and preemptions per session, and the share of handshakes resumed, as the clients saw
them. A cell fails where a message acknowledged is not stored exactly once (each has
its own Message-ID), or where a handshake resumed that should not have, or one did not
that should. Every client runs one untimed session of its mode first, so that no mode
pays the pool's growth or a worker's first handshake in its timed part. Loopback only,
every loop bounded.

Examples
  python scripts/tls_bench.py                       # 10 sessions at once, 2,000 a cell, 2 rounds
  python scripts/tls_bench.py --key rsa --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib.constants import HOST, MiB  # noqa: E402
from benchlib.context import Bench  # noqa: E402
from benchlib.helpers import log, median_of, port_is_free, ratio  # noqa: E402
from benchlib.messages import make_body, message_head  # noqa: E402
from benchlib.maildir import check_stored, make_maildir  # noqa: E402
from benchlib.measure import cpu_delta, cpu_snapshot, switch_delta, user_share  # noqa: E402
from benchlib.processes import run_gated  # noqa: E402
from benchlib.servers import (BENCH_SCRIPT, FORKSMTP_START, Server, forksmtp_config,  # noqa: E402
                              start_server, wait_ready)
from bench import _on_sigterm, make_bench  # noqa: E402

SYSTEMS = ("forksmtp", "aiosmtpd")
MODES = ("plain", "full", "resumed")
IO_TIMEOUT = 10.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=10, help="client processes at once (default 10)")
    p.add_argument("--count", type=int, default=2000, help="sessions a cell (default 2000)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--key", choices=("ec", "rsa"), default="ec", help="certificate key (default ec: P-256)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--port-base", type=int, default=24350)
    p.add_argument("--maildir-root", help="where the Maildirs go (default: a new dir under /var/tmp)")
    p.add_argument("--out", help="results folder (default bench-results/tls-<timestamp>)")
    p.add_argument("--forksmtp-cmd", help="command starting forksmtp, as bench.py's --forksmtp-cmd "
                   "(default: this script's checkout)")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds allowed for one cell")
    p.add_argument("--keep", action="store_true", help="keep the Maildirs and server logs")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.systems) - set(SYSTEMS) or set(args.modes) - set(MODES) or not args.systems \
            or not args.modes:
        p.error(f"--systems from {','.join(SYSTEMS)}, --modes from {','.join(MODES)}")
    if args.sessions < 1 or args.count < args.sessions or args.rounds < 1 or args.size < 512:
        p.error("--sessions >= 1, --count >= --sessions, --rounds >= 1, --size >= 512")
    return args


# --------------------------------------------------------------------------- servers

def make_certificate(root: str, key: str) -> tuple[str, str]:
    """A self-signed certificate for the run, made with the openssl command."""
    cert, keyfile = os.path.join(root, "cert.pem"), os.path.join(root, "key.pem")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if key == "ec" \
        else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2",
                    "-subj", "/CN=bench.example.test", "-keyout", keyfile, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, keyfile


def start(bench: Bench, system: str, maildir: str, cert: str, key: str) -> Server:
    args = bench.args
    if system == "forksmtp":
        port = args.port_base
        # bench.py's config (its pool left to size itself, as an operator's), and [tls].
        cfg = forksmtp_config(os.path.join(bench.root, f"forksmtp-{next(bench.server_seq)}.toml"),
                              None, args.sessions + 10, args.sessions, True, 10 * MiB, "info")
        with open(cfg, "a", encoding="utf-8") as f:
            f.write(f"\n[tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n")
        argv = bench.forksmtp_cmd + ["-c", cfg, "--listen", f"{HOST}:{port}", "--maildir", maildir]
        server, procs = start_server(bench, system, argv, port), FORKSMTP_START + 1
    else:
        port = args.port_base + 1
        argv = [sys.executable, BENCH_SCRIPT, "serve-aiosmtpd", "--listen", f"{HOST}:{port}",
                "--maildir", maildir, "--tls-cert", cert, "--tls-key", key]
        server, procs = start_server(bench, system, argv, port), 1
    wait_ready(server, procs)
    return server


# --------------------------------------------------------------------------- the client

def _reply(f) -> bytes:
    """A whole reply; its last line."""
    while True:
        line = f.readline()
        if len(line) < 4 or line[3:4] != b"-":
            return line


def _expect(f, code: bytes) -> None:
    line = _reply(f)
    if not line.startswith(code):
        raise RuntimeError(f"expected {code.decode()}, got {line[:80]!r}")


def one_session(port: int, ctx: ssl.SSLContext | None, resume: ssl.SSLSession | None,
                message: bytes | None) -> tuple[bool, ssl.SSLSession | None]:
    """One session, with one message when ``message`` is given, over STARTTLS unless
    ``ctx`` is None: (whether the handshake resumed, the session to resume later)."""
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    try:
        f = sock.makefile("rb")
        _expect(f, b"220")
        sock.sendall(b"EHLO client.bench.example.test\r\n")
        _expect(f, b"250")
        if ctx is not None:
            sock.sendall(b"STARTTLS\r\n")
            _expect(f, b"220")
            sock = ctx.wrap_socket(sock, server_hostname="bench.example.test", session=resume)
            f = sock.makefile("rb")
            sock.sendall(b"EHLO client.bench.example.test\r\n")
            _expect(f, b"250")
        if message is not None:
            sock.sendall(b"MAIL FROM:<bench@client.example.test>\r\n")
            _expect(f, b"250")
            sock.sendall(b"RCPT TO:<rcpt@bench.example.test>\r\n")
            _expect(f, b"250")
            sock.sendall(b"DATA\r\n")
            _expect(f, b"354")
            sock.sendall(message)
            _expect(f, b"250")
        sock.sendall(b"QUIT\r\n")
        _expect(f, b"221")
        if isinstance(sock, ssl.SSLSocket):
            return bool(sock.session_reused), sock.session
        return False, None
    finally:
        sock.close()


def client_prepare(port: int, count: int, mode: str, size: int, tag: str) -> dict:
    """Before the start signal: the client context and one untimed session of the mode
    without a message, whose session the resumed mode then resumes."""
    ctx: ssl.SSLContext | None = None
    if mode != "plain":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False          # a self-signed certificate made for the run
        ctx.verify_mode = ssl.CERT_NONE
    first = one_session(port, ctx, None, None)[1]
    return {"port": port, "count": count, "ctx": ctx,
            "resume": first if mode == "resumed" else None,
            "body": make_body(max(size - len(message_head(tag + ".0")), 2)) + b".\r\n",
            "tag": f"{tag}.{os.getpid()}"}


def client_run(state: dict) -> dict:
    acked: list[str] = []
    reused = 0
    t0 = time.monotonic()
    for n in range(state["count"]):
        msg_id = f"{state['tag']}.{n}"
        was_reused, _ = one_session(state["port"], state["ctx"], state["resume"],
                                    message_head(msg_id) + state["body"])
        acked.append(msg_id)
        reused += was_reused
    return {"acked": acked, "reused": reused, "t_start": t0, "t_end": time.monotonic()}


# --------------------------------------------------------------------------- cells

def resumption_problem(mode: str, reused: int, sessions: int) -> str | None:
    """Why a cell's resumed handshakes fail it: every one resumes in the resumed mode
    and none in the others, where each client's session was taken before the timed
    part.  A cell of no session fails too: it measured nothing."""
    if not sessions:
        return "no session was acknowledged"
    if reused != (sessions if mode == "resumed" else 0):
        return f"{reused} of {sessions} handshakes resumed in {mode} mode"
    return None


def run_cell(bench: Bench, system: str, mode: str, tag: str, cert: str, key: str) -> dict:
    args = bench.args
    maildir = make_maildir(os.path.join(bench.root, "maildirs", tag))
    server = start(bench, system, maildir, cert, key)
    try:
        shares = [args.count // args.sessions + (1 if i < args.count % args.sessions else 0)
                  for i in range(args.sessions)]
        arg_list = [(server.port, n, mode, args.size, tag) for n in shares]
        results, before = run_gated(bench.reaper, client_prepare, client_run, arg_list,
                                    args.run_timeout, on_start=lambda: cpu_snapshot(server))
        after = cpu_snapshot(server)
    finally:
        bench.reaper.stop_server(server.popen)
    acked_ids = [i for r in results for i in r["acked"]]
    acked = len(acked_ids)
    stored, problem = check_stored(maildir, acked_ids)
    reused = sum(r["reused"] for r in results)
    share = reused / acked if acked else None
    problem = problem or resumption_problem(mode, reused, acked)
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    cpu, ticks_user, ticks_sys, _ = cpu_delta(before, after)
    switches = switch_delta(before, after)
    user = user_share(ticks_user, ticks_sys)
    per = 1000.0 / acked if acked else None
    return {"system": system, "mode": mode, "acked": acked, "stored": stored, "problem": problem,
            "sessions_per_s": acked / wall if wall > 0 else None,
            "cpu_ms_per_session": cpu * per if per else None,
            "cpu_user_ms_per_session": cpu * user * per if per and user is not None else None,
            "sleeps_per_session": switches[0] / acked if switches and acked else None,
            "preempted_per_session": switches[1] / acked if switches and acked else None,
            "resumed_share": share if mode != "plain" else None}


def run_matrix(bench: Bench, cert: str, key: str) -> list[dict]:
    args, cells = bench.args, []
    for rnd in range(args.rounds):
        systems = args.systems if rnd % 2 == 0 else list(reversed(args.systems))
        for mode in args.modes:
            for system in systems:
                try:
                    cell = run_cell(bench, system, mode, f"r{rnd}-{system}-{mode}", cert, key)
                except (OSError, RuntimeError, TimeoutError) as exc:   # a client or server failed
                    cell = {"system": system, "mode": mode, "problem": f"{type(exc).__name__}: {exc}",
                            **{m: None for m in METRICS}}
                cell["round"] = rnd
                cells.append(cell)
                log(f"  {system:9s} {mode:8s} r={rnd} {cell['sessions_per_s'] or 0:8,.0f} sessions/s"
                    f"  cpu {cell['cpu_ms_per_session'] or 0:.3f} ms/session"
                    f"  resumed {cell['resumed_share'] or 0:.0%}"
                    + (f"  !!! {cell['problem']}" if cell["problem"] else ""))
                if cell["problem"]:
                    bench.failures.append(f"{system} {mode} round {rnd}: {cell['problem']}")
    return cells


# --------------------------------------------------------------------------- output

METRICS = ("sessions_per_s", "cpu_ms_per_session", "cpu_user_ms_per_session",
           "sleeps_per_session", "preempted_per_session", "resumed_share")


def summarise(cells: list[dict]) -> dict:
    """Medians over the rounds: summary[system][mode][metric]."""
    summary: dict = {}
    for cell in cells:
        summary.setdefault(cell["system"], {}).setdefault(cell["mode"], []).append(cell)
    return {system: {mode: {m: median_of([c[m] for c in group if not c["problem"]]) for m in METRICS}
                     for mode, group in modes.items()}
            for system, modes in summary.items()}


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(args: argparse.Namespace, argv: list[str], summary: dict, fs: str) -> str:
    lines = ["## STARTTLS benchmark", "",
             f"Command: `{shlex.join(['python', 'scripts/tls_bench.py'] + argv)}`  ",
             f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}, Maildirs on {fs}, "
             f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}  ",
             f"{args.sessions} client processes at once, {args.count} sessions a cell (one "
             f"{args.size}-byte message each), {args.rounds} round(s), medians shown; "
             f"certificate: {'P-256' if args.key == 'ec' else 'RSA-2048'}.", "",
             "| system | handshakes | sessions/s | CPU ms/session | of it user | sleeps/session "
             "| preempted/session | resumed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for system, modes in summary.items():
        for mode, row in modes.items():
            lines.append(f"| {system} | {mode} | {fmt(row['sessions_per_s'], ',.0f')} | "
                         f"{fmt(row['cpu_ms_per_session'], '.3f')} | "
                         f"{fmt(row['cpu_user_ms_per_session'], '.3f')} | "
                         f"{fmt(row['sleeps_per_session'], '.1f')} | "
                         f"{fmt(row['preempted_per_session'], '.1f')} | "
                         f"{fmt(row['resumed_share'], '.0%')} |")
    lines += ["", "| ratio | handshakes | sessions/s | CPU/session |", "|---|---|---:|---:|"]
    if {"forksmtp", "aiosmtpd"} <= set(summary):
        for mode in args.modes:
            a, b = summary["forksmtp"].get(mode), summary["aiosmtpd"].get(mode)
            if a and b:
                lines.append(f"| forksmtp/aiosmtpd | {mode} | "
                             f"{fmt(ratio(a['sessions_per_s'], b['sessions_per_s']), '.2f')} | "
                             f"{fmt(ratio(a['cpu_ms_per_session'], b['cpu_ms_per_session']), '.2f')} |")
    for system, modes in summary.items():
        for top, base in (("full", "plain"), ("resumed", "plain"), ("resumed", "full")):
            if {top, base} <= set(modes):
                a, b = modes[top], modes[base]
                lines.append(f"| {system}: {top}/{base} | – | "
                             f"{fmt(ratio(a['sessions_per_s'], b['sessions_per_s']), '.2f')} | "
                             f"{fmt(ratio(a['cpu_ms_per_session'], b['cpu_ms_per_session']), '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.out:
        args.out = os.path.join("bench-results", time.strftime("tls-%Y%m%d-%H%M%S"))
    signal.signal(signal.SIGTERM, _on_sigterm)   # unwinds through the finally below
    bench = make_bench(args)    # bench.py's: work dir on a real disk, results folder, command
    root, out = bench.root, bench.out
    try:
        for port in (args.port_base, args.port_base + 1):
            if not port_is_free(port):
                raise SystemExit(f"port {HOST}:{port} is taken: choose another --port-base")
        cert, key = make_certificate(root, args.key)
        log(f"Maildirs under {root} ({bench.fs}); {args.sessions} client processes")
        cells = run_matrix(bench, cert, key)
        summary = summarise(cells)
        payload = {"command": shlex.join(["python", "scripts/tls_bench.py"] + argv),
                   "options": {k: v for k, v in vars(args).items()}, "cells": cells,
                   "summary": summary, "failures": bench.failures, "warnings": bench.warnings,
                   "ok": not bench.failures}
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        text = markdown(args, argv, summary, bench.fs)
        with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
            f.write(text)
        print(text)
        log(f"results: {out}")
        return 1 if bench.failures else 0
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not cut the cleanup short
        bench.reaper.cleanup()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
