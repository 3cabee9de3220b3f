"""Medians over rounds, ratios between systems, and the performance targets judged on them."""
from __future__ import annotations

from .constants import FLOOR, RATIO_PAIRS
from .context import Bench
from .helpers import median_of, ratio
from .measure import user_share

# --------------------------------------------------------------------------- summary

METRICS = ("msgs_per_s", "ack_p50_ms", "ack_p99_ms", "txn_p50_ms", "txn_p99_ms",
           "cpu_user_ms_per_msg", "cpu_sys_ms_per_msg", "cpu_ms_per_msg",
           "worker_uss_mib_median", "worker_uss_mib_max", "master_rss_mib",
           "client_cpu_ms_per_msg", "switches_vol_per_msg", "switches_invol_per_msg")


def summarise(cells: list[dict]) -> dict:
    """Median over rounds of every metric: summary[mode][system][sessions]."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["mode"], cell["system"], cell["sessions"]), []).append(cell)
    summary: dict = {}
    for (mode, system, sessions), group in groups.items():
        good = [c for c in group if not c["problem"]]
        row = {m: median_of([c.get(m) for c in good]) for m in METRICS}
        # The user/system split of the median total, in the proportion of the ticks of
        # all good rounds: user + system is then the total, and rounds too short for a
        # split of their own still count towards it.
        share = user_share(sum(c.get("cpu_ticks_user_s") or 0.0 for c in good),
                           sum(c.get("cpu_ticks_sys_s") or 0.0 for c in good))
        total = row["cpu_ms_per_msg"]
        split = share is not None and total is not None
        row["cpu_user_ms_per_msg"] = total * share if split else None
        row["cpu_sys_ms_per_msg"] = total * (1 - share) if split else None
        row["rounds_ok"], row["rounds"] = len(good), len(group)
        summary.setdefault(mode, {}).setdefault(system, {})[str(sessions)] = row
    return summary


def compute_ratios(summary: dict) -> list[dict]:
    """Every pair of RATIO_PAIRS whose two systems ran, per mode and sessions."""
    rows = []
    for mode, systems in summary.items():
        for top, base in RATIO_PAIRS:
            if top not in systems or base not in systems:
                continue
            for sessions, a in systems[top].items():
                b = systems[base].get(sessions)
                if b is None:
                    continue
                rows.append({"mode": mode, "sessions": int(sessions), "pair": f"{top}/{base}",
                             "msgs_per_s": ratio(a["msgs_per_s"], b["msgs_per_s"]),
                             "cpu_ms_per_msg": ratio(a["cpu_ms_per_msg"], b["cpu_ms_per_msg"]),
                             "cpu_sys_ms_per_msg": ratio(a["cpu_sys_ms_per_msg"],
                                                         b["cpu_sys_ms_per_msg"]),
                             "ack_p99_ms": ratio(a["ack_p99_ms"], b["ack_p99_ms"])})
    return rows


def find_ratio(ratios: list[dict], mode: str, sessions: int, pair: str, key: str):
    for row in ratios:
        if (row["mode"], row["sessions"], row["pair"]) == (mode, sessions, pair):
            return row[key]
    return None


def check_targets(bench: Bench, ratios: list[dict], extras: dict) -> list[dict]:
    """The performance targets, judged at 50 sessions (or the most measured).  Each ratio
    target is also judged for pyfloor, the floor of the shape, when it ran: a target
    pyfloor misses is out of reach for any pre-forked Python server on this machine."""
    at = 50 if 50 in bench.args.sessions else max(bench.args.sessions)

    def r(mode: str, base: str, key: str) -> tuple[float | None, float | None]:
        return (find_ratio(ratios, mode, at, f"forksmtp/{base}", key),
                find_ratio(ratios, mode, at, f"{FLOOR}/{base}", key))

    rows = [
        (f"durable msgs/s vs loop @{at}", r("durable", "loop", "msgs_per_s"), ">=", 1.0),
        (f"durable msgs/s vs aiosmtpd @{at}", r("durable", "aiosmtpd", "msgs_per_s"), ">=", 2.5),
        (f"fsync-off msgs/s vs aiosmtpd @{at}", r("nofsync", "aiosmtpd", "msgs_per_s"),
         ">=", 2.0),
        (f"durable CPU/msg vs aiosmtpd @{at}", r("durable", "aiosmtpd", "cpu_ms_per_msg"),
         "<=", 0.5),
        (f"durable ack p99 vs loop p99 @{at}", r("durable", "loop", "ack_p99_ms"), "<=", 1.5),
    ]
    stream = extras.get("stream", {}).get("forksmtp") or {}
    # Named by its size when it ran; "--big-mib 0" skips it, and a "0 MiB message" row
    # read as a target measured on nothing.
    big = f"{bench.args.big_mib} MiB message" if bench.args.big_mib else "big message (--big-mib 0: not run)"
    rows.append((f"{big}: worker RSS growth MiB", (stream.get("worker_rss_growth_mib"), None),
                 "<", 2.0))
    rows.append((f"{big}: throughput vs disk", (stream.get("vs_disk"), None), ">=", 0.5))
    hold = extras.get("hold", {}).get("forksmtp") or {}
    rows.append(("open sessions: worker USS max MiB", (hold.get("worker_uss_mib_max"), None),
                 "<=", 8.0))
    rows.append(("open sessions: master RSS MiB", (hold.get("master_rss_mib"), None),
                 "<=", 50.0))
    return [{"target": name, "value": value, "need": f"{op} {limit:g}",
             "met": _meets(value, op, limit),
             "floor_value": floor, "floor_met": _meets(floor, op, limit)}
            for name, (value, floor), op, limit in rows]


def _meets(value: float | None, op: str, limit: float) -> bool | None:
    if value is None:
        return None
    return value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit
