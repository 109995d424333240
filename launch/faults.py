"""Declarative fault injection: kill a rank, or a whole node, at a given step of a real run.

A fault plan is a list of :class:`Fault`, given on the command line (``--fault kill-rank:1@5 --fault
kill-node:0@9``) and validated against the run before anything starts (a rank, node or step that does not exist is
rejected with the reason). The launcher hands the plan to every rank in ``REGROW_FAULTS`` (JSON) together with a
directory where a rank records a fault as fired before it acts (``REGROW_FAULTS_DIR``): the ranks of a restarted
attempt drop the faults fired in an earlier attempt, so each fault happens once even though the run replays the
steps since its restore point.

Faults act from inside the ranks, through :class:`FaultInjector`, a ``StateSink`` that runs right before the
optimizer step of the target step: listed after the snapshot sink, it fires while the snapshot of the previous
step is still being copied and sealed, the hardest moment for the snapshots (the older buffer must be complete).

- ``kill-rank:R@S``: rank R SIGKILLs itself in step S.
- ``kill-node:N@S``: every rank of node N SIGKILLs the node's snapshot process and then itself in step S (all of
  them send the kill, so it happens whichever rank gets there first): the node's memory is lost, as when a machine
  dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from regrow.launch.nodes import NODE_ENV, PID_ENV
from regrow.trainer.state import ShardState

FAULTS_ENV = "REGROW_FAULTS"
FAULTS_DIR_ENV = "REGROW_FAULTS_DIR"
KINDS = ("kill-rank", "kill-node")
_SYNTAX = re.compile(r"^(?P<kind>[a-z-]+):(?P<target>\d+)@(?P<step>\d+)$")


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` (one of :data:`KINDS`) hits rank or node ``target`` in step ``step``."""

    kind: str
    target: int
    step: int

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """``"kill-rank:1@5"`` -> ``Fault("kill-rank", 1, 5)``; the error shows the expected form."""
        match = _SYNTAX.match(text.strip())
        if match is None or match["kind"] not in KINDS:
            raise ValueError(f"--fault {text!r}: expected KIND:TARGET@STEP with KIND one of {', '.join(KINDS)} "
                             f"(e.g. kill-rank:1@5, kill-node:0@9)")
        return cls(kind=match["kind"], target=int(match["target"]), step=int(match["step"]))

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}@{self.step}"


def plan_problems(faults: list[Fault], *, ranks: int, nodes: int, steps: int) -> list[str]:
    """Every reason the plan cannot run against a job of ``ranks`` ranks on ``nodes`` nodes training ``steps``
    steps (empty: it can)."""
    problems = []
    for fault in faults:
        limit = ranks if fault.kind == "kill-rank" else nodes
        what = "rank" if fault.kind == "kill-rank" else "node"
        if not 0 <= fault.target < limit:
            problems.append(f"--fault {fault}: there is no {what} {fault.target} (the job has {limit} {what}s, "
                            f"0..{limit - 1})")
        if not 1 <= fault.step <= steps:
            problems.append(f"--fault {fault}: step {fault.step} is outside the run (steps 1..{steps})")
    return problems


def plan_env(faults: list[Fault], fired_dir: str) -> dict[str, str]:
    """The environment that carries ``faults`` to the ranks."""
    return {FAULTS_ENV: json.dumps([asdict(f) for f in faults]), FAULTS_DIR_ENV: fired_dir} if faults else {}


def fired(fired_dir: str) -> list[int]:
    """Indices (in the plan) of the faults that have fired."""
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in Path(fired_dir).glob("fault-*.fired"))


def kill_pid(pid: int) -> None:
    """SIGKILLs ``pid``; a process already gone is fine (several ranks of a node kill its snapshot process)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class FaultInjector:
    """The rank side of a fault plan; a ``StateSink`` (list it after the snapshot sink). Built from the
    environment by :meth:`from_env` (None when the launcher gave no plan)."""

    def __init__(self, faults: list[Fault], fired_dir: str, *, rank: int, node: int, snapshot_pid: int | None) -> None:
        self.fired_dir = Path(fired_dir)
        # Faults fired in an earlier attempt stay fired; within this attempt every rank a fault hits acts on it.
        done = set(fired(fired_dir))
        self.faults = {index: fault for index, fault in enumerate(faults) if index not in done}
        self.rank = rank
        self.node = node
        self.snapshot_pid = snapshot_pid
        self.last_step = 0

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjector | None":
        text = os.environ.get(FAULTS_ENV)
        if not text:
            return None
        faults = [Fault(**item) for item in json.loads(text)]
        pid = os.environ.get(PID_ENV)
        return cls(faults, os.environ[FAULTS_DIR_ENV], rank=rank, node=int(os.environ.get(NODE_ENV, "0")),
                   snapshot_pid=int(pid) if pid else None)

    # ------------------------------------------------------------------ the StateSink protocol
    def after_step(self, state: ShardState) -> None:
        self.last_step = state.step

    def before_optimizer_step(self) -> None:
        step = self.last_step + 1
        for index, fault in self.faults.items():
            if fault.step == step and self._hits(fault):
                self._fire(index, fault, step)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------
    def _hits(self, fault: Fault) -> bool:
        return fault.target == (self.rank if fault.kind == "kill-rank" else self.node)

    def _fire(self, index: int, fault: Fault, step: int) -> None:
        (self.fired_dir / f"fault-{index}.fired").write_text(f"{fault} fired by rank {self.rank}\n")
        print(f"[rank {self.rank}, step {step}] fault: {fault} fires", flush=True)
        if fault.kind == "kill-node" and self.snapshot_pid is not None:
            kill_pid(self.snapshot_pid)
        kill_pid(os.getpid())
