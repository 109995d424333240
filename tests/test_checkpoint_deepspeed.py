"""DeepSpeed interop against real DeepSpeed (CPU accelerator, gloo, 2 spawned ranks): import of ZeRO-1/2/3 and
universal checkpoints, export to the universal layout that DeepSpeed resumes from, and refusal of bad input.

The first DeepSpeed spawn on a fresh machine JIT-compiles DeepSpeed's CPU shared-memory op (cached afterwards in
~/.cache/torch_extensions), which is why the spawn timeouts are generous.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from regrow.checkpoint.universal.deepspeed import (
    KINDS,
    DeepSpeedCheckpointError,
    FullState,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    export_deepspeed_universal,
    full_state_from_torch,
    import_deepspeed,
    safe_load,
)
from regrow.launch.local.spawn import run_local
from regrow.tests import ds_workers as w
from regrow.tests import torch_files as tw

pytestmark = pytest.mark.timeout(300)

STEPS = 3
TAG = f"global_step{STEPS}"
PADDED_MODEL = {"vocab_size": 257, "d_model": 62}
PADDED_ZERO = {"parameter_alignment": True, "round_robin_gradients": True, "elastic_checkpoint": True}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One spawn of 2 ranks saves ZeRO-1 (with an argparse ``args`` in the client state), ZeRO-2, bf16 ZeRO-2,
    "padded" and ZeRO-3 checkpoints of the same 3-step run; returns their directories and DeepSpeed's in-memory
    states. "padded" is ZeRO-2 on a GPT whose odd sizes make DeepSpeed pad between parameters
    (parameter_alignment) and at the end of each group, with parameters reordered (round_robin_gradients) and
    the optimizer state saved per group without padding (elastic_checkpoint)."""
    root = tmp_path_factory.mktemp("deepspeed")
    dirs = {name: str(root / name) for name in ("zero1", "zero2", "bf16", "padded", "zero3")}
    padded = dict(zero_extra=PADDED_ZERO, model_overrides=PADDED_MODEL)
    runs = [
        ("train_and_save", dict(stage=1, steps=STEPS, save_dir=dirs["zero1"],
                                client_state={"args": argparse.Namespace(seed=0, note="client state")})),
        ("train_and_save", dict(stage=2, steps=STEPS, save_dir=dirs["zero2"])),
        ("train_and_save", dict(stage=2, steps=STEPS, save_dir=dirs["bf16"], bf16=True)),
        ("train_and_save", dict(stage=2, steps=STEPS, save_dir=dirs["padded"], **padded)),
        ("train_and_save", dict(stage=3, steps=STEPS, save_dir=dirs["zero3"])),
    ]
    results = run_local(w.run_all, 2, runs, backend="gloo", timeout_s=240, env=w.DS_ENV)[0]
    return {"dirs": dirs, "memory": dict(zip(dirs, results)), "root": root}


def copy_tag(saved: dict, run: str, tmp_path: Path) -> Path:
    """A private copy of one saved checkpoint's tag folder, for tests that damage it."""
    folder = tmp_path / run / TAG
    shutil.copytree(Path(saved["dirs"][run]) / TAG, folder)
    return folder


def assert_states_equal(state: FullState, params: dict[str, dict[str, torch.Tensor]]) -> None:
    assert set(state.params) == set(params)
    for name, kinds in state.params.items():
        for kind in KINDS:
            assert params[name][kind].dtype == torch.float32 and torch.equal(kinds[kind], params[name][kind]), (
                name, kind)


@pytest.mark.parametrize("run", ["zero1", "zero2", "bf16", "padded", "zero3"])
def test_import_equals_what_deepspeed_holds_in_memory(saved: dict, run: str) -> None:
    """Masters and moments reassembled from the partitions equal DeepSpeed's own gathered view, bit for bit."""
    memory = saved["memory"][run]
    state = import_deepspeed(saved["dirs"][run])
    sources = {"zero1": "deepspeed-zero1", "zero2": "deepspeed-zero2", "bf16": "deepspeed-bf16-zero2",
               "padded": "deepspeed-zero2", "zero3": "deepspeed-zero3"}
    assert state.source == sources[run]
    assert state.step == STEPS and memory["steps"] == [STEPS]
    # The tied LM head is the embedding: one parameter, named once, as in model.named_parameters().
    assert set(state.params) == set(memory["params"]) and "lm_head.weight" not in state.params
    assert_states_equal(state, memory["params"])
    if run == "padded":
        # The layout really has what this run is meant to exercise.
        for rank in range(2):
            osd = safe_load(Path(saved["dirs"][run]) / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            osd = osd["optimizer_state_dict"]
            assert isinstance(osd["base_optimizer_state"], list), "elastic: per-group states, no torch state_dict"
            assert any(any(group) for group in osd["param_alignment_paddings"])
        assert any(osd["group_paddings"]), "the last rank's partitions end in padding"
        assert state.hyper == {}, "elastic checkpoints do not save the optimizer's param_groups"
        return
    groups = state.hyper["param_groups"]
    assert [g["weight_decay"] for g in groups] == [w.WEIGHT_DECAY, 0.0]
    assert state.hyper["lr"] == w.LR and state.hyper["betas"] == list(w.BETAS) and state.hyper["eps"] == w.EPS
    assert sorted(n for g in groups for n in g["params"]) == sorted(state.params)


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3"])
def test_import_masters_equal_deepspeeds_zero_to_fp32(saved: dict, run: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = import_deepspeed(saved["dirs"][run], tag=TAG)
    reference = get_fp32_state_dict_from_zero_checkpoint(saved["dirs"][run])
    for name, kinds in state.params.items():
        assert torch.equal(kinds["master"], reference[name]), name


def test_import_has_torch_adamw_semantics(saved: dict) -> None:
    """The imported moments are torch AdamW's (of the global-mean gradient), not something per rank or scaled."""
    model, optimizer = w.reference_adamw(STEPS)
    reference = full_state_from_torch(model, optimizer)
    state = import_deepspeed(saved["dirs"]["zero2"])
    assert reference.step == state.step and reference.hyper == state.hyper
    for name, kinds in state.params.items():
        for kind in KINDS:
            # Same math, different summation order of the gradient (2 ranks x 2 micro-batches vs 4 micro-batches).
            torch.testing.assert_close(kinds[kind], reference.params[name][kind], rtol=1e-4, atol=1e-7,
                                       msg=f"{name} {kind}")


def ds_to_universal(checkpoint_dir: str, tag: str) -> str:
    """Runs DeepSpeed's converter as its documentation does; returns the universal tag."""
    universal = f"{tag}_universal"
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", os.path.join(checkpoint_dir, tag),
               "--output_folder", os.path.join(checkpoint_dir, universal),
               # Our engine sets no universal_checkpoint_info (a Megatron-ism); serial workers suit 2 cores.
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, **w.DS_ENV})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return universal


@pytest.mark.parametrize("run", ["zero1", "zero2"])
def test_deepspeed_universal_conversion_imports_equal(saved: dict, run: str) -> None:
    direct = import_deepspeed(saved["dirs"][run])
    universal_tag = ds_to_universal(saved["dirs"][run], TAG)
    universal = import_deepspeed(saved["dirs"][run], tag=universal_tag)
    assert universal.source == "deepspeed-universal"
    assert universal.step == direct.step and universal.hyper == direct.hyper
    assert_states_equal(universal, direct.params)
    # The tag folder itself is accepted too.
    assert import_deepspeed(Path(saved["dirs"][run]) / universal_tag).step == STEPS


def test_export_round_trip_deepspeed_resumes_at_two_and_one_ranks(saved: dict, tmp_path: Path) -> None:
    """FullState -> universal -> fresh DeepSpeed engines (2 ranks ZeRO-2, 1 rank ZeRO-1) hold exactly the state and
    train on; at 2 ranks the losses equal those of DeepSpeed resuming from its own checkpoint. The "padded" state
    (no hyper-parameters known) goes into an engine without its padding and reordering options."""
    state = import_deepspeed(saved["dirs"]["zero2"])
    out = tmp_path / "universal"
    folder = export_deepspeed_universal(state, out)
    assert folder == out / f"{TAG}_universal" and (out / "latest_universal").read_text() == folder.name
    mine = import_deepspeed(out)
    assert mine.step == state.step and mine.hyper == state.hyper and mine.source == "deepspeed-universal"
    assert_states_equal(mine, state.params)
    padded = import_deepspeed(saved["dirs"]["padded"])
    padded_out = tmp_path / "padded"
    export_deepspeed_universal(padded, padded_out)
    # The checkpoint's hyper-parameters replace the engine's, group by group, as when DeepSpeed resumes its own.
    retuned = FullState(step=state.step, params=state.params, source=state.source, hyper={"param_groups": [
        {**group, "lr": 1e-3, "weight_decay": wd} for group, wd in zip(state.hyper["param_groups"], (0.05, 0.0))]})
    retuned_out = tmp_path / "retuned"
    export_deepspeed_universal(retuned, retuned_out)

    more = 2
    common = dict(first_step=STEPS, more_steps=more)
    two = run_local(w.run_all, 2, [
        ("load_and_train", dict(stage=2, load_dir=str(out), load_universal=True, **common)),
        ("load_and_train", dict(stage=2, load_dir=saved["dirs"]["zero2"], load_universal=False, **common)),
        ("load_and_train", dict(stage=2, load_dir=str(padded_out), load_universal=True, model_overrides=PADDED_MODEL,
                                **common)),
        ("load_and_train", dict(stage=2, load_dir=str(retuned_out), load_universal=True, **common)),
    ], backend="gloo", timeout_s=240, env=w.DS_ENV)[0]
    one = run_local(w.run_all, 1, [
        ("load_and_train", dict(stage=1, load_dir=str(out), load_universal=True, **common)),
    ], backend="gloo", timeout_s=240, env=w.DS_ENV)[0]
    universal_two, native_two, padded_two, retuned_two = two
    universal_one = one[0]
    engine_hyper = [{"lr": w.LR, "betas": w.BETAS, "eps": w.EPS, "weight_decay": wd} for wd in (w.WEIGHT_DECAY, 0.0)]
    for result, expected in ((universal_two, state), (universal_one, state), (padded_two, padded)):
        loaded = result["loaded"]
        assert loaded["steps"] == [STEPS] and loaded["global_steps"] == STEPS
        assert loaded["hyper"] == engine_hyper
        assert_states_equal(expected, loaded["params"])
        assert result["global_steps"] == STEPS + more
    assert_states_equal(state, native_two["loaded"]["params"])
    assert universal_two["losses"] == native_two["losses"]
    torch.testing.assert_close(universal_one["losses"], universal_two["losses"], rtol=1e-5, atol=0)
    assert universal_two["losses"][-1] < saved["memory"]["zero2"]["losses"][0]
    assert padded_two["losses"][-1] < saved["memory"]["padded"]["losses"][0]
    assert retuned_two["loaded"]["hyper"] == [{"lr": 1e-3, "betas": w.BETAS, "eps": w.EPS, "weight_decay": wd}
                                              for wd in (0.05, 0.0)]
    assert_states_equal(state, retuned_two["loaded"]["params"])


def test_client_state_namespace_is_allowed(saved: dict) -> None:
    model_states = safe_load(Path(saved["dirs"]["zero1"]) / TAG / "mp_rank_00_model_states.pt")
    assert model_states["args"] == argparse.Namespace(seed=0, note="client state")


def test_zero3_checkpoint_converts_and_regrow_resumes_it_at_stage_3(saved: dict, tmp_path: Path) -> None:
    """`regrow ckpt convert` of a DeepSpeed ZeRO-3 save, then a regrow Trainer at ZeRO stage 3 (2 ranks, fp32 state)
    resumes from it with DeepSpeed's masters and moments, and trains on."""
    from regrow.launch import cli
    from regrow.tests import ckpt_workers

    source = import_deepspeed(saved["dirs"]["zero3"])
    regrow_root = tmp_path / "regrow"
    args = ["ckpt", "convert", saved["dirs"]["zero3"], str(regrow_root), "--from", "deepspeed", "--to", "universal"]
    assert cli.main(args) == 0
    run = dict(path=str(regrow_root), stage=3, state_bits=32)
    loaded = run_local(ckpt_workers.load_runs, 2, [run], backend="gloo", timeout_s=240)[0][0]
    assert loaded["step"] == source.step == STEPS
    for name, kinds in source.params.items():
        for kind, key in (("master", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            assert torch.equal(loaded["loaded_state"][f"{name}:{key}"], kinds[kind].reshape(-1)), (name, kind)
    assert loaded["losses"] and all(torch.isfinite(torch.tensor(loaded["losses"])))


def test_zero3_files_missing_or_from_another_save_are_named(saved: dict, tmp_path: Path) -> None:
    folder = copy_tag(saved, "zero3", tmp_path)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DeepSpeedCheckpointError,
                       match=r"missing optimizer state file\(s\) .*zero_pp_rank_1_mp_rank_00"):
        import_deepspeed(folder)
    folder = copy_tag(saved, "zero3", tmp_path / "b")
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(DeepSpeedCheckpointError, match=r"zero_pp_rank_0_mp_rank_00_model_states\.pt is missing"):
        import_deepspeed(folder)
    (folder / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(DeepSpeedCheckpointError, match=r"says zero_stage=3, but the per-rank model states"):
        import_deepspeed(folder)


def test_missing_optimizer_file_is_named(saved: dict, tmp_path: Path) -> None:
    folder = copy_tag(saved, "zero2", tmp_path)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DeepSpeedCheckpointError,
                       match=r"missing optimizer state file\(s\) \S*zero_pp_rank_1_mp_rank_00_optim_states\.pt: "
                             r"\S*mp_rank_00_model_states\.pt says the checkpoint has dp_world_size=2"):
        import_deepspeed(folder)


class RunsShellCommand:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_file_with_unexpected_global_is_refused(saved: dict, tmp_path: Path, writer: str) -> None:
    folder = copy_tag(saved, "zero2", tmp_path)
    marker = tmp_path / "pwned"
    victim = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    payload = {"optimizer_state_dict": RunsShellCommand(f"touch {marker}")}
    if writer == "torch.save":
        torch.save(payload, victim)
    else:
        with open(victim, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle \S*zero_pp_rank_0_mp_rank_00_optim_"
                                                    r"states\.pt: it refers to (posix|os)\.system"):
        import_deepspeed(folder)
    assert not marker.exists()


def test_checkpoint_kinds_that_are_not_read_say_why(saved: dict, tmp_path: Path) -> None:
    with pytest.raises(DeepSpeedCheckpointError, match=r"holds no DeepSpeed checkpoint: no 'latest'"):
        import_deepspeed(tmp_path)
    with pytest.raises(DeepSpeedCheckpointError, match=r"does not exist; tags in"):
        import_deepspeed(saved["dirs"]["zero2"], tag="global_step99")
    folder = copy_tag(saved, "zero2", tmp_path)
    model_path = folder / "mp_rank_00_model_states.pt"
    model = safe_load(model_path)
    torch.save({**model, "param_shapes": None}, model_path)
    with pytest.raises(UnsupportedCheckpointError, match=r"mp_rank_00_model_states\.pt has no param_shapes: it was "
                                                         r"saved without ZeRO"):
        import_deepspeed(folder)
    torch.save(model, model_path)
    torch.save(model, folder / "mp_rank_01_model_states.pt")
    with pytest.raises(UnsupportedCheckpointError, match=r"model-parallel \(tensor or pipeline\)"):
        import_deepspeed(folder)


def test_full_state_validation_and_export_refusals(saved: dict, tmp_path: Path) -> None:
    good = {kind: torch.zeros(2, 3) for kind in KINDS}
    with pytest.raises(ValueError, match=r"w has kinds \['exp_avg', 'master'\]"):
        FullState(step=1, params={"w": {"master": good["master"], "exp_avg": good["exp_avg"]}}, hyper={}, source="t")
    with pytest.raises(ValueError, match=r"name '\.\./x' cannot be a directory name"):
        FullState(step=1, params={"../x": good}, hyper={}, source="t")
    with pytest.raises(ValueError, match=r"all kinds must be fp32"):
        FullState(step=1, params={"w": {**good, "exp_avg": torch.zeros(2, 3, dtype=torch.bfloat16)}}, hyper={},
                  source="t")
    with pytest.raises(ValueError, match=r"FullState\.step=-1"):
        FullState(step=-1, params={"w": good}, hyper={}, source="t")
    state = FullState(step=1, params={"w": good}, hyper={}, source="t")
    export_deepspeed_universal(state, tmp_path, tag="t1")
    with pytest.raises(FileExistsError, match=r"t1 already exists"):
        export_deepspeed_universal(state, tmp_path, tag="t1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest_universal", "t1"]


def test_cli_convert_round_trip_and_regrow_resumes_it(saved: dict, tmp_path: Path) -> None:
    """`regrow ckpt convert` DeepSpeed ZeRO-2 -> regrow universal -> DeepSpeed universal keeps every tensor exactly,
    and a regrow Trainer at another world size (1) and stage (2 -> regrow stage 1) resumes from the converted
    checkpoint with DeepSpeed's masters and moments."""
    from regrow.checkpoint.universal import verify, whole
    from regrow.launch import cli
    from regrow.tests import ckpt_workers

    source = import_deepspeed(saved["dirs"]["zero2"])
    regrow_root, ds_out = tmp_path / "regrow", tmp_path / "deepspeed"
    args = ["ckpt", "convert", saved["dirs"]["zero2"], str(regrow_root), "--from", "deepspeed", "--to", "universal"]
    assert cli.main(args) == 0
    assert cli.main(["ckpt", "verify", str(regrow_root)]) == 0
    converted = whole.read_whole(verify.candidates(regrow_root)[0])
    assert converted.step == source.step
    back = ["ckpt", "convert", str(regrow_root), str(ds_out), "--from", "universal", "--to", "deepspeed"]
    assert cli.main(back) == 0
    again = import_deepspeed(ds_out)
    for name, kinds in source.params.items():
        for kind, value in kinds.items():
            assert torch.equal(converted.params[name][kind], value), f"{name}/{kind} (to regrow)"
            assert torch.equal(again.params[name][kind], value), f"{name}/{kind} (back to DeepSpeed)"
    assert again.step == source.step
    run = dict(path=str(regrow_root), stage=1, state_bits=32)
    loaded = run_local(ckpt_workers.load_runs, 1, [run], backend="gloo", timeout_s=240)[0][0]
    assert loaded["step"] == source.step
    for name, kinds in source.params.items():
        assert torch.equal(loaded["loaded_state"][f"{name}:master"], kinds["master"].reshape(-1)), name
        assert torch.equal(loaded["loaded_state"][f"{name}:exp_avg"], kinds["exp_avg"].reshape(-1)), name
        assert torch.equal(loaded["loaded_state"][f"{name}:exp_avg_sq"], kinds["exp_avg_sq"].reshape(-1)), name
    assert all(torch.isfinite(torch.tensor(loaded["losses"])))


def test_cli_convert_reports_bad_input(saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from regrow.launch import cli

    missing = tmp_path / "nothing-here"
    missing.mkdir()
    assert cli.main(["ckpt", "convert", str(missing), str(tmp_path / "out"), "--from", "deepspeed",
                     "--to", "universal"]) == 1
    assert "regrow ckpt convert:" in capsys.readouterr().err
    assert cli.main(["ckpt", "convert", "a", "b", "--from", "universal", "--to", "universal"]) == 2


GIB = 1 << 30
RSS_GROWTH_BOUND_MIB = 64
"""What refusing a crafted file may add to the process's peak RSS (the bombs below declare 1 GiB)."""

MEASURED_CONVERT = """
import json, resource, sys, time
from regrow.launch import cli
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
code = cli.main(sys.argv[1:])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"code": code, "seconds": time.monotonic() - start, "rss_growth_mib": grown}))
"""


def measured_convert(folder: Path, out: Path) -> tuple[dict, str]:
    """``regrow ckpt convert folder out --from deepspeed --to universal`` in a fresh process; returns its exit code,
    seconds and peak-RSS growth over the imports (``ru_maxrss``, so a peak freed before the end still counts),
    and its stderr."""
    done = subprocess.run([sys.executable, "-c", MEASURED_CONVERT, "ckpt", "convert", str(folder), str(out),
                           "--from", "deepspeed", "--to", "universal"], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("member", ["data/0", "data.pkl"])
def test_a_deepspeed_file_that_inflates_to_a_gib_is_refused_before_inflating(tmp_path: Path, member: str) -> None:
    """A 1 MB model-states file whose zip member (a tensor's storage, or the pickle) inflates to 1 GiB of zeros:
    ``regrow ckpt convert`` refuses it from the zip's central directory, naming the file, the member and the
    limit, in well under a second and with less than RSS_GROWTH_BOUND_MIB of peak memory. It used to inflate it
    (twice for the pickle: the unsafe-globals scan, then the load) before finding out the file was no model
    states."""
    folder = tmp_path / "global_step1"
    folder.mkdir()
    path = folder / "mp_rank_00_model_states.pt"
    if member == "data.pkl":
        tw.write_torch_zip(path, {"param_shapes": None}, inflating=("data.pkl", GIB))
    else:
        big = tw.Tensor(tw.Storage("0", GIB // 4), (GIB // 4,), (1,))
        tw.write_torch_zip(path, {"module": {"w": big}}, inflating=("data/0", GIB))
    assert path.stat().st_size < 2_000_000
    result, err = measured_convert(folder, tmp_path / "out")
    assert result["code"] == 1, err[-2000:]
    assert result["rss_growth_mib"] < RSS_GROWTH_BOUND_MIB and result["seconds"] < 5, (result, err[-2000:])
    assert f"{path}: zip member 'archive/{member}' declares {GIB} bytes" in err, err[-2000:]
    assert "over the limit of 10 times its compressed size" in err


@pytest.mark.timeout(60)
def test_a_tensor_declaring_more_elements_than_its_storage_holds_is_refused(tmp_path: Path) -> None:
    """A 1 KB file holding a stride-0 view of 2^28 elements over a 4-byte storage: torch loads it (a view costs
    nothing), but the reader's reshapes and concatenations would allocate 1 GiB per copy. ``safe_load`` refuses
    it, naming the file and where in it the tensor sits."""
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    view = tw.Tensor(tw.Storage("0", 1), (1 << 28,), (0,))
    tw.write_torch_zip(path, {"optimizer_state_dict": {"single_partition_of_fp32_groups": [view]}},
                       {"0": bytes(4)})
    with pytest.raises(DeepSpeedCheckpointError, match=(
            rf"{path}: optimizer_state_dict\.single_partition_of_fp32_groups\[0\] is a tensor of 268435456 "
            r"elements \(1073741824 bytes\) over a storage of 4 bytes")):
        safe_load(path)


def deepspeed_fragment_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class that pickles as DeepSpeed's ``fragment_address`` does (same global name, same fields), registered
    under DeepSpeed's module names for this test only, so that crafted files need no DeepSpeed import."""
    module = types.ModuleType("deepspeed.utils.tensor_fragment")

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801 (DeepSpeed's name)
        numel: int
        start: int

    fragment_address.__module__ = module.__name__
    fragment_address.__qualname__ = "fragment_address"
    module.fragment_address = fragment_address
    for name in ("deepspeed", "deepspeed.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return fragment_address


def write_zero_folder(folder: Path, fragment: type, fragments: dict[str, tuple[int, int]], numel: int) -> None:
    """A one-rank ZeRO-2 tag folder whose parameters (name -> (start, numel)) lie in one flat partition of
    ``numel`` fp32 elements."""
    folder.mkdir(parents=True)
    shapes = collections.OrderedDict((name, torch.Size([n])) for name, (_, n) in fragments.items())
    torch.save({"param_shapes": [shapes], "dp_world_size": 1}, folder / "mp_rank_00_model_states.pt")
    state = {"step": 3, "exp_avg": torch.zeros(numel), "exp_avg_sq": torch.zeros(numel)}
    mapping = collections.OrderedDict((name, fragment(numel=n, start=s)) for name, (s, n) in fragments.items())
    osd = {"zero_stage": 2, "partition_count": 1, "single_partition_of_fp32_groups": [torch.arange(numel).float()],
           "base_optimizer_state": {"state": {0: state}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
           "param_slice_mappings": [mapping]}
    torch.save({"optimizer_state_dict": osd}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_parameters_whose_fragments_overlap_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's partitions hold each parameter once. Slice mappings that point many parameters at the same
    elements would make the reader copy the partition once per parameter (a 4 MB partition named by 1,000
    parameters: 12 GB); they are refused naming the file, the group and both parameters. The same layout without
    the overlap reads."""
    fragment = deepspeed_fragment_class(monkeypatch)
    write_zero_folder(tmp_path / "disjoint", fragment, {"a": (0, 6), "b": (6, 10)}, 16)
    state = import_deepspeed(tmp_path / "disjoint")
    assert torch.equal(state.params["b"]["master"], torch.arange(6, 16).float())
    write_zero_folder(tmp_path / "aliased", fragment, {"a": (0, 16), "b": (0, 16), "c": (8, 8)}, 16)
    with pytest.raises(DeepSpeedCheckpointError, match=(
            r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: param_slice_mappings\[0\]: the fragments of 'a' "
            r"\[0, 16\) and 'b' \[0, 16\) overlap")):
        import_deepspeed(tmp_path / "aliased")


def test_a_negative_or_non_numeric_parameter_shape_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A model-states file whose ``param_shapes`` gives a negative dimension (its product still matching the
    fragments) or a non-number is refused naming the file and the parameter; the first was a RuntimeError
    traceback from ``view``."""
    fragment = deepspeed_fragment_class(monkeypatch)
    folder = tmp_path / "negative"
    write_zero_folder(folder, fragment, {"a": (0, 6)}, 6)
    model_path = folder / "mp_rank_00_model_states.pt"
    torch.save({"param_shapes": [{"a": [-2, -3]}], "dp_world_size": 1}, model_path)
    with pytest.raises(DeepSpeedCheckpointError, match=r"param_shapes gives 'a' the shape \[-2, -3\], not a list of "
                                                       r"whole numbers >= 0"):
        import_deepspeed(folder)
    torch.save({"param_shapes": [{"a": ["six"]}], "dp_world_size": 1}, model_path)
    with pytest.raises(DeepSpeedCheckpointError, match=r"param_shapes gives 'a' the shape \['six'\]"):
        import_deepspeed(folder)


@pytest.mark.timeout(120)
def test_a_huge_latest_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    """DeepSpeed's ``latest`` names a tag in a few bytes. A 256 MiB one (sparse: it costs no disk) used to be read
    and decoded whole; it is refused after its first KiB, naming the file."""
    (tmp_path / "global_step1").mkdir()
    latest = tmp_path / "latest"
    with open(latest, "wb") as file:
        file.truncate(256 << 20)
    result, err = measured_convert(tmp_path, tmp_path / "out")
    assert result["code"] == 1, err[-2000:]
    assert result["rss_growth_mib"] < RSS_GROWTH_BOUND_MIB, (result, err[-2000:])
    assert f"{latest} is longer than 1024 bytes; it should hold one tag name" in err, err[-2000:]
