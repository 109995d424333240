"""A compiled model (``--compile``, ``trainer/compile.py``) trains and recovers like an eager one.

On the CPU the tests compile with the ``aot_eager`` backend: the forward and its backward are traced into graphs
(dynamo, AOTAutograd) and run, without generating code (inductor's CPU code generation would take most of the
suite's time on a 2-core machine). The trainer's own path is the GPU's: the model is wrapped, its parameters shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from regrow.tests.test_launch_faults import assert_same_run, train
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.compile import backend_for, check_compile
from regrow.trainer.loop import Trainer
from regrow.trainer.zero.config import ZeroConfig

COMPILED = ("--compile", "aot_eager")


@pytest.mark.timeout(400)
def test_a_compiled_run_killed_twice_continues_bit_identically(tmp_path: Path, capfd) -> None:
    """Two ranks, a snapshot every step; rank 1 killed at step 3 and again at step 5: the restarted ranks compile
    again, restore their snapshots and the run ends byte-identical to an uninterrupted compiled run."""
    reference = train(tmp_path, "reference", 2, 7, *COMPILED)
    history = train(tmp_path, "faulted", 2, 7, *COMPILED, "--snapshot-every", "1",
                    fault=("kill-rank:1@3", "kill-rank:1@5"), restarts=2)
    out = capfd.readouterr().out
    assert out.count("model compiled with torch.compile (backend aot_eager") == 3 + 1, out[-3000:]  # + reference
    assert out.count("restore: source snapshot") >= 2, out[-3000:]
    assert_same_run(tmp_path, history, reference, "faulted")


def test_a_restore_reuses_the_compiled_graphs() -> None:
    """A restore copies into the model's parameters in place: the compiled forward runs on without a recompile,
    and the restored run's next steps equal the original's."""
    torch._dynamo.reset()
    trainer = Trainer(tiny_config(steps=6, compile="aot_eager"))
    for _ in range(3):
        trainer.train_step()
    state = trainer.shard_state()
    saved = {key: value.clone() for key, value in state.tensors.items()}
    state.tensors = saved
    expected = [trainer.train_step().loss for _ in range(2)]
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiles > 0, "nothing was compiled"
    trainer.restore(state)
    assert [trainer.train_step().loss for _ in range(2)] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles, "the restore recompiled the model"


def test_compile_settings_name_the_fix() -> None:
    assert backend_for("auto", torch.device("cpu")) is None
    assert backend_for("auto", torch.device("cuda", 0)) == "inductor"
    assert backend_for("off", torch.device("cuda", 0)) is None
    with pytest.raises(ValueError, match=r"TrainerConfig.compile='nope' is invalid: use 'off', 'auto'"):
        check_compile("nope")
    with pytest.raises(ValueError, match=r"compile='aot_eager' is not supported at optim.stage=3"):
        tiny_config(steps=2, compile="aot_eager", optim=ZeroConfig(stage=3))
