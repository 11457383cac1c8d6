"""Test-wide setup. Triton's interpreter must be switched on before triton or any kernel module is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_backend(monkeypatch):
    """Run peftfast ops through their Triton kernels (in the interpreter on CPU tensors)."""
    monkeypatch.setenv("PEFTFAST_BACKEND", "triton")
    yield "triton"


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFTFAST_BACKEND", "torch")
    yield "torch"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
