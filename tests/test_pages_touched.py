"""scripts/pages_touched.py keeps working: both systems counted, by region, into JSON.

Real daemons on loopback and real page tables.  Nothing is asserted about the counts'
size beyond what any run must show: a message runs through some code and some data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forksmtp import _native

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pages_touched.py"

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs /proc/PID/clear_refs (Linux)")


def test_counts_the_pages_of_forksmtp_and_pyfloor(tmp_path):
    out = tmp_path / "pages.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--warmup", "20", "--trials", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert [r["system"] for r in results] == ["forksmtp", "pyfloor"]
    for result in results:
        assert len(result["total_pages"]) == 3
        assert result["median_pages"] == sorted(result["total_pages"])[1]
        assert result["regions"]["code: libpython"] > 0
        assert sum(v for k, v in result["regions"].items() if k.startswith("data: ")) > 0
        assert f"{result['system']}: {result['median_pages']:g} pages per message" in done.stdout
    # The compiled build's code is a region of its own, and only when it runs.
    compiled = results[0]["regions"].get("code: forksmtp compiled", 0)
    assert (compiled > 0) == (_native.reason == "")
