"""The ``regrow`` argument parser, built from the option dataclasses (``options.py``), and the one way back from a
parsed command line to typed options (:func:`options_from_args`).

Each flag is a :class:`Flag`: its name, the option part and field it sets, its help. Its default is the field's
default in the sub-command's defaults (:data:`~regrow.launch.options.DEMO` for ``regrow demo``, the dataclasses'
own otherwise), so no default is written here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.checkpoint.universal.writer import ON_ERROR
from regrow.launch import ckpt_cli, data_cli, script_cli
from regrow.launch.options import (
    DEMO,
    RESUME_SNAPSHOT,
    CheckpointOptions,
    FaultOptions,
    LaunchOptions,
    RayOptions,
    RunOptions,
    SnapshotOptions,
    TrainOptions,
    with_demo_rules,
)
from regrow.trainer.data import DataConfig
from regrow.trainer.data.config import TOKEN_DTYPES

PARTS: dict[type, str] = {hint: name for name, hint in typing.get_type_hints(RunOptions).items() if name != "command"}
"""The option parts a flag may set (``TrainOptions``, ...), each with its attribute of
:class:`~regrow.launch.options.RunOptions`."""


@dataclass(frozen=True)
class Flag:
    """One command-line flag: it sets field ``field`` of option part ``part`` (one of :data:`PARTS`)."""

    name: str
    part: type
    field: str
    help: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """More ``add_argument`` keywords (type, choices, action, metavar), never a default."""

    @property
    def dest(self) -> str:
        """Where argparse keeps the value: ``<RunOptions attribute>.<field>``."""
        return f"{PARTS[self.part]}.{self.field}"

    def add_to(self, parser: argparse.ArgumentParser, defaults: RunOptions) -> None:
        kwargs = dict(self.kwargs)
        if "choices" not in kwargs and kwargs.get("action") not in ("store_true", "store_false"):
            # What argparse would show for the flag's own dest, rather than the part-qualified one.
            kwargs.setdefault("metavar", self.name.lstrip("-").upper().replace("-", "_"))
        # A copy, so that a list default (``--fault``) is never the preset's own list.
        default = copy.copy(getattr(getattr(defaults, PARTS[self.part]), self.field))
        parser.add_argument(self.name, dest=self.dest, default=default, help=self.help, **kwargs)


def _flag(name: str, part: type, field: str, help: str | None = None, **kwargs: Any) -> Flag:
    return Flag(name, part, field, help, kwargs)


TRAINING = (
    _flag("--nproc", LaunchOptions, "nproc", "local processes (ranks) to spawn", type=int),
    _flag("--device", LaunchOptions, "device", "where ranks compute", choices=("auto", "cpu", "cuda")),
    _flag("--preset", TrainOptions, "preset", "regrow's GPT of this size: tiny, small (the default), 350m, 1.3b"),
    _flag("--model", TrainOptions, "model",
          "your own model instead of --preset: a function returning an nn.Module, found from the working directory "
          "like python -m does, e.g. examples.hf_llama:build", metavar="PKG.MODULE:FUNCTION"),
    _flag("--model-kwargs", TrainOptions, "model_kwargs", "the --model function's keyword arguments, a JSON object",
          metavar="JSON"),
    _flag("--dropout", TrainOptions, "dropout", "dropout probability of regrow's GPT, in [0, 1) (default: the "
          "preset's, 0)", type=float),
    _flag("--loss", TrainOptions, "loss",
          "how a batch's loss is computed: auto (model for the GPT, logits otherwise), model (model(x, y) returns "
          "it), logits (cross entropy of model(x)), hf (a Hugging Face causal LM's .loss), or your "
          "pkg.module:function(model, x, y)"),
    _flag("--seq-len", TrainOptions, "seq_len",
          f"sequence length (default: the preset's; {DataConfig.seq_len} with --model)", type=int),
    _flag("--steps", TrainOptions, "steps", "optimizer steps", type=int),
    _flag("--warmup-steps", TrainOptions, "warmup_steps", type=int),
    _flag("--global-batch", TrainOptions, "global_batch", "sequences per step over all ranks", type=int),
    _flag("--micro-batch", TrainOptions, "micro_batch", "sequences per rank per forward/backward", type=int),
    _flag("--stage", TrainOptions, "stage", "ZeRO stage: 1, 2 or 3 (3 also shards the parameters)", type=int),
    _flag("--activation-checkpointing", TrainOptions, "activation_checkpointing",
          "recompute each block's activations in the backward instead of keeping them (less memory, about one "
          "more forward per step; results unchanged)", action="store_true"),
    _flag("--compile", TrainOptions, "compile",
          "torch.compile the model's forward: auto (the default: inductor on CUDA, off on the CPU), off or a "
          "backend name (inductor, aot_eager, ...); not with --stage 3"),
    _flag("--state-bits", TrainOptions, "state_bits", "optimizer state bits: 8 or 32", type=int),
    _flag("--lr", TrainOptions, "lr", type=float),
    _flag("--max-grad-norm", TrainOptions, "max_grad_norm", "0 disables clipping", type=float),
    _flag("--param-dtype", TrainOptions, "param_dtype", "bfloat16, float16 or float32 (default: model's)"),
    _flag("--grad-dtype", TrainOptions, "grad_dtype",
          "float32 (the default) or bfloat16: the dtype of each rank's gradient shard; bfloat16 saves 2 bytes per "
          "parameter (divided by the ranks) and rounds accumulated gradients to bfloat16"),
    _flag("--seed", TrainOptions, "seed", "model initialisation seed", type=int),
    _flag("--data-seed", TrainOptions, "data_seed", "data order seed", type=int),
    _flag("--data", TrainOptions, "data",
          "token files (.bin or .npy, flat uint16/uint32 ids; `regrow data prepare` makes them) instead of the "
          "embedded corpus; a window never spans two files (docs/data.md)", nargs="+", metavar="PATH"),
    _flag("--data-dtype", TrainOptions, "data_dtype",
          "dtype of the .bin token files (default: their sidecar's, else uint16)", choices=TOKEN_DTYPES),
    _flag("--log-every", TrainOptions, "log_every", type=int),
    _flag("--eval-every", TrainOptions, "eval_every", type=int),
    _flag("--metrics", TrainOptions, "metrics", "JSONL metrics file (rank 0)"),
    _flag("--timeout", LaunchOptions, "timeout_s", "seconds before the whole run is aborted", type=float),
    _flag("--max-restarts", LaunchOptions, "max_restarts",
          "restart the ranks this many times after a failure (local launcher)", type=int),
    _flag("--warm-restarts", LaunchOptions, "warm_restarts",
          "keep a warm standby process per rank (imports done, CUDA context and snapshot copier started) that "
          "takes over the next restart (local launcher; about 1 GB of GPU memory per rank)", action="store_true"),
    _flag("--fault", FaultOptions, "faults",
          "inject a fault: kill-rank:R@S, kill-node:N@S, hang-rank:R@S, slow-rank:R@S[-E][xF], corrupt-snapshot:R@S "
          "or fail-ckpt:R@S (repeatable; with --max-restarts to recover; see docs/chaos.md)",
          action="append", metavar="KIND:TARGET@STEP"),
    _flag("--fault-plan", FaultOptions, "plan_file",
          "JSON fault plan: a list of fault strings or {kind, target, step} objects", metavar="FILE"),
    _flag("--fault-mtbf", FaultOptions, "mtbf_s",
          "draw random kill-rank/kill-node faults with this mean time between failures", type=float,
          metavar="SECONDS"),
    _flag("--fault-seed", FaultOptions, "seed", "seed of the random faults (--fault-mtbf)", type=int),
    _flag("--fault-step-seconds", FaultOptions, "step_seconds",
          "seconds a step takes, to place the random faults at steps (default 1)", type=float, metavar="SECONDS"),
    _flag("--hang-timeout", FaultOptions, "hang_timeout_s",
          "kill and restart the job when a rank makes no progress for this long (0: off)", type=float,
          metavar="SECONDS"),
    _flag("--straggler-window", FaultOptions, "straggler_window",
          "compare the ranks' busy time (step time minus waiting for peers) every this many steps and name a rank "
          "slower than the others' median by --straggler-margin (default 10; 0: off)", type=int, metavar="STEPS"),
    _flag("--straggler-margin", FaultOptions, "straggler_margin",
          "how much busier than the others' median a straggler is (default 0.5: half again)", type=float),
    _flag("--parity-every", FaultOptions, "parity_every",
          "every this many steps, check that the ranks agree on the parameters, step, data cursor and lineage and "
          "that no optimizer shard changed between steps; a mismatch restarts from the last good snapshot "
          "(default 100; 0: off)", type=int, metavar="STEPS"),
    _flag("--report", FaultOptions, "report",
          "write the fault report as JSON here (default: next to --metrics, if given)", metavar="FILE"),
)
"""The flags every training sub-command has (``regrow train``, ``chaos``, ``demo``, ``ray``)."""

CHECKPOINTS = (
    _flag("--save-every", CheckpointOptions, "save_every", "save a checkpoint every N steps (0: never)", type=int),
    _flag("--ckpt-dir", CheckpointOptions, "ckpt_dir", "checkpoint root, visible to every rank"),
    _flag("--keep-last", CheckpointOptions, "keep_last", "checkpoints to keep (>= 2)", type=int),
    _flag("--ckpt-on-error", CheckpointOptions, "on_error",
          "after a failed save (latest keeps the last good checkpoint): train on, the next save trying again, or "
          "stop with the error", choices=ON_ERROR),
    _flag("--resume", CheckpointOptions, "resume",
          "resume from a checkpoint directory, a root, 'latest' of --ckpt-dir, or 'snapshot': the node's in-memory "
          "snapshots, falling back to 'latest' of --ckpt-dir", metavar=f"DIR|latest|{RESUME_SNAPSHOT}"),
)

SNAPSHOTS = (
    _flag("--snapshot-every", SnapshotOptions, "every",
          "snapshot every rank's shard into the node's shared memory every N steps (0: never)", type=int,
          metavar="N"),
    _flag("--snapshot-address", SnapshotOptions, "address",
          f"use this node's running snapshot process (token in {TOKEN_ENV}) instead of starting one; required "
          "under torchrun", metavar="HOST:PORT"),
    _flag("--snapshot-shm-dir", SnapshotOptions, "shm_dir", "tmpfs for the snapshots the launcher starts"),
    _flag("--nodes", SnapshotOptions, "nodes",
          "split the local ranks into M simulated nodes, each with its own snapshot process", type=int, metavar="M"),
    _flag("--ec-group-size", SnapshotOptions, "ec_group_size",
          "erasure-code the snapshots across groups of N nodes (0: off)", type=int, metavar="N"),
    _flag("--ec-parity", SnapshotOptions, "ec_parity", "nodes of an erasure-coding group that may be lost at once",
          type=int, metavar="P"),
    _flag("--persist-every", SnapshotOptions, "persist_every",
          "the snapshot processes write a universal checkpoint to --ckpt-dir every K steps from the snapshots, at no "
          "cost to the ranks (0: off)", type=int, metavar="K"),
)

CHAOS = (
    _flag("--reference", FaultOptions, "reference",
          "also run the same training without faults (same seed) and compare the final loss and the final "
          "checkpoints", action="store_true"),
)

RAY = (
    _flag("--address", RayOptions, "address",
          "'local' (start Ray on this machine), 'auto' (the cluster this machine belongs to), or host:port of a Ray "
          "cluster"),
    _flag("--workers", RayOptions, "workers", "ranks, one Ray actor each", type=int),
    _flag("--cpus-per-worker", RayOptions, "cpus_per_worker", type=float),
    _flag("--gpus-per-worker", RayOptions, "gpus_per_worker", "1 on GPU clusters (NCCL); 0: CPU (gloo)", type=float),
    _flag("--ranks-per-node", RayOptions, "ranks_per_node",
          "place exactly N consecutive ranks per node (needed for --ec-group-size; 0: Ray decides)", type=int),
    _flag("--snapshot-every", RayOptions, "snapshot_every",
          "in-memory snapshot every N steps (0: off; 1: nothing re-done after a failure; a larger N trades re-done "
          "steps for cheaper training: docs/architecture.md, 'How often to snapshot')", type=int),
    _flag("--ec-group-size", RayOptions, "ec_group_size", "erasure-code snapshots across N nodes (0: off)", type=int),
    _flag("--ec-parity", RayOptions, "ec_parity", type=int),
    _flag("--ckpt-dir", CheckpointOptions, "ckpt_dir", "universal checkpoints: the last restore source"),
    _flag("--save-every", CheckpointOptions, "save_every", "save a universal checkpoint every N steps (0: never)",
          type=int),
    _flag("--elastic-wait", RayOptions, "elastic_wait_s",
          "elastic mode: seconds to wait for a lost rank's replacement before going on with fewer ranks, resharded "
          "from the last checkpoint of --ckpt-dir; the job grows back at a --save-every step once resources "
          "return (0: off)", type=float),
    _flag("--standby", RayOptions, "standby",
          "standby workers per node, started ahead of need: a lost rank is taken over by its node's standby (1.7 s "
          "to resume on 4 GPUs, against 5.5-7.3 s with a new actor; 0: off); with a standby, a straggler the "
          "monitor names is replaced the same way", type=int),
    _flag("--resources-timeout", RayOptions, "resources_timeout_s",
          "seconds to wait for a worker's resources before giving up", type=float),
    _flag("--events", RayOptions, "events", "JSONL file of every event (failures, restores, ...)"),
    _flag("--entry", RayOptions, "entry",
          "run your own training loop: every worker calls this function (resolved like python -m, from the current "
          "directory) once its process group is up, and again from the top after every failure healed; its "
          "regrow.Guard restores and snapshots (--snapshot-every, --save-every, --ckpt-dir are its settings)",
          metavar="PKG.MODULE:FUNCTION"),
    _flag("--entry-kwargs", RayOptions, "entry_kwargs", "the --entry function's keyword arguments, a JSON object",
          metavar="JSON"),
)

SCRIPT_FLAGS = tuple(flag for flag in TRAINING if flag.part in (LaunchOptions, FaultOptions)
                     and flag.field not in ("mtbf_s", "seed", "step_seconds")) + \
    tuple(flag for flag in CHECKPOINTS if flag.field != "resume") + SNAPSHOTS
"""``regrow run``'s flags: the launcher's, the faults', the checkpoints' and the snapshots' (the script trains)."""

COMMANDS: dict[str, tuple[str, RunOptions, tuple[Flag, ...]]] = {
    "train": ("train a model (regrow's GPT or yours: --model) on the embedded corpus or token files (--data)",
              RunOptions(command="train"),
              TRAINING + CHECKPOINTS + SNAPSHOTS),
    "chaos": ("regrow train under a fault plan, ending with the fault report", RunOptions(command="chaos"),
              TRAINING + CHECKPOINTS + SNAPSHOTS + CHAOS),
    "demo": ("the README's main job: CPU ranks on 2 simulated nodes, ZeRO-2, 8-bit Adam; a rank and a node are "
             "killed and recovered; report, loss table", DEMO, TRAINING + CHECKPOINTS + SNAPSHOTS),
    "ray": ("train on a Ray cluster with automatic recovery", RunOptions(command="ray"), TRAINING + RAY),
}
"""The training sub-commands: help, the defaults their flags start from, their flags (``regrow ckpt`` is
``ckpt_cli.py``'s)."""


def build_parser() -> argparse.ArgumentParser:
    """The whole ``regrow`` command line."""
    top = argparse.ArgumentParser(prog="regrow", description="Fault-tolerant distributed training for PyTorch.")
    commands = top.add_subparsers(dest="command", required=True)
    for name, (summary, defaults, flags) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary)
        for flag in flags:
            flag.add_to(sub, defaults)
    ckpt_cli.add_parser(commands)
    script_cli.add_parser(commands, SCRIPT_FLAGS, RunOptions(command="run"))
    data_cli.add_parser(commands)
    return top


def torchrun_world_size(environ: Mapping[str, str] = os.environ) -> int | None:
    """torchrun's number of ranks when torchrun started this process (``RANK`` and ``WORLD_SIZE`` set), else None."""
    return int(environ["WORLD_SIZE"]) if "RANK" in environ and "WORLD_SIZE" in environ else None


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """The typed options of a parsed ``regrow train|chaos|demo|ray`` command line (not validated yet:
    ``job.build_job`` does that). The only reader of the parsed arguments. It also applies what the command line
    implies: ``--resume snapshot`` goes to the snapshot options, ``--ckpt-dir`` is their fallback root too, the
    ranks are torchrun's world size under torchrun and ``--workers`` under ``regrow ray``, and ``regrow demo``
    fills in its plan and evaluation cadence (:func:`~regrow.launch.options.with_demo_rules`)."""
    part_of = {name: part for part, name in PARTS.items()}
    values: dict[type, dict[str, Any]] = {part: {} for part in PARTS}
    command = ""
    for dest, value in vars(args).items():
        attribute, _, name = dest.partition(".")
        if name:
            values[part_of[attribute]][name] = value
        elif dest == "command":
            command = value
    checkpoint = CheckpointOptions(**values[CheckpointOptions])
    from_snapshot = checkpoint.resume == RESUME_SNAPSHOT
    if from_snapshot:
        checkpoint = dataclasses.replace(checkpoint, resume=None)
    snapshot = SnapshotOptions(**values[SnapshotOptions], resume=from_snapshot, ckpt_dir=checkpoint.ckpt_dir)
    ray = RayOptions(**values[RayOptions])
    world_size = torchrun_world_size()
    launch = LaunchOptions(**values[LaunchOptions], torchrun=world_size is not None)
    if command == "ray":
        launch = dataclasses.replace(launch, nproc=ray.workers)  # one rank per Ray worker
    elif world_size is not None:
        launch = dataclasses.replace(launch, nproc=world_size)  # torchrun decided the number of ranks
    options = RunOptions(command=command, train=TrainOptions(**values[TrainOptions]), launch=launch,
                         faults=FaultOptions(**values[FaultOptions]), checkpoint=checkpoint, snapshot=snapshot,
                         ray=ray)
    return with_demo_rules(options) if command == "demo" else options


def parse_options(argv: Sequence[str]) -> RunOptions:
    """:func:`options_from_args` of ``argv`` (a training sub-command's command line)."""
    return options_from_args(build_parser().parse_args(argv))
