"""A universal checkpoint's consolidated model weights as one safetensors file (``regrow ckpt export``), for
``model.load_state_dict`` and Hugging Face loaders.

What is written: every trainable parameter's fp32 master (the optimizer's copy, of which the working weights are a
cast), cast to ``dtype``, under the model's own parameter names (``named_parameters()``, so a tied weight appears
once, under its first name: ``model.embed_tokens.weight``, not ``lm_head.weight``). Buffers and frozen parameters
are not in a checkpoint and are not written: the model's constructor makes them. So
``model.load_state_dict(load_file(path), strict=False)`` reports only tied aliases (and any persistent buffers) as
missing, and ``safetensors.torch.load_model(model, path)`` accepts the file.

``out`` ending in ``.safetensors`` is that file; any other ``out`` is a directory holding ``model.safetensors``,
plus ``config.json`` when a Hugging Face model is named (``model``): then ``from_pretrained(out)`` loads it. The
model is built only from a factory the caller names: regrow never runs code that a checkpoint's recorded run config
names, since the checkpoint is data (docs/checkpoint-format.md, "Trust model"). Files are written atomically;
every byte read is checked against its checksum and only files inside the checkpoint are opened. The whole model
is held in memory twice (the masters and the serialized file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from regrow.checkpoint.universal.format import Manifest
from regrow.checkpoint.universal.storage import write_file_atomic
from regrow.checkpoint.universal.whole import read_masters
from regrow.trainer.model_factory import ModelFactory

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The dtypes the weights may be written in (``--dtype``)."""
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ExportError(ValueError):
    """The export cannot be done as asked (no safetensors, a model that does not match the checkpoint, ...)."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_safetensors` wrote."""

    weights: Path
    config: Path | None
    """``config.json`` when one was written."""
    step: int
    tensors: int
    numel: int
    nbytes: int
    note: str | None
    """Why no ``config.json`` was written to a directory, and how to get one (None: nothing to say)."""


def export_safetensors(ckpt: Path, out: Path, *, dtype: str = "float32",
                       model: ModelFactory | str | None = None) -> Exported:
    """Writes checkpoint ``ckpt``'s weights to ``out`` (see the module docstring). ``model``: the factory that
    rebuilds the trained model (a target string alone takes the keyword arguments the run recorded), whose Hugging
    Face config goes to ``out/config.json``; its trainable parameters must be the checkpoint's. Raises
    :class:`ExportError` (a ``ModelFactoryError`` for a factory that does not build), or the checkpoint's
    ``CheckpointError`` when it cannot be read."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype={dtype!r} is invalid: allowed values are {', '.join(EXPORT_DTYPES)}")
    save = _safetensors_save()
    manifest, masters = read_masters(ckpt)
    if isinstance(model, str):
        model = ModelFactory(target=model, kwargs=_recorded_kwargs(manifest, model))
    tensors = {name: master.to(EXPORT_DTYPES[dtype]).contiguous() for name, master in masters.items()}
    directory = out.suffix != ".safetensors"
    weights = out / WEIGHTS_NAME if directory else out
    weights.parent.mkdir(parents=True, exist_ok=True)
    config_text, note = None, None
    if model is not None:
        config_text = _hf_config(model, manifest, dtype)
        if not directory:
            note = f"no {CONFIG_NAME} written: give a directory as the output to get one next to the weights"
    elif directory:
        note = _config_note(manifest)
    write_file_atomic(weights, save(tensors, metadata={"format": "pt", "regrow_step": str(manifest.step)}))
    config = None
    if config_text is not None and directory:
        config = out / CONFIG_NAME
        write_file_atomic(config, config_text.encode("utf-8"))
    return Exported(weights=weights, config=config, step=manifest.step, tensors=len(tensors),
                    numel=sum(t.numel() for t in tensors.values()),
                    nbytes=sum(t.numel() * t.element_size() for t in tensors.values()), note=note)


def _safetensors_save():  # noqa: ANN202 (safetensors is an optional dependency, imported here)
    try:
        from safetensors.torch import save
    except ImportError as error:
        raise ExportError(f"exporting to safetensors needs the safetensors package ({error}): "
                          "pip install -e '.[hf]'") from error
    return save


def _hf_config(factory: ModelFactory, manifest: Manifest, dtype: str) -> str:
    """The JSON of the Hugging Face config of ``factory``'s model (built on the meta device), recording ``dtype``
    and the model class; :class:`ExportError` when the model's trainable parameters are not the checkpoint's or it
    has no Hugging Face config."""
    model = factory.build(seed=0, device="meta")
    built = {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    saved = {param.name: list(param.shape) for param in manifest.params}
    if built != saved:
        differ = _differences(built, saved)[:4]
        raise ExportError(f"--model={factory.target} with kwargs {json.dumps(factory.kwargs)} builds a model whose "
                          f"parameters differ from the checkpoint's ({'; '.join(differ)}): pass the --model-kwargs "
                          "the run used")
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_json_string", None)):
        raise ExportError(f"--model={factory.target} builds a {type(model).__name__}, which has no Hugging Face "
                          "config (.config.to_json_string()): export to a .safetensors file and load it with "
                          "load_state_dict, or leave --model out")
    fields = json.loads(config.to_json_string(use_diff=False))
    fields["architectures"] = [type(model).__name__]
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", 4.x "torch_dtype"
        if key in fields:
            fields[key] = dtype
    return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def _differences(built: dict[str, list[int]], saved: dict[str, list[int]]) -> list[str]:
    only_built = [f"{name} only in the model" for name in built if name not in saved]
    only_saved = [f"{name} only in the checkpoint" for name in saved if name not in built]
    shapes = [f"{name}: {built[name]} in the model, {saved[name]} in the checkpoint"
              for name in sorted(built) if name in saved and built[name] != saved[name]]
    return shapes + only_built + only_saved


def _recorded_kwargs(manifest: Manifest, target: str) -> dict:
    """The keyword arguments the run recorded for factory ``target`` ({} when it recorded another model)."""
    recorded = manifest.config.get("model")
    if isinstance(recorded, dict) and recorded.get("target") == target and isinstance(recorded.get("kwargs"), dict):
        return recorded["kwargs"]
    return {}


def _config_note(manifest: Manifest) -> str | None:
    """What to do for a ``config.json``, when the run's recorded model was a factory (None for regrow's GPT)."""
    recorded = manifest.config.get("model")
    if not (isinstance(recorded, dict) and isinstance(recorded.get("target"), str)):
        return None
    return (f"no {CONFIG_NAME} written: the run's model came from the factory {recorded['target'][:200]!r}; to "
            f"write its Hugging Face config, pass --model {recorded['target'][:200]} (regrow does not run code a "
            "checkpoint names), or save model.config yourself")
