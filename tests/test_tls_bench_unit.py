"""scripts/tls_bench.py's judgment of a cell's resumed handshakes, without running it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from tls_bench import resumption_problem  # noqa: E402


@pytest.mark.parametrize("mode,reused", [("resumed", 200), ("full", 0), ("plain", 0)])
def test_a_count_right_for_its_mode_passes(mode, reused):
    assert resumption_problem(mode, reused, 200) is None


@pytest.mark.parametrize("mode,reused,said", [
    ("resumed", 0, "0 of 200 handshakes resumed in resumed mode"),  # a server that never resumes
    ("resumed", 199, "199 of 200 handshakes resumed in resumed mode"),
    ("full", 1, "1 of 200 handshakes resumed in full mode"),
    ("plain", 200, "200 of 200 handshakes resumed in plain mode"),
])
def test_a_wrong_count_fails_the_cell(mode, reused, said):
    assert resumption_problem(mode, reused, 200) == said


def test_a_cell_with_nothing_acknowledged_fails_rather_than_raise():
    assert resumption_problem("resumed", 0, 0) == "no session was acknowledged"
