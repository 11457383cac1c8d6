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

from tests._integration import (RL_TRAINERS, dpo, rl_trainer, scenario_sft, scenario_trl, sft,  # noqa: E402
                                sft_wrapped, without_peft_results)


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
    assert sorted(hidden["others"]) == sorted(ours_trl["others"]) == sorted(RL_TRAINERS)
    for name, weights in ours_trl["others"].items():  # GRPO, RLOO, KTO, Reward, Distillation with a peftfast config
        assert sorted(hidden["others"][name]) == sorted(weights) and weights, name
        for k in weights:
            close(hidden["others"][name][k], weights[k], f"{name} {k} without peft")


def _initial_adapters(lib, trainer_name: str, caller_seed: int, out: str, path: str = "", **trainer_kw) -> dict:
    """The adapter weights TRL's trainer starts from, given ``peft_config=lib.LoraConfig(...)`` (default init: a
    random lora_A) and args.seed=7, after the caller left the global random state at ``caller_seed``; the model
    zoo.llama(0), or loaded by TRL from ``path``. Also the type of the first q_proj's base layer, under "base"."""
    import warnings

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from peftfast import zoo
    from tests._integration import TARGETS, word_tokenizer, zoo_ids

    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(max_steps=1, report_to=[], seed=7, use_cpu=True, disable_tqdm=True, bf16=False)
    model = path or zoo.llama(0)
    torch.manual_seed(caller_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if trainer_name == "sft":
            rows = Dataset.from_list([{"input_ids": zoo_ids(7, 300 + i)} for i in range(2)])
            trainer = SFTTrainer(model, args=SFTConfig(out, **common), train_dataset=rows,
                                 processing_class=word_tokenizer(), peft_config=config, **trainer_kw)
        else:
            rows = Dataset.from_list([{"prompt": "t5 t6", "chosen": "t7 t8", "rejected": "t9 t10"}] * 2)
            trainer = DPOTrainer(model, args=DPOConfig(out, **common), train_dataset=rows,
                                 processing_class=word_tokenizer(), peft_config=config, **trainer_kw)
    q_proj = next(m for n, m in trainer.model.named_modules() if n.endswith("q_proj"))
    return {"base": type(q_proj.base_layer).__name__,
            **{k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" in k}}


@pytest.mark.parametrize("trainer_name", ["sft", "dpo"])
def test_adapter_init_follows_the_runs_seed_as_peft(trainer_name, tmp_path):
    """TRL seeds (args.seed) right before PEFT draws the adapters' random init: with a peftfast config the trainer
    starts from the same adapter weights as with PEFT's, whatever random state the caller left (before, peftfast's
    wrap drew them before that seeding: from the caller's state)."""
    import peftfast

    ours = [_initial_adapters(peftfast, trainer_name, s, str(tmp_path / f"ours{s}")) for s in (1, 2)]
    theirs = _initial_adapters(peft, trainer_name, 1, str(tmp_path / "theirs"))
    assert sorted(ours[0]) == sorted(theirs) and any("lora_A" in k for k in theirs)
    assert ours[0].pop("base") == ours[1].pop("base") == theirs.pop("base")
    for k in theirs:
        assert torch.equal(ours[0][k], ours[1][k]), k
        assert torch.equal(ours[0][k], theirs[k]), k


@pytest.mark.parametrize("trainer_name", ["sft", "dpo"])
def test_model_by_path_with_quantization_config_as_peft(trainer_name, tmp_path):
    """A model given by path with the trainer's quantization_config and a peftfast config: loaded as TRL loads it
    (4-bit base layers, TRL's float32 default), then the same initial adapters as with PEFT's config, which TRL
    casts to bf16 for a quantised base (before, the trainer's quantization_config was not used: a float model)."""
    from transformers import BitsAndBytesConfig

    import peftfast
    from tests._integration import quantized_llama

    folder = str(tmp_path / "base")
    quantized_llama(folder)  # saves the float model there
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ours = _initial_adapters(peftfast, trainer_name, 1, str(tmp_path / "ours"), folder, quantization_config=quant)
    theirs = _initial_adapters(peft, trainer_name, 2, str(tmp_path / "theirs"), folder, quantization_config=quant)
    assert ours["base"] == theirs["base"] == "Linear4bit"
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        if k != "base":
            assert ours[k].dtype == theirs[k].dtype == torch.bfloat16, k
            assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("trainer_name", ["grpo", "rloo", "kto", "reward", "distillation"])
def test_other_trl_trainers_with_a_peftfast_config_as_peft(trainer_name, tmp_path):
    """GRPO, RLOO, KTO, Reward and Distillation trainers given a peftfast config: the model is peftfast's, with the
    same initial adapter as PEFT's config gives under the run's seed (no "ref" copy: the reference is the model with
    its adapter disabled, as on PEFT's path), and two training steps leave the same adapter weights as PEFT's.
    (Before, TRL refused a peftfast config: "`peft_config` must be a `peft.PeftConfig` instance".)"""
    import peftfast

    runs = {}
    for lib, seed in ((peftfast, 1), (peft, 2)):
        trainer = rl_trainer(lib, trainer_name, str(tmp_path / lib.__name__), seed)
        assert type(trainer.model).__module__.startswith(f"{lib.__name__}."), type(trainer.model)
        assert sorted(trainer.model.peft_config) == ["default"]
        start = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if "lora_" in k}
        trainer.train()
        runs[lib.__name__] = start, {k: p.detach().clone() for k, p in trainer.model.named_parameters()
                                     if "lora_" in k}
    (ours0, ours1), (theirs0, theirs1) = runs["peftfast"], runs["peft"]
    assert sorted(ours0) == sorted(theirs0) and ours0
    assert any(not torch.equal(theirs1[k], theirs0[k]) for k in theirs0)  # the steps moved the adapter
    for k in theirs0:
        assert torch.equal(ours0[k], theirs0[k]), k
        torch.testing.assert_close(ours1[k], theirs1[k], rtol=1e-5, atol=1e-6, msg=k)
