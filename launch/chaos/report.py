"""The fault report of a run under a fault plan: built from the launcher's ``recorder.Recorder`` (which read what
the ranks recorded, ``records.py``), printed, and written as JSON.

:func:`build_report` turns the record into, per fault: whether and when it fired, how the failure was detected
(process exit code, no progress for N s, checksum mismatch at restore, the checkpoint writer's error), time to
detect, time to recover (node healing + rank start + restore, until every rank trains again), steps lost (the newest
step any rank had finished at the failure minus the step restored) and the recovery source (as the ranks' restore
results name it); and the final loss against a fault-free reference run with the same seed (``regrow chaos
--reference``), with the final checkpoints compared byte for byte when both runs saved one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from regrow.checkpoint.universal import storage
from regrow.launch.chaos.plan import CORRUPT_KINDS, CRASH_KINDS, Fault
from regrow.launch.chaos.recorder import Attempt, Recorder
from regrow.recovery.order import Source
from regrow.trainer.loop import StepResult


def finished_step(beat: dict) -> int:
    """The newest step a rank had finished at its last beat."""
    return beat["step"] - 1 if beat["phase"] == "optimizer" else beat["step"]


def _recovery(recorder: Recorder, attempt: Attempt) -> dict[str, Any]:
    """How attempt ``attempt.index + 1`` came back from ``attempt``'s failure."""
    assert attempt.failure is not None
    after = attempt.index + 1
    beats = recorder.beats.get(after, {})
    restores = recorder.restores.get(after, {})
    failed_step = max((finished_step(b) for b in recorder.beats.get(attempt.index, {}).values()), default=None)
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


def _detection(fault: Fault, seen: list[dict], describe: Callable[[dict], str], missed: str) -> dict[str, Any]:
    """How a monitor saw ``fault``: the first of its records ``seen`` (those naming the fault's rank at or after its
    step, in step order) as ``detected_by`` (``describe(record)``), ``detected_at_step`` and ``detect_steps`` (steps
    from the fault's first step to that record's); ``missed`` when none did."""
    if not seen:
        return {"detected_by": missed}
    first = seen[0]
    return {"detected_by": describe(first), "detected_at_step": first["step"],
            "detect_steps": first["step"] - fault.step + 1}


def _straggler_detection(recorder: Recorder, fault: Fault) -> dict[str, Any]:
    """The first window of the straggler monitor that named a ``slow-rank`` fault's rank (:func:`_detection`)."""
    return _detection(fault, [r for r in recorder.stragglers if r["rank"] == fault.target and r["step"] >= fault.step],
                      lambda r: f"straggler monitor: busy {r['ratio']:.2f}x the others' median in steps "
                                f"{r['first_step']}-{r['step']}",
                      "not named by the straggler monitor (off, or the slowdown stayed within the margin)")


def _parity_detection(recorder: Recorder, fault: Fault) -> dict[str, Any]:
    """The first failed state parity check that named a corruption's rank for what it corrupted (:func:`_detection`)."""
    what = "shard" if fault.kind == "corrupt-shard" else "parameters"
    seen = [r for r in recorder.parity_failures if r["step"] >= fault.step
            and any(d["what"] == what and fault.target in d["ranks"] for d in r["found"])]
    return _detection(fault, seen, lambda r: f"state parity check at step {r['step']}: {_parity_names(r)}",
                      "not seen by a state parity check (off, or no check in its steps)")


def _parity_names(record: dict) -> str:
    """The ranks a failed parity check named and what disagreed, as in ``rank(s) [1] (parameters)``."""
    return f"rank(s) {record['ranks']} ({', '.join(d['what'] for d in record['found'])})"


def _time_lost(failures: list[dict[str, Any]], faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the run's time went to faults: detection and recovery of each failure (from the fault firing to every
    rank training again), the steps trained again after the restores, and the stragglers' slowdown (with the part
    after the monitor named them)."""
    recovered = [f for f in failures if f.get("recovered")]
    return {"failures_s": round(sum((f["detect_s"] or 0.0) + f["recover_s"] for f in recovered), 3),
            "steps_rolled_back": sum(f["steps_lost"] or 0 for f in recovered),
            "stragglers_s": round(sum(item.get("lost_s", 0.0) for item in faults), 3),
            "stragglers_after_detection_s": round(sum(item.get("lost_after_detection_s", 0.0) for item in faults),
                                                  3)}


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
                      and recorder.plan[i].kind in CRASH_KINDS}
        entry: dict[str, Any] = {"attempt": attempt.index + 1, "faults": [str(recorder.plan[i]) for i in fired_here],
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
        parity = [r for r in recorder.parity_failures if r["attempt"] == attempt.index]
        if parity:
            entry["detected_by"].insert(0, f"state parity check at step {parity[0]['step']} failed: "
                                           f"{_parity_names(parity[0])}")
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
            item.update(_straggler_detection(recorder, fault))
            # Its steps cost the whole job that much; those after it was named are what replacing it would save.
            named_after = item.get("detect_steps", detail["steps"])
            item["lost_s"] = round(detail["slept_s"], 3)
            item["lost_after_detection_s"] = round(detail["slept_s"] * max(0, detail["steps"] - named_after)
                                                   / detail["steps"], 3)
        elif fault.kind == "fail-ckpt" and detail:
            item["outcome"] = (f"checkpoint of step {detail['step']} {detail['status']}: {detail['error']}; "
                               f"latest then: {detail['latest']}")
            item["detected_by"] = "checkpoint writer error (the save is given up, latest kept)"
        elif fault.kind == "corrupt-snapshot" and detail:
            item["corrupted"] = detail
        elif fault.kind in CORRUPT_KINDS and record:
            item["corrupted"] = detail
            if detail:
                item["outcome"] = (f"silent corruption: a bit of element {detail['element']} of rank "
                                   f"{fault.target}'s {detail['tensor']} flipped at the start of step {fault.step}")
            item.update(_parity_detection(recorder, fault))
        failure = next((f for f in failures if str(fault) in f["faults"]), None)
        if failure is not None:
            item["failure_attempt"] = failure["attempt"]
        fault_entries.append(item)
    report: dict[str, Any] = {
        "ok": ok, "plan": [str(f) for f in recorder.plan], "attempts": len(recorder.attempts),
        "restarts": max(0, len(recorder.attempts) - 1), "wall_s": round(recorder.ended - recorder.started, 2),
        "faults": fault_entries, "failures": failures, "stragglers": recorder.stragglers,
        "parity_failures": recorder.parity_failures,
        "time_lost": _time_lost(failures, fault_entries),
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


MANIFEST_VOLATILE = ("created", "writer", "checksum")
"""Manifest fields that say when and by which process a checkpoint was written, not what it holds (the checksum
covers those two as well)."""


def checkpoint_contents(root: Path) -> dict[str, bytes | dict] | None:
    """What the checkpoint ``latest`` under ``root`` holds: every file's bytes, the manifest as JSON without its
    :data:`MANIFEST_VOLATILE` fields (its step, tokens seen, data cursor, layout and file table stay in); None when
    there is no checkpoint."""
    name = storage.read_latest(root)
    if not name:
        return None
    latest = root / name
    contents: dict[str, bytes | dict] = {str(p.relative_to(latest)): p.read_bytes() for p in sorted(latest.rglob("*"))
                                         if p.is_file() and p.name != "manifest.json"}
    manifest = json.loads((latest / "manifest.json").read_text())
    contents["manifest.json"] = {k: v for k, v in manifest.items() if k not in MANIFEST_VOLATILE}
    return contents


def same_checkpoint(root: str, other: str) -> bool | None:
    """Whether the latest checkpoints of two roots hold the same state: byte-identical files and the same manifest
    but for when and by whom it was written (None: one has none)."""
    mine, theirs = checkpoint_contents(Path(root)), checkpoint_contents(Path(other))
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
            if "detected_at_step" in item:
                lines.append(f"  detected by: {item['detected_by']}, {item['detect_steps']} step(s) after it began")
            elif item["fault"].startswith("slow-rank"):
                lines.append(f"  detected by: {item['detected_by']}")
    lost = report.get("time_lost")
    if lost and (report["failures"] or lost["stragglers_s"]):
        lines.append(f"time lost: {lost['failures_s']:.2f} s to {len(report['failures'])} failure(s) (detection and "
                     f"recovery), {lost['steps_rolled_back']} step(s) trained again, {lost['stragglers_s']:.2f} s to "
                     f"stragglers ({lost['stragglers_after_detection_s']:.2f} s of it after they were named)")
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


def emit(report: dict[str, Any], path: Path | None) -> None:
    """Prints the report and, when ``path`` is given, writes it there as JSON."""
    print("\n" + format_report(report), flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}", flush=True)
