"""How long the local launcher's ranks take to start: spawned (a fresh interpreter importing torch and regrow) or
forked from the fork server that has imported them once (``launch.local.spawn.rank_context``).

For each start method, ``--repeats`` times: start ``--ranks`` processes at once, each importing what a rank imports
(``spawn.PRELOAD``) and reporting the time; the figure is the time until the last one is ready. The fork server's
first start includes starting the server itself and is reported apart (``first_s``); ``median_s`` is over the
later ones, as every restart of a run sees them.

Usage::

    python3 bench/bench_rank_start.py --ranks 4 --repeats 3 --json out.jsonl

It prints ``RESULT {json}`` and appends it to ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

from regrow.launch.local.spawn import PRELOAD, rank_context


def _child(ready: Connection) -> None:
    for module in PRELOAD:
        importlib.import_module(module)
    ready.send(time.time())


def _start_once(context: mp.context.BaseContext, ranks: int) -> float:
    started = time.time()
    pipes = [context.Pipe(duplex=False) for _ in range(ranks)]
    processes = [context.Process(target=_child, args=(sender,)) for _, sender in pipes]
    for process in processes:
        process.start()
    ready = [receiver.recv() for receiver, _ in pipes]
    for process in processes:
        process.join()
    return max(ready) - started


def measure(method: str, ranks: int, repeats: int) -> dict:
    context = rank_context() if method == "forkserver" else mp.get_context("spawn")
    times = [_start_once(context, ranks) for _ in range(repeats + 1)]
    return {"first_s": round(times[0], 3), "median_s": round(statistics.median(times[1:]), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="starts timed after the first, per method")
    parser.add_argument("--json", default=None, help="file to append the result line to")
    args = parser.parse_args()
    result = {"ranks": args.ranks, "cpus": mp.cpu_count(),
              **{method: measure(method, args.ranks, args.repeats) for method in ("spawn", "forkserver")}}
    line = json.dumps(result)
    print(f"RESULT {line}", flush=True)
    if args.json:
        with open(args.json, "a") as out:
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
