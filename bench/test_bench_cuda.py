"""GPU time of the Triton kernels (needs CUDA; skipped elsewhere).

Each comparison times the base matmul alone, PEFT and peftfast with ``triton.testing.do_bench``
(CUDA events; forward, and forward + backward), stored in ``extra_info`` with the ratio to the
base matmul, and also through pytest-benchmark (synchronised calls) so the groups line up with
the CPU suite. PEFT is the baseline of each group.
"""
import pytest
import torch

from peftfast.tools import bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU for the Triton kernels")
pytest.importorskip("peft")
COMPARISONS = bench.cuda_comparisons(quick=False)
_BUILT: dict = {}


def _sides(comp: bench.Comparison) -> dict:
    if comp.key not in _BUILT:
        _BUILT.clear()  # one comparison's tensors on the GPU at a time
        torch.cuda.empty_cache()
        with bench.quiet():
            _BUILT[comp.key] = comp.build()
    return _BUILT[comp.key]


@pytest.mark.parametrize("impl", ["base", "peft", "peftfast"])
@pytest.mark.parametrize("comp", COMPARISONS, ids=[c.key for c in COMPARISONS])
def test_cuda_step(benchmark, record_median, comp, impl):
    pytest.importorskip("triton")
    sides = _sides(comp)
    side = sides[impl]
    fwd = bench.do_bench_ms(side.fwd, quick=False)
    step = bench.do_bench_ms(side.step, quick=False)
    base_fwd = bench.do_bench_ms(sides["base"].fwd, quick=False)
    base_step = bench.do_bench_ms(sides["base"].step, quick=False)
    benchmark.group = comp.key
    benchmark.extra_info.update(
        impl=impl, comparison=comp.label, do_bench_fwd_ms=fwd, do_bench_step_ms=step,
        fwd_ratio_to_base=fwd[0] / base_fwd[0],
        bwd_ratio_to_base=(step[0] - fwd[0]) / max(base_step[0] - base_fwd[0], 1e-9))

    def run():
        side.step()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    record_median(comp.key, impl, seconds=step[0] / 1e3)
