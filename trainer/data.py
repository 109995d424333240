"""Embedded byte-level corpus and a deterministic, resumable, data-parallel sampler.

Contract that the trainer and the tests rely on:

* The training split is cut into non-overlapping windows of ``seq_len + 1`` bytes starting every ``seq_len`` bytes
  (input and shifted target share the window); the last partial window is dropped.
* Epoch ``e`` visits the windows in the order ``randperm(num_windows)`` drawn from a private generator seeded with
  ``seed * 1000003 + e``. No global RNG (Python, numpy or torch) is touched.
* Optimizer step ``s`` consumes the next ``global_batch`` windows of that order. Data-parallel rank ``r`` of ``dp_size``
  takes the contiguous slice ``[r * g / dp_size, (r + 1) * g / dp_size)`` of it, ``micro_batch`` at a time. So the
  union over ranks of one step's data does not depend on ``dp_size``: training at any world size is the same
  computation.
* When fewer than ``global_batch`` windows remain in an epoch, they are skipped and the next epoch starts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from regrow.trainer.checks import require_ints

_EPOCH_SEED_STRIDE = 1000003  # a prime, so (seed, epoch) pairs map to distinct generator seeds for epoch < stride


@functools.cache
def _corpus_bytes() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_corpus() -> torch.Tensor:
    """Return the UTF-8 bytes of Python's ``pydoc_data.topics`` (sorted by key, joined by blank lines) as uint8.

    The bytes are read once per process; every call returns a fresh tensor, so callers may modify it freely.
    """
    return torch.frombuffer(bytearray(_corpus_bytes()), dtype=torch.uint8)


@dataclass(kw_only=True)
class DataConfig:
    """How the corpus is split and batched. Validated on construction; errors name the field."""

    seq_len: int = 128
    """Tokens per training sequence (each sample reads ``seq_len + 1`` bytes: input plus shifted target)."""

    micro_batch: int = 8
    """Sequences per data-parallel rank per micro-step (one forward/backward)."""

    global_batch: int = 32
    """Sequences per optimizer step over all data-parallel ranks; a multiple of ``micro_batch * dp_size``."""

    seed: int = 0
    """Seeds each epoch's permutation (together with the epoch number)."""

    val_fraction: float = 0.05
    """Fraction of the corpus, taken from its end, held out for validation; in (0, 1)."""

    def __post_init__(self) -> None:
        require_ints(self, {"seq_len": 1, "micro_batch": 1, "global_batch": 1, "seed": 0})
        limit = 2**64 // _EPOCH_SEED_STRIDE - 1
        if self.seed >= limit:
            raise ValueError(f"DataConfig.seed={self.seed} must be < {limit} (each epoch's generator is seeded with "
                             f"seed x {_EPOCH_SEED_STRIDE} + epoch, a 64-bit number)")
        frac = self.val_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ValueError(f"DataConfig.val_fraction={frac!r} must be a float in (0, 1), e.g. 0.05")


@dataclass
class DataCursor:
    """Resumable position in the data stream, always at an optimizer-step boundary.

    ``index`` is the number of windows of epoch ``epoch`` already consumed over all ranks.
    """

    epoch: int
    index: int

    def to_dict(self) -> dict[str, int]:
        """Plain JSON-able form, for checkpoint metadata."""
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> DataCursor:
        """Inverse of :meth:`to_dict`; rejects missing, extra, non-integer or negative fields."""
        if set(data) != {"epoch", "index"}:
            raise ValueError(f"DataCursor dict must have exactly the keys ['epoch', 'index'], got {sorted(data)}")
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DataCursor.{name}={value!r} must be an integer >= 0")
        return cls(epoch=data["epoch"], index=data["index"])


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows ``tokens[s : s + seq_len + 1]`` for each start ``s``; return (inputs, targets) as int64."""
    rows = tokens[starts.unsqueeze(1) + torch.arange(seq_len + 1)].long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class Sampler:
    """Yields this data-parallel rank's micro-batches; see the module docstring for the exact order.

    Call :meth:`next_micro_batch` ``grad_accum`` times per optimizer step. :meth:`state` is valid only between steps.
    """

    def __init__(self, config: DataConfig, dp_rank: int, dp_size: int, corpus: torch.Tensor | None = None) -> None:
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

        tokens = load_corpus() if corpus is None else corpus
        self._train, self._val = self._split(tokens, config)
        # Training windows per epoch, counted before the incomplete last global batch is dropped.
        self.num_windows: int = (self._train.numel() - 1) // config.seq_len
        if self.num_windows < config.global_batch:
            raise ValueError(
                f"DataConfig.global_batch={config.global_batch} exceeds the {self.num_windows} training windows of "
                f"seq_len={config.seq_len}; lower global_batch or seq_len, or use a larger corpus"
            )
        self._cursor = DataCursor(epoch=0, index=0)
        self._micro_step = 0  # micro-batches this rank has taken in the current optimizer step
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @staticmethod
    def _split(tokens: torch.Tensor, config: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut ``tokens`` into (train, validation); the validation part is the last ``val_fraction`` of the bytes."""
        n_val = int(tokens.numel() * config.val_fraction)
        if n_val < config.seq_len + 1:
            raise ValueError(
                f"DataConfig.val_fraction={config.val_fraction} leaves {n_val} validation bytes, fewer than one "
                f"window of seq_len+1={config.seq_len + 1}; raise val_fraction or lower seq_len"
            )
        cut = tokens.numel() - n_val
        return tokens[:cut], tokens[cut:]

    def _permutation(self, epoch: int) -> torch.Tensor:
        """Window order of ``epoch``, drawn from a private generator (cached for the current epoch)."""
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.config.seed * _EPOCH_SEED_STRIDE + epoch)
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
        batch = _windows(self._train, window_ids * cfg.seq_len, cfg.seq_len)
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
                f"0 <= index <= {self.num_windows} (training windows of this corpus and seq_len)"
            )
        self._cursor = DataCursor(epoch=cursor.epoch, index=cursor.index)
        self._micro_step = 0
        self._roll_over_if_exhausted()

    def validation_batches(self, n_batches: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``n_batches`` fixed ``(x, y)`` batches of ``batch_size`` from the held-out split, in corpus order.

        The same arguments always give the same batches, on every rank and at every step; windows wrap around
        when more are asked for than the split holds.
        """
        if n_batches < 1 or batch_size < 1:
            raise ValueError(f"n_batches={n_batches} and batch_size={batch_size} must both be >= 1")
        seq_len = self.config.seq_len
        n_val_windows = (self._val.numel() - 1) // seq_len
        for b in range(n_batches):
            ids = torch.arange(b * batch_size, (b + 1) * batch_size) % n_val_windows
            yield _windows(self._val, ids * seq_len, seq_len)
