"""Run as ``python -m torch.distributed.run --nproc_per_node 2 _distributed.py OUT``: LoRA (peftfast) on zoo.llama
trained for 3 SGD steps on CPU processes (gloo), each rank on its slice of every global batch of 4 rows, in three
modes one after the other: ``single`` (no collectives: each rank alone on the whole batches, the single-process
reference), ``ddp`` (accelerate's DistributedDataParallel) and ``fsdp`` (FSDP2 ``fully_shard`` on each decoder
layer and on the model, by hand: accelerate only launches and reduces). Each rank writes OUT/MODE/rank{r}.json (its
losses and full adapter tensors); rank 0 saves the adapter to OUT/MODE/adapter with ``save_pretrained``. Imports
nothing from tests/ (it is copied next to the run)."""
from __future__ import annotations

import json
import os
import sys

import torch

TARGETS = ["q_proj", "v_proj"]


def main(out: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    for mode in ("single", "ddp", "fsdp"):
        os.makedirs(os.path.join(out, mode), exist_ok=True)
        run(accelerator, mode, os.path.join(out, mode))


def run(accelerator, mode: str, out: str) -> None:
    import peftfast
    from peftfast import zoo

    rank = accelerator.process_index
    world = 1 if mode == "single" else accelerator.num_processes
    model = zoo.llama(0)
    config = peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                 init_lora_weights=False)
    torch.manual_seed(1)
    model = peftfast.get_peft_model(model, config)
    rows = [zoo.causal_inputs(batch=1, seq=7, seed=100 + i) for i in range(12)]
    sharded = False
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
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
    if mode == "fsdp":
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
                   "wrapper": type(model).__name__, "sharded": sharded,
                   "adapter": {k: v.double().flatten().tolist() for k, v in sorted(adapter.items())}}, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
