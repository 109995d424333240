"""A user's function as the Ray workers run it (``regrow ray --entry pkg.module:function``): what names it, how it is
found (the way ``python -m`` finds a module: the driver's working directory first on ``sys.path``), and the one
check the driver makes before any actor starts (:func:`check_entry`).

The function is named, never pickled: each worker imports it itself (``entry_worker.py``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class EntryError(ValueError):
    """An entry point that cannot be called as given; the message names it and the fix."""


@dataclass(frozen=True, kw_only=True)
class EntryCall:
    """What one call of the function is given besides its keyword arguments: its place in the job."""

    rank: int
    world_size: int
    generation: int
    """The process-group generation the call runs in (0, then one more after each failure healed)."""
    snapshot_address: str | None
    """The snapshot process of the worker's node (None: snapshots are off)."""
    run_dir: str
    """A directory of this call alone, on the worker's node: what the function writes there (the Guard's heartbeat
    and restore records) comes back to the driver with the call's result."""


@dataclass(frozen=True, kw_only=True)
class EntryPoint:
    """The function every worker calls, with the same keyword arguments, once per generation. Validated on
    construction (the target's form and the arguments; whether it imports is :func:`check_entry`'s)."""

    target: str
    """``pkg.module:function`` (``function`` may be a dotted attribute path, ``module:Class.method``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Its keyword arguments: a JSON object (sent to every worker as data)."""
    path: tuple[str, ...] = ()
    """Directories put first on each worker's ``sys.path`` before the import (:func:`for_driver` gives the
    driver's working directory, as ``python -m`` has it). On a cluster they must hold the same code on every node
    (or ship the code with Ray's ``runtime_env``)."""
    environment: Callable[[EntryCall], dict[str, str]] | None = None
    """The environment of one call besides ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, which the worker sets itself:
    the launcher's names for the snapshot address, the run directory and the attempt (``launch/ray_entry.py``); a
    module-level function, so that Ray sends it by reference (recovery never imports launch)."""

    def __post_init__(self) -> None:
        module, _, name = self.target.partition(":")
        if not module or not name or not all(part.isidentifier() for part in [*module.split("."), *name.split(".")]):
            raise EntryError(f"entry {self.target!r} must be MODULE:FUNCTION, e.g. examples.own_loop_ray:train")
        if not isinstance(self.kwargs, dict):
            raise EntryError(f"entry {self.target}: its keyword arguments must be a JSON object, e.g. "
                             f'{{"steps": 8}}, not {type(self.kwargs).__name__}')
        try:
            same = json.loads(json.dumps(self.kwargs)) == self.kwargs
        except (TypeError, ValueError):
            same = False
        if not same:
            raise EntryError(f"entry {self.target}: its keyword arguments {self.kwargs!r} must be JSON values "
                             "(numbers, strings, booleans, null, lists and objects with text keys)")

    @property
    def module(self) -> str:
        """The name of the module that holds the function."""
        return self.target.partition(":")[0]

    @classmethod
    def for_driver(cls, target: str, kwargs: dict[str, Any] | None = None, **options: Any) -> EntryPoint:
        """An entry point resolved like ``python -m`` from this process: its working directory first."""
        return cls(target=target, kwargs=dict(kwargs or {}), path=(os.getcwd(),), **options)

    def load(self) -> Callable[..., Any]:
        """Imports the module (with :attr:`path` first on ``sys.path``) and returns the function. Raises
        :class:`EntryError` naming what failed and the fix."""
        module_name, _, name = self.target.partition(":")
        for folder in reversed(self.path):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 (any failure of the user's module is reported, with its text)
            raise EntryError(f"entry {self.target}: module {module_name} does not import ({type(error).__name__}: "
                             f"{error}); run from the directory that holds it, or put it on PYTHONPATH") from error
        found: Any = module
        for attribute in name.split("."):
            if not hasattr(found, attribute):
                raise EntryError(f"entry {self.target}: {module_name} has no attribute {name!r} (it defines "
                                 f"{_public_names(module)})")
            found = getattr(found, attribute)
        if not callable(found):
            raise EntryError(f"entry {self.target} is not callable (an object of type {type(found).__name__}): "
                             "name the function that trains, module:function")
        return found


def check_entry(entry: EntryPoint) -> None:
    """The driver's check before any actor starts: the function imports, is callable, and takes
    ``entry.kwargs``. Raises :class:`EntryError`."""
    function = entry.load()
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: the call itself will tell
        return
    try:
        signature.bind(**entry.kwargs)
    except TypeError as error:
        bare = signature.replace(return_annotation=inspect.Signature.empty, parameters=[
            parameter.replace(annotation=inspect.Parameter.empty) for parameter in signature.parameters.values()])
        raise EntryError(f"entry {entry.target}: its keyword arguments {sorted(entry.kwargs)} do not fit "
                         f"{getattr(function, '__name__', entry.target)}{bare}: {_misfit(signature, entry.kwargs)}"
                         ) from error


def _misfit(signature: inspect.Signature, kwargs: dict[str, Any]) -> str:
    """Which of ``kwargs`` the function does not take and which arguments it needs that they lack."""
    parameters = signature.parameters
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unexpected = [] if open_ended else [name for name in kwargs if name not in parameters
                                        or parameters[name].kind not in keyword]
    missing = [name for name, p in parameters.items() if p.kind in keyword and p.default is p.empty
               and name not in kwargs]
    positional = [name for name, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_ONLY
                  and p.default is p.empty]
    parts = ([f"it takes no argument {', '.join(map(repr, unexpected))}"] if unexpected else []) + \
            ([f"it needs {', '.join(map(repr, missing))}"] if missing else []) + \
            ([f"it needs positional {', '.join(map(repr, positional))}, which keyword arguments cannot give"]
             if positional else [])
    return "; ".join(parts) or "see its signature"


def _public_names(module: Any) -> str:
    """The public functions and classes ``module`` defines itself (not those it imports), for an error message."""
    names = sorted(name for name, value in vars(module).items() if not name.startswith("_") and callable(value)
                   and getattr(value, "__module__", None) == module.__name__)
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "no public function"


__all__ = ["EntryCall", "EntryError", "EntryPoint", "check_entry"]
