"""regrow: fault-tolerant distributed training for PyTorch.

Subpackages: ``regrow.comm`` (process groups, topology, collectives), ``regrow.trainer`` (8-bit ZeRO optimizer,
GPT, data, training loop), ``regrow.checkpoint`` (snapshots and universal checkpoints), ``regrow.recovery``
(failure handling), ``regrow.launch`` (CLI and launchers).
"""

__version__ = "0.1.0"
