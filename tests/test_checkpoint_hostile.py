"""Hostile and broken checkpoint directories (issue 17, bugs 3, 4, 6 and 7): real checkpoints written by regrow,
edited on disk, then read by ``regrow ckpt verify|inspect|convert`` and by a restore.

What must hold: nothing outside the checkpoint directory is read (a canary file outside keeps its atime of 0 and
none of its bytes' checksums is printed), only regular files are opened (FIFOs and ``/dev/zero`` neither hang nor
exhaust memory: those cases run in a child with a deadline and an address-space limit), every size is checked
against the parameter's shape and dtype, and any damage to the candidate ``latest`` points at means "skip it and
fall back" to the newest checkpoint that verifies, restored bit-identically, while a checkpoint named explicitly is
refused with the reason.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import regrow
from regrow.checkpoint.universal.format import CorruptCheckpoint, sealed_manifest_json
from regrow.launch import cli
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.tests import ckpt_workers as cw
from regrow.trainer.loop import Trainer

pytestmark = pytest.mark.timeout(300)

STEP2, STEP4 = "step_00000002", "step_00000004"
BIG = "blocks.0.mlp.fc.weight"  # [256, 64]: 8-bit state
EMBEDDING = "wte.weight"  # [256, 64]: fp32 state
CHILD_TIMEOUT_S = 90
CHILD_MEMORY = 3 << 30
"""Address-space limit of a child that reads a hostile checkpoint: enough for torch, far below the machine's."""
SECRET = bytes(range(7, 71))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A root with good checkpoints of steps 2 and 4 (one process), copied by each test before it damages it."""
    root = tmp_path_factory.mktemp("pristine")
    cw.write_steps_2_and_4(root)
    return root


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Everything a restore sets: the shard tensors, the model's parameters, the RNG and the data cursor."""
    state = {f"shard {key}": tensor.clone() for key, tensor in trainer.optimizer.shard_tensors().items()}
    state.update({f"param {name}": value for name, value in cw.params_of(trainer).items()})
    state["rng"] = torch.get_rng_state()
    state["cursor"] = torch.tensor(list(trainer.sampler.state().to_dict().values()))
    state["step"] = torch.tensor([trainer.step, trainer.tokens_seen])
    return state


@pytest.fixture(scope="module")
def reference(pristine) -> dict[str, dict[str, torch.Tensor]]:
    """The state a fresh trainer holds after restoring each pristine checkpoint."""
    states = {}
    for name in (STEP2, STEP4):
        trainer = Trainer(cw.config(1, steps=4))
        restore_trainer(trainer, pristine / name)
        states[name] = state_of(trainer)
    return states


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


@pytest.fixture
def canary(tmp_path) -> Path:
    """A 0600 file next to the checkpoint root (outside it) whose atime is 0 until something reads it."""
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    os.utime(path, (0, path.stat().st_mtime))
    return path


def assert_never_read(canary: Path, *outputs: str) -> None:
    assert canary.stat().st_atime == 0, "the canary outside the checkpoint was read"
    crcs = {f"{zlib.crc32(bytes([b])):#010x}" for b in SECRET} | {f"{zlib.crc32(SECRET):#010x}"}
    for output in outputs:
        assert "crc32" not in output and not any(crc in output for crc in crcs), output


def edit_manifest(ckpt: Path, edit: Callable[[dict], None]) -> None:
    """Applies ``edit`` to the manifest and writes it back with a matching checksum: the manifest a buggy or
    hostile writer would leave, which the field checks (not the checksum) must refuse."""
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(sealed_manifest_json(manifest))


def tensor_of(manifest: dict, param: str, kind: str) -> dict:
    return next(t for t in manifest["tensors"] if t["param"] == param and t["kind"] == kind)


def restore_fresh(source: str | Path, root: Path | None = None):
    trainer = Trainer(cw.config(1, steps=4))
    return trainer, restore_trainer(trainer, source, root=root)


def assert_falls_back(root: Path, expected: str, skipped: str, reference: dict, capsys) -> None:
    """Loading ``latest`` passes over ``skipped`` (logged with its reason) and restores ``expected`` exactly."""
    trainer, report = restore_fresh("latest", root)
    assert report.path == root / expected
    assert [path.name for path, _ in report.skipped] == [skipped]
    state = state_of(trainer)
    assert state.keys() == reference[expected].keys()
    assert all(torch.equal(value, reference[expected][key]) for key, value in state.items())
    out = capsys.readouterr().out
    assert f"checkpoint {skipped} does not verify: " in out
    assert f"fell back to {expected}" in out


def ckpt_cli(capsys, *args: str) -> tuple[int, str]:
    """``regrow ckpt ARGS`` in this process: the exit code and everything printed."""
    code = cli.main(["ckpt", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


PROBE = """
import json, sys
from regrow.launch import cli
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.tests import ckpt_workers as cw
from regrow.trainer.loop import Trainer
root = sys.argv[1]
codes = [cli.main(["ckpt", "verify", root]), cli.main(["ckpt", "inspect", root])]
try:
    report = restore_trainer(Trainer(cw.config(1, steps=4)), "latest", root=root)
    restored = [report.path.name, [path.name for path, _ in report.skipped]]
except Exception as error:
    restored = [type(error).__name__, str(error)]
print("RESULT " + json.dumps({"verify": codes[0], "inspect": codes[1], "restored": restored}))
"""


def probe(root: Path) -> tuple[dict, str]:
    """``regrow ckpt verify ROOT``, ``regrow ckpt inspect ROOT`` and a restore of ``latest`` in a child process
    with a deadline and an address-space limit (a read that never ends fails it instead of hanging the suite or
    exhausting the machine's memory). Returns the outcomes and everything the child printed."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))

    env = {**os.environ, "PYTHONPATH": str(Path(regrow.__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(root)], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, preexec_fn=limit_memory)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    return json.loads(lines[0][len("RESULT "):]), done.stdout + done.stderr


# -------------------------------------------------------------------------- bug 3: paths escape the checkpoint


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_manifest_file_outside_the_checkpoint_is_refused_and_never_read(root, canary, where, reference,
                                                                          capsys) -> None:
    name = "../../secret.txt" if where == "relative" else str(canary)

    def point_outside(manifest: dict) -> None:  # 1-byte chunks: a checksum per byte would give the content away
        entry = tensor_of(manifest, BIG, "master")
        entry["file"] = name
        entry["nbytes"] = len(SECRET)
        entry["chunks"] = [{"offset": i, "length": 1, "crc32": 0} for i in range(len(SECRET))]

    edit_manifest(root / STEP4, point_outside)
    code, out = ckpt_cli(capsys, "verify", str(root / STEP4))
    assert code == 1
    assert f"BAD {root / STEP4}" in out and "manifest.json: tensors[" in out
    assert f"].file={name!r} is not a plain relative path inside the checkpoint" in out
    with pytest.raises(CorruptCheckpoint, match="is not a plain relative path inside the checkpoint"):
        restore_fresh(root / STEP4)
    assert_falls_back(root, STEP2, STEP4, reference, capsys)
    assert_never_read(canary, out)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_data_file_or_directory_replaced_by_a_symlink_is_refused(root, tmp_path, what, reference, capsys) -> None:
    """The link leads to an exact copy outside, so only the refusal of links (not a checksum) can catch it."""
    target = root / STEP4 / "params" / BIG / ("master.bin" if what == "file" else "")
    outside = tmp_path / "outside" / target.name
    outside.parent.mkdir()
    shutil.move(target, outside)
    target.parent.joinpath(target.name).symlink_to(outside)
    code, out = ckpt_cli(capsys, "verify", str(root / STEP4))
    assert code == 1
    link = f"params/{BIG}/master.bin" if what == "file" else f"params/{BIG}"
    assert f"{link}: is a symbolic link; a checkpoint holds regular files only" in out
    with pytest.raises(CorruptCheckpoint, match="is a symbolic link"):
        restore_fresh(root / STEP4)
    assert_falls_back(root, STEP2, STEP4, reference, capsys)


@pytest.mark.parametrize("pointer", ["relative", "absolute", "symlinked step"])
def test_latest_pointing_outside_the_root_is_refused(root, tmp_path, pointer, reference, capsys) -> None:
    """An outside copy of a checkpoint (a later step) is what ``latest`` leads to: it must not be loaded or shown."""
    outside = tmp_path / "elsewhere" / "step_00000009"
    shutil.copytree(root / STEP4, outside)
    edit_manifest(outside, lambda manifest: manifest.update(step=9))
    os.utime(outside / "manifest.json", (0, (outside / "manifest.json").stat().st_mtime))
    if pointer == "symlinked step":
        (root / outside.name).symlink_to(outside)
    name = {"relative": "../elsewhere/step_00000009", "absolute": str(outside), "symlinked step": outside.name}
    (root / "latest").write_text(name[pointer] + "\n")
    code, out = ckpt_cli(capsys, "verify", str(root))
    assert code == 1 and "step 9" not in out and f"OK  {root / STEP4}" in out
    assert f"BAD {root / 'latest'}: " in out
    code, out = ckpt_cli(capsys, "inspect", str(root))
    assert code == 0 and f"checkpoint {root / STEP4} " in out and "step 4, tokens seen" in out
    assert "latest is not usable" in out
    assert_falls_back(root, STEP4, "latest", reference, capsys)
    assert (outside / "manifest.json").stat().st_atime == 0, "the manifest outside the root was read"


# -------------------------------------------------------------------------- bug 4: sizes against shape and dtype


def test_an_emptied_master_file_is_refused_by_verify_restore_and_convert(root, tmp_path, reference, capsys) -> None:
    name = f"params/{BIG}/master.bin"
    os.truncate(root / STEP4 / name, 0)

    def empty_entry(manifest: dict) -> None:
        entry = tensor_of(manifest, BIG, "master")
        entry["nbytes"], entry["chunks"] = 0, []

    edit_manifest(root / STEP4, empty_entry)
    message = f"{name}: the manifest records 0 bytes, but shape [256, 64] of float32 needs 65536"
    code, out = ckpt_cli(capsys, "verify", str(root / STEP4))
    assert code == 1 and message in out
    with pytest.raises(CorruptCheckpoint, match=re.escape(message)):
        restore_fresh(root / STEP4)
    exported = tmp_path / "deepspeed"
    code, out = ckpt_cli(capsys, "convert", str(root / STEP4), str(exported), "--from", "universal", "--to",
                         "deepspeed")
    assert code == 1 and message in out and not exported.exists()
    assert_falls_back(root, STEP2, STEP4, reference, capsys)


def test_a_duplicated_tensor_entry_is_refused(root, reference, capsys) -> None:
    """A second ``master`` entry that names the ``exp_avg`` file: loading it would make the moment the master."""

    def duplicate(manifest: dict) -> None:
        manifest["tensors"].append({**tensor_of(manifest, EMBEDDING, "exp_avg"), "kind": "master"})

    edit_manifest(root / STEP4, duplicate)
    code, out = ckpt_cli(capsys, "verify", str(root / STEP4))
    assert code == 1
    assert f"manifest.json: two tensor entries for {EMBEDDING} master" in out
    with pytest.raises(CorruptCheckpoint, match=f"two tensor entries for {EMBEDDING} master"):
        restore_fresh(root / STEP4)
    assert_falls_back(root, STEP2, STEP4, reference, capsys)


def test_a_missing_tensor_kind_is_refused(root, reference, capsys) -> None:
    edit_manifest(root / STEP4, lambda m: m["tensors"].remove(tensor_of(m, BIG, "exp_avg_sq.scales")))
    code, out = ckpt_cli(capsys, "verify", str(root / STEP4))
    assert code == 1 and f"manifest.json: {BIG} (8-bit state) has no exp_avg_sq.scales entry" in out
    assert_falls_back(root, STEP2, STEP4, reference, capsys)


# -------------------------------------------------------------------------- bug 6: only regular files are opened


@pytest.mark.timeout(2 * CHILD_TIMEOUT_S + 30)
@pytest.mark.parametrize("replaced", ["latest", "manifest.json"])
def test_a_fifo_in_place_of_a_small_file_is_refused_without_hanging(root, replaced) -> None:
    path = root / "latest" if replaced == "latest" else root / STEP4 / "manifest.json"
    path.unlink()
    os.mkfifo(path)
    outcome, out = probe(root)
    shown = f"BAD {root / 'latest'}: it" if replaced == "latest" else "manifest.json:"
    assert f"{shown} is a FIFO; a checkpoint holds regular files only" in out
    assert outcome["verify"] == 1
    if replaced == "latest":
        assert outcome["inspect"] == 0 and outcome["restored"] == [STEP4, ["latest"]]
    else:
        assert outcome["inspect"] == 1 and outcome["restored"] == [STEP2, [STEP4]]


@pytest.mark.timeout(2 * CHILD_TIMEOUT_S + 30)
@pytest.mark.parametrize("replaced", ["latest", "manifest.json"])
def test_a_small_file_linked_to_dev_zero_is_refused_without_reading_it(root, replaced) -> None:
    path = root / "latest" if replaced == "latest" else root / STEP4 / "manifest.json"
    path.unlink()
    path.symlink_to("/dev/zero")
    outcome, out = probe(root)
    assert "is a symbolic link; a checkpoint holds regular files only" in out
    assert outcome["verify"] == 1
    if replaced == "latest":
        assert outcome["inspect"] == 0 and outcome["restored"] == [STEP4, ["latest"]]
    else:
        assert outcome["inspect"] == 1 and outcome["restored"] == [STEP2, [STEP4]]


# -------------------------------------------------------------------------- bug 7: damage means fall back


def write_bytes_to(relative: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / relative).write_bytes(data)


def manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda root: edit_manifest(root / STEP4, edit)


def set_chunk_offset(manifest: dict) -> None:
    tensor_of(manifest, BIG, "master")["chunks"][0]["offset"] = -1


DAMAGED_MANIFESTS = {
    "deeply nested": (write_bytes_to(f"{STEP4}/manifest.json", b"[" * 200_000 + b"]" * 200_000),
                      "manifest.json is not valid JSON (nested too deeply)"),
    "not UTF-8": (write_bytes_to(f"{STEP4}/manifest.json", b'{"format_version": 1, "step": "\xff\xfe"}'),
                  "manifest.json is not UTF-8 text"),
    "step as a string": (manifest_edit(lambda m: m.update(step="4")),
                         "manifest.json: step='4' must be an integer >= 0"),
    "params not a list": (manifest_edit(lambda m: m.update(params={"a": 1})),
                          "manifest.json: params must be a list"),
    "negative chunk offset": (manifest_edit(set_chunk_offset), "].chunks[0].offset=-1 must be an integer >= 0"),
    "NUL in a file name": (manifest_edit(lambda m: tensor_of(m, BIG, "master").update(file="params/a\x00b")),
                           "is not a plain relative path inside the checkpoint"),
    "shape of strings": (manifest_edit(lambda m: m["params"][0].update(shape=["256", "64"])),
                         "manifest.json: params[0].shape[0]='256' must be an integer >= 0"),
    "a scale per element": (manifest_edit(lambda m: tensor_of(m, BIG, "exp_avg.scales").update(nbytes=65536)),
                            f"params/{BIG}/exp_avg.scales.bin: the manifest records 65536 bytes, but shape [256, 64] "
                            "of float32 needs 256 (one scale per 256-element block)"),
    "a terminal escape in a name": (manifest_edit(lambda m: m["params"][0].update(name="wte\x1b[2J")),
                                    "manifest.json: params[0].name='wte\\x1b[2J' must be a string of at most 4096 "
                                    "printable characters"),
    "master as bytes": (manifest_edit(lambda m: tensor_of(m, BIG, "master").update(dtype="uint8")),
                        f"params/{BIG}/master.bin: dtype uint8, but master is float32"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_MANIFESTS))
def test_a_damaged_manifest_is_skipped_and_the_newest_good_checkpoint_loads(root, case, reference, capsys) -> None:
    damage, message = DAMAGED_MANIFESTS[case]
    damage(root)
    code, out = ckpt_cli(capsys, "verify", str(root / STEP4))
    assert code == 1 and message in out and "Traceback" not in out
    with pytest.raises(CorruptCheckpoint, match=re.escape(message)):
        restore_fresh(root / STEP4)
    assert_falls_back(root, STEP2, STEP4, reference, capsys)


@pytest.mark.parametrize("content", [b"step_00000004\x00junk\n", b"\xffstep_00000004\n", b"step_4/../../x\n"],
                         ids=["NUL byte", "not UTF-8", "a path"])
def test_a_damaged_latest_is_skipped_and_the_newest_good_checkpoint_loads(root, content, reference, capsys) -> None:
    (root / "latest").write_bytes(content)
    code, out = ckpt_cli(capsys, "verify", str(root))
    assert code == 1 and f"BAD {root / 'latest'}: " in out and "does not name a step_* directory" in out
    assert f"OK  {root / STEP2}" in out and f"OK  {root / STEP4}" in out
    code, out = ckpt_cli(capsys, "inspect", str(root))
    assert code == 0 and "step 4, tokens seen" in out
    assert_falls_back(root, STEP4, "latest", reference, capsys)


@pytest.mark.timeout(240)
def test_regrow_train_resume_latest_passes_over_a_damaged_latest_and_trains_on(root, capfd) -> None:
    (root / "latest").write_bytes(b"step_00000004\x00junk\n")
    argv = ["train", "--nproc", "1", "--preset", "tiny", "--steps", "6", "--global-batch", "12", "--micro-batch", "12",
            "--log-every", "1", "--timeout", "120", "--ckpt-dir", str(root), "--resume", "latest"]
    assert cli.main(argv) == 0
    out = capfd.readouterr().out
    assert "checkpoint latest does not verify: it does not name a step_* directory" in out
    assert f"resumed from {root / STEP4}" in out and "[rank 0, step 6] loss" in out


def test_a_restart_after_a_failure_resumes_from_the_checkpoints_past_a_damaged_latest(root) -> None:
    """The local launcher's next attempt resumes from ``latest`` whenever the root holds a committed checkpoint,
    also when ``latest`` itself is damaged (its load passes over it), rather than starting again from step 0."""
    from regrow.launch.options import CheckpointOptions
    from regrow.launch.rank import RankWork

    (root / "latest").write_bytes(b"step_00000004\x00")
    work = RankWork(config=cw.config(1, steps=4), checkpoint=CheckpointOptions(ckpt_dir=str(root), save_every=2))
    assert work.after_failure().checkpoint.resume == "latest"


def test_a_data_cursor_the_sampler_cannot_take_is_damage_and_the_load_falls_back(root, reference, capsys) -> None:
    """The cursor is checked while each rank reads, before the ranks agree on the checkpoint: one the sampler
    cannot resume from (an extra key) makes the checkpoint damaged, so ``latest`` falls back instead of failing
    after every rank agreed to load it."""
    manifest_edit(lambda m: m["data_cursor"].update(shuffle=1))(root)
    with pytest.raises(CorruptCheckpoint, match=re.escape("data_cursor: DataCursor dict must have exactly the keys")):
        restore_fresh(root / STEP4)
    assert_falls_back(root, STEP2, STEP4, reference, capsys)
