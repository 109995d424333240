"""What a failure costs a Ray-coordinated job: regrow (in-memory snapshot every step, survivors healed in place)
against a DeepSpeed-style baseline (universal checkpoint every ``--save-every`` steps, whole-job restart from disk).

One driver process (``bench/run_gpu_ray.sh`` runs it) starts a one-node Ray instance of its own
(``ray.init(address="local", num_gpus=N, num_cpus=..., include_dashboard=False)``) and runs three jobs of
``--workers`` ``Worker`` actors through ``regrow.recovery.ray.coordinator.Coordinator``, one after the other::

    python bench/bench_ray_recovery.py --workers 4 --json out.jsonl --markdown out.md

The model is the GPT ``--preset`` (350m on GPUs, tiny for the CPU smoke test) trained by regrow's ``Trainer``
(ZeRO-2, 8-bit Adam state, bf16 working parameters, micro-batch ``--micro-batch`` per rank), as in
``bench_checkpoint.py``. A driver thread polls rank 0's ``heartbeat`` on the ``control`` concurrency group every
``--poll-ms``; each answer gives the last finished step and how long ago it finished, hence that step's completion
time on the coordinator's clock (``Coordinator.elapsed()``, the clock of the events' ``t``).

1. **regrow** (``snapshot_every=1``): ``--warmup`` steps, a clean window of ``--window`` steps (``step_ms_on``),
   then ``--kills`` failures ``--kill-gap`` steps apart: the thread logs a ``bench_kill`` event and
   ``ray.kill(worker, no_restart=True)`` (ranks from ``--kill-ranks``; rank 0 is left alone by default so that its
   heartbeat stays readable), the coordinator detects, aborts the survivors, replaces the rank, restores and
   resumes; ``--tail`` steps after the last kill. Per failure, from the events JSONL and the heartbeats: kill ->
   ``failure_detected``, kill -> ``restored``, kill -> ``resumed``, kill -> first step completed after the restore
   (``downtime_s``), the steps re-done (the step rank 0 had reached minus the step restored) and the restore
   sources.
2. **baseline** (``snapshot_every=0``, a ``CheckpointWriter`` sink saving every ``--save-every`` steps through
   ``WorkerSpec.extra_sinks``; fsync off unless ``--fsync``, as DeepSpeed does not fsync): the same warm-up and
   window without snapshots (``step_ms_off``: the snapshot overhead is ``step_ms_on / step_ms_off - 1``, same
   steps, same session), the save at step ``--save-every`` and ``--save-tail`` steps after it. ``save_stall_s``: the
   time of the steps from the one before the save to the one before the last, minus as many steady steps (the host
   copy, and whatever the persist thread takes from the training while it writes). The last step waits for the
   save to commit, so that the restart below finds it.
3. **baseline restart**: a new ``Coordinator`` whose ``run(..., resume=True)`` starts new actors (process, CUDA and
   NCCL initialisation, ``Trainer``), loads ``latest`` from the checkpoint directory and trains ``--resume-steps``
   steps: ``restart_s`` is from before the ``Coordinator`` is made to the first step completed after the load. The
   detection of the failure is taken as regrow's (Ray reports an actor's death the same way in both), and the
   teardown of the failed job is not counted (in the baseline's favour).

**Goodput** (share of wall-clock time advancing training) with one failure every ``--periods`` seconds is then
COMPUTED from these measured figures, not run with failures at that interval (the goodput phases below measure
it)::

    goodput = (1 - steady overhead) * (1 - lost seconds per failure / T)

regrow: steady overhead = ``1 - step_ms_off / step_ms_on`` (the snapshot cost, clamped at 0), lost = mean
``downtime_s`` + mean re-done steps x ``step_ms_on``. Baseline: steady overhead = ``save_stall_s`` amortised over
``--save-every`` steps, lost = detection + ``restart_s`` + ``--save-every`` / 2 steps re-done on average x
``step_ms_off``.

**Goodput MEASURED** (``--phases goodput-regrow,goodput-baseline``, not in the default set: each takes
``--goodput-duration`` D seconds plus the start): each job is trained for D seconds of wall clock counted from its
first completed step (the coordinator is given a step count it never reaches and stopped at D with
``Coordinator.stop``; a stop on purpose makes the phase complete, not failed), and a
worker actor is killed (a ``bench_kill`` event, then ``ray.kill(..., no_restart=True)``; ranks N-1, ..., 1 in turn,
or ``--kill-ranks`` less rank 0) every ``--goodput-interval`` T seconds, the first ``--goodput-first`` seconds in
(default T/2, so that D/T failures fall within D). A kill, and the stop, wait until the previous failure has been
recovered from (a process-group generation formed since, and a step trained after it; the stop at most
``--phase-timeout`` more seconds).

4. **goodput-regrow** (``snapshot_every=1``, or ``--snapshot-every``): the coordinator heals each failure in place.
5. **goodput-baseline** (``snapshot_every=0``, a ``CheckpointWriter`` every ``--save-every`` steps): each kill
   stops the whole job (the coordinator stopped with ``Coordinator.stop`` rather than heal, and every worker killed
   as a launcher kills the processes of a failed job) and a new ``Coordinator`` resumes it
   (``run(..., resume=True)``: new actors, ``latest`` loaded from the checkpoint directory), within the same
   wall-clock budget; the steps since the last committed checkpoint are re-done.
6. **goodput-clean** (``snapshot_every=0``, no saves, no kill): the same job for D seconds, the reference.

goodput = (distinct steps advanced within D: the step the training state had reached at D minus the first step,
re-done steps counted once) x reference step time / D. The reference step time is one for every phase:
goodput-clean's mean step over its D when it ran (equivalently, goodput = steps advanced / goodput-clean's steps
advanced: the GPUs' drift over minutes, a few per cent, is then in the reference too); else goodput-baseline's
clean step before its first save (snapshots off, no save yet: the steps from the first plus up to
``--warmup`` to ``--save-every`` - 1; else before its first kill; else the baseline phase's ``step_ms_off``, else
each phase's own), so that regrow's snapshot cost and the baseline's saves count as lost time and the ratio
regrow / baseline is that of the steps advanced. Reported per phase: goodput, failures injected and recovered,
first and final step, steps re-done, mean kill -> first step after the restore, and the ratio.

**Goodput ACCOUNTED** (each phase that kills, from its own step completions, so that no other run's drift enters):
the lost seconds within D added up, ``1 - lost / D``: each kill -> first step after its restore, the steps re-done x
the mean step at the other positions, and the excess of the steps at the snapshot (save) positions, ``s mod N`` in
0-2 for a snapshot (save) every N steps (the copy of step s lands on step s + 1), over that mean. Not in it: a step
time that changes after a restore (reported apart, as the mean step after the first restore over the mean step
before the first kill; the clean run's own drift is of the same order), and so is any cost spread over every step
(the CPU's copy thread): it fits where a snapshot's cost falls on those positions, as on CUDA (the copy overlaps
step s + 1's backward; on 2 x H200 no other position was 0.5 ms above the rest). Where a GPU host
runs a command for 10 minutes at most: run the phases in separate calls and merge their results with
``--combine a.jsonl b.jsonl`` (no Ray, no run).

Prints ``RESULT {json}`` (every raw figure, the events included) and the markdown table; appends the line to
``--json`` and writes the table to ``--markdown``. ``--device cpu --preset tiny`` (gloo, local Ray) is the smoke
test. Every Ray actor and the Ray instance are shut down however it ends (SIGTERM included: the job in progress is
stopped with ``Coordinator.stop``, its workers killed if its run has not returned within a few seconds, the phases
done so far are still reported, a goodput phase cut short as truncated). A job that runs past ``--phase-timeout``
(a hang) is stopped (``Coordinator.stop``) and given up, and the next phases still run; the result's ``status`` is
then "partial" with the reason under ``errors``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

# bench/ is this script's folder (sys.path[0]): share bench_zero's optimizer settings; the analysis is
# ray_goodput's.
from bench_zero import BETAS, EPS, LR, MAX_GRAD_NORM, WEIGHT_DECAY
from ray_goodput import (
    GOODPUT_PHASES,
    analyse_goodput,
    combine,
    completions,
    failures,
    first_event,
    first_step_after,
    fmt,
    goodput,
    goodput_markdown,
    goodput_summary,
    mean,
    ms,
    pct,
    r3,
    span_s,
    step_durations,
    step_times,
    window_step_s,
)

from regrow.checkpoint.universal.writer import CheckpointWriter, WriterConfig
from regrow.recovery.ray.coordinator import Coordinator, CoordinatorConfig
from regrow.recovery.ray.worker import CONTROL, WorkerSpec
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.state import ShardState, StateSink
from regrow.trainer.zero.config import ZeroConfig


def log(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="350m", help="GPTConfig preset: 350m on GPUs, tiny for the CPU smoke test")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--workers", type=int, default=4, help="ranks, one Ray actor each (one GPU each on cuda)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, default=40, help="steps before the clean window")
    parser.add_argument("--window", type=int, default=20, help="clean steps timed (steady step time)")
    parser.add_argument("--kills", type=int, default=2, help="worker actors killed in the regrow run")
    parser.add_argument("--kill-gap", type=int, default=30, help="steps between kills")
    parser.add_argument("--kill-ranks", default="", help="comma list of the ranks killed, in order (default: "
                                                         "N-1, N-2, ..., 1, cycling; rank 0 is polled)")
    parser.add_argument("--tail", type=int, default=10, help="steps after the last kill")
    parser.add_argument("--save-every", type=int, default=100, help="baseline checkpoint interval (steps)")
    parser.add_argument("--save-tail", type=int, default=10, help="baseline steps after the save")
    parser.add_argument("--resume-steps", type=int, default=3, help="steps the baseline restart trains")
    parser.add_argument("--fsync", action="store_true", help="baseline writer fsyncs (DeepSpeed does not)")
    parser.add_argument("--periods", default="120,600", help="failure intervals T (s) of the computed goodput")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="heartbeat polling interval")
    parser.add_argument("--phases", default="regrow,baseline,restart",
                        help="phases to run, of regrow, baseline, restart (needs baseline's checkpoint), "
                             "goodput-regrow, goodput-baseline (goodput MEASURED with a failure every "
                             "--goodput-interval seconds; long: see --goodput-duration), goodput-clean (the same "
                             "job for --goodput-duration seconds with no failure and no snapshot: the reference)")
    parser.add_argument("--goodput-interval", type=float, default=120.0,
                        help="goodput phases: wall-clock seconds T between two failures")
    parser.add_argument("--goodput-duration", type=float, default=None,
                        help="goodput phases: wall-clock seconds D each job is measured for, from its first "
                             "completed step (default 3 x T)")
    parser.add_argument("--goodput-first", type=float, default=None,
                        help="goodput phases: seconds from the first completed step to the first kill (default T/2: "
                             "then D/T failures fall within D, one in the middle of each T-second period; T gives "
                             "kills at T, 2T, ..., one fewer within D)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSONL",
                        help="run nothing: merge the goodput phases of earlier results (ray_recovery.jsonl files, "
                             "e.g. goodput-regrow and goodput-baseline run in two calls) and print their table")
    parser.add_argument("--phase-timeout", type=float, default=100.0,
                        help="seconds a job may take before its workers are killed and it is given up")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="WorkerSpec.timeout_s: process-group formation, collectives, snapshot requests")
    parser.add_argument("--snapshot-every", type=int, default=1,
                        help="goodput-regrow: snapshot every this many steps (a longer interval costs less per "
                             "step and re-does up to that many steps per failure)")
    parser.add_argument("--standby", type=int, default=0,
                        help="standby workers per node in the regrow phases (CoordinatorConfig.standby_per_node)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads-per-rank", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--ckpt-dir", default=None, help="baseline checkpoint root, emptied first "
                                                           "(default: a temporary folder, removed at the end)")
    parser.add_argument("--events-dir", default=None, help="where the events JSONL files go (default: temporary)")
    parser.add_argument("--quiet-workers", action="store_true", help="do not forward the workers' output")
    parser.add_argument("--json", default=None, help="file to append the result line to")
    parser.add_argument("--markdown", default=None, help="file to write the table to")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}"
                for name, low in (("micro_batch", 1), ("workers", 2), ("warmup", 2), ("window", 2), ("kills", 0),
                                  ("kill_gap", 5), ("tail", 3), ("save_tail", 3), ("resume_steps", 1),
                                  ("threads_per_rank", 1)) if getattr(args, name) < low]
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if "baseline" in args.phases and args.save_every <= args.warmup + args.window:
        problems.append(f"--save-every={args.save_every} must exceed --warmup + --window (the clean window of the "
                        f"baseline precedes its save)")
    if args.save_every < 1:
        problems.append(f"--save-every={args.save_every} must be >= 1")
    unknown = set(args.phases) - {"regrow", "baseline", "restart", *GOODPUT_PHASES}
    if unknown:
        problems.append(f"--phases: unknown {sorted(unknown)}")
    if args.snapshot_every < 1:
        problems.append(f"--snapshot-every={args.snapshot_every} must be >= 1 (goodput-regrow needs snapshots)")
    if "restart" in args.phases and "baseline" not in args.phases and not args.ckpt_dir:
        problems.append("--phases restart without baseline needs --ckpt-dir holding a checkpoint")
    try:
        args.periods = [float(p) for p in args.periods.split(",") if p.strip()]
    except ValueError:
        problems.append(f"--periods={args.periods!r}: comma list of seconds")
    if args.goodput_duration is None:
        args.goodput_duration = 3 * args.goodput_interval
    if args.goodput_first is None:
        args.goodput_first = args.goodput_interval / 2
    if not args.goodput_interval > 0 or not args.goodput_duration > 0:
        problems.append("--goodput-interval and --goodput-duration must be > 0")
    if not 0 <= args.goodput_first < args.goodput_duration:
        problems.append(f"--goodput-first={args.goodput_first} must be in [0, --goodput-duration="
                        f"{args.goodput_duration}) (at least one failure within the measured time)")
    args.kill_ranks_given = bool(args.kill_ranks)
    if args.kill_ranks:
        args.kill_ranks = [int(r) for r in args.kill_ranks.split(",")]
        if any(not 0 <= r < args.workers for r in args.kill_ranks):
            problems.append(f"--kill-ranks={args.kill_ranks}: ranks are 0..{args.workers - 1}")
    else:
        cycle = list(range(args.workers - 1, 0, -1))
        args.kill_ranks = [cycle[i % len(cycle)] for i in range(args.kills)]
    if args.kills and len(args.kill_ranks) < args.kills:
        args.kill_ranks = [args.kill_ranks[i % len(args.kill_ranks)] for i in range(args.kills)]
    if problems:
        parser.error("\n  - ".join(["invalid arguments:", *problems]))
    return args


def trainer_config(args: argparse.Namespace) -> TrainerConfig:
    """The configuration of ``bench_checkpoint.regrow_trainer`` (ZeRO-2, 8-bit state, bf16 working parameters)."""
    model = GPTConfig.preset(args.preset)
    return TrainerConfig(
        model=model,
        data=DataConfig(seq_len=model.seq_len, micro_batch=args.micro_batch,
                        global_batch=args.micro_batch * args.workers),
        optim=ZeroConfig(stage=2, state_bits=8, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                         max_grad_norm=MAX_GRAD_NORM, param_dtype="bfloat16"),
        steps=10**6, warmup_steps=10, seed=args.seed, log_every=0, progress=False,
    )


# ---------------------------------------------------------------------------------------------------- the baseline's
# sinks. They run inside the worker actors: Ray pickles these module-level objects (by value, from __main__).


class WaitForSave:
    """Listed after the writer: at step ``last`` it waits for the save in flight to finish (rank 0: committed), so
    that the checkpoint exists when the actors are stopped; rank 0 writes the writer's results to ``report``."""

    def __init__(self, writer: CheckpointWriter, last: int, report: str | None) -> None:
        self.writer = writer
        self.last = last
        self.report = report

    def before_optimizer_step(self) -> None:
        pass

    def after_step(self, state: ShardState) -> None:
        if state.step != self.last:
            return
        started = time.perf_counter()
        self.writer.wait(900)
        waited = time.perf_counter() - started
        if self.report:
            Path(self.report).write_text(json.dumps({
                "waited_s": round(waited, 3), "results": [asdict(r) for r in self.writer.results]}))

    def close(self) -> None:
        pass


def baseline_sinks(rank: int, *, config: TrainerConfig, world_size: int, root: str, every: int, last: int,
                   fsync: bool, report: str | None) -> list[StateSink]:
    """A ``CheckpointWriter`` saving every ``every`` steps (and a :class:`WaitForSave` at step ``last``)."""
    writer = CheckpointWriter(WriterConfig(root=root, save_every=every, keep_last=2, fsync=fsync, log=True),
                              rank=rank, world_size=world_size, run_config=config.to_dict())
    return [writer, WaitForSave(writer, last, report if rank == 0 else None)]


# ---------------------------------------------------------------------------------------------------- watching


ACTIVE: dict[int, tuple[Coordinator, int]] = {}
"""The coordinators whose run is in progress (and their worker counts): on SIGTERM each is stopped
(``Coordinator.stop``), its workers are killed if its run has not returned within ``SIGNAL_GRACE_S``, and the run
is interrupted (SystemExit) ``SIGNAL_RAISE_S`` later, so that the partial result is still written within the
runner's grace period (``timeout -k 30``)."""
SIGNALLED: list[int] = []  # the signals received (Ray may turn the SystemExit raised into another)
SIGNAL_GRACE_S = 4.0  # seconds a run stopped on SIGTERM has to return before its workers are killed
SIGNAL_RAISE_S = 3.0  # and then before the signal is sent again (SystemExit in the main thread)


def kill_workers(ray: object, coordinator: Coordinator, workers: int, *, quiet: bool = False) -> None:
    """Kills every worker of the coordinator's job (those it has started)."""
    for rank in range(workers):
        try:
            ray.kill(coordinator.worker(rank), no_restart=True)
        except Exception as error:  # noqa: BLE001 (not started, or already gone)
            if not quiet:
                log(f"rank {rank} not killed: {type(error).__name__}")


class CoordinatorEvents:
    """The coordinator's ``on_event``: remembers when each event happened (its ``t``, coordinator clock). Called
    from the thread running ``run`` and from the bench's own events (``bench_kill``) on the watcher's."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def __call__(self, record: dict) -> None:
        with self.lock:
            self.seen.append((record["event"], record["t"]))

    def last(self, name: str) -> tuple[int, float]:
        """How many ``name`` events so far, and the time of the last (or -inf)."""
        with self.lock:
            times = [at for seen, at in self.seen if seen == name]
        return len(times), (times[-1] if times else -math.inf)


class Watcher(threading.Thread):
    """Polls rank 0's heartbeat every ``poll_s`` and kills worker actors at the planned steps.

    ``samples``: (poll time, step, estimated completion time of that step), coordinator clock. A kill fires when
    rank 0 has reached its step and the previous failure has been healed and trained a step since. Past
    ``deadline_s`` (a hang) the coordinator is stopped."""

    def __init__(self, coordinator: Coordinator, events: CoordinatorEvents, poll_s: float,
                 kills: list[tuple[int, int]], deadline_s: float) -> None:
        super().__init__(name="bench-watcher", daemon=True)
        import ray

        self.ray = ray
        self.coordinator = coordinator
        self.events = events
        self.poll_s = poll_s
        self.kills = list(kills)  # (step, rank)
        self.deadline_s = deadline_s
        self.gave_up_at: float | None = None
        self.fired = 0
        self.samples: list[tuple[float, int, float]] = []
        self.polls_failed = 0
        self.stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 (reported in the result)
            self.error = traceback.format_exc()
            log(f"watcher failed:\n{self.error}")

    def _loop(self) -> None:
        while not self.stopping.is_set():
            began = self.coordinator.elapsed()
            beat, failed = rank0_heartbeat(self.ray, self.coordinator, timeout_s=2.0)
            self.polls_failed += failed
            if beat is not None:
                got = self.coordinator.elapsed()
                step = int(beat["step"])
                self.samples.append((got, step, (began + got) / 2 - float(beat["seconds_since"])))
                self._maybe_kill(step, got)
            if began > self.deadline_s and self.gave_up_at is None:
                self._give_up(began)
            self.stopping.wait(max(0.0, self.poll_s - (self.coordinator.elapsed() - began)))

    def _give_up(self, now: float) -> None:
        """Past the phase's deadline (a hang): the coordinator is stopped, so that the next phases still get their
        time; the job is then marked as given up at its deadline."""
        log(f"phase past its deadline of {self.deadline_s:.0f} s: stopping it")
        self.coordinator.event("bench_deadline", seconds=self.deadline_s)
        self.gave_up_at = now
        self.coordinator.stop(f"past the phase deadline of {self.deadline_s:.0f} s")

    def _maybe_kill(self, step: int, now: float) -> None:
        if self.fired >= len(self.kills) or step < self.kills[self.fired][0]:
            return
        if self.fired:
            healed, at = self.events.last("resumed")
            if healed < self.fired or not any(c > at for _, _, c in self.samples[-3:]):
                return  # the previous failure is not healed yet, or no step finished since
        target, rank = self.kills[self.fired]
        self.coordinator.event("bench_kill", rank=rank, step=step, planned=target)
        self.ray.kill(self.coordinator.worker(rank), no_restart=True)
        self.fired += 1


def rank0_heartbeat(ray, coordinator: Coordinator | None, *, timeout_s: float) -> tuple[dict | None, bool]:
    """Rank 0's heartbeat (None while its worker is not started, or when it did not answer) and whether the poll
    failed (it did not answer in ``timeout_s``, or its actor is gone)."""
    try:
        handle = coordinator.worker(0) if coordinator is not None else None
    except IndexError:  # the workers are not started yet
        handle = None
    if handle is None:
        return None, False
    try:
        return ray.get(handle.heartbeat.options(concurrency_group=CONTROL).remote(), timeout=timeout_s), False
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError):
        return None, True


def run_job(args: argparse.Namespace, name: str, spec: WorkerSpec, steps: int, *, gpus: float, events_dir: Path,
            kills: list[tuple[int, int]] = (), resume: bool = False) -> dict:
    """Runs one coordinated job to ``steps`` with a watcher; returns its events, samples and timings. Raises
    SystemExit when a signal stopped it (the phases done so far are reported without it)."""
    events_path = events_dir / f"ray_recovery_{name}.events.jsonl"
    events_path.unlink(missing_ok=True)
    config = CoordinatorConfig(workers=args.workers, gpus_per_worker=gpus, events_path=str(events_path),
                               max_restarts=max(10, len(kills) + 2), resources_timeout_s=120.0,
                               standby_per_node=args.standby if name == "regrow" else 0)
    hook = CoordinatorEvents()
    log(f"{name}: starting {args.workers} workers, {steps} steps" + (", resume" if resume else "")
        + (f", kills at {kills}" if kills else ""))
    made = time.monotonic()
    coordinator = Coordinator(config, spec, env={"REGROW_THREADS_PER_RANK": str(args.threads_per_rank)},
                              on_event=hook)
    # The coordinator's clock started at most the constructor's time after `made`; take it as starting then.
    clock_origin = time.monotonic() - coordinator.elapsed()
    watcher = Watcher(coordinator, hook, args.poll_ms / 1e3, list(kills), args.phase_timeout)
    watcher.start()
    error = None
    outcome = None
    ACTIVE[id(coordinator)] = (coordinator, args.workers)
    try:
        outcome = coordinator.run(steps, resume=resume)
    except Exception as caught:  # noqa: BLE001 (the phase fails; the others still run)
        error = f"{type(caught).__name__}: {caught}"
        log(f"{name}: FAILED: {error}")
        traceback.print_exc()
    finally:
        ACTIVE.pop(id(coordinator), None)
        watcher.stopping.set()
        watcher.join(10)
    wall = time.monotonic() - made
    if SIGNALLED:  # stopped (or failed) on SIGTERM: not a result
        raise SystemExit(f"signal {SIGNALLED[0]}")
    if outcome is not None and outcome.stopped is not None:
        error = (f"past its deadline of {args.phase_timeout:.0f} s (--phase-timeout): stopped at step "
                 f"{outcome.stopped_at} of {steps}")
        log(f"{name}: FAILED: {error}")
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    log(f"{name}: done in {wall:.1f} s, {len(watcher.samples)} heartbeats, {watcher.fired} kills, "
        f"{outcome.failures if outcome else '?'} failures healed")
    return {"name": name, "steps": steps, "error": error or watcher.error, "wall_s": wall, "events": events,
            "samples": watcher.samples, "kills_fired": watcher.fired, "polls_failed": watcher.polls_failed,
            "construct_s": clock_origin - made,
            "restores": outcome.restores if outcome else [], "events_path": str(events_path)}


# ---------------------------------------------------------------------------------------------------- goodput, measured

GOODPUT_STEPS = 10**6 - 1  # the coordinator's target: never reached, the phase is stopped at D
WHOLE_JOB_RESTART = "whole-job restart"  # the reason goodput-baseline's coordinators are stopped at each kill


class GoodputPhase:
    """One goodput phase: a job trained for ``--goodput-duration`` D seconds of wall clock from its first completed
    step, a worker actor killed every ``--goodput-interval`` T seconds (the first ``--goodput-first`` seconds in),
    then stopped on purpose (``Coordinator.stop``). ``restart=False`` (regrow): the coordinator heals every failure
    in place. ``restart=True`` (the baseline): each kill stops the whole job (the coordinator stopped rather than
    heal, and every worker killed, as a launcher kills the processes of a failed job), and a new coordinator
    resumes it from the latest checkpoint (``run(..., resume=True)``), within the same wall-clock budget.

    A thread polls rank 0's heartbeat every ``--poll-ms`` (as :class:`Watcher`), and fires the kills and the stop.
    A kill waits until the previous failure has been recovered (a generation formed since, and a step trained
    after it); the stop waits likewise, at most ``--phase-timeout`` more seconds, so that the step reached at D is
    known. Everything is timed on one clock: seconds since the phase started (every coordinator's events are kept
    in ``trace`` through its ``on_event``, timed on that clock: each whole-job restart makes a new coordinator, with
    its own)."""

    def __init__(self, args: argparse.Namespace, name: str, spec: WorkerSpec, *, restart: bool, gpus: float,
                 events_path: Path) -> None:
        import ray

        self.ray = ray
        self.args, self.name, self.spec, self.restart, self.gpus = args, name, spec, restart, gpus
        self.events_path = events_path
        self.interval, self.duration, self.first = args.goodput_interval, args.goodput_duration, args.goodput_first
        default = list(range(args.workers - 1, 0, -1))
        given = [r for r in dict.fromkeys(args.kill_ranks) if r != 0] if args.kill_ranks_given else default
        self.rotation = given or default  # never rank 0: it is the one polled
        # goodput-clean is the fault-free reference: no kill at all
        self.planned = 0 if name == "goodput-clean" else math.ceil((self.duration - self.first) / self.interval)
        self.origin = time.monotonic()
        self.lock = threading.Lock()
        self.coordinator: Coordinator | None = None
        self.segments: list[dict] = []  # one per coordinator: when it was made (phase clock), whether it resumed
        self.trace: list[dict] = []
        self.samples: list[tuple[float, int, float, int]] = []  # (polled, step, completion estimate, segment)
        self.t0: float | None = None  # completion of the first step observed
        self.first_step: int | None = None
        self.kills: list[dict] = []
        self.recovered = 0  # kills recovered from so far
        self.stop_t: float | None = None
        self.stop_reason: str | None = None
        self.restart_requested = False
        self.finished = threading.Event()
        self.polls_failed = 0
        self.watch_error: str | None = None

    def clock(self) -> float:
        return time.monotonic() - self.origin

    def on_event(self, record: dict) -> None:
        """Every coordinator's ``on_event``: its event, timed on the phase's clock."""
        self.trace.append({**record, "t": round(self.clock(), 3)})

    def coordinator_config(self) -> CoordinatorConfig:
        return CoordinatorConfig(workers=self.args.workers, gpus_per_worker=self.gpus,
                                 events_path=str(self.events_path), max_restarts=self.planned + 10,
                                 resources_timeout_s=120.0,
                                 standby_per_node=0 if self.restart else self.args.standby)

    # ------------------------------------------------------------------ the driver (main thread)
    def run(self) -> dict:
        self.events_path.unlink(missing_ok=True)  # appended by every coordinator of the phase
        what = (f"a worker killed every {self.interval:g} s from {self.first:g} s ({self.planned} failures), ranks "
                f"{self.rotation} in turn, " + ("whole-job restart from the checkpoint" if self.restart
                                                  else "healed in place")
                if self.planned else "no failure, snapshots off (the reference)")
        log(f"{self.name}: {self.args.workers} workers for {self.duration:g} s from the first step, {what}")
        watcher = threading.Thread(target=self._watch_safely, name=f"bench-{self.name}", daemon=True)
        watcher.start()
        resume = False
        error = interrupted = None
        try:
            while True:
                with self.lock:
                    if self.stop_t is not None:
                        break
                    self.restart_requested = False
                made = self.clock()
                coordinator = Coordinator(self.coordinator_config(), self.spec, on_event=self.on_event,
                                          env={"REGROW_THREADS_PER_RANK": str(self.args.threads_per_rank)})
                with self.lock:
                    self.coordinator = coordinator
                    self.segments.append({"made_t": round(made, 3), "resume": resume})
                    if self.stop_t is not None:  # stopped while it was made: the watcher stopped the one before
                        break
                ACTIVE[id(coordinator)] = (coordinator, self.args.workers)
                outcome = None
                try:
                    outcome = coordinator.run(GOODPUT_STEPS, resume=resume)
                except Exception as caught:  # noqa: BLE001 (the phase fails, unless it was being stopped anyway)
                    with self.lock:
                        expected = self.stop_t is not None or self.restart_requested
                    if not expected:
                        error = f"{type(caught).__name__}: {caught}"
                        log(f"{self.name}: FAILED: {error}")
                        traceback.print_exc()
                    else:
                        log(f"{self.name}: the job, being stopped, ended with {type(caught).__name__}: {caught}")
                finally:
                    ACTIVE.pop(id(coordinator), None)
                if SIGNALLED:  # stopped on SIGTERM: measured up to here
                    raise SystemExit(f"signal {SIGNALLED[0]}")
                if outcome is not None:
                    if outcome.stopped is None:
                        error = f"the job reached step {GOODPUT_STEPS} by itself"
                    else:
                        log(f"{self.name}: job {len(self.segments)} stopped at step {outcome.stopped_at} "
                            f"({outcome.stopped})")
                if error or self.stop_t is not None:
                    break
                if not self.restart_requested:
                    error = "the job ended, neither stopped nor restarted by the bench"
                    break
                resume = True
                log(f"{self.name}: whole-job restart {len(self.segments)} (kill {len(self.kills)}), from the "
                    f"latest checkpoint")
        except BaseException as caught:  # noqa: BLE001 (SIGTERM, the runner's limit: keep what was measured)
            interrupted = caught
            error = (f"interrupted by signal {SIGNALLED[0]}" if SIGNALLED
                     else f"interrupted: {type(caught).__name__}: {caught}")
            log(f"{self.name}: {error}")
        finally:
            with self.lock:
                if self.stop_t is None:
                    self.stop_t, self.stop_reason = self.clock(), error or "ended"
            self.finished.set()
            watcher.join(10)
        wall = self.clock()
        error = error or self.watch_error
        if self.t0 is None and not error:
            error = "no step observed"
        log(f"{self.name}: done in {wall:.1f} s ({self.stop_reason}), {len(self.samples)} heartbeats, "
            f"{len(self.kills)} kills, {len(self.segments)} coordinator(s)")
        raw = {"name": self.name, "restart": self.restart, "error": error, "wall_s": wall,
               "interval_s": self.interval, "duration_s": self.duration, "first_kill_s": self.first,
               "t0": self.t0, "first_step": self.first_step, "kills": self.kills, "segments": self.segments,
               "stop_t": self.stop_t, "stop_reason": self.stop_reason, "trace": self.trace,
               "samples": self.samples, "polls_failed": self.polls_failed, "events_path": str(self.events_path)}
        if interrupted is not None:
            raw["interrupted"] = True
        return raw

    # ------------------------------------------------------------------ the watcher thread
    def _watch_safely(self) -> None:
        try:
            self._watch()
        except Exception:  # noqa: BLE001 (reported in the result; the phase is stopped)
            self.watch_error = traceback.format_exc()
            log(f"{self.name}: watcher failed:\n{self.watch_error}")
            self._stop(self.clock(), "watcher failed")

    def _watch(self) -> None:
        poll_s = self.args.poll_ms / 1e3
        while not self.finished.is_set():
            began = self.clock()
            with self.lock:
                coordinator, segment = self.coordinator, len(self.segments) - 1
            beat, failed = rank0_heartbeat(self.ray, coordinator, timeout_s=1.0)
            self.polls_failed += failed
            now = self.clock()
            if beat is not None:
                step = int(beat["step"])
                self.samples.append((now, step, (began + now) / 2 - float(beat["seconds_since"]), segment))
                if self.t0 is None and step > 0:
                    self.t0, self.first_step = self.samples[-1][2], step
                    log(f"{self.name}: first step observed ({step}); {self.duration:.0f} s from now")
            if self.stop_t is not None:
                pass  # stopped: its run returns at its next poll
            elif self.t0 is None:
                if now > self.args.phase_timeout:
                    self.watch_error = f"no step within --phase-timeout={self.args.phase_timeout:.0f} s"
                    self._stop(now, self.watch_error)
            elif now >= self.t0 + self.duration:
                late = now >= self.t0 + self.duration + self.args.phase_timeout
                if late or not self._recovering():
                    self._stop(now, "recovery unfinished at --phase-timeout past D" if late
                               else "stopped at D on purpose")
            elif coordinator is not None and beat is not None and self.planned:
                planned = self.t0 + self.first + len(self.kills) * self.interval
                if now >= planned and not self._recovering():
                    self._kill(coordinator, segment, planned, now)
            self.finished.wait(max(0.0, poll_s - (self.clock() - began)))

    def _recovering(self) -> bool:
        """Whether the last kill is not recovered from yet: no generation formed after it, or no step trained
        since (a heartbeat's completion after the formation, of a step past the one restored)."""
        if self.recovered == len(self.kills):
            return False
        kill_t = self.kills[-1]["t"]
        formed = first_event(self.trace, "generation_formed", kill_t)
        if formed is None:
            return True
        restored = first_event(self.trace, "restored", kill_t)
        past = restored["step"] if restored is not None else -1
        for polled, step, done, _ in reversed(self.samples):
            if polled < formed["t"]:
                break
            if done > formed["t"] and step > past:
                self.recovered = len(self.kills)
                return False
        return True

    def _kill(self, coordinator: Coordinator, segment: int, planned: float, now: float) -> None:
        rank = self.rotation[len(self.kills) % len(self.rotation)]
        step = self.samples[-1][1]
        if self.restart:
            with self.lock:
                self.restart_requested = True  # before the stop: the driver must see it when run() returns
            coordinator.stop(WHOLE_JOB_RESTART)  # before the kill: the job must not heal
        coordinator.event("bench_kill", rank=rank, step=step, planned_s=round(planned - self.t0, 3),
                          late_s=round(now - planned, 3), whole_job_restart=self.restart)
        self.kills.append({"t": round(self.clock(), 3), "planned_t": round(planned, 3), "rank": rank, "step": step,
                           "segment": segment})
        self.ray.kill(coordinator.worker(rank), no_restart=True)
        if self.restart:  # the failed job's other processes die with it, as a launcher kills them (no shutdown)
            kill_workers(self.ray, coordinator, self.args.workers, quiet=True)

    def _stop(self, now: float, reason: str) -> None:
        """Ends the phase: the coordinator running (if any) is stopped; the driver makes no other."""
        with self.lock:
            self.stop_t, self.stop_reason = now, reason
            coordinator = self.coordinator
        log(f"{self.name}: {reason} ({now - (self.t0 or 0.0):.1f} s after the first step)")
        if coordinator is not None:
            coordinator.event("bench_stop", reason=reason, after_first_step_s=round(now - (self.t0 or 0.0), 3))
            coordinator.stop(reason)


# ---------------------------------------------------------------------------------------------------- the run


def device_name(args: argparse.Namespace) -> str:
    if args.device == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    try:  # not torch.cuda: the driver must not take a CUDA context on a GPU the workers use
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, check=False).stdout.split("\n")
        return names[0].strip() or "cuda"
    except (OSError, subprocess.SubprocessError):
        return "cuda"


def run(args: argparse.Namespace) -> dict:
    import ray

    cuda = args.device == "cuda"
    gpus = 1.0 if cuda else 0.0
    config = trainer_config(args)
    temp = Path(tempfile.mkdtemp(prefix="regrow-bench-ray-"))
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else temp / "ckpt"
    events_dir = Path(args.events_dir) if args.events_dir else temp
    events_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cuda else "cpu"
    kill_steps = [args.warmup + args.window + i * args.kill_gap for i in range(args.kills)]
    regrow_steps = (kill_steps[-1] if kill_steps else args.warmup + args.window) + args.tail
    save_step = args.save_every
    baseline_steps = save_step + args.save_tail
    report_path = temp / "save_report.json"
    result: dict = {
        "bench": "ray_recovery", "status": "ok", "world_size": args.workers, "device": device_name(args),
        "host": socket.gethostname(), "torch": torch.__version__, "ray": ray.__version__, "preset": args.preset,
        "micro_batch": args.micro_batch, "warmup": args.warmup, "window": args.window,
        "kill_steps": kill_steps, "kill_ranks": args.kill_ranks[:args.kills], "regrow_steps": regrow_steps,
        "save_every": save_step, "baseline_steps": baseline_steps, "poll_ms": args.poll_ms, "fsync": args.fsync,
        "phases": args.phases, "standby_per_node": args.standby, "errors": {},
    }
    started = time.monotonic()
    try:
        cpus = max(os.cpu_count() or 1, args.workers + 1)
        log(f"ray.init(num_gpus={args.workers if cuda else 0}, num_cpus={cpus})")
        # A small object store: this bench passes only small objects, and /dev/shm is the snapshot processes'.
        # address="local": an instance of its own, never one already running on the host (without it, ray.init
        # joins the host's running cluster, which refuses num_cpus / num_gpus).
        ray.init(address="local", num_gpus=args.workers if cuda else 0, num_cpus=cpus, include_dashboard=False,
                 object_store_memory=1 << 30, log_to_driver=not args.quiet_workers)
        signal.signal(signal.SIGTERM, terminate)  # ray.init installed its own
        result["ray_init_s"] = r3(time.monotonic() - started)
        log(f"Ray up in {result['ray_init_s']} s")

        jobs: dict[str, dict] = {}  # the phases regrow, baseline, restart that ran
        goodput_raw: dict[str, dict] = {}
        stopped = None
        try:
            run_short_phases(args, config, device, gpus, temp, ckpt_dir, events_dir, kill_steps, regrow_steps,
                             save_step, baseline_steps, report_path, result, jobs)
            for name in GOODPUT_PHASES:
                if name not in args.phases:
                    continue
                goodput_raw[name] = run_goodput_phase(args, name, config, device, gpus, temp, events_dir)
                if goodput_raw[name].get("interrupted"):
                    raise SystemExit(f"interrupted during {name}")
        except SystemExit as caught:  # SIGTERM (the runner's limit): report the phases that ran
            stopped = f"stopped before the end: {f'signal {SIGNALLED[0]}' if SIGNALLED else caught}"
            log(stopped)
        regrow_job, baseline_job, restart_job = (jobs.get(name) for name in ("regrow", "baseline", "restart"))
        result.update(analyse(args, regrow_job, baseline_job, restart_job, report_path, kill_steps, save_step,
                              baseline_steps))
        for job in (regrow_job, baseline_job, restart_job):
            if job is not None and job["error"]:
                result["errors"][job["name"]] = job["error"]
        if goodput_raw:
            phases = {name: analyse_goodput(args, raw) for name, raw in goodput_raw.items()}
            summary = goodput_summary(phases, result.get("baseline", {}).get("step_ms_off"))
            result["goodput"] = {**phases, "summary": summary}
            for name, raw in goodput_raw.items():
                if raw["error"]:
                    result["errors"][name] = raw["error"]
        if stopped:
            result["errors"]["signal"] = stopped
    finally:
        log("shutting Ray down")
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)  # the default checkpoint and events folders, the save report
        if args.ckpt_dir:
            shutil.rmtree(goodput_ckpt_dir(args, temp), ignore_errors=True)
    result["wall_s"] = r3(time.monotonic() - started)
    if result["errors"]:
        result["status"] = "partial"
    result["time"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return result


def goodput_ckpt_dir(args: argparse.Namespace, temp: Path) -> Path:
    """goodput-baseline's checkpoint root: beside --ckpt-dir when given, else in the temporary folder."""
    return Path(f"{args.ckpt_dir.rstrip('/')}-goodput") if args.ckpt_dir else temp / "goodput-ckpt"


def run_goodput_phase(args: argparse.Namespace, name: str, config: TrainerConfig, device: str, gpus: float,
                      temp: Path, events_dir: Path) -> dict:
    """One goodput phase (:class:`GoodputPhase`): goodput-regrow snapshots every --snapshot-every steps and is
    healed in place; goodput-baseline saves a checkpoint every --save-every steps and restarts the whole job at each
    failure; goodput-clean neither snapshots nor saves, and nothing fails (the reference)."""
    if name == "goodput-regrow":
        spec = WorkerSpec(config=config, world_size=args.workers, device=device, snapshot_every=args.snapshot_every,
                          ckpt_dir=str(temp / "goodput-regrow-ckpt"), timeout_s=args.timeout_s)
    elif name == "goodput-clean":
        spec = WorkerSpec(config=config, world_size=args.workers, device=device, snapshot_every=0,
                          ckpt_dir=str(temp / "goodput-clean-ckpt"), timeout_s=args.timeout_s)
    else:
        root = goodput_ckpt_dir(args, temp)
        shutil.rmtree(root, ignore_errors=True)
        sinks = functools.partial(baseline_sinks, config=config, world_size=args.workers, root=str(root),
                                  every=args.save_every, last=-1, fsync=args.fsync, report=None)
        spec = WorkerSpec(config=config, world_size=args.workers, device=device, snapshot_every=0,
                          ckpt_dir=str(root), timeout_s=args.timeout_s, extra_sinks=sinks)
    phase = GoodputPhase(args, name, spec, restart=name == "goodput-baseline", gpus=gpus,
                         events_path=events_dir / f"ray_recovery_{name}.events.jsonl")
    return phase.run()


def run_short_phases(args: argparse.Namespace, config: TrainerConfig, device: str, gpus: float, temp: Path,
                     ckpt_dir: Path, events_dir: Path, kill_steps: list[int], regrow_steps: int, save_step: int,
                     baseline_steps: int, report_path: Path, result: dict, jobs: dict[str, dict]) -> None:
    """The phases regrow, baseline and restart (those of ``--phases``); each job goes into ``jobs`` once run."""
    if "regrow" in args.phases:
        spec = WorkerSpec(config=config, world_size=args.workers, device=device, snapshot_every=1,
                          ckpt_dir=str(temp / "regrow-ckpt"), timeout_s=args.timeout_s)
        jobs["regrow"] = run_job(args, "regrow", spec, regrow_steps, gpus=gpus, events_dir=events_dir,
                                 kills=list(zip(kill_steps, args.kill_ranks, strict=False)))
        if jobs["regrow"]["kills_fired"] < args.kills and not jobs["regrow"]["error"]:
            jobs["regrow"]["error"] = f"only {jobs['regrow']['kills_fired']} of {args.kills} kills fired"
    if "baseline" in args.phases:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        sinks = functools.partial(baseline_sinks, config=config, world_size=args.workers, root=str(ckpt_dir),
                                  every=save_step, last=baseline_steps, fsync=args.fsync, report=str(report_path))
        spec = WorkerSpec(config=config, world_size=args.workers, device=device, snapshot_every=0,
                          ckpt_dir=str(ckpt_dir), timeout_s=args.timeout_s, extra_sinks=sinks)
        jobs["baseline"] = run_job(args, "baseline", spec, baseline_steps, gpus=gpus, events_dir=events_dir)
    if "restart" in args.phases:
        latest = ckpt_dir / "latest"
        if not latest.exists():
            result["errors"]["restart"] = f"no checkpoint: {latest} is missing"
            log(f"restart: skipped, {latest} is missing")
        else:
            sinks = functools.partial(baseline_sinks, config=config, world_size=args.workers, root=str(ckpt_dir),
                                      every=save_step, last=-1, fsync=args.fsync, report=None)
            spec = WorkerSpec(config=config, world_size=args.workers, device=device, snapshot_every=0,
                              ckpt_dir=str(ckpt_dir), timeout_s=args.timeout_s, extra_sinks=sinks)
            jobs["restart"] = run_job(args, "restart", spec, save_step + args.resume_steps, gpus=gpus,
                                      events_dir=events_dir, resume=True)


def analyse(args: argparse.Namespace, regrow_job: dict | None, baseline_job: dict | None, restart_job: dict | None,
            report_path: Path, kill_steps: list[int], save_step: int, baseline_steps: int) -> dict:
    low, high = args.warmup, args.warmup + args.window
    out: dict = {}
    step_on = step_off = None
    if regrow_job is not None:
        first_kill = next((e["t"] for e in regrow_job["events"] if e["event"] == "bench_kill"), math.inf)
        done = completions(regrow_job["samples"], t_to=first_kill)
        step_on, a, b = window_step_s(done, low, high)
        out["regrow"] = {"wall_s": r3(regrow_job["wall_s"]), "step_ms_on": ms(step_on), "window_observed": [a, b],
                         "heartbeats": len(regrow_job["samples"]), "kills_fired": regrow_job["kills_fired"],
                         "events": regrow_job["events"], "step_times": step_times(regrow_job["samples"])}
        if step_on is not None:
            fails = failures(regrow_job, step_on)
            out["regrow"]["failures"] = fails
            # the step time once healed: between the first step after each restore (+2) and the next kill
            kills_t = [f["kill_t"] for f in fails] + [math.inf]
            after = []
            for index, fail in enumerate(fails):
                if fail.get("first_step_observed") is None:
                    continue
                seg = completions(regrow_job["samples"], fail["kill_t"] + (fail["resumed_s"] or 0), kills_t[index + 1])
                value, _, _ = window_step_s(seg, fail["first_step_observed"] + 2, 10**9)
                after.append(ms(value))
            out["regrow"]["step_ms_after_each_heal"] = after
    if baseline_job is not None:
        done = completions(baseline_job["samples"])
        step_off, a, b = window_step_s(done, low, high)
        stall = None
        if step_off is not None:
            span, sa, sb = span_s(done, save_step - 1, baseline_steps - 1)
            if span is not None:
                stall = span - (sb - sa) * step_off
            out["baseline"] = {"stall_window_observed": [sa, sb]}
        else:
            out["baseline"] = {}
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        out["baseline"].update({
            "wall_s": r3(baseline_job["wall_s"]), "step_ms_off": ms(step_off), "window_observed": [a, b],
            "save_stall_s": r3(stall), "step_ms_around_save": step_durations(done, save_step - 2, baseline_steps),
            "save_report": report, "heartbeats": len(baseline_job["samples"]), "events": baseline_job["events"],
            "step_times": step_times(baseline_job["samples"])})
    if restart_job is not None:
        events = restart_job["events"]
        restored = first_event(events, "restored", -math.inf)
        started = [e["t"] for e in events if e["event"] == "worker_started"]
        record = {"wall_s": r3(restart_job["wall_s"]), "construct_s": r3(restart_job["construct_s"]),
                  "workers_started_s": r3(max(started) + restart_job["construct_s"]) if started else None,
                  "restored_s": r3(restored["t"] + restart_job["construct_s"]) if restored else None,
                  "restored_step": restored["step"] if restored else None,
                  "sources": restored.get("sources") if restored else None,
                  "load_s_per_rank": [r3(r.get("seconds")) for r in (restart_job["restores"] or [[]])[0]],
                  "events": events, "step_times": step_times(restart_job["samples"])}
        if restored is not None:
            first = first_step_after(restart_job["samples"], restored["step"], restored["t"], math.inf,
                                     step_off or 0.0)
            if first is not None:
                record["first_step_observed"] = first[0]
                record["restart_s"] = r3(first[1] + restart_job["construct_s"])
        out["restart"] = record

    # ---- the computed goodput
    fails = [f for f in out.get("regrow", {}).get("failures", []) if f.get("downtime_s") is not None]
    summary: dict = {"periods_s": args.periods}
    if step_on and step_off:
        summary["snapshot_overhead"] = round(step_on / step_off - 1, 4)
    if fails and step_on:
        overhead = max(0.0, 1 - step_off / step_on) if step_off else None  # None: no baseline run to compare
        downtime = mean([f["downtime_s"] for f in fails])
        redone = mean([f["redone_steps"] for f in fails])
        lost = downtime + redone * step_on
        summary["regrow"] = {"steady_overhead": r3(overhead) if overhead is None else round(overhead, 4),
                             "downtime_s": r3(downtime),
                             "detected_s": r3(mean([f["detected_s"] for f in fails])),
                             "redone_steps": redone, "lost_s_per_failure": r3(lost),
                             "goodput": {str(int(t)): round(goodput(overhead or 0.0, lost, t), 4)
                                         for t in args.periods}}
    restart_s = out.get("restart", {}).get("restart_s")
    stall = out.get("baseline", {}).get("save_stall_s")
    if step_off and restart_s is not None:
        detection = summary.get("regrow", {}).get("detected_s") or 0.0
        stall_used = max(0.0, stall or 0.0)
        overhead = stall_used / (save_step * step_off + stall_used)
        redone = save_step / 2
        downtime = detection + restart_s
        lost = downtime + redone * step_off
        summary["baseline"] = {"steady_overhead": round(overhead, 4), "downtime_s": r3(downtime),
                               "detected_s": r3(detection), "restart_s": restart_s, "redone_steps": redone,
                               "lost_s_per_failure": r3(lost),
                               "goodput": {str(int(t)): round(goodput(overhead, lost, t), 4) for t in args.periods}}
    if "regrow" in summary and "baseline" in summary:
        summary["goodput_ratio"] = {key: (round(value / summary["baseline"]["goodput"][key], 3)
                                          if summary["baseline"]["goodput"][key] > 0 else None)
                                    for key, value in summary["regrow"]["goodput"].items()}
    summary["note"] = ("goodput computed from the measured per-failure cost: goodput = (1 - steady overhead) * "
                       "(1 - lost seconds per failure / T); not a run with failures every T seconds")
    out["summary"] = summary
    return out


# ---------------------------------------------------------------------------------------------------- output


def markdown(result: dict) -> str:
    title = (f"Ray recovery, {result['world_size']} x {result['device']}, preset {result['preset']}, micro-batch "
             f"{result['micro_batch']}, Ray {result.get('ray')}, {result.get('time')} (status {result['status']})"
             + (f", standby workers per node in the regrow phases: {result['standby_per_node']}"
                if result.get("standby_per_node") else ""))
    lines = [title, ""]
    if any(name in result.get("phases", ["regrow"]) for name in ("regrow", "baseline", "restart")):
        lines += short_markdown(result)
    if result.get("goodput"):
        lines += ([""] if len(lines) > 2 else []) + goodput_markdown(result["goodput"], result.get("save_every"))
    if result.get("errors"):
        lines.append("")
        lines.append("Errors: " + "; ".join(f"{k}: {str(v).splitlines()[0]}" for k, v in result["errors"].items()))
    return "\n".join(lines)


def short_markdown(result: dict) -> list[str]:
    """The table of the phases regrow, baseline and restart, and the goodput COMPUTED from them."""
    lines = []
    regrow = result.get("regrow", {})
    fails = regrow.get("failures", [])
    if fails:
        lines.append("regrow (snapshot every step), per failure; seconds after the kill:")
        lines.append("")
        lines.append("| # | rank killed | at step | detected s | survivors aborted s | replaced s | restored s | "
                     "resumed s | first step after restore s | restored step | steps re-done | sources |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for index, f in enumerate(fails, 1):
            lines.append(f"| {index} | {f['rank']} | {f['kill_step']} | {fmt(f['detected_s'])} | "
                         f"{fmt(f['survivors_aborted_s'])} | {fmt(f['replaced_s'])} | {fmt(f['restored_s'])} | "
                         f"{fmt(f['resumed_s'])} | {fmt(f.get('downtime_s'))} | {fmt(f['restored_step'])} | "
                         f"{fmt(f.get('redone_steps'))} | {', '.join(f['sources'] or []) or '-'} |")
        lines.append("")
        timed = [(index, f["timings"]) for index, f in enumerate(fails, 1) if f.get("timings")]
        if timed:
            lines.append("Where each recovery's generation forming went (seconds, per rank: the replaced ranks and "
                         "the slowest other one):")
            lines.append("")
            lines.append("| # | rank | process group | trainer build | restore | sinks attached |")
            lines.append("|---|---|---:|---:|---:|---:|")
            for index, timings in timed:
                for rank, row in timings.items():
                    lines.append(f"| {index} | {rank} | " + " | ".join(fmt(value) for value in row) + " |")
            lines.append("")
    summary = result.get("summary", {})
    base = result.get("baseline", {})
    restart = result.get("restart", {})
    sr, sb = summary.get("regrow", {}), summary.get("baseline", {})
    periods = [str(int(t)) for t in summary.get("periods_s", [])]
    rows = [
        (f"step ms (clean window, steps {result['warmup']}-{result['warmup'] + result['window']})",
         fmt(regrow.get("step_ms_on")), fmt(base.get("step_ms_off"))),
        ("snapshot overhead (on / off - 1)", pct(summary.get("snapshot_overhead")), "-"),
        ("save stall per checkpoint s", "-", fmt(base.get("save_stall_s"), 3)),
        ("steady overhead (share of time)", pct(sr.get("steady_overhead")), pct(sb.get("steady_overhead"))),
        ("detection s (kill -> failure_detected)", fmt(sr.get("detected_s")),
         f"{fmt(sb.get('detected_s'))} (regrow's)"),
        ("downtime per failure s (kill -> first step after restore)", fmt(sr.get("downtime_s")),
         fmt(sb.get("downtime_s")) + (f" (restart {fmt(restart.get('restart_s'))}: actors up "
                                      f"{fmt(restart.get('workers_started_s'))}, loaded "
                                      f"{fmt(restart.get('restored_s'))})" if restart else "")),
        ("steps re-done per failure", fmt(sr.get("redone_steps")),
         f"{fmt(sb.get('redone_steps'))} (half the interval)"),
        ("lost s per failure", fmt(sr.get("lost_s_per_failure")), fmt(sb.get("lost_s_per_failure"))),
    ]
    for key in periods:
        ratio = summary.get("goodput_ratio", {}).get(key)
        rows.append((f"goodput, one failure every {key} s (COMPUTED)",
                     pct(sr.get("goodput", {}).get(key)),
                     pct(sb.get("goodput", {}).get(key)) + (f" (regrow / baseline = {ratio:.3f})"
                                                             if ratio is not None else "")))
    lines.append(f"| | regrow: snapshot every step, heal in place | baseline: checkpoint every "
                 f"{result['save_every']} steps, whole-job restart |")
    lines.append("|---|---:|---:|")
    lines += [f"| {name} | {left} | {right} |" for name, left, right in rows]
    lines.append("")
    lines.append(f"Goodput is COMPUTED from the measured per-failure cost (goodput = (1 - steady overhead) x "
                 f"(1 - lost s per failure / T)), not measured in a run with a failure every "
                 f"{' or '.join(periods)} s (the goodput phases measure it). Baseline detection is taken as "
                 f"regrow's; the failed job's teardown is not counted.")
    return lines


def terminate(signum: int, _frame: object) -> None:
    """SIGTERM (``timeout`` sends it): stops the job in progress (``Coordinator.stop``; its run returns at its next
    poll, and the bench then raises SystemExit so that the phases done so far are reported). If the run has not
    returned within ``SIGNAL_GRACE_S``, its workers are killed, and ``SIGNAL_RAISE_S`` later the signal is sent again
    (``timeout`` signals Ray's own processes too, so a run waiting on Ray may never notice the stop). With no job in
    progress, or at a second signal, raises SystemExit at once. Installed again after ``ray.init``, which installs
    its own (``sys.exit``)."""
    again = bool(SIGNALLED)
    SIGNALLED.append(signum)
    running = list(ACTIVE.items())
    if again or not running:
        raise SystemExit(f"signal {signum}")
    log(f"signal {signum}: stopping the job in progress")
    for _, (coordinator, _workers) in running:
        coordinator.stop(f"signal {signum}")
    threading.Thread(target=_unless_stopped, args=(signum, running), name="bench-signal", daemon=True).start()


def _unless_stopped(signum: int, running: list[tuple[int, tuple[Coordinator, int]]]) -> None:
    """The fallback of :func:`terminate`: kills the workers of the jobs whose run has not returned in time, then
    signals again (the handler then raises SystemExit in the main thread, wherever it waits)."""

    def wait(seconds: float) -> bool:  # whether a run is still in progress after that long
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(key in ACTIVE for key, _ in running):
            time.sleep(0.1)
        return any(key in ACTIVE for key, _ in running)

    if not wait(SIGNAL_GRACE_S):
        return
    for key, (coordinator, workers) in running:
        if key not in ACTIVE:
            continue
        try:
            import ray

            log(f"signal {signum}: the job did not stop within {SIGNAL_GRACE_S:.0f} s: killing its workers")
            kill_workers(ray, coordinator, workers, quiet=True)
        except Exception as error:  # noqa: BLE001 (best effort: the finally blocks still run)
            log(f"signal {signum}: workers not killed: {type(error).__name__}: {error}")
    if wait(SIGNAL_RAISE_S):
        log(f"signal {signum}: the job still runs: interrupting it")
        os.kill(os.getpid(), signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.combine:  # no run: the goodput phases of earlier results, side by side
        combined = combine(args.combine)
        lines = [f"Goodput phases merged from {', '.join(args.combine)}:", ""]
        lines += [f"- {name}: {source}" for name, source in combined["sources"].items()]
        table = "\n".join(lines + [""] + goodput_markdown(combined))
        print(table, flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as out:
                out.write(json.dumps({"bench": "ray_recovery_goodput_combined", **combined}) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return 0 if combined["sources"] else 1

    signal.signal(signal.SIGTERM, terminate)
    try:
        result = run(args)
    except BaseException as error:  # noqa: BLE001 (a failure line, as the other benches' runners write)
        traceback.print_exc()
        result = {"bench": "ray_recovery", "status": "failed", "error": f"{type(error).__name__}: {error}"}
    line = json.dumps(result)
    print(f"RESULT {line}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    if result["status"] != "failed":
        table = markdown(result)
        print(table, flush=True)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
