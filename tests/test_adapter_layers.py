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


def test_a_weight_requiring_grad_is_fusable_while_autograd_does_not_record():
    """Under no_grad no weight gradient is asked for (FSDP's views of a flat parameter require grad even for a
    frozen weight); while autograd records, a weight that requires grad rules the fused op out."""
    base = frozen_linear()
    base.weight.requires_grad_(True)
    assert not base_is_fusable(base)
    with torch.no_grad():
        assert base_is_fusable(base)
    with torch.inference_mode():
        assert base_is_fusable(base)


def test_fsdp_inference_runs_the_same_ops_as_without_fsdp():
    """LoHa / LoKr / LoRA on an FSDP-wrapped model (one CPU process, gloo; use_orig_params: the frozen base weight
    seen as a view that requires grad): the no_grad outputs equal the unwrapped model's bit for bit (PEFT's own
    FSDP round-trip test compares them with allclose after a log-softmax, where ulps of the logits show)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    import peftfast

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(9, 10, generator=torch.Generator().manual_seed(3))
        for config in (peftfast.LoKrConfig(target_modules=["0", "2"], init_weights=False),
                       peftfast.LoHaConfig(target_modules=["0", "2"], init_weights=False),
                       peftfast.LoraConfig(target_modules=["0", "2"], init_lora_weights=False)):
            torch.manual_seed(0)
            model = peftfast.get_peft_model(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 7)),
                                            config).eval()
            with torch.no_grad():
                plain = model(x)
                wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))(x)
            assert torch.equal(wrapped, plain), type(config).__name__
    finally:
        dist.destroy_process_group()


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
