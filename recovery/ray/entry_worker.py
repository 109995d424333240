"""One rank of a job in entry-point mode (``WorkerSpec.entry``): a Ray actor that calls the user's function, the
whole training loop, once per process-group generation.

Contract, as for ``worker.Worker``: the coordinator has every rank ``join`` generation g (process group formed), then
``prepare`` (nothing to do here: the function's Guard restores when it starts) and ``train``, which calls the
function with the entry's keyword arguments and, in its environment, ``RANK``, ``WORLD_SIZE`` and what
``EntryPoint.environment`` adds (the node's snapshot address, a run directory of this call, the attempt). When a
peer is lost the function raises (its collective fails: gloo by itself, NCCL once the coordinator aborts it from the
control thread); ``train`` reports the failure, the worker leaves the generation, and after the coordinator has
formed generation g+1 every rank, survivors included, calls the function again from the top: the user's objects
are rebuilt and its Guard restores the newest step every rank holds. The run ends when the function has returned on
every rank of one generation; :meth:`EntryWorker.results` then gives this rank's return value and its calls.

Progress: the worker cannot see the function's steps, so its heartbeat's ``step`` is None and its age is that of
the newest file in the call's run directory (the Guard's heartbeat beats there every step); before the function
writes any, the rank is never declared hung.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from regrow.comm.world import destroy_world
from regrow.recovery.ray.entry import EntryCall, EntryError, EntryPoint
from regrow.recovery.ray.member import GroupMember, describe_failure
from regrow.recovery.ray.worker import WorkerSpec

RECORD_LIMIT = 1 << 20
"""Bytes of the largest record file a call's result carries back (the Guard's records are a few hundred)."""


class EntryWorker(GroupMember):
    """One rank running the user's function; see the module docstring. Created by the coordinator like
    ``Worker`` (same constructor, same concurrency groups)."""

    def __init__(self, spec: WorkerSpec, rank: int, env: dict[str, str], *, standby: bool = False) -> None:
        """``standby``: started ahead of need (:meth:`adopt` gives it a rank); nothing here touches CUDA."""
        super().__init__(spec, rank, env)
        if spec.entry is None:
            raise ValueError("EntryWorker needs WorkerSpec.entry")
        self.entry: EntryPoint = spec.entry
        self._generation = 0
        self._root = Path(tempfile.mkdtemp(prefix="regrow-entry-"))
        self._run_dir: Path | None = None  # the running call's, read by the control thread's heartbeat
        self._calls: list[dict] = []
        self._returned: object = None

    # ------------------------------------------------------------------ control group
    def heartbeat(self) -> dict:
        """The age of the newest file the running call wrote in its run directory (0 before the first, and
        between calls); ``step`` is None (the worker cannot see the function's steps)."""
        folder = self._run_dir
        newest = _newest_change(folder) if folder is not None else None
        return {"rank": self.rank, "step": None, "seconds_since": 0.0 if newest is None else time.time() - newest}

    # ------------------------------------------------------------------ train group
    def join(self, generation: int, store_host: str, store_port: int, snapshot_address: str | None,
             resume: bool = False, rank: int | None = None, world_size: int | None = None) -> dict:
        """Forms process-group generation ``generation`` (``Worker.join``'s arguments; ``resume`` means nothing
        here, and the rank and world size never change: the coordinator refuses elastic mode for an entry)."""
        started = time.monotonic()
        self._leave_group()
        if (rank, world_size) not in ((None, None), (self.rank, self.world_size)):
            raise RuntimeError(f"rank {self.rank}: an entry point's job cannot change its ranks (elastic mode)")
        self._connect(generation, store_host, store_port)
        self.address, self._generation = snapshot_address, generation
        return {"rank": self.rank, "group_s": time.monotonic() - started, "build_s": 0.0}

    def prepare(self, resume: bool, lost_ranks: tuple[int, ...] = (), reshard: bool = False) -> dict:
        """Nothing is restored here: the function's Guard restores when the function starts."""
        return {"rank": self.rank, "step": None, "source": None, "attach_s": 0.0}

    def train(self, until: int) -> dict:
        """Calls the function once (``until`` is not used: the function decides how far it trains). Returns
        ``{"done": [], "error": None}`` when it returned a JSON value, else with ``error`` (one line: the error,
        where in the user's code it was raised, the abort's reason) and ``unwind`` as ``Worker.train`` reports
        them, and ``fatal`` when no new generation can help (the function does not import here, or returned
        something that is not JSON). The worker has left the generation then and stays usable."""
        run_dir = Path(tempfile.mkdtemp(prefix=f"g{self._generation}-", dir=self._root))
        call = EntryCall(rank=self.rank, world_size=self.world_size, generation=self._generation,
                         snapshot_address=self.address, run_dir=str(run_dir))
        started = time.monotonic()
        self._run_dir = run_dir
        why, fatal, value, failed_at = None, False, None, 0.0
        try:
            value = self._call(call)
        except EntryError as error:
            failed_at, why, fatal = time.monotonic(), str(error), True
        except Exception as error:  # noqa: BLE001 (any failure of the user's loop is the coordinator's to handle)
            failed_at, why = time.monotonic(), describe_failure(error) + _where(error, self.entry.module)
        self._run_dir = None
        self._calls.append({"rank": self.rank, "generation": self._generation, "error": why,
                            "seconds": round(time.monotonic() - started, 3), "records": _records(run_dir)})
        shutil.rmtree(run_dir, ignore_errors=True)
        if why is None:
            self._returned = value
            return {"done": [], "error": None}
        # Out of the except block: the traceback's frames (the user's model, optimizer, Guard) no longer hold the
        # groups.
        return {"done": [], "error": why, "fatal": fatal, "unwind": self._leave_after_failure(failed_at)}

    def results(self) -> dict:
        """This rank's return value from its last call that returned (``value``) and every call this worker made
        (``calls``: rank, generation, error or None, seconds, and ``records``: the JSON files the call left in
        its run directory, by name)."""
        return {"value": self._returned, "calls": list(self._calls)}

    def shutdown(self) -> None:
        """Leaves the process group and removes the calls' directories."""
        destroy_world()
        shutil.rmtree(self._root, ignore_errors=True)

    # ------------------------------------------------------------------
    def _call(self, call: EntryCall) -> object:
        """The function's value on this rank, as JSON values (a copy made through JSON, so no object of the
        user's reaches Ray's serialisation). Raises :class:`EntryError` when it does not import or returns
        something that is not JSON, else whatever the function raised."""
        function = self.entry.load()
        env = {"RANK": str(call.rank), "WORLD_SIZE": str(call.world_size)}
        os.environ.update(env | (self.entry.environment(call) if self.entry.environment is not None else {}))
        os.environ.setdefault("LOCAL_RANK", "0")
        value = function(**json.loads(json.dumps(self.entry.kwargs)))  # each call gets its own copy
        try:
            return json.loads(json.dumps(value))
        except (TypeError, ValueError) as error:
            raise EntryError(f"entry {self.entry.target} returned {type(value).__name__} on rank {call.rank}, which "
                             f"is not JSON ({error}): return numbers, strings, lists and dicts") from error


def _newest_change(folder: Path) -> float | None:
    """The newest modification time (wall clock) of a file directly in ``folder`` (None: none, or it is gone)."""
    try:
        with os.scandir(folder) as entries:
            times = [entry.stat().st_mtime for entry in entries if entry.is_file()]
    except OSError:
        return None
    return max(times, default=None)


def _records(folder: Path) -> dict[str, object]:
    """Every JSON file directly in ``folder`` up to :data:`RECORD_LIMIT` bytes, parsed, by name (files caught half
    written or too large are left out)."""
    found: dict[str, object] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            if path.is_file() and path.stat().st_size <= RECORD_LIMIT:
                found[path.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def _where(error: BaseException, module: str) -> str:
    """`` (at FILE:LINE in FUNCTION)``: the innermost frame of the user's code that the error came through: the
    entry's own ``module``, or any file outside regrow and the installed packages; empty when there is none."""
    own = getattr(sys.modules.get(module), "__file__", None)
    regrow = f"{Path(__file__).resolve().parents[2]}{os.sep}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == own or (
              "site-packages" not in frame.filename and not frame.filename.startswith(regrow))]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {frame.filename}:{frame.lineno} in {frame.name})"


__all__ = ["EntryWorker"]
