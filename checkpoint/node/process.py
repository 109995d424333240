"""The per-node snapshot process, from the launcher's side: its config, its command line, starting and stopping it.

One process per node, started by the launcher (:func:`start_snapshot_process`, or ``python -m
regrow.checkpoint.node --address 127.0.0.1:0``), outlives the ranks: a rank that crashes and restarts finds its
snapshots where it left them. For each rank that ATTACHes it creates two segments under ``shm_dir`` (mode 0600,
alternating: one always holds a complete snapshot while the other is being written), sized from the tensor table
the rank announces; ranks map the files themselves (``checkpoint/snapshot/segment.open_segment``) and write into
them, so no snapshot byte ever crosses the socket between ranks and this process. The protocol is in
``checkpoint/snapshot/protocol.py`` and docs/snapshot-protocol.md. With erasure coding on
(``erasure.ec_group_size``), this process also encodes its ranks' committed snapshots with its group's peers and can
rebuild a lost node's segments (``peers.py``, ``rebuild.py``). With persistence on (``persist.persist_every``), it
writes its ranks' parts of a universal checkpoint every ``persist_every`` steps from their sealed snapshots
(``persist.py``), so the ranks need no checkpoint writer.

Space is checked before anything is created and reserved (``shm.py``), so a ``/dev/shm`` that is too small fails at
start-up (``expected_bytes``) or at ATTACH, never in the middle of a run. If this process is killed, the segments
it created are orphaned and the next snapshot process of the same job removes them (so does
:meth:`SnapshotProcess.stop`): the snapshots are lost with it, and ranks restore from the universal checkpoint
instead. One process per job runs on a node at a time: it holds the job's lock (``job_lock.py``) for its life, and
a second one started while it lives fails at start-up, naming it, instead of removing its live segments.

The process itself is ``__main__.py`` serving ``server.SnapshotServer``. None of these modules imports torch
(start-up stays fast; persistence, when on, imports it at start-up); the rank side is
``checkpoint/snapshot/sink.py``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.job_lock import JobLock
from regrow.checkpoint.node.limits import ConnectionLimits
from regrow.checkpoint.node.log import log
from regrow.checkpoint.node.persist import PersistConfig
from regrow.checkpoint.node.shm import check_job, remove_segments
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, parse_address


@dataclass(kw_only=True)
class SnapshotProcessConfig:
    """Settings of the snapshot process. Validated on construction; errors name the field."""

    address: str = "127.0.0.1:0"
    """host:port to listen on (port 0: any free port; the chosen address is printed as ``READY host:port``)."""
    job: str = ""
    """Names this job's segments (``regrow-snap-<job>-r<rank>-s<slot>``); empty: a random id. Letters, digits,
    ``-`` and ``_``, at most 64 (``shm.check_job``). One process per job and node runs at a time (a second one
    fails at start-up, naming the first); a restarted process of the same job removes the segments a crashed one
    left behind."""
    shm_dir: str = "/dev/shm"
    """Directory of the segments: a tmpfs (RAM), so the snapshots survive the ranks but not the node."""
    expected_bytes: int = 0
    """Segment bytes the job will need on this node (2 x each local rank's snapshot); checked against the free
    space at start-up so a too-small /dev/shm fails now, not at the first snapshot. 0: checked at ATTACH only."""
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Caps on connections and deadlines of their messages (before and after the token)."""
    erasure: ErasureCodingConfig = field(default_factory=ErasureCodingConfig)
    """Erasure coding with the peer snapshot processes of this node's group (off by default)."""
    persist: PersistConfig = field(default_factory=PersistConfig)
    """Persisting the ranks' snapshots as universal checkpoints every ``persist_every`` steps (off by default)."""
    await_rebuild: bool = False
    """A replacement that will be rebuilt from its group (``ec_rebuild``): the ranks' requests wait until the
    rebuild has ended (or up to ``REBUILD_WAIT_S``), so that a rank restarted meanwhile finds its snapshots rather
    than none. Needs erasure coding."""

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.await_rebuild and not self.erasure.enabled:
            raise ValueError("SnapshotProcessConfig.await_rebuild needs erasure coding (erasure.ec_group_size > 0): "
                             "only a group can rebuild a process")
        if not isinstance(self.expected_bytes, int) or self.expected_bytes < 0:
            raise ValueError(f"SnapshotProcessConfig.expected_bytes={self.expected_bytes!r} must be an int >= 0")
        if not Path(self.shm_dir).is_dir():
            raise ValueError(f"SnapshotProcessConfig.shm_dir={self.shm_dir!r} is not a directory")
        if self.job:
            try:
                check_job(self.job)
            except ValueError as error:
                raise ValueError(f"SnapshotProcessConfig.job: {error}") from None


# -------------------------------------------------------------------- its command line, both ways
def command_line(config: SnapshotProcessConfig, job: str) -> list[str]:
    """The arguments of ``python -m regrow.checkpoint.node`` that run a process of ``config`` as job ``job``
    (:func:`config_from_command_line` reads them back)."""
    return ["--address", config.address, "--job", job,
            "--shm-dir", config.shm_dir, "--expected-bytes", str(config.expected_bytes),
            "--ec-group-size", str(config.erasure.ec_group_size), "--ec-parity", str(config.erasure.ec_parity),
            "--ec-timeout-s", str(config.erasure.peer_timeout_s),
            "--persist-every", str(config.persist.persist_every), "--persist-dir", config.persist.persist_dir,
            "--keep-last", str(config.persist.keep_last),
            "--persist-timeout-s", str(config.persist.commit_timeout_s),
            "--persist-copy-threads", str(config.persist.copy_threads),
            "--handshake-timeout-s", str(config.limits.handshake_timeout_s),
            "--message-timeout-s", str(config.limits.message_timeout_s),
            "--max-connections", str(config.limits.max_connections),
            "--max-unauthenticated", str(config.limits.max_unauthenticated),
            *(["--await-rebuild"] if config.await_rebuild else [])]


def config_from_command_line(argv: list[str] | None = None) -> SnapshotProcessConfig:
    """The config of ``python -m regrow.checkpoint.node`` arguments; a malformed argument exits (argparse), an
    invalid value raises the config's ValueError naming the field."""
    parser = argparse.ArgumentParser(prog="python -m regrow.checkpoint.node",
                                     description=f"The node's snapshot process; the token comes from {TOKEN_ENV}.")
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--job", default="")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--expected-bytes", type=int, default=0)
    parser.add_argument("--ec-group-size", type=int, default=0, help="nodes per erasure-coding group; 0: off")
    parser.add_argument("--ec-parity", type=int, default=1, help="nodes of a group that may be lost at once")
    parser.add_argument("--ec-timeout-s", type=float, default=30.0, help="limit of each call to a peer")
    parser.add_argument("--persist-every", type=int, default=0,
                        help="persist every step that is a multiple of this as a universal checkpoint; 0: off")
    parser.add_argument("--persist-dir", default="", help="checkpoint root every node's snapshot process sees")
    parser.add_argument("--keep-last", type=int, default=2, help="persisted checkpoints to keep (>= 2)")
    parser.add_argument("--persist-timeout-s", type=float, default=600.0,
                        help="how long the process holding rank 0 waits for every rank's part")
    parser.add_argument("--persist-copy-threads", type=int, default=4, help="threads copying a slot before a persist")
    limits = ConnectionLimits()  # the defaults, stated once
    parser.add_argument("--handshake-timeout-s", type=float, default=limits.handshake_timeout_s,
                        help="seconds a connection has for its whole hello")
    parser.add_argument("--message-timeout-s", type=float, default=limits.message_timeout_s,
                        help="seconds an authenticated connection has for each whole message")
    parser.add_argument("--max-connections", type=int, default=limits.max_connections,
                        help="connections served at once")
    parser.add_argument("--max-unauthenticated", type=int, default=limits.max_unauthenticated,
                        help="connections at once that have not presented the token yet")
    parser.add_argument("--await-rebuild", action="store_true",
                        help="a replacement: the ranks' requests wait until ec_rebuild has ended")
    args = parser.parse_args(argv)
    erasure = ErasureCodingConfig(ec_group_size=args.ec_group_size, ec_parity=args.ec_parity,
                                  peer_timeout_s=args.ec_timeout_s)
    persist = PersistConfig(persist_every=args.persist_every, persist_dir=args.persist_dir,
                            keep_last=args.keep_last, commit_timeout_s=args.persist_timeout_s,
                            copy_threads=args.persist_copy_threads)
    limits = ConnectionLimits(handshake_timeout_s=args.handshake_timeout_s, message_timeout_s=args.message_timeout_s,
                              max_connections=args.max_connections, max_unauthenticated=args.max_unauthenticated)
    return SnapshotProcessConfig(address=args.address, job=args.job, shm_dir=args.shm_dir,
                                 expected_bytes=args.expected_bytes, limits=limits, erasure=erasure, persist=persist,
                                 await_rebuild=args.await_rebuild)


@dataclass
class SnapshotProcess:
    """A snapshot process started by :func:`start_snapshot_process`."""

    address: str
    job: str
    process: subprocess.Popen
    shm_dir: str = "/dev/shm"
    stop_timeout_s: float = 10.0
    """How long :meth:`stop` waits by default: longer when it persists (its last persists finish first)."""

    def stop(self, timeout_s: float | None = None) -> int:
        """Asks it to shut down (SIGTERM: it removes its segments once its persists are done), kills it after
        ``timeout_s`` (default ``stop_timeout_s``); returns its exit code. A process that did not shut down
        cleanly (killed, crashed, or killed here) could not remove its segments: they are removed here, so a failed
        job leaves no /dev/shm behind (nothing could use them: a replacement of the same job would remove them as
        leftovers), unless a replacement of the same job already runs (its segments are left alone)."""
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.returncode != 0:
            self._remove_leftovers()
        return self.process.returncode

    def _remove_leftovers(self) -> None:
        """Removes the segments (and the lock file) the ended process left, unless another process of the job
        runs on this node by now (it holds the job's lock, and those segments are its own)."""
        lock = JobLock.try_acquire(self.shm_dir, self.job)
        if lock is None:
            log(f"left the segments of job {self.job} alone: another snapshot process of the job runs on this node")
            return
        try:
            removed = remove_segments(self.shm_dir, self.job)
        finally:
            lock.release()
        if removed:
            log(f"removed {removed} segments of job {self.job}, whose snapshot process ended with exit code "
                f"{self.process.returncode}")


def start_snapshot_process(config: SnapshotProcessConfig, *, token: str, timeout_s: float = 30.0,
                           module: str = "regrow.checkpoint.node", env: Mapping[str, str] | None = None
                           ) -> SnapshotProcess:
    """Starts ``python -m regrow.checkpoint.node`` with ``config`` and the job's ``token`` (passed in the
    environment, never on the command line where ``ps`` shows it); returns once it listens. Raises RuntimeError
    with its output if it fails to start (e.g. /dev/shm too small for ``expected_bytes``). ``module`` runs
    instead when given (one that takes the same arguments: the fault injector's ``regrow.launch.chaos.
    node_faults``), with ``env`` added to its environment."""
    job = config.job or secrets.token_hex(4)
    command = [sys.executable, "-m", module, *command_line(config, job)]
    env = dict(os.environ, **(env or {}), **{TOKEN_ENV: token})
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        print(line, end="", flush=True)  # its start-up log (e.g. leftovers removed) belongs in the launcher's
        if line.startswith("READY "):
            _forward_output(process)
            # A persist in flight and the run's queued last step may each take up to commit_timeout_s.
            stop_timeout_s = 10.0 + (2 * config.persist.commit_timeout_s if config.persist.enabled else 0.0)
            return SnapshotProcess(address=line.split()[1], job=job, process=process, shm_dir=config.shm_dir,
                                   stop_timeout_s=stop_timeout_s)
    process.kill()
    process.wait(10)
    raise RuntimeError(f"the snapshot process did not start (exit code {process.returncode}):\n{''.join(lines)}")


def _forward_output(process: subprocess.Popen) -> None:
    """Copies the process's later log lines to this process's stdout (a thread), so its pipe never fills."""

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)

    threading.Thread(target=pump, daemon=True, name="regrow-snapshot-log").start()
