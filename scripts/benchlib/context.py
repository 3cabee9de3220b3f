"""Bench, the state of one benchmark run, and the per-cell Maildirs in its work dir."""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator

from .maildir import make_maildir
from .processes import Reaper


@dataclass
class Bench:
    args: argparse.Namespace
    root: str
    logs: str
    out: str
    fs: str
    forksmtp_cmd: list[str]
    smtp_sink: str | None = None      # the smtp-sink binary, when one was found
    reaper: Reaper = field(default_factory=Reaper)
    server_seq: Iterator[int] = field(default_factory=itertools.count)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fresh_maildir(bench: Bench, tag: str) -> str:
    path = os.path.join(bench.root, "maildirs", tag)
    shutil.rmtree(path, ignore_errors=True)
    return make_maildir(path)


def discard_maildir(bench: Bench, path: str) -> None:
    """Flush dirty pages so the next cell starts clean.  The cell's Maildir stays until the
    run ends: on ext4 without a journal the inode allocator skips every inode freed in the
    last 60-300 s (ext4 ialloc.c, recently_deleted()), checking each one, so deleting a
    cell's files would tax whichever system runs next -- in one profile it was a quarter of
    a worker's CPU.  The whole bench root is removed at the end (unless --keep)."""
    del path
    os.sync()
