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
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import costmodel as cm

T_MODEL, D_MODEL, R_MODEL = 8192, 4096, 16  # the shape of the design targets
ACT, F32 = torch.bfloat16, torch.float32
GPUS = (cm.H100, cm.RTX4090)
SMS = {cm.H100.name: 132, cm.RTX4090.name: 128}  # streaming multiprocessors: the decode split depends on them
IA3_TARGET, DECODE_TARGET = 1.01, 1.05
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------
# environment


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(_repo_root()), *args],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Device, versions, git sha (and whether the tree differs from it), threads, time."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results") if sha else None
    dists = ("peftfast", "torch", "triton", "transformers", "peft", "bitsandbytes")
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in dists},
        "git_sha": sha or "unknown",
        "git_dirty": bool(status) if status is not None else None,
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------
# text tables


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(cells[0]), "-" * len(fmt(cells[0]))] + [fmt(r) for r in cells[1:]]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _kb(n: float) -> str:
    return f"{n / 1e3:.1f}"


def _threads(n: int) -> str:
    return f"{n} torch thread{'s' if n != 1 else ''}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ----------------------------------------------------------------------------------------------
# 1. modelled time, checked against counted traffic


def decode_split(n: int, k: int, sms: int) -> int:
    """Reduction split of the 4-bit decode GEMM (T <= 16) for a GPU with ``sms`` SMs, as the
    launcher in ``kernels/qmatmul.py`` picks it (the calibration checks it on a counted grid)."""
    from peftfast.kernels import qmatmul

    cfg = qmatmul.resolve_config("decode", True, ACT)
    blocks = -(-k // cfg.block_r)
    split = max(1, min(blocks, -(-2 * sms // -(-n // cfg.block_c))))
    return -(-k // (-(-blocks // split) * cfg.block_r))


def decode_reads(t: int, n: int, k: int, sms: int, act: torch.dtype = ACT) -> dict[str, int]:
    """Bytes of the 4-bit decode path: the GEMM reads x, the packed weight, absmax and code and
    writes fp32 partials [split, T, N]; a reduction reads them and writes the output."""
    split = decode_split(n, k, sms)
    return {"gemm_read": cm.matmul_4bit_fused(t, k, n, act).bytes_read, "reduce_read": split * t * n * 4,
            "split": split, "partials_written": split * t * n * 4, "out_written": t * n * act.itemsize}


def _counted_4bit_checks() -> list[cm.Check]:
    """The 4-bit GEMM (decode with its split reduction, prefill, dX) counted in the interpreter."""
    from peftfast.kernels import qmatmul
    from peftfast.kernels.quant import Packed4bit

    from .traffic import count_triton

    gen = torch.Generator().manual_seed(0)
    n, k, bs, act = 192, 256, 64, torch.float16
    code = torch.sort(torch.randn(16, generator=gen)).values
    p = Packed4bit(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen),
                   torch.rand(n * k // bs, generator=gen) + 0.5, code, bs, (n, k), act)
    checks = []
    for t in (1, 16):
        x = torch.randn(t, k, generator=gen).to(act)
        with count_triton() as tr:
            qmatmul.matmul_4bit_triton(x, p)
        want = decode_reads(t, n, k, qmatmul._sm_count(x.device), act)
        gemm = tr.launch_log[0]
        checks.append(cm.Check(f"4-bit decode GEMM, bytes read (T={t}, {k}->{n})", gemm.unique_bytes_read,
                               want["gemm_read"], 1, 1))
        split = gemm.grid[1] if gemm.grid else None
        checks.append(cm.Check(f"4-bit decode, all launches (T={t}, split {split}, modelled {want['split']})",
                               tr.unique_bytes, sum(v for key, v in want.items() if key != "split"),
                               tr.launches, 2))
    for backward in (False, True):
        a = torch.randn(40, n if backward else k, generator=gen).to(act)
        with count_triton() as tr:
            qmatmul.matmul_4bit_triton(a, p, transpose=not backward)
        kern = cm.matmul_4bit_fused(40, k, n, act, backward)
        checks.append(cm.Check(f"4-bit GEMM {'dX' if backward else 'forward'} (T=40, {k}->{n})",
                               tr.unique_bytes, kern.bytes, tr.launches, 1))
    return checks


def _counted_ia3_checks() -> list[cm.Check]:
    from peftfast.kernels.ia3 import ia3_linear

    gen = torch.Generator().manual_seed(1)
    t, d_in, d_out, act = 40, 96, 80, torch.float16
    checks = []
    for ff in (True, False):
        x = torch.randn(t, d_in, generator=gen).to(act)
        w = torch.randn(d_out, d_in, generator=gen).to(act)
        s = torch.rand(d_in if ff else d_out, generator=gen) + 0.5
        nbytes, launches, _ = cm._count_device(lambda x=x, w=w, s=s, ff=ff: ia3_linear(x, w, None, s, ff))
        kern = cm.ia3_fused_matmul(t, d_in, d_out, act, F32, ff)
        checks.append(cm.Check(f"IA3 fused matmul, scale on {'x' if ff else 'y'} (T={t}, {d_in}->{d_out})",
                               nbytes, kern.bytes, launches, 1, cm.KERNEL_BYTES_TOLERANCE))
    return checks


def _calibration_child() -> None:
    """Entry point of the child process (``TRITON_INTERPRET=1``): print the checks as JSON."""
    results, errors = [], []
    for name, fn in (("eager PEFT path", cm.calibrate_eager),
                     ("peftfast lora_linear",
                      lambda: cm.calibrate_peftfast() + cm.calibrate_peftfast(t=200, ad=torch.float16)),
                     ("4-bit GEMM", _counted_4bit_checks), ("IA3", _counted_ia3_checks)):
        try:
            results += [dict(vars(c), ok=c.ok) for c in fn()]
        except Exception as err:  # noqa: BLE001 - a kernel that cannot be counted is reported, not hidden
            errors.append(f"{name}: {type(err).__name__}: {err}")
    print(json.dumps({"checks": results, "errors": errors}))


def start_calibration() -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1", PEFTFAST_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    code = "from peftfast.tools.bench import _calibration_child; _calibration_child()"
    # run outside the working directory, which `-c` puts on sys.path (a checkout has a kernels/ folder)
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return subprocess.Popen([sys.executable, *safe_path, "-c", code], env=env, cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_calibration(proc: subprocess.Popen, timeout: float = 600) -> tuple[list[dict], list[str]]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [], [f"calibration did not finish in {timeout:.0f} s"]
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [], [f"calibration process failed (exit {proc.returncode}): {err.strip()[-800:]}"]
    data = json.loads(lines[-1])
    return [dict(section="calibration", **c) for c in data["checks"]], data["errors"]


def calibration_lines(rows: list[dict], errors: list[str]) -> list[str]:
    out = ["== Calibration: bytes and launches counted at small shapes vs the cost formulas",
           "   (eager ops counted by a TorchDispatchMode; Triton kernels' unique addresses counted in "
           "the interpreter)"]
    body = [[r["name"], r["counted_bytes"], r["modelled_bytes"], r["counted_launches"], r["modelled_launches"],
             "exact" if r["tolerance"] == 0 else f"{r['tolerance']:.0%}", "ok" if r["ok"] else "MISMATCH"]
            for r in rows]
    out += table(["check", "counted B", "modelled B", "launches", "modelled", "tolerance", "result"], body)
    out += [f"NOT COUNTED: {e}" for e in errors]
    good = rows and not errors and all(r["ok"] for r in rows)
    out.append("calibration: " + ("all checks agree" if good else
                                  "FAILED: the modelled tables below are not backed by counts"))
    return out


def _model_row(gpu: cm.Gpu, op: str, path: str, fwd, bwd, base, targets: dict | None) -> dict:
    """Bytes, launches and modelled times of a path (forward and backward kernel lists; ``bwd``
    may be None), ratios to ``base``; target verdicts use the launch overhead."""
    row: dict[str, Any] = {"section": "modelled", "gpu": gpu.name, "op": op, "path": path,
                           "shape": {"T": T_MODEL, "d_in": D_MODEL, "d_out": D_MODEL, "r": R_MODEL},
                           "bandwidth": gpu.bandwidth, "launch_overhead_s": cm.LAUNCH_OVERHEAD_S}
    ovh = cm.LAUNCH_OVERHEAD_S
    for key, ks, ref in (("fwd", fwd, base[0]), ("bwd", bwd, base[1])):
        if ks is None:
            continue
        t, tb = cm.path_time(ks, gpu), cm.path_time(ref, gpu)
        to, tbo = cm.path_time(ks, gpu, ovh), cm.path_time(ref, gpu, ovh)
        row.update({f"{key}_launches": len(ks), f"{key}_bytes": cm.path_bytes(ks),
                    f"{key}_flops": sum(k.flops for k in ks), f"{key}_time_s": t, f"{key}_base_time_s": tb,
                    f"{key}_ratio": t / tb, f"{key}_time_ovh_s": to, f"{key}_base_time_ovh_s": tbo,
                    f"{key}_ratio_ovh": to / tbo})
        limit = (targets or {}).get({"fwd": "forward", "bwd": "backward"}[key])
        if limit is not None:
            row[f"{key}_target"] = limit
            row[f"{key}_met"] = to / tbo <= limit
    return row


def modelled_rows() -> list[dict]:
    t, d, r = T_MODEL, D_MODEL, R_MODEL
    lora_paths = (("PEFT, bf16 adapters, dropout 0.1", "peft", ACT, 0.1),
                  ("PEFT, bf16 adapters, no dropout", "peft", ACT, 0.0),
                  ("PEFT, fp32 adapters (autocast), dropout 0.1", "peft", F32, 0.1),
                  ("PEFT, fp32 adapters (autocast), no dropout", "peft", F32, 0.0),
                  ("peftfast, fp32 adapters, dropout 0.1", "peftfast", F32, 0.1),
                  ("peftfast, fp32 adapters, no dropout", "peftfast", F32, 0.0),
                  ("peftfast, bf16 adapters, dropout 0.1", "peftfast", ACT, 0.1))
    qlora_paths = (("peftfast: fused 4-bit GEMM + lora_linear, dropout 0.1", "peftfast", 0.1),
                   ("peftfast: fused 4-bit GEMM + lora_linear, no dropout", "peftfast", 0.0),
                   ("PEFT+bnb: dequantize + GEMM, fp32 adapters, dropout 0.1", "peft", 0.1),
                   ("PEFT+bnb: dequantize + GEMM, fp32 adapters, no dropout", "peft", 0.0))
    rows = []
    for gpu in GPUS:
        base = tuple(cm.lora_layer("base", bwd, t, d, d, r, ACT, ACT) for bwd in (False, True))
        rows.append(_model_row(gpu, "lora", "base GEMM alone", *base, base, None))
        for label, impl, ad, p in lora_paths:
            ks = [cm.lora_layer(impl, bwd, t, d, d, r, ACT, ad, p) for bwd in (False, True)]
            rows.append(_model_row(gpu, "lora", label, *ks, base, cm.LORA_TARGETS if impl == "peftfast" else None))
        rows.append(_model_row(gpu, "qlora_nf4", "bf16 base GEMM alone", *base, base, None))
        for label, impl, p in qlora_paths:
            ks = [cm.qlora_layer(impl, bwd, t, d, d, r, ACT, F32, p) for bwd in (False, True)]
            rows.append(_model_row(gpu, "qlora_nf4", label, *ks, base,
                                   cm.QLORA_TARGETS if impl == "peftfast" else None))
        rows.append(_model_row(gpu, "ia3", "base GEMM alone", base[0], None, base, None))
        for ff in (True, False):
            kind = "feedforward (scale on x)" if ff else "attention (scale on y)"
            rows.append(_model_row(gpu, "ia3", f"peftfast IA3 {kind}", [cm.ia3_fused_matmul(t, d, d, ACT, F32, ff)],
                                   None, base, {"forward": IA3_TARGET}))
            rows.append(_model_row(gpu, "ia3", f"PEFT IA3 {kind}, fp32 ia3_l",
                                   cm.peft_ia3_forward(t, d, d, ACT, F32, ff), None, base, None))
        weight = cm.nf4_weight_bytes(d, d)
        for tokens in range(1, 17):
            reads = decode_reads(tokens, d, d, SMS[gpu.name])
            total = reads["gemm_read"] + reads["reduce_read"]
            rows.append({"section": "decode", "gpu": gpu.name, "T": tokens, "d_in": d, "d_out": d, "blocksize": 64,
                         "packed_absmax_code_bytes": weight, **reads, "total_read": total,
                         "gemm_ratio": reads["gemm_read"] / weight, "total_ratio": total / weight,
                         "target": DECODE_TARGET, "met": total / weight <= DECODE_TARGET})
    return rows


def modelled_lines(rows: list[dict]) -> list[str]:
    out = [f"== Modelled time (from counted traffic, NOT measured): T={T_MODEL}, d_in=d_out={D_MODEL}, "
           f"r={R_MODEL}, bf16",
           "   time per kernel = max(bytes / bandwidth, FLOPs / peak), summed over the path's launches;",
           f"   ratio = path time / base time; '+ovh' adds {cm.LAUNCH_OVERHEAD_S * 1e6:.0f} us per launch "
           "(the target verdicts use it)"]
    lt, qt = cm.LORA_TARGETS, cm.QLORA_TARGETS
    titles = {"lora": "One LoRA linear; base = the base GEMM alone (backward: base dX alone); targets fwd <= "
                      f"{lt['forward']}, bwd <= {lt['backward']}",
              "qlora_nf4": "NF4 QLoRA linear (blocksize 64); base = the bf16 base GEMM; targets fwd <= "
                           f"{qt['forward']}, bwd <= {qt['backward']}",
              "ia3": f"IA3 linear, forward; base = the base GEMM; target <= {IA3_TARGET}"}
    head = ["path", "fwd launches", "MB", "ratio", "+ovh", "bwd launches", "MB", "ratio", "+ovh"]
    for gpu in GPUS:
        out += ["", f"-- {gpu.name}: {gpu.bandwidth / 1e12:.1f} TB/s, {gpu.tensor_flops / 1e12:.0f} TFLOP/s "
                    f"bf16, {gpu.fp32_flops / 1e12:.1f} TFLOP/s fp32"]
        for op, title in titles.items():
            body = []
            for r in rows:
                if r["section"] != "modelled" or r["gpu"] != gpu.name or r["op"] != op:
                    continue
                cells = [r["path"]]
                for key in ("fwd", "bwd"):
                    if f"{key}_ratio" not in r:
                        cells += ["-"] * 4
                        continue
                    met = r.get(f"{key}_met")
                    cells += [r[f"{key}_launches"], _mb(r[f"{key}_bytes"]), f"{r[f'{key}_ratio']:.3f}",
                              f"{r[f'{key}_ratio_ovh']:.3f}" + ("" if met is None else f" {_verdict(met)}")]
                body.append(cells)
            out += [title] + table(head, body)
        out.append(f"NF4 decode, T=1..16, {D_MODEL}x{D_MODEL}: bytes read vs packed weight + absmax + code "
                   f"(target: within {DECODE_TARGET - 1:.0%}); split = reduction split for {SMS[gpu.name]} SMs")
        body = [[r["T"], r["split"], _mb(r["packed_absmax_code_bytes"]), _mb(r["gemm_read"]),
                 f"{r['gemm_ratio']:.3f}", _mb(r["reduce_read"]), _mb(r["total_read"]), f"{r['total_ratio']:.3f}",
                 _verdict(r["met"])] for r in rows if r["section"] == "decode" and r["gpu"] == gpu.name]
        out += table(["T", "split", "weight MB", "GEMM read MB", "ratio", "partials read MB", "all read MB",
                      "ratio", "target"], body)
    return out


# ----------------------------------------------------------------------------------------------
# shared builders: the same model, inputs and adapter weights for peftfast and PEFT


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


def _libs() -> list[tuple[str, Any]]:
    import peftfast

    try:
        import peft
    except ImportError:
        return [("peftfast", peftfast)]
    return [("peftfast", peftfast), ("peft", peft)]


def _trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def share_adapters(src: nn.Module, *dsts: nn.Module, seed: int = 0) -> None:
    """Give ``src`` random adapter weights (B too, so nothing is zero) and copy them to ``dsts``."""
    gen = torch.Generator().manual_seed(seed)
    params = _trainables(src)
    for name, p in params.items():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_((1 + 0.3 * noise) if "ia3_l" in name else 0.05 * noise)
    for dst in dsts:
        theirs = _trainables(dst)
        if theirs.keys() != params.keys():
            diff = sorted(set(theirs) ^ set(params))[:6]
            raise RuntimeError(f"adapter parameters differ between the libraries: {diff}")
        for name, p in theirs.items():
            p.copy_(params[name])


def tiny_llama(hidden: int, layers: int, vocab: int = 128, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@dataclass
class Side:
    fwd: Callable[[], Any]  # the forward in training mode (graph built, then dropped)
    step: Callable[[], Any]  # forward + backward


def _layer_side(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Side:
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)

    return Side(lambda: module(x), step)


def _adapter_layers(make_base: Callable[[], nn.Module], config_cls: str, **config) -> dict[str, nn.Module]:
    """The adapter layer each library puts around ``make_base()`` (a fresh, identical base each)."""
    layers = {}
    for name, lib in _libs():
        wrapper = nn.Sequential(OrderedDict(proj=make_base()))
        wrapper.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT dispatches on it
        model = lib.get_peft_model(wrapper, getattr(lib, config_cls)(target_modules=["proj"], **config))
        layers[name] = model.train().base_model.model.proj
    share_adapters(*layers.values())
    return layers


def _linear_sides(t, d, device, dtype, make_base, config_cls, **config) -> dict[str, Side]:
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(t, d, device=device, dtype=dtype)
    layers = _adapter_layers(make_base, config_cls, **config)
    return {name: _layer_side(m, x, g) for name, m in layers.items()}


def build_lora_linear(t: int, d: int, r: int, p: float, device="cpu", dtype=F32) -> dict[str, Side]:
    """One LoRA linear (bias-free base, x needs grad) under each library, plus the base alone."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False).to(device, dtype).requires_grad_(False)
    sides = _linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), "LoraConfig",
                          r=r, lora_alpha=2 * r, lora_dropout=p)
    sides["base"] = _layer_side(base, *_inputs(sides))
    return sides


def build_ia3_linear(t: int, d: int, feedforward: bool, device="cpu", dtype=F32) -> dict[str, Side]:
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False).to(device, dtype).requires_grad_(False)
    sides = _linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), "IA3Config",
                          feedforward_modules=["proj"] if feedforward else [])
    sides["base"] = _layer_side(base, *_inputs(sides))
    return sides


def _inputs(sides: dict[str, Side]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, g) the layer steps close over (the base alone is timed on the very same tensors)."""
    cells = dict(zip(sides["peftfast"].step.__code__.co_freevars, sides["peftfast"].step.__closure__))
    return cells["x"].cell_contents, cells["g"].cell_contents


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

    sides = _linear_sides(t, d, device, dtype, make_base, "LoraConfig", r=r, lora_alpha=2 * r, lora_dropout=p)
    layer = sides["peftfast"].step.__closure__  # noqa: F841 - kept simple: rebuild the dense twin below
    ours = _adapter_layers(make_base, "LoraConfig", r=1)["peftfast"]
    if not isinstance(ours, lora_bnb.Linear4bit):
        raise RuntimeError(f"peftfast wrapped the 4-bit layer in {type(ours).__name__}, not its QLoRA layer")
    dense = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(dequantize_4bit(packed4bit_from_bnb(ours.get_base_layer())._replace(dtype=dtype)))
    sides["base"] = _layer_side(dense, *_inputs(sides))
    return sides
