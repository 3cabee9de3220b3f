"""Constants every part of the benchmark shares: systems, modes, ports, the SMTP envelope."""
from __future__ import annotations

import re

SINK = "smtp-sink"            # stores nothing: the ceiling of the SMTP exchange
FLOOR = "pyfloor"             # the least Python a pre-forked durable server can run
SYSTEMS = ("loop", "loop-tmpfile", "forksmtp", "aiosmtpd", FLOOR, SINK)
LOOP_SYSTEMS = ("loop", "loop-tmpfile")
SMTP_SYSTEMS = ("forksmtp", "aiosmtpd")   # the storing servers: big-message and hold checks
SINK_ENV = "FORKSMTP_BENCH_SMTP_SINK"
SINK_PATHS = ("/usr/sbin/smtp-sink",)
MODES = ("durable", "nofsync")
HOST = "127.0.0.1"
MiB = 1 << 20
NO_DURABILITY_FS = ("tmpfs", "ramfs")
RATIO_PAIRS = (("forksmtp", "loop"), ("forksmtp", "aiosmtpd"), ("loop-tmpfile", "loop"),
               ("forksmtp", FLOOR), (FLOOR, "loop"), (FLOOR, "aiosmtpd"),
               ("forksmtp", SINK), ("loop", SINK))
START_TIMEOUT = 60.0          # server boot, worker fork, client/loop process start

SENDER = "bench@example.test"
RECIPIENT = "rcpt@example.test"
EHLO = b"EHLO bench-client.example.test\r\n"
MAIL = f"MAIL FROM:<{SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
HOLD = object()               # a conversation yields this to park its connection
MESSAGE_ID_RE = re.compile(rb"^Message-ID: <([^@>\r\n]+)@", re.MULTILINE | re.IGNORECASE)
