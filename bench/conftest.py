"""Benchmark-suite setup (``pytest bench/ --benchmark-only``; not part of the default test run).

Every benchmark records the device, versions, git sha and thread count in ``extra_info`` (and in
the machine info of a saved JSON). Timings run the PyTorch path on CPU, so Triton's interpreter
must stay off here. Threads default to 1 (``PEFTFAST_BENCH_THREADS``), as in ``peftfast bench``.
At the end, each group's median time is printed as a ratio to PEFT's, the baseline of every group.
"""
import os

import pytest
import torch

from peftfast.tools import bench

torch.set_num_threads(int(os.environ.get("PEFTFAST_BENCH_THREADS", "1")))
_ENV: dict = {}
MEDIANS: dict[str, dict[str, float]] = {}  # group -> implementation -> median seconds


def environment() -> dict:
    if not _ENV:
        _ENV.update(bench.environment())
    return _ENV


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["peftfast"] = environment()


@pytest.fixture(autouse=True)
def _record_environment(request):
    if "benchmark" in request.fixturenames:
        env = environment()
        request.getfixturevalue("benchmark").extra_info.update(
            device=env["gpu"] or env["cpu"], cpu=env["cpu"], gpu=env["gpu"], versions=env["versions"],
            git_sha=env["git_sha"], git_dirty=env["git_dirty"], torch_threads=torch.get_num_threads(),
            baseline="peft")
    yield


@pytest.fixture
def record_median():
    """Store a group's median for one implementation (pytest-benchmark's stats, or a given value)."""
    def record(group: str, impl: str, benchmark=None, seconds: float | None = None) -> None:
        if seconds is None and benchmark is not None and benchmark.stats is not None:
            seconds = benchmark.stats.stats.median
        if seconds is not None:
            MEDIANS.setdefault(group, {})[impl] = seconds
    return record


def pytest_terminal_summary(terminalreporter):
    lines = []
    for group, times in sorted(MEDIANS.items()):
        if "peft" in times:
            ratios = ", ".join(f"{impl} / PEFT = {t / times['peft']:.3f}" for impl, t in sorted(times.items())
                               if impl != "peft")
            lines.append(f"{group}: {ratios}  (medians; PEFT {times['peft'] * 1e3:.3f} ms)")
    if lines:
        terminalreporter.write_sep("-", "ratio of medians to the PEFT baseline of each group")
        for line in lines:
            terminalreporter.write_line(line)
