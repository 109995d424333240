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
    """Every sink's ``before_optimizer_step()``: the update that follows is the only thing that mutates the shard."""
    for sink in sinks:
        sink.before_optimizer_step()


def wait_before_updates(optimizer: ZeroOptimizer, sinks: Callable[[], Sequence[StateSink]]) -> RemovableHandle:
    """Calls every sink's ``before_optimizer_step()`` from ``optimizer``'s update pre-hook: after its gradient norm,
    right before the first write to the shard. Earlier, the norm's host read would wait for the sinks' copies of the
    last state (on a GPU their waits hold the compute stream), and every later host step with it: measured with a
    snapshot every step on one H100, the next snapshot was then handed over late and its copy, which barely fits
    between two updates, started late. ``sinks()`` gives the current list (sinks may be added later)."""
    return optimizer.register_update_pre_hook(lambda: before_optimizer_step(sinks()))


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
