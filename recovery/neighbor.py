"""Rebuilding a lost pipeline stage from its neighbours, without a snapshot (CheckFree and CheckFree+).

Following "All is Not Lost: LLM Recovery without Checkpoints" (Blagoev et al., 2025):

- **CheckFree** (an intermediate stage i): its weights become ``(a * W[i+1] + b * W[i-1]) / (a + b)`` with
  ``a = ||g[i+1]|| + eps`` and ``b = ||g[i-1]|| + eps``, the L2 norms of the neighbours' last gradients after
  clipping. Block j of stage i is averaged from block j of each neighbour (:func:`param_sources` is the explicit
  mapping; stages hold equally many blocks). Copies of shared parameters (CheckFree+ replicas of the embedding or
  head on stage 1 or S-2) are copied from the neighbour that holds them.
- **CheckFree+** (an edge stage, trained with swapped stage order on odd micro-batches): stage 0 copies stage 1, and
  stage S-1 copies stage S-2, including the replicated embedding or final norm and head.

The rebuilt stage starts with a fresh optimizer (zero moments, step 0) and its learning rate scaled by
``NeighborConfig.lr_scale``. The neighbours send their fp32 master weights, gradient norm, step and data cursor
point-to-point to the replacement in their own data-parallel replica.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from regrow.trainer.data import DataCursor
from regrow.trainer.log import log_line
from regrow.trainer.pipeline.p2p import Transfers
from regrow.trainer.pipeline.shared import stage_roles
from regrow.trainer.pipeline.trainer import PipelineTrainer

FALLBACK = "restore the last universal (disk) checkpoint instead"
_HEADER_TAG, _WEIGHTS_TAG = 0, 1


class NeighborRecoveryError(RuntimeError):
    """A stage cannot be rebuilt from its neighbours; the message names why and the fallback."""


@dataclass(kw_only=True)
class NeighborConfig:
    """Settings of a neighbour rebuild."""

    eps: float = 1e-8
    """Added to each neighbour's gradient norm, so two zero norms average evenly instead of dividing by zero."""
    lr_scale: float = 1.1
    """Factor on the rebuilt stage's learning rate from the rebuild on (the paper's 1.1)."""

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"NeighborConfig.eps={self.eps!r} must be a finite number > 0")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f"NeighborConfig.lr_scale={self.lr_scale!r} must be a finite number > 0")


@dataclass(frozen=True)
class RebuildPlan:
    """How stage ``lost`` is rebuilt: ``"average"`` of ``sources`` = (i-1, i+1), or ``"copy"`` of ``sources`` = (n,)."""

    lost: int
    mode: str
    sources: tuple[int, ...]


def plan_rebuild(lost: int, n_stages: int, lost_stages: Collection[int], checkfree_plus: bool) -> RebuildPlan:
    """Which neighbours rebuild stage ``lost``; raises :class:`NeighborRecoveryError` (naming the fallback) when
    they cannot: a pipeline of one stage, an edge stage without CheckFree+, or a needed neighbour also lost."""
    if not 0 <= lost < n_stages:
        raise ValueError(f"lost stage {lost} is outside the {n_stages} pipeline stages")
    if n_stages < 2:
        raise NeighborRecoveryError(f"stage {lost} has no neighbours (a single-stage pipeline); {FALLBACK}")
    gone = set(lost_stages) | {lost}
    if 0 < lost < n_stages - 1:
        missing = [s for s in (lost - 1, lost + 1) if s in gone]
        if missing:
            both = "both neighbours" if len(missing) == 2 else "neighbour"
            raise NeighborRecoveryError(
                f"stage {lost} cannot be averaged from its neighbours: {both} {missing} also lost; {FALLBACK}"
            )
        return RebuildPlan(lost, "average", (lost - 1, lost + 1))
    if not checkfree_plus:
        raise NeighborRecoveryError(
            f"stage {lost} is an edge stage: averaging needs two neighbours, and copying one needs training with "
            f"PipelineConfig.checkfree_plus=True; {FALLBACK}"
        )
    neighbour = 1 if lost == 0 else n_stages - 2
    if neighbour in gone:
        raise NeighborRecoveryError(f"edge stage {lost} cannot be copied: its neighbour {neighbour} is also lost; "
                                    f"{FALLBACK}")
    return RebuildPlan(lost, "copy", (neighbour,))


def param_sources(
    plan: RebuildPlan, lost_names: list[str], n_stages: int, checkfree_plus: bool
) -> dict[str, list[tuple[int, str]]]:
    """The explicit name mapping of a rebuild: lost stage's local name -> ``(source stage, source local name)``.

    ``blocks.<j>.<rest>`` (global block ``lost * k + j``) comes from ``blocks.<j>.<rest>`` of every source (global
    block ``source * k + j``); an embedding or head copy comes from the first source that holds one too.
    """
    holds = {s: stage_roles(n_stages, s, checkfree_plus) for s in plan.sources}
    embed_names, head_names = ("wte.weight", "wpe.weight"), ("ln_f.weight", "lm_head.weight")
    mapping: dict[str, list[tuple[int, str]]] = {}
    for name in lost_names:
        if name.startswith("blocks."):
            mapping[name] = [(s, name) for s in plan.sources]
            continue
        role = 0 if name in embed_names else 1 if name in head_names else None
        holders = [s for s in plan.sources if role is not None and holds[s][role]]
        if not holders:
            raise NeighborRecoveryError(f"no neighbour of stage {plan.lost} holds a copy of {name}; {FALLBACK}")
        mapping[name] = [(holders[0], name)]
    return mapping


def average_weights(
    previous: torch.Tensor, following: torch.Tensor, previous_norm: float, following_norm: float, eps: float
) -> torch.Tensor:
    """CheckFree's rule for one tensor: ``(a * W[i+1] + b * W[i-1]) / (a + b)``, ``a = ||g[i+1]|| + eps``,
    ``b = ||g[i-1]|| + eps``."""
    if not (math.isfinite(previous_norm) and math.isfinite(following_norm)):
        raise NeighborRecoveryError(
            f"neighbour gradient norms {previous_norm} and {following_norm} must be finite (a neighbour that has not "
            f"completed a step since its own rebuild cannot weight an average); {FALLBACK}"
        )
    a, b = following_norm + eps, previous_norm + eps
    return (a * following + b * previous) / (a + b)


def rebuild_from_neighbors(trainer: PipelineTrainer, plan: RebuildPlan, config: NeighborConfig) -> dict | None:
    """Rebuilds ``plan.lost`` in every data-parallel replica at a step boundary.

    Call on every rank with the same plan (ranks of other stages return at once). Ranks of a source stage gather
    their stage's fp32 masters (a collective over that stage's DP group) and send the needed tensors, gradient norm,
    step and data cursor to the lost stage's rank of their replica; the lost stage's ranks receive, combine and
    :meth:`~PipelineTrainer.rebuild`. Returns, on the lost stage's ranks, what was used (norms, sources).
    """
    stage = trainer.stage
    if stage != plan.lost and stage not in plan.sources:
        return None
    n_stages, checkfree_plus = trainer.n_stages, trainer.config.pipeline.checkfree_plus
    lost_shapes = _lost_stage_shapes(trainer, plan)
    mapping = param_sources(plan, list(lost_shapes), n_stages, checkfree_plus)
    transfers = Transfers(trainer.groups.pp, trainer.timeout_s)
    if stage in plan.sources:
        weights = trainer.stage_weights()
        step, cursor, tokens = trainer.progress()
        header = torch.tensor([trainer.stage_grad_norm, step, cursor.epoch, cursor.index, tokens], dtype=torch.float64)
        wanted = [source_name for name in sorted(mapping) for s, source_name in mapping[name] if s == stage]
        flat = torch.cat([weights[n].reshape(-1).float() for n in wanted]).to(trainer.device)
        replacement = trainer.topology.rank_of(dp=trainer.dp, pp=plan.lost)
        transfers.send(header.to(trainer.device), replacement, _HEADER_TAG)
        transfers.send(flat, replacement, _WEIGHTS_TAG)
        transfers.wait_sends()
        return None
    received = {}
    for source in plan.sources:
        names = [name for name in sorted(mapping) if any(s == source for s, _ in mapping[name])]
        header = torch.empty(5, dtype=torch.float64, device=trainer.device)
        flat = torch.empty(sum(lost_shapes[n].numel() for n in names), dtype=torch.float32, device=trainer.device)
        src = trainer.topology.rank_of(dp=trainer.dp, pp=source)
        transfers.recv(header, src, _HEADER_TAG)
        transfers.recv(flat, src, _WEIGHTS_TAG)
        pieces = flat.cpu().split([lost_shapes[n].numel() for n in names])
        received[source] = (header.cpu().tolist(), {n: p.view(lost_shapes[n]) for n, p in zip(names, pieces)})
    weights = _combine(plan, mapping, received, config.eps)
    norm, step, epoch, index, tokens = received[plan.sources[0]][0]
    progress = (int(step), DataCursor(epoch=int(epoch), index=int(index)), int(tokens))
    trainer.rebuild(weights, config.lr_scale, progress)
    norms = {source: received[source][0][0] for source in plan.sources}
    log_line(trainer.rank, int(step), f"recovery: stage {plan.lost} rebuilt by {plan.mode} of stages "
             f"{list(plan.sources)} (gradient norms {norms}), fresh optimizer, lr x {config.lr_scale}")
    return {"mode": plan.mode, "sources": list(plan.sources), "norms": norms, "step": int(step)}


def _lost_stage_shapes(trainer: PipelineTrainer, plan: RebuildPlan) -> dict[str, torch.Size]:
    """The lost stage's local names and shapes, known to every participant from the configuration alone."""
    config = trainer.config
    embed, head = stage_roles(trainer.n_stages, plan.lost, config.pipeline.checkfree_plus)
    model = config.train.model
    shapes = {}
    if embed:
        shapes["wte.weight"] = torch.Size((model.vocab_size, model.d_model))
        shapes["wpe.weight"] = torch.Size((model.seq_len, model.d_model))
    for name, param in trainer.module.blocks.named_parameters():
        shapes[f"blocks.{name}"] = param.shape  # every stage holds the same blocks (equal stages)
    if head:
        shapes["ln_f.weight"] = torch.Size((model.d_model,))
        shapes["lm_head.weight"] = torch.Size((model.vocab_size, model.d_model))
    return shapes


def _combine(
    plan: RebuildPlan,
    mapping: dict[str, list[tuple[int, str]]],
    received: dict[int, tuple[list[float], dict[str, torch.Tensor]]],
    eps: float,
) -> dict[str, torch.Tensor]:
    """The rebuilt weights: averaged where a name has two sources (blocks of an intermediate stage), else copied."""
    weights = {}
    for name, sources in mapping.items():
        if len(sources) == 2:
            (prev, _), (following, _) = sources
            weights[name] = average_weights(
                received[prev][1][name], received[following][1][name],
                received[prev][0][0], received[following][0][0], eps,
            )
        else:
            weights[name] = received[sources[0][0]][1][name].clone()
    return weights
