"""Where a sink's cost lands on the GPU's timeline: the same steps profiled without and with it.

``profile_steps(train_step, steps, device)`` runs ``steps`` steps under ``torch.profiler`` and returns, per step:
the wall time, the time some kernel of this process ran (the union of its kernels' intervals, every stream), the
rest (the GPU idle: the host was late, or the stream waited on an event), and each kernel name's total. Comparing
the two runs splits a sink's cost into slower kernels (memory or link traffic beside them) and idle time (host work
on the critical path, or the optimizer step waiting for a copy). On the CPU the "kernels" are the top-level
operators, enough for the smoke test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _device_events(profiler: torch.profiler.profile, device: torch.device) -> list:
    wanted = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [e for e in profiler.events() if e.device_type == wanted]
    if device.type != "cuda":
        events = [e for e in events if e.cpu_parent is None]
    return events


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


def profile_steps(train_step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """Profiles ``steps`` calls of ``train_step``; per-step milliseconds (see the module docstring)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        began = time.perf_counter()
        for _ in range(steps):
            train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - began) * 1e3
    events = _device_events(profiler, device)
    busy_ms = _union_us([(e.time_range.start, e.time_range.end) for e in events]) / 1e3
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    return {"wall_ms": wall_ms / steps, "busy_ms": busy_ms / steps, "idle_ms": max(0.0, wall_ms - busy_ms) / steps,
            "kernels_ms": {name: total / steps for name, total in by_name.items()}}


def compare(off: dict, on: dict, top: int = 8) -> dict:
    """The two profiles side by side: wall, busy and idle per step, and the ``top`` kernels whose time grew most."""
    names = set(off["kernels_ms"]) | set(on["kernels_ms"])
    growth = sorted(((on["kernels_ms"].get(n, 0.0) - off["kernels_ms"].get(n, 0.0), n) for n in names), reverse=True)
    return {
        **{f"{key}_{label}": round(profile[key], 3) for key in ("wall_ms", "busy_ms", "idle_ms")
           for label, profile in (("off", off), ("on", on))},
        "kernels_grown": [{"name": n[:90], "off_ms": round(off["kernels_ms"].get(n, 0.0), 3),
                           "on_ms": round(on["kernels_ms"].get(n, 0.0), 3)} for _, n in growth[:top]],
    }
