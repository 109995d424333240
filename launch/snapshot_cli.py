"""The in-memory snapshot side of ``regrow train``: ``--snapshot-every``, ``--snapshot-address``, ``--resume
snapshot``, and the local launcher's simulated nodes and erasure coding (``--nodes``, ``--ec-group-size``,
``--ec-parity``).

Who owns the node's snapshot process (docs/snapshot-protocol.md: it must outlive the ranks):

- **Local launcher** (``regrow train --nproc N [--nodes M]``, :func:`regrow.launch.local.spawn.run_local`): the
  ``regrow train`` process is the parent of every rank and outlives them, so it starts one snapshot process per
  node (:func:`node_snapshots`, ``launch/local/nodes.py``) with a fresh ``secrets.token_hex(32)`` token, hands address
  and token to each rank through its environment (``run_local``'s ``rank_envs``, sent over the spawn pipe, never
  argv), replaces and rebuilds a lost node's process between attempts (``--max-restarts``), and stops them all
  (SIGTERM: they remove their segments) when the run ends, however it ends.
- **torchrun**: no process of ours outlives a torchrun restart. The elastic agent starts every worker in its own
  session and ``killpg``s that session on a restart, so a snapshot process started by ``LOCAL_RANK`` 0 would die
  with the very ranks it is meant to outlive. Under torchrun the snapshot process is therefore started before
  torchrun on each node (``python -m regrow.checkpoint.node --address 127.0.0.1:0`` with
  ``REGROW_SNAPSHOT_TOKEN`` exported, which torchrun passes on to its workers) and given with
  ``--snapshot-address``.
- ``--snapshot-address`` also works with the local launcher: the process is then used, never started or stopped,
  which is what lets a later ``regrow train --resume snapshot`` find the snapshots of a run that was killed.

``--resume snapshot`` (and every restart) restores all ranks through
``checkpoint.snapshot_recovery.restore_job``, following DESIGN.md's recovery order: the newest step every rank
holds in its node's snapshot slots, else in the nodes' erasure-coded buffers, else ``latest`` of ``--ckpt-dir``.
A log line names the source used and why better ones were passed over.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from regrow.checkpoint.node.persist import PersistConfig
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, parse_address, request_once
from regrow.checkpoint.snapshot.sink import SnapshotSink, SnapshotSinkConfig
from regrow.launch.ckpt_cli import SNAPSHOT
from regrow.launch.local.nodes import ADDRESS_ENV, LocalNodes, NodesConfig
from regrow.recovery.order import JobRestore, Source
from regrow.recovery.restore import restore_job
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.models import GPT
from regrow.trainer.zero.config import state_kind_rule
from regrow.trainer.zero.layout import build_layout
from regrow.trainer.zero.shard import shard_table

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
    nodes: int = 1
    """Simulated nodes of the local launcher, each with its own snapshot process (``--nodes``)."""
    ec_group_size: int = 0
    """Nodes per erasure-coding group (``--ec-group-size``; 0: off)."""
    ec_parity: int = 1
    """Nodes of a group that may be lost at once (``--ec-parity``)."""
    persist_every: int = 0
    """The snapshot processes write a universal checkpoint under ``ckpt_dir`` every this many steps from the ranks'
    snapshots, at no cost to the ranks (``--persist-every``; 0: off)."""
    keep_last: int = 2
    """Checkpoints the snapshot processes keep (``--keep-last``)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Snapshotting | None":
        plan = cls(every=getattr(args, "snapshot_every", 0), address=getattr(args, "snapshot_address", None),
                   resume=getattr(args, "resume", None) == SNAPSHOT, ckpt_dir=getattr(args, "ckpt_dir", None),
                   shm_dir=getattr(args, "snapshot_shm_dir", "/dev/shm"), nodes=getattr(args, "nodes", 1),
                   ec_group_size=getattr(args, "ec_group_size", 0), ec_parity=getattr(args, "ec_parity", 1),
                   persist_every=getattr(args, "persist_every", 0), keep_last=getattr(args, "keep_last", 2))
        return plan if plan.every or plan.resume else None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                        help="snapshot every rank's shard into the node's shared memory every N steps (0: never)")
    parser.add_argument("--snapshot-address", default=None, metavar="HOST:PORT",
                        help=f"use this node's running snapshot process (token in {TOKEN_ENV}) instead of starting "
                             "one; required under torchrun")
    parser.add_argument("--snapshot-shm-dir", default="/dev/shm", help="tmpfs for the snapshots the launcher starts")
    parser.add_argument("--nodes", type=int, default=1, metavar="M",
                        help="split the local ranks into M simulated nodes, each with its own snapshot process")
    parser.add_argument("--ec-group-size", type=int, default=0, metavar="N",
                        help="erasure-code the snapshots across groups of N nodes (0: off)")
    parser.add_argument("--ec-parity", type=int, default=1, metavar="P",
                        help="nodes of an erasure-coding group that may be lost at once")
    parser.add_argument("--persist-every", type=int, default=0, metavar="K",
                        help="the snapshot processes write a universal checkpoint to --ckpt-dir every K steps from "
                             "the snapshots, at no cost to the ranks (0: off)")


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
                        "worker's whole session, so start `python -m regrow.checkpoint.node --address "
                        f"127.0.0.1:0` (with {TOKEN_ENV} exported) on each node before torchrun")
    nodes, group, parity = getattr(args, "nodes", 1), getattr(args, "ec_group_size", 0), getattr(args, "ec_parity", 1)
    if nodes != 1 or group:
        if address is not None or under_torchrun:
            problems.append("--nodes/--ec-group-size lay out the local launcher's own snapshot processes; with "
                            "--snapshot-address or under torchrun, start the snapshot processes with "
                            "`python -m regrow.checkpoint.node --ec-group-size N ...` instead")
        elif not every:
            problems.append("--nodes/--ec-group-size need --snapshot-every N (they lay out snapshot processes)")
        else:
            try:
                NodesConfig(ranks=getattr(args, "nproc", 1), nodes=nodes, ec_group_size=group, ec_parity=parity)
            except ValueError as error:
                problems.append(str(error).replace("NodesConfig.", "--").replace("ranks=", "--nproc="))
    persist_every = getattr(args, "persist_every", 0)
    if persist_every < 0:
        problems.append(f"--persist-every={persist_every} must be >= 0 (0: off)")
    elif persist_every:
        if not getattr(args, "ckpt_dir", None):
            problems.append(f"--persist-every={persist_every} needs --ckpt-dir DIR (where the checkpoints go)")
        if not every or persist_every % every:
            problems.append(f"--persist-every={persist_every} must be a multiple of --snapshot-every={every} (only "
                            "snapshotted steps can be persisted)")
        if getattr(args, "save_every", 0):
            problems.append("--persist-every and --save-every would both write checkpoints to --ckpt-dir: keep one "
                            "(--persist-every costs the ranks nothing)")
        if under_torchrun:
            problems.append("--persist-every configures the snapshot processes the local launcher starts; under "
                            "torchrun, give it to the node helper that starts yours: `python -m "
                            "regrow.launch.torchrun node --persist-every K --persist-dir DIR -- torchrun ...`")
        elif address is not None:
            problems.append("--persist-every configures the snapshot processes the local launcher starts; start "
                            "yours with `python -m regrow.checkpoint.node --persist-every K --persist-dir DIR`")
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
                          kind_of=state_kind_rule(model, config.optim))
    table = [{"name": key, "dtype": str(spec.dtype).removeprefix("torch."), "shape": list(spec.shape)}
             for key, spec in shard_table(layout).items()]
    _, payload = seg.plan_tensors(table)
    return 2 * seg.segment_bytes(META_ESTIMATE, payload)


def node_layout(plan: Snapshotting | None, config: TrainerConfig, ranks: int) -> NodesConfig | None:
    """The local launcher's node layout for ``plan`` (None when it starts no snapshot process: snapshots off, or
    a running one named by ``--snapshot-address``)."""
    if plan is None or plan.address is not None:
        return None
    persist = PersistConfig(persist_every=plan.persist_every, persist_dir=plan.ckpt_dir or "",
                            keep_last=plan.keep_last) if plan.persist_every else PersistConfig()
    return NodesConfig(ranks=ranks, nodes=plan.nodes, ec_group_size=plan.ec_group_size, ec_parity=plan.ec_parity,
                       shm_dir=plan.shm_dir, bytes_per_rank=snapshot_bytes(config, ranks), persist=persist)


@contextlib.contextmanager
def node_snapshots(plan: Snapshotting | None, config: TrainerConfig, ranks: int) -> Iterator[LocalNodes | None]:
    """The local launcher's side: starts one snapshot process per node (``plan.nodes``), erasure-coding groups
    formed, before any rank starts, and stops them on exit however the run ends. Yields None when it starts none
    (snapshots off, or ``--snapshot-address``: the ranks then get that address from :func:`launcher_env`).

    A ``/dev/shm`` too small for the ranks' snapshots fails here, with the snapshot process's error."""
    layout = node_layout(plan, config, ranks)
    if layout is None:
        yield None
        return
    try:
        nodes = LocalNodes(layout).__enter__()
    except RuntimeError as error:
        raise SnapshotStartError(f"--snapshot-every={plan.every if plan else 0}: {error}\n(or lower --nproc, or "
                                 "drop --snapshot-every)") from error
    try:
        yield nodes
    finally:
        nodes.stop()


def launcher_env(plan: Snapshotting | None) -> dict[str, str]:
    """What every rank needs when the snapshot process was given with ``--snapshot-address`` (the token is
    already in this process's environment)."""
    return {ADDRESS_ENV: plan.address} if plan is not None and plan.address is not None else {}


# ---------------------------------------------------------------------------------------------------- each rank


def persists(address: str, timeout_s: float) -> bool:
    """Whether the snapshot process at ``address`` persists checkpoints (``--persist-every`` of the local launcher,
    or of the torchrun node helper that started it)."""
    return bool(request_once(address, {"op": "persisted"}, timeout_s=timeout_s).get("enabled"))


def prepare(trainer: Trainer, plan: Snapshotting,
            on_restore: Callable[[JobRestore], None] | None = None) -> SnapshotSink | None:
    """Each rank's wiring: restores if ``--resume snapshot``, then attaches a :class:`SnapshotSink` if snapshots are
    on (attaching now, so a full ``/dev/shm`` fails before the first step). Collective. The address comes from the
    launcher (``REGROW_SNAPSHOT_ADDRESS``) or ``--snapshot-address``; the token from ``REGROW_SNAPSHOT_TOKEN``.
    ``on_restore`` is given the restore's result (source, step, what was passed over), e.g. for the launcher's
    fault report."""
    address = plan.address or os.environ.get(ADDRESS_ENV)
    if address is None:
        raise RuntimeError(f"{ADDRESS_ENV} is not set: the launcher sets it when --snapshot-every or --resume "
                           "snapshot is given (under torchrun, pass --snapshot-address)")
    restored = restore_job(trainer, address, ckpt_root=plan.ckpt_dir, timeout_s=plan.timeout_s) if plan.resume \
        else None
    if restored is not None and on_restore is not None:
        on_restore(restored)
    if not plan.every:
        return None
    sink = SnapshotSink(SnapshotSinkConfig(address=address, every=plan.every, timeout_s=plan.timeout_s),
                        rank=trainer.rank)
    from_slot = restored.detail if restored is not None and restored.source is not Source.CHECKPOINT else None
    sink.attach(trainer.shard_state(), restored_from=from_slot)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and persists(address, plan.timeout_s):
        # What the persisted manifests record as the run's config (the snapshot process cannot know it).
        request_once(address, {"op": "run_config", "config": trainer.config.to_dict()}, timeout_s=plan.timeout_s)
    trainer.sinks.append(sink)
    return sink
