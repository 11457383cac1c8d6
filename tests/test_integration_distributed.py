"""LoRA and QLoRA (peftfast) beyond one process: 2 CPU processes with gloo, launched by torch.distributed.run. LoRA
through accelerate's DDP, FSDP2 ``fully_shard`` and FSDP1 ``FullyShardedDataParallel``; QLoRA (an nf4 base stored as
float32 by ``bnb_4bit_quant_storage``) through FSDP1, its packed 4-bit weights sharded with the rest. The ranks
agree, the result equals a single process on the same global batches, and the adapter saved by rank 0 loads in PEFT
with the trained weights and the same outputs (tests/_distributed.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftfast
from peftfast import zoo

peft = pytest.importorskip("peft")

MODES = ["ddp", "fsdp", "fsdp1", "qlora_fsdp", "qlora_fsdp1"]
WRAPPERS = {"ddp": "DistributedDataParallel", "fsdp": "FSDPPeftModelForCausalLM", "fsdp1": "FullyShardedDataParallel",
            "qlora_fsdp": "FSDPPeftModelForCausalLM", "qlora_fsdp1": "FullyShardedDataParallel"}
PROJECTIONS = ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.k_proj.weight",
               "self_attn.o_proj.weight", "self_attn.q_proj.base_layer.weight", "self_attn.v_proj.base_layer.weight"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    script = folder / "distributed_run.py"
    script.write_text((Path(__file__).parent / "_distributed.py").read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), str(folder / "out")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    modes = ("single", "qlora_single", *MODES)
    result = {mode: {r: json.loads((folder / "out" / mode / f"rank{r}.json").read_text()) for r in (0, 1)}
              | {"adapter": str(folder / "out" / mode / "adapter")} for mode in modes}
    result["qlora_base"] = str(folder / "out" / "qlora_base")
    return result


def reference(mode: str) -> str:
    return "qlora_single" if mode.startswith("qlora_") else "single"


def close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_ranks_agree_and_equal_a_single_process(runs, mode):
    r0, r1, single = runs[mode][0], runs[mode][1], runs[reference(mode)][0]
    assert r0["world"] == 2 and r0["distributed_type"] == "DistributedType.MULTI_CPU"
    assert single["world"] == 1
    assert r0["wrapper"] == WRAPPERS[mode]
    assert r0["sharded"] == (mode != "ddp")
    if mode.startswith("qlora_"):  # the packed 4-bit weights of both decoder layers are sharded with the rest
        assert r0["quantized_sharded"] == sorted(PROJECTIONS * 2)
    assert r0["losses"] == r1["losses"] and r0["adapter"] == r1["adapter"], "ranks disagree"
    assert len(r0["adapter"]) == 8
    close(r0["losses"], single["losses"], f"{mode} losses vs one process")
    for k in single["adapter"]:
        close(r0["adapter"][k], single["adapter"][k], f"{mode} {k} vs one process")
    # each "rank" of the single-process reference ran alone on the same batches: they agree unless the run is wrong
    assert single["adapter"] == runs[reference(mode)][1]["adapter"]


def quantized_base(folder: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_saved_adapter_loads_in_peft(runs, mode):
    qlora = mode.startswith("qlora_")
    base = (lambda: quantized_base(runs["qlora_base"])) if qlora else (lambda: zoo.llama(0))
    x = zoo.causal_inputs(batch=2, seq=6, seed=7, vocab=101 if qlora else zoo.VOCAB)
    theirs = peft.PeftModel.from_pretrained(base(), runs[mode]["adapter"])
    ours = peftfast.PeftModel.from_pretrained(base(), runs[mode]["adapter"])
    trained = runs[mode][0]["adapter"]
    state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert sorted(state) == sorted(trained)
    for k, v in state.items():
        close(v.flatten().tolist(), trained[k], f"{mode} {k} loaded by PEFT")
    # train mode (no dropout here): an eval forward without grad on an AVX512-BF16 CPU makes bitsandbytes repack a
    # 4-bit weight with bf16 scales, which PEFT's path then reads rounded
    with torch.no_grad():
        got, want = (m.train()(**x).logits.flatten().tolist() for m in (ours, theirs))
    close(got, want, f"{mode} logits")
