"""The process groups of a DP x PP grid: each stage's data-parallel group, each replica's pipeline group, and the
groups of stages that hold copies of one shared parameter.

``dist.new_group`` is collective over the whole world and must be called in the same order on every rank, even by
ranks that are not members: :func:`create_groups` creates every group of the grid in one fixed order and keeps the
ones this rank belongs to.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from regrow.comm.topology import Topology
from regrow.trainer.pipeline.shared import SharedParam


@dataclass
class PipelineGroups:
    """The groups one rank communicates in."""

    dp: dist.ProcessGroup
    """This rank's stage in every replica: shards the stage's optimizer state."""
    pp: dist.ProcessGroup
    """This rank's replica, all stages: point-to-point activations, the global gradient norm."""
    shared: dict[str, dist.ProcessGroup]
    """Shared parameter name -> this replica's ranks holding a copy (only parameters this rank holds)."""


def create_groups(topology: Topology, rank: int, shared: list[SharedParam], timeout_s: float) -> PipelineGroups:
    """Creates every group of the grid (collective: all ranks call it with the same arguments but their rank)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    coord = topology.coord(rank)
    dp_group = pp_group = None
    for pp in range(topology.pp_size):
        group = dist.new_group(topology.dp_group_ranks(pp), timeout=timeout)
        dp_group = group if pp == coord.pp else dp_group
    for dp in range(topology.dp_size):
        group = dist.new_group(topology.pp_group_ranks(dp), timeout=timeout)
        pp_group = group if dp == coord.dp else pp_group
    shared_groups = {}
    for family in shared:
        if len(family.stages) < 2:
            continue
        for dp in range(topology.dp_size):
            group = dist.new_group(topology.stage_ranks(dp, family.stages), timeout=timeout)
            if dp == coord.dp and coord.pp in family.stages:
                shared_groups[family.name] = group
    assert dp_group is not None and pp_group is not None
    return PipelineGroups(dp=dp_group, pp=pp_group, shared=shared_groups)
