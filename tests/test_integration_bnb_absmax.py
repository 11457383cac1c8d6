"""bitsandbytes 4-bit storage after its AVX512-BF16 CPU repack and back: bf16 scales in [K / blocksize, N] order.

An eval-mode forward without grad on such a CPU rewrites a Linear4bit into bitsandbytes' CPU layout; saving the
model (``state_dict()``) converts it back, and without double quantisation the scales stay bf16 and transposed.
peftfast reads them in block order (``bnb_storage.block_scales``). The state is built here with bitsandbytes' own
conversion functions, so the test runs on any CPU; a second test goes through a real model where the CPU repacks.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

import peftfast
from peftfast import zoo
from peftfast.kernels.quant import dequantize_4bit
from peftfast.utils.bnb_storage import block_scales, packed4bit_from_bnb


def linear4bit(n: int, k: int, nested: bool, seed: int = 0) -> bnb.nn.Linear4bit:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested)
    return layer.to("cpu")


def repack_and_back(layer: bnb.nn.Linear4bit) -> None:
    """What an eval forward on an AVX512-BF16 CPU followed by state_dict() does to the layer's storage."""
    data, state = F._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = F._convert_weight_packed_for_cpu_inverse(data, state)


@pytest.mark.parametrize("n,k", [(64, 128), (96, 192), (32, 64)])
def test_bf16_transposed_scales_decode_in_block_order(n, k):
    layer = linear4bit(n, k, nested=False, seed=n + k)
    before = layer.weight.quant_state.absmax.clone()
    packed_before = layer.weight.data.clone()
    repack_and_back(layer)
    qs = layer.weight.quant_state
    assert qs.absmax.dtype == torch.bfloat16 and tuple(qs.absmax.shape) == (k // 64, n) and not qs.nested
    assert torch.equal(layer.weight.data.view(torch.uint8), packed_before.view(torch.uint8))
    p = packed4bit_from_bnb(layer)
    torch.testing.assert_close(p.absmax, before.to(torch.bfloat16).float(), rtol=0, atol=0)
    # the dequantised weight equals the original codes times the bf16-rounded scales, element by element
    codes = qs.code.float()
    flat = packed_before.view(torch.uint8).reshape(-1)
    idx = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1).long()[: n * k]
    want = (codes[idx] * before.to(torch.bfloat16).float().repeat_interleave(64)[: n * k]).reshape(n, k)
    torch.testing.assert_close(dequantize_4bit(p._replace(dtype=torch.float32)), want, rtol=0, atol=0)


def test_block_scales_refuses_what_it_cannot_place():
    with pytest.raises(ValueError, match="needs 4 scales"):
        block_scales(torch.ones(3, dtype=torch.bfloat16), 4, 64, 64)
    with pytest.raises(ValueError, match="float tensor"):
        block_scales(torch.ones(4, dtype=torch.uint8), 4, 64, 64)
    flat = torch.rand(4)
    assert block_scales(flat, 4, 64, 64) is flat


@pytest.mark.parametrize("nested", [False, True])
def test_lora_on_a_layer_brought_back_from_the_cpu_layout_trains(nested):
    """LoRA on the repacked-and-back layer: forward and every gradient against float64 with the same weights."""
    n, k = 64, 128
    layer = linear4bit(n, k, nested=nested, seed=3)
    repack_and_back(layer)
    w = dequantize_4bit(packed4bit_from_bnb(layer)._replace(dtype=torch.float32)).double()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    model = peftfast.get_peft_model(Net(), peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                               init_lora_weights=False))
    lora = model.base_model.model.proj
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    x = torch.randn(5, k, requires_grad=True)
    y = model(x)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w.t() + (x64 @ a64.t() @ b64.t()) * 2.0
    g = torch.randn_like(y)
    y.backward(g)
    y64.backward(g.double())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(a.grad.double(), a64.grad, **tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol)


def test_real_model_eval_forward_then_save_then_lora(tmp_path):
    """The reported sequence on a real 4-bit Llama: eval forward (the CPU repacks where it can), state_dict(), LoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    config = zoo.llama_config(64, 2, 101, heads=4, kv_heads=4, intermediate=128, pad=0)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=quant, dtype=torch.float32)
    x = zoo.causal_inputs(vocab=101)
    with torch.no_grad():
        model.eval()(**x)
    if not getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack (the constructed-state tests cover it)")
    model.state_dict()
    qs = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert qs.absmax.dtype == torch.bfloat16
    peft_model = peftfast.get_peft_model(model, peftfast.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    out = peft_model(**x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
