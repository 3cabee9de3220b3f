"""The aiosmtpd peer: a Maildir handler as durable as forksmtp's, served by
`bench.py serve-aiosmtpd` in a process of its own."""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import ssl
import time
from typing import Any

from .constants import MiB
from .maildir import maildir_name, make_maildir, write_all
from .messages import to_lf

# --------------------------------------------------------------------------- the peer

class DurableMaildirHandler:
    """An aiosmtpd handler storing like forksmtp: Return-Path and Received added, LF
    line endings, exclusive file in tmp/, fsync, rename into new/, fsync new/, then 250.

    The store is synchronous in the event loop, as aiosmtpd's bundled Mailbox handler
    does; --peer-threads N moves it to a thread pool instead."""

    def __init__(self, path: str, fsync_on: bool, threads: int) -> None:
        self.tmp = os.path.join(make_maildir(path), "tmp")
        self.new = os.path.join(path, "new")
        self.new_fd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY)
        self.fsync_on = fsync_on
        self.seq = itertools.count()
        self.pool = None
        if threads:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(threads)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = self.render(session, envelope)
        try:
            if self.pool:
                await asyncio.get_running_loop().run_in_executor(self.pool, self.store, data)
            else:
                self.store(data)
        except OSError:
            return "451 4.3.0 Storage failure"
        return "250 2.0.0 Message accepted"

    @staticmethod
    def render(session: Any, envelope: Any) -> bytes:
        stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
        head = (f"Return-Path: <{envelope.mail_from}>\n"
                f"Received: from {session.host_name} ([{session.peer[0]}])\n"
                f"\tby bench-peer.example.test (aiosmtpd) with ESMTP\n"
                f"\tfor <{envelope.rcpt_tos[0]}>; {stamp}\n")
        return head.encode() + to_lf(envelope.original_content)

    def store(self, data: bytes) -> None:
        name = maildir_name(next(self.seq), len(data))
        tmp_path = os.path.join(self.tmp, name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
            if self.fsync_on:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(self.new, name))
        if self.fsync_on:
            os.fsync(self.new_fd)


def serve_aiosmtpd(argv: list[str]) -> int:
    """`bench.py serve-aiosmtpd --listen HOST:PORT --maildir DIR [--no-fsync]`."""
    p = argparse.ArgumentParser(prog="bench.py serve-aiosmtpd")
    p.add_argument("--listen", required=True)
    p.add_argument("--maildir", required=True)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tls-cert", help="offer STARTTLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="and this key (PEM)")
    opts = p.parse_args(argv)
    asyncio.run(_serve_aiosmtpd(opts))
    return 0


async def _serve_aiosmtpd(opts: argparse.Namespace) -> None:
    from aiosmtpd.smtp import SMTP
    loop = asyncio.get_running_loop()
    host, port = opts.listen.rsplit(":", 1)
    handler = DurableMaildirHandler(opts.maildir, not opts.no_fsync, opts.threads)
    tls_context = None
    if opts.tls_cert:
        # Built once, as forksmtp's master builds its own: one set of ticket keys.
        tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_context.load_cert_chain(opts.tls_cert, opts.tls_key)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-peer.example.test", data_size_limit=256 * MiB,
                     tls_context=tls_context, loop=loop),
        host, int(port), backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"[READY] aiosmtpd on {opts.listen}", flush=True)
    await stop.wait()
    server.close()
