"""Runs a validated :class:`~regrow.launch.job.Job` on the local launcher, or in this process when torchrun started
it as one rank.

Who owns the node's snapshot process (docs/snapshot-protocol.md: it must outlive the ranks):

- **Local launcher** (``regrow train --nproc N [--nodes M]``): the ``regrow train`` process is the parent of every
  rank and outlives them, so it starts one snapshot process per node (:func:`node_snapshots`,
  ``launch/local/nodes.py``) with a fresh ``secrets.token_hex(32)`` token, hands address and token to each rank
  through its environment (``run_local``'s ``rank_envs``, sent over the spawn pipe, never argv), replaces and
  rebuilds a lost node's process between attempts (``--max-restarts``, ``launch/local/attempts.py``), and stops
  them all (SIGTERM: they remove their segments) when the run ends, however it ends.
- **torchrun**: no process of ours outlives a torchrun restart. The elastic agent starts every worker in its own
  session and ``killpg``s that session on a restart, so a snapshot process started by ``LOCAL_RANK`` 0 would die
  with the very ranks it is meant to outlive. Under torchrun the snapshot process is therefore started before
  torchrun on each node (``python -m regrow.checkpoint.node --address 127.0.0.1:0`` with
  ``REGROW_SNAPSHOT_TOKEN`` exported, which torchrun passes on to its workers, or ``launch/torchrun.py``'s node
  helper) and given with ``--snapshot-address``.
- ``--snapshot-address`` also works with the local launcher: the process is then used, never started or stopped,
  which is what lets a later ``regrow train --resume snapshot`` find the snapshots of a run that was killed.

``--resume snapshot`` (and every restart) restores all ranks through ``recovery.restore.restore_job``, following
the recovery order of ``recovery/order.py``: the newest step every rank holds in its node's snapshot slots, else in
the nodes' erasure-coded buffers, else ``latest`` of ``--ckpt-dir``. A log line names the source used and why
better ones were passed over.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

from regrow.checkpoint.node.persist import PersistConfig
from regrow.comm.world import WorldConfig, destroy_world, init_world
from regrow.launch.chaos.plan import NODE_FAULTS_MODULE, Fault, plan_env
from regrow.launch.chaos.recorder import Recorder
from regrow.launch.job import Job
from regrow.launch.local.attempts import AttemptsConfig, run_attempts
from regrow.launch.local.nodes import ADDRESS_ENV, LocalNodes, NodesConfig
from regrow.launch.local.shm import snapshot_bytes
from regrow.launch.options import RunOptions, SnapshotOptions
from regrow.launch.rank import RankWork, train_rank
from regrow.trainer.loop import StepResult


class SnapshotStartError(RuntimeError):
    """The launcher could not start the node's snapshot process (e.g. ``/dev/shm`` too small); names the fix."""


def run_training(job: Job, *, recorder: Recorder | None = None) -> list[StepResult]:
    """Runs ``job`` on ``nproc`` local processes, restarting it after failures as ``--max-restarts`` allows, or in
    this process when torchrun started it. Returns the history of the last attempt (the steps it ran).

    ``recorder`` (local launcher) is told about every attempt, failure and heal, and reads what the ranks recorded
    (fired faults, heartbeats, restores) before the run directory goes; the ranks write heartbeats when it is given
    or ``--hang-timeout`` is set (the watchdog reads them)."""
    options = job.options
    work = RankWork.of(job.config, options.checkpoint, options.snapshot, options.faults.stragglers(),
                       options.faults.parity())
    if options.launch.torchrun:
        world = init_world(config=WorldConfig(backend=options.launch.backend, timeout_s=job.config.optim.timeout_s))
        try:
            return train_rank(world, work)
        finally:
            destroy_world()
    config = AttemptsConfig(nproc=options.launch.nproc, backend=options.launch.backend,
                            timeout_s=options.launch.timeout_s, max_restarts=options.launch.max_restarts,
                            hang_timeout_s=options.faults.hang_timeout_s,
                            warm_restarts=options.launch.warm_restarts)
    with tempfile.TemporaryDirectory(prefix="regrow-run-") as run_dir, \
            node_snapshots(node_layout(job), options.snapshot, **node_fault_entry(job.plan, run_dir)) as nodes:
        # The run directory is also where the ranks record the faults they fire.
        env = {**launcher_env(options.snapshot), **plan_env(job.plan, run_dir)}
        return run_attempts(train_rank, work, config, run_dir=run_dir, env=env, nodes=nodes, observer=recorder)


def node_layout(job: Job) -> NodesConfig | None:
    """The local launcher's node layout for ``job`` (None when it starts no snapshot process: snapshots off, or a
    running one named by ``--snapshot-address``)."""
    snapshot = job.options.snapshot
    if not snapshot.active or snapshot.address is not None:
        return None
    ranks = job.options.launch.nproc
    return NodesConfig(ranks=ranks, nodes=snapshot.nodes, ec_group_size=snapshot.ec_group_size,
                       ec_parity=snapshot.ec_parity, shm_dir=snapshot.shm_dir,
                       bytes_per_rank=snapshot_bytes(job.config, ranks), persist=persist_config(job.options))


def node_fault_entry(plan: list[Fault], run_dir: str) -> dict[str, Any]:
    """How the snapshot processes start under ``plan``: through the fault injector's entry, with the plan, when a
    kill strikes inside one of them (``kill-node:N@S:ec``); as usual otherwise (no arguments)."""
    if not any(fault.moment == "ec" for fault in plan):
        return {}
    return {"module": NODE_FAULTS_MODULE, "env": plan_env(plan, run_dir)}


def persist_config(options: RunOptions) -> PersistConfig:
    """What the local launcher's snapshot processes persist (``--persist-every`` into ``--ckpt-dir``)."""
    snapshot = options.snapshot
    if not snapshot.persist_every:
        return PersistConfig()
    return PersistConfig(persist_every=snapshot.persist_every, persist_dir=snapshot.ckpt_dir or "",
                         keep_last=options.checkpoint.keep_last)


@contextlib.contextmanager
def node_snapshots(layout: NodesConfig | None, snapshot: SnapshotOptions, *, module: str | None = None,
                   env: dict[str, str] | None = None) -> Iterator[LocalNodes | None]:
    """The local launcher's side: starts one snapshot process per node of ``layout``, erasure-coding groups
    formed, before any rank starts, and stops them on exit however the run ends. Yields None when ``layout`` is
    None (the ranks then get the address of ``--snapshot-address``, if any, from :func:`launcher_env`).
    ``module`` and ``env``: how the processes start (``LocalNodes``; :func:`node_fault_entry`).

    A ``/dev/shm`` too small for the ranks' snapshots fails here, with the snapshot process's error."""
    if layout is None:
        yield None
        return
    try:
        nodes = LocalNodes(layout, module=module, env=env).__enter__()
    except RuntimeError as error:
        raise SnapshotStartError(f"--snapshot-every={snapshot.every}: {error}\n(or lower --nproc, or drop "
                                 "--snapshot-every)") from error
    try:
        yield nodes
    finally:
        nodes.stop()


def launcher_env(snapshot: SnapshotOptions) -> dict[str, str]:
    """What every rank needs when the snapshot process was given with ``--snapshot-address`` (the token is
    already in this process's environment)."""
    return {ADDRESS_ENV: snapshot.address} if snapshot.active and snapshot.address is not None else {}
