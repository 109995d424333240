"""Dynamic 8-bit block-wise quantization: the bitsandbytes code maps and exact nearest-code quantization.

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

The AdamW updates that keep their state in this form are in ``adamw.py`` (and its Triton kernel in
``adamw_triton.py``); both quantize through the tables built here.
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

    candidate = float(np.float32(float(mid)))  # the fp32 value nearest the midpoint: the search starts there
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


def dequantize_rows(codes: Tensor, scales: Tensor, code: Tensor) -> Tensor:
    """A new [blocks, 256] fp32 tensor ``code[codes] * scale`` (int32 indices: index_select is fastest with them).

    The unchecked form of :func:`dequantize_blockwise` for the AdamW update's chunks: ``code`` fp32 on the codes'
    device, ``scales`` fp32 with one value per block."""
    values = code.index_select(0, codes.to(torch.int32)).view(-1, BLOCK_SIZE)
    return values.mul_(scales.view(-1, 1))


def requantize_rows(values: Tensor, tables: CodeTables, codes_out: Tensor, scales_out: Tensor) -> None:
    """Stores ``values`` ([blocks, 256] fp32, overwritten) as codes and new absmax scales in the state tensors.

    The unchecked, in-place form of :func:`quantize_blockwise` for the AdamW update's chunks: ``values`` finite."""
    absmax = values.abs().amax(dim=1, keepdim=True)
    scales_out.copy_(absmax.view(-1))
    xn = values.div_(absmax.masked_fill(absmax == 0, 1.0))  # an all-zero block stays zero: its codes are the zero code
    codes_out.copy_(_nearest_index(xn.view(-1), tables))


# ---------------------------------------------------------------------------------------------------- new state


def zero_code(signed: bool) -> int:
    """Index of the code 0 in ``dynamic_code_map(signed)``: the code of a state element that has never moved."""
    return int(torch.nonzero(dynamic_code_map(signed) == 0)[0])


def new_state_8bit(numel: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zero Adam state for ``adamw.adamw8bit_step``: ``(m_codes, m_scales, v_codes, v_scales)``.

    Codes point at the zero code and scales are 0 (any code with scale 0 also reads back as zero, so all-zero uint8
    buffers are an equally valid start).
    """
    if numel % BLOCK_SIZE != 0:
        raise ValueError(f"numel: must be a multiple of BLOCK_SIZE={BLOCK_SIZE} (got {numel})")
    m_codes = torch.full((numel,), zero_code(True), dtype=torch.uint8, device=device)
    v_codes = torch.full((numel,), zero_code(False), dtype=torch.uint8, device=device)
    scales = [torch.zeros(numel // BLOCK_SIZE, dtype=torch.float32, device=device) for _ in range(2)]
    return m_codes, scales[0], v_codes, scales[1]
