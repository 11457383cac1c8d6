"""The layer plumbing LoRA and IA3 share: the one rule for fusing a base module, the static dispatchers,
the adapter bundle handed to the LoRA ops, and the shared feature-size rule."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from peftfast.tuners.adapter_layers import UnsupportedLayerError, base_is_fusable, feature_sizes
from peftfast.tuners.additive import LowRankAdapters
from peftfast.tuners.ia3 import IA3Model
from peftfast.tuners.ia3 import bnb as ia3_bnb
from peftfast.tuners.ia3 import model as ia3_model
from peftfast.tuners.lora import LoraModel
from peftfast.tuners.lora import bnb as lora_bnb
from peftfast.tuners.lora import layer as lora_layer
from peftfast.tuners.lora import model as lora_model


def frozen_linear(d_in: int = 16, d_out: int = 8) -> nn.Linear:
    return nn.Linear(d_in, d_out).requires_grad_(False)


def test_a_plain_frozen_linear_is_fusable():
    assert base_is_fusable(frozen_linear())


@pytest.mark.parametrize("how", ["trainable", "forward_hook", "forward_pre_hook", "backward_hook",
                                 "global_forward_hook", "global_forward_pre_hook", "patched_forward"])
def test_anything_a_call_would_run_rules_the_fused_op_out(how):
    base = frozen_linear()
    handle = None
    if how == "trainable":
        base.weight.requires_grad_(True)
    elif how == "forward_hook":
        handle = base.register_forward_hook(lambda *a: None)
    elif how == "forward_pre_hook":
        handle = base.register_forward_pre_hook(lambda *a: None)
    elif how == "backward_hook":
        handle = base.register_full_backward_hook(lambda *a: None)
    elif how == "global_forward_hook":
        handle = torch_module.register_module_forward_hook(lambda *a: None)
    elif how == "global_forward_pre_hook":
        handle = torch_module.register_module_forward_pre_hook(lambda *a: None)
    else:
        base.forward = lambda x: nn.Linear.forward(base, x)
    try:
        assert not base_is_fusable(base)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None:
        assert base_is_fusable(base)


def test_dispatchers_are_static_tuples_with_bitsandbytes_first():
    assert LoraModel.dispatchers == (lora_bnb.dispatch_bnb, lora_model.dispatch_default)
    assert IA3Model.dispatchers == (ia3_bnb.dispatch_bnb, ia3_model.dispatch_default)


def test_the_adapter_bundle_lists_the_adapters_in_the_order_asked():
    layer = lora_layer.Linear(frozen_linear(), "a", r=2, lora_alpha=4, lora_dropout=0.1)
    layer.update_layer("b", 3, 3, 0.0)
    bundle = layer.adapter_bundle(["b", "a"])
    assert isinstance(bundle, LowRankAdapters)
    assert [w is layer.lora_A[n].weight for w, n in zip(bundle.weights_a, "ba")] == [True, True]
    assert [w is layer.lora_B[n].weight for w, n in zip(bundle.weights_b, "ba")] == [True, True]
    assert bundle.scalings == [1.0, 2.0] and bundle.dropout_ps == [0.0, 0.1]


def test_triton_dense_lora_calls_a_patched_base_forward(triton_backend, monkeypatch):
    """The fused GEMM replaces a plain base; a base whose forward was patched (as accelerate's hooks do)
    must be called instead."""
    fused = []
    real = lora_layer.lora_linear_fused
    monkeypatch.setattr(lora_layer, "lora_linear_fused", lambda *a, **k: fused.append(1) or real(*a, **k))
    base = frozen_linear(32, 16)
    layer = lora_layer.Linear(base, "default", r=2, lora_alpha=4)
    x = torch.randn(4, 32)
    expected = layer(x)
    assert fused == [1]
    seen = []
    base.forward = lambda inp: seen.append(1) or nn.Linear.forward(base, inp)
    got = layer(x)
    assert fused == [1] and seen == [1]
    torch.testing.assert_close(got, expected)


def test_unsupported_base_is_both_a_type_and_a_value_error():
    with pytest.raises(TypeError, match="LayerNorm"):
        feature_sizes(nn.LayerNorm(4), "(IA)^3")
    with pytest.raises(ValueError, match="supported: Linear, Conv1D, Embedding"):
        feature_sizes(nn.LayerNorm(4), "LoRA", embedding=True)
    assert issubclass(UnsupportedLayerError, TypeError) and issubclass(UnsupportedLayerError, ValueError)
    assert feature_sizes(nn.Embedding(10, 3), "LoRA", embedding=True) == (10, 3)
