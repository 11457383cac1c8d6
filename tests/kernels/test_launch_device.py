"""Every kernel launch goes through ``runtime.launch``: under the input's CUDA device, refused during
CUDA-graph capture, with per-stream counters keyed by the stream the launch uses. No GPU here: the
CUDA calls are replaced by recorders and a tensor that claims to live on cuda:1."""
import ast
import contextlib
from pathlib import Path

import pytest
import torch

import peftfast.kernels as kernels_pkg
from peftfast.kernels import runtime, tiles

KERNEL_DIR = Path(kernels_pkg.__file__).parent


def test_no_kernel_is_launched_outside_runtime_launch():
    """``kernel[grid](...)`` (a call of a subscript) appears only in runtime.py; every other module
    calls ``launch(kernel, grid, ...)``."""
    offenders = []
    for path in sorted(KERNEL_DIR.glob("*.py")):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"kernels launched without runtime.launch: {offenders}"
    uses = [p.name for p in KERNEL_DIR.glob("*.py") if "launch(_" in p.read_text()]
    assert {"lora.py", "lora_fused.py", "qmatmul.py", "quant.py", "ia3.py", "dropout.py"} <= set(uses), uses


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1 (what runtime.launch looks at)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def _fake_cuda_tensor():
    return torch.Tensor._make_subclass(_OnCuda1, torch.zeros(4))


class _Kernel:
    arg_names = ["x_ptr", "n"]
    fn = None

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **meta: self.log.append(("launch", grid))


@pytest.fixture
def cuda_recorder(monkeypatch):
    log = []

    @contextlib.contextmanager
    def device(d):
        log.append(("enter", torch.device(d)))
        yield
        log.append(("exit", torch.device(d)))

    monkeypatch.setattr(runtime.torch.cuda, "device", device)
    monkeypatch.setattr(runtime.torch.cuda, "is_current_stream_capturing", lambda: False)
    return log


def test_launch_runs_under_the_inputs_device(cuda_recorder):
    runtime.launch(_Kernel(cuda_recorder), (3,), _fake_cuda_tensor(), 4)
    assert cuda_recorder == [("enter", torch.device("cuda", 1)), ("launch", (3,)), ("exit", torch.device("cuda", 1))]


def test_launch_refuses_cuda_graph_capture(cuda_recorder, monkeypatch):
    monkeypatch.setattr(runtime.torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        runtime.launch(_Kernel(cuda_recorder), (3,), _fake_cuda_tensor(), 4)
    assert cuda_recorder == []  # nothing launched
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        tiles.epoch_counters(torch.device("cuda", 1), 16)


def test_counters_keyed_by_the_launch_stream(monkeypatch):
    """epoch_counters keys its buffer by (device, the stream runtime.launch_stream names), which is
    the current stream of that device: the one Triton launches on under runtime.launch."""
    current = {0: 111, 1: 222}

    class _Stream:
        def __init__(self, raw):
            self.cuda_stream = raw

    monkeypatch.setattr(runtime.torch.cuda, "current_stream", lambda d: _Stream(current[torch.device(d).index]))
    monkeypatch.setattr(runtime.torch.cuda, "is_current_stream_capturing", lambda: False)
    made = []
    real_zeros = torch.zeros

    def zeros(n, dtype, device):
        made.append(device)
        return real_zeros(n, dtype=dtype)

    monkeypatch.setattr(tiles.torch, "zeros", zeros)
    monkeypatch.setattr(tiles, "EPOCH_COUNTERS", {})
    dev1 = torch.device("cuda", 1)
    assert runtime.launch_stream(dev1) == 222 and runtime.launch_stream(torch.device("cpu")) == 0
    first, base = tiles.epoch_counters(dev1, 10)
    assert set(tiles.EPOCH_COUNTERS) == {(dev1, 222)}
    again, next_base = tiles.epoch_counters(dev1, 10)
    assert again is first and next_base > base  # same stream: reused, a new epoch per launch
    current[1] = 333  # another stream made current on cuda:1
    other, _ = tiles.epoch_counters(dev1, 10)
    assert other is not first and set(tiles.EPOCH_COUNTERS) == {(dev1, 222), (dev1, 333)}
    assert made == [dev1, dev1]
