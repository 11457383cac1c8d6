"""Each op's launch plan (the pure functions its launchers call, which the cost model in
peftfast.tools.costmodel also calls) follows the rule its docstrings and the cost model's formulas
document, written out independently below, over a grid of shapes and dtypes; and the launchers really
use them (the grids of the kernels counted in the interpreter)."""
import itertools

import pytest
import torch
from peftfast.kernels import dy_plan, fused_dx_block_m, grad_w_splits, qlora_dx_block_m, shrink_items

from peftfast.tools import costmodel as cm

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOKENS = (1, 7, 16, 17, 40, 63, 64, 65, 129, 1000, 4096, 8192, 65536)
FEATURES = (1, 45, 64, 65, 300, 1024, 4096, 11008)
RANKS = ([1], [7], [16], [17], [8, 8], [7, 20], [64], [100, 3], [128], [256])
PAIRS = ((F16, F16), (BF16, BF16), (F32, F32), (F16, F32), (BF16, F32))  # (activations, adapters)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def documented_grad_w_splits(t, n, ranks, ad, by_adapter):
    """Rank tiles of 16/64/128 covering the largest rank (per adapter when dropout masks differ) or R;
    column blocks of 64; row blocks of 32 for fp32 operands, 64 otherwise; enough programs for ~4 waves
    on 132 SMs (528), at most one split per row block."""
    extent = max(ranks) if by_adapter else sum(ranks)
    block_r = next((b for b in (16, 64, 128) if b >= extent), 128)
    tiles = sum(cdiv(r, block_r) for r in ranks) if by_adapter else cdiv(sum(ranks), block_r)
    block_m = 32 if ad == torch.float32 else 64
    splits = max(1, min(cdiv(528, tiles * cdiv(n, 64)), cdiv(t, block_m)))
    rows = cdiv(cdiv(t, splits), block_m) * block_m
    return cdiv(t, rows)


def documented_shrink_items(d_in, d_out, act):
    """min(4, column blocks of 64, K blocks of 64) slices, rounded to whole K blocks."""
    k_blocks, n_blocks = cdiv(d_in, 64), cdiv(d_out, 64)
    k_per_item = cdiv(k_blocks, min(4, n_blocks, k_blocks)) * 64
    return cdiv(d_in, k_per_item)


def documented_dy_plan(t, d_out, ranks, act, ad):
    """Rank tiles of 16 (R <= 16, 16-bit adapters) or 32; N blocks of 256 and row blocks of 16 (fp32
    adapters on a 16-bit model: N blocks of 64; fp32 model: 128); ~264 programs."""
    big_r = sum(ranks)
    tiles = cdiv(big_r, 16 if big_r <= 16 and ad != F32 else 32)
    block_n, block_m = (128, 16) if act == ad == F32 else (64, 16) if ad == F32 else (256, 16)
    n_blocks = cdiv(d_out, block_n)
    splits = max(1, min(cdiv(264, tiles * n_blocks), cdiv(t, block_m)))
    rows = cdiv(cdiv(t, splits), block_m) * block_m
    return n_blocks, cdiv(t, rows)


@pytest.mark.parametrize("ad", [F16, BF16, F32])
@pytest.mark.parametrize("by_adapter", [False, True])
def test_grad_w_splits_follows_its_rule(ad, by_adapter):
    for t, n, ranks in itertools.product(TOKENS, FEATURES, RANKS):
        assert grad_w_splits(t, n, ranks, ad, by_adapter) == documented_grad_w_splits(t, n, ranks, ad, by_adapter), \
            (t, n, ranks)


@pytest.mark.parametrize("act", [F16, BF16])
def test_shrink_items_follows_its_rule(act):
    for d_in, d_out in itertools.product(FEATURES, FEATURES):
        assert shrink_items(d_in, d_out, act) == documented_shrink_items(d_in, d_out, act), (d_in, d_out)


@pytest.mark.parametrize("act,ad", PAIRS)
def test_dy_plan_follows_its_rule(act, ad):
    for t, d_out, ranks in itertools.product(TOKENS, FEATURES, RANKS):
        assert dy_plan(t, d_out, ranks, act, ad) == documented_dy_plan(t, d_out, ranks, act, ad), (t, d_out, ranks)


@pytest.mark.parametrize("act,ad", PAIRS)
def test_dx_block_m_matches_costmodel(act, ad):
    """The dense fused dX rows per program are the cost model's default; the quantised ones are what
    its QLoRA backward uses (seen in the dA partials it writes: they differ for 16, 64 and 128 rows)."""
    assert fused_dx_block_m(act, ad) == (64 if F32 in (act, ad) else 128)
    for t in TOKENS:
        shape = (t, 256, 192, [7, 9], act, ad)
        assert cm.peftfast_fused_backward(*shape) == cm.peftfast_fused_backward(
            *shape, block_m_dx=fused_dx_block_m(act, ad))
        dense = cm.peftfast_fused_backward(*shape, block_m_dx=qlora_dx_block_m(t, act))
        quant = cm.qlora_fused_backward(*shape)
        assert [k.bytes_written for k in quant] == [k.bytes_written for k in dense], t
    assert [qlora_dx_block_m(t, act) for t in (1, 16, 17, 8192)] == [16, 16, 64, 64]


def test_launchers_use_the_plans(triton_backend):
    """The dY pass is launched on (rank tiles, dy_plan's N blocks, dy_plan's splits); the weight
    gradient of lora.py on grad_w_splits splits; the dense fused dX kernel on fused_dx_block_m rows."""
    from peftfast.kernels import lora, lora_fused

    from peftfast.tools.traffic import count_triton

    t, d_in, d_out, ranks = 150, 45, 300, [7, 20]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=g).to(F16).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=g) / 8).to(F16)
    a = [torch.randn(r, d_in, generator=g).requires_grad_(True) for r in ranks]
    b = [torch.randn(d_out, r, generator=g).requires_grad_(True) for r in ranks]
    dy = torch.randn(t, d_out, generator=g).to(F16)
    y = lora_fused.lora_linear_fused(x, w, None, a, b, [1.0, 2.0], [0.0, 0.0], True)
    with count_triton() as tr:
        y.backward(dy)
    grids = {k.name: k.grid for k in tr.launch_log}
    dy_grid = next(v for n, v in grids.items() if "dy" in n)
    assert tuple(dy_grid[1:]) == dy_plan(t, d_out, ranks, F16, F32)
    dx_grid = next(v for n, v in grids.items() if "grad_x" in n)
    assert dx_grid[0] == -(-t // fused_dx_block_m(F16, F32)) * -(-d_in // 64)

    base = torch.randn(t, d_out, generator=g).to(F16)
    y = lora.lora_linear(x, base, a, b, [1.0, 2.0], [0.1, 0.2], True)
    with count_triton() as tr:
        y.backward(dy)
    grad_w = [k.grid for k in tr.launch_log if "grad_w" in k.name]
    assert [gr[2] for gr in grad_w] == [grad_w_splits(t, d_out, ranks, F32, False),
                                        grad_w_splits(t, d_in, ranks, F32, True)]
