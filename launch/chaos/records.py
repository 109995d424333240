"""The small JSON files the ranks leave for the launcher's fault report, and how the launcher reads them back.

Nothing of the report is parsed from the ranks' output; the ranks write, in directories the launcher gives them:

- in the plan's fired-records directory (``REGROW_FAULTS_DIR``): ``fault-<i>.fired``, written once (by the first
  rank a fault hits, before it acts) with the rank, step, attempt and wall time, so that the ranks of a restarted
  attempt drop the faults already fired; and ``fault-<i>.detail``, what the fault did (time slept, the corrupted
  segment, the failed save);
- in the launcher's run directory (``REGROW_RUN_DIR``): ``restore-a<attempt>-r<rank>.json``, each rank's restore
  result (source, step, seconds, what was passed over and why), and ``straggler-a<attempt>-s<step>-r<rank>.json``,
  a straggler rank 0's monitor named (``recovery/stragglers.py``), and ``parity-a<attempt>-s<step>.json``, a state
  parity check that failed (``recovery/parity.py``: what disagreed, on which ranks). The heartbeats are
  ``launch/local/watchdog.py``'s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from regrow.recovery.order import JobRestore, Source


def write_json(path: Path, record: dict, *, exclusive: bool) -> bool:
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


def record_fired(fired_dir: str | Path, index: int, record: dict[str, Any]) -> bool:
    """Records fault ``index`` of the plan as fired; returns False when another rank already did."""
    return write_json(Path(fired_dir) / f"fault-{index}.fired", record, exclusive=True)


def write_detail(fired_dir: str | Path, index: int, detail: dict[str, Any]) -> None:
    """Records (replacing any earlier record) what fault ``index`` did, for the report."""
    write_json(Path(fired_dir) / f"fault-{index}.detail", detail, exclusive=False)


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


def details(fired_dir: str) -> dict[int, dict]:
    """Plan index -> what the fault did (:func:`write_detail`); a record caught half written is left out."""
    found = {}
    for path in Path(fired_dir).glob("fault-*.detail"):
        try:
            found[int(path.name.split("-")[1].split(".")[0])] = json.loads(path.read_text())
        except (ValueError, json.JSONDecodeError):
            continue
    return found


def attempt_rank(stem: str) -> tuple[int, int]:
    """``heartbeat-a1-r3`` or ``restore-a1-r3`` -> (1, 3)."""
    _, attempt, rank = stem.split("-")
    return int(attempt[1:]), int(rank[1:])


class RestoreLog:
    """The rank side of the restore records: one rank of one attempt, writing into the launcher's run directory."""

    def __init__(self, run_dir: str, *, attempt: int, rank: int) -> None:
        self.path = Path(run_dir) / f"restore-a{attempt}-r{rank}.json"

    def restored(self, result: JobRestore) -> None:
        """Records a restore through ``recovery.restore.restore_job`` (its source, step, time, passed-over sources)."""
        self._write(source=result.source, step=result.step, detail=result.detail, passed_over=result.passed_over,
                    seconds=result.seconds)

    def restored_checkpoint(self, step: int, resume: str) -> None:
        """Records a restore from the universal checkpoint ``--resume`` named (a directory, a root or ``latest``)."""
        self._write(source=Source.CHECKPOINT, step=step, detail=resume, passed_over=[], seconds=0.0)

    def _write(self, *, source: Source, step: int, detail: str, passed_over: list[str], seconds: float) -> None:
        record = {"source": source.value, "step": step, "detail": detail, "passed_over": list(passed_over),
                  "seconds": seconds, "time": time.time()}
        self.path.write_text(json.dumps(record))


def restores(run_dir: str) -> dict[int, dict[int, dict]]:
    """Attempt -> rank -> that rank's restore record."""
    found: dict[int, dict[int, dict]] = {}
    for path in Path(run_dir).glob("restore-a*-r*.json"):
        attempt, rank = attempt_rank(path.stem)
        found.setdefault(attempt, {})[rank] = json.loads(path.read_text())
    return found


def write_straggler(run_dir: str, attempt: int, straggler: dict[str, Any]) -> None:
    """Records a straggler the monitor named (``Straggler.to_dict()``), with the attempt and the wall time."""
    record = {**straggler, "attempt": attempt, "time": time.time()}
    name = f"straggler-a{attempt}-s{straggler['step']}-r{straggler['rank']}.json"
    write_json(Path(run_dir) / name, record, exclusive=False)


def write_parity(run_dir: str, attempt: int, failure: dict[str, Any]) -> None:
    """Records a failed state parity check (``StateParityError.to_dict()``), with the attempt and the wall time."""
    record = {**failure, "attempt": attempt, "time": time.time()}
    write_json(Path(run_dir) / f"parity-a{attempt}-s{failure['step']}.json", record, exclusive=False)


def parity_failures(run_dir: str) -> list[dict]:
    """Every failed parity check the ranks recorded, by attempt and step; a record caught half written is left
    out."""
    return sorted(_read_all(run_dir, "parity-a*-s*.json"), key=lambda r: (r["attempt"], r["step"]))


def stragglers(run_dir: str) -> list[dict]:
    """Every straggler the ranks recorded, by attempt and step; a record caught half written is left out."""
    return sorted(_read_all(run_dir, "straggler-a*-s*-r*.json"), key=lambda r: (r["attempt"], r["step"], r["rank"]))


def _read_all(run_dir: str, pattern: str) -> list[dict]:
    """The records of the files matching ``pattern`` in ``run_dir``, leaving out any caught half written."""
    found = []
    for path in Path(run_dir).glob(pattern):
        try:
            found.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return found
