"""Bad input: truncated, flipped, missing files, a newer format, another model, a full disk. Every error names the
file (and byte range) and what would fix it, and the previous good checkpoint still loads."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.format import (
    FORMAT_VERSION,
    CheckpointMismatch,
    CorruptCheckpoint,
    UnsupportedFormatVersion,
    temp_dir_name,
)
from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.launch.local.spawn import WorkerFailed, run_local
from regrow.recovery.from_checkpoint import restore_trainer
from regrow.tests import ckpt_workers as cw
from regrow.trainer.loop import Trainer
from regrow.trainer.models import GPTConfig

STEP2, STEP4 = "step_00000002", "step_00000004"
BIG = "blocks.0.mlp.fc.weight"  # 16384 elements: 8-bit state


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A root with good checkpoints of steps 2 and 4 (one process), copied by each test before it damages it."""
    root = tmp_path_factory.mktemp("pristine")
    cw.write_steps_2_and_4(root)
    return root


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def fresh_trainer(**model) -> Trainer:
    config = cw.config(1, steps=4)
    if model:
        config.model = GPTConfig.preset("tiny", **model)
    return Trainer(config)


def assert_falls_back_to_step2(root: Path, capsys) -> None:
    """Loading ``latest`` (step 4, damaged) must load step 2 instead, and say so."""
    trainer = fresh_trainer()
    report = restore_trainer(trainer, "latest", root=root)
    assert report.path.name == STEP2 and trainer.step == 2
    assert [p.name for p, _ in report.skipped] == [STEP4]
    assert f"{STEP4} did not verify; fell back to {STEP2}" in capsys.readouterr().out


def test_truncated_file_is_named_and_latest_falls_back(root, capsys) -> None:
    name = f"params/{BIG}/exp_avg.codes.bin"
    path = root / STEP4 / name
    os.truncate(path, path.stat().st_size - 100)
    report = verify.verify(root / STEP4)
    assert report.problems == [f"{name}: 16284 bytes, expected 16384 (truncated)"]
    with pytest.raises(CorruptCheckpoint, match=f"{name}: 16284 bytes, expected 16384"):
        restore_trainer(fresh_trainer(), root / STEP4)
    assert_falls_back_to_step2(root, capsys)


def test_flipped_byte_is_located_and_latest_falls_back(root, capsys) -> None:
    name = f"params/{BIG}/master.bin"
    path = root / STEP4 / name
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x10
    path.write_bytes(bytes(data))
    report = verify.verify(root / STEP4)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{name}: bytes 0-65536 fail their checksum")
    with pytest.raises(CorruptCheckpoint, match=f"{name}: bytes 0-65536 fail their checksum"):
        restore_trainer(fresh_trainer(), root / STEP4)
    assert_falls_back_to_step2(root, capsys)


def test_missing_file_is_named(root, capsys) -> None:
    (root / STEP4 / "rng" / "rank_00000.bin").unlink()
    assert verify.verify(root / STEP4).problems == ["rng/rank_00000.bin: missing"]
    assert_falls_back_to_step2(root, capsys)


def test_latest_naming_a_vanished_directory_falls_back(root, capsys) -> None:
    shutil.rmtree(root / STEP4)
    (root / "latest").write_text("step_00000004\n")
    trainer = fresh_trainer()
    report = restore_trainer(trainer, "latest", root=root)
    assert report.path.name == STEP2 and trainer.step == 2


def test_manifest_of_a_newer_format_asks_for_an_upgrade(root) -> None:
    path = root / STEP4 / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    message = f"format version {FORMAT_VERSION + 1}, but this regrow reads versions up to {FORMAT_VERSION}: upgrade"
    with pytest.raises(UnsupportedFormatVersion, match=message):
        restore_trainer(fresh_trainer(), root / STEP4)
    with pytest.raises(UnsupportedFormatVersion, match=message):  # not damage: no silent fallback to an older one
        restore_trainer(fresh_trainer(), "latest", root=root)


def test_unparseable_manifest_is_corrupt(root, capsys) -> None:
    (root / STEP4 / "manifest.json").write_text("{ not json")
    assert "manifest.json is not valid JSON" in verify.verify(root / STEP4).problems[0]
    assert_falls_back_to_step2(root, capsys)


def test_different_model_lists_every_mismatch(root) -> None:
    with pytest.raises(CheckpointMismatch) as info:
        restore_trainer(fresh_trainer(n_layer=3), root / STEP4)
    problems = info.value.problems
    assert "blocks.2.attn.qkv.weight: in the model [192, 64], not in the checkpoint" in problems
    assert len(problems) == 6  # the six parameters of the third block
    with pytest.raises(CheckpointMismatch, match=r"wte.weight: checkpoint shape \[256, 64\], model shape \[256, 32\]"):
        restore_trainer(fresh_trainer(d_model=32), root / STEP4)


def no_space_left(fd: int, data: memoryview, offset: int) -> int:
    """A disk that is full: every write fails as the kernel reports it."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(root, capsys) -> None:
    trainer = fresh_trainer()
    restore_trainer(trainer, "latest", root=root)
    writer = CheckpointWriter(WriterConfig(root=str(root), save_every=2, keep_last=2), pwrite=no_space_left)
    trainer.sinks.append(writer)
    trainer.config.steps = 6
    trainer.run()
    [result] = writer.results
    assert result.status == "failed" and "No space left on device" in result.error
    out = capsys.readouterr().out
    assert "checkpoint step_00000006 FAILED: rank 0: OSError: [Errno 28] No space left on device" in out
    assert (root / "latest").read_text().strip() == STEP4
    assert sorted(p.name for p in root.iterdir()) == ["latest", STEP2, STEP4], "temporaries must be cleaned up"
    assert verify.verify(root / STEP4).ok
    assert restore_trainer(fresh_trainer(), "latest", root=root).step == 4


@pytest.mark.timeout(200)
def test_one_rank_hitting_its_file_size_limit_fails_the_whole_save(tmp_path) -> None:
    """Rank 1's writes of step 4 fail with EFBIG (a real OS limit): rank 0 sees its failed marker, commits nothing,
    and ``latest`` keeps naming step 2, which still loads."""
    statuses = run_local(cw.save_then_fail_on_rank1, 2, str(tmp_path), backend="gloo", timeout_s=150)
    assert statuses[0][0].startswith("2:committed")
    assert statuses[1][1].startswith("4:failed:rank 1: OSError: [Errno 27] File too large")
    assert statuses[0][1].startswith("4:failed:rank 1: OSError: [Errno 27] File too large")
    assert (tmp_path / "latest").read_text().strip() == STEP2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", STEP2]
    trainer = Trainer(cw.config(1, steps=4))
    assert restore_trainer(trainer, "latest", root=tmp_path).step == 2


def assert_only_step2_is_kept(root: Path) -> None:
    """``latest`` still names step 2, which verifies and loads, and no directory but its own is left in ``root``."""
    assert storage.read_latest(root) == STEP2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [STEP2], "temporaries must be cleaned up"
    assert verify.verify(root / STEP2).ok
    assert restore_trainer(Trainer(cw.config(1, steps=4)), "latest", root=root).step == 2


@pytest.mark.timeout(200)
def test_a_root_the_os_refuses_fails_the_save_at_once_on_every_rank_and_training_goes_on(tmp_path, capfd) -> None:
    """No rank can create the directory of the saves of steps 4 and 6 (a regular file is where it must go:
    ENOTDIR). Each save fails within seconds on every rank, not after the 20-s commit timeout, with the OS's error
    in every rank's result and log line; ``latest`` keeps naming step 2; the run trains to its end (the default,
    ``on_error="continue"``)."""
    runs = run_local(cw.save_into_a_blocked_root, 2, str(tmp_path), None, backend="gloo", timeout_s=150)
    out = capfd.readouterr().out
    for rank, run in enumerate(runs):
        assert run["step"] == 6
        assert run["seconds"] < 10, f"rank {rank}'s save of step 4 ended only after {run['seconds']:.1f} s"
        first, *failed = run["results"]
        assert first.startswith("2:committed" if rank == 0 else "2:written")
        assert [r.split(":")[:2] for r in failed] == [["4", "failed"], ["6", "failed"]]
        for result in failed:
            assert f"failed:rank {rank}: NotADirectoryError: [Errno 20] Not a directory: '{tmp_path}" in result
        assert (f"[rank {rank}, step 4] checkpoint step_00000004 FAILED: rank {rank}: NotADirectoryError: "
                f"[Errno 20] Not a directory") in out
    assert_only_step2_is_kept(tmp_path)


@pytest.mark.timeout(200)
def test_a_root_the_os_refuses_stops_training_at_the_next_step_when_on_error_is_stop(tmp_path) -> None:
    """The same refused root with ``on_error="stop"``: once step 4's save has failed, training stops at step 5 with
    one error naming the checkpoint, the root and the OS's error; ``latest`` keeps naming step 2."""
    with pytest.raises(WorkerFailed) as failed:
        run_local(cw.save_into_a_blocked_root, 2, str(tmp_path), "stop", backend="gloo", timeout_s=150)
    message = str(failed.value)
    assert f"CheckpointWriteError: checkpoint step_00000004 could not be written under {tmp_path}: rank" in message
    assert "NotADirectoryError: [Errno 20] Not a directory" in message
    assert f"training stops at step 5 (on_error='stop'); latest still names {STEP2}" in message
    assert_only_step2_is_kept(tmp_path)


def test_temporaries_of_failed_saves_are_removed_at_the_next_commit(tmp_path) -> None:
    """Rank 0 gives a failed save up at once, so another rank may still write into its directory after rank 0 removed
    it. After the next commit (every rank has finished every earlier save by then) rank 0 removes this run's
    temporaries of earlier steps; another run's are left alone."""
    trainer = fresh_trainer()
    writer = CheckpointWriter(WriterConfig(root=str(tmp_path), save_every=2, log=False))
    trainer.sinks.append(writer)
    trainer.train_step()
    trainer.train_step()
    assert writer.wait(60).status == "committed"
    straggler = tmp_path / temp_dir_name(3, writer.session)
    (straggler / "params" / "wte.weight").mkdir(parents=True)
    (straggler / "params" / "wte.weight" / "master.bin").write_bytes(b"late")
    other_run = tmp_path / temp_dir_name(3, "0123456789abcdef")
    other_run.mkdir()
    trainer.train_step()
    trainer.train_step()
    assert writer.wait(60).status == "committed"
    assert not straggler.exists() and other_run.exists()


def test_writer_config_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"WriterConfig.keep_last=1 must be an integer >= 2"):
        WriterConfig(root=str(tmp_path), keep_last=1)
    with pytest.raises(ValueError, match=r"WriterConfig.when_busy='queue' is invalid"):
        WriterConfig(root=str(tmp_path), when_busy="queue")
    with pytest.raises(ValueError, match=r"on_error='abort' is invalid: allowed values are \('continue', 'stop'\)"):
        WriterConfig(root=str(tmp_path), on_error="abort")


def test_no_checkpoint_at_all_is_a_clear_error(tmp_path) -> None:
    from regrow.checkpoint.universal.format import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint under"):
        restore_trainer(fresh_trainer(), "latest", root=tmp_path)


@pytest.mark.parametrize("name", ["rng/rank_00000.bin", "rng/rank_00000.json"])
def test_a_flipped_byte_in_an_rng_file_is_named_by_verify_and_never_restored(root, capsys, name: str) -> None:
    """The random-number states are part of the state: a corrupted one must fail verification (by checksum, its
    size unchanged) and the restore, never be loaded."""
    path = root / STEP4 / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify.verify(root / STEP4)
    assert report.problems == [f"{name}: bytes 0-{len(data)} fail their checksum"]
    with pytest.raises(CorruptCheckpoint, match=f"{name}: bytes 0-{len(data)} fail their checksum"):
        restore_trainer(fresh_trainer(), root / STEP4)
    assert_falls_back_to_step2(root, capsys)


def test_a_range_read_checks_the_whole_chunk_it_cuts_into(root) -> None:
    """A rank whose byte range ends or starts inside a stored chunk (another world size's layout) reads that chunk
    whole and checks its crc32: a flipped byte in the part of the chunk outside the range is still caught, so no
    rank loads a chunk that fails its checksum."""
    from regrow.checkpoint.universal.verified_read import VerifiedFile

    manifest = verify.read_manifest(root / STEP4)
    entry = next(t for t in manifest.tensors if t.file == f"params/{BIG}/master.bin")
    first_chunk = entry.chunks[0]
    assert first_chunk.length > 2048, "the test needs a chunk longer than the ranges it reads"
    out = memoryview(bytearray(100))
    VerifiedFile(root / STEP4, entry).read(100, 200, out)  # intact: reads
    path = root / STEP4 / entry.file
    data = bytearray(path.read_bytes())
    data[first_chunk.length - 10] ^= 0x04  # inside chunk 0, outside [100, 200)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=f"{entry.file}: bytes 0-{first_chunk.length} fail their checksum"):
        VerifiedFile(root / STEP4, entry).read(100, 200, out)
    with pytest.raises(CorruptCheckpoint, match="fail their checksum"):  # a range ending inside it, from before
        VerifiedFile(root / STEP4, entry).read(0, 50, memoryview(bytearray(50)))
