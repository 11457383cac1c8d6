"""Shared by tests/test_integration_*.py: training runs through the real transformers Trainer on zoo models, and
running a script in a fresh interpreter where ``peft`` is not installed as far as Python can tell.

This file is also copied next to the scripts run without ``peft`` (it imports nothing from tests/), so that both
interpreters train with exactly the same code. Run as a script: ``python _integration.py SCENARIO OUT_DIR`` writes
OUT_DIR/result.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

# A sitecustomize that makes ``peft`` look uninstalled: no module spec (importlib.util.find_spec, which transformers'
# is_peft_available uses) and no distribution metadata.
HIDE_PEFT = '''
import importlib.machinery, importlib.metadata
_find = importlib.machinery.PathFinder.find_spec.__func__
def _hidden(name):
    return name == "peft" or name.startswith("peft.")
def _find_spec(cls, fullname, path=None, target=None):
    return None if _hidden(fullname) else _find(cls, fullname, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(_find_spec)
_distribution = importlib.metadata.distribution
def _dist(name):
    if str(name).lower() == "peft":
        raise importlib.metadata.PackageNotFoundError(name)
    return _distribution(name)
importlib.metadata.distribution = _dist
'''

TARGETS = ["q_proj", "v_proj"]
RL_TRAINERS = ("grpo", "rloo", "kto", "reward", "distillation")


def run_without_peft(tmp_path: Path, scenario: str, timeout: int = 300) -> dict:
    """Run ``scenario`` of this file in a fresh interpreter with ``peft`` hidden; its result.json as a dict."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE_PEFT)
    script = tmp_path / "integration_run.py"
    script.write_text(Path(__file__).read_text())
    out = tmp_path / f"out-{scenario}"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(hide), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script), scenario, str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{scenario} without peft failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text())


def without_peft_results(tmp_path_factory) -> dict:
    """Every scenario's result without ``peft``, computed once per test session (one interpreter start-up and
    one run, shared by the test files)."""
    folder = tmp_path_factory.getbasetemp() / "without-peft"
    cached = folder / "out-all" / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    folder.mkdir(exist_ok=True)
    return run_without_peft(folder, "all")


# ------------------------------------------------------------------------------------------------------ data
def lm_rows(n: int = 8, seq: int = 7, vocab: int = 61) -> list[dict]:
    """Causal-LM rows with a string column the model does not take: Trainer's default remove_unused_columns must
    drop it (keeping it fails the collator; dropping everything fails with 'The batch received was empty')."""
    from peftfast import zoo

    rows = []
    for i in range(n):
        d = zoo.causal_inputs(batch=1, seq=seq, seed=100 + i, vocab=vocab)
        rows.append({k: v[0] for k, v in d.items()} | {"text": f"row {i}"})
    return rows


def seq_cls_rows(n: int = 8) -> list[dict]:
    """Rows whose target is named ``label`` (the data collator renames it to ``labels``)."""
    from peftfast import zoo

    rows = []
    for i in range(n):
        ids = zoo.token_ids(1, 7, seed=200 + i)[0]
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": i % 3, "text": f"row {i}"})
    return rows


# ------------------------------------------------------------------------------------------------------ training
def training_args(out: str, **overrides: Any):
    from transformers import TrainingArguments

    kw = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=2e-2, logging_steps=1, save_steps=2,
              report_to=[], seed=0, use_cpu=True, disable_tqdm=True, lr_scheduler_type="linear")
    kw.update(overrides)
    return TrainingArguments(out, **kw)


def train(model, out: str, rows: list[dict], eval_rows: list[dict] | None = None, resume: str | None = None,
          **overrides: Any):
    from transformers import Trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model, training_args(out, **overrides), train_dataset=rows, eval_dataset=eval_rows)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def lora_llama(lib, seed: int = 0, task_type: str | None = "CAUSAL_LM", **base_options: Any):
    """zoo.llama with LoRA (random non-zero B) from ``lib`` (peftfast or peft); the same weights for both libs.
    ``task_type=None`` gives the plain PeftModel, whose forward is ``(*args, **kwargs)``."""
    from peftfast import zoo

    model = zoo.llama(seed, **base_options)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type=task_type, init_lora_weights=False)
    torch.manual_seed(seed + 1)
    return lib.get_peft_model(model, config)


def adapter_files(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def tensors_json(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: v.double().flatten().tolist() for k, v in sorted(tensors.items())}


# ------------------------------------------------------------------------------------------------------ scenarios
def scenario_lora(out: str, checkpointing: bool = False) -> dict:
    """LoRA on a causal LM through Trainer: 4 steps (checkpoints at 2 and 4), save_model, then a fresh run resumed
    from checkpoint-2; the logged losses, saved files and adapters of each. ``checkpointing``: the first run with
    activation checkpointing from TrainingArguments."""
    import peftfast

    model = lora_llama(peftfast)
    full = train(model, os.path.join(out, "full"), lm_rows(), activation_checkpointing=checkpointing)
    full.save_model(os.path.join(out, "final"))
    resumed = train(lora_llama(peftfast), os.path.join(out, "resumed"), lm_rows(),
                    resume=os.path.join(out, "full", "checkpoint-2"))
    resumed.save_model(os.path.join(out, "final-resumed"))
    return {
        "losses": losses(full), "resumed_losses": losses(resumed),
        "checkpointing": bool(model.get_base_model().is_activation_checkpointing),
        "final_files": sorted(os.listdir(os.path.join(out, "final"))),
        "checkpoint_files": sorted(os.listdir(os.path.join(out, "full", "checkpoint-2"))),
        "final": tensors_json(adapter_files(os.path.join(out, "final"))),
        "resumed": tensors_json(adapter_files(os.path.join(out, "final-resumed"))),
    }


def scenario_checks(out: str) -> dict:
    """peft really is absent; the Trainer hook is in place."""
    import importlib.util

    import peftfast
    import transformers.trainer_utils as tu
    from transformers.utils import is_peft_available

    return {"peft_spec": importlib.util.find_spec("peft") is not None, "is_peft_available": is_peft_available(),
            "is_peft_model": tu._is_peft_model(lora_llama(peftfast)), "plain_is_peft_model": tu._is_peft_model(
                lora_llama(peftfast).get_base_model())}


def quantized_llama(folder: str, bits: int = 4):
    """A tiny Llama saved to ``folder`` (once) and loaded back quantized by bitsandbytes (nf4 + double quant, or
    int8). Sizes fit bnb's CPU paths: in/out features multiples of 64."""
    from peftfast import zoo
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    if not os.path.isfile(os.path.join(folder, "config.json")):
        config = zoo.llama_config(64, 2, 101, heads=4, kv_heads=4, intermediate=128, pad=0)
        torch.manual_seed(1234)
        LlamaForCausalLM(config).save_pretrained(folder)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)


def qlora(lib, folder: str, bits: int = 4):
    model = quantized_llama(folder, bits)
    model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(5)
    return lib.get_peft_model(model, config)


def scenario_qlora(out: str, all_bits: tuple = (4, 8)) -> dict:
    """QLoRA (4-bit and 8-bit bases) through Trainer: not refused as "purely quantized", trains, saves PEFT files."""
    import peftfast

    result = {}
    for bits in all_bits:
        model = qlora(peftfast, os.path.join(out, "base"), bits)
        trainer = train(model, os.path.join(out, f"run{bits}"), lm_rows(vocab=101), max_steps=3, save_steps=100)
        trainer.save_model(os.path.join(out, f"final{bits}"))
        result[f"losses{bits}"] = losses(trainer)
        result[f"files{bits}"] = sorted(os.listdir(os.path.join(out, f"final{bits}")))
        result[f"final{bits}"] = tensors_json(adapter_files(os.path.join(out, f"final{bits}")))
    return result


def scenario_adapter_api(out: str) -> dict:
    """transformers' adapter API with a peftfast config: add, switch, disable/enable, state dict, save, load into a
    fresh model, delete; then Trainer on such a model saves PEFT's files."""
    import peftfast
    from peftfast import zoo

    x = zoo.causal_inputs(batch=2, seq=6, seed=9)
    model = zoo.llama(0)
    torch.manual_seed(21)
    model.add_adapter(peftfast.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    torch.manual_seed(22)
    model.add_adapter(peftfast.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="b")
    result: dict[str, Any] = {"after_add": model.active_adapters()}
    with torch.no_grad():
        result["b"] = model(**x).logits.flatten().tolist()
        model.set_adapter("default")
        result["active"] = model.active_adapters()
        result["default"] = model(**x).logits.flatten().tolist()
        model.disable_adapters()
        result["disabled"] = model(**x).logits.flatten().tolist()
        model.enable_adapters()
        result["enabled"] = model(**x).logits.flatten().tolist()
    result["state_keys"] = sorted(model.get_adapter_state_dict())
    model.save_pretrained(os.path.join(out, "saved"))
    result["files"] = sorted(os.listdir(os.path.join(out, "saved")))
    fresh = zoo.llama(0)
    fresh.load_adapter(os.path.join(out, "saved"), adapter_name="loaded")
    with torch.no_grad():
        result["loaded"] = fresh(**x).logits.flatten().tolist()
    result["loaded_active"] = fresh.active_adapters()
    model.delete_adapter("b")
    result["after_delete"] = sorted(model.peft_config)

    trained = zoo.llama(0)
    torch.manual_seed(23)
    trained.add_adapter(peftfast.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    trainer = train(trained, os.path.join(out, "train"), lm_rows(), max_steps=2, save_steps=100)
    trainer.save_model(os.path.join(out, "trained"))
    result["trained_files"] = sorted(os.listdir(os.path.join(out, "trained")))
    result["trained_losses"] = losses(trainer)
    return result


def scenario_from_pretrained(out: str) -> dict:
    """``AutoModelForCausalLM.from_pretrained(<adapter folder>)`` and ``LlamaForCausalLM.from_pretrained(<adapter
    folder>)``: transformers reads adapter_config.json, loads the base model it names and the adapter. Logits of
    each, and of ``peftfast.PeftModel.from_pretrained`` on the same folders."""
    import peftfast
    from peftfast import zoo
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    zoo.llama(0).save_pretrained(base_dir)
    model = lora_llama(peftfast)
    model.peft_config["default"].base_model_name_or_path = base_dir
    model.save_pretrained(adapter_dir)
    x = zoo.causal_inputs(batch=2, seq=6, seed=11)
    result: dict[str, Any] = {}
    with torch.no_grad():
        result["trained"] = model(**x).logits.flatten().tolist()
        for name, cls in (("auto", AutoModelForCausalLM), ("llama", LlamaForCausalLM)):
            loaded = cls.from_pretrained(adapter_dir)
            result[name] = loaded(**x).logits.flatten().tolist()
            result[f"{name}_active"] = loaded.active_adapters()
            result[f"{name}_class"] = type(loaded).__name__
            result[f"{name}_lora_layers"] = sum(1 for n, _ in loaded.named_modules() if n.endswith("lora_A.default"))
        result["base"] = AutoModelForCausalLM.from_pretrained(base_dir)(**x).logits.flatten().tolist()
    return result


def word_tokenizer(vocab: int = 61):
    """A word-level tokenizer over zoo's vocabulary ("t0".."t60"; 0 pad, 1 bos, 2 eos), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t3")),
                                   pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def sft(lib, out: str) -> dict:
    """TRL's SFTTrainer(model, peft_config=lib.LoraConfig(...)) on zoo.llama: 3 steps, then save_model."""
    from datasets import Dataset
    from peftfast import zoo
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_list([{"input_ids": zoo.token_ids(1, 7, seed=300 + i)[0].tolist()} for i in range(8)])
    args = SFTConfig(out, max_steps=3, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd", report_to=[], seed=0,
                     logging_steps=1, save_steps=100, use_cpu=True, disable_tqdm=True, bf16=False)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(31)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(zoo.llama(0), args=args, train_dataset=rows, processing_class=word_tokenizer(),
                             peft_config=config)
        # TRL draws the LoRA init at a point of its own; give both libraries the same adapter weights
        g = torch.Generator().manual_seed(32)
        with torch.no_grad():
            for name, p in sorted(trainer.model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    return {"losses": losses(trainer), "files": sorted(os.listdir(os.path.join(out, "final"))),
            "final": tensors_json(adapter_files(os.path.join(out, "final"))), "wrapper": type(trainer.model).__module__}


def sft_wrapped(lib, out: str) -> dict:
    """SFTTrainer given a model already wrapped by ``lib.get_peft_model`` (no peft_config): 3 steps, save_model."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_list([{"input_ids": zoo_ids(7, 300 + i)} for i in range(8)])
    args = SFTConfig(out, max_steps=3, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd", report_to=[],
                     seed=0, logging_steps=1, save_steps=100, use_cpu=True, disable_tqdm=True, bf16=False)
    model = lora_llama(lib, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model, args=args, train_dataset=rows, processing_class=word_tokenizer())
        trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    return {"losses": losses(trainer), "files": sorted(os.listdir(os.path.join(out, "final"))),
            "final": tensors_json(adapter_files(os.path.join(out, "final"))), "wrapper": type(trainer.model).__module__}


def zoo_ids(seq: int, seed: int) -> list[int]:
    from peftfast import zoo

    return zoo.token_ids(1, seq, seed=seed)[0].tolist()


def dpo(lib, out: str, wrapped: bool = False) -> dict:
    """TRL's DPOTrainer with no ref_model on zoo.llama, 3 steps, then save_model. ``wrapped=False``:
    ``peft_config=lib.LoraConfig(...)``, the reference log-probs come from the model with its adapter disabled;
    ``wrapped=True``: a model already wrapped by ``lib.get_peft_model``, for which TRL adds a frozen copy of the
    adapter named "ref" as the reference."""
    from datasets import Dataset
    from peftfast import zoo
    from trl import DPOConfig, DPOTrainer

    rows = Dataset.from_list([{"prompt": " ".join(f"t{t}" for t in zoo_ids(4, 400 + i)),
                               "chosen": " ".join(f"t{t}" for t in zoo_ids(3, 500 + i)),
                               "rejected": " ".join(f"t{t}" for t in zoo_ids(3, 600 + i))} for i in range(8)])
    args = DPOConfig(out, max_steps=3, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd", report_to=[],
                     seed=0, logging_steps=1, save_steps=100, use_cpu=True, disable_tqdm=True, bf16=False)
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(41)
    model = lib.get_peft_model(zoo.llama(0), config) if wrapped else zoo.llama(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model, args=args, train_dataset=rows, processing_class=word_tokenizer(),
                             peft_config=None if wrapped else config)
        # the same adapter weights for both libraries (each draws its init at its own point)
        g = torch.Generator().manual_seed(42)
        with torch.no_grad():
            for name, p in sorted(trainer.model.named_parameters()):
                if "lora_" in name and ".ref." not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                    if wrapped:  # the reference copy TRL made of the initial adapter
                        trainer.model.get_parameter(name.replace(".default.", ".ref.")).copy_(p)
        trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"losses": [h["loss"] for h in logs], "margins": [h.get("rewards/margins") for h in logs],
            "adapters": sorted(trainer.model.peft_config), "files": sorted(os.listdir(os.path.join(out, "final"))),
            "final": tensors_json(adapter_files(os.path.join(out, "final"))), "wrapper": type(trainer.model).__module__}


def rl_trainer(lib, trainer_name: str, out: str, caller_seed: int):
    """TRL's GRPO / RLOO / KTO / Reward / Distillation trainer on zoo.llama with ``peft_config=lib.LoraConfig(...)``
    (random A and B), two SGD steps; the caller's random state left at ``caller_seed``."""
    import trl
    from datasets import Dataset

    from peftfast import zoo

    task = "SEQ_CLS" if trainer_name == "reward" else "CAUSAL_LM"
    config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type=task, init_lora_weights=False)
    common = dict(max_steps=2, report_to=[], seed=7, use_cpu=True, disable_tqdm=True, bf16=False, learning_rate=0.5,
                  optim="sgd", per_device_train_batch_size=2)
    tok = word_tokenizer()

    def reward(completions, **kw):
        return [float(len(c)) for c in completions]

    model = zoo.llama(0)
    if trainer_name == "reward":
        from transformers import LlamaForSequenceClassification

        cfg = model.config
        cfg.num_labels, cfg.pad_token_id = 1, 0
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(cfg)
    torch.manual_seed(caller_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if trainer_name in ("grpo", "rloo"):
            cls, cfg_cls = (trl.GRPOTrainer, trl.GRPOConfig) if trainer_name == "grpo" else (trl.RLOOTrainer,
                                                                                            trl.RLOOConfig)
            return cls(model, reward_funcs=reward, train_dataset=Dataset.from_list([{"prompt": "t5 t6 t7"}] * 4),
                       args=cfg_cls(out, num_generations=2, max_completion_length=3, beta=0.1, **common),
                       processing_class=tok, peft_config=config)
        if trainer_name == "kto":
            rows = [{"prompt": "t5 t6", "completion": f"t{7 + i} t8", "label": i % 2 == 0} for i in range(4)]
            return trl.KTOTrainer(model, args=trl.KTOConfig(out, **common), train_dataset=Dataset.from_list(rows),
                                  processing_class=tok, peft_config=config)
        if trainer_name == "reward":
            rows = [{"chosen": "t5 t6 t7", "rejected": f"t{9 + i} t8"} for i in range(4)]
            return trl.RewardTrainer(model, args=trl.RewardConfig(out, **common), train_dataset=Dataset.from_list(rows),
                                     processing_class=tok, peft_config=config)
        rows = [{"prompt": "t5 t6", "completion": f"t{7 + i} t8"} for i in range(4)]
        return trl.DistillationTrainer(model, teacher_model=zoo.llama(1), args=trl.DistillationConfig(out, **common),
                                       train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=config)


def scenario_sft(out: str) -> dict:
    import peftfast

    return sft(peftfast, out)


def scenario_trl(out: str) -> dict:
    """SFTTrainer on a wrapped model, DPOTrainer with a peft_config and with a wrapped model; TRL's other trainers
    with a peft_config (the adapters after two steps)."""
    import peftfast

    others = {}
    for name in RL_TRAINERS:
        trainer = rl_trainer(peftfast, name, os.path.join(out, name), 1)
        trainer.train()
        others[name] = tensors_json({k: p.detach() for k, p in trainer.model.named_parameters() if "lora_" in k})
    return {"sft_wrapped": sft_wrapped(peftfast, os.path.join(out, "sft")),
            "dpo": dpo(peftfast, os.path.join(out, "dpo")),
            "dpo_wrapped": dpo(peftfast, os.path.join(out, "dpo-wrapped"), wrapped=True), "others": others}


# without peft: the LoRA run with activation checkpointing (its losses must still equal the plain run's), QLoRA 4-bit
PARTS = {"checks": scenario_checks, "adapter_api": scenario_adapter_api, "sft": scenario_sft, "trl": scenario_trl,
         "from_pretrained": scenario_from_pretrained,
         "lora": lambda out: scenario_lora(out, checkpointing=True),
         "qlora": lambda out: scenario_qlora(out, (4,))}


def scenario_all(out: str) -> dict:
    """Every scenario in one interpreter (one start-up instead of several)."""
    result = {}
    for name, run in PARTS.items():
        os.makedirs(os.path.join(out, name))
        result[name] = run(os.path.join(out, name))
    return result


SCENARIOS = {"all": scenario_all}

if __name__ == "__main__":
    name, folder = sys.argv[1], sys.argv[2]
    result = SCENARIOS[name](folder)
    Path(folder, "result.json").write_text(json.dumps(result))


def run_two_ranks(folder: Path, script: str, modes: tuple[str, ...]) -> dict:
    """Run tests/``script`` (a copy in ``folder``, outside the checkout) on 2 processes with torch.distributed.run;
    each mode's ``out/<mode>/rank{0,1}.json`` loaded, plus the path of the adapter rank 0 saved ("adapter")."""
    copy = folder / f"run_{script}"
    copy.write_text((Path(__file__).parent / script).read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(copy), str(folder / "out")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {mode: {r: json.loads((folder / "out" / mode / f"rank{r}.json").read_text()) for r in (0, 1)}
            | {"adapter": str(folder / "out" / mode / "adapter")} for mode in modes}
