"""Transactions over several Maildirs, without a daemon: all-or-nothing commits, aborts
that leave nothing behind, and routing rules the live tests do not reach."""

from __future__ import annotations

import os

import pytest

from forksmtp import delivery, maildir
from helpers import open_fds


def header() -> delivery.HeaderInfo:
    return delivery.HeaderInfo(sender="s@client.test", helo="client.test", peer_ip="192.0.2.1",
                               by="mx.test", protocol="ESMTP", queue_id="Q1", when=0.0)


@pytest.fixture
def router(tmp_path) -> delivery.Router:
    """A catch-all and one mailbox, each named-file (so a copy's tmp/ file is visible)."""
    router = delivery.Router(str(tmp_path / "catch"), {"a@x.test": str(tmp_path / "a")})
    for box in ("catch", "a"):
        router.maildir(str(tmp_path / box)).use_tmpfile = False
    return router


def replace_with_file(path) -> None:
    os.rmdir(path)
    path.write_text("not a directory")


def test_a_copy_that_cannot_be_opened_drops_the_ones_opened_before(router, tmp_path):
    """The caller never gets the Transaction to abort: it must clean up itself."""
    replace_with_file(tmp_path / "catch" / "tmp")
    before = open_fds()
    with pytest.raises(OSError):
        delivery.Transaction(router, ["a@x.test", "other@x.test"], header())
    assert os.listdir(tmp_path / "a" / "tmp") == []
    assert open_fds() == before


def test_a_maildir_that_cannot_be_made_is_named_by_its_error(tmp_path):
    """Made on first use, and again after a storage error: its error names the Maildir
    for the log, as one of an open Maildir does (a file in the path here)."""
    (tmp_path / "home").write_text("a file where a directory should be")
    bob = str(tmp_path / "home" / "Maildir")
    router = delivery.Router(str(tmp_path / "catch"), {"bob@x.test": bob})
    with pytest.raises(OSError) as failed:
        delivery.Transaction(router, ["bob@x.test"], header())
    assert maildir.blamed(failed.value) == bob


def test_abort_drops_every_copy(router, tmp_path):
    before = open_fds()
    txn = delivery.Transaction(router, ["a@x.test", "other@x.test"], header())
    txn.write(b"Subject: x\n\nbody\n")
    txn.abort()
    assert os.listdir(tmp_path / "a" / "tmp") == os.listdir(tmp_path / "catch" / "tmp") == []
    assert open_fds() == before


def test_commit_of_several_copies_is_all_or_nothing(router, tmp_path):
    """One copy cannot be linked: the client gets a 4xx and sends again, so no other copy
    may stay stored (its mailbox would get the message twice)."""
    txn = delivery.Transaction(router, ["a@x.test", "other@x.test"], header())
    txn.write(b"Subject: x\n\nbody\n")
    replace_with_file(tmp_path / "catch" / "new")
    with pytest.raises(OSError):
        txn.commit()
    assert os.listdir(tmp_path / "a" / "new") == [] and os.listdir(tmp_path / "a" / "tmp") == []


def test_forget_closes_the_cached_new_descriptors(tmp_path):
    """forget() runs after each storage error: it must release what it drops."""
    router = delivery.Router(str(tmp_path / "catch"), {})
    router.begin(str(tmp_path / "catch")).commit()  # opens new/ and keeps it
    before = open_fds()
    router.forget()
    assert open_fds() == before - 1


def test_catch_all_recipients_differing_only_in_case_are_two():
    """Local parts are case-sensitive (RFC 5321 2.4) outside [mailboxes]: Bob@ and bob@ are
    two recipients of the catch-all copy (so its Received: names no single one)."""
    router = delivery.Router("/nonexistent/catch", {})
    assert router.route(["Bob@x.test", "bob@x.test", "Bob@x.test"]) == {
        "/nonexistent/catch": ["Bob@x.test", "bob@x.test"]}


def test_a_worker_keeps_a_bounded_number_of_maildirs_open(tmp_path):
    """One new/ fd per Maildir ever delivered to: a site with more Maildirs than the fd
    limit got 451 for good mail.  Past MAX_OPEN_MAILDIRS the least recently used close,
    and a Maildir closed that way takes mail again."""
    boxes = {f"u{i}@x.test": str(tmp_path / f"u{i}") for i in range(delivery.MAX_OPEN_MAILDIRS + 36)}
    router = delivery.Router(str(tmp_path / "catch"), boxes)
    before = open_fds()
    for address in list(boxes) + list(boxes)[:5]:  # the first five a second time, reopened
        txn = delivery.Transaction(router, [address], header())
        txn.write(b"Subject: x\n\nbody\n")
        txn.commit()
        assert open_fds() <= before + delivery.MAX_OPEN_MAILDIRS
    assert open_fds() == before + delivery.MAX_OPEN_MAILDIRS
    for i, path in enumerate(boxes.values()):
        assert len(os.listdir(os.path.join(path, "new"))) == (2 if i < 5 else 1)
    txn = delivery.Transaction(router, list(boxes)[:3], header())  # an abort trims as well
    txn.abort()
    assert open_fds() == before + delivery.MAX_OPEN_MAILDIRS
