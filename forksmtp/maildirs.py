"""The master's care of the configured Maildirs: making them at a start and a reload,
handing what it makes to the workers' user, warning where the workers could not
deliver, and the hourly pass that makes again what went missing and sweeps ``tmp/``.

Workers deliver (maildir.py); this is the part that needs the master's privileges and
runs outside any session.  Nothing here is on a message's path.
"""

from __future__ import annotations

import errno
import os
import stat

from . import config as config_mod, config_checks, maildir, process
from .logs import Log


class MaildirError(OSError):
    """A configured Maildir that cannot be made, named by its config key."""

    def __str__(self) -> str:
        return str(self.strerror)


Ids = tuple[int | None, int | None]  # the workers' uid and gid, looked up with the config


def prepare(cfg, log: Log, ids: Ids) -> None:
    """Make every Maildir of ``cfg`` and give what it makes to the workers' ``ids``.  One
    the catch-all cannot use stops a start or a reload (``MaildirError``, naming where
    ``delivery.maildir`` was set and its value as written, as config errors do); a
    ``[mailboxes]`` one is logged and left out (its mail gets 451 until it is fixed), as
    Postfix's delivery agents defer one mailbox's mail and take the rest: a read-only
    file system under one user's Maildir must not stop a certificate's reload, or the
    server from starting after a reboot."""
    keys = config_mod.maildir_keys(cfg.delivery)
    # The catch-all first: its failure stops the start or the reload before any
    # mailbox's Maildir is made or said to be broken.
    for path in sorted(keys, key=lambda p: (p != cfg.delivery.maildir, p)):
        error = make(path, cfg, log, ids)[1]
        try:
            if error is not None:
                raise error
            config_checks.creatable_dir(path)  # made, but perhaps on a read-only file system
        except (OSError, ValueError) as exc:
            problem = (f"cannot make the Maildir: {exc.filename or path}: {exc.strerror or exc}"
                       if isinstance(exc, OSError) else str(exc))
            if path == cfg.delivery.maildir:
                named = config_mod.key_error(cfg, keys[path], None, problem)
                raise MaildirError(getattr(exc, "errno", None) or errno.EIO, str(named)) from exc
            log.warning("STORE", f"{keys[path]} = {path}: {problem}; its mail gets 451 until this is fixed")
            continue
        _warn_unwritable(path, keys[path], cfg, log, ids)
        exposed = open_to_all(path)
        if exposed:  # delivered to all the same: an operator's choice, said at each start
            log.warning("STORE", f"{keys[path]} = {path}: {exposed}")
        _clean_tmp(path, log)


def look_after(cfg, log: Log, ids: Ids) -> None:
    """The hourly pass over every Maildir of ``cfg``: make again what went missing, and
    remove what crashed deliveries left in ``tmp/``."""
    for path in {cfg.delivery.maildir, *cfg.delivery.mailboxes.values()}:
        _remake(path, cfg, log, ids)
        _clean_tmp(path, log)


def sweep_dropped(paths, log: Log) -> None:
    """Sweep ``tmp/`` of Maildirs a reload dropped, while the workers of the generation
    before may still leave files there (what a crash of one left).  Nothing is made: a
    Maildir gone since is none of the server's business any more."""
    for path in sorted(paths):
        if os.path.isdir(os.path.join(path, "tmp")):
            _clean_tmp(path, log)


def make(path: str, cfg, log: Log, ids: Ids) -> tuple[list[str], Exception | None]:
    """Make what is missing of the Maildir at ``path``: what was made, and the error
    that stopped it, if one did.

    Then the Maildir's own directories that are root's go to the workers' ``ids``: what
    this master made, also what a failure part of the way left (tmp/ and new/, with a
    file where cur/ belongs), and what an earlier run without server.user or an
    operator's mkdir made; the workers must write tmp/ and new/.  A directory of any
    other owner is left as it is, and nothing below them is touched: it is a mail
    reader's (Dovecot's, and its Maildir++ folders, which a chown locked it out of), or
    one a reader made meanwhile."""
    link = foreign_link(path)
    if link:
        return [], PermissionError(errno.EPERM, f"{link}: not followed by the master", path)
    root_link = os.path.islink(path)  # looked at with the rest: one swapped in later is not
    dirs = config_checks.own_dirs(path)
    missing = [d for d in dirs if not os.path.isdir(d)]
    error: Exception | None = None
    try:
        maildir.Maildir(path, fsync=cfg.delivery.fsync)
    except (OSError, ValueError) as exc:
        error = exc
    made = [d for d in missing if os.path.isdir(d) and not os.path.islink(d)]
    _give_to_workers(path, ids, log, follow=root_link)
    return made, error


def foreign_link(path: str) -> str:
    """The first symlink on the way to the Maildir ``path`` (itself included) that
    neither root nor this process owns, described; "" where there is none.

    The master makes a Maildir's directories as root and gives root's ones to the
    workers' user, through the configured path.  A link another user put there would
    have it make and give away any directory of the host: a mailbox's owner, or the
    workers themselves, who own the catch-all Maildir, in which a Maildir++ folder
    (a [mailboxes] target such as .Lists) may be swapped for a link to /etc.  The
    kernel's protected_symlinks guards only sticky directories."""
    prefix = os.sep
    for part in os.path.abspath(path).split(os.sep)[1:]:
        prefix = os.path.join(prefix, part)
        try:
            st = os.lstat(prefix)
        except OSError:
            return ""  # not there yet: made by mkdir, which follows no link
        if process.untrusted_link(st):
            return f"a symlink of uid {st.st_uid}"
    return ""


def _roots_directory(path: str, follow: bool) -> bool:
    """A directory (through a symlink only if ``follow``) that root owns."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0


def _give_to_workers(top: str, ids: Ids, log: Log, follow: bool) -> None:
    """chown the Maildir ``top`` and its tmp/, new/ and cur/ to the workers' uid/gid, if
    set, those that are root's directories, each alone (not what is below it); a failure
    is logged, not raised (a broken mailbox must not stop the rest).  The ids are those
    the workers drop to, looked up with the config: a pass an hour later needs no user
    database.

    All through one descriptor of ``top``, opened without following a link unless
    ``follow``: one was there when foreign_link looked (the operator's: root's).  A link
    swapped in since fails the open, so that nothing it points to is given away."""
    if ids == (None, None):
        return
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except FileNotFoundError:
        return  # not made: the caller says why
    except OSError as exc:
        log.warning("STORE", f"cannot give {top} to the workers' user: {exc.strerror or exc}")
        return
    try:
        for name in config_checks.own_dirs("."):  # ".", then tmp/, new/ and cur/ in it
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == 0:
                    process.chown_dir(name, *ids, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("STORE", f"cannot give {os.path.normpath(os.path.join(top, name))} "
                                     f"to the workers' user: {exc}")
    finally:
        os.close(fd)


def _warn_unwritable(path: str, key: str, cfg, log: Log, ids: Ids) -> None:
    """Say at the start or reload, not only at its first message's 451, that the
    workers' user cannot use a Maildir (see ``unusable_by_workers``)."""
    problem = unusable_by_workers(path, ids, cfg.server.user)
    if problem:
        log.warning("STORE", f"{key} = {path}: {problem}; its mail gets 451 until this is fixed")


def unusable_by_workers(path: str, ids: Ids, user: str) -> str:
    """Why the workers' user cannot deliver into the Maildir ``path``, or "": one of
    another owner than root (a mail reader's: the master gives the workers only root's
    directories) that it may not pass through, or whose tmp/ or new/ it may not write.
    By the mode bits (ACLs are not read); a directory not there yet is made for it."""
    uid, gid = ids
    if uid is None or gid is None:
        return ""  # workers run as root
    for directory, need, what in zip(config_checks.own_dirs(path), (0o1, 0o3, 0o3),
                                     ("searchable", "writable", "writable")):
        if _roots_directory(directory, follow=directory == path):
            continue  # root's: make() gives it to the workers (at --check, the start will)
        try:
            st = os.stat(directory)
        except OSError:
            continue
        if not process.writable_by(st, uid, gid, need):
            return (f"{directory} is not {what} by the workers' user {user} (owner {st.st_uid}:"
                    f"{st.st_gid}, mode {st.st_mode & 0o7777:04o})")
    return ""


def open_to_all(path: str) -> str:
    """Why the Maildir ``path`` is not its owners' alone, or "": it, or its tmp/, new/
    or cur/, is a directory every local user may write (a slip such as ``/tmp`` as a
    mailbox).  There another user may put their own tmp/, new/ or cur/ before the
    server makes them, and so own what it delivers, or plant and take mail.  Postfix's
    ``postfix check`` likewise warns of its queue directories written by all."""
    for directory in config_checks.own_dirs(path):
        try:
            st = os.stat(directory)
        except OSError:
            continue
        if not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH):
            continue
        mode = f"mode {st.st_mode & 0o7777:04o}"
        if directory == path:
            return (f"{directory} is writable by every user ({mode}): another user could "
                    "make its tmp/, new/ or cur/ first and own the mail delivered there")
        return f"{directory} is writable by every user ({mode}): another user could put mail in it or take mail out"
    return ""


def _remake(path: str, cfg, log: Log, ids: Ids) -> None:
    """Make again what is missing of a Maildir.  Delivery makes ``tmp/`` and ``new/``
    when it finds them gone, but never looks at ``cur/``, which only readers use."""
    if all(os.path.isdir(d) for d in config_checks.own_dirs(path)):
        return
    made, error = make(path, cfg, log, ids)
    if error is not None:
        log.warning("STORE", f"cannot make {path} again: {error}")
    if made:
        log.warning("STORE", f"made again, found missing: {', '.join(made)}")


def _clean_tmp(path: str, log: Log) -> None:
    """Best effort: a tmp/ that cannot be read (or is a symlink, never followed) gets
    its deliveries refused with 451 anyway, and is logged.  Nor is a Maildir reached
    through another user's link swept: root would remove old files where it points."""
    link = foreign_link(path)
    if link:
        log.warning("STORE", f"not cleaning {path}/tmp: {link} on its way, not followed by the master")
        return
    try:
        n = maildir.clean_tmp(path)
    except OSError as exc:
        log.warning("STORE", f"cannot clean {path}/tmp: {exc.strerror or exc}")
        return
    if n:
        log.info("STORE", f"removed {n} stale file(s) from {path}/tmp")
