"""The in-memory snapshot side of ``regrow train``: ``--snapshot-every``, ``--snapshot-address``, ``--resume
snapshot``.

Who owns the node's snapshot process (docs/snapshot-protocol.md: it must outlive the ranks):

- **Local launcher** (``regrow train --nproc N``, :func:`regrow.launch.spawn.run_local`): the ``regrow train``
  process is the parent of every rank and outlives them, so it starts the snapshot process
  (:func:`node_snapshots`) with a fresh ``secrets.token_hex(32)`` token, hands the address and token to the ranks
  through their environment (``run_local``'s ``env``, sent over the spawn pipe, never argv), and stops it (SIGTERM:
  it removes its segments) when the run ends, however it ends.
- **torchrun**: no process of ours outlives a torchrun restart. The elastic agent starts every worker in its own
  session and ``killpg``s that session on a restart, so a snapshot process started by ``LOCAL_RANK`` 0 would die
  with the very ranks it is meant to outlive. Under torchrun the snapshot process is therefore started before
  torchrun on each node (``python -m regrow.checkpoint.memory --address 127.0.0.1:0`` with
  ``REGROW_SNAPSHOT_TOKEN`` exported, which torchrun passes on to its workers) and given with
  ``--snapshot-address``.
- ``--snapshot-address`` also works with the local launcher: the process is then used, never started or stopped,
  which is what lets a later ``regrow train --resume snapshot`` find the snapshots of a run that was killed.

``--resume snapshot`` restores every rank from its node's snapshot process (``restore_from_node``) and, when that
fails (no snapshot every rank holds, process unreachable), from ``latest`` of ``--ckpt-dir`` if given, following
DESIGN.md's recovery order (local snapshot -> ... -> last universal checkpoint). A log line names the source used.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from regrow.checkpoint import snapshot_segment as seg
from regrow.checkpoint.format import CheckpointError
from regrow.checkpoint.memory import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.reshard import restore_trainer
from regrow.checkpoint.snapshot_protocol import TOKEN_ENV, SnapshotClient, SnapshotProcessLost, parse_address
from regrow.checkpoint.snapshot_sink import (
    SnapshotRestoreError,
    SnapshotSink,
    SnapshotSinkConfig,
    restore_from_node,
)
from regrow.comm import collectives
from regrow.launch.ckpt_cli import SNAPSHOT
from regrow.trainer.layout import build_layout
from regrow.trainer.loop import Trainer, TrainerConfig, log_line
from regrow.trainer.models import GPT
from regrow.trainer.quant import BLOCK_SIZE
from regrow.trainer.zero import _state_kind_rule

ADDRESS_ENV = "REGROW_SNAPSHOT_ADDRESS"
"""How the local launcher tells its ranks where the snapshot process listens (the token travels in TOKEN_ENV)."""
META_ESTIMATE = 1 << 20
"""Metadata room assumed per segment when sizing ``/dev/shm`` before the ranks attach (the real room, twice the
metadata plus 64 KiB, is far smaller for any model regrow trains)."""


class SnapshotStartError(RuntimeError):
    """The launcher could not start the node's snapshot process (e.g. ``/dev/shm`` too small); names the fix."""


@dataclass(kw_only=True)
class Snapshotting:
    """The in-memory snapshot settings of one ``regrow train`` run (no secrets: the token stays in the environment)."""

    every: int = 0
    """Snapshot every this many steps (``--snapshot-every``; 0: never)."""
    address: str | None = None
    """An already running snapshot process to use (``--snapshot-address``); None: the local launcher starts one."""
    resume: bool = False
    """Restore from the node's snapshot process first (``--resume snapshot``)."""
    ckpt_dir: str | None = None
    """Checkpoint root whose ``latest`` is the fallback when no snapshot can be restored (``--ckpt-dir``)."""
    shm_dir: str = "/dev/shm"
    """Where a snapshot process started by the launcher keeps its segments (``--snapshot-shm-dir``)."""
    timeout_s: float = 60.0
    """Seconds any request to the snapshot process may take."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Snapshotting | None":
        plan = cls(every=getattr(args, "snapshot_every", 0), address=getattr(args, "snapshot_address", None),
                   resume=getattr(args, "resume", None) == SNAPSHOT, ckpt_dir=getattr(args, "ckpt_dir", None),
                   shm_dir=getattr(args, "snapshot_shm_dir", "/dev/shm"))
        return plan if plan.every or plan.resume else None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                        help="snapshot every rank's shard into the node's shared memory every N steps (0: never)")
    parser.add_argument("--snapshot-address", default=None, metavar="HOST:PORT",
                        help=f"use this node's running snapshot process (token in {TOKEN_ENV}) instead of starting "
                             "one; required under torchrun")
    parser.add_argument("--snapshot-shm-dir", default="/dev/shm", help="tmpfs for the snapshots the launcher starts")


def train_argument_problems(args: argparse.Namespace, *, under_torchrun: bool) -> list[str]:
    """Every problem with the snapshot flags (reported together with the other argument problems)."""
    problems = []
    every, address = getattr(args, "snapshot_every", 0), getattr(args, "snapshot_address", None)
    resume = getattr(args, "resume", None) == SNAPSHOT
    if every < 0:
        problems.append(f"--snapshot-every={every} must be >= 0 (0 disables in-memory snapshots)")
    if address is not None:
        try:
            parse_address(address)
        except ValueError as error:
            problems.append(f"--snapshot-address: {error}")
        if not os.environ.get(TOKEN_ENV):
            problems.append(f"--snapshot-address={address} needs {TOKEN_ENV} in the environment: export the token "
                            "the snapshot process was started with")
    if (every or resume) and under_torchrun and address is None:
        flag = "--resume snapshot" if resume else f"--snapshot-every={every}"
        problems.append(f"{flag} under torchrun needs --snapshot-address HOST:PORT: torchrun kills a restarted "
                        "worker's whole session, so start `python -m regrow.checkpoint.memory --address "
                        f"127.0.0.1:0` (with {TOKEN_ENV} exported) on each node before torchrun")
    if resume and address is None and not under_torchrun and not getattr(args, "ckpt_dir", None):
        problems.append("--resume snapshot without --snapshot-address starts a new snapshot process, which holds no "
                        "snapshot: pass the address of the one the killed run used, or --ckpt-dir DIR to fall back "
                        "to its latest checkpoint")
    return problems


# ---------------------------------------------------------------------------------------------------- the launcher


def snapshot_bytes(config: TrainerConfig, world_size: int) -> int:
    """Shared-memory bytes one rank's two snapshot segments take: the shard tensors (fp32 master, 8-bit codes and
    block scales or fp32 moments) as the optimizer lays them out for ``world_size`` ranks, plus metadata room.
    Built from a model on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        torch.manual_seed(config.seed)
        model = GPT(config.model)
    layout = build_layout(model.named_parameters(), world_size=world_size, bucket_numel=config.optim.bucket_numel,
                          kind_of=_state_kind_rule(model, config.optim))
    table = []
    for group in layout.groups:
        n, name = group.shard_numel, group.kind.name
        table.append({"name": f"{name}/master", "dtype": "float32", "shape": [n]})
        if group.kind.bits == 8:
            for moment in ("exp_avg", "exp_avg_sq"):
                table.append({"name": f"{name}/{moment}_codes", "dtype": "uint8", "shape": [n]})
                table.append({"name": f"{name}/{moment}_scales", "dtype": "float32", "shape": [n // BLOCK_SIZE]})
        else:
            table += [{"name": f"{name}/{m}", "dtype": "float32", "shape": [n]} for m in ("exp_avg", "exp_avg_sq")]
    _, payload = seg.plan_tensors(table)
    return 2 * seg.segment_bytes(META_ESTIMATE, payload)


@contextlib.contextmanager
def node_snapshots(plan: Snapshotting | None, config: TrainerConfig, local_ranks: int) -> Iterator[dict[str, str]]:
    """The local launcher's side: yields the environment its ranks need (address and token), starting this node's
    snapshot process first unless ``plan.address`` names a running one, and stopping the one it started on exit.

    Sized for ``local_ranks`` ranks: a ``/dev/shm`` too small fails here, with the snapshot process's error, before
    any rank starts. Yields an empty environment when snapshots are off.
    """
    if plan is None:
        yield {}
        return
    if plan.address is not None:
        yield {ADDRESS_ENV: plan.address}  # the token is already in this process's environment
        return
    token = secrets.token_hex(32)
    expected = local_ranks * snapshot_bytes(config, local_ranks)
    try:
        process = start_snapshot_process(SnapshotProcessConfig(shm_dir=plan.shm_dir, expected_bytes=expected),
                                         token=token)
    except RuntimeError as error:
        raise SnapshotStartError(f"--snapshot-every={plan.every}: {error}\n(or lower --nproc, or drop "
                                 "--snapshot-every)") from error
    print(f"[launcher] snapshot process job {process.job} at {process.address} (pid {process.process.pid}), "
          f"{expected / 2**20:.1f} MiB of {plan.shm_dir} for {local_ranks} ranks", flush=True)
    try:
        yield {ADDRESS_ENV: process.address, TOKEN_ENV: token}
    finally:
        code = process.stop()
        print(f"[launcher] snapshot process job {process.job} stopped (exit code {code})", flush=True)


# ---------------------------------------------------------------------------------------------------- each rank


def _reachable(trainer: Trainer, address: str, timeout_s: float) -> bool:
    """True on every rank when every rank reaches the snapshot process (one all-reduce), so that all ranks take the
    same branch and none waits alone in ``restore_from_node``'s collective."""
    try:
        SnapshotClient(address, timeout_s=timeout_s).close()
        failed = 0
    except (SnapshotProcessLost, OSError, RuntimeError) as error:
        log_line(trainer.rank, trainer.step, f"snapshot: process at {address} unreachable ({error})")
        failed = 1
    if trainer.world_size > 1:
        flag = torch.tensor([failed], dtype=torch.int64)
        collectives.all_reduce(flag, group=None, timeout_s=trainer.config.optim.timeout_s,
                               op=torch.distributed.ReduceOp.MAX)
        failed = int(flag.item())
    return not failed


def restore(trainer: Trainer, plan: Snapshotting, address: str) -> str:
    """Restores ``trainer`` from the node's snapshot process, else from ``latest`` of ``plan.ckpt_dir``; returns
    the source used (``"snapshot"`` or the checkpoint path). Collective. Raises naming both failures when neither
    source works."""
    reason = ""
    if _reachable(trainer, address, plan.timeout_s):
        try:
            result = restore_from_node(trainer, address, timeout_s=plan.timeout_s)
            log_line(trainer.rank, trainer.step, f"resume: source snapshot (node process {address}, step "
                                                 f"{result.step})")
            return SNAPSHOT
        except SnapshotRestoreError as error:
            reason = str(error)
    else:
        reason = f"snapshot process at {address} unreachable"
    if not plan.ckpt_dir:
        raise SnapshotRestoreError(f"--resume snapshot: {reason}; pass --ckpt-dir DIR to fall back to its latest "
                                   "checkpoint")
    try:
        loaded = restore_trainer(trainer, "latest", root=plan.ckpt_dir)
    except CheckpointError as error:
        raise SnapshotRestoreError(f"--resume snapshot: {reason}; fallback --ckpt-dir={plan.ckpt_dir} failed too: "
                                   f"{error}") from error
    log_line(trainer.rank, trainer.step, f"resume: source checkpoint {loaded.path} (no snapshot: {reason})")
    return str(loaded.path)


def prepare(trainer: Trainer, plan: Snapshotting) -> SnapshotSink | None:
    """Each rank's wiring: restores if ``--resume snapshot``, then attaches a :class:`SnapshotSink` if snapshots are
    on (attaching now, so a full ``/dev/shm`` fails before the first step). Collective. The address comes from the
    launcher (``REGROW_SNAPSHOT_ADDRESS``) or ``--snapshot-address``; the token from ``REGROW_SNAPSHOT_TOKEN``."""
    address = plan.address or os.environ.get(ADDRESS_ENV)
    if address is None:
        raise RuntimeError(f"{ADDRESS_ENV} is not set: the launcher sets it when --snapshot-every or --resume "
                           "snapshot is given (under torchrun, pass --snapshot-address)")
    if plan.resume:
        restore(trainer, plan, address)
    if not plan.every:
        return None
    sink = SnapshotSink(SnapshotSinkConfig(address=address, every=plan.every, timeout_s=plan.timeout_s),
                        rank=trainer.rank)
    sink.attach(trainer.shard_state())
    trainer.sinks.append(sink)
    return sink
