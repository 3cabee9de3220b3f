"""Pool policy as tables: scoreboard snapshots in, plans out."""
from __future__ import annotations

import dataclasses

import pytest

from forksmtp import scoreboard as sbm
from forksmtp.pool import MAX_SPAWN_RATE, SPARE_EVERY, PoolSettings, PoolState, plan
from forksmtp.scoreboard import BUSY, IDLE, STARTING, STOPPING, SlotInfo, Snapshot, Totals

NOW = 10_000.0
GEN = 2
ZERO = Totals.from_counters([0] * sbm._NCOUNTERS)
# One letter a worker: S starting, I idle, B busy, X stopping; lower case: an older
# generation.  A number after I is how long it has been idle, in seconds.
STATES = {"S": STARTING, "I": IDLE, "B": BUSY, "X": STOPPING}


def snap(spec: str, nslots: int = 64) -> Snapshot:
    slots = []
    for i, token in enumerate(spec.split()):
        idle_for = float(token[1:] or 0)
        gen = GEN if token[0].isupper() else GEN - 1
        slots.append(SlotInfo(i, 1000 + i, gen, STATES[token[0].upper()], "", 0, "",
                              NOW - idle_for, NOW - 3600, -1, False, ZERO))
    return Snapshot(nslots, GEN, False, 0, 0, 0, tuple(slots), (), ZERO)


def settings(**kw) -> PoolSettings:
    base = dict(workers=4, max_workers=16, min_spare=1, max_spare=3, max_idle=300.0)
    return PoolSettings(**{**base, **kw})


CASES = [
    # name, snapshot spec, settings overrides, nslots, spawn, retire
    ("boot starts the minimum at once", "", {}, 64, 4, ()),
    ("boot capped by max_workers", "", {"max_workers": 2}, 64, 2, ()),
    ("boot capped by free slots", "", {}, 3, 3, ()),
    ("steady", "I I I B", {}, 64, 0, ()),
    ("no idle worker: one spare", "B B B B", {}, 64, 1, ()),
    ("starting counts as idle", "B B B S", {}, 64, 0, ()),
    ("min_spare 0 lets all be busy", "B B B B", {"min_spare": 0}, 64, 0, ()),
    ("at max_workers: none", "B B B B", {"max_workers": 4}, 64, 0, ()),
    ("old generation counts against the ceiling", "b b B B", {"workers": 2, "max_workers": 4}, 64, 0, ()),
    ("old generation does not fill the minimum", "i i", {"workers": 2}, 64, 2, ()),
    ("stopping workers do not fill the minimum", "X X I I", {}, 64, 2, ()),
    ("crash below the minimum refills it", "I I", {"workers": 4}, 64, 2, ()),
    ("retire the longest idle", "I500 I400 I600 I10 I10", {"workers": 2}, 64, 0, (2,)),
    ("retire only one per tick", "I900 I900 I900 I900 I900 I900", {"workers": 1}, 64, 0, (0,)),
    ("never below the minimum", "I400 I400 I400 I400", {"workers": 4, "max_spare": 1}, 64, 0, ()),
    ("idle within max_spare stays", "I400 I400 I400 B", {"workers": 1}, 64, 0, ()),
    ("not idle long enough", "I10 I10 I10 I10 I10", {"workers": 1}, 64, 0, ()),
    ("starting workers are never retired", "S S S S S", {"workers": 1}, 64, 0, ()),
]


@pytest.mark.parametrize("name,spec,overrides,nslots,spawn,retire", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name, spec, overrides, nslots, spawn, retire):
    result = plan(snap(spec, nslots), settings(**overrides), PoolState(), NOW)
    assert (result.spawn, result.retire) == (spawn, retire)


def test_surplus_idle_workers_go_one_per_second_however_often_the_plan_runs():
    """The master runs the plan at every child's exit too (SIGCHLD wakes its loop): the
    retirements of surplus idle workers must not follow one another within milliseconds."""
    state, spec, cfg = PoolState(), "I900 I900 I900 I900 I900 I900", settings(workers=1)
    assert plan(snap(spec), cfg, state, NOW).retire == (0,)
    for dt in (0.001, 0.01, 0.5, 0.99):  # the retired worker's exit, other wake-ups
        assert plan(snap(spec), cfg, state, NOW + dt).retire == ()
    assert plan(snap(spec), cfg, state, NOW + 1.0).retire == (0,)


def test_a_waiting_client_grows_a_pool_that_keeps_no_spares():
    """min_spare_workers = 0, every worker busy, a client in the listen queue: start one
    (as Postfix's master does for a waiting client) rather than leave it waiting for a
    session to end; none while nobody waits, and none past the ceiling."""
    cfg = settings(min_spare=0)
    assert plan(snap("B B B B"), cfg, PoolState(), NOW, waiting=0).spawn == 0
    assert plan(snap("B B B B"), cfg, PoolState(), NOW, waiting=1).spawn == 1
    assert plan(snap("B B B S"), cfg, PoolState(), NOW, waiting=1).spawn == 0  # one coming
    capped = plan(snap("B B B B"), settings(min_spare=0, max_workers=4), PoolState(), NOW,
                  waiting=1)
    assert capped.spawn == 0 and "max_workers" in capped.reason
    state = PoolState()  # clients kept waiting: a worker for each, up to MAX_SPAWN_RATE a tick
    big = settings(min_spare=0, max_workers=100)
    assert [plan(snap("B " * n, 100), big, state, NOW, waiting=w, stalled=True).spawn
            for n, w in ((4, 3), (7, 40), (39, 8))] == [3, MAX_SPAWN_RATE, 8]
    classic = settings(min_spare=0, max_workers=100, spare_cpu_share=0.0)  # doubling, as with spares
    assert [plan(snap("B " * n, 100), classic, state, NOW, waiting=1).spawn for n in (4, 5, 7)] == [1, 2, 4]


def test_ceiling_gives_a_reason():
    result = plan(snap("B B B B"), settings(max_workers=4), PoolState(), NOW)
    assert result.spawn == 0 and "max_workers" in result.reason
    assert plan(snap("I I I I"), settings(), PoolState(), NOW).reason == ""


def test_spawn_rate_doubles_to_cap_and_resets():
    """A classic pool's burst (spare_cpu_share = 0), as Apache prefork's."""
    cfg = settings(workers=1, max_workers=1000, min_spare=500, spare_cpu_share=0.0)
    state, busy, spawned = PoolState(), 1, []
    for tick in range(8):  # every new worker is taken by a client before the next tick
        result = plan(snap(" ".join("B" * busy), nslots=1000), cfg, state, NOW + tick)
        spawned.append(result.spawn)
        busy += result.spawn
    assert spawned == [1, 2, 4, 8, 16, 32, 32, 32]
    assert state.spawn_rate == MAX_SPAWN_RATE
    assert plan(snap("I " * 500, nslots=1000), cfg, state, NOW).spawn == 0
    assert state.spawn_rate == 1
    assert plan(snap("B " * 600, nslots=1000), cfg, state, NOW).spawn == 1


def test_spawn_rate_resets_at_the_ceiling():
    state = PoolState(spawn_rate=8)
    plan(snap("B B B B"), settings(max_workers=4), state, NOW)
    assert state.spawn_rate == 1


def test_retire_request_from_sigttou():
    state = PoolState(retire_requests=1)
    cfg = settings(workers=3)  # the master lowered the minimum below the count
    # More idle than the one spare kept: the longest idle goes.
    assert plan(snap("I1 B I3 I2"), cfg, state, NOW).retire == (2,)
    assert state.retire_requests == 0
    # The only idle worker is the spare: a busy one goes instead, the one whose client has
    # been quiet longest (a SIGTERM lets it finish), or the spare rule would start another.
    state.retire_requests = 1
    assert plan(snap("B I B5 B"), cfg, state, NOW).retire == (2,)
    assert state.retire_requests == 0
    state.retire_requests = 1  # all busy, no spares kept
    assert plan(snap("B B10 B B"), dataclasses.replace(cfg, min_spare=0), state, NOW).retire == (1,)
    assert state.retire_requests == 0
    state.retire_requests = 1  # beyond the spare only workers still starting: it waits
    assert plan(snap("S S S S"), cfg, state, NOW).retire == ()
    assert state.retire_requests == 1
    assert plan(snap("B S S B"), cfg, state, NOW).retire == ()  # for one of them, not a busy one
    assert state.retire_requests == 1
    assert plan(snap("S I I I"), cfg, state, NOW).retire == (1,)
    assert state.retire_requests == 0
    state.retire_requests = 1  # every worker an idle spare the pool keeps: dropped
    assert plan(snap("I I I I"), dataclasses.replace(cfg, min_spare=4), state, NOW).retire == ()
    assert state.retire_requests == 0
    state.retire_requests = 1
    assert plan(snap("I B B"), cfg, state, NOW).retire == ()  # at the minimum: dropped
    assert state.retire_requests == 0


# Crash-loop back-off: events in time order.  ("exit", lifetime, now) reports a worker exit;
# ("plan", now, pool, spawn, backoff) ticks on that pool and checks the result.
EMPTY, FULL = "", "I I I I"
BACKOFF_STEPS = [
    ("exit", 0.5, 100.0), ("exit", 0.4, 100.1),
    ("plan", 100.2, EMPTY, 4, 0.0),  # two quick exits: not yet a loop
    ("exit", 0.3, 100.3),
    ("plan", 100.4, EMPTY, 0, 1.0), ("plan", 101.2, EMPTY, 0, 1.0),
    ("plan", 101.3, EMPTY, 4, 1.0),  # back-off over: try again
    ("exit", 0.1, 101.4), ("exit", 0.1, 101.4), ("exit", 0.1, 101.5),  # one failed attempt
    ("plan", 101.6, EMPTY, 0, 2.0), ("plan", 103.4, EMPTY, 4, 2.0),
    ("exit", 0.1, 103.5), ("plan", 105.0, EMPTY, 0, 4.0), ("plan", 107.5, EMPTY, 4, 4.0),
    ("exit", 0.1, 107.6), ("exit", 9.0, 107.7),  # a worker that lived 9 s: not a crash
    ("plan", 107.8, EMPTY, 0, 8.0), ("plan", 115.6, EMPTY, 4, 8.0),
    ("plan", 120.5, FULL, 0, 8.0),  # new workers alive, but not yet for a crash_window
    ("plan", 120.6, FULL, 0, 0.0),  # no crash for a crash_window after the back-off: reset
    ("exit", 0.1, 121.0), ("exit", 0.1, 121.0),
    ("plan", 121.1, EMPTY, 4, 0.0),  # counting starts afresh: two exits are not a loop
    ("exit", 0.1, 121.2), ("plan", 121.3, EMPTY, 0, 1.0),
]


def test_backoff_grows_and_resets():
    state, cfg = PoolState(), settings()
    for step in BACKOFF_STEPS:
        if step[0] == "exit":
            state.record_exit(step[1], step[2])
            continue
        _, now, pool, spawn, backoff = step
        result = plan(snap(pool), cfg, state, now)
        assert (result.spawn, state.backoff) == (spawn, backoff), step
        assert ("crash loop" in result.reason) == (pool == EMPTY and spawn == 0), step


def test_backoff_caps_at_60s():
    state, lengths, now = PoolState(), [], 0.0
    for _ in range(10):
        for _ in range(3):
            state.record_exit(0.1, now)
        lengths.append(state.backoff)
        now = state.backoff_until
    assert lengths == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    result = plan(snap(""), settings(), state, now - 1)
    assert result.spawn == 0 and result.backoff_until == now
    assert "not spawning for 1.0s" in result.reason


def test_backoff_settles_when_workers_survive():
    state = PoolState()
    for _ in range(3):
        state.record_exit(0.1, 50.0)
    assert plan(snap(""), settings(), state, 50.5).spawn == 0
    assert plan(snap(""), settings(), state, 51.0).spawn == 4
    assert state.backoff == 1.0  # too early to say the new workers are healthy
    plan(snap("I I I I"), settings(), state, 51.0 + state.crash_window)
    assert (state.backoff, state.crashes) == (0.0, 0)


def test_old_crashes_are_forgotten():
    state = PoolState()
    state.record_exit(0.1, 0.0)
    state.record_exit(0.1, 1.0)
    state.record_exit(0.1, 1000.0)  # hours apart: not a loop
    assert (state.crashes, state.backoff) == (1, 0.0)


def test_from_server_config():
    from forksmtp.config import ServerConfig
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    needed = {"workers", "max_workers", "min_spare_workers", "max_spare_workers", "max_idle"}
    assert needed <= fields
    server = ServerConfig(**{f.name: f.default for f in dataclasses.fields(ServerConfig)
                             if f.default is not dataclasses.MISSING})
    got = PoolSettings.from_server(server)
    assert (got.workers, got.max_workers, got.min_spare, got.max_spare, got.max_idle) == (
        server.workers, server.max_workers, server.min_spare_workers, server.max_spare_workers,
        server.max_idle)


def test_burst_spawns_the_doubling_rate_while_workers_start():
    """A classic pool, every worker busy: 1, 2, 4 ... spawned per tick, and the rate is
    kept while the spawned workers are still starting (a burst of queued clients is
    being absorbed)."""
    state, s = PoolState(), settings(workers=2, max_workers=200, spare_cpu_share=0.0)
    spawned = []
    busy = 2
    for _ in range(5):
        result = plan(snap(" ".join(["B"] * busy)), s, state, NOW)
        spawned.append(result.spawn)
        # The new workers start, then take queued clients at once.
        plan(snap(" ".join(["B"] * busy + ["S"] * result.spawn)), s, state, NOW)
        busy += result.spawn
    assert spawned == [1, 2, 4, 8, 16]


def test_fresh_generation_is_not_a_burst():
    """After a reload the new generation starts from zero workers: exactly the minimum
    is started, however high the spawn rate had climbed (no overshoot on reload)."""
    state = PoolState(spawn_rate=16)
    assert plan(snap("b b"), settings(workers=2), state, NOW).spawn == 2


def test_a_busy_pool_on_saturated_cpus_grows_only_for_a_client_kept_waiting():
    """Every worker busy and the CPUs with no time to spare: a worker more would only take
    turns with the others, so no spare is started, for min_spare_workers or for a client
    that has just come; a client that has waited growth.WAIT_LIMIT starts the doubling."""
    state = PoolState()
    for dt in (0.0, 0.3, 0.6):
        assert plan(snap("B B B B"), settings(), state, NOW + dt, cpu_spare=False).spawn == 0
        assert plan(snap("B B B B"), settings(min_spare=0), state, NOW + dt, waiting=1,
                    cpu_spare=False).spawn == 0
    grown = [plan(snap("B " * n), settings(max_workers=100), state, NOW + 1, cpu_spare=False,
                  waiting=w, stalled=True).spawn for n, w in ((4, 1), (5, 6), (11, 3))]
    assert grown == [1, 6, 3]
    # The wait over, nothing more.
    assert plan(snap("B " * 14), settings(max_workers=100), state, NOW + 2, cpu_spare=False,
                waiting=2).spawn == 0


def test_a_busy_pool_with_cpu_to_spare_grows_one_worker_a_window():
    """Every worker busy, the CPUs with time to spare, nobody kept waiting: one spare at
    a time, each judged over a whole window of CPU time (SPARE_EVERY) before the next."""
    state, cfg = PoolState(), settings(max_workers=100)
    spawned = [plan(snap("B " * (4 + i)), cfg, state, NOW + t, cpu_spare=True).spawn
               for i, t in enumerate((0.0, 0.05, 0.1, SPARE_EVERY - 0.01, SPARE_EVERY,
                                      SPARE_EVERY + 0.05, 2 * SPARE_EVERY))]
    assert spawned == [1, 0, 0, 0, 1, 0, 1]
    # The minimum and the top-up of a pool with some idle are not held back.
    assert plan(snap("B B"), settings(workers=4), PoolState(), NOW, cpu_spare=False).spawn == 2
    assert plan(snap("B B I"), settings(min_spare=2), PoolState(), NOW, cpu_spare=False).spawn == 1


def test_a_stalled_burst_starts_a_worker_for_each_client_waiting_up_to_the_rate_cap():
    """The queue's length is known: a worker for each client kept waiting, at most
    MAX_SPAWN_RATE a tick (doubling from one, with 32 for 5 clients at its top, made a
    pool of 227 for 200 sessions, and took 0.3-0.9 s to reach a burst of them)."""
    cfg = settings(max_workers=300)
    assert plan(snap("B " * 40, 300), cfg, PoolState(), NOW, waiting=5, cpu_spare=False,
                stalled=True).spawn == 5
    assert plan(snap("B " * 45, 300), cfg, PoolState(), NOW, waiting=200, cpu_spare=False,
                stalled=True).spawn == MAX_SPAWN_RATE
    assert plan(snap("B " * 290, 300), cfg, PoolState(), NOW, waiting=200, cpu_spare=False,
                stalled=True).spawn == 10  # the room left


def test_a_stalled_burst_starts_no_worker_for_the_clients_the_workers_pace_takes_soon():
    """A stall left clients waiting past WAIT_LIMIT, but the workers' recent pace takes
    most of them within that limit: workers only for the rest; for none, with the CPUs
    saturated, when the pace takes them all (a 0.15 s stall of every worker at 50
    sessions grew the pool from 14 workers to 46 without this)."""
    cfg = settings(max_workers=300)
    assert plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=36, cpu_spare=False,
                stalled=True, taken_soon=260).spawn == 0
    assert plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=36, cpu_spare=False,
                stalled=True, taken_soon=36).spawn == 0
    assert plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=36, cpu_spare=False,
                stalled=True, taken_soon=30).spawn == 6
    assert plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=200, cpu_spare=False,
                stalled=True, taken_soon=10).spawn == MAX_SPAWN_RATE
    # With the CPUs' time to spare, the spare rule still has its say.
    assert plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=36, cpu_spare=True,
                stalled=True, taken_soon=260).spawn == 1


def test_a_plan_says_how_many_of_its_workers_are_for_clients_kept_waiting():
    """The master logs those (one [POOL] line a second at most): the minimum, the spares
    and the CPUs' spare are not."""
    cfg = settings(max_workers=300)
    kept = plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=36, cpu_spare=False,
                stalled=True, taken_soon=30)
    assert (kept.spawn, kept.for_waiting) == (6, 6)
    spare = plan(snap("B " * 14, 300), cfg, PoolState(), NOW, waiting=36, cpu_spare=True,
                 stalled=True, taken_soon=260)
    assert (spare.spawn, spare.for_waiting) == (1, 0)
    assert plan(snap("b b"), settings(workers=4), PoolState(), NOW, waiting=5,
                stalled=True).for_waiting == 0  # the minimum first
    assert plan(snap("B B I"), settings(min_spare=2), PoolState(), NOW).for_waiting == 0


def test_spare_cpu_share_zero_keeps_a_classic_pool():
    """server.spare_cpu_share = 0: every worker busy starts the doubling at once, for
    min_spare_workers, whatever the CPUs and the queues say."""
    state, cfg = PoolState(), settings(max_workers=300, spare_cpu_share=0.0)
    assert [plan(snap("B " * n), cfg, state, NOW, cpu_spare=False).spawn
            for n in (4, 5, 7, 11)] == [1, 2, 4, 8]
