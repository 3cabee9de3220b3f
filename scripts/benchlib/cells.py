"""One measurement (a cell) per system, mode, sessions and round; the matrix of them all."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

from .clients import run_our_client, run_smtp_source
from .constants import LOOP_SYSTEMS, SINK
from .context import Bench, discard_maildir, fresh_maildir
from .helpers import log, percentile, split_evenly
from .loop import loop_prepare, loop_run
from .maildir import check_stored
from .measure import memory_report, user_share
from .processes import run_gated
from .report import fmt
from .servers import Server, start_system
from .summary import METRICS

SETTLE_FOR = 1.0  # seconds of untimed load with forksmtp's pool unchanged before a cell
SETTLE_MAX = 15.0  # seconds of settling at most

# --------------------------------------------------------------------------- cells


def cell_messages(bench: Bench, sessions: int) -> int:
    return max(bench.args.messages, sessions * bench.args.per_conn)


def latency_fields(prefix: str, values: list[float]) -> dict:
    vals = sorted(values)
    return {f"{prefix}_p50_ms": _ms(percentile(vals, 50)),
            f"{prefix}_p99_ms": _ms(percentile(vals, 99))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def rate_fields(acked: int, wall: float, cpu: float, ticks_user: float, ticks_sys: float) -> dict:
    """Per-message figures; the user/system split only where there were ticks enough
    (the summary pools the ticks of a cell's rounds: see summarise)."""
    per = 1000.0 / acked if acked else None
    share = user_share(ticks_user, ticks_sys)
    split = per is not None and share is not None
    return {"acked": acked, "wall_s": wall,
            "msgs_per_s": acked / wall if acked and wall > 0 else None,
            "cpu_user_ms_per_msg": cpu * share * per if split else None,
            "cpu_sys_ms_per_msg": cpu * (1 - share) * per if split else None,
            "cpu_ms_per_msg": cpu * per if per else None,
            "cpu_ticks_user_s": ticks_user, "cpu_ticks_sys_s": ticks_sys}


def switch_fields(acked: int, switches: tuple[int, int] | None) -> dict:
    """Context switches per message, voluntary (sleeps) and involuntary (preemptions);
    None where they could not be counted (see measure.switch_delta)."""
    per = 1.0 / acked if acked and switches is not None else None
    return {"switches_vol_per_msg": switches[0] * per if per else None,
            "switches_invol_per_msg": switches[1] * per if per else None}


def run_loop_cell(bench: Bench, system: str, mode: str, sessions: int, tag: str) -> dict:
    """N processes delivering into one Maildir, N = the sessions of the SMTP cells."""
    maildir = fresh_maildir(bench, tag)
    ids = [f"{tag}.{i}" for i in range(cell_messages(bench, sessions))]
    arg_list = [(maildir, share, bench.args.size, mode == "durable", system == "loop-tmpfile")
                for share in split_evenly(ids, sessions)]
    results, _ = run_gated(bench.reaper, loop_prepare, loop_run, arg_list,
                           bench.args.run_timeout)
    done = [i for r in results for i in r["done"]]
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    lat = [x for r in results for x in r["lat"]]
    user, system = sum(r["user"] for r in results), sum(r["sys"] for r in results)
    switches = (sum(r["nvcsw"] for r in results), sum(r["nivcsw"] for r in results))
    stored, problem = check_stored(maildir, done)
    discard_maildir(bench, maildir)
    return {"sent": len(ids), "stored": stored, "problem": problem,
            **rate_fields(len(done), wall, user + system, user, system),
            **switch_fields(len(done), switches), **latency_fields("ack", lat)}


def run_smtp_cell(bench: Bench, system: str, mode: str, sessions: int, tag: str) -> dict:
    """Start the server fresh, drive the load, measure, stop, check what was stored."""
    maildir = fresh_maildir(bench, tag)
    ids = [f"{tag}.{i}" for i in range(cell_messages(bench, sessions))]
    server = start_system(bench, system, mode == "durable", sessions, maildir)
    drive = run_smtp_source if bench.args.client == "smtp-source" else run_our_client
    try:
        warm = warm_up(bench, server, drive, tag, sessions)
        if system == "forksmtp":
            warm += settle_pool(bench, server, drive, tag, sessions)
        load = drive(bench, server, ids, sessions)
        memory = memory_report(server)
    finally:
        bench.reaper.stop_server(server.popen)
    acked = load["acked"] if load["acked"] is not None else ids
    stored, problem = (None, None) if system == SINK else \
        check_stored(maildir, None if load["acked"] is None else warm + acked,
                     len(warm) + len(ids))   # smtp-sink stores nothing
    if stored is not None:
        stored -= len(warm)
    if problem:
        keep_log(bench, server, tag)
    discard_maildir(bench, maildir)
    cpu, ticks_user, ticks_sys, vanished = load["cpu"]
    return {"sent": len(ids), "stored": stored, "problem": problem,
            **rate_fields(len(acked), load["wall"], cpu, ticks_user, ticks_sys),
            **switch_fields(len(acked), load["switches"]),
            **latency_fields("ack", load["ack_lat"]), **latency_fields("txn", load["txn_lat"]),
            "rejected": dict(load["rejected"]), "errors": dict(load["errors"]),
            "unsettled": load["unsettled"], "workers_vanished": vanished,
            "client_cpu_ms_per_msg": (1000.0 * load["client_cpu"] / len(acked)
                                      if acked and load["client_cpu"] is not None else None),
            **memory}


def warm_up(bench: Bench, server: Server, drive, tag: str, sessions: int) -> list[str]:
    """Untimed messages first, so that the cell measures the steady state: a fresh
    server's first sessions pay one-off costs (a forked worker's first writes to pages it
    shares with the master copy them) that its long life amortises.  Returns the acked
    ids, which the stored-files check then expects too."""
    ids = [f"{tag}.warm{i}" for i in range(bench.args.warmup * sessions)]
    return untimed(bench, server, drive, ids, sessions, "warm-up") if ids else []


def untimed(bench: Bench, server: Server, drive, ids: list[str], sessions: int,
            what: str) -> list[str]:
    """Send ``ids`` untimed; every one must be acked.  Returns the acked ids."""
    result = drive(bench, server, ids, sessions)
    acked = result["acked"] if result["acked"] is not None else ids[:result.get("count", 0)]
    if len(acked) != len(ids):
        raise RuntimeError(f"{what}: {len(acked)} of {len(ids)} messages acked")
    return list(acked)


def settle_pool(bench: Bench, server: Server, drive, tag: str, sessions: int) -> list[str]:
    """forksmtp's pool sizes itself to the load (it starts a worker more only while the
    CPUs have time for one, one a quarter-second): more untimed batches until its
    processes have stayed as many for SETTLE_FOR seconds, so that the cell measures the
    pool the load settles it at rather than its growth.  Returns the acked ids."""
    acked: list[str] = []
    count, since, start = len(server.tree()), time.monotonic(), time.monotonic()
    batch = 0
    while time.monotonic() - since < SETTLE_FOR and time.monotonic() - start < SETTLE_MAX:
        batch += 1
        ids = [f"{tag}.settle{batch}.{i}" for i in range(max(bench.args.warmup, 1) * sessions)]
        acked += untimed(bench, server, drive, ids, sessions, "pool settling")
        now_count = len(server.tree())
        if now_count != count:
            count, since = now_count, time.monotonic()
    return acked


def keep_log(bench: Bench, server: Server, tag: str) -> None:
    """Copy a failing server's log into the results folder for the operator."""
    try:
        shutil.copy(server.log_path, os.path.join(bench.out, f"{tag}.log"))
    except OSError:
        pass


def run_cell(bench: Bench, system: str, mode: str, sessions: int, rnd: int) -> dict:
    """One measurement; a cell that breaks is recorded as failed and the run goes on."""
    tag = f"r{rnd}-{system}-{mode}-c{sessions}"
    runner = run_loop_cell if system in LOOP_SYSTEMS else run_smtp_cell
    cell: dict[str, Any] = {"system": system, "mode": mode, "sessions": sessions,
                            "round": rnd, "sent": 0, "acked": 0, "stored": None,
                            **{m: None for m in METRICS}}
    try:
        cell.update(runner(bench, system, mode, sessions, tag))
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        cell["problem"] = f"{type(exc).__name__}: {exc}"
    report_cell(bench, cell)
    return cell


def report_cell(bench: Bench, cell: dict) -> None:
    """One progress line per cell; loud lines for lost mail and for refused messages."""
    log(f"  {cell['system']:<13} {cell['mode']:<8} c={cell['sessions']:<4} "
        f"r={cell['round']}  {fmt(cell['msgs_per_s'], 0):>6} msgs/s  "
        f"ack p50 {fmt(cell['ack_p50_ms'], 2)} p99 {fmt(cell['ack_p99_ms'], 2)} ms  "
        f"cpu {fmt(cell['cpu_ms_per_msg'], 3)} ms/msg")
    where = f"{cell['system']} {cell['mode']} c={cell['sessions']} round {cell['round']}"
    if cell["problem"]:
        bench.failures.append(f"{where}: {cell['problem']}")
        log(f"!!! FAILED RUN ({where}): {cell['problem']}")
    if cell["acked"] < cell["sent"] and not cell["problem"]:
        note = (f"{where}: {cell['sent'] - cell['acked']} of {cell['sent']} messages not "
                f"acked; rejected {cell.get('rejected')}, errors {cell.get('errors')}")
        bench.warnings.append(note)
        log(f"!!! {note}")


def run_matrix(bench: Bench) -> list[dict]:
    """Rounds x modes x sessions, the systems alternating innermost so drift cancels;
    every other round runs them in reverse order, so that no system always follows the
    same one (what a cell leaves behind, dirty pages or a warm cache, lands on each in
    turn)."""
    cells = []
    for rnd in range(bench.args.rounds):
        systems = bench.args.systems if rnd % 2 == 0 else bench.args.systems[::-1]
        for mode in bench.args.modes:
            for sessions in bench.args.sessions:
                for system in systems:
                    cells.append(run_cell(bench, system, mode, sessions, rnd))
    return cells
