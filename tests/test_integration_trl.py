"""TRL with peftfast: SFTTrainer with ``peft_config=peftfast.LoraConfig(...)`` and with a model already wrapped by
``peftfast.get_peft_model``; DPOTrainer without a ref_model, with a peftfast config (reference = the model with its
adapter disabled) and with a wrapped model (reference = TRL's frozen "ref" copy of the adapter). The same losses
and saved adapter as with PEFT under the same seed, PEFT's files, and the same runs in an interpreter without
``peft``.

The TRL runs set ``bf16=False``: TRL's configs default to bf16 autocast even on CPU, and under autocast peftfast's
LoRA op does not round like PEFT's bf16 ``nn.Linear`` calls (first SFT loss 4.110350 vs PEFT's 4.110573; both
4.110297 in float32), so equal losses are checked in float32."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from tests._integration import dpo, scenario_sft, scenario_trl, sft, sft_wrapped, without_peft_results  # noqa: E402


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return scenario_sft(str(tmp_path_factory.mktemp("sft")))


@pytest.fixture(scope="module")
def ours_trl(tmp_path_factory):
    return scenario_trl(str(tmp_path_factory.mktemp("trl")))


def close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_sft_with_peftfast_config_equals_peft(ours, tmp_path):
    theirs = sft(peft, str(tmp_path))
    assert ours["wrapper"].startswith("peftfast.") and theirs["wrapper"].startswith("peft.")
    assert len(ours["losses"]) == 3 and ours["losses"][0] != ours["losses"][-1]
    close(ours["losses"], theirs["losses"], "SFT losses vs PEFT")
    assert ours["files"] == theirs["files"]
    assert "adapter_model.safetensors" in ours["files"] and "model.safetensors" not in ours["files"]
    assert sorted(ours["final"]) == sorted(theirs["final"])
    for k in ours["final"]:
        close(ours["final"][k], theirs["final"][k], k, rtol=1e-3, atol=1e-3)


def test_sft_without_peft_installed(ours, tmp_path_factory):
    hidden = without_peft_results(tmp_path_factory)["sft"]
    assert hidden["files"] == ours["files"]
    close(hidden["losses"], ours["losses"], "SFT losses without peft")
    for k in ours["final"]:
        close(hidden["final"][k], ours["final"][k], k)


def same_run(ours, theirs, what):
    assert ours["wrapper"].startswith("peftfast.") and theirs["wrapper"].startswith("peft."), what
    assert len(ours["losses"]) == 3 and len(set(ours["losses"])) == 3, (what, ours["losses"])
    close(ours["losses"], theirs["losses"], f"{what} losses vs PEFT")
    assert ours["files"] == theirs["files"], what
    assert "adapter_model.safetensors" in ours["files"] and "model.safetensors" not in ours["files"], what
    assert sorted(ours["final"]) == sorted(theirs["final"]), what
    for k in ours["final"]:
        close(ours["final"][k], theirs["final"][k], f"{what} {k}")


def test_sft_with_wrapped_model_equals_peft(ours_trl, tmp_path):
    same_run(ours_trl["sft_wrapped"], sft_wrapped(peft, str(tmp_path)), "SFT on a wrapped model")


def test_dpo_with_peftfast_config_equals_peft(ours_trl, tmp_path):
    ours, theirs = ours_trl["dpo"], dpo(peft, str(tmp_path))
    same_run(ours, theirs, "DPO with peft_config")
    # the reference is the adapter-disabled model: no "ref" adapter left behind, as with PEFT
    assert ours["adapters"] == theirs["adapters"] == ["default"]
    close(ours["margins"], theirs["margins"], "DPO reward margins")
    assert ours["margins"][0] != 0  # the adapter (random B) differs from the reference from the first step


def test_dpo_with_wrapped_model_equals_peft(ours_trl, tmp_path):
    ours, theirs = ours_trl["dpo_wrapped"], dpo(peft, str(tmp_path), wrapped=True)
    same_run(ours, theirs, "DPO with a wrapped model")
    assert ours["adapters"] == theirs["adapters"] == ["default", "ref"]
    # the reference starts as a copy of the adapter: margin 0 at the first step, then the policy moves away
    assert ours["margins"][0] == 0 and ours["margins"][1] != 0
    close(ours["margins"], theirs["margins"], "DPO reward margins")


def test_trl_without_peft_installed(ours_trl, tmp_path_factory):
    hidden = without_peft_results(tmp_path_factory)["trl"]
    for what in ("sft_wrapped", "dpo", "dpo_wrapped"):
        assert hidden[what]["files"] == ours_trl[what]["files"], what
        if "dpo" in what:
            assert hidden[what]["adapters"] == ours_trl[what]["adapters"], what
        close(hidden[what]["losses"], ours_trl[what]["losses"], f"{what} losses without peft")
        for k in ours_trl[what]["final"]:
            close(hidden[what]["final"][k], ours_trl[what]["final"][k], f"{what} {k}")
