"""The live tests' own harness (daemon.py), where a fault of its own would fail them."""
from __future__ import annotations

import pytest

from daemon import free_port


def test_free_port_never_hands_out_a_port_twice():
    """A thousand draws of bind(("127.0.0.1", 0)) repeat a port 30 to 40 times over
    here (this kernel hands out only the odd ports of 32768-60999 for it: about 14,000);
    a test that takes a port for a second listener and then starts a daemon on another
    must not get the same one."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)


def test_free_port_fails_by_name_rather_than_loop_once_every_port_was_handed_out(monkeypatch):
    """Its draws are bounded: with every port already handed out it gives up, saying so."""
    import daemon
    monkeypatch.setattr(daemon, "_HANDED_OUT", set(range(65536)))
    with pytest.raises(RuntimeError, match="no port not handed out before in 100 tries"):
        free_port()
