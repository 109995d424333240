"""Settings of pipeline-parallel training (:class:`PipelineTrainerConfig`), validated with errors naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from regrow.trainer.loop import TrainerConfig
from regrow.trainer.models import GPTConfig


@dataclass(kw_only=True)
class PipelineConfig:
    """How the model is cut into stages and how the stages are scheduled."""

    stages: int = 2
    """Pipeline stages S; must divide ``model.n_layer`` (equal stages) and ``world_size`` (dp_size = world / S)."""
    checkfree_plus: bool = False
    """CheckFree+: on odd micro-batches swap stages 0 and 1 and stages S-2 and S-1 (S = 2 or S >= 4), and replicate
    the embedding on stage 1 and the final norm and head on stage S-2, so a lost edge stage can be copied from its
    neighbour."""
    timeout_s: float = 300.0
    """Seconds a point-to-point transfer may wait before it is reported as failed."""

    def __post_init__(self) -> None:
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"PipelineConfig.stages={self.stages!r} must be an integer >= 1")
        if not isinstance(self.checkfree_plus, bool):
            raise ValueError(f"PipelineConfig.checkfree_plus={self.checkfree_plus!r} must be True or False")
        if self.checkfree_plus and self.stages in (1, 3):
            raise ValueError(
                f"PipelineConfig.checkfree_plus needs stages 2 or >= 4, got stages={self.stages}: it swaps stages "
                "(0, 1) and (S-2, S-1), which must be two disjoint pairs or one pair"
            )
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"PipelineConfig.timeout_s={self.timeout_s!r} must be a finite number > 0")


def _default_train() -> TrainerConfig:
    return TrainerConfig(model=GPTConfig.preset("small"))


@dataclass(kw_only=True)
class PipelineTrainerConfig:
    """A training run (``train``: model, data, optimizer, schedule) split over a DP x PP grid (``pipeline``)."""

    train: TrainerConfig = field(default_factory=_default_train)
    """Everything a single-stage run has; ``train.data.micro_batch`` is the micro-batch size of the pipeline."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Stage count, CheckFree+, transfer timeout."""

    def __post_init__(self) -> None:
        if not isinstance(self.train.model, GPTConfig):
            raise ValueError("PipelineTrainerConfig.train.model must be a GPTConfig: the pipeline cuts regrow's GPT "
                             "into stages; train a factory's model (ModelFactory) with Trainer, data-parallel")
        stages, n_layer = self.pipeline.stages, self.train.model.n_layer
        if n_layer % stages:
            divisors = [d for d in range(1, n_layer + 1) if n_layer % d == 0]
            raise ValueError(
                f"PipelineTrainerConfig.pipeline.stages={stages} does not divide train.model.n_layer={n_layer}: "
                f"every stage must hold the same number of blocks; choose stages in {divisors}"
            )
        if stages > 1 and self.train.optim.stage == 3:
            raise ValueError(
                "PipelineTrainerConfig.train.optim.stage=3 is not supported with pipeline.stages > 1 (a stage's "
                "parameters are gathered per use at ZeRO-3, and its recovery reads whole stage weights); use "
                "train.optim.stage=1 or 2"
            )

    def micro_batches(self, world_size: int) -> int:
        """Micro-batches per replica per step for ``world_size`` ranks; raises naming the field that is wrong."""
        stages, data = self.pipeline.stages, self.train.data
        if world_size % stages:
            raise ValueError(
                f"PipelineTrainerConfig.pipeline.stages={stages} does not divide world_size={world_size}"
            )
        dp = world_size // stages
        per_step = data.micro_batch * dp
        if data.global_batch % per_step:
            raise ValueError(
                f"PipelineTrainerConfig.train.data.global_batch={data.global_batch} is not divisible by "
                f"data.micro_batch x dp_size = {data.micro_batch} x {dp}; choose a multiple of {per_step}"
            )
        micro = data.global_batch // per_step
        if micro < stages:
            raise ValueError(
                f"PipelineTrainerConfig: train.data.global_batch={data.global_batch} / (data.micro_batch="
                f"{data.micro_batch} x dp_size={dp}) = {micro} micro-batches per step is below pipeline.stages="
                f"{stages} (1F1B needs one micro-batch per stage to fill the pipeline); raise data.global_batch to "
                f"{per_step * stages} or more, or lower data.micro_batch"
            )
        return micro
