"""The demo's base model: a 2-layer Llama pretrained to copy strings.

The shipped weights in ``peftfast/demo/data`` come from this script::

    python -m peftfast.demo.base --rebuild     # retrain (seed-fixed, one thread, ~25 s of CPU time)
    python -m peftfast.demo.base               # check the shipped model on its task

Pretraining is 500 AdamW steps of the copy operator (``^hello>hello.``) on fresh random
strings. Copying strings of varying length needs a real mechanism (each answer position
finds and reads the matching source position); reversal, the demo's new task, reads the
same positions in the other order. The rebuild refuses to write a model that copies less
than 95% of the held-out strings exactly.

The weights are bit-for-bit reproducible on one machine and torch version; across CPUs or
BLAS builds float rounding can differ, while the accuracy does not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from .. import zoo
from . import task

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS_FILE = "model.safetensors"
PRETRAIN_OP = ">"
PRETRAIN_STEPS = 500
PRETRAIN_LR = 3e-3
PRETRAIN_SEED = 0
MIN_COPY_ACCURACY = 0.95


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' own progress bars (loading/writing a 1 MB model needs none)."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def base_config() -> LlamaConfig:
    """A Llama small enough to train in seconds: 2 layers, hidden 128, 4 heads, ~0.34M parameters."""
    return zoo.llama_config(128, 2, len(task.VOCAB), heads=4, kv_heads=4, intermediate=256, max_positions=64,
                            pad=task.PAD_ID, bos=task.BOS_ID, eos=task.EOS_ID)


def pretrain(steps: int = PRETRAIN_STEPS, seed: int = PRETRAIN_SEED, progress: bool = True
             ) -> LlamaForCausalLM:
    """Build the base from scratch on one CPU thread: random init from ``seed``, then train to copy."""
    with task.cpu_threads(1):
        return _pretrain(steps, seed, progress)


def _pretrain(steps: int, seed: int, progress: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(base_config())
    held_out = frozenset(task.eval_strings())

    def report(step: int, loss: float) -> None:
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"  step {step + 1:4d}/{steps}  loss {loss:.4f}", flush=True)

    task.train(model, PRETRAIN_OP, steps, lr=PRETRAIN_LR, seed=seed, device="cpu", exclude=held_out,
               on_step=report)
    return model


def load_base(device: torch.device | str = "cpu", path: Path | str = DATA_DIR) -> LlamaForCausalLM:
    """Load the shipped base (fp32, eval mode) from local files only."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"no base model at {weights}; build it with `python -m peftfast.demo.base --rebuild`"
        )
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def quantization_config():
    """QLoRA's recipe for the demo's ``--4bit``: NF4 with double quantisation, computing in fp32."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load_base_4bit(device: torch.device | str = "cpu", path: Path | str = DATA_DIR) -> LlamaForCausalLM:
    """Load the shipped base with its linear layers quantised to 4-bit NF4 by bitsandbytes (eval mode).

    Its embeddings, norms and head stay fp32. bitsandbytes' CPU inference repack (which rewrites the
    4-bit storage with bf16-rounded scales on an eval forward) is switched off, so the model keeps
    exactly the quantisation a fresh load gives; the demo's reload check compares against one.
    """
    from ..utils.bnb_storage import prevent_cpu_repack

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"no base model at {weights}; build it with `python -m peftfast.demo.base --rebuild`"
        )
    # bitsandbytes logs, on import, that an optional CPU inference kernel from the Hugging Face hub is
    # missing; the demo downloads nothing and does not use it
    bnb_log = logging.getLogger("bitsandbytes")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        model = LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                 quantization_config=quantization_config(),
                                                 device_map={"": str(torch.device(device))})
    finally:
        bnb_log.setLevel(level)
    prevent_cpu_repack(model)
    return model.eval()


def copy_accuracy(model: torch.nn.Module, device: torch.device | str = "cpu") -> float:
    """Greedy exact-match of the copy operator on the fixed held-out strings."""
    return task.exact_match(model, PRETRAIN_OP, task.eval_strings(), device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftfast.demo.base", description=__doc__.split("\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="retrain the base and write it to --out")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"where to write it (default {DATA_DIR})")
    parser.add_argument("--steps", type=int, default=PRETRAIN_STEPS,
                        help="pretraining steps (default %(default)s)")
    args = parser.parse_args(argv)
    with task.cpu_threads(1), quiet_loading():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if args.rebuild:
        start = time.perf_counter()
        print(f"pretraining the base on the copy operator ({args.steps} steps, seed {PRETRAIN_SEED})")
        model = pretrain(args.steps)
        acc = copy_accuracy(model)
        print(f"held-out copy exact-match {acc:.1%} ({time.perf_counter() - start:.1f} s)")
        if acc < MIN_COPY_ACCURACY:
            print(f"not written: below the required {MIN_COPY_ACCURACY:.0%}")
            return 1
        model.save_pretrained(args.out)
        for f in args.out.iterdir():
            f.chmod(0o644)  # package data: readable by everyone
        print(f"wrote {args.out / WEIGHTS_FILE} ({(args.out / WEIGHTS_FILE).stat().st_size / 1e6:.2f} MB)")
        return 0

    model = load_base(path=args.out)
    acc = copy_accuracy(model)
    reverse = task.exact_match(model, "<", task.eval_strings(), "cpu")
    print(f"{args.out}: copy exact-match {acc:.1%}, reverse exact-match {reverse:.1%} (held-out)")
    return 0 if acc >= MIN_COPY_ACCURACY else 1


if __name__ == "__main__":
    raise SystemExit(main())
