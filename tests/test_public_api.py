"""``import regrow`` gives the names a user needs, loads no torch until one is used (the node's snapshot process
imports the package and must start fast), and every exported name is the object its module defines."""

from __future__ import annotations

import importlib
import subprocess
import sys

import regrow

EXPECTED = {"ZeroOptimizer", "ZeroConfig", "Trainer", "TrainerConfig", "GPTConfig", "ModelFactory", "DataConfig",
            "DataCursor", "Sampler", "Guard", "GuardConfig", "Stateful", "World", "join_world", "init_world",
            "destroy_world"}


def test_the_top_level_exports_the_user_names_lazily() -> None:
    assert set(regrow.__all__) == EXPECTED
    check = "import sys, regrow; assert 'torch' not in sys.modules, 'torch imported'; print(regrow.__version__)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in EXPECTED:
        value = getattr(regrow, name)
        assert getattr(importlib.import_module(value.__module__), name) is value
    assert set(dir(regrow)) >= EXPECTED


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        regrow.NoSuchThing  # noqa: B018
    except AttributeError as error:
        assert "module 'regrow' has no attribute 'NoSuchThing'" in str(error)
    else:
        raise AssertionError("regrow.NoSuchThing did not raise")
