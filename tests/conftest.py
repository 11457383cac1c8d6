"""Test-wide setup. Triton's interpreter must be switched on before triton or any kernel module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


BACKENDS = ("default", "torch", "triton")


def select_backend(monkeypatch, name: str) -> str:
    """The one place tests choose the op backend: PEFTFAST_BACKEND for this test ('default': left as it is,
    i.e. peftfast's own choice, the PyTorch reference on CPU)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    if name != "default":
        monkeypatch.setenv("PEFTFAST_BACKEND", name)
    return name


@pytest.fixture
def backend(request, monkeypatch):
    """The op backend as an indirect parameter: ``@pytest.mark.parametrize("backend", ["torch", "triton"],
    indirect=True)``; without a parameter, 'default'."""
    yield select_backend(monkeypatch, getattr(request, "param", "default"))


@pytest.fixture
def triton_backend(monkeypatch):
    """Run peftfast ops through their Triton kernels (in the interpreter on CPU tensors)."""
    yield select_backend(monkeypatch, "triton")


@pytest.fixture
def torch_backend(monkeypatch):
    """Run peftfast ops through their PyTorch references."""
    yield select_backend(monkeypatch, "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
