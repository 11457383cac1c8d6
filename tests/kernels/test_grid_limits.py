"""Grid limits: every launcher puts rows on grid axis 0 (up to 2**31 - 1 programs); axes 1 and 2 allow
only 65535 programs on CUDA, which caps a kernel with row blocks there at 65535 * BLOCK_M rows
(4.2M tokens for blocks of 64). The launchers run on meta tensors with 4.3M and 70M rows and a
recording ``launch`` (nothing runs): every grid they build must fit CUDA's limits, checked by
``runtime.check_grid`` (which ``runtime.launch`` applies to every launch)."""
import importlib

import pytest
import torch

from peftfast.kernels import runtime, tiles
from peftfast.kernels.adapters import make_plan

ROWS = (4_300_000, 70_000_000)  # past 65535 blocks of 64 rows; past 65535 blocks of 1024
MODULES = ("lora", "lora_fused", "ia3", "dropout", "qmatmul", "quant")


@pytest.fixture
def grids(monkeypatch):
    seen = []

    def record(kernel, grid, *args, **meta):
        seen.append((runtime.kernel_name(kernel), tuple(int(g) for g in grid)))

    for name in MODULES:
        monkeypatch.setattr(importlib.import_module(f"peftfast.kernels.{name}"), "launch", record)
    counters = dict(tiles.EPOCH_COUNTERS)  # the launchers allocate counters on the meta device: not for later tests
    yield seen
    tiles.EPOCH_COUNTERS.clear()
    tiles.EPOCH_COUNTERS.update(counters)


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _all_launchers(m: int):
    from peftfast.kernels import dropout as D, ia3 as I, lora as L, lora_fused as F

    k, n = 64, 96
    plan = make_plan((4, 3), (1.0, 2.0), (0.1, 0.0))
    for act, ad in ((torch.float16, torch.float16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x, dy = _meta(m, k, dtype=act), _meta(m, n, dtype=act)
        w = _meta(n, k, dtype=act)
        a, b = _meta(7, k, dtype=ad), _meta(n, 7, dtype=ad)
        t = L.launch_shrink(x, a, plan, 1, True)
        L.launch_shrink(x, a, plan, 1, False)
        L.launch_grad_w(t, dy, plan, 1, False, transpose_out=True)
        L.launch_grad_w(_meta(m, 7, dtype=ad), x, plan, 1, True, transpose_out=False)
        F.launch_fused_forward(x, w, None, a, b, plan, 1)
        F.launch_fused_grad_x(dy, w, _meta(m, 7, dtype=ad), a, plan, 1, x)
        F.launch_dy_pass(dy, _meta(m, 7, dtype=ad), b, plan)
        base = _meta(m, n, dtype=act)
        L.launch_expand(_meta(m, 7, dtype=ad), b, base, base)
        L.launch_grad_x(_meta(m, 7, dtype=ad), a, plan, 1, act)
        I.launch_ia3_matmul(x, _meta(k, n, dtype=act), _meta(k, dtype=act), scale_k=True, out_dtype=act)
        I.launch_ia3_scale(x, _meta(k, dtype=act), False)
        I.launch_ia3_scale_backward(x, x, _meta(k, dtype=act), False, True)
    D.keep_mask_triton(1, 0, m, 64, 0.1, device="meta")


@pytest.mark.parametrize("m", ROWS)
def test_every_grid_fits_cuda_limits(grids, m):
    _all_launchers(m)
    kernels = {name for name, _ in grids}
    assert {"_lora_shrink_kernel", "_lora_grad_w_kernel", "_lora_expand_kernel", "_lora_grad_x_kernel",
            "_lora_fused_forward_lookahead_kernel", "_lora_fused_forward_kernel", "_lora_fused_grad_x_kernel",
            "_lora_fused_dy_kernel", "_ia3_matmul_kernel", "_keep_mask_kernel"} <= kernels, kernels
    bad = []
    for name, grid in grids:
        try:
            runtime.check_grid(name, grid)
        except ValueError as err:
            bad.append(str(err))
    assert not bad, "\n".join(bad)


def test_check_grid_names_the_axis():
    runtime.check_grid("k", (2**31 - 1, 65535, 65535))
    with pytest.raises(ValueError, match="65536 programs on axis 1; CUDA allows at most 65535"):
        runtime.check_grid("k", (1, 65536))
    with pytest.raises(ValueError, match="axis 0"):
        runtime.check_grid("k", (2**31,))
    with pytest.raises(ValueError, match="1 to 3 axes"):
        runtime.check_grid("k", (1, 1, 1, 1))
