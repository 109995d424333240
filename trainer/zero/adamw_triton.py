"""The fused 8-bit AdamW step as one Triton kernel (CUDA only; imported lazily by ``adamw.adamw8bit_step``).

One program handles ``rows`` quantization blocks of 256 elements as a [rows, 256] tile: it reads the gradient, the
parameter and the two code/scale pairs once, updates in registers, reduces each row to its new absolute maximum, and
writes the parameter (and its low-precision copy), the codes and the scales once: ~16 bytes per parameter with bf16
gradients and a bf16 copy.

Nearest code without a search: a 6400-entry uint8 table indexed by the sign, exponent and top 7 mantissa bits of
``xn`` gives the code index of the smallest value sharing those bits, and one comparison with the exact threshold at
that index finishes the job (see ``codes._build_lut``, which proves per key that one comparison is enough). Per
element and per moment that is three small gathers (code, table, threshold), all cached in L1.

Bitwise agreement with the CPU path: every floating-point operation is an explicitly rounded PTX instruction
(``mul.rn``, ``add.rn``, ``sub.rn``, ``div.rn``, ``sqrt.rn``) in the CPU path's order. Explicit rounding forbids
contraction into FMA, and these instructions keep denormals, whereas Triton's libdevice division and square root
are linked flush-to-zero. The sign rule reads the sign bit, an integer test.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from regrow.trainer.zero.adamw import AdamScalars
from regrow.trainer.zero.codes import (
    BLOCK_SIZE,
    LUT_EXP_LO,
    LUT_HALF,
    LUT_MANT_BITS,
    LUT_MAX_MAGNITUDE,
    LUT_MIN_MAGNITUDE,
    CodeTables,
)

DEFAULT_ROWS: int = 1
"""Blocks per program (256 elements), with DEFAULT_WARPS warps (8 elements per thread): the fastest tile of the
sweep in ``bench/bench_optimizer.py`` on an H100 80GB HBM3, 400M parameters, bf16 gradients and copy (rows x warps:
1x1 2.50 ms, 1x2 2.87, 2x4 3.06, 2x2 3.15, 4x4 3.35, 4x8 3.54, 8x8 4.32). Small programs keep more of them resident
(94 registers per thread), which the loads need to cover memory latency."""
DEFAULT_WARPS: int = 1


@triton.jit
def _mul(a, b):
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _add(a, b):
    return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _sub(a, b):
    return tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _div(a, b):
    return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _sqrt(a):
    return tl.inline_asm_elementwise("sqrt.rn.f32 $0, $1;", "=f,f", [a], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _splat(scalar, like):
    """``scalar`` broadcast to the shape of ``like`` (inline assembly takes tensors of one shape)."""
    return tl.broadcast_to(scalar, like.shape)


@triton.jit
def _nearest_code(
    xn,
    lut_ptr,
    thr_ptr,
    SIGNED: tl.constexpr,
    POS_START: tl.constexpr,
    NEG_END: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    KEY_BASE: tl.constexpr,
    KEY_HALF: tl.constexpr,
    MAG_MIN: tl.constexpr,
    MAG_MAX: tl.constexpr,
):
    """Exact nearest code index of ``xn`` under the tie and sign rules of ``codes.py``; the same algorithm, step for
    step, as ``codes._nearest_index_gpu_formulation``."""
    magnitude = tl.minimum(tl.maximum(tl.abs(xn), MAG_MIN), MAG_MAX)
    key = (magnitude.to(tl.int32, bitcast=True) >> KEY_SHIFT) - KEY_BASE + tl.where(xn < 0, KEY_HALF, 0)
    low = tl.load(lut_ptr + key).to(tl.int32)
    index = low + (xn >= tl.load(thr_ptr + low)).to(tl.int32)
    if SIGNED:
        bits = xn.to(tl.int32, bitcast=True)
        index = tl.where(bits > 0, tl.maximum(index, POS_START), index)
        negative = (bits < 0) & (bits != -2147483648)  # -2**31 is -0.0, which stays on the zero code
        index = tl.where(negative, tl.minimum(index, NEG_END), index)
    return index.to(tl.uint8)


@triton.jit
def _adamw8bit_kernel(
    p_ptr, g_ptr, mq_ptr, ms_ptr, vq_ptr, vs_ptr, out_ptr,
    code_m_ptr, code_v_ptr, lut_m_ptr, lut_v_ptr, thr_m_ptr, thr_v_ptr,
    n_blocks, beta1, omb1, beta2, omb2, eps, decay, step_size, inv_bias2_sqrt, grad_scale,
    M_POS_START: tl.constexpr, M_NEG_END: tl.constexpr, V_POS_START: tl.constexpr,
    KEY_SHIFT: tl.constexpr, KEY_BASE: tl.constexpr, KEY_HALF: tl.constexpr,
    MAG_MIN: tl.constexpr, MAG_MAX: tl.constexpr,
    ROWS: tl.constexpr, QBLOCK: tl.constexpr, HAS_OUT: tl.constexpr, SCALE_GRAD: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if WIDE:  # shards of 2**31 elements or more need 64-bit offsets
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    else:
        rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    cols = tl.arange(0, QBLOCK)
    offs = rows[:, None] * QBLOCK + cols[None, :]
    mask = row_ok[:, None]  # constant along a row, so loads and stores stay vectorized

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALE_GRAD:
        g = _mul(g, _splat(grad_scale, g))
    # NaN/Inf (exponent all ones): bitsandbytes' rule, the element's state becomes 0 and its parameter is kept.
    finite = (g.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
    g = tl.where(finite, g, 0.0)

    m_scale = tl.load(ms_ptr + rows, mask=row_ok, other=0.0)
    v_scale = tl.load(vs_ptr + rows, mask=row_ok, other=0.0)
    m_code = tl.load(code_m_ptr + tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32))
    v_code = tl.load(code_v_ptr + tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32))
    m = _mul(m_code, _splat(m_scale[:, None], m_code))
    v = _mul(v_code, _splat(v_scale[:, None], v_code))
    m = _add(_mul(m, _splat(beta1, m)), _mul(g, _splat(omb1, g)))
    v = _add(_mul(v, _splat(beta2, v)), _mul(_mul(g, g), _splat(omb2, g)))
    m = tl.where(finite, m, 0.0)
    v = tl.where(finite, v, 0.0)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    denom = _add(_mul(_sqrt(v), _splat(inv_bias2_sqrt, v)), _splat(eps, v))
    update = _mul(_div(m, denom), _splat(step_size, m))
    p_new = tl.where(finite, _sub(_mul(p, _splat(decay, p)), update), p)
    tl.store(p_ptr + offs, p_new, mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, p_new.to(out_ptr.dtype.element_ty), mask=mask)

    m_max = tl.max(tl.abs(m), axis=1)
    v_max = tl.max(tl.abs(v), axis=1)
    tl.store(ms_ptr + rows, m_max, mask=row_ok)
    tl.store(vs_ptr + rows, v_max, mask=row_ok)
    m_div = tl.where(m_max > 0, m_max, 1.0)
    v_div = tl.where(v_max > 0, v_max, 1.0)
    mq = _nearest_code(
        _div(m, _splat(m_div[:, None], m)), lut_m_ptr, thr_m_ptr, True, M_POS_START, M_NEG_END,
        KEY_SHIFT, KEY_BASE, KEY_HALF, MAG_MIN, MAG_MAX,
    )  # fmt: skip
    vq = _nearest_code(
        _div(v, _splat(v_div[:, None], v)), lut_v_ptr, thr_v_ptr, False, V_POS_START, -1,
        KEY_SHIFT, KEY_BASE, KEY_HALF, MAG_MIN, MAG_MAX,
    )  # fmt: skip
    tl.store(mq_ptr + offs, mq, mask=mask)
    tl.store(vq_ptr + offs, vq, mask=mask)


def adamw8bit_step_cuda(
    param: Tensor,
    grad: Tensor,
    m_codes: Tensor,
    m_scales: Tensor,
    v_codes: Tensor,
    v_scales: Tensor,
    k: AdamScalars,
    tables_m: CodeTables,
    tables_v: CodeTables,
    param_out: Tensor | None,
    *,
    rows: int = DEFAULT_ROWS,
    num_warps: int = DEFAULT_WARPS,
) -> object:
    """Launches the kernel; arguments already validated by ``adamw.adamw8bit_step`` (same contract).

    ``rows`` (blocks per program, a power of two) and ``num_warps`` only change speed, never results. Returns
    Triton's handle of the compiled kernel (its ``asm`` and register counts are what the benchmark inspects).
    """
    assert tables_m.lut_plain is not None and tables_v.lut_plain is not None, "standard map tables expected"
    n_blocks = param.numel() // BLOCK_SIZE
    if n_blocks == 0:
        return None
    grid = (triton.cdiv(n_blocks, rows),)
    return _adamw8bit_kernel[grid](
        param, grad, m_codes, m_scales, v_codes, v_scales, param if param_out is None else param_out,
        tables_m.code, tables_v.code, tables_m.lut_plain, tables_v.lut_plain, tables_m.thresholds, tables_v.thresholds,
        n_blocks, k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2, k.eps, k.decay, k.step_size,
        k.inv_bias2_sqrt, k.grad_scale,
        M_POS_START=tables_m.pos_start, M_NEG_END=tables_m.neg_end, V_POS_START=tables_v.pos_start,
        KEY_SHIFT=23 - LUT_MANT_BITS, KEY_BASE=LUT_EXP_LO << LUT_MANT_BITS, KEY_HALF=LUT_HALF,
        MAG_MIN=LUT_MIN_MAGNITUDE, MAG_MAX=LUT_MAX_MAGNITUDE,
        ROWS=rows, QBLOCK=BLOCK_SIZE, HAS_OUT=param_out is not None, SCALE_GRAD=k.grad_scale != 1.0,
        WIDE=param.numel() >= 2**31,
        num_warps=num_warps,
    )  # fmt: skip
