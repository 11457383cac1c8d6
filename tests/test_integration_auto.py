"""AutoPeftModel and AutoPeftModelFor<Task>: the base model comes from the adapter config, from a local folder or
offline from a Hub cache; the result equals loading both by hand, and PEFT's AutoPeftModel reads the same folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, BertForSequenceClassification

import peftfast
from peftfast import zoo

peft = pytest.importorskip("peft")


def adapter_on(base_dir, out, task_type="CAUSAL_LM", base_cls=AutoModelForCausalLM, targets=("q_proj", "v_proj")):
    base = base_cls.from_pretrained(str(base_dir))
    config = peftfast.LoraConfig(r=4, target_modules=list(targets), task_type=task_type, init_lora_weights=False)
    torch.manual_seed(11)
    model = peftfast.get_peft_model(base, config)
    model.save_pretrained(str(out))
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    zoo.llama(0).save_pretrained(str(path))
    return path


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_causal_lm_from_local_base_folder(llama_dir, tmp_path):
    original = adapter_on(llama_dir, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(llama_dir)
    loaded = peftfast.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert type(loaded) is peftfast.PeftModelForCausalLM
    x = zoo.causal_inputs(batch=2, seq=6, seed=4)
    torch.testing.assert_close(logits(loaded, x), logits(original, x), rtol=1e-5, atol=1e-6)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded, x), logits(theirs, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits(loaded, x), logits(zoo.llama(0), x), atol=1e-4)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = peftfast.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_base_model_offline_from_the_hub_cache(llama_dir, tmp_path, monkeypatch):
    """base_model_name_or_path is a Hub repo id; the model is only in the Hub cache and the Hub is off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tiny-org--tiny-llama"
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    original = adapter_on(llama_dir, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "tiny-org/tiny-llama"
    config_path.write_text(json.dumps(config))
    loaded = peftfast.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"),
                                                               cache_dir=str(tmp_path / "cache"))
    x = zoo.causal_inputs(batch=2, seq=6, seed=5)
    torch.testing.assert_close(logits(loaded, x), logits(original, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(OSError):
        peftfast.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"),
                                                          cache_dir=str(tmp_path / "empty-cache"))


def test_sequence_classification_and_task_mismatch(tmp_path):
    base_dir = tmp_path / "bert"
    zoo.bert_seq_cls(0).save_pretrained(str(base_dir))
    original = adapter_on(base_dir, tmp_path / "adapter", task_type="SEQ_CLS",
                          base_cls=BertForSequenceClassification, targets=("query", "value"))
    with torch.no_grad():
        original.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    original.save_pretrained(str(tmp_path / "adapter"))
    loaded = peftfast.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    x = zoo.seq_cls_inputs(batch=3, seed=2)
    torch.testing.assert_close(logits(loaded, x), logits(original, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForSequenceClassification"):
        peftfast.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="AutoPeftModelFor"):
        peftfast.AutoPeftModel.from_pretrained(str(tmp_path / "adapter"))


def test_auto_peft_model_without_task_type_uses_auto_mapping(llama_dir, tmp_path):
    original = adapter_on(llama_dir, tmp_path / "adapter", task_type=None)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    mapping = json.loads(config_path.read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "LlamaForCausalLM"
    loaded = peftfast.AutoPeftModel.from_pretrained(str(tmp_path / "adapter"))
    assert type(loaded) is peftfast.PeftModel
    x = zoo.causal_inputs(batch=2, seq=6, seed=6)
    torch.testing.assert_close(logits(loaded, x), logits(original, x), rtol=1e-5, atol=1e-6)
    config = json.loads(config_path.read_text())
    config["auto_mapping"]["parent_library"] = "os"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="import_allowlist"):
        peftfast.AutoPeftModel.from_pretrained(str(tmp_path / "adapter"))


def test_exported_like_peft():
    names = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
             "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
             "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"]
    for name in names:
        assert hasattr(peft, name) and name in peftfast.__all__ and hasattr(peftfast, name)
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        peftfast.AutoPeftModelForCausalLM()
