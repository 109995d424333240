"""``regrow train`` and ``regrow demo``: a validated job on the local launcher (or as torchrun's rank), the fault
report when it ran under a fault plan, and the loss table.

``regrow train`` spawns ``--nproc`` local processes (gloo on CPU, NCCL on GPUs) or, when started by torchrun
(``RANK``/``WORLD_SIZE`` in the environment), runs as the rank torchrun made it. The local launcher restarts a
failed run up to ``--max-restarts`` times, as torchrun's agent would (``launch/local/attempts.py``); ``--fault``
injects faults (``launch/chaos/``), and a run with a fault plan ends with the fault report. ``regrow demo`` is
``regrow train`` with the defaults of ``options.DEMO``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from regrow.launch.chaos.recorder import Recorder
from regrow.launch.chaos.report import build_report, emit
from regrow.launch.job import Job
from regrow.launch.local.spawn import WorkerFailed
from regrow.launch.run import SnapshotStartError, run_training
from regrow.trainer.loop import StepResult


def run(job: Job) -> int:
    """``regrow train`` or ``regrow demo`` of ``job``; returns the exit code (1 when the run failed)."""
    options = job.options
    if options.command != "demo" or options.train.metrics:
        return _run(job)
    # The loss table spans every attempt, so the demo keeps metrics even when not asked to.
    with tempfile.TemporaryDirectory(prefix="regrow-demo-") as scratch:
        metrics = str(Path(scratch) / "metrics.jsonl")
        return _run(dataclasses.replace(job, config=dataclasses.replace(job.config, metrics_path=metrics)))


def _run(job: Job) -> int:
    options, config = job.options, job.config
    if options.command == "demo":
        data = f"{len(options.train.data)} token file(s)" if options.train.data else "pydoc_data.topics"
        print(f"regrow demo: training {options.train.model_name} on {data} with {options.launch.nproc} "
              f"CPU processes on {options.snapshot.nodes} simulated nodes, ZeRO-{config.optim.stage}, "
              f"{config.optim.state_bits}-bit Adam state, {config.steps} steps; faults planned: "
              f"{', '.join(options.faults.faults)}", flush=True)
    recorder = Recorder(job.plan) if job.plan and not options.launch.torchrun else None
    try:
        history = run_training(job, recorder=recorder)
    except (WorkerFailed, SnapshotStartError) as error:
        print(f"regrow {options.command}: {error}", file=sys.stderr)
        if recorder is not None and recorder.attempts:
            emit(build_report(recorder, [], ok=False), options.report_path())
        return 1
    if recorder is not None:
        emit(build_report(recorder, history), options.report_path())
    if options.command == "demo" and config.metrics_path and Path(config.metrics_path).exists():
        history = history_from_metrics(config.metrics_path)
    if options.command == "demo" or config.eval_every:
        print("\n" + demo_table(history))
    return 0


def history_from_metrics(path: str) -> list[StepResult]:
    """Every step of a run from its metrics file, across restarts: a step replayed after a restore keeps its last
    record (the attempt that went on from it)."""
    steps: dict[int, StepResult] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = StepResult(**json.loads(line))
            steps[record.step] = record
    return [steps[step] for step in sorted(steps)]


def demo_table(history: Sequence[StepResult]) -> str:
    """A small markdown table of the loss curve."""
    rows = ["| step | train loss | val loss | tokens/s |", "|---:|---:|---:|---:|"]
    for r in history:
        if r.val_loss is not None:
            rows.append(f"| {r.step} | {r.loss:.4f} | {r.val_loss:.4f} | {r.tokens_per_s:,.0f} |")
    return "\n".join(rows)
