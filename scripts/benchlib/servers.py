"""Starting the SMTP systems (forksmtp, the aiosmtpd peer, pyfloor, smtp-sink) and waiting
for them."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import psutil

from .constants import FLOOR, HOST, QUIT, SINK, SINK_ENV, SINK_PATHS, START_TIMEOUT, MiB
from .context import Bench
from .helpers import port_is_free

FORKSMTP_START = 4  # forksmtp's built-in server.workers: the pool it starts with
# The peer runs as `python scripts/bench.py serve-aiosmtpd ...`: the entry script sits in
# the directory above this package (the original, single-file script used its own __file__).
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "bench.py")
#: The checkout the bench script belongs to: the forksmtp it runs unless --forksmtp-cmd
#: names another.
REPO_ROOT = os.path.dirname(os.path.dirname(BENCH_SCRIPT))


def default_forksmtp_cmd() -> list[str]:
    """This checkout's forksmtp, named first on PYTHONPATH rather than found in the
    caller's working directory (the servers run in the bench's own, see start_server);
    the caller's PYTHONPATH follows it."""
    path = os.pathsep.join(filter(None, (REPO_ROOT, os.environ.get("PYTHONPATH"))))
    return ["env", f"PYTHONPATH={path}", sys.executable, "-m", "forksmtp"]


# --------------------------------------------------------------------------- smtp-sink

def find_smtp_sink() -> str | None:
    """The smtp-sink binary: the one $FORKSMTP_BENCH_SMTP_SINK names (and only that one,
    when set), else the one on PATH, else /usr/sbin/smtp-sink; None when there is none."""
    named = os.environ.get(SINK_ENV)
    candidates = [named] if named else [shutil.which("smtp-sink"), *SINK_PATHS]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def sink_missing_note() -> str:
    named = os.environ.get(SINK_ENV)
    where = (f"${SINK_ENV} ({named}) is not an executable file" if named else
             f"no smtp-sink on PATH, at {', '.join(SINK_PATHS)} or in ${SINK_ENV}")
    return f"{SINK} skipped: {where} (Debian: the postfix package)"


def sink_env(binary: str) -> dict[str, str] | None:
    """An unpacked (not installed) Postfix keeps its shared libraries in ../lib/postfix
    beside the binary, not in the /usr/lib/postfix its RUNPATH names: point the loader
    there. None (inherit the environment) for an installed Postfix."""
    bindir = os.path.dirname(os.path.realpath(binary))
    libdir = os.path.normpath(os.path.join(bindir, "..", "lib", "postfix"))
    if libdir == "/usr/lib/postfix" or not os.path.isdir(libdir):
        return None
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, (libdir, env.get("LD_LIBRARY_PATH"))))
    return env


def sink_argv(binary: str, port: int, sessions: int) -> list[str]:
    """smtp-sink as a plain fast receiver: ESMTP and PIPELINING announced (its defaults),
    250 to every command, no -d/-D (nothing written), no -c (no counter output per
    message). -m lifts its default cap of 256 simultaneous connections, which would
    leave the excess queued in the kernel; the last argument is the listen backlog."""
    conns = str(max(1024, 2 * sessions))
    user = ["-u", "nobody"] if os.geteuid() == 0 else []   # it refuses root without -u
    return [binary, "-4", *user, "-m", conns, "-h", "bench-sink.example.test",
            f"{HOST}:{port}", conns]


# --------------------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: str

    def tree(self) -> list[psutil.Process]:
        master = psutil.Process(self.popen.pid)
        return [master] + master.children(recursive=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def start_server(bench: "Bench", name: str, argv: list[str], port: int,
                 env: dict[str, str] | None = None) -> Server:
    """Start a server in its own process group (so it can be killed whole), log to a file.

    Every server runs in the bench's work directory: ``python -m`` puts its working
    directory ahead of PYTHONPATH, so one started where the bench was (a checkout)
    imported that checkout's forksmtp whatever --forksmtp-cmd's PYTHONPATH named, and
    an A/B of two checkouts ran one of them twice."""
    if not port_is_free(port):
        raise RuntimeError(f"port {HOST}:{port} is taken: refusing to benchmark whatever "
                           f"listens there (choose another --port-base)")
    log_path = os.path.join(bench.logs, f"{name}-{next(bench.server_seq)}.log")
    with open(log_path, "wb") as logf:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                 cwd=bench.root)
    bench.reaper.servers.append(popen)
    return Server(name, popen, port, log_path)


def probe_banner(port: int, timeout: float = 2.0) -> bool:
    """True when the server answers a connection with a 220 greeting."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            banner = sock.recv(512)
            sock.sendall(QUIT)
            return banner.startswith(b"220")
    except OSError:
        return False


def wait_ready(server: Server, min_procs: int) -> None:
    """Wait for the 220 greeting and for min_procs processes (master + workers) to exist."""
    deadline = time.monotonic() + START_TIMEOUT
    while not probe_banner(server.port):
        if server.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} did not start (exit status "
                               f"{server.popen.poll()}); its log ends with:\n"
                               f"{server.log_tail()}")
        time.sleep(0.1)
    while len(server.tree()) < min_procs and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)   # let the greeting probe's session end before the CPU baseline


def forksmtp_config(path: str, workers: int | None, ceiling: int, sessions: int, fsync_on: bool,
                    max_size: int, log_level: str) -> str:
    """A config raising the pool and connection ceilings above the benchmark's load.
    ``workers`` None: the pool starts at the built-in size and sizes itself up to
    ``ceiling``, as an operator's does."""
    cap = 2 * max(ceiling, sessions) + 20
    start = "" if workers is None else f"workers = {workers}\n"
    text = (f"[server]\n{start}max_workers = {ceiling}\n"
            f"max_connections = {cap}\nmax_connections_per_ip = {cap}\n"
            f"graceful_timeout = 5\n\n"
            f"[limits]\nmax_message_size = {max_size}\n\n"
            f"[delivery]\nfsync = {'true' if fsync_on else 'false'}\n\n"
            f"[log]\nlevel = \"{log_level}\"\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def start_system(bench: "Bench", system: str, fsync_on: bool, sessions: int,
                 maildir: str, workers: int | None = None) -> Server:
    """Start forksmtp, the peer, pyfloor (each storing into maildir) or smtp-sink (storing
    nothing), each on its own port; wait until ready."""
    args = bench.args
    if system == "forksmtp":
        ceiling = (workers or sessions + args.spare_workers) + 8
        server = start_forksmtp(bench, fsync_on, sessions, maildir, workers, ceiling)
        min_procs = min(workers or FORKSMTP_START, ceiling) + 1
    elif system == SINK:
        port, binary = args.port_base + 2, bench.smtp_sink or SINK
        server = start_server(bench, system, sink_argv(binary, port, sessions), port,
                              env=sink_env(binary))
        min_procs = 1
    elif system == FLOOR:
        workers = workers or sessions + args.spare_workers
        argv = [sys.executable, BENCH_SCRIPT, f"serve-{FLOOR}",
                "--listen", f"{HOST}:{args.port_base + 3}", "--maildir", maildir,
                "--workers", str(workers)] + ([] if fsync_on else ["--no-fsync"])
        server, min_procs = start_server(bench, system, argv, args.port_base + 3), workers + 1
    else:
        argv = [sys.executable, BENCH_SCRIPT, "serve-aiosmtpd",
                "--listen", f"{HOST}:{args.port_base + 1}", "--maildir", maildir,
                "--threads", str(args.peer_threads)] + ([] if fsync_on else ["--no-fsync"])
        server, min_procs = start_server(bench, system, argv, args.port_base + 1), 1
    wait_ready(server, min_procs)
    return server


def start_forksmtp(bench: "Bench", fsync_on: bool, sessions: int, maildir: str,
                   workers: int | None, ceiling: int) -> Server:
    args = bench.args
    cfg = forksmtp_config(os.path.join(bench.root, f"forksmtp-{next(bench.server_seq)}.toml"),
                          workers, ceiling, sessions, fsync_on,
                          max(10 * MiB, 2 * args.big_mib * MiB), args.server_log_level)
    argv = bench.forksmtp_cmd + ["-c", cfg, "--listen", f"{HOST}:{args.port_base}",
                                 "--maildir", maildir]
    return start_server(bench, "forksmtp", argv, args.port_base)
