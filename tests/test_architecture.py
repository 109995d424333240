"""The house rules of the package, checked on its source (docs/architecture.md states them):

- dependencies point one way, ``comm`` <- ``trainer`` <- ``checkpoint`` <- ``recovery`` <- ``launch``, and inside a
  tier its folders only import the ones below them (e.g. ``checkpoint/universal`` never imports
  ``checkpoint/node``; ``launch/local`` never imports ``launch/chaos``);
- no production file over 500 lines, no class over 300 lines;
- the recovery order's source names are spelled once (``recovery/order.py``);
- no docstring or comment cites a file that is not in the repository;
- the node's snapshot process starts without importing torch (it imports the writer only to persist).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from regrow.recovery.order import Source

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("comm", "trainer", "checkpoint", "recovery", "launch")
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300

FORBIDDEN_INSIDE_TIER: dict[str, tuple[str, ...]] = {
    # importer prefix: module prefixes it must not import (besides any higher tier)
    "trainer.zero": ("trainer.loop", "trainer.pipeline", "trainer.models", "trainer.data", "trainer.boundary"),
    "trainer.state": ("trainer.loop", "trainer.pipeline"),
    "trainer.log": ("trainer.",),
    "trainer.loop": ("trainer.pipeline",),
    "checkpoint.hostcopy": ("checkpoint.universal", "checkpoint.snapshot", "checkpoint.node"),
    "checkpoint.rng": ("checkpoint.universal", "checkpoint.snapshot", "checkpoint.node"),
    "checkpoint.frames": ("checkpoint.universal", "checkpoint.snapshot", "checkpoint.node"),
    "checkpoint.shared_tensors": ("checkpoint.universal", "checkpoint.snapshot", "checkpoint.node"),
    "checkpoint.host_register": ("checkpoint.universal", "checkpoint.snapshot", "checkpoint.node"),
    "checkpoint.universal": ("checkpoint.snapshot", "checkpoint.node"),
    "checkpoint.snapshot": ("checkpoint.universal", "checkpoint.node"),
    "recovery.order": ("recovery.restore", "recovery.from_", "recovery.stage_heal", "recovery.ray"),
    "recovery.": ("recovery.ray",),
    "launch.local": ("launch.chaos", "launch.cli", "launch.options", "launch.rank", "launch.torchrun", "launch.ray_"),
    "launch.chaos": ("launch.cli", "launch.options", "launch.rank", "launch.torchrun", "launch.ray_"),
}
"""Inside-tier rules by importer prefix; ``recovery.`` covers the tier's top level (``recovery.ray`` is exempt
from its own rule below)."""


def production_files() -> list[Path]:
    return sorted(p for tier in TIERS for p in (ROOT / tier).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``regrow.*`` module the file imports (lazy imports inside functions included), without ``regrow.``;
    ``from regrow.x import y`` counts as ``x.y`` too, since ``y`` may be a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name[len("regrow."):] for alias in node.names if alias.name.startswith("regrow.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("regrow."):
            base = node.module[len("regrow."):]
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_no_module_imports_a_higher_tier() -> None:
    problems = []
    for path in production_files():
        mine = module_name(path)
        level = TIERS.index(mine.split(".")[0])
        for target in imported_modules(path):
            if target.split(".")[0] in TIERS and TIERS.index(target.split(".")[0]) > level:
                problems.append(f"{mine} imports {target}")
    assert problems == []


def test_folders_inside_a_tier_import_only_the_ones_below_them() -> None:
    problems = []
    for path in production_files():
        mine = module_name(path)
        for importer, banned in FORBIDDEN_INSIDE_TIER.items():
            if not mine.startswith(importer) or (importer == "recovery." and mine.startswith("recovery.ray")):
                continue
            problems += [f"{mine} imports {target}" for target in imported_modules(path)
                         if target.startswith(banned) and not target.startswith(mine)]
    assert problems == []


def test_the_checkpoint_tier_never_reaches_into_a_trainer() -> None:
    offenders = [f"{module_name(p)} imports {t}" for p in production_files() if module_name(p).startswith("checkpoint")
                 for t in imported_modules(p) if t.startswith(("trainer.loop", "trainer.pipeline"))]
    assert offenders == []


def test_files_and_classes_stay_small() -> None:
    too_long = []
    for path in [*production_files(), ROOT / "__init__.py", ROOT / "__main__.py"]:
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{module_name(path)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []


@pytest.mark.parametrize("source", list(Source), ids=[s.name for s in Source])
def test_each_recovery_source_name_is_spelled_once(source: Source) -> None:
    spelled = [f"{module_name(p)}:{node.lineno}" for p in production_files()
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Constant) and node.value == source.value]
    assert spelled == [spelled[0]] and spelled[0].startswith("recovery.order:")


def test_no_file_cites_a_document_outside_the_repository() -> None:
    citing = [module_name(p) for p in production_files() if "DESIGN.md" in p.read_text()]
    assert citing == []


def test_the_snapshot_process_starts_without_torch() -> None:
    """What ``python -m regrow.checkpoint.node`` imports before it serves: torch costs it about 1 s and 200 MiB."""
    probe = ("import sys; import regrow.checkpoint.node.server, regrow.checkpoint.node.process, "
             "regrow.checkpoint.node.persister; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
