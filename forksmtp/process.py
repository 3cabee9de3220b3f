"""Operating-system plumbing: process titles, the pidfile and the files the master
reads or replaces, privilege drop, the parent-death pipe and readiness notification."""

from __future__ import annotations

import codecs
import errno
import fcntl
import grp
import os
import pwd
import signal
import socket
import stat
import tempfile
from typing import Callable

_setproctitle: Callable[[str], None] | None = None
try:
    import setproctitle as _titles
    _setproctitle = _titles.setproctitle
except ImportError:  # titles are a convenience, never a reason not to run
    pass


# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Have glibc's malloc serve blocks below ``mmap_threshold`` from the heap, and keep
    up to ``trim_threshold`` octets of free memory at the top of the heap instead of
    returning it to the kernel.  Both are process-wide settings that fork() inherits,
    so the master sets them once for every worker.  False where the C library has no
    mallopt() (musl, for one): the server then keeps its smaller reads."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


_PR_SET_PDEATHSIG = 1  # prctl(2), from <linux/prctl.h>


def continue_when_orphaned() -> bool:
    """Have the kernel send this process SIGCONT when its parent dies.  A worker stopped
    (SIGSTOP, an operator's Ctrl-Z) when its master is killed would otherwise stay stopped
    for good, holding the listening sockets, so that the port cannot be bound again, and
    perhaps the admission lock; continued, it finds the master's death pipe closed as
    every other worker does, and exits.  A running worker is not disturbed: SIGCONT has
    no handler, so no system call is interrupted.  Call it first thing after fork(),
    and again after any privilege drop, which clears the setting.  False where there
    is no prctl() (not Linux)."""
    try:
        import ctypes
        return ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGCONT) == 0
    except (ImportError, OSError, AttributeError):
        return False


def batch_scheduling() -> bool:
    """Put this process under SCHED_BATCH: the kernel then never lets it preempt the task
    running on a CPU when it wakes up; it waits for that task to block or to use up its
    time slice.  CPU time is still shared by weight, exactly as for normal tasks, so
    nothing starves.  A worker wakes once per client request and runs for a fraction of
    a millisecond: without the flag each wake-up tends to preempt the client or another
    worker mid-burst, and the switches and cold caches cost more than the wait saved.
    smtp-source, 4 KiB messages, pairs of alternating runs: 50 sessions durable, -3 to
    +7 % msgs/s (+4.5 % over 7 pairs); 10 sessions +6.5 to +10 %; 1 session +3 to +6.5 %;
    50 sessions with fsync off +9 to +21 %.  False where the system refuses it (no
    SCHED_BATCH, or a seccomp filter): the worker then runs as before."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15, ``SIGRTMIN+6`` for a real-time signal (which has no name in
    the signal module), ``signal 99`` for anything else: any number wait(2) reports."""
    try:
        return signal.Signals(number).name
    except ValueError:
        pass
    if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
        return f"SIGRTMIN+{number - signal.SIGRTMIN}"
    return f"signal {number}"


#: How much more likely than its master a worker is to be chosen by the OOM killer.
OOM_WORKER_BONUS = 200


def oom_first(bonus: int = OOM_WORKER_BONUS) -> bool:
    """Make this process the OOM killer's choice before its parent: ``bonus`` points more
    than the oom_score_adj it inherited (at most 1000).  The master's RSS is a little
    above a worker's, so under memory pressure the kernel picked the master first and
    every session ended with it; a worker's death costs one session and loses no mail
    (nothing is acknowledged before it is on disk).  Raising one's own value needs no
    privilege.  False where there is no /proc/self/oom_score_adj or it is refused."""
    try:
        with open("/proc/self/oom_score_adj", "r+b", buffering=0) as f:
            value = min(1000, int(f.read()) + bonus)
            f.seek(0)
            f.write(b"%d" % value)
    except (OSError, ValueError):
        return False
    return True


def set_title(title: str) -> None:
    if _setproctitle is not None:
        _setproctitle(title)


class PidfileError(Exception):
    pass


PID_MAX_LIMIT = 1 << 22  # Linux's highest possible pid_max


def _pid_in(path: str) -> int:
    """The pid a pidfile holds, 0 for none or junk.  Read as the TLS files are
    (open_regular): a FIFO put there would hold the master at its start, or at a
    reload, until something wrote into it."""
    try:
        pid = int(read_regular(path, 63).strip() or 0)
    except ValueError:
        return 0
    return pid if 0 < pid <= PID_MAX_LIMIT else 0  # os.kill() overflows past it


#: pidfile path -> a descriptor of the file there, locked (flock) for as long as this
#: master holds it.
_pidfiles: dict[str, int] = {}

#: Tries at putting our pidfile in place while other starts race for the same path.
_PIDFILE_TRIES = 20


def write_pidfile(path: str) -> None:
    """Create the pidfile and hold it, refusing when another master holds it or a live
    master is named in it, and refusing to replace anything but a regular file (a FIFO,
    a socket, or a device such as /dev/null, which the rename would take out of /dev).

    Held means locked: the file is written whole beside the path and locked before it
    is linked or renamed into place, and a file already there is replaced only while
    its own lock is held.  Reading the old pid and then renaming left a gap, in which
    two masters started at once both found no pid and both ran, one of them named
    nowhere (as Postfix's master, the lock is what a start tests)."""
    remove_pidfile(path)  # one we hold already is written anew
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file nobody else has seen yet
        for _ in range(_PIDFILE_TRIES):
            if _put_in_place(path, tmp):
                break
        else:
            raise PidfileError(f"pidfile {path}: replaced by others {_PIDFILE_TRIES} times while "
                               "this start tried to take it: not replaced")
    except BaseException as exc:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):  # else the message names the temporary file
            raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from exc
        raise
    _pidfiles[path] = fd


def _put_in_place(path: str, tmp: str) -> bool:
    """Put ``tmp`` (locked, holding our pid) at ``path``; False when the file there
    changed meanwhile and the caller should look again."""
    try:
        os.link(tmp, path)  # nothing there: ours in one step
    except FileExistsError:
        pass
    else:
        os.unlink(tmp)
        return True
    try:
        old_fd = open_regular(path)
    except FileNotFoundError:
        return False  # removed since the link failed
    except OSError as exc:
        raise PidfileError(f"pidfile {path}: {exc.strerror or exc}: not replaced") from None
    try:
        try:
            fcntl.flock(old_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PidfileError(f"pidfile {path} is held by running process {_pid_in(path) or '?'}") from None
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        was = os.fstat(old_fd)
        if (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino):
            return False  # replaced before we locked it: the lock says nothing of the new one
        old = _pid_in(path)
        if old and old != os.getpid() and _alive(old) and _may_be_master(old):
            raise PidfileError(f"pidfile {path} is held by running process {old}")
        os.rename(tmp, path)  # with the old file's lock held, so no other start moves it
        return True
    finally:
        os.close(old_fd)


def _may_be_master(pid: int) -> bool:
    """Whether the live ``pid`` a pidfile nobody holds names may be a master all the
    same: one whose lock did not take (a file system that ignores flock), seen by its
    title, or any process whose title cannot be read.  Any other process has only
    reused the pid of a master that died (a crash, a reboot with the pidfile on a disk):
    refusing it would keep every start from the pidfile, and a service manager would
    restart in vain."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"forksmtp: master" in f.read(4096)
    except OSError:
        return True


def release_pidfiles_in_child() -> None:
    """A worker closes its copies of the pidfiles' descriptors: the lock belongs to the
    master alone, and must go with it, not with the last worker."""
    for fd in _pidfiles.values():
        os.close(fd)
    _pidfiles.clear()


def refuse_non_regular(path: str) -> None:
    """NotRegularFile unless ``path`` (through a symlink) is a regular file or nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path)


def write_atomic(path: str, text: str, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``text``: readers see the old file or the new one, never half
    of one.  The temporary file beside it gets a random name and is created exclusively,
    never through a symlink (``mkstemp``): a predictable name would let anyone who can
    write the directory plant a file of a wider mode, or a symlink that has root
    overwrite another file.  ``owner``: the (uid, gid) the file must keep; failing to
    give it that is an error, not a silent change of who may read it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        if owner is not None:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != owner:
                os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class NotRegularFile(OSError):
    """A FIFO, a socket, a device or a directory where a regular file belongs."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EINVAL, "not a regular file", path)


def open_regular(path: str) -> int:
    """A descriptor of the regular file at ``path`` (through symlinks), read-only.

    Opened without blocking: a FIFO put where a certificate, a key or the password file
    belongs would otherwise hold the opener until something writes into it, and the
    opener is the master, reloading (no signal handled, no worker reaped meanwhile).
    Anything but a regular file raises OSError (EINVAL), as a device would feed the
    reader without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, limit: int) -> bytes:
    """At most ``limit`` + 1 octets of the regular file at ``path`` (open_regular): more
    than ``limit`` tells the caller the file is larger than it takes, without reading
    the rest (/dev/zero, or a file that is not what the operator meant)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read(limit + 1)


def remove_pidfile(path: str) -> None:
    """Remove the pidfile this master holds at ``path``, if the file there is still the
    one it wrote, and let go of its lock."""
    fd = _pidfiles.pop(path, -1)
    if fd < 0:
        return
    try:
        now, ours = os.stat(path), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
            os.unlink(path)  # before the lock goes: a start waiting on it finds no file
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Is ``pid`` a running process?  A zombie is not: a master killed with SIGKILL stays
    one until its parent reaps it, and a parent that is slow to (a container's shell as
    process 1) would keep every restart from taking its pidfile."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _state(pid) != b"Z"


def _state(pid: int) -> bytes:
    """The one-letter state of ``pid`` in ``/proc/PID/stat``; b"" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return b""
    # "pid (comm) S ...": comm may hold spaces and parentheses, so the state is the
    # first field after the last ")".
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]


def is_stopped(pid: int) -> bool:
    """Is ``pid`` stopped (SIGSTOP, job control) or held by a tracer (a debugger)?
    Read from ``/proc/PID/stat``; False when it cannot be read."""
    return _state(pid) in (b"T", b"t")


def waits_on_disk(pid: int) -> bool:
    """Is ``pid`` in an uninterruptible wait ("D"), as a process is while its fsync, or a
    write the kernel throttles, waits for the disk?  False when it cannot be read."""
    return _state(pid) == b"D"


def parent_death_pipe() -> tuple[int, int]:
    """(read end for workers, write end the master keeps open until it dies).

    The kernel closes the master's write end when it dies however it dies (even
    SIGKILL), so every worker polling the read end sees EOF within its next wait.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w


def resolve_ids(user: str, group: str) -> tuple[int | None, int | None]:
    uid = gid = None
    if user:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
    return uid, gid


def group_alone_warning(user: str, group: str) -> str:
    """``server.group`` without ``server.user``: the workers take the group and stay
    root, which an operator who meant to drop privileges would not know from a
    ``--check`` that says OK, nor from the start."""
    if group and not user and os.geteuid() == 0:
        return f'server.group = "{group}" without server.user: the workers run as root (uid 0), in that group'
    return ""


#: The codecs a session may use beyond those built into the interpreter (UTF-8, ASCII,
#: Latin-1): the escapes of logged text (sessionlog, connection), the Punycode of an
#: internationalised label (commands) and IDNA (trace).
SESSION_CODECS = ("unicode_escape", "punycode", "idna")


def load_session_codecs() -> None:
    """Look up SESSION_CODECS in the master, before it forks: a worker runs as
    server.user, who may be unable to read the interpreter's library (a Python built
    under /root), and a codec first looked up there would crash it at that session, and
    at every retry of the same mail.  Looked up once, a codec stays in the interpreter's
    cache, which the workers inherit."""
    for name in SESSION_CODECS:
        codecs.lookup(name)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become uid/gid (after the sockets are bound), group first, for good."""
    if gid is not None:
        # Always, not only where the group changes: a master run with supplementary
        # groups (root's login's disk, adm, shadow) would hand them to workers whose
        # group is its own.
        if os.geteuid() == 0:
            os.setgroups([gid])
        if os.getgid() != gid:
            os.setgid(gid)
    if uid is not None and os.getuid() != uid:
        os.setuid(uid)


def writable_by(st: os.stat_result, uid: int, gid: int, need: int = 0o3) -> bool:
    """Whether a directory's mode lets ``uid``, in the one group ``gid`` (as workers run:
    drop_privileges keeps no other), make entries in it (``need`` 0o3: write and
    search), or pass through it (0o1).  ACLs are not read."""
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & need == need


def untrusted_link(st: os.stat_result) -> bool:
    """Whether ``st`` (an lstat) is a symlink that neither root nor this process's user
    made.  Whoever can write its directory could point it at any file root may write,
    so the master, as root, follows none (the log, a Maildir's path), and neither does
    ``forksmtp passwd`` (the password file)."""
    return stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.geteuid())


def chown_dir(name: str, uid: int | None, gid: int | None, dir_fd: int) -> None:
    """Give a Maildir's directory, ``name`` in ``dir_fd`` ("." for that directory
    itself), to the workers' uid/gid, so that workers can write there after the drop;
    never through a symlink (one may be swapped in meanwhile)."""
    if uid is None and gid is None:
        return
    os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid, dir_fd=dir_fd, follow_symlinks=False)


def sd_notify(message: str) -> None:
    """systemd readiness (Type=notify); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
