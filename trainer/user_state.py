"""A user loop's own state (a learning-rate schedule, an EMA copy, counters) in the form a ``ShardState`` carries:
JSON values in ``extra["user"]`` and tensors under ``state.USER_PREFIX`` keys of ``tensors``. Never pickle.

:class:`UserState` is built from ``{name: item}`` where each item is one of

- a tensor (restored in place with ``copy_``),
- a dict (restored in place) of JSON values and tensors, e.g. counters ``{"tokens": 0, "skipped": 0}``,
- an object with ``state_dict()`` and ``load_state_dict(state)`` (``torch.distributed.checkpoint``'s ``Stateful``)
  whose state is nested dicts (string keys), lists, JSON scalars and tensors.

Contract: the tensors :meth:`UserState.capture` returns are live (not copied); whoever keeps them copies them before
the next optimizer step, so mutate registered tensors only after ``optimizer.step()``. A tensor keeps its shape and
dtype for the whole run (snapshot segments are laid out once). A value that JSON cannot represent exactly (a tuple, a
set, a non-string key, any other object) is refused at capture with an error that names where it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from regrow.trainer.state import USER_PREFIX

_TENSOR = "__tensor__"
"""The key of the JSON object that stands for a tensor: ``{"__tensor__": "<its key in ShardState.tensors>"}``."""
_SCALARS = (str, int, float, bool, type(None))


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)`` (a scheduler, a data loader, an EMA helper)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class UserStateError(ValueError):
    """A registered item that cannot be saved as JSON values and tensors, or a saved state that does not fit it."""


class UserState:
    """The registered items of a user loop, captured into and restored from a ``ShardState``'s user part."""

    def __init__(self, items: Mapping[str, object]) -> None:
        for name, item in items.items():
            if not isinstance(name, str) or not name or "/" in name or not name.isprintable():
                raise UserStateError(f"state name {name!r} must be a non-empty printable string without '/'")
            if not isinstance(item, (torch.Tensor, dict, Stateful)):
                raise UserStateError(f"state[{name!r}] is a {type(item).__name__}: register a tensor, a dict of JSON "
                                     "values and tensors, or an object with state_dict() and load_state_dict()")
        self.items = dict(items)

    def capture(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(tree, tensors)``: every item's state as JSON (tensors replaced by references) and the tensors keyed
        ``user/<name>/<path>``."""
        tensors: dict[str, torch.Tensor] = {}
        tree = {name: _encode(_state_of(item), f"{USER_PREFIX}{name}", tensors) for name, item in self.items.items()}
        return tree, tensors

    def load(self, tree: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Restores every item from a captured ``tree`` and its ``tensors`` (on any device: they are copied to
        the items' own). Raises :class:`UserStateError` naming the item when the saved state lacks it or does not
        fit it (another shape, say); items restored before the bad one stay restored."""
        missing = sorted(set(self.items) - set(tree))
        if missing:
            raise UserStateError(f"the restored state has no user state for {missing} (it has {sorted(tree)}): it "
                                 "was saved by a loop that registered other state")
        for name, item in self.items.items():
            value = _decode(tree[name], tensors, f"state[{name!r}]")
            if isinstance(item, torch.Tensor):
                _copy_into(item, value, f"state[{name!r}]")
            elif isinstance(item, dict):
                _load_dict(item, value, f"state[{name!r}]")
            else:
                item.load_state_dict(value)


def _state_of(item: object) -> object:
    return item.state_dict() if isinstance(item, Stateful) and not isinstance(item, (torch.Tensor, dict)) else item


def _encode(value: object, key: str, tensors: dict[str, torch.Tensor]) -> object:
    """``value`` as JSON, its tensors moved to ``tensors`` under ``key`` and the path below it."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach()
        return {_TENSOR: key}
    if isinstance(value, float) and not math.isfinite(value):
        return value  # JSON as Python writes it (NaN, Infinity) reads back exactly
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or "/" in k or k == _TENSOR]
        if bad:
            raise UserStateError(f"{key}: key {bad[0]!r} cannot be saved (keys must be strings without '/', not "
                                 f"{_TENSOR!r})")
        return {k: _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    raise UserStateError(f"{key} is a {type(value).__name__}: registered state holds JSON values (dict, list, str, "
                         "int, float, bool, None) and tensors only; convert it (a tuple to a list, say)")


def _decode(value: object, tensors: Mapping[str, torch.Tensor], where: str) -> object:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            key = value[_TENSOR]
            if key not in tensors:
                raise UserStateError(f"{where}: the restored state has no tensor {key!r}")
            return tensors[key]
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    return value


def _copy_into(target: torch.Tensor, source: object, where: str) -> None:
    if not isinstance(source, torch.Tensor) or source.shape != target.shape or source.dtype != target.dtype:
        got = f"{tuple(source.shape)} {source.dtype}" if isinstance(source, torch.Tensor) else type(source).__name__
        raise UserStateError(f"{where}: saved as {got}, registered as {tuple(target.shape)} {target.dtype}")
    with torch.no_grad():
        target.copy_(source)


def _load_dict(target: dict, saved: object, where: str) -> None:
    """Restores a registered dict in place: tensors copied into the registered ones, every other value replaced."""
    if not isinstance(saved, dict):
        raise UserStateError(f"{where}: saved as a {type(saved).__name__}, registered as a dict")
    for key, value in saved.items():
        if isinstance(target.get(key), torch.Tensor):
            _copy_into(target[key], value, f"{where}[{key!r}]")
        else:
            target[key] = value.clone() if isinstance(value, torch.Tensor) else value
    for key in [k for k in target if k not in saved]:
        del target[key]


__all__ = ["Stateful", "UserState", "UserStateError"]
