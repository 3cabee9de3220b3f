"""Smoke test of scripts/bench.py: a tiny --quick run must finish and write its results.

It only keeps the benchmark script working; it asserts nothing about speed. It runs in
CI (the CI variable set) or when FORKSMTP_BENCH_SMOKE=1, since it starts real servers
and writes real Maildir files for several seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"

#: Also the marks of the other benchmark scripts' smoke tests.  They load both CPUs for
#: seconds: in one xdist group (pyproject.toml), they never run beside each other or
#: beside the quota test of test_supervisor_pool.py, which skips without idle CPUs.
BENCH_SMOKE_MARKS = [
    pytest.mark.xdist_group("cpu_heavy"),
    pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("FORKSMTP_BENCH_SMOKE") == "1"),
                       reason="benchmark smoke test runs in CI or with FORKSMTP_BENCH_SMOKE=1"),
    pytest.mark.skipif(importlib.util.find_spec("aiosmtpd") is None,
                       reason="aiosmtpd is not installed (pip install -e '.[bench]')"),
]
pytestmark = BENCH_SMOKE_MARKS

TOP_KEYS = {"command", "client", "started", "environment", "options", "cells", "summary",
            "ratios", "extras", "targets", "failures", "warnings", "ok"}
CELL_KEYS = {"system", "mode", "sessions", "round", "sent", "acked", "stored", "problem",
             "msgs_per_s", "ack_p50_ms", "ack_p99_ms", "cpu_user_ms_per_msg",
             "cpu_sys_ms_per_msg", "cpu_ms_per_msg", "switches_vol_per_msg",
             "switches_invol_per_msg"}


def forksmtp_runs() -> bool:
    """forksmtp is part of the smoke run once its command line answers."""
    try:
        probe = subprocess.run([sys.executable, "-m", "forksmtp", "--version"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def free_ports() -> int:
    """A port p with p, p + 1 and p + 3 free (forksmtp, the peer and pyfloor listen there),
    below the ephemeral range: the bench's own client connections take ephemeral ports,
    and one of them holding p + 3 when pyfloor starts would make that server refuse to
    start (the port looks taken)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10000, max(low - 4, 10001))
        if all(_bindable(p) for p in (port, port + 1, port + 3)):
            return port
    pytest.skip("no free loopback ports below the ephemeral range")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_quick_run_writes_results(tmp_path: Path) -> None:
    systems = ["loop", "aiosmtpd", "pyfloor"] + (["forksmtp"] if forksmtp_runs() else [])
    out, port = tmp_path / "results", free_ports()
    argv = [sys.executable, str(BENCH), "--quick", "--messages", "20",
            "--systems", ",".join(systems), "--big-mib", "1",
            "--maildir-root", str(tmp_path / "maildirs"), "--out", str(out),
            "--port-base", str(port), "--io-timeout", "30", "--run-timeout", "120"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert TOP_KEYS <= set(results)
    assert results["ok"] is True and results["failures"] == []
    assert (out / "results.md").read_text().startswith("## Benchmark")
    # The report names the forksmtp build that ran, as its --version line gives it.
    build = results["environment"]["forksmtp_build"]
    assert build.startswith("forksmtp ") and ("compiled" in build or "pure Python" in build)
    assert f"forksmtp: {build}; checkout " in (out / "results.md").read_text()
    assert results["environment"]["checkout"]  # the commit the run measured
    for cell in results["cells"]:
        assert CELL_KEYS <= set(cell)
        assert cell["stored"] == cell["acked"] == cell["sent"] == 20, cell
        # Context switches: the loop's from its own rusage, a server's from /proc.  A
        # server waits for its clients at least once, a sleep.  forksmtp's pool may fork
        # and retire a worker within a cell, whose counts are then gone: no figure.
        if cell["system"] == "loop":
            assert cell["switches_vol_per_msg"] >= 0 and cell["switches_invol_per_msg"] >= 0
        elif cell["system"] != "forksmtp":
            assert (cell["switches_vol_per_msg"] or 0) > 0, cell
    if "forksmtp" in systems:  # its pool rarely changes within every one of its cells
        assert any((c["switches_vol_per_msg"] or 0) > 0 for c in results["cells"]
                   if c["system"] == "forksmtp"), results["cells"]
    for mode in ("durable", "nofsync"):
        assert set(systems) <= set(results["summary"][mode])
    assert {int(s) for s in results["summary"]["durable"]["loop"]} == {1, 10}
    # The big-message check runs on the storing SMTP servers, pyfloor aside.
    assert set(results["extras"]["stream"]) == set(systems) - {"loop", "pyfloor"}
    assert "### pyfloor: the floor of forksmtp's shape" in (out / "results.md").read_text()
    # Each ratio target is judged for pyfloor too: its value sits beside forksmtp's.
    floor_rows = [t for t in results["targets"] if t["floor_value"] is not None]
    assert floor_rows and all(t["floor_met"] in (True, False) for t in floor_rows)
    # The script cleans up after itself: its work dir is gone, its servers too.
    assert list((tmp_path / "maildirs").iterdir()) == []
    assert all(_bindable(port + i) for i in (0, 1, 3))
