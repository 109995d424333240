"""What the sampler reads and how it batches: :class:`DataConfig` (JSON-able with ``dataclasses.asdict``, picklable;
it is part of ``TrainerConfig.to_dict()``, stored in every checkpoint), the resumable position :class:`DataCursor`,
and :class:`DataError`, the one error type of bad data."""

from __future__ import annotations

from dataclasses import dataclass

from regrow.trainer.checks import require_ints

EPOCH_SEED_STRIDE = 1000003  # a prime, so (seed, epoch) pairs map to distinct generator seeds for epoch < stride
TOKEN_DTYPES = ("uint16", "uint32")
"""The token dtypes a token file may hold (a flat array of token ids, as nanoGPT and Megatron keep them)."""
TOKEN_SUFFIXES = (".bin", ".npy")
"""Token file kinds, told apart by suffix: raw ``.bin`` (``numpy.memmap``) and ``.npy`` (``numpy.load``)."""


class DataError(ValueError):
    """Data that cannot be trained on (a token file, a dataset sample, a split too small); the message names the
    file or field and the fix."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the tokens come from and how they are split and batched. Validated on construction; errors name the
    field."""

    seq_len: int = 128
    """Tokens per training sequence (each sample reads ``seq_len + 1`` tokens: input plus shifted target)."""

    micro_batch: int = 8
    """Sequences per data-parallel rank per micro-step (one forward/backward)."""

    global_batch: int = 32
    """Sequences per optimizer step over all data-parallel ranks; a multiple of ``micro_batch * dp_size``."""

    seed: int = 0
    """Seeds each epoch's permutation (together with the epoch number)."""

    val_fraction: float = 0.05
    """Fraction of each token file (or of the embedded corpus, or of a dataset's samples), taken from its end, held
    out for validation; in (0, 1)."""

    files: tuple[str, ...] = ()
    """Token files (``.bin`` or ``.npy``), read in this order; empty: the embedded ``pydoc_data`` corpus (bytes).
    Paths should be absolute when ranks run in other directories (Ray workers do)."""

    token_dtype: str | None = None
    """dtype of the ``.bin`` files, uint16 or uint32; None: the dtype their sidecar (``<file>.json``, written by
    ``regrow data prepare``) names, else uint16. Given and different from a sidecar's: an error. ``.npy`` files
    carry their own dtype in their header."""

    def __post_init__(self) -> None:
        require_ints(self, {"seq_len": 1, "micro_batch": 1, "global_batch": 1, "seed": 0})
        limit = 2**64 // EPOCH_SEED_STRIDE - 1
        if self.seed >= limit:
            raise ValueError(f"DataConfig.seed={self.seed} must be < {limit} (each epoch's generator is seeded with "
                             f"seed x {EPOCH_SEED_STRIDE} + epoch, a 64-bit number)")
        frac = self.val_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ValueError(f"DataConfig.val_fraction={frac!r} must be a float in (0, 1), e.g. 0.05")
        if isinstance(self.files, str) or not isinstance(self.files, (tuple, list)):
            raise ValueError(f"DataConfig.files={self.files!r} must be a tuple of paths, e.g. ('train.bin',)")
        self.files = tuple(self.files)  # a list (from JSON) is accepted; the config keeps one hashable form
        for i, path in enumerate(self.files):
            if not isinstance(path, str) or not path.endswith(TOKEN_SUFFIXES):
                raise ValueError(f"DataConfig.files[{i}]={path!r} must be a path ending in .bin or .npy (a flat "
                                 "array of token ids); turn text into one with `regrow data prepare`")
        if self.token_dtype is not None and self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"DataConfig.token_dtype={self.token_dtype!r} is invalid: allowed values are "
                             f"{', '.join(TOKEN_DTYPES)} (or None: the sidecar's, else uint16)")


@dataclass
class DataCursor:
    """Resumable position in the data stream, always at an optimizer-step boundary.

    ``index`` is the number of windows (or samples) of epoch ``epoch`` already consumed over all ranks.
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
