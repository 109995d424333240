"""ZeRO stage 3's working parameters of one group: this rank's slices, and each bucket's full parameters only while
they are gathered.

At stages 1 and 2 every rank keeps the whole flat buffer of working parameters (``GroupShard.flat_params``). At stage
3 a rank keeps none between steps: a bucket's full parameters are all-gathered into :meth:`ShardedParams.target`
from every rank's slice of its master shard, cast as it is sent (``GroupShard.params_to_gather``), right before they
are used, and freed afterwards. (FSDP2 casts its sharded fp32 parameters for each all-gather the same way.)

How the parameters survive being freed: each parameter is, once and for good, a view of its bucket's full tensor.
Freeing resizes that tensor's storage to zero bytes (the views stay valid objects; reading one raises), and a
gather resizes it back and writes into it. Tensors that autograd saved in the forward (a linear layer saves its
weight) are such views, so after the gather before the backward they read the gathered values again. Autograd does
not see the gather as an in-place change of a saved weight: a parameter is made a view with ``param.data = view``,
which keeps the parameter's own version counter, so writes into the bucket's tensor do not bump it.
"""

from __future__ import annotations

import torch

from regrow.trainer.zero.layout import GroupLayout, ParamSlot


class ShardedParams:
    """Stage 3 storage of one group's working parameters (see the module docstring).

    Contract: :meth:`view` gives each parameter's view once (at adoption); :meth:`target` is where a gather writes a
    bucket (allocating it if freed); :meth:`free` releases a bucket's memory.
    """

    def __init__(self, layout: GroupLayout, dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.dtype = dtype
        self._nbytes = [bucket.size * dtype.itemsize for bucket in layout.buckets]
        # Each bucket's tensor is made and freed at once: a model is adopted one bucket at a time.
        self.full: list[torch.Tensor] = []
        for bucket in layout.buckets:
            self.full.append(torch.empty(bucket.size, dtype=dtype, device=device))
            self.full[-1].untyped_storage().resize_(0)
        self.gathered = [False] * len(layout.buckets)

    def view(self, slot: ParamSlot) -> torch.Tensor:
        """Parameter ``slot`` as a view of its bucket's full tensor."""
        start = slot.offset - self.layout.buckets[slot.bucket].start
        return self.full[slot.bucket][start : start + slot.numel].view(slot.shape)

    def target(self, index: int) -> torch.Tensor:
        """Bucket ``index``'s full tensor to gather into, allocated if it was freed."""
        if not self.gathered[index]:
            self.full[index].untyped_storage().resize_(self._nbytes[index])
            self.gathered[index] = True
        return self.full[index]

    def free(self, index: int) -> None:
        """Releases bucket ``index``'s full parameters (its views then hold no memory until the next gather)."""
        if self.gathered[index]:
            self.full[index].untyped_storage().resize_(0)
            self.gathered[index] = False

    def free_all(self) -> None:
        for index in range(len(self.full)):
            self.free(index)

    def gathered_bytes(self) -> int:
        """Bytes of full parameters currently held (for tests and memory reports)."""
        return sum(n for n, held in zip(self._nbytes, self.gathered, strict=True) if held)
