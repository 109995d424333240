"""``regrow ray --entry pkg.module:function``: the user's own training loop, fault-tolerant on a Ray cluster.

    regrow ray --address auto --workers 8 --ranks-per-node 4 --ec-group-size 2 --snapshot-every 1 \\
        --save-every 200 --ckpt-dir /shared/ckpt --entry examples.own_loop_ray:train --entry-kwargs '{"steps": 1000}'

Every worker actor calls the function once its process group is up (``regrow.join_world()`` finds it), with the
Guard's settings as JSON in ``REGROW_GUARD`` (``GuardConfig.to_env``) and its node's snapshot process in ``REGROW_SNAPSHOT_ADDRESS``; the
Guard the function creates restores and snapshots. After a failure the coordinator heals the job as for regrow's
own trainer and every rank calls the function again from the top (``recovery/ray/entry_worker.py``). The run ends
when the function has returned on every rank of one generation.

The driver imports the module first, to check the function and its arguments before any actor starts: the loop
belongs inside the function (a module that trains at import would train in the driver).

:class:`EntryJob` is the Python API the command wraps; :func:`recoveries` says what each failure cost, from the
records the Guards left (their heartbeats and restore results, as under the local launcher).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from regrow.launch.chaos.records import RestoreLog
from regrow.launch.chaos.report import finished_step
from regrow.launch.guard import GuardConfig
from regrow.launch.job import Job
from regrow.launch.local.attempts import ATTEMPT_ENV, RUN_DIR_ENV
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.local.watchdog import heartbeat_path
from regrow.recovery.ray.coordinator import Coordinator, CoordinatorConfig
from regrow.recovery.ray.entry import EntryCall, EntryPoint, check_entry
from regrow.recovery.ray.job import Outcome
from regrow.recovery.ray.worker import WorkerSpec

FRESH_START = "none: started at step 0"
"""The source of a rank whose Guard found nothing to restore."""


def call_environment(call: EntryCall) -> dict[str, str]:
    """What the Guard in the function reads of its call besides ``REGROW_GUARD``: the node's snapshot process, the
    run directory its heartbeat and restore result go to, and the attempt (the generation) they are named by. Runs
    in the worker (Ray sends this module-level function by reference)."""
    env = {ATTEMPT_ENV: str(call.generation), RUN_DIR_ENV: call.run_dir}
    if call.snapshot_address is not None:
        env[ADDRESS_ENV] = call.snapshot_address
    return env


@dataclass(frozen=True, kw_only=True)
class EntryResult:
    """What an entry-point run did."""

    returns: list[Any]
    """Each rank's return value, from the generation in which the function returned on every rank."""
    failures: int
    """Failures healed."""
    recoveries: list[dict[str, Any]]
    """What each rerun restored and lost (:func:`recoveries`)."""
    outcome: Outcome
    """The coordinator's outcome (with every rank's calls and their records)."""

    def report(self) -> dict[str, Any]:
        """The run as JSON values."""
        return {"returns": self.returns, "failures": self.failures, "recoveries": self.recoveries}


class EntryJob:
    """The user's function on the Ray cluster ``ray`` is connected to, one worker per rank of ``config``. ``guard``:
    the settings of the Guard the function creates (``GuardConfig.from_env`` reads them in the workers); the
    coordinator starts a snapshot process per node when ``guard.snapshot_every`` > 0, and each rank uses its node's
    (so ``guard.snapshot_address`` must stay None). ``env``: more environment for every worker (e.g. a fault plan's,
    ``chaos.plan.plan_env``). Checks the entry point here, before any actor starts (``EntryError``). The
    :attr:`coordinator` is there to be watched or acted on (a test removes the node of one of its ranks) while
    :meth:`run` runs."""

    def __init__(self, entry: EntryPoint, config: CoordinatorConfig, *, guard: GuardConfig, device: str = "cpu",
                 env: dict[str, str] | None = None, log: Callable[[str], None] | None = None,
                 on_event: Callable[[dict], None] | None = None) -> None:
        if guard.snapshot_address is not None:
            raise ValueError(f"GuardConfig.snapshot_address={guard.snapshot_address!r}: under Ray every rank uses "
                             "its own node's snapshot process, which the coordinator starts; leave it None")
        check_entry(entry)
        spec = WorkerSpec(entry=dataclasses.replace(entry, environment=call_environment), world_size=config.workers,
                          device=device, snapshot_every=guard.snapshot_every, ckpt_dir=guard.ckpt_dir,
                          timeout_s=guard.timeout_s)
        self.coordinator = Coordinator(config, spec, env={**(env or {}), **guard.to_env()}, log=log,
                                       on_event=on_event)

    def run(self) -> EntryResult:
        """Runs the job to its end (``Coordinator.run_entry``); raises ``CoordinatorError``."""
        outcome = self.coordinator.run_entry()
        return EntryResult(returns=list(outcome.returns or []), failures=outcome.failures,
                           recoveries=recoveries(outcome.calls), outcome=outcome)


def recoveries(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each failure cost, from the calls' records (``EntryWorker.results``): for each generation that called the
    function after the first, ``restored_step`` (the step its ranks restored, the oldest if they differ),
    ``sources`` (restore source -> ranks, as each Guard's restore result names it; :data:`FRESH_START` when it
    found nothing), ``failed_at_step`` (the newest step a rank had finished in the generation before, from their
    heartbeats; None when no record of it survived: its ranks' workers were lost) and ``steps_lost`` (how many
    finished steps were trained again)."""
    by_generation: dict[int, dict[int, dict]] = {}
    for call in calls:
        by_generation.setdefault(int(call["generation"]), {})[int(call["rank"])] = call["records"]
    generations = sorted(by_generation)
    rows = []
    for before, generation in zip(generations, generations[1:]):
        restored, sources = {}, {}
        for rank, records in sorted(by_generation[generation].items()):
            step, source = _restored(records, generation, rank)
            if step is not None:
                restored[rank] = step
                sources.setdefault(source, []).append(rank)
        beats = [records.get(heartbeat_path(".", before, rank).name) for rank, records in by_generation[before].items()]
        failed_at = max((finished_step(beat) for beat in beats if beat), default=None)
        step = min(restored.values(), default=None)
        lost = None if failed_at is None or step is None else max(0, failed_at - step)
        rows.append({"generation": generation, "restored_step": step, "sources": sources,
                     "failed_at_step": failed_at, "steps_lost": lost})
    return rows


def _restored(records: dict[str, Any], generation: int, rank: int) -> tuple[int | None, str]:
    """The step and source a rank's call restored: its Guard's restore result, else the step its heartbeat started
    at (a fresh start); (None, "") when the call left neither."""
    result = records.get(RestoreLog(".", attempt=generation, rank=rank).path.name)
    if result:
        return int(result["step"]), str(result["source"])
    beat = records.get(heartbeat_path(".", generation, rank).name)
    if beat:
        return int(beat["start_step"]), FRESH_START
    return None, ""


def guard_config(job: Job) -> GuardConfig:
    """The Guard's settings of a ``regrow ray --entry`` command line."""
    checkpoint = job.options.checkpoint
    return GuardConfig(snapshot_every=job.options.ray.snapshot_every, save_every=checkpoint.save_every,
                       ckpt_dir=checkpoint.ckpt_dir, keep_last=checkpoint.keep_last, on_error=checkpoint.on_error,
                       parity_every=job.options.faults.parity_every)


def run_command(job: Job, config: CoordinatorConfig, env: dict[str, str]) -> int:
    """``regrow ray --entry``'s run once Ray is connected: prints every rank's return value and what each failure
    cost, and writes them as JSON to ``--report`` when given. Returns the exit code; raises ``CoordinatorError``."""
    options = job.options
    entry = EntryPoint.for_driver(str(options.ray.entry), options.ray.entry_arguments())
    device = "cuda" if options.ray.gpus_per_worker else "cpu"
    result = EntryJob(entry, config, guard=guard_config(job), device=device, env=env).run()
    print(f"regrow ray: {entry.target} returned on all {len(result.returns)} ranks with {result.failures} "
          f"failure(s) healed")
    for row in result.recoveries:
        lost = "" if row["steps_lost"] is None else f", {row['steps_lost']} step(s) trained again"
        sources = "; ".join(f"{source}: ranks {ranks}" for source, ranks in row["sources"].items())
        print(f"  generation {row['generation']}: restored step {row['restored_step']} ({sources}){lost}")
    for rank, value in enumerate(result.returns):
        text = json.dumps(value)
        print(f"  rank {rank} returned {text if len(text) <= 200 else text[:200] + '...'}")
    path = options.report_path()
    if path is not None:
        path.write_text(json.dumps(result.report(), indent=1))
    return 0
