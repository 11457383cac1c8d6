"""Loads PEFT accepts that peftfast refused: base biases trained with bias='all' / 'lora_only' loaded into a model whose
config has the default bias='none' (PEFT's set_peft_model_state_dict loads them), and low_cpu_mem_usage=True loads of
AdaLoRA (whose files hold no ranknum) and DoRA (whose magnitude init needs real weights). Each is compared with the
model that was saved and with the real peft."""
import copy

import peft
import pytest
import torch
from torch import nn

import peftfast


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(11, 23)
        self.lin1 = nn.Linear(23, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def base() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_load_into_a_bias_none_model_as_in_peft(bias):
    x = torch.randn(6, 11)
    outs = []
    for lib in (peftfast, peft):
        model = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False,
                                                          bias=bias)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:  # the adapter and the biases the bias option makes trainable
                    p.copy_(torch.randn(p.shape, generator=g))
        expected = model(x)
        state = lib.get_peft_model_state_dict(model)
        fresh = lib.get_peft_model(base(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False)).eval()
        lib.set_peft_model_state_dict(fresh, state)
        outs.append((expected, fresh(x), sorted(state)))
    (ours_expected, ours, our_keys), (theirs_expected, theirs, their_keys) = outs
    assert our_keys == their_keys
    torch.testing.assert_close(ours, ours_expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kind", ["adalora", "dora"])
def test_low_cpu_mem_usage_load_equals_the_saved_model(kind, tmp_path):
    x = torch.randn(6, 11)
    outs = []
    for lib in (peftfast, peft):
        if kind == "adalora":
            config = lib.AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=4, total_step=10,
                                       init_lora_weights=False)
        else:
            config = lib.LoraConfig(target_modules=["lin0", "lin1"], r=4, use_dora=True, init_lora_weights=False)
        model = lib.get_peft_model(base(), config).eval()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        expected = model(x)
        folder = tmp_path / lib.__name__
        model.save_pretrained(folder)
        loaded = lib.PeftModel.from_pretrained(base(), folder, low_cpu_mem_usage=True).eval()
        assert not any(p.is_meta for p in loaded.parameters())
        outs.append((expected, loaded(x)))
    (ours_expected, ours), (theirs_expected, theirs) = outs
    # DoRA's weight norm is recomputed after the load (float32 summation order): equal to fp32 rounding
    torch.testing.assert_close(ours, ours_expected, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("method", ["lora", "ia3", "loha"])
@pytest.mark.parametrize("first_trainable", [False, True])
def test_adding_and_loading_adapters_leaves_other_adapters_trainability_as_in_peft(tmp_path, method, first_trainable):
    """load_adapter(is_trainable=...) and add_adapter change only their own adapter's requires_grad flags (PEFT 0.21);
    they used to re-apply the active adapter's trainability to the whole model."""
    def config(lib):
        if method == "lora":
            return lib.LoraConfig(target_modules=["lin0"])
        if method == "ia3":
            return lib.IA3Config(target_modules=["lin0"], feedforward_modules=[])
        return lib.LoHaConfig(target_modules=["lin0"])

    trainable = {}
    for lib in (peftfast, peft):
        folder = tmp_path / lib.__name__
        lib.get_peft_model(base(), config(lib)).save_pretrained(folder)
        model = lib.PeftModel.from_pretrained(base(), folder, is_trainable=first_trainable)
        model.load_adapter(folder, adapter_name="other", is_trainable=first_trainable)
        model.load_adapter(folder, adapter_name="opposite", is_trainable=not first_trainable)
        model.add_adapter("added", config(lib))
        trainable[lib.__name__] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable["peftfast"] == trainable["peft"]
    expected = ("default", "other") if first_trainable else ("opposite",)
    assert trainable["peftfast"] and all(any(f".{a}" in n for a in expected) for n in trainable["peftfast"])


@pytest.mark.parametrize("config", [peftfast.LoHaConfig(target_modules=["lin0"]),
                                    peftfast.LoKrConfig(target_modules=["lin0"])], ids=["loha", "lokr"])
def test_low_cpu_mem_usage_injection_puts_lycoris_weights_on_meta(config):
    model = peftfast.inject_adapter_in_model(config, base(), low_cpu_mem_usage=True)
    new = {n: p.device.type for n, p in model.named_parameters() if ".default" in n}
    assert new and set(new.values()) == {"meta"}
    assert {p.device.type for n, p in model.named_parameters() if ".default" not in n} == {"cpu"}
