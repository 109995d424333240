"""Restoring from a universal checkpoint (the last source of ``order.py``), at the training object's own layout:
any world size, ZeRO stage or state bits (``checkpoint/universal/load.py`` reads and reshards, this module hands
the state over and reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from regrow.checkpoint.universal.format import CheckpointError, Manifest
from regrow.checkpoint.universal.load import load_agreed
from regrow.recovery.order import FALLBACK, JobRestore, SnapshotRestoreError, Source
from regrow.trainer.log import log_line
from regrow.trainer.state import Restorable


@dataclass
class RestoreReport:
    """Which checkpoint a restore used, and which ones it passed over (with the reason)."""

    path: Path
    step: int
    saved_world_size: int
    bytes_read: int
    """Bytes this rank read from tensor files: about its share of the checkpoint, never whole files."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def restore_trainer(target: Restorable, source: str | Path, *, root: str | Path | None = None) -> RestoreReport:
    """Resumes ``target`` from a checkpoint at its own layout (any world size, stage or state bits).

    Collective: every rank calls it with the same arguments. ``source`` is ``"latest"`` (with ``root``), a root or
    one ``step_*`` directory (``checkpoint.universal.load.sources``). When the checkpoint ``latest`` names does not
    verify, the newest one that does is loaded instead, and a log line says so.
    """
    loaded = load_agreed(source, root=root, layout=target.layout, rank=target.rank,
                         world_size=target.world_size, timeout_s=target.timeout_s, view=target.checkpoint_view())
    target.restore(loaded.state)
    _log_restore(target, loaded.path, loaded.manifest, loaded.skipped)
    return RestoreReport(path=loaded.path, step=loaded.manifest.step, saved_world_size=loaded.manifest.world_size,
                         bytes_read=loaded.state.extra["bytes_read"], skipped=loaded.skipped)


def restore_latest(target: Restorable, ckpt_root: str | None, passed_over: list[str]) -> JobRestore:
    """The checkpoint source of a job's restore: ``latest`` under ``ckpt_root`` (collective). Raises
    :class:`SnapshotRestoreError` naming every source tried when there is no root or no checkpoint loads."""
    reasons = "; ".join(passed_over) or "no snapshot"
    if not ckpt_root:
        raise SnapshotRestoreError(f"rank {target.rank}: no in-memory snapshot to restore ({reasons}); restore "
                                   f"from {FALLBACK} instead (give a checkpoint root)")
    try:
        loaded = restore_trainer(target, "latest", root=ckpt_root)
    except CheckpointError as error:
        raise SnapshotRestoreError(f"rank {target.rank}: no in-memory snapshot ({reasons}) and the checkpoint "
                                   f"fallback under {ckpt_root} failed too: {error}") from error
    return JobRestore(source=Source.CHECKPOINT, step=target.step, detail=str(loaded.path), passed_over=passed_over)


def _log_restore(target: Restorable, path: Path, manifest: Manifest, skipped: list[tuple[Path, str]]) -> None:
    if target.rank != 0:
        return
    if skipped:
        names = ", ".join(p.name for p, _ in skipped)
        log_line(0, manifest.step, f"checkpoint: {names} did not verify; fell back to {path.name}")
    changed = config_changes(manifest.config, target.run_config())
    note = f"; config changes: {', '.join(changed)}" if changed else ""
    log_line(0, manifest.step, f"resumed from {path} (saved at world size {manifest.world_size}, now "
                               f"{target.world_size}){note}")


def config_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested config dicts."""
    changes = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new and not (isinstance(old, list) and isinstance(new, tuple) and old == list(new)):
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


__all__ = ["RestoreReport", "config_changes", "restore_latest", "restore_trainer"]
