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
- ``python -m regrow.launch.torchrun node [--job ID] [--address HOST:PORT] [--shm-dir DIR] [--persist-every K
  --persist-dir DIR] -- COMMAND...`` is **the node helper**: it starts the node's snapshot process (with
  ``REGROW_SNAPSHOT_TOKEN`` if exported, else a fresh ``secrets.token_hex(32)``; persisting universal checkpoints
  itself every K steps when asked, docs/torchrun.md), runs ``COMMAND`` (torchrun) with the token and the address
  in its environment (``REGROW_SNAPSHOT_TOKEN``, ``REGROW_SNAPSHOT_ADDRESS``: the worker's ``--snapshot-address``
  defaults to the latter), and stops the snapshot process when the command ends, however it ends, removing its
  segments. The snapshot process is started *before* torchrun because torchrun kills a restarted worker's whole
  session (``launch/run.py``); it outlives every restart and dies with the helper. It also sets
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun unless already set: by default torchrun's agent shares its
  rendezvous store with the workers, and restarted workers can then read their predecessors' connection keys and
  fail to connect ("Connection refused", pytorch/pytorch#135712); with the store not shared, every restart gets a
  fresh one.

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

import argparse
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence

from regrow.checkpoint.node.persist import PersistConfig
from regrow.checkpoint.node.process import SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.comm.world import WorldConfig, destroy_world, init_world
from regrow.launch.holdings import Holdings, job_holds_state, local_holdings, resumed_plans
from regrow.launch.job import ConfigErrors, Job, build_job
from regrow.launch.local.nodes import ADDRESS_ENV
from regrow.launch.options import RESUME_SNAPSHOT, CheckpointOptions, RunOptions
from regrow.launch.parser import parse_options
from regrow.launch.rank import RankWork, train_rank
from regrow.launch.train_cli import demo_table
from regrow.trainer.loop import StepResult

PROG = "python -m regrow.launch.torchrun"
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
UNSHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
"""Read by torchrun's agent: "1" gives every rendezvous round (every restart) a fresh store for the workers."""
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
                    f"connect (pytorch/pytorch#135712); export {UNSHARED_STORE_ENV}=1 for torchrun (`{PROG} node` "
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


# ---------------------------------------------------------------------------------------------------- the node helper


def node_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} node", description="Starts this node's snapshot process, runs COMMAND (torchrun) with "
                                         f"{TOKEN_ENV} and {ADDRESS_ENV} set, stops the snapshot process after.")
    parser.add_argument("--address", default="127.0.0.1:0",
                        help="where the snapshot process listens (port 0: any free port); only this node's ranks "
                             "connect to it unless erasure coding is used")
    parser.add_argument("--job", default="", help="names the segments; a restarted snapshot process of the same job "
                                                  "removes what a crashed one left (default: random)")
    parser.add_argument("--shm-dir", default="/dev/shm", help="tmpfs for the segments")
    parser.add_argument("--persist-every", type=int, default=0, metavar="K",
                        help="the snapshot process writes a universal checkpoint under --persist-dir every K steps "
                             "from its ranks' snapshots, at no cost to them (a multiple of the workers' "
                             "--snapshot-every; 0: off). On several nodes: the same --persist-dir (a shared "
                             f"filesystem) and the same exported {TOKEN_ENV} on every node")
    parser.add_argument("--persist-dir", default="", metavar="DIR", help="where --persist-every writes")
    parser.add_argument("--keep-last", type=int, default=CheckpointOptions().keep_last,
                        help="persisted checkpoints to keep (>= 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run, e.g. torchrun ...")
    return parser


def persist_config(args: argparse.Namespace) -> PersistConfig:
    """The node helper's --persist-* flags as the snapshot process's :class:`PersistConfig`; ValueError naming the
    flag."""
    try:
        return PersistConfig(persist_every=args.persist_every, persist_dir=args.persist_dir,
                             keep_last=args.keep_last)
    except (TypeError, ValueError) as error:
        text = str(error).replace("PersistConfig.", "")
        for field in ("persist_every", "persist_dir", "keep_last"):
            text = text.replace(field, "--" + field.replace("_", "-"))
        raise ValueError(text) from error


def node_main(argv: Sequence[str]) -> int:
    """The node helper (see the module docstring); returns the command's exit code (1 if the snapshot process did
    not start, 2 for bad arguments)."""
    parser = node_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. `-- torchrun --nproc-per-node 2 --max-restarts 3 -m "
                     "regrow.launch.torchrun --snapshot-every 1`")
    try:
        persist = persist_config(args)
    except ValueError as error:
        parser.error(str(error))
    token = os.environ.get(TOKEN_ENV) or secrets.token_hex(32)
    try:
        config = SnapshotProcessConfig(address=args.address, job=args.job or f"torchrun-{secrets.token_hex(4)}",
                                       shm_dir=args.shm_dir, persist=persist)
        process = start_snapshot_process(config, token=token)
    except (ValueError, RuntimeError) as error:
        print(f"{PROG} node: {error}", file=sys.stderr)
        return 1
    persisting = (f"; persisting every {args.persist_every} steps to {args.persist_dir}" if args.persist_every
                  else "")
    print(f"[node] snapshot process at {process.address} (pid {process.process.pid}, job {process.job}"
          f"{persisting}); running {command[0]}", flush=True)
    previous: dict[int, object] = {}
    try:
        try:
            env = {UNSHARED_STORE_ENV: "1", **os.environ, TOKEN_ENV: token, ADDRESS_ENV: process.address}
            child = subprocess.Popen(command, env=env)
        except OSError as error:
            print(f"{PROG} node: cannot run {command[0]!r}: {error}", file=sys.stderr)
            return 127
        # Ctrl-C reaches torchrun through the terminal's process group; a SIGTERM sent to this helper alone (a
        # scheduler cancelling the job) is passed on, so torchrun stops its workers before the snapshots go.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, lambda signum, _frame: child.send_signal(signum))
        return child.wait()
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached torchrun too: wait for it to stop its workers
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        code = process.stop()  # removes the segments too if the process could not (killed, crashed)
        print(f"[node] snapshot process stopped (exit code {code})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node"]:
        return node_main(argv[1:])
    return worker_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
