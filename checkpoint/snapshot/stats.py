"""What a rank's snapshots cost and did, kept in bounded memory however long the run: the steps sealed and skipped,
and on a GPU with the copier process the two times that say whether a snapshot every step is hidden.

- ``copy_ms``: the GPU time of one device-to-host copy of the shard (CUDA events around it on the copier's stream).
- ``wait_ms``: how long the rank's optimizer step waited for that copy on the GPU (timing events on the compute
  stream around its wait for the copier's "done"). Zero while the copy fits between one optimizer step and the next;
  otherwise it is the copy time the step could not hide: the floor of a snapshot every step on this machine.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field

RECENT = 4096
"""Steps and times kept (the newest): enough for a benchmark's medians, bounded for a run of millions of steps."""


def _recent() -> collections.deque:
    return collections.deque(maxlen=RECENT)


@dataclass
class SnapshotStats:
    """Counts since the sink started, and the newest :data:`RECENT` steps and times."""

    sealed: int = 0
    skipped: int = 0
    sealed_steps: collections.deque[int] = field(default_factory=_recent)
    skipped_steps: collections.deque[int] = field(default_factory=_recent)
    copy_ms: collections.deque[float] = field(default_factory=_recent)
    wait_ms: collections.deque[float] = field(default_factory=_recent)

    def on_sealed(self, step: int, copy_ms: float | None = None) -> None:
        self.sealed += 1
        self.sealed_steps.append(step)
        if copy_ms is not None:
            self.copy_ms.append(copy_ms)

    def on_skipped(self, step: int) -> None:
        self.skipped += 1
        self.skipped_steps.append(step)

    def on_waited(self, wait_ms: float) -> None:
        self.wait_ms.append(wait_ms)

    @property
    def last_step(self) -> int | None:
        """The newest step sealed or skipped (None before any)."""
        return max((d[-1] for d in (self.sealed_steps, self.skipped_steps) if d), default=None)

    def summary(self) -> str:
        """One line: counts, and the medians of the times where there are any (``copy 44.8 ms median``)."""
        parts = [f"{self.sealed} sealed", f"{self.skipped} skipped (both slots held)"]
        if self.copy_ms:
            parts.append(f"copy {statistics.median(self.copy_ms):.2f} ms median on the GPU")
        if self.wait_ms:
            parts.append(f"optimizer steps waited {statistics.median(self.wait_ms):.2f} ms median for it")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """The counts and medians as JSON values (None where nothing was timed)."""

        def median(values: collections.deque[float]) -> float | None:
            return round(statistics.median(values), 3) if values else None

        return {"sealed": self.sealed, "skipped": self.skipped, "copy_ms_median": median(self.copy_ms),
                "wait_ms_median": median(self.wait_ms), "timed": len(self.copy_ms)}
