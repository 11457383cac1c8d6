"""CPU wall time of the PyTorch path against PEFT: the comparisons of ``peftfast bench``.

Each comparison is one pytest-benchmark group with two members, ``peft`` (the baseline) and
``peftfast``, built once on the same model, inputs and adapter weights. The timed call is a
forward plus backward (a training step for the tiny Llama).
"""
import pytest

from peftfast.tools import bench

pytest.importorskip("peft")
COMPARISONS = bench.cpu_comparisons(quick=False)
_BUILT: dict = {}


def _sides(comp: bench.Comparison) -> dict:
    if comp.key not in _BUILT:
        with bench.quiet():
            _BUILT[comp.key] = comp.build()
    return _BUILT[comp.key]


@pytest.mark.parametrize("impl", ["peft", "peftfast"])
@pytest.mark.parametrize("comp", COMPARISONS, ids=[c.key for c in COMPARISONS])
def test_cpu_step(benchmark, record_median, comp, impl):
    benchmark.group = comp.key
    benchmark.extra_info.update(impl=impl, comparison=comp.label)
    step = _sides(comp)[impl].step
    benchmark(step)
    record_median(comp.key, impl, benchmark)
