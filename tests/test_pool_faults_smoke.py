"""Smoke test of scripts/pool_faults.py: a --quick run against this checkout finishes,
every held client of its burst is greeted, nothing is left in tmp/ and no traceback is
logged.  No speed is asserted.  It needs Postfix's smtp-source, the script's load,
which .ci/run installs."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "pool_faults.py"

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("smtp-source") or os.access("/usr/sbin/smtp-source", os.X_OK)),
        reason="smtp-source is not installed (Debian: apt-get install postfix)"),
    pytest.mark.xdist_group("cpu_heavy"),  # see test_bench_smoke.BENCH_SMOKE_MARKS
]


def test_quick_run_writes_its_results(tmp_path):
    out = tmp_path / "out"
    port_base = random.randrange(21000, 29000, 100)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--scenarios", "burst,stall",
         "--port-base", str(port_base), "--root", str(tmp_path), "--out", str(out),
         "--system", f"here={sys.executable} -m forksmtp"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["scenario"] for r in results] == ["burst", "stall"]
    burst, stall = results
    assert burst["codes"] == {"220": burst["clients"]}, burst
    assert burst["p50"] is not None and burst["pool_peak"] >= burst["pool_before"] >= 1
    assert len(stall["pool_before_after"]) == 3
    for r in results:
        assert r["stored"] > 0 and r["left_in_tmp"] == 0 and r["tracebacks"] == 0, r
    assert "### burst" in (out / "results.md").read_text()


def test_idle_kill_clients_are_greeted_not_left_silent(tmp_path):
    """The woken worker killed before its accept: its client is greeted by another idle
    worker (or reset, where the kill came after the accept), never left silent."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--scenarios", "idle-kill",
         "--port-base", str(random.randrange(21000, 29000, 100)), "--root", str(tmp_path),
         "--out", str(out), "--system", f"here={sys.executable} -m forksmtp"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = json.loads((out / "results.json").read_text())["results"]
    assert r["silent_5s"] == 0 and r["refused"] == 0, r
    assert r["greeted"] + r["reset"] == r["kills"] == 2, r
    assert r["left_in_tmp"] == 0 and r["tracebacks"] == 0, r


def test_a_daemon_that_does_not_start_fails_the_run(tmp_path):
    """A command that never serves is an error, not a run of empty figures."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--scenarios", "stall",
         "--port-base", str(random.randrange(21000, 29000, 100)), "--root", str(tmp_path),
         "--system", f"broken={sys.executable} -c 'import sys; sys.exit(3)'"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "did not log [READY]" in proc.stderr
