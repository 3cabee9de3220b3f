"""Listen addresses: every accepted form, every refusal, real binds on loopback."""

from __future__ import annotations

import errno
import re
import select
import socket

import pytest

from forksmtp.listeners import BindError, ListenAddr, bind, client_ip, parse_listen

V4, V6 = socket.AF_INET, socket.AF_INET6


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(V6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")


@pytest.mark.parametrize(
    "text, host, port, family, shown",
    [
        ("2525", "", 2525, V4, ":2525"),
        (":2525", "", 2525, V4, ":2525"),
        ("*:25", "", 25, V4, ":25"),
        (" 127.0.0.1:2525 ", "127.0.0.1", 2525, V4, "127.0.0.1:2525"),
        ("0.0.0.0:1", "0.0.0.0", 1, V4, "0.0.0.0:1"),
        ("10.1.2.3:65535", "10.1.2.3", 65535, V4, "10.1.2.3:65535"),
        ("[::1]:2525", "::1", 2525, V6, "[::1]:2525"),
        ("[::]:25", "::", 25, V6, "[::]:25"),
        ("[2001:DB8:0::1]:587", "2001:db8::1", 587, V6, "[2001:db8::1]:587"),
        ("[0:0::0001]:25", "::1", 25, V6, "[::1]:25"),  # one spelling per address: a reload sees it unchanged
        ("localhost:2525", "localhost", 2525, V4, "localhost:2525"),
    ],
)
def test_parse_forms(text: str, host: str, port: int, family: int, shown: str) -> None:
    addr = parse_listen(text)
    assert (addr.host, addr.port, addr.family) == (host, port, family)
    assert str(addr) == shown
    assert parse_listen(str(addr)) == addr  # what we log can be pasted back


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("host", "expected PORT"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:0", "out of range"),
        ("0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:70000", "out of range"),
        ("127.0.0.1:-1", "port must be a number"),
        ("127.0.0.1:smtp", "port must be a number"),
        ("127.0.0.1:２５", "port must be a number"),  # non-ASCII digits
        ("::1", "brackets"),
        ("::1:25", "brackets"),
        ("[::1]", "expected [V6ADDR]:PORT"),
        ("[::1]25", "expected [V6ADDR]:PORT"),
        ("[::1:25", "expected [V6ADDR]:PORT"),
        ("[127.0.0.1]:25", "not an IPv6 address"),
        ("[]:25", "not an IPv6 address"),
        ("[::1]:0", "out of range"),
        # Refused by bind(2) on every host: an IPv6-only socket takes no IPv4 client,
        # and a link-local address is ambiguous without its interface.
        ("[::ffff:127.0.0.1]:25", "IPv4-mapped address cannot be bound by an IPv6-only "
                                  "socket: write 127.0.0.1:25"),
        ("[fe80::1]:25", "link-local address needs its interface: [fe80::1%IFACE]:25"),
        ("[fe80::1%0]:25", "link-local address needs its interface: [fe80::1%IFACE]:25"),
    ],
)
def test_parse_refusals(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_listen(text)


def test_addresses_are_hashable_values() -> None:
    a, b = parse_listen("127.0.0.1:25"), parse_listen("127.0.0.1:25")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.port = 26  # type: ignore[misc]


def test_bind_gives_a_non_blocking_listener() -> None:
    sock = bind(ListenAddr("127.0.0.1", 0, V4), backlog=16)  # port 0: let the kernel pick
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        with pytest.raises(BlockingIOError):  # nobody waits: no worker is held in accept()
            sock.accept()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            select.select([sock], [], [], 5)
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


@pytest.mark.parametrize("host, family", [("127.0.0.1", V4),
                                          pytest.param("::1", V6, marks=needs_ipv6)])
def test_accepted_connections_send_without_nagle(host: str, family: int) -> None:
    """TCP_NODELAY, set on the listener, is what every accepted connection has: a reply
    never waits for the client to acknowledge the previous one (after a TLS handshake,
    Nagle held the first reply back for the client's 40 ms delayed ACK)."""
    sock = bind(ListenAddr(host, 0, family))
    with sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        with socket.create_connection((host, sock.getsockname()[1]), timeout=5):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_bind_an_address_in_use_is_a_one_line_error() -> None:
    first = bind(ListenAddr("127.0.0.1", 0, V4))
    try:
        addr = parse_listen(f"127.0.0.1:{first.getsockname()[1]}")
        with pytest.raises(BindError) as info:
            bind(addr)
    finally:
        first.close()
    err = info.value
    assert err.addr == addr and err.errno == errno.EADDRINUSE
    assert str(err) == f"cannot listen on {addr}: Address already in use"
    assert "\n" not in str(err)


def test_bind_a_name_uses_its_ipv4_address() -> None:
    probe = bind(ListenAddr("127.0.0.1", 0, V4))
    port = probe.getsockname()[1]
    probe.close()
    try:
        sock = bind(parse_listen(f"localhost:{port}"))
    except BindError:  # someone else took the port meanwhile: nothing to learn
        pytest.skip("port taken")
    with sock:
        assert sock.getsockname() == ("127.0.0.1", port)


@needs_ipv6
def test_bind_ipv6_is_v6_only() -> None:
    sock = bind(ListenAddr("::1", 0, V6))
    with sock:
        assert sock.family == V6 and sock.getsockname()[0] == "::1"
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = sock.getsockname()[1]
        # V6ONLY: the same port on IPv4 loopback is still free.
        bind(ListenAddr("127.0.0.1", port, V4)).close()


@needs_ipv6
def test_bind_a_link_local_address_on_an_interface_this_host_lacks_says_so() -> None:
    """It read "cannot resolve host": getaddrinfo is what fails on the zone."""
    with pytest.raises(BindError, match=r'^cannot listen on \[fe80::1%nosuch0\]:2525: no interface "nosuch0" '
                                        r'on this host$'):
        bind(parse_listen("[fe80::1%nosuch0]:2525"))


def test_bind_ipv6_in_use() -> None:
    sock = bind(ListenAddr("::1", 0, V6))
    with sock:
        addr = ListenAddr("::1", sock.getsockname()[1], V6)
        with pytest.raises(BindError, match=r"^cannot listen on \[::1\]:\d+: Address already in use$"):
            bind(addr)


@pytest.mark.parametrize("address, ip", [
    ("::ffff:127.0.0.1", "127.0.0.1"),  # an IPv4 client of a dual-stack socket
    ("127.0.0.2", "127.0.0.2"),
    ("::1", "::1"),
    ("::ffff:7f00:1", "::ffff:7f00:1"),  # not how Linux reports a mapped address: kept
    ("2001:db8::ffff:1.2.3.4", "2001:db8::ffff:1.2.3.4"),
])
def test_client_ip_names_an_ipv4_client_of_a_dual_stack_socket_as_ipv4(address: str, ip: str) -> None:
    assert client_ip(address) == ip
