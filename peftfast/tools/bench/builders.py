"""The same model, inputs and adapter weights for peftfast and PEFT: what the timings run.

A ``Comparison`` names one case and builds a ``Side`` (a training-mode forward, and a forward +
backward step) per library, plus ``"base"`` (the plain base matmul) for the layer cases. PEFT is
imported here only to measure against it; without it only peftfast's side is built.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import zoo
from .constants import ACT, D_MODEL, F32, PROJECTIONS, R_MODEL, T_MODEL


@contextlib.contextmanager
def quiet():
    """Silence library warnings and transformers' progress bars while models are built."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def libs() -> list[tuple[str, Any]]:
    import peftfast

    try:
        import peft
    except ImportError:
        return [("peftfast", peftfast)]
    return [("peftfast", peftfast), ("peft", peft)]


def trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def share_adapters(src: nn.Module, *dsts: nn.Module, seed: int = 0) -> None:
    """Give ``src`` random adapter weights (B too, so nothing is zero) and copy them to ``dsts``."""
    gen = torch.Generator().manual_seed(seed)
    params = trainables(src)
    for name, p in params.items():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_((1 + 0.3 * noise) if "ia3_l" in name else 0.05 * noise)
    for dst in dsts:
        theirs = trainables(dst)
        if theirs.keys() != params.keys():
            diff = sorted(set(theirs) ^ set(params))[:6]
            raise RuntimeError(f"adapter parameters differ between the libraries: {diff}")
        for name, p in theirs.items():
            p.copy_(params[name])


def tiny_llama(hidden: int, layers: int, vocab: int = 128, seed: int = 0) -> nn.Module:
    """The bench's Llama (from peftfast.zoo), in training mode."""
    return zoo.llama(seed, hidden, layers, vocab, heads=4, kv_heads=2, intermediate=3 * hidden, max_positions=512,
                     pad=None).train()


@dataclass
class Side:
    fwd: Callable[[], Any]  # the forward in training mode (graph built, then dropped)
    step: Callable[[], Any]  # forward + backward


def layer_side(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Side:
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)

    return Side(lambda: module(x), step)


def adapter_layers(make_base: Callable[[], nn.Module], config_cls: str, four_bit: bool,
                    **config) -> dict[str, nn.Module]:
    """The adapter layer each library puts around ``make_base()`` (a fresh, identical base each)."""
    layers = {}
    for name, lib in libs():
        wrapper = nn.Sequential(OrderedDict(proj=make_base()))
        if four_bit:
            wrapper.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT dispatches on it
        model = lib.get_peft_model(wrapper, getattr(lib, config_cls)(target_modules=["proj"], **config))
        layers[name] = model.train().base_model.model.proj
    share_adapters(*layers.values())
    return layers


def linear_sides(t: int, d: int, device, dtype, make_base: Callable[[], nn.Module],
                  dense: Callable[[dict], nn.Module], config_cls: str, four_bit: bool = False,
                  **config) -> dict[str, Side]:
    """Steps of each library's adapter layer and of the plain base matmul ``dense(layers)``, all
    on the same x [t, d] (needs grad) and upstream gradient."""
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(t, d, device=device, dtype=dtype)
    layers = adapter_layers(make_base, config_cls, four_bit, **config)
    sides = {name: layer_side(m, x, g) for name, m in layers.items()}
    sides["base"] = layer_side(dense(layers), x, g)
    return sides


def frozen_linear(d: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, d, bias=False).to(device, dtype).requires_grad_(False)


def build_lora_linear(t: int, d: int, r: int, p: float, device="cpu", dtype=F32) -> dict[str, Side]:
    """One LoRA linear (bias-free base) under each library, and the base alone."""
    base = frozen_linear(d, device, dtype)
    return linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), lambda _: base, "LoraConfig",
                         r=r, lora_alpha=2 * r, lora_dropout=p)


def build_lycoris_linear(t: int, d: int, r: int, config_cls: str, device="cpu", dtype=F32) -> dict[str, Side]:
    """One LoHa / LoKr linear (bias-free base, random factors, no dropout) under each library, and the base alone."""
    base = frozen_linear(d, device, dtype)
    return linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), lambda _: base, config_cls,
                         r=r, alpha=r, init_weights=False)


def build_ia3_linear(t: int, d: int, feedforward: bool, device="cpu", dtype=F32) -> dict[str, Side]:
    """One IA3 linear (scale on the input when ``feedforward``, else on the output), and the base alone."""
    base = frozen_linear(d, device, dtype)
    return linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), lambda _: base, "IA3Config",
                         feedforward_modules=["proj"] if feedforward else [])


def build_qlora_linear(t: int, d: int, r: int, p: float, device="cpu", dtype=F32) -> dict[str, Side]:
    """LoRA on a bitsandbytes NF4 Linear4bit (blocksize 64) under each library; base = the same
    weight dequantised into a plain ``dtype`` linear (the float base matmul)."""
    import bitsandbytes as bnb

    from peftfast.kernels.quant import dequantize_4bit
    from peftfast.tuners.lora import bnb as lora_bnb
    from peftfast.utils.bnb_storage import packed4bit_from_bnb

    def make_base():
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=False)
        return layer.to(device)  # quantised on the move, identically each time

    def dense(layers):
        ours = layers["peftfast"]
        if not isinstance(ours, lora_bnb.Linear4bit):
            raise RuntimeError(f"peftfast wrapped the 4-bit layer in {type(ours).__name__}, "
                               "not its QLoRA layer")
        w = dequantize_4bit(packed4bit_from_bnb(ours.get_base_layer())._replace(dtype=dtype))
        layer = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            layer.weight.copy_(w)
        return layer

    return linear_sides(t, d, device, dtype, make_base, dense, "LoraConfig", four_bit=True, r=r,
                         lora_alpha=2 * r, lora_dropout=p)


def build_llama_step(hidden: int, layers: int, seq: int, batch: int, r: int, p: float) -> dict[str, Side]:
    """A training step (forward, loss, backward) of a tiny Llama with LoRA on every projection."""
    base = tiny_llama(hidden, layers)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    models = {name: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=PROJECTIONS, task_type="CAUSAL_LM")).train()
        for name, lib in libs()}
    share_adapters(*models.values())

    def side(model):
        params = list(trainables(model).values())

        def loss():
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        def step():
            for q in params:
                q.grad = None
            loss().backward()

        return Side(loss, step)

    return {name: side(m) for name, m in models.items()}


@dataclass
class Comparison:
    key: str  # short id: the pytest-benchmark group
    label: str
    build: Callable[[], dict[str, Side]]


def cpu_comparisons(quick: bool) -> list[Comparison]:
    hidden, seq = (128, 64) if quick else (256, 128)
    llama = f"tiny Llama training step (4 layers, hidden {hidden}, batch 2x{seq}, 7 projections, r=16"
    return [
        Comparison("lora_linear_p0", "LoRA linear fwd+bwd, T=512, d=512, r=16, fp32, dropout 0",
                   lambda: build_lora_linear(512, 512, 16, 0.0)),
        Comparison("lora_linear_p0.1", "LoRA linear fwd+bwd, T=512, d=512, r=16, fp32, dropout 0.1",
                   lambda: build_lora_linear(512, 512, 16, 0.1)),
        Comparison("llama_step_p0", f"{llama}, dropout 0)",
                   lambda: build_llama_step(hidden, 4, seq, 2, 16, 0.0)),
        Comparison("llama_step_p0.1", f"{llama}, dropout 0.1)",
                   lambda: build_llama_step(hidden, 4, seq, 2, 16, 0.1)),
        Comparison("ia3_ff", "IA3 linear fwd+bwd, scale on x (feedforward), T=512, d=512, fp32",
                   lambda: build_ia3_linear(512, 512, True)),
        Comparison("ia3_attn", "IA3 linear fwd+bwd, scale on y, T=512, d=512, fp32",
                   lambda: build_ia3_linear(512, 512, False)),
        Comparison("qlora_nf4_p0.1",
                   "QLoRA NF4 linear fwd+bwd, T=512, d=512, r=16, fp32 compute, dropout 0.1",
                   lambda: build_qlora_linear(512, 512, 16, 0.1)),
    ]


def cuda_comparisons(quick: bool) -> list[Comparison]:
    t, d, r, dev = (2048 if quick else T_MODEL), D_MODEL, R_MODEL, "cuda"
    shape = f"T={t}, d={d}"
    return [
        Comparison("cuda_lora_p0.1", f"LoRA linear, {shape}, r={r}, bf16, dropout 0.1",
                   lambda: build_lora_linear(t, d, r, 0.1, dev, ACT)),
        Comparison("cuda_lora_p0", f"LoRA linear, {shape}, r={r}, bf16, no dropout",
                   lambda: build_lora_linear(t, d, r, 0.0, dev, ACT)),
        Comparison("cuda_qlora_p0.1", f"QLoRA NF4 linear, {shape}, r={r}, bf16 compute, dropout 0.1",
                   lambda: build_qlora_linear(t, d, r, 0.1, dev, ACT)),
        Comparison("cuda_loha", f"LoHa linear, {shape}, r={r}, bf16, no dropout",
                   lambda: build_lycoris_linear(t, d, r, "LoHaConfig", dev, ACT)),
        Comparison("cuda_lokr", f"LoKr linear, {shape}, r={r}, bf16, no dropout",
                   lambda: build_lycoris_linear(t, d, r, "LoKrConfig", dev, ACT)),
        Comparison("cuda_ia3_ff", f"IA3 linear, scale on x, {shape}, bf16",
                   lambda: build_ia3_linear(t, d, True, dev, ACT)),
        Comparison("cuda_ia3_attn", f"IA3 linear, scale on y, {shape}, bf16",
                   lambda: build_ia3_linear(t, d, False, dev, ACT)),
    ]
