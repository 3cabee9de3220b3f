"""From an SMTP envelope to durable Maildir copies.

Routing: a recipient listed in ``[mailboxes]`` goes to its own Maildir (with a
``Delivered-To:`` line, even where that Maildir is the catch-all's); every other
recipient goes to the catch-all ``maildir``, without one, and
the catch-all copy is stored once per transaction however many recipients share it.
The Maildir paths come only from the configuration, never from an address, so no
recipient can name a path outside the configured Maildirs.

A ``Transaction`` opens its copies when DATA is accepted (so storage problems get a 4xx
before the client sends the message), streams the text into all of them, and commits
them all-or-nothing.  Errors propagate as ``OSError``; ``storage_reply`` maps them.  A
Maildir that failed is remembered, and its recipients are refused at RCPT while it looks
broken (``Router.defer``, ``Router.deferral``, ``condition``), so that the message goes
on for the rest.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from collections.abc import Callable, Mapping
from typing import Final

from . import maildir, trace
from .maildir import Delivery
from .smtp import replies as R


def storage_reply(exc: OSError) -> R.Reply:
    """ENOSPC/EDQUOT -> 452 4.3.1, any other storage failure -> 451 4.3.0."""
    return R.R452_NO_SPACE if maildir.is_no_space(exc) else R.R451_STORAGE


#: Maildirs whose new/ a worker keeps open between messages, the most recently used.  A
#: site with more mailboxes than that reopens the others as mail comes; without a bound
#: a worker held one fd per Maildir it ever delivered to, and past its fd limit sent
#: 451 to good mail.
MAX_OPEN_MAILDIRS: Final = 64


def open_maildirs_bound() -> int:
    """MAX_OPEN_MAILDIRS, or a quarter of the worker's descriptor limit where that is
    less: under a limit of 64 the cache alone would take every descriptor the worker has
    left after its own dozen, and a message for one more Maildir got 451 at each
    fiftieth message.  Read when the worker sets up, after any privilege drop."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_MAILDIRS
    return max(1, min(MAX_OPEN_MAILDIRS, soft // 4))


#: The failures that are the worker's own (out of descriptors or memory, a signal): they
#: say nothing of the Maildir and must not defer a good mailbox.  Any other failure may
#: be the Maildir's (its permissions, its quota, its file system: full, read-only, in need
#: of fsck, an NFS handle gone stale, a FUSE daemon gone), and whether it still is, is
#: what ``condition`` looks at before each of its recipients is deferred.
_WORKER_FAULTS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                                   errno.EINTR, errno.EAGAIN})


#: What ``condition`` says of a Maildir.
SOUND: Final = ""
BROKEN: Final = "broken"
GONE: Final = "gone"


def condition(path: str) -> str:
    """How the Maildir at ``path`` looks now.  BROKEN: its tmp/ or new/ is not a
    directory this process may write (permissions, a read-only file system, a file or
    a symlink in its place), or its file system has no block or no inode left for this
    process (root may use the reserved blocks).  GONE: tmp/ or new/ is missing and this
    process could not make it again where it was.  SOUND otherwise, gone but makeable
    included (the next delivery makes it).  A few system calls; asked only of a
    Maildir that failed."""
    tmp = os.path.join(path, "tmp")
    try:
        for sub in (tmp, os.path.join(path, "new")):
            if (not stat.S_ISDIR(os.lstat(sub).st_mode)
                    or not os.access(sub, os.W_OK | os.X_OK, effective_ids=True)):
                return BROKEN
        return BROKEN if _full(tmp) else SOUND
    except FileNotFoundError:
        return SOUND if _could_make(path) else GONE
    except OSError:  # a directory above that may not be searched, a loop ...
        return BROKEN


def _could_make(path: str) -> bool:
    """A Maildir that is gone, wholly or in part: may this process make what is
    missing (the nearest entry that is there a directory it may write, its file system
    not full)?  A file, or a symlink that leads nowhere, in the way: no, as make() and
    the master's pass would find."""
    here = os.path.abspath(path)
    while True:
        try:
            os.lstat(here)
        except FileNotFoundError:
            parent = os.path.dirname(here)
            if parent == here:
                return False
            here = parent
            continue
        except OSError:
            return False
        return (os.path.isdir(here) and os.access(here, os.W_OK | os.X_OK, effective_ids=True)
                and not _full(here))


def _full(directory: str) -> bool:
    """No block or no inode left on ``directory``'s file system for this process.  One
    that reports no size at all (every count 0: ramfs, a FUSE one without statfs) cannot
    say, and is not taken for full: its mailboxes would be refused for good."""
    fs = os.statvfs(directory)
    blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
    return (fs.f_blocks > 0 and blocks == 0) or (fs.f_files > 0 and fs.f_favail == 0)


def one_path_per_maildir(catch_all: str, mailboxes: Mapping[str, str]) -> dict[str, str]:
    """``mailboxes`` with every path that reaches the same directory as another one
    configured (through a symlink, a bind mount, a ``..``) spelt as one of them: the
    catch-all, else one without a symlink or a ``..`` in it, else the first in order.
    They are one Maildir, which gets one copy of a message, not one per spelling.  Told
    apart by device and inode where the directory is there (the master has made them
    before a worker starts), else by the path with its symlinks resolved.  Looked at
    once per worker."""
    first: dict[object, str] = {}
    spelt: dict[str, str] = {}
    plain_first = sorted(set(mailboxes.values()), key=lambda p: (os.path.realpath(p) != p, p))
    for path in (catch_all, *plain_first):
        spelt[path] = first.setdefault(_identity(path), path)
    return {address: spelt[path] for address, path in mailboxes.items()}


def _identity(path: str) -> object:
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return os.path.realpath(path)


class Router:
    """Per-worker cache of Maildir objects and the recipient -> Maildir map."""

    def __init__(self, catch_all: str, mailboxes: Mapping[str, str], fsync: bool = True,
                 local_domains: tuple[str, ...] = ()) -> None:
        self.catch_all = catch_all
        mailboxes = one_path_per_maildir(catch_all, mailboxes)
        self.mailboxes = mailboxes
        self.fsync = fsync
        self._maildirs: dict[str, maildir.Maildir] = {}
        # Those whose new/ fd may be open, least recently used first (trim closes them).
        self._open: dict[str, maildir.Maildir] = {}
        self.max_open = open_maildirs_bound()
        own = postmaster_address(mailboxes, local_domains)
        if own is not None:  # bare <Postmaster> ("postmaster", as the session spells it)
            self.mailboxes = {**mailboxes, "postmaster": mailboxes[own]}
        # How trace fields name bare <Postmaster>: the address it is stored for, else at the
        # first local domain, which the server accepts; "" (its hostname) without them.
        self.postmaster = own or (f"postmaster@{local_domains[0]}" if local_domains else "")
        # Whether some [mailboxes] address stores into the catch-all's Maildir: only then
        # may a catch-all copy carry Delivered-To lines (and need a lookup per recipient).
        self._mailbox_at_catch_all = catch_all in self.mailboxes.values()
        # Maildir path -> the RCPT reply, for Maildirs that failed: see defer.
        self._deferred: dict[str, R.Reply] = {}
        # A storage error names its Maildir by absolute path (maildir.blamed).
        self._paths = {os.path.abspath(p): p for p in (catch_all, *mailboxes.values())}
        #: Called when a deferred Maildir is gone and this process cannot make it again
        #: (the worker asks the master, which may: see Worker.call_for_maildirs).
        self.on_gone: Callable[[], None] | None = None

    def defer(self, path: str, exc: OSError) -> None:
        """``path`` failed with ``exc``.  If the fault is the Maildir's own, its
        recipients are refused at RCPT (451, 452 for no space) for as long as it still
        looks broken, so that a message for several Maildirs is stored for the others
        instead of deferred as a whole: SMTP has one reply for a message's text, and the
        RCPT is the last moment one recipient can be told apart from the rest.  Learnt
        per worker, from its own failures."""
        if exc.errno is not None and exc.errno not in _WORKER_FAULTS:
            reply = R.R452_MAILBOX_NO_SPACE if maildir.is_no_space(exc) else R.R451_MAILBOX_DEFERRED
            self._deferred[self._paths.get(path, path)] = reply

    def deferral(self, rcpt: str) -> R.Reply | None:
        """The reply for ``rcpt`` while its Maildir is deferred, else None (the session's
        recipient check: one test of an empty dict while no Maildir failed).  A deferred
        Maildir is looked at again at each of its recipients, and once it looks sound
        (mended, space freed) the next message tries it; what no look can tell (a quota,
        an I/O error) is tried again by that message too."""
        if not self._deferred:
            return None
        path = self.mailboxes.get(rcpt.lower(), self.catch_all)
        reply = self._deferred.get(path)
        if reply is None:
            return None
        state = condition(path)
        if state != SOUND:
            if state == GONE and self.on_gone is not None:
                self.on_gone()
            return reply
        del self._deferred[path]
        return None

    def route(self, recipients: list[str]) -> dict[str, list[str]]:
        """Destination Maildir path -> the distinct recipients stored there."""
        groups: dict[str, list[str]] = {}
        seen: set[str] = set()
        for rcpt in recipients:
            key = rcpt.lower()
            path = self.mailboxes.get(key)
            if path is None:  # the catch-all: local parts are case-sensitive (RFC 5321 2.4)
                path, key = self.catch_all, "\0" + rcpt
            if key not in seen:  # a mailbox's address is matched in any case: one of them
                seen.add(key)
                groups.setdefault(path, []).append(rcpt)
        return groups

    def delivered_to(self, path: str, rcpts: list[str]) -> list[str]:
        """Those of ``rcpts`` (as ``route`` grouped them for ``path``) that reached it as
        ``[mailboxes]`` addresses: all of them but at the catch-all's Maildir."""
        if path != self.catch_all:
            return rcpts
        if not self._mailbox_at_catch_all:
            return []
        return [r for r in rcpts if r.lower() in self.mailboxes]

    def maildir(self, path: str) -> maildir.Maildir:
        md = self._maildirs.get(path)
        if md is None:
            try:  # made on first use, and again after a storage error (forget)
                md = self._maildirs[path] = maildir.Maildir(path, fsync=self.fsync)
            except OSError as exc:
                maildir.blame(exc, path)
                raise
        # Taken out and put back: the dict's order is then least recently used first.
        self._open.pop(path, None)
        self._open[path] = md
        return md

    def trim(self) -> None:
        """Between messages (no copy in flight uses a Maildir): close the new/ fds of the
        least recently used beyond ``max_open``; the objects, and what they learnt
        (a filesystem without O_TMPFILE), stay, and reopen new/ when mail comes.  One
        message may open more meanwhile, as many as its recipients' Maildirs."""
        extra = len(self._open) - self.max_open
        if extra > 0:
            for path in list(self._open)[:extra]:
                self._open.pop(path).close()

    def forget(self) -> None:
        """Drop cached Maildirs (and their open new/ fds) after a storage error, so the
        next message re-creates a Maildir that was removed or replaced meanwhile."""
        for md in self._maildirs.values():
            md.close()
        self._maildirs.clear()
        self._open.clear()

    def begin(self, path: str) -> Delivery:
        return self.maildir(path).begin()


def postmaster_address(mailboxes: Mapping[str, str], local_domains: tuple[str, ...]) -> str | None:
    """The ``[mailboxes]`` address whose Maildir bare ``<Postmaster>`` (RFC 5321 4.5.1:
    this host's postmaster) is stored in: ``postmaster@`` the first local domain that
    has one, or, without local domains, the only ``postmaster@`` there is; else None
    (the catch-all)."""
    if local_domains:
        return next((f"postmaster@{d}" for d in local_domains if f"postmaster@{d}" in mailboxes),
                    None)
    boxes = [address for address in mailboxes if address.startswith("postmaster@")]
    # One entry can be two keys: an internationalised domain is listed in both spellings.
    return boxes[0] if len({mailboxes[a] for a in boxes}) == 1 else None


class Transaction:
    """The Maildir copies of one message."""

    def __init__(self, router: Router, recipients: list[str], header: "HeaderInfo") -> None:
        self._router = router
        self._copies: list[maildir.Delivery] = []
        try:
            for path, rcpts in router.route(recipients).items():
                copy = router.begin(path)
                self._copies.append(copy)
                copy.write(header.render(rcpts, router.delivered_to(path, rcpts),
                                         router.postmaster))
        except BaseException:
            self.abort()
            raise
        # The common case is one copy: bind its write method to skip a loop per chunk.
        self.write = self._copies[0].write if len(self._copies) == 1 else self._write_all

    def room_for(self, size: int) -> OSError | None:
        """The ENOSPC of the first copy whose file system has no room now for its copies
        of a message of the client's declared ``size`` (RFC 1870 SIZE) and half as much
        again, as Postfix keeps for the queue; None when every one has, or cannot tell.
        Refused before the 354, the client sends no text that could only fail at the end."""
        need = size + size // 2
        copies: dict[int, int] = {}  # file system -> the copies it takes so far
        for copy in self._copies:
            try:
                fs, free = copy.free_space()
            except OSError:  # a file system that cannot say now (NFS, FUSE): the writes will
                continue
            if free is None:  # one that reports no size (ramfs): the writes will say too
                continue
            n = copies[fs] = copies.get(fs, 0) + 1
            if free < n * need:
                what = "1 copy" if n == 1 else f"{n} copies"
                exc = OSError(errno.ENOSPC, f"{free} octets free for {what} of a message of {size} (SIZE)")
                maildir.blame(exc, copy.maildir.path)
                return exc
        return None

    def _write_all(self, data: bytes) -> None:
        for copy in self._copies:
            copy.write(data)

    def commit(self) -> list[str]:
        try:
            return maildir.commit_all(self._copies)
        finally:
            self._router.trim()

    def abort(self) -> None:
        for copy in self._copies:
            copy.abort()
        self._router.trim()


def _one_address(recipients: list[str], postmaster: str, by: str, utf8: bool,
                 any_case: list[str]) -> str | None:
    """The one address the recipients of a copy name, for the FOR clause, or None.  Two
    spellings are one recipient where the server took them as one: a ``[mailboxes]``
    address (``any_case``: those of them) in any case, and bare <Postmaster> and the
    address it is stored for; a domain in any case.  Other local parts are
    case-sensitive (RFC 5321 2.4): ``Bob@`` and ``bob@`` of the catch-all are two."""
    if not recipients:
        return None
    first = trace.qualified(recipients[0], postmaster, by, utf8)
    if len(recipients) == 1:
        return first
    key = _for_key(first, recipients[0] in any_case)
    for rcpt in recipients[1:]:
        if _for_key(trace.qualified(rcpt, postmaster, by, utf8), rcpt in any_case) != key:
            return None
    return first


def _for_key(address: str, any_case: bool) -> str:
    local, _, domain = address.rpartition("@")
    if any_case or local.lower() == "postmaster":
        local = local.lower()
    return f"{local}@{domain.lower()}"


class HeaderInfo:
    """What the trace headers need, gathered once per message."""

    __slots__ = ("sender", "helo", "peer_ip", "by", "protocol", "queue_id", "when", "tls", "auth_user")

    def __init__(self, *, sender: str, helo: str, peer_ip: str, by: str, protocol: str,
                 queue_id: str, when: float, tls: str = "", auth_user: str = "") -> None:
        self.sender, self.helo, self.peer_ip, self.by = sender, helo, peer_ip, by
        self.protocol, self.queue_id, self.when = protocol, queue_id, when
        self.tls, self.auth_user = tls, auth_user

    def render(self, recipients: list[str], delivered_to: list[str], postmaster: str = "") -> bytes:
        """The trace fields of a copy for ``recipients``; ``delivered_to``: those of
        them that reached it as a ``[mailboxes]`` address; ``postmaster``: how to name
        bare ``<Postmaster>`` (Router.postmaster)."""
        by, utf8 = self.by, self.protocol.startswith("UTF8")
        one = _one_address(recipients, postmaster, by, utf8, delivered_to)
        head = trace.return_path(self.sender)
        # One line per address the mailbox was reached by, as Postfix adds one per
        # delivery; all of them are the Maildir's owner's, so none reveals a blind copy.
        # Bare <Postmaster> and the address it is stored for, however the client cased
        # it, are one line.
        named: dict[str, str] = {}
        for rcpt in delivered_to:
            address = trace.qualified(rcpt, postmaster, by, utf8)
            named.setdefault(address.lower(), address)
        for address in named.values():
            head += trace.delivered_to(address)
        return head + trace.received(
            helo=self.helo, peer_ip=self.peer_ip, by=self.by, protocol=self.protocol,
            queue_id=self.queue_id, recipient=one, when=self.when, tls=self.tls,
            auth_user=self.auth_user)
