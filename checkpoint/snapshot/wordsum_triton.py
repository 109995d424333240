"""WordSum-128 (``wordsum.py``) of a CUDA tensor's bytes, as one Triton kernel (imported lazily, CUDA only).

:func:`digest_cuda` enqueues the digest on the current stream and returns it as a device tensor, so the snapshot
sink digests each shard tensor on the copy's side stream, right before copying it, and the CPU never waits and never
reads the payload. The result is bit-equal to ``wordsum.digest`` of the same bytes.

The kernel: a grid of at most ``_PROGRAMS_PER_SM`` programs per SM, each striding over blocks of ``_BLOCK_WORDS``
words and accumulating, per lane in uint64 (wrapping, i.e. mod 2^64), the sum of its words and the running sum of
that sum (from which the position-weighted sum follows with one multiply per lane at the end: see the kernel), then
reducing its lanes and adding its two sums into the output with integer atomics. Integer addition mod 2^64 is associative and
commutative, so the result does not depend on the schedule: deterministic without floating point. Words are loaded
as int32 when the tensor's first byte is 4-byte aligned (the last, partial word then read byte-wise by program 0),
and assembled from four byte loads otherwise (a view at an odd storage offset); bytes past the end read as zero,
which is the definition's padding.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from regrow.checkpoint.snapshot.wordsum import Digest

_BLOCK_WORDS = 2048
"""Words per program per iteration (8 KiB): 8 independent loads per thread with 8 warps. A first choice, not tuned
on hardware yet: the kernel reads each byte once, so the target is memory bandwidth (0.6 GB in well under 1 ms)."""
_WARPS = 8
_PROGRAMS_PER_SM = 4
"""Programs per SM (32 resident warps): enough to keep loads in flight, and few programs, so the two atomics each
adds at the end cost nothing."""


# Sizes stay runtime values even when they equal 1 (Triton would make such arguments constants, without ``.to``).
@triton.jit(do_not_specialize=["nbytes", "whole_words", "iterations"])
def _wordsum_kernel(src_ptr, out_ptr, nbytes, whole_words, iterations,
                    BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    # Per lane, over the iterations t = 0 .. T-1 that read its words w_t: acc_a = sum(w_t) and, Fletcher-style,
    # acc_f = sum of the running acc_a = sum((T - t) * w_t). Only 64-bit additions in the loop (a 64-bit multiply
    # per word made the first version compute-bound at a fifth of the memory bandwidth); the weights are applied
    # once per lane after it.
    acc_a = tl.zeros([BLOCK], dtype=tl.uint64)
    acc_f = tl.zeros([BLOCK], dtype=tl.uint64)
    for iteration in range(iterations):
        index = (iteration * programs + pid).to(tl.int64) * BLOCK + lanes
        if ALIGNED:
            words_ptr = src_ptr.to(tl.pointer_type(tl.int32))
            raw = tl.load(words_ptr + index, mask=index < whole_words, other=0)
            word = raw.to(tl.uint32, bitcast=True).to(tl.uint64)
        else:
            byte = index * 4
            word = tl.zeros([BLOCK], dtype=tl.uint64)
            for k in tl.static_range(4):
                part = tl.load(src_ptr + byte + k, mask=byte + k < nbytes, other=0)
                word = word | (part.to(tl.uint64) << (8 * k))
        acc_a += word
        acc_f += acc_a
    # Word t of a lane sits at index t * programs * BLOCK + pid * BLOCK + lane, so its weight index + 1 splits
    # into (pid * BLOCK + lane + 1), common to the lane, plus t * programs * BLOCK; and sum(t * w_t) = T * A - F.
    total = iterations.to(tl.uint64)
    acc_t = total * acc_a - acc_f
    first = (pid.to(tl.uint64) * BLOCK + lanes.to(tl.uint64) + 1)
    stride = programs.to(tl.uint64) * BLOCK
    a = tl.sum(acc_a, axis=0)
    b = tl.sum(first * acc_a + stride * acc_t, axis=0)
    if ALIGNED:  # the partial last word (0 to 3 bytes, zero-padded), added once: by program 0
        k4 = tl.arange(0, 4)
        tail_byte = whole_words.to(tl.int64) * 4 + k4
        end = tl.where(pid == 0, nbytes, 0)  # the other programs read nothing
        part = tl.load(src_ptr + tail_byte, mask=tail_byte < end, other=0)
        tail = tl.sum(part.to(tl.uint64) << (8 * k4).to(tl.uint64), axis=0)
        a += tail
        b += (whole_words.to(tl.uint64) + 1) * tail
    tl.atomic_add(out_ptr, a.to(tl.int64, bitcast=True))
    tl.atomic_add(out_ptr + 1, b.to(tl.int64, bitcast=True))


@functools.cache
def sm_count(device_index: int) -> int:
    """The streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def digest_cuda(tensor: torch.Tensor, out: torch.Tensor | None = None, *, max_programs: int | None = None
                ) -> torch.Tensor:
    """Enqueues the WordSum-128 of ``tensor``'s bytes (its elements in row-major order, as a host copy holds them)
    on the current CUDA stream and returns ``out``: an int64 device tensor ``[A, B]`` holding the two uint64 words'
    bit patterns (:func:`to_digest` reads it). Never synchronizes the CPU.

    ``out``, when given, must be a zeroed int64 CUDA tensor of 2 elements on ``tensor``'s device: the kernel adds
    into it. A non-contiguous ``tensor`` is first made contiguous (a copy on the current stream). ``max_programs``
    caps the grid (default: enough programs to fill the GPU; ``bench/bench_digest.py`` measures caps: beside
    training kernels a capped digest runs longer and costs them more). The result does not depend on it."""
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"digest_cuda: max_programs={max_programs} must be >= 1 (or None: fill the GPU)")
    if out is None:
        out = torch.zeros(2, dtype=torch.int64, device=tensor.device)
    elif out.dtype != torch.int64 or out.numel() != 2 or out.device != tensor.device:
        raise ValueError(f"digest_cuda: out must be a zeroed int64 tensor of 2 elements on {tensor.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    source = tensor.contiguous().reshape(-1).view(torch.uint8)
    nbytes = source.numel()
    if nbytes == 0:
        return out
    total_words = (nbytes + 3) // 4
    aligned = source.data_ptr() % 4 == 0
    whole_words = nbytes // 4 if aligned else total_words
    blocks = triton.cdiv(total_words, _BLOCK_WORDS)
    sms = sm_count(source.device.index) if source.is_cuda else 1  # not CUDA: Triton's CPU interpreter
    programs = min(blocks, _PROGRAMS_PER_SM * sms, max_programs or blocks)
    iterations = triton.cdiv(blocks, programs)
    _wordsum_kernel[(programs,)](source, out, nbytes, whole_words, iterations,
                                 BLOCK=_BLOCK_WORDS, ALIGNED=aligned, num_warps=_WARPS)
    return out


def to_digest(result: torch.Tensor) -> Digest:
    """The :class:`~regrow.checkpoint.snapshot.wordsum.Digest` held by a :func:`digest_cuda` result (synchronizes
    when the result is still on the device)."""
    return Digest.from_int64(*result.tolist())
