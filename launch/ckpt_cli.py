"""``regrow ckpt inspect|verify|convert|export``: what a universal checkpoint holds, whether it verifies, conversion
from and to DeepSpeed, and the model's weights as safetensors (``checkpoint/universal/export.py``). (The checkpoint
flags of ``regrow train`` are ``options.CheckpointOptions``.)

Sub-commands of ``regrow ckpt`` are entries of :data:`COMMANDS` (name -> help, argument set-up, run function);
``convert`` bridges to DeepSpeed through ``checkpoint/universal/deepspeed.py``'s ``FullState`` and
``checkpoint/universal/whole.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from regrow.checkpoint.universal import storage, verify
from regrow.checkpoint.universal.format import LATEST_NAME, CheckpointError, UnsupportedFormatVersion


@dataclass(frozen=True)
class Command:
    """One ``regrow ckpt`` sub-command."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _newest(path: Path, command: str) -> Path:
    """The checkpoint a command shows for ``path``: ``path`` itself, or for a root the one ``latest`` names (the
    newest committed one, with a warning on stderr, when ``latest`` is not usable)."""
    if not verify.is_root(path):
        return path
    found = verify.find_candidates(path)
    for _, reason in found.passed_over:
        print(f"regrow ckpt {command}: latest is not usable ({reason}); showing the newest checkpoint, "
              f"{found.paths[0].name}", file=sys.stderr)
    return found.paths[0]


def inspect_checkpoint(args: argparse.Namespace) -> int:
    """Prints what a checkpoint holds (of ``latest`` when given a root); exit 1 when it cannot be read."""
    try:
        target = _newest(Path(args.dir), "inspect")
        manifest = verify.read_manifest(target)
    except CheckpointError as error:
        print(f"regrow ckpt inspect: {error}", file=sys.stderr)
        return 1
    optim = manifest.config.get("optim")
    stage = optim.get("stage") if isinstance(optim, dict) else None
    stage = stage if isinstance(stage, int) else "?"  # the config is free-form JSON: show only what it should be
    bits = {p.state_bits for p in manifest.params}
    print(f"checkpoint {target} (format version {manifest.format_version}, created {manifest.created or '?'})")
    print(f"step {manifest.step}, tokens seen {manifest.tokens_seen:,}, data cursor {manifest.data_cursor}")
    print(f"saved by {manifest.world_size} ranks, ZeRO stage {stage}, state bits "
          f"{'/'.join(map(str, sorted(bits)))} per parameter, code map {manifest.code_map_version}")
    if manifest.pipeline is not None:
        pipeline = manifest.pipeline
        print(f"saved by a pipeline of {pipeline.stages} stages x {pipeline.dp_size} replicas (it loads at any "
              f"layout): " + "; ".join(f"stage {s.stage}: {len(s.params)} parameters, Adam step {s.optimizer_steps}"
                                       f", lr scale {s.lr_scale:g}" for s in pipeline.stage_state))
    print(f"{len(manifest.params)} parameters, {len(manifest.tensors)} tensor files, {manifest.nbytes():,} bytes")
    print("| parameter | shape | state bits | bytes |")
    print("|---|---|---:|---:|")
    for param in manifest.params:
        nbytes = sum(t.nbytes for t in manifest.tensors if t.param == param.name)
        print(f"| {param.name} | {list(param.shape)} | {param.state_bits} | {nbytes:,} |")
    return 0


def verify_checkpoint(args: argparse.Namespace) -> int:
    """Verifies one checkpoint, or every checkpoint of a root and its ``latest``; exit 1 naming each bad file.
    Prints pass or fail per checkpoint and the reasons; never a value computed from the bytes."""
    path = Path(args.dir)
    bad = 0
    if verify.is_root(path):
        targets = [p for _, p in storage.committed(path)]
        pointer = storage.latest_pointer(path)
        if pointer.name and (path / pointer.name) not in targets:
            targets.append(path / pointer.name)
        if pointer.problem:
            print(f"BAD {path / LATEST_NAME}: {pointer.problem}")
            bad += 1
    else:
        targets = [path]
    if not targets and not bad:
        print(f"regrow ckpt verify: no checkpoint under {path}", file=sys.stderr)
        return 1
    for target in targets:
        try:
            report = verify.verify(target, checksums=not args.quick)
        except UnsupportedFormatVersion as error:
            print(f"BAD {target}: {error}")
            bad += 1
            continue
        if report.ok:
            assert report.manifest is not None
            print(f"OK  {target} (step {report.manifest.step}, {len(report.manifest.tensors)} tensor files, "
                  f"{report.manifest.nbytes():,} bytes)")
        else:
            bad += 1
            print(f"BAD {target}:\n  - " + "\n  - ".join(report.problems))
    return 1 if bad else 0


def convert_checkpoint(args: argparse.Namespace) -> int:
    """``regrow ckpt convert SRC DST --from F --to T``: DeepSpeed (ZeRO-1/2 or universal) <-> regrow universal."""
    from regrow.checkpoint.universal import deepspeed, whole

    if args.source_format == args.target_format:
        print(f"regrow ckpt convert: --from and --to are both {args.source_format}; nothing to convert "
              "(a regrow checkpoint reshards itself when it loads)", file=sys.stderr)
        return 2
    try:
        if args.source_format == "deepspeed":
            full = deepspeed.import_deepspeed(args.src, tag=args.tag)
            print(f"read {full.source} checkpoint {args.src}: step {full.step}, {len(full.params)} parameters")
            out = whole.write_whole(args.dst, whole.WholeState(step=full.step, params=full.params))
        else:
            target = _newest(Path(args.src), "convert")
            state = whole.read_whole(target)
            print(f"read regrow checkpoint {target}: step {state.step}, {len(state.params)} parameters")
            full = deepspeed.FullState(step=state.step, params=state.params, hyper=_adam_groups(state),
                                       source="regrow-universal")
            out = deepspeed.export_deepspeed_universal(full, args.dst, tag=args.tag)
    except (CheckpointError, deepspeed.DeepSpeedCheckpointError, OSError, ValueError) as error:
        print(f"regrow ckpt convert: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.target_format} checkpoint {out}")
    return 0


def _adam_groups(state: "whole.WholeState") -> dict:  # noqa: F821 (imported lazily above)
    """DeepSpeed's two usual AdamW groups (decay on matrices, none on vectors), with the run's hyper-parameters."""
    optim = state.config.get("optim")
    optim = optim if isinstance(optim, dict) else {}
    decay = [name for name, kinds in state.params.items() if kinds["master"].ndim >= 2]
    flat = [name for name, kinds in state.params.items() if kinds["master"].ndim < 2]
    common = {"lr": _hyper(optim, "lr", 3e-4), "betas": _hyper(optim, "betas", (0.9, 0.95)),
              "eps": _hyper(optim, "eps", 1e-8)}
    groups = [{"params": decay, **common, "weight_decay": _hyper(optim, "weight_decay", 0.1)},
              {"params": flat, **common, "weight_decay": 0.0}]
    return {"param_groups": [g for g in groups if g["params"]]}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hyper(optim: dict, key: str, default: float | tuple[float, float]) -> float | list[float]:
    """``optim[key]`` of the run config a checkpoint recorded (``default`` when absent), checked to be a finite
    number (or a pair of them, like ``default``): it goes into the exported optimizer state as is."""
    value = optim.get(key, default)
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(_finite, value)):
            return list(value)
    elif _finite(value):
        return value
    raise ValueError(f"the checkpoint's config.optim.{key}={str(value)[:60]} is not "
                     f"{'a pair of finite numbers' if isinstance(default, tuple) else 'a finite number'}")


def export_checkpoint(args: argparse.Namespace) -> int:
    """``regrow ckpt export CKPT OUT --to safetensors``: the consolidated weights (of ``latest`` for a root), and
    with ``--model`` the Hugging Face ``config.json``; a summary line at the end, exit 1 naming the problem."""
    from regrow.checkpoint.universal import export
    from regrow.trainer.model_factory import ModelFactory

    try:
        target = _newest(Path(args.ckpt), "export")
        model: ModelFactory | str | None = args.model
        if args.model_kwargs is not None:
            if args.model is None:
                raise ValueError("--model-kwargs needs --model PKG.MODULE:FUNCTION")
            model = ModelFactory(target=args.model, kwargs=_json_object(args.model_kwargs))
        done = export.export_safetensors(target, Path(args.out), dtype=args.dtype, model=model)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"regrow ckpt export: {error}", file=sys.stderr)
        return 1
    if done.note:
        print(f"regrow ckpt export: {done.note}", file=sys.stderr)
    config = f" and {done.config}" if done.config else ""
    print(f"exported step {done.step} of {target}: {done.tensors} tensors, {done.numel:,} parameters, "
          f"{done.nbytes:,} bytes of {args.dtype} to {done.weights}{config}")
    return 0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs is not JSON ({error}); give a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-kwargs={text[:80]!r} is not a JSON object")
    return value


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="a regrow checkpoint (step_* directory) or a root (its latest)")
    parser.add_argument("out", help="a .safetensors file, or a directory for model.safetensors (and config.json)")
    parser.add_argument("--to", dest="target_format", choices=("safetensors",), required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the written weights (the fp32 masters, cast; default float32)")
    parser.add_argument("--model", default=None, metavar="PKG.MODULE:FUNCTION",
                        help="the factory that built the model (with the kwargs the run recorded unless "
                             "--model-kwargs is given): checks it matches and writes its Hugging Face config.json")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON", help="the factory's keyword arguments")


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source: a DeepSpeed save directory, or a regrow checkpoint or root")
    parser.add_argument("dst", help="destination root (regrow) or directory (DeepSpeed universal)")
    parser.add_argument("--from", dest="source_format", choices=("deepspeed", "universal"), required=True)
    parser.add_argument("--to", dest="target_format", choices=("universal", "deepspeed"), required=True)
    parser.add_argument("--tag", default=None, help="DeepSpeed tag to read or write (default: latest / step)")


def _dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a checkpoint (step_* directory) or a checkpoint root")


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _dir_argument(parser)
    parser.add_argument("--quick", action="store_true", help="check files and sizes only, not checksums")


COMMANDS: dict[str, Command] = {
    "inspect": Command("show step, layout, parameters and sizes", _dir_argument, inspect_checkpoint),
    "verify": Command("check every file and checksum; exit 1 naming bad files", _verify_arguments, verify_checkpoint),
    "convert": Command("DeepSpeed (ZeRO-1/2, universal) <-> regrow universal", _convert_arguments, convert_checkpoint),
    "export": Command("the model's weights as safetensors (and a Hugging Face config.json)", _export_arguments,
                      export_checkpoint),
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``regrow ckpt <command>`` with one sub-parser per entry of :data:`COMMANDS`."""
    ckpt = commands.add_parser("ckpt", help="inspect, verify, convert and export checkpoints")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))


def main(args: argparse.Namespace) -> int:
    return COMMANDS[args.ckpt_command].run(args)
