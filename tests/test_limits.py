"""Admission policy: the contract's refusal replies and the stress-mode switch."""
from __future__ import annotations

import pytest

from forksmtp import limits
from forksmtp.smtp.replies import R421_BUSY, R421_PER_IP


@pytest.mark.parametrize("reason,code,enhanced", [
    ("max_connections", 421, "4.3.2"),
    ("max_connections_per_ip", 421, "4.7.0"),
    ("early_talker", 521, "5.5.0"),
    ("other", 421, "4.3.2"),
    ("something new", 421, "4.3.2"),
])
def test_reply_for(reason, code, enhanced):
    reply = limits.reply_for(reason)
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert reply.wire(False).startswith(f"{code} ".encode()) and reply.wire(False).endswith(b"\r\n")


def test_contract_replies_are_the_shared_constants():
    assert limits.reply_for("max_connections") is R421_BUSY
    assert limits.reply_for("max_connections_per_ip") is R421_PER_IP


@pytest.mark.parametrize("busy,max_workers,threshold,stress", [
    (0, 10, 0.8, False),
    (7, 10, 0.8, False),
    (8, 10, 0.8, True),
    (10, 10, 0.8, True),
    (6, 10, 0.7, False),
    (7, 10, 0.7, True),  # 0.7 * 10 is 7.000000000000001 in floating point
    (9, 10, 1.0, False),
    (10, 10, 1.0, True),
    (0, 1, 0.01, False),  # an idle pool is never under stress
    (1, 1, 0.01, True),
    (5, 0, 0.8, False),
    (5, 10, 0.0, False),  # 0 switches stress mode off
])
def test_in_stress(busy, max_workers, threshold, stress):
    assert limits.in_stress(busy, max_workers, threshold) is stress


def test_seldom_allows_once_per_interval_and_afresh_after_reset():
    seldom = limits.Seldom(60.0)
    assert seldom.allow(0.0)                      # the first time, even at monotonic 0
    assert not seldom.allow(59.9)                 # within the interval
    assert seldom.allow(60.0) and not seldom.allow(60.1)
    seldom.reset()
    assert seldom.allow(60.2)


def test_stress_mode_comes_at_once_and_goes_after_a_calm_hold():
    switch = limits.StressSwitch(hold=5.0)
    assert switch.decide(over=False, on=False, now=0.0) is False
    assert switch.decide(over=True, on=False, now=1.0) is True      # on at once
    assert switch.decide(over=False, on=True, now=2.0) is True      # calm from 2.0 ...
    assert switch.decide(over=False, on=True, now=6.9) is True      # ... not yet 5 s
    assert switch.decide(over=False, on=True, now=7.0) is False     # 5 s calm: off
    assert switch.decide(over=False, on=False, now=7.5) is False


def test_a_load_hovering_at_the_threshold_keeps_stress_mode_on():
    """Busy one check, calm the next: the calm spells never add up to the hold."""
    switch, on = limits.StressSwitch(hold=5.0), False
    changes = 0
    for tick in range(100):
        now = tick * 1.0
        new = switch.decide(over=tick % 2 == 0, on=on, now=now)
        changes += new != on
        on = new
    assert (changes, on) == (1, True)


def test_the_calm_hold_starts_again_after_each_busy_spell():
    switch = limits.StressSwitch(hold=5.0)
    switch.decide(over=True, on=False, now=0.0)
    assert switch.decide(over=False, on=True, now=1.0) is True      # calm from 1.0
    assert switch.decide(over=True, on=True, now=4.0) is True       # busy again
    assert switch.decide(over=False, on=True, now=5.0) is True      # calm from 5.0
    assert switch.decide(over=False, on=True, now=9.9) is True      # 4.9 s: still on
    assert switch.decide(over=False, on=True, now=10.0) is False
