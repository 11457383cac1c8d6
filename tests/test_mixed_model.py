"""PeftMixedModel (adapters of several methods on one model) against PEFT 0.21.2's PeftMixedModel.

Linear, Conv2d and Conv1d targets with odd sizes; adapters of different methods share some modules (their layers
nest) and not others. Every adapter weight is redrawn at random (non-zero), then copied into both models:
forward, every gradient, merge / unmerge / merge_and_unload / unload, disable_adapter, delete_adapter and the saved
files are compared with PEFT's.
"""
from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftfast
from peftfast import PeftMixedModel


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(11, 13)
        self.c2 = nn.Conv2d(3, 5, 3, padding=1)
        self.c1 = nn.Conv1d(5, 7, 3)
        self.head = nn.Linear(7, 3)

    def forward(self, x, img):
        h = self.c1(self.c2(img).mean(2))
        return self.head(h.mean(2)) + self.lin(x)[:, :3]


def build_net():
    torch.manual_seed(0)
    return Net()


def inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(4, 11, generator=gen), torch.randn(4, 3, 6, 9, generator=gen)


LORA = ("LoraConfig", dict(r=3, lora_alpha=5, target_modules=["lin", "c2", "head"]))
LOHA = ("LoHaConfig", dict(r=2, alpha=3, target_modules=["lin", "c1"]))
LOKR = ("LoKrConfig", dict(r=2, alpha=5, target_modules=["lin", "c2", "c1"]))
LOHA_CP = ("LoHaConfig", dict(r=3, alpha=4, use_effective_conv2d=True, target_modules=["c2", "head"]))
LOKR_BOTH = ("LoKrConfig", dict(r=1, decompose_both=True, decompose_factor=2, target_modules=["lin", "head"]))
COMBOS = {
    "lora+loha": [LORA, LOHA],
    "loha+lora": [LOHA, LORA],
    "lora+lokr": [LORA, LOKR],
    "loha+lokr": [LOHA, LOKR],
    "lora+loha+lokr": [LORA, LOHA, LOKR],
    # PEFT 0.21.2 cannot put a LoRA Conv2d around another method's Conv2d layer (it reads base_layer.groups from
    # the wrapped adapter layer): the LoRA added last here adapts linears only
    "lokr+loha+lora": [LOKR, LOHA, ("LoraConfig", dict(r=3, lora_alpha=5, target_modules=["lin", "head"]))],
    "lora+lohacp+lokrboth": [LORA, LOHA_CP, LOKR_BOTH],
    "lora+loha+lora": [LORA, LOHA, ("LoraConfig", dict(r=2, lora_alpha=2, target_modules=["lin", "head"]))],
}
NAMES = ["default", "second", "third"]
PREFIXES = ("lora_", "hada_", "lokr_")


def _config(lib, spec):
    name, kw = spec
    return getattr(lib, name)(**kw)


def _mixed(lib, specs, build=build_net):
    model = lib.get_peft_model(build(), _config(lib, specs[0]), NAMES[0], mixed=True)
    for name, spec in zip(NAMES[1:], specs[1:]):
        model.add_adapter(name, _config(lib, spec))
    return model


def _pair(specs):
    """PEFT's and peftfast's mixed models with identical random (non-zero) adapter weights, all adapters active."""
    ref, ours = _mixed(peft, specs), _mixed(peftfast, specs)
    assert type(ours) is PeftMixedModel
    assert list(ref.state_dict()) == list(ours.state_dict())  # same module tree, same nesting
    names = NAMES[: len(specs)]
    ref.set_adapter(names)
    ours.set_adapter(names)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n == m
            if any(prefix in n for prefix in PREFIXES):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                q.copy_(p)
    return ref, ours


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_forward_gradients_and_merge_match_peft(combo):
    specs = COMBOS[combo]
    ref, ours = _pair(specs)
    names = NAMES[: len(specs)]
    assert ref.active_adapters == ours.active_adapters
    assert ref.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    x, img = inputs()
    y_ref, y_ours = ref(x, img), ours(x, img)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    # the adapters change the output (they are not all zero): the check above can fail
    assert (y_ref - build_net()(x, img)).abs().max() > 1e-2
    y_ref.square().sum().backward()
    y_ours.square().sum().backward()
    g_ref, g_ours = _grads(ref), _grads(ours)
    assert sorted(g_ref) == sorted(g_ours)
    assert all(any(p in n for p in PREFIXES) for n in g_ours)  # only adapter weights train
    for n in g_ref:
        if ".hada_t" in n or (n.endswith(("hada_w1_a.second", "hada_w2_a.second")) and "c2" in n):
            continue  # PEFT's CP-form LoHa backward is not its forward's gradient (tests/test_loha_lokr.py)
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)

    # each subset of adapters active, in either order of the list
    ref.eval()
    ours.eval()
    with torch.no_grad():
        for subset in ([names[-1]], names[:1], names[::-1]):
            ref.set_adapter(subset)
            ours.set_adapter(subset)
            torch.testing.assert_close(ours(x, img), ref(x, img), rtol=1e-5, atol=1e-5)
        ref.set_adapter(names)
        ours.set_adapter(names)
        expected = ref(x, img)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x, img), build_net()(x, img))
        torch.testing.assert_close(ours(x, img), expected, rtol=1e-5, atol=1e-5)
        ours.base_model.merge_adapter()
        torch.testing.assert_close(ours(x, img), expected, rtol=1e-4, atol=1e-4)
        ours.base_model.unmerge_adapter()
        torch.testing.assert_close(ours(x, img), expected, rtol=1e-5, atol=1e-5)
        merged_ref, merged = ref.merge_and_unload(), ours.merge_and_unload()
        assert [type(m) for m in merged.modules()] == [type(m) for m in merged_ref.modules()]
        for (n, p), (m, q) in zip(merged_ref.state_dict().items(), merged.state_dict().items()):
            assert n == m
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(merged(x, img), expected, rtol=1e-4, atol=1e-4)


def test_merge_a_subset_and_unload():
    ref, ours = _pair(COMBOS["lora+loha+lokr"])
    x, img = inputs()
    with torch.no_grad():
        merged_ref = ref.merge_and_unload(adapter_names=["default", "third"])
        merged = ours.merge_and_unload(adapter_names=["default", "third"])
        torch.testing.assert_close(merged(x, img), merged_ref(x, img), rtol=1e-4, atol=1e-4)
        assert (merged(x, img) - build_net()(x, img)).abs().max() > 1e-2
    ref, ours = _pair(COMBOS["lora+loha+lokr"])
    base = ours.unload()
    assert not any(isinstance(m, peftfast.tuners.BaseTunerLayer) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base(x, img), build_net()(x, img))


def test_delete_adapter_matches_peft():
    ref, ours = _pair(COMBOS["lora+loha+lokr"])
    x, img = inputs()
    for name in ("second", ["default"]):
        ref.delete_adapter(name)
        ours.delete_adapter(name)
        assert list(ours.peft_config) == list(ref.peft_config)
        assert sorted(ours.active_adapters) == sorted(ref.active_adapters)
        assert list(ref.state_dict()) == list(ours.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(ours(x, img), ref(x, img), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        ours.delete_adapter("second")


def _save_plain(lib, spec, state, folder):
    """Save one adapter with a plain PeftModel of its method, its weights taken from ``state`` (mixed keys)."""
    model = lib.get_peft_model(build_net(), _config(lib, spec))
    own = {k: v for k, v in model.state_dict().items() if any(p in k for p in PREFIXES)}
    assert sorted(own) == sorted(state)
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])
    model.save_pretrained(folder)


@pytest.mark.parametrize("combo", ["lora+loha+lokr", "lokr+loha+lora", "lora+lohacp+lokrboth"])
def test_files_from_peft_load_here_and_ours_load_in_peft(combo, tmp_path):
    specs = COMBOS[combo]
    ref, ours = _pair(specs)
    names = NAMES[: len(specs)]
    x, img = inputs()
    ref.eval()
    with torch.no_grad():
        expected = ref(x, img)

    # PEFT -> peftfast: each adapter saved by PEFT's PeftModel of its method (mixed models cannot save in PEFT)
    for i, (name, spec) in enumerate(zip(names, specs)):
        state = {}
        for key, value in ref.state_dict().items():
            parts = key.split(".")
            if name in parts:  # the adapter's layer may sit inside later methods' layers: drop those levels
                state[".".join("default" if p == name else p for p in parts if p != "base_layer")] = value
        _save_plain(peft, spec, state, str(tmp_path / "peft" / name))
    loaded = PeftMixedModel.from_pretrained(build_net(), str(tmp_path / "peft" / names[0]), names[0])
    for name in names[1:]:
        loaded.load_adapter(str(tmp_path / "peft" / name), name)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded frozen (is_trainable=False)
    assert loaded.active_adapters == [names[0]]
    loaded.set_adapter(names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, img), expected, rtol=1e-5, atol=1e-5)

    # peftfast -> PEFT: one save_pretrained of the mixed model; the files equal PEFT's plain PeftModel's
    ours.save_pretrained(str(tmp_path / "ours"))
    for name in names:
        folder = tmp_path / "ours" / ("" if name == "default" else name)
        mine = load_file(str(folder / "adapter_model.safetensors"))
        theirs = load_file(str(tmp_path / "peft" / name / "adapter_model.safetensors"))
        assert sorted(mine) == sorted(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", *names[1:]])
    back = peft.PeftMixedModel.from_pretrained(build_net(), str(tmp_path / "ours"), "default")
    for name in names[1:]:
        back.load_adapter(str(tmp_path / "ours" / name), name)
    back.set_adapter(names)
    with torch.no_grad():
        torch.testing.assert_close(back(x, img), expected, rtol=1e-5, atol=1e-5)
    # and each folder is an ordinary PEFT adapter of its method
    plain = peft.PeftModel.from_pretrained(build_net(), str(tmp_path / "ours" / names[-1]))
    assert type(plain.peft_config["default"]).__name__ == specs[-1][0]


def test_print_trainable_parameters_matches_peft(capsys):
    ref, ours = _pair(COMBOS["lora+loha+lokr"])
    ref.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected and "trainable params" in expected


@pytest.mark.parametrize("config", [
    peftfast.IA3Config(target_modules=["lin"], feedforward_modules=[]),
    peftfast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
], ids=["ia3", "prompt-tuning"])
def test_methods_peft_cannot_mix_are_refused(config, tmp_path):
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        peftfast.get_peft_model(build_net(), config, mixed=True)
    ours = _mixed(peftfast, [LORA])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        ours.add_adapter("bad", config)
    assert list(ours.peft_config) == ["default"]
    assert list(ours.state_dict()) == list(before)
    if isinstance(config, peftfast.IA3Config):  # and from a saved folder, before anything changes
        peft.get_peft_model(build_net(), peft.IA3Config(target_modules=["lin"], feedforward_modules=[])) \
            .save_pretrained(str(tmp_path / "ia3"))
        with pytest.raises(ValueError, match="not compatible"):
            ours.load_adapter(str(tmp_path / "ia3"), "bad")
        with pytest.raises(ValueError, match="not compatible"):
            PeftMixedModel.from_pretrained(build_net(), str(tmp_path / "ia3"))
        assert list(ours.peft_config) == ["default"] and list(ours.state_dict()) == list(before)


def test_adapter_name_errors():
    ours = _mixed(peftfast, [LORA, LOHA])
    with pytest.raises(ValueError, match="already exists"):
        ours.add_adapter("second", _config(peftfast, LOKR))
    with pytest.raises(ValueError, match="not found"):
        ours.set_adapter(["default", "nope"])
    assert ours.active_adapters == ["default"]
    with pytest.raises(TypeError, match="not supported"):
        ours.get_layer_status()


def test_adalora_mixes_with_lora_as_in_peft(tmp_path):
    specs = [LORA, ("AdaLoraConfig", dict(init_r=3, lora_alpha=4, total_step=10, target_modules=["lin", "c2"]))]
    ref, ours = _pair(specs)
    x, img = inputs()
    torch.testing.assert_close(ours(x, img), ref(x, img), rtol=1e-5, atol=1e-5)
    ref(x, img).square().sum().backward()
    ours(x, img).square().sum().backward()
    g_ref, g_ours = _grads(ref), _grads(ours)
    assert sorted(g_ref) == sorted(g_ours) and any(".lora_E." in n for n in g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)
    # saved here, loaded by PEFT and here
    ours.eval()
    with torch.no_grad():
        expected = ours(x, img)
    ours.save_pretrained(str(tmp_path))
    for lib in (peft, peftfast):
        back = lib.PeftMixedModel.from_pretrained(build_net(), str(tmp_path))
        back.load_adapter(str(tmp_path / "second"), "second")
        back.set_adapter(["default", "second"])
        with torch.no_grad():
            torch.testing.assert_close(back(x, img), expected, rtol=1e-5, atol=1e-5)


def test_lokr_with_full_factors_loads(tmp_path):
    """A LoKr adapter whose r reaches half a layer's size keeps full Kronecker factors: its file has no tensor with
    a dimension r, and loading it must not be refused as a config/weights mismatch."""
    spec = ("LoKrConfig", dict(r=16, alpha=4, target_modules=["lin", "c1"], init_weights=False))
    torch.manual_seed(5)
    ref = peft.get_peft_model(build_net(), _config(peft, spec))
    ref.save_pretrained(str(tmp_path))
    shapes = [t.shape for t in load_file(str(tmp_path / "adapter_model.safetensors")).values()]
    assert max(max(s) for s in shapes) < 16
    ours = PeftMixedModel.from_pretrained(build_net(), str(tmp_path))
    plain = peftfast.PeftModel.from_pretrained(build_net(), str(tmp_path))
    x, img = inputs()
    with torch.no_grad():
        expected = ref.eval()(x, img)
        torch.testing.assert_close(ours(x, img), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x, img), expected, rtol=1e-5, atol=1e-5)


def _unnested_name(name):
    return ".".join(p for p in name.split(".") if p != "base_layer")


def test_lora_around_another_methods_conv_layer():
    """PEFT 0.21.2 fails to put a LoRA conv layer around a LoHa/LoKr conv layer (see COMBOS); here it works. The
    sum of adapters does not depend on the nesting order: compared with PEFT's model holding the same adapters
    added the other way round (LoRA first, nested inside)."""
    lora = ("LoraConfig", dict(r=3, lora_alpha=5, target_modules=["c2", "c1"]))
    lokr = ("LoKrConfig", dict(r=2, alpha=5, target_modules=["c2"]))
    loha = ("LoHaConfig", dict(r=2, alpha=3, target_modules=["c1"]))
    ours = _mixed(peftfast, [lokr, loha, lora])
    ref = peft.get_peft_model(build_net(), _config(peft, lora), "third", mixed=True)
    ref.add_adapter("default", _config(peft, lokr))
    ref.add_adapter("second", _config(peft, loha))
    assert type(ours.base_model.model.c2).__name__ == "Conv2d" and "lora" in type(ours.base_model.model.c2).__module__
    names = ["default", "second", "third"]
    ours.set_adapter(names)
    ref.set_adapter(names)
    gen = torch.Generator().manual_seed(4)
    theirs = {_unnested_name(n): p for n, p in ref.named_parameters()}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if any(prefix in n for prefix in PREFIXES):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                theirs[_unnested_name(n)].copy_(p)
    x, img = inputs()
    y_ours, y_ref = ours(x, img), ref(x, img)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    y_ours.square().sum().backward()
    y_ref.square().sum().backward()
    g_ref = {_unnested_name(n): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g_ours = {_unnested_name(n): p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert sorted(g_ours) == sorted(g_ref) and len(g_ours) > 6
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(x, img), y_ref, rtol=1e-4, atol=1e-4)


def test_failed_load_leaves_the_mixed_model_as_it_was(tmp_path):
    from safetensors.torch import save_file

    from peftfast.utils.save_and_load import AdapterLoadError

    peft.get_peft_model(build_net(), _config(peft, LOKR)).save_pretrained(str(tmp_path / "lokr"))
    path = tmp_path / "lokr" / "adapter_model.safetensors"
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = torch.randn(state[key].shape[0] + 1, *state[key].shape[1:])  # one row too many
    save_file(state, str(path))
    ours = _mixed(peftfast, [LORA, LOHA])
    ours.set_adapter(["default", "second"])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    grads = {n: p.requires_grad for n, p in ours.named_parameters()}
    with pytest.raises(AdapterLoadError, match="shape"):
        ours.load_adapter(str(tmp_path / "lokr"), "third")
    assert list(ours.peft_config) == ["default", "second"] and ours.active_adapters == ["default", "second"]
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == grads
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(AdapterLoadError):
        PeftMixedModel.from_pretrained(base := build_net(), str(tmp_path / "lokr"))
    assert not any(isinstance(m, peftfast.tuners.BaseTunerLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")


def test_first_adapter_keeps_the_bf16_base_dtype_as_peft():
    """PEFT's PeftMixedModel leaves the adapter it is made with in the base's dtype (no float32 cast) and casts the
    adapters added later to float32: the same here, for each first method."""
    for first in ("LoraConfig", "LoHaConfig", "LoKrConfig"):
        dtypes = {}
        for lib in (peft, peftfast):
            torch.manual_seed(0)
            model = lib.get_peft_model(Net().to(torch.bfloat16), getattr(lib, first)(target_modules=["lin"]),
                                       mixed=True)
            model.add_adapter("later", lib.LoHaConfig(target_modules=["lin"]))
            dtypes[lib.__name__] = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad
                                    or ".default" in n or ".later" in n}
        assert dtypes["peftfast"] == dtypes["peft"], first
        assert {d for n, d in dtypes["peft"].items() if ".default" in n} == {torch.bfloat16}
        assert {d for n, d in dtypes["peft"].items() if ".later" in n} == {torch.float32}
