"""The node helper under torchrun: ``python -m regrow.launch.torchrun node [options] -- COMMAND...``.

It starts the node's snapshot process (with ``REGROW_SNAPSHOT_TOKEN`` if exported, else a fresh
``secrets.token_hex(32)``; persisting universal checkpoints itself every K steps when asked, docs/torchrun.md), runs
``COMMAND`` (torchrun) with the token, the address (``REGROW_SNAPSHOT_ADDRESS``: the worker's
``--snapshot-address`` defaults to it), the process's pid and this node's rank in its environment, and stops the
snapshot process when the command ends, however it ends, removing its segments. The snapshot process is started
*before* torchrun because torchrun kills a restarted worker's whole session (``launch/run.py``); it outlives every
restart and dies with the helper. It also sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun unless already
set: by default torchrun's agent shares its rendezvous store with the workers, and restarted workers can then read
their predecessors' connection keys and fail to connect ("Connection refused", pytorch/pytorch#135712); with the
store not shared, every restart gets a fresh one.

With ``--ec-group-size n`` (and ``--node-rank``, ``--nnodes``, ``--ec-dir``, the same exported token on every node)
the nodes' snapshot processes erasure-code each other's snapshots in groups of n nodes, meeting in the shared
``--ec-dir``; a node whose snapshot process dies gets a replacement rebuilt from its group
(``launch/node_group.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.persist import PersistConfig
from regrow.checkpoint.node.process import SnapshotProcess, SnapshotProcessConfig, start_snapshot_process
from regrow.checkpoint.snapshot.protocol import TOKEN_ENV
from regrow.launch.local.nodes import ADDRESS_ENV, NODE_ENV, PID_ENV
from regrow.launch.node_group import NodeGroupConfig, NodeSupervisor
from regrow.launch.options import CheckpointOptions

PROG = "python -m regrow.launch.torchrun node"
UNSHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
"""Read by torchrun's agent: "1" gives every rendezvous round (every restart) a fresh store for the workers."""


def node_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Starts this node's snapshot process, runs COMMAND (torchrun) with "
                               f"{TOKEN_ENV} and {ADDRESS_ENV} set, stops the snapshot process after.")
    parser.add_argument("--address", default="127.0.0.1:0",
                        help="where the snapshot process listens (port 0: any free port); only this node's ranks "
                             "connect to it unless erasure coding is used (then give an address the other nodes "
                             "reach)")
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
    parser.add_argument("--ec-group-size", type=int, default=0, metavar="N",
                        help="erasure-code the snapshots across groups of N consecutive nodes (0: off); needs "
                             f"--node-rank, --nnodes, --ec-dir and the same exported {TOKEN_ENV} on every node")
    parser.add_argument("--ec-parity", type=int, default=1, metavar="P", help="nodes of a group that may be lost at "
                                                                              "once")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank among the job's nodes")
    parser.add_argument("--nnodes", type=int, default=None, help="nodes of the job")
    parser.add_argument("--ec-dir", default="", metavar="DIR",
                        help="a directory every node sees, where the helpers publish their snapshot processes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run, e.g. torchrun ...")
    return parser


def persist_config(args: argparse.Namespace) -> PersistConfig:
    """The node helper's --persist-* flags as the snapshot process's :class:`PersistConfig`; ValueError naming the
    flag."""
    return _flagged(lambda: PersistConfig(persist_every=args.persist_every, persist_dir=args.persist_dir,
                                          keep_last=args.keep_last),
                    "PersistConfig.", ("persist_every", "persist_dir", "keep_last"))


def group_config(args: argparse.Namespace) -> NodeGroupConfig | None:
    """The --ec-* flags as the :class:`NodeGroupConfig` of this node (None: erasure coding is off); ValueError
    naming the flag."""
    if not args.ec_group_size:
        return None
    missing = [flag for flag, value in (("--node-rank", args.node_rank), ("--nnodes", args.nnodes),
                                        ("--ec-dir", args.ec_dir)) if value in (None, "")]
    if missing:
        raise ValueError(f"--ec-group-size {args.ec_group_size} needs {', '.join(missing)} (this node's place among "
                         "the job's nodes, and the directory they all see)")
    if not os.environ.get(TOKEN_ENV):
        raise ValueError(f"--ec-group-size needs {TOKEN_ENV} exported, the same on every node (the snapshot "
                         "processes of a group authenticate each other with it): e.g. export "
                         f"{TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))') on one node "
                         "and copy it to the others")
    return _flagged(lambda: NodeGroupConfig(node=args.node_rank, nodes=args.nnodes, ec_group_size=args.ec_group_size,
                                            ec_parity=args.ec_parity, directory=args.ec_dir),
                    "NodeGroupConfig.", ("ec_group_size", "ec_parity", "nodes", "node", "directory"))


def _flagged(build, prefix: str, fields: tuple[str, ...]):
    """``build()``, with a ValueError's field names replaced by the flags that set them (in one pass, so that a
    flag put in is never replaced again)."""
    flags = {"nodes": "--nnodes", "node": "--node-rank", "directory": "--ec-dir"}
    try:
        return build()
    except (TypeError, ValueError) as error:
        names = re.compile(r"\b(" + "|".join(sorted(fields, key=len, reverse=True)) + r")\b")
        text = names.sub(lambda m: flags.get(m.group(1), "--" + m.group(1).replace("_", "-")),
                         str(error).replace(prefix, ""))
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
        persist, group = persist_config(args), group_config(args)
    except ValueError as error:
        parser.error(str(error))
    token = os.environ.get(TOKEN_ENV) or secrets.token_hex(32)
    try:
        erasure = ErasureCodingConfig(ec_group_size=args.ec_group_size, ec_parity=args.ec_parity)
        config = SnapshotProcessConfig(address=args.address, job=args.job or f"torchrun-{secrets.token_hex(4)}",
                                       shm_dir=args.shm_dir, persist=persist, erasure=erasure)
        supervisor = (NodeSupervisor(group, config, token=token,
                                     start_process=lambda c: start_snapshot_process(c, token=token))
                      if group is not None else None)
        process = supervisor.start() if supervisor is not None else start_snapshot_process(config, token=token)
    except (ValueError, RuntimeError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    try:
        _announce_start(process, args, group, command)
        if supervisor is not None and not supervisor.wait_for_group():
            print(f"{PROG}: the nodes of group {group.group} did not all publish their snapshot processes under "
                  f"{group.directory} within {group.wait_s} s (start the helper on every node, with the same "
                  "--ec-dir)", file=sys.stderr)
            return 1
        return _run(command, token, process, group)
    finally:
        code = supervisor.stop() if supervisor is not None else process.stop()
        print(f"[node] snapshot process stopped (exit code {code})", flush=True)


def _announce_start(process: SnapshotProcess, args: argparse.Namespace, group: NodeGroupConfig | None,
                    command: list[str]) -> None:
    persisting = (f"; persisting every {args.persist_every} steps to {args.persist_dir}" if args.persist_every
                  else "")
    coding = (f"; node {group.node} of {group.nodes}, erasure-coding group {group.group} (parity {group.ec_parity}) "
              f"meeting in {group.directory}" if group is not None else "")
    print(f"[node] snapshot process at {process.address} (pid {process.process.pid}, job {process.job}"
          f"{persisting}{coding}); running {command[0]}", flush=True)


def _run(command: list[str], token: str, process: SnapshotProcess, group: NodeGroupConfig | None) -> int:
    """Runs ``command`` with the snapshot process in its environment; returns its exit code."""
    previous: dict[int, object] = {}
    env = {UNSHARED_STORE_ENV: "1", **os.environ, TOKEN_ENV: token, ADDRESS_ENV: process.address,
           PID_ENV: str(process.process.pid), **({NODE_ENV: str(group.node)} if group is not None else {})}
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as error:
        print(f"{PROG}: cannot run {command[0]!r}: {error}", file=sys.stderr)
        return 127
    try:
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


__all__ = ["group_config", "node_main", "node_parser", "persist_config"]
