"""Pipeline parallelism: the schedule, the stage split, bad input, and equivalence with the single-process model on
real gloo process groups (2 stages x DP 2, 4 stages x DP 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from regrow.launch.local.spawn import run_local
from regrow.tests import pipeline_workers as w
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.models import GPT, GPTConfig, GPTStage, stage_blocks
from regrow.trainer.pipeline.schedule import BACKWARD, FORWARD, build_schedule, routes, swapped_route
from regrow.trainer.pipeline.shared import norm_skip, shared_params, stage_roles
from regrow.trainer.pipeline.trainer import PipelineConfig, PipelineTrainerConfig
from regrow.trainer.zero.config import ZeroConfig
from regrow.trainer.zero.optimizer import ZeroOptimizer

# eps = 1e-4 for the same reason as in test_zero.py: it keeps Adam from amplifying last-bit differences.
F32 = ZeroConfig(stage=1, state_bits=32, lr=1e-2, eps=1e-4, max_grad_norm=1.0)


def config(stages: int, dp: int, zero: int = 1, compile: str = "off", **pipeline) -> PipelineTrainerConfig:
    train = TrainerConfig(model=GPTConfig.preset("tiny", n_layer=4),
                          data=DataConfig(seq_len=32, micro_batch=2, global_batch=8 * dp),
                          optim=dataclasses.replace(F32, stage=zero), steps=3, warmup_steps=0, log_every=0,
                          progress=False, compile=compile)
    return PipelineTrainerConfig(train=train, pipeline=PipelineConfig(stages=stages, **pipeline))


# ---------------------------------------------------------------------------------------------- schedule
def _as_text(schedule) -> list[str]:
    return [" ".join(f"{a.kind}{a.micro}" for a in actions) for actions in schedule]


def test_plain_routes_give_textbook_1f1b() -> None:
    assert _as_text(build_schedule(routes(4, 6, swap_odd=False))) == [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5",
    ]


@pytest.mark.parametrize("stages, micro, swap",
                         [(2, 2, False), (4, 4, False), (4, 7, True), (2, 5, True), (6, 8, True)])
def test_schedules_are_executable_in_order(stages: int, micro: int, swap: bool) -> None:
    """Executing each stage's list in order, with receives blocking, finishes: every action's input exists."""
    paths = routes(stages, micro, swap_odd=swap)
    schedule = build_schedule(paths)
    done: set[tuple[str, int, int]] = set()
    cursor = [0] * stages
    while any(cursor[s] < len(schedule[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if cursor[s] == len(schedule[s]):
                continue
            action = schedule[s][cursor[s]]
            path, p = paths[action.micro], paths[action.micro].index(s)
            if action.kind == FORWARD:
                ready = p == 0 or (FORWARD, action.micro, path[p - 1]) in done
            else:
                ready = (FORWARD, action.micro, s) in done and (
                    p == stages - 1 or (BACKWARD, action.micro, path[p + 1]) in done)
            if ready:
                done.add((action.kind, action.micro, s))
                cursor[s] += 1
                progressed = True
        assert progressed, f"deadlock at {cursor}"
    assert len(done) == 2 * stages * micro


def test_checkfree_plus_route() -> None:
    assert swapped_route(2) == (1, 0)
    assert swapped_route(4) == (1, 0, 3, 2)
    assert swapped_route(6) == (1, 0, 2, 3, 5, 4)
    with pytest.raises(ValueError, match="stages=3"):
        swapped_route(3)
    assert routes(4, 3, swap_odd=True) == [(0, 1, 2, 3), (1, 0, 3, 2), (0, 1, 2, 3)]


# ---------------------------------------------------------------------------------------------- stage split
def test_stages_chained_equal_the_whole_model() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("tiny", n_layer=4))
    stages = [GPTStage.from_gpt(gpt, stage_blocks(4, 4, s), embed=s == 0, head=s == 3) for s in range(4)]
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    h = stages[0].embed_tokens(x)
    for stage in stages:
        h = stage.run_blocks(h)
    assert torch.equal(stages[3].head_loss(h, y), gpt(x, y))
    assert stages[3].global_names()["blocks.0.mlp.fc.weight"] == "blocks.3.mlp.fc.weight"
    assert stages[3].global_names()["lm_head.weight"] == "wte.weight"


def test_shared_parameters_and_their_norm_owner() -> None:
    (tied,) = shared_params(2, checkfree_plus=False)
    assert tied.holders == ((0, "wte.weight"), (1, "lm_head.weight"))
    assert norm_skip([tied], 1) == ["lm_head.weight"] and norm_skip([tied], 0) == []
    plus = {f.name: f for f in shared_params(4, checkfree_plus=True)}
    assert plus["wte.weight"].stages == (0, 1, 2, 3)
    assert plus["wpe.weight"].stages == (0, 1) and plus["ln_f.weight"].stages == (2, 3)
    assert [stage_roles(4, s, True) for s in range(4)] == [(True, False), (True, False), (False, True), (False, True)]
    assert stage_roles(2, 0, True) == (True, True)
    assert stage_roles(4, 1, False) == (False, False)


def test_norm_skip_leaves_a_parameter_out_of_the_norm() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 300, bias=False), torch.nn.Linear(300, 7, bias=False))
    opt = ZeroOptimizer(model, ZeroConfig(stage=1, max_grad_norm=0), norm_skip=["0.weight"])
    model(torch.randn(4, 300)).square().sum().backward()
    expected = model[1].weight.grad.norm().item()
    opt.step()
    assert opt.last_grad_norm == pytest.approx(expected, rel=1e-6)
    assert opt.last_group_grad_norm == opt.last_grad_norm and opt.last_clip_coefficient == 1.0
    with pytest.raises(ValueError, match=r"norm_skip names \['nope'\]"):
        ZeroOptimizer(model, ZeroConfig(stage=1), norm_skip=["nope"])


# ---------------------------------------------------------------------------------------------- bad input
def test_stage_count_must_divide_the_blocks() -> None:
    with pytest.raises(ValueError, match=r"pipeline.stages=3 does not divide train.model.n_layer=4.*\[1, 2, 4\]"):
        config(3, 1)


def test_micro_batches_below_stages_are_refused() -> None:
    with pytest.raises(ValueError, match=r"= 2 micro-batches per step is below pipeline.stages=4.*global_batch to 16"):
        config(4, 1).micro_batches(world_size=8)
    assert config(4, 1).micro_batches(world_size=4) == 4
    with pytest.raises(ValueError, match=r"pipeline.stages=4 does not divide world_size=6"):
        config(4, 1).micro_batches(world_size=6)


def test_other_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"train.optim.stage=3 is not supported with pipeline.stages > 1"):
        PipelineTrainerConfig(train=TrainerConfig(model=GPTConfig.preset("tiny"), data=DataConfig(seq_len=32),
                                                  optim=ZeroConfig(stage=3)),
                              pipeline=PipelineConfig(stages=2))
    with pytest.raises(ValueError, match=r"PipelineConfig.checkfree_plus needs stages 2 or >= 4"):
        PipelineConfig(stages=3, checkfree_plus=True)
    with pytest.raises(ValueError, match=r"PipelineConfig.stages=0"):
        PipelineConfig(stages=0)


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stages, dp, zero, compile", [(2, 2, 1, "off"), (4, 1, 1, "off"), (2, 2, 2, "off"),
                                                       (2, 1, 2, "aot_eager")])
def test_pipeline_matches_single_process_model(stages: int, dp: int, zero: int, compile: str) -> None:
    """Loss of every step, the first step's gradients (the tied embedding's from both of its copies) and the
    parameters after 3 steps equal the single-process model trained with torch.optim.AdamW on the whole batch, at
    ZeRO stage 1 and at stage 2 (gradients reduce-scattered during the backward; the tied copies summed after the
    reduction, and the gradients read back from the reduced shards), and with each stage's blocks compiled
    (``TrainerConfig.compile``; ``aot_eager`` on the CPU: the forward and backward run as traced graphs).

    Tolerance: fp32 everywhere; the only differences are the order of sums (micro-batches, replicas, the norm in
    fp64 vs fp32). Measured: gradients within 3e-8, parameters within 1.2e-7, losses within 1e-6 (relative).
    """
    cfg = config(stages, dp, zero, compile)
    results = run_local(w.pipeline_equivalence, stages * dp, cfg, backend="gloo", timeout_s=240, threads_per_rank=1)
    reference = w.reference_run(cfg)
    assert sorted((r["dp"], r["stage"]) for r in results) == [(d, s) for d in range(dp) for s in range(stages)]
    covered = set()
    for result in results:
        assert (result["compiled_graphs"] > 0) == (compile != "off"), result["compiled_graphs"]
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-6)
        for kind, atol in (("grads", 1e-6), ("params", 1e-6)):
            for name, value in result[kind].items():
                base = name.removesuffix("@head")
                torch.testing.assert_close(value, reference[kind][base], rtol=1e-5, atol=atol, msg=f"{kind} {name}")
                covered.add(base)
    assert covered == set(reference["params"]), "every parameter of the model lives on some stage"
