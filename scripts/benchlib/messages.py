"""The test messages: headers carrying a unique Message-ID, bodies of a given size."""
from __future__ import annotations

from .constants import RECIPIENT, SENDER

# --------------------------------------------------------------------------- messages

FILLER = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
          b"tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam ")


def message_head(msg_id: str) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {msg_id}\r\n"
            f"Message-ID: <{msg_id}@bench.example.test>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n").encode()


def make_body(nbytes: int) -> bytes:
    """CRLF text lines of 76 characters (never starting with a dot), nbytes long."""
    line = FILLER[:74] + b"\r\n"
    body = line * (max(nbytes, 2) // len(line))
    rest = nbytes - len(body)
    if rest >= 3:
        body += b"x" * (rest - 2) + b"\r\n"
    return body


def body_for_size(size: int) -> bytes:
    """A body making the whole message (headers included) about size bytes."""
    return make_body(size - len(message_head("r0-forksmtp-durable-c50.99999")))


def stored_trace(msg_id: str) -> bytes:
    """What a server puts before the message it stores (Return-Path and a Received field
    the size of forksmtp's), so the loop writes files as big as the servers' files."""
    return (f"Return-Path: <{SENDER}>\n"
            f"Received: from bench-client.example.test ([127.0.0.1])\n"
            f"\tby mx.bench.example.test (forksmtp) with ESMTP id {msg_id[-12:]:>12}\n"
            f"\tfor <{RECIPIENT}>; Thu, 01 Jan 2026 00:00:00 +0000\n").encode()


def to_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")
