"""The sharded optimizer: ZeRO stages, the flat layout, 8-bit state and its AdamW kernels."""
