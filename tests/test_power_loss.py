"""What the disk holds at the moment of the 250: a power cut, simulated.

A small ext4 filesystem is made in a file and mounted through a loop device.  Messages
are committed into a Maildir on it with the server's own storage code, and the moment
``commit_all`` returns (when the worker would send its 250) the backing file is copied:
the copy is exactly what the filesystem had written to its device by then, and nothing
of what was still dirty in memory.  ``e2fsck -fy`` then repairs the copy as a boot after
a power cut would, and every committed message must be in ``new/``, whole.

ext4 without a journal is the demanding case: there a directory's fsync persists the
new entry but not the inode it points to.  An ``O_TMPFILE`` inode is written by its
first fsync with a link count of 0, so unless the file is fsynced again after its
link, fsck takes it for deleted and clears the entry: an acknowledged message lost.

Needs root, a free loop device and e2fsprogs; skipped otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from forksmtp import maildir
from forksmtp.maildir import Maildir, commit_all
from helpers import cannot_loop_mount, loop_ext4
from helpers import run_tool as run

TOOLS = ("losetup", "mkfs.ext4", "e2fsck", "debugfs", "mount", "umount")
MESSAGES = 5
#: Files made before the deliveries, so that the messages' inodes sit in other blocks of
#: the inode table than new/'s: a directory's own inode block, written by its fsync,
#: would otherwise carry a neighbouring file's inode to disk by chance.
FILLERS = 48


pytestmark = pytest.mark.skipif(bool(cannot_loop_mount(TOOLS)), reason=cannot_loop_mount(TOOLS) or "ok")


@pytest.fixture(params=["no journal", "journal"])
def ext4(request, tmp_path):
    """A mounted ext4 filesystem: (mount point, backing file)."""
    features = ["-O", "^has_journal"] if request.param == "no journal" else []
    with loop_ext4(tmp_path, *features) as (mnt, image, _):
        yield mnt, image


def fsck_copy(image: Path, copy: Path) -> str:
    """The device as it was, repaired as a boot after a power cut would repair it."""
    shutil.copyfile(image, copy)  # through the image's page cache: what the loop device got
    done = run("e2fsck", "-fy", str(copy), check=False)
    assert done.returncode < 4, done.stdout + done.stderr  # 0 clean, 1 fixed; 4+ failure
    return done.stdout


def listing(copy: Path, directory: str) -> dict[str, int]:
    """name -> size of the regular files in ``directory`` of the image."""
    out = run("debugfs", "-R", f"ls -l {directory}", str(copy)).stdout
    files = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1].startswith("100"):  # a regular file's mode
            files[fields[-1]] = int(fields[5])
    return files


@pytest.mark.parametrize("mode", ["tmpfile", "named"])
def test_every_acknowledged_message_survives_a_power_cut(ext4, tmp_path, mode):
    mnt, image = ext4
    md = Maildir(str(mnt / "Maildir"))
    if mode == "named":
        md.use_tmpfile = False
    for i in range(FILLERS):
        (mnt / "Maildir" / "cur" / f"filler{i}").write_bytes(b"")
    os.sync()  # the Maildir and the fillers are on the device; only the deliveries are not
    bodies = {}
    for i in range(MESSAGES):
        delivery = md.begin()
        delivery.write(b"message %d\n" % i + b"x" * 3000)
        (path,) = commit_all([delivery])
        last = os.path.basename(path)
        bodies[last] = 3000 + len(b"message %d\n" % i)
    md.close()
    report = fsck_copy(image, tmp_path / "after-cut.img")  # the cut, right after the last 250
    stored = listing(tmp_path / "after-cut.img", "/Maildir/new")
    assert stored == bodies, report
    text = run("debugfs", "-R", f"cat /Maildir/new/{last}", str(tmp_path / "after-cut.img")).stdout
    assert text.startswith(f"message {MESSAGES - 1}\n") and len(text) == bodies[last]


def test_a_copy_rolled_back_after_a_451_stays_gone_after_a_power_cut(ext4, tmp_path, monkeypatch):
    """A message for two Maildirs on two disks: the first copy is linked and its new/
    fsynced, then the second disk fails the fsync of its new/ (EIO, injected: the one
    fault here that is not real).  The client is told 451 and will send the message
    again, so the first copy, unlinked in the rollback, must stay gone after a power cut
    right then, or that Maildir gets the message twice."""
    mnt, image = ext4
    first = Maildir(str(mnt / "Maildir"))
    second = Maildir(str(tmp_path / "other-disk"))
    for i in range(FILLERS):
        (mnt / "Maildir" / "cur" / f"filler{i}").write_bytes(b"")
    os.sync()
    deliveries = [first.begin(), second.begin()]
    for delivery in deliveries:
        delivery.write(b"x" * 3000)
    failing = os.stat(second.new).st_ino
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == failing:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(maildir.os, "fsync", fsync)
    with pytest.raises(OSError):
        commit_all(deliveries)
    monkeypatch.undo()
    first.close()
    second.close()
    assert os.listdir(first.new) == []
    report = fsck_copy(image, tmp_path / "after-cut.img")  # the cut, right after the 451
    assert listing(tmp_path / "after-cut.img", "/Maildir/new") == {}, report


def subdirectories(copy: Path, directory: str) -> set[str]:
    out = run("debugfs", "-R", f"ls -l {directory}", str(copy)).stdout
    return {fields[-1] for fields in map(str.split, out.splitlines())
            if len(fields) >= 6 and fields[1].startswith("40")} - {".", ".."}


def test_a_maildir_made_survives_a_power_cut(ext4, tmp_path):
    """Every directory ``make`` creates is on the device when it returns: its own inode
    (the fsync of its parent persists only the entry that names it) and that entry."""
    mnt, image = ext4
    (mnt / "spool").mkdir()
    for i in range(FILLERS):  # the new directories' inodes in other blocks than spool's
        (mnt / "spool" / f"filler{i}").write_bytes(b"")
    os.sync()
    Maildir(str(mnt / "spool" / "deep" / "Maildir"))
    copy = tmp_path / "after-cut.img"
    report = fsck_copy(image, copy)  # the cut, right after the Maildir was made
    expected = {"/spool/deep": {"Maildir"}, "/spool/deep/Maildir": {"tmp", "new", "cur"}}
    for directory, names in expected.items():
        assert subdirectories(copy, directory) == names, (directory, report)
