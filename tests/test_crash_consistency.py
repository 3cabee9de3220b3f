"""Crash consistency under load, measured with a ledger.

50 client threads deliver messages with unique ids (their text is a function of the id)
and record which ids got a 250, while a killer SIGKILLs a random busy worker every half
second, for 8 s and until it has killed three.  Afterwards the Maildir is audited: every
acknowledged id is stored exactly once and byte-exact, no file in new/ is shorter or
longer than its ``S=`` says, and tmp/ is empty.  An id that never got its 250 may be stored or not; it is not counted as lost.
The master must also have repaired the killed workers' scoreboard slots (no phantom
active connections) and the server must still deliver.

Then the same, one step at a time: a worker held by strace at each system call of its
commit (the message file's fsync, its link into new/, new/'s fsync) is killed there, and
the Maildir must show the message absent before the link and whole after it, never a 250.

Run with ``pytest -s`` to see the figures; they are in the assertion message as well.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time

import psutil
import pytest

from daemon import (SYSCALL_NR, Ledger, RawSMTP, SMTPClosed, assert_nothing_left_in_tmp, held_in,
                    hold_syscall, ledger_client, ledger_message, request_stats, run_clients,
                    send_message, serving_worker, wait_until)
from helpers import chosen_seed

CLIENTS = 50
RUN_SECONDS = 8.0
KILL_EVERY = 0.5
#: The run lasts RUN_SECONDS and then until this many workers were killed; on a loaded
#: machine one look at the connection table can take seconds.  HARD_STOP bounds it all.
MIN_KILLS = 3
HARD_STOP = 40.0
#: From a few lines to well past the worker's 256 KiB write buffer, so that kills land
#: before, during and after data reaches the tmp file.
SIZES = (1_000, 20_000, 300_000, 700_000)


def busy_workers(d) -> list[psutil.Process]:
    """Workers in a session: each holds an established connection on the daemon's port.
    (Not the title: it turns busy only once a client goes quiet, and these clients never
    do.)  One system-wide table read, not one per worker, so the killer keeps its pace."""
    pids = {c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == d.port}
    return [w for w in d.workers() if w.pid in pids]


def kill_workers(d, stop: threading.Event, deadline: float, hard_stop: float,
                 rng: random.Random, killed: list[int]) -> None:
    """Kill a busy worker every KILL_EVERY seconds until ``deadline`` has passed and
    MIN_KILLS were killed (or ``hard_stop``), then tell the clients to stop."""
    while not stop.wait(KILL_EVERY):
        now = time.monotonic()
        if now >= hard_stop or (now >= deadline and len(killed) >= MIN_KILLS):
            stop.set()
            return
        busy = busy_workers(d)
        if not busy:
            continue
        victim = rng.choice(busy)
        try:
            victim.send_signal(signal.SIGKILL)
            killed.append(victim.pid)
        except psutil.NoSuchProcess:
            pass


def test_acknowledged_messages_survive_worker_kills(daemon_factory):
    d = daemon_factory(workers=CLIENTS + 4, server={
        "max_workers": 2 * CLIENTS, "max_connections": 4 * CLIENTS,
        "max_connections_per_ip": 4 * CLIENTS},
        sections={"limits": {"max_message_size": 2_000_000}})
    ledger = Ledger("cc")
    seed = chosen_seed()
    stop = threading.Event()
    killed: list[int] = []
    started = time.monotonic()
    hard_stop = started + HARD_STOP
    killer = threading.Thread(target=kill_workers, daemon=True,
                              args=(d, stop, started + RUN_SECONDS, hard_stop,
                                    random.Random(seed), killed))
    killer.start()
    try:
        results = run_clients(CLIENTS, ledger_client, join_timeout=HARD_STOP + 30,
                              port=d.port, ledger=ledger, stop=stop, deadline=hard_stop,
                              sizes=SIZES,
                              timeout=10.0)
    finally:
        stop.set()
        killer.join(10)

    audit = ledger.audit(d.maildir)
    figures = {**audit["figures"], "workers_killed": len(killed),
               "broken_sessions": sum(r.get("broken", 0) for r in results if r),
               "killer_seed": seed}
    report = f"crash consistency: {figures}"
    print("\n" + report)
    assert all(r is not None and "error" not in r for r in results), (report, results)
    assert figures["lost"] == 0, f"{report}; lost {audit['lost_ids']}"
    assert figures["duplicates"] == 0, report
    assert audit["bad"] == [], f"{report}; {audit['bad'][:10]}"
    assert figures["acked"] > 0 and len(killed) >= MIN_KILLS, report
    assert "Traceback" not in d.log_text()

    # The master repaired the slots of the killed workers: no session is counted as
    # active any more, and every message counted as accepted is in new/.
    stats = wait_until(lambda: idle_stats(d), 15, 0.2, "connections_active back to 0")
    assert_nothing_left_in_tmp(d, d.maildir)  # every session over, none holds a copy
    assert figures["acked"] <= stats["messages_accepted"] <= figures["stored"], (stats, report)
    send_message(d.port)


def idle_stats(d) -> dict | None:
    stats = request_stats(d)
    return stats if stats["connections_active"] == 0 else None


#: Where a worker is held and killed, in the order of the commit (maildir.py): the
#: message file's first fsync, its link into new/, and new/'s fsync (the third: an
#: unnamed file is fsynced again once linked); and whether the message is then in new/.
COMMIT_STEPS = [
    pytest.param("fsync", 1, "enter", False, id="before-the-file-is-durable"),
    pytest.param("linkat", 1, "enter", False, id="durable-not-linked"),
    pytest.param("linkat", 1, "exit", True, id="linked-into-new"),
    pytest.param("fsync", 3, "exit", True, id="new-durable-before-the-250"),
]


@pytest.mark.skipif(shutil.which("strace") is None or "fsync" not in SYSCALL_NR,
                    reason="needs strace (Debian: strace) on x86_64 or aarch64")
@pytest.mark.parametrize("syscall,when,at,stored", COMMIT_STEPS)
def test_a_worker_killed_at_each_step_of_its_commit(daemon_factory, syscall, when, at, stored):
    """Killed before its link into new/, the message is not there; after it, it is
    there whole, stored without its 250.  The client sees no 250 either way, and sends
    it again: a duplicate, the lesser evil RFC 5321 6.1 accepts over a loss."""
    d = daemon_factory(workers=1)
    ledger = Ledger("commit")
    client = RawSMTP(d.port)
    try:
        assert client.command(b"EHLO commit.example") == 250
        # A first message, so that nothing the worker does once (a Maildir's first
        # use) counts among the calls the tracer counts.
        first = ledger.new_id(3000)
        assert client.deliver(ledger_message(first, 3000))[0] == 250
        ledger.ack(first)
        worker = serving_worker(d, client.sock)
        tracer = hold_syscall(worker.pid, syscall, 30, when=when, at=at)
        try:
            msg_id = ledger.new_id(3000)
            assert client.start_data()[0] == 354
            client.sock.sendall(ledger_message(msg_id, 3000) + b".\r\n")
            args = wait_until(lambda: held_in(worker, SYSCALL_NR[syscall][0]), 10,
                              what=f"the worker held in its {syscall} #{when}")
            if syscall == "fsync":  # the premise: which file it was syncing
                target = os.readlink(f"/proc/{worker.pid}/fd/{args[0]}")
                if when == 3:
                    assert target == str(d.maildir / "new"), target
                else:  # the unnamed file, shown as tmp/#INODE (deleted)
                    assert target.startswith(f"{d.maildir / 'tmp'}/#"), target
            worker.kill()
        finally:
            tracer.terminate()
            tracer.wait(10)
        with pytest.raises((SMTPClosed, ConnectionResetError)):
            client.reply()  # no reply at all: above all, no 250
    finally:
        client.close()
    d.wait_for_log(f"worker {worker.pid} killed by SIGKILL", timeout=10)

    audit = ledger.audit(d.maildir)
    assert audit["bad"] == [], audit  # nothing half-written or misnamed in new/
    assert audit["figures"]["lost"] == 0, audit
    assert audit["figures"]["stored_unacked"] == (1 if stored else 0), audit
    assert_nothing_left_in_tmp(d, d.maildir)

    retry = RawSMTP(d.port)  # the pool has a worker again, and the client tries again
    try:
        assert retry.command(b"EHLO commit.example") == 250
        assert retry.deliver(ledger_message(msg_id, 3000))[0] == 250
        ledger.ack(msg_id)
    finally:
        retry.close()
    audit = ledger.audit(d.maildir)
    assert audit["bad"] == [] and audit["figures"]["lost"] == 0, audit
    assert audit["figures"]["duplicates"] == (1 if stored else 0), audit
