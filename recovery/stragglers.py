"""Straggler detection: which rank the others keep waiting for.

In a synchronous job every rank's step takes as long as the slowest rank's, so step times cannot tell the
straggler. What differs is how each rank spends its step: the others wait for the straggler in the collectives, the
straggler hardly waits at all. :class:`StragglerMonitor` (a ``StateSink``) takes each rank's *busy time* per step, its
step's wall time minus the time it was blocked waiting for peers (``comm.collectives.blocked_seconds``: collective
waits, and reading the reduced loss back from the GPU), gathers the sums of ``window`` steps from every rank, and
names a rank whose busy time exceeds the median of the others' by more than ``margin``.

What it sees: a rank whose host is slow (a sleeping or CPU-starved process, a slow data loader, the chaos harness's
``slow-rank``), on every backend, and on CPU (gloo) slow compute too. A GPU whose kernels run slowly is not told
apart yet: every rank's host then waits for the GPUs about as long (that needs CUDA-event timings of the compute
stream).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from regrow.comm import collectives
from regrow.recovery.eviction import RankEviction
from regrow.trainer.log import log_line
from regrow.trainer.state import ShardState


@dataclass(kw_only=True)
class StragglerConfig:
    """Settings of :class:`StragglerMonitor`; validated, errors name the field."""

    window: int = 10
    """Steps per comparison: every rank's busy time is summed over this many steps and gathered at the window's
    last step (one small all-gather per window). A straggler is named at the end of the first window it is slow in
    throughout, so at most ``2 * window - 1`` steps after it starts."""
    margin: float = 0.5
    """A rank is a straggler when its busy time over a window exceeds ``(1 + margin)`` times the median of the other
    ranks' (0.5: half as busy again as the others)."""

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"StragglerConfig.window={self.window!r} must be a whole number of steps >= 1")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"StragglerConfig.margin={self.margin!r} must be a finite number > 0 (0.5: a rank "
                             "half as busy again as the median of the others)")


@dataclass(frozen=True)
class Straggler:
    """A rank named slow at the end of a window (the same on every rank: they all gathered the same timings)."""

    rank: int
    first_step: int
    """The window's first step."""
    step: int
    """The window's last step, where it was named."""
    busy_s: float
    """The straggler's busy seconds per step over the window."""
    others_s: float
    """The median of the other ranks' busy seconds per step."""

    @property
    def ratio(self) -> float:
        return self.busy_s / self.others_s if self.others_s > 0 else math.inf

    def to_dict(self) -> dict:
        return {"rank": self.rank, "first_step": self.first_step, "step": self.step, "busy_s": round(self.busy_s, 6),
                "others_s": round(self.others_s, 6), "ratio": round(self.ratio, 3)}


def find_stragglers(busy: list[float], margin: float) -> list[tuple[int, float]]:
    """The ranks (with the others' median) whose ``busy`` time exceeds ``(1 + margin)`` times the median of the other
    ranks'. None with fewer than two ranks: one rank has no peers to be slower than."""
    found = []
    for rank, mine in enumerate(busy):
        others = statistics.median(busy[:rank] + busy[rank + 1 :]) if len(busy) > 1 else None
        if others is not None and mine > (1 + margin) * others:
            found.append((rank, others))
    return found


class StragglerEvicted(RankEviction):
    """Raised on every rank by :func:`evict` when a straggler is to be replaced (under the Ray coordinator with a
    standby): the job heals as after the rank's death."""

    def __init__(self, straggler: Straggler) -> None:
        super().__init__(f"straggler: rank {straggler.rank} was busy {straggler.ratio:.2f}x the others' median in "
                         f"steps {straggler.first_step}-{straggler.step}; replacing it", (straggler.rank,))
        self.straggler = straggler


def evict(straggler: Straggler) -> None:
    """An ``on_straggler`` callback that has the straggler replaced (raises :class:`StragglerEvicted`)."""
    raise StragglerEvicted(straggler)


class StragglerMonitor:
    """A ``StateSink`` that names stragglers (module docstring). Collective at the end of every window: list it on
    every rank of the job. ``on_straggler`` is called on every rank with each straggler found (the launcher's
    record, or a replacement); rank 0 also logs it."""

    def __init__(self, config: StragglerConfig, *, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, start_step: int = 0,
                 on_straggler: Callable[[Straggler], None] | None = None) -> None:
        self.config = config
        self.rank, self.world_size, self.device, self.timeout_s = rank, world_size, device, timeout_s
        self.on_straggler = on_straggler
        self._busy = 0.0
        self._window_start = start_step + 1
        self._mark()

    def _mark(self) -> None:
        self._wall, self._blocked = time.perf_counter(), collectives.blocked_seconds()

    def before_optimizer_step(self) -> None:
        pass

    def after_step(self, state: ShardState) -> None:
        self._busy += (time.perf_counter() - self._wall) - (collectives.blocked_seconds() - self._blocked)
        if (state.step - self._window_start + 1) >= self.config.window and self.world_size > 1:
            self._compare(state.step)
        self._mark()  # after the gather: its own wait is not the next window's

    def close(self) -> None:
        pass

    def _compare(self, step: int) -> None:
        steps = step - self._window_start + 1
        mine = torch.tensor([self._busy / steps], dtype=torch.float64, device=self.device)
        every = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        collectives.all_gather(every, mine, group=None, timeout_s=self.timeout_s)
        busy = every.tolist()
        for rank, others in find_stragglers(busy, self.config.margin):
            straggler = Straggler(rank=rank, first_step=self._window_start, step=step, busy_s=busy[rank],
                                  others_s=others)
            if self.rank == 0:
                log_line(self.rank, step, f"straggler: rank {rank} was busy {straggler.busy_s:.3f} s per step in "
                                          f"steps {straggler.first_step}-{step}, {straggler.ratio:.2f}x the "
                                          f"others' median {others:.3f} s (margin {self.config.margin:g})")
            if self.on_straggler is not None:
                self.on_straggler(straggler)
        self._busy, self._window_start = 0.0, step + 1
