"""The conventional Maildir delivery with no SMTP at all (loop and loop-tmpfile)."""
from __future__ import annotations

import os
import resource
import time

from .maildir import maildir_name, write_all
from .messages import body_for_size, message_head, stored_trace, to_lf

# --------------------------------------------------------------------------- the loop

def loop_prepare(maildir: str, ids: list[str], size: int, fsync_on: bool,
                 tmpfile: bool) -> dict:
    body = to_lf(body_for_size(size))
    return {"maildir": maildir, "fsync": fsync_on, "tmpfile": tmpfile, "ids": ids,
            # As big as a server's file of the same message: its trace fields included.
            "messages": [stored_trace(i) + to_lf(message_head(i)) + body for i in ids]}


def deliver_named(tmpdir: str, newdir: str, new_fd: int, data: bytes, seq: int,
                  fsync_on: bool) -> None:
    """The textbook Maildir delivery: named file in tmp/, fsync, rename, fsync new/."""
    name = maildir_name(seq, len(data))
    tmp_path = os.path.join(tmpdir, name)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        if fsync_on:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp_path, os.path.join(newdir, name))
    if fsync_on:
        os.fsync(new_fd)


def deliver_tmpfile(tmpdir: str, newdir: str, new_fd: int, data: bytes, seq: int,
                    fsync_on: bool) -> None:
    """Unnamed inode in tmp/, fsync, linkat into new/ (never overwrites), fsync the file
    again (its first fsync wrote a link count of 0, which a directory's fsync does not
    update where no journal ties the two: see forksmtp's tests/test_power_loss.py), fsync
    new/."""
    fd = os.open(tmpdir, os.O_WRONLY | os.O_TMPFILE, 0o600)
    try:
        write_all(fd, data)
        if fsync_on:
            os.fsync(fd)
        # CPython calls plain link(2) -- which does not follow the /proc magic link and
        # fails with EXDEV -- unless a dir fd is given; with one it calls linkat(2) with
        # AT_SYMLINK_FOLLOW, which links the unnamed inode.
        os.link(f"/proc/self/fd/{fd}", maildir_name(seq, len(data)), dst_dir_fd=new_fd,
                follow_symlinks=True)
        if fsync_on:
            os.fsync(fd)
    finally:
        os.close(fd)
    if fsync_on:
        os.fsync(new_fd)


def loop_run(state: dict) -> dict:
    """Deliver every prepared message; time each one and this process's CPU."""
    tmpdir = os.path.join(state["maildir"], "tmp")
    newdir = os.path.join(state["maildir"], "new")
    deliver = deliver_tmpfile if state["tmpfile"] else deliver_named
    new_fd = os.open(newdir, os.O_RDONLY | os.O_DIRECTORY)
    lat, ids_done = [], 0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        for seq, data in enumerate(state["messages"]):
            s = time.perf_counter()
            deliver(tmpdir, newdir, new_fd, data, seq, state["fsync"])
            lat.append(time.perf_counter() - s)
            ids_done += 1
    finally:
        os.close(new_fd)
    t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    return {"done": state["ids"][:ids_done], "lat": lat, "t_start": t0, "t_end": t1,
            "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
            "nvcsw": r1.ru_nvcsw - r0.ru_nvcsw, "nivcsw": r1.ru_nivcsw - r0.ru_nivcsw}
