"""Triton kernels, their launchers, autograd and custom ops, and PyTorch references.

Installed as ``peftfast.kernels``. Imports torch and triton only, never ``peftfast``.

Layout (one file per op; shared pieces are public names in shared modules):

    backend.py / runtime.py   backend choice, launch on the input's device, dtype names, dot precision,
                              AOT signatures, the target GPU a launch is planned for, launch recording
    aot.py / launch_specs.py  compile-report specs; the launches of representative shapes per GPU
                              architecture, as Triton compiles them (alignment, constants)
    tiles.py                  grouped tile order, epoch counters, ordered partial sums
    adapters.py               the adapter plan and tables, the adapter epilogues of the GEMMs
    opdecl.py                 one declaration per op -> custom op + fake + backward + eager autograd
    autotune.py               measured dispatch: candidates timed once per key on CUDA, cached on disk
    dropout.py                the counter-based dropout mask (Triton and PyTorch, same bits)
    quant.py                  bitsandbytes 4-bit / int8 storage and dequantisation
    lora.py                   lora_linear: the adapters on a base layer's output
    lora_fused.py             lora_linear_fused: the adapters inside the base linear's GEMMs; DoRA's
                              dora_linear_fused / dora_row_norm_fused on the same kernels
    lora_grouped.py           lora_grouped (import it from the module: its name is the module's): each
                              row its own adapter (mixed batches), rows grouped by adapter; and
                              lora_grouped_linear: the base linear's GEMM fused in (prefill)
    lora_grouped_embedding.py lora_grouped_embedding: mixed batches on an embedding (PyTorch ops)
    qmatmul.py                matmul_4bit / matmul_int8: GEMMs over quantised weights
    qlora.py                  qlora_linear_fused: the adapters inside the quantised GEMMs
    ia3.py                    ia3_linear / ia3_scale_*: IA3 scales inside the matmul
    lycoris.py                loha_linear / lokr_linear: the LoHa / LoKr delta generated inside the GEMMs

The public ops and launch plans below are importable from here; the submodules are imported on
first use (so that TRITON_INTERPRET, read when a kernel module is imported, can still be set by
whoever imports ``peftfast.kernels.backend`` first).
"""
from __future__ import annotations

import importlib

from .backend import backend_name, interpreting, triton_available, use_triton

_EXPORTS = {
    "lora_linear": "lora", "grad_w_splits": "lora",
    "lora_linear_fused": "lora_fused", "shrink_items": "lora_fused", "dy_plan": "lora_fused",
    "fused_dx_block_m": "lora_fused", "dora_linear_fused": "lora_fused", "dora_row_norm_fused": "lora_fused",
    "qlora_linear_fused": "qlora", "Int8Weight": "qlora",
    "matmul_4bit": "qmatmul", "matmul_int8": "qmatmul", "qlora_dx_block_m": "qmatmul",
    "Packed4bit": "quant", "dequantize_4bit": "quant", "dequantize_int8": "quant",
    "ia3_linear": "ia3", "ia3_scale_input": "ia3", "ia3_scale_output": "ia3",
    "epoch_counters": "tiles",
    "loha_linear": "lycoris", "lokr_linear": "lycoris",
}

__all__ = ["backend_name", "interpreting", "triton_available", "use_triton", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
