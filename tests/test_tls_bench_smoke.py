"""Smoke test of scripts/tls_bench.py: a tiny run must finish, store what was acknowledged,
and resume every handshake it is asked to resume, on forksmtp and on the peer.

It keeps the script working and asserts nothing about speed. Like the other benchmark
smoke test it runs in CI (the CI variable set) or with FORKSMTP_BENCH_SMOKE=1, since it
starts real servers and writes real Maildir files.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_smoke import BENCH_SMOKE_MARKS, _bindable, forksmtp_runs, free_ports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "tls_bench.py"

pytestmark = [*BENCH_SMOKE_MARKS,
              pytest.mark.skipif(shutil.which("openssl") is None,
                                 reason="no openssl command for the certificate")]


def test_a_tiny_run_stores_everything_and_resumes_every_resumed_handshake(tmp_path: Path) -> None:
    # In CI a forksmtp that does not start is a failure, not a reason to skip.
    assert forksmtp_runs(), "python -m forksmtp --version did not answer"
    out, port = tmp_path / "results", free_ports()
    argv = [sys.executable, str(SCRIPT), "--sessions", "2", "--count", "6", "--rounds", "1",
            "--maildir-root", str(tmp_path / "maildirs"), "--out", str(out),
            "--port-base", str(port), "--run-timeout", "120"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["ok"] is True and results["failures"] == []
    cells = results["cells"]
    assert {(c["system"], c["mode"]) for c in cells} == {
        (s, m) for s in ("forksmtp", "aiosmtpd") for m in ("plain", "full", "resumed")}
    for cell in cells:
        assert cell["acked"] == cell["stored"] == 6 and cell["problem"] is None, cell
        # Each client took its session before the timed part: every timed one resumes.
        assert cell["resumed_share"] == {"resumed": 1.0, "full": 0.0, "plain": None}[cell["mode"]], cell
        assert cell["cpu_ms_per_session"] > 0, cell
    assert "| forksmtp/aiosmtpd | full |" in (out / "results.md").read_text()
    # It cleans up after itself: its work dir is gone, its servers too.
    assert list((tmp_path / "maildirs").iterdir()) == []
    assert _bindable(port) and _bindable(port + 1)
