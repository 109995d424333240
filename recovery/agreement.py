"""How the ranks of a job agree during a restore: small collectives over the default process group.

A restore must end with every rank at the same step from compatible sources, so every choice is agreed: which
steps each rank holds, whether every rank managed to read its part. Each function is collective (every rank calls
it in the same order) and a no-op at world size 1.
"""

from __future__ import annotations

import torch

from regrow.comm import collectives

MAX_CANDIDATES = 8
"""Steps one rank may offer per source in the agreement (2 slots, a few complete coded buffers)."""


def gather_steps(steps: list[int], world_size: int, timeout_s: float) -> list[set[int]]:
    """Every rank's ``steps`` (its newest :data:`MAX_CANDIDATES`), in rank order."""
    mine = sorted(steps, reverse=True)[:MAX_CANDIDATES]
    if world_size == 1:
        return [set(mine)]
    local = torch.full((MAX_CANDIDATES,), -1, dtype=torch.int64)
    local[: len(mine)] = torch.tensor(mine, dtype=torch.int64)
    everyone = torch.empty(MAX_CANDIDATES * world_size, dtype=torch.int64)
    collectives.all_gather(everyone, local, group=None, timeout_s=timeout_s)
    return [{int(s) for s in row if s >= 0} for row in everyone.view(world_size, MAX_CANDIDATES)]


def newest_common(sets: list[set[int]]) -> int | None:
    """The newest step in every set (None: none is)."""
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def all_ranks_ok(ok: bool, world_size: int, timeout_s: float) -> bool:
    """Whether ``ok`` holds on every rank."""
    if world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    collectives.all_reduce(flag, group=None, timeout_s=timeout_s, op=torch.distributed.ReduceOp.MAX)
    return not int(flag.item())


def newest_held_by_all(steps: list[int], world_size: int, timeout_s: float) -> int:
    """The newest of ``steps`` that every rank holds (-1: none). Two all-reduces: the smallest of every rank's
    newest step, then whether any rank lacks it."""
    newest = max(steps, default=-1)
    if world_size == 1:
        return newest
    flag = torch.tensor([newest], dtype=torch.int64)
    collectives.all_reduce(flag, group=None, timeout_s=timeout_s, op=torch.distributed.ReduceOp.MIN)
    agreed = int(flag.item())
    return agreed if all_ranks_ok(agreed in steps or agreed < 0, world_size, timeout_s) else -1


__all__ = ["MAX_CANDIDATES", "all_ranks_ok", "gather_steps", "newest_common", "newest_held_by_all"]
