"""LoRA behaviour through the PEFT API, on small custom modules and tiny transformers models.

What a user of ``import peftfast as peft`` relies on: the module tree and import paths, the layer math
(checked against float64, not against PEFT), generation, task heads, attribute passthrough, the model
card, inject_adapter_in_model, get_peft_config, cast_mixed_precision_params, per-sample adapters
(``adapter_names``), and names / signatures / defaults matching PEFT 0.21.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import peft as ref
import pytest
import torch
from torch import nn

import peftfast as fast
from tests._models import (
    FAMILIES,
    causal_inputs,
    model_output,
    net_inputs,
    seq2seq_inputs,
    seq_cls_inputs,
    tiny_bert_qa,
    tiny_bert_seq_cls,
    tiny_bert_token_cls,
    tiny_gpt2,
    tiny_llama,
    tiny_net,
    tiny_t5,
)



@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def randomise_lora(model: nn.Module, seed: int = 3, adapter: str | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and (adapter is None or f".{adapter}." in name + "."):
                p.copy_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
            elif "modules_to_save" in name and (adapter is None or f".{adapter}." in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def net_config(**kw) -> dict:
    base = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["emb", "lin0", "lin1", "conv"],
        "fan_in_fan_out": False,
    }
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------------
# import paths and names
# ------------------------------------------------------------------------------------------------------
def test_import_paths():
    from peftfast.config import PeftConfig
    from peftfast.mapping import get_peft_config, get_peft_model, inject_adapter_in_model
    from peftfast.peft_model import PeftModel, PeftModelForCausalLM
    from peftfast.tuners.lora import Linear, LoraConfig, LoraLayer, LoraModel
    from peftfast.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peftfast.utils import ModulesToSaveWrapper, PeftType, TaskType

    assert issubclass(LoraConfig, PeftConfig) and issubclass(LoraModel, BaseTuner)
    assert issubclass(Linear, LoraLayer) and issubclass(LoraLayer, BaseTunerLayer)
    assert issubclass(PeftModelForCausalLM, PeftModel) and issubclass(ModulesToSaveWrapper, nn.Module)
    assert get_peft_model is fast.get_peft_model and get_peft_config is fast.get_peft_config
    assert inject_adapter_in_model is fast.inject_adapter_in_model
    assert PeftType.LORA.value == "LORA" and PeftType("LORA") is PeftType.LORA
    assert {t.value for t in TaskType} >= {t.value for t in ref.TaskType}
    assert {"LORA", "IA3", "ADALORA", "LOHA", "LOKR", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"} <= {
        t.value for t in PeftType
    }


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


SIGNATURES = [
    "get_peft_config",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "cast_mixed_precision_params",
    "PeftModel.__init__",
    "PeftModel.delete_adapter",
    "PeftModel.disable_adapter",
    "PeftModel.get_nb_trainable_parameters",
    "PeftModel.print_trainable_parameters",
    "PeftModel.get_base_model",
    "PeftModel.create_or_update_model_card",
    "LoraModel.merge_adapter",
    "LoraModel.unmerge_adapter",
    "LoraModel.merge_and_unload",
    "LoraModel.unload",
    "LoraModel.set_adapter",
    "LoraModel.delete_adapter",
    pytest.param(
        "PeftModel.add_adapter",
    ),
    pytest.param(
        "PeftModel.set_adapter",
    ),
]


@pytest.mark.parametrize("name", SIGNATURES)
def test_signatures_match_peft(name):
    """Every parameter of PEFT's function exists in peftfast's, in the same order with the same default
    (peftfast may add keyword parameters with defaults after them)."""

    def resolve(mod, dotted):
        obj = mod
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    theirs, ours = _params(resolve(ref, name)), _params(resolve(fast, name))
    assert ours[: len(theirs)] == theirs, f"{name}: PEFT {theirs} vs peftfast {ours}"
    assert all(d is not inspect.Parameter.empty for _, d in ours[len(theirs) :]), ours


def test_lora_config_fields_and_defaults_match_peft():
    ours = {f.name: f for f in dataclasses.fields(fast.LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(ref.LoraConfig)}
    # runtime_config holds runtime-only options and is never written to adapter_config.json by PEFT
    assert set(theirs) - set(ours) <= {"runtime_config"}
    assert set(ours) <= set(theirs)

    def default(f):
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"

    for name, f in ours.items():
        mine_default, peft_default = default(f), default(theirs[name])
        if dataclasses.is_dataclass(mine_default):  # runtime_config: each library's own dataclass, same fields
            mine_default, peft_default = dataclasses.asdict(mine_default), dataclasses.asdict(peft_default)
        assert mine_default == peft_default, name
    mine, peft_cfg = fast.LoraConfig(), ref.LoraConfig()
    for key in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "init_lora_weights",
        "use_rslora",
        "fan_in_fan_out",
        "inference_mode",
        "target_modules",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
    ):
        assert getattr(mine, key) == getattr(peft_cfg, key), key
    assert mine.peft_type == peft_cfg.peft_type == fast.PeftType.LORA


# ------------------------------------------------------------------------------------------------------
# module tree
# ------------------------------------------------------------------------------------------------------
def test_module_tree_llama():
    model = tiny_llama()
    cfg = fast.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    pm = fast.get_peft_model(model, cfg)
    assert type(pm) is fast.PeftModelForCausalLM
    assert isinstance(pm.base_model, fast.LoraModel)
    assert pm.base_model.model is model and pm.get_base_model() is model
    assert pm.peft_config == {"default": cfg}
    assert pm.active_adapter == "default" and pm.active_adapters == ["default"]
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, fast.tuners.lora.Linear) and isinstance(
        layer, fast.tuners.tuners_utils.BaseTunerLayer
    )
    assert type(layer.base_layer) is nn.Linear
    assert isinstance(layer.lora_A, nn.ModuleDict) and isinstance(layer.lora_B, nn.ModuleDict)
    assert list(layer.lora_A) == list(layer.lora_B) == ["default"]
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.bias is None and b.bias is None
    assert a.weight.shape == (4, layer.base_layer.in_features) and b.weight.shape == (
        layer.base_layer.out_features,
        4,
    )
    assert (
        layer.r == {"default": 4}
        and layer.lora_alpha == {"default": 12}
        and layer.scaling == {"default": 3.0}
    )
    assert layer.weight is layer.base_layer.weight and layer.get_base_layer() is layer.base_layer
    assert type(pm.base_model.model.model.layers[0].self_attn.k_proj) is nn.Linear
    keys = set(pm.state_dict())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


def test_module_tree_custom_net_linear_conv1d_embedding():
    from transformers.pytorch_utils import Conv1D

    net = tiny_net()
    pm = fast.get_peft_model(net, fast.LoraConfig(**net_config(r=3)))
    assert type(pm) is fast.PeftModel
    conv, emb, lin0 = net.conv, net.emb, net.lin0
    assert isinstance(lin0, fast.tuners.lora.Linear) and not lin0.fan_in_fan_out
    assert isinstance(conv, fast.tuners.lora.Linear) and type(conv.base_layer) is Conv1D
    assert conv.fan_in_fan_out  # switched on for Conv1D, as PEFT does (with a warning)
    assert conv.lora_A["default"].weight.shape == (3, 12) and conv.lora_B["default"].weight.shape == (12, 3)
    assert conv.get_delta_weight("default").shape == conv.base_layer.weight.shape  # Conv1D stores [in, out]
    assert isinstance(emb, fast.tuners.lora.Embedding) and type(emb.base_layer) is nn.Embedding
    assert isinstance(emb.lora_embedding_A, nn.ParameterDict)
    assert emb.lora_embedding_A["default"].shape == (3, 37) and emb.lora_embedding_B["default"].shape == (
        12,
        3,
    )
    assert type(net.head) is nn.Linear


def _layer_formula(layer, inp, params, dy, dtype):
    """The LoRA layer's output and the gradients of (params..., x) computed from scratch in ``dtype``."""
    base = layer.base_layer
    ps = [p.detach().to(dtype).requires_grad_() for p in params]
    a, b = ps
    s = layer.scaling["default"]
    if isinstance(
        layer, fast.tuners.lora.Embedding
    ):  # a = lora_embedding_A [r, vocab], b = lora_embedding_B [dim, r]
        y = base.weight.to(dtype)[inp] + (a.T[inp] @ b.T) * s
        leaves = ps
    else:
        xi = inp.detach().to(dtype).requires_grad_()
        w = base.weight.to(dtype)
        y = (xi @ w if layer.fan_in_fan_out else xi @ w.T) + base.bias.to(dtype) + (xi @ a.T @ b.T) * s
        leaves = [*ps, xi]
    return (y, *torch.autograd.grad(y, leaves, dy.to(dtype)))


def test_lora_layer_math_against_float64():
    """y = W x + b + scaling * B A x for nn.Linear, Conv1D (W stored [in, out]) and nn.Embedding (A^T[x] B^T):
    output and gradients against the same formula in float64. Allowed: 4x the error of the plain fp32 formula
    plus 1e-7 of the result's scale."""
    net = tiny_net()
    fast.get_peft_model(net, fast.LoraConfig(**net_config(r=5, lora_alpha=7)))
    randomise_lora(net)
    ids = net_inputs(batch=3, seq=11)["input_ids"]
    for layer, inp in (
        (net.lin0, torch.randn(3, 11, 12)),
        (net.conv, torch.randn(3, 11, 12)),
        (net.emb, ids),
    ):
        inp = inp.clone().requires_grad_(inp.is_floating_point())
        out = layer(inp)
        params = [p for n, p in layer.named_parameters() if "lora_" in n]
        dy = torch.randn_like(out)
        got = (out, *torch.autograd.grad(out, params + ([inp] if inp.requires_grad else []), dy))
        truth = _layer_formula(layer, inp, params, dy, torch.float64)
        plain = _layer_formula(layer, inp, params, dy, torch.float32)
        assert len(got) == len(truth)
        for i, (ours, p32, t64) in enumerate(zip(got, plain, truth)):
            err = (ours.double() - t64).abs().max().item()
            bound = 4 * (p32.double() - t64).abs().max().item() + 1e-7 * t64.abs().max().item()
            assert err <= bound, f"{type(layer).__name__} output/grad #{i}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("r", [1, 7, 100])
def test_linear_layer_odd_shapes_against_float64(r):
    """One LoRA nn.Linear of odd size (203 -> 113), ranks 1/7/100: output, dx, dA, dB against float64."""
    torch.manual_seed(r)
    model = nn.Sequential(nn.Linear(203, 113))
    fast.get_peft_model(model, fast.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["0"]))
    layer = model[0]
    randomise_lora(model, seed=r)
    x = torch.randn(2, 9, 203, requires_grad=True)
    dy = torch.randn(2, 9, 113)
    out = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    got = torch.autograd.grad(out, [x, a, b], dy)

    def formula(dtype):
        xs, as_, bs = (t.detach().to(dtype).requires_grad_() for t in (x, a, b))
        w, bias = layer.base_layer.weight.detach().to(dtype), layer.base_layer.bias.detach().to(dtype)
        y = xs @ w.T + bias + (xs @ as_.T @ bs.T) * layer.scaling["default"]
        return (y,) + torch.autograd.grad(y, [xs, as_, bs], dy.to(dtype))

    truth, plain = formula(torch.float64), formula(torch.float32)
    for what, ours, p32, t64 in zip(("out", "dx", "dA", "dB"), (out,) + got, plain, truth):
        err = (ours.double() - t64).abs().max().item()
        bound = 4 * (p32.double() - t64).abs().max().item() + 1e-7 * t64.abs().max().item()
        assert err <= bound, f"r={r} {what}: {err:.3e} > {bound:.3e}"


def test_lora_dropout_is_active_in_training_only():
    net = tiny_net()
    pm = fast.get_peft_model(
        net, fast.LoraConfig(**net_config(target_modules=["lin0", "lin1"], lora_dropout=0.5))
    )
    randomise_lora(pm)
    x = net_inputs()
    pm.eval()
    with torch.no_grad():
        e1, e2 = pm(**x), pm(**x)
    assert torch.equal(e1, e2)
    assert (
        isinstance(net.lin0.lora_dropout["default"], nn.Dropout) and net.lin0.lora_dropout["default"].p == 0.5
    )
    pm.train()
    t1 = pm(**x)
    t2 = pm(**x)
    assert not torch.equal(t1, t2) and not torch.equal(t1, e1)
    t1.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pm.parameters() if p.requires_grad)


def test_training_step_changes_only_adapters():
    model = tiny_llama()
    pm = fast.get_peft_model(
        model, fast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for _ in range(2):
        loss = pm(**causal_inputs()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in pm.named_parameters():
        changed = not torch.equal(p, before[n])
        if ".lora_B." in n or ".lora_A." in n:
            assert changed, n  # B from zero, then A once B is non-zero
        else:
            assert not changed and not p.requires_grad, n


# ------------------------------------------------------------------------------------------------------
# task wrappers, heads, generation
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,task,cls,head",
    [
        (tiny_bert_seq_cls, "SEQ_CLS", "PeftModelForSequenceClassification", "classifier"),
        (tiny_bert_token_cls, "TOKEN_CLS", "PeftModelForTokenClassification", "classifier"),
        (tiny_bert_qa, "QUESTION_ANS", "PeftModelForQuestionAnswering", "qa_outputs"),
    ],
)
def test_task_heads_go_into_modules_to_save(build, task, cls, head):
    model = build()
    pm = fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules=["query"], task_type=task))
    assert type(pm).__name__ == cls
    assert head in pm.peft_config["default"].modules_to_save
    wrapper = getattr(model, head)
    assert isinstance(wrapper, fast.utils.ModulesToSaveWrapper)
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert wrapper.weight is wrapper.modules_to_save["default"].weight  # attribute passthrough to the copy
    keys = fast.get_peft_model_state_dict(pm)
    assert f"base_model.model.{head}.weight" in keys


def test_llama_sequence_classification_score_head():
    from transformers import LlamaForSequenceClassification

    llama = tiny_llama()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        llama.config.__class__(**{**llama.config.to_dict(), "num_labels": 3})
    )
    model.config.pad_token_id = 0
    pm = fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert isinstance(model.score, fast.utils.ModulesToSaveWrapper)
    out = pm(**seq_cls_inputs())
    out.loss.backward()
    assert model.score.modules_to_save["default"].weight.grad is not None


def test_feature_extraction_wrapper():
    from transformers import BertModel

    bert = tiny_bert_seq_cls().bert
    pm = fast.get_peft_model(
        bert, fast.LoraConfig(r=2, target_modules=["query"], task_type="FEATURE_EXTRACTION")
    )
    assert type(pm) is fast.PeftModelForFeatureExtraction and isinstance(pm.get_base_model(), BertModel)
    out = pm(input_ids=seq_cls_inputs()["input_ids"])
    assert out.last_hidden_state.shape[-1] == 16


@pytest.mark.parametrize(
    "build,inputs,task",
    [
        (tiny_llama, causal_inputs, "CAUSAL_LM"),
        (tiny_gpt2, causal_inputs, "CAUSAL_LM"),
        (tiny_t5, seq2seq_inputs, "SEQ_2_SEQ_LM"),
    ],
)
def test_generate_matches_merged_model_and_peft(build, inputs, task):
    base = build()
    kw = {"r": 4, "lora_alpha": 8, "task_type": task}
    fm = fast.get_peft_model(copy.deepcopy(base), fast.LoraConfig(**kw))
    rm = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**kw))
    randomise_lora(rm)
    fm.load_state_dict(rm.state_dict())
    expected_cls = fast.PeftModelForSeq2SeqLM if task == "SEQ_2_SEQ_LM" else fast.PeftModelForCausalLM
    assert type(fm) is expected_cls
    x = inputs(batch=2, seq=5)
    gen = {
        "input_ids": x["input_ids"],
        "attention_mask": x["attention_mask"],
        "max_new_tokens": 5,
        "do_sample": False,
    }
    fm.eval()
    rm.eval()
    ours = fm.generate(**gen)
    assert torch.equal(ours, rm.generate(**gen))
    merged = copy.deepcopy(fm).merge_and_unload()
    assert torch.equal(ours, merged.generate(**gen))
    with fm.disable_adapter():
        assert torch.equal(fm.generate(**gen), base.generate(**gen))


def test_passthrough_attributes():
    net = tiny_net()
    net.custom_flag = 41
    net.describe = lambda: "tiny"
    pm = fast.get_peft_model(net, fast.LoraConfig(**net_config(target_modules=["lin0"])))
    assert pm.custom_flag == 41 and pm.describe() == "tiny"
    assert pm.head is net.head and pm.base_model.head is net.head
    llama = tiny_llama()
    pm = fast.get_peft_model(llama, fast.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert pm.config is llama.config and pm.config.model_type == "llama"
    assert pm.get_input_embeddings() is llama.model.embed_tokens
    assert pm.merge_and_unload.__self__ is pm.base_model  # tuner methods are reachable from the PeftModel
    assert not hasattr(pm, "no_such_attribute_anywhere")  # AttributeError, not a recursion or another error


def test_print_trainable_parameters(capsys):
    base = tiny_llama()
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    fm = fast.get_peft_model(copy.deepcopy(base), fast.LoraConfig(**kw))
    rm = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**kw))
    fm.print_trainable_parameters()
    ours = capsys.readouterr().out
    rm.print_trainable_parameters()
    assert ours == capsys.readouterr().out
    trainable, total = fm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in fm.named_parameters() if "lora_" in n)
    assert total == sum(p.numel() for p in fm.parameters())
    assert f"trainable params: {trainable:,d}" in ours


def test_model_card(tmp_path):
    pm = fast.get_peft_model(
        tiny_llama(), fast.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    assert pm.peft_config["default"].base_model_name_or_path == "tiny/llama"
    pm.create_or_update_model_card(str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n")
    front = card.split("---")[1]
    assert "library_name: peft" in front
    assert "base_model: tiny/llama" in front
    assert "lora" in front
    # updating keeps what the user wrote
    (tmp_path / "README.md").write_text(card + "\nMy notes about this adapter.\n")
    pm.create_or_update_model_card(str(tmp_path))
    updated = (tmp_path / "README.md").read_text()
    assert "My notes about this adapter." in updated and updated.count("library_name: peft") == 1


def test_inject_adapter_in_model():
    base = tiny_net()
    kw = net_config(target_modules=["lin0", "conv"], fan_in_fan_out=False)
    model = copy.deepcopy(base)
    out = fast.inject_adapter_in_model(fast.LoraConfig(**kw), model, adapter_name="mine")
    assert out is model and not isinstance(out, fast.PeftModel)
    assert isinstance(model.lin0, fast.tuners.lora.LoraLayer) and list(model.lin0.lora_A) == ["mine"]
    theirs = ref.inject_adapter_in_model(ref.LoraConfig(**kw), copy.deepcopy(base), adapter_name="mine")
    assert set(model.state_dict()) == set(theirs.state_dict())
    x = net_inputs()
    with torch.no_grad():
        assert torch.allclose(model(**x), base(**x), atol=1e-6, rtol=0)  # B = 0 at init
        randomise_lora(theirs)
        model.load_state_dict(theirs.state_dict())
        a, b = model(**x), theirs(**x)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


def test_get_peft_config():
    data = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 5,
        "lora_alpha": 10,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "lora_only",
        "use_rslora": True,
        "rank_pattern": {"q_proj": 3},
        "alpha_pattern": {"v_proj": 4},
        "layers_to_transform": [1],
        "layers_pattern": "layers",
        "base_model_name_or_path": "tiny/llama",
        "revision": "main",
        "inference_mode": True,
        "init_lora_weights": "gaussian",
        "modules_to_save": ["lm_head"],
    }
    ours, theirs = fast.get_peft_config(dict(data)), ref.get_peft_config(dict(data))
    assert type(ours) is fast.LoraConfig and ours.peft_type == fast.PeftType.LORA
    assert ours.task_type == fast.TaskType.CAUSAL_LM
    for key in data:
        value = getattr(ours, key)
        assert value == getattr(theirs, key), key
    assert set(ours.target_modules) == {"q_proj", "v_proj"}


def test_cast_mixed_precision_params():
    base = tiny_llama()
    kw = {"r": 2, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", "modules_to_save": ["lm_head"]}
    fm = fast.get_peft_model(copy.deepcopy(base), fast.LoraConfig(**kw))
    rm = ref.get_peft_model(copy.deepcopy(base), ref.LoraConfig(**kw))
    fast.cast_mixed_precision_params(fm, torch.bfloat16)
    ref.cast_mixed_precision_params(rm, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in fm.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in rm.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n or "modules_to_save" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n and "modules_to_save" not in n} == {
        torch.bfloat16
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the intended use: mixed-precision training
        ours, theirs = fm(**causal_inputs()), rm(**causal_inputs())
    assert torch.isfinite(ours.loss) and torch.allclose(ours.loss, theirs.loss, rtol=1e-2)


def test_add_adapter_does_not_activate_and_fp32_on_half_base():
    model = tiny_llama().to(torch.float16)
    pm = fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.add_adapter("other", fast.LoraConfig(r=3, target_modules=["v_proj", "q_proj"], task_type="CAUSAL_LM"))
    assert pm.active_adapter == "default" and set(pm.peft_config) == {"default", "other"}
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.lora_A["other"].weight.dtype == torch.float32
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".other." in n)
    assert layer.base_layer.weight.dtype == torch.float16


# ------------------------------------------------------------------------------------------------------
# per-sample adapters (adapter_names)
# ------------------------------------------------------------------------------------------------------
def _two_adapter_model(build, task, targets, **extra):
    model = build()
    pm = fast.get_peft_model(
        model, fast.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, **extra)
    )
    pm.add_adapter(
        "other", fast.LoraConfig(r=3, lora_alpha=5, target_modules=targets[:1], task_type=task, **extra)
    )
    randomise_lora(pm, seed=5)
    return pm.eval()


def _per_adapter_outputs(pm, x):
    outs = {}
    with torch.no_grad():
        for name in ("default", "other"):
            pm.set_adapter(name)
            outs[name] = model_output(pm(**x))
        pm.set_adapter("default")
        with pm.disable_adapter():
            outs["__base__"] = model_output(pm(**x))
    return outs


@pytest.mark.parametrize("case", ["net", "llama", "t5"])
def test_adapter_names_mixed_batch(case):
    if case == "net":
        pm = _two_adapter_model(tiny_net, None, ["lin0", "conv", "lin1"], fan_in_fan_out=True)
        x = net_inputs(batch=3)
    elif case == "llama":
        pm = _two_adapter_model(tiny_llama, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"])
        x = {k: v for k, v in causal_inputs(batch=3).items() if k != "labels"}
    else:
        pm = _two_adapter_model(tiny_t5, "SEQ_2_SEQ_LM", ["q", "v", "wo"])
        x = {k: v for k, v in seq2seq_inputs(batch=3).items()}
    names = ["other", "__base__", "default"]
    separate = _per_adapter_outputs(pm, x)
    assert (separate["other"] - separate["default"]).abs().max() > 1e-4
    with torch.no_grad():
        mixed = model_output(pm(**x, adapter_names=names))
    for i, name in enumerate(names):
        expected = separate[name][i]
        assert (mixed[i] - expected).abs().max() <= 1e-5 * expected.abs().max(), (i, name)
    assert pm.active_adapter == "default"


@pytest.mark.parametrize("build,task,targets,inputs", [
    (tiny_bert_seq_cls, "SEQ_CLS", ["query", "value"], seq_cls_inputs),  # classifier heads
    (tiny_llama, "CAUSAL_LM", ["embed_tokens", "q_proj"], causal_inputs),  # an embedding target
], ids=["classifier_heads", "embedding_target"])
def test_adapter_names_mixed_batch_more_layers(build, task, targets, inputs):
    pm = _two_adapter_model(build, task, targets)
    x = {k: v for k, v in inputs(batch=3).items() if k != "labels"}
    names = ["other", "__base__", "default"]
    separate = _per_adapter_outputs(pm, x)
    with torch.no_grad():
        mixed = model_output(pm(**x, adapter_names=names))
    for i, name in enumerate(names):
        assert torch.allclose(mixed[i], separate[name][i], atol=1e-5, rtol=1e-5), (i, name)


def _greedy_generation_case(batch: int, task="CAUSAL_LM", **options):
    """A tiny Llama with adapters "default" and "other" on q_proj/v_proj, and greedy generate() arguments
    for ``batch`` prompts of 5 tokens."""
    pm = _two_adapter_model(tiny_llama, task, ["q_proj", "v_proj"])
    x = causal_inputs(batch=batch, seq=5)
    return pm, {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "do_sample": False, **options}

@pytest.mark.parametrize("task", ["CAUSAL_LM", None])
def test_adapter_names_in_generate(task):
    """Also for a model made without task_type (a plain PeftModel, whose generate PEFT defines too)."""
    pm, gen = _greedy_generation_case(batch=3, task=task, max_new_tokens=4)
    assert type(pm) is (fast.PeftModelForCausalLM if task else fast.PeftModel)
    names = ["default", "other", "__base__"]
    mixed = pm.generate(**gen, adapter_names=names)
    for i, name in enumerate(names):
        single = dict(
            gen, input_ids=gen["input_ids"][i : i + 1], attention_mask=gen["attention_mask"][i : i + 1]
        )
        if name == "__base__":
            with pm.disable_adapter():
                expected = pm.generate(**single)
        else:
            pm.set_adapter(name)
            expected = pm.generate(**single)
            pm.set_adapter("default")
        assert torch.equal(mixed[i], expected[0]), name


def test_adapter_names_with_beam_search():
    pm, gen = _greedy_generation_case(batch=2, max_new_tokens=3, num_beams=2)
    mixed = pm.generate(**gen, adapter_names=["other", "default"])
    pm.set_adapter("other")
    first = pm.generate(**dict(gen, input_ids=gen["input_ids"][:1], attention_mask=gen["attention_mask"][:1]))
    assert torch.equal(mixed[0], first[0])


def test_all_linear_skips_task_heads():
    for build, task, head in (
        (tiny_bert_token_cls, "TOKEN_CLS", "classifier"),
        (tiny_bert_qa, "QUESTION_ANS", "qa_outputs"),
    ):
        model = build()
        fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules="all-linear", task_type=task))
        wrapper = getattr(model, head)
        assert isinstance(wrapper, fast.utils.ModulesToSaveWrapper)
        assert not any(isinstance(m, fast.tuners.lora.LoraLayer) for m in wrapper.modules())
        assert isinstance(model.bert.encoder.layer[0].attention.self.query, fast.tuners.lora.LoraLayer)
    llama = tiny_llama()
    fast.get_peft_model(llama, fast.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert type(llama.lm_head) is nn.Linear
    assert sum(isinstance(m, fast.tuners.lora.LoraLayer) for m in llama.modules()) == 2 * 7


def test_families_table_is_consistent():
    for fam in FAMILIES.values():
        model = fam.build()
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        assert set(fam.default_targets) <= names and {t.rsplit(".", 1)[-1] for t in fam.targets} <= names
