"""Unit tests for the GPT model (trainer/models.py) and the corpus and sampler (trainer/data/)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from regrow.trainer.data import DataConfig, DataCursor, Sampler, load_corpus
from regrow.trainer.models import GPT, GPTConfig


def _expected_params(c: GPTConfig) -> int:
    """Closed-form count: tied embedding + positions + 12 d^2 and two norm scales per block + final norm."""
    d = c.d_model
    return c.vocab_size * d + c.seq_len * d + c.n_layer * (12 * d * d + 2 * d) + d


# ---------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("name, approx", [("350m", 354.6e6), ("1.3b", 1313.2e6)])
def test_preset_parameter_counts(name: str, approx: float) -> None:
    config = GPTConfig.preset(name)
    with torch.device("meta"):  # shapes only: nothing is allocated or drawn
        model = GPT(config)
    assert model.num_parameters() == _expected_params(config)
    assert model.num_parameters() == pytest.approx(approx, abs=0.05e6)


def test_lm_head_is_tied_and_counted_once() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == _expected_params(model.config)


def test_uninitialized_model_draws_nothing_and_loads_a_seeded_one_exactly() -> None:
    """The build for a restore touches no random generator, keeps the head tied, and has the seeded model's
    parameter names and shapes, so a state dict moves between the two exactly."""
    config = GPTConfig.preset("tiny")
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    empty = GPT.uninitialized(config, "cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    assert empty.lm_head.weight is empty.wte.weight
    seeded = GPT(config)
    empty.load_state_dict(seeded.state_dict())
    for (name, a), (other, b) in zip(empty.named_parameters(), seeded.named_parameters(), strict=True):
        assert name == other and torch.equal(a, b)


def test_tiny_forward_backward_shapes_and_initial_loss() -> None:
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny")
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (3, config.seq_len))
    logits = model(idx)
    assert logits.shape == (3, config.seq_len, config.vocab_size)
    loss = model(idx, idx.roll(-1, dims=1))
    assert loss.shape == ()
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.1  # small init -> near-uniform predictions
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])


def test_same_seed_gives_identical_parameters() -> None:
    config = GPTConfig.preset("tiny")
    torch.manual_seed(123)
    a = GPT(config).state_dict()
    torch.manual_seed(123)
    b = GPT(config).state_dict()
    torch.manual_seed(124)
    c = GPT(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte.weight"], c["wte.weight"])


def test_bf16_forward() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).to(torch.bfloat16)
    idx = torch.randint(0, 256, (2, 32))
    loss = model(idx, idx)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_residual_projections_use_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small", d_model=256))
    proj_std = model.blocks[0].mlp.proj.weight.std().item()
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=100, n_head=3), "GPTConfig.d_model=100 must be divisible by n_head=3"),
        (dict(n_layer=0), "GPTConfig.n_layer=0"),
        (dict(vocab_size=2.5), "GPTConfig.vocab_size"),
        (dict(dropout=1.0), "GPTConfig.dropout=1.0"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        GPTConfig(**kwargs)


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.preset("tiny", n_layers=3)
    assert GPTConfig.preset("tiny", n_layer=3).n_layer == 3


# ---------------------------------------------------------------------------------------------------- data


def _config(**overrides: int | float) -> DataConfig:
    base = dict(seq_len=32, micro_batch=2, global_batch=8, seed=7)
    return DataConfig(**{**base, **overrides})


def _step_union(sampler: Sampler) -> list[tuple[int, ...]]:
    """Every sequence this rank sees in one optimizer step, as tuples (for set comparison and order)."""
    rows = []
    for _ in range(sampler.grad_accum):
        x, y = sampler.next_micro_batch()
        assert x.shape == y.shape == (sampler.config.micro_batch, sampler.config.seq_len)
        assert x.dtype == y.dtype == torch.long
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        rows += [tuple(r.tolist()) for r in x]
    return rows


def _global_steps(config: DataConfig, dp_size: int, steps: int) -> list[list[tuple[int, ...]]]:
    """Concatenate ranks' data per step, in rank order (rank slices are contiguous, so this is the global batch)."""
    samplers = [Sampler(config, rank, dp_size) for rank in range(dp_size)]
    return [sum((_step_union(s) for s in samplers), []) for _ in range(steps)]


def test_corpus_is_nonempty_deterministic_bytes() -> None:
    a, b = load_corpus(), load_corpus()
    assert a.dtype == torch.uint8 and a.numel() > 100_000
    assert torch.equal(a, b)
    a[0] = b[0] + 1  # each call returns its own copy, so this must not leak into the next call
    assert load_corpus()[0] == b[0]


def test_global_batch_is_independent_of_dp_size() -> None:
    reference = _global_steps(_config(), 1, steps=5)
    for dp_size in (2, 4):
        assert _global_steps(_config(), dp_size, steps=5) == reference
    assert len(set(sum(reference, []))) == 5 * 8  # no window repeats within an epoch


def test_resume_from_cursor_matches_uninterrupted() -> None:
    config = _config(micro_batch=1, global_batch=4)
    straight = Sampler(config, dp_rank=1, dp_size=2)
    for _ in range(3):
        _step_union(straight)
    expected = [_step_union(straight) for _ in range(4)]

    first = Sampler(config, dp_rank=1, dp_size=2)
    for _ in range(3):
        _step_union(first)
    saved = json.loads(json.dumps(first.state().to_dict()))
    resumed = Sampler(config, dp_rank=1, dp_size=2)
    resumed.load_state(DataCursor.from_dict(saved))
    assert [_step_union(resumed) for _ in range(4)] == expected


def test_state_mid_step_raises() -> None:
    sampler = Sampler(_config(), dp_rank=0, dp_size=1)
    sampler.next_micro_batch()
    with pytest.raises(RuntimeError, match="mid-step"):
        sampler.state()


def test_epoch_rollover_drops_the_remainder_and_reshuffles() -> None:
    config = _config(global_batch=24, micro_batch=4)
    sampler = Sampler(config, dp_rank=0, dp_size=2)
    steps_per_epoch = sampler.num_windows // config.global_batch
    sampler.load_state(DataCursor(epoch=0, index=(steps_per_epoch - 1) * config.global_batch))
    _step_union(sampler)
    assert sampler.state() == DataCursor(epoch=1, index=0)
    # The permutations of consecutive epochs differ, so the first batch of epoch 1 is not epoch 0's.
    epoch1 = _step_union(sampler)
    fresh = Sampler(config, dp_rank=0, dp_size=2)
    assert _step_union(fresh) != epoch1
    # A cursor left past the last full batch is normalised to the next epoch.
    sampler.load_state(DataCursor(epoch=3, index=steps_per_epoch * config.global_batch))
    assert sampler.state() == DataCursor(epoch=4, index=0)


def test_validation_split_is_disjoint_and_fixed() -> None:
    config = _config()
    sampler = Sampler(config, dp_rank=0, dp_size=1)
    corpus = load_corpus()
    cut = corpus.numel() - int(corpus.numel() * config.val_fraction)
    # The last training window ends (inclusive of its target byte) before the validation cut.
    assert sampler.num_windows * config.seq_len + 1 <= cut
    batches = list(sampler.validation_batches(3, 4))
    assert batches and all(x.shape == (4, config.seq_len) for x, _ in batches)
    first_x, first_y = batches[0]
    assert torch.equal(first_x[0], corpus[cut : cut + config.seq_len].long())
    assert torch.equal(first_y[0], corpus[cut + 1 : cut + config.seq_len + 1].long())
    again = list(Sampler(config, dp_rank=3, dp_size=4).validation_batches(3, 4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_global_batch_divisibility_error() -> None:
    with pytest.raises(ValueError) as err:
        Sampler(_config(global_batch=30, micro_batch=8), dp_rank=0, dp_size=2)
    assert str(err.value) == (
        "DataConfig.global_batch=30 is not divisible by micro_batch*dp_size=8*2=16; choose a multiple of 16"
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(seq_len=0), "seq_len"), (dict(micro_batch=-1), "micro_batch"), (dict(val_fraction=1.0), "val_fraction")],
)
def test_data_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"DataConfig.{field}="):
        DataConfig(**kwargs)


def test_cursor_from_dict_rejects_bad_fields() -> None:
    assert DataCursor.from_dict({"epoch": 1, "index": 8}) == DataCursor(epoch=1, index=8)
    with pytest.raises(ValueError, match="DataCursor.index"):
        DataCursor.from_dict({"epoch": 1, "index": -1})
    with pytest.raises(ValueError, match="keys"):
        DataCursor.from_dict({"epoch": 1})
