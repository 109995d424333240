"""Committing a universal checkpoint save, by the holder of rank 0: wait for every rank's marker, build and write the
manifest, rename the temporary directory into place, flip ``latest``, purge (docs/checkpoint-format.md, "Writing").

Files only, no process group, like the part writing (``part_writer.py``): the asynchronous ``CheckpointWriter``
(rank 0's persist thread) and the node's snapshot process (``checkpoint/node/persist.py``) commit through
:func:`commit_save`. A checkpoint counts once its manifest is in place under ``step_<step>``; until then ``latest``
names the last good one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from regrow.checkpoint.universal import storage
from regrow.checkpoint.universal.format import (
    KINDS_BY_BITS,
    MANIFEST_NAME,
    PARTS_DIR,
    TEMP_PREFIX,
    Chunk,
    FileEntry,
    Manifest,
    ParamEntry,
    PipelineEntry,
    RngEntry,
    StageEntry,
    TensorEntry,
    parse_step_dir_name,
    rank_file,
    step_dir_name,
    temp_dir_name,
    tensor_file,
)
from regrow.checkpoint.universal.user_part import entry_from_marker
from regrow.trainer.zero.codes import CODE_MAP_VERSION


@dataclass
class SaveResult:
    """What became of one save step on this rank.

    ``status``: "committed" (rank 0: the checkpoint is in place and ``latest`` names it), "written" (another rank:
    its part is on disk; rank 0 commits), "failed" (``error`` says why; nothing replaced the last good checkpoint)
    or "skipped" (the previous save was still persisting).
    """

    step: int
    status: str
    path: str | None = None
    seconds: float = 0.0
    nbytes: int = 0
    error: str | None = None


@dataclass(frozen=True)
class SaveTarget:
    """One save as every process taking part sees it: where, which step, which session, how many ranks."""

    root: Path
    step: int
    session: str
    world_size: int

    @property
    def temp(self) -> Path:
        """The save's temporary directory (``.tmp_step_<step>.<session>`` under ``root``): parts and markers."""
        return self.root / temp_dir_name(self.step, self.session)


def wait_for_markers(target: SaveTarget, timeout_s: float, *, accept: Callable[[dict], bool] | None = None
                     ) -> tuple[dict[int, dict], list[int]]:
    """Polls the filesystem for every rank's marker of ``target`` (its session and step, and ``accept``ed) for up
    to ``timeout_s``; returns the markers found and the ranks still missing. No collectives: files only."""
    deadline = time.monotonic() + timeout_s
    markers: dict[int, dict] = {}
    while True:
        for rank in range(target.world_size):
            if rank not in markers:
                path = target.temp / PARTS_DIR / rank_file(rank, ".json")
                if path.is_file():
                    data = json.loads(path.read_text())
                    if (data.get("session") == target.session and data.get("step") == target.step
                            and (accept is None or accept(data))):
                        markers[rank] = data
        missing = [r for r in range(target.world_size) if r not in markers]
        if not missing or time.monotonic() > deadline:
            return markers, missing
        time.sleep(0.02)


def build_manifest(target: SaveTarget, markers: dict[int, dict], *, layout: dict, data_cursor: dict[str, int],
                   tokens_seen: int, run_config: dict) -> Manifest:
    """The manifest of the save from every rank's marker: the parameters the ranks wrote (a pipeline's stages each
    list theirs; together, the whole model), their chunks and RNG files, and a pipeline's stage records. ``layout``
    (rank 0's) is recorded as is. Raises if any byte of any file was written by no rank (or twice), or the ranks
    disagree about a parameter or the pipeline."""
    chunks: dict[str, list[Chunk]] = {}
    for marker in markers.values():
        for name, entries in marker["chunks"].items():
            chunks.setdefault(name, []).extend(Chunk(*entry) for entry in entries)
    params = _params_of(markers)
    tensors, gaps = [], []
    for param in params:
        for kind in KINDS_BY_BITS[param.state_bits]:
            name = tensor_file(param.name, kind)
            nbytes = kind.count(param.numel) * kind.itemsize
            found = sorted(chunks.get(name, []), key=lambda c: c.offset)
            position = 0
            for chunk in found:
                if chunk.offset != position:
                    gaps.append(f"{name}: bytes {position}-{chunk.offset} written by no rank or twice")
                position = max(position, chunk.end)
            if position != nbytes:
                gaps.append(f"{name}: bytes {position}-{nbytes} written by no rank")
            tensors.append(TensorEntry(param=param.name, kind=kind.name, file=name, dtype=kind.dtype,
                                       shape=kind.shape(tuple(param.shape)), nbytes=nbytes, chunks=found))
    if gaps:
        raise RuntimeError("the ranks' parts do not cover every file: " + "; ".join(gaps[:10]))
    rng = []
    for rank in sorted(markers):
        entry = markers[rank]["rng"]
        rng.append(RngEntry(rank=rank, json=FileEntry(**entry["json"]), bin=FileEntry(**entry["bin"])))
    return Manifest(
        step=target.step, tokens_seen=tokens_seen, data_cursor=data_cursor, world_size=target.world_size,
        layout=layout, config=run_config, params=params, tensors=tensors, rng=rng,
        code_map_version=CODE_MAP_VERSION, created=datetime.now(UTC).isoformat(timespec="seconds"),
        writer={"session": target.session, "torch": torch.__version__},
        user=entry_from_marker(markers.get(0, {}).get("user")), pipeline=_pipeline_of(markers, target.world_size),
    )


def _params_of(markers: dict[int, dict]) -> list[ParamEntry]:
    """Every parameter some rank wrote, in rank order (a data-parallel run's: rank 0's layout order; a pipeline's:
    stage by stage); raises when two ranks describe one parameter differently."""
    params: dict[str, ParamEntry] = {}
    for rank in sorted(markers):
        for entry in markers[rank]["params"]:
            param = ParamEntry(name=entry["name"], shape=list(entry["shape"]), state_bits=entry["state_bits"],
                               weight_decay=entry["weight_decay"])
            if params.setdefault(param.name, param) != param:
                raise RuntimeError(f"the ranks' parts disagree about parameter {param.name}: {params[param.name]} "
                                   f"and rank {rank}'s {param}")
    return list(params.values())


def _pipeline_of(markers: dict[int, dict], world_size: int) -> PipelineEntry | None:
    """The ``pipeline`` section from the stage records of the markers (None when no rank is a pipeline stage)."""
    records = {rank: marker.get("stage") for rank, marker in markers.items()}
    if not any(records.values()):
        return None
    if not all(records.values()):
        raise RuntimeError("some ranks' parts are a pipeline's stages and some are not: "
                           f"ranks {sorted(r for r, s in records.items() if not s)} have no stage record")
    shapes = {(record["stages"], record["dp_size"]) for record in records.values()}
    stages, dp_size = next(iter(shapes))
    if len(shapes) != 1 or stages * dp_size != world_size:
        raise RuntimeError(f"the ranks' stage records name pipeline shapes {sorted(shapes)} (stages x replicas), "
                           f"not one of {world_size} ranks")
    entries: list[StageEntry | None] = [None] * stages
    for rank in sorted(markers):
        record = records[rank]
        entry = StageEntry(stage=record["stage"], optimizer_steps=record["optimizer_steps"],
                           lr_scale=record["lr_scale"], params=[p["name"] for p in markers[rank]["params"]])
        known = entries[entry.stage]
        if known is None:
            entries[entry.stage] = entry
        elif known != entry:
            raise RuntimeError(f"the replicas of pipeline stage {entry.stage} disagree: {known} and rank {rank}'s "
                               f"{entry}")
    missing = [stage for stage, entry in enumerate(entries) if entry is None]
    if missing:
        raise RuntimeError(f"no rank wrote pipeline stages {missing}")
    return PipelineEntry(stages=stages, dp_size=dp_size, stage_state=[e for e in entries if e is not None])


@dataclass
class Committed:
    """What :func:`commit_save` did: the result, and on success the manifest and the checkpoints purged."""

    result: SaveResult
    manifest: Manifest | None = None
    purged: list[Path] = field(default_factory=list)


def commit_save(target: SaveTarget, manifest_of: Callable[[dict[int, dict]], Manifest], *, keep_last: int,
                timeout_s: float, fsync: bool, started: float,
                accept: Callable[[dict], bool] | None = None, own_errors: Sequence[str] = ()) -> Committed:
    """The commit by the holder of rank 0: waits up to ``timeout_s`` for every rank's marker; when all are there
    without errors, writes the manifest (``manifest_of(markers)``), removes ``parts/``, fsyncs, renames the
    temporary directory to ``step_<step>``, flips ``latest`` and purges down to ``keep_last``. Any failure (a
    rank's error, a missing marker, an I/O error) removes the temporary directory and leaves ``latest`` alone.

    ``own_errors`` are the failures of the committer's own parts (``"rank r: ..."``, as it caught them): when there
    are any, the save fails at once with them, without waiting for any marker (its own may never have been
    written: a directory it cannot create). Other ranks' errors reach it through their markers. ``accept`` further
    filters the markers that count; ``started`` (``time.perf_counter()`` when the save began) times the result.
    Never raises."""
    if own_errors:
        shutil.rmtree(target.temp, ignore_errors=True)
        return Committed(SaveResult(step=target.step, status="failed", error="; ".join(own_errors)))
    markers, missing = wait_for_markers(target, timeout_s, accept=accept)
    errors = [f"rank {r}: {m['error']}" for r, m in sorted(markers.items()) if m.get("error")]
    if missing:
        errors.append(f"ranks {missing} wrote no part within {timeout_s} s")
    try:
        if errors:
            raise RuntimeError("; ".join(errors))
        manifest = manifest_of(markers)
        storage.write_file_atomic(target.temp / MANIFEST_NAME, manifest.to_json().encode(), fsync=fsync)
        shutil.rmtree(target.temp / PARTS_DIR)
        if fsync:
            for folder, _, _ in os.walk(target.temp, topdown=False):
                storage.fsync_dir(Path(folder))
        final = target.root / step_dir_name(target.step)
        storage.commit_dir(target.temp, final, fsync=fsync)
        storage.write_latest(target.root, final.name, fsync=fsync)
    except BaseException as caught:  # noqa: BLE001 (a failed commit is reported, never raised)
        shutil.rmtree(target.temp, ignore_errors=True)
        return Committed(SaveResult(step=target.step, status="failed", error=str(caught) if errors else
                                    f"{type(caught).__name__}: {caught}"))
    purged = storage.purge(target.root, keep_last, protect=[final])
    result = SaveResult(step=target.step, status="committed", path=str(final),
                        seconds=time.perf_counter() - started, nbytes=manifest.nbytes())
    return Committed(result, manifest, purged)


def remove_older_temporaries(root: Path, step: int, session_of: Callable[[int], str]) -> list[Path]:
    """Removes this job's temporaries of the saves before ``step`` under ``root`` (``session_of(s)``: the session
    of step s's save), i.e. saves that failed or were given up, which a rank may have written into after the
    committer had removed them. Call it once ``step`` is committed: every rank had then finished every earlier save
    (a rank starts a save only after its previous one ended). Another job's temporaries are left alone. Returns what
    was removed; never raises (what cannot be removed stays for a later call or the next writer)."""
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name, _, session = entry.name.removeprefix(TEMP_PREFIX).partition(".")
        older = parse_step_dir_name(name) if entry.name.startswith(TEMP_PREFIX) else None
        if older is not None and older < step and session == session_of(older):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    return removed
