"""The attached ranks' segment slots in one snapshot process: which step each slot holds committed, and which
slots are held (an encode round or a persist reads them, so the rank's sink must not write them).

Each rank that ATTACHes gets two segments (alternating: one always holds a complete snapshot while the other is
being written), sized from the tensor table it announces. A slot counts as committed at step s from the rank's
COMMIT of s until the rank writes it again or goes back to an earlier step (a restore: :meth:`SlotTable.attach`
with ``at_step``). Holds are granted by step and reach a rank's sink through its COMMIT replies
(docs/snapshot-protocol.md says why that is safe).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from regrow.checkpoint.node.coded_buffer import BufferError, RebuiltSegment, SealedSegment
from regrow.checkpoint.node.log import log
from regrow.checkpoint.node.shm import check_space, create_segment, write_segment
from regrow.checkpoint.snapshot import segment as seg

SLOTS = 2


@dataclass
class RankSlots:
    """One attached rank's segments and what the process knows of them."""

    paths: list[str]
    table: list[dict]
    """The tensor table the rank attached with (a re-attach must bring the same one)."""
    meta_capacity: int
    size: int
    committed: dict[int, int] = field(default_factory=dict)  # slot -> step of the last COMMIT
    held: dict[str, int] = field(default_factory=dict)  # holder -> slot its sink must not overwrite

    def newest(self) -> int | None:
        """The newest committed step, if any."""
        return max(self.committed.values(), default=None)

    def slot_of(self, step: int) -> int | None:
        return next((slot for slot, committed in self.committed.items() if committed == step), None)


class SlotTable:
    """Every attached rank's slots under ``shm_dir`` for snapshot process job ``job``; what the erasure coder and
    the persister read (``coded_buffer.NodeSegments``). Thread-safe: one lock, taken after the coding thread's."""

    def __init__(self, shm_dir: str, job: str) -> None:
        self.shm_dir = shm_dir
        self.job = job
        self._ranks: dict[int, RankSlots] = {}
        self._pending_holds: dict[str, int] = {}  # holder -> step whose slots are held as ranks COMMIT it
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the ranks' requests
    def attach(self, rank: int, table: list[dict], meta_capacity: int, *, at_step: int | None = None,
               restored_from: str | None = None) -> dict:
        """ATTACH (the reply); ``at_step``/``restored_from``: the rank's state is at that step, restored from that
        segment (if from one), so its slots of later steps, or of that step but another history, are abandoned
        (see :meth:`_abandon_locked`)."""
        _, payload = seg.plan_tensors(table)
        size = seg.segment_bytes(meta_capacity, payload)
        with self._lock:
            have = self._ranks.get(rank)
            if have is None:
                self._ranks[rank] = made = self._create_locked(rank, table, meta_capacity, size)
            else:
                # Only the tensor table must match. The metadata room asked for grows by a few bytes with the step
                # and data cursor, far less than the room's headroom: the segments keep their room, and the sink's
                # begin() refuses metadata that would not fit.
                if have.table != table:
                    raise ValueError(f"rank {rank} re-attached with another tensor table; its snapshots were "
                                     f"taken at another layout (restore from the universal checkpoint)")
                if at_step is not None:
                    self._abandon_locked(have, at_step, restored_from)
                reply = {"ok": True, "paths": have.paths, "reused": True, "segment_bytes": have.size,
                         "held": sorted(set(have.held.values()))}
        if have is not None:
            log("re-attached to its existing segments", rank=rank)
            return reply
        log(f"attached: {SLOTS} segments of {size / 2**20:.1f} MiB", rank=rank)
        return {"ok": True, "paths": made.paths, "reused": False, "segment_bytes": size, "held": []}

    def _abandon_locked(self, have: RankSlots, at_step: int, restored_from: str | None) -> None:
        """Forgets the commits of ``have``'s slots that the rank abandoned by going back to ``at_step``: those of
        later steps, and of ``at_step`` itself unless restored from that very slot (the sink's own rule for which
        slot it keeps). They stay sealed, but of a history the job left: counted as committed, they made an
        encode round or a persist take a step from that history next to other ranks' re-run one (the same bytes
        only when training is deterministic), and made holds of the re-run steps fail as "past". A holder that
        held such a slot now waits for the rank's new COMMIT of its step (a round waiting on it goes on then)."""
        for slot, step in list(have.committed.items()):
            if step < at_step or (step == at_step and have.paths[slot] == restored_from):
                continue
            del have.committed[slot]
            for holder, held_slot in list(have.held.items()):
                if held_slot == slot:
                    del have.held[holder]
                    self._pending_holds[holder] = step

    def _create_locked(self, rank: int, table: list[dict], meta_capacity: int, size: int) -> RankSlots:
        """Creates ``rank``'s two segments, space checked first; the caller records them. All or nothing: when a
        segment cannot be created, those made before it are removed (an orphan would survive SHUTDOWN and make the
        rank's next ATTACH fail with FileExistsError)."""
        check_space(self.shm_dir, SLOTS * size)
        paths: list[str] = []
        try:
            for slot in range(SLOTS):
                paths.append(create_segment(self.shm_dir, self.job, rank=rank, slot=slot, size=size,
                                            meta_capacity=meta_capacity))
        except BaseException:
            for path in paths:
                Path(path).unlink(missing_ok=True)
            raise
        return RankSlots(paths=paths, table=table, meta_capacity=meta_capacity, size=size)

    def latest(self, rank: int, *, verify: bool = True) -> dict:
        """LATEST (the reply): every slot of ``rank`` as its header says, payload checked unless not ``verify``."""
        with self._lock:
            have = self._ranks.get(rank)
        if have is None:
            return {"ok": True, "latest": None, "slots": [], "note": f"rank {rank} never attached"}
        slots = [seg.inspect(path, rank=rank, payload=verify) for path in have.paths]
        good = [s for s in slots if s["status"] == "ok"]
        latest = max(good, key=lambda s: s["step"]) if good else None
        return {"ok": True, "latest": latest, "slots": slots}

    def commit(self, rank: int, slot: int, step: int) -> str | None:
        """COMMIT: records ``rank``'s ``slot`` as committed at ``step`` (and holds it for a holder waiting for that
        step); returns why it refused instead, or None."""
        with self._lock:
            have = self._ranks.get(rank)
        if have is None or not 0 <= slot < SLOTS:
            return f"rank {rank} has no slot {slot} (ATTACH first)"
        buffer = seg.open_segment(have.paths[slot], writable=False)
        try:
            header = seg.read_header(buffer)
        finally:
            buffer.close()
        if header.complete != seg.COMPLETE or header.step != step:
            return f"slot {slot} holds no sealed snapshot of step {step}"
        with self._lock:
            have.committed[slot] = step
            for holder, wanted in self._pending_holds.items():
                if wanted == step:
                    have.held[holder] = slot
        return None

    def held_slots(self, rank: int) -> list[int]:
        """The slots of an attached ``rank`` that some holder holds (what its COMMIT reply tells its sink)."""
        with self._lock:
            return sorted(set(self._ranks[rank].held.values()))

    # ---------------------------------------------------------------- holds (NodeSegments)
    def hold(self, holder: str, step: int) -> str:
        """See ``coded_buffer.NodeSegments.hold``. Safe because a sink never writes its newest committed slot's
        step again before its next COMMIT, and that COMMIT's reply carries the hold."""
        with self._lock:
            self._release_locked(holder)
            if any(have.newest() is not None and have.newest() > step for have in self._ranks.values()):
                return "past"
            for have in self._ranks.values():
                if have.newest() == step:
                    have.held[holder] = have.slot_of(step)
            if self._ranks and all(holder in have.held for have in self._ranks.values()):
                return "held"
            self._pending_holds[holder] = step
            return "pending"

    def holds_ready(self, holder: str, step: int) -> bool:
        with self._lock:
            return bool(self._ranks) and all(
                holder in have.held and have.committed.get(have.held[holder]) == step for have in self._ranks.values())

    def release(self, holder: str, step: int) -> None:
        with self._lock:
            held_steps = {have.committed.get(have.held[holder]) for have in self._ranks.values() if holder in have.held}
            if self._pending_holds.get(holder, step) == step and held_steps <= {step}:
                self._release_locked(holder)

    def _release_locked(self, holder: str) -> None:
        self._pending_holds.pop(holder, None)
        for have in self._ranks.values():
            have.held.pop(holder, None)

    # ---------------------------------------------------------------- what the coder and the persister read
    def node_bytes(self) -> int:
        """Bytes of one slot of every attached rank: the most this node's coded buffer of a step can hold, save
        its index (what the server caps its peers' announced buffers and pieces from)."""
        with self._lock:
            return sum(have.size for have in self._ranks.values())

    def ready_step(self) -> int | None:
        """The newest step every attached rank has committed (what the group encodes next), if any."""
        with self._lock:
            common: set[int] | None = None
            for have in self._ranks.values():
                steps = set(have.committed.values())
                common = steps if common is None else common & steps
        return max(common) if common else None

    def committed_paths(self, step: int) -> dict[int, str] | None:
        """Each attached rank's segment committed at ``step``, or None while a rank has not committed it."""
        paths = {}
        with self._lock:
            for rank, have in self._ranks.items():
                found = [slot for slot, committed in have.committed.items() if committed == step]
                if not found:
                    return None
                paths[rank] = have.paths[found[0]]
        return paths

    def sealed_segments(self, step: int) -> list[SealedSegment]:
        """Each attached rank's slot committed at ``step`` (KeyError naming the rank if one has none)."""
        with self._lock:
            out = []
            for rank, have in sorted(self._ranks.items()):
                slots = [slot for slot, committed in have.committed.items() if committed == step]
                if not slots:
                    raise KeyError(f"rank {rank} has no committed snapshot of step {step}")
                out.append(SealedSegment(rank=rank, slot=slots[0], tensors=have.table,
                                         meta_capacity=have.meta_capacity, path=have.paths[slots[0]]))
        return out

    def install(self, segment: RebuiltSegment, step: int, *, replace: bool = False) -> None:
        """Creates ``segment.rank``'s two segments as ATTACH would and writes the rebuilt snapshot into its slot,
        committed; the rank's later ATTACH with the same table re-attaches to it. With ``replace`` (a rollback of
        an attached rank), the rank's existing slot is overwritten instead; its tensor table must match."""
        _, payload = seg.plan_tensors(segment.tensors)
        size = seg.segment_bytes(segment.meta_capacity, payload)
        if len(segment.data) > size:
            raise BufferError(f"rebuilt segment of rank {segment.rank} has {len(segment.data)} bytes, more than "
                              f"the {size} its table needs")
        with self._lock:
            have = self._ranks.get(segment.rank)
            if have is not None and replace:
                if have.table != segment.tensors or have.meta_capacity != segment.meta_capacity:
                    raise ValueError(f"rank {segment.rank} is attached with another tensor table or metadata room "
                                     f"than its coded buffer of step {step}: cannot roll it back")
                have.committed.pop(segment.slot, None)  # void while it is rewritten
                write_segment(have.paths[segment.slot], segment.data)
                have.committed[segment.slot] = step
                return
            if have is not None:
                raise ValueError(f"rank {segment.rank} is already attached here: rebuild only into a fresh process")
            made = self._create_locked(segment.rank, segment.tensors, segment.meta_capacity, size)
            write_segment(made.paths[segment.slot], segment.data)
            made.committed[segment.slot] = step
            self._ranks[segment.rank] = made
        log(f"rebuilt from peers into slot {segment.slot}", rank=segment.rank, step=step)

    def remove_all(self) -> int:
        """Removes every segment this table created; returns how many."""
        with self._lock:
            for have in self._ranks.values():
                for path in have.paths:
                    Path(path).unlink(missing_ok=True)
            count = sum(len(have.paths) for have in self._ranks.values())
            self._ranks.clear()
        return count
