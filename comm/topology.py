"""Which rank is which: data-parallel replica, pipeline stage and node.

Ranks are laid out pipeline-stage-major within a data-parallel replica and nodes hold consecutive ranks:
``rank = dp * pp_size + pp``, ``node = rank // ranks_per_node``. Keeping a replica's stages on consecutive ranks puts
the point-to-point pipeline traffic inside a node where the node is large enough.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Coord:
    """The position of one rank in the job."""

    rank: int
    dp: int
    pp: int
    node: int
    local_rank: int


@dataclass(frozen=True)
class Topology:
    """A DP x PP grid of ``world_size`` ranks spread over nodes of ``ranks_per_node`` ranks."""

    world_size: int
    pp_size: int = 1
    ranks_per_node: int = 0
    """0 means all ranks on one node."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"Topology.world_size={self.world_size} must be >= 1")
        if self.pp_size < 1 or self.world_size % self.pp_size:
            raise ValueError(f"Topology.pp_size={self.pp_size} must divide world_size={self.world_size}")
        per_node = self.ranks_per_node or self.world_size
        if per_node < 1 or self.world_size % per_node:
            raise ValueError(
                f"Topology.ranks_per_node={self.ranks_per_node} must divide world_size={self.world_size}"
            )

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pp_size

    @property
    def node_size(self) -> int:
        return self.ranks_per_node or self.world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.node_size

    def coord(self, rank: int) -> Coord:
        """The coordinates of ``rank``; raises ValueError for a rank outside the world."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside the world of {self.world_size} ranks")
        return Coord(
            rank=rank,
            dp=rank // self.pp_size,
            pp=rank % self.pp_size,
            node=rank // self.node_size,
            local_rank=rank % self.node_size,
        )

    def rank_of(self, *, dp: int, pp: int) -> int:
        """The rank that holds stage ``pp`` of replica ``dp``."""
        if not (0 <= dp < self.dp_size and 0 <= pp < self.pp_size):
            raise ValueError(f"(dp={dp}, pp={pp}) is outside the {self.dp_size} x {self.pp_size} grid")
        return dp * self.pp_size + pp

    def dp_group_ranks(self, pp: int) -> list[int]:
        """The ranks that hold stage ``pp`` in every replica: they shard that stage's optimizer state."""
        return [self.rank_of(dp=d, pp=pp) for d in range(self.dp_size)]

    def pp_group_ranks(self, dp: int) -> list[int]:
        """The ranks that form replica ``dp``'s pipeline, first stage first."""
        return [self.rank_of(dp=dp, pp=p) for p in range(self.pp_size)]

    def node_ranks(self, node: int) -> list[int]:
        """The ranks on ``node``."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node={node} is outside the {self.num_nodes} nodes")
        return list(range(node * self.node_size, (node + 1) * self.node_size))

    def stage_ranks(self, dp: int, stages: Iterable[int]) -> list[int]:
        """The ranks of replica ``dp`` that hold ``stages`` (ascending stage order): e.g. the holders of a
        parameter shared between pipeline stages."""
        return [self.rank_of(dp=dp, pp=p) for p in sorted(stages)]

    def pp_neighbors(self, pp: int) -> tuple[int | None, int | None]:
        """The stages before and after ``pp`` in the pipeline (None at an end)."""
        if not 0 <= pp < self.pp_size:
            raise ValueError(f"pp={pp} is outside the {self.pp_size} pipeline stages")
        return (pp - 1 if pp > 0 else None, pp + 1 if pp < self.pp_size - 1 else None)
