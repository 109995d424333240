"""Sinks that run inside the Ray worker actors of the coordinator tests (importable as
``regrow.tests.ray_workers``, so Ray sends these functions by reference)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from regrow.launch.chaos.injector import FaultInjector
from regrow.trainer.state import ShardState, StateSink

HANG_ENV = "REGROW_TEST_HANG"
"""``rank:step:marker_path``: that rank hangs (sleeps) before the optimizer step of that step, once."""


class HangOnce:
    """Blocks forever right before the optimizer step of ``step`` (as a rank stuck in a collective would), the
    first time only: the marker file records that it hung."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step = step
        self.marker = marker
        self.last = 0

    def after_step(self, state: ShardState) -> None:
        self.last = state.step

    def before_optimizer_step(self) -> None:
        if self.last + 1 == self.step and not self.marker.exists():
            self.marker.write_text("hung\n")
            while True:
                time.sleep(1)

    def close(self) -> None:
        pass


HOLD_ENV = "REGROW_TEST_HOLD"
"""``step:dir``: every rank waits before that step's optimizer step until ``dir/release`` exists (after writing
``dir/holding-<rank>``), so a test can act on the cluster at a known step; once released it never waits again."""


class HoldAt:
    """Holds the rank before the optimizer step of ``step`` until the test releases it (see :data:`HOLD_ENV`)."""

    def __init__(self, rank: int, step: int, folder: Path) -> None:
        self.rank = rank
        self.step = step
        self.folder = folder
        self.last = 0

    def after_step(self, state: ShardState) -> None:
        self.last = state.step

    def before_optimizer_step(self) -> None:
        release = self.folder / "release"
        if self.last + 1 == self.step and not release.exists():
            (self.folder / f"holding-{self.rank}").write_text("holding\n")
            while not release.exists():
                time.sleep(0.05)

    def close(self) -> None:
        pass


def worker_sinks(rank: int) -> list[StateSink]:
    """The fault injector of the launcher's plan (REGROW_FAULTS) and, for the hang test, :class:`HangOnce`."""
    sinks: list[StateSink] = []
    injector = FaultInjector.from_env(rank)
    if injector is not None:
        sinks.append(injector)
    hold = os.environ.get(HOLD_ENV)
    if hold:
        step, folder = hold.split(":", 1)
        sinks.append(HoldAt(rank, int(step), Path(folder)))
    hang = os.environ.get(HANG_ENV)
    if hang:
        target, step, marker = hang.split(":", 2)
        if int(target) == rank:
            sinks.append(HangOnce(int(step), Path(marker)))
    return sinks


CKPT_ENV = "REGROW_TEST_CKPT"
"""A folder: :func:`checkpoint_sinks` saves a universal checkpoint there every 2 steps."""


def checkpoint_sinks(rank: int) -> list[StateSink]:
    """:func:`worker_sinks`, after a ``CheckpointWriter`` saving every 2 steps under ``$REGROW_TEST_CKPT`` (if set;
    its world size is the process group's, so it follows an elastic shrink)."""
    from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig

    root = os.environ.get(CKPT_ENV)
    writer = [CheckpointWriter(WriterConfig(root=root, save_every=2, keep_last=2, fsync=False, when_busy="wait"),
                               rank=rank)] if root else []
    return writer + worker_sinks(rank)


DIE_IN_RECOVERY_ENV = "REGROW_TEST_DIE_IN_RECOVERY"
"""``rank:marker_path``: that rank's process dies the first time its sinks are built after a restore (a failure
during the recovery itself)."""


def sinks_dying_in_recovery(rank: int) -> list[StateSink]:
    """:func:`worker_sinks`, except that the rank named by ``REGROW_TEST_DIE_IN_RECOVERY`` kills its own process
    the first time it is prepared after a failure (the fault plan's marker directory has a fired fault by then)."""
    target, marker = os.environ[DIE_IN_RECOVERY_ENV].split(":", 1)
    fired_dir = os.environ.get("REGROW_FAULTS_DIR", "")
    if int(target) == rank and faults_fired(fired_dir) and not Path(marker).exists():
        Path(marker).write_text("died during recovery\n")
        os.kill(os.getpid(), 9)
    return worker_sinks(rank)


def faults_fired(fired_dir: str) -> bool:
    return bool(fired_dir) and any(Path(fired_dir).glob("fault-*.fired"))
