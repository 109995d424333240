"""The Trainer on real processes: determinism, bit-identical resume from a shard state, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from regrow.launch import cli
from regrow.launch.local.spawn import run_local
from regrow.tests import dist_workers as w
from regrow.tests.fingerprint import frozen
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import NonFiniteLossError, Trainer, TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig


def tiny_config(**overrides) -> TrainerConfig:
    """The tiny GPT's run of the tests. Its dropout draws from torch's generator every step, so a restore that lost
    a generator's state changes what follows (with dropout 0 nothing draws and such a loss went unseen)."""
    base = dict(
        model=GPTConfig.preset("tiny", dropout=0.1),
        data=DataConfig(seq_len=64, micro_batch=4, global_batch=16),
        optim=ZeroConfig(stage=2, state_bits=8, lr=3e-3, min_8bit_numel=1024),
        steps=6,
        warmup_steps=2,
        log_every=0,
        progress=False,
    )
    base.update(overrides)
    return TrainerConfig(**base)


@pytest.mark.timeout(300)
def test_same_seed_twice_gives_bit_identical_losses() -> None:
    config = tiny_config()
    first = run_local(w.trainer_losses, 2, config, backend="gloo", timeout_s=240)
    second = run_local(w.trainer_losses, 2, config, backend="gloo", timeout_s=240)
    assert first == second
    assert first[0] == first[1], "every rank reports the same (all-reduced) loss"
    assert first[0][-1] < first[0][0]


@pytest.mark.timeout(300)
def test_resume_from_shard_state_is_bit_identical() -> None:
    """Stopping after step 3 and restoring the ShardState into a fresh Trainer continues exactly."""
    result = run_local(w.trainer_resume, 2, tiny_config(), 3, backend="gloo", timeout_s=240)[0]
    assert result["resumed"] == result["straight"]
    for name, value in result["straight_params"].items():
        assert torch.equal(value, result["resumed_params"][name]), name


def test_replacement_built_for_restore_resumes_bit_identically() -> None:
    """A trainer built ``for_restore`` (weights uninitialized, tied embedding and head kept tied) resumes exactly like
    a seeded one; ``reset_to_initial_state`` gives it the seeded step-0 state."""
    # The generators are the process's (dropout draws from them): each reference runs its steps before the trainer
    # compared with it sets them (a restore, or the seeded initial state).
    reference = Trainer(tiny_config(steps=6))
    for _ in range(3):
        reference.train_step()
    state = frozen(reference.shard_state())
    expected = [reference.train_step().loss for _ in range(3)]
    replacement = Trainer(tiny_config(steps=6), for_restore=True)
    assert not replacement.initialized
    assert replacement.model.lm_head.weight is replacement.model.wte.weight
    replacement.restore(state)
    assert replacement.initialized
    assert [replacement.train_step().loss for _ in range(3)] == expected

    fresh = Trainer(tiny_config(steps=6))
    expected = [fresh.train_step().loss for _ in range(2)]
    reset = Trainer(tiny_config(steps=6), for_restore=True)
    reset.reset_to_initial_state()
    assert reset.initialized and reset.step == 0
    assert [reset.train_step().loss for _ in range(2)] == expected


def test_interrupted_step_is_rewound_to_its_boundary() -> None:
    """A step that fails before the update leaves the parameters and optimizer state untouched; rewinding puts
    the data position and generators back, so the retried step equals an uninterrupted one."""
    reference = Trainer(tiny_config(steps=6))
    expected = [reference.train_step().loss for _ in range(4)]

    class FailOnce:
        def __init__(self) -> None:
            self.armed = True

        def before_optimizer_step(self) -> None:
            if self.armed:
                self.armed = False
                torch.rand(3)  # the failed step drew from the generators too
                raise RuntimeError("a peer died")

        def after_step(self, state) -> None:
            pass

        def close(self) -> None:
            pass

    trainer = Trainer(tiny_config(steps=6))
    losses = [trainer.train_step().loss for _ in range(2)]
    trainer.sinks.append(FailOnce())
    with pytest.raises(RuntimeError, match="a peer died"):
        trainer.train_step()
    assert trainer.rewind_interrupted_step() and trainer.step == 2
    losses += [trainer.train_step().loss for _ in range(2)]
    assert losses == expected

    def gather_fails() -> None:  # a failure after the update began: the all-gather of the new parameters
        raise RuntimeError("a peer died mid-gather")

    trainer.optimizer._gather_parameters = gather_fails
    with pytest.raises(RuntimeError, match="mid-gather"):
        trainer.train_step()
    assert not trainer.rewind_interrupted_step(), "a half-applied update cannot be rewound: the rank must restore"


def test_nan_loss_stops_before_the_optimizer_step() -> None:
    trainer = Trainer(tiny_config(steps=5))
    trainer.train_step()
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with torch.no_grad():
        trainer.model.wpe.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 3; stopped before the optimizer step") as info:
        trainer.train_step()
    assert info.value.step == 3
    assert trainer.step == 2
    for name, value in trainer.model.named_parameters():
        if name != "wpe.weight":
            assert torch.equal(value, before[name]), name


def test_metrics_jsonl_and_log_lines(tmp_path, capsys) -> None:
    path = tmp_path / "metrics.jsonl"
    Trainer(tiny_config(steps=4, log_every=2, eval_every=2, metrics_path=str(path))).run()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["val_loss"] is not None and records[0]["val_loss"] is None
    out = capsys.readouterr().out
    assert "[rank 0, step 2] loss" in out and "tokens/s" in out


def test_trainer_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"TrainerConfig.steps=0"):
        tiny_config(steps=0)
    with pytest.raises(ValueError, match=r"data.seq_len=128 exceeds model.seq_len=64"):
        tiny_config(data=DataConfig(seq_len=128))


def test_cli_reports_every_argument_problem_at_once(capsys) -> None:
    code = cli.main(["train", "--stage", "5", "--state-bits", "4", "--global-batch", "30", "--nproc", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--stage=5 is invalid: allowed values are 1, 2 and 3" in err  # the flag, not the config field
    assert "--global-batch=30 is not divisible by --micro-batch x --nproc = 8 x 4" in err
    assert "invalid arguments" in err


@pytest.mark.timeout(300)
def test_cli_train_runs_two_processes(capfd) -> None:
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "3", "--global-batch", "8",
                     "--micro-batch", "4", "--log-every", "1", "--eval-every", "3", "--timeout", "240"])
    assert code == 0
    out = capfd.readouterr().out
    assert "[rank 0, step 3] loss" in out
    assert "| 3 |" in out


@pytest.mark.timeout(180)
def test_regrow_train_runs_under_torchrun() -> None:
    """torchrun starts the ranks; `python -m regrow train` joins its env:// rendezvous instead of spawning."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "regrow", "train", "--preset", "tiny",
               "--steps", "2", "--global-batch", "8", "--micro-batch", "4", "--log-every", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[rank 0, step 2] loss" in done.stdout


@pytest.mark.timeout(90)
def test_regrow_train_nproc_0_is_refused_before_anything_divides_by_it() -> None:
    """The real command line in its own process: exit code 2 and one line naming --nproc, no traceback (before
    the options were typed, ``--nproc 0`` was a ZeroDivisionError in the batch check)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "regrow", "train", "--nproc", "0", "--preset", "tiny",
                           "--global-batch", "8", "--micro-batch", "2"], capture_output=True, text=True, timeout=80)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--nproc=0 must be >= 1" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, problem", [
    (["--timeout", "0"], "--timeout=0.0 must be a finite number of seconds > 0"),
    (["--timeout", "nan"], "--timeout=nan must be a finite number of seconds > 0"),
    (["--hang-timeout", "nan"], "--hang-timeout=nan must be a finite number of seconds >= 0 (0: no progress "
                                "watchdog)"),
    (["--fault-mtbf", "inf"], "--fault-mtbf=inf must be a finite number of seconds > 0"),
    (["--fault-mtbf", "1", "--fault-step-seconds", "nan"], "--fault-step-seconds=nan must be a finite number of "
                                                           "seconds > 0"),
    (["--fault-mtbf", "1", "--fault-step-seconds", "1e-320", "--max-restarts", "-1"], "--max-restarts=-1 must be"),
    (["--seed", str(2**64)], f"TrainerConfig.seed={2**64} must be < 2**64"),
    (["--data-seed", str(2**64)], f"DataConfig.seed={2**64} must be <"),
    (["--grad-dtype", "float16"], "--grad-dtype='float16' is invalid: allowed values are ['float32', 'bfloat16']"),
    (["--stage", "4"], "--stage=4 is invalid: allowed values are 1, 2 and 3"),
])
def test_cli_refuses_values_that_would_crash_or_stall_a_run_before_it_starts(capsys, flags, problem) -> None:
    """Each of these used to start the run or crash the command: a traceback (an infinite --fault-mtbf divided by
    zero in the draw, a tiny --fault-step-seconds overflowed it before the other problems were listed, a seed over
    64 bits overflowed torch's generator in the rank, a NaN --timeout), a run aborted at once (--timeout 0) or a
    silently disabled watchdog (--hang-timeout nan)."""
    code = cli.main(["train", "--nproc", "1", "--preset", "tiny", "--steps", "3", "--global-batch", "4",
                     "--micro-batch", "4", *flags])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert problem in err, err
