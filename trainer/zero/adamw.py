"""Fused AdamW updates of flat, block-aligned shards: 8-bit block-wise state (``codes.py``) or fp32 state.

Both updates take a 1-D fp32 master shard, its gradient and its state, and apply one AdamW step in place, optionally
writing the new parameters into a low-precision copy. Non-finite gradient elements reset their state and leave their
parameter unchanged, in both (bitsandbytes' rule).

Dispatch of :func:`adamw8bit_step`: CUDA tensors run one Triton kernel (``adamw_triton.py``, imported only then);
CPU tensors run the same arithmetic as a sequence of torch operations over chunks of whole blocks, so temporaries
stay small. The operations are the same, in the same order, every scalar is rounded to fp32 once (``adam_scalars``),
and every operation is correctly rounded on both sides (the kernel uses explicitly rounded PTX instructions, which
also rules out FMA contraction; the CPU takes numpy's IEEE square root, see ``_sqrt_rn``), so the two paths are
meant to agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from regrow.trainer.zero.codes import BLOCK_SIZE, CodeTables, dequantize_rows, requantize_rows, state_tables

DEFAULT_CPU_CHUNK: int = 127 * BLOCK_SIZE
"""Elements per chunk of the CPU 8-bit update (32512): the most whole blocks below torch's intra-op grain size
(32768), so each of the ~45 small ops per chunk runs inline on the calling thread, and temporaries stay at 127 KiB.
Measured per 10M-element step: on the loaded 2-core machine, 64K-element chunks (ops forking to OpenMP threads)
took 0.3-30 s against ~0.16 s inline; on a 16-core host, spreading inline chunks over 16 Python threads took 450 ms
(GIL-bound) against 180 ms on one thread. So the CPU path is deliberately single-threaded."""

DEFAULT_COPY_CHUNK: int = 1 << 24
"""Elements per chunk when :func:`adamw32bit_step` must convert or scale a copy of the gradient (a 64 MiB fp32
temporary; 1M-element chunks cost an embedding's bf16 gradient shard 50-100 rounds of kernel launches per step)."""

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value, returned as a Python float (exactly representable in fp32)."""
    return float(np.float32(x))


# ---------------------------------------------------------------------------------------------------- AdamW: shared


@dataclass(frozen=True)
class AdamScalars:
    """The per-step constants of the update, each rounded to fp32 once so that every path uses the same values."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float
    """1 - lr * weight_decay: the decoupled weight decay factor, applied to the parameter before the Adam update."""
    step_size: float
    """lr / (1 - beta1**step)."""
    inv_bias2_sqrt: float
    """1 / sqrt(1 - beta2**step)."""
    grad_scale: float


def adam_scalars(
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, grad_scale: float
) -> AdamScalars:
    """fp32-rounded constants of one step (computed in double first, like torch.optim.AdamW's Python scalars)."""
    return AdamScalars(
        beta1=_f32(beta1),
        one_minus_beta1=_f32(1.0 - beta1),
        beta2=_f32(beta2),
        one_minus_beta2=_f32(1.0 - beta2),
        eps=_f32(eps),
        decay=_f32(1.0 - lr * weight_decay),
        step_size=_f32(lr / (1.0 - beta1**step)),
        inv_bias2_sqrt=_f32(1.0 / math.sqrt(1.0 - beta2**step)),
        grad_scale=_f32(grad_scale) + 0.0,  # + 0.0 turns a -0.0 scale into +0.0: one zero for both paths
    )


def _hyper_problems(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, grad_scale: float
) -> list[str]:
    problems = []
    if not (math.isfinite(lr) and lr >= 0):
        problems.append(f"lr: must be finite and >= 0 (got {lr})")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            problems.append(f"{name}: must be in [0, 1) (got {beta})")
    if not (math.isfinite(eps) and eps > 0):
        problems.append(f"eps: must be finite and > 0 (got {eps})")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        problems.append(f"weight_decay: must be finite and >= 0 (got {weight_decay})")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        problems.append(f"step: must be an int >= 1, the 1-based count of this update (got {step!r})")
    if not (math.isfinite(grad_scale) and grad_scale >= 0):
        problems.append(f"grad_scale: must be finite and >= 0, e.g. the clipping coefficient (got {grad_scale})")
    return problems


def _tensor_problems(param: Tensor, grad: Tensor, param_out: Tensor | None, chunk_size: int | None) -> list[str]:
    problems = []
    if param.dtype != torch.float32 or param.dim() != 1 or not param.is_contiguous():
        problems.append(f"param: must be a contiguous 1-D fp32 tensor (got {param.dtype}, shape {tuple(param.shape)})")
    elif param.numel() % BLOCK_SIZE != 0:
        problems.append(f"param: size {param.numel()} must be a multiple of BLOCK_SIZE={BLOCK_SIZE}; pad the shard")
    if grad.dtype not in _GRAD_DTYPES or grad.dim() != 1 or not grad.is_contiguous():
        problems.append(f"grad: must be a contiguous 1-D fp32/bf16/fp16 tensor (got {grad.dtype}, {tuple(grad.shape)})")
    if grad.numel() != param.numel() or grad.device != param.device:
        problems.append(f"grad: must match param's size {param.numel()} and device {param.device}")
    if param_out is not None:
        if (
            param_out.numel() != param.numel()
            or param_out.device != param.device
            or not param_out.is_floating_point()
            or not param_out.is_contiguous()
        ):
            problems.append(f"param_out: must be a contiguous float tensor of size {param.numel()} on {param.device}")
    if chunk_size is not None and (chunk_size < BLOCK_SIZE or chunk_size % BLOCK_SIZE != 0):
        problems.append(f"chunk_size: must be a positive multiple of BLOCK_SIZE={BLOCK_SIZE} (got {chunk_size})")
    return problems


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"{what}: invalid arguments:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------------- AdamW 8-bit


def _state_problems(param: Tensor, m_codes: Tensor, m_scales: Tensor, v_codes: Tensor, v_scales: Tensor) -> list[str]:
    problems = []
    n = param.numel()
    for name, codes in (("m_codes", m_codes), ("v_codes", v_codes)):
        if (
            codes.dtype != torch.uint8
            or codes.numel() != n
            or not codes.is_contiguous()
            or codes.device != param.device
        ):
            problems.append(f"{name}: must be a contiguous uint8 tensor of size {n} on {param.device}")
    for name, scales in (("m_scales", m_scales), ("v_scales", v_scales)):
        if (
            scales.dtype != torch.float32
            or scales.numel() != n // BLOCK_SIZE
            or not scales.is_contiguous()
            or scales.device != param.device
        ):
            problems.append(f"{name}: must be a contiguous fp32 tensor of size {n // BLOCK_SIZE} on {param.device}")
    return problems


def adamw8bit_step(
    param: Tensor,
    grad: Tensor,
    m_codes: Tensor,
    m_scales: Tensor,
    v_codes: Tensor,
    v_scales: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    param_out: Tensor | None = None,
    chunk_size: int | None = None,
) -> None:
    """One AdamW step with block-wise 8-bit state, in place on ``param`` and the four state tensors.

    ``param`` is the fp32 master shard (1-D, size a multiple of 256); ``grad`` has the same size (fp32, bf16 or
    fp16); ``m_*`` is the first moment against ``codes.dynamic_code_map(True)``, ``v_*`` the second against
    ``codes.dynamic_code_map(False)``. ``step`` is the 1-based number of this update (bias correction); the gradient
    is multiplied by ``grad_scale`` (the clipping coefficient) first. Per element, in fp32::

        g = grad * grad_scale
        m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
        p = p * (1 - lr * weight_decay)                       # decoupled decay first, as torch.optim.AdamW
        p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    then each block's m and v are requantized with their new absolute maxima. ``param_out`` (optional, any float
    dtype) receives the new parameter cast to its dtype.

    Non-finite gradients (NaN or +-Inf after scaling): as bitsandbytes' CUDA kernel
    (``kOptimizerStatic8bit2StateBlockwise``: ``if (!isnan(g) && !isinf(g)) {...} else { s1 = 0; s2 = 0; }`` and the
    parameter update under the same condition), the element's m and v are reset to zero and its parameter is left
    unchanged (no decay either); the rest of its block updates normally. bitsandbytes tests the gradient before its
    ``gnorm_scale``; with a finite ``grad_scale`` (required) the two tests differ only if the product overflows.

    The result does not depend on ``chunk_size`` (CPU only: elements per chunk, a multiple of 256; default
    :data:`DEFAULT_CPU_CHUNK`), and the CUDA kernel computes the same values.
    """
    problems = _hyper_problems(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    problems += _tensor_problems(param, grad, param_out, chunk_size)
    if not problems:
        problems += _state_problems(param, m_codes, m_scales, v_codes, v_scales)
    _raise_if(problems, "adamw8bit_step")
    scalars = adam_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=grad_scale
    )
    tables_m = state_tables(True, param.device)
    tables_v = state_tables(False, param.device)
    if param.device.type == "cuda":
        from regrow.trainer.zero import adamw_triton  # triton is only needed (and only installed) where CUDA is

        adamw_triton.adamw8bit_step_cuda(
            param, grad, m_codes, m_scales, v_codes, v_scales, scalars, tables_m, tables_v, param_out
        )
        return
    chunk = chunk_size or DEFAULT_CPU_CHUNK
    for start in range(0, param.numel(), chunk):
        end = min(start + chunk, param.numel())
        blocks = slice(start // BLOCK_SIZE, end // BLOCK_SIZE)
        _adamw8bit_chunk(
            param[start:end],
            grad[start:end],
            m_codes[start:end],
            m_scales[blocks],
            v_codes[start:end],
            v_scales[blocks],
            None if param_out is None else param_out[start:end],
            scalars,
            tables_m,
            tables_v,
        )


def _sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded fp32 square root of a CPU tensor, in place (IEEE, like the kernel's ``sqrt.rn.f32``).

    torch's own fp32 ``sqrt`` on the CPU is not correctly rounded (torch 2.13, AVX512: 17% of random inputs one ulp
    off), and it forks OpenMP threads at sizes where other element-wise ops run inline. numpy's fp32 square root is
    the IEEE instruction and runs on the calling thread.
    """
    np.sqrt(x.numpy(), out=x.numpy())
    return x


def _adamw8bit_chunk(
    param: Tensor,
    grad: Tensor,
    m_codes: Tensor,
    m_scales: Tensor,
    v_codes: Tensor,
    v_scales: Tensor,
    param_out: Tensor | None,
    k: AdamScalars,
    tables_m: CodeTables,
    tables_v: CodeTables,
) -> None:
    """The 8-bit update of whole blocks: every fp32 operation of the Triton kernel, in its order, none fused.

    In-place forms (``a.mul_(b)``) round exactly like their out-of-place twins; masking runs only for a chunk whose
    gradient sum is not finite (a cheap screen: masking an all-finite chunk would change nothing).
    """
    g = grad.view(-1, BLOCK_SIZE).to(torch.float32)
    if k.grad_scale != 1.0:  # x * 1.0 == x exactly, so skipping it changes nothing
        g = g * k.grad_scale
    bad = None if bool(torch.isfinite(g.sum())) else ~torch.isfinite(g)
    if bad is not None:
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    m = dequantize_rows(m_codes, m_scales, tables_m.code).mul_(k.beta1).add_(g * k.one_minus_beta1)
    v = dequantize_rows(v_codes, v_scales, tables_v.code).mul_(k.beta2).add_((g * g).mul_(k.one_minus_beta2))
    if bad is not None:
        m.masked_fill_(bad, 0.0)
        v.masked_fill_(bad, 0.0)
    denom = _sqrt_rn(v.clone()).mul_(k.inv_bias2_sqrt).add_(k.eps)
    update = (m / denom).mul_(k.step_size)
    p = param.view(-1, BLOCK_SIZE)
    if bad is None:
        p.mul_(k.decay).sub_(update)
    else:
        p.copy_(torch.where(bad, p, (p * k.decay).sub_(update)))  # skipped elements keep their value, undecayed
    if param_out is not None:
        param_out.copy_(param)
    requantize_rows(m, tables_m, m_codes, m_scales)
    requantize_rows(v, tables_v, v_codes, v_scales)


# ---------------------------------------------------------------------------------------------------- AdamW 32-bit


def adamw32bit_step(
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    param_out: Tensor | None = None,
    chunk_size: int | None = None,
) -> None:
    """One AdamW step with fp32 state ``m``, ``v``, in place; the contract of :func:`adamw8bit_step`.

    Runs ``torch._fused_adamw_`` on the flat tensors, so for finite gradients the result equals
    ``torch.optim.AdamW(fused=True)`` on one flat parameter bit for bit. The gradient is used as is when it is fp32
    and ``grad_scale == 1``; otherwise a converted/scaled copy is made ``chunk_size`` elements at a time (default
    :data:`DEFAULT_COPY_CHUNK`). Non-finite gradient elements follow the 8-bit rule (state reset to zero, parameter
    unchanged): screened with one sum over the gradient, repaired only where present. The result does not depend on
    ``chunk_size``.
    """
    problems = _hyper_problems(lr, beta1, beta2, eps, weight_decay, step, grad_scale)
    problems += _tensor_problems(param, grad, param_out, chunk_size)
    for name, state in (("m", m), ("v", v)):
        if state.dtype != torch.float32 or state.shape != param.shape or state.device != param.device:
            problems.append(f"{name}: must be an fp32 tensor shaped like param {tuple(param.shape)} on {param.device}")
    _raise_if(problems, "adamw32bit_step")
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    needs_copy = grad.dtype != torch.float32 or grad_scale != 1.0
    chunk = (chunk_size or DEFAULT_COPY_CHUNK) if needs_copy else param.numel()
    # A finite sum proves every element finite: one read of the gradient and one host sync for the whole shard,
    # not one per chunk (each sync would stall the queue of kernels). A sum that overflows merely takes the exact
    # path, which then changes nothing.
    all_finite = bool(torch.isfinite(grad.sum()))
    for start in range(0, param.numel(), max(chunk, 1)):
        end = min(start + chunk, param.numel())
        g = grad[start:end]
        if needs_copy:
            g = g.to(torch.float32, copy=True)
            if grad_scale != 1.0:
                g.mul_(grad_scale)
        _fused_adamw_nonfinite_safe(param[start:end], g, m[start:end], v[start:end], needs_copy, all_finite,
                                    **hyper)
    if param_out is not None:
        param_out.copy_(param)


def _fused_adamw_nonfinite_safe(
    param: Tensor, grad: Tensor, m: Tensor, v: Tensor, grad_is_copy: bool, all_finite: bool, *, step: int,
    **hyper: float,
) -> None:
    """``torch._fused_adamw_`` on one flat slice, with the 8-bit path's handling of non-finite gradient elements:
    unless the whole gradient is known finite (``all_finite``), the exact mask is built."""
    bad = None if all_finite else ~torch.isfinite(grad)
    if bad is not None:
        kept = param[bad]
        grad = grad.masked_fill_(bad, 0.0) if grad_is_copy else grad.masked_fill(bad, 0.0)
    steps = [torch.full((), float(step), dtype=torch.float32, device=param.device)]
    torch._fused_adamw_(
        [param], [grad], [m], [v], [], steps, amsgrad=False, maximize=False,
        lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"], weight_decay=hyper["weight_decay"],
        eps=hyper["eps"],
    )  # fmt: skip
    if bad is not None:
        param[bad] = kept
        m.masked_fill_(bad, 0.0)
        v.masked_fill_(bad, 0.0)
