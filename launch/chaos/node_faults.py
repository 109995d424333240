"""``python -m regrow.launch.chaos.node_faults``: a node's snapshot process under a fault plan that strikes inside it.

A ``kill-node:N@S:ec`` fault loses node N in the middle of an erasure-coding round: only the snapshot process is
inside the round, so only it can die at that moment. The local launcher starts the snapshot process of every node
through this module when the plan has such a fault (``launch/run.py``); it runs the ordinary snapshot process
(``checkpoint/node/__main__.py``, same arguments) with :class:`RoundFault` as the coding thread's round hook. The
process records the fault as fired, SIGKILLs itself after this node's sizes are exchanged and before its pieces are
sent (the peers are then waiting for them), and its ranks fail at their next request to it: the node is lost as when
its machine dies, half way through a round.
"""

from __future__ import annotations

import os
import sys
import time

from regrow.checkpoint.node.__main__ import main as snapshot_process_main
from regrow.launch.chaos import records
from regrow.launch.chaos.injector import kill_pid
from regrow.launch.chaos.plan import Fault, plan_from_env
from regrow.launch.local.nodes import NODE_ENV


class RoundFault:
    """The coding thread's round hook of node ``node``: called with the step of each round once the sizes are
    exchanged; kills this process in the first round of a step ``>= S`` of a ``kill-node:node@S:ec`` fault not yet
    fired (a replaced process of a restarted attempt reads the fired records and skips it)."""

    def __init__(self, faults: list[Fault], fired_dir: str, *, node: int) -> None:
        done = set(records.fired(fired_dir))
        self.faults = {index: fault for index, fault in enumerate(faults)
                       if index not in done and fault.moment == "ec" and fault.target == node}
        self.fired_dir = fired_dir
        self.node = node

    def __call__(self, step: int) -> None:
        for index, fault in sorted(self.faults.items()):
            if step >= fault.step:
                record = {"fault": str(fault), "node": self.node, "step": step, "time": time.time()}
                if records.record_fired(self.fired_dir, index, record):
                    print(f"[snapshot process] node {self.node}: fault {fault} fires in the erasure-coding round "
                          f"of step {step}", flush=True)
                    kill_pid(os.getpid())


def main(argv: list[str] | None = None) -> int:
    planned = plan_from_env(dict(os.environ))
    hook = None
    if planned is not None:
        faults, fired_dir = planned
        hook = RoundFault(faults, fired_dir, node=int(os.environ.get(NODE_ENV, "0")))
    return snapshot_process_main(argv, round_hook=hook)


if __name__ == "__main__":
    sys.exit(main())
