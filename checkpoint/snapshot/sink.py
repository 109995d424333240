"""The rank side of in-memory snapshots: a ``StateSink`` that snapshots every step into the node's shared memory.

Who copies (``SnapshotSinkConfig.copier``). On a GPU the rank's copier process does (``copier.py``; the rank's end
is ``copier_link.CopierWriter``): after each optimizer step this sink records an IPC event and sends one small
message (the copy starts); once the next forward is queued it digests the shard on a side stream and sends the
step's metadata; before the next update it makes the compute stream wait for the copier's event. The slot choice,
the copy, the seal and the COMMIT are the copier's (measured: the copy costs about 1% of a step from another
process, 12-16% from this one). On CPU, or where the copier cannot
take the shard, this sink copies itself, as follows.

:class:`SnapshotSink` attaches to the node's snapshot process (``checkpoint/node/``), maps its rank's two segments and
alternates between them. ``after_step(state)`` of step N clears the ``complete`` flag of the segment that does NOT
hold the newest snapshot, writes the metadata (step, RNG states, data cursor, tokens seen, layout, tensor table) and
starts the copy of the shard tensors into it with ``hostcopy.HostCopier`` (its ``allocate`` returns tensors that
view the mapped segment: a thread on CPU, a side stream on GPU), so the copy overlaps step N+1's forward and
backward. The payload checksum (WordSum-128, ``wordsum.py``) is computed without reading the payload on the host
where possible: on CUDA with triton, each source tensor is digested on the copy's side stream right before its copy
(``wordsum_triton.digest_cuda``, ``HostCopier.start(summarize=...)``), and the 16-byte results arrive with the copy;
on CPU (or CUDA without triton) each tensor's bytes in the segment are digested on the host as their copy lands. A
finisher thread, started at once, waits for the copy (and the host digests), combines the per-tensor digests by
offset, sets the ``complete`` flag last and sends COMMIT, all during that forward and backward.
``before_optimizer_step()`` waits for the copy (on GPU only the compute stream waits). The newest complete snapshot
is never overwritten, so one always exists.

Reading a snapshot back is ``read.py``'s (and :func:`state_from_snapshot`'s, here); which one a job restores is the
recovery tier's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from regrow.checkpoint.hostcopy import HostCopier, HostCopierConfig, HostCopy, Summarize
from regrow.checkpoint.rng import decode_rng, encode_rng
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot import wordsum
from regrow.checkpoint.snapshot.copier_link import CopierWriter
from regrow.checkpoint.snapshot.mapped import MappedSegment
from regrow.checkpoint.snapshot.protocol import SnapshotClient, SnapshotProcessLost
from regrow.checkpoint.snapshot.stats import SnapshotStats
from regrow.trainer.checks import require_ints
from regrow.trainer.log import log_line
from regrow.trainer.state import ShardState
from regrow.trainer.zero.layout import FlatLayout

COPIERS = ("auto", "process", "thread")
MAX_RESHARES = 3
"""Times the shard's tensors may move (and be shared with the copier again) before the sink copies itself."""


@dataclass(kw_only=True)
class SnapshotSinkConfig:
    """Settings of :class:`SnapshotSink`. Validated on construction; errors name the field."""

    address: str
    """host:port of this node's snapshot process (the launcher passes it)."""
    token: str | None = None
    """The job's snapshot token; None reads ``REGROW_SNAPSHOT_TOKEN`` (set by the launcher)."""
    every: int = 1
    """Snapshot after every this many optimizer steps."""
    timeout_s: float = 60.0
    """Seconds any request to the snapshot process, or the wait for a finisher, may take."""
    meta_headroom: int = 64 << 10
    """Bytes of metadata room beyond twice the first snapshot's metadata (RNG states and the cursor grow little)."""
    log: bool = True
    """Print ``[rank r, step s] snapshot ...`` lines on attach and restore."""
    copier: str = "auto"
    """Who copies the shard into the segments. ``"process"``: a copier process per rank (``copier.py``), started
    by the sink; the training process only records an event and sends one message per snapshot (measured: the
    copy costs the step about 1% instead of 16% on one H100). ``"thread"``: the training process itself, on a side
    stream (CUDA) or a thread (CPU). ``"auto"``: ``"process"`` for a shard on CUDA, ``"thread"`` on CPU; it falls
    back to ``"thread"``, saying why, where the shard's memory cannot be shared over CUDA IPC."""

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or ":" not in self.address:
            raise ValueError(f"SnapshotSinkConfig.address={self.address!r} must be host:port")
        require_ints(self, {"every": 1, "meta_headroom": 0})
        if not self.timeout_s > 0:
            raise ValueError(f"SnapshotSinkConfig.timeout_s={self.timeout_s!r} must be > 0")
        if self.copier not in COPIERS:
            raise ValueError(f"SnapshotSinkConfig.copier={self.copier!r} must be one of {', '.join(COPIERS)}")


def uses_copier(config: SnapshotSinkConfig, *, on_cuda: bool) -> bool:
    """Whether a shard on CUDA (or not) is copied by the copier process under ``config.copier``."""
    return config.copier == "process" or (config.copier == "auto" and on_cuda)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_table(tensors: dict[str, torch.Tensor]) -> list[dict]:
    """The ATTACH tensor table of a shard: name, dtype, shape, in the shard's order."""
    return [{"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()]


def state_meta(state: ShardState, entries: list[seg.TensorEntry]) -> dict:
    """Everything but the tensor bytes, as the JSON stored in a segment (enough to rebuild the ShardState)."""
    rng_meta, rng_blob = encode_rng(state.rng)
    return {"format": seg.FORMAT_VERSION, "rank": state.rank, "step": state.step,
            "tensors": [e.to_dict() for e in entries], "layout": state.layout,
            "rng": {"meta": rng_meta, "blob": base64.b64encode(rng_blob).decode()},
            "data_cursor": dict(state.data_cursor), "tokens_seen": state.tokens_seen, "extra": state.extra}


def state_from_snapshot(snapshot: seg.Snapshot, tensors: dict[str, torch.Tensor] | None = None) -> ShardState:
    """Rebuilds the ShardState held by a verified snapshot: its tensors copied out of the segment into host memory,
    or ``tensors`` when the caller has already made them (e.g. on the GPU)."""
    meta = snapshot.meta
    if tensors is not None:
        return _state(meta, tensors)
    tensors = {}
    for item in meta["tensors"]:
        entry = seg.TensorEntry.from_dict(item)
        dtype = getattr(torch, entry.dtype)
        tensor = torch.empty(entry.shape, dtype=dtype)
        # Copied byte for byte (the mapping is read-only, and torch has no read-only tensors).
        memoryview(tensor.view(torch.uint8).reshape(-1).numpy())[:] = \
            snapshot.payload[entry.offset : entry.offset + entry.nbytes]
        tensors[entry.name] = tensor
    return _state(meta, tensors)


def _state(meta: dict, tensors: dict[str, torch.Tensor]) -> ShardState:
    rng = decode_rng(meta["rng"]["meta"], base64.b64decode(meta["rng"]["blob"]))
    # Through FlatLayout so the dict compares equal to the trainer's (JSON turned its tuples into lists).
    layout = FlatLayout.from_dict(meta["layout"]).to_dict()
    return ShardState(step=meta["step"], tensors=tensors, layout=layout, rank=meta["rank"], rng=rng,
                      data_cursor=meta["data_cursor"], tokens_seen=meta["tokens_seen"], extra=meta.get("extra", {}))


@dataclass
class _Pending:
    segment: MappedSegment
    step: int
    copy: HostCopy
    gpu_digests: bool
    """True when ``copy.summaries`` holds each tensor's GPU digest; False: the finisher digests on the host."""
    finisher: threading.Thread | None = None
    mutation_waited: bool = False
    error: BaseException | None = field(default=None)


def gpu_summarize(state: ShardState, rank: int, *, log: bool) -> Summarize | None:
    """``wordsum_triton.digest_cuda`` as HostCopier's ``summarize`` when the shard is on CUDA and triton imports;
    None otherwise (the finisher then digests on the host, and says so once when on CUDA)."""
    if not any(t.is_cuda for t in state.tensors.values()):
        return None
    try:  # triton is only installed where CUDA is
        from regrow.checkpoint.snapshot import wordsum_triton
    except ImportError as error:
        if log:
            log_line(rank, state.step, f"snapshot: triton is not importable ({error}): the payload checksum runs "
                                       f"on the host after each copy, slowing training; install triton to compute "
                                       f"it on the GPU")
        return None
    return lambda name, source: wordsum_triton.digest_cuda(source)


def _assemble_gpu_digests(pending: _Pending) -> wordsum.Digest:
    """The payload digest from the per-tensor GPU digests (int64 pairs, landed with the copy): no payload byte is
    read."""
    entries = pending.segment.entries
    return wordsum.assemble((entries[name].offset, wordsum.Digest.from_int64(*result.tolist()))
                            for name, result in pending.copy.summaries.items())


class SnapshotSink:
    """Snapshots this rank's shard into the node's shared memory every ``every`` steps; satisfies ``StateSink``.

    Contract: construct on each rank (it connects and authenticates; it attaches at the first snapshot, or call
    :meth:`attach` to fail early) and pass it to the ``Trainer``. The newest sealed snapshot is never overwritten.
    A lost snapshot process raises :class:`SnapshotProcessLost` from the next sink call.
    """

    Config = SnapshotSinkConfig

    def __init__(self, config: SnapshotSinkConfig, *, rank: int) -> None:
        self.config = config
        self.rank = rank
        self.client = SnapshotClient(config.address, token=config.token, timeout_s=config.timeout_s)
        self.segments: list[MappedSegment] = []
        self._copiers: list[HostCopier] = []
        self._newest: int | None = None  # slot of the newest sealed snapshot
        self._pending: _Pending | None = None
        self._deferred: ShardState | None = None  # CUDA: a snapshot whose copy starts at after_forward
        self._held: frozenset[int] = frozenset()  # slots the snapshot process holds (ATTACH and COMMIT replies)
        self.stats = SnapshotStats()
        """Steps sealed and skipped; with the copier, the copy's GPU time and the updates' wait for it."""
        self._summarize: Summarize | None = None  # the GPU digest, when the shard is on CUDA and triton imports
        self._entries: dict[str, seg.TensorEntry] = {}
        self._paths: list[str] = []
        self._reshared = 0  # times the shard's tensors moved and were shared with the copier again
        # An OrderedDict: torch's RemovableHandle keeps a weak reference to it.
        self._copy_hooks: OrderedDict[int, Callable[[int], None]] = OrderedDict()
        # The copier process, started now when it will be used, so that its start overlaps the model's build.
        self._writer: CopierWriter | None = None
        if uses_copier(config, on_cuda=torch.cuda.is_available()):
            self._writer = CopierWriter(rank=rank, address=config.address, token=config.token,
                                        timeout_s=config.timeout_s, on_sealed=self._on_sealed,
                                        on_skipped=self.stats.on_skipped, on_waited=self.stats.on_waited)

    def register_copy_hook(self, hook: Callable[[int], None]) -> RemovableHandle:
        """Calls ``hook(step)`` while the snapshot of ``step`` is being copied: copying here, from the finisher
        thread as it starts (the slot's metadata written and its ``complete`` flag cleared, the payload not yet
        sealed); with the copier process, from the training thread right after handing the snapshot over. Fault
        injection kills a rank there. Returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._copy_hooks)
        self._copy_hooks[handle.id] = hook
        return handle

    def _copying(self, step: int) -> None:
        for hook in list(self._copy_hooks.values()):
            hook(step)

    def _on_sealed(self, step: int, slot: int, held: frozenset[int], copy_ms: float | None = None) -> None:
        self._newest, self._held = slot, held
        self.stats.on_sealed(step, copy_ms)

    def attach(self, state: ShardState, *, restored_from: str | None = None) -> None:
        """ATTACHes with ``state``'s tensor table (segments are created, or found again after a restart) and maps
        the two segments. ``restored_from``: the segment path ``state`` was just restored from, which is kept (the
        other slot is written first). Raises with the snapshot process's reason (e.g. /dev/shm too small)."""
        table = tensor_table(state.tensors)
        entries, _ = seg.plan_tensors(table)
        meta_size = len(json.dumps(state_meta(state, entries)))
        # The state's step and source let the process forget this rank's commits of an abandoned history.
        reply = self.client.request({"op": "attach", "rank": self.rank, "tensors": table, "step": state.step,
                                     "restored_from": restored_from,
                                     "meta_capacity": 2 * meta_size + self.config.meta_headroom})
        self._held = frozenset(reply.get("held", ()))
        self._entries = {e.name: e for e in entries}
        self._paths = list(reply["paths"])
        on_cuda = any(t.is_cuda for t in state.tensors.values())
        if self._writer is not None and not uses_copier(self.config, on_cuda=on_cuda):
            self._writer.close()  # a CPU shard: the training process copies (see SnapshotSinkConfig.copier)
            self._writer = None
        same = self._writer is None and [s.path for s in self.segments] == reply["paths"] and all(
            s.entries == {e.name: e for e in entries} for s in self.segments)
        if self._writer is not None:
            self.detach()
        elif not same:  # a first attach, or other segments: map them (a re-attach after a restore keeps its mappings)
            self.detach()
            self.segments = [MappedSegment(path, entries) for path in reply["paths"]]
            # One single-slot copier per segment: which segment a copy goes to is this sink's choice (alternation).
            self._copiers = [HostCopier(HostCopierConfig(slots=1), allocate=s.allocate) for s in self.segments]
        self._summarize = gpu_summarize(state, self.rank, log=self.config.log)
        # Headers only: which slot to keep is decided by step; whoever restores from it verifies it.
        slots = self.client.request({"op": "latest", "rank": self.rank, "verify": False})["slots"]
        # A slot may hold a step past ``state.step`` from the run that crashed, or one from another history at the
        # same step: only the slot the state was restored from, or a slot older than the state, is kept; the other
        # is overwritten first.
        kept = [s for s in slots if s["status"] == "ok"
                and (s["step"] < state.step or (s["step"] == state.step and s["path"] == restored_from))]
        latest = max(kept, key=lambda s: s["step"]) if kept else None
        self._newest = latest["slot"] if latest else None
        if self._writer is not None:
            self._attach_writer(state, reply["paths"], entries)
        if self.config.log:
            found = f"; keeping its snapshot of step {latest['step']}" if latest else ""
            log_line(self.rank, state.step, f"snapshot: attached to {self.config.address} "
                                            f"({'existing' if reply['reused'] else 'new'} segments of "
                                            f"{reply['segment_bytes'] / 2**20:.1f} MiB){found}")

    def _snapshot_by_copier(self, state: ShardState) -> bool:
        """Hands step ``state.step`` to the copier process; False when this sink copies it itself from now on."""
        assert self._writer is not None
        if not self._writer.attached:
            self.attach(state)
        elif not self._writer.shares(state.tensors):
            # The copier reads the memory shared at ATTACH. A tensor that moved (say, a user loop's state rebuilt
            # every step) is shared again; one that keeps moving makes this process copy instead.
            self._reshared += 1
            if self._reshared > MAX_RESHARES:
                self._copy_here(state, f"the shard's tensors moved {self._reshared} times (a user loop's state "
                                       f"rebuilt every step?), and the copier reads fixed memory")
            else:
                self.attach(state)
        if self._writer is None:
            return False
        entries = [self._entries[name] for name in state.tensors]
        self._writer.start(state.step, lambda: state_meta(state, entries))
        return True

    def _copy_here(self, state: ShardState, why: str) -> None:
        """Closes the copier and copies from this process from now on, saying why."""
        log_line(self.rank, state.step, f"snapshot: {why}; copying from the training process instead")
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        entries = sorted(self._entries.values(), key=lambda e: e.offset)
        self.segments = [MappedSegment(path, entries) for path in self._paths]
        self._copiers = [HostCopier(HostCopierConfig(slots=1), allocate=s.allocate) for s in self.segments]

    def _attach_writer(self, state: ShardState, paths: list[str], entries: list[seg.TensorEntry]) -> None:
        """Hands the segments and the shard to the copier process. With ``copier="auto"``, a copier that cannot
        take them (CUDA IPC unavailable for this memory, a driver that refuses the handles, a copier that failed
        to start) is reported and this process copies instead; with ``copier="process"`` it is raised."""
        assert self._writer is not None
        try:
            self._writer.attach(state.tensors, paths=paths, entries=[e.to_dict() for e in entries],
                                newest=self._newest, held=self._held)
        except Exception as error:
            if self.config.copier == "process":
                raise
            self._copy_here(state, f"the copier process cannot take the shard ({type(error).__name__}: {error})")

    # ---------------------------------------------------------------- the StateSink protocol
    def after_step(self, state: ShardState) -> None:
        """Takes the snapshot of step ``state.step`` (every ``every`` steps) without waiting for it. With the copier
        process, it is handed over now. Copying here: on CPU the copy starts now, on a thread; on CUDA it starts in
        :meth:`after_forward`, so that it overlaps the backward only: a 0.6 GB copy issued by this process during
        the forward slowed the step by 13% on the 4-GPU host (the forward's kernel launches slowed down), against
        2% when it overlapped the backward."""
        if state.step % self.config.every:
            return
        if self._writer is not None and self._snapshot_by_copier(state):
            self._copying(state.step)
            return
        self.after_forward()  # a snapshot still deferred (no step ran in between) is started, then finished
        self._finish()
        if not self.segments:
            self.attach(state)
        if any(t.is_cuda for t in state.tensors.values()):
            self._deferred = state
        else:
            self._start(state)

    def after_forward(self) -> None:
        """Called once per step after the first micro-batch's forward: hands the copier the last snapshot's digest
        and metadata (``CopierWriter.hand_over``), or starts the copy :meth:`after_step` deferred."""
        if self._writer is not None:
            self._writer.hand_over()
        if self._deferred is not None:
            state, self._deferred = self._deferred, None
            self._start(state)

    def before_optimizer_step(self) -> None:
        """Waits for the copy of the last snapshot (CUDA: only the compute stream waits); the finisher thread seals
        it (checksum, complete flag last, COMMIT) on its own. Starts the copy first if no forward started it."""
        if self._writer is not None:
            self._writer.wait_before_mutation()
            return
        self.after_forward()
        pending = self._pending
        if pending is None or pending.mutation_waited:
            return
        pending.copy.wait_before_mutation()
        pending.mutation_waited = True

    before_update = before_optimizer_step  # which the trainers call here, after the gradient norm, instead

    def _target(self) -> int | None:
        """The slot to write: the older one, unless the snapshot process holds it (then the newest is rewritten,
        the held one staying complete); None when both are held (the snapshot is skipped)."""
        held = self._held
        preferred = 1 - self._newest if self._newest is not None else 0
        for slot in (preferred, 1 - preferred):
            if slot not in held:
                return slot
        return None

    def _start(self, state: ShardState) -> None:
        """Writes the metadata into the older segment and starts copying ``state``'s tensors into it; a finisher
        thread seals it."""
        target = self._target()
        if target is None:
            self.stats.on_skipped(state.step)
            return
        segment = self.segments[target]
        entries = [segment.entries[name] for name in state.tensors]
        seg.begin(segment.buffer, state_meta(state, entries))
        segment.clear_gaps()
        copy = self._copiers[target].start(state.tensors, summarize=self._summarize)
        assert copy is not None, "the target segment's copier is free: its previous copy was finished"
        pending = self._pending = _Pending(segment=segment, step=state.step, copy=copy,
                                           gpu_digests=self._summarize is not None)
        pending.finisher = threading.Thread(target=self._seal, args=(pending,), daemon=True,
                                            name=f"regrow-snapshot-seal-step{pending.step}")
        pending.finisher.start()

    def flush(self) -> None:
        """Starts a snapshot still waiting for a forward and returns once the last snapshot is sealed and
        committed (e.g. before a planned stop); training may go on afterwards."""
        if self._writer is not None:
            self._writer.flush()
            return
        self.before_optimizer_step()
        self._finish()

    def close(self) -> None:
        """Seals the snapshot in flight, unmaps the segments (unregistering them from CUDA: a later mapping at the
        same address, by another sink of this process, would otherwise fail to register) and disconnects. The
        segments stay with the snapshot process. Logs :attr:`stats` (``snapshot: ... sealed ...``)."""
        try:
            self.flush()
            if self.config.log and self.stats.last_step is not None:
                log_line(self.rank, self.stats.last_step, f"snapshot: {self.stats.summary()}")
        finally:
            try:
                self.detach()
            finally:
                if self._writer is not None:
                    self._writer.close()
                self.client.close()

    def detach(self) -> None:
        """Forgets the mapped segments (the snapshot process keeps them), unregistering them from CUDA. Call before
        dropping a sink whose last snapshot is finished or abandoned; :meth:`attach` maps them again."""
        self._pending = self._deferred = None
        if self._writer is not None:
            self._writer.detach()
        for segment in self.segments:
            segment.unpin()
        self.segments, self._copiers = [], []

    # ---------------------------------------------------------------- sealing
    def _seal(self, pending: _Pending) -> None:
        try:
            self._copying(pending.step)
            if pending.gpu_digests:
                pending.copy.wait_host(self.config.timeout_s)
                payload_digest = _assemble_gpu_digests(pending)
            else:
                payload_digest = self._host_digest(pending)
                pending.copy.wait_host(self.config.timeout_s)
            seg.seal(pending.segment.buffer, step=pending.step, payload_bytes=pending.segment.payload_bytes,
                     payload_digest=payload_digest)
            reply = self.client.request({"op": "commit", "rank": self.rank, "slot": pending.segment.slot,
                                         "step": pending.step})
            self._held = frozenset(reply.get("held", ()))
        except BaseException as error:  # noqa: BLE001 (acted on by the training thread in _finish)
            pending.error = error
        finally:
            pending.copy.release()

    def _host_digest(self, pending: _Pending) -> wordsum.Digest:
        """The payload digest on the host, tensor by tensor as each copy lands, so that digesting the first tensors
        overlaps copying the later ones (the gaps are zero: ``MappedSegment.clear_gaps``)."""
        segment = pending.segment
        payload = memoryview(segment.buffer)[segment.start : segment.start + segment.payload_bytes]
        try:
            parts = []
            for entry in sorted(segment.entries.values(), key=lambda e: e.offset):
                if entry.nbytes:
                    pending.copy.wait_tensor(entry.name, self.config.timeout_s)
                    parts.append((entry.offset, wordsum.digest(payload[entry.offset : entry.offset + entry.nbytes])))
            return wordsum.assemble(parts)
        finally:
            payload.release()

    def _finish(self) -> None:
        """Waits for the previous snapshot to be sealed; raises what sealing it raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if not pending.mutation_waited:  # after_step twice without an optimizer step in between
            pending.copy.wait_before_mutation()
        assert pending.finisher is not None
        pending.finisher.join(self.config.timeout_s)
        if pending.finisher.is_alive():
            raise TimeoutError(f"snapshot of step {pending.step} not sealed after {self.config.timeout_s} s")
        if pending.error is not None:
            raise pending.error
        self._newest = pending.segment.slot
        self.stats.on_sealed(pending.step)


__all__ = [
    "SnapshotProcessLost",
    "SnapshotSink",
    "SnapshotSinkConfig",
    "state_from_snapshot",
    "state_meta",
    "tensor_table",
]
