"""LoRA (peftfast) under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (deepspeed's CPU accelerator, gloo), launched
by torch.distributed.run: the ranks agree, the result equals a single process on the same global batches, ZeRO-3
partitions the adapters themselves, and the adapter saved by rank 0 loads in PEFT with the trained weights and the
same outputs (tests/_deepspeed.py). deepspeed is in the test extra (PyPI has only its sdist, which builds without
compiling any op in under a minute)."""
from __future__ import annotations

import pytest
import torch

import peftfast
from peftfast import zoo
from tests._integration import run_two_ranks

peft = pytest.importorskip("peft")
pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed==0.19.8, the test extra)")

MODES = ["zero2", "zero3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_two_ranks(tmp_path_factory.mktemp("deepspeed"), "_deepspeed.py", ("single", *MODES))


def close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_ranks_agree_and_equal_a_single_process(runs, mode):
    r0, r1, single = runs[mode][0], runs[mode][1], runs["single"][0]
    assert r0["world"] == 2 and single["world"] == 1 and r0["engine"] == "DeepSpeedEngine"
    assert r0["partitioned"] == (mode == "zero3")
    assert r0["losses"] == r1["losses"] and r0["adapter"] == r1["adapter"], "ranks disagree"
    assert len(r0["adapter"]) == 8
    close(r0["losses"], single["losses"], f"{mode} losses vs one process")
    for k in single["adapter"]:
        close(r0["adapter"][k], single["adapter"][k], f"{mode} {k} vs one process")
    assert single["adapter"] == runs["single"][1]["adapter"]


@pytest.mark.parametrize("mode", MODES)
def test_saved_adapter_loads_in_peft(runs, mode):
    x = zoo.causal_inputs(batch=2, seq=6, seed=7)
    theirs = peft.PeftModel.from_pretrained(zoo.llama(0), runs[mode]["adapter"])
    ours = peftfast.PeftModel.from_pretrained(zoo.llama(0), runs[mode]["adapter"])
    trained = runs[mode][0]["adapter"]
    state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert sorted(state) == sorted(trained)
    for k, v in state.items():
        close(v.flatten().tolist(), trained[k], f"{mode} {k} loaded by PEFT")
    with torch.no_grad():
        close(ours(**x).logits.flatten().tolist(), theirs(**x).logits.flatten().tolist(), f"{mode} logits")
