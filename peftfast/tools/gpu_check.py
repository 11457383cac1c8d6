"""GPU acceptance run: what a GPU must show before the Triton kernels are called GPU-tested.

``peftfast gpu-check`` (or ``python -m peftfast.tools.gpu_check``) runs four sections, each in a
child process under a watchdog (a section that does not finish in time is killed and reported as
a hang instead of hanging the run):

- ``kernels``: the fused LoRA linear (forward, dX, dA, dB, db), the 4-bit (plain and nested absmax)
  and int8 QLoRA linears, each at a training shape and a decode shape (T <= 16), in fp16, bf16 and
  fp32 activations with adapters in the activation dtype and in fp32; every output and gradient
  of the Triton path is compared with a float64 reference and must be within k x the error of
  plain PyTorch in the same dtypes (the reference backend) plus one ulp of the result. Then mixed
  batches served while adapters are added and deleted must compile no new variant of the grouped
  kernels (``serving_compiles_check``; not in ``--dry``, where nothing is compiled).
- ``stress``: many launches of the ticketed fused forward and of the backward (epoch counters)
  at random odd shapes on several CUDA streams; afterwards no counter may be ahead of its stream's
  epoch and sampled results must match the reference backend.
- ``graphs``: capture of a training step (forward + backward of a fused LoRA linear) in a CUDA
  graph. Today's expected outcome is a refusal with peftfast's error (``runtime.check_not_capturing``);
  a capture that succeeds silently, or fails with another error, fails the section.
- ``bench``: the bench's modelled ratios (``peftfast bench``'s cost model) next to the ratios
  measured on this GPU with CUDA events (``tools.bench.cuda_time``).
- ``dispatch``: the measured choice between the fused LoRA GEMM and cuBLAS + the adapter kernels
  (kernels/autotune.py) at a few training and decode keys, with a fresh cache folder: every key is
  timed once (both candidates finite, the faster kept), the chosen path and the other one both
  match float64, the decisions are written and read back by a fresh tuner, and with
  ``PEFTFAST_AUTOTUNE=0`` nothing is timed.

Writes ``gpu-check.json`` (environment, every check with its numbers, section status and time)
and ``gpu-check.txt`` (a readable summary) into ``--out``. Exit status 0 when no section failed
or hung. ``--dry`` runs the same sections on CPU tensors in Triton's interpreter at tiny shapes
(fp32 and fp16 only: the interpreter has no bf16 arithmetic; ``graphs`` and the measured half of
``bench`` are skipped; ``dispatch`` checks that nothing is timed there and runs the selection with
set timings): it proves the script itself works, and CI runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

SECTIONS = ("kernels", "stress", "graphs", "bench", "dispatch")
# seconds per section before the watchdog calls it a hang (GPU run / dry run); at most 8 min on a GPU
TIMEOUTS = {"kernels": (210, 600), "stress": (120, 300), "graphs": (60, 60), "bench": (90, 300),
            "dispatch": (120, 240)}
K_FACTOR = 4.0  # Triton error <= K_FACTOR x plain PyTorch's error (same dtypes) + 1 ulp


# ----------------------------------------------------------------------------------------------
# parent: one child process per section, under a watchdog


def run_child(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` (a section child) for at most ``timeout`` seconds. Returns its JSON result (the
    last stdout line), or a status 'hang' (killed at the timeout) / 'fail' (crashed, no result)."""
    start = time.perf_counter()
    try:
        # run from the temporary folder: ``python -m`` puts the working directory first on sys.path, and from a
        # source checkout that would import the checkout's peftfast/ (without its kernels) instead of the installed one
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "hang", "seconds": time.perf_counter() - start,
                "error": f"no result after {timeout:.0f} s: killed by the watchdog", "stderr_tail": tail}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict) or "status" not in result:
        return {"status": "fail", "seconds": time.perf_counter() - start,
                "error": f"the section process exited with {proc.returncode} and no result",
                "stderr_tail": proc.stderr[-2000:]}
    result["seconds"] = time.perf_counter() - start
    return result


def _environment(dry: bool) -> dict:
    from .bench.results import environment

    env = environment()
    env["mode"] = "dry (CPU, Triton interpreter)" if dry else "cuda"
    return env


def summary_text(data: dict) -> str:
    env = data["environment"]
    lines = [f"peftfast gpu-check ({env.get('mode')}) on {env.get('gpu') or env.get('cpu') or '?'}, "
             f"git {str(env.get('git_sha'))[:12]}{' (dirty)' if env.get('git_dirty') else ''}"]
    for name, sec in data["sections"].items():
        lines.append(f"[{sec['status'].upper():>7}] {name:<8} {sec.get('seconds', 0):6.1f} s"
                     + (f"  {sec['error']}" if sec.get("error") else ""))
        for check in sec.get("checks", []):
            if not check.get("ok", True) or name in ("bench", "graphs") or check.get("show"):
                lines.append(f"          {'ok  ' if check.get('ok', True) else 'FAIL'} {check['name']}: "
                             f"{check.get('detail', '')}")
        n = len(sec.get("checks", []))
        bad = sum(not c.get("ok", True) for c in sec.get("checks", []))
        if n:
            lines.append(f"          {n - bad}/{n} checks passed")
    lines.append(f"overall: {'PASS' if data['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true",
                        help="CPU tensors in Triton's interpreter at tiny shapes (proves the script works)")
    parser.add_argument("--out", default=None, help="directory for gpu-check.json and gpu-check.txt "
                        "(default: bench/results/gpu-check-<git sha>)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # child mode: run one section, print JSON
    args = parser.parse_args(argv)
    if args.section:
        return _child(args.section, args.dry)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; sections: {', '.join(SECTIONS)}")
    import torch

    dry = args.dry or not torch.cuda.is_available()
    if not args.dry and dry:
        print("gpu-check: no CUDA device; running the dry mode (--dry)", file=sys.stderr)
    env = dict(os.environ)
    if dry:
        env.update(TRITON_INTERPRET="1", PEFTFAST_BACKEND="triton")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sections = {}
    for name in chosen:
        if dry and name == "graphs":
            sections[name] = {"status": "skipped", "seconds": 0.0, "checks": [], "error": "needs CUDA"}
            continue
        cmd = [sys.executable, "-m", "peftfast.tools.gpu_check", "--section", name] + (["--dry"] if dry else [])
        sections[name] = run_child(cmd, TIMEOUTS[name][dry], env)
        print(f"gpu-check: {name}: {sections[name]['status']} ({sections[name]['seconds']:.1f} s)", file=sys.stderr)
    data = {"environment": _environment(dry), "sections": sections,
            "ok": all(s["status"] in ("pass", "skipped") for s in sections.values())}
    from .bench.results import repo_root

    out = Path(args.out) if args.out else repo_root() / "bench" / "results" / \
        f"gpu-check-{str(data['environment'].get('git_sha') or 'unknown')[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(data, indent=1, default=str))
    text = summary_text(data)
    (out / "gpu-check.txt").write_text(text + "\n")
    print(text)
    print(f"written: {out / 'gpu-check.json'}, {out / 'gpu-check.txt'}")
    return 0 if data["ok"] else 1


# ----------------------------------------------------------------------------------------------
# child side: the sections


def _child(name: str, dry: bool) -> int:
    fn = {"kernels": section_kernels, "stress": section_stress, "graphs": section_graphs,
          "bench": section_bench, "dispatch": section_dispatch}[name]
    try:
        result = fn(dry)
    except Exception as err:  # noqa: BLE001 - reported as the section's failure
        import traceback

        result = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-4000:]}
    print(json.dumps(result, default=str))
    return 0


def _device(dry: bool):
    import torch

    return torch.device("cpu" if dry else "cuda")


def _err(got, ref) -> float:
    return (got.double().cpu() - ref.double().cpu()).abs().max().item() if got.numel() else 0.0


def compare_to_float64(name: str, got, plain, ref) -> dict:
    """The Triton result ``got`` against the float64 ``ref``: within K_FACTOR x plain PyTorch's error
    (``plain``, same dtypes) + one ulp of got's dtype."""
    import torch

    err, err_pt = _err(got, ref), _err(plain, ref)
    ulp = torch.finfo(got.dtype).eps * (ref.double().abs().max().item() if ref.numel() else 0.0)
    allowed = K_FACTOR * err_pt + ulp
    ok = bool(got.shape == ref.shape and got.dtype == plain.dtype and err <= allowed and err == err)
    return {"name": name, "ok": ok, "error": err, "plain_error": err_pt, "allowed": allowed,
            "detail": f"error {err:.3e} <= {allowed:.3e}" if ok else f"error {err:.3e} > allowed {allowed:.3e}"}


def _backend(name: str):
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = os.environ.get("PEFTFAST_BACKEND")
        os.environ["PEFTFAST_BACKEND"] = name
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("PEFTFAST_BACKEND", None)
            else:
                os.environ["PEFTFAST_BACKEND"] = old
    return ctx()


def _run_op(op: Callable, inputs: list, dy) -> list:
    """[output, grad of each input that requires grad] of op(*inputs), backward with dy."""
    import torch

    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    out = op(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad], dy)
    return [out.detach()] + [g for g in grads]


def _check_op(label: str, op: Callable, inputs: list, dy, names: list[str], ref_op: Callable | None = None) -> list[dict]:
    """The op on the Triton backend vs float64 (``ref_op``, default the op itself on the reference
    backend, on the inputs cast to float64 on CPU) vs plain PyTorch (reference backend, same dtypes
    and device)."""
    import torch

    with _backend("triton"):
        got = _run_op(op, inputs, dy)
    with _backend("torch"):
        plain = _run_op(op, inputs, dy)
        ref = _run_op(ref_op or op, [t.detach().double().cpu().requires_grad_(t.requires_grad)
                                     if isinstance(t, torch.Tensor) and t.is_floating_point() else
                                     (t.cpu() if isinstance(t, torch.Tensor) else t) for t in inputs],
                      dy.double().cpu())
    return [compare_to_float64(f"{label} {n}", g, p, r) for n, g, p, r in zip(names, got, plain, ref)]


def _lora_inputs(t: int, d_in: int, d_out: int, rank: int, act, ad, device, gen):
    import torch

    def rnd(*shape, dtype, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    x = rnd(t, d_in, dtype=act)
    a = rnd(rank, d_in, dtype=ad, scale=d_in ** -0.5)
    b = rnd(d_out, rank, dtype=ad, scale=rank ** -0.5)  # non-zero B: the adapter term is really there
    return x, a, b, rnd(t, d_out, dtype=act, grad=False)


def _packed_4bit(d_out: int, d_in: int, dtype, nested: bool, device, gen):
    """A random 4-bit weight in bitsandbytes' layout (random indices and scales; NF4 table)."""
    import torch

    from peftfast.kernels.quant import Packed4bit

    nf4 = torch.tensor([-1, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0,
                        0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
    bs = 64
    blocks = -(-d_out * d_in // bs)
    data = torch.randint(0, 256, (-(-d_out * d_in // 2),), generator=gen, dtype=torch.uint8)
    scale = d_in ** -0.5
    if not nested:
        absmax = torch.rand(blocks, generator=gen) * scale + 0.1 * scale
        return Packed4bit(data.to(device), absmax.to(device), nf4.to(device), bs, (d_out, d_in), dtype)
    absmax = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
    code2 = torch.sort(torch.rand(256, generator=gen) * 2 - 1).values
    nested_absmax = torch.rand(-(-blocks // 256), generator=gen) * scale + 0.1 * scale
    return Packed4bit(data.to(device), absmax.to(device), nf4.to(device), bs, (d_out, d_in), dtype,
                      nested_absmax.to(device), code2.to(device), 256, 1.5 * scale)


def _int8_weight(d_out: int, d_in: int, device, gen):
    import torch

    from peftfast.kernels.qlora import Int8Weight

    cb = torch.randint(-127, 128, (d_out, d_in), generator=gen, dtype=torch.int8)
    scb = (torch.rand(d_out, generator=gen) + 0.5) * d_in ** -0.5  # row absmax: W = CB * SCB / 127
    return Int8Weight(cb.to(device), scb.to(device))


def section_kernels(dry: bool) -> dict:
    import torch

    from peftfast.kernels import lora_linear_fused, qlora_linear_fused
    from peftfast.kernels import qmatmul as Q

    device = _device(dry)
    gen = torch.Generator().manual_seed(0)
    acts = (torch.float32, torch.float16) if dry else (torch.float16, torch.bfloat16, torch.float32)
    # (tokens, d_in, d_out, rank): a training shape and a decode shape; odd sizes on purpose
    shapes = ((37, 72, 40, 5), (3, 64, 48, 4)) if dry else ((1000, 1536, 1000, 24), (7, 4096, 1100, 16))
    checks: list[dict] = []
    names = ["out", "dX", "dA", "dB"]
    for act in acts:
        for ad in dict.fromkeys((act, torch.float32)):
            for t, d_in, d_out, rank in shapes:
                tag = f"[x={act},ad={ad},T={t},{d_in}->{d_out},r={rank}]".replace("torch.", "")
                x, a, b, dy = _lora_inputs(t, d_in, d_out, rank, act, ad, device, gen)
                w = (torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5).to(device=device, dtype=act)
                bias = torch.randn(d_out, generator=gen).to(device=device, dtype=act).requires_grad_(True)
                checks += _check_op(f"lora_fused{tag}",
                                    lambda x_, bias_, a_, b_, w_: lora_linear_fused(x_, w_, bias_, [a_], [b_], [2.0],
                                                                                    [0.0], True),
                                    [x, bias, a, b, w], dy, ["out", "dX", "db", "dA", "dB"])
                if dry and (act, t) != (torch.float16, shapes[0][0]):
                    continue  # the interpreter is slow: the quantised paths once each in the dry run
                for kind in ("nf4", "nf4-nested", "int8"):
                    p = (_int8_weight(d_out, d_in, device, gen) if kind == "int8" else
                         _packed_4bit(d_out, d_in, act, kind.endswith("nested"), device, gen))
                    # float64 reference: the dequantised weight (exact in x's dtype) in a float64 LoRA linear
                    w_q = (Q.dequantize_int8_reference(p.cb, p.scb, act) if kind == "int8" else
                           Q.dequantize_4bit_torch(p).to(act)).double().cpu()
                    checks += _check_op(f"qlora_{kind}{tag}",
                                        lambda x_, a_, b_, p_=p: qlora_linear_fused(x_, p_, None, [a_], [b_], [2.0],
                                                                                    [0.0], True),
                                        [x, a, b], dy, names,
                                        ref_op=lambda x_, a_, b_, w_=w_q: x_ @ w_.T + 2.0 * (x_ @ a_.T) @ b_.T)
    checks += grouped_checks(dry, device, gen, acts)
    if not dry:  # the interpreter compiles nothing
        checks.append(serving_compiles_check(device))
    ok = all(c["ok"] for c in checks)
    return {"status": "pass" if ok else "fail", "checks": checks}


def grouped_checks(dry: bool, device, gen, acts) -> list[dict]:
    """Mixed batches: ``lora_grouped`` (after a base output), ``lora_grouped_linear`` (the base GEMM fused in) and
    ``lora_grouped_qlinear`` (over an NF4 (nested scales) and an int8 weight, dequantised in the fused GEMM) on CUDA
    tensors against float64, three adapters of ranks 5 / 16 / 9 (the last without rows) and base rows, output and
    the gradients of x, the bias (fused) and each adapter's A and B."""
    import torch

    from peftfast.kernels import qmatmul as Q
    from peftfast.kernels.lora_grouped import lora_grouped, lora_grouped_linear, rank_bucket
    from peftfast.kernels.lora_grouped_q import lora_grouped_qlinear

    t, d_in, d_out = (150, 64, 56) if dry else (3000, 1536, 1000)  # d_in: whole 4-bit blocks (the aligned layout)
    ranks = (5, 16, 9)
    checks: list[dict] = []
    names = ["out", "dX", "db", "dA0", "dA1", "dA2", "dB0", "dB1", "dB2"]
    for act in acts[:1] if dry else acts:
        for ad in dict.fromkeys((act, torch.float32)):
            tag = f"[x={act},ad={ad},T={t},{d_in}->{d_out}]".replace("torch.", "")
            x, _, _, dy = _lora_inputs(t, d_in, d_out, 1, act, ad, device, gen)
            a = [(torch.randn(r, d_in, generator=gen) * d_in ** -0.5).to(device=device, dtype=ad).requires_grad_()
                 for r in ranks]
            b = [(torch.randn(d_out, r, generator=gen) * r ** -0.5).to(device=device, dtype=ad).requires_grad_()
                 for r in ranks]
            w = (torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5).to(device=device, dtype=act)
            bias = torch.randn(d_out, generator=gen).to(device=device, dtype=act).requires_grad_(True)
            base = torch.randn(t, d_out, generator=gen).to(device=device, dtype=act).requires_grad_(True)
            index = torch.randint(-1, 2, (t,), generator=gen)

            def stores(a_, b_):
                r = rank_bucket(max(ranks))
                st_a = torch.zeros(3, r, d_in, dtype=a_[0].dtype, device=a_[0].device)
                st_b = torch.zeros(3, r, d_out, dtype=a_[0].dtype, device=a_[0].device).transpose(1, 2)
                for i, (wa, wb) in enumerate(zip(a_, b_)):
                    st_a[i, :wa.shape[0]] = wa.detach()
                    st_b[i, :, :wb.shape[1]] = wb.detach()
                return st_a, st_b, torch.tensor([1.5, 0.5, 2.0], device=a_[0].device)

            def fused(x_, bias_, *ab, w_=w):
                return lora_grouped_linear(x_, w_.to(x_), bias_, ab[:3], ab[3:], *stores(ab[:3], ab[3:]),
                                           index.to(x_.device))

            def grouped(x_, base_, *ab):
                return lora_grouped(x_, base_ * 1.0, ab[:3], ab[3:], *stores(ab[:3], ab[3:]), index.to(x_.device))

            checks += _check_op(f"lora_grouped_linear{tag}", fused, [x, bias, *a, *b], dy, names)
            checks += _check_op(f"lora_grouped{tag}", grouped, [x, base, *a, *b], dy,
                                ["out", "dX", "dbase", *names[3:]])
            for kind in ("nf4-nested", "int8"):
                p = (_int8_weight(d_out, d_in, device, gen) if kind == "int8" else
                     _packed_4bit(d_out, d_in, act, True, device, gen))
                w_q = (Q.dequantize_int8_reference(p.cb, p.scb, act) if kind == "int8" else
                       Q.dequantize_4bit_torch(p).to(act)).double().cpu()

                def qfused(x_, bias_, *ab, p_=p):
                    return lora_grouped_qlinear(x_, p_, bias_, ab[:3], ab[3:], *stores(ab[:3], ab[3:]),
                                                index.to(x_.device))

                checks += _check_op(f"lora_grouped_qlinear_{kind}{tag}", qfused, [x, bias, *a, *b], dy, names,
                                    ref_op=lambda x_, bias_, *ab, w_=w_q: fused(x_, bias_, *ab, w_=w_))
    return checks


def serving_compiles_check(device) -> dict:
    """Mixed batches while adapters come and go (GPU only): a bf16 two-layer LoRA model serves a decode batch (64
    sequences x 1 token) and a prefill (8 x 128, fused) with one adapter, then after each of 15 adapters is added
    (ranks 1..16: the store's rank stays 16) and one deleted, with batches that use the new ones; the grouped kernels'
    compile caches (Triton's per-device dict of compiled variants) must hold no variant more than after the first
    batches, and every output must be finite."""
    import torch
    from torch import nn

    import peftfast as fast
    from peftfast.kernels.lora_grouped import GROUPED_KERNELS

    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if on_gpu else None

    def variants() -> int:
        return sum(len(k.device_caches[index][0]) for k in GROUPED_KERNELS
                   if index in getattr(k, "device_caches", {}))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 384), nn.Tanh(), nn.Linear(384, 256)).to(dev, torch.bfloat16)

    def config(r: int):
        return fast.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], init_lora_weights=False)

    pm = fast.get_peft_model(model, config(16), adapter_name="a0").eval()
    decode = torch.randn(64, 1, 512, device=dev, dtype=torch.bfloat16)
    prefill = torch.randn(8, 128, 512, device=dev, dtype=torch.bfloat16)
    finite = True

    def serve(names: list[str]) -> None:
        nonlocal finite
        with torch.no_grad():
            for x, n in ((decode, (names * 64)[:64]), (prefill, ["a0", "__base__"] * 4)):
                finite = finite and bool(torch.isfinite(pm(x, adapter_names=n)).all())
        if on_gpu:
            torch.cuda.synchronize(dev)

    serve(["a0", "__base__"])
    first = variants()
    held = ["a0"]
    for i in range(1, 16):
        pm.add_adapter(f"a{i}", config(1 + i % 16))
        held.append(f"a{i}")
        serve(held[-3:] + ["__base__"])
    pm.delete_adapter("a3")
    serve(["a2", "a4", "a15", "__base__"])
    after = variants()
    return {"name": "mixed batches: adding 15 adapters and deleting one compiles no new grouped-kernel variant",
            "ok": first > 0 and after == first and finite, "show": True,
            "detail": f"compiled variants of {len(GROUPED_KERNELS)} grouped kernels: {first} after the first "
                      f"batches, {after} at the end; outputs finite: {finite}"}


def section_stress(dry: bool) -> dict:
    import torch

    from peftfast.kernels import lora_linear_fused, tiles

    device = _device(dry)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(1)
    streams = [None] if dry else [torch.cuda.Stream() for _ in range(3)]
    launches = 6 if dry else 300
    act = torch.float16
    samples: list[dict] = []
    kept = []
    for i in range(launches):
        t, d_in, d_out, rank = (rng.randint(1, 40), rng.randint(8, 80), rng.randint(8, 80), rng.randint(1, 9)) if dry \
            else (rng.randint(1, 3000), rng.randint(16, 2100), rng.randint(16, 2100), rng.randint(1, 70))
        x, a, b, dy = _lora_inputs(t, d_in, d_out, rank, act, act, device, gen)
        w = (torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5).to(device=device, dtype=act)
        stream = streams[i % len(streams)]
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx, _backend("triton"):
            out = lora_linear_fused(x, w, None, [a], [b], [1.5], [0.0], True)
            grads = torch.autograd.grad(out, [x, a, b], dy) if i % 3 == 0 else None
        if i % max(1, launches // 10) == 0:
            kept.append((x, w, a, b, dy, out, grads))
    if not dry:
        torch.cuda.synchronize()
    # each launch counts from its own epoch's base up: no counter may run ahead of its stream's epoch
    ahead = {str(k): int((buf >= (epoch + 1) << tiles.EPOCH_SHIFT).sum())
             for k, (buf, epoch) in tiles.EPOCH_COUNTERS.items()}
    checks = [{"name": f"{launches} launches on {len(streams)} stream(s): epoch counters within their epoch",
               "ok": all(n == 0 for n in ahead.values()), "detail": f"counters ahead of their epoch per buffer: {ahead}"}]
    for j, (x, w, a, b, dy, out, grads) in enumerate(kept):
        with _backend("torch"):
            ref = lora_linear_fused(x, w, None, [a], [b], [1.5], [0.0], True)
            ref_grads = torch.autograd.grad(ref, [x, a, b], dy) if grads is not None else None
        # the same op on the reference backend in the same dtype: errors of two 16-bit results
        tol = 4 * torch.finfo(act).eps * (ref.abs().max().item() + 1) * max(8, int(x.shape[1] ** 0.5))
        err = _err(out, ref)
        samples.append({"name": f"sample {j} forward {tuple(x.shape)}->{out.shape[-1]}", "ok": err <= tol,
                        "detail": f"|triton - torch| {err:.3e} (bound {tol:.3e})"})
        if grads is not None:
            for n, g, r in zip(("dX", "dA", "dB"), grads, ref_grads):
                tol_g = 4 * torch.finfo(act).eps * (r.abs().max().item() + 1) * max(8, int(x.shape[0] ** 0.5))
                e = _err(g, r)
                samples.append({"name": f"sample {j} {n}", "ok": e <= tol_g, "detail": f"{e:.3e} (bound {tol_g:.3e})"})
    checks += samples
    return {"status": "pass" if all(c["ok"] for c in checks) else "fail", "checks": checks}


def _null():
    import contextlib

    return contextlib.nullcontext()


def section_graphs(dry: bool) -> dict:
    if dry:
        return {"status": "skipped", "checks": [], "error": "needs CUDA"}
    import torch

    from peftfast.kernels import lora_linear_fused

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    x, a, b, dy = _lora_inputs(256, 512, 384, 16, torch.bfloat16, torch.float32, device, gen)
    w = (torch.randn(384, 512, generator=gen) * 512 ** -0.5).to(device=device, dtype=torch.bfloat16)

    def step():
        out = lora_linear_fused(x, w, None, [a], [b], [2.0], [0.1], True)
        return torch.autograd.grad(out, [x, a, b], dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (compiles the kernels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as err:  # noqa: BLE001 - which error it was is the result
        # the graph's own exit may raise over peftfast's error: look along the chain too
        chain = [err, err.__context__, err.__cause__]
        refused = any("cannot be captured in a CUDA graph" in str(e) for e in chain if e is not None)
        return {"status": "pass" if refused else "fail",
                "checks": [{"name": "capture of a training step", "ok": refused,
                            "detail": ("refused with peftfast's error (expected today)" if refused else
                                       f"failed with another error: {err}")}]}
    return {"status": "fail", "checks": [{"name": "capture of a training step", "ok": False,
                                          "detail": "captured although the launches are not capture-safe"}]}


def section_bench(dry: bool) -> dict:
    from .bench.modelled import modelled_rows

    model = modelled_rows()
    checks = [{"name": f"modelled {r['gpu']} {r['op']} {r['path']}", "ok": True,
               "detail": f"fwd {r.get('fwd_ratio', float('nan')):.3f}x"
                         + (f", bwd {r['bwd_ratio']:.3f}x" if "bwd_ratio" in r else "")} for r in model
              if r.get("section") == "modelled" and "fwd_ratio" in r]
    if dry:
        return {"status": "pass", "checks": checks, "measured": None,
                "error": "measured ratios skipped (needs CUDA); modelled ratios listed"}
    from .bench.cuda_time import cuda_time_rows

    measured = cuda_time_rows(quick=True)
    for r in measured:
        if r["section"] == "dispatch":  # which path the measured dispatch kept for a key the bench ran
            ms = ", ".join(f"{n} {'failed' if v is None else f'{v:.3f} ms'}" for n, v in r["ms"].items())
            checks.append({"name": f"dispatch {r['label']}: {r['shape']}", "ok": True,
                           "detail": f"{r['choice']} won ({ms}; {r['source']})"})
            continue
        name = f"measured {r['label']} {r.get('path', '')}".strip()
        if not r["available"]:
            checks.append({"name": name, "ok": False, "detail": f"not measured: {r['reason']}"})
            continue
        bwd = "-" if r["bwd_ratio"] is None else f"{r['bwd_ratio']:.3f}x"
        checks.append({"name": name, "ok": True, "detail": f"fwd {r['fwd_ratio']:.3f}x, bwd {bwd} of the base matmul"})
    if not all(c["ok"] for c in checks):
        return {"status": "fail", "checks": checks, "modelled": model, "measured": measured}
    return {"status": "pass", "checks": checks, "modelled": model, "measured": measured}


# (tokens, d_in, d_out, rank, x dtype, adapter dtype, dropout, backward): training keys and a decode key
DISPATCH_CASES = ((2048, 4096, 4096, 16, "bfloat16", "float32", 0.1, True),
                  (1024, 4096, 11008, 16, "bfloat16", "bfloat16", 0.0, True),
                  (1000, 1536, 1000, 24, "float16", "float16", 0.0, True),
                  (8, 4096, 4096, 16, "bfloat16", "bfloat16", 0.0, False))
DRY_DISPATCH_CASES = ((37, 72, 40, 5, "float32", "float32", 0.1, True), (3, 64, 48, 4, "float16", "float32", 0.0,
                                                                          False))


def section_dispatch(dry: bool) -> dict:
    import torch

    from peftfast.kernels import autotune

    with tempfile.TemporaryDirectory() as folder:
        if dry:  # nothing may be timed in the interpreter: a timer that fails if called
            checks = dispatch_checks(torch.device("cpu"), DRY_DISPATCH_CASES, Path(folder), expect_measured=False)
            checks.append(_selection_with_set_timings(autotune, Path(folder) / "set"))
        else:
            checks = dispatch_checks(torch.device("cuda"), DISPATCH_CASES, Path(folder), expect_measured=True)
    return {"status": "pass" if all(c["ok"] for c in checks) else "fail", "checks": checks}


def _selection_with_set_timings(autotune, folder: Path) -> dict:
    """The selection itself with set timings: the faster kept, written, read back by a fresh tuner."""
    key = ("gpu-check", 1)
    fast = {"fused": lambda: None, "unfused": lambda: None}
    times = {fast["fused"]: 2.0, fast["unfused"]: 1.0}
    first = autotune.Tuner(timer=lambda fn, w, r: times[fn], directory=folder).choose("set", key, fast, "fused")
    again = autotune.Tuner(timer=lambda fn, w, r: 1 / 0, directory=folder).choose("set", key, fast, "fused")
    ok = (first.choice, first.source, again.choice, again.source) == ("unfused", "measured", "unfused", "cache file")
    return {"name": "selection with set timings (fused 2 ms, unfused 1 ms)", "ok": ok, "show": True,
            "detail": f"chose {first.choice} ({first.source}), read back {again.choice} ({again.source})"}


def dispatch_checks(device, cases, folder: Path, expect_measured: bool) -> list[dict]:
    """For each case (a ``lora_linear_fused`` call), with a fresh tuner writing to ``folder``: the key was
    timed (``expect_measured``; else: nothing timed, no decision), the chosen path and the fused and
    unfused paths each match float64, and afterwards a fresh tuner reads every decision back from the
    file and ``PEFTFAST_AUTOTUNE=0`` times nothing."""
    import torch
    import torch.nn.functional as F

    from peftfast.kernels import autotune, lora_linear_fused
    from peftfast.kernels import lora as L
    from peftfast.kernels import lora_fused as LF

    def no_timing(fn, warmup, repeats):
        raise AssertionError("a candidate was timed where nothing may be")

    old = autotune.TUNER
    autotune.TUNER = tuner = autotune.Tuner(directory=folder) if expect_measured else \
        autotune.Tuner(timer=no_timing, directory=folder)
    gen = torch.Generator().manual_seed(3)
    checks: list[dict] = []
    try:
        with _backend("triton"), _env("PEFTFAST_AUTOTUNE", "1"):  # measured even where the caller switched it off
            for t, d_in, d_out, rank, act, ad, p, backward in cases:
                act, ad = getattr(torch, act), getattr(torch, ad)
                x, a, b, dy = _lora_inputs(t, d_in, d_out, rank, act, ad, device, gen)
                w = (torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5).to(device=device, dtype=act)
                bias = torch.randn(d_out, generator=gen).to(device=device, dtype=act).requires_grad_(backward)
                x.requires_grad_(backward)
                key = LF.dispatch_key(x, w, [a], backward, backward, p > 0)
                tag = LF.describe_key(key)
                before = len(tuner.decisions())
                ps = [p]

                def chosen(x_, bias_, a_, b_, w_):
                    return lora_linear_fused(x_, w_, bias_, [a_], [b_], [2.0], ps, True)

                def fused(x_, bias_, a_, b_, w_):
                    with _env("PEFTFAST_AUTOTUNE", "0"):
                        return lora_linear_fused(x_, w_, bias_, [a_], [b_], [2.0], ps, True)

                def unfused(x_, bias_, a_, b_, w_):
                    return L.lora_linear(x_, F.linear(x_, w_, bias_), [a_], [b_], [2.0], ps, True)

                names = ["out", "dX", "db", "dA", "dB"] if backward else ["out"]
                inputs = [x, bias, a.requires_grad_(backward), b.requires_grad_(backward), w]
                checks += _check_dispatch_ops(tag, {"chosen": chosen, "fused": fused, "unfused": unfused}, inputs,
                                              dy, names, p, backward)
                made = tuner.decisions()[before:]
                if expect_measured:
                    d = made[0][2] if made else None
                    ok = (d is not None and d.source == "measured" and set(d.ms) == {"fused", "unfused"}
                          and all(v == v and v < float("inf") for v in d.ms.values())
                          and d.choice == tuner.pick(d.ms, "fused"))
                    detail = (f"{d.choice} won: " + ", ".join(f"{n} {v:.3f} ms" for n, v in d.ms.items())
                              if d is not None else "no decision was made")
                else:
                    ok, detail = not made, "nothing timed (fixed choice: fused)" if not made else f"decided {made}"
                checks.append({"name": f"dispatch {tag}", "ok": ok, "detail": detail, "show": True})
        if expect_measured:
            fresh = autotune.Tuner(timer=no_timing, directory=folder)
            back = [fresh.lookup(dev, key) for dev, key, _ in tuner.decisions()]
            ok = bool(back) and all(d is not None and d.source == "cache file" for d in back) and \
                [d.choice for d in back] == [d.choice for _, _, d in tuner.decisions()]
            checks.append({"name": "decisions written and read back by a fresh tuner", "ok": ok, "show": True,
                           "detail": f"{len(back)} key(s) in {tuner.path(autotune.device_name(device)).name}"})
            autotune.TUNER = off = autotune.Tuner(timer=no_timing, directory=folder / "off")
            x, a, b, _ = _lora_inputs(64, 256, 128, 8, torch.float16, torch.float16, device, gen)
            w = torch.randn(128, 256, generator=gen).to(device=device, dtype=torch.float16)
            with _backend("triton"), _env("PEFTFAST_AUTOTUNE", "0"):
                lora_linear_fused(x, w, None, [a], [b], [1.0], [0.0], True).sum().backward()
            checks.append({"name": "PEFTFAST_AUTOTUNE=0: nothing timed", "ok": not off.decisions(), "show": True,
                           "detail": f"{len(off.decisions())} decision(s)"})
    finally:
        autotune.TUNER = old
    return checks


def _check_dispatch_ops(tag, ops: dict, inputs, dy, names, p, backward) -> list[dict]:
    """Each of ``ops`` (the same math: x @ w^T + bias + 2 (drop(x) @ a^T) @ b^T) on the Triton backend against
    float64, with the tolerance from plain PyTorch (the reference backend, same dtypes). The seed is fixed before
    each run and the float64 reference applies the mask of the seed the op draws."""
    import torch

    from peftfast.kernels import dropout as D

    seed = 1234
    torch.manual_seed(seed)
    drawn = int(D.draw_seed())
    x = inputs[0]
    mask = D.keep_mask_torch(drawn, 0, x.shape[0], x.shape[1], p) if p > 0 else None

    def seeded(op):
        def run(*args):
            torch.manual_seed(seed)
            return op(*args)
        return run

    def reference(x_, bias_, a_, b_, w_):  # float64: the base, then the adapter on the masked x
        xa = x_ if mask is None else x_ * mask.to(x_) / (1 - p)
        return x_ @ w_.T + bias_ + 2.0 * (xa @ a_.T) @ b_.T

    frozen = [*inputs[:4], inputs[4].detach()]
    wide = [t.detach().double().cpu().requires_grad_(t.requires_grad and backward) for t in inputs]
    with torch.set_grad_enabled(backward):
        run = _run_op if backward else (lambda op, args, _dy: [op(*args).detach()])
        with _backend("torch"):
            plain = run(seeded(ops["chosen"]), frozen, dy)
            ref = run(reference, wide, dy.double().cpu())
        out = []
        for label, op in ops.items():
            with _backend("triton"):
                got = run(seeded(op), frozen, dy)
            out += [compare_to_float64(f"{tag} {label} {n}", g, q, r) for n, g, q, r in zip(names, got, plain, ref)]
    return out


def _env(name: str, value: str):
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return ctx()


if __name__ == "__main__":
    sys.exit(main())
