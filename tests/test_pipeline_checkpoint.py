"""Universal checkpoints of pipelines: a pipeline's checkpoint loads at any other pipeline layout, at none (the
data-parallel Trainer) and back, on real gloo processes; and the manifest's ``pipeline`` section (each stage's
parameters, Adam step count and learning-rate scale) is built from the ranks' parts, checked when read, and applied
on load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from regrow.checkpoint.universal.commit import SaveTarget, build_manifest
from regrow.checkpoint.universal.format import (
    KINDS_BY_BITS,
    CheckpointError,
    CorruptCheckpoint,
    Manifest,
    sealed_manifest_json,
    tensor_file,
)
from regrow.checkpoint.universal.manifest_parse import parse_manifest
from regrow.checkpoint.universal.reshard import load_state, stage_values
from regrow.launch import cli
from regrow.launch.local.spawn import run_local
from regrow.tests import pipeline_workers as w
from regrow.tests.test_pipeline import F32, config
from regrow.trainer.checkpoint_view import CheckpointView, StageRecord
from regrow.trainer.loop import Trainer
from regrow.trainer.models import GPT
from regrow.trainer.zero.config import ZeroConfig
from regrow.trainer.zero.optimizer import plan_layout

# ---------------------------------------------------------------------------------------------- universal checkpoints
MOVES = [(4, 1), (2, 2), (1, 3), (4, 1)]
"""(pipeline stages, ZeRO stage) of each move on 4 ranks: S=4 x D=1, S=2 x D=2 at ZeRO-2, the data-parallel
Trainer (S=1 x D=4) at ZeRO-3, and back to S=4 x D=1."""


def _files(ckpt: Path) -> dict[str, bytes]:
    return {str(path.relative_to(ckpt)): path.read_bytes() for path in sorted((ckpt / "params").rglob("*.bin"))}


def _merged(results: list[dict], index: int) -> dict[str, torch.Tensor]:
    """Move ``index``'s master weights from every rank, by full-model name (replicas hold equal copies)."""
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["runs"][index]["masters"].items():
            torch.testing.assert_close(merged.setdefault(name, value), value, rtol=0, atol=0, msg=name)
    return merged


@pytest.mark.timeout(400)
@pytest.mark.parametrize("bits", [32, 8])
def test_pipeline_checkpoint_loads_at_any_layout_and_back(tmp_path: Path, bits: int) -> None:
    """A universal checkpoint written by a 4-stage pipeline (S=4, D=1) at step 3 loads at (S=2, D=2, ZeRO-2), at
    (S=1, D=4, the data-parallel Trainer at ZeRO-3) and back at (S=4, D=1), each layout loading what the previous
    one saved again: every tensor file of every save is byte-identical to the first (masters, Adam state, 8-bit
    codes and scales: nothing is converted on the way), the tied embedding/head is stored once and restored to both
    of its holders, and the next 3 steps of each move equal the uninterrupted run's: bit for bit back at the saving
    layout, within the reduction-order tolerance of the equivalence test above at the others (32-bit state; 8-bit
    state rounds those last-bit differences into codes, so only the byte-identical files and the bit-identical
    return are asserted there)."""
    cfg = dataclasses.replace(config(4, 1), train=dataclasses.replace(
        config(4, 1).train, optim=dataclasses.replace(F32, state_bits=bits)))
    results = run_local(w.universal_moves, 4, cfg, str(tmp_path), MOVES, 3, backend="gloo", timeout_s=300,
                        threads_per_rank=1)

    first = tmp_path / "0" / "step_00000003"
    files = _files(first)
    assert "params/wte.weight/master.bin" in files and not any("lm_head" in name for name in files)
    for index in range(1, len(MOVES)):
        assert _files(tmp_path / str(index) / "step_00000003") == files, f"move {index} changed the stored state"
    manifests = [json.loads((tmp_path / str(i) / "step_00000003" / "manifest.json").read_text()) for i in range(4)]
    assert [(m.get("pipeline") or {}).get("stages") for m in manifests] == [4, 2, None, 4]
    assert all(r["runs"][i]["step"] == 3 for r in results for i in range(1, len(MOVES)))

    reference = results[0]["runs"][0]
    expected = _merged(results, 0)
    assert set(expected) == {n for n, _ in GPT(cfg.train.model).named_parameters()} | {"wte.weight@head"}
    for index, (stages, _) in enumerate(MOVES[1:], 1):
        run = results[0]["runs"][index]
        masters = _merged(results, index)
        if index == len(MOVES) - 1:
            assert run["losses"] == reference["losses"], "back at the saving layout: bit-identical"
            for name, value in masters.items():
                torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
        elif bits == 32:
            assert run["losses"] == pytest.approx(reference["losses"], rel=1e-6), (stages, run["losses"])
            for name, value in masters.items():
                torch.testing.assert_close(value, expected[name.removesuffix("@head")], rtol=1e-5, atol=1e-6,
                                           msg=f"move {index}: {name}")


# ---------------------------------------------------------------------------------------------- the manifest section
STAGE_PARAMS = [[("wte.weight", [16, 8]), ("blocks.0.w", [8, 8])], [("blocks.1.w", [8, 8]), ("ln_f.weight", [8])]]


def _markers(steps: tuple[int, int] = (3, 3), scales: tuple[float, float] = (1.0, 1.0)) -> dict[int, dict]:
    """The markers two pipeline stages (one replica each, 32-bit state) leave after writing their parts."""
    markers = {}
    for stage, params in enumerate(STAGE_PARAMS):
        chunks = {}
        for name, shape in params:
            for kind in KINDS_BY_BITS[32]:
                nbytes = kind.count(int(torch.Size(shape).numel())) * kind.itemsize
                chunks[tensor_file(name, kind)] = [[0, nbytes, 0]]
        small = {"file": f"rng/rank_{stage:05d}.json", "nbytes": 1, "crc32": 0}
        markers[stage] = {
            "chunks": chunks,
            "rng": {"rank": stage, "json": small, "bin": {**small, "file": f"rng/rank_{stage:05d}.bin"}},
            "params": [{"name": n, "shape": s, "state_bits": 32, "weight_decay": len(s) > 1} for n, s in params],
            "stage": {"stage": stage, "stages": 2, "dp_size": 1, "optimizer_steps": steps[stage],
                      "lr_scale": scales[stage]},
        }
    return markers


def _manifest(markers: dict[int, dict]) -> Manifest:
    return build_manifest(SaveTarget(root=Path("."), step=3, session="s", world_size=2), markers, layout={},
                          data_cursor={"epoch": 0, "index": 24}, tokens_seen=768, run_config={})


def test_the_manifest_lists_every_stage_and_reads_back() -> None:
    manifest = _manifest(_markers(steps=(3, 1), scales=(1.0, 0.5)))
    assert [p.name for p in manifest.params] == [n for params in STAGE_PARAMS for n, _ in params]
    assert manifest.pipeline is not None and (manifest.pipeline.stages, manifest.pipeline.dp_size) == (2, 1)
    assert [(s.stage, s.optimizer_steps, s.lr_scale) for s in manifest.pipeline.stage_state] == [(0, 3, 1.0),
                                                                                                 (1, 1, 0.5)]
    assert parse_manifest(manifest.to_json().encode(), "ckpt") == manifest


def _edited(edit) -> bytes:
    data = json.loads(_manifest(_markers()).to_json())
    edit(data)
    return sealed_manifest_json(data).encode()


def _set(path: str, value: object):
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[int(key)] if isinstance(data, list) else data[key]
        data[last] = value
    return edit


DAMAGED = {
    "stages x replicas": (_set("pipeline.stages", 3), r"pipeline.stages=3 x pipeline.dp_size=1 is not world_size=2"),
    "stage order": (lambda d: d["pipeline"]["stage_state"].reverse(), r"lists stages \[1, 0\], not 0 to 1 in order"),
    "unknown parameter": (_set("pipeline.stage_state.1.params", ["blocks.1.w", "nope"]),
                          r"names 'nope', which is no parameter"),
    "a parameter twice": (_set("pipeline.stage_state.1.params", ["blocks.1.w", "ln_f.weight", "wte.weight"]),
                          r"names 'wte.weight', which another stage names too"),
    "a parameter of no stage": (_set("pipeline.stage_state.1.params", ["blocks.1.w"]),
                                r"parameter ln_f.weight belongs to no pipeline stage"),
    "lr_scale": (_set("pipeline.stage_state.0.lr_scale", -1), r"pipeline.stage_state\[0\].lr_scale=-1 must be a "),
    "steps": (_set("pipeline.stage_state.0.optimizer_steps", "3"), r"stage_state\[0\].optimizer_steps='3' must be"),
    "unknown field": (_set("pipeline.extra", 1), r"pipeline has a field 'extra'"),
    "older format": (_set("format_version", 2), r"pipeline is recorded, but format version 2 has no such field"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_pipeline_section_is_refused_naming_it(case: str) -> None:
    edit, message = DAMAGED[case]
    with pytest.raises(CorruptCheckpoint, match=message):
        parse_manifest(_edited(edit), "ckpt")


def test_the_committer_refuses_parts_that_disagree() -> None:
    markers = _markers()
    markers[1]["stage"]["stages"] = 3
    with pytest.raises(RuntimeError, match=r"pipeline shapes \[\(2, 1\), \(3, 1\)\]"):
        _manifest(markers)
    markers = _markers()
    markers[1]["stage"] = None
    with pytest.raises(RuntimeError, match=r"ranks \[1\] have no stage record"):
        _manifest(markers)
    markers = _markers()
    markers[1]["params"][0]["shape"] = [4, 8]
    markers[0]["params"].append(dict(markers[1]["params"][0], shape=[8, 8]))
    with pytest.raises(RuntimeError, match=r"disagree about parameter blocks.1.w"):
        _manifest(markers)


class _TwoBlocks(nn.Module):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.weights = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.zeros(8, 8)) for n in names})


def test_stage_values_come_from_the_stages_that_saved_the_parameters() -> None:
    """A stage rebuilt from its neighbours (Adam step 1, lr scale 0.5) next to one that was not (step 3): a rank
    reading parameters of both is refused; one reading only the rebuilt stage's takes its values if it is a
    pipeline stage, and is refused if it is a data-parallel rank (which keeps no learning-rate scale)."""
    manifest = _manifest(_markers(steps=(3, 1), scales=(1.0, 0.5)))
    layout = plan_layout(_TwoBlocks(("a", "b")), ZeroConfig(stage=1, state_bits=32), world_size=1)
    slots = [slot.name for group in layout.groups for slot in group.params]
    both = CheckpointView(shard_rank=0, names=dict(zip(slots, ("blocks.0.w", "blocks.1.w"))),
                          stage=StageRecord(stage=0, stages=1, dp_size=1, optimizer_steps=0, lr_scale=1.0))
    with pytest.raises(CheckpointError, match=r"stages \[0\]: Adam step 3, lr_scale 1.0; stages \[1\]: Adam step 1"):
        stage_values(Path("ckpt"), manifest, layout, both, 3)
    only_rebuilt = dataclasses.replace(both, names=dict(zip(slots, ("blocks.1.w", "ln_f.weight"))))
    assert stage_values(Path("ckpt"), manifest, layout, only_rebuilt, 3) == (1, 0.5)
    with pytest.raises(CheckpointError, match=r"a data-parallel trainer does not keep: load it into a pipeline"):
        stage_values(Path("ckpt"), manifest, layout, dataclasses.replace(only_rebuilt, stage=None), 3)


@pytest.mark.timeout(120)
def test_a_load_takes_the_stages_adam_steps_and_refuses_a_scale_it_cannot_keep(tmp_path: Path, capsys) -> None:
    """A real 2-stage checkpoint whose manifest records, as after a neighbour rebuild, Adam step 2 for every stage at
    step 3: the data-parallel Trainer loading it takes Adam's step 2 (its bias correction), not the step; with one
    stage at another learning-rate scale it refuses the checkpoint (the two stages' values differ on its one rank), and
    with both at that scale too (it keeps none), naming the values."""
    cfg = dataclasses.replace(config(2, 1), train=dataclasses.replace(config(2, 1).train, steps=3))
    assert run_local(w.save_pipeline_checkpoint, 2, cfg, str(tmp_path), backend="gloo", timeout_s=100,
                     threads_per_rank=1) == [3, 3]
    ckpt = tmp_path / "step_00000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for stage in manifest["pipeline"]["stage_state"]:
        stage["optimizer_steps"] = 2
    (ckpt / "manifest.json").write_text(sealed_manifest_json(manifest))
    assert cli.main(["ckpt", "inspect", str(tmp_path)]) == 0
    assert "saved by a pipeline of 2 stages x 1 replicas (it loads at any layout): stage 0: " in capsys.readouterr().out
    trainer = Trainer(dataclasses.replace(cfg.train, data=dataclasses.replace(cfg.train.data, global_batch=8)))
    state, _ = load_state(ckpt, trainer.layout, 0)
    assert (state.step, state.extra["optimizer_steps"], state.extra["lr_scale"]) == (3, 2, 1.0)
    trainer.restore(state)
    assert trainer.optimizer.step_count == 2
    manifest["pipeline"]["stage_state"][1]["lr_scale"] = 0.5
    (ckpt / "manifest.json").write_text(sealed_manifest_json(manifest))
    with pytest.raises(CheckpointError, match=r"stages \[0\]: Adam step 2, lr_scale 1.0; stages \[1\]: Adam step 2, "
                                              r"lr_scale 0.5"):
        load_state(ckpt, trainer.layout, 0)  # this one rank would hold both stages
    manifest["pipeline"]["stage_state"][0]["lr_scale"] = 0.5
    (ckpt / "manifest.json").write_text(sealed_manifest_json(manifest))
    with pytest.raises(CheckpointError, match="trained at a learning-rate scale of 0.5"):
        load_state(ckpt, trainer.layout, 0)
