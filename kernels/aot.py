"""What each kernel module declares for ahead-of-time compilation checks.

A kernel module with Triton kernels exposes ``aot_specs() -> list[AotSpec]``: one entry per
kernel x launch config x dtype that the launcher can actually use. The compile report
(``peftfast compile-report``) builds every entry for sm_80, sm_86, sm_89 and sm_90 and checks
registers, spills, shared memory and tensor-core instructions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    name: str  # human-readable, unique, e.g. "lora_shrink[fp16,BM=64,BK=64,BR=16]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument -> "*fp16", "*bf16", "*fp32", "*u8", "*i8", "i32", "i64", "fp32", "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)  # values of the "constexpr" arguments
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False  # True for matmul kernels: tensor-core instructions must appear
