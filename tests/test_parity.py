"""The state parity checks' parts (``recovery/parity.py``) and the corruption faults that exercise them; corruption
caught and rolled back in a real 2-rank run is in ``test_chaos.py``."""

from __future__ import annotations

import pytest
import torch

from regrow.checkpoint.snapshot import wordsum
from regrow.launch import cli
from regrow.launch.chaos import plan as faults
from regrow.launch.chaos.injector import corruption_target, flip_bit
from regrow.recovery.parity import ParityConfig, ParityMonitor, StateParityError, outliers, tensors_digest
from regrow.tests.test_trainer import tiny_config
from regrow.trainer.loop import Trainer


def test_the_digest_of_tensors_is_the_wordsum_of_their_bytes_end_to_end() -> None:
    tensors = [torch.arange(6, dtype=torch.float32), torch.arange(5, dtype=torch.uint8), torch.ones(3)]
    # The 5-byte tensor is padded to 8 so that the next one starts on a word boundary.
    joined = b"".join(t.numpy().tobytes() + bytes(-t.numel() * t.element_size() % 4) for t in tensors)
    assert tensors_digest(tensors) == wordsum.digest(joined)
    flipped = [t.clone() for t in tensors]
    flip_bit(flipped[2], 1)
    assert flipped[2][1].item() == 0.25  # the second-lowest exponent bit: 1.0 becomes 0.25, finite and silent
    assert tensors_digest(flipped) != tensors_digest(tensors)


def test_the_majority_names_the_odd_rank_out_and_a_tie_names_every_rank() -> None:
    assert outliers([7, 7, 7]) == ()
    assert outliers([7, 8, 7, 7]) == (1,)
    assert outliers([7, 8]) == (0, 1)  # two ranks: neither can be told right by a vote
    assert outliers([1, 1, 2, 2]) == (0, 1, 2, 3)


@pytest.mark.parametrize("settings, problem", [
    (dict(every=0), "ParityConfig.every=0 must be a whole number of steps >= 1"),
    (dict(every=2.5), "ParityConfig.every=2.5 must be a whole number"),
])
def test_settings_errors_name_the_field(settings: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ParityConfig(**settings)


def _trained(steps: int, corrupt: str | None = None, at: int = 3) -> tuple[Trainer, list[float]]:
    """The tiny run of ``steps`` steps on one rank; ``corrupt`` (a corruption kind) flips its bit at the start of
    step ``at``."""
    trainer = Trainer(tiny_config(steps=steps))
    losses = []
    while trainer.step < steps:
        if corrupt is not None and trainer.step == at - 1:
            name, tensor = corruption_target(corrupt, trainer.optimizer)
            flip_bit(tensor, tensor.numel() // 3)
        losses.append(trainer.train_step().loss)
    return trainer, losses


@pytest.mark.parametrize("kind", ["corrupt-param", "corrupt-shard"])
def test_a_flipped_bit_changes_the_run_and_nothing_else_notices(kind: str) -> None:
    """Why the checks exist: the training goes on without an error, from a wrong state."""
    _, clean = _trained(6)
    _, corrupted = _trained(6, kind)
    assert clean[:2] == corrupted[:2]
    assert clean[2:] != corrupted[2:] or kind == "corrupt-shard"  # a shard flip shows in the losses after its update
    assert clean[3:] != corrupted[3:]


def test_the_shard_is_verified_at_rest_between_two_steps_on_one_rank() -> None:
    """With checks at even steps, the shard is sealed after each odd step and verified before the next update: a
    flip after an even step is not seen (the update of the odd step spreads it, the seal takes it in), a flip after
    an odd step is named at the next step, before its update. A clean run passes every check."""
    trainer = Trainer(tiny_config(steps=8))
    monitor = ParityMonitor(ParityConfig(every=2), optimizer=trainer.optimizer, state=trainer.shard_state(),
                            timeout_s=30)
    trainer.sinks.append(monitor)
    for _ in range(4):
        trainer.train_step()
    assert monitor.checks == 2  # steps 2 and 4
    name, tensor = corruption_target("corrupt-shard", trainer.optimizer)
    assert name.endswith("exp_avg_sq_codes")
    flip_bit(tensor, 10)  # after step 4: missed
    trainer.train_step()
    trainer.train_step()
    assert (trainer.step, monitor.checks) == (6, 3)
    trainer.train_step()
    flip_bit(tensor, 11)  # after step 7, past its seal
    with pytest.raises(StateParityError, match=r"check at step 8 failed: the optimizer shard of rank\(s\) 0 "
                                               r"changed between steps") as caught:
        trainer.train_step()
    assert caught.value.ranks == (0,) and trainer.step == 7  # raised before step 8's update


def test_corruptions_must_be_seen_by_a_check() -> None:
    plan = [faults.Fault.parse(text) for text in ("corrupt-param:1@6", "corrupt-shard:0@4", "corrupt-param:0@8")]
    problems = faults.plan_problems(plan, ranks=2, nodes=1, steps=10, parity_every=4)
    assert problems == ["--fault corrupt-param:1@6: a parity check sees corruption of the step it runs at (steps that "
                        "are multiples of --parity-every=4), and step 6 is not one; pick such a step, or a smaller "
                        "--parity-every"]
    off = faults.plan_problems(plan[2:], ranks=2, nodes=1, steps=10, parity_every=0)
    assert off == ["--fault corrupt-param:0@8: nothing would see the corruption; set --parity-every (state parity "
                   "checks)"]
    stage3 = faults.plan_problems(plan[2:], ranks=2, nodes=1, steps=10, parity_every=4, zero_stage=3)
    assert "at ZeRO stage 3 no rank keeps the full parameters between steps; use corrupt-shard" in stage3[0]
    with pytest.raises(ValueError, match="a step range -E and a factor xF belong to slow-rank only"):
        faults.Fault.parse("corrupt-param:0@4-8")


@pytest.mark.timeout(60)
def test_the_command_line_names_the_flag(capsys) -> None:
    code = cli.main(["train", "--nproc", "2", "--preset", "tiny", "--steps", "4", "--global-batch", "4",
                     "--micro-batch", "2", "--parity-every", "-3"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "--parity-every=-3 must be a whole number of steps >= 1 (--parity-every 0 turns the checks off)" in err


@pytest.mark.timeout(180)
def test_after_a_restore_the_ranks_are_compared_and_the_odd_one_named() -> None:
    """On three real ranks (gloo): a clean state passes; a wrong copy of another rank's slice of the parameters is
    blamed on its holder, a wrong own slice on its owner (checked against its master shard), a different step on
    the rank that holds it. Every rank reaches the same verdict."""
    from regrow.launch.local.spawn import run_local
    from regrow.tests import dist_workers

    every = run_local(dist_workers.parity_after_restore, 3, backend="gloo", timeout_s=150, threads_per_rank=1)
    assert every[0] == every[1] == every[2]
    assert every[0] == [None, ("parameters", [2]), ("parameters", [0]), ("step", [1])]
