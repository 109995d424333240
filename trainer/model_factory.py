"""Any model in the trainer: :class:`ModelFactory` names a function that builds it, and :func:`build_model` builds
either kind of ``TrainerConfig.model`` (regrow's GPT from a :class:`~regrow.trainer.models.GPTConfig`, or a factory's
model) the same way, seeded.

A factory is a plain record (a target string and JSON keyword arguments): it pickles to the ranks a launcher spawns
and goes into every checkpoint's run config as JSON (``TrainerConfig.to_dict()``), and the code it names is imported
only when a model is built (:meth:`ModelFactory.resolve`), never when a checkpoint is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regrow.trainer.models import GPT, GPTConfig
from regrow.trainer.targets import TargetError, check_target, resolve_target


class ModelFactoryError(TargetError):
    """A model factory that cannot build a model: a bad target, a module that does not import, no such function,
    keyword arguments that are not a JSON object, or a result that is not an ``nn.Module``."""


@dataclass(kw_only=True)
class ModelFactory:
    """``target(**kwargs)`` builds the model, e.g. ``ModelFactory(target="examples.hf_llama:build",
    kwargs={"hidden_size": 64})``.

    Contract of the function: called with ``kwargs`` after ``torch.manual_seed(seed)`` (``TrainerConfig.seed``), it
    returns an ``nn.Module`` whose initial weights depend only on that generator (so every rank builds the same
    model), built on the current default device (the trainer builds on the CPU, then moves it; the launcher builds
    on ``meta`` to size the snapshots, so the function must not allocate or move tensors to an explicit device).
    ``target`` is resolved like ``python -m`` resolves modules, the working directory first
    (``trainer/targets.py``), so ``--model mymodels:build`` finds ``./mymodels.py`` from a console script too.
    """

    target: str
    """``"pkg.module:function"``: the function that builds the model."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Its keyword arguments: a JSON object (stored as is in every checkpoint's run config)."""

    def __post_init__(self) -> None:
        try:
            check_target(self.target, "ModelFactory.target")
        except TargetError as error:
            raise ModelFactoryError(str(error)) from None
        if not _is_json_object(self.kwargs):
            raise ModelFactoryError(f"ModelFactory.kwargs={_short(self.kwargs)} is not a JSON object: give a dict of "
                                    "str keys to JSON values (numbers, strings, booleans, None, lists, dicts), e.g. "
                                    '{"hidden_size": 64}')

    def resolve(self) -> Callable[..., Any]:
        """The function ``target`` names (its module imported); :class:`ModelFactoryError` when it does not import,
        is missing or is not callable."""
        try:
            found = resolve_target(self.target, "ModelFactory.target")
        except TargetError as error:
            raise ModelFactoryError(str(error)) from error.__cause__
        if not callable(found):
            raise ModelFactoryError(f"ModelFactory.target={self.target!r} is a {type(found).__name__}, not a "
                                    "function; name the function that builds the model")
        return found

    def build(self, *, seed: int, device: torch.device | str | None = None) -> nn.Module:
        """``target(**kwargs)`` after ``torch.manual_seed(seed)``, under ``device`` as the default device when
        given; :class:`ModelFactoryError` when the result is not an ``nn.Module``."""
        function = self.resolve()
        with torch.device(device) if device is not None else nullcontext():
            torch.manual_seed(seed)
            model = function(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise ModelFactoryError(f"ModelFactory.target={self.target!r} returned {type(model).__name__}, not a "
                                    "torch.nn.Module; make the function return the model itself")
        return model


def build_model(spec: GPTConfig | ModelFactory, *, seed: int, device: torch.device | str | None = None) -> nn.Module:
    """The model ``spec`` describes, built after ``torch.manual_seed(seed)``; on ``device`` as the default device
    when given (``"meta"``: shapes only, nothing allocated or drawn)."""
    if isinstance(spec, ModelFactory):
        return spec.build(seed=seed, device=device)
    with torch.device(device) if device is not None else nullcontext():
        torch.manual_seed(seed)
        return GPT(spec)


def model_for_restore(spec: GPTConfig | ModelFactory, *, seed: int, device: torch.device) -> nn.Module:
    """A model of ``spec`` on ``device`` whose weights are about to be restored: regrow's GPT skips its
    initializers (``GPT.uninitialized``); a factory's model is built seeded as usual (its constructor may compute
    buffers, which no restore brings back, with the very calls an initializer-skipping mode would turn off)."""
    if isinstance(spec, ModelFactory):
        return spec.build(seed=seed).to(device)
    return GPT.uninitialized(spec, device)


def input_vocab_size(model: nn.Module) -> int | None:
    """How many token ids ``model`` takes: the rows of its input embedding (regrow's GPT's ``wte``, a Hugging Face
    model's ``get_input_embeddings()``), or None when it has no such embedding (a token check is then left out)."""
    if isinstance(model, GPT):
        return model.config.vocab_size
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def _is_json_object(value: object) -> bool:
    """True for a dict with str keys whose values JSON writes and reads back unchanged (no tuples, no NaN)."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        return False
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["ModelFactory", "ModelFactoryError", "build_model", "input_vocab_size", "model_for_restore"]
