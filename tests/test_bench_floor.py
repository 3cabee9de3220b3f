"""pyfloor (scripts/benchlib/floor.py), the benchmark's floor of forksmtp's shape, over a
real loopback connection: it must answer a pipelined group as forksmtp does, or every
ratio against it under ``--pipelining`` measures Nagle's delay instead of the floor."""
from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib.floor import Store, serve  # noqa: E402


class RecordingSocket:
    """The accepted socket, with each sendall's bytes kept in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def read_replies(client: socket.socket, count: int) -> list[bytes]:
    """The next ``count`` final reply lines (continuation lines skipped)."""
    data = b""
    while True:
        lines = data.split(b"\r\n")[:-1]
        finals = [line for line in lines if line[3:4] != b"-"]
        if len(finals) >= count:
            return finals[:count]
        chunk = client.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk


def test_a_pipelined_group_is_answered_in_one_send_on_a_no_delay_socket(tmp_path):
    maildir = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    conn, _ = listener.accept()
    recording = RecordingSocket(conn)
    server = threading.Thread(target=serve, args=(recording, Store(str(maildir), False)),
                              daemon=True)
    server.start()
    try:
        assert read_replies(client, 1)[0].startswith(b"220")
        client.sendall(b"EHLO client\r\n")
        assert read_replies(client, 1) == [b"250 PIPELINING"]
        before = len(recording.sent)
        client.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(client, 3)] == [b"250", b"250", b"354"]
        assert recording.sent[before:] == [b"250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n"
                                           b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client.sendall(b"Subject: floor\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(client, 2)] == [b"250", b"221"]
        server.join(10)
        assert not server.is_alive()
    finally:
        client.close()
        conn.close()
        listener.close()
    stored = [maildir / "new" / name for name in os.listdir(maildir / "new")]
    assert len(stored) == 1
    assert stored[0].read_bytes().endswith(b"\nSubject: floor\n\n.dot\n")
