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

With ``--4bit`` (QLoRA) the base is loaded through ``BitsAndBytesConfig`` with its linear layers
in 4-bit NF4 (double quantisation, fp32 compute), prepared with ``prepare_model_for_kbit_training``
(frozen, gradient checkpointing) and the adapter trains on top of the quantised weights. The demo
then also reports the memory saved: the bytes of the base's weights as stored (4-bit vs fp32,
measured from the parameters) and the bytes one training step keeps for backward
(``measure_saved_bytes``), next to the fp32 base's. The reload check loads the adapter onto a fresh
4-bit base; its tolerance comes from a float64 evaluation of the same dequantised weights. Merging
into a 4-bit base requantises W + BA, so the merged logits differ by 4-bit rounding, not fp32
rounding: in 4-bit mode the merge check asks that the merged model still reaches the accuracy.

Every check that fails makes the exit status 1. Nothing is downloaded; it runs in well under
two minutes on a 2-core CPU and uses a CUDA GPU when one is present.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import peftfast as peft

from ..tools.memory import measure_saved_bytes
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
    four_bit: bool = False
    memory: dict[str, int] = field(default_factory=dict)  # --4bit: bytes stored and saved for backward
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
    add("--4bit", dest="four_bit", action="store_true",
        help="QLoRA: load the base with its linear layers in 4-bit NF4 (bitsandbytes), train the adapter on "
        "top of the quantised weights, and report the memory saved")
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
    """The base the adapter is trained on and reloaded onto (full precision)."""
    return base.load_base(device)


def load_base_model_4bit(device: torch.device) -> torch.nn.Module:
    """The same base with its linear layers in 4-bit NF4 (``--4bit``)."""
    return base.load_base_4bit(device)


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


# -- 4-bit mode ------------------------------------------------------------------------------------


def is_4bit(p: torch.nn.Parameter) -> bool:
    return getattr(p, "quant_state", None) is not None


def param_count(model: torch.nn.Module) -> int:
    """Parameters of the model as a float model has them (a 4-bit weight counts its unpacked elements)."""
    return sum(p.quant_state.shape.numel() if is_4bit(p) else p.numel() for p in model.parameters())


def quant_state_bytes(state) -> int:
    """Bytes of a 4-bit weight's block scales and code tables (the packed data is the parameter)."""
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def stored_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every base parameter as stored, of which the 4-bit linear weights with their scales)."""
    total = quantized = 0
    for p in model.parameters():
        n = p.nbytes + (quant_state_bytes(p.quant_state) if is_4bit(p) else 0)
        total += n
        quantized += n if is_4bit(p) else 0
    return total, quantized


def weight_memory(model_4bit: torch.nn.Module, model_fp32: torch.nn.Module) -> dict[str, int]:
    """Bytes of the base's weights as stored in 4-bit vs fp32, measured from the two models' parameters."""
    total_4bit, linear_4bit = stored_bytes(model_4bit)
    quantized = {name.removesuffix(".weight") for name, p in model_4bit.named_parameters() if is_4bit(p)}
    fp32 = dict(model_fp32.named_parameters())
    return {"base_fp32_bytes": sum(p.nbytes for p in fp32.values()), "base_4bit_bytes": total_4bit,
            "linear_fp32_bytes": sum(fp32[name + ".weight"].nbytes for name in quantized),
            "linear_4bit_bytes": linear_4bit}


def checkpointing_on(model: torch.nn.Module) -> None:
    """Reentrant gradient checkpointing on a float model, as prepare_model_for_kbit_training sets it up for
    the 4-bit one."""
    with warnings.catch_warnings():  # transformers renames gradient checkpointing in v6
        warnings.filterwarnings("ignore", ".*gradient_checkpointing.*deprecated", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def step_saved_bytes(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Bytes autograd keeps between forward and backward in one training step on (ids, mask)."""
    model.train()
    saved = measure_saved_bytes(model, lambda: task.answer_loss(model, ids, mask))
    model.zero_grad(set_to_none=True)
    model.eval()
    return saved.total


def exact_logits_4bit(model: torch.nn.Module, lora_kwargs: dict, ids: torch.Tensor) -> torch.Tensor:
    """The 4-bit LoRA model's logits computed exactly: a float64 copy of the shipped base whose linear
    weights are the dequantised 4-bit ones, with the same adapter on top (on the CPU)."""
    from ..tuners.lora.bnb import QuantizedBase4bit

    exact = base.load_base("cpu").double()
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, QuantizedBase4bit):
            exact.get_submodule(name).weight.data = module.dequantized_weight().double().cpu()
    exact = peft.get_peft_model(exact, peft.LoraConfig(**lora_kwargs))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in exact.named_parameters():
            if name in trained:
                p.copy_(trained.pop(name))
    if trained:
        raise RuntimeError(f"adapter weights missing from the float64 copy: {sorted(trained)[:3]}")
    return logits_on(exact.eval(), ids.cpu())


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
    mode = " | 4-bit NF4 base (QLoRA)" if args.four_bit else ""
    print(f"peftfast demo | device {device} | torch {torch.__version__} | seed {args.seed} "
          f"| steps {args.steps}{threads}{mode}")

    # The base, what it knows, and how it does on the new task.
    load = load_base_model_4bit if args.four_bit else load_base_model
    model = load(device)
    base_bytes = (base.DATA_DIR / base.WEIGHTS_FILE).stat().st_size
    cfg = model.config
    stored = ", linear layers in 4-bit NF4" if args.four_bit else ""
    print(f"base: LlamaForCausalLM, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{param_count(model):,} params, {fmt_bytes(base_bytes)} (shipped){stored}")
    copy_acc = base.copy_accuracy(model, device)
    print(f"  pretrained to copy   ^hello>hello.  held-out exact-match {copy_acc:6.1%}")
    print(f"  new task, reverse:   ^hello<olleh.  "
          f"({len(held_out)} held-out strings of {task.MIN_LEN}-{task.MAX_LEN} letters)")
    loss_before, acc_before = evaluate(model, held_out, device, "before fine-tuning")
    memory: dict[str, int] = {}
    if args.four_bit:
        memory = weight_memory(model, load_base_model(device))
        print(f"memory: linear weights {fmt_bytes(memory['linear_fp32_bytes'])} fp32 -> "
              f"{fmt_bytes(memory['linear_4bit_bytes'])} NF4 with scales "
              f"({memory['linear_fp32_bytes'] / memory['linear_4bit_bytes']:.1f}x smaller); whole base "
              f"{fmt_bytes(memory['base_fp32_bytes'])} -> {fmt_bytes(memory['base_4bit_bytes'])} "
              f"({memory['base_fp32_bytes'] / memory['base_4bit_bytes']:.1f}x)")
        with warnings.catch_warnings():  # transformers renames gradient checkpointing in v6
            warnings.filterwarnings("ignore", ".*gradient_checkpointing.*deprecated", FutureWarning)
            # frozen, fp32 norms/embeddings, reentrant gradient checkpointing (PEFT's default, explicit)
            model = peft.prepare_model_for_kbit_training(
                model, gradient_checkpointing_kwargs={"use_reentrant": True})

    # LoRA on every attention and MLP projection; only the adapter trains.
    torch.manual_seed(args.seed)
    lora_kwargs = dict(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                       target_modules=TARGET_MODULES)
    model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    bar = tqdm(total=args.steps, desc="fine-tuning (QLoRA)" if args.four_bit else "fine-tuning (LoRA)",
               unit="step", file=sys.stdout, mininterval=0.5)

    def on_step(step: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(1)

    task.train(model, NEW_OP, args.steps, lr=args.lr, seed=args.seed, device=device,
               exclude=frozenset(held_out), on_step=on_step)
    bar.close()
    loss_after, acc_after = evaluate(model, held_out, device, "after fine-tuning")
    trained_logits = logits_on(model, probe_ids)
    if args.four_bit:
        exact = exact_logits_4bit(model, lora_kwargs, probe_ids)
        rounding = (trained_logits.cpu().double() - exact).abs().max().item()
        what = "fp32 rounding of the fine-tuned 4-bit model (vs float64 on the same dequantised weights)"
    else:
        rounding = rounding_error(model, probe_ids, trained_logits)
        what = "fp32 rounding of the fine-tuned model (vs float64)"
    tol = ROUNDING_FACTOR * rounding
    print(f"{what}: {rounding:.1e}; reload/merge tolerance {ROUNDING_FACTOR}x = {tol:.1e}")
    if args.four_bit:
        # Activations kept for backward: the 4-bit base adds nothing to what the same LoRA model keeps on
        # an fp32 base (no dequantised weight is saved); gradient checkpointing is what shrinks them.
        ids, mask = task.make_batch(NEW_OP, task.random_strings(random.Random(args.seed + 1), 64), device)
        memory["step_saved_bytes_4bit"] = step_saved_bytes(model, ids, mask)
        plain = load_base_model(device)
        memory["step_saved_bytes_fp32_no_checkpointing"] = step_saved_bytes(
            peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**lora_kwargs)), ids, mask)
        checkpointing_on(plain)
        memory["step_saved_bytes_fp32"] = step_saved_bytes(
            peft.get_peft_model(plain, peft.LoraConfig(**lora_kwargs)), ids, mask)
        print(f"memory: saved for backward in one training step (batch 64): "
              f"{fmt_bytes(memory['step_saved_bytes_4bit'])} on the 4-bit base vs "
              f"{fmt_bytes(memory['step_saved_bytes_fp32'])} on the fp32 base, both with gradient "
              f"checkpointing ({fmt_bytes(memory['step_saved_bytes_fp32_no_checkpointing'])} without, as the "
              "fp32 demo trains)")

    # Save, reload onto a fresh base, merge.
    model.save_pretrained(out_dir)
    adapter_file = out_dir / "adapter_model.safetensors"
    adapter_bytes = adapter_file.stat().st_size if adapter_file.is_file() else 0
    print(f"saved adapter to {out_dir}: {adapter_file.name} {fmt_bytes(adapter_bytes)} "
          f"= {adapter_bytes / base_bytes:.1%} of the base's {fmt_bytes(base_bytes)}")

    reloaded = peft.PeftModel.from_pretrained(load(device), out_dir)
    reloaded.eval()
    reload_diff = (logits_on(reloaded, probe_ids) - trained_logits).abs().max().item()
    fresh = "a fresh 4-bit base" if args.four_bit else "a fresh base"
    print(f"PeftModel.from_pretrained on {fresh}: max |logit diff| {reload_diff:.2e}")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*requantises.*")  # said below, once
        merged = reloaded.merge_and_unload()
    merge_diff = (logits_on(merged, probe_ids) - trained_logits).abs().max().item()
    leftover = sorted({type(m).__name__ for m in merged.modules() if hasattr(m, "lora_A")})
    acc_merged = task.exact_match(merged, NEW_OP, held_out, device)
    print(f"merge_and_unload -> {type(merged).__name__}: max |logit diff| {merge_diff:.2e}, "
          f"exact-match {acc_merged:6.1%}")

    left = f"; LoRA modules left: {leftover}" if leftover else ""
    if args.four_bit:
        print("  (merging into a 4-bit base requantises W + BA: the logits move by 4-bit rounding, so the "
              "merge is checked by the accuracy it keeps, not against the fp32 tolerance)")
        merge_check = Check("merge keeps the metric (4-bit, requantised)",
                            acc_merged >= args.min_accuracy and not leftover,
                            f"exact-match {acc_merged:.1%} >= {args.min_accuracy:.0%}, logit diff "
                            f"{merge_diff:.2e}{left}")
    else:
        merge_check = Check("merge matches", merge_diff <= tol and not leftover,
                            f"{merge_diff:.2e} <= {tol:.1e}{left}")
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
        merge_check,
    ]
    if args.four_bit:
        smaller = memory["linear_4bit_bytes"] * 4 < memory["linear_fp32_bytes"]
        checks.append(Check("4-bit base is smaller", smaller,
                            f"linear weights {fmt_bytes(memory['linear_4bit_bytes'])} < 1/4 of "
                            f"{fmt_bytes(memory['linear_fp32_bytes'])}"))
    return Results(
        device=str(device), steps=args.steps, seed=args.seed, trainable_params=trainable, total_params=total,
        base_copy_accuracy=copy_acc, loss_before=loss_before, loss_after=loss_after,
        accuracy_before=acc_before, accuracy_after=acc_after, adapter_bytes=adapter_bytes,
        base_bytes=base_bytes, rounding_error=rounding, tolerance=tol, reload_max_abs_diff=reload_diff,
        merge_max_abs_diff=merge_diff,
        seconds=time.perf_counter() - start, four_bit=args.four_bit, memory=memory, checks=checks,
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
    if args.four_bit and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--4bit needs bitsandbytes to quantise the base (pip install bitsandbytes); "
                     "run without --4bit for the full-precision demo")

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
