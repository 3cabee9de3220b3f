#!/usr/bin/env python3
"""How forksmtp's self-sizing pool answers faults under load, for one checkout or several.

Each run starts the real daemon (as scripts/bench.py does: fsync on, the pool left to
size itself from the built-in 4 workers) on loopback, puts Postfix's smtp-source on it
at --sessions concurrent sessions of 4 KiB messages for --warm seconds, then injects
one fault and measures what clients meet:

  burst           --burst clients connect at once and hold their sessions (they send
                  nothing after the greeting): each one's time from connect() to its
                  220, p50/p90/max, and the pool before and at its peak.
  stalled-client  --kill workers are killed with SIGKILL.  smtp-source, its sessions
                  cut, stops answering on its other connections before it exits, so
                  the workers that greet them are held by a client that says nothing:
                  probe connections (one every 20 ms, 1 s before and 2 s after) time
                  their greeting, p50/p99.
  ceiling         as burst, with max_workers = --ceiling: the 421s the master gives
                  the clients beyond it, first and last, and the 220s.
  stall           every worker is stopped (SIGSTOP) for --stall seconds, three times
                  2 s apart: the pool before and 2 s after each.
  idle-kill       no load: --hold sessions grow the pool and end, then a client
                  connects and the oldest idle worker, the one the kernel wakes for it
                  (EPOLLEXCLUSIVE), is killed with SIGKILL at once; --kills times.  The
                  clients greeted (and how soon), reset, or silent for 5 s.

Systems (--system NAME=CMD, repeatable) run alternately, in reverse order every other
round, so that machine drift cancels.  A checkout must be compiled in place (python
setup.py build_ext --inplace) to be measured as users run it.  Every socket has a
timeout, every loop a bound, and all traffic stays on 127.0.0.1.

  python3 scripts/pool_faults.py --rounds 3 \\
      --system before="env PYTHONPATH=/src/old python3 -m forksmtp" \\
      --system after="env PYTHONPATH=/src/new python3 -m forksmtp"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil

# The bench's modules live in benchlib/ beside this script (scripts/ is no package).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib.constants import HOST  # noqa: E402
from benchlib.helpers import percentile  # noqa: E402
from benchlib.servers import default_forksmtp_cmd  # noqa: E402

SCENARIOS = ("burst", "stalled-client", "ceiling", "stall", "idle-kill")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
# The pool's minimum with no `workers` in the config (Daemon writes none): the pool
# idle-kill grows must exceed it, or the killed worker is replaced.
BUILT_IN_WORKERS = 4


class Daemon:
    """forksmtp from ``cmd``, with its own config, Maildir and log under ``root``."""

    def __init__(self, cmd: list[str], root: str, port: int, max_workers: int) -> None:
        self.root, self.port = root, port
        cfg = os.path.join(root, "forksmtp.toml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(f"[server]\nmax_workers = {max_workers}\nmax_connections = 1000\n"
                    "max_connections_per_ip = 1000\ngraceful_timeout = 5\n"
                    "[log]\nlevel = \"info\"\n")
        self.log_path = os.path.join(root, "log")
        self.maildir = os.path.join(root, "Maildir")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd + ["-c", cfg, "--listen", f"{HOST}:{port}",
                                                "--maildir", self.maildir],
                                         stderr=log, stdout=subprocess.DEVNULL, cwd=root)
        self.master = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not self._ready():
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not self._ready():  # a run against a daemon that never served measures nothing
            self.proc.kill()
            self.proc.wait(5)
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"forksmtp did not log [READY] within 15 s: {shlex.join(cmd)}\n{tail}")

    def _ready(self) -> bool:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "[READY]" in f.read()
        except OSError:
            return False

    def workers(self) -> list[psutil.Process]:
        try:
            return self.master.children()
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> dict:
        """SIGTERM, wait, and what the log and the Maildir say."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        count = lambda sub: len(os.listdir(os.path.join(self.maildir, sub)))  # noqa: E731
        return {"stored": count("new"), "left_in_tmp": count("tmp"),
                "tracebacks": text.count("Traceback"), "error_lines": text.count("[ERROR]"),
                "pool_lines": text.count("[POOL]")}


def start_load(port: int, sessions: int) -> subprocess.Popen:
    """smtp-source, bounded by a message count it never reaches; killed by pid."""
    return subprocess.Popen([SMTP_SOURCE, "-c", "-s", str(sessions), "-m", "10000000",
                             "-l", "4096", "-f", "load@example.com", "-t", "to@example.com",
                             f"{HOST}:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def greeting(port: int, hold: list | None = None) -> tuple[float, bytes]:
    """Seconds from connect() to the first reply line, and its code (b"" on failure).
    The socket is closed, or kept in ``hold`` for a held session."""
    t0 = time.monotonic()
    try:
        sock = socket.create_connection((HOST, port), timeout=10)
    except OSError:
        return time.monotonic() - t0, b""
    try:
        line = sock.recv(512)
        took = time.monotonic() - t0
    except OSError:
        line, took = b"", time.monotonic() - t0
    if hold is None:
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        sock.close()
    else:
        hold.append(sock)
    return took, line[:3]


def quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``values``, to 0.1 ms."""
    value = percentile(sorted(values), q * 100)
    return None if value is None else round(value, 4)


def release(held: list) -> None:
    """End the held sessions."""
    for sock in held:
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        sock.close()


def crowd(daemon: Daemon, n: int) -> dict:
    """``n`` clients connect at once and hold their sessions: greeting times by code, and
    the pool before and at its peak."""
    held: list = []
    results: list = [None] * n

    def one(i: int) -> None:
        results[i] = greeting(daemon.port, held)

    before = len(daemon.workers())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    peak, deadline = before, time.monotonic() + 15
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        peak = max(peak, len(daemon.workers()))
        time.sleep(0.02)
    for t in threads:
        t.join(5)
    release(held)
    by_code: dict[str, list[float]] = {}
    for result in results:
        took, code = result if result else (0.0, b"")
        by_code.setdefault(code.decode("ascii", "replace") or "none", []).append(took)
    return {"pool_before": before, "pool_peak": peak, "clients": n,
            "codes": {code: len(v) for code, v in by_code.items()}, "times": by_code}


def scenario_burst(daemon: Daemon, args) -> dict:
    got = crowd(daemon, args.burst)
    greeted = got.pop("times").get("220", [])
    return dict(got, p50=quantile(greeted, 0.5), p90=quantile(greeted, 0.9),
                max=quantile(greeted, 1.0))


def scenario_ceiling(daemon: Daemon, args) -> dict:
    got = crowd(daemon, args.burst)
    times = got.pop("times")
    refused, greeted = times.get("421", []), times.get("220", [])
    return dict(got, first_421=quantile(refused, 0.0), last_421=quantile(refused, 1.0),
                last_220=quantile(greeted, 1.0))


def probes(port: int, seconds: float) -> list[float]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        took, code = greeting(port)
        out.append(took if code == b"220" else float("nan"))
        time.sleep(max(0.0, 0.02 - (time.monotonic() - t)))
    return out


def scenario_stalled_client(daemon: Daemon, args) -> dict:
    before = probes(daemon.port, 1.0)
    victims = daemon.workers()[:args.kill]
    for proc in victims:
        os.kill(proc.pid, signal.SIGKILL)
    after = probes(daemon.port, 2.0)
    ok = lambda v: [x for x in v if x == x]  # noqa: E731  (NaN: no 220)
    return {"killed": len(victims), "before_p50": quantile(ok(before), 0.5),
            "before_p99": quantile(ok(before), 0.99), "after_p50": quantile(ok(after), 0.5),
            "after_p99": quantile(ok(after), 0.99), "after_max": quantile(ok(after), 1.0),
            "probes_without_220": len(before) + len(after) - len(ok(before)) - len(ok(after))}


def scenario_stall(daemon: Daemon, args) -> dict:
    pools = []
    for _ in range(3):
        workers = daemon.workers()
        for proc in workers:
            os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(args.stall)
        for proc in workers:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(2.0)
        pools.append([len(workers), len(daemon.workers())])
    return {"stall_s": args.stall, "pool_before_after": pools}


def kill_the_woken(daemon: Daemon) -> tuple[str, float]:
    """Connect, and kill the oldest idle worker at once: what the client then meets
    ("220", "reset", "silent" for 5 s, or "refused") and after how long."""
    workers = sorted(daemon.workers(), key=lambda w: (w.create_time(), w.pid))
    t0 = time.monotonic()
    try:
        sock = socket.create_connection((HOST, daemon.port), timeout=5)
    except OSError:
        return "refused", time.monotonic() - t0
    try:
        os.kill(workers[0].pid, signal.SIGKILL)
        line = sock.recv(512)
        return ("220" if line.startswith(b"220") else "reset"), time.monotonic() - t0
    except socket.timeout:
        return "silent", time.monotonic() - t0
    except OSError:
        return "reset", time.monotonic() - t0
    finally:
        sock.close()


def scenario_idle_kill(daemon: Daemon, args) -> dict:
    outcomes: dict[str, list[float]] = {}
    for _ in range(args.kills):
        held: list = []
        for _ in range(args.hold):
            greeting(daemon.port, held)
        # More workers than the held sessions (and so than BUILT_IN_WORKERS): the one
        # killed is not replaced, so only the others can take its client.
        deadline = time.monotonic() + 10
        while len(daemon.workers()) <= args.hold and time.monotonic() < deadline:
            time.sleep(0.05)
        release(held)
        time.sleep(0.5)
        what, took = kill_the_woken(daemon)
        outcomes.setdefault(what, []).append(took)
        time.sleep(0.2)
    greeted = outcomes.get("220", [])
    return {"kills": args.kills, "greeted": len(greeted), "silent_5s": len(outcomes.get("silent", [])),
            "reset": len(outcomes.get("reset", [])), "refused": len(outcomes.get("refused", [])),
            "greeted_p50": quantile(greeted, 0.5), "greeted_max": quantile(greeted, 1.0)}


RUNNERS = {"burst": scenario_burst, "stalled-client": scenario_stalled_client,
           "ceiling": scenario_ceiling, "stall": scenario_stall, "idle-kill": scenario_idle_kill}


def run_one(name: str, cmd: list[str], scenario: str, port: int, args) -> dict:
    root = tempfile.mkdtemp(prefix="forksmtp-faults-", dir=args.root)
    daemon = Daemon(cmd, root, port, args.ceiling if scenario == "ceiling" else args.max_workers)
    quiet = scenario == "idle-kill"  # any arrival would wake a worker for the stranded client
    load = None if quiet else start_load(port, args.sessions)
    try:
        if load is not None:
            time.sleep(args.warm)
        figures = RUNNERS[scenario](daemon, args)
        figures["load_alive_at_end"] = None if load is None else load.poll() is None
    finally:
        if load is not None:
            load.kill()
            load.wait(10)
        health = daemon.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return dict(system=name, scenario=scenario, **figures, **health)


HEADLINE = {"burst": ("p50", "max", "pool_peak"),
            "stalled-client": ("before_p99", "after_p99", "after_max"),
            "ceiling": ("first_421", "last_421", "last_220"),
            "stall": ("pool_before_after",),
            "idle-kill": ("greeted", "silent_5s", "reset", "greeted_max")}


def table(results: list[dict], systems: list[str]) -> str:
    lines = []
    for scenario in SCENARIOS:
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        keys = HEADLINE[scenario]
        lines += [f"### {scenario}", "", "| system | " + " | ".join(keys) + " | tracebacks | tmp left |",
                  "|---|" + "---|" * (len(keys) + 2)]
        for name in systems:
            mine = [r for r in rows if r["system"] == name]
            cells = [", ".join(str(r[k]) for r in mine) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) +
                         f" | {sum(r['tracebacks'] for r in mine)} | {sum(r['left_in_tmp'] for r in mine)} |")
        lines.append("")
    return "\n".join(lines)


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", action="append", default=[], metavar="NAME=CMD",
                   help="a forksmtp command to measure, run in its run's own directory, so that an "
                   "absolute PYTHONPATH in it picks the checkout (repeatable; default: this script's "
                   "checkout, as bench.py's default)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--warm", type=float, default=3.0)
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--kill", type=int, default=3)
    p.add_argument("--stall", type=float, default=0.15)
    p.add_argument("--kills", type=int, default=20, help="idle-kill: clients whose woken worker is killed")
    p.add_argument("--hold", type=int, default=6, help="idle-kill: sessions held to grow the pool")
    p.add_argument("--max-workers", type=int, default=200)
    p.add_argument("--ceiling", type=int, default=30)
    p.add_argument("--port-base", type=int, default=6200)
    p.add_argument("--root", default=None, help="where the runs' files go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write results.json and results.md here")
    p.add_argument("--keep", action="store_true", help="keep each run's Maildir and log")
    p.add_argument("--quick", action="store_true", help="tiny figures, one round: a check that it runs")
    args = p.parse_args(argv)
    if args.hold < BUILT_IN_WORKERS:
        p.error(f"--hold must be at least {BUILT_IN_WORKERS}: a smaller pool replaces the worker idle-kill kills")
    if args.quick:
        args.rounds, args.sessions, args.warm, args.burst, args.kill = 1, 5, 0.5, 10, 1
        args.kills = 2
        args.ceiling = 6
    return args


def system_commands(specs: list[str]) -> dict[str, list[str]]:
    """NAME=CMD specs as argv lists; none: this script's checkout, as bench.py's default."""
    if not specs:
        return {"forksmtp": default_forksmtp_cmd()}
    return {name: shlex.split(cmd) for name, _, cmd in (s.partition("=") for s in specs)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not os.access(SMTP_SOURCE, os.X_OK):
        print(f"smtp-source not found ({SMTP_SOURCE}); Debian: apt-get install postfix", file=sys.stderr)
        return 2
    commands = system_commands(args.system)
    names = list(commands)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    results, port = [], args.port_base
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for scenario in scenarios:
            for name in order:
                port = args.port_base + (port - args.port_base + 1) % 50  # a fresh port each run
                result = run_one(name, commands[name], scenario, port, args)
                result["round"] = rnd
                results.append(result)
                print(json.dumps(result), flush=True)
    report = table(results, names)
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"argv": sys.argv, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
            f.write(f"Command: `{shlex.join(sys.argv)}`\n\n{report}\n")
    failed = any(r["tracebacks"] or r["left_in_tmp"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
