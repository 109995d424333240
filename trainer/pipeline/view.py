"""A pipeline stage's :class:`~regrow.trainer.checkpoint_view.CheckpointView`: its parameters under the whole GPT's
names, the shared copies another holder writes, and its record (see ``trainer/checkpoint_view.py``)."""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from regrow.trainer.checkpoint_view import CheckpointView, StageRecord
from regrow.trainer.models import GPT, GPTConfig, GPTStage
from regrow.trainer.pipeline.shared import SharedParam, norm_skip


def whole_model_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole GPT of ``config`` and its shape (the tied head listed once, as ``wte.weight``),
    from a model built on the meta device: no memory, no initialization. Built once per config."""
    return dict(_shapes(json.dumps(dataclasses.asdict(config), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _shapes(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        whole = GPT(GPTConfig(**json.loads(config_json)))
    return tuple((name, tuple(param.shape)) for name, param in whole.named_parameters())


def stage_view(module: GPTStage, shared: list[SharedParam], record: StageRecord, *, shard_rank: int,
               model: dict[str, tuple[int, ...]] | None) -> CheckpointView:
    """The view of stage ``record.stage`` holding ``module``: a copy is written by its owner only (the copies left
    out of the gradient norm are exactly those: ``shared.norm_skip``)."""
    names = {local: name for local, name in module.global_names().items() if local != name}
    return CheckpointView(shard_rank=shard_rank, names=names, copies=frozenset(norm_skip(shared, record.stage)),
                          stage=record, model=model)


__all__ = ["stage_view", "whole_model_shapes"]
