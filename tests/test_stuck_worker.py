"""A worker that stops making progress is killed and replaced (issue 3, supervision)."""

from __future__ import annotations

import os
import signal

from daemon import RawSMTP, send_message, serving_worker, wait_until
from forksmtp.arbiter import silent_for


def test_wedged_worker_is_killed_and_replaced(daemon_factory):
    # Short timeouts: the master's limit is the longest of them plus a grace period.
    d = daemon_factory(workers=2, sections={"timeouts": {"command": 1, "data_block": 1,
                                                         "data_done": 2, "session": 120}})
    client = RawSMTP(d.port)
    try:
        assert client.command(b"EHLO wedged.example") == 250
        worker = serving_worker(d, client.sock)
        os.kill(worker.pid, signal.SIGSTOP)  # wedged: no heartbeat, no timeout of its own
        d.wait_for_log(f"worker {worker.pid} made no progress", timeout=40)
        wait_until(lambda: worker.pid not in {w.pid for w in d.workers()}, 10,
                   what="the wedged worker gone")
    finally:
        client.close()
    wait_until(lambda: len(d.workers()) >= 2, 10, what="the pool refilled")
    send_message(d.port)


def test_silence_is_never_longer_than_the_worker_has_lived():
    # A slot timestamp from before the worker started (0.0: a slot read while reset)
    # must not make a young, healthy worker look wedged for the host's uptime.
    assert silent_for(0.0, started=1000.0, now=1005.0) == 5.0
    assert silent_for(990.0, started=1000.0, now=1005.0) == 5.0
    # A worker that touched its slot after it started is judged by that touch.
    assert silent_for(1003.0, started=1000.0, now=1005.0) == 2.0
    assert silent_for(1000.0, started=1000.0, now=1400.0) == 400.0


def test_no_healthy_wait_outlasts_the_stuck_limit(tmp_path):
    """The greeting delay and the stress-mode command timeout are single waits too: a
    worker in one heartbeats only when it ends, and must not be taken for wedged."""
    from forksmtp.arbiter import STUCK_GRACE, stuck_limit
    from forksmtp.config import load_config

    path = tmp_path / "f.toml"
    path.write_text("[server]\ngreeting_delay = 20\n"
                    "[timeouts]\ncommand = 3\ndata_block = 3\ndata_done = 3\nstress_command = 30\n")
    assert stuck_limit(load_config(str(path))) == 30 + STUCK_GRACE
    path.write_text("[server]\ngreeting_delay = 20\n[timeouts]\ncommand = 3\ndata_block = 3\n"
                    "data_done = 3\nstress_command = 3\n")
    assert stuck_limit(load_config(str(path))) == 20 + STUCK_GRACE
    path.write_text("")
    assert stuck_limit(load_config(str(path))) == 600 + STUCK_GRACE  # data_done, by default
