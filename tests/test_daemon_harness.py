"""The live tests' own harness (daemon.py), where a fault of its own would fail them."""
from __future__ import annotations

from daemon import free_port


def test_free_port_never_hands_out_a_port_twice():
    """A thousand draws from the kernel's ~28,000 ephemeral ports repeat one about 18
    times over (the birthday bound); a test that takes a port for a second listener and
    then starts a daemon on another must not get the same one."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
