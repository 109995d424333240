"""The loss contracts of ``TrainerConfig.loss``: how the trainer gets one scalar loss from the model and a batch
``(x, y)`` (``y`` is ``x`` shifted by one token: position t of ``y`` is the token to predict after ``x[:, :t+1]``).

- ``"model"``: ``model(x, y)`` returns the mean loss (regrow's GPT).
- ``"logits"``: the mean cross entropy (in fp32) of ``model(x)`` against ``y``; the output is the logits tensor
  ``[batch, seq, vocab]`` or has them as ``.logits``.
- ``"hf"``: ``model(input_ids=x, labels=y, shift_labels=y).loss``, a Hugging Face causal LM's own loss. Such a model
  shifts ``labels`` itself (it would predict ``y[t+1]``); ``shift_labels`` hands it targets already aligned with the
  logits, which transformers honours from 4.50 on (``loss/loss_utils.py``'s ``ForCausalLMLoss``).
- ``"pkg.module:function"``: the user's ``function(model, x, y)``, returning the mean loss.
- ``"auto"``: ``"model"`` for regrow's GPT, ``"logits"`` for any other model.

Whatever the contract, a loss that is not a 0-dim tensor raises :class:`LossError` before any backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from regrow.trainer.targets import TargetError, check_target, resolve_target

AUTO = "auto"
CONTRACTS = ("model", "logits", "hf")
"""The built-in contracts (besides :data:`AUTO` and a ``"pkg.module:function"``)."""
FIELD = "TrainerConfig.loss"
_FIXES = {
    "model": "model(x, y) must return the mean loss as a 0-dim tensor; for a model that returns logits use "
             "loss 'logits' (--loss logits), for a Hugging Face causal LM 'hf', or name your own loss function "
             "('pkg.module:function')",
    "logits": "model(x) must return logits [batch, seq, vocab] (a tensor, or an output with .logits); otherwise "
              "choose another loss ('model', 'hf' or 'pkg.module:function')",
    "hf": "the model must be a Hugging Face causal LM (transformers >= 4.50) that returns .loss when given labels; "
          "otherwise use loss 'logits'",
}

LossFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class LossError(ValueError):
    """The model's output gave no scalar loss under ``TrainerConfig.loss``; names the contract and the fix."""


def check_loss_name(name: object) -> str:
    """``name`` when it is a contract (:data:`AUTO`, :data:`CONTRACTS`) or a ``"pkg.module:function"``; a
    ValueError naming :data:`FIELD` otherwise. Imports nothing."""
    if name == AUTO or name in CONTRACTS:
        return str(name)
    try:
        return check_target(name, FIELD)
    except TargetError:
        raise ValueError(f"{FIELD}={name!r} is invalid: allowed values are {AUTO!r}, "
                         f"{', '.join(map(repr, CONTRACTS))} or a function 'pkg.module:function' taking "
                         "(model, x, y) and returning the mean loss") from None


class Loss:
    """The loss of ``TrainerConfig.loss`` as a callable ``(model, x, y) -> 0-dim tensor`` (see the module
    docstring); ``is_gpt`` resolves ``"auto"``. A user function is imported here, once."""

    def __init__(self, name: str, *, is_gpt: bool) -> None:
        self.name = ("model" if is_gpt else "logits") if check_loss_name(name) == AUTO else name
        self._compute: LossFunction
        if self.name in CONTRACTS:
            self._compute = _BUILT_IN[self.name]
            return
        found = resolve_target(self.name, FIELD)
        if not callable(found):
            raise TargetError(f"{FIELD}={self.name!r} is a {type(found).__name__}, not a function (model, x, y)")
        self._compute = found

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._compute(model, x, y)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise LossError(f"{FIELD}={self.name!r} gave {_describe(loss)}, not a scalar (0-dim) tensor, so it "
                            f"cannot be back-propagated; {self._fix()}")
        return loss

    def _fix(self) -> str:
        return _FIXES.get(self.name, f"{self.name}(model, x, y) must return the mean loss as a 0-dim tensor "
                                     "(e.g. reduce it with .mean())")


def _model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)


def _logits_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    output = model(x)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise LossError(f"{FIELD}='logits': model(x) returned {_describe(output)}, which is neither a tensor nor has "
                        f".logits; {_FIXES['logits']}")
    if logits.ndim != y.ndim + 1 or logits.shape[:-1] != y.shape:
        raise LossError(f"{FIELD}='logits': model(x) gave logits of shape {tuple(logits.shape)} for targets of shape "
                        f"{tuple(y.shape)}; {_FIXES['logits']}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def _hf_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.contiguous()  # transformers flattens shift_labels with .view()
    output = model(input_ids=x, labels=y, shift_labels=y)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise LossError(f"{FIELD}='hf': model(input_ids=x, labels=y, shift_labels=y) returned {_describe(output)} "
                        f"with no .loss; {_FIXES['hf']}")
    return loss


_BUILT_IN: dict[str, LossFunction] = {"model": _model_loss, "logits": _logits_loss, "hf": _hf_loss}


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
