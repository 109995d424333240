"""Dynamic 8-bit block-wise quantization (the bitsandbytes code maps) and fused AdamW updates.

A tensor of Adam state is stored as one ``uint8`` code per element plus one fp32 scale per block of
:data:`BLOCK_SIZE` elements. The scale is the block's absolute maximum; an element ``x`` is stored as the index of the
code (a value of the 256-entry code map, in [-1, 1]) nearest to ``x / scale``, and read back as ``code[index] * scale``.

Exactness. "Nearest" is meant exactly, not approximately: for every pair of neighbouring codes we precompute the
smallest fp32 value that belongs to the upper code (a threshold, from the exact rational midpoint), so counting the
thresholds at or below ``xn`` reproduces the brute-force ``argmin |xn - code|`` for every fp32 input. A lookup table
on the top bits of ``xn`` (sign, exponent, 7 mantissa bits) makes that count one table read plus one comparison, on
the CPU and in the GPU kernel alike.

- Tie rule: a value exactly half-way between two codes goes to the code of smaller magnitude (the one nearer zero;
  for a pair symmetric around zero, to the positive one). This keeps quantization symmetric under negation, and state
  is never pushed away from zero by a tie.
- Sign rule (signed maps only, i.e. maps with negative codes; Adam's first moment): a nonzero value whose nearest code
  is zero is stored as the nearest code of its own sign (the smallest positive or negative code), so a small momentum
  never vanishes or loses its sign. Exactness never demands a code of the other sign (zero is always nearer), so the
  rule only ever overrides a zero code; exact zeros (either sign) keep the zero code. bitsandbytes' kernel
  (``kOptimizerStatic8bit2StateBlockwise``) checks ``signbit(code) != signbit(m)`` after quantizing and moves one code
  toward m's sign, which keeps negative values off zero but lets tiny positive ones (and sends -0.0 the other way)
  round to zero; we apply the rule to both signs alike. The unsigned map (second moment) has no sign rule: tiny
  values may round to zero, as in bitsandbytes.

Dispatch of :func:`adamw8bit_step`: CUDA tensors run one Triton kernel (``quant_triton.py``, imported only then);
CPU tensors run the same arithmetic as a sequence of torch operations over chunks of whole blocks, so temporaries
stay small. The operations are the same, in the same order, every scalar is rounded to fp32 once (``adam_scalars``),
and every operation is correctly rounded on both sides (the kernel uses explicitly rounded PTX instructions, which
also rules out FMA contraction; the CPU takes its square root through fp64, see ``_sqrt_rn``), so the two paths are
meant to agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

BLOCK_SIZE: int = 256
"""Elements per quantization block (one fp32 scale each)."""

CODE_MAP_VERSION: str = "bnb-dynamic-v1"
"""Names the code maps below (bitsandbytes ``create_dynamic_map`` with 7 exponent bits, 8 bits) and the rounding rules
of this module; stored with checkpoints so that codes are never decoded with a different map."""

DEFAULT_CPU_CHUNK: int = 127 * BLOCK_SIZE
"""Elements per chunk of the CPU 8-bit update (32512): the most whole blocks below torch's intra-op grain size
(32768), so each of the ~45 small ops per chunk runs inline on the calling thread, and temporaries stay at 127 KiB.
Measured per 10M-element step: on the loaded 2-core machine, 64K-element chunks (ops forking to OpenMP threads)
took 0.3-30 s against ~0.16 s inline; on a 16-core host, spreading inline chunks over 16 Python threads took 450 ms
(GIL-bound) against 180 ms on one thread. So the CPU path is deliberately single-threaded."""

DEFAULT_COPY_CHUNK: int = 1 << 20
"""Elements per chunk when :func:`adamw32bit_step` must convert or scale a copy of the gradient."""

# Geometry of the GPU lookup table (see ``_build_lut``): the key of an fp32 value is its sign, its binary exponent
# clamped to the 2**-24 .. 2**0 octaves, and the top 7 bits of its mantissa.
LUT_EXP_LO: int = 127 - 24
LUT_OCTAVES: int = 25
LUT_MANT_BITS: int = 7
LUT_SIZE: int = 2 * LUT_OCTAVES * (1 << LUT_MANT_BITS)
LUT_HALF: int = LUT_OCTAVES << LUT_MANT_BITS
"""Keys of negative values follow the positive ones."""
LUT_MIN_MAGNITUDE: float = 2.0**-24
LUT_MAX_MAGNITUDE: float = float(np.nextafter(np.float32(2), np.float32(0)))
"""Magnitudes are clamped into [LUT_MIN_MAGNITUDE, LUT_MAX_MAGNITUDE] before their key is taken."""
_NEG_ZERO_BITS = -(2**31)  # int32 view of -0.0

_MAX_EXPONENT_BITS = 7
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------- code maps


def _dynamic_map_cpu(signed: bool) -> Tensor:
    """The bitsandbytes dynamic map, built with the same fp32 operations so every value is bit-identical.

    For exponent i = 0..6 the map holds the midpoints of ``linspace(0.1, 1, k + 1)`` (k = 2**i signed, 2**(i+1)
    unsigned) scaled by 10**(i-6), mirrored to negative values when signed; plus 0 and 1. That is 127 + 127 + 2
    values signed and 254 + 2 unsigned: 256, no padding.
    """
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for i in range(_MAX_EXPONENT_BITS):
        items = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1.0, items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # 10.0 ** (i - 6) is the same double as bitsandbytes' 10 ** (-(7 - 1) + i); torch rounds it to fp32 before
        # the multiply in both cases.
        values = means * (10.0 ** (i - (_MAX_EXPONENT_BITS - 1)))
        parts.append(values)
        if signed:
            parts.append(-values)
    code = torch.cat(parts).sort().values
    assert code.numel() == 256 and bool((code[1:] > code[:-1]).all()), "dynamic map must be 256 distinct values"
    return code


@functools.cache
def _dynamic_map_cached(signed: bool, device: torch.device) -> Tensor:
    return _dynamic_map_cpu(signed).to(device)


def dynamic_code_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The 256 fp32 values of the bitsandbytes dynamic map, sorted ascending, on ``device``.

    ``signed=True`` (Adam's first moment) spans [-0.99297, 1]; ``signed=False`` (second moment) spans [0, 1]. Both
    contain 0 exactly. The tensor is cached per (signed, device) and shared: do not modify it.
    """
    return _dynamic_map_cached(bool(signed), torch.device(device))


# ---------------------------------------------------------------------------------------------------- exact thresholds


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value, returned as a Python float (exactly representable in fp32)."""
    return float(np.float32(x))


def _next_up(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _next_down(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(-np.inf)))


def _threshold(lower: float, upper: float) -> float:
    """The smallest fp32 value whose nearest code among (lower, upper) is ``upper``, under the tie rule.

    Exact: the midpoint is a Fraction. Ties go to the code of smaller magnitude, so for a positive midpoint a tie
    stays with ``lower`` (the threshold is strictly above the midpoint) and for a midpoint <= 0 it goes to ``upper``.
    """
    mid = (Fraction(lower) + Fraction(upper)) / 2

    def belongs_to_upper(value: float) -> bool:
        return Fraction(value) > mid if mid > 0 else Fraction(value) >= mid

    candidate = _f32(float(mid))
    while not belongs_to_upper(candidate):
        candidate = _next_up(candidate)
    while belongs_to_upper(_next_down(candidate)):
        candidate = _next_down(candidate)
    return candidate


@dataclass(frozen=True)
class CodeTables:
    """Everything needed to quantize exactly against one code map, on one device.

    Two equivalent formulations of the same function of ``xn`` are kept, one per path (both are tested against the
    brute-force reference): the CPU indexes a 65536-entry table with the top 16 bits of ``xn`` and folds the sign rule
    into its thresholds (few torch ops per chunk); the GPU kernel clamps the magnitude first (a 6400-entry table that
    stays in L1), keeps the plain thresholds and applies the sign rule on the sign bit, an integer test that no
    flush-to-zero setting can change.
    """

    code: Tensor
    """[256] fp32, strictly increasing, contains 0."""
    thresholds: Tensor
    """[256] fp32: ``thresholds[k]`` is the smallest fp32 value whose nearest code (tie rule, no sign rule) has an
    index above k; the last entry is +inf so that every code index is a valid position."""
    sign_thresholds: Tensor
    """[256] fp32: the same with the sign rule folded in (signed maps): -0.0 below the zero code, the smallest
    positive fp32 above it. Equal to ``thresholds`` for unsigned maps."""
    zero_index: int
    """Index of the code 0."""
    neg_end: int
    """Index of the largest negative code (-1 for an unsigned map)."""
    pos_start: int
    """Index of the smallest positive code."""
    lut: Tensor | None
    """[65536] int32, CPU formulation: for each value of the top 16 bits of an fp32, the index (under
    ``sign_thresholds``) of the smallest value having them."""
    lut_plain: Tensor | None
    """[LUT_SIZE] uint8, GPU formulation: the same for the clamped keys of ``_lut_key``, under ``thresholds``.
    Both tables only for the standard maps."""

    @property
    def signed(self) -> bool:
        return self.neg_end >= 0


def _check_code(code: Tensor) -> None:
    problem = None
    if code.dtype != torch.float32 or code.dim() != 1 or code.numel() != 256:
        problem = f"must be a 1-D fp32 tensor of 256 values (got {code.dtype}, shape {tuple(code.shape)})"
    elif not bool((code[1:] > code[:-1]).all()):
        problem = "must be strictly increasing"
    elif not bool(((code >= -1) & (code <= 1)).all()) or not bool((code == 0).any()) or not bool((code > 0).any()):
        problem = "must lie in [-1, 1] and contain 0 and a positive value"
    if problem:
        raise ValueError(f"code: {problem}; use dynamic_code_map(signed)")


def _make_tables(code: Tensor, with_lut: bool) -> CodeTables:
    _check_code(code)
    values = code.detach().cpu().tolist()
    plain = [_threshold(a, b) for a, b in zip(values[:-1], values[1:])] + [math.inf]
    zero = values.index(0.0)
    negatives = [i for i, c in enumerate(values) if c < 0]
    signed = list(plain)
    if negatives:
        # x >= -0.0 holds for both zeros and every positive value; x >= the smallest denormal only for positives.
        signed[zero - 1] = -0.0
        signed[zero] = float(np.nextafter(np.float32(0), np.float32(1)))
    tables = CodeTables(
        code=code.detach().cpu().clone(),
        thresholds=torch.tensor(plain, dtype=torch.float32),
        sign_thresholds=torch.tensor(signed, dtype=torch.float32),
        zero_index=zero,
        neg_end=negatives[-1] if negatives else -1,
        pos_start=zero + 1,
        lut=None,
        lut_plain=None,
    )
    if not with_lut:
        return tables
    lut = _build_lut(tables.sign_thresholds, *_bits_key_ranges()).to(torch.int32)
    lut_plain = _build_lut(tables.thresholds, *_key_ranges()).to(torch.uint8)
    return dataclasses.replace(tables, lut=lut, lut_plain=lut_plain)


def _to_device(tables: CodeTables, device: torch.device) -> CodeTables:
    moved = {f.name: getattr(tables, f.name) for f in dataclasses.fields(tables)}
    return CodeTables(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in moved.items()})


@functools.cache
def _standard_tables_cpu(signed: bool) -> CodeTables:
    return _make_tables(dynamic_code_map(signed), with_lut=True)


@functools.cache
def state_tables(signed: bool, device: torch.device) -> CodeTables:
    """The cached tables of the standard map ``dynamic_code_map(signed)`` on ``device``, lookup tables included."""
    cpu = _standard_tables_cpu(bool(signed))
    return cpu if device.type == "cpu" else _to_device(cpu, device)


def _tables_for(code: Tensor) -> CodeTables:
    """Tables for ``code``: the cached ones when it equals a standard map, else computed (without lookup tables)."""
    for signed in (True, False):
        standard = dynamic_code_map(signed, code.device)
        if code.shape == standard.shape and code.dtype == standard.dtype and torch.equal(code, standard):
            return state_tables(signed, code.device)
    tables = _make_tables(code, with_lut=False)
    return tables if code.device.type == "cpu" else _to_device(tables, code.device)


# ---------------------------------------------------------------------------------------------------- nearest code


def _lut_key(xn: Tensor) -> Tensor:
    """int32 lookup key of fp32 values: sign, then the exponent and top 7 mantissa bits of the clamped magnitude.

    Magnitudes are clamped to [2**-24, 2) first, so zeros and tiny values share the first key of their sign and
    values >= 1 the last ones; the sign part is ``xn < 0`` (so -0.0 takes a positive key). The Triton kernel computes
    the same key with the same operations.
    """
    magnitude = xn.abs().clamp_(LUT_MIN_MAGNITUDE, LUT_MAX_MAGNITUDE)
    key = magnitude.view(torch.int32) >> (23 - LUT_MANT_BITS)
    key.sub_(LUT_EXP_LO << LUT_MANT_BITS)
    return key.add_((xn < 0).to(torch.int32).mul_(LUT_HALF))


def _bits_key(xn: Tensor) -> Tensor:
    """The top 16 bits (sign, exponent, 7 mantissa bits) of fp32 values, as int32 in [0, 65536)."""
    return (xn.view(torch.int32) >> 16).bitwise_and_(0xFFFF)


def _nearest_index(xn: Tensor, tables: CodeTables) -> Tensor:
    """Code index of every element of ``xn`` (1-D fp32): exact nearest with the tie and sign rules (CPU formulation).

    With ``sign_thresholds``, the index is the number of thresholds <= x. For the standard maps a lookup table gives
    the index of the smallest value sharing x's top 16 bits, and x can only be above the next threshold or not.
    """
    if tables.lut is None:
        return torch.bucketize(xn, tables.sign_thresholds[:-1], right=True)
    low = tables.lut.index_select(0, _bits_key(xn))
    return low.add_(xn >= tables.sign_thresholds.index_select(0, low))


def _nearest_index_gpu_formulation(xn: Tensor, tables: CodeTables) -> Tensor:
    """The Triton kernel's algorithm, step for step in torch (for tests): plain lookup table, one comparison, then
    the sign rule decided on the sign bit (integer tests: x > 0 iff bits > 0, x < 0 iff bits < -0.0's bits)."""
    assert tables.lut_plain is not None, "lookup tables exist for the standard maps only"
    low = tables.lut_plain.to(torch.int32).index_select(0, _lut_key(xn))
    index = low + (xn >= tables.thresholds.index_select(0, low)).to(torch.int32)
    if not tables.signed:
        return index
    bits = xn.view(torch.int32)
    index = torch.where(bits > 0, index.clamp(min=tables.pos_start), index)
    negative = (bits < 0) & (bits != _NEG_ZERO_BITS)
    return torch.where(negative, index.clamp(max=tables.neg_end), index)


def _key_ranges() -> tuple[Tensor, Tensor]:
    """For every key, the smallest and the largest fp32 value that gets it (two fp32 tensors of LUT_SIZE)."""
    per_sign = LUT_OCTAVES << LUT_MANT_BITS
    octave = torch.arange(per_sign) >> LUT_MANT_BITS
    mantissa = torch.arange(per_sign) & ((1 << LUT_MANT_BITS) - 1)
    base = torch.exp2((octave + LUT_EXP_LO - 127).double())
    low = (base * (1 + mantissa / (1 << LUT_MANT_BITS))).float()
    edge = (base * (1 + (mantissa + 1) / (1 << LUT_MANT_BITS))).float()
    high = torch.nextafter(edge, torch.zeros_like(edge))
    low[0] = 0.0  # the first key also holds every smaller magnitude (clamped), zero included
    high[-1] = torch.finfo(torch.float32).max  # the last one every larger magnitude
    tiny = torch.nextafter(torch.zeros(1), torch.ones(1))
    negative_high = torch.cat([-tiny, -low[1:]])  # negative keys hold strictly negative values only
    return torch.cat([low, -high]), torch.cat([high, negative_high])


def _bits_key_ranges() -> tuple[Tensor, Tensor]:
    """For each of the 65536 values of ``_bits_key``, the smallest and the largest fp32 value having it (infinities
    stand for the NaN and infinity keys, which finite state never produces)."""
    key = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    first = torch.from_numpy(key.view(np.float32).copy())
    last = torch.from_numpy((key | np.uint32(0xFFFF)).view(np.float32).copy())
    negative = torch.signbit(first)
    smallest, largest = torch.where(negative, last, first), torch.where(negative, first, last)
    special = ~torch.isfinite(first) | ~torch.isfinite(last)
    infinity = torch.where(negative, -torch.inf, torch.inf)
    return torch.where(special, infinity, smallest), torch.where(special, infinity, largest)


def _build_lut(thresholds: Tensor, smallest: Tensor, largest: Tensor) -> Tensor:
    """For each key, the index (number of ``thresholds`` <= value) of the smallest value with that key.

    Keys cover 7 mantissa bits, narrower than the gap between neighbouring thresholds of the standard maps (the zero
    keys hold at most the one sign threshold), so the values of one key span at most two neighbouring indices and
    one comparison with the threshold at the table's index decides. Verified here for every key.
    """
    low = torch.bucketize(smallest, thresholds[:-1], right=True)
    high = torch.bucketize(largest, thresholds[:-1], right=True)
    if int((high - low).max()) > 1:
        raise ValueError("code: too closely spaced for the lookup table (standard maps only)")
    return low


def nearest_code_reference(xn: Tensor, code: Tensor) -> Tensor:
    """Brute-force code index (int64) of each element of ``xn``: argmin |xn - code| under the module's tie and sign
    rules. Exact (float64 distances, rationals where two distances compare equal). For tests: O(n * 256) memory.
    """
    x = xn.detach().cpu().to(torch.float64).reshape(-1, 1)
    c = code.detach().cpu().to(torch.float64).reshape(1, -1)
    dist = (x - c).abs()
    nearest = dist == dist.min(dim=1, keepdim=True).values
    # Among the nearest codes, those of smallest magnitude (ties toward zero), then the positive one (larger index).
    magnitude = torch.where(nearest, c.abs(), torch.inf)
    smallest = nearest & (magnitude == magnitude.min(dim=1, keepdim=True).values)
    positions = torch.arange(c.numel()).expand_as(smallest)
    index = torch.where(smallest, positions, -1).argmax(dim=1)
    index = _refine_ties_exactly(x.squeeze(1), code.detach().cpu(), index, nearest.sum(dim=1) > 1)
    values = code.detach().cpu()
    if bool((values < 0).any()):  # sign rule: a nonzero value never lands on the zero code
        zero = int(torch.nonzero(values == 0)[0])
        index = torch.where((x.squeeze(1) > 0) & (index == zero), zero + 1, index)
        index = torch.where((x.squeeze(1) < 0) & (index == zero), zero - 1, index)
    return index.reshape(xn.shape)


def _refine_ties_exactly(x: Tensor, code: Tensor, index: Tensor, tied: Tensor) -> Tensor:
    """Re-decides the elements whose float64 distances compare equal, in exact rational arithmetic."""
    values = [Fraction(v) for v in code.tolist()]
    for i in torch.nonzero(tied).flatten().tolist():
        xi = Fraction(float(x[i]))
        index[i] = min(range(len(values)), key=lambda k: (abs(xi - values[k]), abs(values[k]), values[k] < 0))
    return index


# ---------------------------------------------------------------------------------------------------- block-wise


def _check_blocked(name: str, x: Tensor) -> None:
    if x.dim() != 1 or x.numel() % BLOCK_SIZE != 0:
        raise ValueError(
            f"{name}: must be 1-D with a size that is a multiple of BLOCK_SIZE={BLOCK_SIZE} (got shape "
            f"{tuple(x.shape)}, size {x.numel()}); pad it to a whole number of blocks"
        )


def quantize_blockwise(x: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """Quantizes ``x`` block by block against ``code``.

    ``x``: 1-D float tensor, size a multiple of :data:`BLOCK_SIZE`, finite. Returns ``(codes, scales)``: ``codes``
    uint8 of the same size, each the exact nearest code index of ``x / scale`` (tie and sign rules in the module
    docstring); ``scales`` fp32, one per block, the block's absolute maximum. An all-zero block has scale 0 and
    dequantizes to exact zeros.
    """
    _check_blocked("x", x)
    if not x.is_floating_point():
        raise ValueError(f"x: must be a floating-point tensor (got {x.dtype})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or Inf; quantize finite values only")
    tables = _tables_for(code.to(x.device))
    blocks = x.detach().to(torch.float32).contiguous().view(-1, BLOCK_SIZE)
    scales = blocks.abs().amax(dim=1)
    xn = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)
    codes = _nearest_index(xn.reshape(-1), tables).to(torch.uint8)
    return codes, scales


def dequantize_blockwise(codes: Tensor, scales: Tensor, code: Tensor) -> Tensor:
    """fp32 values ``code[codes] * scale`` of each block: the inverse of :func:`quantize_blockwise`."""
    _check_blocked("codes", codes)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes: must be uint8 (got {codes.dtype})")
    if scales.numel() != codes.numel() // BLOCK_SIZE:
        raise ValueError(
            f"scales: needs one value per block of codes, {codes.numel() // BLOCK_SIZE} (got {scales.numel()})"
        )
    values = code.to(device=codes.device, dtype=torch.float32)[codes.long()].view(-1, BLOCK_SIZE)
    return (values * scales.to(torch.float32).view(-1, 1)).reshape(-1)


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


def new_state_8bit(numel: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero Adam state for :func:`adamw8bit_step`: ``(m_codes, m_scales, v_codes, v_scales)``.

    Codes point at the zero code and scales are 0 (any code with scale 0 also reads back as zero, so all-zero uint8
    buffers are an equally valid start).
    """
    if numel % BLOCK_SIZE != 0:
        raise ValueError(f"numel: must be a multiple of BLOCK_SIZE={BLOCK_SIZE} (got {numel})")
    zero_m = int(torch.nonzero(dynamic_code_map(True) == 0)[0])
    m_codes = torch.full((numel,), zero_m, dtype=torch.uint8, device=device)
    v_codes = torch.zeros(numel, dtype=torch.uint8, device=device)
    scales = [torch.zeros(numel // BLOCK_SIZE, dtype=torch.float32, device=device) for _ in range(2)]
    return m_codes, scales[0], v_codes, scales[1]


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
    fp16); ``m_*`` is the first moment against ``dynamic_code_map(True)``, ``v_*`` the second against
    ``dynamic_code_map(False)``. ``step`` is the 1-based number of this update (bias correction); the gradient is
    multiplied by ``grad_scale`` (the clipping coefficient) first. Per element, in fp32::

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
        from regrow.trainer.zero import (
            adamw_triton as quant_triton,  # triton is only needed (and only installed) where CUDA is
        )

        quant_triton.adamw8bit_step_cuda(
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


def _dequantize_rows(codes: Tensor, scales: Tensor, code: Tensor) -> Tensor:
    """A new [blocks, 256] fp32 tensor ``code[codes] * scale`` (int32 indices: index_select is fastest with them)."""
    values = code.index_select(0, codes.to(torch.int32)).view(-1, BLOCK_SIZE)
    return values.mul_(scales.view(-1, 1))


def _requantize_rows(values: Tensor, tables: CodeTables, codes_out: Tensor, scales_out: Tensor) -> None:
    """Stores ``values`` ([blocks, 256] fp32, overwritten) as codes and new absmax scales in the state tensors."""
    absmax = values.abs().amax(dim=1, keepdim=True)
    scales_out.copy_(absmax.view(-1))
    xn = values.div_(absmax.masked_fill(absmax == 0, 1.0))  # an all-zero block stays zero: its codes are the zero code
    codes_out.copy_(_nearest_index(xn.view(-1), tables))


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
    m = _dequantize_rows(m_codes, m_scales, tables_m.code).mul_(k.beta1).add_(g * k.one_minus_beta1)
    v = _dequantize_rows(v_codes, v_scales, tables_v.code).mul_(k.beta2).add_((g * g).mul_(k.one_minus_beta2))
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
    _requantize_rows(m, tables_m, m_codes, m_scales)
    _requantize_rows(v, tables_v, v_codes, v_scales)


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
    for start in range(0, param.numel(), max(chunk, 1)):
        end = min(start + chunk, param.numel())
        g = grad[start:end]
        if needs_copy:
            g = g.to(torch.float32, copy=True)
            if grad_scale != 1.0:
                g.mul_(grad_scale)
        _fused_adamw_nonfinite_safe(param[start:end], g, m[start:end], v[start:end], needs_copy, **hyper)
    if param_out is not None:
        param_out.copy_(param)


def _fused_adamw_nonfinite_safe(
    param: Tensor, grad: Tensor, m: Tensor, v: Tensor, grad_is_copy: bool, *, step: int, **hyper: float
) -> None:
    """``torch._fused_adamw_`` on one flat slice, with the 8-bit path's handling of non-finite gradient elements.

    A finite sum proves every element finite (one read of the gradient, one host sync); only otherwise is the exact
    mask built. A sum that overflows merely takes the exact path, which then changes nothing.
    """
    bad = None if bool(torch.isfinite(grad.sum())) else ~torch.isfinite(grad)
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
