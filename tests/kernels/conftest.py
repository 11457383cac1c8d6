"""Fixtures for the kernel tests (tests/conftest.py switches the Triton interpreter on)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Each test runs twice: through the Triton kernels (interpreter) and the PyTorch reference."""
    monkeypatch.setenv("PEFTFAST_BACKEND", request.param)
    return request.param
