"""Universal checkpoints load at any layout: saved at world 2 / ZeRO-2 or 3 / 8-bit state, loaded at world 1, 2, 3,
4, stage 1, 2 or 3, 8-bit or fp32 state, on real gloo processes.

Every rank runs one thread (``threads_per_rank=1``): a different thread count changes the order of the sums inside a
matmul, and with it the last bits of every gradient.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from regrow.checkpoint.universal import verify
from regrow.checkpoint.universal.format import sealed_manifest_json
from regrow.launch.local.spawn import run_local
from regrow.tests import ckpt_workers as cw
from regrow.trainer.zero import codes as quant
from regrow.trainer.zero.layout import BLOCK_SIZE, round_up

SAVE_AT = 3
# Continuing at another world size changes only how the gradient mean is rounded (W partial means summed, divided by
# W), which can move an 8-bit code by one step and the update with it. As in test_zero.py, the trajectories must then
# agree to within a small fraction of the total movement: lr = 1e-3 over 3 steps moves a weight by at most 3e-3;
# measured differences are below 5e-6 (loss 5e-7); 1e-4 is 30x tighter than the movement and 20x looser than measured.
PARAM_ATOL = 1e-4
LOSS_ATOL = 1e-4


def spawn_all(fn, world_size: int, *args) -> list:
    """Every rank's result, in rank order."""
    return run_local(fn, world_size, *args, backend="gloo", timeout_s=150, threads_per_rank=1)


def spawn(fn, world_size: int, *args):
    return spawn_all(fn, world_size, *args)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One world-2 spawn: an 8-bit and an fp32-state run of 6 steps at stage 2, and an 8-bit run at stage 3, each
    saving at steps 3 and 6."""
    roots = {name: tmp_path_factory.mktemp(f"ckpt{name}") for name in ("8", "32", "8s3")}
    runs = [dict(root=str(roots[name]), state_bits=bits, stage=stage, save_every=SAVE_AT)
            for name, bits, stage in (("8", 8, 2), ("32", 32, 2), ("8s3", 8, 3))]
    run8, run32, run8s3 = spawn(cw.save_runs, 2, runs)
    assert run8["results"] == run32["results"] == run8s3["results"] == ["committed", "committed"]
    return {"path8": str(roots["8"] / "step_00000003"), "path32": str(roots["32"] / "step_00000003"),
            "path8s3": str(roots["8s3"] / "step_00000003"), "run8": run8, "run32": run32, "run8s3": run8s3}


@pytest.fixture(scope="module")
def loaded(saved) -> dict[int, list[dict]]:
    """Loads of the world-2 checkpoints, one spawn per world size (stages alternate; world 1 also loads the 8-bit
    checkpoint as fp32 state, world 3 the fp32 checkpoint as 8-bit state; world 2 loads the stage-2 checkpoint at
    stage 3 and the stage-3 one at stages 2 and 1)."""
    p8, p32 = saved["path8"], saved["path32"]
    plans = {
        1: [dict(path=p8, stage=2, state_bits=8), dict(path=p8, stage=2, state_bits=32)],
        2: [dict(path=p8, stage=1, state_bits=8), dict(path=p8, stage=3, state_bits=8),
            dict(path=saved["path8s3"], stage=2, state_bits=8), dict(path=saved["path8s3"], stage=1, state_bits=8)],
        3: [dict(path=p8, stage=1, state_bits=8), dict(path=p32, stage=2, state_bits=8)],
        4: [dict(path=p8, stage=2, state_bits=8)],
    }
    loads = {}
    for world, plan in plans.items():
        ranks = spawn_all(cw.load_runs, world, plan)
        for index, run in enumerate(ranks[0]):
            run["bytes_by_rank"] = [rank[index]["bytes_read"] for rank in ranks]
        loads[world] = ranks[0]
    return loads


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_8bit_checkpoint_loads_bit_identically(saved, loaded, world_size: int) -> None:
    """Masters, codes (padding included) and scales of every parameter equal those saved, at any world size."""
    expected = saved["run8"]["saved_state"]
    got = loaded[world_size][0]["loaded_state"]
    assert got.keys() == expected.keys()
    assert any(key.endswith("exp_avg_codes") for key in got), "expected some parameters with 8-bit state"
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"world {world_size}: {key}"
    assert loaded[world_size][0]["step"] == SAVE_AT
    assert loaded[world_size][0]["cursor"] == {"epoch": 0, "index": 6 * cw.GLOBAL_BATCH}


@pytest.mark.timeout(400)
def test_same_reduction_continues_bit_identically(saved, loaded) -> None:
    """World 2 at stage 1 reduces exactly like the saving world 2 at stage 2 (one micro-batch per rank): the
    continued losses and final parameters are bit-identical to the run that never stopped."""
    straight, resumed = saved["run8"], loaded[2][0]
    assert resumed["losses"] == straight["losses"][SAVE_AT:]
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name


@pytest.mark.timeout(400)
def test_stage3_checkpoints_load_at_stage2_and_back_bit_identically(saved, loaded) -> None:
    """ZeRO stage 3 reduces like stages 1 and 2 at world 2: its run, its saved state, a stage-2 checkpoint loaded
    at stage 3 and a stage-3 checkpoint loaded at stage 2 or 1 all continue bit-identically to the stage-2 run that
    never stopped."""
    straight = saved["run8"]
    assert saved["run8s3"]["losses"] == straight["losses"]
    for key, value in straight["saved_state"].items():
        assert torch.equal(saved["run8s3"]["saved_state"][key], value), key
    for resumed in loaded[2][1:]:
        for key, value in straight["saved_state"].items():
            assert torch.equal(resumed["loaded_state"][key], value), key
        assert resumed["losses"] == straight["losses"][SAVE_AT:]
        for name, value in straight["params"].items():
            assert torch.equal(resumed["params"][name], value), name


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_other_world_sizes_continue_within_reduction_rounding(saved, loaded, world_size: int) -> None:
    straight, resumed = saved["run8"], loaded[world_size][0]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight["losses"][SAVE_AT:]),
                               rtol=0, atol=LOSS_ATOL)
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=PARAM_ATOL, msg=name)


def _moments(state: dict[str, torch.Tensor], bits: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{param: {what: tensor}}`` for parameters whose state has ``bits`` bits."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, what = key.split(":")
        out.setdefault(name, {})[what] = value
    marker = "exp_avg_codes" if bits == 8 else "exp_avg"
    return {name: parts for name, parts in out.items() if marker in parts}


@pytest.mark.timeout(400)
def test_8bit_checkpoint_loads_as_fp32_state_dequantized(saved, loaded) -> None:
    saved8 = _moments(saved["run8"]["saved_state"], 8)
    as32 = loaded[1][1]["loaded_state"]
    assert saved8, "expected 8-bit parameters in the checkpoint"
    for name, parts in saved8.items():
        numel = as32[f"{name}:master"].numel()
        for moment, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            values = quant.dequantize_blockwise(parts[f"{moment}_codes"], parts[f"{moment}_scales"],
                                                quant.dynamic_code_map(signed))
            assert torch.equal(as32[f"{name}:{moment}"], values[:numel]), f"{name}:{moment}"
        assert torch.equal(as32[f"{name}:master"], parts["master"]), name
    assert all(torch.isfinite(torch.tensor(loaded[1][1]["losses"])))


@pytest.mark.timeout(400)
def test_fp32_checkpoint_loads_as_8bit_state_quantized_per_parameter(saved, loaded) -> None:
    saved32 = saved["run32"]["saved_state"]
    as8 = _moments(loaded[3][1]["loaded_state"], 8)
    assert as8, "expected parameters that get 8-bit state at the new layout"
    for name, parts in as8.items():
        for moment, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            values = saved32[f"{name}:{moment}"]
            padded = torch.zeros(round_up(values.numel(), BLOCK_SIZE))
            padded[: values.numel()] = values
            codes, scales = quant.quantize_blockwise(padded, quant.dynamic_code_map(signed))
            assert torch.equal(parts[f"{moment}_codes"], codes), f"{name}:{moment}"
            assert torch.equal(parts[f"{moment}_scales"], scales), f"{name}:{moment}"
        assert torch.equal(parts["master"], saved32[f"{name}:master"]), name


def test_files_hold_whole_blocks_for_codes_and_exact_numel_for_fp32(saved) -> None:
    from regrow.checkpoint.universal import verify

    manifest = verify.read_manifest(Path(saved["path8"]))
    kinds = {(t.param, t.kind): t for t in manifest.tensors}
    for param in manifest.params:
        master = kinds[(param.name, "master")]
        assert master.nbytes == 4 * param.numel and master.shape == list(param.shape)
        if param.state_bits == 8:
            blocks = round_up(param.numel, BLOCK_SIZE) // BLOCK_SIZE
            assert kinds[(param.name, "exp_avg.codes")].nbytes == blocks * BLOCK_SIZE
            assert kinds[(param.name, "exp_avg_sq.scales")].nbytes == 4 * blocks
    assert manifest.code_map_version == quant.CODE_MAP_VERSION
    assert manifest.world_size == 2 and manifest.config["optim"]["stage"] == 2


def test_whole_model_fp32_export_and_import_round_trip(saved, tmp_path) -> None:
    """``read_whole`` dequantizes 8-bit moments; ``write_whole`` writes a checkpoint (fp32 state) that reads back
    bit-identically and that a job with 8-bit state loads."""
    from regrow.checkpoint.universal.whole import read_whole, write_whole
    from regrow.recovery.from_checkpoint import restore_trainer
    from regrow.trainer.loop import Trainer

    exported = read_whole(saved["path8"])
    expected = saved["run8"]["saved_state"]
    codes = expected["blocks.0.mlp.fc.weight:exp_avg_codes"]
    scales = expected["blocks.0.mlp.fc.weight:exp_avg_scales"]
    dequantized = quant.dequantize_blockwise(codes, scales, quant.dynamic_code_map(True))
    assert torch.equal(exported.params["blocks.0.mlp.fc.weight"]["exp_avg"].reshape(-1), dequantized)
    assert exported.step == SAVE_AT
    path = write_whole(tmp_path, exported)
    again = read_whole(path)
    for name, kinds in exported.params.items():
        for kind, value in kinds.items():
            assert torch.equal(again.params[name][kind], value), f"{name}:{kind}"
    trainer = Trainer(cw.config(1, steps=SAVE_AT + 1))
    assert restore_trainer(trainer, "latest", root=tmp_path).step == SAVE_AT
    assert torch.isfinite(torch.tensor(trainer.train_step().loss))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_each_rank_reads_about_its_share_only(saved, loaded, world_size: int) -> None:
    """Every byte is read by some rank, and no rank reads whole files: a rank reads its ranges plus, where the new
    layout cuts inside a checksummed chunk of the old one, the rest of that chunk (4 KiB chunks here)."""
    from regrow.checkpoint.universal import verify

    total = verify.read_manifest(Path(saved["path8"])).nbytes()
    by_rank = loaded[world_size][0]["bytes_by_rank"]
    assert total <= sum(by_rank) <= 1.1 * total
    assert max(by_rank) <= 1.15 * total / world_size  # measured: 1.06 at world 3, 1.004 at world 4


BIG_PARAM = "blocks.0.mlp.fc.weight"  # 16384 elements: 16 chunks of 4096 bytes in its master file
def digit_of(field: str) -> Callable[[bytes], int]:
    """The offset of the last digit of ``field``'s value in a manifest's text (``"step": 4`` -> the ``4``)."""
    def offset(text: bytes) -> int:
        match = re.search(rb'"%s": *(\d+)' % field.encode(), text)
        assert match, field
        return match.end(1) - 1
    return offset


DAMAGE = {  # case: (file in the step directory, which byte to flip: an offset, -1 for the last, or a function of the
    # file's bytes); a flipped digit stays a number, so only the manifest's own checksum can tell
    "manifest step": ("manifest.json", digit_of("step")),
    "manifest tokens seen": ("manifest.json", digit_of("tokens_seen")),
    "manifest data cursor": ("manifest.json", digit_of("index")),
    "master, first byte": (f"params/{BIG_PARAM}/master.bin", 0),
    "master, middle chunk": (f"params/{BIG_PARAM}/master.bin", 7 * 4096 + 1234),
    "master, last byte": (f"params/{BIG_PARAM}/master.bin", -1),
    "8-bit codes": (f"params/{BIG_PARAM}/exp_avg.codes.bin", 5000),
    "8-bit scales": (f"params/{BIG_PARAM}/exp_avg_sq.scales.bin", 17),
    "rank 1's generators": ("rng/rank_00001.bin", 100),
    "rank 0's generator JSON": ("rng/rank_00000.json", 40),
}


@pytest.fixture(scope="module")
def damaged(saved, tmp_path_factory) -> dict[str, str]:
    """One copy of the world-2 checkpoint per case of :data:`DAMAGE`, with that one byte flipped, plus a copy whose
    manifest records a wrong CRC for one master chunk."""
    base = tmp_path_factory.mktemp("damaged")
    paths = {}
    for case, (name, offset) in DAMAGE.items():
        step = Path(shutil.copytree(saved["path8"], base / case.replace(" ", "_").replace(",", "").replace("'", "")))
        data = bytearray((step / name).read_bytes())
        at = offset(bytes(data)) if callable(offset) else offset
        data[at] ^= 0x01 if name == "manifest.json" else 0x20  # 0x01 keeps a digit a digit ("4" -> "5")
        (step / name).write_bytes(bytes(data))
        paths[case] = str(step)
    step = Path(shutil.copytree(saved["path8"], base / "manifest_crc"))
    manifest = json.loads((step / "manifest.json").read_text())
    entry = next(t for t in manifest["tensors"] if t["file"] == f"params/{BIG_PARAM}/master.bin")
    entry["chunks"][3]["crc32"] ^= 1
    (step / "manifest.json").write_text(sealed_manifest_json(manifest))  # sums right: the chunk's check must tell
    paths["a chunk's CRC in the manifest"] = str(step)
    return paths


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 3])
def test_one_flipped_byte_anywhere_is_detected_at_any_world_size_and_nothing_loads(saved, damaged,
                                                                                  world_size: int) -> None:
    """Saved at world 2; loaded at world 1 and at world 3, whose rank ranges cut through the files' 4096-byte
    chunks. Every damaged copy fails on every rank, the failure names the damaged file, and no rank's trainer took
    any of it. The one exception is a file the load does not read: at world 1 rank 1's generators (a rank of
    world 1 takes rank 0's); that copy loads, and ``regrow ckpt verify`` names the file."""
    cases = sorted(damaged)
    ranks = spawn_all(cw.load_damaged, world_size, [damaged[case] for case in cases])
    files = {**{case: name for case, (name, _) in DAMAGE.items()},
             "a chunk's CRC in the manifest": f"params/{BIG_PARAM}/master.bin"}
    for index, case in enumerate(cases):
        seen = [rank[index] for rank in ranks]
        problems = verify.verify(Path(damaged[case])).problems
        assert len(problems) == 1 and problems[0].startswith(f"{files[case]}: "), (case, problems)
        if world_size == 1 and case == "rank 1's generators":
            assert all(r["error"] is None for r in seen), (case, seen)
            continue
        assert all(r["error"] is not None for r in seen), (case, seen)
        assert all(r["untouched"] for r in seen), (case, seen)
        assert any(files[case] in r["error"] for r in seen), (case, seen)
