"""The ``peftfast`` command: ``demo`` (the main job), ``bench``, ``compile-report``, ``gpu-check``."""
from __future__ import annotations

import sys
from typing import Callable, Optional

USAGE = """usage: peftfast <command> [options]

commands:
  demo            fine-tune the bundled small language model with LoRA end to end (CPU or CUDA)
  bench           run the kernel benchmark suite and print its tables (traffic, modelled time, memory)
  compile-report  compile every Triton kernel ahead of time for sm_80/86/89/90 and check resources
  gpu-check       the GPU acceptance run (kernels on CUDA tensors, stress, graphs, measured ratios); --dry on CPU

Run `peftfast <command> --help` for the options of a command.
"""


def _demo(argv: list[str]) -> int:
    from .demo import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    from .tools.bench import main

    return main(argv)


def _compile_report(argv: list[str]) -> int:
    from .tools.compile_report import main

    return main(argv)


def _gpu_check(argv: list[str]) -> int:
    from .tools.gpu_check import main

    return main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "bench": _bench,
    "compile-report": _compile_report,
    "gpu-check": _gpu_check,
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"peftfast: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(COMMANDS[command](rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
