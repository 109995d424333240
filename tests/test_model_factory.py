"""Any model in the trainer: ``ModelFactory`` and its errors, the loss contracts, the 8-bit/fp32 state policy on a
Hugging Face Llama (tied embeddings included), and ``regrow train --model`` -> universal checkpoint -> resume at
another world size -> ``regrow ckpt export`` end to end, on real processes and files."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import regrow
from regrow.checkpoint.universal import storage
from regrow.launch import cli
from regrow.launch.job import build_job
from regrow.launch.options import CheckpointOptions
from regrow.launch.parser import parse_options
from regrow.launch.rank import attach_writer
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.trainer.data import DataConfig, load_corpus
from regrow.trainer.loop import Trainer, TrainerConfig
from regrow.trainer.losses import Loss, LossError
from regrow.trainer.model_factory import ModelFactory, ModelFactoryError, build_model, input_vocab_size
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig, state_kind_rule
from regrow.trainer.zero.optimizer import ZeroOptimizer

REPO = Path(regrow.__file__).resolve().parent
LLAMA = "examples.hf_llama:build"
FACTORIES = "regrow.tests.model_factories"


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch) -> None:
    """Every test starts in the repository root (where ``examples/`` is), with ``sys.path`` restored after it."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


def llama(**kwargs):  # noqa: ANN201 (transformers' class)
    return ModelFactory(target=LLAMA, kwargs=kwargs).build(seed=0)


def trainer_config(model: ModelFactory, **overrides) -> TrainerConfig:
    base = dict(model=model, data=DataConfig(seq_len=16, micro_batch=2, global_batch=4),
                optim=ZeroConfig(stage=2, state_bits=8, lr=3e-3, min_8bit_numel=1), steps=4, warmup_steps=1,
                log_every=0, progress=False)
    return TrainerConfig(**(base | overrides))


# ---------------------------------------------------------------- the factory's errors
@pytest.mark.parametrize("target, kwargs, message", [
    ("examples/hf_llama.py", {}, "ModelFactory.target='examples/hf_llama.py' is not of the form 'pkg.module:name'"),
    ("examples.hf_llama", {}, "is not of the form 'pkg.module:name'"),
    (LLAMA, [("hidden_size", 64)], "ModelFactory.kwargs=[('hidden_size', 64)] is not a JSON object"),
    (LLAMA, {"hidden_size": (64,)}, "ModelFactory.kwargs={'hidden_size': (64,)} is not a JSON object"),
    (LLAMA, {"scale": float("nan")}, "is not a JSON object"),
    (LLAMA, {"weights": torch.zeros(2)}, "is not a JSON object"),
    (LLAMA, {1: 64}, "is not a JSON object"),
])
def test_a_malformed_factory_is_refused_when_it_is_made(target, kwargs, message) -> None:
    with pytest.raises(ModelFactoryError) as caught:
        ModelFactory(target=target, kwargs=kwargs)
    assert message in str(caught.value)


def test_a_factory_whose_module_does_not_import_names_the_import_error(tmp_path, monkeypatch) -> None:
    (tmp_path / "needs_missing.py").write_text("import regrow_not_installed_anywhere\n\ndef build():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFactoryError) as caught:
        ModelFactory(target="needs_missing:build").build(seed=0)
    assert ("ModelFactory.target='needs_missing:build': module 'needs_missing' does not import (No module named "
            "'regrow_not_installed_anywhere')") in str(caught.value)
    with pytest.raises(ModelFactoryError, match=r"module 'nowhere_to_be_found' does not import \(No module named"):
        ModelFactory(target="nowhere_to_be_found:build").resolve()


@pytest.mark.parametrize("target, message", [
    ("examples.hf_llama:buidl", "module 'examples.hf_llama' ("),
    ("examples.hf_llama:buidl", "has no attribute 'buidl'; check the name after the colon"),
    (f"{FACTORIES}:NOT_CALLABLE", "is a int, not a function"),
    (f"{FACTORIES}:not_a_module", "returned dict, not a torch.nn.Module; make the function return the model itself"),
])
def test_a_factory_that_names_nothing_or_returns_no_module_is_one_clear_error(target, message) -> None:
    with pytest.raises(ModelFactoryError) as caught:
        ModelFactory(target=target).build(seed=0)
    assert f"ModelFactory.target={target!r}" in str(caught.value) and message in str(caught.value)


def test_a_console_script_finds_the_factory_in_the_working_directory(tmp_path, monkeypatch) -> None:
    """A console script's ``sys.path`` starts with its own folder, not the working directory: the factory's module
    is found there all the same, as ``python -m`` would find it."""
    (tmp_path / "my_models.py").write_text("import torch\n\ndef build(width=3):\n    return torch.nn.Linear(width, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(REPO), os.getcwd())])
    model = ModelFactory(target="my_models:build", kwargs={"width": 5}).build(seed=0)
    assert isinstance(model, nn.Linear) and model.in_features == 5
    assert sys.path[0] == str(tmp_path)


def test_a_factory_builds_the_seeded_model_pickles_and_is_stored_as_json() -> None:
    factory = ModelFactory(target=LLAMA, kwargs={"hidden_size": 32, "heads": 2, "kv_heads": 1})
    first, second = factory.build(seed=7), pickle.loads(pickle.dumps(factory)).build(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(factory.build(seed=8).lm_head.weight, first.lm_head.weight)
    recorded = json.loads(json.dumps(trainer_config(factory).to_dict()))["model"]
    assert recorded == {"target": LLAMA, "kwargs": {"hidden_size": 32, "heads": 2, "kv_heads": 1}}
    assert ModelFactory(**recorded) == factory
    meta = factory.build(seed=0, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert input_vocab_size(meta) == 256 and input_vocab_size(llama(vocab_size=300)) == 300
    assert input_vocab_size(build_model(GPTConfig.preset("tiny", vocab_size=99), seed=0, device="meta")) == 99
    assert input_vocab_size(nn.Linear(2, 2)) is None


# ---------------------------------------------------------------- the loss contracts
def test_the_hf_and_logits_losses_of_a_llama_are_the_cross_entropy_of_y() -> None:
    """``hf`` hands the model targets already shifted (``shift_labels``): it predicts exactly the sampler's y from
    x, like ``logits``; HF's own shift of ``labels`` alone would have it predict the token after y."""
    model = llama()
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = x[:, :-1], x[:, 1:]
    expected = nn.functional.cross_entropy(model(input_ids=x).logits.float().reshape(-1, 256), y.reshape(-1))
    assert torch.equal(Loss("hf", is_gpt=False)(model, x, y), expected)
    assert torch.equal(Loss("logits", is_gpt=False)(model, x, y), expected)
    assert torch.equal(Loss("auto", is_gpt=False)(model, x, y), expected)
    torch.testing.assert_close(Loss(f"{FACTORIES}:mean_loss", is_gpt=False)(model, x, y), expected)
    assert not torch.equal(model(input_ids=x, labels=y).loss, expected), "labels alone are shifted once more"


@pytest.mark.parametrize("loss, message", [
    ("model", "TrainerConfig.loss='model' gave a tensor of shape (2, 16), not a scalar (0-dim) tensor, so it cannot "
              "be back-propagated; model(x, y) must return the mean loss as a 0-dim tensor; for a model that "
              "returns logits use loss 'logits'"),
    (f"{FACTORIES}:per_token_loss", f"TrainerConfig.loss='{FACTORIES}:per_token_loss' gave a tensor of shape "
                                    "(2, 16), not a scalar (0-dim) tensor"),
])
def test_a_loss_that_is_not_a_scalar_is_one_clear_error_before_any_backward(loss, message) -> None:
    trainer = Trainer(trainer_config(ModelFactory(target=f"{FACTORIES}:tiny_lm"), loss=loss))
    with pytest.raises(LossError) as caught:
        trainer.train_step()
    assert message in str(caught.value)
    assert all(p.grad is None for p in trainer.model.parameters()), "no backward ran"
    assert trainer.step == 0


def test_loss_and_model_settings_are_checked_with_the_config() -> None:
    with pytest.raises(ValueError, match=r"TrainerConfig.loss='cross-entropy' is invalid: allowed values are 'auto'"):
        trainer_config(ModelFactory(target=LLAMA), loss="cross-entropy")
    with pytest.raises(ValueError, match=r"TrainerConfig.loss='hf' needs a Hugging Face model"):
        TrainerConfig(loss="hf")
    with pytest.raises(TypeError, match=r"TrainerConfig.model is a dict: give a GPTConfig"):
        TrainerConfig(model={"target": LLAMA})


# ---------------------------------------------------------------- the state policy on foreign names
class ScaleNorm(nn.Module):
    """A norm of a class regrow does not know, found by its name and its 1-D parameters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))


class MixNorm(nn.Module):
    """Named like a norm but owning a matrix: not a norm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.ones(width, width))


def test_state_policy_finds_a_llamas_norms_and_embedding_by_module_and_counts_the_tied_weight_once() -> None:
    model = llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.add_module("extra_norm", ScaleNorm(64))
    model.add_module("mixer_norm", MixNorm(64))
    kind_of = state_kind_rule(model, ZeroConfig(state_bits=8, min_8bit_numel=1))
    bits = {name: kind_of(name, p).bits for name, p in model.named_parameters()}
    assert "lm_head.weight" not in bits, "the tied head is the embedding's parameter, listed once"
    fp32 = sorted(name for name, b in bits.items() if b == 32)
    assert fp32 == sorted(["model.embed_tokens.weight", "model.norm.weight", "extra_norm.gain",
                           *(f"model.layers.{i}.{n}.weight" for i in range(2)
                             for n in ("input_layernorm", "post_attention_layernorm"))])
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and not isinstance(model.model.norm, nn.RMSNorm)
    assert bits["mixer_norm.mix"] == 8 and bits["model.layers.0.self_attn.k_proj.weight"] == 8
    assert sum(b == 8 for b in bits.values()) == 2 * 7 + 1, "every projection of both layers, and the matrix"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_a_tied_llama_like_torch_adamw(stage: int) -> None:
    """The tied embedding/head gets one slot in the layout and the sum of both uses' gradients: three ZeRO steps
    (fp32 state, no decay or clipping) match ``torch.optim.AdamW`` on a copy, and the head stays the embedding. At
    stage 3 the tied weight is in the root unit, gathered from the embedding's use to the head's."""
    model = llama()
    reference = copy.deepcopy(model)
    optimizer = ZeroOptimizer(model, stage=stage, state_bits=32, lr=1e-2, weight_decay=0.0, max_grad_norm=0.0)
    torch_adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    slots = [slot.name for group in optimizer.layout.groups for slot in group.params]
    assert sorted(slots) == sorted(name for name, _ in model.named_parameters()) and "lm_head.weight" not in slots
    assert sum(slot.numel for group in optimizer.layout.groups for slot in group.params) == 139_584
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, torch_adamw)):
            Loss("hf", is_gpt=False)(net, tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with optimizer.gathered_parameters():
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(model.model.embed_tokens.weight, llama().model.embed_tokens.weight)


def test_a_tied_llama_at_stage3_with_activation_checkpointing_is_bit_identical_to_stage2() -> None:
    """A Hugging Face model's decoder layers are the units (``model.layers``) and its tied embedding/head the root;
    with its layers checkpointed too, the losses and weights equal stage 2's bit for bit."""
    results = []
    for stage, checkpointing in ((2, False), (3, True)):
        config = trainer_config(ModelFactory(target=LLAMA, kwargs={"layers": 3}), loss="hf", steps=3,
                                optim=ZeroConfig(stage=stage, state_bits=8, lr=3e-3, min_8bit_numel=1),
                                activation_checkpointing=checkpointing)
        trainer = Trainer(config)
        losses = [trainer.train_step().loss for _ in range(3)]
        with trainer.optimizer.gathered_parameters():
            results.append((losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (losses2, params2), (losses3, params3) = results
    assert losses2 == losses3
    for name, value in params2.items():
        assert torch.equal(params3[name], value), name


def test_a_factorys_model_resumes_bit_identically_in_a_fresh_trainer() -> None:
    """The restore contract holds for any model: a shard state restored into a trainer built for a restore
    continues with bit-identical losses and weights (8-bit state, a tied Llama)."""
    config = trainer_config(ModelFactory(target=LLAMA), loss="hf", steps=4)
    straight = Trainer(config)
    for _ in range(2):
        straight.train_step()
    state = straight.shard_state()
    state.tensors = {key: value.clone() for key, value in state.tensors.items()}
    resumed = Trainer(config, for_restore=True)
    resumed.restore(state)
    assert [resumed.train_step().loss for _ in range(2)] == [straight.train_step().loss for _ in range(2)]
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_regrow_imports_and_plans_a_gpt_run_without_transformers() -> None:
    """``transformers`` is an optional extra: the package and a GPT job never import it."""
    probe = ("import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None\n"
             "from regrow.launch import cli, ckpt_cli, train_cli, ray_cli\n"
             "from regrow.launch.job import build_job\nfrom regrow.launch.parser import parse_options\n"
             "from regrow.launch.local.shm import snapshot_bytes\n"
             "job = build_job(parse_options(['train', '--preset', 'tiny']))\n"
             "print(snapshot_bytes(job.config, 2) > 0)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


# ---------------------------------------------------------------- the command line
def test_model_flags_problems_are_reported_with_the_others(capsys) -> None:
    code = cli.main(["train", "--preset", "tiny", "--model", LLAMA, "--stage", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--stage=5 is invalid" in err
    assert f"--preset=tiny and --model={LLAMA} both choose the model: keep --preset for regrow's GPT" in err
    code = cli.main(["train", "--model", f"{FACTORIES}:not_a_module", "--loss", "x-entropy"])
    err = capsys.readouterr().err
    assert code == 2 and "returned dict, not a torch.nn.Module" in err and f"--model='{FACTORIES}:not_a_module'" in err
    code = cli.main(["train", "--model", LLAMA, "--model-kwargs", "[64]", "--nproc", "1"])
    assert code == 2 and "--model-kwargs=[64] is not a JSON object" in capsys.readouterr().err
    code = cli.main(["train", "--model", LLAMA, "--model-kwargs", "{hidden: 64}", "--nproc", "1"])
    assert code == 2 and "--model-kwargs='{hidden: 64}' is not JSON (Expecting property name" in capsys.readouterr().err
    code = cli.main(["train", "--model", "no_such_models:build", "--nproc", "1"])
    assert code == 2 and "module 'no_such_models' does not import (No module named" in capsys.readouterr().err
    code = cli.main(["train", "--model", LLAMA, "--loss", "x-entropy", "--nproc", "1"])
    assert code == 2 and "--loss='x-entropy' is invalid: allowed values are 'auto'" in capsys.readouterr().err
    code = cli.main(["train", "--model", LLAMA, "--loss", f"{FACTORIES}:no_such_loss", "--nproc", "1"])
    assert code == 2 and f"--loss='{FACTORIES}:no_such_loss': module '{FACTORIES}' (" in capsys.readouterr().err
    code = cli.main(["train", "--model-kwargs", "{}", "--nproc", "1"])
    assert code == 2 and "--model-kwargs needs --model" in capsys.readouterr().err
    code = cli.main(["train", "--preset", "tiny", "--dropout", "1.5", "--nproc", "1"])
    assert code == 2 and "--dropout=1.5 must be a float in [0, 1)" in capsys.readouterr().err
    code = cli.main(["train", "--model", LLAMA, "--dropout", "0.1", "--nproc", "1"])
    assert code == 2 and "--dropout=0.1 sets regrow's GPT's dropout, not --model's" in capsys.readouterr().err


def test_dropout_flag_reaches_the_gpt() -> None:
    from regrow.launch.job import build_job
    from regrow.launch.parser import parse_options

    assert build_job(parse_options(["train", "--preset", "tiny", "--dropout", "0.1"])).config.model.dropout == 0.1
    assert build_job(parse_options(["train", "--preset", "tiny"])).config.model.dropout == 0.0


LLAMA_RUN = ["train", "--model", LLAMA, "--loss", "hf", "--global-batch", "8", "--micro-batch", "4", "--seq-len", "32",
             "--log-every", "1", "--timeout", "240", "--warmup-steps", "1000", "--lr", "1.0"]


def logits_of(weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    model = llama()
    assert model.load_state_dict(weights, strict=False).missing_keys == ["lm_head.weight"], "only the tied alias"
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.timeout(400)
def test_a_hugging_face_llama_trains_resumes_at_another_world_size_and_exports(tmp_path, capfd) -> None:
    """``regrow train --model ... --data tokens.bin`` (a token file ``regrow data prepare`` made) from a console
    script's ``sys.path`` (``python -P``) on 2 ranks (snapshots sized
    from the factory's model on ``meta``) saves universal checkpoints; ``--resume latest`` goes on at 1 rank and ends bit-identical to an uninterrupted run (a mean over 2
    ranks or 2 micro-batches is the same two fp32 additions halved; the schedule's warm-up outlasts both runs, so
    --steps does not change the learning rates); ``regrow ckpt export`` writes weights (and a config.json) whose
    logits on a fixed batch are the trained model's, loaded every way a user would."""
    from safetensors.torch import load_file, load_model
    from transformers import LlamaForCausalLM

    root, out, tokens = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "tokens.bin"
    text = tmp_path / "text.txt"
    text.write_bytes(bytes(load_corpus()[:100_000].tolist()))
    assert cli.main(["data", "prepare", str(text), "--out", str(tokens)]) == 0  # byte-level: the Llama's 256 ids
    llama_run = [*LLAMA_RUN, "--data", str(tokens)]
    env = {**os.environ, "PYTHONPATH": str(REPO.parent)}
    first = subprocess.run([sys.executable, "-P", "-m", "regrow", *llama_run, "--nproc", "2", "--steps", "6",
                            "--save-every", "3", "--ckpt-dir", str(root), "--snapshot-every", "2"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[rank 0, step 6] loss" in first.stdout and storage.read_latest(root) == "step_00000006"
    assert "[rank 1, step 0] snapshot: attached to" in first.stdout
    resume = [*llama_run, "--nproc", "1", "--steps", "9", "--save-every", "3", "--ckpt-dir", str(root)]
    assert cli.main([*resume, "--resume", "latest"]) == 0
    assert f"resumed from {root / 'step_00000006'} (saved at world size 2, now 1)" in capfd.readouterr().out

    config = dataclasses.replace(build_job(parse_options(resume)).config, progress=False, log_every=0)
    straight = Trainer(config)
    straight.run()
    loaded = Trainer(config, for_restore=True)
    restore_trainer(loaded, root / "step_00000009")
    assert (loaded.step, loaded.tokens_seen, loaded.sampler.state()) == (9, straight.tokens_seen,
                                                                           straight.sampler.state())
    ours, theirs = loaded.optimizer.shard_tensors(), straight.optimizer.shard_tensors()
    assert {key for key in ours if key.startswith("q8")} and ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key  # masters, 8-bit codes and scales, fp32 moments

    assert cli.main(["ckpt", "export", str(root), str(out), "--to", "safetensors", "--model", LLAMA]) == 0
    assert cli.main(["ckpt", "export", str(root), str(tmp_path / "bf16.safetensors"), "--to", "safetensors",
                     "--dtype", "bfloat16"]) == 0
    printed = capfd.readouterr().out
    assert (f"exported step 9 of {root / 'step_00000009'}: 20 tensors, 139,584 parameters, 558,336 bytes of float32 "
            f"to {out / 'model.safetensors'} and {out / 'config.json'}") in printed
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained = straight.model(input_ids=tokens).logits
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == dict(straight.model.named_parameters()).keys()
    assert torch.equal(logits_of(weights, tokens), trained)
    fresh = llama()
    load_model(fresh, out / "model.safetensors")
    pretrained = LlamaForCausalLM.from_pretrained(out)
    assert pretrained.lm_head.weight is pretrained.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, trained)
        assert torch.equal(pretrained(input_ids=tokens).logits, trained)
    halves = load_file(tmp_path / "bf16.safetensors")
    assert all(torch.equal(halves[name], p.detach().to(torch.bfloat16))
               for name, p in straight.model.named_parameters())


def test_ckpt_export_refuses_a_model_that_is_not_the_checkpoints(tmp_path, capsys) -> None:
    """``--model`` with other keyword arguments than the run's builds another model: refused, naming a difference;
    without ``--model`` the directory gets the weights and a note on how to write config.json."""
    ckpt = tmp_path / "ckpt"
    trainer = Trainer(trainer_config(ModelFactory(target=LLAMA), steps=1))
    attach_writer(trainer, CheckpointOptions(ckpt_dir=str(ckpt), save_every=1), final_step=1)
    trainer.run()  # closing the sinks commits the save of the last step
    assert storage.read_latest(ckpt) == "step_00000001"
    assert cli.main(["ckpt", "export", str(ckpt), str(tmp_path / "out"), "--to", "safetensors", "--model", LLAMA,
                     "--model-kwargs", '{"hidden_size": 32, "heads": 2, "kv_heads": 1}']) == 1
    err = capsys.readouterr().err
    assert ("builds a model whose parameters differ from the checkpoint's (model.embed_tokens.weight: [256, 32] in "
            "the model, [256, 64] in the checkpoint; ") in err and "pass the --model-kwargs the run used" in err
    assert cli.main(["ckpt", "export", str(ckpt), str(tmp_path / "out"), "--to", "safetensors"]) == 0
    captured = capsys.readouterr()
    assert f"pass --model {LLAMA} (regrow does not run code a checkpoint names)" in captured.err
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()
    assert cli.main(["ckpt", "export", str(tmp_path / "nothing"), str(tmp_path / "x"), "--to", "safetensors"]) == 1
    assert "regrow ckpt export: " in capsys.readouterr().err
