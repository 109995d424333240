"""State parity: what the ranks must agree on, compared; what must not change between two steps, verified.

Silent data corruption (a flipped bit in device memory, a bad copy) announces nothing: training goes on from a
wrong state. :class:`ParityMonitor` (a ``StateSink``) checks every ``every`` steps, at step ``C``:

- **the shard at rest**: right after step ``C - 1`` (every other sink has read that state) the monitor digests this
  rank's optimizer shard (master weights and Adam state, WordSum-128 on the GPU); right before step ``C``'s update it
  digests the shard again. Nothing may change the shard in between: a different digest names this rank. This is the
  only way to see a corrupted optimizer shard: ZeRO keeps one copy of each element, so no peer holds it to compare.
- **what every rank holds alike**: the working parameters the step's forward and backward used (at ZeRO stages 1 and
  2 every rank holds all of them, all-gathered from the shards), the step, the data cursor and the lineage. The
  ranks all-gather one small digest vector each; a rank outside the majority is named. The parameters are named
  exactly, with two ranks too: each rank also checks that its own slices still hold its master shard's cast (the
  owner's copy is then the reference), and when the digests differ a second round gathers every rank's digest of
  every owner's slices, so the rank holding a wrong copy of some owner's slice is the one named.

It also compares right after a restore (a restored rank must agree with its peers before training goes on).

What it sees: corruption present at a check, that is, of the parameters during step ``C`` and of the shard between
steps ``C - 1`` and ``C``. A defect that keeps corrupting (a bad memory cell, a failing link) shows at the next check;
a single flip at another step is missed (its effect reaches every rank alike through the next all-gather). ``every
= 1`` checks every step. A flip of the shard before the seal of step ``C - 1`` is in that state and its snapshot
too: rolling back further, to before the last check that passed, needs older snapshots than the two a node keeps
(``docs/architecture.md``). A disagreement raises :class:`StateParityError` on every rank before the update: the state
of step ``C - 1`` (whose snapshot every rank's snapshot sink has finished reading) is still good, and the launcher's
restart resumes from it with fresh processes, so the faulty rank is replaced.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from regrow.checkpoint.snapshot import wordsum
from regrow.comm import collectives
from regrow.recovery.eviction import RankEviction
from regrow.trainer.log import log_line
from regrow.trainer.state import ShardState, optimizer_tensors
from regrow.trainer.zero.optimizer import ZeroOptimizer

_FIELDS = ("parameters", "step", "data cursor", "lineage")
"""What the ranks must hold alike, in the order of the gathered vector (after the parameters' two digest words)."""


@dataclass(kw_only=True)
class ParityConfig:
    """Settings of :class:`ParityMonitor`; validated, errors name the field."""

    every: int = 100
    """Check at every step that is a multiple of this (each check digests the shard twice and the parameters once:
    about 7 ms for a 350M-parameter model with 8-bit state on one H100, against a 57 ms step)."""

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"ParityConfig.every={self.every!r} must be a whole number of steps >= 1")


@dataclass(frozen=True)
class Disagreement:
    """One thing the ranks did not agree on at a check: ``what`` (``"shard"``, ``"parameters"``, ``"step"``, ``"data
    cursor"``, ``"lineage"``) and the ranks named."""

    what: str
    ranks: tuple[int, ...]

    def describe(self) -> str:
        ranks = ", ".join(map(str, self.ranks))
        if self.what == "shard":
            return f"the optimizer shard of rank(s) {ranks} changed between steps (corrupted at rest)"
        return f"rank(s) {ranks} disagree with the others on the {self.what}"

    def to_dict(self) -> dict:
        return {"what": self.what, "ranks": list(self.ranks)}


class StateParityError(RankEviction):
    """A parity check found ranks that disagree (raised on every rank, before the step's update); ``ranks`` are the
    ranks named."""

    def __init__(self, step: int, found: Sequence[Disagreement]) -> None:
        self.step = step
        self.found = tuple(found)
        super().__init__(f"state parity check at step {step} failed: {'; '.join(d.describe() for d in found)}. The "
                         f"state after step {step - 1} is the last good one: restart from its snapshot (the local "
                         f"launcher and Ray do so when --max-restarts allows) on fresh processes",
                         tuple({rank for d in self.found for rank in d.ranks}))

    def to_dict(self) -> dict:
        return {"step": self.step, "ranks": list(self.ranks), "found": [d.to_dict() for d in self.found]}


def tensors_digest(tensors: Sequence[torch.Tensor]) -> wordsum.Digest:
    """WordSum-128 of the tensors' bytes laid end to end, each from a 4-byte boundary: on CUDA on the GPU (one
    synchronization for all of them) when triton imports, else on the host."""
    offsets, offset = [], 0
    for tensor in tensors:
        offsets.append(offset)
        offset += (tensor.numel() * tensor.element_size() + 3) // 4 * 4
    kernels = wordsum.gpu_kernels()
    parts: list[wordsum.Digest] = []
    if kernels is not None and tensors and all(t.is_cuda for t in tensors):
        results = torch.zeros(len(tensors), 2, dtype=torch.int64, device=tensors[0].device)
        for index, tensor in enumerate(tensors):
            kernels.digest_cuda(tensor.detach(), results[index])
        parts = [wordsum.Digest.from_int64(a, b) for a, b in results.tolist()]
    else:
        for tensor in tensors:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
            parts.append(wordsum.digest(data, threads=1))
    return wordsum.assemble(zip(offsets, parts, strict=True))


def outliers(values: Sequence[object]) -> tuple[int, ...]:
    """The indices (ranks) whose value differs from a strict majority's; every index when the values differ and no
    value has a strict majority (with two ranks, neither can be told right)."""
    if len(set(values)) <= 1:
        return ()
    value, count = Counter(values).most_common(1)[0]
    if 2 * count <= len(values):
        return tuple(range(len(values)))
    return tuple(i for i, v in enumerate(values) if v != value)


def _signed(word: int) -> int:
    return word - (1 << 64) if word >= 1 << 63 else word


def _hash64(value: object) -> int:
    """A signed 64-bit hash of a JSON-able value (the same on every rank for equal values)."""
    data = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class ParityMonitor:
    """A ``StateSink`` that runs the parity checks (module docstring). Collective at every check over ``optimizer``'s
    group (the ranks whose parameters are the same by construction; ranks are named by their place in it): list it
    on every rank, after the sinks that read each step's state (the snapshot sink, the checkpoint writer) and before
    the fault injector. ``on_mismatch`` is called on every rank with the error before it is raised (the launcher's
    record)."""

    def __init__(self, config: ParityConfig, *, optimizer: ZeroOptimizer, state: ShardState, timeout_s: float,
                 after_restore: bool = False, on_mismatch: Callable[[StateParityError], None] | None = None) -> None:
        """``state``: the rank's state at the step it trains from; ``after_restore``: that state was just restored,
        so the ranks compare it now (collective)."""
        self.config = config
        self.optimizer = optimizer
        self.rank, self.world_size, self.device = optimizer.rank, optimizer.world_size, optimizer.device
        self.timeout_s = timeout_s
        self.on_mismatch = on_mismatch
        self.checks = 0
        self.check_seconds = 0.0
        """Seconds in the checks and in the seals they verify (what the monitor adds to the steps)."""
        self._state = state
        self._seal: wordsum.Digest | None = None
        if after_restore:
            self._check(state.step, shard_ok=True)
            if self.rank == 0:
                log_line(self.rank, state.step, f"parity: the restored state agrees on all {self.world_size} rank(s)")
        self._seal_if_due(state)

    # ------------------------------------------------------------------ the StateSink protocol
    def before_optimizer_step(self) -> None:
        step = self._state.step + 1
        if step % self.config.every:
            return
        shard_ok = self._seal is None or self._shard_digest() == self._seal
        self._seal = None
        self._check(step, shard_ok=shard_ok)

    def after_step(self, state: ShardState) -> None:
        self._state = state
        self._seal_if_due(state)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------
    def _seal_if_due(self, state: ShardState) -> None:
        """Digests the shard when the next step is checked (the seal its verification compares with)."""
        if (state.step + 1) % self.config.every == 0:
            started = time.perf_counter()
            self._seal = self._shard_digest()
            self.check_seconds += time.perf_counter() - started

    def _shard_digest(self) -> wordsum.Digest:
        return tensors_digest(list(optimizer_tensors(self._state.tensors).values()))

    def _gather(self, mine: list[int]) -> list[list[int]]:
        """Every rank's ``mine`` (the same length on every rank), in rank order. Collective."""
        if self.world_size == 1:
            return [mine]
        width = len(mine)
        every = torch.zeros(width * self.world_size, dtype=torch.int64, device=self.device)
        collectives.all_gather(every, torch.tensor(mine, dtype=torch.int64, device=self.device),
                               group=self.optimizer.group, timeout_s=self.timeout_s)
        flat = every.tolist()
        return [flat[r * width : (r + 1) * width] for r in range(self.world_size)]

    def _wrong_parameter_copies(self, own_ok: list[bool]) -> tuple[int, ...]:
        """The ranks holding a wrong copy of the parameters (collective; runs only when the digests differ, every
        rank deciding alike from the same gathered rows): a rank whose own slices no longer hold its master's cast,
        and a rank whose copy of an owner's slices differs from the owner's (from the majority's, where the owner's
        own copy is wrong too)."""
        mine: list[int] = []
        for owner in range(self.world_size):
            digest = tensors_digest(self.optimizer.working_parameters_of(owner))
            mine += [_signed(digest.a), _signed(digest.b)]
        rows = self._gather(mine)
        wrong = {rank for rank, ok in enumerate(own_ok) if not ok}
        for owner in range(self.world_size):
            copies = [tuple(row[2 * owner : 2 * owner + 2]) for row in rows]
            if own_ok[owner]:
                wrong |= {rank for rank, copy in enumerate(copies) if copy != copies[owner]}
            else:
                wrong |= set(outliers(copies))
        return tuple(sorted(wrong)) or tuple(range(self.world_size))

    def _check(self, step: int, *, shard_ok: bool) -> None:
        """Compares this rank's digests with every rank's (collective); raises :class:`StateParityError` on every
        rank when any disagree."""
        started = time.perf_counter()
        params = tensors_digest(self.optimizer.working_parameters())
        state = self._state
        rows = self._gather([_signed(params.a), _signed(params.b), step, _hash64(state.data_cursor),
                             _hash64(state.extra.get("lineage", "")), int(shard_ok),
                             int(self.optimizer.owned_parameters_match_master())])
        found = []
        bad_shards = tuple(rank for rank, row in enumerate(rows) if not row[5])
        if bad_shards:
            found.append(Disagreement("shard", bad_shards))
        params_differ = len({tuple(row[:2]) for row in rows}) > 1
        if params_differ or not all(row[6] for row in rows):
            found.append(Disagreement("parameters", self._wrong_parameter_copies([bool(row[6]) for row in rows])))
        columns = {"step": [row[2] for row in rows], "data cursor": [row[3] for row in rows],
                   "lineage": [row[4] for row in rows]}
        for what in _FIELDS[1:]:
            ranks = outliers(columns[what])
            if ranks:
                found.append(Disagreement(what, ranks))
        self.checks += 1
        self.check_seconds += time.perf_counter() - started
        if not found:
            return
        error = StateParityError(step, found)
        if self.rank == 0:
            log_line(self.rank, step, f"parity: {error}")
        if self.on_mismatch is not None:
            self.on_mismatch(error)
        raise error


__all__ = ["Disagreement", "ParityConfig", "ParityMonitor", "StateParityError", "outliers", "tensors_digest"]
