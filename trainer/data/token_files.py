"""Token files as nanoGPT and Megatron users keep them: flat ``uint16``/``uint32`` arrays of token ids.

* ``.bin``: raw little-endian ids, opened with ``numpy.memmap``. The dtype is the sidecar's (``<file>.json``,
  ``sidecar.py``) when there is one, else ``DataConfig.token_dtype``, else uint16; a ``token_dtype`` given and
  different from the sidecar's is an error, and so is a sidecar whose token count is not the file's.
* ``.npy``: ``numpy.load(mmap_mode="r", allow_pickle=False)``; the dtype is the header's (uint16 or uint32, one
  dimension).

Files are memory-mapped, never read whole: opening reads the header (and, with a vocabulary, scans the ids in
chunks); a batch reads only its windows. Every problem is a :class:`~regrow.trainer.data.config.DataError` that
names the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from regrow.trainer.data.config import TOKEN_DTYPES, DataConfig, DataError
from regrow.trainer.data.sidecar import Sidecar, read_sidecar, sidecar_path
from regrow.trainer.data.windows import ArrayWindows, TokenArray

SCAN_CHUNK_TOKENS = 1 << 24
"""Tokens per chunk of the vocabulary scan (32 MiB of uint16): memory stays bounded whatever the file's size."""
DEFAULT_DTYPE = TOKEN_DTYPES[0]


def open_token_files(config: DataConfig, vocab_size: int | None = None) -> ArrayWindows:
    """The windows of ``config.files`` (``windows.py`` numbers them), each file checked as it is opened; with
    ``vocab_size``, every id is checked to be below it (one scan per file)."""
    arrays = [TokenArray(f"token file {path}", open_token_file(path, config.token_dtype, config.seq_len))
              for path in config.files]
    if vocab_size is not None:
        for array in arrays:
            check_vocabulary(array, vocab_size)
    return ArrayWindows(arrays, config.seq_len, config.val_fraction)


def open_token_file(path: str, token_dtype: str | None, seq_len: int) -> np.ndarray:
    """The file's ids as a read-only 1-D memory map; DataError naming the file when it cannot be trained on."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"token file {path} does not exist; check the path (DataConfig.files, --data), or make it "
                        f"with `regrow data prepare TEXTFILE... --out {path}`")
    if not file.is_file():
        raise DataError(f"token file {path} is not a regular file; name the token file itself (DataConfig.files, "
                        "--data)")
    tokens = _open_npy(file) if file.suffix == ".npy" else _open_bin(file, token_dtype)
    if tokens.shape[0] < seq_len + 1:
        raise DataError(f"token file {path} holds {tokens.shape[0]} tokens, fewer than one window of "
                        f"seq_len+1={seq_len + 1}; lower DataConfig.seq_len (--seq-len) or leave the file out")
    return tokens


def _open_bin(file: Path, token_dtype: str | None) -> np.ndarray:
    sidecar = read_sidecar(file)
    dtype = _bin_dtype(file, token_dtype, sidecar)
    itemsize = np.dtype(dtype).itemsize
    size = file.stat().st_size
    if size == 0:
        raise DataError(f"token file {file} is empty (0 bytes); re-create it with `regrow data prepare` or leave it "
                        "out of DataConfig.files (--data)")
    if size % itemsize:
        raise DataError(f"token file {file} is {size} bytes, not a multiple of {itemsize} (the size of one {dtype} "
                        f"id): it is truncated or holds another dtype; pass the dtype it was written with "
                        f"(DataConfig.token_dtype, --data-dtype) or re-create it with `regrow data prepare`")
    if sidecar is not None and sidecar.tokens != size // itemsize:
        raise DataError(f"token file {file} holds {size // itemsize} {dtype} ids but its sidecar "
                        f"{sidecar_path(file)} says {sidecar.tokens}: one of them is stale; re-create both with "
                        "`regrow data prepare`, or delete the sidecar")
    return np.memmap(file, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def _bin_dtype(file: Path, token_dtype: str | None, sidecar: Sidecar | None) -> str:
    """The dtype of a ``.bin``: its sidecar's, else ``token_dtype``, else uint16; they must agree when both say."""
    if sidecar is None:
        return token_dtype or DEFAULT_DTYPE
    if token_dtype is not None and token_dtype != sidecar.dtype:
        raise DataError(f"token file {file}: DataConfig.token_dtype={token_dtype!r} (--data-dtype) but its sidecar "
                        f"{sidecar_path(file)} says {sidecar.dtype!r}; drop --data-dtype (the sidecar's dtype is "
                        "used) or re-create the file")
    return sidecar.dtype


def _open_npy(file: Path) -> np.ndarray:
    try:
        tokens = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"token file {file} is not a readable .npy array ({error}); save the ids with "
                        "numpy.save(path, ids) (no pickled objects)") from error
    if not isinstance(tokens, np.ndarray):
        raise DataError(f"token file {file} holds {type(tokens).__name__}, not one array; save the ids with "
                        "numpy.save(path, ids)")
    if tokens.ndim != 1:
        raise DataError(f"token file {file} has shape {tuple(tokens.shape)}; a token file is one flat array of "
                        "ids: save ids.reshape(-1)")
    if tokens.dtype not in tuple(np.dtype(d) for d in TOKEN_DTYPES):
        raise DataError(f"token file {file} holds {tokens.dtype.str} ({tokens.dtype.name}) ids; token files hold "
                        f"{' or '.join(TOKEN_DTYPES)} (native byte order): save ids.astype(numpy.uint32)")
    if tokens.shape[0] == 0:
        raise DataError(f"token file {file} is empty (0 tokens); leave it out of DataConfig.files (--data)")
    return tokens


def check_vocabulary(array: TokenArray, vocab_size: int) -> None:
    """DataError naming the file, the first position and the id when an id of ``array`` is ``>= vocab_size``.
    Scans in chunks of :data:`SCAN_CHUNK_TOKENS` (never a copy of the whole file); stops at the first bad chunk."""
    tokens = array.tokens
    for start in range(0, tokens.shape[0], SCAN_CHUNK_TOKENS):
        chunk = tokens[start : start + SCAN_CHUNK_TOKENS]
        if int(chunk.max()) < vocab_size:
            continue
        offset = int(np.argmax(chunk >= vocab_size))
        raise DataError(f"{array.name} holds token id {int(chunk[offset])} at position {start + offset}, "
                        f"but the model's vocabulary has {vocab_size} ids (0..{vocab_size - 1}); tokenize the text "
                        "with the model's tokenizer (`regrow data prepare --tokenizer DIR`) or use a model whose "
                        "vocab_size covers the file's ids")
