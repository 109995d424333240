"""``python -m regrow.checkpoint.node``: runs one node's snapshot process (``process.py`` says what it is, its
arguments are ``process.config_from_command_line``'s; the protocol is docs/snapshot-protocol.md)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from regrow.checkpoint.node.job_lock import JobRunning
from regrow.checkpoint.node.process import config_from_command_line
from regrow.checkpoint.node.server import SnapshotServer
from regrow.checkpoint.node.shm import ShmSpaceError
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV


def main(argv: list[str] | None = None, *, round_hook: Callable[[int], None] | None = None) -> int:
    """Serves until SHUTDOWN, SIGTERM or SIGINT (then removes the segments); prints ``READY host:port job ID pid
    P`` once it listens. Returns 2 (the reason on stderr) when it cannot start (e.g. a process of the same job
    runs on this node: ``job_lock.JobRunning`` names it). ``round_hook``: the erasure-coding rounds' hook
    (``PeerCoding``; the fault injector's ``launch/chaos/node_faults.py`` passes one)."""
    try:
        config = config_from_command_line(argv)
        server = SnapshotServer(config, os.environ.get(TOKEN_ENV, ""), round_hook=round_hook)
    except (ValueError, TypeError, ShmSpaceError, OSError, JobRunning) as error:
        print(f"[snapshot process] cannot start: {error}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    signal.signal(signal.SIGINT, lambda *_: server.shutdown())  # Ctrl-C: remove the segments too
    print(f"READY {server.address} job {server.job} pid {os.getpid()}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
