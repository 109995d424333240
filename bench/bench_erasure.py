"""Encode throughput of :class:`regrow.checkpoint.node.group_code.GroupCode` against its anchors on this machine::

    .venv/bin/python bench/bench_erasure.py --size-mib 256 --groups 4:1 4:2 8:2

For each group ``n:p`` every node gets a ``--size-mib`` random buffer and we time, best of ``--repeat``:

- ``regrow``: ``GroupCode.encode`` (chunked, on ``--threads`` threads, data and parity CRC32s included);
- ``regrow 1 thread``: the same on one thread;
- ``zfec 1 call``: ``zfec.Encoder(k, n).encode`` once per stripe over whole pieces (one thread, no chunks, no CRC);
- ``numpy XOR``: ``out = d0 ^ d1 ^ ...`` once per stripe over whole pieces (what p == 1 computes, without CRC);
- ``memcpy``: ``np.copyto`` of every node's buffer (the ceiling for touching all data once).

GB/s counts the data bytes of the group (n buffers, 1e9 bytes per GB) per second; "per node" divides by n (the
rate at which one node's snapshot is protected when the whole group encodes). Ratios are against ``zfec 1 call``.
Buffers are created before timing; parity arrays are allocated inside the timed call for ``regrow`` (as in use) and
before it for the anchors.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zfec

from regrow.checkpoint.node.erasure import ErasureCodingConfig
from regrow.checkpoint.node.group_code import GroupCode


@dataclass(frozen=True)
class Row:
    group: str
    method: str
    seconds: float
    data_bytes: int
    n: int


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of ``repeat`` calls of ``fn`` (the first call also warms page tables)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_buffers(n: int, size: int, padded: int, seed: int) -> list[np.ndarray]:
    """n random buffers of ``padded`` bytes whose first ``size`` bytes are the snapshot (rest zero)."""
    rng = np.random.default_rng(seed)
    base = np.frombuffer(rng.bytes(size), dtype=np.uint8)
    buffers = []
    for node in range(n):
        buf = np.zeros(padded, dtype=np.uint8)
        np.bitwise_xor(base, np.uint8((node * 37 + 1) % 256), out=buf[:size])
        buffers.append(buf)
    return buffers


def bench_group(n: int, p: int, size: int, chunk: int, threads: int, repeat: int) -> list[Row]:
    # threads 0 means every core here (ErasureCodingConfig's own 0 caps at 8, for the snapshot process)
    code = GroupCode(ErasureCodingConfig(ec_group_size=n, ec_parity=p, chunk_bytes=chunk,
                                         threads=threads or os.cpu_count() or 1))
    single = GroupCode(ErasureCodingConfig(ec_group_size=n, ec_parity=p, chunk_bytes=chunk, threads=1))
    k = n - p
    geo = code.geometry([size] * n)
    piece = geo.piece_bytes
    buffers = make_buffers(n, size, k * piece, seed=n * 10 + p)
    snapshots = [buf[:size] for buf in buffers]
    stripe_blocks = [tuple(buffers[slot.node][slot.piece * piece:(slot.piece + 1) * piece] for slot in stripe.data)
                     for stripe in code.placement()]
    xor_out = np.empty(piece, dtype=np.uint8)
    copy_out = [np.empty(size, dtype=np.uint8) for _ in range(n)]
    encoder = zfec.Encoder(k, n)
    wanted = tuple(range(k, n))

    def zfec_whole() -> None:
        for blocks in stripe_blocks:
            encoder.encode(blocks, wanted)

    def xor_whole() -> None:
        for blocks in stripe_blocks:
            np.bitwise_xor(blocks[0], blocks[1], out=xor_out)
            for block in blocks[2:]:
                np.bitwise_xor(xor_out, block, out=xor_out)

    def memcpy() -> None:
        for src, dst in zip(snapshots, copy_out):
            np.copyto(dst, src)

    group = f"n={n}, p={p}"
    data = n * size
    methods: list[tuple[str, Callable[[], object]]] = [
        (f"regrow ({threads or os.cpu_count()} threads)", lambda: code.encode(snapshots)),
        ("regrow (1 thread)", lambda: single.encode(snapshots)),
        ("zfec 1 call / stripe", zfec_whole),
        ("numpy XOR", xor_whole),
        ("memcpy (np.copyto)", memcpy),
    ]
    return [Row(group, name, best_of(repeat, fn), data, n) for name, fn in methods]


def table(rows: list[Row]) -> str:
    lines = ["| group | method | time (s) | GB/s (group) | GB/s per node | vs zfec 1 call |",
             "|---|---|---:|---:|---:|---:|"]
    anchors = {row.group: row.seconds for row in rows if row.method.startswith("zfec")}
    for row in rows:
        rate = row.data_bytes / row.seconds / 1e9
        ratio = anchors[row.group] / row.seconds
        lines.append(f"| {row.group} | {row.method} | {row.seconds:.3f} | {rate:.2f} | {rate / row.n:.3f} | "
                     f"{ratio:.2f}x |")
    return "\n".join(lines)


def parse_group(text: str) -> tuple[int, int]:
    """``"n:p"`` -> (n, p)."""
    try:
        n, p = (int(part) for part in text.split(":"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--groups entries are n:p, got {text!r}") from error
    return n, p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=256.0, help="snapshot bytes per node, in MiB")
    parser.add_argument("--groups", type=parse_group, nargs="+", default=[(4, 1), (4, 2), (8, 2)],
                        help="groups to measure, as n:p")
    parser.add_argument("--chunk-mib", type=float, default=2.0, help="ErasureCodingConfig.chunk_bytes, in MiB")
    parser.add_argument("--threads", type=int, default=0, help="ErasureCodingConfig.threads (0 = os.cpu_count())")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per method; the fastest is kept")
    args = parser.parse_args()
    size = int(args.size_mib * 2**20)
    chunk = int(args.chunk_mib * 2**20)
    rows: list[Row] = []
    for n, p in args.groups:
        rows.extend(bench_group(n, p, size, chunk, args.threads, args.repeat))
    print(f"{os.cpu_count()} CPU cores, {args.size_mib:g} MiB per node, chunk {args.chunk_mib:g} MiB, "
          f"best of {args.repeat}")
    print(table(rows))


if __name__ == "__main__":
    main()
