"""``peftfast demo``: an end-to-end LoRA fine-tune of a small shipped Llama, no download.

See :mod:`peftfast.demo.run` for what it does and :mod:`peftfast.demo.base` for how the
shipped base model is built.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the demo (``peftfast demo``); imported lazily so ``python -m peftfast.demo.base`` runs clean."""
    from .run import main as run_main

    return run_main(argv)


__all__ = ["main"]
