"""``peftfast bench``: what each kernel costs against PEFT, three ways, each labelled where printed.

1. Modelled time from counted traffic (``costmodel``): one LoRA / NF4 QLoRA / IA3 linear at
   T=8192, d_in=d_out=4096, r=16, bf16 on an H100 and an RTX 4090, as a ratio to the base
   matmul alone, peftfast next to PEFT, with the design targets; the 4-bit decode path's bytes
   read at T=1..16 against the packed weight plus absmax. The formulas are first checked
   against bytes counted at small shapes (eager ops through a dispatch mode, Triton kernels in
   the interpreter, in a child process with ``TRITON_INTERPRET=1``).
2. Memory measured on this machine: bytes saved for backward by one training step of a tiny
   Llama, and for an NF4 QLoRA model the bytes of weights, saved activations and AdamW state,
   peftfast against PEFT (+ bitsandbytes) on the same model.
3. Wall time measured on this machine: the PyTorch path against PEFT in the same process on the
   same inputs, timed in interleaved pairs and reported as quantiles of the ratio
   peftfast / PEFT. On a CUDA machine the Triton kernels are timed with
   ``triton.testing.do_bench`` as ratios to the base matmul.

Every row goes to a JSON file with the device, versions, git sha and thread count; a PNG of the
modelled table and a roofline of its kernels is written next to it. PEFT is imported here only
to measure against it (``pip install peftfast[test]``); without it those rows are skipped.

The package, one module per section: ``results`` (environment, the JSON file), ``calibration``
(the counting child process), ``modelled``, ``memory``, ``cpu_time``, ``cuda_time``, ``summary``,
``plot``, and ``cli`` (``main``, the command); ``builders`` makes the models the timings and
memory rows run, ``constants`` holds the shapes and targets, ``tables`` the text formatting.
"""
from .builders import (Comparison, Side, adapter_layers, build_ia3_linear, build_llama_step, build_lora_linear,
                       build_qlora_linear, cpu_comparisons, cuda_comparisons, libs, quiet, share_adapters,
                       tiny_llama, trainables)
from .calibration import calibration_lines, finish_calibration, run_calibration_child, start_calibration
from .cli import main
from .constants import ACT, D_MODEL, DECODE_TARGET, F32, GPUS, IA3_TARGET, PROJECTIONS, R_MODEL, SMS, T_MODEL
from .cpu_time import cpu_time_lines, cpu_time_rows, paired_times
from .cuda_time import cuda_time_lines, cuda_time_rows, do_bench_ms
from .memory import (lora_memory_rows, measure_memory, memory_lines, optimizer_state_bytes, qlora_memory_rows,
                     weight_bytes)
from .modelled import model_row, modelled_lines, modelled_rows
from .plot import plotting_available, write_plot
from .results import default_out, environment, write_rows
from .summary import summary_lines
from .tables import table

__all__ = [
    "ACT", "D_MODEL", "DECODE_TARGET", "F32", "GPUS", "IA3_TARGET", "PROJECTIONS", "R_MODEL", "SMS", "T_MODEL",
    "Comparison", "Side", "adapter_layers", "build_ia3_linear", "build_llama_step", "build_lora_linear",
    "build_qlora_linear", "calibration_lines", "cpu_comparisons", "cpu_time_lines", "cpu_time_rows",
    "cuda_comparisons", "cuda_time_lines", "cuda_time_rows", "default_out", "do_bench_ms", "environment",
    "finish_calibration", "libs", "lora_memory_rows", "main", "measure_memory", "memory_lines", "model_row",
    "modelled_lines", "modelled_rows", "optimizer_state_bytes", "paired_times", "plotting_available",
    "qlora_memory_rows", "quiet", "run_calibration_child", "share_adapters", "start_calibration",
    "summary_lines", "table", "tiny_llama", "trainables", "weight_bytes", "write_plot", "write_rows",
]
