"""Your own training loop on a Ray cluster: every Ray worker runs ``train``, the loop of ``examples/own_loop.py`` (a
Hugging Face Llama, regrow's 8-bit ZeRO-2 optimizer, a learning-rate schedule, an EMA of the weights, counters), and
runs it again from the top after a failure; its ``regrow.Guard`` restores the newest step every rank holds.

From the command line, on a Ray instance started on this machine (rank 1 killed at step 6, then recovered from the
snapshots)::

    regrow ray --address local --workers 2 --snapshot-every 1 --max-restarts 1 --fault kill-rank:1@6 \\
        --entry examples.own_loop_ray:train --entry-kwargs '{"steps": 12}'

On a cluster, a lost node included (two ranks per node, each node's snapshots erasure-coded with another's, a
spare node for the replacements)::

    regrow ray --address auto --workers 8 --ranks-per-node 2 --ec-group-size 2 --snapshot-every 1 --max-restarts 3 \\
        --entry examples.own_loop_ray:train --entry-kwargs '{"steps": 1000}'

From Python (``ray.init(...)`` first), which is what ``regrow ray --entry`` runs::

    import regrow
    from regrow.launch.ray_entry import EntryJob
    from regrow.recovery.ray.coordinator import CoordinatorConfig
    from regrow.recovery.ray.entry import EntryPoint

    job = EntryJob(EntryPoint.for_driver("examples.own_loop_ray:train", {"steps": 12}), CoordinatorConfig(workers=2),
                   guard=regrow.GuardConfig(snapshot_every=1))
    result = job.run()  # result.returns: each rank's value; result.recoveries: what each failure cost

The entry is resolved like ``python -m`` does, from the working directory (run these from the repository root); the
workers import it from the same directory, so on a cluster the code must be at the same path on every node.
"""

from __future__ import annotations

try:
    from examples.own_loop import train
except ImportError:  # imported with its folder on sys.path
    from own_loop import train

__all__ = ["train"]
