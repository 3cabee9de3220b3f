"""Listen addresses: parse them, bind them, and work out what a reload changes.

Accepted forms (``--listen`` and ``server.listen``):

* ``PORT`` (or ``:PORT``, ``*:PORT``) -- every interface: one dual-stack ``::`` socket
  with ``IPV6_V6ONLY`` off (set explicitly, whatever ``net.ipv6.bindv6only`` says), so
  IPv4 clients arrive as ``::ffff:a.b.c.d``; plain ``0.0.0.0`` where IPv6 is off.
* ``HOST:PORT`` -- an IPv4 address or a host name.  A name is resolved when parsed so that
  ``--check`` reports names that do not resolve; it keeps its spelling for logs and binds
  its first IPv4 address (else its first IPv6 one), so ``localhost`` means 127.0.0.1.
* ``[V6ADDR]:PORT`` -- an IPv6 address (zone ids such as ``[fe80::1%eth0]`` work).

IPv6 sockets are bound with IPV6_V6ONLY, so ``[::]:25`` and ``0.0.0.0:25`` can coexist and
each entry in the list is exactly one socket.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from .quoting import toml_string


@dataclass(frozen=True, slots=True)
class ListenAddr:
    host: str  # "" for every interface (dual-stack where IPv6 is on), else an IP literal or a host name
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6

    def __str__(self) -> str:
        if self.family == socket.AF_INET6 and _is_ip(self.host):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class BindError(Exception):
    """A listen socket could not be opened; ``str()`` is one line naming the address."""

    def __init__(self, addr: ListenAddr, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.addr = addr
        self.message = message
        self.errno = errno


def client_ip(address: str) -> str:
    """A client's address as logs and limits name it: an IPv4 client of a dual-stack
    socket arrives as ``::ffff:a.b.c.d`` and is the IPv4 client ``a.b.c.d``."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def parse_listen(text: str) -> ListenAddr:
    """Parse one listen address; raises ValueError with a short reason."""
    text = text.strip()
    if not text:
        raise ValueError("empty listen address")
    if text.isdigit():
        return ListenAddr("", _port(text), socket.AF_INET)
    if text.startswith("["):
        return _parse_bracketed(text)
    if text.count(":") > 1:
        raise ValueError("IPv6 addresses need brackets: [V6ADDR]:PORT")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("expected PORT, HOST:PORT or [V6ADDR]:PORT")
    if host in ("", "*"):
        return ListenAddr("", _port(port), socket.AF_INET)
    return ListenAddr(host, _port(port), _family_of(host))


def _parse_bracketed(text: str) -> ListenAddr:
    host, sep, port = text[1:].partition("]")
    if not sep or not port.startswith(":"):
        raise ValueError("expected [V6ADDR]:PORT")
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"not an IPv6 address: {toml_string(host)}") from None
    number = _port(port[1:])
    # Both are refused by bind(2) on every host, so --check refuses them too.
    if ip.ipv4_mapped is not None:  # a bracketed address gets an IPv6-only socket
        raise ValueError(f"an IPv4-mapped address cannot be bound by an IPv6-only socket: "
                         f"write {ip.ipv4_mapped}:{number}")
    if ip.is_link_local and ip.scope_id in (None, "0"):  # interface 0 is none
        bare = str(ip).partition("%")[0]
        raise ValueError(f"a link-local address needs its interface: [{bare}%IFACE]:{number}")
    return ListenAddr(str(ip), number, socket.AF_INET6)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"port must be a number, not {toml_string(text)}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port




def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _family_of(host: str) -> int:
    """Family of an IPv4 literal, or of what a host name resolves to (IPv4 preferred)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.AF_INET if ip.version == 4 else socket.AF_INET6
    families = {info[0] for info in _resolve(host, socket.AF_UNSPEC)}
    return socket.AF_INET if socket.AF_INET in families else socket.AF_INET6


def _resolve(host: str, family: int, port: int = 0) -> list[tuple]:
    try:
        infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        zone = host.partition("%")[2]
        if zone and not zone.isdigit() and not _has_interface(zone):  # not a name to resolve
            raise ValueError(f"no interface {toml_string(zone)} on this host") from None
        raise ValueError(f"cannot resolve host {toml_string(host)}: {getattr(exc, 'strerror', None) or exc}") from None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise ValueError(f"cannot resolve host {toml_string(host)}: no IPv4 or IPv6 address")
    return infos


def _has_interface(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except (OSError, ValueError):
        return False
    return True


def bind(addr: ListenAddr, backlog: int = 1024) -> socket.socket:
    """Open a non-blocking listening socket; raises BindError.  Workers share it
    through fork() and accept under epoll, one of them winning each connection (the
    others get EAGAIN: a non-blocking socket never holds a worker in accept()).

    The bare ``PORT`` form means every interface: one dual-stack IPv6 socket that also
    takes IPv4 clients (as ``::ffff:a.b.c.d``), or plain IPv4 where IPv6 is off."""
    if not addr.host and socket.has_ipv6:
        try:
            return _bind(addr, socket.AF_INET6, ("::", addr.port, 0, 0), backlog, dual=True)
        except BindError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    try:
        sockaddr = _resolve(addr.host, addr.family, addr.port)[0][4]
    except ValueError as exc:
        raise BindError(addr, f"cannot listen on {addr}: {exc}") from None
    return _bind(addr, addr.family, sockaddr, backlog)


def stop_listening(sock: socket.socket) -> None:
    """Stop listening on ``sock`` now, though forked workers still hold it, then close
    it.  A close alone leaves the socket listening until the last worker that has it
    lets go (after its SIGTERM, up to a second under load): connections meanwhile wait
    in a backlog nobody accepts from, and a reload that puts the address back fails
    to bind it.  shutdown(2) of a listening socket ends it for every holder: the port
    is free at once, queued clients are reset, and a worker's accept() gets EINVAL
    (worker.py drops the listener then)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not listening any more: nothing to end
    sock.close()


def identity(addr: ListenAddr) -> tuple:
    """What ``bind(addr)`` would listen on: (family, socket address, dual-stack); raises
    ValueError when the host does not resolve."""
    if not addr.host and socket.has_ipv6:
        return socket.AF_INET6, ("::", addr.port, 0, 0), True
    return addr.family, _resolve(addr.host, addr.family, addr.port)[0][4], False


def clash(addrs: Sequence[ListenAddr]) -> str | None:
    """Why two of ``addrs`` cannot both be listening, or None.  Compared as bound, not
    as written: ``localhost:25`` is ``127.0.0.1:25``, ``127.1`` is ``127.0.0.1``.  A
    name that does not resolve is skipped (parse_listen reported it already)."""
    seen: list[tuple[ListenAddr, tuple]] = []
    for addr in addrs:
        try:
            ident = identity(addr)
        except ValueError:
            continue
        for other, other_ident in seen:
            if ident == other_ident:
                return f"{addr} is the same socket as {other}"
            if _overlap(ident, other_ident):
                return f"{addr} and {other} overlap: a wildcard address takes the port on every address"
        seen.append((addr, ident))
    return None


def _overlap(a: tuple, b: tuple) -> bool:
    """Linux refuses the second of two listening sockets on one port when one is the
    wildcard of the other's family, even with SO_REUSEADDR; a dual-stack ``::`` socket
    is the IPv4 wildcard too.  An IPv6-only socket and an IPv4 one never clash."""
    (fam_a, sa_a, dual_a), (fam_b, sa_b, dual_b) = a, b
    if sa_a[1] != sa_b[1]:
        return False
    if fam_a != fam_b:
        return dual_a or dual_b
    wildcard = "0.0.0.0" if fam_a == socket.AF_INET else "::"
    return sa_a[0] == wildcard or sa_b[0] == wildcard


def bound_identity(sock: socket.socket) -> tuple:
    """The same for a listening socket."""
    dual = (sock.family == socket.AF_INET6
            and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return sock.family, sock.getsockname(), dual


def _bind(addr: ListenAddr, family: int, sockaddr: tuple, backlog: int, dual: bool = False) -> socket.socket:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise BindError(addr, f"cannot listen on {addr}: {exc.strerror}", exc.errno) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Every reply goes out whole in one send, so Nagle's algorithm has nothing to
        # merge; but it held the first reply after a TLS handshake until the client's
        # delayed ACK of the handshake's last flight came, 40 ms later, in every TLS
        # session.  Accepted sockets inherit the option (Linux, the BSDs).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise BindError(addr, f"cannot listen on {addr}: {reason}", exc.errno) from None
    sock.setblocking(False)
    return sock

