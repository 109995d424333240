"""The ``regrow`` command line: ``regrow train``, ``regrow demo`` and ``regrow ckpt ...`` (in ``ckpt_cli.py``).

``regrow train`` spawns ``--nproc`` local processes (gloo on CPU, NCCL on GPUs) or, when started by torchrun
(``RANK``/``WORLD_SIZE`` in the environment), runs as the rank torchrun made it. Every argument problem is
reported at once, before anything starts.

The local launcher restarts a failed run up to ``--max-restarts`` times, as torchrun's agent would: between
attempts it replaces the snapshot process of every lost node and rebuilds it from its erasure-coding group
(``launch/nodes.py``), and the next attempt's ranks restore from the best source they share
(``checkpoint/snapshot_recovery.py``). ``--fault`` injects faults into the run (``launch/faults.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from regrow.checkpoint import storage
from regrow.comm.world import World, WorldConfig, destroy_world, init_world
from regrow.launch import ckpt_cli, faults, snapshot_cli
from regrow.launch.nodes import LocalNodes
from regrow.launch.spawn import WorkerFailed, run_local
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import StepResult, Trainer, TrainerConfig
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero import ZeroConfig


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
    plan = []
    for text in args.fault:
        try:
            plan.append(faults.Fault.parse(text))
        except ValueError as error:
            problems.append(str(error))
    problems += faults.plan_problems(plan, ranks=args.nproc, nodes=getattr(args, "nodes", 1), steps=args.steps)
    if plan and _under_torchrun():
        problems.append("--fault runs under the local launcher (under torchrun, kill the processes yourself)")
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
    if snapshotting:
        snapshot_cli.prepare(trainer, snapshotting)
    if checkpointing:
        ckpt_cli.prepare(trainer, checkpointing)
    injector = faults.FaultInjector.from_env(trainer.rank)
    if injector is not None:
        trainer.sinks.append(injector)
    return trainer.run()


def _backend(device: str) -> str:
    return "gloo" if device == "cpu" else "nccl" if device == "cuda" else "auto"


@dataclasses.dataclass(kw_only=True)
class Launch:
    """How the local launcher runs the ranks: how many, where, how long, how often it restarts, which faults."""

    nproc: int
    device: str = "cpu"
    timeout_s: float = 3600.0
    max_restarts: int = 0
    faults: list[faults.Fault] = dataclasses.field(default_factory=list)


def run_training(config: TrainerConfig, launch: Launch, checkpointing: ckpt_cli.Checkpointing | None = None,
                 snapshotting: snapshot_cli.Snapshotting | None = None) -> list[StepResult]:
    """Runs ``config`` on ``launch.nproc`` local processes, or in this process when torchrun started it.

    Local launcher with snapshots: this process starts the nodes' snapshot processes before the ranks and stops
    them after, whatever happens (``snapshot_cli.node_snapshots``); under torchrun the process is the one named by
    ``--snapshot-address`` (see ``launch/snapshot_cli.py`` for why). Returns the history of the last attempt (the
    steps it ran)."""
    if _under_torchrun():
        world = init_world(config=WorldConfig(backend=_backend(launch.device), timeout_s=config.optim.timeout_s))
        try:
            return train_rank(world, config, checkpointing, snapshotting)
        finally:
            destroy_world()
    with snapshot_cli.node_snapshots(snapshotting, config, launch.nproc) as nodes, \
            tempfile.TemporaryDirectory(prefix="regrow-faults-") as fired_dir:
        attempt = 0
        while True:
            try:
                return run_local(train_rank, launch.nproc, config, checkpointing, snapshotting,
                                 backend=_backend(launch.device), timeout_s=launch.timeout_s,
                                 env={**snapshot_cli.launcher_env(snapshotting),
                                      **faults.plan_env(launch.faults, fired_dir)},
                                 rank_envs=nodes.rank_envs() if nodes else None)[0]
            except WorkerFailed as error:
                if attempt >= launch.max_restarts:
                    raise
                attempt += 1
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                reason = lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
                print(f"[launcher] attempt {attempt} failed ({reason}); restart {attempt} of {launch.max_restarts}",
                      flush=True)
                checkpointing, snapshotting = _resumed(checkpointing, snapshotting, nodes)


def _resumed(checkpointing: ckpt_cli.Checkpointing | None, snapshotting: snapshot_cli.Snapshotting | None,
             nodes: LocalNodes | None) -> tuple[ckpt_cli.Checkpointing | None, snapshot_cli.Snapshotting | None]:
    """The settings of the attempt after a failure: heal the nodes, then resume from the snapshots (which fall
    back to ``latest`` of the checkpoint root), or from ``latest`` when snapshots are off, or from scratch when
    nothing was saved."""
    if nodes is not None:
        nodes.heal()
    if snapshotting is not None and snapshotting.every:
        return checkpointing, dataclasses.replace(snapshotting, resume=True)
    if checkpointing is not None and checkpointing.ckpt_dir and storage.read_latest(Path(checkpointing.ckpt_dir)):
        return dataclasses.replace(checkpointing, resume="latest"), snapshotting
    print("[launcher] no snapshot or checkpoint to resume from: the next attempt starts from step 0", flush=True)
    return checkpointing, snapshotting


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
                        help="inject a fault: kill-rank:R@S or kill-node:N@S (repeatable; with --max-restarts to "
                             "recover from it)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="regrow", description="Fault-tolerant distributed training for PyTorch.")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the GPT on the embedded corpus")
    add_training_arguments(train, steps=200, nproc=2)
    ckpt_cli.add_train_arguments(train)
    snapshot_cli.add_train_arguments(train)
    demo = commands.add_parser("demo", help="the README's main job: 2 CPU ranks, ZeRO-2, 8-bit Adam, loss table")
    add_training_arguments(demo, steps=500, nproc=2)
    ckpt_cli.add_parser(commands)
    return top


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
    if _under_torchrun():
        args.nproc = int(os.environ["WORLD_SIZE"])  # started by torchrun: it decided the number of ranks
    if args.command == "demo" and not args.eval_every:
        args.eval_every = max(1, args.steps // 10)
    try:
        config = build_config(args)
    except ConfigErrors as error:
        print(f"regrow {args.command}: {error}", file=sys.stderr)
        return 2
    if args.command == "demo":
        print(f"regrow demo: training GPT '{args.preset}' on pydoc_data.topics with {args.nproc} CPU processes, "
              f"ZeRO-{config.optim.stage}, {config.optim.state_bits}-bit Adam state, {config.steps} steps", flush=True)
    try:
        launch = Launch(nproc=args.nproc, device=args.device, timeout_s=args.timeout, max_restarts=args.max_restarts,
                        faults=[faults.Fault.parse(text) for text in args.fault])
        history = run_training(config, launch, ckpt_cli.Checkpointing.from_args(args),
                               snapshot_cli.Snapshotting.from_args(args))
    except (WorkerFailed, snapshot_cli.SnapshotStartError) as error:
        print(f"regrow {args.command}: {error}", file=sys.stderr)
        return 1
    if args.command == "demo" or args.eval_every:
        print("\n" + demo_table(history))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
