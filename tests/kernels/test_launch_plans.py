"""Each op's launch plan (the pure functions its launchers call) gives the numbers the cost model
(peftfast.tools.costmodel) assumes, over a grid of shapes and dtypes; and the launchers really use
them (the grids of the kernels counted in the interpreter)."""
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


@pytest.mark.parametrize("ad", [F16, BF16, F32])
@pytest.mark.parametrize("by_adapter", [False, True])
def test_grad_w_splits_matches_costmodel(ad, by_adapter):
    for t, n, ranks in itertools.product(TOKENS, FEATURES, RANKS):
        assert grad_w_splits(t, n, ranks, ad, by_adapter) == cm.lora_grad_splits(t, n, ranks, ad, by_adapter), \
            (t, n, ranks)


@pytest.mark.parametrize("act", [F16, BF16])
def test_shrink_items_matches_costmodel(act):
    for d_in, d_out in itertools.product(FEATURES, FEATURES):
        assert shrink_items(d_in, d_out, act) == cm.fused_shrink_items(d_in, d_out, act), (d_in, d_out)


@pytest.mark.parametrize("act,ad", PAIRS)
def test_dy_plan_matches_costmodel(act, ad):
    for t, d_out, ranks in itertools.product(TOKENS, FEATURES, RANKS):
        assert dy_plan(t, d_out, ranks, act, ad) == cm.fused_dy_splits(t, d_out, ranks, act, ad), (t, d_out, ranks)


@pytest.mark.parametrize("act,ad", PAIRS)
def test_dx_block_m_matches_costmodel(act, ad):
    """The dense fused dX rows per program are the cost model's default; the quantised ones are what
    its QLoRA backward uses (seen in the dA partials it writes: they differ for 16, 64 and 128 rows)."""
    assert fused_dx_block_m(act) == (64 if act == F32 else 128)
    for t in TOKENS:
        shape = (t, 256, 192, [7, 9], act, ad)
        assert cm.peftfast_fused_backward(*shape) == cm.peftfast_fused_backward(
            *shape, block_m_dx=fused_dx_block_m(act))
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
    assert dx_grid[0] == -(-t // fused_dx_block_m(F16)) * -(-d_in // 64)

    base = torch.randn(t, d_out, generator=g).to(F16)
    y = lora.lora_linear(x, base, a, b, [1.0, 2.0], [0.1, 0.2], True)
    with count_triton() as tr:
        y.backward(dy)
    grad_w = [k.grid for k in tr.launch_log if "grad_w" in k.name]
    assert [gr[2] for gr in grad_w] == [grad_w_splits(t, d_out, ranks, F32, False),
                                        grad_w_splits(t, d_in, ranks, F32, True)]
