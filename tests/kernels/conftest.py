"""Fixtures for the kernel tests (tests/conftest.py switches the Triton interpreter on and defines
the ``triton_backend`` / ``torch_backend`` fixtures used here)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Each test runs twice: through the Triton kernels (interpreter) and the PyTorch reference."""
    from peftfast.kernels.backend import interpreting

    if request.param == "triton" and not interpreting():
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    return request.getfixturevalue(f"{request.param}_backend")
