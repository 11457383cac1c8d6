"""Not collected by pytest, and deepspeed is not in the test extra (PyPI has only an sdist). A manual check of LoRA
(peftfast) under DeepSpeed ZeRO on CPU processes (deepspeed's CPU accelerator, gloo):

    DS_BUILD_OPS=0 pip install deepspeed==0.19.8
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_deepspeed_run.py STAGE OUT_DIR

Each rank trains on its half of the same global batches as tests/_distributed.py and writes
OUT_DIR/ds{STAGE}_rank{r}.json (its local losses and the adapter tensors)."""
import os, sys, json, torch
import deepspeed
import peftfast
from peftfast import zoo
stage = int(sys.argv[1]); out = sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
model = zoo.llama(0)
torch.manual_seed(1)
model = peftfast.get_peft_model(model, peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM", init_lora_weights=False))
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
       "optimizer": {"type": "SGD", "params": {"lr": 0.5}}}
engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg)
rows = [zoo.causal_inputs(batch=1, seq=7, seed=100 + i) for i in range(12)]
losses = []
for step in range(3):
    batch = rows[4 * step + rank * 2: 4 * step + rank * 2 + 2]
    x = {k: torch.cat([r[k] for r in batch]) for k in batch[0]}
    loss = engine(**x).loss
    engine.backward(loss); engine.step(); losses.append(loss.item())
ad = {k: v.double().flatten().tolist() for k, v in engine.module.state_dict().items() if "lora_" in k}
json.dump({"losses": losses, "adapter": ad}, open(f"{out}/ds{stage}_rank{rank}.json", "w"))
