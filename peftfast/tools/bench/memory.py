"""Section 2: memory measured on this machine (CPU), peftfast against PEFT on the same model.

Bytes saved for backward by one training step of a tiny Llama with LoRA (with and without
dropout) and with prefix tuning and prompt tuning, and for an NF4 QLoRA model the resident bytes of weights (packed, quantisation state,
other frozen, adapters), saved activations and AdamW state. Saved bytes come from
``saved_tensors_hooks`` (``peftfast.tools.memory``), each storage once: measured, and
deterministic for a given model and input.
"""
from __future__ import annotations

import copy
import tempfile

import numpy as np
import torch
from torch import nn

from ..memory import measure_saved_bytes
from .builders import libs, quiet, share_adapters, tiny_llama, trainables
from .constants import F32, PROJECTIONS
from .tables import kb, table


def saved_bytes_of(model: nn.Module, ids: torch.Tensor):
    """``measure_saved_bytes`` of one causal-LM training step on ``ids``."""
    return measure_saved_bytes(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)


def lora_memory_rows() -> list[dict]:
    base = tiny_llama(64, 4)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, lib in libs():
        for p in (0.1, 0.0):
            with quiet():
                model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
                    r=8, lora_alpha=16, lora_dropout=p, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
            rows.append({"section": "memory", "what": "saved_activations", "path": name, "dropout": p,
                         "model": "tiny Llama, 4 layers, hidden 64, batch 2x48, fp32, LoRA r=8 on 7 "
                                  "projections",
                         **saved_bytes_of(model.train(), ids).as_row()})
    return rows


PROMPT_MODEL = "tiny Llama, 4 layers, hidden 64, batch 8x48, fp32, 16 virtual tokens"


def prompt_memory_rows() -> list[dict]:
    """Bytes saved for backward by one training step with prefix tuning and prompt tuning, each library."""
    base = tiny_llama(64, 4)
    ids = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in ("prefix_tuning", "prompt_tuning"):
        for name, lib in libs():
            config = (lib.PrefixTuningConfig if method == "prefix_tuning" else lib.PromptTuningConfig)(
                task_type="CAUSAL_LM", num_virtual_tokens=16)
            with quiet():
                model = lib.get_peft_model(copy.deepcopy(base), config).train()
                measured = measure_saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
            rows.append({"section": "memory", "what": "prompt_saved_activations", "method": method, "path": name,
                         "model": PROMPT_MODEL, **measured.as_row()})
    return rows


def storage_bytes(t: torch.Tensor, seen: set) -> int:
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
            packed = storage_bytes(w, seen)  # 0 if seen: an adapter layer's ``weight`` is its base's
            if not packed:
                continue
            out["packed_4bit"] += packed
            out["quantised_numel"] += int(np.prod(qs.shape))
            nested = getattr(qs, "state2", None)
            for t in (qs.absmax, qs.code, getattr(nested, "absmax", None), getattr(nested, "code", None)):
                if isinstance(t, torch.Tensor):
                    out["quant_state"] += storage_bytes(t, seen)
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen_other"] += storage_bytes(p, seen)
    for b in model.buffers():
        out["frozen_other"] += storage_bytes(b, seen)
    return out


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set = set()
    return sum(storage_bytes(v, seen) for state in opt.state.values() for v in state.values()
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
        for name, lib in libs():
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
        saved = saved_bytes_of(model.train(), ids)
        opt = torch.optim.AdamW(trainables(model).values(), lr=1e-4)
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
        body = [[f"{r['path']}, lora_dropout={r['dropout']}", kb(r["saved_bytes"]), r["saved_tensors"]]
                + [f"{r['saved_bytes'] / ref[p]:.3f}" if p in ref else "-" for p in (0.1, 0.0)] for r in lora]
        out += table(["path", "saved kB", "tensors", "/ PEFT p=0.1", "/ PEFT p=0"], body)
        by = {(r["path"], r["dropout"]): r["saved_bytes"] for r in lora}
        for lib in ("peftfast", "peft"):
            if (lib, 0.1) in by and (lib, 0.0) in by:
                extra = by[lib, 0.1] - by[lib, 0.0]
                out.append(f"dropout 0.1 costs {lib} {kb(extra)} kB ({extra / by[lib, 0.0]:+.1%}) of saved "
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
        body = [[label] + [kb(r[key]) for r in q]
                + ([f"{q[0][key] / ref[key]:.3f}" if ref[key] else "-"] if paired else [])
                for label, key in keys]
        head = ["kB"] + [r["path"] + (" + bitsandbytes" if r["path"] == "peft" else "") for r in q]
        out += table(head + (["peftfast / PEFT"] if paired else []), body)
        r0 = q[0]
        nf4 = r0["weights_packed_4bit"] + r0["weights_quant_state"]
        out.append(f"the quantised linears: {kb(nf4)} kB as NF4 (packed + absmax + code) vs "
                   f"{kb(r0['quantised_as_bf16'])} kB in bf16 ({nf4 / r0['quantised_as_bf16']:.3f}x) and "
                   f"{kb(r0['quantised_as_fp32'])} kB in fp32 ({nf4 / r0['quantised_as_fp32']:.3f}x)")
    if "qlora" in errors:
        out.append(f"QLoRA memory: not available: {errors['qlora']}")
    prompt = [r for r in rows if r["what"] == "prompt_saved_activations"]
    if prompt:
        out.append("Prompt methods, bytes saved for backward; " + prompt[0]["model"])
        ref = {r["method"]: r["saved_bytes"] for r in prompt if r["path"] == "peft"}
        body = [[r["method"], r["path"], kb(r["saved_bytes"]), r["saved_tensors"],
                 f"{r['saved_bytes'] / ref[r['method']]:.3f}" if r["method"] in ref else "-"] for r in prompt]
        out += table(["method", "path", "saved kB", "tensors", "/ PEFT"], body)
    if "prompt" in errors:
        out.append(f"prompt-method memory: not available: {errors['prompt']}")
    return out


def measure_memory() -> tuple[list[dict], dict[str, str]]:
    """(rows, {section: error}) of the LoRA and QLoRA memory measurements; one failing does not
    hide the other."""
    rows, errors = [], {}
    for key, fn in (("lora", lora_memory_rows), ("qlora", qlora_memory_rows), ("prompt", prompt_memory_rows)):
        try:
            rows += fn()
        except Exception as err:  # noqa: BLE001 - e.g. the QLoRA layers not usable: reported, not fatal
            errors[key] = f"{type(err).__name__}: {err}"
    return rows, errors
