"""Which universal checkpoint a job loads: every rank reads its own shard of one candidate, and the ranks agree.

A load names ``"latest"`` (of a root), a root, or one ``step_*`` directory (:func:`sources`). Each rank reads its
shard of the first candidate at its own layout (``reshard.load_state``: verified as it is read), then the ranks
agree with one all-reduce: either every rank loads that candidate, or every rank moves to the next older one (when
``latest`` does not verify, the newest one that does is used, and a log line says so). A checkpoint named
explicitly is loaded or refused, never replaced. The result is this rank's :class:`~regrow.trainer.state.ShardState`;
handing it to a training object is the recovery tier's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from regrow.checkpoint.universal import verify
from regrow.checkpoint.universal.format import (
    CheckpointError,
    CheckpointMismatch,
    CorruptCheckpoint,
    Manifest,
    UnsupportedFormatVersion,
)
from regrow.checkpoint.universal.reshard import load_state
from regrow.comm import collectives
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.log import log_line
from regrow.trainer.state import ShardState
from regrow.trainer.zero.layout import FlatLayout

_OK, _CORRUPT, _FATAL = 0, 1, 2


@dataclass
class LoadedCheckpoint:
    """The checkpoint every rank agreed on, and this rank's shard of it."""

    path: Path
    state: ShardState
    """This rank's shard at the layout it asked for (``extra["bytes_read"]``: bytes read from tensor files)."""
    manifest: Manifest
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Newer candidates passed over, with the reason."""


def _find(source: str | Path, root: str | Path | None) -> tuple[verify.Candidates, bool]:
    """The candidates for ``source`` and whether it named one checkpoint explicitly (see :func:`sources`)."""
    if str(source) == "latest":
        if root is None:
            raise CheckpointError("resume from 'latest' needs the checkpoint root (e.g. --ckpt-dir DIR)")
        return verify.find_candidates(Path(root)), False
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if verify.is_root(path):
        return verify.find_candidates(path), False
    return verify.Candidates(paths=[path]), True


def sources(source: str | Path, root: str | Path | None) -> tuple[list[Path], bool]:
    """The checkpoints to try for ``source`` and whether it named one explicitly (no fallback then).

    ``"latest"`` (needs ``root``) or a checkpoint root: the one ``latest`` names, then older ones as fallbacks
    (a ``latest`` that cannot be used is passed over). A ``step_*`` directory: that one only.
    """
    found, explicit = _find(source, root)
    return found.paths, explicit


def load_agreed(source: str | Path, *, root: str | Path | None, layout: FlatLayout, rank: int, world_size: int,
                timeout_s: float, view: CheckpointView | None = None) -> LoadedCheckpoint:
    """This rank's shard of the checkpoint every rank can load (see the module docstring). Collective: every rank
    of the default process group calls it with the same ``source`` and ``root`` and its own ``layout``, ``rank``
    and ``view`` (a pipeline stage's map onto the whole model's files; default: the identity view of ``rank``).
    Raises :class:`CheckpointError` (or a subclass) when no candidate loads on every rank, on every rank.

    Any problem with a candidate reached by falling back (``latest`` itself included) is logged with its reason and
    the next one is tried; a checkpoint named explicitly is refused with the reason instead."""
    found, explicit = _find(source, root)
    skipped: list[tuple[Path, str]] = list(found.passed_over)
    for path, reason in skipped:
        log_line(rank, 0, f"checkpoint {path.name} does not verify: {reason}; falling back to the newest "
                          "checkpoint that verifies")
    for path in found.paths:
        status, state, manifest, error = _try_load(path, layout, rank, view)
        worst = _worst_status(status, world_size, timeout_s)
        if worst == _OK:
            assert state is not None and manifest is not None
            return LoadedCheckpoint(path=path, state=state, manifest=manifest, skipped=skipped)
        reason = str(error) if error else "another rank found it corrupt (see that rank's log)"
        if worst == _FATAL or explicit:
            if error is not None:
                raise error
            raise CheckpointError(f"checkpoint {path} could not be loaded on another rank (see that rank's log)")
        if error is not None:
            log_line(rank, 0, f"checkpoint {path.name} does not verify: {reason}")
        skipped.append((path, reason))
    raise CorruptCheckpoint(str(root or source), [f"{p.name}: {why.splitlines()[0]}" for p, why in skipped]
                            + ["no checkpoint verifies; nothing was loaded"])


def _worst_status(status: int, world_size: int, timeout_s: float) -> int:
    """The worst of every rank's ``status`` (collective when there are several ranks)."""
    if world_size == 1:
        return status
    flag = torch.tensor([status], dtype=torch.int32)
    collectives.all_reduce(flag, group=None, timeout_s=timeout_s, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _try_load(path: Path, layout: FlatLayout, rank: int, view: CheckpointView | None
              ) -> tuple[int, ShardState | None, Manifest | None, BaseException | None]:
    try:
        state, manifest = load_state(path, layout, rank, view)
        return _OK, state, manifest, None
    except CorruptCheckpoint as error:
        return _CORRUPT, None, None, error
    except (UnsupportedFormatVersion, CheckpointMismatch, CheckpointError) as error:
        return _FATAL, None, None, error
    except OSError as error:  # e.g. a file vanished between listing and reading: treat like damage
        return _CORRUPT, None, None, CorruptCheckpoint(str(path), [f"{type(error).__name__}: {error}"])
    except Exception as error:  # anything else must not leave the other ranks waiting in the all-reduce
        return _FATAL, None, None, error


__all__ = ["LoadedCheckpoint", "load_agreed", "sources"]
