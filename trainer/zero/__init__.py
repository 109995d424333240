"""The sharded optimizer: ZeRO stages 1 and 2 with 8-bit or fp32 AdamW state.

Modules: ``config.py`` (:class:`ZeroConfig`, which parameters get 8-bit state), ``optimizer.py``
(:class:`ZeroOptimizer`), ``layout.py`` (where each parameter lives in the flat, block-aligned buffers),
``shard.py`` (one rank's shard: the ``"<group>/<what>"`` key schema and each group's buffers), ``reducer.py``
(gradient reduce-scatter at step or during backward), ``shard_comm.py`` (the data-parallel group and its
collectives), ``codes.py`` (8-bit code maps and exact block-wise quantization), ``adamw.py`` (fused AdamW on flat
shards, CPU path) and ``adamw_triton.py`` (its CUDA kernel).
"""

from regrow.trainer.zero.config import ZeroConfig
from regrow.trainer.zero.optimizer import ZeroOptimizer

__all__ = ["ZeroConfig", "ZeroOptimizer"]
