"""Pool policy: how many workers to start or retire this tick.  Pure: no os calls, no clock.

Apache prefork's perform_idle_server_maintenance, plus a crash-loop back-off.  Once a tick
the master passes a scoreboard snapshot and gets a Plan:

- keep at least ``workers`` workers of the current generation, all started at once;
- keep at least ``min_spare`` of them idle (STARTING counts as idle: it was started a tick
  ago and will be ready soon).  With some idle, top them up.  With none idle: once a
  client has waited growth.WAIT_LIMIT in a listen queue, a worker for each client waiting
  beyond those the workers' recent pace takes within that limit (up to 32 a tick),
  else one spare a growth.WINDOW while the CPUs had time to spare, else none (a worker
  more on saturated CPUs only takes turns with the others).  ``spare_cpu_share = 0``
  keeps Apache's rule instead: 1, 2, 4 … up to 32 per tick while the shortfall lasts,
  back to 1 as soon as a tick needs no spawn;
- retire one idle worker per tick when more than ``max_spare`` are idle, it has been idle for
  ``max_idle`` seconds and the pool stays at or above ``workers``: one per tick, so recycled
  workers never go away in lockstep;
- never occupy more than ``max_workers`` slots.  Slots of an old generation (after a reload)
  or of stopping workers count against that ceiling, as their processes still exist, but not
  towards the minimum or the spares.  Retiring old generations is the reload's job;
- when workers keep dying within ``crash_window`` seconds of their start, spawn nothing for
  1 s, 2 s, 4 s … up to 60 s, so a broken config or a full disk does not become a fork bomb.
"""

from __future__ import annotations

from dataclasses import dataclass

from .growth import SPARE_SHARE, WINDOW
from .scoreboard import BUSY, IDLE, STARTING, STOPPING, Snapshot

CEILING = "max_workers reached"
#: Seconds between two warnings that the pool is at max_workers.  Under steady load the
#: ceiling comes and goes with every session that ends; Postfix's master repeats its
#: "has reached its process limit" warning at most once per 1000 s as well.
CEILING_WARN_EVERY = 1000.0

MAX_SPAWN_RATE = 32
RETIRE_EVERY = 1.0  # seconds between two retirements of surplus idle workers (max_idle)
SPARE_EVERY = WINDOW  # seconds between two spares started while every worker is busy


@dataclass(frozen=True, slots=True)
class PoolSettings:
    workers: int
    max_workers: int
    min_spare: int = 1
    max_spare: int = 8
    max_idle: float = 300.0
    spare_cpu_share: float = SPARE_SHARE  # 0: spares whatever the CPUs do (a classic pool)

    @classmethod
    def from_server(cls, server) -> "PoolSettings":
        """From config.ServerConfig; SIGTTIN/SIGTTOU use dataclasses.replace(workers=...)."""
        return cls(server.workers, server.max_workers, server.min_spare_workers,
                   server.max_spare_workers, server.max_idle, server.spare_cpu_share)


@dataclass(slots=True)
class PoolState:
    """What the policy remembers between ticks; owned and mutated by the master only."""
    crash_window: float = 5.0  # an exit this soon after start counts as a crash
    crash_threshold: int = 3  # consecutive crashes that start the back-off
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    spawn_rate: int = 1
    crashes: int = 0  # consecutive exits within crash_window of start
    last_crash: float = float("-inf")
    backoff: float = 0.0  # current back-off length, 0 when none
    backoff_until: float = float("-inf")
    fork_failed: bool = False  # the back-off is for fork() failing, not for workers crashing
    retire_requests: int = 0  # SIGTTOU: retire one worker now, whatever max_idle says
    last_idle_retire: float = float("-inf")  # when the last surplus idle worker was retired
    last_spare_growth: float = float("-inf")  # when a busy pool last grew by a spare

    def record_exit(self, lifetime: float, now: float) -> None:
        """Report an unplanned worker exit (crash, signal, error status) with its lifetime.

        Planned retirements (max_sessions, max_idle, reload, SIGTTOU) need not be reported.
        """
        if lifetime >= self.crash_window:
            return  # an old worker's death says nothing about whether new ones can start
        self.fork_failed = False  # a worker started and crashed: the back-off is a crash loop's
        if now - self.last_crash > self.backoff_max + self.crash_window:
            self.crashes = 0  # the last crash was long ago: start counting afresh
        self.crashes += 1
        self.last_crash = now
        # Grow once per back-off period: the workers already started when it began all die
        # together, and that is one failed attempt, not several.
        if self.crashes >= self.crash_threshold:
            self._grow_backoff(now)

    def record_fork_failure(self, now: float) -> None:
        """fork() failed (EAGAIN at a process limit, ENOMEM): hold spawning back as after
        a crash loop, so that the master retries after a growing pause instead of every
        tick (and logs once per pause), and answers queued clients 421 meanwhile."""
        self.fork_failed = True
        self.last_crash = now
        self._grow_backoff(now)

    def _grow_backoff(self, now: float) -> None:
        if now >= self.backoff_until:
            self.backoff = min(self.backoff_max,
                               self.backoff * 2 if self.backoff else self.backoff_initial)
            self.backoff_until = now + self.backoff

    def _settle(self, now: float) -> None:
        # No crash since the back-off ended, and a crash_window has passed: recovered.
        if self.backoff and self.last_crash < self.backoff_until <= now - self.crash_window:
            self.crashes, self.backoff, self.fork_failed = 0, 0.0, False


@dataclass(frozen=True, slots=True)
class Plan:
    spawn: int = 0
    # Slot indexes to stop gracefully, at most one.  The master marks each stopping in the
    # scoreboard before it signals, so the next tick neither counts it nor picks it again.
    retire: tuple[int, ...] = ()
    backoff_until: float = float("-inf")
    reason: str = ""  # why spawning is held back (crash loop, ceiling); empty when it is not
    for_waiting: int = 0  # of spawn, those started for clients kept waiting (growth.WAIT_LIMIT)


def current_workers(snap: Snapshot) -> list:
    """The slots of the workers that make up the pool: this generation's, not stopping."""
    return [s for s in snap.slots if s.generation == snap.generation and s.state != STOPPING]


def plan(snap: Snapshot, settings: PoolSettings, state: PoolState, now: float,
         waiting: int = 0, cpu_spare: bool = True, stalled: bool = False,
         taken_soon: int = 0) -> Plan:
    """What to start and what to retire.  ``waiting``: clients in the listen queues; with
    no worker idle or starting, the pool then grows below the ceiling even where it keeps
    no spares (``min_spare_workers = 0``), as Postfix's master starts a process for a
    waiting client, so that nobody waits for a worker to finish its session.

    With every worker busy, the pool grows (unless ``spare_cpu_share`` is 0) only while
    ``cpu_spare`` (the CPUs had time to spare of late: see growth.py), or once
    ``stalled`` (a client has waited growth.WAIT_LIMIT in a listen queue), and then by
    no more workers than there are clients waiting beyond ``taken_soon`` (those the
    workers' recent pace takes within that limit): on CPUs already saturated, a worker
    more only takes turns with the others."""
    state._settle(now)
    current = current_workers(snap)
    idle = [s for s in current if s.state in (STARTING, IDLE)]
    ceiling = min(settings.max_workers, snap.nslots)  # a reload may raise it past the slots
    room = ceiling - len(snap.slots)
    starting = sum(1 for s in current if s.state == STARTING)
    spawn, reason, for_waiting = _spawn(settings, state, now, len(current), len(idle), room,
                                        ceiling, starting, 0 if idle else waiting, cpu_spare,
                                        stalled, taken_soon)
    retire = () if spawn else _retire(settings, state, now, current, idle)
    return Plan(spawn, retire, state.backoff_until, reason, for_waiting)


def _spawn(settings: PoolSettings, state: PoolState, now: float, current: int, idle: int,
           room: int, ceiling: int, starting: int = 0, waiting: int = 0,
           cpu_spare: bool = True, stalled: bool = True,
           taken_soon: int = 0) -> tuple[int, str, int]:
    """(workers to start, why none may start, how many of them are for clients kept waiting)."""
    need_min = settings.workers - current
    need_spare = max(settings.min_spare, 0) - idle
    if need_min <= 0 and need_spare <= 0 and not waiting:
        if not starting:  # a burst is still being absorbed while workers start up
            state.spawn_rate = 1
        return 0, "", 0
    if now < state.backoff_until:
        state.spawn_rate = 1
        cause = ("fork failed: the system refused a new process" if state.fork_failed else
                 f"crash loop: {state.crashes} workers exited within {state.crash_window:g}s of start")
        return 0, (f"{cause}; not spawning for "
                   f"{state.backoff_until - now:.1f}s (back-off {state.backoff:g}s)"), 0
    if room <= 0:
        state.spawn_rate = 1
        return 0, f"{CEILING} ({ceiling} workers): no spare to start", 0
    # The minimum is restored at once (boot, after a crash); spares as below.
    # Every worker busy means a burst.  A classic pool spawns the whole rate (1, 2, 4 ...
    # 32, as Apache prefork), not just the shortfall, so queued clients get workers in a
    # few ticks.  With some idle, top up to min_spare only, which never overshoots.
    burst = need_min <= 0 and idle == 0 and (need_spare > 0 or waiting > 0)  # not a fresh generation
    if burst and settings.spare_cpu_share > 0:
        if stalled and waiting > taken_soon:
            # Clients kept waiting: a worker for each that the workers' pace would not take
            # within WAIT_LIMIT, up to MAX_SPAWN_RATE a tick.  The queue's length is known,
            # so there is no need to feel for it by doubling.  Without the pace, a stall of
            # 0.15 s of every worker at 50 sessions grew the pool from 14 workers to 46.
            kept = min(room, waiting - taken_soon, MAX_SPAWN_RATE)
            return kept, "", kept
        # Nobody has waited long: a worker more only where the CPUs have had time for
        # it, and one at a time, each judged over a whole window of their time (the
        # doubling outran the window: 35 workers where 8 to 14 did best).
        if not cpu_spare or now - state.last_spare_growth < SPARE_EVERY:
            return 0, "", 0
        state.last_spare_growth = now
        return 1, "", 0
    spawn = min(room, max(need_min, state.spawn_rate if burst else max(need_spare, 0)))
    if burst:
        state.spawn_rate = min(state.spawn_rate * 2, MAX_SPAWN_RATE)
    return spawn, "", 0


def _retire(settings: PoolSettings, state: PoolState, now: float, current: list,
            idle: list) -> tuple[int, ...]:
    if len(current) <= settings.workers:
        state.retire_requests = 0  # SIGTTOU below the minimum has nothing left to do
        return ()
    ready = sorted((s for s in idle if s.state == IDLE), key=lambda s: s.last_activity)
    if state.retire_requests > 0:
        return _retire_requested(settings, state, current, idle, ready)
    if not ready:
        return ()
    # One per RETIRE_EVERY: the master runs the policy again at every child's exit (its
    # SIGCHLD wakes the loop), so "one per call" would retire them all within milliseconds.
    if now - state.last_idle_retire < RETIRE_EVERY:
        return ()
    stale = [s for s in ready if now - s.last_activity >= settings.max_idle]
    if len(idle) > max(settings.max_spare, settings.min_spare) and stale:
        state.last_idle_retire = now
        return (stale[0].index,)
    return ()


def _retire_requested(settings: PoolSettings, state: PoolState, current: list, idle: list,
                      ready: list) -> tuple[int, ...]:
    """SIGTTOU: one worker fewer, now.  An idle one while more are idle than the spares
    the pool keeps (once one of them has started); else a busy one, which finishes its
    session first (a retirement is a SIGTERM, and that is graceful), so that the spare
    rule does not start a new worker in place of the one retired: the one whose client
    has been quiet longest."""
    if len(idle) > settings.min_spare:
        if not ready:
            return ()  # the ones beyond the spares are still starting: a later turn
        pick = ready[0]
    else:
        busy = sorted((s for s in current if s.state == BUSY), key=lambda s: s.last_activity)
        if not busy:
            state.retire_requests = 0  # every worker is a spare the pool keeps: none to retire
            return ()
        pick = busy[0]
    state.retire_requests -= 1
    return (pick.index,)
