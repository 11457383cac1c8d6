"""Fixtures for the kernel tests (tests/conftest.py switches the Triton interpreter on and defines
the ``triton_backend`` / ``torch_backend`` fixtures used here)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def gpu_dot_rounding():
    """Every kernel test runs with ``tl.dot``'s ``input_precision`` honoured as a GPU computes it
    (tests/dot_precision.py: fp32 operands rounded to TF32 for "tf32", split for "tf32x3"); the
    interpreter alone would multiply them in full fp32 and hide TF32's error."""
    from tests import dot_precision

    dot_precision.enable()
    yield
    dot_precision.disable()


@pytest.fixture
def triton_kernels(triton_backend):
    """The Triton backend, skipped where the kernels cannot run on the tests' CPU tensors (no
    TRITON_INTERPRET=1)."""
    from peftfast.kernels.backend import interpreting

    if not interpreting():
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    return triton_backend


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Each test runs twice: through the Triton kernels (interpreter) and the PyTorch reference."""
    return request.getfixturevalue("triton_kernels" if request.param == "triton" else "torch_backend")


@pytest.fixture(autouse=True)
def no_meta_counters_left():
    """No test leaves epoch-counter buffers on the meta device in ``tiles.EPOCH_COUNTERS`` (the
    counter checks of later tests read every buffer there)."""
    yield
    from peftfast.kernels import tiles

    left = [key for key in tiles.EPOCH_COUNTERS if getattr(key[0], "type", None) == "meta"]
    assert not left, f"epoch counters left on the meta device: {left}"
