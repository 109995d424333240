"""Every random generator's state (``trainer.state.RngState``) as a JSON-able dict plus one binary blob: how both
snapshots (segment metadata) and universal checkpoints (``rng/rank_*.json`` and ``.bin``) store it."""

from __future__ import annotations

import random

import numpy as np
import torch

from regrow.trainer.state import RngState


def encode_rng(rng: RngState) -> tuple[dict, bytes]:
    """``rng`` as a JSON-able dict plus one binary blob (torch generator states, which are byte tensors)."""
    blob = bytearray()

    def put(tensor: torch.Tensor) -> dict[str, int]:
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        entry = {"offset": len(blob), "nbytes": len(data)}
        blob.extend(data)
        return entry

    version, state, gauss = rng.python
    numpy_state = rng.numpy
    meta = {
        "torch_cpu": put(rng.torch_cpu),
        "torch_cuda": [put(t) for t in rng.torch_cuda],
        "python": {"version": version, "state": list(state), "gauss_next": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": [int(k) for k in numpy_state["state"]["key"]],
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    return meta, bytes(blob)


def decode_rng(meta: dict, blob: bytes) -> RngState:
    """The inverse of :func:`encode_rng`."""

    def get(entry: dict[str, int]) -> torch.Tensor:
        data = blob[entry["offset"] : entry["offset"] + entry["nbytes"]]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    python = meta["python"]
    numpy_meta = meta["numpy"]
    return RngState(
        torch_cpu=get(meta["torch_cpu"]),
        torch_cuda=[get(e) for e in meta["torch_cuda"]],
        python=(python["version"], tuple(python["state"]), python["gauss_next"]),
        numpy={
            "bit_generator": numpy_meta["bit_generator"],
            "state": {"key": np.array(numpy_meta["key"], dtype=np.uint32), "pos": numpy_meta["pos"]},
            "has_gauss": numpy_meta["has_gauss"],
            "gauss": numpy_meta["gauss"],
        },
    )


def decode_checked(meta: object, blob: bytes) -> RngState:
    """:func:`decode_rng` of data read from a file that may be damaged: raises ``ValueError`` (or the error of the
    generator that refuses it) unless the torch CPU, Python and NumPy states are ones their generators accept. Each
    is tried on a private generator; the process's own generators are left alone."""
    if not isinstance(meta, dict):
        raise ValueError(f"an RNG state must be a JSON object, not {type(meta).__name__}")
    rng = decode_rng(meta, blob)
    torch.Generator().set_state(rng.torch_cpu)
    random.Random().setstate(rng.python)
    np.random.RandomState().set_state(rng.numpy)
    return rng
