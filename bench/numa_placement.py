"""Which NUMA node a GPU hangs off, and binding a process's CPUs to it (the snapshot benches' ``--numa-bind``).

On a host with several NUMA nodes (sockets), memory that a process first touches lands on the node of the CPU it
runs on. A rank's pinned host buffers (its snapshot segments, registered with ``cudaHostRegister`` in the rank's
process, and the checkpoint writer's buffers) are first touched there, so a rank the scheduler happens to run on the
far socket sends every device-to-host copy across the socket link. Binding the rank's process to its GPU's node
before it allocates those buffers keeps the copies local. Nothing here changes memory policy; first touch after the
binding is what places the pages. A bench diagnostic, not part of regrow: the lent 4-GPU host has one NUMA node, so
whether binding helps was never measured (``bench/RESULTS.md``).

Linux only (``sched_setaffinity`` and sysfs); elsewhere, or where the GPU's node is unknown, every function returns
``None`` and binds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_PCI = Path("/sys/bus/pci/devices")
SYSFS_NODES = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> set[int]:
    """``"0-3,8,10-11"`` (the kernel's cpulist format) -> ``{0, 1, 2, 3, 8, 10, 11}``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def numa_nodes() -> list[int]:
    """The host's NUMA nodes that have CPUs (empty when sysfs does not say)."""
    nodes = []
    for path in sorted(SYSFS_NODES.glob("node[0-9]*")):
        cpulist = path / "cpulist"
        if cpulist.exists() and parse_cpulist(cpulist.read_text()):
            nodes.append(int(path.name[4:]))
    return nodes


def node_cpus(node: int) -> set[int]:
    """The CPUs of NUMA node ``node`` (empty when sysfs has no such node)."""
    path = SYSFS_NODES / f"node{node}" / "cpulist"
    return parse_cpulist(path.read_text()) if path.exists() else set()


def gpu_numa_node(device: int) -> int | None:
    """The NUMA node of CUDA device ``device`` (an index as this process sees devices), from its PCI address in
    sysfs; None when torch does not report the address, sysfs has no node for it, or the host has one node."""
    import torch

    properties = torch.cuda.get_device_properties(device)
    bus = getattr(properties, "pci_bus_id", None)
    if bus is None:
        return None
    address = (f"{getattr(properties, 'pci_domain_id', 0):04x}:{bus:02x}:"
               f"{getattr(properties, 'pci_device_id', 0):02x}.0")
    path = SYSFS_PCI / address / "numa_node"
    if not path.exists():
        return None
    node = int(path.read_text().strip())
    return node if node >= 0 else None


def bind_to_node(node: int) -> set[int] | None:
    """Restricts this process (every thread started afterwards, and the calling one) to the CPUs of ``node`` that
    it may already use. Returns the CPUs bound to, or None (nothing changed) when none of them is allowed."""
    allowed = os.sched_getaffinity(0)
    cpus = node_cpus(node) & allowed
    if not cpus:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus


def bind_to_gpu_node(device: int) -> int | None:
    """Binds this process to the CPUs of CUDA device ``device``'s NUMA node, on hosts with more than one node.
    Call once per process, after choosing the device and before allocating pinned host memory. Returns the node
    bound to, or None when nothing was bound (one node, the node unknown, or none of its CPUs allowed)."""
    if not hasattr(os, "sched_setaffinity") or len(numa_nodes()) < 2:
        return None
    node = gpu_numa_node(device)
    if node is None:
        return None
    return node if bind_to_node(node) is not None else None
