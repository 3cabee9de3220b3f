"""The benchmarks' lost-mail check (scripts/benchlib/maildir.py: check_stored) on real
Maildir files: a run that loses, doubles or invents a message fails, whatever its speed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib.maildir import check_stored, make_maildir, maildir_name  # noqa: E402
from benchlib.messages import make_body, message_head, stored_trace  # noqa: E402

_seq = iter(range(1, 1_000_000))


def store(maildir: str, msg_id: str | None) -> None:
    """One file in new/ as a server stores it: its trace header, then the message."""
    head = message_head(msg_id) if msg_id else b"Subject: no id of ours\r\n\r\n"
    text = stored_trace(msg_id or "no-id") + head + make_body(300)
    (Path(maildir) / "new" / maildir_name(next(_seq), len(text))).write_bytes(text)


@pytest.fixture
def maildir(tmp_path: Path) -> str:
    return make_maildir(str(tmp_path / "Maildir"))


def test_every_acknowledged_message_stored_once_passes(maildir):
    for i in range(3):
        store(maildir, f"r0.{i}")
    assert check_stored(maildir, ["r0.0", "r0.1", "r0.2"]) == (3, None)


def test_an_acknowledged_message_not_stored_fails_and_is_named(maildir):
    store(maildir, "r0.0")
    store(maildir, "r0.2")
    count, problem = check_stored(maildir, ["r0.0", "r0.1", "r0.2"])
    assert count == 2 and problem is not None
    assert "acked but not stored: ['r0.1'] (1)" in problem


def test_a_message_stored_twice_fails_even_where_the_counts_agree(maildir):
    # Three files for three acks, but one of them twice and one never: counts alone pass.
    for msg_id in ("r0.0", "r0.1", "r0.1"):
        store(maildir, msg_id)
    count, problem = check_stored(maildir, ["r0.0", "r0.1", "r0.2"])
    assert count == 3 and problem is not None
    assert "stored twice: ['r0.1']" in problem and "['r0.2'] (1)" in problem


def test_a_file_no_client_was_told_of_fails(maildir):
    store(maildir, "r0.0")
    store(maildir, None)
    count, problem = check_stored(maildir, ["r0.0"])
    assert count == 2 and problem is not None and "stored minus acked: 1" in problem


def test_without_ids_the_counts_must_agree(maildir):
    # smtp-source's messages carry no id of ours: its cells compare counts only.
    for _ in range(2):
        store(maildir, None)
    assert check_stored(maildir, None, acked_count=2) == (2, None)
    assert check_stored(maildir, None, acked_count=3) == (2, "stored 2 files but 3 messages were acked")


def test_a_lost_message_replaced_by_a_stray_file_fails_though_the_counts_agree(maildir):
    # Two acknowledged, one of them lost, and a file no client was told of in its place:
    # the counts agree, and only the ids show the loss.
    store(maildir, "r0.0")
    store(maildir, None)
    count, problem = check_stored(maildir, ["r0.0", "r0.1"])
    assert count == 2 and problem is not None and "acked but not stored: ['r0.1'] (1)" in problem
