"""``regrow run [flags] SCRIPT [ARGS...]``: a user's own training script on the local launcher, fault-tolerant.

The launcher does for the script what ``regrow train`` does for regrow's trainer: it spawns ``--nproc`` ranks with
the process group up (the script's ``regrow.join_world()`` returns it), starts one snapshot process per simulated
node (``--snapshot-every``, ``--nodes``, ``--ec-group-size``), restarts every rank after a failure (``--max-restarts``,
healing a lost node's snapshot process from its erasure-coding group), injects the faults of ``--fault`` and ends
with the fault report. The script's :class:`~regrow.launch.guard.Guard` reads what to keep from ``REGROW_GUARD``
(snapshots, ``--save-every``/``--ckpt-dir`` checkpoints) and, on every start, restores what the job holds: the same
script runs unchanged under ``regrow run``, torchrun and ``regrow ray --entry``.

Each rank runs the script as ``python SCRIPT ARGS...`` would (``__name__ == "__main__"``, ``sys.argv``, the
script's folder first on ``sys.path``); a ``sys.exit(0)`` ends the rank normally, any other exit code fails it.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from regrow.comm.world import World
from regrow.launch.chaos.plan import build_plan, plan_env, plan_problems
from regrow.launch.chaos.recorder import Recorder
from regrow.launch.chaos.report import build_report, emit
from regrow.launch.guard import GuardConfig
from regrow.launch.job import snapshot_problems
from regrow.launch.local.attempts import AttemptsConfig, run_attempts
from regrow.launch.local.nodes import NodesConfig
from regrow.launch.local.spawn import WorkerFailed
from regrow.launch.options import RunOptions
from regrow.launch.run import SnapshotStartError, launcher_env, node_fault_entry, node_snapshots, persist_config

NO_STEP_LIMIT = 2**31 - 1
"""The launcher does not know how many steps a script runs: a fault's step is checked against this only."""


@dataclass(frozen=True)
class ScriptWork:
    """What every rank runs: the script and its arguments (picklable: sent to each spawned rank)."""

    path: str
    args: tuple[str, ...] = ()

    def after_failure(self) -> ScriptWork:
        """The same script: its Guard finds what the failed attempt left and restores it."""
        return self

    def warm_up(self, local_rank: int) -> None:
        """A standby rank's preparation (``--warm-restarts``): torch and regrow imported, the CUDA context of the
        device this local rank will use made. The script itself runs only once the standby takes over."""
        import torch

        import regrow.launch.guard  # noqa: F401 (the Guard's imports: the optimizer, the snapshot sink, recovery)

        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)


class ScriptFailed(RuntimeError):
    """The script exited with a non-zero code."""


def run_script(world: World, work: ScriptWork) -> int:
    """One rank: runs the script as ``__main__`` (see the module docstring); returns 0."""
    folder = str(Path(work.path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.argv = [work.path, *work.args]
    try:
        runpy.run_path(work.path, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise ScriptFailed(f"{work.path} exited with code {exit_.code!r} on rank {world.rank}") from None
    return 0


def add_parser(commands: argparse._SubParsersAction, flags: tuple, defaults: RunOptions) -> None:
    """Registers ``regrow run`` with the launcher, checkpoint, snapshot and fault ``flags`` (``parser.py``'s)."""
    sub = commands.add_parser("run", help="run your own training script (with a regrow.Guard) on local ranks, "
                                          "restarting it after failures",
                              description=__doc__.split("\n\n")[0])
    for flag in flags:
        flag.add_to(sub, defaults)
    sub.add_argument("script", metavar="SCRIPT", help="the training script (python file)")
    sub.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")


def problems_of(options: RunOptions, script: str) -> list[str]:
    """Every problem of a ``regrow run`` command line, each naming its flag."""
    problems = options.launch.problems() + options.checkpoint.problems() + options.faults.problems()
    problems += snapshot_problems(options)
    path = Path(script)
    if not path.is_file():
        problems.append(f"SCRIPT={script}: no such file; give the path of your training script")
    elif path.suffix != ".py":
        problems.append(f"SCRIPT={script}: not a .py file; regrow run runs Python scripts")
    if options.launch.torchrun:
        problems.append("regrow run is the local launcher; under torchrun, run your script itself "
                        "(`torchrun ... script.py`) with the node helper (`python -m regrow.launch.torchrun node`)")
    return problems


def main(args: argparse.Namespace, options: RunOptions) -> int:
    """``regrow run`` from its parsed arguments and their typed options (``parser.options_from_args``); returns the
    exit code."""
    launch, faults, snapshot, checkpoint = options.launch, options.faults, options.snapshot, options.checkpoint
    problems = problems_of(options, args.script)
    plan, plan_errors = build_plan(faults.faults, plan_file=faults.plan_file, mtbf_s=0.0, seed=faults.seed,
                                   step_s=faults.step_seconds, ranks=launch.nproc, nodes=snapshot.nodes,
                                   node_faults=snapshot.nodes > 1 and snapshot.ec_group_size > 0,
                                   steps=NO_STEP_LIMIT, max_restarts=launch.max_restarts)
    problems += plan_errors + plan_problems(plan, ranks=launch.nproc, nodes=snapshot.nodes, steps=NO_STEP_LIMIT,
                                            snapshot_every=snapshot.every, save_every=checkpoint.save_every,
                                            hang_timeout_s=faults.hang_timeout_s,
                                            erasure_coding=bool(snapshot.every) and snapshot.ec_group_size > 1,
                                            parity_every=faults.parity_every)
    if faults.mtbf_s:
        problems.append("--fault-mtbf needs the run's length in steps, which regrow run does not know; list the "
                        "faults with --fault or --fault-plan")
    guard = None
    try:
        guard = GuardConfig(snapshot_every=snapshot.every, save_every=checkpoint.save_every,
                            ckpt_dir=checkpoint.ckpt_dir, keep_last=checkpoint.keep_last, on_error=checkpoint.on_error,
                            timeout_s=snapshot.timeout_s, parity_every=faults.parity_every)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        print("regrow run: invalid arguments:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    assert guard is not None
    work = ScriptWork(path=str(Path(args.script)), args=tuple(args.script_args))
    recorder = Recorder(plan) if plan else None
    config = AttemptsConfig(nproc=launch.nproc, backend=launch.backend, timeout_s=launch.timeout_s,
                            max_restarts=launch.max_restarts, hang_timeout_s=faults.hang_timeout_s,
                            warm_restarts=launch.warm_restarts)
    try:
        with tempfile.TemporaryDirectory(prefix="regrow-run-") as run_dir, \
                node_snapshots(_node_layout(options), snapshot, **node_fault_entry(plan, run_dir)) as nodes:
            env = {**launcher_env(snapshot), **plan_env(plan, run_dir), **guard.to_env()}
            run_attempts(run_script, work, config, run_dir=run_dir, env=env, nodes=nodes, observer=recorder)
    except (WorkerFailed, SnapshotStartError) as error:
        print(f"regrow run: {error}", file=sys.stderr)
        if recorder is not None and recorder.attempts:
            emit(build_report(recorder, [], ok=False), options.report_path())
        return 1
    if recorder is not None:
        with contextlib.suppress(BrokenPipeError):
            emit(build_report(recorder, []), options.report_path())
    return 0


def _node_layout(options: RunOptions) -> NodesConfig | None:
    """The local launcher's snapshot processes for the script (sized when the ranks attach: the launcher cannot
    know the script's model)."""
    snapshot = options.snapshot
    if not snapshot.active or snapshot.address is not None:
        return None
    return NodesConfig(ranks=options.launch.nproc, nodes=snapshot.nodes, ec_group_size=snapshot.ec_group_size,
                       ec_parity=snapshot.ec_parity, shm_dir=snapshot.shm_dir, bytes_per_rank=0,
                       persist=persist_config(options))


__all__ = ["ScriptWork", "add_parser", "main", "run_script"]
