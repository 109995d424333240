"""The deterministic, resumable, data-parallel sampler over any window source (``__init__.py`` states the
contract), and :func:`open_windows`, which picks the source a config (and a dataset) names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from regrow.trainer.data.config import EPOCH_SEED_STRIDE, DataConfig, DataCursor, DataError
from regrow.trainer.data.corpus import corpus_array
from regrow.trainer.data.dataset_source import DatasetWindows
from regrow.trainer.data.token_files import check_vocabulary, open_token_files
from regrow.trainer.data.windows import ArrayWindows


class Windows(Protocol):
    """Numbered windows (or samples) of ``seq_len + 1`` tokens: ``ArrayWindows`` or ``DatasetWindows``."""

    num_train: int
    num_val: int

    def train(self, ids: torch.Tensor) -> torch.Tensor:
        """Training windows ``ids`` as int64 ``[len(ids), seq_len + 1]``."""
        ...

    def val(self, ids: torch.Tensor) -> torch.Tensor:
        """Validation windows ``ids`` as int64 ``[len(ids), seq_len + 1]``."""
        ...


def open_windows(config: DataConfig, *, corpus: torch.Tensor | None = None, dataset: Any = None,
                 vocab_size: int | None = None) -> Windows:
    """The windows the sampler draws from: ``dataset`` when given, else ``config.files``, else ``corpus`` (the
    embedded one by default). Checks everything that does not depend on the rank (DataError naming the file or field
    and the fix): the files, the ids against ``vocab_size``, a split too small for one global batch."""
    if (dataset is not None) + bool(config.files) + (corpus is not None) > 1:
        raise DataError("Sampler: give one source, dataset=, token files (DataConfig.files) or corpus=, not several")
    if dataset is not None:
        windows: Windows = DatasetWindows(dataset, config.seq_len, config.val_fraction, vocab_size)
        what = "training samples of the dataset"
    elif config.files:
        windows = open_token_files(config, vocab_size)
        what = f"training windows of seq_len={config.seq_len} in DataConfig.files ({len(config.files)} file(s))"
    else:
        array = corpus_array(corpus)
        if vocab_size is not None:
            check_vocabulary(array, vocab_size)
        windows = ArrayWindows([array], config.seq_len, config.val_fraction)
        what = f"training windows of seq_len={config.seq_len} in the corpus"
    if windows.num_train < config.global_batch:
        raise DataError(
            f"DataConfig.global_batch={config.global_batch} exceeds the {windows.num_train} {what}; lower "
            "global_batch or seq_len, or use more data"
        )
    return windows


def _split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of windows ``rows`` ``[n, seq_len + 1]``: the target is the input shifted by one."""
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class Sampler:
    """Yields this data-parallel rank's micro-batches; ``regrow.trainer.data`` states the exact order.

    Call :meth:`next_micro_batch` ``grad_accum`` times per optimizer step. :meth:`state` is valid only between steps.
    Every rank must be built with the same config and source (the same files, dataset and ``vocab_size``).
    """

    def __init__(self, config: DataConfig, dp_rank: int, dp_size: int, corpus: torch.Tensor | None = None, *,
                 dataset: Any = None, vocab_size: int | None = None) -> None:
        """``corpus``: token ids to use instead of the embedded corpus. ``dataset``: a map-style Dataset of
        ``seq_len + 1``-token samples instead of token arrays. ``vocab_size``: check that every id is below it
        (token files and the corpus at once, in chunks; a dataset's samples as they are fetched)."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size) with dp_size={dp_size} >= 1")
        per_step = config.micro_batch * dp_size
        if config.global_batch % per_step != 0:
            raise ValueError(
                f"DataConfig.global_batch={config.global_batch} is not divisible by micro_batch*dp_size="
                f"{config.micro_batch}*{dp_size}={per_step}; choose a multiple of {per_step}"
            )
        self.config = config
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.grad_accum: int = config.global_batch // per_step  # micro-batches per rank per optimizer step
        self._windows = open_windows(config, corpus=corpus, dataset=dataset, vocab_size=vocab_size)
        # Training windows per epoch, counted before the incomplete last global batch is dropped.
        self.num_windows: int = self._windows.num_train
        self._cursor = DataCursor(epoch=0, index=0)
        self._micro_step = 0  # micro-batches this rank has taken in the current optimizer step
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        self._last_ids = torch.empty(0, dtype=torch.int64)

    @property
    def last_window_ids(self) -> torch.Tensor:
        """The window (or sample) ids of the last micro-batch this rank took, 1-D int64 (empty before the first);
        a copy, so that the caller may keep or change it."""
        return self._last_ids.clone()

    def _permutation(self, epoch: int) -> torch.Tensor:
        """Window order of ``epoch``, drawn from a private generator (cached for the current epoch)."""
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.config.seed * EPOCH_SEED_STRIDE + epoch)
            self._perm = torch.randperm(self.num_windows, generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def _roll_over_if_exhausted(self) -> None:
        """Start the next epoch when the current one cannot fill another global batch (the remainder is dropped)."""
        if self._cursor.index + self.config.global_batch > self.num_windows:
            self._cursor = DataCursor(epoch=self._cursor.epoch + 1, index=0)

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's next ``(x, y)``, each int64 ``[micro_batch, seq_len]`` on CPU; ``y`` is ``x`` shifted."""
        cfg = self.config
        start = (
            self._cursor.index
            + self.dp_rank * (cfg.global_batch // self.dp_size)
            + self._micro_step * cfg.micro_batch
        )
        window_ids = self._permutation(self._cursor.epoch)[start : start + cfg.micro_batch]
        batch = _split_rows(self._windows.train(window_ids))
        self._last_ids = window_ids.to(torch.int64)
        self._micro_step += 1
        if self._micro_step == self.grad_accum:
            # Every rank reaches this point after the same number of calls, so all advance the cursor together.
            self._micro_step = 0
            self._cursor = DataCursor(epoch=self._cursor.epoch, index=self._cursor.index + cfg.global_batch)
            self._roll_over_if_exhausted()
        return batch

    def state(self) -> DataCursor:
        """The cursor to checkpoint. Raises RuntimeError mid-step (a partial step cannot be resumed exactly)."""
        if self._micro_step != 0:
            raise RuntimeError(
                f"Sampler.state() called mid-step after {self._micro_step} of {self.grad_accum} micro-batches; "
                "call it only at an optimizer-step boundary"
            )
        return DataCursor(epoch=self._cursor.epoch, index=self._cursor.index)

    def load_state(self, cursor: DataCursor) -> None:
        """Resume at ``cursor`` (from :meth:`state`, possibly of another ``dp_size``); discards any partial step."""
        if cursor.epoch < 0 or not 0 <= cursor.index <= self.num_windows:
            raise ValueError(
                f"DataCursor(epoch={cursor.epoch}, index={cursor.index}) is out of range: need epoch >= 0 and "
                f"0 <= index <= {self.num_windows} (training windows of this data and seq_len)"
            )
        self._cursor = DataCursor(epoch=cursor.epoch, index=cursor.index)
        self._micro_step = 0
        self._roll_over_if_exhausted()

    def validation_batches(self, n_batches: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``n_batches`` fixed ``(x, y)`` batches of ``batch_size`` from the held-out split, in window order.

        The same arguments always give the same batches, on every rank and at every step; windows wrap around
        when more are asked for than the split holds.
        """
        if n_batches < 1 or batch_size < 1:
            raise ValueError(f"n_batches={n_batches} and batch_size={batch_size} must both be >= 1")
        for b in range(n_batches):
            ids = torch.arange(b * batch_size, (b + 1) * batch_size) % self._windows.num_val
            yield _split_rows(self._windows.val(ids))
