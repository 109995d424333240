"""Python objects named ``"pkg.module:name"`` (a model factory, a loss function), found the way ``python -m`` finds
modules: the current working directory first.

A console script such as ``regrow`` starts with its own folder on ``sys.path``, not the directory it was started
from, so ``regrow train --model mymodels:build`` would not find ``./mymodels.py``. :func:`resolve_target` puts the
working directory at the front of ``sys.path`` (once, and for good, as ``python -m`` does: a module imported now may
import its neighbours later) before it imports. The processes a launcher spawns start in the same directory, so
they find the same module.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class TargetError(ValueError):
    """A ``"pkg.module:name"`` that is malformed, does not import or names nothing; the message names the field."""


def check_target(target: object, field: str) -> str:
    """``target`` when it is a well-formed ``"pkg.module:name"`` (``name`` may be dotted: ``mod:Class.build``);
    :class:`TargetError` naming ``field`` otherwise. Imports nothing."""
    if not isinstance(target, str) or not _TARGET.fullmatch(target):
        raise TargetError(f"{field}={target!r} is not of the form 'pkg.module:name' (a module path that `import` "
                          "takes, a colon, then the name of a function in it), e.g. 'mymodels:build'")
    return target


def resolve_target(target: str, field: str) -> object:
    """The object ``target`` (``"pkg.module:name"``) names, importing its module with the working directory first on
    ``sys.path`` (see the module docstring). :class:`TargetError` naming ``field`` when the module does not import
    (with the ImportError's text) or has no such attribute."""
    module_name, _, attribute = check_target(target, field).partition(":")
    _working_directory_first()
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TargetError(f"{field}={target!r}: module {module_name!r} does not import ({error}); run from the "
                          f"directory that holds it (now {os.getcwd()}), or add its folder to PYTHONPATH") from error
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise TargetError(f"{field}={target!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has "
                              f"no attribute {attribute!r}; check the name after the colon")
        found = getattr(found, part)
    return found


def _working_directory_first() -> None:
    """Puts the working directory at the front of ``sys.path`` unless it is there already (``""`` is it too)."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)
