import pytest

from forksmtp import process

from daemon import Daemon
from helpers import forget_clients


@pytest.fixture(autouse=True)
def _fresh_session_clients():
    yield
    forget_clients()


@pytest.fixture
def daemon_factory(tmp_path):
    """Start real forksmtp daemons; every one is stopped and reaped after the test."""
    started: list[Daemon] = []

    def make(**kwargs) -> Daemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, **kwargs)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory()


def pytest_configure(config):
    # Slow tests still run by default; deselect them with -m "not slow" for a quick pass.
    config.addinivalue_line("markers", "slow: heavy load tests (run by default; -m 'not slow' skips them)")


@pytest.fixture
def hold_pidfile():
    """Hold a pidfile as a running master holds its own: written with this process's
    pid and locked by it, let go at the test's end."""
    held: list[str] = []

    def hold(path) -> None:
        process.write_pidfile(str(path))
        held.append(str(path))

    yield hold
    for path in held:
        process.remove_pidfile(path)
