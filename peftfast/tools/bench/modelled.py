"""Section 1b: modelled time from counted traffic (``costmodel``), NOT measured.

One LoRA / NF4 QLoRA / IA3 linear at T=8192, d_in=d_out=4096, r=16, bf16 on each GPU in
``GPUS``, as a ratio to the base matmul alone, peftfast next to PEFT, with the design targets;
and the 4-bit decode path's bytes read at T=1..16 against the packed weight plus absmax. Every
number here is a formula evaluated at that shape; calibration (``calibration``) is what ties the
formulas to counted traffic.
"""
from __future__ import annotations

from typing import Any

from .. import costmodel as cm
from ..costmodel.formulas import lycoris as lycoris_model
from .constants import ACT, D_MODEL, DECODE_TARGET, F32, GPUS, IA3_TARGET, R_MODEL, SMS, T_MODEL
from .tables import mb, table, verdict_word


def model_row(gpu: cm.Gpu, op: str, path: str, fwd, bwd, base, targets: dict | None) -> dict:
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
    """Every modelled path on every GPU in ``GPUS`` (section "modelled"), and the decode rows ("decode")."""
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
        rows.append(model_row(gpu, "lora", "base GEMM alone", *base, base, None))
        for label, impl, ad, p in lora_paths:
            ks = [cm.lora_layer(impl, bwd, t, d, d, r, ACT, ad, p) for bwd in (False, True)]
            targets = cm.LORA_TARGETS if impl.startswith("peftfast") else None
            rows.append(model_row(gpu, "lora", label, *ks, base, targets))
        rows.append(model_row(gpu, "qlora_nf4", "bf16 base GEMM alone", *base, base, None))
        for label, impl, p in qlora_paths:
            ks = [cm.qlora_layer(impl, bwd, t, d, d, r, ACT, F32, p) for bwd in (False, True)]
            rows.append(model_row(gpu, "qlora_nf4", label, *ks, base,
                                  cm.QLORA_TARGETS if impl.startswith("peftfast") else None))
        rows.append(model_row(gpu, "ia3", "base GEMM alone", base[0], None, base, None))
        for ff in (True, False):
            kind = "feedforward (scale on x)" if ff else "attention (scale on y)"
            fused = [cm.ia3_fused_matmul(t, d, d, ACT, F32, ff)]
            target = {"forward": IA3_TARGET}
            rows.append(model_row(gpu, "ia3", f"peftfast IA3 {kind}", fused, None, base, target))
            rows.append(model_row(gpu, "ia3", f"PEFT IA3 {kind}, fp32 ia3_l",
                                  cm.peft_ia3_forward(t, d, d, ACT, F32, ff), None, base, None))
        rows += lycoris_model.bench_rows(gpu, t, d, r, ACT, cm.LAUNCH_OVERHEAD_S)
        weight = cm.nf4_weight_bytes(d, d)
        for tokens in range(1, 17):
            reads = cm.decode_reads(tokens, d, d, SMS[gpu.name])
            total = reads["gemm_read"] + reads["reduce_read"]
            rows.append({"section": "decode", "gpu": gpu.name, "T": tokens, "d_in": d, "d_out": d,
                         "blocksize": 64, "packed_absmax_code_bytes": weight, **reads, "total_read": total,
                         "gemm_ratio": reads["gemm_read"] / weight, "total_ratio": total / weight,
                         "target": DECODE_TARGET, "met": total / weight <= DECODE_TARGET})
    return rows


def modelled_lines(rows: list[dict]) -> list[str]:
    """The modelled tables, per GPU: LoRA, NF4 QLoRA and IA3 ratios with verdicts, then decode."""
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
              "ia3": f"IA3 linear, forward; base = the base GEMM; target <= {IA3_TARGET}",
              "lycoris": "One LoHa / LoKr linear (delta tiles generated in the GEMMs; CUDA-core work not overlapped); "
                         f"targets fwd <= {lycoris_model.LYCORIS_TARGETS['forward']}, "
                         f"bwd <= {lycoris_model.LYCORIS_TARGETS['backward']}"}
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
                    cells += [r[f"{key}_launches"], mb(r[f"{key}_bytes"]), f"{r[f'{key}_ratio']:.3f}",
                              f"{r[f'{key}_ratio_ovh']:.3f}" + ("" if met is None else f" {verdict_word(met)}")]
                body.append(cells)
            out += [title] + table(head, body)
        out.append(f"NF4 decode, T=1..16, {D_MODEL}x{D_MODEL}: bytes read vs packed weight + absmax + code "
                   f"(target: within {DECODE_TARGET - 1:.0%}); split = reduction split for "
                   f"{SMS[gpu.name]} SMs")
        body = [[r["T"], r["split"], mb(r["packed_absmax_code_bytes"]), mb(r["gemm_read"]),
                 f"{r['gemm_ratio']:.3f}", mb(r["reduce_read"]), mb(r["total_read"]),
                 f"{r['total_ratio']:.3f}", verdict_word(r["met"])]
                for r in rows if r["section"] == "decode" and r["gpu"] == gpu.name]
        out += table(["T", "split", "weight MB", "GEMM read MB", "ratio", "partials read MB", "all read MB",
                      "ratio", "target"], body)
    return out
