"""Parameters that several pipeline stages hold a copy of, and the summing of their gradients.

The GPT ties its token embedding and LM head (one tensor). Split into stages, the embedding lives on the first
stage and the head on the last, so each keeps its own copy and, as Megatron-LM does, the two copies' gradients are
summed after the last micro-batch (an all-reduce between the holders), which is exactly the tied weight's gradient.
Both copies then take the same optimizer update and stay equal. CheckFree+ adds replicas the same way: the
embedding (``wte``, ``wpe``) on stage 1 and the final norm and head (``ln_f``, ``lm_head``) on stage S-2, which
run them on the micro-batches where the swapped order puts those stages first or last.

At ZeRO stage 2 a stage's gradients are reduce-scattered during the backward, so no full gradient of a copy is left
to sum; the sum is taken after the reduction instead (:func:`sum_shared_reduced_grads`, the optimizer's reduced
hook): each copy's reduced gradient is assembled from the data-parallel shards, summed over the copies, and written
back into each holder's shard. Reduction is linear, so both orders give the same gradient.

A shared parameter's first holder is its *owner*: only the owner's copy counts towards the gradient-clipping norm
(the other copies are left out with ``ZeroOptimizer(norm_skip=...)``), so the norm is the single model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from regrow.comm import collectives
from regrow.trainer.zero.optimizer import ZeroOptimizer


@dataclass(frozen=True)
class SharedParam:
    """One parameter of the full model held as several copies: ``holders`` are ``(stage, local name)``, owner first."""

    name: str
    holders: tuple[tuple[int, str], ...]

    @property
    def stages(self) -> tuple[int, ...]:
        """The distinct stages holding a copy, ascending."""
        return tuple(sorted({stage for stage, _ in self.holders}))

    def local_names(self, stage: int) -> list[str]:
        return [name for s, name in self.holders if s == stage]


def stage_roles(n_stages: int, stage: int, checkfree_plus: bool) -> tuple[bool, bool]:
    """``(embed, head)``: whether ``stage`` holds the input embedding and the final norm plus LM head."""
    embed = stage == 0 or (checkfree_plus and stage == 1)
    head = stage == n_stages - 1 or (checkfree_plus and stage == n_stages - 2)
    return embed, head


def shared_params(n_stages: int, checkfree_plus: bool) -> list[SharedParam]:
    """Every parameter with more than one copy, in one fixed order (the order of the gradient all-reduces)."""
    embedders = [s for s in range(n_stages) if stage_roles(n_stages, s, checkfree_plus)[0]]
    headers = [s for s in reversed(range(n_stages)) if stage_roles(n_stages, s, checkfree_plus)[1]]
    families = [
        SharedParam("wte.weight", tuple((s, "wte.weight") for s in embedders)
                    + tuple((s, "lm_head.weight") for s in headers)),
        SharedParam("wpe.weight", tuple((s, "wpe.weight") for s in embedders)),
        SharedParam("ln_f.weight", tuple((s, "ln_f.weight") for s in headers)),
    ]
    return [f for f in families if len(f.holders) > 1]


def norm_skip(shared: list[SharedParam], stage: int) -> list[str]:
    """The local names of ``stage``'s copies that are not their parameter's owner (left out of the norm)."""
    return [name for f in shared for s, name in f.holders[1:] if s == stage]


@torch.no_grad()
def sum_shared_reduced_grads(
    optimizer: ZeroOptimizer,
    stage: int,
    shared: list[SharedParam],
    groups: dict[str, dist.ProcessGroup],
    timeout_s: float,
) -> None:
    """:func:`sum_shared_grads` after the data-parallel reduction (ZeRO stage 2): replaces the reduced gradient of
    every shared copy on ``stage`` with the sum over all copies of its replica. Call from ``optimizer``'s reduced
    hook, on every rank (collective over the stage's data-parallel group, then ``groups[name]``)."""
    for family in shared:
        names = family.local_names(stage)
        if not names:
            continue
        total = sum(optimizer.reduced_gradient(name) for name in names)
        if len(family.stages) > 1:
            collectives.all_reduce(total, group=groups[family.name], timeout_s=timeout_s)
        for name in names:
            optimizer.set_reduced_gradient(name, total)


@torch.no_grad()
def sum_shared_grads(
    module: nn.Module,
    stage: int,
    shared: list[SharedParam],
    groups: dict[str, dist.ProcessGroup],
    timeout_s: float,
) -> None:
    """Replaces the gradient of every shared copy on ``stage`` with the sum over all copies of its replica.

    Call after the last backward of a step and before the optimizer step, on every rank (ranks holding no copy of a
    parameter skip it; the others all-reduce in the fixed order of ``shared``). ``groups[name]`` is the group of this
    replica's ranks that hold ``name``.
    """
    params = dict(module.named_parameters())
    for family in shared:
        names = family.local_names(stage)
        if not names:
            continue
        grads = [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in names]
        total = torch.stack(grads).sum(0) if len(grads) > 1 else grads[0].clone()
        if len(family.stages) > 1:
            collectives.all_reduce(total, group=groups[family.name], timeout_s=timeout_s)
        for name in names:
            if params[name].grad is None:
                params[name].grad = total.clone()
            else:
                params[name].grad.copy_(total)
