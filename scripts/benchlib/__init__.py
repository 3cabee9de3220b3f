"""The pieces of scripts/bench.py, the benchmark's entry point, one concern a module.

  constants   systems, modes, ports and the SMTP commands every part shares
  helpers     logging, percentiles, ratios, the filesystem type, descriptor limit, ports
  maildir     Maildir names and directories, and the check of what was stored
  messages    the test messages: headers, bodies of a given size
  processes   the Reaper (every process started dies with the script) and run_gated
  context     Bench, the state of one run, and the per-cell Maildirs of its work dir
  loop        the conventional Maildir delivery loop (loop, loop-tmpfile)
  peer        the aiosmtpd peer, run as `bench.py serve-aiosmtpd`
  floor       pyfloor, the floor of forksmtp's shape, run as `bench.py serve-pyfloor`
  servers     starting forksmtp, the peer, pyfloor and smtp-sink; waiting until they answer
  measure     server CPU and memory sampling
  clients     our load client (non-blocking sockets) and the smtp-source driver
  cells       one measurement per system, mode and concurrency; the matrix of them
  summary     medians over rounds, ratios between systems, the performance targets
  extras      the big message and the open-sessions checks
  report      the Markdown and chart output and the description of the run
"""
