"""Fault plans: which fault hits which rank or node at which step, and whether a run can show it.

A fault plan is a list of :class:`Fault`, from the command line (``--fault kill-rank:1@5 --fault kill-node:0@9``),
from a JSON file (``--fault-plan plan.json``), or drawn at random (``--fault-mtbf SECONDS --fault-seed N``,
:func:`random_plan`); :func:`build_plan` puts the three together. A :class:`Fault` checks itself when built (a
known kind, whole-number target and steps, a finite factor), from whatever source, the ranks' ``REGROW_FAULTS``
included; the plan is validated against the run before anything starts (:func:`plan_problems`: a rank, node or step
that does not exist, or a fault the run's settings cannot show, is rejected with the reason and the fix). The
launcher hands the plan to every rank in ``REGROW_FAULTS`` (JSON, :func:`plan_env`) together with the directory
where the ranks record each fault as it fires (``REGROW_FAULTS_DIR``, ``records.py``); the ranks act on it through
``injector.FaultInjector``.

The kinds (``docs/chaos.md`` has the table of how each is detected and recovered):

- ``kill-rank:R@S``: rank R SIGKILLs itself in step S.
- ``kill-node:N@S``: every rank of node N SIGKILLs the node's snapshot process, then itself: the node's memory is
  lost, as when a machine dies.
- ``hang-rank:R@S``: rank R blocks forever in step S, before its optimizer step's collectives; only the launcher's
  progress watchdog (``--hang-timeout``) notices.
- ``slow-rank:R@S[-E][xF]``: a straggler: in steps S..E (default S+4) rank R sleeps F times (default 2) its own
  last step time before the optimizer step. Nothing fails.
- ``corrupt-snapshot:R@S``: in step S rank R flips a byte of its newest sealed snapshot and SIGKILLs itself; the
  restore must find the checksum mismatch and fall back.
- ``fail-ckpt:R@S``: rank R's checkpoint writer fails writing the save of step S with an injected I/O error; the
  save is given up and training goes on.
- ``corrupt-param:R@S``: silent data corruption of rank R's working parameters: at the start of step S one bit of
  rank R's copy flips; nothing else notices. The state parity check (``recovery/parity.py``, ``--parity-every``)
  must run at step S to see it.
- ``corrupt-shard:R@S``: the same in rank R's optimizer shard (a bit of Adam's second moment): no peer holds a copy,
  and the parameters show nothing until the update has spread it to every rank alike.

A kill (``kill-rank`` or ``kill-node``) strikes right before step S's optimizer step unless it names a moment,
``kill-rank:R@S:MOMENT`` (:data:`MOMENTS`, in the order a step meets them): ``snapshot-copy`` while the snapshot of
step S-1 is being copied into its slot (its metadata written, its payload not yet sealed), ``forward`` in the middle
of step S's first forward, ``backward`` in the middle of its first backward (ZeRO-2 reductions in flight),
``update`` between the gradient reduction and the update of the shard, ``all-gather`` after this rank's update and
before its parameter all-gather (the other ranks wait inside it), ``persist`` as the checkpoint writer starts
writing the first save at or after step S (in its background thread), and, for ``kill-node`` only, ``ec``: node N's
snapshot process dies in its first erasure-coding round of a step at or after S, between exchanging the buffer sizes
and sending its pieces (``node_faults.py``).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import reprlib
import stat
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

FAULTS_ENV = "REGROW_FAULTS"
"""The plan, as a JSON list of :meth:`Fault.to_dict` objects, in every rank's environment."""
NODE_FAULTS_MODULE = "regrow.launch.chaos.node_faults"
"""The snapshot process's entry under a plan that kills inside it (``node_faults.py``)."""
FAULTS_DIR_ENV = "REGROW_FAULTS_DIR"
"""The directory where the ranks record each fault as fired; it must outlive the ranks (``records.py``)."""
KINDS = ("kill-rank", "kill-node", "hang-rank", "slow-rank", "corrupt-snapshot", "fail-ckpt", "corrupt-param",
         "corrupt-shard")
NODE_KINDS = ("kill-node",)
"""Kinds whose target is a node; every other kind targets a rank."""
CORRUPT_KINDS = ("corrupt-param", "corrupt-shard")
"""Silent corruption: the attempt ends when the state parity check sees it."""
RANGE_KINDS = ("slow-rank",)
"""Kinds that take a step range ``S-E``."""
CRASH_KINDS = ("kill-rank", "kill-node", "hang-rank", "corrupt-snapshot", *CORRUPT_KINDS)
"""Kinds that end the attempt (the launcher must restart the job to recover)."""
SLOW_STEPS = 5
"""Steps a ``slow-rank`` fault lasts when the plan gives no end step."""
SLOW_FACTOR = 2.0
"""Step-time multiple a ``slow-rank`` rank sleeps when the plan gives no factor."""
MAX_SLOW_FACTOR = 1000.0
"""The largest ``slow-rank`` factor: a rank 1000 times slower than its peers is a hang (``hang-rank``), and a
bound keeps the sleep a finite number of seconds."""
MAX_PLAN_BYTES = 1 << 20
"""The largest ``--fault-plan`` file read (a plan of a few thousand faults is a few hundred KB)."""
_SYNTAX = re.compile(r"^(?P<kind>[a-z-]+):(?P<target>\d+)@(?P<step>\d+)(?:-(?P<until>\d+))?(?:x(?P<factor>[0-9.]+))?"
                     r"(?::(?P<moment>[a-z-]+))?$")
MOMENTS = ("snapshot-copy", "forward", "backward", "update", "all-gather", "persist", "ec")
"""Where in a step a kill may strike besides its default, right before the optimizer step (module docstring)."""
MOMENT_KINDS = ("kill-rank", "kill-node")
"""Kinds that take a moment; ``ec`` is ``kill-node``'s only (the snapshot process runs the round)."""
EXAMPLES = ("kill-rank:1@5, kill-node:0@9, kill-rank:1@5:backward, hang-rank:1@4, slow-rank:0@3-7x2.5, "
            "corrupt-snapshot:1@6, fail-ckpt:0@10, corrupt-param:1@100, corrupt-shard:0@200")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` (one of :data:`KINDS`) hits rank or node ``target`` in step ``step``. ``until`` and
    ``factor`` belong to ``slow-rank`` only (None: the defaults, ``step + SLOW_STEPS - 1`` and :data:`SLOW_FACTOR`);
    ``moment`` to the kills (:data:`MOMENTS`; None: right before the optimizer step).

    Construction checks what a fault is on its own (a known kind, integer target and steps, a finite factor in
    ``(0, MAX_SLOW_FACTOR]``) and raises ValueError naming the field and the fix; whether it fits a run (the rank
    exists, the step is in the run) is :func:`plan_problems`'s."""

    kind: str
    target: int
    step: int
    until: int | None = None
    factor: float | None = None
    moment: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"unknown kind {reprlib.repr(self.kind)}; use one of {', '.join(KINDS)}")
        if not _is_int(self.target) or self.target < 0:
            raise ValueError(f"target must be an integer >= 0 (a rank or node), not {reprlib.repr(self.target)}")
        if not _is_int(self.step):
            raise ValueError(f"step must be an integer (a step of the run), not {reprlib.repr(self.step)}")
        if self.kind not in RANGE_KINDS and (self.until is not None or self.factor is not None):
            raise ValueError("a step range -E and a factor xF belong to slow-rank only")
        if self.until is not None and not _is_int(self.until):
            raise ValueError(f"until must be an integer (the last slowed step), not {reprlib.repr(self.until)}")
        factor = self.factor
        if factor is not None and (not isinstance(factor, (int, float)) or isinstance(factor, bool)
                                   or not 0 < factor <= MAX_SLOW_FACTOR):  # NaN fails the comparison too
            raise ValueError(f"the factor must be a finite number > 0 and <= {MAX_SLOW_FACTOR:g}, not "
                             f"{reprlib.repr(factor)} (e.g. slow-rank:0@3x2.5)")
        if self.moment is not None:
            if self.kind not in MOMENT_KINDS:
                raise ValueError(f"a moment belongs to {' and '.join(MOMENT_KINDS)} only, not {self.kind}")
            if not isinstance(self.moment, str) or self.moment not in MOMENTS:
                raise ValueError(f"unknown moment {reprlib.repr(self.moment)}; use one of {', '.join(MOMENTS)} "
                                 f"(e.g. kill-rank:1@5:backward), or none for right before the optimizer step")
            if self.moment == "ec" and self.kind != "kill-node":
                raise ValueError("the moment ec belongs to kill-node (a node's snapshot process runs the round)")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``"kill-rank:1@5"`` -> ``Fault("kill-rank", 1, 5)``; ``"slow-rank:0@3-7x2.5"`` adds ``until=7,
        factor=2.5``; ``"kill-rank:1@5:backward"`` adds ``moment="backward"``. The error quotes ``text`` and shows
        the expected form."""
        match = _SYNTAX.match(text.strip())
        if match is None or match["kind"] not in KINDS:
            raise ValueError(f"--fault {text!r}: expected KIND:TARGET@STEP[:MOMENT] with KIND one of "
                             f"{', '.join(KINDS)} (e.g. {EXAMPLES})")
        try:
            factor = float(match["factor"]) if match["factor"] is not None else None
        except ValueError:
            raise ValueError(f"--fault {text!r}: the factor after 'x' must be a number (e.g. slow-rank:0@3x2.5)")
        try:
            # int() refuses more than 4,300 digits with a ValueError, named here with the fault's text.
            return cls(kind=match["kind"], target=int(match["target"]), step=int(match["step"]),
                       until=int(match["until"]) if match["until"] is not None else None, factor=factor,
                       moment=match["moment"])
        except ValueError as error:
            raise ValueError(f"--fault {text!r}: {error}") from None

    @classmethod
    def from_dict(cls, item: Any) -> Fault:
        """The inverse of :meth:`to_dict`; anything but an object with ``kind``, ``target`` and ``step`` (plus
        ``until``/``factor``), or a field of the wrong type, is a ValueError naming what is wrong."""
        if not isinstance(item, dict):
            raise ValueError(f"expected a fault string such as 'kill-rank:1@5' or an object with kind, target and "
                             f"step, not {reprlib.repr(item)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(item) - known))
        if unknown:
            raise ValueError(f"fault {reprlib.repr(item)}: unknown keys {unknown} (known: {sorted(known)})")
        missing = [name for name in ("kind", "target", "step") if name not in item]
        if missing:
            raise ValueError(f"fault {reprlib.repr(item)}: missing {', '.join(missing)}")
        return cls(**item)

    def to_dict(self) -> dict[str, Any]:
        """``kind``, ``target``, ``step``, plus ``until``/``factor``/``moment`` when set (so a plain kill stays three
        keys)."""
        out: dict[str, Any] = {"kind": self.kind, "target": self.target, "step": self.step}
        if self.until is not None:
            out["until"] = self.until
        if self.factor is not None:
            out["factor"] = self.factor
        if self.moment is not None:
            out["moment"] = self.moment
        return out

    @property
    def last_step(self) -> int:
        """The last step a ``slow-rank`` fault slows (the fault's step for every other kind)."""
        if self.kind != "slow-rank":
            return self.step
        return self.until if self.until is not None else self.step + SLOW_STEPS - 1

    @property
    def slow_factor(self) -> float:
        return self.factor if self.factor is not None else SLOW_FACTOR

    @property
    def target_kind(self) -> str:
        return "node" if self.kind in NODE_KINDS else "rank"

    def __str__(self) -> str:
        text = f"{self.kind}:{self.target}@{self.step}"
        if self.until is not None:
            text += f"-{self.until}"
        if self.factor is not None:
            text += f"x{self.factor:g}"
        if self.moment is not None:
            text += f":{self.moment}"
        return text


def plan_problems(faults: list[Fault], *, ranks: int, nodes: int, steps: int, snapshot_every: int | None = None,
                  save_every: int | None = None, hang_timeout_s: float | None = None,
                  erasure_coding: bool | None = None, parity_every: int | None = None,
                  zero_stage: int | None = None) -> list[str]:
    """Every reason the plan cannot run against a job of ``ranks`` ranks on ``nodes`` nodes training ``steps``
    steps (empty: it can). Given the run's ``snapshot_every``, ``save_every``, ``hang_timeout_s`` and whether its
    nodes are in ``erasure_coding`` groups, also checks that each fault can show: a corrupt snapshot needs
    snapshots, a failed checkpoint write a save at that step, a hang the progress watchdog, a kill at a moment
    the thing it interrupts (a snapshot copy, a save, an erasure-coding round), a corruption a parity check in its
    steps (``parity_every``: 0 when checks are off) and, for ``corrupt-param``, full working parameters (ZeRO
    ``zero_stage`` 1 or 2)."""
    problems = []
    for fault in faults:
        what = fault.target_kind
        limit = ranks if what == "rank" else nodes
        if not 0 <= fault.target < limit:
            problems.append(f"--fault {fault}: there is no {what} {fault.target} (the job has {limit} {what}s, "
                            f"0..{limit - 1})")
        if not 1 <= fault.step <= steps:
            problems.append(f"--fault {fault}: step {fault.step} is outside the run (steps 1..{steps})")
        if fault.kind == "slow-rank" and fault.until is not None:
            if fault.until < fault.step:
                problems.append(f"--fault {fault}: the last slowed step {fault.until} is before the first")
            elif fault.until > steps:
                problems.append(f"--fault {fault}: the last slowed step {fault.until} is outside the run (steps "
                                f"1..{steps})")
        if fault.kind == "corrupt-snapshot" and snapshot_every is not None and not snapshot_every:
            problems.append(f"--fault {fault}: there is no snapshot to corrupt; add --snapshot-every 1")
        if fault.kind == "fail-ckpt" and save_every is not None and (
                not save_every or (fault.step % save_every and fault.step != steps)):
            problems.append(f"--fault {fault}: no checkpoint is saved at step {fault.step} (--save-every="
                            f"{save_every}); pick a multiple of --save-every, or set --save-every and --ckpt-dir")
        if fault.kind == "hang-rank" and hang_timeout_s is not None and not hang_timeout_s > 0:
            problems.append(f"--fault {fault}: nothing would notice the hang; add --hang-timeout SECONDS (the "
                            f"launcher's progress watchdog) and --max-restarts")
        problems += _moment_problems(fault, snapshot_every, save_every, erasure_coding)
        problems += _corruption_problems(fault, parity_every, zero_stage)
    return problems


def _corruption_problems(fault: Fault, parity_every: int | None, zero_stage: int | None) -> list[str]:
    """Why a corruption would go unseen in a run with these settings (None: not known, not checked)."""
    if fault.kind not in CORRUPT_KINDS:
        return []
    if fault.kind == "corrupt-param" and zero_stage == 3:
        return [f"--fault {fault}: at ZeRO stage 3 no rank keeps the full parameters between steps; use "
                f"corrupt-shard, or --stage 2"]
    if parity_every is None:
        return []
    if not parity_every:
        return [f"--fault {fault}: nothing would see the corruption; set --parity-every (state parity checks)"]
    if fault.step % parity_every:
        return [f"--fault {fault}: a parity check sees corruption of the step it runs at (steps that are multiples "
                f"of --parity-every={parity_every}), and step {fault.step} is not one; pick such a step, or a "
                f"smaller --parity-every"]
    return []


def _moment_problems(fault: Fault, snapshot_every: int | None, save_every: int | None,
                     erasure_coding: bool | None) -> list[str]:
    """Why ``fault``'s moment never comes in a run with these settings (None: not known, not checked)."""
    if fault.moment == "snapshot-copy" and snapshot_every is not None:
        if not snapshot_every:
            return [f"--fault {fault}: there is no snapshot copy to interrupt; add --snapshot-every 1"]
        if fault.step < 2 or (fault.step - 1) % snapshot_every:
            return [f"--fault {fault}: no snapshot is copied during step {fault.step} (--snapshot-every="
                    f"{snapshot_every}: the copy of a snapshot of step N runs in step N+1); pick a step just after "
                    f"a snapshot step"]
    if fault.moment == "persist" and save_every is not None and not save_every:
        return [f"--fault {fault}: no checkpoint is written; set --save-every and --ckpt-dir"]
    if fault.moment == "ec" and erasure_coding is not None and not erasure_coding:
        return [f"--fault {fault}: no erasure-coding round runs; add --snapshot-every 1, --nodes and "
                f"--ec-group-size"]
    return []


def load_plan(path: str) -> tuple[list[Fault], list[str]]:
    """Reads a JSON plan: a list (or ``{"faults": [...]}``) of fault strings (``"kill-rank:1@5"``) or objects
    (``{"kind": "kill-rank", "target": 1, "step": 5}``). Returns the faults that parse and a problem per item that
    does not (naming the file and the item). Only a regular file of at most :data:`MAX_PLAN_BYTES` is read (a FIFO
    would block the launcher, a device would never end)."""
    try:
        text = _read_plan_file(path)
        data = json.loads(text)
    except (OSError, ValueError, RecursionError) as error:  # ValueError: JSON, UTF-8 or a number over 4,300 digits
        return [], [f"--fault-plan {path}: cannot read it as JSON: {error}"]
    items = data.get("faults") if isinstance(data, dict) else data
    if not isinstance(items, list):
        return [], [f"--fault-plan {path}: expected a JSON list of faults, or an object with a 'faults' list"]
    plan, problems = [], []
    for index, item in enumerate(items):
        try:
            plan.append(Fault.parse(item) if isinstance(item, str) else Fault.from_dict(item))
        except ValueError as error:
            problems.append(f"--fault-plan {path}, item {index}: {error}")
    return plan, problems


def _read_plan_file(path: str) -> str:
    """The text of the plan file at ``path``; OSError when it is not a regular file or exceeds
    :data:`MAX_PLAN_BYTES` (it is opened without blocking, so a FIFO is refused rather than waited on)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = file.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise OSError(f"{path} is larger than {MAX_PLAN_BYTES} bytes, more than any plan needs")
    return data.decode("utf-8")


def random_plan(mtbf_s: float, seed: int, *, step_s: float, ranks: int, nodes: int, steps: int,
                node_faults: bool) -> list[Fault]:
    """Crash faults with exponentially distributed gaps of mean ``mtbf_s`` seconds, placed at steps assuming a step
    takes ``step_s`` seconds; ``kill-node`` or ``kill-rank`` at random (``kill-node`` only when ``node_faults``:
    the run can rebuild a node), the target uniform. Deterministic in ``seed``. Faults are at least 2 steps apart
    (one recovery at a time) and never at step 1 of the run."""
    problems = [f"{flag}={value} must be a finite number of seconds > 0" for flag, value in
                (("--fault-mtbf", mtbf_s), ("--fault-step-seconds", step_s)) if not 0 < value < math.inf]
    if problems:
        raise ValueError("; ".join(problems))
    draw = random.Random(seed)
    plan, at = [], 1
    while True:
        gap = draw.expovariate(1.0 / mtbf_s) / step_s
        if gap > steps:  # past the run; also keeps round() off an infinite gap (a tiny --fault-step-seconds)
            return plan
        at += max(2, round(gap))
        if at > steps:
            return plan
        if node_faults and draw.random() < 0.5:
            plan.append(Fault("kill-node", draw.randrange(nodes), at))
        else:
            plan.append(Fault("kill-rank", draw.randrange(ranks), at))


def build_plan(texts: Sequence[str], *, plan_file: str | None, mtbf_s: float, seed: int, step_s: float, ranks: int,
               nodes: int, node_faults: bool, steps: int, max_restarts: int) -> tuple[list[Fault], list[str]]:
    """A run's whole plan: the ``texts`` (``--fault`` items), then ``plan_file``'s faults, then the ones
    ``mtbf_s``/``seed`` draw (:func:`random_plan`, when ``mtbf_s`` is set); and every problem found building it,
    a random plan needing more than ``max_restarts`` restarts included (the caller validates the plan against
    the run with :func:`plan_problems`). Deterministic: the launcher and the report rebuild the same plan."""
    plan: list[Fault] = []
    problems: list[str] = []
    for text in texts:
        try:
            plan.append(Fault.parse(text))
        except ValueError as error:
            problems.append(str(error))
    if plan_file:
        from_file, file_problems = load_plan(plan_file)
        plan += from_file
        problems += file_problems
    if mtbf_s:
        try:
            drawn = random_plan(mtbf_s, seed, step_s=step_s, ranks=ranks, nodes=nodes, steps=steps,
                                node_faults=node_faults)
        except ValueError as error:
            problems.append(str(error))
            drawn = []
        if len(drawn) > max_restarts:
            problems.append(f"--fault-mtbf {mtbf_s:g} --fault-seed {seed} draws {len(drawn)} faults "
                            f"({', '.join(map(str, drawn))}) but --max-restarts={max_restarts}; give "
                            f"--max-restarts {len(drawn)} or a longer --fault-mtbf")
        plan += drawn
    return plan, problems


def plan_env(faults: list[Fault], fired_dir: str) -> dict[str, str]:
    """The environment that carries ``faults`` to the ranks, with the directory where they record them fired."""
    return {FAULTS_ENV: json.dumps([f.to_dict() for f in faults]), FAULTS_DIR_ENV: fired_dir} if faults else {}


def plan_from_env(environ: dict[str, str]) -> tuple[list[Fault], str] | None:
    """The plan and the fired-records directory :func:`plan_env` put in ``environ`` (None: no plan). A plan the
    launcher did not write (set by hand) is checked like a plan file: ValueError naming :data:`FAULTS_ENV` and the
    item, never a fault of an unknown kind."""
    text = environ.get(FAULTS_ENV)
    if not text:
        return None
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{FAULTS_ENV}: not a JSON list of faults: {error}") from None
    if not isinstance(items, list):
        raise ValueError(f"{FAULTS_ENV}: expected a JSON list of faults, not {type(items).__name__}")
    plan = []
    for index, item in enumerate(items):
        try:
            plan.append(Fault.from_dict(item))
        except ValueError as error:
            raise ValueError(f"{FAULTS_ENV}: item {index}: {error}") from None
    if FAULTS_DIR_ENV not in environ:
        raise ValueError(f"{FAULTS_ENV} is set without {FAULTS_DIR_ENV} (where the ranks record fired faults)")
    return plan, environ[FAULTS_DIR_ENV]
