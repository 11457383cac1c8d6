"""Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 _deepspeed.py OUT``: LoRA (peftfast) on
zoo.llama trained for 3 SGD steps under DeepSpeed on CPU processes (deepspeed's CPU accelerator, gloo), each rank on
its half of every global batch of 4 rows, in three modes one after the other: ``single`` (no DeepSpeed, no
collectives: each rank alone on the whole batches, the single-process reference), ``zero2`` and ``zero3`` (ZeRO
stage 3 with ``stage3_param_persistence_threshold`` 0, so that every parameter, the adapters included, is
partitioned). Each rank writes OUT/MODE/rank{r}.json (its losses reduced over the ranks, and the full adapter
tensors, gathered under ZeRO-3); rank 0 saves the adapter to OUT/MODE/adapter with ``save_pretrained``. Imports
nothing from tests/ (it is copied next to the run)."""
from __future__ import annotations

import json
import os
import sys

import torch

TARGETS = ["q_proj", "v_proj"]
MODES = ["single", "zero2", "zero3"]


def main(out: str, modes: list[str]) -> None:
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (minutes of C++ on a small machine) for its
    # inference all-reduce only; training collectives go through torch.distributed either way, so leave it out
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    for mode in modes or MODES:
        os.makedirs(os.path.join(out, mode), exist_ok=True)
        run(mode, os.path.join(out, mode))


def run(mode: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    import peftfast
    from peftfast import zoo

    rank = dist.get_rank()
    world = 1 if mode == "single" else dist.get_world_size()
    model = zoo.llama(0)
    config = peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                 init_lora_weights=False)
    torch.manual_seed(1)
    model = peftfast.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "single":
        engine, optimizer = model, torch.optim.SGD(trainable, lr=0.5)
    else:
        zero = {"stage": int(mode[-1])}
        if mode == "zero3":
            zero["stage3_param_persistence_threshold"] = 0
        ds_config = {"train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": 1,
                     "zero_optimization": zero, "zero_allow_untested_optimizer": True,
                     "optimizer": {"type": "SGD", "params": {"lr": 0.5}}}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    lora = {n: p for n, p in engine.module.named_parameters() if "lora_" in n} if mode != "single" else {}
    # under ZeRO-3 each rank holds only its partition of every adapter matrix
    partitioned = bool(lora) and all(getattr(p, "ds_tensor", p).numel() < getattr(p, "ds_numel", p.numel())
                                     for p in lora.values())
    rows = [zoo.causal_inputs(batch=1, seq=7, seed=100 + i) for i in range(12)]
    losses = []
    per_rank, part = 4 // world, rank % world
    for step in range(3):
        batch = rows[4 * step + part * per_rank: 4 * step + (part + 1) * per_rank]
        x = {k: torch.cat([r[k] for r in batch]) for k in batch[0]}
        loss = engine(**x).loss
        if mode == "single":
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    module = engine if mode == "single" else engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=mode == "zero3"):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    adapter = {k: v for k, v in state.items() if "lora_" in k}
    if rank == 0:
        module.save_pretrained(os.path.join(out, "adapter"), state_dict=state)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "world": world, "engine": type(engine).__name__, "partitioned": partitioned,
                   "adapter": {k: v.double().flatten().tolist() for k, v in sorted(adapter.items())}}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
