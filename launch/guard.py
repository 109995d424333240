"""Fault tolerance for a user's own training loop: :class:`Guard`, created next to the model and the
``ZeroOptimizer``.

::

    guard = Guard(model, optimizer, sampler=sampler, state={"schedule": schedule, "ema": ema})
    for step in guard.steps(1000):       # restores the newest state the job holds, then yields 1-based step numbers
        ...forward and backward...
        optimizer.step(); optimizer.zero_grad()
        schedule.step()                  # state changed after the optimizer step belongs to this step
    guard.close()

Every start asks what the job holds (its node's snapshot process, ``latest`` under the checkpoint root:
``launch/holdings.py``) and all ranks agree, so the same script resumes under every launcher: the first start, a
restart by ``regrow run --max-restarts``, by torchrun, or a rerun of the entry point by the Ray coordinator. When
the job holds a state, every rank restores one common step through ``recovery.restore.restore_job`` (snapshot slots,
erasure-coded buffers, then the checkpoint); otherwise training starts at step 0 from the model the script built.
The Guard then attaches the same sinks as regrow's own trainer (``launch/rank.py``): snapshots every N steps, lazy
asynchronous checkpoints every M, the fault injector of ``REGROW_FAULTS``, the launcher's heartbeat.

Hooks: the Guard registers a step pre-hook on the optimizer (an in-flight snapshot or checkpoint copy of the last
state finishes before the shard changes) and a forward hook on the model (the snapshot's device-to-host copy starts
after the first forward of a step, which it then overlaps). The state of step N is taken when the loop body of step
N ends: the optimizer shard, every random generator, the sampler's cursor, and the registered user state
(``trainer/user_state.py``: tensors, dicts of JSON values and tensors, or ``state_dict()`` objects; never pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from regrow.checkpoint.universal import KEEP_LAST
from regrow.checkpoint.universal.writer import ON_ERROR
from regrow.launch.holdings import job_holds_state, local_holdings, resumed_plans
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.options import CheckpointOptions, SnapshotOptions
from regrow.launch.rank import attach_rank
from regrow.recovery.parity import ParityConfig
from regrow.trainer import sink_calls
from regrow.trainer.checkpoint_view import CheckpointView
from regrow.trainer.checks import require_ints
from regrow.trainer.data import DataCursor, Sampler
from regrow.trainer.log import log_line
from regrow.trainer.loop import agree_lineage
from regrow.trainer.state import RngState, ShardState, StateSink, optimizer_tensors, user_tensors
from regrow.trainer.user_state import UserState
from regrow.trainer.zero.layout import FlatLayout
from regrow.trainer.zero.optimizer import ZeroOptimizer

GUARD_ENV = "REGROW_GUARD"
"""The JSON of a :class:`GuardConfig` that a launcher (``regrow run``, ``regrow ray --entry``) hands its ranks."""


@dataclass(kw_only=True)
class GuardConfig:
    """What a :class:`Guard` keeps and where. Validated on construction; errors name the field."""

    snapshot_every: int = 0
    """Snapshot into the node's snapshot process every this many steps (0: never)."""
    snapshot_address: str | None = None
    """host:port of the node's snapshot process; None: ``REGROW_SNAPSHOT_ADDRESS`` (set by the launchers and the
    torchrun node helper)."""
    save_every: int = 0
    """Save a universal checkpoint every this many steps and at the last step (0: never)."""
    ckpt_dir: str | None = None
    """The checkpoint root, visible to every rank (also read on every start: its ``latest`` may be restored)."""
    keep_last: int = KEEP_LAST
    """Checkpoints kept (>= 2)."""
    on_error: str = ON_ERROR[0]
    """After a failed checkpoint save: "continue" training or "stop" with the error."""
    timeout_s: float = 60.0
    """Seconds a request to the snapshot process may take."""
    parity_every: int = 0
    """Check every this many steps that the ranks' parameters, step, data cursor and lineage agree and that no
    optimizer shard changed between steps (``recovery/parity.py``; 0: never; ``regrow run`` passes its
    ``--parity-every``, 100 by default). A failed check raises on every rank before the step's update."""

    def __post_init__(self) -> None:
        require_ints(self, {"snapshot_every": 0, "save_every": 0, "keep_last": KEEP_LAST, "parity_every": 0})
        if self.save_every and not self.ckpt_dir:
            raise ValueError(f"GuardConfig.save_every={self.save_every} needs GuardConfig.ckpt_dir (where to write)")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"GuardConfig.on_error={self.on_error!r} is invalid: allowed values are {ON_ERROR}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"GuardConfig.timeout_s={self.timeout_s!r} must be a number > 0")
        for name in ("snapshot_address", "ckpt_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"GuardConfig.{name}={value!r} must be a non-empty string or None")

    @classmethod
    def from_env(cls) -> GuardConfig:
        """The config in ``REGROW_GUARD`` (a JSON object of this class's fields), or the defaults without it."""
        raw = os.environ.get(GUARD_ENV)
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"{GUARD_ENV} is not JSON ({error}); it must be a JSON object of GuardConfig "
                             f"fields") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else data
            raise ValueError(f"{GUARD_ENV}={raw[:200]!r}: must be a JSON object of the fields {sorted(known)}; "
                             f"unknown: {extra}")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{GUARD_ENV}: {error}") from None

    def to_env(self) -> dict[str, str]:
        """The environment that makes :meth:`from_env` return this config in a rank."""
        return {GUARD_ENV: json.dumps(asdict(self))}


class Guard:
    """Snapshots, checkpoints and restores a user's own loop (see the module docstring). A ``state.Restorable``.

    Contract: every rank creates it with the same arguments after building the model and the optimizer (the model
    in its seeded initial state) and before the first step; then either iterates :meth:`steps`, or calls
    :meth:`resume` once and :meth:`step_done` after every optimizer step (exactly one ``optimizer.step()`` in
    between), and :meth:`close` at the end. ``sampler`` (optional) is the data position it saves and restores;
    ``tokens_per_step`` counts tokens for the logs (default: the sampler's global batch times its sequence length).
    ``run_config`` is what checkpoints record as the run's settings (JSON-able).
    """

    def __init__(self, model: nn.Module, optimizer: ZeroOptimizer, *, sampler: Sampler | None = None,
                 state: Mapping[str, object] | None = None, config: GuardConfig | None = None,
                 run_config: dict | None = None, tokens_per_step: int | None = None) -> None:
        if not isinstance(optimizer, ZeroOptimizer):
            raise TypeError(f"Guard: optimizer is a {type(optimizer).__name__}; pass regrow's ZeroOptimizer (its "
                            "sharded state is what the Guard saves)")
        self.model = model
        self.optimizer = optimizer
        self.sampler = sampler
        self.config = config if config is not None else GuardConfig.from_env()
        self.user_state = UserState(state or {})
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.device = optimizer.device
        self.timeout_s = optimizer.config.timeout_s
        self.step = 0
        self.tokens_seen = 0
        self.lineage = ""
        self.initialized = True
        self.sinks: list[StateSink] = []
        self._run_config = dict(run_config or {})
        self._tokens_per_step = tokens_per_step if tokens_per_step is not None else (
            sampler.config.global_batch * sampler.config.seq_len if sampler is not None else 0)
        self._layout = optimizer.layout.to_dict()
        self._resumed = False
        self._closed = False
        self._forward_seen = False
        self._steps_at_boundary = optimizer.step_count
        self._hooks = [*sink_calls.hook_sinks(optimizer, lambda: self.sinks),
                       model.register_forward_hook(self._after_forward)]

    # ---------------------------------------------------------------- the loop
    def steps(self, total: int) -> Iterator[int]:
        """Restores (:meth:`resume`), then yields the step numbers ``step + 1 .. total``; after each iteration's
        body, the step's state goes to the sinks (:meth:`step_done`). Closes the Guard after the last step; a loop
        left early (``break``, an exception) calls :meth:`close` itself when it wants the last save waited for."""
        if not self._resumed:
            self.resume(total_steps=total)
        try:
            while self.step < total:
                yield self.step + 1
                self.step_done()
        except GeneratorExit:
            # The loop was left early: a failure raised in its body (the process is usually going down, or a Ray
            # worker reruns its entry point with new objects) or a ``break``. The hooks go at once so that nothing
            # calls into this Guard again; its sinks are closed by :meth:`close` (a ``break`` then calls it) or
            # dropped with it, never waited for here.
            self._remove_hooks()
            raise
        self.close()

    def resume(self, *, total_steps: int = 0) -> int:
        """Restores the newest state every rank holds (or keeps the initial state when the job holds none), attaches
        the sinks and returns the number of steps already done (the loop continues with step ``return + 1``).
        ``total_steps``: the run's last step, always checkpointed when saving is on. Collective; call once."""
        if self._resumed:
            raise RuntimeError("Guard.resume: already resumed; call it once per Guard")
        config = self.config
        address = config.snapshot_address or os.environ.get(ADDRESS_ENV)
        if config.snapshot_every and address is None:
            raise RuntimeError(f"GuardConfig.snapshot_every={config.snapshot_every} but no snapshot process: set "
                               f"GuardConfig.snapshot_address or {ADDRESS_ENV} (regrow run, regrow ray and the "
                               "torchrun node helper set it)")
        mine = local_holdings(self.rank, address, config.ckpt_dir, config.timeout_s)
        holds = job_holds_state(self.world_size, mine, self.timeout_s)
        checkpointing = CheckpointOptions(ckpt_dir=config.ckpt_dir, save_every=config.save_every,
                                          keep_last=config.keep_last, on_error=config.on_error)
        snapshotting = SnapshotOptions(every=config.snapshot_every, address=address, ckpt_dir=config.ckpt_dir,
                                       timeout_s=config.timeout_s) if address is not None else None
        checkpointing, snapshotting = resumed_plans(holds, checkpointing=checkpointing, snapshotting=snapshotting,
                                                    start_from=None, ckpt_dir=config.ckpt_dir)
        if self.rank == 0:
            found = ", ".join(mine.snapshots + ([f"checkpoint {mine.checkpoint}"] if mine.checkpoint else []))
            log_line(0, 0, f"guard: the job holds a state ({found or 'on other ranks'}); every rank restores"
                     if holds else "guard: nothing to restore; starting from step 0")
        attach_rank(self, checkpoint=checkpointing if checkpointing and checkpointing.active else None,
                    snapshot=snapshotting, final_step=total_steps,
                    parity=ParityConfig(every=config.parity_every) if config.parity_every else None)
        self._resumed = True
        self._steps_at_boundary = self.optimizer.step_count
        return self.step

    def step_done(self) -> None:
        """Ends optimizer step ``step + 1``: hands its state to the sinks (snapshot, checkpoint, fault injector).
        Raises when the loop did not run exactly one ``optimizer.step()`` since the last boundary."""
        if not self._resumed:
            raise RuntimeError("Guard.step_done: call Guard.resume() (or iterate Guard.steps()) first")
        ran = self.optimizer.step_count - self._steps_at_boundary
        if ran != 1:
            raise RuntimeError(f"Guard.step_done: the loop ran {ran} optimizer steps since the last step; run "
                               "exactly one optimizer.step() per Guard step")
        self.step += 1
        self.tokens_seen += self._tokens_per_step
        self._steps_at_boundary = self.optimizer.step_count
        self._forward_seen = False
        sink_calls.after_step(self.sinks, self.shard_state)

    def close(self) -> None:
        """Waits for the last checkpoint save and releases the sinks and hooks; call once when training ends."""
        if self._closed:
            return
        self._closed = True
        self._remove_hooks()
        sink_calls.close(self.sinks)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _after_forward(self, module: nn.Module, inputs: object, output: object) -> None:
        if not self._forward_seen and torch.is_grad_enabled():
            self._forward_seen = True
            sink_calls.after_forward(self.sinks)

    # ---------------------------------------------------------------- the state
    def shard_state(self) -> ShardState:
        """This rank's state at the current step boundary (tensors are live buffers)."""
        tree, tensors = self.user_state.capture()
        cursor = self.sampler.state() if self.sampler is not None else DataCursor(epoch=0, index=0)
        return ShardState(step=self.step, tensors={**self.optimizer.shard_tensors(), **tensors}, layout=self._layout,
                          rank=self.rank, rng=RngState.capture(), data_cursor=cursor.to_dict(),
                          tokens_seen=self.tokens_seen, extra={"lineage": self.lineage, "user": tree})

    # ---------------------------------------------------------------- the Restorable contract
    @property
    def layout(self) -> FlatLayout:
        return self.optimizer.layout

    def checkpoint_view(self) -> CheckpointView:
        return CheckpointView.identity(self.optimizer.rank)

    def restore(self, state: ShardState) -> None:
        """Resumes from ``state`` (this rank's shard at :attr:`layout`): the optimizer shard and step, the random
        generators, the sampler's cursor and the registered user state. Collective (the parameters' all-gather)."""
        if state.layout != self._layout:
            raise ValueError("Guard.restore: the state was saved at another layout; reshard it first")
        self.optimizer.discard_step()
        self.optimizer.load_shard_tensors(optimizer_tensors(state.tensors), state.step)
        if self.sampler is not None:
            self.sampler.load_state(DataCursor.from_dict(state.data_cursor))
        if "user" in state.extra:
            self.user_state.load(state.extra["user"], user_tensors(state.tensors))
        elif self.user_state.items:
            log_line(self.rank, state.step, "guard: the restored state has no user state (saved by regrow's own "
                                            "trainer?); the registered state keeps its initial values")
        state.rng.restore()
        self.step = state.step
        self.tokens_seen = state.tokens_seen
        self.lineage = str(state.extra.get("lineage", ""))

    def gather_parameters(self) -> None:
        self.optimizer.gather_parameters()

    def at_initial_state(self) -> bool:
        return self.step == 0 and self.optimizer.step_count == 0

    def reset_to_initial_state(self) -> None:
        """The script built the initial state before creating the Guard; nothing to rebuild while it holds it."""
        if not self.at_initial_state():
            raise RuntimeError("Guard: step 0's state cannot be rebuilt after training began; restart the script")

    def start_lineage(self) -> str:
        self.lineage = agree_lineage(self.world_size, self.timeout_s)
        return self.lineage

    def run_config(self) -> dict:
        return self._run_config


__all__ = ["GUARD_ENV", "Guard", "GuardConfig"]
