"""The benchmark's summary arithmetic (scripts/benchlib/summary.py), without running it."""
from __future__ import annotations

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
