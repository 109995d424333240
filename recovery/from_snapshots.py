"""Restoring from the nodes' snapshot processes: the survivors keep their state, the node snapshot, the
erasure-coded rebuild (sources 1-3 of ``order.py``).

Each attempt is collective and returns a :class:`~regrow.recovery.order.JobRestore` when every rank restored (or
kept) one common step, or None when that is impossible (the reason appended to the search's ``passed_over``); the
ranks always reach the same verdict. Slots are listed by their headers and only the one the job agrees on is read
and verified (a 0.6 GB payload costs about a second on the host); a slot that fails its checksum is passed over
for the same step's coded copy, then for an older step.

:func:`restore_from_node` is the simpler restore of a rank process that crashed while its node lived: the newest
step every rank holds in a verified slot, nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import ProtocolError, SnapshotClient, SnapshotProcessLost
from regrow.checkpoint.snapshot.read import read_slot
from regrow.checkpoint.snapshot.sink import state_from_snapshot
from regrow.recovery.agreement import all_ranks_ok, gather_steps, newest_common, newest_held_by_all
from regrow.recovery.order import FALLBACK, JobRestore, SnapshotRestoreError, Source
from regrow.trainer.log import log_line
from regrow.trainer.state import Restorable, ShardState


class NodeView:
    """This rank's view of its node's snapshot process during a restore."""

    def __init__(self, address: str, rank: int, token: str | None, timeout_s: float) -> None:
        self.rank = rank
        self.client = SnapshotClient(address, token=token, timeout_s=timeout_s)

    def close(self) -> None:
        self.client.close()

    def sealed_slots(self, passed_over: list[str]) -> dict[int, str]:
        """step -> path of every sealed slot of this rank, as the snapshot process lists them by their headers (not
        verified yet)."""
        reply = self.client.request({"op": "latest", "rank": self.rank, "verify": False})
        found: dict[int, str] = {}
        for slot in reply["slots"]:
            if slot["status"] != "ok":
                passed_over.append(f"slot {slot['slot']} (step {slot['step']}): {slot['status']}")
                continue
            found[int(slot["step"])] = slot["path"]
        return found

    def coded_steps(self) -> list[int]:
        """Steps this node holds complete erasure-coding buffers of (empty when erasure coding is off)."""
        return [int(step) for step in self.client.request({"op": "ec_status"})["complete"]]

    def rollback(self, step: int) -> str:
        """Has the node write this rank's snapshot of ``step`` back from its coded buffer; returns the slot path."""
        reply = self.client.request({"op": "ec_rollback", "rank": self.rank, "step": step})
        slots = self.client.request({"op": "latest", "rank": self.rank, "verify": False})["slots"]
        return next(s["path"] for s in slots if s["slot"] == reply["slot"])


@dataclass
class SnapshotSearch:
    """One rank's state of a restore from its node: what the node holds, which steps failed, what was passed over,
    and the seconds spent reading. Built by :meth:`open`; :meth:`close` it when the restore is over."""

    target: Restorable
    node: NodeView | None
    slots: dict[int, str] = field(default_factory=dict)
    """step -> path of this rank's sealed slots."""
    coded: list[int] = field(default_factory=list)
    """Steps the node holds complete erasure-coded buffers of."""
    passed_over: list[str] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)
    """Steps that could not be read on every rank (never tried again)."""
    read_seconds: float = 0.0

    @classmethod
    def open(cls, target: Restorable, address: str | None, token: str | None, timeout_s: float) -> SnapshotSearch:
        """Connects to the node at ``address`` and lists what it holds; an unreachable node holds nothing (the
        reason is recorded). ``address`` None: snapshots are off."""
        search = cls(target=target, node=None)
        if address is None:
            return search
        try:
            search.node = NodeView(address, target.rank, token, timeout_s)
            search.slots, search.coded = search.node.sealed_slots(search.passed_over), search.node.coded_steps()
        except (SnapshotProcessLost, ProtocolError, OSError) as error:
            where = "snapshot process" if search.node is not None else f"snapshot process at {address}"
            search.passed_over.append(f"{where}: {error}")
            search.close()
            search.slots, search.coded = {}, []
        return search

    def close(self) -> None:
        if self.node is not None:
            self.node.close()
            self.node = None

    def read(self, step: int) -> tuple[ShardState | None, str, Source]:
        """This rank's snapshot of ``step``, verified: from its slot, else (no slot, or one that fails its checksum)
        written back from the node's coded buffer. Returns (state, slot path, source); state None when neither
        serves (reasons appended)."""
        started = time.perf_counter()
        try:
            return self._read(step)
        finally:
            self.read_seconds += time.perf_counter() - started

    def _read(self, step: int) -> tuple[ShardState | None, str, Source]:
        rank, device = self.target.rank, self.target.device
        if step in self.slots:
            state = read_slot(self.slots[step], rank, self.passed_over, device)
            if state is not None or step not in self.coded or self.node is None:
                return state, self.slots[step], Source.SNAPSHOT
        if step in self.coded and self.node is not None:
            try:
                path = self.node.rollback(step)
                return read_slot(path, rank, self.passed_over, device), path, Source.ERASURE
            except (SnapshotProcessLost, ProtocolError) as error:
                self.passed_over.append(f"roll back to step {step}: {error}")
                return None, "", Source.ERASURE
        self.passed_over.append(f"step {step}: not in this rank's slots or its node's coded buffers")
        return None, "", Source.SNAPSHOT

    def gather(self, steps: list[int]) -> list[set[int]]:
        return gather_steps(steps, self.target.world_size, self.target.timeout_s)

    def all_ok(self, ok: bool) -> bool:
        return all_ranks_ok(ok, self.target.world_size, self.target.timeout_s)


def keep_survivors(search: SnapshotSearch, kept_step: int | None) -> JobRestore | None:
    """Source 1: the survivors keep their state and only the other ranks restore ``kept_step`` from their node; None
    when that is not possible for every rank. ``kept_step``: this rank survived with its state intact at that step
    (None: it must restore)."""
    target, passed_over = search.target, search.passed_over
    kept = search.gather([] if kept_step is None else [kept_step])
    steps = set().union(*kept)
    if len(steps) != 1:  # no survivor (every rank restores), or survivors at different steps
        if steps:
            passed_over.append(f"survivors keep their state: they are at different steps {sorted(steps)}")
        return None
    step = steps.pop()
    state, path, source = None, "", Source.KEPT
    # A replacement that never trained is at the initial state, which is step 0's (the model is built from the
    # config's seed, the generators seeded per rank): nothing to read when the survivors are at step 0 too.
    initial = kept_step is None and step == 0 and target.at_initial_state()
    if initial and not target.initialized:  # built for a restore (uninitialized weights): initialize them now
        target.reset_to_initial_state()
    if kept_step is None and not initial:
        state, path, source = search.read(step)
    if not search.all_ok(kept_step is not None or initial or state is not None):
        passed_over.append(f"survivors keep their state: a replacement cannot read step {step}")
        return None
    # Restoring a shard ends with an all-gather of the parameters (collective): the others take part with theirs.
    loading = time.perf_counter()
    if state is not None:
        target.restore(state)
    else:
        target.gather_parameters()
    detail = path or ("the initial state" if initial else "this rank's memory")
    return JobRestore(source=source, step=step, detail=detail, passed_over=passed_over,
                      load_seconds=time.perf_counter() - loading)


def restore_from_slots(search: SnapshotSearch) -> JobRestore | None:
    """Source 2: the newest step every rank holds in a slot of its node (a slot that fails its checksum is replaced
    by the same step's coded copy when the node has one); an older common step when that one cannot be read on
    every rank. None when no common slot step is left."""
    while True:
        step = newest_common(search.gather([s for s in search.slots if s not in search.failed]))
        if step is None:
            return None
        restored = _restore_step(search, step)
        if restored is not None:
            return restored


def restore_from_coded(search: SnapshotSearch) -> JobRestore | None:
    """Source 3: the newest step every rank holds either in a slot or in its node's complete erasure-coding
    buffers (``ec_rollback`` writes it back to a slot): the path after a node loss, where the replacement node was
    rebuilt at the group's last encoded step, older than the survivors' slots, and the survivors roll back to it."""
    while True:
        held = [s for s in search.slots if s not in search.failed] + [s for s in search.coded if s not in search.failed]
        step = newest_common(search.gather(held))
        if step is None:
            search.passed_over.append("no snapshot step is held by every rank, in slots or erasure-coded buffers")
            return None
        restored = _restore_step(search, step)
        if restored is not None:
            return restored


def _restore_step(search: SnapshotSearch, step: int) -> JobRestore | None:
    """Reads ``step`` on every rank and restores it when every rank could; else marks it failed (collective)."""
    state, path, source = search.read(step)
    if not search.all_ok(state is not None):
        search.passed_over.append(f"step {step} could not be read on every rank")
        search.failed.add(step)
        return None
    assert state is not None
    search.passed_over += [f"step {s}: newer than what every rank holds" for s in search.slots
                           if s > step and s not in search.failed]
    loading = time.perf_counter()
    search.target.restore(state)
    return JobRestore(source=source, step=step, detail=path, passed_over=search.passed_over,
                      load_seconds=time.perf_counter() - loading)


# -------------------------------------------------------------------- restore of a crashed rank
@dataclass
class SnapshotRestore:
    """What :func:`restore_from_node` restored: the step, the slot, and why newer slots were passed over."""

    step: int
    slot: int
    path: str
    skipped: list[str]
    seconds: float


def restore_from_node(target: Restorable, address: str, *, token: str | None = None,
                      timeout_s: float = 60.0, log: bool = True) -> SnapshotRestore:
    """Restores ``target`` from this node's snapshot process after its rank process crashed.

    Collective when the world has several ranks: every rank calls it, and all restore the same step (the newest one
    every rank holds a verified snapshot of: a rank killed mid-seal may lack the very newest). Each candidate is
    verified by checksum in this process; a corrupt newest slot is passed over for the other, and a log line says
    which slot was used and why. Raises :class:`SnapshotRestoreError` naming the fallback when no common good
    snapshot exists, and ``SnapshotProcessLost`` when the process cannot be reached.
    """
    started = time.perf_counter()
    client = SnapshotClient(address, token=token, timeout_s=timeout_s)
    try:
        states, skipped = _verified_slots(client, target.rank)
    finally:
        client.close()
    step = newest_held_by_all(list(states), target.world_size, target.timeout_s)
    if step < 0:
        reasons = "; ".join(skipped) or "no snapshot was ever sealed"
        raise SnapshotRestoreError(f"rank {target.rank}: no in-memory snapshot every rank holds ({reasons}); "
                                   f"restore from {FALLBACK} instead")
    slot, state = states[step]
    skipped += [f"slot {s['slot']} (step {s['step']}): newer than what every rank holds (step {step})"
                for s, _ in states.values() if s["step"] > step]
    target.restore(state)
    result = SnapshotRestore(step=step, slot=slot["slot"], path=slot["path"], skipped=skipped,
                             seconds=time.perf_counter() - started)
    if log:
        passed = f"; passed over {'; '.join(skipped)}" if skipped else ""
        log_line(target.rank, step, f"snapshot: restored step {step} from slot {slot['slot']} ({slot['path']}) "
                                    f"in {result.seconds:.2f} s{passed}")
    return result


def _verified_slots(client: SnapshotClient, rank: int) -> tuple[dict[int, tuple[dict, ShardState]], list[str]]:
    """step -> (slot, state) of every slot of ``rank`` that verifies here (re-checked, not trusted from the
    process), and why the others do not."""
    reply = client.request({"op": "latest", "rank": rank})
    states: dict[int, tuple[dict, ShardState]] = {}
    skipped: list[str] = []
    for slot in sorted(reply["slots"], key=lambda s: -1 if s["step"] is None else s["step"], reverse=True):
        if slot["status"] != "ok":
            skipped.append(f"slot {slot['slot']} (step {slot['step']}): {slot['status']}")
            continue
        buffer = seg.open_segment(slot["path"], writable=False)
        try:
            snapshot = seg.verify(buffer, rank=rank)
            try:
                states[snapshot.step] = (slot, state_from_snapshot(snapshot))
            finally:
                snapshot.payload.release()
        except seg.SegmentError as error:  # changed since the snapshot process looked
            skipped.append(f"slot {slot['slot']} (step {slot['step']}): {error}")
        finally:
            buffer.close()
    return states, skipped


__all__ = ["NodeView", "SnapshotRestore", "SnapshotSearch", "keep_survivors", "restore_from_coded",
           "restore_from_node", "restore_from_slots"]
