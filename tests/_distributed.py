"""Run as ``python -m torch.distributed.run --nproc_per_node 2 _distributed.py OUT``: LoRA (peftfast) on zoo.llama
trained for 3 SGD steps on CPU processes (gloo), each rank on its slice of every global batch of 4 rows, in four
modes one after the other (or only the MODEs given after OUT): ``single`` (no collectives: each rank alone on the
whole batches, the single-process reference), ``ddp`` (accelerate's DistributedDataParallel), ``fsdp`` (FSDP2
``fully_shard`` on each decoder layer and on the model, by hand: accelerate only launches and reduces) and ``fsdp1``
(``FullyShardedDataParallel`` with an auto-wrap policy on the decoder layers and ``use_orig_params=True``, as PEFT
users wrap it; the full state dict is gathered for the save). Each rank writes OUT/MODE/rank{r}.json (its losses and
full adapter tensors); rank 0 saves the adapter to OUT/MODE/adapter with ``save_pretrained``. Imports nothing from
tests/ (it is copied next to the run)."""
from __future__ import annotations

import json
import os
import sys

import torch

TARGETS = ["q_proj", "v_proj"]
MODES = ["single", "ddp", "fsdp", "fsdp1", "fsdp1peft", "qlora_single", "qlora_fsdp", "qlora_fsdp1"]


def main(out: str, modes: list[str]) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    for mode in modes or MODES:
        os.makedirs(os.path.join(out, mode), exist_ok=True)
        run(accelerator, mode, os.path.join(out, mode))


def quantized_llama(accelerator, folder: str, dtype: torch.dtype):
    """A tiny Llama (in/out features multiples of 64, as bnb's CPU paths need) saved by rank 0 and loaded back by
    every rank as nf4 with double quantisation, in ``dtype`` with its packed weights stored as ``dtype``
    (``bnb_4bit_quant_storage``) so that FSDP can flatten them with the other frozen parameters."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    from peftfast import zoo

    if accelerator.is_main_process and not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(1234)
        LlamaForCausalLM(zoo.llama_config(64, 2, 101, heads=4, kv_heads=4, intermediate=128, pad=0)).save_pretrained(
            folder)
    accelerator.wait_for_everyone()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype)


def layer_path(name: str) -> str:
    """``...layers.1.self_attn.q_proj.base_layer.weight`` -> ``self_attn.q_proj.base_layer.weight``"""
    return name.split(".layers.", 1)[1].split(".", 1)[1]


def run(accelerator, mode: str, out: str) -> None:
    import peftfast
    from peftfast import zoo

    rank = accelerator.process_index
    qlora, mode = (mode.split("_", 1)) if mode.startswith("qlora") else ("", mode)
    world = 1 if mode == "single" else accelerator.num_processes
    if qlora:  # float32 storage, compute and norms (prepare_model_for_kbit_training)
        model = quantized_llama(accelerator, os.path.join(os.path.dirname(out), "qlora_base"), torch.float32)
        model = peftfast.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = zoo.llama(0)
    config = peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                 init_lora_weights=False)
    torch.manual_seed(1)
    model = peftfast.get_peft_model(model, config)
    vocab = model.config.vocab_size
    rows = [zoo.causal_inputs(batch=1, seq=7, seed=100 + i, vocab=vocab) for i in range(12)]
    sharded, quantized_sharded, wrapped_adapters = False, [], 0
    # the bitsandbytes 4-bit weights (Params4bit) of a QLoRA base
    import bitsandbytes as bnb

    quantized = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        quantized_sharded = sorted(layer_path(n) for n in quantized if isinstance(model.get_parameter(n), DTensor))
    elif mode in ("fsdp1", "fsdp1peft"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from peftfast.utils.other import fsdp_auto_wrap_policy

        layer_class = type(model.get_base_model().model.layers[0])
        # fsdp1peft: PEFT's policy (what transformers' Trainer sets for a PEFT model), one FSDP unit per decoder
        # layer and one per adapter matrix
        policy = fsdp_auto_wrap_policy(model) if mode == "fsdp1peft" else ModuleWrapPolicy({layer_class})
        model = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        # each rank holds half of every flat parameter: the padded local shard is smaller than the full one; the
        # flat parameters of the decoder layers hold the packed 4-bit weights of a QLoRA base
        handles = [m._handle for m in FSDP.fsdp_modules(model)]
        wrapped_adapters = sum(isinstance(m.module, torch.nn.Linear) for m in FSDP.fsdp_modules(model))
        sharded = all(h.flat_param.numel() < h.flat_param._unpadded_unsharded_size.numel() for h in handles)
        flattened = [n for h in handles for n in h.flat_param._fqns]
        quantized_sharded = sorted(n for n in flattened if n in {layer_path(q) for q in quantized})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    if mode == "ddp":
        model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    per_rank, part = 4 // world, rank % world
    for step in range(3):
        batch = rows[4 * step + part * per_rank: 4 * step + (part + 1) * per_rank]
        x = {k: torch.cat([r[k] for r in batch]) for k in batch[0]}
        loss = model(**x).loss
        loss.backward() if mode == "single" else accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() if mode == "single" else accelerator.reduce(loss.detach(), reduction="mean").item())
    unwrapped = model if mode == "single" else accelerator.unwrap_model(model)
    if mode in ("fsdp1", "fsdp1peft"):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # gather the full state dict on every rank (FSDP strips its own wrapper prefixes)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            state = model.state_dict()
        unwrapped = model.module
        adapter = {k: v for k, v in state.items() if "lora_" in k}
    elif mode == "fsdp":
        from torch.distributed.tensor import DTensor

        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in unwrapped.state_dict().items()}
        adapter = {k: v for k, v in state.items() if "lora_" in k}
    else:
        state = None
        adapter = {k: v for k, v in unwrapped.state_dict().items() if "lora_" in k}
    if rank == 0:
        unwrapped.save_pretrained(os.path.join(out, "adapter"), state_dict=state)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "world": world, "distributed_type": str(accelerator.distributed_type),
                   "wrapper": type(model).__name__, "sharded": sharded, "quantized_sharded": quantized_sharded,
                   "wrapped_adapters": wrapped_adapters,
                   "adapter": {k: v.double().flatten().tolist() for k, v in sorted(adapter.items())}}, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
