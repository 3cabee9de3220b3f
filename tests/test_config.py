"""Config loading: defaults, overrides, the example file, and one row per kind of mistake."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from forksmtp import cli, config
from forksmtp.config import Config, ConfigError, load_config, summary
from forksmtp.listeners import parse_listen

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "etc" / "forksmtp.toml"


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/etc holding a readable cert.pem and key.pem and a plain file; cwd is tmp/."""
    d = tmp_path / "etc"
    d.mkdir()
    for name in ("cert.pem", "key.pem", "plainfile"):
        (d / name).write_text("x\n")
    (d / "dangling.log").symlink_to("/nonexistent-dir/forksmtp.log")
    monkeypatch.chdir(tmp_path)
    return d


def write(etc: Path, text: str, name: str = "forksmtp.toml") -> Path:
    path = etc / name
    path.write_text(text)
    return path


TLS = '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\n'

# (TOML snippet, the key the error must name, part of the problem)
BAD = [
    ('[sever]\nworkers = 1\n', "[sever]", "unknown section (did you mean [server]?)"),
    ('[mailbox]\n', "[mailbox]", "did you mean [mailboxes]?"),
    ('workers = 4\n', "workers", "key outside any section (did you mean server.workers?)"),
    ('[tsl]\ncert_file = "cert.pem"\n', "[tsl]", "unknown section (did you mean [tls]?)"),
    ('server = 5\n', "server", "must be a table"),
    ('mailboxes = "x"\n', "mailboxes", "must be a table"),
    ('[server]\nwokers = 4\n', "server.wokers", "unknown key (did you mean server.workers?)"),
    ('[server]\nmaildir = "m"\n', "server.maildir", "did you mean delivery.maildir?"),
    ('[server]\nworkers = -1\n', "server.workers", "must be an integer >= 1"),
    ('[server]\nworkers = 0\n', "server.workers", "must be an integer >= 1"),
    ('[server]\nworkers = true\n', "server.workers", "must be an integer"),
    ('[server]\nworkers = 1.5\n', "server.workers", "must be an integer"),
    ('[server]\nworkers = "4"\n', "server.workers", "must be an integer"),
    ('[server]\nworkers = 65\n', "server.workers", "must be <= server.max_workers (64)"),
    ('[server]\nmax_workers = 0\n', "server.max_workers", "must be an integer from 1 to 10000"),
    ('[server]\nmax_workers = 100000000000\n', "server.max_workers", "from 1 to 10000"),
    ('[server]\nmax_workers = 2\n', "server.workers", "must be <= server.max_workers (2)"),
    ('[server]\nmax_connections = 0\n', "server.max_connections", ">= 1"),
    ('[server]\nmax_connections_per_ip = false\n', "server.max_connections_per_ip", "integer"),
    ('[server]\nmax_connection_rate = -1\n', "server.max_connection_rate", ">= 0"),
    ('[server]\nmax_connection_rate = 2.5\n', "server.max_connection_rate", "must be an integer"),
    ('[server]\nlisten = ["127.0.0.1:0"]\n', "server.listen", "out of range"),
    ('[server]\nlisten = ["127.0.0.1:70000"]\n', "server.listen", "out of range"),
    ('[server]\nlisten = "127.0.0.1:25"\n', "server.listen", "must be a list of strings"),
    ('[server]\nlisten = [2525]\n', "server.listen", "must be a list of strings"),
    ('[server]\nlisten = []\n', "server.listen", "at least one address"),
    ('[server]\nlisten = ["::1:25"]\n', "server.listen", "brackets"),
    ('[server]\nlisten = ["25", ":25"]\n', "server.listen", ":25 is listed twice"),
    # Spelled apart, bound the same: --check passed them and the start then failed.
    ('[server]\nlisten = ["127.0.0.1:2525", "localhost:2525"]\n', "server.listen",
     "localhost:2525 is the same socket as 127.0.0.1:2525"),
    ('[server]\nlisten = ["127.0.0.1:2525", "127.1:2525"]\n', "server.listen", "same socket"),
    ('[server]\nlisten = ["0.0.0.0:2525", "127.0.0.2:2525"]\n', "server.listen", "overlap"),
    ('[server]\nlisten = ["127.0.0.2:2525", "2525"]\n', "server.listen", "overlap"),
    # One dual-stack, one IPv6-only: they clash, but are not the same socket.
    ('[server]\nlisten = ["2525", "[::]:2525"]\n', "server.listen",
     "[::]:2525 and :2525 overlap: a wildcard address"),
    ('[server]\nhostname = "mx example"\n', "server.hostname", "domain name"),
    ('[server]\nhostname = ""\n', "server.hostname", "domain name"),
    ('[server]\nhostname = "[foo]"\n', "server.hostname", "address literal"),
    ('[server]\nhostname = "[999.1.1.1]"\n', "server.hostname", "address literal"),
    ('[server]\nhostname = "[1.2.3]"\n', "server.hostname", "address literal"),
    ('[server]\nhostname = "[IPv6:zz]"\n', "server.hostname", "address literal"),
    ('[server]\nhostname = "[::1]"\n', "server.hostname", "address literal"),
    ('[server]\nhostname = "' + "a" * 64 + '.example"\n', "server.hostname", "63 octets"),
    ('[server]\nhostname = "mx.test\\r\\n250 x"\n', "server.hostname", "domain name"),
    ('[server]\ngraceful_timeout = -1\n', "server.graceful_timeout", "must be a number >= 0"),
    ('[server]\ngraceful_timeout = "30s"\n', "server.graceful_timeout", "must be a number"),
    ('[server]\npidfile = "/nonexistent-dir/forksmtp.pid"\n', "server.pidfile", "does not exist"),
    ('[server]\npidfile = "."\n', "server.pidfile", "is a directory"),
    ('[server]\nstats_file = "nodir/stats.json"\n', "server.stats_file", "does not exist"),
    ('[server]\nuser = "no-such-user-forksmtp"\n', "server.user", "no such user"),
    ('[server]\ngroup = "no-such-group-forksmtp"\n', "server.group", "no such group"),
    ('[server]\nmin_spare_workers = 9\n', "server.min_spare_workers", "server.max_spare_workers (8)"),
    ('[server]\nmax_spare_workers = 0\n', "server.max_spare_workers", ">= 1"),
    ('[server]\nspare_cpu_share = 1\n', "server.spare_cpu_share", ">= 0 and < 1"),
    ('[server]\nspare_cpu_share = -0.1\n', "server.spare_cpu_share", ">= 0 and < 1"),
    ('[server]\nspare_cpu_share = "10%"\n', "server.spare_cpu_share", "must be a number"),
    ('[server]\nmax_sessions_per_worker = 0\n', "server.max_sessions_per_worker", ">= 1"),
    ('[server]\nmax_sessions_jitter = -1\n', "server.max_sessions_jitter", ">= 0"),
    ('[server]\nmax_idle = 0\n', "server.max_idle", "> 0"),
    ('[server]\nstress_threshold = 1.5\n', "server.stress_threshold", "<= 1"),
    ('[server]\ngreeting_delay = -0.5\n', "server.greeting_delay", ">= 0"),
    ('[server]\nreject_early_talkers = 1\n', "server.reject_early_talkers", "true or false"),
    ('[limits]\nmax_message_size = -5\n', "limits.max_message_size", ">= 1"),
    ('[limits]\nmax_recipients = 0\n', "limits.max_recipients", ">= 1"),
    ('[limits]\nmax_errors = "10"\n', "limits.max_errors", "integer"),
    ('[limits]\nmax_received_headers = 0\n', "limits.max_received_headers", ">= 1"),
    ('[limits]\nbare_newline = "strip"\n', "limits.bare_newline", 'one of "reject", "normalize"'),
    ('[limits]\nnormalize_networks = ["10.0.0.0/33"]\n', "limits.normalize_networks", "CIDR"),
    ('[server]\nlimit_exceptions = ["10.0.0.0/33"]\n', "server.limit_exceptions", "CIDR"),
    ('[server]\nlimit_exceptions = "10.0.0.0/8"\n', "server.limit_exceptions", "list"),
    ('[server]\nlimit_exceptions = ["::ffff:127.0.0.0/104"]\n', "server.limit_exceptions", "IPv4"),
    ('[limits]\nnormalize_networks = ["example.test"]\n', "limits.normalize_networks", "CIDR"),
    # Networks no client falls in: an IPv4 client is matched by its IPv4 form, and the
    # address accept(2) gives has no zone.
    ('[limits]\nnormalize_networks = ["::ffff:127.0.0.0/104"]\n', "limits.normalize_networks",
     '"::ffff:127.0.0.0/104": IPv4 clients are matched by their IPv4 address: write 127.0.0.0/8'),
    ('[limits]\nnormalize_networks = ["::/0", "::ffff:0:0/96"]\n', "limits.normalize_networks",
     '"::ffff:0:0/96": IPv4 clients are matched by their IPv4 address: write 0.0.0.0/0'),
    ('[limits]\nnormalize_networks = ["fe80::%lo/64"]\n', "limits.normalize_networks",
     '"fe80::%lo/64": a zone cannot be matched: clients are matched by address alone, '
     'on every interface: write fe80::/64'),
    ('[limits]\nstress_max_errors = 0\n', "limits.stress_max_errors", ">= 1"),
    ('[timeouts]\ncommand = 0\n', "timeouts.command", "> 0"),
    ('[timeouts]\ndata_block = -1\n', "timeouts.data_block", "> 0"),
    ('[timeouts]\ndata_done = nan\n', "timeouts.data_done", "must be a number"),
    ('[timeouts]\nsession = inf\n', "timeouts.session", "must be a number"),
    ('[timeouts]\nmin_data_rate = -1\n', "timeouts.min_data_rate", ">= 0"),
    ('[timeouts]\nstress_command = 0\n', "timeouts.stress_command", "> 0"),
    # Longer than poll(2) can wait (24.8 days): --check took them and every session crashed.
    ('[timeouts]\ncommand = 3e6\n', "timeouts.command", "<= 86400 (a day)"),
    ('[timeouts]\ndata_block = 86401\n', "timeouts.data_block", "<= 86400"),
    ('[timeouts]\ndata_done = 1e10\n', "timeouts.data_done", "<= 86400"),
    ('[timeouts]\nsession = 3e6\n', "timeouts.session", "<= 86400"),
    ('[timeouts]\nstress_command = 1e7\n', "timeouts.stress_command", "<= 86400"),
    ('[server]\ngreeting_delay = 3e6\n', "server.greeting_delay", "< 300"),
    ('[server]\ngreeting_delay = 300\n', "server.greeting_delay", "clients wait 5 minutes"),
    ('[server]\ngreeting_delay = -1\n', "server.greeting_delay", ">= 0"),
    ('[delivery]\nfsync = "yes"\n', "delivery.fsync", "true or false"),
    ('[delivery]\nlocal_domains = "example.test"\n', "delivery.local_domains", "list of strings"),
    ('[delivery]\nlocal_domains = ["a b"]\n', "delivery.local_domains", "not a domain"),
    ('[delivery]\nlocal_domains = ["user@example.test"]\n', "delivery.local_domains", "not a domain"),
    ('[delivery]\nmaildir = ""\n', "delivery.maildir", "must not be empty"),
    ('[delivery]\nmaildir = 3\n', "delivery.maildir", "must be a string"),
    ('[delivery]\nmaildir = "plainfile"\n', "delivery.maildir", "is not a directory"),
    ('[delivery]\nmaildir = "plainfile/sub/Maildir"\n', "delivery.maildir", "plainfile is not a directory"),
    ('[mailboxes]\n"alice" = "alice"\n', 'mailboxes."alice"', "not an address"),
    ('[mailboxes]\n"@example.test" = "x"\n', 'mailboxes."@example.test"', "not an address"),
    ('[mailboxes]\n"a@example.test" = 5\n', 'mailboxes."a@example.test"', "must be a string"),
    ('[mailboxes]\n"a@example.test" = "plainfile"\n', 'mailboxes."a@example.test"', "not a directory"),
    ('[mailboxes]\n"A@x.test" = "a"\n"a@X.test" = "b"\n', 'mailboxes."a@X.test"', "listed twice"),
    ('[delivery]\nlocal_domains = ["example.test"]\n[mailboxes]\n"a@other.test" = "m"\n',
     'mailboxes."a@other.test"', "not in delivery.local_domains"),
    ('[log]\nlevel = "verbose"\n', "log.level", '"debug", "info", "warning", "error"'),
    ('[log]\nfile = "/nonexistent-dir/forksmtp.log"\n', "log.file", "does not exist"),
    ('[log]\nfile = "dangling.log"\n', "log.file", "/nonexistent-dir does not exist"),
    ('[log]\nfile = "."\n', "log.file", "is a directory"),
    ('[tls]\n', "tls.cert_file", "required when [tls] is present"),
    ('[auth]\n', "auth.password_file", "required when [auth] is present"),
    ('[log]\nlevel = "info"\nformat = "json"\n', "log.format", "unknown key"),
    ('[server]\n"wor\\nkers" = 1\n', 'server."wor\\nkers"', "unknown key (did you mean server.workers?)"),
    ('["se\\nrver"]\nworkers = 1\n', '["se\\nrver"]', "unknown section"),
    ('[tls]\nkey_file = "key.pem"\n', "tls.cert_file", "required when [tls] is present"),
    ('[tls]\ncert_file = "cert.pem"\n', "tls.key_file", "required when [tls] is present"),
    ('[tls]\ncert_file = "missing.pem"\nkey_file = "key.pem"\n', "tls.cert_file",
     "/missing.pem: No such file"),  # the resolved path, beside the config file
    ('[tls]\ncert_file = "cert.pem"\nkey_file = "."\n', "tls.key_file", "cannot read"),
    (TLS + 'min_version = "TLSv1.1"\n', "tls.min_version", '"TLSv1.2", "TLSv1.3"'),
    (TLS + 'implicit_listen = ["127.0.0.1:2525"]\n', "tls.implicit_listen", "also in server.listen"),
    (TLS + 'implicit_listen = ["localhost:2525"]\n', "tls.implicit_listen", "same socket as 127.0.0.1:2525"),
    (TLS + 'implicit_listen = ["2525"]\n', "tls.implicit_listen", "overlap"),
    (TLS + 'implicit_listen = ["x"]\n', "tls.implicit_listen", "expected PORT"),
    (TLS + 'require_tls = "no"\n', "tls.require_tls", "true or false"),
    (TLS + 'ciphers = "HIGH"\n', "tls.ciphers", "unknown key"),
    ('[auth]\nrequired = false\n', "auth.password_file", "required when [auth] is present"),
    ('[auth]\npassword_file = "nodir/passwd"\n', "auth.password_file", "does not exist"),
    ('[server]\nstats_file = "f"\n[log]\nfile = "f"\n', "log.file", "is also server.stats_file"),
    ('[server]\npidfile = "f"\nstats_file = "./f"\n', "server.stats_file", "is also server.pidfile"),
    ('[log]\nfile = "f"\n[auth]\npassword_file = "f"\nallow_insecure = true\n', "auth.password_file",
     "is also log.file"),
    ('[auth]\npassword_file = "passwd"\nrequired = true\n', "auth.required", "only over TLS"),
    ('[server]\npidfile = "forksmtp.toml"\n', "server.pidfile", "is also the configuration file"),
    ('[server]\nstats_file = "./forksmtp.toml"\n', "server.stats_file", "is also the configuration file"),
    (TLS + '[server]\npidfile = "key.pem"\n', "server.pidfile", "is also tls.key_file"),
    (TLS + '[log]\nfile = "cert.pem"\n', "log.file", "is also tls.cert_file"),
    ('[delivery]\nlocal_domains = ["."]\n', "delivery.local_domains", "not a domain"),
    ('[delivery]\nlocal_domains = ["a..example"]\n', "delivery.local_domains", "not a domain"),
    ('[auth]\npassword_file = "passwd"\nallow_insecure = 1\n', "auth.allow_insecure", "true or false"),
]


@pytest.mark.parametrize("name", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "a" * 63 + ".example", "mx.example.test.",
                                  "my_host", "localhost"])
def test_hostnames_that_are_taken(etc: Path, name: str) -> None:
    assert load_config(str(write(etc, f'[server]\nhostname = "{name}"\n'))).server.hostname == name


@pytest.mark.parametrize("snippet, key, problem", BAD, ids=[row[1] + ":" + row[2] for row in BAD])
def test_every_error_names_file_key_and_problem(etc: Path, snippet: str, key: str, problem: str) -> None:
    path = write(etc, snippet)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    err = info.value
    assert (err.file, err.key) == (str(path), key)
    assert problem in err.problem
    line = str(err)
    assert line.startswith(f"{path}: {key}") and line.endswith(err.problem) and "\n" not in line


@pytest.mark.parametrize("listen", [
    ["127.0.0.1:2525", "127.0.0.2:2525"],
    ["127.0.0.1:2525", "127.0.0.1:2526"],
    ["[::1]:2525", "127.0.0.1:2525"],
    ["[::]:2525", "0.0.0.0:2525"],  # an IPv6-only wildcard leaves IPv4 alone
])
def test_listen_addresses_that_can_all_be_bound_are_accepted(etc: Path, listen: list[str]) -> None:
    path = write(etc, f"[server]\nlisten = {listen!r}\n".replace("'", '"'))
    assert [str(a) for a in load_config(str(path)).server.listen] == listen


def test_a_pidfile_in_a_directory_that_cannot_take_a_rename_is_refused(etc: Path) -> None:
    """The pidfile and the stats file are replaced by a rename: a writable file in a
    directory that is not writable passed the check, and the start then failed.  An
    immutable directory refuses root too."""
    d = etc / "ro"
    d.mkdir()
    (d / "run.pid").write_text("")
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        for key in ("pidfile", "stats_file"):
            path = write(etc, f'[server]\n{key} = "ro/run.pid"\n')
            with pytest.raises(ConfigError) as info:
                load_config(str(path))
            assert info.value.key == f"server.{key}"
            assert info.value.problem.startswith(f"directory {d} is not writable")
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


@pytest.mark.parametrize("key", ["pidfile", "stats_file"])
def test_a_pidfile_or_stats_file_where_a_fifo_or_a_device_is_is_refused(etc: Path, key: str) -> None:
    """The rename would put a regular file in its place: stats_file = "/dev/null", meant
    to throw the stats away, would have taken /dev/null out of /dev."""
    os.mkfifo(etc / "a.fifo")
    os.symlink(etc / "a.fifo", etc / "link")
    cases = [("a.fifo", etc / "a.fifo"), ("link", etc / "link")]
    if os.geteuid() == 0:  # else /dev is refused first, as a directory it may not write
        cases.append(("/dev/null", "/dev/null"))
    for value, named in cases:
        path = write(etc, f'[server]\n{key} = "{value}"\n')
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert (info.value.key, info.value.problem) == (
            f"server.{key}", f"{named} is not a regular file")
    (etc / "dangling").symlink_to(etc / "nothing")  # the rename replaces the link itself
    (etc / "run.pid").write_text("123\n")
    for value in ("dangling", "run.pid", "new.pid"):
        assert getattr(load_config(str(write(etc, f'[server]\n{key} = "{value}"\n'))).server, key) == str(etc / value)


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_a_maildir_holding_a_file_where_a_subdirectory_goes(etc: Path, sub: str) -> None:
    """Else the server started and every message failed after its DATA."""
    (etc / "md").mkdir()
    (etc / "md" / sub).write_text("x\n")
    path = write(etc, '[delivery]\nmaildir = "md"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.key == "delivery.maildir"
    assert info.value.problem == f"{etc / 'md' / sub} is not a directory"


def test_without_the_storage_check_a_mailbox_path_must_still_be_given(etc: Path) -> None:
    """A start or a reload leaves out a [mailboxes] Maildir it cannot use, but an empty
    path is a mistake in the file, not the state of a disk."""
    (etc / "plainfile").write_text("x\n")
    path = write(etc, '[mailboxes]\n"a@example.test" = "plainfile/Maildir"\n')
    cfg = load_config(str(path), mailbox_storage=False)
    assert cfg.delivery.mailboxes["a@example.test"] == str(etc / "plainfile" / "Maildir")
    path = write(etc, '[mailboxes]\n"a@example.test" = ""\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), mailbox_storage=False)
    assert (info.value.key, info.value.problem) == ('mailboxes."a@example.test"', "must not be empty")


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_a_maildir_whose_tmp_or_new_is_a_symlink_is_refused(etc: Path, sub: str) -> None:
    """The server never follows them (SECURITY.md, 7): --check says so, rather than
    passing a config whose every message would get 451."""
    (etc / "elsewhere").mkdir()
    (etc / "md").mkdir()
    (etc / "md" / sub).symlink_to(etc / "elsewhere")
    path = write(etc, '[delivery]\nmaildir = "md"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.key == "delivery.maildir"
    assert info.value.problem == f"{etc / 'md' / sub} is a symlink, which is not followed"


def test_the_longest_timeouts_and_greeting_delay_are_taken(etc: Path) -> None:
    """The other side of the limits BAD crosses: a day, and just under 5 minutes."""
    path = write(etc, "[server]\ngreeting_delay = 299.5\n[timeouts]\n" +
                 "".join(f"{key} = 86400\n" for key in ("command", "data_block", "data_done",
                                                           "session", "stress_command")))
    cfg = load_config(str(path))
    assert cfg.server.greeting_delay == 299.5
    t = cfg.timeouts
    assert (t.command, t.data_block, t.data_done, t.session, t.stress_command) == (86400,) * 5


def test_error_shows_the_value_as_written(etc: Path) -> None:
    path = write(etc, "[server]\nworkers = -1\n", name="x.toml")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: server.workers = -1: must be an integer >= 1"
    assert info.value.value == -1


def test_a_long_value_is_shown_cut_to_one_line(etc: Path) -> None:
    """A value of 80 characters in its quotes is shown whole; one longer is cut to its
    first 77 and "...", the key and the reason still whole."""
    for name, whole in (("a" * 78, True), ("a" * 79, False)):
        path = write(etc, f'[server]\nhostname = "{name}"\n', name="x.toml")
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        value = f'"{name}"' if whole else f'"{name[:76]}...'
        assert str(info.value).startswith(f"{path}: server.hostname = {value}: "), str(info.value)


@pytest.mark.parametrize("snippet, line, shown", [
    ("[server]\nworkers = \n", 2, "workers ="),
    ("[server]\nworkers = 4\nworkers = 5\n", 3, "workers = 5"),  # TOML forbids a key twice
    ("[server\n", 1, "[server"),
    ("[server]\nhostname = \"a\tb\" x\n", 2, 'hostname = "a\\tb" x'),
    # U+2028 and U+0085 are TOML in a comment; tomllib counts lines by LF alone
    ("# owner: ops\u2028team\u0085mail\n[server]\nworkers = 4\nworkers = 5\n", 4, "workers = 5"),
])
def test_toml_syntax_errors_name_and_show_the_line(etc: Path, snippet: str, line: int, shown: str) -> None:
    path = write(etc, snippet)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid TOML: .*line {line}\b") as info:
        load_config(str(path))
    assert str(info.value).endswith(f"): {shown}")


def test_unreadable_and_non_utf8_files(etc: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        load_config(str(etc / "missing.toml"))
    bad = etc / "latin1.toml"
    bad.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(bad))


def test_a_config_saved_with_a_byte_order_mark_is_read(etc: Path) -> None:
    """As Windows editors save UTF-8: refused as "Invalid statement" at line 1 before."""
    path = etc / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[server]\nhostname = "bom.example"\n')
    assert load_config(str(path)).server.hostname == "bom.example"
    path.write_bytes(b'\xef\xbb\xbf\xef\xbb\xbf[server]\n')  # one BOM only: a second is text
    with pytest.raises(ConfigError, match="invalid TOML: .*line 1"):
        load_config(str(path))


def test_a_config_that_is_no_config_file_is_refused_in_one_line(etc: Path) -> None:
    """A FIFO would hold the reader (at a reload, the master) until something wrote into
    it, a device would be read without end, and numbers and nesting past Python's own
    bounds ended in a traceback.  The FIFO is read in a child with a deadline, so that a
    wait fails the test instead of hanging it."""
    os.mkfifo(etc / "fifo.toml")
    code = ("import sys\nfrom forksmtp.config import ConfigError, load_config\n"
            "for path in sys.argv[1:]:\n    try:\n        load_config(path)\n"
            "    except ConfigError as exc:\n        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(etc / "fifo.toml"), "/dev/zero"], capture_output=True,
                          text=True, timeout=20)
    assert done.stdout == (f"{etc / 'fifo.toml'}: cannot read: not a regular file\n"
                           f"/dev/zero: cannot read: not a regular file\n"), done
    (etc / "big.toml").write_text("# " + "x" * (16 << 20) + "\n")
    for path, said in [(str(etc), "cannot read: not a regular file"),
                       (str(etc / "big.toml"), "larger than 16 MiB: not a config file"),
                       (str(write(etc, "[server]\nworkers = " + "1" * 5000 + "\n", "digits.toml")),
                        "invalid TOML: a number of more than 4,300 digits"),
                       (str(write(etc, "[server]\nlisten = " + "[" * 2000 + "]" * 2000 + "\n", "deep.toml")),
                        "invalid TOML: nested too deeply")]:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == f"{path}: {said}"
    (etc / "edge.toml").write_text("# " + "x" * ((16 << 20) - 3) + "\n")  # 16 MiB exactly: read
    assert load_config(str(etc / "edge.toml")).path == str(etc / "edge.toml")


@pytest.mark.parametrize("key, value, said", [
    ("timeouts.command", "1" + "0" * 400, "must be a number of a sensible size"),
    ("timeouts.command", "inf", "must be a number"), ("timeouts.command", "nan", "must be a number"),
    ("timeouts.command", "0x" + "f" * 4000, "must be a number of a sensible size"),
    ("server.workers", "0x" + "f" * 4000, "must be an integer of a sensible size"),
    ("server.workers", "9223372036854775808", "must be an integer of a sensible size"),  # 2**63
])
def test_a_number_too_big_for_its_use_is_refused_by_its_key(etc: Path, key: str, value: str, said: str) -> None:
    """TOML's hexadecimal integers have no digit bound: 16,000 bits of one passed the
    parser, and the message, writing it in decimal, raised Python's own 4,300-digit error."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        load_config(str(write(etc, f"[{section}]\n{name} = {value}\n")))
    assert (info.value.key, info.value.problem) == (key, said)
    line = str(info.value)
    assert line.startswith(f"{info.value.file}: {key} = ") and line.endswith(f": {said}") and len(line) < 300
    if value.startswith("0x"):
        assert f"{key} = <an integer of 16,000 bits>: " in line


def test_the_63_bit_bound_of_an_integer_key_is_crossed_at_2_to_the_63(etc: Path) -> None:
    """2**63 - 1 is an integer of a sensible size (the key's own range judges it then);
    2**63 is not."""
    cfg = load_config(str(write(etc, f"[limits]\nmax_message_size = {2**63 - 1}\n", "edge.toml")))
    assert cfg.limits.max_message_size == 2**63 - 1
    with pytest.raises(ConfigError) as info:
        load_config(str(write(etc, f"[limits]\nmax_message_size = {2**63}\n", "past.toml")))
    assert (info.value.key, info.value.problem) == ("limits.max_message_size", "must be an integer of a sensible size")


def test_defaults_match_the_dataclasses(etc: Path) -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.path == "" and cfg.tls is None and cfg.auth is None
    assert cfg.server.listen == (parse_listen("127.0.0.1:2525"),)
    assert cfg.server.hostname == socket.gethostname()
    assert (cfg.server.workers, cfg.server.max_workers) == (4, 64)
    assert (cfg.server.max_connections, cfg.server.max_connections_per_ip) == (50, 10)
    assert cfg.server.graceful_timeout == 30.0 and isinstance(cfg.server.graceful_timeout, float)
    assert cfg.delivery.maildir == str(etc.parent / "Maildir")
    assert dict(cfg.delivery.mailboxes) == {}
    assert load_config(str(write(etc, ""))) == dataclasses.replace(cfg, path=str(etc / "forksmtp.toml"))


def test_the_key_table_matches_the_dataclass_fields() -> None:
    for section, cls in config._SECTIONS.items():
        keys = [k for s, k, *_ in config._KEYS if s == section]
        fields = [f.name for f in dataclasses.fields(cls)]
        assert sorted(keys) == sorted(f for f in fields if f != "mailboxes"), section


def test_config_is_frozen(etc: Path) -> None:
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.workers = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.delivery.mailboxes["x@y"] = "/z"  # type: ignore[index]


def test_values_and_normalisation(etc: Path) -> None:
    (etc / "passwd").write_text("")
    path = write(etc, TLS + """
[server]
listen = ["2525", "[::1]:2526"]
hostname = "mx.example.test"
workers = 2
graceful_timeout = 5
[limits]
normalize_networks = ["10.1.2.3/8", "::1"]
[delivery]
maildir = "../var/Maildir"
local_domains = ["Example.TEST.", "example.test", "other.test"]
[mailboxes]
"Alice@Example.Test" = "alice/Maildir"
[log]
level = "DEBUG"
[auth]
password_file = "passwd"
required = true
""")
    cfg = load_config(str(path))
    root = etc.parent
    assert [str(a) for a in cfg.server.listen] == [":2525", "[::1]:2526"]
    assert cfg.server.graceful_timeout == 5.0
    assert cfg.limits.normalize_networks == ("10.0.0.0/8", "::1/128")
    assert cfg.delivery.maildir == str(root / "var" / "Maildir")  # relative to the file
    assert cfg.delivery.local_domains == ("example.test", "other.test")
    assert dict(cfg.delivery.mailboxes) == {"alice@example.test": str(etc / "alice" / "Maildir")}
    assert cfg.log.level == "debug"
    assert cfg.tls is not None and cfg.tls.cert_file == str(etc / "cert.pem")
    assert cfg.tls.min_version == "TLSv1.2" and cfg.tls.implicit_listen == ()
    assert cfg.auth is not None and cfg.auth.password_file == str(etc / "passwd")
    assert cfg.path == str(path)
    assert not (root / "var").exists()  # validation creates nothing
    line = summary(cfg)
    assert line.startswith(f"config OK: {path}: listen :2525 [::1]:2526, 2 workers")
    assert str(root / "var" / "Maildir") in line and "TLS" in line and "AUTH required" in line
    assert ", 1 mailbox," in line


@pytest.mark.parametrize("boxes, shown", [
    ({"a@example.test": "a"}, "1 mailbox"),
    ({"a@example.test": "a", "b@example.test": "a"}, "2 mailboxes"),
    # One address, routed under both spellings of its domain: one mailbox.
    ({"jörg@dést.test": "j"}, "1 mailbox"),
    ({"jörg@dést.test": "j", "jörg@xn--dst-bma.test": "j", "b@xn--dst-bma.test": "b"}, "2 mailboxes"),
])
def test_the_summary_counts_each_address_once(etc: Path, boxes: dict, shown: str) -> None:
    table = "".join(f'"{address}" = "{path}"\n' for address, path in boxes.items())
    line = summary(load_config(str(write(etc, f"[mailboxes]\n{table}"))))
    assert f", {shown}" in line and f", {shown}es" not in line, line


@pytest.mark.parametrize("workers, shown", [(1, "1 worker (max 64)"), (2, "2 workers (max 64)")])
def test_the_summary_counts_workers_in_words(etc: Path, workers: int, shown: str) -> None:
    assert f", {shown}, " in summary(load_config(str(write(etc, f"[server]\nworkers = {workers}\n"))))


def test_overrides_replace_file_values(etc: Path) -> None:
    path = write(etc, '[server]\nlisten = ["127.0.0.1:2600", "127.0.0.1:2601"]\nworkers = 8\n'
                      '[delivery]\nmaildir = "from-file"\n')
    cfg = load_config(str(path), {
        "server.listen": ["127.0.0.1:2700"],
        "delivery.maildir": "from-cli",
        "server.workers": 3,
        "server.hostname": "cli.example.test",
        "server.pidfile": "run.pid",
        "log.level": "WARNING",
    })
    assert cfg.server.listen == (parse_listen("127.0.0.1:2700"),)
    assert cfg.server.workers == 3 and cfg.server.hostname == "cli.example.test"
    # Command-line paths are relative to the working directory, not to the file.
    assert cfg.delivery.maildir == str(etc.parent / "from-cli")
    assert cfg.server.pidfile == str(etc.parent / "run.pid")
    assert cfg.log.level == "warning"


def test_override_errors_blame_the_command_line(etc: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"server.workers": 0})
    assert str(info.value) == "command line: server.workers = 0: must be an integer >= 1"
    with pytest.raises(ConfigError, match=r"^command line: server\.listen = \[\"x:y\"\]: \"x:y\": port"):
        load_config(None, {"server.listen": ["x:y"]})
    with pytest.raises(ConfigError, match="server.wrkers.*unknown key.*server.workers"):
        load_config(None, {"server.wrkers": 2})
    path = write(etc, "[server]\nmax_workers = 2\n")
    with pytest.raises(ConfigError, match=r"^command line: server\.workers = 3: must be <= server\.max_workers \(2\)"):
        load_config(str(path), {"server.workers": 3})


def test_a_listen_flag_that_clashes_with_the_files_implicit_listen_says_it_is_the_flag(etc: Path) -> None:
    (etc / "c.pem").write_text("x")
    (etc / "k.pem").write_text("x")
    path = write(etc, '[tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\n'
                      'implicit_listen = ["127.0.0.1:4650"]\n')
    with pytest.raises(ConfigError, match=r"4650 is also in server\.listen \(--listen on the command line\)$"):
        load_config(str(path), {"server.listen": ["127.0.0.1:4650"]})
    both = write(etc, '[server]\nlisten = ["127.0.0.1:4650"]\n[tls]\ncert_file = "c.pem"\n'
                      'key_file = "k.pem"\nimplicit_listen = ["127.0.0.1:4650"]\n')
    with pytest.raises(ConfigError, match=r"4650 is also in server\.listen$"):
        load_config(str(both))


def test_maildir_is_checked_but_never_created(etc: Path) -> None:
    deep = etc.parent / "a" / "b" / "c"
    cfg = load_config(None, {"delivery.maildir": str(deep)})
    assert cfg.delivery.maildir == str(deep) and not (etc.parent / "a").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_maildir_under_a_read_only_directory(etc: Path) -> None:
    ro = etc.parent / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=rf"delivery\.maildir = .*: {re.escape(str(ro))} is not writable"):
            load_config(None, {"delivery.maildir": str(ro / "Maildir")})
    finally:
        ro.chmod(0o700)


def test_example_config_loads_as_is() -> None:
    cfg = load_config(str(EXAMPLE))
    assert cfg.server.listen == (parse_listen("127.0.0.1:2525"),)
    assert cfg.delivery.maildir == str(REPO / "var" / "Maildir")
    assert cfg.tls is None and cfg.auth is None and not cfg.delivery.mailboxes


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for section, key, *_ in config._KEYS:
        assert re.search(rf"^(# )?{key} = ", text, re.M), f"{section}.{key} missing from the example"
    for section in [*config._SECTIONS, "mailboxes"]:
        assert re.search(rf"^(# )?\[{section}\]", text, re.M), section


def test_example_commented_sections_are_valid(etc: Path) -> None:
    """Uncomment [tls], [auth] and [mailboxes]: the keys shown there must all be real keys."""
    text = re.sub(r'^# (?=\[\w+\]|"[^"]+" = |\w+ = )', "", EXAMPLE.read_text(), flags=re.M)
    text = text.replace("/etc/forksmtp/", "").replace("/var/mail/", "")
    cfg = load_config(str(write(etc, text)))
    assert cfg.tls is not None and cfg.auth is not None
    assert cfg.server.hostname == "mx.example.test"
    assert set(cfg.delivery.mailboxes) == {"alice@example.test", "bob@example.test"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forksmtp", *args],
                          capture_output=True, text=True, timeout=60)


def test_check_ok_via_python_m(etc: Path) -> None:
    result = run_cli("-c", str(EXAMPLE), "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"config OK: {EXAMPLE}: listen 127.0.0.1:2525, 4 workers")
    assert result.stdout.count("\n") == 1


def test_check_bad_via_python_m(etc: Path) -> None:
    path = write(etc, "[server]\nworkers = -1\n")
    result = run_cli("-c", str(path), "--check")
    assert result.returncode == 2 and result.stdout == ""
    assert f"{path}: server.workers = -1: must be an integer >= 1" in result.stderr


def test_check_flags_override_the_file(etc: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["-c", str(EXAMPLE), "--check", "--listen", "127.0.0.1:2600",
                     "--listen", "[::1]:2600", "--workers", "2", "--maildir", "m"])
    out = capsys.readouterr().out
    assert code == 0
    assert "listen 127.0.0.1:2600 [::1]:2600, 2 workers" in out and str(etc.parent / "m") in out


def test_a_bad_built_in_default_is_not_blamed_on_the_file(etc: Path) -> None:
    """An empty file and a plain file called Maildir in the working directory: the
    message says the value is the default, and where the relative path starts."""
    (etc.parent / "Maildir").write_text("x\n")
    path = write(etc, "")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (f'{path}: delivery.maildir = "./Maildir": is not a directory (the built-in '
                               f"default: the key is not set, relative to the working directory {etc.parent})")


_INFS = "[" + ", ".join(["inf"] * 30) + "]"


@pytest.mark.parametrize("snippet, shown", [
    ("[server]\ngraceful_timeout = inf\n", "server.graceful_timeout = inf: must be a number"),
    ("[server]\ngraceful_timeout = -inf\n", "server.graceful_timeout = -inf: must be a number"),
    ("[server]\ngraceful_timeout = nan\n", "server.graceful_timeout = nan: must be a number"),
    ("[server]\nhostname = 1979-05-27T07:32:00Z\n", "server.hostname = 1979-05-27T07:32:00Z: must be a string"),
    ("[server]\nhostname = 1979-05-27T00:32:00.5-07:00\n",
     "server.hostname = 1979-05-27T00:32:00.500000-07:00: must be a string"),
    ("[server]\nhostname = 1979-05-27\n", "server.hostname = 1979-05-27: must be a string"),
    ("[server]\nhostname = 07:32:00\n", "server.hostname = 07:32:00: must be a string"),
    ("[server]\nhostname = {a = 1}\n", "server.hostname = {a = 1}: must be a string"),
    ('[server]\nhostname = {a = 1, "b c" = [true, 0.5]}\n',
     'server.hostname = {a = 1, "b c" = [true, 0.5]}: must be a string'),
    ("[server]\nhostname = {}\n", "server.hostname = {}: must be a string"),
    ('[server]\nhostname = "mx\\u2028example"\n', 'server.hostname = "mx\\u2028example": must be a domain name '
     "(labels of 63 octets at most) or an address literal such as [192.0.2.1] or [IPv6:2001:db8::1]"),
    (f"[server]\ngraceful_timeout = {_INFS}\n", f"server.graceful_timeout = {_INFS[:77]}...: must be a number"),
    ('[server]\nlisten = ["127.0.0.1:99999"]\n',
     'server.listen = ["127.0.0.1:99999"]: "127.0.0.1:99999": port 99999 out of range 1-65535'),
    ('[server]\nlisten = ["127.0.0.1:smtp"]\n',
     'server.listen = ["127.0.0.1:smtp"]: "127.0.0.1:smtp": port must be a number, not "smtp"'),
    ('[server]\nlisten = ["127.0.0.1:2\\u20285"]\n',
     'server.listen = ["127.0.0.1:2\\u20285"]: "127.0.0.1:2\\u20285": port must be a number, not "2\\u20285"'),
    ('[server]\nlisten = ["[fe80::1\\u0085]:25"]\n',
     'server.listen = ["[fe80::1\\u0085]:25"]: "[fe80::1\\u0085]:25": not an IPv6 address: "fe80::1\\u0085"'),
    ('[delivery]\nlocal_domains = ["."]\n', 'delivery.local_domains = ["."]: "." is not a domain'),
    ('[delivery]\nlocal_domains = ["a b"]\n', 'delivery.local_domains = ["a b"]: "a b" is not a domain'),
], ids=["inf", "-inf", "nan", "offset-datetime", "fraction-and-offset", "local-date", "local-time",
        "inline-table", "nested-inline-table", "empty-inline-table", "line-separator", "cut-at-80",
        "port-out-of-range", "port-not-a-number", "port-line-separator", "address-next-line",
        "dot-domain", "domain-with-a-space"])
def test_check_shows_a_value_in_tomls_form(etc: Path, snippet: str, shown: str) -> None:
    """A value is shown as TOML writes it: json.dumps wrote inf as Infinity, nan as NaN, a
    datetime as a quoted string (so that "must be a string" seemed wrong) and an inline
    table as a JSON object; and what the reason quotes of it is in TOML's double quotes,
    not Python's single ones.  The file is named as it was given."""
    write(etc, snippet)
    result = run_cli("-c", "etc/forksmtp.toml", "--check")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"forksmtp: etc/forksmtp.toml: {shown}\n")


def test_check_names_the_config_key_of_a_bad_password_file(etc: Path, capsys: pytest.CaptureFixture) -> None:
    (etc / "passwd").write_text("no-colon-here\n")
    path = write(etc, '[auth]\npassword_file = "passwd"\nallow_insecure = true\n'
                      '[delivery]\nmaildir = "md"\n')
    assert cli.main(["-c", str(path), "--check"]) == 2
    assert capsys.readouterr().err == (f'forksmtp: {path}: auth.password_file = "passwd": {etc / "passwd"}: '
                                       "line 1: expected user:hash\n")


def test_cli_errors(etc: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--check", "--log-level", "loud"]) == 2
    assert "command line: log.level" in capsys.readouterr().err
    assert cli.main(["--workers", "many"]) == 2  # argparse usage error
    assert cli.main(["-c", str(etc / "missing.toml")]) == 2  # never reaches the arbiter
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("forksmtp ")


def test_overrides_from_flags() -> None:
    args = cli._parser().parse_args(["--listen", "25", "--listen", "26", "--log-level", "debug"])
    assert cli.overrides_from(args) == {"server.listen": ["25", "26"], "log.level": "debug"}


@pytest.mark.parametrize("argv, expected", [
    (["passwd", "bob"], (["bob"], None)),
    (["passwd", "bob", "-f", "pw"], (["bob", "-f", "pw"], None)),
    (["-c", "x.toml", "passwd", "bob"], (["bob"], "x.toml")),
    (["--config=x.toml", "passwd", "bob"], (["bob"], "x.toml")),
    (["-cx.toml", "passwd", "bob"], (["bob"], "x.toml")),
    (["passwd", "bob", "--config", "y.toml"], (["bob"], "y.toml")),
    (["--check"], None),
    (["--hostname", "passwd"], None),
    ([], None),
])
def test_passwd_subcommand_is_recognised(argv: list[str], expected: object) -> None:
    assert cli._split_passwd(argv) == expected


def test_an_internationalised_local_domain_is_local_in_either_spelling(etc: Path) -> None:
    """An SMTPUTF8 client may write a domain as its U-label or as its A-label; the
    config may list either (RFC 6531 3.2): both are local, postmaster included."""
    from helpers import new_session, replies

    for listed in ("xn--4ca.test", "\u00e4.test", "\u00c4.TEST"):
        path = write(etc, f'[delivery]\nlocal_domains = ["{listed}", "stra\u00dfe.test"]\n')
        domains = load_config(str(path)).delivery.local_domains
        assert {"xn--4ca.test", "\u00e4.test"} <= set(domains)
        assert "strasse.test" not in domains  # IDNA 2003's mapping would name another domain
        for rcpt in ("postmaster@\u00e4.test", "postmaster@xn--4ca.test", "bob@\u00c4.test"):
            s = new_session(local_domains=domains)
            assert replies(s, ["EHLO c", "MAIL FROM:<a@b.test> SMTPUTF8", f"RCPT TO:<{rcpt}>"])[2] == "250 2.1.5"


def test_a_mailbox_of_an_internationalised_domain_gets_its_mail_in_either_spelling(etc: Path) -> None:
    """Accepted in either spelling, so routed in either: mail for alice@<A-label> goes to
    alice's Maildir, not the catch-all; postmaster's too."""
    from forksmtp.delivery import Router

    for spelled in ("\u00e4.test", "xn--4ca.test"):
        path = write(etc, f'[delivery]\nmaildir = "catch"\nlocal_domains = ["{spelled}"]\n'
                          f'[mailboxes]\n"alice@{spelled}" = "alice"\n"postmaster@{spelled}" = "pm"\n')
        d = load_config(str(path)).delivery
        router = Router(d.maildir, d.mailboxes, local_domains=d.local_domains)
        for domain in ("\u00e4.test", "xn--4ca.test", "\u00c4.TEST"):
            assert router.route([f"alice@{domain}"]) == {str(etc / "alice"): [f"alice@{domain}"]}
            assert router.route([f"postmaster@{domain}"]) == {str(etc / "pm"): [f"postmaster@{domain}"]}
        assert router.route(["bob@xn--4ca.test"]) == {str(etc / "catch"): ["bob@xn--4ca.test"]}
    # Both spellings written, naming two Maildirs: one mailbox cannot have two.
    path = write(etc, '[delivery]\nlocal_domains = ["\u00e4.test"]\n'
                      '[mailboxes]\n"alice@\u00e4.test" = "a"\n"alice@xn--4ca.test" = "b"\n')
    with pytest.raises(ConfigError, match="the same mailbox as alice@\u00e4.test"):
        load_config(str(path))


def test_a_config_loads_again_after_its_working_directory_is_removed(etc: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A deploy that replaces the release directory the daemon was started in: every
    reload of the unchanged file failed with "[Errno 2] No such file or directory",
    naming nothing, for the keys left at their defaults needed no directory.  Only a
    relative path needs it, and that one is refused by name."""
    gone = tmp_path / "release"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    maildir = etc / "Maildir"
    path = write(etc, f'[delivery]\nmaildir = "{maildir}"\n')
    assert load_config(str(path)).delivery.maildir == str(maildir)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {"delivery.maildir": "relative/Maildir"})
    assert info.value.key == "delivery.maildir" and "working directory" in info.value.problem


# -- a bracketed hostname, shared Maildirs, defaults, A-labels, paths root cannot write -------

@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The built-in ./Maildir default is checked relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def immutable(path: Path) -> None:
    """chattr +i: the one way to make os.access() say "not writable" to root."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")


def mutable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("name", ["[192.0.2.1x", "[192.0.2.1]]", "[]", "[ 192.0.2.1]"])
def test_a_hostname_that_is_no_bracketed_literal_is_refused(cwd, name):
    """_check_literal reads what stands between the first and the last octet: without
    is_address_literal's own grammar check "[192.0.2.1x" would pass as [192.0.2.1]."""
    with pytest.raises(ConfigError, match="address literal") as info:
        load_config(None, {"server.hostname": name})
    assert info.value.key == "server.hostname"


def test_two_addresses_sharing_a_maildir_are_both_named(cwd):
    box = str(cwd / "shared")
    (cwd / "c.toml").write_text(f'[mailboxes]\n"a@x.test" = "{box}"\n"b@x.test" = "{box}"\n')
    cfg = load_config(str(cwd / "c.toml"))
    assert config.maildir_keys(cfg.delivery) == {box: 'mailboxes."a@x.test", "b@x.test"',
                                                cfg.delivery.maildir: "delivery.maildir"}


def test_a_key_left_at_its_default_is_named_with_the_value_it_resolved_to(cwd):
    cfg = load_config(None)
    error = config.key_error(cfg, "delivery.maildir", None, "boom")
    # A value over 76 characters is shown cut (test_a_long_value_is_shown_cut_to_one_line).
    assert str(error).startswith('built-in defaults: delivery.maildir = "' + cfg.delivery.maildir[:76]), str(error)
    assert str(error).endswith(": boom") and cfg.delivery.maildir == str(cwd / "Maildir")


@pytest.mark.parametrize("domain", ["xn--a.test", "a.xn--.test", "xn--zz-.test"])
def test_a_local_domain_with_a_broken_a_label_is_kept_in_its_one_spelling(cwd, domain):
    cfg = load_config(None, {"delivery.local_domains": [domain]})
    assert cfg.delivery.local_domains == (domain,)


def test_a_pidfile_path_that_cannot_be_looked_at_now_is_left_to_the_start(cwd):
    os.symlink("loop.pid", cwd / "loop.pid")  # stat: ELOOP, not "no such file"
    assert load_config(None, {"server.pidfile": str(cwd / "loop.pid")}).server.pidfile == str(cwd / "loop.pid")


def test_an_immutable_log_file_or_maildir_parent_is_not_writable_even_for_root(cwd):
    """test_maildir_under_a_read_only_directory is skipped as root; chattr +i bites root too."""
    log, ro = cwd / "forksmtp.log", cwd / "ro"
    log.write_text("")
    ro.mkdir()
    immutable(log)
    try:
        with pytest.raises(ConfigError, match="is not writable") as info:
            load_config(None, {"log.file": str(log)})
        assert info.value.key == "log.file"
    finally:
        mutable(log)
    immutable(ro)
    try:
        for key, value in (("log.file", ro / "new.log"), ("delivery.maildir", ro / "Maildir")):
            with pytest.raises(ConfigError, match=f"{ro}.* is not writable") as info:
                load_config(None, {key: str(value)})
            assert info.value.key == key
    finally:
        mutable(ro)
