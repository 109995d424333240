"""Writing this node's parts of a persisted step, and committing it on the node that holds rank 0 (files only).

Every node writes its ranks' parts and markers into ``.tmp_step_<s>.<session>``; the process holding rank 0 waits
(``commit_timeout_s``) for every rank's marker, writes the manifest, renames, flips ``latest`` and purges, through
the asynchronous ``CheckpointWriter``'s own code (``writer.PartWriter``, ``writer.commit_save``). persist.py says
why markers carry a fingerprint and when temporaries are removed.

The checkpoint modules are imported inside the methods: they import torch, which the snapshot process loads only
once it persists.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from regrow.checkpoint.node.persist import PersistConfig, PersistResult, persist_session
from regrow.checkpoint.snapshot import segment as seg


class StepWriter:
    """Writes and commits the persisted steps of one snapshot process under ``config.persist_dir``; ``log`` prints
    its lines. Called on the persist thread (and on a thread of its own for a skipped step's error markers)."""

    def __init__(self, config: PersistConfig, token: str, *, log: Callable[[str], None]) -> None:
        self.config = config
        self.root = Path(config.persist_dir)
        self._token = token
        self._log = log

    def give_up(self, step: int, ranks: list[int], error: str) -> None:
        """Error markers for this node's ranks (:meth:`error_markers`); the holder of rank 0 itself just removes
        the temporary directory."""
        from regrow.checkpoint.universal.format import temp_dir_name

        if 0 in ranks:
            shutil.rmtree(self.root / temp_dir_name(step, persist_session(self._token, step)), ignore_errors=True)
            return
        self.error_markers(step, ranks, error)

    def error_markers(self, step: int, ranks: list[int], error: str) -> None:
        """Writes an error marker for each of ``ranks`` into the temporary directory of ``step``, so that the holder
        of rank 0 stops waiting for their parts at once instead of at ``commit_timeout_s`` (it accepts any error
        marker of the session: a node that abandons or skips a step has no fingerprint to give)."""
        from regrow.checkpoint.universal.format import temp_dir_name
        from regrow.checkpoint.universal.part_writer import Part, PartWriter

        session = persist_session(self._token, step)
        temp = self.root / temp_dir_name(step, session)
        parts = PartWriter(chunk_bytes=self.config.chunk_bytes, fsync=self.config.fsync)
        for rank in ranks:
            try:
                parts.write_marker(temp, rank=rank, step=step, session=session, part=Part(), error=error)
            except OSError as failed:
                self._log(f"persist of step {step}: could not write rank {rank}'s error marker: {failed}")

    def write(self, step: int, session: str, snapshots: dict[int, seg.Snapshot], started: float, *,
              run_config: dict) -> PersistResult:
        """Writes every local rank's part from its private copy (released as it goes); the holder of rank 0 then
        commits, recording ``run_config`` in the manifest."""
        # torch-side imports, see the module docstring.
        from regrow.checkpoint.snapshot.sink import state_from_snapshot
        from regrow.checkpoint.universal.commit import (
            SaveTarget,
            build_manifest,
            commit_save,
            remove_older_temporaries,
        )
        from regrow.checkpoint.universal.format import (
            MANIFEST_NAME,
            PARTS_DIR,
            rank_file,
            step_dir_name,
            temp_dir_name,
        )
        from regrow.checkpoint.universal.part_writer import PartWriter, write_part

        final = self.root / step_dir_name(step)
        if _manifest_session(final / MANIFEST_NAME) == session:
            for snapshot in snapshots.values():
                snapshot.payload.release()
            self._log(f"step {step} was already persisted to {final} by this job; not written again")
            return PersistResult(step=step, status="already", path=str(final))
        temp = self.root / temp_dir_name(step, session)
        for rank in snapshots:  # an earlier attempt's markers (e.g. before a rank restart) must not count now
            try:
                (temp / PARTS_DIR / rank_file(rank, ".json")).unlink(missing_ok=True)
            except OSError:
                pass  # temp is unusable: the writes below fail and report why
        parts = PartWriter(chunk_bytes=self.config.chunk_bytes, fsync=self.config.fsync)
        errors, fingerprint, summary = [], None, None
        for rank in sorted(snapshots):
            snapshot = snapshots.pop(rank)
            try:
                state = state_from_snapshot(snapshot)
            finally:
                snapshot.payload.release()  # the private copy is freed once the state holds the tensors
            mark = {"tokens_seen": state.tokens_seen, "data_cursor": dict(state.data_cursor),
                    "world_size": state.layout["world_size"], "lineage": state.extra.get("lineage", "")}
            fingerprint = fingerprint or mark
            if rank == 0:
                summary = (state.layout, dict(state.data_cursor), state.tokens_seen, state.layout["world_size"])
            _, error = write_part(parts, temp, state, session=session, marker_extra={"persist": mark})
            if error is not None:
                errors.append(f"rank {rank}: {error}")
            del state
        if summary is None:
            return self._written(step, temp, errors, started)
        layout, cursor, tokens, world_size = summary
        target = SaveTarget(root=self.root, step=step, session=session, world_size=world_size)
        done = commit_save(
            target, lambda markers: build_manifest(target, markers, layout=layout, data_cursor=cursor,
                                                   tokens_seen=tokens, run_config=run_config),
            keep_last=self.config.keep_last, timeout_s=self.config.commit_timeout_s, fsync=self.config.fsync,
            started=started, accept=self._accepts(step, fingerprint),
            own_errors=errors)  # a part of its own failed: no waiting (its marker may not exist), the step fails now
        result = done.result
        if result.status != "committed":
            self._log(f"persist of step {step} FAILED: {result.error}; latest is unchanged")
            return PersistResult(step=step, status="failed", seconds=result.seconds, error=result.error)
        removed = remove_older_temporaries(self.root, step, lambda older: persist_session(self._token, older))
        purged = f"; purged {', '.join(p.name for p in done.purged)}" if done.purged else ""
        cleaned = f"; removed {len(removed)} abandoned temporaries" if removed else ""
        self._log(f"persisted step {step} to {result.path} in {result.seconds:.2f} s{purged}{cleaned}")
        return PersistResult(step=step, status="committed", path=result.path, seconds=result.seconds)

    def _accepts(self, step: int, fingerprint: dict | None) -> Callable[[dict], bool]:
        """Which markers of ``step`` count: those of the same run as this node's parts (``fingerprint``: lineage,
        data cursor, tokens seen), or an error. A part left by a rolled-back run of the step is passed over, and
        said so once per rank (the commit then waits for that rank's part of the re-run)."""
        passed_over: set[object] = set()

        def accept(marker: dict) -> bool:
            if marker.get("persist") == fingerprint or bool(marker.get("error")):
                return True
            rank = marker.get("rank")
            if rank not in passed_over:
                passed_over.add(rank)
                self._log(f"persist of step {step}: the part of rank {rank} on disk is from another run of the step "
                          f"(one rolled back); waiting for its part of this run")
            return False

        return accept

    def _written(self, step: int, temp: Path, errors: list[str], started: float) -> PersistResult:
        """The outcome on a node that does not hold rank 0 (its parts and markers are written; rank 0 commits)."""
        seconds = time.perf_counter() - started
        if errors:
            error = "; ".join(errors)
            self._log(f"persist of step {step} FAILED on this node: {error}; latest is unchanged")
            return PersistResult(step=step, status="failed", seconds=seconds, error=error)
        self._log(f"persisted this node's part of step {step} to {temp} in {seconds:.2f} s (the snapshot process "
                  f"holding rank 0 commits it)")
        return PersistResult(step=step, status="written", path=str(temp), seconds=seconds)


def _manifest_session(path: Path) -> str | None:
    """The writer session recorded in a committed manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(path.read_text()).get("writer", {}).get("session")
    except (OSError, ValueError, AttributeError):
        return None
