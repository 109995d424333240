"""Training under torchrun, with torchrun's own restarts: ``torchrun ... -m regrow.launch.torchrun [train flags]``.

Two entry points share this module:

- ``python -m regrow.launch.torchrun [regrow train flags]`` is **the worker** torchrun starts on every rank. It takes
  the training flags of ``regrow train`` and runs the rank through ``launch.rank.train_rank``. Unlike ``regrow
  train``, it **always resumes** when the job holds a state: when any rank's node snapshot process holds a snapshot
  (slot or erasure-coded buffer) or ``--ckpt-dir`` has a ``latest``, every rank restores one common step through
  ``recovery.restore.restore_job`` (snapshot slots, then coded buffers, then ``latest`` of
  ``--ckpt-dir``); when nothing holds a state it starts from step 0 (or from ``--resume DIR``, a checkpoint to start
  the job from). This is what makes ``torchrun --max-restarts N`` recover: after a failure the agent kills and
  restarts every local worker, and the restarted workers find the snapshots their predecessors left.
- ``python -m regrow.launch.torchrun node [options] -- COMMAND...`` is **the node helper**
  (``launch/node_helper.py``): it starts the node's snapshot process before torchrun, runs torchrun with the
  snapshot process's address and token in its environment, and stops it when torchrun ends; with erasure coding,
  the nodes' helpers form coding groups and rebuild a node's lost snapshot process (``launch/node_group.py``).

How a rank knows it is a restart: it does not need to, and could not reliably. ``TORCHELASTIC_RESTART_COUNT`` counts
the restarts *this node's* agent spent; when a worker of another node fails, the agents of the healthy nodes
restart their workers for the new rendezvous round without spending a restart, so their workers see the same count
as before, and a job relaunched by hand after torchrun itself died starts again at 0. What the job holds is the
ground truth, so every start asks it: each rank probes its node's snapshot process and ``--ckpt-dir``, and the
ranks agree (an all-reduce) so that they either all restore or all start fresh. The count is only logged. The
consequence: a snapshot process and a ``--ckpt-dir`` belong to one job; a new job needs a new snapshot process (or
``--job``) and an empty ``--ckpt-dir``.

Faults for tests and demos: the ``regrow train --fault`` flag is the local launcher's. Under torchrun, export the
plan for the torchrun process itself (``REGROW_FAULTS`` and ``REGROW_FAULTS_DIR``, see ``chaos.plan.plan_env``; the
directory must outlive the workers); torchrun passes its environment on to every worker, whose ``train_rank``
attaches the same ``FaultInjector``, and a fault fires once across restarts.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

from regrow.comm.world import WorldConfig, destroy_world, init_world
from regrow.launch import node_helper
from regrow.launch.holdings import Holdings, job_holds_state, local_holdings, resumed_plans
from regrow.launch.job import ConfigErrors, Job, build_job
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.options import RESUME_SNAPSHOT, RunOptions
from regrow.launch.parser import parse_options
from regrow.launch.rank import RankWork, train_rank
from regrow.launch.train_cli import demo_table
from regrow.trainer.loop import StepResult

PROG = "python -m regrow.launch.torchrun"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
IMPLIED_RESUME = (RESUME_SNAPSHOT, "latest")
"""``--resume`` values the worker implies on every start (it restores from the snapshots, then ``latest``)."""


def log(text: str) -> None:
    print(f"[torchrun worker] {text}", flush=True)


def restart_count() -> int:
    """How many restarts this node's torchrun agent has spent (0 outside torchrun); logged, never decided on."""
    return int(os.environ.get(RESTART_COUNT_ENV, "0") or 0)


# ---------------------------------------------------------------------------------------------------- the worker


def parse_worker_options(argv: Sequence[str]) -> RunOptions:
    """``regrow train``'s flags, parsed by ``regrow train``'s own parser (the same names, defaults, help and
    checks, whatever flags it grows), with what this worker implies on every start: the node helper's snapshot
    process when ``--snapshot-address`` is not given, and no ``--resume snapshot|latest`` (every start resumes
    from the snapshots, then ``latest``: nothing left to ask for)."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"{PROG} [regrow train flags]: the rank torchrun starts. It trains like `regrow train` and, on every "
              "start, restores from the node's snapshot process, then --ckpt-dir, when they hold this job's state. "
              f"`{PROG} node -- torchrun ...` starts the node's snapshot process first. The flags:\n", flush=True)
    options = parse_options(["train", *argv])
    snapshot, checkpoint = options.snapshot, options.checkpoint
    if snapshot.address is None:
        snapshot = dataclasses.replace(snapshot, address=os.environ.get(ADDRESS_ENV))  # set by the node helper
    if snapshot.resume or checkpoint.resume in IMPLIED_RESUME:
        snapshot = dataclasses.replace(snapshot, resume=False)
        checkpoint = dataclasses.replace(checkpoint, resume=None)
    return dataclasses.replace(options, snapshot=snapshot, checkpoint=checkpoint)


def worker_problems(options: RunOptions) -> list[str]:
    """The problems specific to running as torchrun's worker (``job.build_job`` reports the others)."""
    problems = []
    if not options.launch.torchrun:
        problems.append(f"{PROG} is the worker torchrun starts (RANK and WORLD_SIZE are not set): run it as "
                        f"`torchrun --nproc-per-node N --max-restarts R -m regrow.launch.torchrun ...` (see "
                        "launch/examples/single_node.sh), or use `regrow train` for the local launcher")
    restarts = options.launch.max_restarts
    if restarts:
        problems.append(f"--max-restarts={restarts} is the local launcher's flag; under torchrun, give it "
                        f"to torchrun (`torchrun --max-restarts {restarts} -m regrow.launch.torchrun ...`)")
    return problems


def run_worker(job: Job) -> list[StepResult]:
    """One rank's run under torchrun: join the job, decide with the other ranks whether to restore, train."""
    options, config = job.options, job.config
    work = RankWork.of(config, options.checkpoint, options.snapshot, options.faults.stragglers(),
                       options.faults.parity())
    address, ckpt_dir = options.snapshot.address, options.checkpoint.ckpt_dir
    # With an address but no snapshots, the worker still restores from what the snapshot process holds.
    snapshotting = work.snapshot or (options.snapshot if address is not None else None)
    world = init_world(config=WorldConfig(backend=options.launch.backend, timeout_s=config.optim.timeout_s))
    try:
        mine = local_holdings(world.rank, address, ckpt_dir, options.snapshot.timeout_s)
        holds = job_holds_state(world.world_size, mine, config.optim.timeout_s)
        count = restart_count()
        if world.rank == 0:
            log(_start_line(holds, count, mine))
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                log(f"warning: torchrun shares its rendezvous store with the workers, so its restarts may fail to "
                    f"connect (pytorch/pytorch#135712); export {node_helper.UNSHARED_STORE_ENV}=1 for torchrun (`{PROG} node` "
                    "does)")
        checkpointing, snapshotting = resumed_plans(holds, checkpointing=work.checkpoint, snapshotting=snapshotting,
                                                    start_from=options.checkpoint.resume, ckpt_dir=ckpt_dir)
        return train_rank(world, RankWork(config=config, checkpoint=checkpointing, snapshot=snapshotting,
                                          stragglers=work.stragglers, parity=work.parity))
    finally:
        destroy_world()


def _start_line(holds: bool, count: int, mine: Holdings) -> str:
    where = f"{RESTART_COUNT_ENV}={count}"
    if holds:
        found = ", ".join(mine.snapshots + ([f"checkpoint {mine.checkpoint}"] if mine.checkpoint else [])) or \
            "state held by other ranks only"
        kind = "restart" if count else "start (the job was relaunched, or another node's worker failed)"
        return f"{kind}, {where}: the job holds a state ({found}); every rank restores"
    if count:
        return f"restart, {where}: no snapshot or checkpoint holds a step yet; starting from step 0"
    return f"first start, {where}: nothing to restore; starting from step 0"


def worker_main(argv: Sequence[str] | None = None) -> int:
    options = parse_worker_options(argv)
    problems = worker_problems(options)
    try:
        job = build_job(options)
    except ConfigErrors as error:
        problems += error.problems
        job = None
    if problems:
        print(f"{PROG}: invalid arguments:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    assert job is not None
    history = run_worker(job)
    if job.config.eval_every and int(os.environ.get("RANK", "0")) == 0:
        print("\n" + demo_table(history))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node"]:
        return node_helper.node_main(argv[1:])
    return worker_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
