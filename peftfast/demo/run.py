"""``peftfast demo``: teach a small pretrained Llama a new operator with LoRA, end to end.

The shipped base model (``peftfast/demo/data``, built by ``python -m peftfast.demo.base
--rebuild``) copies strings: ``^hello>hello.``. The demo adds a LoRA adapter to every
attention and MLP projection and trains only the adapter on a new operator, reversal:
``^hello<olleh.``. It then walks the whole adapter life cycle with the public API:

1. ``LoraConfig`` + ``get_peft_model`` + ``print_trainable_parameters``
2. fine-tune (progress bar), held-out loss and greedy exact-match before and after
3. ``save_pretrained`` (adapter size against the base's), ``PeftModel.from_pretrained`` on a
   fresh base: logits must match the trained model
4. ``merge_and_unload``: logits must match again, with no LoRA module left

Every check that fails makes the exit status 1. Nothing is downloaded; it runs in well under
two minutes on a 2-core CPU and uses a CUDA GPU when one is present.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import peftfast as peft

from . import base, task

NEW_OP = "<"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_STEPS = 400
DEFAULT_RANK = 8
DEFAULT_LR = 1e-2
DEFAULT_MIN_ACCURACY = 0.8
SHOWCASE = ["peftfast", "lora", "kernel"]  # printed before and after, to see the change
N_PROBE = 64  # held-out examples whose logits are compared across save/reload/merge
ROUNDING_FACTOR = 8  # reload/merge may differ by this many times the model's own fp32 rounding


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Results:
    device: str
    steps: int
    seed: int
    trainable_params: int
    total_params: int
    base_copy_accuracy: float
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy_after: float
    adapter_bytes: int
    base_bytes: int
    rounding_error: float
    tolerance: float
    reload_max_abs_diff: float
    merge_max_abs_diff: float
    seconds: float
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftfast demo",
        description="LoRA-fine-tune a small pretrained Llama (shipped, no download) to reverse "
        "strings, then save, reload and merge the adapter, checking the outputs at each step.",
    )
    add = parser.add_argument
    add("--steps", type=int, default=DEFAULT_STEPS, help="fine-tuning steps (default %(default)s)")
    add("--seed", type=int, default=0, help="seeds the LoRA init and the training data (default 0)")
    add("--device", default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (default auto)")
    add("--output-dir", type=Path, default=None,
        help="where to save the adapter (default: a temporary directory)")
    add("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank r (default %(default)s)")
    add("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default %(default)s)")
    add("--min-accuracy", type=float, default=DEFAULT_MIN_ACCURACY,
        help="held-out exact-match the fine-tuned model must reach (default %(default)s)")
    add("--threads", type=int, default=1,
        help="CPU threads for torch (default 1: this model's matmuls are too small to gain from more, "
        "and extra threads run many times slower when the cores are busy)")
    # A quantised base (--4bit, QLoRA) plugs in here and in load_base_model(); the rest is unchanged.
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: torch sees no CUDA GPU here; use --device cpu")
    return device


def load_base_model(device: torch.device) -> torch.nn.Module:
    """The base the adapter is trained on and reloaded onto (full precision today)."""
    return base.load_base(device)


@torch.no_grad()
def logits_on(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def rounding_error(model: torch.nn.Module, ids: torch.Tensor, logits: torch.Tensor) -> float:
    """Max |logits - exact logits|: how far fp32 arithmetic alone moves this model's outputs.

    "Exact" is a float64 copy of the same model on the CPU. A reloaded or merged model
    computes the same function with differently ordered (or, merged, pre-summed) fp32
    operations, so it may differ from the trained one by a few times this and no more;
    a wrong or missing adapter differs by orders of magnitude more.
    """
    exact = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    return (logits.cpu().double() - logits_on(exact, ids.cpu())).abs().max().item()


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def showcase(model: torch.nn.Module, device: torch.device) -> str:
    answers = task.greedy_answers(model, NEW_OP, SHOWCASE, device)
    return "   ".join(f"{task.prompt(NEW_OP, s)} -> {a}" for s, a in zip(SHOWCASE, answers))


def evaluate(model: torch.nn.Module, held_out: list[str], device: torch.device, when: str
             ) -> tuple[float, float]:
    loss = task.eval_loss(model, NEW_OP, held_out, device)
    acc = task.exact_match(model, NEW_OP, held_out, device)
    print(f"{when + ':':19} held-out loss {loss:.4f}, exact-match {acc:6.1%}")
    print(f"  {showcase(model, device)}")
    return loss, acc


def run_demo(args: argparse.Namespace, out_dir: Path) -> Results:
    start = time.perf_counter()
    device = resolve_device(args.device)
    held_out = task.eval_strings()
    probe_ids, _ = task.make_batch(NEW_OP, held_out[:N_PROBE], device)
    threads = f" | {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    print(f"peftfast demo | device {device} | torch {torch.__version__} | seed {args.seed} "
          f"| steps {args.steps}{threads}")

    # The base, what it knows, and how it does on the new task.
    model = load_base_model(device)
    base_bytes = (base.DATA_DIR / base.WEIGHTS_FILE).stat().st_size
    cfg = model.config
    print(f"base: LlamaForCausalLM, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, {fmt_bytes(base_bytes)} (shipped)")
    copy_acc = base.copy_accuracy(model, device)
    print(f"  pretrained to copy   ^hello>hello.  held-out exact-match {copy_acc:6.1%}")
    print(f"  new task, reverse:   ^hello<olleh.  "
          f"({len(held_out)} held-out strings of {task.MIN_LEN}-{task.MAX_LEN} letters)")
    loss_before, acc_before = evaluate(model, held_out, device, "before fine-tuning")

    # LoRA on every attention and MLP projection; only the adapter trains.
    torch.manual_seed(args.seed)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank,
                             lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = peft.get_peft_model(model, config)
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    bar = tqdm(total=args.steps, desc="fine-tuning (LoRA)", unit="step", file=sys.stdout, mininterval=0.5)

    def on_step(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(1)

    task.train(model, NEW_OP, args.steps, lr=args.lr, seed=args.seed, device=device,
               exclude=frozenset(held_out), on_step=on_step)
    bar.close()
    loss_after, acc_after = evaluate(model, held_out, device, "after fine-tuning")
    trained_logits = logits_on(model, probe_ids)
    rounding = rounding_error(model, probe_ids, trained_logits)
    tol = ROUNDING_FACTOR * rounding
    print(f"fp32 rounding of the fine-tuned model (vs float64): {rounding:.1e}; "
          f"reload/merge tolerance {ROUNDING_FACTOR}x = {tol:.1e}")

    # Save, reload onto a fresh base, merge.
    model.save_pretrained(out_dir)
    adapter_file = out_dir / "adapter_model.safetensors"
    adapter_bytes = adapter_file.stat().st_size if adapter_file.is_file() else 0
    print(f"saved adapter to {out_dir}: {adapter_file.name} {fmt_bytes(adapter_bytes)} "
          f"= {adapter_bytes / base_bytes:.1%} of the base's {fmt_bytes(base_bytes)}")

    reloaded = peft.PeftModel.from_pretrained(load_base_model(device), out_dir)
    reloaded.eval()
    reload_diff = (logits_on(reloaded, probe_ids) - trained_logits).abs().max().item()
    print(f"PeftModel.from_pretrained on a fresh base: max |logit diff| {reload_diff:.2e}")

    merged = reloaded.merge_and_unload()
    merge_diff = (logits_on(merged, probe_ids) - trained_logits).abs().max().item()
    leftover = sorted({type(m).__name__ for m in merged.modules() if hasattr(m, "lora_A")})
    acc_merged = task.exact_match(merged, NEW_OP, held_out, device)
    print(f"merge_and_unload -> {type(merged).__name__}: max |logit diff| {merge_diff:.2e}, "
          f"exact-match {acc_merged:6.1%}")

    left = f"; LoRA modules left: {leftover}" if leftover else ""
    checks = [
        Check("base really copies", copy_acc >= base.MIN_COPY_ACCURACY,
              f"{copy_acc:.1%} >= {base.MIN_COPY_ACCURACY:.0%}"),
        Check("metric improved", acc_after > acc_before and loss_after < loss_before,
              f"exact-match {acc_before:.1%} -> {acc_after:.1%}, loss {loss_before:.3f} -> {loss_after:.3f}"),
        Check("metric reached", acc_after >= args.min_accuracy,
              f"{acc_after:.1%} >= {args.min_accuracy:.0%}"),
        Check("adapter saved", 0 < adapter_bytes < base_bytes,
              f"{fmt_bytes(adapter_bytes)} < {fmt_bytes(base_bytes)}"),
        Check("reload matches", reload_diff <= tol, f"{reload_diff:.2e} <= {tol:.1e}"),
        Check("merge matches", merge_diff <= tol and not leftover, f"{merge_diff:.2e} <= {tol:.1e}{left}"),
    ]
    return Results(
        device=str(device), steps=args.steps, seed=args.seed, trainable_params=trainable, total_params=total,
        base_copy_accuracy=copy_acc, loss_before=loss_before, loss_after=loss_after,
        accuracy_before=acc_before, accuracy_after=acc_after, adapter_bytes=adapter_bytes,
        base_bytes=base_bytes, rounding_error=rounding, tolerance=tol, reload_max_abs_diff=reload_diff,
        merge_max_abs_diff=merge_diff,
        seconds=time.perf_counter() - start, checks=checks,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every check passes, 1 when one fails, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "rank", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.min_accuracy <= 1.0:
        parser.error(f"--min-accuracy must be between 0 and 1, got {args.min_accuracy}")
    try:
        resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))

    with (
        task.cpu_threads(args.threads),
        base.quiet_loading(),
        tempfile.TemporaryDirectory(prefix="peftfast-demo-") as tmp,
    ):
        out_dir = args.output_dir if args.output_dir is not None else Path(tmp) / "adapter"
        out_dir.mkdir(parents=True, exist_ok=True)
        results = run_demo(args, out_dir)
        if args.output_dir is not None:
            (out_dir / "demo_results.json").write_text(json.dumps(asdict(results), indent=2) + "\n")

    print("checks:")
    for c in results.checks:
        print(f"  [{'ok' if c.passed else 'FAIL'}] {c.name}: {c.detail}")
    print(f"{'all checks passed' if results.passed else 'SOME CHECKS FAILED'} in {results.seconds:.1f} s")
    return 0 if results.passed else 1
