"""A validated run: :func:`build_job` checks a command line's options together, every problem at once, and turns
them into the trainer's config and the fault plan they describe (:class:`Job`).

Each option part lists its own problems (``options.py``); the checks here need several parts or the environment: a
batch that the ranks cannot split, a fault plan the run cannot show, snapshot settings that the launcher (local or
torchrun) cannot honour, a ``--resume`` source that does not exist, a CUDA device that is not there, token files
(``--data``) that cannot be trained on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.checkpoint.universal.format import CheckpointError
from regrow.checkpoint.universal.load import sources
from regrow.launch.chaos.plan import Fault, build_plan, plan_problems
from regrow.launch.local.nodes import NodesConfig
from regrow.launch.options import RunOptions, TrainOptions, flag_wording
from regrow.recovery.ray.entry import EntryError, EntryPoint, check_entry
from regrow.trainer.data import DataConfig, open_windows
from regrow.trainer.data.token_files import open_token_file
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.losses import Loss
from regrow.trainer.model_factory import ModelFactory, input_vocab_size
from regrow.trainer.models import GPTConfig

T = TypeVar("T")


class ConfigErrors(ValueError):
    """All problems found in the command-line arguments, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid arguments:\n  - " + "\n  - ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, kw_only=True)
class Job:
    """What a training command runs: its options, validated, and the trainer config and fault plan they describe."""

    options: RunOptions
    config: TrainerConfig | None
    """None under ``regrow ray --entry`` (the user's function builds its own model and data)."""
    plan: list[Fault]
    """The fault plan (``--fault``, ``--fault-plan``, ``--fault-mtbf``), in that order; empty without one."""


def build_job(options: RunOptions) -> Job:
    """Validates ``options``; raises :class:`ConfigErrors` listing every problem rather than only the first."""
    problems: list[str] = []
    entry = options.command == "ray" and options.ray.entry is not None
    config = None if entry else _trainer_config(options, problems)
    launch, faults = options.launch, options.faults
    problems += launch.problems()
    if launch.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device=cuda but no CUDA device is available; use --device cpu")
    plan, plan_errors = build_plan(
        faults.faults, plan_file=faults.plan_file, mtbf_s=faults.mtbf_s, seed=faults.seed,
        step_s=faults.step_seconds, ranks=launch.nproc, nodes=options.snapshot.nodes,
        node_faults=options.snapshot.nodes > 1 and options.snapshot.ec_group_size > 0, steps=options.train.steps,
        max_restarts=launch.max_restarts)
    problems += plan_errors
    problems += plan_problems(plan, ranks=launch.nproc, nodes=options.snapshot.nodes, steps=options.train.steps,
                              snapshot_every=options.snapshot_every, save_every=options.checkpoint.save_every,
                              hang_timeout_s=faults.hang_timeout_s,
                              erasure_coding=bool(options.snapshot_every) and options.snapshot.ec_group_size > 1,
                              parity_every=faults.parity_every, zero_stage=options.train.stage)
    problems += faults.problems()
    if options.command == "ray":
        problems += options.ray.problems() + (_entry_problems(options) if entry else [])
    if options.command == "ray":
        problems += [f"--fault {fault}: a kill at a moment runs under the local launcher (regrow train, chaos or "
                     f"run); under regrow ray, drop :{fault.moment}" for fault in plan if fault.moment is not None]
    if plan and launch.torchrun:
        problems.append("--fault runs under the local launcher (under torchrun, kill the processes yourself)")
    if options.command == "chaos" and not plan:
        problems.append("regrow chaos needs a fault plan: --fault KIND:TARGET@STEP, --fault-plan FILE or "
                        "--fault-mtbf SECONDS")
    problems += _checkpoint_problems(options)
    problems += snapshot_problems(options)
    if problems:
        raise ConfigErrors(problems)
    assert config is not None or entry
    return Job(options=options, config=config, plan=plan)


def _trainer_config(options: RunOptions, problems: list[str]) -> TrainerConfig | None:
    """The trainer's config, with the problems of each of its parts (model, data, optimizer) added to
    ``problems``; None when one of them has any."""
    train, ranks = options.train, options.launch.nproc
    model = _attempt(train.model_config, problems)
    vocab_size = model.vocab_size if isinstance(model, GPTConfig) else None
    if isinstance(model, ModelFactory):
        built = _built(model, train.seed, problems)
        vocab_size = input_vocab_size(built) if built is not None else None
        model = model if built is not None else None
    data = _attempt(lambda: train.data_config(model), problems)
    optim = _attempt(train.optim_config, problems)
    if data and ranks >= 1 and train.global_batch % (train.micro_batch * ranks):
        problems.append(f"--global-batch={train.global_batch} is not divisible by --micro-batch x --nproc = "
                        f"{train.micro_batch} x {ranks}; choose a multiple of {train.micro_batch * ranks}")
    if data and data.files:
        problems += _data_problems(data, vocab_size)
    if not (model and data and optim):
        return None
    config = _attempt(lambda: train.trainer_config(model, data, optim), problems)
    if config is not None and _attempt(lambda: Loss(config.loss, is_gpt=isinstance(model, GPTConfig)), problems):
        return config
    return None


def _entry_problems(options: RunOptions) -> list[str]:
    """What is wrong with ``regrow ray --entry``: a function that does not import, is not callable or does not take
    the arguments given (checked here, before any actor starts), training flags that would be ignored, elastic
    mode."""
    changed = [f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(TrainOptions)
               if getattr(options.train, field.name) != getattr(TrainOptions(), field.name)]
    problems = [f"--entry runs your function, which builds its own model, data and optimizer: {', '.join(changed)} "
                "would be ignored; pass its arguments with --entry-kwargs"] if changed else []
    if options.ray.elastic_wait_s:
        problems.append("--elastic-wait is not available with --entry (the function sets its own batch and ranks)")
    try:
        arguments = options.ray.entry_arguments()
    except ValueError:  # reported by RayOptions.problems
        return problems
    try:
        check_entry(EntryPoint.for_driver(str(options.ray.entry), arguments))
    except EntryError as error:
        problems.append(f"--{error}")  # "--entry pkg.module:function: ..."
    return problems


def _data_problems(data: DataConfig, vocab_size: int | None) -> list[str]:
    """The token files' problems, each file's (found here, in this process, rather than in every rank once
    started), then those of the files together: the ids against the vocabulary, the split, the global batch."""
    problems: list[str] = []
    for path in data.files:
        _attempt(lambda: open_token_file(path, data.token_dtype, data.seq_len), problems)
    if not problems:
        _attempt(lambda: open_windows(data, vocab_size=vocab_size), problems)
    return problems


def _attempt(make: Callable[[], T], problems: list[str]) -> T | None:
    """``make()``, or None with its ValueError or TypeError (a config naming its bad field, or the flag that sets
    it) added to ``problems``."""
    try:
        return make()
    except (ValueError, TypeError) as error:
        problems.append(flag_wording(str(error)))
        return None


def _built(factory: ModelFactory, seed: int, problems: list[str]) -> nn.Module | None:
    """The model ``factory`` builds on the meta device (nothing allocated), so that a factory that does not import
    or returns no module is one problem here rather than an error in every rank; None with the problem added."""
    try:
        return factory.build(seed=seed, device="meta")
    except ValueError as error:
        problems.append(flag_wording(str(error)))
    except Exception as error:  # noqa: BLE001 (the user's code failed: report it with the other problems)
        hint = " (pip install -e '.[hf]' installs transformers)" if "transformers" in str(error) else ""
        problems.append(f"--model={factory.target}: building the model on the meta device failed with "
                        f"{type(error).__name__}: {error}{hint}")
    return None


def _checkpoint_problems(options: RunOptions) -> list[str]:
    """The checkpoint flags' problems, a ``--resume`` source that cannot be read included."""
    checkpoint = options.checkpoint
    problems = checkpoint.problems()
    if checkpoint.resume:
        try:
            sources(checkpoint.resume, checkpoint.ckpt_dir)
        except CheckpointError as error:
            problems.append(f"--resume={checkpoint.resume}: {error}")
    return problems


def snapshot_problems(options: RunOptions) -> list[str]:
    """The snapshot flags' problems: what the local launcher, a given snapshot process or torchrun cannot do."""
    snapshot, torchrun = options.snapshot, options.launch.torchrun
    every, address = snapshot.every, snapshot.address
    problems = snapshot.problems()
    if address is not None and not os.environ.get(TOKEN_ENV):
        problems.append(f"--snapshot-address={address} needs {TOKEN_ENV} in the environment: export the token "
                        "the snapshot process was started with")
    if snapshot.active and torchrun and address is None:
        flag = "--resume snapshot" if snapshot.resume else f"--snapshot-every={every}"
        problems.append(f"{flag} under torchrun needs --snapshot-address HOST:PORT: torchrun kills a restarted "
                        "worker's whole session, so start `python -m regrow.checkpoint.node --address "
                        f"127.0.0.1:0` (with {TOKEN_ENV} exported) on each node before torchrun")
    if snapshot.nodes != 1 or snapshot.ec_group_size:
        if address is not None or torchrun:
            problems.append("--nodes/--ec-group-size lay out the local launcher's own snapshot processes; with "
                            "--snapshot-address or under torchrun, start the snapshot processes with "
                            "`python -m regrow.checkpoint.node --ec-group-size N ...` instead")
        elif not every:
            problems.append("--nodes/--ec-group-size need --snapshot-every N (they lay out snapshot processes)")
        else:
            try:
                NodesConfig(ranks=options.launch.nproc, nodes=snapshot.nodes, ec_group_size=snapshot.ec_group_size,
                            ec_parity=snapshot.ec_parity)
            except ValueError as error:
                problems.append(str(error).replace("NodesConfig.", "--").replace("ranks=", "--nproc="))
    if snapshot.persist_every > 0:
        problems += _persist_problems(options)
    if snapshot.resume and address is None and not torchrun and not snapshot.ckpt_dir:
        problems.append("--resume snapshot without --snapshot-address starts a new snapshot process, which holds no "
                        "snapshot: pass the address of the one the killed run used, or --ckpt-dir DIR to fall back "
                        "to its latest checkpoint")
    return problems


def _persist_problems(options: RunOptions) -> list[str]:
    """Why ``--persist-every`` cannot work in this run (empty: it can)."""
    snapshot, every = options.snapshot, options.snapshot.every
    persist_every, problems = snapshot.persist_every, []
    if not snapshot.ckpt_dir:
        problems.append(f"--persist-every={persist_every} needs --ckpt-dir DIR (where the checkpoints go)")
    if not every or persist_every % every:
        problems.append(f"--persist-every={persist_every} must be a multiple of --snapshot-every={every} (only "
                        "snapshotted steps can be persisted)")
    if options.checkpoint.save_every:
        problems.append("--persist-every and --save-every would both write checkpoints to --ckpt-dir: keep one "
                        "(--persist-every costs the ranks nothing)")
    if options.launch.torchrun:
        problems.append("--persist-every configures the snapshot processes the local launcher starts; under "
                        "torchrun, give it to the node helper that starts yours: `python -m "
                        "regrow.launch.torchrun node --persist-every K --persist-dir DIR -- torchrun ...`")
    elif snapshot.address is not None:
        problems.append("--persist-every configures the snapshot processes the local launcher starts; start "
                        "yours with `python -m regrow.checkpoint.node --persist-every K --persist-dir DIR`")
    return problems
