"""The ``regrow`` command line: ``regrow train``, ``regrow demo`` and ``regrow ckpt ...`` (in ``ckpt_cli.py``).

``regrow train`` spawns ``--nproc`` local processes (gloo on CPU, NCCL on GPUs) or, when started by torchrun
(``RANK``/``WORLD_SIZE`` in the environment), runs as the rank torchrun made it. Every argument problem is
reported at once, before anything starts.

The local launcher restarts a failed run up to ``--max-restarts`` times, as torchrun's agent would: between
attempts it replaces the snapshot process of every lost node and rebuilds it from its erasure-coding group
(``launch/local/nodes.py``), and the next attempt's ranks restore from the best source they share
(``recovery/restore.py``). ``--fault`` injects faults into the run (``launch/chaos/faults.py``),
``--hang-timeout`` restarts a job whose ranks stop making progress (``launch/local/watchdog.py``), and a run with a fault
plan ends with a fault report (``launch/chaos/report.py``, also ``regrow chaos``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from regrow.checkpoint.universal import storage
from regrow.comm.world import World, WorldConfig, destroy_world, init_world
from regrow.launch import ckpt_cli, ray_cli, snapshot_cli
from regrow.launch.chaos import faults
from regrow.launch.chaos import report as chaos
from regrow.launch.local.nodes import HealReport, LocalNodes
from regrow.launch.local.spawn import WorkerFailed, run_local
from regrow.launch.local.watchdog import Heartbeat, Watchdog
from regrow.recovery.order import Source
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import StepResult, Trainer, TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig


class ConfigErrors(ValueError):
    """All problems found in the command-line arguments, one per line."""


def build_config(args: argparse.Namespace) -> TrainerConfig:
    """Turns parsed arguments into a validated :class:`TrainerConfig`; raises :class:`ConfigErrors` listing every
    problem rather than only the first."""
    problems: list[str] = []

    def attempt(make):
        try:
            return make()
        except (ValueError, TypeError) as error:
            problems.append(str(error))
            return None

    model = attempt(lambda: GPTConfig.preset(args.preset, **({"seq_len": args.seq_len} if args.seq_len else {})))
    seq_len = args.seq_len or (model.seq_len if model else 128)
    data = attempt(lambda: DataConfig(seq_len=seq_len, micro_batch=args.micro_batch, global_batch=args.global_batch,
                                      seed=args.data_seed))
    optim = attempt(lambda: ZeroConfig(stage=args.stage, state_bits=args.state_bits, lr=args.lr,
                                       max_grad_norm=args.max_grad_norm, param_dtype=args.param_dtype))
    if data and args.global_batch % (args.micro_batch * args.nproc):
        problems.append(
            f"--global-batch={args.global_batch} is not divisible by --micro-batch x --nproc = "
            f"{args.micro_batch} x {args.nproc}; choose a multiple of {args.micro_batch * args.nproc}"
        )
    if args.nproc < 1:
        problems.append(f"--nproc={args.nproc} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device=cuda but no CUDA device is available; use --device cpu")
    if args.max_restarts < 0:
        problems.append(f"--max-restarts={args.max_restarts} must be >= 0")
    plan, plan_errors = faults.plan_from_args(args)
    problems += plan_errors
    problems += faults.plan_problems(plan, ranks=args.nproc, nodes=getattr(args, "nodes", 1), steps=args.steps,
                                     snapshot_every=getattr(args, "snapshot_every", 0),
                                     save_every=getattr(args, "save_every", 0),
                                     hang_timeout_s=getattr(args, "hang_timeout", 0.0))
    if getattr(args, "hang_timeout", 0.0) < 0:
        problems.append(f"--hang-timeout={args.hang_timeout} must be >= 0 (0: no progress watchdog)")
    if plan and _under_torchrun():
        problems.append("--fault runs under the local launcher (under torchrun, kill the processes yourself)")
    if args.command == "chaos" and not plan:
        problems.append("regrow chaos needs a fault plan: --fault KIND:TARGET@STEP, --fault-plan FILE or "
                        "--fault-mtbf SECONDS")
    problems += ckpt_cli.train_argument_problems(args)
    problems += snapshot_cli.train_argument_problems(args, under_torchrun=_under_torchrun())
    config = None
    if model and data and optim:
        config = attempt(lambda: TrainerConfig(
            model=model, data=data, optim=optim, steps=args.steps, warmup_steps=args.warmup_steps,
            seed=args.seed, log_every=args.log_every, eval_every=args.eval_every, metrics_path=args.metrics,
        ))
    if problems:
        raise ConfigErrors("invalid arguments:\n  - " + "\n  - ".join(problems))
    assert config is not None
    return config


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def train_rank(world: World, config: TrainerConfig, checkpointing: ckpt_cli.Checkpointing | None = None,
               snapshotting: snapshot_cli.Snapshotting | None = None) -> list[StepResult]:
    """One rank's whole run (the entry point of every spawned or torchrun-started process): resume (from the
    snapshots, else the checkpoint), attach the snapshot sink and the checkpoint writer if asked, the fault injector
    if the launcher gave a plan (after the snapshot sink, so it fires while a snapshot is in flight), then train."""
    trainer = Trainer(config, world)
    run_dir = os.environ.get(chaos.RUN_DIR_ENV)
    attempt = int(os.environ.get(faults.ATTEMPT_ENV, "0"))
    if snapshotting:
        snapshot_cli.prepare(trainer, snapshotting,
                             chaos.restore_recorder(run_dir, attempt, trainer.rank) if run_dir else None)
    if checkpointing:
        ckpt_cli.prepare(trainer, checkpointing)
        if run_dir and checkpointing.resume:
            chaos.record_restore(run_dir, attempt, trainer.rank, source=Source.CHECKPOINT, step=trainer.step,
                                 detail=str(checkpointing.resume))
    injector = faults.FaultInjector.from_env(trainer.rank)
    if injector is not None:
        trainer.sinks.append(injector)
        injector.attach(trainer.sinks)
    if run_dir:
        # Last, so that its beat before the optimizer step means every other sink let the step through.
        trainer.sinks.append(Heartbeat(run_dir, rank=trainer.rank, attempt=attempt, step=trainer.step))
    return trainer.run()


def backend_for(device: str) -> str:
    """The process-group backend for ``--device``: gloo on CPU, NCCL on CUDA (with gloo for CPU tensors)."""
    return "gloo" if device == "cpu" else "nccl" if device == "cuda" else "auto"


@dataclasses.dataclass(kw_only=True)
class Launch:
    """How the local launcher runs the ranks: how many, where, how long, how often it restarts, which faults."""

    nproc: int
    device: str = "cpu"
    timeout_s: float = 3600.0
    max_restarts: int = 0
    faults: list[faults.Fault] = dataclasses.field(default_factory=list)
    hang_timeout_s: float = 0.0
    """Kill and restart the job when a running rank makes no progress for this long (0: no watchdog)."""


def run_training(config: TrainerConfig, launch: Launch, checkpointing: ckpt_cli.Checkpointing | None = None,
                 snapshotting: snapshot_cli.Snapshotting | None = None,
                 recorder: chaos.Recorder | None = None) -> list[StepResult]:
    """Runs ``config`` on ``launch.nproc`` local processes, or in this process when torchrun started it.

    Local launcher with snapshots: this process starts the nodes' snapshot processes before the ranks and stops
    them after, whatever happens (``snapshot_cli.node_snapshots``); under torchrun the process is the one named by
    ``--snapshot-address`` (see ``launch/snapshot_cli.py`` for why). Returns the history of the last attempt (the
    steps it ran). ``recorder`` (local launcher) is told about every attempt, failure and heal, and reads what
    the ranks recorded (fired faults, heartbeats, restores) before the run directory goes; the ranks write
    heartbeats when it is given or ``launch.hang_timeout_s`` is set (the watchdog reads them)."""
    if _under_torchrun():
        world = init_world(config=WorldConfig(backend=backend_for(launch.device), timeout_s=config.optim.timeout_s))
        try:
            return train_rank(world, config, checkpointing, snapshotting)
        finally:
            destroy_world()
    with snapshot_cli.node_snapshots(snapshotting, config, launch.nproc) as nodes, \
            tempfile.TemporaryDirectory(prefix="regrow-run-") as run_dir:
        env = {**snapshot_cli.launcher_env(snapshotting), **faults.plan_env(launch.faults, run_dir)}
        if recorder is not None or launch.hang_timeout_s > 0:
            env[chaos.RUN_DIR_ENV] = run_dir
        attempt = 0
        try:
            while True:
                watchdog = Watchdog(run_dir, attempt=attempt, world_size=launch.nproc,
                                    timeout_s=launch.hang_timeout_s) if launch.hang_timeout_s > 0 else None
                if recorder is not None:
                    recorder.begin(attempt)
                try:
                    history = run_local(train_rank, launch.nproc, config, checkpointing, snapshotting,
                                        backend=backend_for(launch.device), timeout_s=launch.timeout_s,
                                        env={**env, faults.ATTEMPT_ENV: str(attempt)},
                                        rank_envs=nodes.rank_envs() if nodes else None, watchdog=watchdog)[0]
                    if recorder is not None:
                        recorder.finished(attempt)
                    return history
                except WorkerFailed as error:
                    if recorder is not None:
                        recorder.failed(attempt, error)
                    if attempt >= launch.max_restarts:
                        raise
                    attempt += 1
                    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                    reason = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
                    print(f"[launcher] attempt {attempt} failed ({reason}); restart {attempt} of "
                          f"{launch.max_restarts}", flush=True)
                    checkpointing, snapshotting, heal = _resumed(checkpointing, snapshotting, nodes)
                    if recorder is not None:
                        recorder.healed(attempt - 1, heal)
        finally:
            if recorder is not None:
                recorder.collect(run_dir)


def _resumed(checkpointing: ckpt_cli.Checkpointing | None, snapshotting: snapshot_cli.Snapshotting | None,
             nodes: LocalNodes | None) -> tuple[ckpt_cli.Checkpointing | None, snapshot_cli.Snapshotting | None,
                                                HealReport | None]:
    """The settings of the attempt after a failure: heal the nodes, then resume from the snapshots (which fall
    back to ``latest`` of the checkpoint root), or from ``latest`` when snapshots are off, or from scratch when
    nothing was saved. Also returns what healing did (None without nodes)."""
    heal = nodes.heal() if nodes is not None else None
    if snapshotting is not None and snapshotting.every:
        return checkpointing, dataclasses.replace(snapshotting, resume=True), heal
    if checkpointing is not None and checkpointing.ckpt_dir and storage.read_latest(Path(checkpointing.ckpt_dir)):
        return dataclasses.replace(checkpointing, resume="latest"), snapshotting, heal
    print("[launcher] no snapshot or checkpoint to resume from: the next attempt starts from step 0", flush=True)
    return checkpointing, snapshotting, heal


def add_training_arguments(parser: argparse.ArgumentParser, *, steps: int, nproc: int) -> None:
    parser.add_argument("--nproc", type=int, default=nproc, help="local processes (ranks) to spawn")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where ranks compute")
    parser.add_argument("--preset", default="small", help="model size: tiny, small, 350m, 1.3b")
    parser.add_argument("--seq-len", type=int, default=0, help="sequence length (default: the preset's)")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step over all ranks")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per forward/backward")
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage: 1 or 2")
    parser.add_argument("--state-bits", type=int, default=8, help="optimizer state bits: 8 or 32")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--param-dtype", default=None, help="bfloat16, float16 or float32 (default: model's)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--data-seed", type=int, default=0, help="data order seed")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--metrics", default=None, help="JSONL metrics file (rank 0)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the whole run is aborted")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart the ranks this many times after a failure (local launcher)")
    parser.add_argument("--fault", action="append", default=[], metavar="KIND:TARGET@STEP",
                        help="inject a fault: kill-rank:R@S, kill-node:N@S, hang-rank:R@S, slow-rank:R@S[-E][xF], "
                             "corrupt-snapshot:R@S or fail-ckpt:R@S (repeatable; with --max-restarts to recover; "
                             "see docs/chaos.md)")
    parser.add_argument("--fault-plan", default=None, metavar="FILE",
                        help="JSON fault plan: a list of fault strings or {kind, target, step} objects")
    parser.add_argument("--fault-mtbf", type=float, default=0.0, metavar="SECONDS",
                        help="draw random kill-rank/kill-node faults with this mean time between failures")
    parser.add_argument("--fault-seed", type=int, default=0, help="seed of the random faults (--fault-mtbf)")
    parser.add_argument("--fault-step-seconds", type=float, default=1.0, metavar="SECONDS",
                        help="seconds a step takes, to place the random faults at steps (default 1)")
    parser.add_argument("--hang-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="kill and restart the job when a rank makes no progress for this long (0: off)")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="write the fault report as JSON here (default: next to --metrics, if given)")


DEMO: dict = {"steps": 400, "nproc": 2, "nodes": 2, "ec_group_size": 2, "snapshot_every": 1, "max_restarts": 2,
              "hang_timeout": 60.0, "fault": ["kill-rank:0@150", "kill-node:1@300"]}
"""``regrow demo``'s defaults: 2 CPU ranks on 2 simulated nodes whose snapshot processes erasure-code each other;
rank 0 is killed, then node 1 (its rank and its snapshot process), and the run recovers from both. Sized to finish
in about 3 minutes on a 2-core machine (4 ranks took over 4)."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="regrow", description="Fault-tolerant distributed training for PyTorch.")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the GPT on the embedded corpus")
    add_training_arguments(train, steps=200, nproc=2)
    ckpt_cli.add_train_arguments(train)
    snapshot_cli.add_train_arguments(train)
    chaos_parser = commands.add_parser("chaos", help="regrow train under a fault plan, ending with the fault report")
    add_training_arguments(chaos_parser, steps=200, nproc=2)
    ckpt_cli.add_train_arguments(chaos_parser)
    snapshot_cli.add_train_arguments(chaos_parser)
    chaos.add_arguments(chaos_parser)
    demo = commands.add_parser("demo", help="the README's main job: CPU ranks on 2 simulated nodes, ZeRO-2, 8-bit "
                                            "Adam; a rank and a node are killed and recovered; report, loss table")
    add_training_arguments(demo, steps=DEMO["steps"], nproc=DEMO["nproc"])
    ckpt_cli.add_train_arguments(demo)
    snapshot_cli.add_train_arguments(demo)
    demo.set_defaults(**{key: value for key, value in DEMO.items() if key not in ("steps", "nproc", "fault")})
    ray_cli.add_parser(commands, add_training_arguments)
    ckpt_cli.add_parser(commands)
    return top


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "ckpt":
        try:
            return ckpt_cli.main(args)
        except BrokenPipeError:  # e.g. `regrow ckpt inspect DIR | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "ray":
        args.nproc = args.workers  # one rank per Ray worker
        try:
            return ray_cli.run(args, build_config(args))
        except ConfigErrors as error:
            print(f"regrow ray: {error}", file=sys.stderr)
            return 2
    if _under_torchrun():
        args.nproc = int(os.environ["WORLD_SIZE"])  # started by torchrun: it decided the number of ranks
    if args.command == "demo" and not args.eval_every:
        args.eval_every = max(1, args.steps // 10)
    if args.command == "demo" and not (args.fault or args.fault_plan or args.fault_mtbf):
        args.fault = list(DEMO["fault"])
    scratch = None
    if args.command == "demo" and not args.metrics:
        # The loss table spans every attempt, so the demo keeps metrics even when not asked to.
        scratch = tempfile.TemporaryDirectory(prefix="regrow-demo-")
        args.metrics = str(Path(scratch.name) / "metrics.jsonl")
        args.metrics_is_scratch = True
    try:
        return _main(args)
    finally:
        if scratch is not None:
            scratch.cleanup()


def _main(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigErrors as error:
        print(f"regrow {args.command}: {error}", file=sys.stderr)
        return 2
    if args.command == "demo":
        print(f"regrow demo: training GPT '{args.preset}' on pydoc_data.topics with {args.nproc} CPU processes on "
              f"{args.nodes} simulated nodes, ZeRO-{config.optim.stage}, {config.optim.state_bits}-bit Adam state, "
              f"{config.steps} steps; faults planned: {', '.join(args.fault)}", flush=True)
    plan, _ = faults.plan_from_args(args)
    launch = Launch(nproc=args.nproc, device=args.device, timeout_s=args.timeout, max_restarts=args.max_restarts,
                    faults=plan, hang_timeout_s=args.hang_timeout)
    checkpointing, snapshotting = ckpt_cli.Checkpointing.from_args(args), snapshot_cli.Snapshotting.from_args(args)
    if args.command == "chaos":
        try:
            return chaos.run_chaos(args, config, launch, checkpointing, snapshotting, run_training)
        except snapshot_cli.SnapshotStartError as error:
            print(f"regrow chaos: {error}", file=sys.stderr)
            return 1
    recorder = chaos.Recorder(plan, hang_timeout_s=args.hang_timeout) if plan and not _under_torchrun() else None
    try:
        history = run_training(config, launch, checkpointing, snapshotting, recorder=recorder)
    except (WorkerFailed, snapshot_cli.SnapshotStartError) as error:
        print(f"regrow {args.command}: {error}", file=sys.stderr)
        if recorder is not None and recorder.attempts:
            chaos.emit(chaos.build_report(recorder, [], ok=False), args)
        return 1
    if recorder is not None:
        chaos.emit(chaos.build_report(recorder, history), args)
    if args.command == "demo" and args.metrics and Path(args.metrics).exists():
        history = history_from_metrics(args.metrics)
    if args.command == "demo" or args.eval_every:
        print("\n" + demo_table(history))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
