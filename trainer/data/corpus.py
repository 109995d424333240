"""The embedded corpus: the UTF-8 bytes of Python's ``pydoc_data.topics``, the zero-setup default data (a byte-level
vocabulary of 256 ids; no file, no download)."""

from __future__ import annotations

import functools

import torch

from regrow.trainer.data.config import DataError
from regrow.trainer.data.windows import TokenArray

CORPUS_NAME = "the embedded corpus (pydoc_data.topics)"


@functools.cache
def _corpus_bytes() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_corpus() -> torch.Tensor:
    """Return the UTF-8 bytes of Python's ``pydoc_data.topics`` (sorted by key, joined by blank lines) as uint8.

    The bytes are read once per process; every call returns a fresh tensor, so callers may modify it freely.
    """
    return torch.frombuffer(bytearray(_corpus_bytes()), dtype=torch.uint8)


def corpus_array(corpus: torch.Tensor | None = None) -> TokenArray:
    """``corpus`` (a 1-D integer tensor; default :func:`load_corpus`) as the single array of the windows."""
    tokens = load_corpus() if corpus is None else corpus
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise DataError(f"corpus must be a 1-D integer tensor of token ids, got {tokens.dtype} of shape "
                         f"{tuple(tokens.shape)}")
    return TokenArray(CORPUS_NAME if corpus is None else "the given corpus", tokens.detach().cpu().numpy())
