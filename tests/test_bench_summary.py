"""The benchmark's summary arithmetic (scripts/benchlib/summary.py), without running it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib.measure import MIN_SPLIT_S  # noqa: E402
from benchlib.summary import check_targets, summarise  # noqa: E402


def cell(round_: int, cpu_ms: float, ticks_user: float, ticks_sys: float, problem: str = "") -> dict:
    return {"mode": "durable", "system": "loop", "sessions": 1, "round": round_,
            "problem": problem, "msgs_per_s": 1000.0, "cpu_ms_per_msg": cpu_ms,
            "cpu_ticks_user_s": ticks_user, "cpu_ticks_sys_s": ticks_sys}


def test_the_split_pools_the_rounds_ticks_and_adds_up_to_the_total():
    # No round alone has ticks enough for a split; together they have.
    small = MIN_SPLIT_S * 0.4
    cells = [cell(1, 0.10, small * 0.25, small * 0.75), cell(2, 0.14, small * 0.25, small * 0.75),
             cell(3, 0.12, small * 0.25, small * 0.75),
             cell(4, 9.99, 5.0, 0.0, problem="stored 0 files")]  # a failed round counts for nothing
    row = summarise(cells)["durable"]["loop"]["1"]
    assert row["cpu_ms_per_msg"] == 0.12
    assert abs(row["cpu_user_ms_per_msg"] - 0.03) < 1e-9 and abs(row["cpu_sys_ms_per_msg"] - 0.09) < 1e-9
    assert abs(row["cpu_user_ms_per_msg"] + row["cpu_sys_ms_per_msg"] - row["cpu_ms_per_msg"]) < 1e-9


def test_no_split_from_too_few_ticks():
    row = summarise([cell(1, 0.1, MIN_SPLIT_S * 0.2, MIN_SPLIT_S * 0.2)])["durable"]["loop"]["1"]
    assert row["cpu_ms_per_msg"] == 0.1
    assert row["cpu_user_ms_per_msg"] is None and row["cpu_sys_ms_per_msg"] is None


def test_a_skipped_big_message_is_not_named_a_0_mib_one():
    from types import SimpleNamespace
    for mib, name in ((50, "50 MiB message"), (0, "big message (--big-mib 0: not run)")):
        bench = SimpleNamespace(args=SimpleNamespace(sessions=[50], big_mib=mib))
        rows = [row["target"] for row in check_targets(bench, [], {})]
        assert f"{name}: worker RSS growth MiB" in rows and f"{name}: throughput vs disk" in rows


# --------------------------------------------------------------------------- context switches

def _snapshot(switches: dict, reaped_faults: int | None = 7) -> dict:
    """A snapshot as measure.cpu_snapshot takes it: pid -> {tid: (voluntary, involuntary)}."""
    return {"procs": {}, "switches": switches, "reaped": (0.0, 0.0), "reaped_faults": reaped_faults}


def test_switch_delta_sums_the_threads_and_counts_new_ones_from_zero():
    from benchlib.measure import switch_delta
    before = _snapshot({10: {"10": (100, 5)}, 11: {"11": (40, 1)}})
    after = _snapshot({10: {"10": (130, 6), "13": (4, 0)},   # 13: a thread started meanwhile
                       11: {"11": (50, 1)}, 12: {"12": (7, 2)}})  # 12: forked meanwhile
    assert switch_delta(before, after) == (30 + 4 + 10 + 7, 1 + 0 + 0 + 2)


def test_switch_delta_gives_up_where_some_switches_went_uncounted():
    from benchlib.measure import switch_delta
    one = {10: {"10": (1, 0)}}
    # A worker reaped during the cell took its counts with it: no figure, not a low one.
    assert switch_delta(_snapshot({**one, 11: {"11": (1, 0)}}), _snapshot({10: {"10": (9, 0)}})) is None
    # So did a thread that ended.
    assert switch_delta(_snapshot({10: {"10": (1, 0), "14": (5, 0)}}), _snapshot({10: {"10": (9, 0)}})) is None
    # A child forked and reaped between the snapshots shows only in the master's
    # reaped faults.
    assert switch_delta(_snapshot(one, 7), _snapshot({10: {"10": (9, 0)}}, 9)) is None
    assert switch_delta(_snapshot(one, None), _snapshot({10: {"10": (9, 0)}}, None)) is None
    # Unreadable counts; a count going back (a thread id reused).
    assert switch_delta(_snapshot(one), _snapshot({10: None})) is None
    assert switch_delta(_snapshot({10: None}), _snapshot({10: {"10": (9, 0)}})) is None
    assert switch_delta(_snapshot({10: {"10": (9, 3)}}), _snapshot({10: {"10": (2, 3)}})) is None
    assert switch_delta(_snapshot(one), _snapshot({10: {"10": (9, 0)}})) == (8, 0)


def test_a_reaped_child_moves_the_parents_reaped_faults():
    """What switch_delta relies on to see a worker forked and reaped between two looks."""
    import subprocess
    from benchlib.measure import reaped_faults
    first = reaped_faults(os.getpid())
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert first is not None and reaped_faults(os.getpid()) > first


def test_context_switches_count_every_thread_of_a_real_process():
    """A child whose second thread sleeps 50 times and then waits: the sleeps are
    voluntary switches of that thread, and they count, though the main thread meanwhile
    only waits on its stdin (psutil's num_ctx_switches reads the main thread alone)."""
    import subprocess
    from benchlib.measure import context_switches
    code = ("import sys, threading, time\n"
            "done = threading.Event()\n"
            "def sleeper():\n"
            "    for _ in range(50):\n"
            "        time.sleep(0.001)\n"
            "    print('slept', flush=True)\n"
            "    done.wait()\n"
            "sys.stdin.readline()\n"
            "threading.Thread(target=sleeper, daemon=True).start()\n"
            "sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        first = context_switches(child.pid)
        assert first is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "slept\n"
        second = context_switches(child.pid)
        assert second is not None and second[0] - first[0] >= 50, (first, second)
    finally:
        child.stdin.close()
        child.wait(timeout=10)
    assert context_switches(child.pid) is None  # reaped: nothing left to read
