"""Wall-clock to a target validation loss under pipeline-stage failures: CheckFree, CheckFree+, restart from the last
checkpoint, and regrow's in-memory snapshots (the experiment of "All is Not Lost: LLM Recovery without Checkpoints",
Blagoev et al. 2025, at small scale on CPU)::

    .venv/bin/python bench/bench_checkfree.py --stages 4 --steps 600 --failure-every 125 --seed 0 --out-dir DIR

Protocol. The real :class:`PipelineTrainer` trains a GPT cut into ``--stages`` stages (DP 1, one gloo process per
stage, spawned by ``launch.local.spawn.run_local``) on the embedded byte corpus, with the same seed, data order and
failure schedule for every strategy. Five runs, one after the other, each in fresh processes:

- ``fault-free``: no failure; its validation loss at ``--target-frac`` of ``--steps`` becomes the target;
- ``checkfree``: a lost intermediate stage is rebuilt by gradient-norm-weighted averaging of its neighbours
  (``recovery.stage_heal.recover_stage`` with snapshots off: the real path, point-to-point). Plain CheckFree cannot
  rebuild an edge stage: ``--checkfree-edge reinit`` (default) restarts it from its initial weights with a fresh
  optimizer (all that a job without checkpoints or CheckFree+ has), ``skip`` applies the paper's assumption that
  edge stages are never lost (those failures are ignored for this strategy only);
- ``checkfree-plus``: CheckFree+ (swapped order on odd micro-batches, embedding/head replicas); edge stages are
  copied from their neighbour, intermediate ones averaged;
- ``checkpoint``: every ``--ckpt-every`` steps (and at step 0) every rank ``torch.save``s its shard state (fp32
  masters, Adam moments, RNG, data cursor) to ``--out-dir`` and fsyncs it, blocking, as DeepSpeed's pipeline
  engine does; a failure rolls every stage back to the last checkpoint (``torch.load`` + ``PipelineTrainer
  .restore``), and the lost steps are trained again;
- ``snapshot``: a real node snapshot process (``checkpoint.node.process``) and a ``SnapshotSink`` on every rank take
  an in-memory snapshot after every step (copy + checksum on a thread, overlapping the next step); on a failure the
  lost rank reads its newest sealed slot, the ranks agree on the newest step every rank holds (as
  ``restore_job`` does), and ranks not at that step restore it; a new sink re-attaches to the segments. This models
  a crashed rank process whose node (and snapshot process) survived, or a node loss within erasure-code parity
  whose segment rebuild (not measured here) would add to the restore.

A failure is simulated at a step boundary: the lost rank's weights, masters and optimizer state are wiped
(``PipelineTrainer.forget``) and only the strategy's recovery brings them back. Failures are drawn once from
``--seed``: at every executed iteration (a ``train_step`` call, re-trained ones included, so failures follow
wall-clock progress, not model progress) the pipeline fails with probability ``1 / --failure-every`` at a uniformly
drawn stage (at most one stage per iteration). All strategies see the same list.

Clock. Wall-clock is rank 0's ``perf_counter`` with the ranks synchronised at every measurement boundary; it
includes every training step (re-trained ones too), checkpoint saves, snapshot overhead and the measured recovery
actions. Validation (``--eval-batches`` fixed held-out batches through the pipeline every ``--eval-every`` steps)
is excluded. What cannot happen inside these processes is added as a constant measured on this machine:
``restart_s`` per failure, the wall time of ``run_local`` starting ``--stages`` fresh rank processes that
rendezvous, create the pipeline's process groups and build the stage (a replacement rank, or the whole restarted
job, does this before it can restore); the same constant for every strategy.

Mapping to the paper. The authors' code (gensyn-ai/CheckFree, ``simulate_training/*_config.json``) turns an hourly
per-stage failure rate into a per-iteration probability from its simulated iteration time (500M model: 10%/h ->
0.002, 5%/h -> 0.0009, i.e. ~65 s iterations, ~55 iterations per hour) and saves checkpoints every 100 iterations.
Here one training step stands for one of the paper's iterations (no time compression): a per-stage probability
p = 1 / (stages x failure_every) per step is the paper's hourly rate 1 - (1 - p)^55; ``--failure-every 125`` on 4
stages is p = 0.002 (10%/h), 280 is 0.0009 (5%/h). The printed ``paper_rate_per_hour`` is that number.

Output: a markdown table on stdout, ``RESULT {json}`` (one line, also written to ``--out-dir/checkfree.json``) and
the plot ``--out-dir/checkfree_loss.svg`` (validation loss against wall-clock, no plotting dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from regrow.checkpoint.node.process import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot import segment as seg
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV, SnapshotClient
from regrow.checkpoint.snapshot.sink import (
    SnapshotSink,
    SnapshotSinkConfig,
    state_from_snapshot,
)
from regrow.comm import collectives
from regrow.comm.world import World
from regrow.launch.local.spawn import run_local
from regrow.recovery.neighbor import NeighborRecoveryError, plan_rebuild
from regrow.recovery.order import Availability, Source
from regrow.recovery.stage_heal import recover_stage
from regrow.trainer.data import DataConfig, Sampler
from regrow.trainer.log import log_line
from regrow.trainer.loop import TrainerConfig
from regrow.trainer.models import GPT, GPTConfig, GPTStage, stage_blocks
from regrow.trainer.pipeline.p2p import Transfers
from regrow.trainer.pipeline.trainer import (
    PipelineConfig,
    PipelineTrainer,
    PipelineTrainerConfig,
)
from regrow.trainer.state import ShardState
from regrow.trainer.zero.config import ZeroConfig

STRATEGIES = ("fault-free", "checkfree", "checkfree-plus", "checkpoint", "snapshot")
LABELS = {"fault-free": "fault-free (reference)", "checkfree": "(a) CheckFree", "checkfree-plus": "(b) CheckFree+",
          "checkpoint": "(c) restart from checkpoint", "snapshot": "(d) regrow in-memory snapshots"}
PAPER_ITERATIONS_PER_HOUR = 55
"""The authors' simulated iteration time (~65 s, from their per-iteration failure probabilities) in one hour."""
SYNC_TIMEOUT_S = 300.0


@dataclass(kw_only=True)
class Bench:
    """Everything one run of the benchmark needs; shipped to every rank."""

    stages: int = 4
    n_layer: int = 8
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 64
    micro_batch: int = 4
    global_batch: int = 16
    lr: float = 3e-3
    warmup: int = 20
    steps: int = 600
    extra_steps: int = 300
    eval_every: int = 10
    eval_batches: int = 8
    failure_every: float = 125.0
    seed: int = 0
    ckpt_every: int = 100
    checkfree_edge: str = "reinit"
    target_frac: float = 0.75
    out_dir: str = "bench/results/checkfree"
    restart_rank_s: float = 0.0
    """Added per failure where one rank restarts (CheckFree, CheckFree+, snapshots)."""
    restart_job_s: float = 0.0
    """Added per failure where the whole job restarts (checkpoint)."""
    schedule: dict[int, int] = field(default_factory=dict)
    target: float | None = None
    snapshot_address: str | None = None

    def trainer_config(self, checkfree_plus: bool) -> PipelineTrainerConfig:
        """The pipeline run every strategy trains (CheckFree+ only changes the routes and the replicas)."""
        model = GPTConfig(n_layer=self.n_layer, d_model=self.d_model, n_head=self.n_head, seq_len=self.seq_len,
                          vocab_size=256)
        train = TrainerConfig(model=model, seed=self.seed,
                              data=DataConfig(seq_len=self.seq_len, micro_batch=self.micro_batch,
                                              global_batch=self.global_batch, seed=self.seed),
                              optim=ZeroConfig(stage=1, state_bits=32, lr=self.lr),
                              steps=self.steps, warmup_steps=self.warmup, log_every=0, progress=False)
        return PipelineTrainerConfig(train=train, pipeline=PipelineConfig(stages=self.stages,
                                                                          checkfree_plus=checkfree_plus))

    def paper_rate_per_hour(self) -> float:
        """The per-stage hourly failure rate of the paper's setting that this schedule's rate stands for."""
        p = 1.0 / (self.stages * self.failure_every)
        return 1.0 - (1.0 - p) ** PAPER_ITERATIONS_PER_HOUR


def failure_schedule(seed: int, stages: int, failure_every: float, horizon: int) -> dict[int, int]:
    """Executed iteration -> lost stage, for iterations 1..horizon (a failure strikes after that iteration)."""
    rng = random.Random(seed * 7919 + 17)
    schedule = {}
    for iteration in range(1, horizon + 1):
        if rng.random() < 1.0 / failure_every:
            schedule[iteration] = rng.randrange(stages)
    return schedule


# ---------------------------------------------------------------------------------------------- in the ranks
def _sync() -> None:
    """A barrier over the world (an all-reduce of one element): every rank's earlier work is done."""
    collectives.all_reduce(torch.zeros(1), group=None, timeout_s=SYNC_TIMEOUT_S)


class Clock:
    """Wall-clock of the run without validation, plus constants for what cannot happen here (process restarts)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.excluded = 0.0
        self.added = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.started - self.excluded + self.added

    @contextmanager
    def paused(self) -> Iterator[None]:
        _sync()
        begin = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.excluded += time.perf_counter() - begin

    @contextmanager
    def timed(self, totals: dict[str, float], key: str) -> Iterator[None]:
        """Adds the synchronised duration of the block to ``totals[key]`` (the block stays on the clock)."""
        _sync()
        begin = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - begin


@torch.no_grad()
def evaluate(trainer: PipelineTrainer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation loss of ``batches`` through the pipeline in stage order (forward only); every rank gets it."""
    stage, last = trainer.stage, trainer.n_stages - 1
    transfers = Transfers(trainer.groups.pp, trainer.timeout_s)
    total = torch.zeros((), dtype=torch.float32)
    for index, (x, y) in enumerate(batches):
        if stage == 0:
            h = trainer.module.embed_tokens(x)
        else:
            shape = (x.shape[0], x.shape[1], trainer.config.train.model.d_model)
            h = transfers.recv(torch.empty(shape, dtype=trainer.optimizer.param_dtype),
                               trainer.topology.rank_of(dp=trainer.dp, pp=stage - 1), index)
        out = trainer.module.run_blocks(h)
        if stage == last:
            total += trainer.module.head_loss(out, y).float()
        else:
            transfers.send(out, trainer.topology.rank_of(dp=trainer.dp, pp=stage + 1), index)
    transfers.wait_sends()
    collectives.all_reduce(total, group=None, timeout_s=SYNC_TIMEOUT_S)
    return total.item() / len(batches) / trainer.dp_size


def reinit_stage(trainer: PipelineTrainer) -> None:
    """Restarts this (lost) stage from its initial weights with a fresh optimizer and lr x 1 (no other source)."""
    initial = {name: p.detach().clone() for name, p in trainer.build_stage().named_parameters()}
    trainer.rebuild(initial, 1.0, trainer.progress())
    log_line(trainer.rank, trainer.step, f"recovery: stage {trainer.stage} restarted from its initial weights")


def recover_neighbors(trainer: PipelineTrainer, lost: int, edge_policy: str) -> str:
    """CheckFree / CheckFree+: the policy with snapshots off; what plain CheckFree cannot rebuild is ``reinit``-ed
    (or, with ``edge_policy == "skip"``, was never lost). Returns the action taken."""
    plus = trainer.config.pipeline.checkfree_plus
    try:
        plan_rebuild(lost, trainer.n_stages, {lost}, plus)
    except NeighborRecoveryError:
        if edge_policy == "skip":
            return "ignored (edge stage assumed never lost)"
        if trainer.stage == lost:
            trainer.forget()
            reinit_stage(trainer)
        return "initial weights (no neighbour rebuild possible)"
    if trainer.stage == lost:
        trainer.forget()
    available = Availability(lost_stage=lost, pp_size=trainer.n_stages, lost_stages=frozenset({lost}),
                             checkfree_plus=plus, snapshots_enabled=False)
    try:
        decision = recover_stage(trainer, available)
    except NeighborRecoveryError:  # e.g. a neighbour rebuilt one iteration ago has no gradient norm yet
        reinit_stage(trainer)
        return "initial weights (neighbour rebuild failed)"
    assert decision.source is Source.NEIGHBORS
    return f"neighbour {decision.plan.mode}" if decision.plan else decision.source.value


class CheckpointStore:
    """Blocking per-rank checkpoint files (``torch.save`` + fsync + rename), the last one kept."""

    def __init__(self, root: Path, rank: int) -> None:
        self.root = root
        self.rank = rank
        self.step = -1
        root.mkdir(parents=True, exist_ok=True)

    def path(self) -> Path:
        return self.root / f"rank{self.rank}.pt"

    def save(self, trainer: PipelineTrainer) -> None:
        state = trainer.shard_state()
        temp = self.root / f"rank{self.rank}.pt.tmp"
        with open(temp, "wb") as handle:
            torch.save(asdict_state(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path())
        self.step = trainer.step

    def load(self, trainer: PipelineTrainer) -> None:
        data = torch.load(self.path(), weights_only=False)
        trainer.restore(ShardState(**data))


def asdict_state(state: ShardState) -> dict:
    """A ShardState as a plain dict for ``torch.save`` (tensors cloned so later steps cannot change them)."""
    return {"step": state.step, "tensors": {k: v.clone() for k, v in state.tensors.items()},
            "layout": state.layout, "rank": state.rank, "rng": state.rng, "data_cursor": state.data_cursor,
            "tokens_seen": state.tokens_seen, "extra": state.extra}


class SnapshotRecovery:
    """This rank's SnapshotSink and the restore of a lost stage from the node's snapshot process."""

    def __init__(self, address: str, rank: int) -> None:
        self.address = address
        self.rank = rank
        self.sink = SnapshotSink(SnapshotSinkConfig(address=address, every=1, log=False), rank=rank)

    def sealed(self) -> dict[int, str]:
        """Step -> segment path of this rank's slots that verify now."""
        client = SnapshotClient(self.address, timeout_s=60.0)
        try:
            slots = client.request({"op": "latest", "rank": self.rank})["slots"]
        finally:
            client.close()
        found = {}
        for slot in slots:
            if slot["status"] != "ok":
                continue
            buffer = seg.open_segment(slot["path"], writable=False)
            try:
                snapshot = seg.verify(buffer, rank=self.rank)
                found[snapshot.step] = slot["path"]
                snapshot.payload.release()
            except seg.SegmentError:
                pass
            finally:
                buffer.close()
        return found

    def recover(self, trainer: PipelineTrainer, lost: int) -> int:
        """The lost rank crashed (its sink's copy in flight is not waited for); the others flush theirs. All ranks
        agree on the newest step every rank holds and those not at it restore it. Returns the steps rolled back."""
        if trainer.stage != lost:
            self.sink.flush()
        held = self.sealed()  # the lost rank: what was sealed when it crashed (its copy in flight is not)
        if trainer.stage == lost:
            trainer.forget()
        newest = torch.tensor([max(held, default=-1)], dtype=torch.int64)
        collectives.all_reduce(newest, group=None, timeout_s=SYNC_TIMEOUT_S, op=torch.distributed.ReduceOp.MIN)
        step = int(newest.item())
        if step not in held:
            raise RuntimeError(f"rank {self.rank}: no sealed snapshot of step {step} (holds {sorted(held)})")
        rolled_back = trainer.step - step
        if trainer.stage == lost or step != trainer.step:
            self._restore(trainer, held[step])
        return rolled_back

    def _restore(self, trainer: PipelineTrainer, path: str) -> None:
        buffer = seg.open_segment(path, writable=False)
        try:
            snapshot = seg.verify(buffer, rank=self.rank)
            state = state_from_snapshot(snapshot)
            snapshot.payload.release()
        finally:
            buffer.close()
        trainer.restore(state)
        # The restarted rank's new sink re-attaches to the same segments, keeping the slot it restored from.
        self.sink.close()
        self.sink = SnapshotSink(SnapshotSinkConfig(address=self.address, every=1, log=False), rank=self.rank)
        self.sink.attach(trainer.shard_state(), restored_from=path)
        trainer.sinks = [self.sink]


def strategy_run(world: World, bench: Bench, strategy: str) -> dict:
    """Trains one strategy to ``bench.steps`` logical steps (further, up to ``extra_steps`` more, while the target is
    not reached), injecting ``bench.schedule``; returns the loss curve and the accounting (rank 0's clock)."""
    snapshots = SnapshotRecovery(bench.snapshot_address, world.rank) if strategy == "snapshot" else None
    trainer = PipelineTrainer(bench.trainer_config(strategy == "checkfree-plus"), world,
                              sinks=[snapshots.sink] if snapshots else ())
    sampler = Sampler(trainer.config.train.data, dp_rank=0, dp_size=1)
    batches = list(sampler.validation_batches(bench.eval_batches, bench.global_batch))
    store = CheckpointStore(Path(bench.out_dir) / "ckpt", world.rank) if strategy == "checkpoint" else None
    totals: dict[str, float] = {}
    events: list[dict] = []
    _sync()
    clock = Clock()
    curve = [(0.0, 0, 0, evaluate(trainer, batches))]
    if store:
        with clock.timed(totals, "checkpoint_save_s"):
            store.save(trainer)
    iteration, reached = 0, None
    limit = bench.steps + bench.extra_steps
    while trainer.step < bench.steps or (reached is None and bench.target is not None and trainer.step < limit):
        trainer.train_step()
        iteration += 1
        if store and trainer.step % bench.ckpt_every == 0 and trainer.step > store.step:
            with clock.timed(totals, "checkpoint_save_s"):
                store.save(trainer)
        if strategy != "fault-free" and iteration in bench.schedule:
            events.append(inject(trainer, bench, strategy, bench.schedule[iteration], iteration, clock, totals,
                                 store, snapshots))
        if trainer.step % bench.eval_every == 0:
            with clock.paused():
                loss = evaluate(trainer, batches)
            curve.append((clock.now(), trainer.step, iteration, loss))
            if reached is None and bench.target is not None and loss <= bench.target:
                reached = {"seconds": clock.now(), "step": trainer.step, "iteration": iteration,
                           "restart_added_s": clock.added}
    if snapshots:
        snapshots.sink.close()
    return {"rank": world.rank, "strategy": strategy, "curve": curve, "events": events, "totals": totals,
            "reached": reached, "iterations": iteration, "seconds": clock.now(), "final_loss": curve[-1][3],
            "final_step": trainer.step}


def inject(trainer: PipelineTrainer, bench: Bench, strategy: str, lost: int, iteration: int, clock: Clock,
           totals: dict[str, float], store: CheckpointStore | None, snapshots: SnapshotRecovery | None) -> dict:
    """Loses stage ``lost`` after ``iteration`` and recovers it by ``strategy``; returns what happened."""
    step_before = trainer.step
    key = "recovery_s"
    before = totals.get(key, 0.0)
    with clock.timed(totals, key):
        if strategy in ("checkfree", "checkfree-plus"):
            action = recover_neighbors(trainer, lost, bench.checkfree_edge)
        elif strategy == "checkpoint":
            assert store is not None
            if trainer.stage == lost:
                trainer.forget()
            store.load(trainer)
            action = f"all stages back to step {trainer.step}"
        else:
            assert snapshots is not None
            rolled = snapshots.recover(trainer, lost)
            action = f"snapshot of step {trainer.step} ({rolled} step(s) lost)"
    measured = totals[key] - before
    restart = 0.0 if action.startswith("ignored") else (
        bench.restart_job_s if strategy == "checkpoint" else bench.restart_rank_s)
    clock.added += restart
    totals["restart_added_s"] = totals.get("restart_added_s", 0.0) + restart
    return {"iteration": iteration, "stage": lost, "step_before": step_before, "step_after": trainer.step,
            "action": action, "measured_s": measured, "restart_added_s": restart}


def startup_job(world: World, bench: Bench) -> None:
    """What a restarted job does before it can restore: every rank joins the world, creates the pipeline's groups
    and builds its stage."""
    PipelineTrainer(bench.trainer_config(False), world)
    _sync()


def startup_rank(world: World, bench: Bench) -> None:
    """What one replacement rank does before it can restore (its stage of the full model built from the seed; the
    rendezvous with the surviving ranks is a local TCPStore round trip, not modelled)."""
    config = bench.trainer_config(False)
    torch.manual_seed(config.train.seed)
    gpt = GPT(config.train.model)
    GPTStage.from_gpt(gpt, stage_blocks(bench.n_layer, bench.stages, 1), embed=False, head=False)


# ---------------------------------------------------------------------------------------------- in the parent
def measure_restart(bench: Bench, ranks: int, repeats: int = 3) -> float:
    """Median wall time of ``run_local`` starting ``ranks`` fresh processes (spawn, import torch and regrow,
    rendezvous) that build their stage (``startup_job`` for the whole pipeline, else ``startup_rank``)."""
    entry = startup_job if ranks == bench.stages else startup_rank
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run_local(entry, ranks, bench, backend="gloo", timeout_s=300, threads_per_rank=1)
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def run_strategy(bench: Bench, strategy: str) -> dict:
    """Runs one strategy in fresh processes (the snapshot one with its node's snapshot process); rank 0's result."""
    token = secrets.token_hex(32)
    process = None
    if strategy == "snapshot":
        process = start_snapshot_process(SnapshotProcessConfig(), token=token)
        bench = Bench(**{**asdict(bench), "snapshot_address": process.address})
    try:
        results = run_local(strategy_run, bench.stages, bench, strategy, backend="gloo", timeout_s=1800,
                            threads_per_rank=1, env={TOKEN_ENV: token})
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(Path(bench.out_dir) / "ckpt", ignore_errors=True)
    return results[0]


def target_from(reference: dict, bench: Bench) -> float:
    """The reference run's validation loss at the evaluation nearest ``target_frac`` of its steps."""
    wanted = bench.target_frac * bench.steps
    return min(reference["curve"], key=lambda point: abs(point[1] - wanted))[3]


def summarize(result: dict) -> dict:
    """One table row."""
    totals = result["totals"]
    measured = totals.get("recovery_s", 0.0)
    added = totals.get("restart_added_s", 0.0)
    reached = result["reached"]
    return {"strategy": result["strategy"], "seconds_to_target": reached["seconds"] if reached else None,
            "seconds_to_target_no_restart": reached["seconds"] - reached["restart_added_s"] if reached else None,
            "steps_to_target": reached["step"] if reached else None,
            "iterations_to_target": reached["iteration"] if reached else None,
            "failures": len(result["events"]),
            "failures_ignored": sum(e["action"].startswith("ignored") for e in result["events"]),
            "recovery_measured_s": measured, "restart_added_s": added, "recovery_total_s": measured + added,
            "checkpoint_save_s": totals.get("checkpoint_save_s", 0.0), "iterations": result["iterations"],
            "train_seconds": result["seconds"], "final_step": result["final_step"], "final_loss": result["final_loss"]}


def markdown_table(rows: list[dict]) -> str:
    """The RESULTS.md table."""
    lines = [("| strategy | wall-clock to target s | vs fault-free | without restarts s | steps (iterations) to target "
             "| iterations run | failures | recovery s (measured + restart) | checkpoint saves s | final val loss |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = rows[0]["seconds_to_target"]
    for row in rows:
        seconds, bare = row["seconds_to_target"], row["seconds_to_target_no_restart"]
        time_text = f"{seconds:.1f}" if seconds is not None else "not reached"
        ratio = f"{seconds / base:.2f}x" if seconds is not None and base else "-"
        bare_text = f"{bare:.1f}" if bare is not None else "-"
        steps = (f"{row['steps_to_target']} ({row['iterations_to_target']})" if row["steps_to_target"] is not None
                 else "-")
        failures = f"{row['failures']}" + (f" ({row['failures_ignored']} ignored)" if row["failures_ignored"] else "")
        lines.append(f"| {LABELS[row['strategy']]} | {time_text} | {ratio} | {bare_text} | {steps} | "
                     f"{row['iterations']} | {failures} | {row['recovery_total_s']:.1f} "
                     f"({row['recovery_measured_s']:.2f} + {row['restart_added_s']:.1f}) | "
                     f"{row['checkpoint_save_s']:.2f} | {row['final_loss']:.4f} |")
    return "\n".join(lines)


COLORS = {"fault-free": "#444444", "checkfree": "#1f77b4", "checkfree-plus": "#2ca02c", "checkpoint": "#d62728",
          "snapshot": "#9467bd"}


def svg_plot(results: list[dict], target: float, title: str) -> str:
    """Validation loss against wall-clock for every strategy, the target as a dashed line, failures as ticks."""
    width, height, left, right, top, bottom = 860, 520, 70, 250, 40, 55
    xs = [p[0] for r in results for p in r["curve"]]
    ys = [p[3] for r in results for p in r["curve"][1:]]
    x_max = max(xs) * 1.02
    y_min, y_max = min(ys + [target]) - 0.05, min(max(ys), target + 1.2) + 0.05

    def px(x: float) -> float:
        return left + (width - left - right) * x / x_max

    def py(y: float) -> float:
        y = min(max(y, y_min), y_max)
        return top + (height - top - bottom) * (y_max - y) / (y_max - y_min)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>'),
           f'<text x="{left}" y="22" font-size="14">{title}</text>']
    out += _axes(px, py, x_max, y_min, y_max, width - right, height - bottom, left, top)
    out.append(f'<line x1="{px(0):.1f}" x2="{px(x_max):.1f}" y1="{py(target):.1f}" y2="{py(target):.1f}" '
               f'stroke="#888" stroke-dasharray="6,4"/>')
    out.append(f'<text x="{px(x_max) + 4:.1f}" y="{py(target) + 4:.1f}" fill="#666">target {target:.3f}</text>')
    for index, result in enumerate(results):
        color = COLORS[result["strategy"]]
        points = " ".join(f"{px(p[0]):.1f},{py(p[3]):.1f}" for p in result["curve"][1:])
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{points}"/>')
        for event in result["events"]:
            at = next((p[0] for p in result["curve"] if p[2] >= event["iteration"]), None)
            if at is not None:
                out.append(f'<line x1="{px(at):.1f}" x2="{px(at):.1f}" y1="{height - bottom - 6 - 6 * index}" '
                           f'y2="{height - bottom - 6 * index}" stroke="{color}" stroke-width="2"/>')
        y = top + 20 + 22 * index
        out.append(f'<line x1="{width - right + 60}" x2="{width - right + 85}" y1="{y}" y2="{y}" stroke="{color}" '
                   f'stroke-width="3"/><text x="{width - right + 90}" y="{y + 4}">{LABELS[result["strategy"]]}</text>')
    out.append(f'<text x="{width - right + 60}" y="{top + 20 + 22 * len(results) + 10}" fill="#666">ticks at the '
               f'bottom: failures</text>')
    out.append("</svg>")
    return "\n".join(out)


def _axes(px, py, x_max: float, y_min: float, y_max: float, x_end: float, y_end: float, left: float,
          top: float) -> list[str]:
    """Axis lines, ticks and labels."""
    out = [f'<line x1="{left}" x2="{x_end}" y1="{y_end}" y2="{y_end}" stroke="black"/>',
           f'<line x1="{left}" x2="{left}" y1="{top}" y2="{y_end}" stroke="black"/>']
    step = _nice_step(x_max / 8)
    x = 0.0
    while x <= x_max:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{y_end}" y2="{y_end + 5}" stroke="black"/>'
                   f'<text x="{px(x):.1f}" y="{y_end + 18}" text-anchor="middle">{x:g}</text>')
        x += step
    y_step = _nice_step((y_max - y_min) / 6)
    y = math.ceil(y_min / y_step) * y_step
    while y <= y_max:
        out.append(f'<line x1="{left - 5}" x2="{left}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="black"/>'
                   f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        y += y_step
    out.append(f'<text x="{(left + x_end) / 2:.0f}" y="{y_end + 40}" text-anchor="middle">wall-clock s (validation '
               f'excluded; restarts added)</text>')
    out.append(f'<text x="18" y="{(top + y_end) / 2:.0f}" text-anchor="middle" transform="rotate(-90 18 '
               f'{(top + y_end) / 2:.0f})">validation loss (nats/byte)</text>')
    return out


def _nice_step(raw: float) -> float:
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Bench()
    p.add_argument("--stages", type=int, default=defaults.stages, help="pipeline stages (one process each)")
    p.add_argument("--n-layer", type=int, default=defaults.n_layer, help="GPT blocks (a multiple of --stages)")
    p.add_argument("--d-model", type=int, default=defaults.d_model)
    p.add_argument("--steps", type=int, default=defaults.steps, help="steps of the LR schedule and every run")
    p.add_argument("--extra-steps", type=int, default=defaults.extra_steps,
                   help="steps a run may go past --steps (at the final learning rate) to reach the target")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    p.add_argument("--failure-every", type=float, default=defaults.failure_every,
                   help="mean executed iterations between failures of the pipeline (any stage)")
    p.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every, help="checkpoint interval in steps")
    p.add_argument("--checkfree-edge", choices=("reinit", "skip"), default=defaults.checkfree_edge,
                   help="plain CheckFree on a lost edge stage: restart it from initial weights, or assume it never "
                        "fails")
    p.add_argument("--target-frac", type=float, default=defaults.target_frac)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--strategies", default=",".join(STRATEGIES[1:]),
                   help="comma-separated strategies after the fault-free reference")
    p.add_argument("--out-dir", default=defaults.out_dir)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(strategies) - set(STRATEGIES[1:]))
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; choose from {list(STRATEGIES[1:])}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(stages=args.stages, n_layer=args.n_layer, d_model=args.d_model, steps=args.steps,
                  extra_steps=args.extra_steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
                  failure_every=args.failure_every, ckpt_every=args.ckpt_every, checkfree_edge=args.checkfree_edge,
                  target_frac=args.target_frac, seed=args.seed, lr=args.lr, out_dir=str(out))
    bench.trainer_config(True)  # validate the shapes before spending minutes
    began = time.perf_counter()
    bench.restart_rank_s = measure_restart(bench, 1)
    bench.restart_job_s = measure_restart(bench, bench.stages)
    print(f"restart constants: one rank {bench.restart_rank_s:.2f} s, the job ({bench.stages} ranks) "
          f"{bench.restart_job_s:.2f} s", flush=True)
    bench.schedule = failure_schedule(bench.seed, bench.stages, bench.failure_every, 4 * (bench.steps +
                                                                                          bench.extra_steps))
    reference = run_strategy(bench, "fault-free")
    bench.target = target_from(reference, bench)
    reference["reached"] = next({"seconds": p[0], "step": p[1], "iteration": p[2], "restart_added_s": 0.0}
                                for p in reference["curve"] if p[3] <= bench.target)
    print(f"target validation loss {bench.target:.4f} (fault-free at step ~{bench.target_frac * bench.steps:.0f})",
          flush=True)
    results = [reference]
    for strategy in strategies:
        results.append(run_strategy(bench, strategy))
        print(f"{strategy}: {summarize(results[-1])}", flush=True)
    rows = [summarize(r) for r in results]
    table = markdown_table(rows)
    print(table)
    title = (f"GPT {bench.n_layer} blocks d{bench.d_model}, {bench.stages} stages; a failure every "
             f"{bench.failure_every:g} iterations (~{100 * bench.paper_rate_per_hour():.0f}%/h per stage)")
    (out / "checkfree_loss.svg").write_text(svg_plot(results, bench.target, title))
    record = {"bench": {k: v for k, v in asdict(bench).items() if k != "schedule"},
              "schedule": {str(k): v for k, v in sorted(bench.schedule.items())},
              "paper_rate_per_hour": bench.paper_rate_per_hour(), "torch": torch.__version__,
              "rows": rows, "curves": {r["strategy"]: r["curve"] for r in results},
              "events": {r["strategy"]: r["events"] for r in results}, "bench_wall_s": time.perf_counter() - began}
    (out / "checkfree.json").write_text(json.dumps(record) + "\n")
    print("RESULT " + json.dumps({"rows": rows, "target": bench.target, "restart_rank_s": bench.restart_rank_s,
                                  "restart_job_s": bench.restart_job_s,
                                  "paper_rate_per_hour": bench.paper_rate_per_hour(),
                                  "bench_wall_s": record["bench_wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
