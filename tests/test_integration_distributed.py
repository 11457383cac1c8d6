"""LoRA and QLoRA (peftfast) beyond one process: 2 CPU processes with gloo, launched by torch.distributed.run. LoRA
through accelerate's DDP, FSDP2 ``fully_shard`` and FSDP1 ``FullyShardedDataParallel`` (wrapping the decoder layers,
or with PEFT's ``fsdp_auto_wrap_policy``, which wraps every adapter matrix on its own too); QLoRA (an nf4 base stored as
float32 by ``bnb_4bit_quant_storage``) through FSDP1, its packed 4-bit weights sharded with the rest. The ranks
agree, the result equals a single process on the same global batches, and the adapter saved by rank 0 loads in PEFT
with the trained weights and the same outputs (tests/_distributed.py)."""
from __future__ import annotations

import pytest
import torch

import peftfast
from peftfast import zoo
from tests._integration import run_two_ranks

peft = pytest.importorskip("peft")

MODES = ["ddp", "fsdp", "fsdp1", "fsdp1peft", "qlora_fsdp", "qlora_fsdp1"]
WRAPPERS = {"ddp": "DistributedDataParallel", "fsdp": "FSDPPeftModelForCausalLM", "fsdp1": "FullyShardedDataParallel",
            "fsdp1peft": "FullyShardedDataParallel",
            "qlora_fsdp": "FSDPPeftModelForCausalLM", "qlora_fsdp1": "FullyShardedDataParallel"}
PROJECTIONS = ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.k_proj.weight",
               "self_attn.o_proj.weight", "self_attn.q_proj.base_layer.weight", "self_attn.v_proj.base_layer.weight"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    result = run_two_ranks(folder, "_distributed.py", ("single", "qlora_single", *MODES))
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
    # fsdp1peft: PEFT's fsdp_auto_wrap_policy gives each lora_A / lora_B matrix (2 layers x q, v x A, B) its own
    # FSDP unit, whose weight is whole only inside its forward
    assert r0["wrapped_adapters"] == (8 if mode == "fsdp1peft" else 0)
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


def wrapped_by(model, policy) -> list[str]:
    return sorted(n for n, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0))


@pytest.mark.parametrize("blocks", [None, "LlamaDecoderLayer,LlamaRMSNorm"])
def test_fsdp_auto_wrap_policy_wraps_what_peft_wraps(blocks, monkeypatch):
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy

    from peftfast.utils.other import fsdp_auto_wrap_policy

    if blocks is not None:
        monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", blocks)
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    ours = peftfast.get_peft_model(zoo.llama(0), peftfast.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(zoo.llama(0), peft.LoraConfig(**kwargs))
    got = wrapped_by(ours, fsdp_auto_wrap_policy(ours))
    assert got == wrapped_by(theirs, peft_policy(theirs))
    assert sum(".lora_A.default" in n for n in got) == 6 and sum(n.endswith("layers.1") for n in got) == 1


def test_fsdp_auto_wrap_policy_names_a_missing_block_class(monkeypatch):
    from peftfast.utils.other import fsdp_auto_wrap_policy

    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer,GPT2Block")
    model = peftfast.get_peft_model(zoo.llama(0), peftfast.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"\['GPT2Block'\].*LlamaDecoderLayer"):
        fsdp_auto_wrap_policy(model)
