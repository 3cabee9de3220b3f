"""Transactions over several Maildirs, without a daemon: all-or-nothing commits, aborts
that leave nothing behind, and routing rules the live tests do not reach."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile

import pytest

from forksmtp import delivery, logs, maildir, maildirs
from forksmtp.config import load_config
from forksmtp.delivery import BROKEN, GONE, SOUND
from forksmtp.smtp import replies as R
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


def test_a_file_system_that_cannot_tell_its_free_space_is_not_refused_for_size(router, tmp_path):
    """MAIL's SIZE is checked against the free space before the 354.  A file system whose
    statvfs fails (an NFS server that does not answer it, a FUSE one that does not
    implement it) cannot say; the message then goes on, and a write that fails gives its
    own 4xx at the end.  The error escaped and closed the session with no reply."""
    txn = delivery.Transaction(router, ["a@x.test"], header())
    copy = txn._copies[0]
    fd, copy._fd = copy._fd, 2 ** 20  # a descriptor nothing has open: statvfs fails
    try:
        with pytest.raises(OSError):
            copy.free_space()
        assert txn.room_for(10 ** 15) is None
    finally:
        copy._fd = fd
    assert txn.room_for(10 ** 15).errno == errno.ENOSPC  # the check itself still works
    txn.abort()


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


def test_a_catch_all_copy_for_two_spellings_of_a_local_part_names_neither():
    """The two catch-all recipients above are two in the trace fields too: their copy's
    Received: names no single one (it named the first, its spellings compared in any case)."""
    router = delivery.Router("/nonexistent/catch", {})
    ((path, rcpts),) = router.route(["Bob@x.test", "bob@x.test"]).items()
    fields = header().render(rcpts, router.delivered_to(path, rcpts), router.postmaster)
    assert b"\tfor <" not in fields, fields.decode()


@pytest.mark.parametrize("rcpts, named", [
    (["bob@X.TEST", "bob@x.test"], "bob@X.TEST"),  # a domain is one in any case
    (["Alice@x.test", "alice@x.test"], "Alice@x.test"),  # a [mailboxes] address: one
    (["Postmaster@x.test", "postmaster@x.test"], "Postmaster@x.test"),  # RFC 5321 4.5.1
])
def test_spellings_the_server_takes_as_one_recipient_are_named_once(rcpts, named):
    router = delivery.Router("/nonexistent/catch", {"alice@x.test": "/nonexistent/alice"})
    for path, group in router.route(rcpts).items():
        fields = header().render(group, router.delivered_to(path, group), router.postmaster)
        assert f"\tfor <{named}>;".encode() in fields, fields.decode()


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


# -- a Maildir that failed is deferred at RCPT while it looks broken ------------------------------

def test_a_failed_maildir_defers_its_recipients_only_and_while_it_looks_broken(router, tmp_path):
    replace_with_file(tmp_path / "a" / "tmp")
    with pytest.raises(OSError) as caught:
        delivery.Transaction(router, ["a@x.test", "other@x.test"], header())
    assert maildir.blamed(caught.value) == os.path.abspath(tmp_path / "a")
    assert router.deferral("a@x.test") is None  # nothing learnt yet
    router.defer(maildir.blamed(caught.value), caught.value)
    assert router.deferral("A@X.test") is R.R451_MAILBOX_DEFERRED  # its address in any case
    assert router.deferral("a@x.test") is R.R451_MAILBOX_DEFERRED  # asked again: still
    assert router.deferral("other@x.test") is None  # the catch-all is sound
    (tmp_path / "a" / "tmp").unlink()
    (tmp_path / "a" / "tmp").mkdir()  # mended
    assert router.deferral("a@x.test") is None
    replace_with_file(tmp_path / "a" / "tmp")
    assert router.deferral("a@x.test") is None  # forgotten once sound: the next failure tells


@pytest.mark.parametrize("err, reply", [
    (errno.EACCES, R.R451_MAILBOX_DEFERRED), (errno.EROFS, R.R451_MAILBOX_DEFERRED),
    (errno.ENOTDIR, R.R451_MAILBOX_DEFERRED), (errno.EIO, R.R451_MAILBOX_DEFERRED),
    (errno.ENOSPC, R.R452_MAILBOX_NO_SPACE), (errno.EDQUOT, R.R452_MAILBOX_NO_SPACE),
    # A file system in need of fsck, an NFS handle gone stale, a FUSE daemon gone, a
    # new/ on another file system than tmp/: the Maildir's too, and deferred while a look
    # can see it (each of these Maildirs has a file for its new/ here).
    (errno.EUCLEAN, R.R451_MAILBOX_DEFERRED), (errno.ESTALE, R.R451_MAILBOX_DEFERRED),
    (errno.ENOTCONN, R.R451_MAILBOX_DEFERRED), (errno.EXDEV, R.R451_MAILBOX_DEFERRED),
    (errno.EMFILE, None), (errno.ENFILE, None), (errno.ENOMEM, None), (errno.EINTR, None),
    (errno.ENOBUFS, None), (errno.EAGAIN, None),
])
def test_only_a_maildirs_own_faults_defer_it(tmp_path, err, reply):
    """Out of descriptors or memory is the worker's trouble, not the mailbox's; any
    other failure may be the Maildir's.  (EUCLEAN deferred nobody before: one broken
    mailbox had every message that named it refused as a whole, for good.)"""
    # The configured path with a trailing slash: errors name the Maildir by absolute path.
    router = delivery.Router(str(tmp_path / "catch"), {"a@x.test": str(tmp_path / "a") + "/"})
    router.maildir(str(tmp_path / "a") + "/")
    replace_with_file(tmp_path / "a" / "new")
    router.defer(os.path.abspath(tmp_path / "a"), OSError(err, os.strerror(err)))
    assert router.deferral("a@x.test") is reply
    assert router.deferral("b@x.test") is None


def test_a_catch_all_that_failed_defers_every_address_without_a_mailbox(router, tmp_path):
    router.defer(os.path.abspath(tmp_path / "catch"), OSError(errno.EACCES, "denied"))
    replace_with_file(tmp_path / "catch" / "new")
    assert router.deferral("anyone@x.test") is R.R451_MAILBOX_DEFERRED
    assert router.deferral("Postmaster") is R.R451_MAILBOX_DEFERRED
    assert router.deferral("a@x.test") is None


@pytest.mark.parametrize("change", ["tmp-is-a-file", "new-is-a-symlink"])
def test_what_makes_a_maildir_look_broken(tmp_path, change):
    md = maildir.Maildir(str(tmp_path / "m"))
    assert SOUND == delivery.condition(md.path)
    if change == "tmp-is-a-file":
        replace_with_file(tmp_path / "m" / "tmp")
    else:
        os.rmdir(tmp_path / "m" / "new")
        os.symlink(tmp_path / "m" / "cur", tmp_path / "m" / "new")
    assert delivery.condition(md.path) == BROKEN


def test_a_maildir_that_is_gone_looks_broken_only_where_it_could_not_be_made_again(tmp_path):
    """Gone, it is made again by the next delivery, so it does not look broken; unless
    the directory it would be made in may not be written."""
    md = maildir.Maildir(str(tmp_path / "m"))
    os.rmdir(tmp_path / "m" / "new")
    assert SOUND == delivery.condition(md.path)
    shutil.rmtree(tmp_path / "m")
    assert SOUND == delivery.condition(md.path)
    assert SOUND == delivery.condition(str(tmp_path / "a" / "b" / "m"))  # parents made too
    (tmp_path / "a").write_text("x")
    assert delivery.condition(str(tmp_path / "a" / "b" / "m")) == BROKEN  # a file in the way
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")  # a volume not mounted, say
    assert delivery.condition(str(tmp_path / "dangling")) == GONE
    assert delivery.condition(str(tmp_path / "dangling" / "m")) == GONE


def test_a_deferred_maildir_that_is_gone_asks_the_master_while_it_cannot_be_made(tmp_path):
    calls = []
    router = delivery.Router(str(tmp_path / "catch"), {"a@x.test": str(tmp_path / "box" / "a")})
    router.on_gone = lambda: calls.append(1)
    router.maildir(str(tmp_path / "box" / "a"))
    router.defer(os.path.abspath(tmp_path / "box" / "a"), OSError(errno.EACCES, "denied"))
    shutil.rmtree(tmp_path / "box")
    os.symlink(tmp_path / "unmounted", tmp_path / "box")  # gone, and not to be made there
    assert router.deferral("a@x.test") is R.R451_MAILBOX_DEFERRED and calls == [1]
    (tmp_path / "box").unlink()  # the way is free: the next message makes it
    assert router.deferral("a@x.test") is None and calls == [1]
    maildir.Maildir(str(tmp_path / "box" / "a"))  # made again
    router.defer(os.path.abspath(tmp_path / "box" / "a"), OSError(errno.EACCES, "denied"))
    replace_with_file(tmp_path / "box" / "a" / "tmp")  # broken, not gone: no pass would mend it
    assert router.deferral("a@x.test") is R.R451_MAILBOX_DEFERRED and calls == [1]


def test_a_maildir_its_user_may_not_write_looks_broken_to_it():
    """Judged as the process that delivers: a worker running as another user than the
    Maildir's owner (here the test's child, run as nobody where the test runs as root)."""
    base = tempfile.mkdtemp(prefix="forksmtp-looks-")
    try:
        os.chmod(base, 0o755)  # under /tmp, which everyone may pass through
        ok, no = (maildir.Maildir(os.path.join(base, name)) for name in ("ok", "no"))
        for path in (ok.path, no.path, *(os.path.join(p, sub) for p in (ok.path, no.path)
                                          for sub in ("tmp", "new"))):
            os.chmod(path, 0o755)
        as_root = os.geteuid() == 0
        if as_root:
            for sub in ("tmp", "new"):
                os.chown(os.path.join(ok.path, sub), 65534, 65534)
        else:
            os.chmod(os.path.join(no.path, "tmp"), 0o500)
        pid = os.fork()
        if pid == 0:  # the child: not the owner of "no", never root
            try:
                if as_root:
                    os.setgid(65534)
                    os.setuid(65534)
                os._exit(0 if (delivery.condition(ok.path) == SOUND and delivery.condition(no.path) == BROKEN) else 1)
            finally:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_hourly_pass_gives_what_it_makes_to_the_ids_kept_with_the_config(tmp_path):
    """userdel, or an NSS or LDAP outage, after the start: the pass looked the user up
    by name, made the first missing Maildir, then raised KeyError, and the others waited
    an hour (and the one made stayed root's).  It now uses the uid and gid the workers
    drop to, looked up with the config, and makes and hands over every one."""
    if os.geteuid() != 0:
        pytest.skip("directories are given to server.user by root only")
    config = tmp_path / "f.toml"
    config.write_text(f'[server]\nuser = "nobody"\n[delivery]\nmaildir = "{tmp_path / "catchall"}"\n'
                      f'[mailboxes]\n"a@example.test" = "{tmp_path / "boxa"}"\n'
                      f'"b@example.test" = "{tmp_path / "boxb"}"\n')
    cfg = load_config(str(config))
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, user="forksmtp-no-such-user"))
    log_path = tmp_path / "log"
    log = logs.Log("info", str(log_path))
    maildirs.look_after(cfg, log, (12345, 23456))
    log.flush()
    for name in ("catchall", "boxa", "boxb"):
        for sub in ("", "tmp", "new", "cur"):
            st = (tmp_path / name / sub).stat()
            assert (st.st_uid, st.st_gid) == (12345, 23456), (name, sub)
    assert "workers' user" not in log_path.read_text()


def test_a_link_swapped_in_after_the_masters_look_gives_nothing_away(tmp_path):
    """make() looks for another user's link on the way, then makes and hands over: a
    link the workers swap in between must not be followed by the hand-over, which goes
    through one descriptor opened without following a link that was not there."""
    if os.geteuid() != 0:
        pytest.skip("directories are given to server.user by root only")
    victim, top = tmp_path / "victim", tmp_path / "box"
    victim.mkdir()
    top.symlink_to(victim)  # as if swapped in after the look, which saw no link
    log_path = tmp_path / "log"
    log = logs.Log("info", str(log_path))
    maildirs._give_to_workers(str(top), (12345, 23456), log, follow=False)
    log.flush()
    assert victim.stat().st_uid == 0
    assert f"cannot give {top} to the workers' user" in log_path.read_text()
    maildirs._give_to_workers(str(top), (12345, 23456), log, follow=True)  # the operator's link
    assert (victim.stat().st_uid, victim.stat().st_gid) == (12345, 23456)
    # A Maildir its make() could not make is the caller's to report: nothing more here.
    maildirs._give_to_workers(str(tmp_path / "never-made"), (12345, 23456), log, follow=False)
    log.flush()
    assert "never-made" not in log_path.read_text()


def test_foreign_link_names_the_first_link_of_another_user_on_the_way(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a link of another user's needs root to make")
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "roots").symlink_to(tmp_path / "real")
    theirs = tmp_path / "theirs"
    theirs.symlink_to(tmp_path / "real")
    os.lchown(theirs, 4321, 4321)
    assert maildirs.foreign_link(str(tmp_path / "roots" / "deep" / "Maildir")) == ""
    assert maildirs.foreign_link(str(theirs / "deep" / "Maildir")) == "a symlink of uid 4321"
    assert maildirs.foreign_link(str(tmp_path / "not-yet" / "Maildir")) == ""


# -- paths that are one Maildir ----------------------------------------------------------------

def stored(md) -> list[bytes]:
    return [(md / "new" / name).read_bytes() for name in sorted(os.listdir(md / "new"))]


@pytest.mark.parametrize("spelling", ["symlink", "dot-dot", "trailing-slash"])
def test_paths_that_reach_one_maildir_get_one_copy(tmp_path, spelling):
    """The contract: one copy per distinct destination Maildir.  Two mailboxes whose
    paths are one directory were told apart by their spelling, and the Maildir got two
    copies of a message for both."""
    real = tmp_path / "alice"
    maildir.Maildir(str(real))
    other = {"symlink": tmp_path / "alias", "dot-dot": tmp_path / "x" / ".." / "alice",
             "trailing-slash": str(real) + "/"}[spelling]
    if spelling == "symlink":
        os.symlink(real, other)
    (tmp_path / "x").mkdir()
    router = delivery.Router(str(tmp_path / "catch"), {"alice@x.test": str(real), "bob@x.test": str(other)})
    assert router.route(["alice@x.test", "bob@x.test"]) == {str(real): ["alice@x.test", "bob@x.test"]}
    txn = delivery.Transaction(router, ["bob@x.test", "alice@x.test"], header())
    txn.write(b"Subject: one\n\nbody\n")
    txn.commit()
    (copy,) = stored(real)
    assert b"Delivered-To: bob@x.test\nDelivered-To: alice@x.test\n" in copy
    assert not (tmp_path / "catch" / "new").exists() or stored(tmp_path / "catch") == []


def test_a_mailbox_whose_path_is_the_catch_alls_shares_its_copy(tmp_path):
    """Spelt as the catch-all (which comes first), so its copy there is the catch-all's
    with a Delivered-To line for the mailbox, as when both name one path."""
    catch = tmp_path / "catch"
    maildir.Maildir(str(catch))
    os.symlink(catch, tmp_path / "link")
    router = delivery.Router(str(catch), {"box@x.test": str(tmp_path / "link")})
    assert router.route(["box@x.test", "anyone@x.test"]) == {str(catch): ["box@x.test", "anyone@x.test"]}
    txn = delivery.Transaction(router, ["box@x.test", "anyone@x.test"], header())
    txn.write(b"\nbody\n")
    txn.commit()
    (copy,) = stored(catch)
    assert copy.count(b"Delivered-To: ") == 1 and b"Delivered-To: box@x.test\n" in copy


def test_a_deferred_maildir_of_two_spellings_defers_both(tmp_path):
    real = tmp_path / "alice"
    maildir.Maildir(str(real))
    os.symlink(real, tmp_path / "alias")
    router = delivery.Router(str(tmp_path / "catch"), {"alice@x.test": str(real),
                                                       "bob@x.test": str(tmp_path / "alias")})
    replace_with_file(real / "new")
    with pytest.raises(OSError) as failed:  # a message for bob: the Maildir names itself
        delivery.Transaction(router, ["bob@x.test"], header())
    assert maildir.blamed(failed.value) == str(real)
    router.defer(maildir.blamed(failed.value), failed.value)
    assert router.deferral("bob@x.test") is R.R451_MAILBOX_DEFERRED
    assert router.deferral("alice@x.test") is R.R451_MAILBOX_DEFERRED
    assert router.deferral("carol@x.test") is None


def test_maildirs_not_there_yet_are_told_apart_by_their_resolved_paths(tmp_path):
    (tmp_path / "x").mkdir()
    os.symlink(tmp_path / "x", tmp_path / "y")
    got = delivery.one_path_per_maildir(str(tmp_path / "catch"), {
        "a@x.test": str(tmp_path / "x" / "box"), "b@x.test": str(tmp_path / "y" / "box"),
        "c@x.test": str(tmp_path / "x" / "other")})
    assert got == {"a@x.test": str(tmp_path / "x" / "box"), "b@x.test": str(tmp_path / "x" / "box"),
                   "c@x.test": str(tmp_path / "x" / "other")}
