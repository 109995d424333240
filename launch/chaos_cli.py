"""``regrow chaos``: ``regrow train`` under a fault plan, then (``--reference``) the same training without faults,
then the fault report comparing the two (``launch/chaos/report.py``; docs/chaos.md)."""

from __future__ import annotations

import dataclasses
import sys
import tempfile

from regrow.launch.chaos.recorder import Recorder
from regrow.launch.chaos.report import build_report, emit
from regrow.launch.job import Job
from regrow.launch.local.spawn import WorkerFailed
from regrow.launch.run import SnapshotStartError, run_training
from regrow.trainer.loop import StepResult


def run(job: Job) -> int:
    """Exit 0 when the faulted run finished (and matched the reference's final checkpoint, when compared), 1
    otherwise."""
    try:
        return _run(job)
    except SnapshotStartError as error:
        print(f"regrow chaos: {error}", file=sys.stderr)
        return 1


def _run(job: Job) -> int:
    options = job.options
    recorder = Recorder(job.plan)
    history: list[StepResult] = []
    ok = True
    try:
        history = run_training(job, recorder=recorder)
    except WorkerFailed as error:
        ok = False
        print(f"regrow chaos: the run did not recover: {error}", file=sys.stderr)
    if options.faults.reference and ok:
        print("[chaos] the fault-free reference run (same seed)", flush=True)
        with tempfile.TemporaryDirectory(prefix="regrow-chaos-reference-") as scratch:
            reference = run_training(reference_job(job, scratch))
            saved = options.checkpoint.active or options.snapshot.active
            ckpt_dir = options.checkpoint.ckpt_dir if saved else None
            report = build_report(recorder, history, ok=ok, reference=reference,
                                  checkpoints=(ckpt_dir, scratch) if ckpt_dir else None)
    else:
        report = build_report(recorder, history, ok=ok)
    emit(report, options.report_path())
    if not ok:
        return 1
    return 1 if report.get("reference", {}).get("identical_checkpoint") is False else 0


def reference_job(job: Job, ckpt_dir: str) -> Job:
    """``job`` without faults, restarts, resume or metrics, saving (and snapshotting) as it does into ``ckpt_dir``."""
    options = job.options
    reference = dataclasses.replace(
        options, launch=dataclasses.replace(options.launch, max_restarts=0),
        checkpoint=dataclasses.replace(options.checkpoint, ckpt_dir=ckpt_dir, resume=None),
        snapshot=dataclasses.replace(options.snapshot, ckpt_dir=ckpt_dir, resume=False))
    return Job(options=reference, config=dataclasses.replace(job.config, metrics_path=None), plan=[])
