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


def decode_split(t: int, n: int, k: int, sms: int) -> int:
    """Reduction split of the 4-bit decode GEMM (T <= 16) for a GPU with ``sms`` SMs, as the
    launcher in ``kernels/qmatmul.py`` picks it (the calibration checks it on a counted grid)."""
    from peftfast.kernels import qmatmul

    name, split = qmatmul.pick_config(t, n, k, True, torch.device("cpu"), sms=sms)
    return qmatmul.split_reduction(k, qmatmul.resolve_config(name, True, ACT).block_r, split)[0]


def decode_reads(t: int, n: int, k: int, sms: int, act: torch.dtype = ACT) -> dict[str, int]:
    """Bytes of the 4-bit decode path: the GEMM reads x, the packed weight, absmax and code; with a
    split reduction it writes fp32 partials [split, T, N] and a reduction reads them and writes the
    output, else it writes the output itself."""
    split = decode_split(t, n, k, sms)
    partials = split * t * n * 4 if split > 1 else 0
    return {"gemm_read": cm.matmul_4bit_fused(t, k, n, act).bytes_read, "reduce_read": partials,
            "split": split, "partials_written": partials, "out_written": t * n * act.itemsize}


def _counted_4bit_checks() -> list[cm.Check]:
    """The 4-bit GEMM (decode with its split reduction, prefill, dX) counted in the interpreter."""
    from peftfast.kernels import qmatmul
    from peftfast.kernels.quant import Packed4bit

    from .traffic import count_triton

    gen = torch.Generator().manual_seed(0)
    n, bs, act = 192, 64, torch.float16
    code = torch.sort(torch.randn(16, generator=gen)).values

    def packed(k):
        return Packed4bit(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen),
                          torch.rand(n * k // bs, generator=gen) + 0.5, code, bs, (n, k), act)

    checks = []
    for t, k in ((1, 1024), (16, 256)):  # a split reduction (3 slices), then none
        p = packed(k)
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
                               tr.launches, 2 if want["split"] > 1 else 1))
    k = 256
    p = packed(k)
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
                     ("peftfast lora_linear_fused",  # T=1100: two row-block groups (the look-ahead shrink)
                      lambda: cm.calibrate_peftfast_fused() + cm.calibrate_peftfast_fused(
                          t=1100, d_in=150, d_out=130, ad=torch.float16)),
                     ("peftfast qlora_linear_fused", cm.calibrate_qlora_fused),
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
    body = [[r["name"], r["counted_bytes"], r["modelled_bytes"], r["counted_launches"],
             r["modelled_launches"], "exact" if r["tolerance"] == 0 else f"{r['tolerance']:.0%}",
             "ok" if r["ok"] else "MISMATCH"] for r in rows]
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
                  ("peftfast, bf16 adapters, dropout 0.1", "peftfast", ACT, 0.1),
                  ("peftfast, LoRA fused into the nn.Linear GEMM, fp32 adapters, dropout 0.1", "peftfast-fused", F32, 0.1),
                  ("peftfast, LoRA fused into the nn.Linear GEMM, bf16 adapters, dropout 0.1", "peftfast-fused", ACT, 0.1))
    qlora_paths = (("peftfast: fused 4-bit GEMM + lora_linear, dropout 0.1", "peftfast", 0.1),
                   ("peftfast: fused 4-bit GEMM + lora_linear, no dropout", "peftfast", 0.0),
                   ("peftfast: LoRA fused into the 4-bit GEMM, dropout 0.1", "peftfast-fused", 0.1),
                   ("PEFT+bnb: dequantize + GEMM, fp32 adapters, dropout 0.1", "peft", 0.1),
                   ("PEFT+bnb: dequantize + GEMM, fp32 adapters, no dropout", "peft", 0.0))
    rows = []
    for gpu in GPUS:
        base = tuple(cm.lora_layer("base", bwd, t, d, d, r, ACT, ACT) for bwd in (False, True))
        rows.append(_model_row(gpu, "lora", "base GEMM alone", *base, base, None))
        for label, impl, ad, p in lora_paths:
            ks = [cm.lora_layer(impl, bwd, t, d, d, r, ACT, ad, p) for bwd in (False, True)]
            targets = cm.LORA_TARGETS if impl.startswith("peftfast") else None
            rows.append(_model_row(gpu, "lora", label, *ks, base, targets))
        rows.append(_model_row(gpu, "qlora_nf4", "bf16 base GEMM alone", *base, base, None))
        for label, impl, p in qlora_paths:
            ks = [cm.qlora_layer(impl, bwd, t, d, d, r, ACT, F32, p) for bwd in (False, True)]
            rows.append(_model_row(gpu, "qlora_nf4", label, *ks, base,
                                   cm.QLORA_TARGETS if impl.startswith("peftfast") else None))
        rows.append(_model_row(gpu, "ia3", "base GEMM alone", base[0], None, base, None))
        for ff in (True, False):
            kind = "feedforward (scale on x)" if ff else "attention (scale on y)"
            fused = [cm.ia3_fused_matmul(t, d, d, ACT, F32, ff)]
            target = {"forward": IA3_TARGET}
            rows.append(_model_row(gpu, "ia3", f"peftfast IA3 {kind}", fused, None, base, target))
            rows.append(_model_row(gpu, "ia3", f"PEFT IA3 {kind}, fp32 ia3_l",
                                   cm.peft_ia3_forward(t, d, d, ACT, F32, ff), None, base, None))
        weight = cm.nf4_weight_bytes(d, d)
        for tokens in range(1, 17):
            reads = decode_reads(tokens, d, d, SMS[gpu.name])
            total = reads["gemm_read"] + reads["reduce_read"]
            rows.append({"section": "decode", "gpu": gpu.name, "T": tokens, "d_in": d, "d_out": d,
                         "blocksize": 64, "packed_absmax_code_bytes": weight, **reads, "total_read": total,
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
                   f"(target: within {DECODE_TARGET - 1:.0%}); split = reduction split for "
                   f"{SMS[gpu.name]} SMs")
        body = [[r["T"], r["split"], _mb(r["packed_absmax_code_bytes"]), _mb(r["gemm_read"]),
                 f"{r['gemm_ratio']:.3f}", _mb(r["reduce_read"]), _mb(r["total_read"]),
                 f"{r['total_ratio']:.3f}", _verdict(r["met"])]
                for r in rows if r["section"] == "decode" and r["gpu"] == gpu.name]
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


def _adapter_layers(make_base: Callable[[], nn.Module], config_cls: str, four_bit: bool,
                    **config) -> dict[str, nn.Module]:
    """The adapter layer each library puts around ``make_base()`` (a fresh, identical base each)."""
    layers = {}
    for name, lib in _libs():
        wrapper = nn.Sequential(OrderedDict(proj=make_base()))
        if four_bit:
            wrapper.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT dispatches on it
        model = lib.get_peft_model(wrapper, getattr(lib, config_cls)(target_modules=["proj"], **config))
        layers[name] = model.train().base_model.model.proj
    share_adapters(*layers.values())
    return layers


def _linear_sides(t: int, d: int, device, dtype, make_base: Callable[[], nn.Module],
                  dense: Callable[[dict], nn.Module], config_cls: str, four_bit: bool = False,
                  **config) -> dict[str, Side]:
    """Steps of each library's adapter layer and of the plain base matmul ``dense(layers)``, all
    on the same x [t, d] (needs grad) and upstream gradient."""
    x = torch.randn(t, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(t, d, device=device, dtype=dtype)
    layers = _adapter_layers(make_base, config_cls, four_bit, **config)
    sides = {name: _layer_side(m, x, g) for name, m in layers.items()}
    sides["base"] = _layer_side(dense(layers), x, g)
    return sides


def _frozen_linear(d: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, d, bias=False).to(device, dtype).requires_grad_(False)


def build_lora_linear(t: int, d: int, r: int, p: float, device="cpu", dtype=F32) -> dict[str, Side]:
    """One LoRA linear (bias-free base) under each library, and the base alone."""
    base = _frozen_linear(d, device, dtype)
    return _linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), lambda _: base, "LoraConfig",
                         r=r, lora_alpha=2 * r, lora_dropout=p)


def build_ia3_linear(t: int, d: int, feedforward: bool, device="cpu", dtype=F32) -> dict[str, Side]:
    """One IA3 linear (scale on the input when ``feedforward``, else on the output), and the base alone."""
    base = _frozen_linear(d, device, dtype)
    return _linear_sides(t, d, device, dtype, lambda: copy.deepcopy(base), lambda _: base, "IA3Config",
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

    return _linear_sides(t, d, device, dtype, make_base, dense, "LoraConfig", four_bit=True, r=r,
                         lora_alpha=2 * r, lora_dropout=p)


def build_llama_step(hidden: int, layers: int, seq: int, batch: int, r: int, p: float) -> dict[str, Side]:
    """A training step (forward, loss, backward) of a tiny Llama with LoRA on every projection."""
    base = tiny_llama(hidden, layers)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    models = {name: lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=PROJECTIONS, task_type="CAUSAL_LM")).train()
        for name, lib in _libs()}
    share_adapters(*models.values())

    def side(model):
        params = list(_trainables(model).values())

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
        Comparison("cuda_ia3_ff", f"IA3 linear, scale on x, {shape}, bf16",
                   lambda: build_ia3_linear(t, d, True, dev, ACT)),
        Comparison("cuda_ia3_attn", f"IA3 linear, scale on y, {shape}, bf16",
                   lambda: build_ia3_linear(t, d, False, dev, ACT)),
    ]


# ----------------------------------------------------------------------------------------------
# 2. measured memory


def _saved(model: nn.Module, ids: torch.Tensor):
    from .memory import measure_saved_bytes

    return measure_saved_bytes(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)


def lora_memory_rows() -> list[dict]:
    base = tiny_llama(64, 4)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, lib in _libs():
        for p in (0.1, 0.0):
            with quiet():
                model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
                    r=8, lora_alpha=16, lora_dropout=p, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
            rows.append({"section": "memory", "what": "saved_activations", "path": name, "dropout": p,
                         "model": "tiny Llama, 4 layers, hidden 64, batch 2x48, fp32, LoRA r=8 on 7 "
                                  "projections",
                         **_saved(model.train(), ids).as_row()})
    return rows


def _storage_bytes(t: torch.Tensor, seen: set) -> int:
    key = (str(t.device), t.untyped_storage().data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return t.untyped_storage().nbytes()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of a (quantised) model, each storage once: 4-bit packed weights, their
    quantisation state (absmax, code, nested statistics), other frozen tensors, trainables."""
    seen: set = set()
    out = {"packed_4bit": 0, "quant_state": 0, "frozen_other": 0, "trainable": 0, "quantised_numel": 0}
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if isinstance(w, torch.Tensor) and qs is not None:
            packed = _storage_bytes(w, seen)  # 0 if seen: an adapter layer's ``weight`` is its base's
            if not packed:
                continue
            out["packed_4bit"] += packed
            out["quantised_numel"] += int(np.prod(qs.shape))
            nested = getattr(qs, "state2", None)
            for t in (qs.absmax, qs.code, getattr(nested, "absmax", None), getattr(nested, "code", None)):
                if isinstance(t, torch.Tensor):
                    out["quant_state"] += _storage_bytes(t, seen)
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen_other"] += _storage_bytes(p, seen)
    for b in model.buffers():
        out["frozen_other"] += _storage_bytes(b, seen)
    return out


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set = set()
    return sum(_storage_bytes(v, seen) for state in opt.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def qlora_memory_rows() -> list[dict]:
    """One QLoRA training step (NF4, blocksize 64, fp32 compute, LoRA r=16 with dropout 0.1 on 7
    projections, no gradient checkpointing) under each library, on the same saved model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftfast.tuners.lora import bnb as lora_bnb

    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                               bnb_4bit_compute_dtype=F32)
    models = {}
    with tempfile.TemporaryDirectory() as folder, quiet():
        tiny_llama(128, 4).save_pretrained(folder)
        for name, lib in _libs():
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=F32)
            model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            models[name] = lib.get_peft_model(model, lib.LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.1, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    n_fast = sum(isinstance(m, lora_bnb.Linear4bit) for m in models["peftfast"].modules())
    if n_fast != 4 * len(PROJECTIONS):
        raise RuntimeError(f"peftfast used its 4-bit LoRA layer for {n_fast} of {4 * len(PROJECTIONS)} "
                           "projections")
    share_adapters(*models.values())
    rows = []
    for name, model in models.items():
        saved = _saved(model.train(), ids)
        opt = torch.optim.AdamW(_trainables(model).values(), lr=1e-4)
        opt.step()
        w = weight_bytes(model)
        rows.append({"section": "memory", "what": "qlora_step", "path": name,
                     "model": "tiny Llama, 4 layers, hidden 128, batch 2x48; NF4 (no double quant), fp32 "
                              "compute", **{f"weights_{k}": v for k, v in w.items()},
                     "weights_total": sum(v for k, v in w.items() if k != "quantised_numel"),
                     "quantised_as_bf16": 2 * w["quantised_numel"],
                     "quantised_as_fp32": 4 * w["quantised_numel"],
                     "optimizer_state": optimizer_state_bytes(opt), **saved.as_row()})
    return rows


def memory_lines(rows: list[dict], errors: dict[str, str]) -> list[str]:
    out = ["== Measured memory (CPU, this machine): one training step, peftfast vs PEFT on the same model "
           "and inputs"]
    lora = [r for r in rows if r["what"] == "saved_activations"]
    if lora:
        out.append("Bytes saved for backward (saved_tensors_hooks, each storage once, parameters excluded); "
                   + lora[0]["model"])
        ref = {r["dropout"]: r["saved_bytes"] for r in lora if r["path"] == "peft"}
        body = [[f"{r['path']}, lora_dropout={r['dropout']}", _kb(r["saved_bytes"]), r["saved_tensors"]]
                + [f"{r['saved_bytes'] / ref[p]:.3f}" if p in ref else "-" for p in (0.1, 0.0)] for r in lora]
        out += table(["path", "saved kB", "tensors", "/ PEFT p=0.1", "/ PEFT p=0"], body)
        by = {(r["path"], r["dropout"]): r["saved_bytes"] for r in lora}
        for lib in ("peftfast", "peft"):
            if (lib, 0.1) in by and (lib, 0.0) in by:
                extra = by[lib, 0.1] - by[lib, 0.0]
                out.append(f"dropout 0.1 costs {lib} {_kb(extra)} kB ({extra / by[lib, 0.0]:+.1%}) of saved "
                           "activations (mask or CPU noise tensor, and the dropped copy of x)")
    if "lora" in errors:
        out.append(f"saved activations: not available: {errors['lora']}")
    q = [r for r in rows if r["what"] == "qlora_step"]
    if q:
        out.append(f"QLoRA step; {q[0]['model']}; LoRA r=16, dropout 0.1 on 7 projections; AdamW state after "
                   "one step")
        ref = next((r for r in q if r["path"] == "peft"), None)
        paired = ref is not None and len(q) == 2
        keys = [("4-bit packed weights", "weights_packed_4bit"), ("absmax + code", "weights_quant_state"),
                ("other frozen (embeddings, norms, head)", "weights_frozen_other"),
                ("adapters", "weights_trainable"), ("all weights", "weights_total"),
                ("saved activations", "saved_bytes"), ("AdamW state", "optimizer_state")]
        body = [[label] + [_kb(r[key]) for r in q]
                + ([f"{q[0][key] / ref[key]:.3f}" if ref[key] else "-"] if paired else [])
                for label, key in keys]
        head = ["kB"] + [r["path"] + (" + bitsandbytes" if r["path"] == "peft" else "") for r in q]
        out += table(head + (["peftfast / PEFT"] if paired else []), body)
        r0 = q[0]
        nf4 = r0["weights_packed_4bit"] + r0["weights_quant_state"]
        out.append(f"the quantised linears: {_kb(nf4)} kB as NF4 (packed + absmax + code) vs "
                   f"{_kb(r0['quantised_as_bf16'])} kB in bf16 ({nf4 / r0['quantised_as_bf16']:.3f}x) and "
                   f"{_kb(r0['quantised_as_fp32'])} kB in fp32 ({nf4 / r0['quantised_as_fp32']:.3f}x)")
    if "qlora" in errors:
        out.append(f"QLoRA memory: not available: {errors['qlora']}")
    return out


# ----------------------------------------------------------------------------------------------
# 3. measured wall time


def paired_times(fast: Callable[[], Any], ref: Callable[[], Any], repeats: int, target_s: float) -> dict:
    """Time ``fast`` and ``ref`` in interleaved pairs (order alternating, garbage collector off
    while timing); each sample runs ``inner`` calls, sized to about ``target_s``."""
    for fn in (fast, ref, fast, ref):
        fn()
    t0 = time.perf_counter()
    fast()
    inner = max(1, round(target_s / max(time.perf_counter() - t0, 1e-7)))
    fast_s, ref_s = [], []
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats):
            order = [(fast, fast_s), (ref, ref_s)]
            for fn, acc in (order if i % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                acc.append((time.perf_counter() - t0) / inner)
    finally:
        if enabled:
            gc.enable()
    ratios = [a / b for a, b in zip(fast_s, ref_s)]
    q1, med, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    return {"ratio_samples": ratios, "ratio_median": med, "ratio_q1": q1, "ratio_q3": q3,
            "peftfast_median_s": float(np.median(fast_s)), "peft_median_s": float(np.median(ref_s)),
            "repeats": repeats, "inner": inner}


def cpu_time_rows(quick: bool) -> list[dict]:
    repeats, target = (9, 0.01) if quick else (31, 0.05)
    rows = []
    for comp in cpu_comparisons(quick):
        row: dict[str, Any] = {"section": "cpu_time", "key": comp.key, "label": comp.label,
                               "threads": torch.get_num_threads()}
        try:
            with quiet():
                sides = comp.build()
            if "peft" not in sides:
                raise RuntimeError("PEFT is not installed (pip install peftfast[test])")
            row.update(paired_times(sides["peftfast"].step, sides["peft"].step, repeats, target))
            row["available"] = True
        except Exception as err:  # noqa: BLE001 - one comparison failing must not hide the others
            row.update(available=False, reason=f"{type(err).__name__}: {err}")
        rows.append(row)
        gc.collect()
    return rows


def cpu_time_lines(rows: list[dict]) -> list[str]:
    threads = rows[0]["threads"] if rows else torch.get_num_threads()
    out = [f"== Measured CPU wall time (this machine, {_threads(threads)}): the PyTorch path vs PEFT, "
           "same process, same inputs and adapter weights",
           "   ratio = peftfast / PEFT per interleaved pair of timings; median [IQR]; target: never slower "
           "(median <= 1)"]
    body = []
    for r in rows:
        if not r["available"]:
            out.append(f"{r['label']}: not available: {r['reason']}")
            continue
        spans = r["ratio_median"] > 1.0 >= r["ratio_q1"]
        verdict = _verdict(r["ratio_median"] <= 1.0) + (" (IQR spans 1)" if spans else "")
        body.append([r["label"], f"{r['ratio_median']:.3f}", f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]",
                     f"{r['peftfast_median_s'] * 1e3:.2f}", f"{r['peft_median_s'] * 1e3:.2f}",
                     f"{r['repeats']}x{r['inner']}", verdict])
    head = ["comparison", "ratio", "IQR", "peftfast ms", "PEFT ms", "pairs x calls", "target"]
    return out + table(head, body)


def do_bench_ms(fn: Callable[[], Any], quick: bool) -> tuple[float, float, float]:
    """(median, q1, q3) in ms from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 200, quantiles=[0.5, 0.25, 0.75])
    return tuple(ms)


def cuda_time_rows(quick: bool) -> list[dict]:
    """Measured ratios to the base matmul alone, forward and backward (= step - forward)."""
    rows = []
    for comp in cuda_comparisons(quick):
        try:
            with quiet():
                sides = comp.build()
            times = {name: {"fwd": do_bench_ms(s.fwd, quick), "step": do_bench_ms(s.step, quick)}
                     for name, s in sides.items()}
        except Exception as err:  # noqa: BLE001 - one comparison failing must not hide the others
            rows.append({"section": "cuda_time", "key": comp.key, "label": comp.label, "available": False,
                         "reason": f"{type(err).__name__}: {err}"})
            continue
        base = times.pop("base")
        base_bwd = base["step"][0] - base["fwd"][0]
        for name, tm in times.items():
            bwd = tm["step"][0] - tm["fwd"][0]
            rows.append({"section": "cuda_time", "key": comp.key, "label": comp.label, "path": name,
                         "available": True, "fwd_ms": tm["fwd"], "step_ms": tm["step"],
                         "base_fwd_ms": base["fwd"], "base_step_ms": base["step"],
                         "fwd_ratio": tm["fwd"][0] / base["fwd"][0],
                         "bwd_ratio": bwd / base_bwd if base_bwd > 0 else None})
        del sides
        torch.cuda.empty_cache()
    return rows


def cuda_time_lines(rows: list[dict], gpu_name: str) -> list[str]:
    out = [f"== Measured GPU time ({gpu_name}, triton.testing.do_bench, median of "
           "CUDA-event timings): ratio to the base matmul alone; bwd = (fwd+bwd) - fwd"]
    body = []
    for r in rows:
        if not r["available"]:
            out.append(f"{r['label']}: not available: {r['reason']}")
            continue
        bwd = "-" if r["bwd_ratio"] is None else f"{r['bwd_ratio']:.3f}"
        body.append([r["label"], r["path"], f"{r['fwd_ms'][0]:.3f}", f"{r['base_fwd_ms'][0]:.3f}",
                     f"{r['fwd_ratio']:.3f}", bwd])
    return out + table(["comparison", "path", "fwd ms", "base fwd ms", "fwd ratio", "bwd ratio"], body)


def summary_lines(rows: list[dict]) -> list[str]:
    """Every target the tables report, met or missed, in one place."""
    out = ["== Targets (DESIGN): met / MISSED"]
    for r in rows:
        if r["section"] == "modelled":
            parts = [f"{k} {r[f'{k}_ratio_ovh']:.3f} (<= {r[f'{k}_target']} {_verdict(r[f'{k}_met'])})"
                     for k in ("fwd", "bwd") if f"{k}_met" in r]
            if parts:
                out.append(f"modelled {r['gpu']}, {r['op']}, {r['path']}: " + ", ".join(parts))
    for gpu in GPUS:
        dec = [r for r in rows if r["section"] == "decode" and r["gpu"] == gpu.name]
        if dec:
            missed = [r["T"] for r in dec if not r["met"]]
            worst, worst_gemm = max(r["total_ratio"] for r in dec), max(r["gemm_ratio"] for r in dec)
            verdict = (f"MISSED at T={missed[0]}..{missed[-1]} (worst {worst:.3f}: the split-reduction "
                       "partials)" if missed else "met")
            out.append(f"modelled {gpu.name}, NF4 decode T=1..16, all launches within "
                       f"{DECODE_TARGET - 1:.0%} "
                       f"of packed + absmax: {verdict}; the GEMM alone: worst {worst_gemm:.3f} "
                       f"{_verdict(worst_gemm <= DECODE_TARGET)}")
    saved = {(r["path"], r["dropout"]): r["saved_bytes"] for r in rows
             if r.get("what") == "saved_activations" and "saved_bytes" in r}
    if ("peftfast", 0.1) in saved and ("peft", 0.0) in saved:
        ratio = saved["peftfast", 0.1] / saved["peft", 0.0]
        out.append(f"measured: saved activations, peftfast with dropout 0.1 / PEFT without dropout: "
                   f"{ratio:.3f} <= 1 {_verdict(ratio <= 1)}")
    for r in rows:
        if r["section"] == "cpu_time" and r.get("available"):
            out.append(f"measured CPU: {r['label']}: peftfast / PEFT {r['ratio_median']:.3f} "
                       f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] <= 1 {_verdict(r['ratio_median'] <= 1)}")
        elif r["section"] in ("cpu_time", "cuda_time", "memory") and r.get("available") is False:
            out.append(f"not available: {r.get('label') or r.get('what')}: {r['reason']}")
    return out


# ----------------------------------------------------------------------------------------------
# plot


def write_plot(rows: list[dict], path: Path) -> None:
    """Modelled ratios per path (with targets), and a roofline of the kernels of three paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, d, r = T_MODEL, D_MODEL, R_MODEL

    def both(impl, ad):
        return [k for bwd in (False, True) for k in cm.lora_layer(impl, bwd, t, d, d, r, ACT, ad, 0.1)]

    kernels = {"peftfast LoRA, p=0.1": both("peftfast", F32),
               "PEFT LoRA, bf16 adapters, p=0.1": both("peft", ACT),
               "peftfast QLoRA NF4, forward": cm.qlora_layer("peftfast", False, t, d, d, r, ACT, F32, 0.1)}
    fig, axes = plt.subplots(2, len(GPUS), figsize=(9.5 * len(GPUS), 11))
    for col, gpu in enumerate(GPUS):
        ax = axes[0][col]
        mine = [x for x in rows
                if x["section"] == "modelled" and x["gpu"] == gpu.name and "base" not in x["path"]]
        ys = np.arange(len(mine))
        ax.barh(ys - 0.2, [x["fwd_ratio_ovh"] for x in mine], 0.4, label="forward")
        ax.barh(ys + 0.2, [x.get("bwd_ratio_ovh", 0) for x in mine], 0.4, label="backward")
        for y, x in zip(ys, mine):
            for off, key in ((-0.2, "fwd_target"), (0.2, "bwd_target")):
                if key in x:
                    ax.plot([x[key]] * 2, [y + off - 0.2, y + off + 0.2], color="k", lw=2)
        ax.set_yticks(ys, [f"{x['op']}: {x['path']}" for x in mine], fontsize=6.5)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("modelled time / base matmul time (black ticks: targets)")
        ax.set_title(f"{gpu.name}: T={t}, d={d}, r={r}, bf16 (modelled from counted traffic, with launch "
                     "overhead)", fontsize=9)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        intensity = np.logspace(-2, 4, 200)
        for peak, style, label in ((gpu.tensor_flops, "k-", "roof (bf16 tensor)"),
                                   (gpu.fp32_flops, "k--", "roof (fp32)")):
            ax.loglog(intensity, np.minimum(peak, gpu.bandwidth * intensity), style, lw=1, label=label)
        for (label, ks), marker in zip(kernels.items(), "o^s"):
            pts = [(k.flops / k.bytes, k.flops / k.time(gpu)) for k in ks if k.bytes and k.flops]
            ax.scatter(*zip(*pts), marker=marker, label=label, alpha=0.7)
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("modelled FLOP/s")
        ax.set_title(f"{gpu.name}: roofline of each kernel launch (modelled)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command


def _default_out(env: dict) -> Path:
    root = _repo_root() if (_repo_root() / ".git").exists() else Path.cwd()
    name = f"bench-{env['git_sha'][:12]}{'-dirty' if env['git_dirty'] else ''}.json"
    return root / "bench" / "results" / name


def _measure_memory() -> tuple[list[dict], dict[str, str]]:
    rows, errors = [], {}
    for key, fn in (("lora", lora_memory_rows), ("qlora", qlora_memory_rows)):
        try:
            rows += fn()
        except Exception as err:  # noqa: BLE001 - e.g. the QLoRA layers not usable: reported, not fatal
            errors[key] = f"{type(err).__name__}: {err}"
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats and smaller models (tests, CI; < 60 s)")
    parser.add_argument("--out", type=Path,
                        help="JSON file for the rows (default: bench/results/bench-<git sha>.json)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the CPU timings (default 1: on a shared or busy machine more "
                             "threads time the scheduler rather than the ops)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    env = environment()
    out_path = args.out or _default_out(env)
    print(f"peftfast bench{' --quick' if args.quick else ''}: {env['cpu']} ({env['cpu_count']} CPUs, "
          f"{_threads(env['torch_threads'])}), GPU: {env['gpu'] or 'none'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
          + f"; git {env['git_sha'][:12]}{' (dirty)' if env['git_dirty'] else ''}")
    if "peft" not in dict(_libs()):
        print("PEFT is not installed: the comparisons against it are skipped (pip install peftfast[test])")
    print(flush=True)

    sections: dict[str, float] = {}
    t0 = time.perf_counter()
    calib = start_calibration()  # counts in Triton's interpreter while the memory is measured here
    try:
        mem_rows, mem_errors = _measure_memory()
        sections["memory"] = time.perf_counter() - t0
        cal_rows, cal_errors = finish_calibration(calib)
        sections["calibration, alongside memory"] = time.perf_counter() - t0
    finally:
        if calib.poll() is None:
            calib.kill()
            calib.communicate()
    calibrated = bool(cal_rows) and not cal_errors and all(r["ok"] for r in cal_rows)
    model_rows = modelled_rows()
    for lines in (calibration_lines(cal_rows, cal_errors), modelled_lines(model_rows),
                  memory_lines(mem_rows, mem_errors)):
        print("\n".join(lines) + "\n", flush=True)
    t0 = time.perf_counter()
    time_rows = cpu_time_rows(args.quick)
    sections["cpu timing"] = time.perf_counter() - t0
    print("\n".join(cpu_time_lines(time_rows)))
    gpu_rows = []
    if torch.cuda.is_available():
        t0 = time.perf_counter()
        gpu_rows = cuda_time_rows(args.quick)
        sections["gpu timing"] = time.perf_counter() - t0
        print("\n" + "\n".join(cuda_time_lines(gpu_rows, env["gpu"])))
    rows = cal_rows + model_rows + mem_rows + time_rows + gpu_rows
    rows += [{"section": "memory", "what": key, "available": False, "reason": why}
             for key, why in mem_errors.items()]
    rows += [{"section": "calibration", "name": e, "ok": False, "error": True} for e in cal_errors]
    print("\n" + "\n".join(summary_lines(rows)))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    plot_path = None if args.no_plot else out_path.with_suffix(".png")
    if plot_path:
        write_plot(model_rows, plot_path)
    elapsed = time.perf_counter() - started
    meta = {**env, "quick": args.quick, "elapsed_s": elapsed, "section_s": sections, "calibrated": calibrated,
            "plot": str(plot_path) if plot_path else None}
    out_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"\nrows: {out_path}" + (f"; plot: {plot_path}" if plot_path else "") + f"; {elapsed:.1f} s")
    if not calibrated:
        print("calibration FAILED: the modelled figures are not backed by counted traffic", file=sys.stderr)
    return 0 if calibrated else 1


if __name__ == "__main__":
    raise SystemExit(main())
