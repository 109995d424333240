"""The typed options of ``regrow train``, ``chaos``, ``demo`` and ``ray``: one dataclass per concern, every default
stated here once (the parser, ``parser.py``, takes its defaults from these), each field naming its flag.

A part's ``problems()`` lists what is wrong with its own values, each problem naming the flag; the checks that need
several parts or the environment are ``job.py``'s, which reports every problem of a command line at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regrow.checkpoint.snapshot.protocol import parse_address
from regrow.checkpoint.universal import KEEP_LAST
from regrow.checkpoint.universal.writer import ON_ERROR
from regrow.recovery.order import Source
from regrow.recovery.parity import ParityConfig
from regrow.recovery.stragglers import StragglerConfig
from regrow.trainer.data import DataConfig
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.model_factory import ModelFactory
from regrow.trainer.models import GPTConfig
from regrow.trainer.zero.config import ZeroConfig

RESUME_SNAPSHOT = Source.SNAPSHOT.value
"""``--resume snapshot``: restore from the node's snapshot process (falling back to ``latest`` of ``--ckpt-dir``)."""
DEFAULT_PRESET = "small"
"""The GPT trained when neither ``--preset`` nor ``--model`` is given."""


@dataclass(kw_only=True)
class TrainOptions:
    """What is trained and how: the model, the data, the optimizer, the schedule, the logs."""

    preset: str | None = None
    """regrow's GPT of this size (``--preset``): tiny, small, 350m, 1.3b; None: :data:`DEFAULT_PRESET` unless
    ``model`` is given (giving both is an error)."""
    model: str | None = None
    """Your own model instead of the GPT (``--model``): a factory ``pkg.module:function`` returning an
    ``nn.Module`` (:class:`~regrow.trainer.model_factory.ModelFactory`), found from the working directory."""
    model_kwargs: str | None = None
    """The factory's keyword arguments, a JSON object (``--model-kwargs``; None: none)."""
    dropout: float | None = None
    """Dropout probability of regrow's GPT (``--dropout``; None: the preset's, 0). Not for ``--model``."""
    loss: str = "auto"
    """The loss contract (``--loss``): auto, model, logits, hf or pkg.module:function (``TrainerConfig.loss``)."""
    seq_len: int = 0
    """Sequence length (``--seq-len``; 0: the preset's, or the data's default with ``--model``)."""
    steps: int = 200
    """Optimizer steps (``--steps``)."""
    warmup_steps: int = 20
    """Steps of learning-rate warm-up (``--warmup-steps``)."""
    global_batch: int = 32
    """Sequences per step over all ranks (``--global-batch``)."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward (``--micro-batch``)."""
    stage: int = 2
    """ZeRO stage, 1, 2 or 3 (``--stage``; 3 shards the parameters too)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (``--activation-checkpointing``)."""
    compile: str = "auto"
    """``torch.compile`` the model's forward: auto (inductor on CUDA, off on the CPU), off or a backend name
    (``--compile``)."""
    state_bits: int = 8
    """Optimizer state bits, 8 or 32 (``--state-bits``)."""
    lr: float = 3e-3
    """Peak learning rate (``--lr``)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (``--max-grad-norm``; 0 disables clipping)."""
    param_dtype: str | None = None
    """Working parameter dtype, bfloat16, float16 or float32 (``--param-dtype``; None: the model's)."""
    grad_dtype: str = "float32"
    """dtype of each rank's gradient shard, float32 or bfloat16 (``--grad-dtype``)."""
    seed: int = 0
    """Model initialisation seed (``--seed``)."""
    data_seed: int = 0
    """Data order seed (``--data-seed``)."""
    data: list[str] = field(default_factory=list)
    """Token files, ``.bin`` or ``.npy`` (``--data PATH [PATH ...]``; empty: the embedded corpus)."""
    data_dtype: str | None = None
    """dtype of the ``.bin`` token files, uint16 or uint32 (``--data-dtype``; None: their sidecar's, else
    uint16)."""
    log_every: int = 10
    """Log a line every this many steps (``--log-every``)."""
    eval_every: int = 0
    """Evaluate every this many steps (``--eval-every``; 0: never)."""
    metrics: str | None = None
    """JSONL metrics file written by rank 0 (``--metrics``)."""

    @property
    def model_name(self) -> str:
        """What is trained, in words: ``GPT 'small'`` or the factory's target."""
        return self.model or f"GPT {self.preset or DEFAULT_PRESET!r}"

    def model_config(self) -> GPTConfig | ModelFactory:
        """The preset's GPT, at ``seq_len`` when given, or the factory of ``model`` (not imported yet: ``job.py``
        builds it on the meta device); ValueError naming the flag or field otherwise."""
        if self.model is None:
            if self.model_kwargs is not None:
                raise ValueError("--model-kwargs needs --model PKG.MODULE:FUNCTION (the factory they are given to)")
            overrides: dict = {"seq_len": self.seq_len} if self.seq_len else {}
            if self.dropout is not None:
                overrides["dropout"] = self.dropout
            try:
                return GPTConfig.preset(self.preset or DEFAULT_PRESET, **overrides)
            except ValueError as error:
                raise ValueError(flag_wording(str(error))) from None
        if self.preset is not None:
            raise ValueError(f"--preset={self.preset} and --model={self.model} both choose the model: keep --preset "
                             "for regrow's GPT or --model for your own")
        if self.dropout is not None:
            raise ValueError(f"--dropout={self.dropout} sets regrow's GPT's dropout, not --model's: give your model's "
                             "dropout in --model-kwargs")
        try:
            kwargs = json.loads(self.model_kwargs) if self.model_kwargs is not None else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"--model-kwargs={self.model_kwargs!r} is not JSON ({error}); give a JSON object, e.g. "
                             """'{"hidden_size": 64}'""") from None
        try:
            return ModelFactory(target=self.model, kwargs=kwargs)
        except ValueError as error:
            raise ValueError(flag_wording(str(error))) from None

    def data_config(self, model: GPTConfig | ModelFactory | None) -> DataConfig:
        """The sampler's config (its sequence length is the GPT's unless ``seq_len`` is given; a factory's model has
        none regrow knows of, so the data's default then). The token files are made absolute here, so that ranks
        started in other directories (Ray's workers) find them."""
        seq_len = self.seq_len or (model.seq_len if isinstance(model, GPTConfig) else DataConfig.seq_len)
        return DataConfig(seq_len=seq_len, micro_batch=self.micro_batch, global_batch=self.global_batch,
                          seed=self.data_seed, files=tuple(os.path.abspath(p) for p in self.data),
                          token_dtype=self.data_dtype)

    def optim_config(self) -> ZeroConfig:
        return ZeroConfig(stage=self.stage, state_bits=self.state_bits, lr=self.lr,
                          max_grad_norm=self.max_grad_norm, param_dtype=self.param_dtype, grad_dtype=self.grad_dtype)

    def trainer_config(self, model: GPTConfig | ModelFactory, data: DataConfig, optim: ZeroConfig) -> TrainerConfig:
        return TrainerConfig(model=model, loss=self.loss, data=data, optim=optim, steps=self.steps,
                             warmup_steps=self.warmup_steps, seed=self.seed, log_every=self.log_every,
                             eval_every=self.eval_every, metrics_path=self.metrics,
                             activation_checkpointing=self.activation_checkpointing, compile=self.compile)


def flag_wording(message: str) -> str:
    """A config error's message with the config fields that the command line sets named by their flags."""
    for field_name, flag in (("ModelFactory.target", "--model"), ("ModelFactory.kwargs", "--model-kwargs"),
                             ("TrainerConfig.loss", "--loss"), ("TrainerConfig.compile", "--compile"), ("GPTConfig.dropout", "--dropout"),
                             ("GPTConfig.seq_len", "--seq-len"), ("ZeroConfig.stage", "--stage"),
                             ("ZeroConfig.state_bits", "--state-bits"), ("ZeroConfig.param_dtype", "--param-dtype"),
                             ("ZeroConfig.grad_dtype", "--grad-dtype"), ("ZeroConfig.max_grad_norm", "--max-grad-norm"),
                             ("StragglerConfig.window", "--straggler-window"),
                             ("StragglerConfig.margin", "--straggler-margin"),
                             ("ParityConfig.every", "--parity-every")):
        message = message.replace(field_name, flag)
    return message


@dataclass(kw_only=True)
class LaunchOptions:
    """How many ranks run where, for how long, restarted how often."""

    nproc: int = 2
    """Ranks (``--nproc``): local processes to spawn; torchrun's world size under torchrun, ``--workers`` on Ray."""
    device: str = "cpu"
    """Where ranks compute (``--device``): auto, cpu or cuda."""
    timeout_s: float = 3600.0
    """Seconds before the whole run is aborted (``--timeout``)."""
    max_restarts: int = 0
    """Restarts of the ranks after a failure (``--max-restarts``; the local launcher's and Ray's)."""
    warm_restarts: bool = False
    """Keep a warm standby process per rank for the next attempt (``--warm-restarts``; local launcher)."""
    torchrun: bool = False
    """Started by torchrun (``RANK`` and ``WORLD_SIZE`` set): this process is one rank of torchrun's job."""

    @property
    def backend(self) -> str:
        """The process-group backend for :attr:`device`: gloo on CPU, NCCL on CUDA (with gloo for CPU tensors)."""
        return "gloo" if self.device == "cpu" else "nccl" if self.device == "cuda" else "auto"

    def problems(self) -> list[str]:
        problems = []
        if self.nproc < 1:
            problems.append(f"--nproc={self.nproc} must be >= 1")
        if not 0 < self.timeout_s < math.inf:  # NaN fails too
            problems.append(f"--timeout={self.timeout_s} must be a finite number of seconds > 0")
        if self.max_restarts < 0:
            problems.append(f"--max-restarts={self.max_restarts} must be >= 0")
        if self.warm_restarts and self.max_restarts < 1:
            problems.append("--warm-restarts needs --max-restarts >= 1 (standby ranks take over a restart)")
        return problems


@dataclass(kw_only=True)
class FaultOptions:
    """The fault plan of a run (``docs/chaos.md``), the progress watchdog, and where the fault report goes."""

    faults: list[str] = field(default_factory=list)
    """Faults as ``KIND:TARGET@STEP`` (``--fault``, repeatable)."""
    plan_file: str | None = None
    """A JSON fault plan (``--fault-plan``)."""
    mtbf_s: float = 0.0
    """Mean time between random kill-rank/kill-node faults (``--fault-mtbf``; 0: none drawn)."""
    seed: int = 0
    """Seed of the random faults (``--fault-seed``)."""
    step_seconds: float = 1.0
    """Seconds a step takes, to place the random faults at steps (``--fault-step-seconds``)."""
    hang_timeout_s: float = 0.0
    """Kill and restart the job when a rank makes no progress for this long (``--hang-timeout``; 0: off)."""
    straggler_window: int = StragglerConfig.window
    """Steps per straggler comparison (``--straggler-window``; 0: no straggler detection)."""
    straggler_margin: float = StragglerConfig.margin
    """How much busier than the others' median a straggler is (``--straggler-margin``; 0.5: half again)."""
    parity_every: int = ParityConfig.every
    """Check every this many steps that the ranks' parameters, step, data cursor and lineage agree and that no
    optimizer shard changed between steps (``--parity-every``; 0: no checks)."""
    report: str | None = None
    """Where the fault report is written as JSON (``--report``; None: next to ``--metrics``, if given)."""
    reference: bool = False
    """Also run the training without faults and compare (``regrow chaos --reference``)."""

    @property
    def given(self) -> bool:
        """Whether any fault flag was given (a plan may still turn out empty, e.g. a random draw of none)."""
        return bool(self.faults or self.plan_file or self.mtbf_s)

    def stragglers(self) -> StragglerConfig | None:
        """The straggler monitor's settings (None: detection off); ValueError naming the flag."""
        if self.straggler_window == 0:
            return None
        try:
            return StragglerConfig(window=self.straggler_window, margin=self.straggler_margin)
        except ValueError as error:
            raise ValueError(flag_wording(str(error))) from None

    def parity(self) -> ParityConfig | None:
        """The state parity checks' settings (None: off); ValueError naming the flag."""
        if self.parity_every == 0:
            return None
        try:
            return ParityConfig(every=self.parity_every)
        except ValueError as error:
            raise ValueError(flag_wording(str(error))) from None

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.hang_timeout_s < math.inf:  # NaN would silently never fire
            problems.append(f"--hang-timeout={self.hang_timeout_s} must be a finite number of seconds >= 0 (0: no "
                            "progress watchdog)")
        try:
            self.stragglers()
        except ValueError as error:
            problems.append(f"{error} (--straggler-window 0 turns detection off)")
        try:
            self.parity()
        except ValueError as error:
            problems.append(f"{error} (--parity-every 0 turns the checks off)")
        return problems


@dataclass(kw_only=True)
class CheckpointOptions:
    """The universal checkpoints of a run: where, how often, how many kept, and what to resume from."""

    ckpt_dir: str | None = None
    """Checkpoint root, visible to every rank (``--ckpt-dir``)."""
    save_every: int = 0
    """Save every this many steps, and at the last step (``--save-every``; 0: never)."""
    keep_last: int = KEEP_LAST
    """Checkpoints kept (``--keep-last``, >= 2), by the ranks' writer or the snapshot processes persisting."""
    resume: str | None = None
    """A ``step_*`` directory, a root or ``latest`` of ``ckpt_dir`` to resume from (``--resume``; ``--resume
    snapshot`` is :attr:`SnapshotOptions.resume`)."""
    on_error: str = ON_ERROR[0]
    """After a failed save: "continue" training or "stop" with the error (``--ckpt-on-error``;
    ``WriterConfig.on_error``)."""

    @property
    def active(self) -> bool:
        """Whether the ranks save or restore a checkpoint at all."""
        return bool(self.save_every or self.resume)

    def problems(self) -> list[str]:
        problems = []
        if self.save_every < 0:
            problems.append(f"--save-every={self.save_every} must be >= 0 (0 disables saving)")
        if self.save_every and not self.ckpt_dir:
            problems.append(f"--save-every={self.save_every} needs --ckpt-dir DIR (where to write the checkpoints)")
        if self.keep_last < KEEP_LAST:
            problems.append(f"--keep-last={self.keep_last} must be >= {KEEP_LAST} (one good checkpoint must survive "
                            "the next save)")
        if self.on_error not in ON_ERROR:
            problems.append(f"--ckpt-on-error={self.on_error} is invalid: allowed values are {', '.join(ON_ERROR)}")
        return problems


@dataclass(kw_only=True)
class SnapshotOptions:
    """The in-memory snapshots of a run (no secrets: the token stays in the environment), and the local launcher's
    simulated nodes whose snapshot processes hold them (``launch/run.py`` says who owns those processes)."""

    every: int = 0
    """Snapshot every this many steps (``--snapshot-every``; 0: never)."""
    address: str | None = None
    """An already running snapshot process to use (``--snapshot-address``); None: the local launcher starts one."""
    resume: bool = False
    """Restore from the node's snapshot process first (``--resume snapshot``)."""
    ckpt_dir: str | None = None
    """Checkpoint root whose ``latest`` is the fallback when no snapshot can be restored (``--ckpt-dir``)."""
    shm_dir: str = "/dev/shm"
    """Where a snapshot process started by the launcher keeps its segments (``--snapshot-shm-dir``)."""
    timeout_s: float = 60.0
    """Seconds any request to the snapshot process may take."""
    nodes: int = 1
    """Simulated nodes of the local launcher, each with its own snapshot process (``--nodes``)."""
    ec_group_size: int = 0
    """Nodes per erasure-coding group (``--ec-group-size``; 0: off)."""
    ec_parity: int = 1
    """Nodes of a group that may be lost at once (``--ec-parity``)."""
    persist_every: int = 0
    """The snapshot processes write a universal checkpoint under ``ckpt_dir`` every this many steps from the ranks'
    snapshots, at no cost to the ranks (``--persist-every``; 0: off)."""

    @property
    def active(self) -> bool:
        """Whether the ranks take or restore snapshots at all."""
        return bool(self.every or self.resume)

    def problems(self) -> list[str]:
        problems = []
        if self.every < 0:
            problems.append(f"--snapshot-every={self.every} must be >= 0 (0 disables in-memory snapshots)")
        if self.address is not None:
            try:
                parse_address(self.address)
            except ValueError as error:
                problems.append(f"--snapshot-address: {error}")
        if self.persist_every < 0:
            problems.append(f"--persist-every={self.persist_every} must be >= 0 (0: off)")
        return problems


@dataclass(kw_only=True)
class RayOptions:
    """``regrow ray``'s cluster, placement and recovery settings (``recovery/ray/coordinator.py`` runs them)."""

    address: str = "local"
    """'local' (start Ray on this machine), 'auto' (this machine's cluster), or host:port (``--address``)."""
    workers: int = 2
    """Ranks, one Ray actor each (``--workers``)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker (``--cpus-per-worker``)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (``--gpus-per-worker``; 1 on GPU clusters, NCCL; 0: CPU, gloo)."""
    ranks_per_node: int = 0
    """Exactly this many consecutive ranks per node (``--ranks-per-node``; 0: Ray decides)."""
    snapshot_every: int = 1
    """In-memory snapshot every this many steps (``--snapshot-every``; 0: off)."""
    ec_group_size: int = 0
    """Erasure-code the snapshots across this many nodes (``--ec-group-size``; 0: off)."""
    ec_parity: int = 1
    """Nodes of a group that may be lost at once (``--ec-parity``)."""
    elastic_wait_s: float = 0.0
    """Seconds to wait for a lost rank's replacement before going on with fewer ranks (``--elastic-wait``; 0:
    off); the job grows back to ``--workers`` at a checkpoint step once resources return."""
    standby: int = 0
    """Standby workers per node, started ahead of need (``--standby``)."""
    resources_timeout_s: float = 300.0
    """Seconds to wait for a worker's resources (``--resources-timeout``)."""
    events: str | None = None
    """JSONL file of every event (``--events``)."""
    entry: str | None = None
    """The user's training loop, ``pkg.module:function``, that every worker calls instead of regrow's trainer
    (``--entry``; ``launch/ray_entry.py``)."""
    entry_kwargs: str | None = None
    """Its keyword arguments as a JSON object (``--entry-kwargs``; None: none)."""

    def problems(self) -> list[str]:
        """Amounts that a ``< 0`` check would let through (NaN) or that no cluster has (infinite), and entry
        arguments that are not a JSON object."""
        amounts = {"--cpus-per-worker": self.cpus_per_worker, "--gpus-per-worker": self.gpus_per_worker,
                   "--elastic-wait": self.elastic_wait_s}
        problems = [f"{flag}={value!r} must be a finite number >= 0" for flag, value in amounts.items()
                    if not 0 <= value < math.inf]
        if not 0 < self.resources_timeout_s < math.inf:
            problems.append(f"--resources-timeout={self.resources_timeout_s!r} must be a finite number > 0")
        if self.entry_kwargs is not None:
            if self.entry is None:
                problems.append("--entry-kwargs are the arguments of --entry's function: give --entry "
                                "pkg.module:function too")
            try:
                self.entry_arguments()
            except ValueError as error:
                problems.append(str(error))
        return problems

    def entry_arguments(self) -> dict[str, Any]:
        """``--entry-kwargs`` parsed (empty without it); ValueError naming the flag when it is not a JSON
        object."""
        if self.entry_kwargs is None:
            return {}
        try:
            parsed = json.loads(self.entry_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"--entry-kwargs={self.entry_kwargs!r} is not JSON ({error}); give a JSON object, "
                             """e.g. '{"steps": 8}'""") from error
        if not isinstance(parsed, dict):
            raise ValueError(f"--entry-kwargs={self.entry_kwargs!r} must be a JSON object of keyword arguments, "
                             f"""e.g. '{{"steps": 8}}', not a JSON {type(parsed).__name__}""")
        return parsed


@dataclass(kw_only=True)
class RunOptions:
    """Everything one ``regrow train|chaos|demo|ray`` command line asks for (``job.build_job`` validates it)."""

    command: str
    """The sub-command: train, chaos, demo or ray."""
    train: TrainOptions = field(default_factory=TrainOptions)
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    faults: FaultOptions = field(default_factory=FaultOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    snapshot: SnapshotOptions = field(default_factory=SnapshotOptions)
    ray: RayOptions = field(default_factory=RayOptions)
    """Used by ``regrow ray`` only."""

    @property
    def snapshot_every(self) -> int:
        """How often the ranks snapshot: Ray's own ``--snapshot-every`` under ``regrow ray``."""
        return self.ray.snapshot_every if self.command == "ray" else self.snapshot.every

    def report_path(self) -> Path | None:
        """``--report FILE``, else ``<metrics stem>-report.json`` next to ``--metrics``, else None."""
        if self.faults.report:
            return Path(self.faults.report)
        if self.train.metrics:
            metrics = Path(self.train.metrics)
            return metrics.with_name(metrics.stem + "-report.json")
        return None


DEMO = RunOptions(command="demo", train=TrainOptions(steps=400), launch=LaunchOptions(max_restarts=2),
                  snapshot=SnapshotOptions(every=1, nodes=2, ec_group_size=2), faults=FaultOptions(hang_timeout_s=60.0))
"""``regrow demo``'s defaults: 2 CPU ranks on 2 simulated nodes whose snapshot processes erasure-code each other,
restarted up to twice, with the progress watchdog on. Sized to finish in about 3 minutes on a 2-core machine (4
ranks took over 4)."""
DEMO_FAULTS = (("kill-rank", 0, 3 / 8), ("kill-node", 1, 3 / 4))
"""``regrow demo``'s plan when none is given, as (kind, target, fraction of the run): rank 0 is killed, then node 1
(its rank and its snapshot process), and the run recovers from both; at steps 150 and 300 of the default 400."""


def demo_faults(steps: int) -> list[str]:
    """:data:`DEMO_FAULTS` placed in a run of ``steps`` steps."""
    return [f"{kind}:{target}@{max(1, round(steps * fraction))}" for kind, target, fraction in DEMO_FAULTS]


def with_demo_rules(options: RunOptions) -> RunOptions:
    """What ``regrow demo`` fills in that its user did not choose: an evaluation every tenth of the run (the loss
    table), and :data:`DEMO_FAULTS` when no fault flag was given."""
    train, faults = options.train, options.faults
    if not train.eval_every:
        train = dataclasses.replace(train, eval_every=max(1, train.steps // 10))
    if not faults.given:
        faults = dataclasses.replace(faults, faults=demo_faults(train.steps))
    return dataclasses.replace(options, train=train, faults=faults)
