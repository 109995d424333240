"""The data-parallel process group that shards the ZeRO optimizer's state, and the collectives run over it.

Every collective here runs with the optimizer's timeout (``ZeroConfig.timeout_s``) and, with one rank (or no process
group at all), reduces to a local copy. All ranks of the group must call them in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from regrow.comm import collectives
from regrow.trainer.zero.layout import GroupLayout
from regrow.trainer.zero.shard import GroupShard


class Reduction:
    """One bucket's reduce-scatter in flight; :meth:`accumulate` waits and adds the mean into the gradient shard."""

    def __init__(
        self, pending: collectives.Pending | None, out: torch.Tensor, target: torch.Tensor, world_size: int
    ) -> None:
        self.pending, self.out, self.target, self.world_size = pending, out, target, world_size

    def done(self) -> bool:
        return self.pending is None or self.pending.done()

    def accumulate(self) -> None:
        if self.pending is not None:
            self.pending.wait()
        if self.world_size == 1:
            # Nothing to divide. A bf16 gradient is upcast by add_ itself as it adds (exactly as adding its
            # .float()): no fp32 temporary, one pass over the bucket instead of two (a single replica's step).
            self.target.add_(self.out)
            return
        reduced = self.out.float()
        reduced.div_(self.world_size)
        self.target.add_(reduced)


class ShardComm:
    """``group`` (None: the default group, or a single process without one) as the optimizer sees it: this rank's
    place in it, which the layout was built for, and the collectives over shards."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.group = group
        self.timeout_s = timeout_s

    def rebind(self, group: dist.ProcessGroup | None) -> None:
        """Uses ``group`` from now on: it must hold this rank at the same rank and size (a re-formed world)."""
        size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank(group) if size > 1 else 0
        if (size, rank) != (self.world_size, self.rank):
            raise ValueError(f"ZeroOptimizer.rebind_groups: the new group has this rank as {rank} of {size}, the "
                             f"shards were laid out for {self.rank} of {self.world_size}")
        self.group = group

    def release(self) -> None:
        """Drops the reference to the group, so that destroying it closes its connections; :meth:`rebind` before
        the next collective."""
        self.group = None

    def reduce_scatter(self, shard: GroupShard, bucket_index: int, staging: torch.Tensor) -> Reduction:
        """Starts reducing one bucket's full gradient ``staging`` into this rank's piece of ``shard.grad``."""
        _, local_start, length = shard.pieces[bucket_index]
        target = shard.grad[local_start : local_start + length]
        if self.world_size == 1:
            return Reduction(None, staging, target, 1)
        out = torch.empty(length, dtype=staging.dtype, device=staging.device)
        pending = collectives.reduce_scatter(out, staging, group=self.group, timeout_s=self.timeout_s, async_op=True)
        return Reduction(pending, out, target, self.world_size)

    def all_gather_params(self, shard: GroupShard) -> None:
        """Every rank's slices of the working parameters into every rank's ``shard.flat_params``, bucket by bucket
        (stages 1 and 2)."""
        if self.world_size == 1:
            return
        assert shard.flat_params is not None, "stage 3 gathers bucket by bucket (gather_bucket)"
        pendings = [
            collectives.all_gather(
                shard.flat_params[bucket.start : bucket.start + bucket.size],
                shard.owned_params(*piece),
                group=self.group,
                timeout_s=self.timeout_s,
                async_op=True,
            )
            for bucket, piece in zip(shard.layout.buckets, shard.pieces)
        ]
        for pending in pendings:
            pending.wait()

    def gather_bucket(self, shard: GroupShard, index: int) -> collectives.Pending | None:
        """Stage 3: starts gathering bucket ``index`` of ``shard`` from every rank's slice into its full tensor
        (allocated first if it was freed); returns the collective to wait for (None: done, one rank)."""
        assert shard.sharded is not None, "stages 1 and 2 keep every bucket gathered (all_gather_params)"
        target = shard.sharded.target(index)
        if self.world_size == 1:
            target.copy_(shard.master_piece(index))  # cast as copied: the same values as the slice a rank sends
            return None
        return collectives.all_gather(target, shard.params_to_gather(index), group=self.group,
                                      timeout_s=self.timeout_s, async_op=True)

    def all_gather_full(self, layout: GroupLayout, local: torch.Tensor) -> torch.Tensor:
        """The full flat tensor of a group from every rank's shard ``local`` of it, in layout order (a tensor of
        block scales comes back with one element per 256-element block)."""
        ratio = layout.shard_numel // local.numel()  # 1 for per-element tensors, 256 for block scales
        everything = torch.empty(local.numel() * self.world_size, dtype=local.dtype, device=local.device)
        if self.world_size == 1:
            everything.copy_(local)
        else:
            collectives.all_gather(everything, local, group=self.group, timeout_s=self.timeout_s)
        full = torch.empty_like(everything)
        by_rank = everything.view(self.world_size, -1)
        for rank in range(self.world_size):
            for start, local_start, length in layout.shard_pieces(rank):
                a, b, n = start // ratio, local_start // ratio, length // ratio
                full[a : a + n] = by_rank[rank, b : b + n]
        return full

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sums ``tensor`` over the group in place."""
        if self.world_size > 1:
            collectives.all_reduce(tensor, group=self.group, timeout_s=self.timeout_s)
