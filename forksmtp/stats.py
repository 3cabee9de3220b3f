"""The ``[STATS]`` document (contract section 2): scoreboard counts plus psutil
figures per worker, logged on one line and written atomically to ``stats_file``."""

from __future__ import annotations

import json
import os
import time

from . import process

try:
    import psutil
except ImportError:  # stats lose rss/cpu figures, nothing else
    psutil = None


def process_figures(pid: int) -> dict:
    """rss/uss bytes and CPU seconds of one process; zeros if it is gone."""
    if psutil is None:
        return {"rss": 0, "uss": 0, "cpu_s": 0.0}
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            mem = p.memory_info()
            cpu = p.cpu_times()
        try:
            uss = p.memory_full_info().uss
        except (psutil.AccessDenied, AttributeError):
            uss = 0
        return {"rss": mem.rss, "uss": uss, "cpu_s": round(cpu.user + cpu.system, 3)}
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return {"rss": 0, "uss": 0, "cpu_s": 0.0}


def build(snapshot, *, started: float, config_generation: int, master_rejected: dict,
          stress: bool, auth_checks: tuple[int, int] = (0, 0)) -> dict:
    """The stats object from a scoreboard snapshot; ``auth_checks``: the password checks
    running now, and how many may run at once."""
    totals = snapshot.totals
    workers = []
    now = time.monotonic()
    for slot in snapshot.slots:
        # Seconds its client has kept the worker waiting, marked once that reaches
        # connection.CLIENT_WAIT_MARK (0.05 s): an idle or slow client holding a worker.
        waited = round(now - slot.client_wait, 3) if slot.held_by_client else 0.0
        entry = {"pid": slot.pid, "state": slot.state_name, "sessions": slot.counters.sessions,
                 "generation": slot.generation, "client": slot.client, "phase": slot.phase,
                 "client_wait_s": waited}
        entry.update(process_figures(slot.pid))
        workers.append(entry)
    rejected = dict(totals.connections_rejected)
    for reason, n in master_rejected.items():
        rejected[reason] = rejected.get(reason, 0) + n
    return {
        "uptime_s": round(time.monotonic() - started, 3),
        "master": dict(pid=os.getpid(), **process_figures(os.getpid())),
        "workers": workers,
        "connections_active": snapshot.active,
        "connections_total": snapshot.connections_total + sum(master_rejected.values()),
        "connections_rejected": rejected,
        "messages_accepted": totals.messages_accepted,
        "messages_rejected": {k: v for k, v in totals.messages_rejected.items() if v},
        "bytes_received": totals.bytes_received,
        "tls": {"handshakes": totals.events["tls_ok"], "resumed": totals.events["tls_resumed"],
                "failed": totals.events["tls_failed"]},
        "auth": {"succeeded": totals.events["auth_ok"], "failed": totals.events["auth_failed"],
                 "deferred": totals.events["auth_deferred"],
                 "checks_running": auth_checks[0], "checks_max": auth_checks[1]},
        "config_generation": config_generation,
        "stress": stress,
        "per_ip": dict(snapshot.per_ip),
    }


def dumps(stats: dict) -> str:
    return json.dumps(stats, separators=(",", ":"), sort_keys=False)


def write_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one.  What is there must be
    a regular file (or nothing), as the config check wanted: a FIFO or a device put there
    since would be replaced by the rename."""
    process.refuse_non_regular(path)
    process.write_atomic(path, text + "\n")
