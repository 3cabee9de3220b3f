"""Operating-system plumbing in forksmtp.process: malloc tuning for big reads."""
from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from forksmtp import process

# A worker reading a big message holds a few blocks of DATA_RECV_SIZE at a time and then
# frees them all.  The child counts the page faults that pattern costs after its first
# round, with malloc left alone or tuned the way the master tunes it.
_CHURN = textwrap.dedent("""
    import resource, sys
    from forksmtp import connection
    tuned = sys.argv[1] == "tuned" and connection.tune_for_big_reads()
    size = connection.DATA_RECV_SIZE
    def round_():
        held = [bytes(size) for _ in range(6)]  # bytes(n) zero-fills: every page touched
        del held
    round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        round_()
    print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return out[0] == "1", int(out[1])


def test_tuned_malloc_keeps_big_read_buffers_on_the_heap():
    """Untuned, glibc returns the freed blocks to the kernel and faults them in again on
    the next round; tuned, the pages stay and the rounds after the first fault (almost)
    nothing."""
    if not hasattr(ctypes.CDLL(None), "mallopt"):  # asked of the C library, not of the code
        pytest.skip("this C library has no mallopt()")
    tuned, tuned_faults = _faults("tuned")
    assert tuned
    _, plain_faults = _faults("plain")
    assert plain_faults > 1000          # 50 rounds x 6 blocks x 32 pages, give or take
    assert tuned_faults < plain_faults / 10


def test_without_mallopt_nothing_is_tuned(monkeypatch):
    def no_libc(*args, **kwargs):
        raise OSError("no C library here")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert process.tune_malloc(1 << 20, 1 << 20) is False


def test_is_stopped_tells_a_stopped_process_from_a_sleeping_one():
    import signal
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        assert process.is_stopped(child.pid) is False
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not process.is_stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.is_stopped(child.pid) is True
        child.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while process.is_stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.is_stopped(child.pid) is False
    finally:
        child.kill()
        child.wait()
    assert process.is_stopped(child.pid) is False  # gone: nothing to read
