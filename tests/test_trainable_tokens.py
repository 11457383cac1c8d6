"""Trainable tokens (TrainableTokensConfig, LoraConfig(trainable_token_indices=...)) against the real PEFT.

Each case builds the same tiny model twice, applies the same config with peftfast and with PEFT, and copies PEFT's
state dict into peftfast's model (same keys, so that the two hold the same values: PEFT's random init is not
reproduced). Then: outputs, gradients (only the chosen rows of the embedding train), merge/unload, the saved files
both ways and LM heads tied to the embedding.

Swapping rows in is exact arithmetic, so the token-only cases compare bit for bit; cases with LoRA compare to
PEFT's float64 run with the error bound of tests/numerics.py.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftfast
from peftfast import zoo
from peftfast.tuners.trainable_tokens import TrainableTokensLayer
from peftfast.utils import TrainableTokensWrapper

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

VOCAB = 53


def tiny_llama(tied: bool = False, seed: int = 0):
    return zoo.llama(seed, 16, 2, VOCAB, tie_word_embeddings=tied)


def inputs(seed: int = 1, batch: int = 3, seq: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    ids[0, :5] = torch.tensor([3, 7, 0, 11, 3])  # trained rows, the padding row, repeats
    return ids


def pair(config_kwargs: dict, cls_name: str, tied: bool = False, adapter: str = "default"):
    """(peftfast model, PEFT model) with the same config and PEFT's adapter values copied into peftfast's."""
    ours = peftfast.get_peft_model(tiny_llama(tied), getattr(peftfast, cls_name)(**config_kwargs),
                                   adapter_name=adapter)
    theirs = peft.get_peft_model(tiny_llama(tied), getattr(peft, cls_name)(**config_kwargs), adapter_name=adapter)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def randomise_rows(model, adapter: str = "default", seed: int = 5):
    """A trained adapter: fresh random rows (init_weights=True starts as a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name and name.endswith(adapter):
                p.copy_(torch.randn(p.shape, generator=g))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), grads(model)


TOKENS = [3, 7, 11, 0]  # 0 is the padding row of the zoo's llama


def assert_same_run(ours, theirs, ids, exact: bool):
    lo, go = run(ours, ids)
    lt, gt = run(theirs, ids)
    assert set(go) == set(gt)
    if exact:
        assert torch.equal(lo, lt)
        for k in gt:
            assert torch.equal(go[k], gt[k]), k
    else:
        torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
        for k in gt:
            torch.testing.assert_close(go[k], gt[k], rtol=1e-5, atol=1e-6, msg=k)
    return go


# ------------------------------------------------------------------------------------------------------
# the method on its own
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("init_weights", [True, False])
def test_standalone_forward_grad_match_peft(tied, init_weights):
    ours, theirs = pair({"token_indices": TOKENS, "init_weights": init_weights}, "TrainableTokensConfig", tied)
    if init_weights:  # a no-op until trained
        base = tiny_llama(tied)
        ids = inputs()
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
        randomise_rows(theirs)
        ours.load_state_dict(theirs.state_dict())
    g = assert_same_run(ours, theirs, inputs(), exact=True)
    # only the rows train: one gradient, of the rows' shape, and nothing else requires grad
    assert list(g) == ["base_model.model.model.embed_tokens.trainable_tokens_delta.default"]
    assert g[next(iter(g))].shape == (len(TOKENS), 16)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    if tied:
        assert isinstance(ours.base_model.model.lm_head, TrainableTokensLayer)
        assert ours.base_model.model.lm_head.tied_adapter is ours.base_model.model.model.embed_tokens


def test_padding_row_gets_no_gradient_like_peft():
    ours, theirs = pair({"token_indices": TOKENS, "init_weights": False}, "TrainableTokensConfig")
    g = assert_same_run(ours, theirs, inputs(), exact=True)
    row = TOKENS.index(0)
    assert torch.count_nonzero(next(iter(g.values()))[row]) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_standalone_merge_unload_and_unmerge(tied):
    ours, theirs = pair({"token_indices": TOKENS, "init_weights": False}, "TrainableTokensConfig", tied)
    ids = inputs()
    before = ours(input_ids=ids).logits.detach()
    ours.merge_adapter()
    torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=0)
    ours.unmerge_adapter()
    base = tiny_llama(tied)
    emb = ours.base_model.model.model.embed_tokens.base_layer.weight
    assert torch.equal(emb, base.model.embed_tokens.weight)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert sorted(merged_ours.state_dict()) == sorted(merged_theirs.state_dict())
    for k, v in merged_theirs.state_dict().items():
        assert torch.equal(merged_ours.state_dict()[k], v), k
    assert torch.equal(merged_ours(input_ids=ids).logits, merged_theirs(input_ids=ids).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_standalone_save_load_both_ways(tied, tmp_path):
    ours, theirs = pair({"token_indices": TOKENS, "init_weights": False}, "TrainableTokensConfig", tied)
    ids = inputs()
    expected = ours(input_ids=ids).logits.detach()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    keys_ours = sorted(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors")))
    keys_theirs = sorted(load_file(os.path.join(tmp_path / "theirs", "adapter_model.safetensors")))
    # (PEFT's file also holds the tied head's copy of the rows when the method is used on its own)
    expected_keys = ["base_model.model.lm_head.trainable_tokens_delta"] if tied else []
    expected_keys.append("base_model.model.model.embed_tokens.trainable_tokens_delta")
    assert keys_ours == keys_theirs == expected_keys
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(tied), tmp_path / "ours")
    assert torch.equal(in_peft(input_ids=ids).logits, expected)
    here = peftfast.PeftModel.from_pretrained(tiny_llama(tied), tmp_path / "theirs")
    assert isinstance(here.peft_config["default"], peftfast.TrainableTokensConfig)
    assert torch.equal(here(input_ids=ids).logits, expected)


# ------------------------------------------------------------------------------------------------------
# LoRA with trainable_token_indices
# ------------------------------------------------------------------------------------------------------
LORA = {"target_modules": ["q_proj", "v_proj"], "r": 3, "lora_alpha": 5, "init_lora_weights": False}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("form", ["list", "dict"])
def test_lora_trainable_tokens_match_peft(tied, form, tmp_path):
    indices = TOKENS if form == "list" else {"embed_tokens": TOKENS}
    ours, theirs = pair({**LORA, "trainable_token_indices": indices}, "LoraConfig", tied)
    randomise_rows(theirs)
    ours.load_state_dict(theirs.state_dict())
    emb = ours.base_model.model.model.embed_tokens
    assert isinstance(emb, TrainableTokensWrapper)
    if tied:
        head = ours.base_model.model.lm_head
        assert isinstance(head, TrainableTokensWrapper) and head.token_adapter.tied_adapter is emb.token_adapter
    g = assert_same_run(ours, theirs, inputs(), exact=False)
    tokens = [k for k in g if "trainable_tokens" in k]
    assert tokens == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert all("lora_" in k or "trainable_tokens" in k for k in g)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    ids = inputs()
    expected = ours(input_ids=ids).logits.detach()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors"))) == \
        sorted(load_file(os.path.join(tmp_path / "theirs", "adapter_model.safetensors")))
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(tied), tmp_path / "ours")
    torch.testing.assert_close(in_peft(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    here = peftfast.PeftModel.from_pretrained(tiny_llama(tied), tmp_path / "theirs")
    torch.testing.assert_close(here(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)

    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert isinstance(merged_ours.model.embed_tokens, nn.Embedding)
    for k, v in merged_theirs.state_dict().items():
        torch.testing.assert_close(merged_ours.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(merged_ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_two_adapters_disjoint_rows_active_together():
    ours = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**LORA, trainable_token_indices=[3, 7]))
    ours.add_adapter("other", peftfast.LoraConfig(**LORA, trainable_token_indices=[11, 20]))
    randomise_rows(ours, "default", seed=2)
    randomise_rows(ours, "other", seed=3)
    layer = ours.base_model.model.model.embed_tokens.token_adapter
    ours.base_model.set_adapter(["default", "other"])
    ids = inputs()
    emb = ours.base_model.model.model.embed_tokens(ids)
    want = layer.base_layer.weight.detach().clone()
    want[[3, 7]] = layer.trainable_tokens_delta["default"].detach()
    want[[11, 20]] = layer.trainable_tokens_delta["other"].detach()
    assert torch.equal(emb, nn.functional.embedding(ids, want))


def test_overlapping_rows_refused_and_bad_indices_leave_model_unchanged():
    model = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**LORA, trainable_token_indices=[3, 7]))
    model.add_adapter("other", peftfast.LoraConfig(**LORA, trainable_token_indices=[7, 9]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="Token indices of adapter other"):
        model(input_ids=inputs())
    model.base_model.set_adapter("default")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tree = repr(model)
    with pytest.raises(ValueError, match="out of range"):
        model.add_adapter("bad", peftfast.LoraConfig(**LORA, trainable_token_indices=[2, VOCAB]))
    assert "bad" not in model.peft_config and repr(model) == tree
    assert sorted(model.state_dict()) == sorted(before)
    with pytest.raises(ValueError, match="token_indices"):
        peftfast.TrainableTokensConfig(token_indices=[1, 1])
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**LORA, modules_to_save=["embed_tokens"],
                                                                  trainable_token_indices={"embed_tokens": [1]}))


def test_delete_and_disable_adapters():
    model = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**LORA, trainable_token_indices=[3, 7]))
    model.add_adapter("other", peftfast.LoraConfig(**LORA, trainable_token_indices=[4]))
    randomise_rows(model)
    ids = inputs()
    base = tiny_llama()(input_ids=ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
    model.delete_adapter("other")
    wrapper = model.base_model.model.model.embed_tokens
    assert wrapper._adapters == {"default"} and "other" not in wrapper.token_adapter.token_indices
    assert wrapper.active_adapters == ["default"]
    copy.deepcopy(model)  # the tied/untied layers survive a deepcopy


# ------------------------------------------------------------------------------------------------------
# ensure_weight_tying with modules_to_save
# ------------------------------------------------------------------------------------------------------
def test_ensure_weight_tying_modules_to_save_matches_peft(tmp_path):
    kwargs = {**LORA, "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}
    ours, theirs = pair(kwargs, "LoraConfig", tied=True)
    emb, head = ours.base_model.model.model.embed_tokens, ours.base_model.model.lm_head
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    with torch.no_grad():  # a trained copy: both modules see it
        emb.modules_to_save["default"].weight.add_(torch.randn(emb.weight.shape, generator=torch.Generator()
                                                               .manual_seed(4)))
        theirs.base_model.model.model.embed_tokens.modules_to_save["default"].weight.copy_(
            emb.modules_to_save["default"].weight)
    assert_same_run(ours, theirs, inputs(), exact=False)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(load_file(os.path.join(tmp_path / "ours", "adapter_model.safetensors"))) == \
        sorted(load_file(os.path.join(tmp_path / "theirs", "adapter_model.safetensors")))


def test_failed_add_adapter_with_ensure_weight_tying_leaves_the_model_as_it_was():
    def config(**extra):
        return peftfast.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                   ensure_weight_tying=True, **extra)

    model = peftfast.get_peft_model(tiny_llama(tied=True), config())
    head = model.base_model.model.lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"

    def state():
        return ({n: (type(m).__name__, getattr(m, "active_adapters", None)) for n, m in model.named_modules()},
                {k: v.clone() for k, v in model.state_dict().items()},
                {n: p.requires_grad for n, p in model.named_parameters()})

    before = state()
    # the tied wrappers get adapter "b" first; the trainable-token step after them refuses a linear layer
    with pytest.raises(TypeError, match="trainable_token_indices"):
        model.add_adapter("b", config(trainable_token_indices={"q_proj": [1]}))
    after = state()
    assert after[0] == before[0] and after[2] == before[2]
    assert sorted(after[1]) == sorted(before[1])
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert list(head.modules_to_save) == ["default"]


def test_trainable_tokens_on_a_scaled_embedding_as_peft():
    """Gemma's embedding multiplies its output by ``embed_scale``: the trained rows are scaled too, as PEFT does
    (logits and the delta's gradient equal PEFT's, after the trained rows are moved off the base ones)."""
    peft = pytest.importorskip("peft")
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=12, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = GemmaForCausalLM(cfg)
    assert float(base.model.embed_tokens.embed_scale) != 1.0
    ids = torch.tensor([[3, 9, 5, 3, 1], [5, 2, 7, 9, 4]])
    runs = []
    for lib in (peftfast, peft):
        pm = lib.get_peft_model(copy.deepcopy(base), lib.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                              token_indices=[3, 5, 9]))
        delta = next(p for n, p in pm.named_parameters() if "trainable_tokens_delta" in n)
        with torch.no_grad():
            delta.add_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(1)))
        out = pm(input_ids=ids).logits
        out.pow(2).mean().backward()
        runs.append((out.detach(), delta.grad.clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-6)
