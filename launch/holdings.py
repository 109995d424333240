"""What a starting rank finds to resume from, and whether the whole job holds a state.

Every start of a rank that may be a restart (torchrun's worker, the own-loop ``Guard`` under any launcher) asks the
ground truth rather than a restart counter: what its node's snapshot process holds and what the checkpoint root
holds. The ranks agree (:func:`job_holds_state`) so that either all of them restore, collectively, or none does;
:func:`resumed_plans` turns the answer into the checkpoint and snapshot settings of that start.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from regrow.checkpoint.snapshot.protocol import SnapshotClient, SnapshotProcessLost
from regrow.checkpoint.universal import verify
from regrow.comm import collectives
from regrow.launch.options import CheckpointOptions, SnapshotOptions

NODE_HELPER = "python -m regrow.launch.torchrun node"
"""The command that starts a node's snapshot process before torchrun (``launch/torchrun.py``)."""


@dataclasses.dataclass(frozen=True)
class Holdings:
    """What this rank found that a restore could start from (descriptions; empty lists: nothing)."""

    snapshots: list[str]
    checkpoint: str | None

    def any(self) -> bool:
        return bool(self.snapshots or self.checkpoint)


def local_holdings(rank: int, address: str | None, ckpt_dir: str | None, timeout_s: float) -> Holdings:
    """What this rank's node snapshot process holds of ``rank`` (slots with a step, complete coded buffers) and the
    ``latest`` of ``ckpt_dir``. Raises :class:`SnapshotProcessLost` naming the fix when the process is unreachable:
    the snapshot sink could not attach to it either."""
    snapshots: list[str] = []
    if address is not None:
        try:
            client = SnapshotClient(address, timeout_s=timeout_s)
        except SnapshotProcessLost as error:
            raise SnapshotProcessLost(f"snapshot process {address}: {error}; start the node's snapshot process "
                                      f"before torchrun (`{NODE_HELPER} -- torchrun ...`) and keep it running "
                                      "across restarts") from error
        try:
            # A rank that never attached has no slots; a slot that does not verify cannot be restored either.
            slots = client.request({"op": "latest", "rank": rank})["slots"]
            snapshots += [f"slot {s['slot']} step {s['step']}" for s in slots if s["status"] == "ok"]
            complete = client.request({"op": "ec_status"})["complete"]  # [] when erasure coding is off
            snapshots += [f"erasure-coded buffer step {step}" for step in complete]
        finally:
            client.close()
    newest = verify.newest_candidate(Path(ckpt_dir)) if ckpt_dir else None
    return Holdings(snapshots=snapshots, checkpoint=str(newest) if newest else None)


def job_holds_state(world_size: int, mine: Holdings, timeout_s: float) -> bool:
    """True when any rank found something to restore. Collective: every rank gets the same answer, so that either
    all of them call the (collective) restore or none does."""
    if world_size == 1:
        return mine.any()
    flag = torch.tensor([1 if mine.any() else 0], dtype=torch.int64)
    collectives.all_reduce(flag, group=None, timeout_s=timeout_s, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def resumed_plans(holds_state: bool, *, checkpointing: CheckpointOptions | None,
                  snapshotting: SnapshotOptions | None, start_from: str | None, ckpt_dir: str | None
                  ) -> tuple[CheckpointOptions | None, SnapshotOptions | None]:
    """The checkpoint and snapshot settings of this start: restore through the snapshot process (which falls back to
    ``latest`` of ``ckpt_dir``) when the job holds a state and snapshots are on; ``latest`` of ``ckpt_dir`` when
    they are off; else ``start_from`` (``--resume DIR``) or step 0. Exactly one of the two restores at most."""
    if snapshotting is not None:
        snapshotting = dataclasses.replace(snapshotting, resume=holds_state)
    resume = None
    if holds_state and snapshotting is None:
        resume = "latest"
    elif not holds_state:
        resume = start_from
    if resume is None:
        checkpointing = dataclasses.replace(checkpointing, resume=None) if checkpointing else None
    else:
        checkpointing = dataclasses.replace(checkpointing or CheckpointOptions(ckpt_dir=ckpt_dir), resume=resume)
    return checkpointing, snapshotting


__all__ = ["Holdings", "job_holds_state", "local_holdings", "resumed_plans"]
