"""Maildir file names and directories, and the check that stored = acknowledged."""
from __future__ import annotations

import os
import socket
import time
from collections import Counter

from .constants import MESSAGE_ID_RE

# --------------------------------------------------------------------------- Maildir

_HOSTNAME = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def maildir_name(seq: int, size: int) -> str:
    """A unique Maildir file name: <secs>.M<usecs>P<pid>Q<seq>.<host>,S=<size>."""
    secs, usecs = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{secs}.M{usecs}P{os.getpid()}Q{seq}.{_HOSTNAME},S={size}"


def make_maildir(path: str) -> str:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    return path


def stored_ids(maildir: str) -> tuple[int, Counter]:
    """Count files in new/ and collect the Message-ID (our unique id) of each."""
    newdir = os.path.join(maildir, "new")
    names = os.listdir(newdir)
    ids: Counter = Counter()
    for name in names:
        with open(os.path.join(newdir, name), "rb") as f:
            match = MESSAGE_ID_RE.search(f.read(16384))
        ids[match.group(1).decode() if match else "<no id>"] += 1
    return len(names), ids


def check_stored(maildir: str, acked: list[str] | None, acked_count: int = 0
                 ) -> tuple[int, str | None]:
    """Return (stored count, problem or None): every acked id stored exactly once, no more.

    acked=None (smtp-source: its messages carry no id of ours) compares counts only."""
    count, ids = stored_ids(maildir)
    if acked is None:
        return count, (None if count == acked_count else
                       f"stored {count} files but {acked_count} messages were acked")
    missing = [i for i in acked if i not in ids]
    dupes = [i for i, n in ids.items() if n > 1]
    extra = count - len(acked)
    if count == len(acked) and not missing and not dupes:
        return count, None
    return count, (f"stored {count} files but {len(acked)} messages were acked; "
                   f"acked but not stored: {missing[:5]} ({len(missing)}), "
                   f"stored twice: {dupes[:5]}, stored minus acked: {extra}")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def tmpfile_supported(directory: str) -> bool:
    try:
        fd = os.open(directory, os.O_WRONLY | os.O_TMPFILE, 0o600)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True
