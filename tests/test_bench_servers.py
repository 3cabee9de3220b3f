"""The benchmarks start forksmtp from the checkout they name, not from wherever they were
started: ``python -m`` puts its working directory ahead of PYTHONPATH, so a server
started in one checkout ran that checkout's code whatever --forksmtp-cmd named."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib.context import Bench  # noqa: E402
from benchlib.report import forksmtp_build  # noqa: E402
from benchlib.servers import REPO_ROOT, default_forksmtp_cmd, start_server  # noqa: E402

from daemon import free_port  # noqa: E402

DECOY = "decoy forksmtp: the caller's working directory ran\n"


@pytest.fixture
def bench_in_a_decoy_checkout(tmp_path: Path, monkeypatch) -> Bench:
    """A bench started from a directory holding a forksmtp package of its own that only
    prints DECOY, as another checkout's would shadow the one named on PYTHONPATH."""
    decoy = tmp_path / "other-checkout" / "forksmtp"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text(f"print({DECOY!r}, end='')\n")
    monkeypatch.chdir(decoy.parent)
    root = tmp_path / "work"
    (root / "logs").mkdir(parents=True)
    return Bench(argparse.Namespace(), str(root), str(root / "logs"), str(tmp_path / "out"), "ext4",
                 default_forksmtp_cmd())


def test_the_decoy_would_win_under_a_plain_python_m(bench_in_a_decoy_checkout):
    # The hazard itself, so that the tests below cannot pass for want of it.
    out = subprocess.run(default_forksmtp_cmd() + ["--version"], capture_output=True, text=True,
                         timeout=30).stdout
    assert out == DECOY


def test_the_reported_build_is_the_named_checkouts(bench_in_a_decoy_checkout):
    assert forksmtp_build(bench_in_a_decoy_checkout).startswith("forksmtp ")


def test_a_server_runs_the_named_checkouts_forksmtp(bench_in_a_decoy_checkout):
    bench = bench_in_a_decoy_checkout
    server = start_server(bench, "forksmtp", bench.forksmtp_cmd + ["--version"], free_port())
    assert server.popen.wait(30) == 0
    text = Path(server.log_path).read_text()
    assert text.startswith("forksmtp ") and DECOY not in text, text


def test_the_default_command_imports_the_scripts_own_checkout(bench_in_a_decoy_checkout):
    # Not only "not the decoy": the forksmtp imported is the one under REPO_ROOT.
    bench = bench_in_a_decoy_checkout
    probe = bench.forksmtp_cmd[:-2] + ["-c", "import forksmtp; print(forksmtp.__file__)"]
    server = start_server(bench, "probe", probe, free_port())
    assert server.popen.wait(30) == 0
    assert Path(server.log_path).read_text().strip() == str(Path(REPO_ROOT) / "forksmtp" / "__init__.py")


def test_the_callers_pythonpath_follows_the_checkout_it_does_not_replace_it(tmp_path, monkeypatch):
    """A module the caller's PYTHONPATH names stays importable by the server; a forksmtp
    on that path (another checkout's) does not shadow the script's own."""
    other = tmp_path / "caller-path"
    (other / "forksmtp").mkdir(parents=True)
    (other / "forksmtp" / "__init__.py").write_text("")
    (other / "caller_module.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other))
    monkeypatch.chdir(tmp_path)
    env_pythonpath = default_forksmtp_cmd()[:3]  # env PYTHONPATH=... python
    out = subprocess.run(env_pythonpath + ["-c", "import caller_module, forksmtp; print(forksmtp.__file__)"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (Path(REPO_ROOT) / "forksmtp" / "__init__.py").resolve()


def test_pool_faults_measures_this_checkout_unless_told_otherwise():
    """Its default is the bench's (the script's checkout on PYTHONPATH), not whatever
    forksmtp ``python3 -m`` would find from its caller."""
    import pool_faults
    assert pool_faults.system_commands([]) == {"forksmtp": default_forksmtp_cmd()}
    assert pool_faults.system_commands(["old=env PYTHONPATH=/src/old python3 -m forksmtp", "new=x -y"]) == {
        "old": ["env", "PYTHONPATH=/src/old", "python3", "-m", "forksmtp"], "new": ["x", "-y"]}
