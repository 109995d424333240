"""The fault report of a run under a fault plan, and ``regrow chaos``.

What is recorded, and by whom (nothing is parsed from the ranks' output):

- the launcher (:class:`Recorder`, driven by ``cli.run_training``): when each attempt started, how it failed (the
  ``WorkerFailed`` it saw: exit codes of the ranks already dead, or :class:`~regrow.launch.local.watchdog.RankHung`), the
  wall time it saw the failure, and what healing the nodes took;
- the ranks, in the launcher's run directory (``REGROW_RUN_DIR``): each fault as it fires (``faults.py``),
  heartbeats (``watchdog.py``: the step an attempt started from, and how far each rank got), and every rank's
  restore result (:func:`restore_recorder`: source, step, seconds, what was passed over and why).

:func:`build_report` turns these into, per fault: whether and when it fired, how the failure was detected (process
exit code, no progress for N s, checksum mismatch at restore, the checkpoint writer's error), time to detect, time
to recover (node healing + rank start + restore, until every rank trains again), steps lost (the newest step any
rank had finished at the failure minus the step restored) and the recovery source; and the final loss against a
fault-free reference run with the same seed (``regrow chaos --reference``), with the final checkpoints compared
byte for byte when both runs saved one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from regrow.checkpoint.universal import storage
from regrow.launch.chaos import faults
from regrow.launch.chaos.faults import Fault
from regrow.launch.local.nodes import HealReport
from regrow.launch.local.spawn import WorkerFailed
from regrow.launch.local.watchdog import RankHung, read_beat
from regrow.recovery.order import JobRestore, Source
from regrow.trainer.loop import StepResult

RUN_DIR_ENV = "REGROW_RUN_DIR"
"""The launcher's run directory, where ranks write heartbeats and restore results (set when they are wanted)."""


# ---------------------------------------------------------------------------------------------------- rank side
def restore_recorder(run_dir: str, attempt: int, rank: int) -> Callable[[JobRestore], None]:
    """A ``snapshot_cli.prepare(on_restore=...)`` callback that writes ``restore-a<attempt>-r<rank>.json``."""

    def record(result: JobRestore) -> None:
        record_restore(run_dir, attempt, rank, source=result.source, step=result.step, detail=result.detail,
                       passed_over=result.passed_over, seconds=result.seconds)

    return record


def record_restore(run_dir: str, attempt: int, rank: int, *, source: str, step: int, detail: str = "",
                   passed_over: Sequence[str] = (), seconds: float = 0.0) -> None:
    """Writes one rank's restore result for the launcher's report."""
    record = {"source": source, "step": step, "detail": detail, "passed_over": list(passed_over),
              "seconds": seconds, "time": time.time()}
    (Path(run_dir) / f"restore-a{attempt}-r{rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------- launcher side
@dataclasses.dataclass
class Attempt:
    """One attempt of the local launcher, as it saw it."""

    index: int
    started: float
    ended: float = 0.0
    failure: dict | None = None
    """``{"reason", "detected_by", "exitcodes", "time"}`` when the attempt failed."""
    heal: dict | None = None
    """What healing the nodes before the next attempt did (``HealReport`` as a dict)."""


class Recorder:
    """The launcher's record of one run under a fault plan (attempts are numbered from 0 here, from 1 in the
    report and the launcher's log). ``cli.run_training`` calls :meth:`begin`,
    :meth:`failed`, :meth:`healed` and :meth:`finished` around the attempts and :meth:`collect` before its run
    directory is removed; :func:`build_report` reads it."""

    def __init__(self, plan: list[Fault], *, hang_timeout_s: float = 0.0) -> None:
        self.plan = plan
        self.hang_timeout_s = hang_timeout_s
        self.attempts: list[Attempt] = []
        self.fired: dict[int, dict] = {}
        self.details: dict[int, dict] = {}
        self.beats: dict[int, dict[int, dict]] = {}
        self.restores: dict[int, dict[int, dict]] = {}
        self.started = time.time()
        self.ended = 0.0

    def begin(self, attempt: int) -> None:
        self.attempts.append(Attempt(index=attempt, started=time.time()))

    def finished(self, attempt: int) -> None:
        self.attempts[-1].ended = time.time()

    def failed(self, attempt: int, error: WorkerFailed) -> None:
        now = time.time()
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        self.attempts[-1].ended = now
        self.attempts[-1].failure = {"reason": lines[0] if lines else type(error).__name__,
                                     "last_line": lines[-1] if len(lines) > 1 else "",
                                     "detected_by": _detection(error), "exitcodes": dict(error.exitcodes),
                                     "time": now}

    def healed(self, attempt: int, report: HealReport | None) -> None:
        if report is not None:
            self.attempts[-1].heal = dataclasses.asdict(report)

    def collect(self, run_dir: str) -> None:
        """Reads what the ranks wrote (call before ``run_dir`` is removed)."""
        self.ended = time.time()
        root = Path(run_dir)
        self.fired = faults.fired_records(run_dir)
        for path in root.glob("fault-*.detail"):
            try:
                self.details[int(path.name.split("-")[1].split(".")[0])] = json.loads(path.read_text())
            except (ValueError, json.JSONDecodeError):
                continue
        for path in root.glob("heartbeat-a*-r*.json"):
            attempt, rank = _attempt_rank(path.stem)
            beat = read_beat(path)
            if beat is not None:
                self.beats.setdefault(attempt, {})[rank] = beat
        for path in root.glob("restore-a*-r*.json"):
            attempt, rank = _attempt_rank(path.stem)
            self.restores.setdefault(attempt, {})[rank] = json.loads(path.read_text())


def _attempt_rank(stem: str) -> tuple[int, int]:
    """``heartbeat-a1-r3`` -> (1, 3)."""
    _, attempt, rank = stem.split("-")
    return int(attempt[1:]), int(rank[1:])


def _detection(error: WorkerFailed) -> str:
    """How the launcher noticed the failure, in words."""
    if isinstance(error, RankHung):
        return f"no progress for {error.stalled_s:.1f} s (watchdog, --hang-timeout): rank(s) {error.ranks}"
    killed = {rank: code for rank, code in error.exitcodes.items() if code < 0}
    if killed:
        parts = []
        for rank, code in sorted(killed.items()):
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            parts.append(f"rank {rank} killed by {name} (exit code {code})")
        return "process exit: " + ", ".join(parts)
    failed = {rank: code for rank, code in error.exitcodes.items() if code}
    if failed:
        return "process exit: " + ", ".join(f"rank {r} exit code {c}" for r, c in sorted(failed.items()))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return f"rank error: {lines[0].rstrip(':')}" + (f" {lines[-1]}" if len(lines) > 1 else "")


# ---------------------------------------------------------------------------------------------------- the report
def _finished_step(beat: dict) -> int:
    """The newest step a rank had finished at its last beat."""
    return beat["step"] - 1 if beat["phase"] == "optimizer" else beat["step"]


def _recovery(recorder: Recorder, attempt: Attempt) -> dict[str, Any]:
    """How attempt ``attempt.index + 1`` came back from ``attempt``'s failure."""
    assert attempt.failure is not None
    after = attempt.index + 1
    beats = recorder.beats.get(after, {})
    restores = recorder.restores.get(after, {})
    failed_step = max((_finished_step(b) for b in recorder.beats.get(attempt.index, {}).values()), default=None)
    out: dict[str, Any] = {"failed_at_step": failed_step, "heal_s": attempt.heal["seconds"] if attempt.heal else 0.0,
                           "heal": attempt.heal}
    if not beats:
        out.update(recovered=False, note="no attempt trained after this failure")
        return out
    restored = min(b["start_step"] for b in beats.values())
    sources: dict[str, list[int]] = {}
    for rank, record in sorted(restores.items()):
        sources.setdefault(record["source"], []).append(rank)
    if not restores:
        sources = {"none: restarted from step 0" if restored == 0 else Source.CHECKPOINT.value: sorted(beats)}
    resumed = max(b["start_time"] for b in beats.values())
    out.update(recovered=True, restored_step=restored,
               steps_lost=None if failed_step is None else max(0, failed_step - restored),
               source=", ".join(f"{source} (ranks {ranks})" for source, ranks in sources.items()),
               restore_s=max((r["seconds"] for r in restores.values()), default=0.0),
               recover_s=round(resumed - attempt.failure["time"], 3),
               passed_over=sorted({reason for r in restores.values() for reason in r["passed_over"]}))
    return out


def build_report(recorder: Recorder, history: Sequence[StepResult], *, ok: bool = True,
                 reference: Sequence[StepResult] | None = None, checkpoints: tuple[str, str] | None = None
                 ) -> dict[str, Any]:
    """The report as a JSON-able dict (see the module docstring). ``history``: the last attempt's steps;
    ``reference``: a fault-free run's; ``checkpoints``: the two runs' checkpoint roots, compared byte for byte."""
    failures = []
    for attempt in recorder.attempts:
        if attempt.failure is None:
            continue
        fired_here = {i: r for i, r in recorder.fired.items() if r.get("attempt") == attempt.index
                      and recorder.plan[i].kind in faults.CRASH_KINDS}
        entry: dict[str, Any] = {"attempt": attempt.index + 1, "faults": [recorder.plan[i].__str__() for i in fired_here],
                                 "reason": attempt.failure["reason"], "detected_by": [attempt.failure["detected_by"]]}
        fired_at = min((r["time"] for r in fired_here.values() if "time" in r), default=None)
        entry["detect_s"] = round(attempt.failure["time"] - fired_at, 3) if fired_at is not None else None
        entry.update(_recovery(recorder, attempt))
        heal = attempt.heal or {}
        if heal.get("replaced"):
            rebuilt = ", ".join(f"node {node} rebuilt at step {step} from its group"
                                for node, step in sorted(heal["rebuilt"].items()))
            entry["detected_by"].append(f"snapshot process of node(s) {heal['replaced']} gone (launcher)"
                                        + (f"; {rebuilt}" if rebuilt else ""))
        mismatches = [reason for reason in entry.get("passed_over", []) if "checksum" in reason]
        if mismatches:
            entry["detected_by"].append(f"checksum mismatch at restore: {mismatches[0]}")
        failures.append(entry)
    fault_entries = []
    for index, fault in enumerate(recorder.plan):
        record = recorder.fired.get(index)
        item: dict[str, Any] = {"fault": str(fault), "fired": record is not None}
        if record:
            item.update({key: record[key] for key in ("rank", "step", "attempt") if key in record})
        detail = recorder.details.get(index)
        if fault.kind == "slow-rank" and detail:
            item["outcome"] = (f"straggler: slept {detail['slept_s']:.2f} s over {detail['steps']} steps "
                               f"(x{fault.slow_factor:g} its step time); no restart needed")
        elif fault.kind == "fail-ckpt" and detail:
            item["outcome"] = (f"checkpoint of step {detail['step']} {detail['status']}: {detail['error']}; "
                               f"latest then: {detail['latest']}")
            item["detected_by"] = "checkpoint writer error (the save is given up, latest kept)"
        elif fault.kind == "corrupt-snapshot" and detail:
            item["corrupted"] = detail
        failure = next((f for f in failures if str(fault) in f["faults"]), None)
        if failure is not None:
            item["failure_attempt"] = failure["attempt"]
        fault_entries.append(item)
    report: dict[str, Any] = {
        "ok": ok, "plan": [str(f) for f in recorder.plan], "attempts": len(recorder.attempts),
        "restarts": max(0, len(recorder.attempts) - 1), "wall_s": round(recorder.ended - recorder.started, 2),
        "faults": fault_entries, "failures": failures,
    }
    if history:
        report["final"] = {"step": history[-1].step, "loss": history[-1].loss}
    if reference:
        ref = {"step": reference[-1].step, "loss": reference[-1].loss}
        if history:
            ref["loss_difference"] = history[-1].loss - reference[-1].loss
            losses = {r.step: r.loss for r in reference}
            ref["identical_losses_since_restore"] = all(losses.get(r.step) == r.loss for r in history)
        report["reference"] = ref
    if checkpoints is not None:
        report.setdefault("reference", {})["identical_checkpoint"] = same_checkpoint(*checkpoints)
    return report


def tensor_files(root: Path) -> dict[str, bytes] | None:
    """Every tensor file of ``latest`` under ``root`` (the manifest differs in its creation time only); None when
    there is no checkpoint."""
    name = storage.read_latest(root)
    if not name:
        return None
    latest = root / name
    return {str(p.relative_to(latest)): p.read_bytes() for p in sorted(latest.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def same_checkpoint(root: str, other: str) -> bool | None:
    """Whether the latest checkpoints of two roots hold byte-identical tensor files (None: one has none)."""
    mine, theirs = tensor_files(Path(root)), tensor_files(Path(other))
    if mine is None or theirs is None:
        return None
    return mine == theirs


def format_report(report: dict[str, Any]) -> str:
    """The report for people: one block per failure, the other faults, the final loss against the reference."""
    status = "recovered" if report["ok"] else "FAILED"
    lines = [f"## fault report: {status}, {report['restarts']} restart(s), {report['wall_s']:.1f} s",
             f"plan: {', '.join(report['plan']) or '(none)'}"]
    for failure in report["failures"]:
        lines.append(f"- attempt {failure['attempt']} failed ({', '.join(failure['faults']) or 'no planned fault'}):"
                     f" {failure['reason']}")
        first, *then = failure["detected_by"]
        lines.append(f"  detected by: {first}"
                     + (f", {failure['detect_s']:.2f} s after the fault fired" if failure["detect_s"] is not None
                        else "") + "".join(f"; then {more}" for more in then))
        if failure.get("recovered"):
            lines.append(f"  recovered in {failure['recover_s']:.2f} s (node healing {failure['heal_s']:.2f} s, "
                         f"restore {failure['restore_s']:.2f} s): restored step {failure['restored_step']} from "
                         f"{failure['source']}; failed after step {failure['failed_at_step']}, "
                         f"{failure['steps_lost']} step(s) lost")
        else:
            lines.append(f"  not recovered: {failure.get('note', '')}")
    for item in report["faults"]:
        if not item["fired"]:
            lines.append(f"- {item['fault']}: did not fire")
        elif "outcome" in item:
            lines.append(f"- {item['fault']}: {item['outcome']}")
    if "final" in report:
        final = report["final"]
        text = f"final: step {final['step']}, loss {final['loss']:.6f}"
        ref = report.get("reference")
        if ref and "loss" in ref:
            same = "identical" if ref.get("loss_difference") == 0 else f"difference {ref['loss_difference']:+.3e}"
            text += f"; fault-free reference loss {ref['loss']:.6f} ({same})"
        if ref and "identical_checkpoint" in ref:
            text += {True: "; final checkpoints bit-identical", False: "; final checkpoints DIFFER",
                     None: "; no final checkpoint to compare"}[ref["identical_checkpoint"]]
        lines.append(text)
    return "\n".join(lines)


def report_path(args: argparse.Namespace) -> Path | None:
    """``--report FILE``, else ``<metrics stem>-report.json`` next to ``--metrics`` (not a metrics file the demo
    keeps in a scratch directory), else None."""
    if getattr(args, "report", None):
        return Path(args.report)
    if getattr(args, "metrics", None) and not getattr(args, "metrics_is_scratch", False):
        metrics = Path(args.metrics)
        return metrics.with_name(metrics.stem + "-report.json")
    return None


def emit(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Prints the report and writes it as JSON where :func:`report_path` says."""
    print("\n" + format_report(report), flush=True)
    path = report_path(args)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}", flush=True)


# ---------------------------------------------------------------------------------------------------- regrow chaos
Runner = Callable[..., list[StepResult]]
"""``cli.run_training``'s signature: ``(config, launch, checkpointing, snapshotting, recorder=...)``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``regrow chaos``'s own flags (the training and fault flags are ``regrow train``'s)."""
    parser.add_argument("--reference", action="store_true",
                        help="also run the same training without faults (same seed) and compare the final loss and "
                             "the final checkpoints")


def run_chaos(args: argparse.Namespace, config: Any, launch: Any, checkpointing: Any, snapshotting: Any,
              run: Runner) -> int:
    """``regrow chaos``: the run under its plan, then (``--reference``) the fault-free run, then the report.
    Exit 0 when the faulted run finished (and matched the reference's final checkpoint, when compared)."""
    recorder = Recorder(launch.faults, hang_timeout_s=launch.hang_timeout_s)
    history: list[StepResult] = []
    ok = True
    try:
        history = run(config, launch, checkpointing, snapshotting, recorder=recorder)
    except WorkerFailed as error:
        ok = False
        print(f"regrow chaos: the run did not recover: {error}", file=sys.stderr)
    reference, roots = None, None
    if args.reference and ok:
        print("[chaos] the fault-free reference run (same seed)", flush=True)
        with tempfile.TemporaryDirectory(prefix="regrow-chaos-reference-") as scratch:
            ref_ckpt = dataclasses.replace(checkpointing, ckpt_dir=scratch, resume=None) if checkpointing else None
            ref_snap = dataclasses.replace(snapshotting, ckpt_dir=scratch, resume=False) if snapshotting else None
            reference = run(dataclasses.replace(config, metrics_path=None),
                            dataclasses.replace(launch, faults=[], max_restarts=0), ref_ckpt, ref_snap)
            ckpt_dir = (checkpointing.ckpt_dir if checkpointing else None) or \
                (snapshotting.ckpt_dir if snapshotting else None)
            report = build_report(recorder, history, ok=ok, reference=reference,
                                  checkpoints=(ckpt_dir, scratch) if ckpt_dir else None)
    else:
        report = build_report(recorder, history, ok=ok, reference=reference, checkpoints=roots)
    emit(report, args)
    if not ok:
        return 1
    return 1 if report.get("reference", {}).get("identical_checkpoint") is False else 0
