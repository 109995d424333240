"""Declarative fault injection: crash, hang, slow down or corrupt parts of a real run at given steps.

A fault plan is a list of :class:`Fault`, from the command line (``--fault kill-rank:1@5 --fault kill-node:0@9``),
from a JSON file (``--fault-plan plan.json``), or drawn at random (``--fault-mtbf SECONDS --fault-seed N``,
:func:`random_plan`). It is validated against the run before anything starts (:func:`plan_problems`: a rank, node
or step that does not exist, or a fault the run's settings cannot show, is rejected with the reason and the fix).
The launcher hands the plan to every rank in ``REGROW_FAULTS`` (JSON) together with a directory where a rank
records a fault as fired before it acts (``REGROW_FAULTS_DIR``): the ranks of a restarted attempt drop the faults
fired in an earlier attempt, so each fault happens once even though the run replays the steps since its restore
point. The records (``fault-<i>.fired``, JSON) carry the rank, step, attempt and wall time the launcher's report
(``launch/chaos/report.py``) reads.

Faults act from inside the ranks, through :class:`FaultInjector`, a ``StateSink`` that runs right before the
optimizer step of the target step: listed after the snapshot sink, it fires while the snapshot of the previous
step is still being copied and sealed, the hardest moment for the snapshots (the older buffer must be complete).

- ``kill-rank:R@S``: rank R SIGKILLs itself in step S.
- ``kill-node:N@S``: every rank of node N SIGKILLs the node's snapshot process, waits until it is dead, and then
  SIGKILLs itself in step S (all of them send the kill, so it happens whichever rank gets there first): the node's
  memory is lost, as when a machine dies.
- ``hang-rank:R@S``: rank R blocks forever in step S, before its optimizer step's collectives (the other ranks
  wait in those collectives). Only the launcher's progress watchdog (``--hang-timeout``, ``launch/local/watchdog.py``)
  notices; it kills the job and restarts it as after a crash.
- ``slow-rank:R@S[-E][xF]``: a straggler. In steps S..E (default S+4) rank R sleeps F times (default 2) its own
  last step time before the optimizer step; every rank waits for it in the collectives. Nothing fails.
- ``corrupt-snapshot:R@S``: in step S, rank R waits for its last snapshot to be sealed, flips a byte of the newest
  sealed segment's payload, and SIGKILLs itself: the restore must find the checksum mismatch and fall back (to the
  other slot, the erasure-coded copy or the checkpoint).
- ``fail-ckpt:R@S``: rank R's checkpoint writer fails writing the save of step S with an injected I/O error
  (``CheckpointWriter.io_fault``); the save is given up, ``latest`` stays on the last good checkpoint and training
  goes on. When the writer skips step S's save (the previous one still persisting), the next save it writes fails
  instead. Needs :meth:`FaultInjector.attach` (``regrow train`` calls it).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import SnapshotClient
from regrow.checkpoint.universal import storage
from regrow.launch.local.nodes import ADDRESS_ENV, NODE_ENV, PID_ENV
from regrow.trainer.state import ShardState

FAULTS_ENV = "REGROW_FAULTS"
FAULTS_DIR_ENV = "REGROW_FAULTS_DIR"
ATTEMPT_ENV = "REGROW_ATTEMPT"
"""The launcher's attempt number (0 first, 1 after the first restart, ...), recorded with each fired fault."""
KINDS = ("kill-rank", "kill-node", "hang-rank", "slow-rank", "corrupt-snapshot", "fail-ckpt")
NODE_KINDS = ("kill-node",)
"""Kinds whose target is a node; every other kind targets a rank."""
CRASH_KINDS = ("kill-rank", "kill-node", "hang-rank", "corrupt-snapshot")
"""Kinds that end the attempt (the launcher must restart the job to recover)."""
SLOW_STEPS = 5
"""Steps a ``slow-rank`` fault lasts when the plan gives no end step."""
SLOW_FACTOR = 2.0
"""Step-time multiple a ``slow-rank`` rank sleeps when the plan gives no factor."""
_SYNTAX = re.compile(r"^(?P<kind>[a-z-]+):(?P<target>\d+)@(?P<step>\d+)(?:-(?P<until>\d+))?(?:x(?P<factor>[0-9.]+))?$")
EXAMPLES = "kill-rank:1@5, kill-node:0@9, hang-rank:1@4, slow-rank:0@3-7x2.5, corrupt-snapshot:1@6, fail-ckpt:0@10"


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` (one of :data:`KINDS`) hits rank or node ``target`` in step ``step``. ``until`` and
    ``factor`` belong to ``slow-rank`` only (0: the defaults, ``step + SLOW_STEPS - 1`` and :data:`SLOW_FACTOR`)."""

    kind: str
    target: int
    step: int
    until: int = 0
    factor: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``"kill-rank:1@5"`` -> ``Fault("kill-rank", 1, 5)``; ``"slow-rank:0@3-7x2.5"`` adds ``until=7,
        factor=2.5``. The error shows the expected form."""
        match = _SYNTAX.match(text.strip())
        if match is None or match["kind"] not in KINDS:
            raise ValueError(f"--fault {text!r}: expected KIND:TARGET@STEP with KIND one of {', '.join(KINDS)} "
                             f"(e.g. {EXAMPLES})")
        extra = match["until"] is not None or match["factor"] is not None
        if extra and match["kind"] != "slow-rank":
            raise ValueError(f"--fault {text!r}: a step range -E and a factor xF belong to slow-rank only")
        try:
            factor = float(match["factor"]) if match["factor"] is not None else 0.0
        except ValueError:
            raise ValueError(f"--fault {text!r}: the factor after 'x' must be a number (e.g. slow-rank:0@3x2.5)")
        return cls(kind=match["kind"], target=int(match["target"]), step=int(match["step"]),
                   until=int(match["until"]) if match["until"] is not None else 0, factor=factor)

    @classmethod
    def from_dict(cls, item: dict) -> Fault:
        """The inverse of :meth:`to_dict`; unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(f"fault {item}: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**item)

    def to_dict(self) -> dict[str, Any]:
        """``kind``, ``target``, ``step``, plus ``until``/``factor`` when set (so a plain kill stays three keys)."""
        out: dict[str, Any] = {"kind": self.kind, "target": self.target, "step": self.step}
        if self.until:
            out["until"] = self.until
        if self.factor:
            out["factor"] = self.factor
        return out

    @property
    def last_step(self) -> int:
        """The last step a ``slow-rank`` fault slows (the fault's step for every other kind)."""
        if self.kind != "slow-rank":
            return self.step
        return self.until or self.step + SLOW_STEPS - 1

    @property
    def slow_factor(self) -> float:
        return self.factor or SLOW_FACTOR

    @property
    def target_kind(self) -> str:
        return "node" if self.kind in NODE_KINDS else "rank"

    def __str__(self) -> str:
        text = f"{self.kind}:{self.target}@{self.step}"
        if self.until:
            text += f"-{self.until}"
        if self.factor:
            text += f"x{self.factor:g}"
        return text


def plan_problems(faults: list[Fault], *, ranks: int, nodes: int, steps: int, snapshot_every: int | None = None,
                  save_every: int | None = None, hang_timeout_s: float | None = None) -> list[str]:
    """Every reason the plan cannot run against a job of ``ranks`` ranks on ``nodes`` nodes training ``steps``
    steps (empty: it can). Given the run's ``snapshot_every``, ``save_every`` and ``hang_timeout_s``, also checks
    that each fault can show: a corrupt snapshot needs snapshots, a failed checkpoint write a save at that step, a
    hang the progress watchdog."""
    problems = []
    for fault in faults:
        what = fault.target_kind
        limit = ranks if what == "rank" else nodes
        if not 0 <= fault.target < limit:
            problems.append(f"--fault {fault}: there is no {what} {fault.target} (the job has {limit} {what}s, "
                            f"0..{limit - 1})")
        if not 1 <= fault.step <= steps:
            problems.append(f"--fault {fault}: step {fault.step} is outside the run (steps 1..{steps})")
        if fault.kind == "slow-rank":
            if fault.until and fault.until < fault.step:
                problems.append(f"--fault {fault}: the last slowed step {fault.until} is before the first")
            if fault.factor and fault.factor <= 0:
                problems.append(f"--fault {fault}: the factor must be > 0")
        if fault.kind == "corrupt-snapshot" and snapshot_every is not None and not snapshot_every:
            problems.append(f"--fault {fault}: there is no snapshot to corrupt; add --snapshot-every 1")
        if fault.kind == "fail-ckpt" and save_every is not None and (
                not save_every or (fault.step % save_every and fault.step != steps)):
            problems.append(f"--fault {fault}: no checkpoint is saved at step {fault.step} (--save-every="
                            f"{save_every}); pick a multiple of --save-every, or set --save-every and --ckpt-dir")
        if fault.kind == "hang-rank" and hang_timeout_s is not None and not hang_timeout_s > 0:
            problems.append(f"--fault {fault}: nothing would notice the hang; add --hang-timeout SECONDS (the "
                            f"launcher's progress watchdog) and --max-restarts")
    return problems


def load_plan(path: str) -> list[Fault]:
    """Reads a JSON plan: a list (or ``{"faults": [...]}``) of fault strings (``"kill-rank:1@5"``) or objects
    (``{"kind": "kill-rank", "target": 1, "step": 5}``). Errors name the file and the item."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--fault-plan {path}: cannot read it as JSON: {error}") from error
    items = data.get("faults") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"--fault-plan {path}: expected a JSON list of faults, or an object with a 'faults' list")  # noqa: TRY004 (a bad file, reported with the other argument problems)
    plan = []
    for index, item in enumerate(items):
        try:
            plan.append(Fault.parse(item) if isinstance(item, str) else Fault.from_dict(item))
        except (ValueError, TypeError) as error:
            raise ValueError(f"--fault-plan {path}, item {index}: {error}") from error
    return plan


def random_plan(mtbf_s: float, seed: int, *, step_s: float, ranks: int, nodes: int, steps: int,
                node_faults: bool) -> list[Fault]:
    """Crash faults with exponentially distributed gaps of mean ``mtbf_s`` seconds, placed at steps assuming a step
    takes ``step_s`` seconds; ``kill-node`` or ``kill-rank`` at random (``kill-node`` only when ``node_faults``:
    the run can rebuild a node), the target uniform. Deterministic in ``seed``. Faults are at least 2 steps apart
    (one recovery at a time) and never at step 1 of the run."""
    if not mtbf_s > 0 or not step_s > 0:
        raise ValueError(f"--fault-mtbf={mtbf_s} and --fault-step-seconds={step_s} must be > 0")
    draw = random.Random(seed)
    plan, at = [], 1
    while True:
        at += max(2, round(draw.expovariate(1.0 / mtbf_s) / step_s))
        if at > steps:
            return plan
        if node_faults and draw.random() < 0.5:
            plan.append(Fault("kill-node", draw.randrange(nodes), at))
        else:
            plan.append(Fault("kill-rank", draw.randrange(ranks), at))


def plan_env(faults: list[Fault], fired_dir: str) -> dict[str, str]:
    """The environment that carries ``faults`` to the ranks."""
    return {FAULTS_ENV: json.dumps([f.to_dict() for f in faults]), FAULTS_DIR_ENV: fired_dir} if faults else {}


def fired(fired_dir: str) -> list[int]:
    """Indices (in the plan) of the faults that have fired."""
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in Path(fired_dir).glob("fault-*.fired"))


def fired_records(fired_dir: str) -> dict[int, dict]:
    """Plan index -> the record of the fault's firing (``fault``, ``rank``, ``step``, ``attempt``, ``time``)."""
    records = {}
    for index in fired(fired_dir):
        text = (Path(fired_dir) / f"fault-{index}.fired").read_text()
        try:
            records[index] = json.loads(text)
        except json.JSONDecodeError:  # a rank killed between creating the file and writing it
            records[index] = {}
    return records


def kill_pid(pid: int) -> None:
    """SIGKILLs ``pid``; a process already gone is fine (several ranks of a node kill its snapshot process)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_pid_and_wait(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILLs ``pid`` and returns once it is dead (gone or a zombie: it is the launcher's child, not ours, so
    we cannot reap it), or after ``timeout_s``. A node dies at once; without the wait, a rank that kills itself
    right after signalling could be seen dead by the launcher while the snapshot process still runs (a signal is
    delivered asynchronously; on a loaded machine the process may keep running for a while), and the launcher
    would keep a snapshot process that dies a moment later under the next attempt."""
    kill_pid(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.005)


def corrupt_segment(path: str) -> None:
    """Flips one payload byte of the snapshot segment at ``path`` (its checksum then fails)."""
    buffer = seg.open_segment(path, writable=True)
    try:
        buffer[seg.payload_offset(seg.read_header(buffer).meta_capacity) + 100] ^= 0xFF
    finally:
        buffer.close()


def corrupt_newest_snapshot(client: SnapshotClient, rank: int) -> dict | None:
    """Flips one payload byte of ``rank``'s newest sealed snapshot held by the snapshot process behind ``client``;
    returns that slot as the ``latest`` op lists it (``path``, ``step``, ...), or None when it holds none."""
    slots = [s for s in client.request({"op": "latest", "rank": rank})["slots"] if s["status"] == "ok"]
    if not slots:
        return None
    newest = max(slots, key=lambda s: s["step"])
    corrupt_segment(newest["path"])
    return newest


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (Linux reads /proc; elsewhere a zombie counts as running)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The state follows the command name in parentheses, which may itself hold spaces or parentheses.
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _write_json(path: Path, record: dict, *, exclusive: bool) -> bool:
    """Writes ``record``; with ``exclusive`` only if ``path`` does not exist yet (returns False then)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(record).encode())
    finally:
        os.close(fd)
    return True


class FaultInjector:
    """The rank side of a fault plan; a ``StateSink`` (list it after the snapshot sink). Built from the
    environment by :meth:`from_env` (None when the launcher gave no plan). Call :meth:`attach` with the trainer
    once its other sinks are in place, for the faults that act through them (``corrupt-snapshot`` waits for the
    snapshot sink, ``fail-ckpt`` arms the checkpoint writer)."""

    def __init__(self, faults: list[Fault], fired_dir: str, *, rank: int, node: int, snapshot_pid: int | None,
                 attempt: int = 0) -> None:
        self.fired_dir = Path(fired_dir)
        # Faults fired in an earlier attempt stay fired; within this attempt every rank a fault hits acts on it.
        done = set(fired(fired_dir))
        self.faults = {index: fault for index, fault in enumerate(faults) if index not in done}
        self.rank = rank
        self.node = node
        self.snapshot_pid = snapshot_pid
        self.attempt = attempt
        self.last_step = 0
        self._sinks: list = []
        self._step_started = time.perf_counter()
        self._step_seconds = 0.0
        self._slept: dict[int, float] = {}
        self._armed: dict[int, Fault] = {}
        self._failed_at: dict[int, int] = {}
        self._writer = None

    @classmethod
    def from_env(cls, rank: int) -> FaultInjector | None:
        text = os.environ.get(FAULTS_ENV)
        if not text:
            return None
        faults = [Fault.from_dict(item) for item in json.loads(text)]
        pid = os.environ.get(PID_ENV)
        return cls(faults, os.environ[FAULTS_DIR_ENV], rank=rank, node=int(os.environ.get(NODE_ENV, "0")),
                   snapshot_pid=int(pid) if pid else None, attempt=int(os.environ.get(ATTEMPT_ENV, "0")))

    def attach(self, sinks: list) -> None:
        """Sees the trainer's other sinks (``trainer.sinks``): arms the checkpoint writer's ``io_fault`` hook for
        this rank's ``fail-ckpt`` faults."""
        self._sinks = [sink for sink in sinks if sink is not self]
        for sink in self._sinks:
            if hasattr(sink, "io_fault"):
                self._writer = sink
                self._armed = {i: f for i, f in self.faults.items() if f.kind == "fail-ckpt" and self._hits(f)}
                if self._armed:
                    sink.io_fault = self._ckpt_fault

    # ------------------------------------------------------------------ the StateSink protocol
    def after_step(self, state: ShardState) -> None:
        now = time.perf_counter()
        self._step_seconds = now - self._step_started
        self._step_started = now
        self.last_step = state.step
        self._note_failed_saves()

    def before_optimizer_step(self) -> None:
        step = self.last_step + 1
        for index, fault in list(self.faults.items()):
            if fault.kind == "slow-rank":
                if fault.step <= step <= fault.last_step and self._hits(fault):
                    self._slow(index, fault, step)
            elif fault.kind != "fail-ckpt" and fault.step == step and self._hits(fault):
                self._fire(index, fault, step)

    def close(self) -> None:
        self._note_failed_saves()

    # ------------------------------------------------------------------
    def _hits(self, fault: Fault) -> bool:
        return fault.target == (self.node if fault.target_kind == "node" else self.rank)

    def _record(self, index: int, fault: Fault, step: int, **extra: Any) -> bool:
        """Records ``fault`` as fired (first rank only); returns False when another rank already did."""
        record = {"fault": str(fault), "rank": self.rank, "step": step, "attempt": self.attempt,
                  "time": time.time(), **extra}
        return _write_json(self.fired_dir / f"fault-{index}.fired", record, exclusive=True)

    def _fire(self, index: int, fault: Fault, step: int) -> None:
        self._record(index, fault, step)
        print(f"[rank {self.rank}, step {step}] fault: {fault} fires", flush=True)
        if fault.kind == "hang-rank":
            while True:  # a hang: alive, holding its resources, never reaching the collectives
                time.sleep(3600)
        if fault.kind == "corrupt-snapshot":
            self._corrupt_newest_snapshot(index, step)
        if fault.kind == "kill-node" and self.snapshot_pid is not None:
            kill_pid_and_wait(self.snapshot_pid)
        kill_pid(os.getpid())

    def _slow(self, index: int, fault: Fault, step: int) -> None:
        """Sleeps ``factor`` times the last step's time; the first slowed step records the fault as fired (it is
        not repeated after a restart: the straggler is the plan's, not the replay's)."""
        if step == fault.step:
            self._record(index, fault, step)
            print(f"[rank {self.rank}, step {step}] fault: {fault} fires (straggler until step {fault.last_step})",
                  flush=True)
        seconds = fault.slow_factor * self._step_seconds
        time.sleep(seconds)
        self._slept[index] = self._slept.get(index, 0.0) + seconds
        _write_json(self.fired_dir / f"fault-{index}.detail", {"slept_s": self._slept[index], "steps": step -
                                                               fault.step + 1}, exclusive=False)
        if step == fault.last_step:
            del self.faults[index]

    def _corrupt_newest_snapshot(self, index: int, step: int) -> None:
        """Waits for the snapshot in flight to be sealed, then flips one payload byte of this rank's newest sealed
        segment (read through the node's snapshot process, which lists the slots)."""
        for sink in self._sinks:
            if hasattr(sink, "flush") and hasattr(sink, "segments"):
                sink.flush()
        address = os.environ.get(ADDRESS_ENV)
        detail: dict[str, Any] = {"corrupted": None}
        if address:
            client = SnapshotClient(address)
            try:
                newest = corrupt_newest_snapshot(client, self.rank)
            finally:
                client.close()
            if newest is not None:
                detail = {"corrupted": newest["path"], "snapshot_step": newest["step"]}
                print(f"[rank {self.rank}, step {step}] fault: flipped a byte of the snapshot of step "
                      f"{newest['step']} ({newest['path']})", flush=True)
        _write_json(self.fired_dir / f"fault-{index}.detail", detail, exclusive=False)

    # ------------------------------------------------------------------ fail-ckpt
    def _ckpt_fault(self, step: int) -> None:
        """The writer's ``io_fault`` hook (its persist thread): fails this rank's part of the first save it writes
        at or after a planned step with an I/O error, as a full or failing disk would."""
        for index, fault in list(self._armed.items()):
            if fault.step <= step and index not in self._failed_at:
                self._failed_at[index] = step
                self._record(index, fault, step)
                print(f"[rank {self.rank}, step {step}] fault: {fault} fires (the checkpoint write fails)",
                      flush=True)
                raise OSError(errno.EIO, f"injected I/O error ({fault})")

    def _note_failed_saves(self) -> None:
        """Records, for the report, how the writer reported each injected write failure and what ``latest`` named
        then (the training thread sees the result once the persist thread is done)."""
        if not self._armed or self._writer is None:
            return
        for index, fault in list(self._armed.items()):
            step = self._failed_at.get(index)
            result = next((r for r in self._writer.results if r.step == step), None)
            if step is None or result is None:
                continue
            del self._armed[index]
            _write_json(self.fired_dir / f"fault-{index}.detail",
                        {"step": step, "status": result.status, "error": result.error, "time": time.time(),
                         "latest": storage.read_latest(Path(self._writer.root))}, exclusive=False)


def plan_from_args(args: Any) -> tuple[list[Fault], list[str]]:
    """The run's whole plan from ``regrow train``'s flags: ``--fault`` items, then ``--fault-plan FILE``'s, then
    the faults ``--fault-mtbf``/``--fault-seed`` draw; and every problem found building it (the caller validates
    the plan against the run with :func:`plan_problems`). Deterministic: the launcher and the report rebuild it."""
    plan: list[Fault] = []
    problems: list[str] = []
    for text in getattr(args, "fault", []) or []:
        try:
            plan.append(Fault.parse(text))
        except ValueError as error:
            problems.append(str(error))
    if getattr(args, "fault_plan", None):
        try:
            plan += load_plan(args.fault_plan)
        except ValueError as error:
            problems.append(str(error))
    mtbf = getattr(args, "fault_mtbf", 0.0) or 0.0
    if mtbf:
        nodes, group = getattr(args, "nodes", 1), getattr(args, "ec_group_size", 0)
        try:
            drawn = random_plan(mtbf, getattr(args, "fault_seed", 0), step_s=getattr(args, "fault_step_seconds", 1.0),
                                ranks=args.nproc, nodes=nodes, steps=args.steps, node_faults=nodes > 1 and group > 0)
        except ValueError as error:
            problems.append(str(error))
            drawn = []
        restarts = getattr(args, "max_restarts", 0)
        if len(drawn) > restarts:
            problems.append(f"--fault-mtbf {mtbf:g} --fault-seed {getattr(args, 'fault_seed', 0)} draws "
                            f"{len(drawn)} faults ({', '.join(map(str, drawn))}) but --max-restarts={restarts}; "
                            f"give --max-restarts {len(drawn)} or a longer --fault-mtbf")
        plan += drawn
    return plan, problems
