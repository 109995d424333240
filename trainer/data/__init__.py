"""The training data: the embedded byte corpus (the zero-setup default), token files, or any map-style Dataset of
fixed-size samples, all served by one deterministic, resumable, data-parallel :class:`Sampler`.

Modules, one job each: ``config.py`` (:class:`DataConfig`, :class:`DataCursor`, :class:`DataError`), ``corpus.py``
(the embedded corpus), ``token_files.py`` (``.bin``/``.npy`` token files, their checks and the vocabulary scan),
``sidecar.py`` (the JSON description ``regrow data prepare`` writes next to a ``.bin``), ``dataset_source.py`` (a
Dataset's samples), ``windows.py`` (the split and numbering of windows over token arrays), ``sampler.py`` (the order).

Contract that the trainer and the tests rely on:

* The data is a numbered set of training **windows** of ``seq_len + 1`` tokens (input and shifted target share the
  window). Token arrays (each token file, or the corpus) are cut into non-overlapping windows starting every
  ``seq_len`` tokens, each array's last ``val_fraction`` held out for validation and its incomplete last window
  dropped; a window never spans two files, and the windows are numbered file by file, in ``DataConfig.files``
  order (``windows.py``). A Dataset's sample ``i`` is window ``i`` (its last ``val_fraction`` held out).
* Epoch ``e`` visits the windows in the order ``randperm(num_windows)`` drawn from a private generator seeded with
  ``seed * 1000003 + e``. No global RNG (Python, numpy or torch) is touched.
* Optimizer step ``s`` consumes the next ``global_batch`` windows of that order. Data-parallel rank ``r`` of ``dp_size``
  takes the contiguous slice ``[r * g / dp_size, (r + 1) * g / dp_size)`` of it, ``micro_batch`` at a time. So the
  union over ranks of one step's data does not depend on ``dp_size``: training at any world size is the same
  computation. ``Sampler.last_window_ids`` tells which windows a rank's last micro-batch held.
* When fewer than ``global_batch`` windows remain in an epoch, they are skipped and the next epoch starts.
* The cursor ``(epoch, index)`` (``DataCursor``), taken at a step boundary, is all a resume needs, at any
  ``dp_size``: the windows themselves are a function of the config and the files.
"""

from regrow.trainer.data.config import DataConfig, DataCursor, DataError
from regrow.trainer.data.corpus import load_corpus
from regrow.trainer.data.sampler import Sampler, open_windows

__all__ = ["DataConfig", "DataCursor", "DataError", "Sampler", "load_corpus", "open_windows"]
