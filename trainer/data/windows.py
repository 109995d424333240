"""How token arrays become numbered windows: the split into training and validation, the numbering over several
arrays, and the gather of a batch's windows (never a whole array).

The contract, for arrays (token files, or the embedded corpus as one array) ``a_0 .. a_{F-1}`` of ``n_f`` tokens:

* **Split, per array.** Array ``f`` holds out its last ``int(n_f * val_fraction)`` tokens for validation; the rest,
  ``cut_f = n_f - int(n_f * val_fraction)`` tokens, is its training part.
* **Windows never span two arrays.** Training window ``j`` of array ``f`` is ``a_f[j * seq_len : j * seq_len +
  seq_len + 1]`` (input plus the shifted target), for ``j < (cut_f - 1) // seq_len``; the incomplete last window
  of each part is dropped. Validation windows start at ``cut_f`` likewise.
* **Numbering, in array order.** The training windows of ``a_0`` are numbered first (``0 ..``), then those of
  ``a_1``, and so on: global id ``i`` is window ``i - offset_f`` of the array ``f`` with ``offset_f <= i <
  offset_{f+1}``, where ``offset_f`` counts the training windows of the arrays before ``f``. Validation windows are
  numbered the same way, separately.

With a single array this is exactly the embedded corpus's historical split and numbering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from regrow.trainer.data.config import DataError


@dataclass(frozen=True)
class TokenArray:
    """One flat array of token ids (a ``numpy.memmap`` of a file, or an array in memory) and the name errors use."""

    name: str
    tokens: np.ndarray


class ArrayWindows:
    """Training and validation windows of ``seq_len + 1`` tokens over ``arrays`` (see the module docstring).

    Holds the arrays as given (memory maps stay memory maps): only the windows a batch asks for are read.
    """

    def __init__(self, arrays: Sequence[TokenArray], seq_len: int, val_fraction: float) -> None:
        self.arrays = list(arrays)
        self.seq_len = seq_len
        sizes = np.array([a.tokens.shape[0] for a in self.arrays], dtype=np.int64)
        self._cuts = sizes - (sizes * val_fraction).astype(np.int64)
        train = np.maximum(0, (self._cuts - 1) // seq_len)
        val = np.maximum(0, (sizes - self._cuts - 1) // seq_len)
        self._train_offsets = np.concatenate([[0], np.cumsum(train)])
        self._val_offsets = np.concatenate([[0], np.cumsum(val)])
        self.num_train = int(self._train_offsets[-1])
        """Training windows, over all arrays."""
        self.num_val = int(self._val_offsets[-1])
        """Validation windows, over all arrays."""
        if self.num_val == 0:
            largest = int(np.argmax(sizes - self._cuts))
            held = int(sizes[largest] - self._cuts[largest])
            raise DataError(
                f"DataConfig.val_fraction={val_fraction} leaves {held} validation tokens at the end of "
                f"{self.arrays[largest].name}{' (the most of any file)' if len(self.arrays) > 1 else ''}, fewer "
                f"than one window of seq_len+1={seq_len + 1}; raise val_fraction or lower seq_len"
            )

    def train(self, ids: torch.Tensor) -> torch.Tensor:
        """Training windows ``ids`` (global ids), as int64 ``[len(ids), seq_len + 1]``."""
        return self._gather(ids, self._train_offsets, np.zeros(len(self.arrays), dtype=np.int64))

    def val(self, ids: torch.Tensor) -> torch.Tensor:
        """Validation windows ``ids`` (global ids, numbered like the training ones), as int64."""
        return self._gather(ids, self._val_offsets, self._cuts)

    def _gather(self, ids: torch.Tensor, offsets: np.ndarray, bases: np.ndarray) -> torch.Tensor:
        wanted = ids.numpy().astype(np.int64)
        owners = np.searchsorted(offsets, wanted, side="right") - 1
        width = self.seq_len + 1
        rows = np.empty((len(wanted), width), dtype=np.int64)
        for row, (owner, window) in enumerate(zip(owners.tolist(), wanted.tolist())):
            start = int(bases[owner]) + (window - int(offsets[owner])) * self.seq_len
            rows[row] = self.arrays[owner].tokens[start : start + width]  # reads one window, converting to int64
        return torch.from_numpy(rows)
