"""Restore of every rank of a job after a failure, trying the sources in DESIGN.md's recovery order.

:func:`restore_job` is collective: every rank calls it after the job restarted (a rank crashed, or a node was lost
and its replacement's snapshot process was rebuilt from its erasure-coding group), and all ranks restore ONE common
step from the best source that has it:

1. **snapshot slots**: the newest step every rank holds in a verified slot of its node's snapshot process (a corrupt
   newest slot is passed over for the other one);
2. **erasure-coded buffers**: otherwise the newest step that every rank holds either in a slot or in its node's
   complete erasure-coding buffers (``ec_status``). A rank whose slots lack that step has its node write it back
   from the node's own coded buffer (``ec_rollback``) and restores it from the slot. This is the path after a
   node loss: the replacement node was rebuilt at the group's last encoded step, older than what the survivors'
   slots hold, and the survivors roll back to it;
3. **the universal checkpoint**: ``latest`` under ``ckpt_root`` (more nodes of a group lost than its parity, or no
   snapshot at all).

Before those, the survivors of a failure may keep their state ("Survivors keep their state", DESIGN.md): a rank
that passes ``kept_step`` (its in-memory state is intact at that step boundary, see
``trainer.boundary.RewindableStep``) restores nothing when every such rank passes the same step and every other
rank (the replacements) can read that step from its slots or its node's coded buffers; only those restore. When
the survivors disagree (one was mid-update) or a replacement lacks the step, every rank restores as above.

Each rank logs which source it used and why the better ones were passed over; the result says the same. Once
restored, the ranks start a new lineage together (``Trainer.start_lineage``): the steps the job trains from here
are told apart from the failed run's steps of the same numbers (the snapshot processes persist a step from parts
of one lineage only).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot import wordsum
from regrow.checkpoint.snapshot.protocol import ProtocolError, SnapshotClient, SnapshotProcessLost
from regrow.checkpoint.snapshot.sink import FALLBACK, SnapshotRestoreError, state_from_snapshot
from regrow.checkpoint.universal.format import CheckpointError
from regrow.checkpoint.universal.reshard import restore_trainer
from regrow.comm import collectives
from regrow.trainer.log import log_line
from regrow.trainer.loop import Trainer
from regrow.trainer.state import ShardState

KEPT_SOURCE = "kept in memory"
SLOTS_SOURCE = "snapshot"
CODED_SOURCE = "erasure-coded buffer"
CHECKPOINT_SOURCE = "checkpoint"
MAX_CANDIDATES = 8
"""Steps one rank may offer per source in the agreement (2 slots, a few complete coded buffers)."""


@dataclass
class JobRestore:
    """What :func:`restore_job` restored on this rank."""

    source: str
    """``"snapshot"``, ``"erasure-coded buffer"`` or ``"checkpoint"``."""
    step: int
    detail: str
    """The slot path or checkpoint directory used."""
    passed_over: list[str] = field(default_factory=list)
    """Why better sources or newer steps were not used."""
    seconds: float = 0.0
    read_seconds: float = 0.0
    """Of ``seconds``, the time spent reading and verifying snapshots (every step tried)."""
    load_seconds: float = 0.0
    """Of ``seconds``, the time spent loading the state into the trainer (the rest: agreeing on the step)."""
    lineage: str = ""
    """The lineage the job goes on in from the restored step (``Trainer.start_lineage``): the same on every rank."""


class _Node:
    """This rank's view of its node's snapshot process during a restore."""

    def __init__(self, address: str, rank: int, token: str | None, timeout_s: float) -> None:
        self.rank = rank
        self.client = SnapshotClient(address, token=token, timeout_s=timeout_s)

    def close(self) -> None:
        self.client.close()

    def sealed_slots(self, passed_over: list[str]) -> dict[int, str]:
        """step -> path of every sealed slot of this rank, as the snapshot process lists them by their headers (not
        verified yet: only the slot the job agrees on is read and verified, a 0.6 GB payload costs about a second
        on the host)."""
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
        try:
            return [int(step) for step in self.client.request({"op": "ec_status"})["complete"]]
        except ProtocolError:  # erasure coding off in this snapshot process
            return []

    def rollback(self, step: int) -> str:
        """Has the node write this rank's snapshot of ``step`` back from its coded buffer; returns the slot path."""
        reply = self.client.request({"op": "ec_rollback", "rank": self.rank, "step": step})
        slots = self.client.request({"op": "latest", "rank": self.rank, "verify": False})["slots"]
        return next(s["path"] for s in slots if s["slot"] == reply["slot"])


def read_slot(path: str, rank: int, passed_over: list[str], device: torch.device | None = None
              ) -> ShardState | None:
    """The state held by the segment at ``path``, verified by checksum; None (reason appended) if unusable.

    On a CUDA ``device`` (with triton) the payload is copied to the GPU in one piece and verified there, and the
    state's tensors are views of that copy: 0.6 GB took about 1.2 s to verify and copy out on the host (4 ranks
    of the 4-GPU host at once). Elsewhere the payload is verified and copied out on the host."""
    try:
        buffer = seg.open_segment(path, writable=False)
    except OSError as error:
        passed_over.append(f"{path}: {error}")
        return None
    on_gpu = device is not None and device.type == "cuda" and wordsum.gpu_kernels() is not None
    try:
        snapshot = seg.verify(buffer, rank=rank, payload_check=None if on_gpu else wordsum.digest)
        try:
            return state_from_snapshot(snapshot, _payload_on_gpu(snapshot, device) if on_gpu else None)
        finally:
            snapshot.payload.release()
    except seg.SegmentError as error:
        passed_over.append(f"{path}: {error}")
        return None
    finally:
        buffer.close()


def _payload_on_gpu(snapshot: seg.Snapshot, device: torch.device) -> dict[str, torch.Tensor]:
    """The snapshot's tensors as views of one device copy of its payload, whose digest is checked first (raises
    :class:`seg.SegmentError` like the host check)."""
    wordsum_triton = wordsum.gpu_kernels()
    with warnings.catch_warnings():  # the mapping is read-only; the tensor is only read from (copied)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        host = torch.frombuffer(snapshot.payload, dtype=torch.uint8) if len(snapshot.payload) else None
    payload = torch.empty(len(snapshot.payload), dtype=torch.uint8, device=device)
    if host is not None:
        payload.copy_(host)
    found = wordsum_triton.to_digest(wordsum_triton.digest_cuda(payload))
    if found != snapshot.payload_digest:
        raise seg.SegmentError(f"step {snapshot.step}: payload checksum mismatch (WordSum-128 {found.hex()} on the "
                               f"GPU, sealed with {snapshot.payload_digest.hex()})")
    tensors = {}
    for item in snapshot.meta["tensors"]:
        entry = seg.TensorEntry.from_dict(item)
        dtype = getattr(torch, entry.dtype)
        if not entry.nbytes:
            tensors[entry.name] = torch.empty(entry.shape, dtype=dtype, device=device)
            continue
        tensors[entry.name] = payload[entry.offset : entry.offset + entry.nbytes].view(dtype).view(entry.shape)
    return tensors


def _gather_steps(trainer: Trainer, steps: list[int]) -> list[set[int]]:
    """Every rank's ``steps`` (at most MAX_CANDIDATES of them), in rank order. Collective."""
    mine = sorted(steps, reverse=True)[:MAX_CANDIDATES]
    if trainer.world_size == 1:
        return [set(mine)]
    local = torch.full((MAX_CANDIDATES,), -1, dtype=torch.int64)
    local[: len(mine)] = torch.tensor(mine, dtype=torch.int64)
    everyone = torch.empty(MAX_CANDIDATES * trainer.world_size, dtype=torch.int64)
    collectives.all_gather(everyone, local, group=None, timeout_s=trainer.timeout_s)
    return [{int(s) for s in row if s >= 0} for row in everyone.view(trainer.world_size, MAX_CANDIDATES)]


def _all_ranks_ok(trainer: Trainer, ok: bool) -> bool:
    if trainer.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    collectives.all_reduce(flag, group=None, timeout_s=trainer.timeout_s,
                           op=torch.distributed.ReduceOp.MAX)
    return not int(flag.item())


def _newest_common(sets: list[set[int]]) -> int | None:
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def restore_job(trainer: Trainer, address: str | None, *, ckpt_root: str | None = None, token: str | None = None,
                timeout_s: float = 60.0, log: bool = True, kept_step: int | None = None) -> JobRestore:
    """Restores ``trainer`` from the best source every rank shares (see the module docstring). Collective.

    ``address`` is this node's snapshot process (None: snapshots are off, go straight to the checkpoint).
    ``kept_step``: this rank survived the failure with its state intact at this step (``trainer.step``); None for a
    replacement or a survivor that must restore. Raises :class:`SnapshotRestoreError` naming every source tried
    when none works.
    """
    started = time.perf_counter()
    passed_over: list[str] = []
    clock = _ReadClock()
    node: _Node | None = None
    if address is not None:
        try:
            node = _Node(address, trainer.rank, token, timeout_s)
        except (SnapshotProcessLost, ProtocolError, OSError) as error:
            passed_over.append(f"snapshot process at {address}: {error}")
    try:
        node, slots, coded = _node_candidates(node, passed_over)
        result = _keep_survivors(trainer, node, slots, coded, kept_step, passed_over, clock)
        if result is None:
            result = _restore_from_node(trainer, node, slots, coded, passed_over, clock)
    finally:
        if node is not None:
            node.close()
    if result is None:
        result = _restore_from_checkpoint(trainer, ckpt_root, passed_over)
    # What the job trains from here is a new history: the steps after this one that the failed run may have
    # snapshotted (or half persisted) on some node are not its steps, even where their numbers match.
    result.lineage = trainer.start_lineage()
    result.seconds, result.read_seconds = time.perf_counter() - started, clock.seconds
    if log:
        skipped = f"; passed over: {'; '.join(result.passed_over)}" if result.passed_over else ""
        log_line(trainer.rank, result.step, f"restore: source {result.source} ({result.detail}), step "
                                            f"{result.step}, in {result.seconds:.2f} s (reading "
                                            f"{result.read_seconds:.2f} s, loading {result.load_seconds:.2f} s)"
                                            f"{skipped}")
    return result


def _node_candidates(node: _Node | None, passed_over: list[str]) -> tuple[_Node | None, dict[int, str], list[int]]:
    """This rank's sealed slots and complete coded steps (none when the snapshot process is unreachable)."""
    if node is None:
        return None, {}, []
    try:
        return node, node.sealed_slots(passed_over), node.coded_steps()
    except (SnapshotProcessLost, ProtocolError, OSError) as error:
        passed_over.append(f"snapshot process: {error}")
        return None, {}, []


def _keep_survivors(trainer: Trainer, node: _Node | None, slots: dict[int, str], coded: list[int],
                    kept_step: int | None, passed_over: list[str], clock: _ReadClock) -> JobRestore | None:
    """The survivors keep their state and only the other ranks restore ``kept_step`` from their node (collective);
    None when that is not possible for every rank (the caller then restores every rank)."""
    kept = _gather_steps(trainer, [] if kept_step is None else [kept_step])
    steps = set().union(*kept)
    if len(steps) != 1:  # no survivor (every rank restores), or survivors at different steps
        if steps:
            passed_over.append(f"survivors keep their state: they are at different steps {sorted(steps)}")
        return None
    step = steps.pop()
    state, path, source = None, "", KEPT_SOURCE
    # A replacement that never trained is at the initial state, which is step 0's (the model is built from the
    # config's seed, the generators seeded per rank): nothing to read when the survivors are at step 0 too.
    initial = kept_step is None and step == 0 and trainer.step == 0 and trainer.optimizer.step_count == 0
    if initial and not trainer.initialized:  # built for a restore (uninitialized weights): initialize them now
        trainer.reset_to_initial_state()
    if kept_step is None and not initial:
        state, path, source = _read_step(trainer, node, slots, coded, step, passed_over, clock)
    if not _all_ranks_ok(trainer, kept_step is not None or initial or state is not None):
        passed_over.append(f"survivors keep their state: a replacement cannot read step {step}")
        return None
    # Restoring a shard ends with an all-gather of the parameters (collective): the others take part with theirs.
    loading = time.perf_counter()
    if state is not None:
        trainer.restore(state)
    else:
        trainer.optimizer.gather_parameters()
    detail = path or ("the initial state" if initial else "this rank's memory")
    return JobRestore(source=source, step=step, detail=detail, passed_over=passed_over,
                      load_seconds=time.perf_counter() - loading)


@dataclass
class _ReadClock:
    """Seconds spent in :func:`_read_step` during one restore (reported apart from agreeing and loading)."""

    seconds: float = 0.0


def _read_step(trainer: Trainer, node: _Node | None, slots: dict[int, str], coded: list[int], step: int,
               passed_over: list[str], clock: _ReadClock) -> tuple[ShardState | None, str, str]:
    """:func:`_read_from_node`, timed on ``clock``."""
    started = time.perf_counter()
    try:
        return _read_from_node(trainer, node, slots, coded, step, passed_over)
    finally:
        clock.seconds += time.perf_counter() - started


def _read_from_node(trainer: Trainer, node: _Node | None, slots: dict[int, str], coded: list[int], step: int,
                    passed_over: list[str]) -> tuple[ShardState | None, str, str]:
    """This rank's snapshot of ``step``, verified: from its slot, else (no slot, or one that fails its checksum:
    slots are listed by their headers) written back from the node's coded buffer (``ec_rollback``). Returns
    (state, slot path, source); state None when neither serves (reasons appended)."""
    if step in slots:
        state = read_slot(slots[step], trainer.rank, passed_over, trainer.device)
        if state is not None or step not in coded or node is None:
            return state, slots[step], SLOTS_SOURCE
    if step in coded and node is not None:
        try:
            path = node.rollback(step)
            return read_slot(path, trainer.rank, passed_over, trainer.device), path, CODED_SOURCE
        except (SnapshotProcessLost, ProtocolError) as error:
            passed_over.append(f"roll back to step {step}: {error}")
            return None, "", CODED_SOURCE
    passed_over.append(f"step {step}: not in this rank's slots or its node's coded buffers")
    return None, "", SLOTS_SOURCE


def _restore_from_node(trainer: Trainer, node: _Node | None, slots: dict[int, str], coded: list[int],
                       passed_over: list[str], clock: _ReadClock) -> JobRestore | None:
    """Sources 1 and 2 (collective); None when no step is common to every rank. The newest common step is read
    and verified; when that fails on any rank, every rank passes over it and the next common step is tried."""
    failed: set[int] = set()
    while True:
        usable = [s for s in slots if s not in failed]
        step = _newest_common(_gather_steps(trainer, usable))
        if step is None:
            step = _newest_common(_gather_steps(trainer, usable + [s for s in coded if s not in failed]))
        if step is None:
            passed_over.append("no snapshot step is held by every rank, in slots or erasure-coded buffers")
            return None
        state, path, source = _read_step(trainer, node, slots, coded, step, passed_over, clock)
        if _all_ranks_ok(trainer, state is not None):
            assert state is not None
            passed_over += [f"step {s}: newer than what every rank holds" for s in slots if s > step and s not in failed]
            loading = time.perf_counter()
            trainer.restore(state)
            return JobRestore(source=source, step=step, detail=path, passed_over=passed_over,
                              load_seconds=time.perf_counter() - loading)
        passed_over.append(f"step {step} could not be read on every rank")
        failed.add(step)


def _restore_from_checkpoint(trainer: Trainer, ckpt_root: str | None, passed_over: list[str]) -> JobRestore:
    """Source 3 (collective inside ``restore_trainer``)."""
    reasons = "; ".join(passed_over) or "no snapshot"
    if not ckpt_root:
        raise SnapshotRestoreError(f"rank {trainer.rank}: no in-memory snapshot to restore ({reasons}); restore "
                                   f"from {FALLBACK} instead (give a checkpoint root)")
    try:
        loaded = restore_trainer(trainer, "latest", root=ckpt_root)
    except CheckpointError as error:
        raise SnapshotRestoreError(f"rank {trainer.rank}: no in-memory snapshot ({reasons}) and the checkpoint "
                                   f"fallback under {ckpt_root} failed too: {error}") from error
    return JobRestore(source=CHECKPOINT_SOURCE, step=trainer.step, detail=str(loaded.path), passed_over=passed_over)


__all__ = ["JobRestore", "restore_job", "read_slot", "CHECKPOINT_SOURCE", "CODED_SOURCE", "KEPT_SOURCE",
           "SLOTS_SOURCE"]
