"""Calling a training object's sinks (``state.StateSink``) around its optimizer step, in the order the protocol
promises; both trainers' steps end the same way through these."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.utils.hooks import RemovableHandle

from regrow.trainer.state import ShardState, StateSink
from regrow.trainer.zero.optimizer import ZeroOptimizer


def after_forward(sinks: Sequence[StateSink]) -> None:
    """The optional ``after_forward()`` hook of every sink that has one (once per step, before the backward)."""
    for sink in sinks:
        hook = getattr(sink, "after_forward", None)
        if hook is not None:
            hook()


def before_optimizer_step(sinks: Sequence[StateSink]) -> None:
    """Every sink's ``before_optimizer_step()``, except a sink that defines ``before_update()``: that one is called
    right before the update instead."""
    for sink in sinks:
        if getattr(sink, "before_update", None) is None:
            sink.before_optimizer_step()


def before_update(sinks: Sequence[StateSink]) -> None:
    """The optional ``before_update()`` of every sink that has one."""
    for sink in sinks:
        hook = getattr(sink, "before_update", None)
        if hook is not None:
            hook()


def hook_sinks(optimizer: ZeroOptimizer, sinks: Callable[[], Sequence[StateSink]]) -> list[RemovableHandle]:
    """Calls :func:`before_optimizer_step` from ``optimizer``'s step pre-hook and :func:`before_update` from its
    update pre-hook (after its gradient norm, right before the first write to the shard); both trainers and the
    Guard hook their sinks so. A snapshot sink waits for its copy of the last state in the second: in the first,
    the norm's host read waited for the copy (the compute stream waited on it first), and every later host step
    with it: measured with a snapshot every step on one H100, the next snapshot was handed over late and its copy,
    which barely fits between two updates, started late. ``sinks()`` gives the current list (sinks may be added
    later). Returns the handles (``remove()`` unhooks)."""
    return [optimizer.register_step_pre_hook(lambda: before_optimizer_step(sinks())),
            optimizer.register_update_pre_hook(lambda: before_update(sinks()))]


def after_step(sinks: Sequence[StateSink], shard_state: Callable[[], ShardState]) -> None:
    """Every sink's ``after_step(state)`` with one state built for all of them (none built without sinks)."""
    if sinks:
        state = shard_state()
        for sink in sinks:
            sink.after_step(state)


def close(sinks: Sequence[StateSink]) -> None:
    """Every sink's ``close()``, once, when training ends."""
    for sink in sinks:
        sink.close()
