"""The GPU warm-up of a worker (recovery/gpu_warm_up.py) runs while a restore may set the random generators: it must
draw from none of them, and build nothing the trainer shares."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from regrow.recovery import gpu_warm_up
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig


def config(param_dtype: str | None) -> TrainerConfig:
    return TrainerConfig(model=GPTConfig.preset("tiny", dropout=0.1),  # dropout would draw: the warm-up turns it off
                         data=DataConfig(seq_len=64, micro_batch=4, global_batch=8),
                         optim=ZeroConfig(stage=2, state_bits=8, param_dtype=param_dtype), steps=4, progress=False)


def generator_states(device: torch.device) -> list:
    states = [torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def assert_same(before: list, after: list) -> None:
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    if len(before) > 3:
        assert torch.equal(before[3], after[3])


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
def test_the_warm_up_step_draws_from_no_generator(param_dtype: str | None) -> None:
    device = torch.device("cpu")
    before = generator_states(device)
    gpu_warm_up.warm_up_step(config(param_dtype), device)
    assert_same(before, generator_states(device))


@pytest.mark.timeout(120)
def test_the_compiled_warm_up_step_draws_from_no_generator() -> None:
    """The standby's warm-up compiles the block as the trainer would (aot_eager here: CPU compilation is slow)."""
    import dataclasses

    device = torch.device("cpu")
    before = generator_states(device)
    gpu_warm_up.warm_up_step(dataclasses.replace(config(None), compile="aot_eager"), device, compiled=True)
    assert_same(before, generator_states(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(120)
def test_the_background_warm_up_on_cuda_draws_from_no_generator() -> None:
    device = torch.device("cuda", 0)
    torch.cuda.init()
    before = generator_states(device)
    gpu_warm_up.start(config("bfloat16")).join(60)
    torch.cuda.synchronize()
    assert_same(before, generator_states(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(300)
def test_the_standby_warm_up_compiles_with_inductor_and_draws_from_no_generator() -> None:
    device = torch.device("cuda", 0)
    before = generator_states(device)
    gpu_warm_up.warm_up_device(config("bfloat16"), device, compiled=True)  # compile "auto": inductor on CUDA
    torch.cuda.synchronize()
    assert_same(before, generator_states(device))


def test_a_model_built_while_another_thread_skips_initialization_is_seeded_as_usual() -> None:
    """The warm-up builds its model with the initializers off (``GPT.uninitialized``) while the worker's training
    thread may build the job's seeded model: the switch must hold for its own thread only."""
    from regrow.trainer.models import GPT, _SkipInitialization  # the switch GPT.uninitialized holds open

    inside, release = threading.Event(), threading.Event()

    def hold_the_switch() -> None:
        with _SkipInitialization():
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_switch)
    holder.start()
    try:
        assert inside.wait(30)
        torch.manual_seed(0)
        during = GPT(GPTConfig.preset("tiny"))
    finally:
        release.set()
        holder.join(30)
    torch.manual_seed(0)
    alone = GPT(GPTConfig.preset("tiny"))
    assert all(torch.equal(a, b) for a, b in zip(during.parameters(), alone.parameters(), strict=True))
