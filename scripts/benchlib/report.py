"""The results as Markdown and as a chart, and the description of the run they carry."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

from .constants import FLOOR, SINK
from .context import Bench
from .summary import find_ratio

# --------------------------------------------------------------------------- output

def fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def md_results_table(summary: dict, mode: str) -> list[str]:
    lines = ["| system | sessions | msgs/s | ack p50 ms | ack p99 ms | txn p99 ms | "
             "CPU user ms/msg | CPU sys ms/msg | CPU ms/msg | sleeps/msg | preempted/msg | "
             "USS/worker MiB | rounds ok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for system, by_sessions in summary.get(mode, {}).items():
        for sessions, row in sorted(by_sessions.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {system} | {sessions} | {fmt(row['msgs_per_s'], 0)} | "
                f"{fmt(row['ack_p50_ms'], 2)} | {fmt(row['ack_p99_ms'], 2)} | "
                f"{fmt(row['txn_p99_ms'], 2)} | {fmt(row['cpu_user_ms_per_msg'], 3)} | "
                f"{fmt(row['cpu_sys_ms_per_msg'], 3)} | {fmt(row['cpu_ms_per_msg'], 3)} | "
                f"{fmt(row['switches_vol_per_msg'], 1)} | {fmt(row['switches_invol_per_msg'], 1)} | "
                f"{fmt(row['worker_uss_mib_median'], 1)} | {row['rounds_ok']}/{row['rounds']} |")
    return lines


def md_ratio_table(ratios: list[dict]) -> list[str]:
    lines = ["| mode | sessions | ratio | msgs/s | CPU/msg | sys CPU/msg | ack p99 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(ratios, key=lambda r: (r["mode"], r["pair"], r["sessions"])):
        lines.append(f"| {r['mode']} | {r['sessions']} | {r['pair']} | "
                     f"{fmt(r['msgs_per_s'], 2)} | {fmt(r['cpu_ms_per_msg'], 2)} | "
                     f"{fmt(r['cpu_sys_ms_per_msg'], 2)} | {fmt(r['ack_p99_ms'], 2)} |")
    return lines


def reference_ratios(bench: Bench, payload: dict, system: str,
                     pairs: tuple[str, ...]) -> tuple[str, list] | None:
    """For a reference system's note: None when it did not run; else where the note quotes
    the run ("durable, 50 sessions": where the targets are judged, or the nearest measured)
    and each pair's msgs/s ratio there (None where not measured)."""
    if not any(system in systems for systems in payload["summary"].values()):
        return None
    modes, levels = bench.args.modes, bench.args.sessions
    mode = "durable" if "durable" in modes else modes[0]
    at = 50 if 50 in levels else max(levels)
    where = f"{mode}, {at} session{'' if at == 1 else 's'}"
    return where, [find_ratio(payload["ratios"], mode, at, pair, "msgs_per_s") for pair in pairs]


def md_sink_note(bench: Bench, payload: dict) -> list[str]:
    """What the smtp-sink rows mean, with this run's loop/smtp-sink at the target level."""
    ref = reference_ratios(bench, payload, SINK, (f"loop/{SINK}", f"forksmtp/{SINK}"))
    if ref is None:
        return []
    where, (loop_vs, ours_vs) = ref
    verdict = ("" if loop_vs is None else
               f" In this run ({where}) loop/{SINK} is {fmt(loop_vs, 2)}: "
               f"{SINK} {'exceeds' if loop_vs < 1 else 'does not exceed'} the loop"
               + ("" if ours_vs is None else f", and forksmtp reaches {fmt(ours_vs, 2)} "
                  f"of {SINK}") + ".")
    return ["", f"### {SINK}: the ceiling of the SMTP exchange", "",
            f"{SINK} is Postfix's C test server ({bench.smtp_sink}): it answers 250 to every "
            "command and stores nothing, so its runs skip the stored = acked check and count "
            "acknowledged messages only (it runs the same way in both modes). Driven by the "
            "same load generator, it is the ceiling of the SMTP exchange itself on this "
            "machine: the client, the kernel's TCP on loopback and a C server doing no "
            "storage, all sharing these CPUs. forksmtp does that exchange and stores every "
            "message durably besides, so forksmtp/loop ≥ 1 is only reachable if "
            f"{SINK} itself exceeds the loop." + verdict]


def md_floor_note(bench: Bench, payload: dict) -> list[str]:
    """What the pyfloor rows mean, with this run's pyfloor/loop and forksmtp/pyfloor."""
    ref = reference_ratios(bench, payload, FLOOR, (f"{FLOOR}/loop", f"forksmtp/{FLOOR}"))
    if ref is None:
        return []
    where, (floor_vs, ours_vs) = ref
    verdict = ("" if floor_vs is None else
               f" In this run ({where}) {FLOOR}/loop is {fmt(floor_vs, 2)}"
               + (": no pre-forked Python server reaches the loop here" if floor_vs < 1
                  else "") + ("" if ours_vs is None else
                              f"; forksmtp reaches {fmt(ours_vs, 2)} of {FLOOR}") + ".")
    return ["", f"### {FLOOR}: the floor of forksmtp's shape", "",
            f"{FLOOR} (scripts/benchlib/floor.py) is a pre-forked Python SMTP server cut to "
            "the bone: each worker runs a blocking accept/recv/send loop, answers 250 to "
            "every command without checking it, and stores each message exactly as forksmtp "
            "does (O_TMPFILE, write, fsync, link into new/, fsync new/); it has no limits, "
            "no timeouts, no log, no admission control. Every pre-forked Python server does at "
            "least this work per message, so its rate bounds what one can reach on this "
            "machine: what separates forksmtp from it is the cost of forksmtp's rules and "
            "guarantees, and a rate it misses is out of reach for the shape itself." + verdict]


def md_targets(targets: list[dict]) -> list[str]:
    """forksmtp's figure against each target; pyfloor's beside it when it ran."""
    verdict = {True: "yes", False: "**no**", None: "not measured"}
    floor = any(t["floor_value"] is not None for t in targets)
    lines = ["", "### Targets", ""]
    if floor:
        lines += [f"{FLOOR}'s columns judge the same ratio for the floor of the shape: a "
                  "target it misses is out of reach for any pre-forked Python server here.", "",
                  f"| target | value | need | met | {FLOOR} | {FLOOR} met |",
                  "|---|---:|---|---|---:|---|"]
    else:
        lines += ["| target | value | need | met |", "|---|---:|---|---|"]
    for t in targets:
        row = f"| {t['target']} | {fmt(t['value'], 2)} | {t['need']} | {verdict[t['met']]} |"
        if floor:
            shown = verdict[t["floor_met"]] if t["floor_value"] is not None else "–"
            row += f" {fmt(t['floor_value'], 2)} | {shown} |"
        lines.append(row)
    return lines


def md_extras(extras: dict) -> list[str]:
    lines = []
    if extras.get("stream"):
        lines += ["", "### One big message, each transfer right after a disk sequential "
                      "write (1 MiB writes + fsync) of the same size", "",
                  "| system | MiB | median MiB/s | each MiB/s | disk median MiB/s | "
                  "disk each MiB/s | × disk | worker RSS growth MiB (max) |",
                  "|---|---:|---:|---|---:|---|---:|---:|"]
        for system, s in extras["stream"].items():
            each = ", ".join(fmt(r, 0) for r in s["mib_per_s_each"])
            disk = ", ".join(fmt(r, 0) for r in s["disk_mib_per_s_each"])
            lines.append(f"| {system} | {s['size_mib']} | {fmt(s['mib_per_s'], 0)} | {each} | "
                         f"{fmt(s['disk_mib_per_s'], 0)} | {disk} | {fmt(s['vs_disk'], 2)} | "
                         f"{fmt(s['worker_rss_growth_mib'], 2)} |")
    if extras.get("hold"):
        lines += ["", "### Open sessions held at once (greeting + EHLO, idle)", "",
                  "| system | sessions held | workers | USS/worker median MiB | "
                  "USS/worker max MiB | master RSS MiB |", "|---|---:|---:|---:|---:|---:|"]
        for system, h in extras["hold"].items():
            lines.append(f"| {system} | {h['held']}/{h['sessions']} | {h['workers']} | "
                         f"{fmt(h['worker_uss_mib_median'], 2)} | "
                         f"{fmt(h['worker_uss_mib_max'], 2)} | {fmt(h['master_rss_mib'], 1)} |")
    return lines


def md_header(bench: Bench, payload: dict) -> list[str]:
    a, env = bench.args, payload["environment"]
    return [f"## Benchmark ({payload['started']})", "",
            f"Command: `{payload['command']}`  ",
            f"Load generator: {payload['client']}  ",
            f"Machine: {env['cpus']} CPUs, Linux {env['kernel']}, Maildirs on {env['fs']} "
            f"({env['root']}), Python {env['python']}  ",
            f"forksmtp: {env['forksmtp_build']}; checkout {env.get('checkout') or 'unknown'}  ",
            f"Messages: {a.size} bytes, {a.messages} per cell (at least one per session), "
            f"{a.per_conn} per connection, {a.rounds} round(s), medians shown; "
            f"forksmtp log level {a.server_log_level}.  ",
            "ack latency: last byte of the final dot sent → 250 read (loop: create in tmp/ → "
            "end of the fsync of new/); txn: connect (or MAIL) → 250; CPU: the server's "
            "whole process tree (loop: its own processes); sleeps and preempted: the voluntary "
            "and involuntary context switches of the same processes, a sleep being a wait "
            "for the client, the disk or a lock (– where a worker or thread ended during the "
            "cell, its counts gone with it)."] + (
        ["", "smtp-source reports no per-message timing: the latency columns of the SMTP "
             "servers are empty."] if a.client == "smtp-source" else [])


def write_markdown(bench: Bench, payload: dict) -> str:
    lines = md_header(bench, payload)
    titles = {"durable": "Durable (fsync on)", "nofsync": "fsync off"}
    for mode in bench.args.modes:
        lines += ["", f"### {titles[mode]}", ""] + md_results_table(payload["summary"], mode)
    if payload["ratios"]:
        lines += ["", "### Ratios (same run, medians)", ""] + md_ratio_table(payload["ratios"])
    lines += md_floor_note(bench, payload)
    lines += md_sink_note(bench, payload)
    lines += md_extras(payload["extras"])
    lines += md_targets(payload["targets"])
    for title, items in (("Failures", bench.failures), ("Warnings", bench.warnings)):
        lines += ["", f"### {title}", ""] + [f"- {i}" for i in items] if items else []
    text = "\n".join(lines) + "\n"
    with open(os.path.join(bench.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def write_chart(bench: Bench, summary: dict) -> str | None:
    """msgs/s against sessions, one panel per mode; None (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install -e '.[bench]')"
    modes = [m for m in bench.args.modes if m in summary]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for system, rows in summary[mode].items():
            points = sorted((int(s), r["msgs_per_s"]) for s, r in rows.items()
                            if r["msgs_per_s"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=system)
        ax.set(title=f"{mode} ({bench.args.size} B messages)", xlabel="concurrent sessions",
               ylabel="messages/s acked", xscale="log")
        ax.set_xticks(bench.args.sessions, [str(s) for s in bench.args.sessions])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(bench.out, "msgs_per_s.png"), dpi=110)
    plt.close(fig)
    return None


def environment(bench: Bench) -> dict:
    return {"cpus": os.cpu_count(), "kernel": os.uname().release, "fs": bench.fs,
            "root": bench.root, "python": sys.version.split()[0],
            "forksmtp_cmd": shlex.join(bench.forksmtp_cmd),
            "forksmtp_build": forksmtp_build(bench), "checkout": checkout(),
            "smtp_source": shutil.which("smtp-source"), "smtp_sink": bench.smtp_sink}


def checkout() -> str | None:
    """The commit of the checkout the bench runs from, "+changes" if it has any: runs of
    different code must not pass for the same one."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")


def forksmtp_build(bench: Bench) -> str:
    """forksmtp's --version line, which names the build that ran (compiled or pure
    Python, and why)."""
    try:
        probe = subprocess.run(bench.forksmtp_cmd + ["--version"], capture_output=True,
                               text=True, timeout=30, cwd=bench.root)  # as the servers run
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return probe.stdout.strip() or f"unknown (--version exited {probe.returncode})"


def client_description(args: argparse.Namespace) -> str:
    if args.client == "smtp-source":
        return f"Postfix smtp-source ({shutil.which('smtp-source')})"
    procs = args.client_procs or os.cpu_count()
    return (f"forksmtp bench client (raw sockets, up to {procs} processes, "
            f"{'pipelined' if args.pipelining else 'one command per round trip'})")
