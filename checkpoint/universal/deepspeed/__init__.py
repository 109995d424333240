"""DeepSpeed checkpoint interop through a layout-free, in-memory :class:`FullState`.

- :func:`import_deepspeed` (``reader.py``) reads what DeepSpeed's ``engine.save_checkpoint()`` writes for ZeRO stage
  1 or 2 (``zero_reader.py``: the per-rank ``*zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`` partitions plus
  ``mp_rank_00_model_states.pt``) or 3 (``zero3_reader.py``: per-parameter partitions, per-rank model states), or a
  DeepSpeed *universal* checkpoint (``universal_reader.py``:
  ``zero/<param>/fp32.pt`` ...), and reassembles whole parameters.
- :func:`export_deepspeed_universal` (``universal_writer.py``) writes the universal layout, which a DeepSpeed engine
  of any data-parallel size and ZeRO stage 1 or 2 loads with ``"checkpoint": {"load_universal": true}``.
- :func:`full_state_from_torch` (``full_state.py``) turns a model plus a ``torch.optim.Adam``/``AdamW`` into a
  :class:`FullState`.

Security: every file is read by :func:`safe_load` (``unpickling.py``): ``torch.load(weights_only=True)`` with an
allow-list of stand-ins for the few DeepSpeed classes in these files, so reading never runs DeepSpeed code and
DeepSpeed need not be installed. Memory is bounded by the files' sizes (``bounds.py``): zip members are checked
against their compressed sizes before anything is inflated, and loaded tensors against their storages. Every error
is a :class:`DeepSpeedCheckpointError` (``errors.py``).

These are the package's public names; the modules hold the rest.
"""

from regrow.checkpoint.universal.deepspeed.errors import (
    DeepSpeedCheckpointError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
)
from regrow.checkpoint.universal.deepspeed.full_state import HYPER_KEYS, KINDS, FullState, full_state_from_torch
from regrow.checkpoint.universal.deepspeed.layout import DS_LAYOUT_VERSION
from regrow.checkpoint.universal.deepspeed.reader import import_deepspeed
from regrow.checkpoint.universal.deepspeed.universal_writer import export_deepspeed_universal
from regrow.checkpoint.universal.deepspeed.unpickling import ALLOWED_GLOBALS, safe_load

__all__ = [
    "ALLOWED_GLOBALS",
    "DS_LAYOUT_VERSION",
    "HYPER_KEYS",
    "KINDS",
    "DeepSpeedCheckpointError",
    "FullState",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "export_deepspeed_universal",
    "full_state_from_torch",
    "import_deepspeed",
    "safe_load",
]
