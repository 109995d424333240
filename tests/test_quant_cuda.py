"""GPU tests of trainer/zero/adamw.py and adamw_triton.py: the Triton 8-bit AdamW kernel against the CPU path, and the 32-bit step on CUDA.

Skipped where CUDA or triton is missing (the CPU development machine). Agreement figures are printed (run with -s).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from regrow.trainer.zero import adamw, codes
from regrow.trainer.zero.adamw import adamw8bit_step, adamw32bit_step
from regrow.trainer.zero.codes import BLOCK_SIZE, new_state_8bit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs CUDA and triton"
)

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _gradient(n: int, generator: torch.Generator, dtype: torch.dtype, decades: tuple[int, int]) -> torch.Tensor:
    """Gradients spanning ``decades`` of magnitude within every block, with some NaN, +Inf and -Inf."""
    exponent = torch.randint(decades[0], decades[1] + 1, (n,), generator=generator).float()
    grad = (torch.randn(n, generator=generator) * torch.pow(10.0, exponent)).to(dtype)
    for value in (float("nan"), float("inf"), float("-inf")):
        grad[torch.randint(0, n, (max(1, n // 50000),), generator=generator)] = value
    return grad


def _compare_one_step(
    param: torch.Tensor, grad: torch.Tensor, state: tuple[torch.Tensor, ...], step: int, grad_scale: float,
    out_dtype: torch.dtype | None,
) -> dict[str, float]:  # fmt: skip
    """One step on the GPU and on the CPU from identical inputs (the CPU tensors are updated in place)."""
    gpu = [t.cuda() for t in (param, grad, *state)]
    out_gpu = None if out_dtype is None else torch.empty(param.numel(), dtype=out_dtype, device="cuda")
    out_cpu = None if out_dtype is None else torch.empty(param.numel(), dtype=out_dtype)
    adamw8bit_step(gpu[0], gpu[1], *gpu[2:], step=step, grad_scale=grad_scale, param_out=out_gpu, **HYPER)
    adamw8bit_step(param, grad, *state, step=step, grad_scale=grad_scale, param_out=out_cpu, **HYPER)
    p_gpu, mc, ms, vc, vs = (t.cpu() for t in (gpu[0], *gpu[2:]))
    figures = {
        "param_identical": float((p_gpu == param).float().mean()),
        "param_max_abs_diff": float((p_gpu - param).abs().max()),
        "m_codes_identical": float((mc == state[0]).float().mean()),
        "v_codes_identical": float((vc == state[2]).float().mean()),
        "max_code_diff": float(torch.maximum((mc.int() - state[0].int()).abs().max(),
                                             (vc.int() - state[2].int()).abs().max())),
        "scales_identical": float(torch.cat([ms == state[1], vs == state[3]]).float().mean()),
    }  # fmt: skip
    if out_dtype is not None:
        figures["param_out_identical"] = float((out_gpu.cpu() == out_cpu).float().mean())
        assert torch.equal(out_cpu, param.to(out_dtype))
    return figures


def _assert_agreement(figures: dict[str, float]) -> None:
    """The brief's bar: codes identical for >= 99.9%, never more than one code apart; parameters within fp32 noise."""
    assert figures["m_codes_identical"] >= 0.999 and figures["v_codes_identical"] >= 0.999, figures
    assert figures["max_code_diff"] <= 1, figures
    assert figures["param_max_abs_diff"] <= 1e-5, figures


@pytest.mark.parametrize(
    "grad_dtype, decades", [(torch.bfloat16, (-8, 0)), (torch.float32, (-8, 0)), (torch.float32, (-44, 3))]
)
def test_triton_kernel_matches_cpu_path(grad_dtype: torch.dtype, decades: tuple[int, int]) -> None:
    n = 2**20
    g = torch.Generator().manual_seed(1)
    param = torch.randn(n, generator=g)
    state = new_state_8bit(n)
    for step, grad_scale in ((1, 1.0), (2, 0.75), (3, 1.0)):
        grad = _gradient(n, g, grad_dtype, decades)
        figures = _compare_one_step(param, grad, state, step, grad_scale, torch.bfloat16)
        print(f"\n[{grad_dtype}, 1e{decades[0]}..1e{decades[1]}, step {step}] {figures}")
        _assert_agreement(figures)


def test_triton_result_does_not_depend_on_tile_shape() -> None:
    from regrow.trainer.zero import adamw_triton as quant_triton

    n = 300 * BLOCK_SIZE  # not a multiple of any tile: the last program is partly masked
    g = torch.Generator().manual_seed(2)
    param = torch.randn(n, generator=g).cuda()
    grad = _gradient(n, g, torch.bfloat16, (-6, 0)).cuda()
    k = adamw.adam_scalars(step=4, grad_scale=0.5, **HYPER)
    tables = codes.state_tables(True, param.device), codes.state_tables(False, param.device)
    start_state = (  # nonzero state, so that dequantization matters
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
        torch.rand(n // BLOCK_SIZE, generator=g) * 1e-3,
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
        torch.rand(n // BLOCK_SIZE, generator=g) * 1e-6,
    )
    results = []
    for rows, warps in ((1, 1), (2, 2), (8, 8), (16, 4)):
        p, out = param.clone(), torch.empty(n, dtype=torch.float16, device="cuda")
        state = [t.cuda() for t in start_state]
        quant_triton.adamw8bit_step_cuda(p, grad, *state, k, *tables, out, rows=rows, num_warps=warps)
        results.append((p, out, *state))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_triton_without_param_out_and_with_fp16_copy() -> None:
    n = 64 * BLOCK_SIZE
    g = torch.Generator().manual_seed(3)
    param = torch.randn(n, generator=g)
    grad = _gradient(n, g, torch.float16, (-4, 0))
    for out_dtype in (None, torch.float16, torch.float32):
        figures = _compare_one_step(param.clone(), grad, new_state_8bit(n), 1, 1.0, out_dtype)
        _assert_agreement(figures)


def test_32bit_step_on_cuda_equals_torch_fused_adamw() -> None:
    n = 256 * BLOCK_SIZE
    g = torch.Generator(device="cuda").manual_seed(4)
    start = torch.randn(n, device="cuda", generator=g)
    param, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                  eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], fused=True)  # fmt: skip
    for step in range(1, 5):
        grad = torch.randn(n, device="cuda", generator=g)
        adamw32bit_step(param, grad, m, v, step=step, **HYPER)
        reference.grad = grad.clone()
        optimizer.step()
        assert torch.equal(param, reference.detach()), f"step {step}"
        assert torch.equal(m, optimizer.state[reference]["exp_avg"])


def test_triton_kernel_with_64bit_offsets() -> None:
    """A shard of 2**31 elements or more takes the kernel's 64-bit offsets; its last blocks must match the CPU path.

    Blocks are independent, so the CPU path run on a slice gives what the kernel must give on that slice. ~17 GB.
    """
    n = 2**31 + 4 * BLOCK_SIZE
    g = torch.Generator(device="cuda").manual_seed(5)
    param = torch.randn(n, device="cuda", generator=g)
    grad = (torch.randn(n, device="cuda", generator=g) * 1e-3).to(torch.bfloat16)
    state = [
        torch.randint(0, 256, (n,), device="cuda", generator=g, dtype=torch.uint8),
        torch.rand(n // BLOCK_SIZE, device="cuda", generator=g) * 1e-3,
        torch.randint(0, 256, (n,), device="cuda", generator=g, dtype=torch.uint8),
        torch.rand(n // BLOCK_SIZE, device="cuda", generator=g) * 1e-6,
    ]
    tail = slice(n - 2**16, n)
    tail_blocks = slice(tail.start // BLOCK_SIZE, n // BLOCK_SIZE)
    cpu = [param[tail].cpu(), grad[tail].cpu(), state[0][tail].cpu(), state[1][tail_blocks].cpu(),
           state[2][tail].cpu(), state[3][tail_blocks].cpu()]  # fmt: skip
    adamw8bit_step(param, grad, *state, step=2, **HYPER)
    adamw8bit_step(*cpu, step=2, **HYPER)
    torch.cuda.synchronize()
    assert torch.equal(param[tail].cpu(), cpu[0])
    assert torch.equal(state[0][tail].cpu(), cpu[2]) and torch.equal(state[2][tail].cpu(), cpu[4])
    assert torch.equal(state[1][tail_blocks].cpu(), cpu[3]) and torch.equal(state[3][tail_blocks].cpu(), cpu[5])
