#!/usr/bin/env python3
"""Memory pages a worker runs through to take one message, by region: forksmtp against pyfloor.

With fifty workers taking turns on two cores, every wake-up of a worker finds the TLB and
the caches filled by other processes, so what a message costs beyond its instructions grows
with the number of distinct pages it runs through.  This counts them.  For each system it
starts one worker (forksmtp the README's way; pyfloor through ``bench.py serve-pyfloor``),
warms it with ``--warmup`` messages, then for each of ``--trials`` messages clears the
worker's page-table accessed bits (``/proc/PID/clear_refs``), sends the message on a new
connection (EHLO, MAIL, RCPT, DATA, QUIT, one command per round trip as smtp-source does)
and sums the ``Referenced`` pages of each mapping in ``/proc/PID/smaps``.  It prints the
median of the trials for each region: code (libpython, forksmtp's compiled modules, libc,
other libraries) and data (the heap, anonymous memory such as CPython's object arenas, and
the libraries' own data, CPython's static objects among them).

The processor sets a page's accessed bit when it loads the page's translation into the
TLB, and clearing the bits leaves the TLB as it is.  Messages sent back to back, on a TLB
still warm from the message before, are therefore undercounted (about half the pages here);
a pause of ``SETTLE`` seconds around each message lets other processes take the TLB over,
as fifty busy workers do, so a counted page is a page the worker had to look up again.
Each is at least one page walk; the cache misses behind them are not counted.

Loopback only, bounded loops; needs the rights to write the worker's clear_refs (the same
user as the worker, or root).

    python3 scripts/pages_touched.py [--warmup 1500] [--trials 31] [--json FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

from benchlib.constants import DATA, EHLO, HOST, MAIL, QUIT, RCPT
from benchlib.extras import read_reply
from benchlib.messages import body_for_size, message_head

HERE = os.path.dirname(os.path.abspath(__file__))
# What scripts/bench.py sends by default: 4 KiB, headers included.
MESSAGE = message_head("pages") + body_for_size(4096)
TIMEOUT = 30.0
SETTLE = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def deliver(port: int) -> None:
    """One message on a new connection, one command per round trip."""
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as sock:
        for command, wanted in ((b"", 220), (EHLO, 250), (MAIL, 250), (RCPT, 250), (DATA, 354),
                                (MESSAGE + b".\r\n", 250), (QUIT, 221)):
            sock.sendall(command)
            code = read_reply(sock, TIMEOUT)
            if code != wanted:
                raise RuntimeError(f"{command[:20]!r}: {code}, not {wanted}")


def _forksmtp_dirs() -> tuple[str, ...]:
    """Where forksmtp's compiled files are: its package directory (one small module per
    compiled source, and the DATA reader's C) and the one above it (mypyc's shared
    library of them all), found without importing the package."""
    spec = importlib.util.find_spec("forksmtp")
    if spec is None or not spec.submodule_search_locations:
        return ()
    package = os.path.realpath(list(spec.submodule_search_locations)[0])
    return (package + os.sep, os.path.join(os.path.dirname(package), "forksmtp_native"))


FORKSMTP_DIRS = _forksmtp_dirs()


def region(path: str, perms: str) -> str:
    """The region a mapping belongs to, named for the report."""
    if not path.startswith("/"):
        return "data: " + (path.strip("[]") or "anonymous")
    base = os.path.basename(path)
    if "libpython" in base:
        lib = "libpython"
    elif FORKSMTP_DIRS and os.path.realpath(path).startswith(FORKSMTP_DIRS):
        lib = "forksmtp compiled"
    elif base.startswith(("libc.", "libc-", "ld-linux", "libm.")):
        lib = "libc"
    else:
        lib = "other libraries"
    return ("code: " if "x" in perms else "data: ") + lib


def referenced(pid: int) -> Counter[str]:
    pages: Counter[str] = Counter()
    current = ""
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header
                current = region(fields[5] if len(fields) > 5 else "", fields[1])
            elif fields[0] == "Referenced:" and fields[1] != "0":
                pages[current] += int(fields[1]) // 4  # kB of 4 KiB pages
    return pages


def the_worker(master: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{master}/task/{master}/children", encoding="ascii") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            children = []
        if len(children) == 1:
            return children[0]
        time.sleep(0.05)
    raise TimeoutError(f"pid {master} has not exactly one worker")


def measure(name: str, argv: list[str], port: int, warmup: int, trials: int) -> dict:
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # until it answers
            try:
                deliver(port)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        worker = the_worker(server.pid, time.monotonic() + TIMEOUT)
        for _ in range(warmup):
            deliver(port)
        samples = []
        for _ in range(trials):
            # The pause lets the worker finish the session (its close, its log write)
            # before the bits are read, and the previous one before they are cleared.
            time.sleep(SETTLE)
            with open(f"/proc/{worker}/clear_refs", "w", encoding="ascii") as f:
                f.write("1")
            deliver(port)
            time.sleep(SETTLE)
            samples.append(referenced(worker))
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=TIMEOUT)
    regions = sorted(set().union(*samples))
    return {
        "system": name,
        "total_pages": sorted(sum(s.values()) for s in samples),
        "median_pages": statistics.median(sum(s.values()) for s in samples),
        "regions": {r: statistics.median(s.get(r, 0) for s in samples) for r in regions},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=1500, help="messages before the trials")
    parser.add_argument("--trials", type=int, default=31, help="messages counted, one at a time")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="forksmtp-pages-", dir="/var/tmp")
    try:
        config = os.path.join(root, "forksmtp.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write("[server]\nworkers = 1\nmax_workers = 4\nmin_spare_workers = 0\n")
        port = free_port()
        results = [measure("forksmtp", [sys.executable, "-m", "forksmtp", "-c", config,
                                        "--listen", f"{HOST}:{port}",
                                        "--maildir", os.path.join(root, "forksmtp")],
                           port, args.warmup, args.trials)]
        port = free_port()
        results.append(measure("pyfloor", [sys.executable, os.path.join(HERE, "bench.py"),
                                           "serve-pyfloor", "--listen", f"{HOST}:{port}",
                                           "--maildir", os.path.join(root, "pyfloor"),
                                           "--workers", "1"],
                               port, args.warmup, args.trials))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for result in results:
        print(f"{result['system']}: {result['median_pages']:g} pages per message "
              f"(median of {args.trials}; all: {result['total_pages']})")
        for name, pages in sorted(result["regions"].items(), key=lambda kv: -kv[1]):
            if pages:
                print(f"    {name:28} {pages:g}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
