"""``regrow train --save-every/--ckpt-dir/--resume`` end to end on 2 processes, and ``regrow ckpt inspect|verify``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regrow.checkpoint.universal import storage
from regrow.launch import cli

COMMON = ["train", "--nproc", "2", "--preset", "tiny", "--global-batch", "8", "--micro-batch", "4",
          "--log-every", "1", "--timeout", "240"]


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.timeout(400)
def test_train_resume_latest_continues_exactly_and_ckpt_verify_finds_damage(tmp_path, capfd) -> None:
    root = tmp_path / "ckpt"
    saving = ["--save-every", "2", "--ckpt-dir", str(root)]
    assert cli.main(COMMON + ["--steps", "4"] + saving) == 0
    latest = storage.read_latest(root)
    assert latest == "step_00000004", "the final step is always saved (waiting for the previous save if needed)"
    capfd.readouterr()
    resumed_metrics, straight_metrics = tmp_path / "resumed.jsonl", tmp_path / "straight.jsonl"
    assert cli.main(COMMON + ["--steps", "6", "--resume", "latest", "--metrics", str(resumed_metrics)] + saving) == 0
    assert f"resumed from {root / latest} (saved at world size 2, now 2)" in capfd.readouterr().out
    assert cli.main(COMMON + ["--steps", "6", "--metrics", str(straight_metrics)]) == 0
    resumed, straight = losses(resumed_metrics), losses(straight_metrics)
    assert sorted(resumed) == [5, 6]
    assert all(resumed[step] == straight[step] for step in resumed), (resumed, straight)

    capfd.readouterr()
    assert cli.main(["ckpt", "verify", str(root)]) == 0
    assert cli.main(["ckpt", "inspect", str(root)]) == 0
    out = capfd.readouterr().out
    assert "OK  " in out and "step 6, tokens seen" in out and "| wte.weight | [256, 64] | 32 |" in out
    newest = root / storage.read_latest(root)
    damaged = newest / "params" / "blocks.1.mlp.fc.weight" / "exp_avg.scales.bin"
    data = bytearray(damaged.read_bytes())
    data[5] ^= 1
    damaged.write_bytes(bytes(data))
    assert cli.main(["ckpt", "verify", str(newest)]) == 1
    out = capfd.readouterr().out
    assert f"BAD {newest}" in out
    assert "params/blocks.1.mlp.fc.weight/exp_avg.scales.bin: bytes 0-256 fail their checksum" in out
    assert cli.main(["ckpt", "verify", "--quick", str(newest)]) == 0, "--quick checks sizes only"


def test_checkpoint_flag_problems_are_reported_with_the_others(capsys, tmp_path) -> None:
    code = cli.main(["train", "--stage", "5", "--save-every", "5", "--keep-last", "1", "--resume", "latest"])
    err = capsys.readouterr().err
    assert code == 2
    assert "ZeroConfig.stage=5" in err
    assert "--save-every=5 needs --ckpt-dir DIR" in err
    assert "--keep-last=1 must be >= 2" in err
    assert "--resume=latest: resume from 'latest' needs the checkpoint root" in err
    code = cli.main(["train", "--resume", "latest", "--ckpt-dir", str(tmp_path)])
    assert code == 2 and f"no checkpoint under {tmp_path}" in capsys.readouterr().err


def test_ckpt_inspect_of_a_missing_checkpoint_fails_clearly(tmp_path, capsys) -> None:
    assert cli.main(["ckpt", "inspect", str(tmp_path / "nothing")]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err
