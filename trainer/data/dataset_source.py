"""Any map-style ``torch.utils.data.Dataset`` of fixed-size samples as the sampler's windows.

Sample ``i`` (``dataset[i]``) must be a 1-D integer tensor or array (or a list of ints) of exactly ``seq_len + 1``
token ids; it plays the role of window ``i`` (x = sample[:-1], y = sample[1:]). The last ``int(len(dataset) *
val_fraction)`` samples are the validation split, the others the training samples, numbered as in the dataset. A
sample is fetched only when a batch takes it, and checked then: a wrong shape or dtype, a negative id, or an id at
or above the vocabulary raises a :class:`~regrow.trainer.data.config.DataError` naming the sample's index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from regrow.trainer.data.config import DataError


class DatasetWindows:
    """The windows of a map-style dataset (see the module docstring); the same interface as ``ArrayWindows``."""

    def __init__(self, dataset: Any, seq_len: int, val_fraction: float, vocab_size: int | None = None) -> None:
        try:
            size = len(dataset)
        except TypeError as error:
            raise DataError(f"dataset {type(dataset).__name__} has no len(): the sampler needs a map-style Dataset "
                            "(__len__ and __getitem__ by index); wrap an iterable one in a list first") from error
        self.dataset = dataset
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        held = int(size * val_fraction)
        if held < 1:
            raise DataError(f"DataConfig.val_fraction={val_fraction} of the dataset's {size} samples holds out none "
                            f"for validation; raise val_fraction to at least {1 / size if size else 1:.3g} or add "
                            "samples")
        self.num_train = size - held
        """Training samples (the first ones of the dataset)."""
        self.num_val = held
        """Validation samples (the last ones)."""

    def train(self, ids: torch.Tensor) -> torch.Tensor:
        """Training samples ``ids``, as int64 ``[len(ids), seq_len + 1]``."""
        return torch.stack([self._sample(int(i)) for i in ids.tolist()])

    def val(self, ids: torch.Tensor) -> torch.Tensor:
        """Validation samples ``ids`` (0 is the first held-out sample), as int64."""
        return torch.stack([self._sample(self.num_train + int(i)) for i in ids.tolist()])

    def _sample(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        if isinstance(item, np.ndarray) and item.dtype.kind in "ui":
            item = item.astype(np.int64)  # torch has no kernels for every unsigned width; int64 holds them all
        try:
            tokens = torch.as_tensor(item)
        except (TypeError, ValueError, RuntimeError) as error:
            raise self._shape_error(index, f"a {type(item).__name__}") from error
        if tokens.dim() != 1 or tokens.shape[0] != self.seq_len + 1:
            raise self._shape_error(index, f"shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise self._shape_error(index, f"dtype {tokens.dtype}")
        tokens = tokens.to(torch.int64)
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
            bad = low if low < 0 else high
            limit = f"the model's vocabulary has {self.vocab_size} ids (0..{self.vocab_size - 1})" \
                if self.vocab_size is not None else "token ids are >= 0"
            raise DataError(f"dataset sample {index} holds token id {bad}, but {limit}; fix the dataset's "
                            "tokenization or use a model whose vocab_size covers it")
        return tokens

    def _shape_error(self, index: int, found: str) -> DataError:
        return DataError(f"dataset sample {index} is {found}; every sample must be a 1-D integer tensor of exactly "
                         f"seq_len+1={self.seq_len + 1} token ids, shape ({self.seq_len + 1},) "
                         f"(DataConfig.seq_len={self.seq_len}): x = sample[:-1], y = sample[1:]")
