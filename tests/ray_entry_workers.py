"""Entry functions that the Ray workers of ``tests/test_ray_entry.py`` call (``regrow.tests.ray_entry_workers:...``):
the plumbing of ``regrow ray --entry`` checked without a Guard. Each writes the heartbeat and restore records a
Guard would (the launcher's own ``Heartbeat`` and ``RestoreLog``), so that the report can be checked too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from regrow.launch.chaos.records import RestoreLog
from regrow.launch.guard import GUARD_ENV
from regrow.launch.local.attempts import ATTEMPT_ENV, RUN_DIR_ENV
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.local.watchdog import Heartbeat
from regrow.recovery.order import JobRestore, Source


def report_place(steps: int = 3, die: str = "", raise_in: str = "", out: str = "") -> dict:
    """Trains nothing: checks the process group (an all-reduce of the ranks), beats once per pretend step, and
    returns what this call saw of its place (rank, world, generation, the Guard's settings, the snapshot address).
    ``die`` / ``raise_in``: ``"rank:generation"``, that rank's process exits (as a crash would) or its function
    raises, after step 1 of that generation; the other ranks then fail in their next collective. A call of
    generation g > 0 pretends to restore step 1 from a snapshot. ``out``: a folder where each call also writes
    its place (``g<generation>-r<rank>.json``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generation = int(os.environ[ATTEMPT_ENV])
    start = 0
    if generation:
        start = 1
        RestoreLog(os.environ[RUN_DIR_ENV], attempt=generation, rank=rank).restored(
            JobRestore(source=Source.SNAPSHOT, step=start, detail="pretend", lineage=""))
    beat = Heartbeat(os.environ[RUN_DIR_ENV], rank=rank, attempt=generation, step=start)
    total = torch.tensor([float(rank)])
    for step in range(start + 1, steps + 1):
        beat.before_optimizer_step()
        dist.all_reduce(total)  # a collective per step: a lost peer makes it fail
        beat.after_step(_State(step))
        if step == 1 and f"{rank}:{generation}" == die:
            os._exit(1)
        if step == 1 and f"{rank}:{generation}" == raise_in:
            raise ValueError(f"rank {rank} raises as asked")
    place = {"rank": rank, "world_size": world, "env_rank": int(os.environ["RANK"]),
             "env_world_size": int(os.environ["WORLD_SIZE"]), "generation": generation,
             "guard": json.loads(os.environ[GUARD_ENV]), "snapshot_address": os.environ.get(ADDRESS_ENV),
             "sum": total.item()}
    if out:
        Path(out, f"g{generation}-r{rank}.json").write_text(json.dumps(place))
    return place


class _State:
    """What ``Heartbeat.after_step`` reads of a ``ShardState``: its step."""

    def __init__(self, step: int) -> None:
        self.step = step


def returns_a_set() -> set[int]:
    """A return value that is not JSON: a mistake no rerun can mend."""
    return {dist.get_rank()}


NOT_CALLABLE = 3
"""An attribute that an entry point may not name."""


def takes_steps(steps: int) -> int:
    """A function whose keyword arguments are checked at the driver."""
    return steps
