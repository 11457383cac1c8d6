"""QLoRA: LoRA and (IA)^3 on bitsandbytes 4-bit / 8-bit bases, against PEFT and a float64 reference.

Model-level parity: a tiny Llama is saved to a temporary folder and loaded through transformers with
``BitsAndBytesConfig`` (nf4 / fp4, with and without double quantisation, and int8). One copy goes
through the real PEFT (``prepare_model_for_kbit_training`` + ``get_peft_model``), one through peftfast,
with the same random adapter weights (lora_B too). Both dequantise to the same weights, so the
yardstick is derived, not guessed: a float64 twin of the quantised model (its linear weights set to
the exactly dequantised values, the same adapter on top) gives the exact logits, loss and adapter
gradients, and peftfast's error against it may be at most ``K_ERR`` times PEFT's own fp32 error (with
a floor of one fp32 ulp at the tensor's scale, for a quantity PEFT happens to get exact).

Layer-level tests use odd shapes (203 -> 113, rank 7) and every storage variant, compare forward and
every gradient with float64 in the same way, check that no dequantised [N, K] weight is saved for
backward, and check merging / unmerging against bitsandbytes' own quantiser with a derived bound.
"""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

import peftfast
from peftfast import zoo
from peftfast.kernels.quant import Packed4bit, decode_absmax, dequantize_4bit
from peftfast.tools.memory import measure_saved_bytes
from peftfast.tuners.ia3 import bnb as ia3_bnb
from peftfast.tuners.lora import bnb as lora_bnb
from peftfast.utils.bnb_storage import int8_from_bnb, packed4bit_from_bnb, prevent_cpu_repack
from tests._autograd import record_saved

K_ERR = 4  # peftfast's error vs exact may be this many times PEFT's (same math, maybe another op order)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    config = zoo.llama_config(64, 2, 101, heads=4, kv_heads=4, intermediate=128, max_positions=64, pad=None)
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path, case: str, dtype: torch.dtype = torch.float32, **extra) -> torch.nn.Module:
    config = BitsAndBytesConfig(**QUANT[case], **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype)


def exact_weight(module: torch.nn.Module) -> torch.Tensor:
    """float64 [out, in]: the value the quantised layer stands for (what both libraries dequantise to)."""
    if lora_bnb.quantized_kind(module) == "4bit":
        return dequantize_4bit(packed4bit_from_bnb(module)._replace(dtype=torch.float32)).double()
    cb, scb = int8_from_bnb(module)
    return cb.double() * scb.double()[:, None] / 127


def exact_twin(path, quantized: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of the quantised model, its quantised linears replaced by their exact values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64)
    count = 0
    for name, module in quantized.named_modules():
        if lora_bnb.quantized_kind(module) is not None:
            twin.get_submodule(name).weight.data = exact_weight(module)
            count += 1
    assert count == 2 * len(TARGETS)
    return twin


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomise(model, std: float = 0.1) -> None:
    with torch.no_grad():
        for name, p in trainable(model).items():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, std)


def copy_adapters(src, *dsts) -> None:
    src_params = trainable(src)
    with torch.no_grad():
        for dst in dsts:
            dst_params = trainable(dst)
            assert dst_params.keys() == src_params.keys()
            for name, p in dst_params.items():
                p.copy_(src_params[name])


def train_step(model, ids):
    """Logits, loss and adapter gradients (float64 copies) of one training forward/backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().double() for n, p in trainable(model).items()}
    return out.logits.detach().double(), out.loss.detach().double(), grads


def assert_as_close_as_peft(what: str, ours, theirs, exact, k: float = K_ERR) -> None:
    err_ours = (ours - exact).abs().max().item()
    err_theirs = (theirs - exact).abs().max().item()
    floor = eps(torch.float32) * exact.abs().max().item()
    assert err_ours <= k * max(err_theirs, floor), (
        f"{what}: peftfast's error vs float64 {err_ours:.3e} exceeds {k} x PEFT's {err_theirs:.3e} "
        f"(floor {floor:.1e})")


def compare_step(fast_step, peft_step, exact_step) -> None:
    (lf, sf, gf), (lp, sp, gp), (le, se, ge) = fast_step, peft_step, exact_step
    assert_as_close_as_peft("logits", lf, lp, le)
    assert_as_close_as_peft("loss", sf, sp, se)
    assert gf.keys() == gp.keys() == ge.keys() and gf
    for name in ge:
        assert ge[name].abs().max() > 0, f"{name}: the exact gradient is 0; a wrong one would go unseen"
        assert_as_close_as_peft(f"grad {name}", gf[name], gp[name], ge[name])


def lora_kwargs(**overrides) -> dict:
    return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS,
            "task_type": "CAUSAL_LM", **overrides}


def build_lora_trio(path, case: str):
    """(peftfast model, PEFT model, float64 twin with PEFT) sharing random adapter weights."""
    ours = peftfast.prepare_model_for_kbit_training(load_quantized(path, case))
    theirs = peft.prepare_model_for_kbit_training(load_quantized(path, case))
    exact = exact_twin(path, load_quantized(path, case))
    ours = peftfast.get_peft_model(ours, peftfast.LoraConfig(**lora_kwargs()))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(**lora_kwargs()))
    exact = peft.get_peft_model(exact, peft.LoraConfig(**lora_kwargs()))
    randomise(ours)
    copy_adapters(ours, theirs, exact)
    return ours, theirs, exact


# ------------------------------------------------------------------------------------------- model-level


@pytest.mark.parametrize("case", list(QUANT))
def test_lora_matches_peft_qlora_and_trains(tiny_dir, case):
    ours, theirs, exact = build_lora_trio(tiny_dir, case)
    want = lora_bnb.Linear4bit if case != "int8" else lora_bnb.Linear8bitLt
    layers = [m for m in ours.modules() if isinstance(m, (lora_bnb.Linear4bit, lora_bnb.Linear8bitLt))]
    assert len(layers) == 2 * len(TARGETS) and all(type(m) is want for m in layers)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # the status reports show the quantization backend as PEFT 0.21's do (None: its bnb layers set none)
    assert [s.quantization_backend for s in ours.get_layer_status()] == \
        [s.quantization_backend for s in theirs.get_layer_status()]
    assert ours.get_model_status().quantization_backend == theirs.get_model_status().quantization_backend

    ids = torch.randint(0, 101, (2, 11))
    compare_step(train_step(ours, ids), train_step(theirs, ids), train_step(exact, ids))

    if case != "int8":  # bnb's int8 eval path quantises activations: PEFT's eval output is another function
        prevent_cpu_repack(theirs)  # keep PEFT's bnb layers on their standard path in eval mode too
        with torch.no_grad():
            logits = [m.eval()(input_ids=ids).logits.double() for m in (ours, theirs, exact)]
        assert_as_close_as_peft("eval logits", *logits)

    opt = torch.optim.AdamW(trainable(ours).values(), lr=1e-2)
    losses = []
    for _ in range(4):
        ours.train()
        loss = ours(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, f"AdamW steps did not lower the loss: {losses}"


@pytest.mark.parametrize("case", ["nf4-dq", "int8"])
def test_merge_and_unload_matches_peft(tiny_dir, case):
    ours, theirs, _ = build_lora_trio(tiny_dir, case)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        adapted = ours.train()(input_ids=ids).logits
    with pytest.warns(UserWarning, match="requantises"):
        merged_ours = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload()
    names = [n for n, m in merged_ours.named_modules() if lora_bnb.quantized_kind(m)]
    assert len(names) == 2 * len(TARGETS)
    assert not any(hasattr(m, "lora_A") for m in merged_ours.modules())
    for name in names:
        a, b = merged_ours.get_submodule(name), merged_theirs.get_submodule(name)
        assert type(a) is type(b)
        if case == "int8":  # PEFT dequantises in another order (ulp differences) before requantising
            (cb_a, scb_a), (cb_b, scb_b) = int8_from_bnb(a), int8_from_bnb(b)
            torch.testing.assert_close(scb_a, scb_b, rtol=2 * eps(torch.float16), atol=0)
            assert (cb_a.int() - cb_b.int()).abs().max() <= 1
        else:  # the same fp32 sum through the same quantiser: the same bits
            qa, qb = a.weight.quant_state, b.weight.quant_state
            settings = [(q.quant_type, q.blocksize, q.nested, q.dtype) for q in (qa, qb)]
            assert settings[0] == settings[1]
            assert torch.equal(exact_weight(a), exact_weight(b)), name
    with torch.no_grad():  # the unloaded models are plain bnb models again (train mode: no CPU repack)
        after_ours, after_theirs = (m.train()(input_ids=ids).logits for m in (merged_ours, merged_theirs))
    assert not torch.equal(after_ours, adapted)  # requantised: not the adapter's output exactly
    if case != "int8":
        assert torch.equal(after_ours, after_theirs)
    # How far a merge moves a layer's output (the requantisation error) is bounded in
    # test_merge_and_unmerge_requantise_with_the_layer_settings.


@pytest.mark.parametrize("case", ["nf4-dq", "int8"])
def test_unload_leaves_the_quantised_base_untouched(tiny_dir, case):
    fresh = load_quantized(tiny_dir, case)
    model = peftfast.get_peft_model(load_quantized(tiny_dir, case), peftfast.LoraConfig(**lora_kwargs()))
    randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    unloaded = model.unload()
    assert not any(hasattr(m, "lora_A") for m in unloaded.modules())
    for name, module in fresh.named_modules():
        if lora_bnb.quantized_kind(module):
            assert torch.equal(exact_weight(unloaded.get_submodule(name)), exact_weight(module)), name
    with torch.no_grad():  # bnb's dequantise-and-multiply path (train mode; its int8 eval path differs)
        expected = fresh.train()(input_ids=ids).logits
    atol = 16 * eps(torch.float32) * expected.abs().max()
    torch.testing.assert_close(disabled, expected, rtol=0, atol=atol)


def test_ia3_matches_peft_on_nf4(tiny_dir):
    kwargs = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                  task_type="CAUSAL_LM")
    ours = peftfast.prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4-dq"))
    theirs = peft.prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4-dq"))
    exact = exact_twin(tiny_dir, load_quantized(tiny_dir, "nf4-dq"))
    ours = peftfast.get_peft_model(ours, peftfast.IA3Config(**kwargs))
    theirs = peft.get_peft_model(theirs, peft.IA3Config(**kwargs))
    exact = peft.get_peft_model(exact, peft.IA3Config(**kwargs))
    assert sum(type(m) is ia3_bnb.Linear4bit for m in ours.modules()) == 6
    randomise(ours)
    copy_adapters(ours, theirs, exact)
    ids = torch.randint(0, 101, (2, 11))
    compare_step(train_step(ours, ids), train_step(theirs, ids), train_step(exact, ids))
    with pytest.raises(ValueError, match="cannot merge"):
        ours.merge_and_unload()
    assert not any(hasattr(m, "ia3_l") for m in ours.unload().modules())


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["nf4-dq", "int8"])
def test_fused_triton_path_end_to_end(tiny_dir, triton_backend, case, monkeypatch):
    # The Triton kernels (the quantised GEMMs with double-quantised NF4 dequantised in registers, or
    # int8 rows, the adapter inside them) in the interpreter, forward and backward through the model.
    calls = []
    fused = lora_bnb.qlora_linear_fused
    monkeypatch.setattr(lora_bnb, "qlora_linear_fused", lambda *a, **k: calls.append(1) or fused(*a, **k))
    ours, theirs, exact = build_lora_trio(tiny_dir, case)
    ids = torch.randint(0, 101, (2, 7))
    compare_step(train_step(ours, ids), train_step(theirs, ids), train_step(exact, ids))
    assert len(calls) >= 2 * len(TARGETS)  # every quantised LoRA layer took the fused op


@pytest.mark.parametrize("case,flag", [("nf4-dq", "is_loaded_in_4bit"), ("int8", "is_loaded_in_8bit")])
def test_layers_chosen_by_type_when_flags_are_missing(tiny_dir, case, flag):
    model = load_quantized(tiny_dir, case)
    assert getattr(model, flag)
    delattr(model, flag)
    assert not hasattr(model, flag)
    model = peftfast.prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing  # detected as quantised from its layers
    lora = peftfast.get_peft_model(model, peftfast.LoraConfig(**lora_kwargs()))
    want = lora_bnb.Linear4bit if case == "nf4-dq" else lora_bnb.Linear8bitLt
    assert sum(type(m) is want for m in lora.modules()) == 2 * len(TARGETS)
    randomise(lora)
    ids = torch.randint(0, 101, (2, 5))
    _, loss, grads = train_step(lora, ids)
    assert torch.isfinite(loss) and all(g.abs().max() > 0 for g in grads.values())

    ia3 = peftfast.get_peft_model(load_quantized(tiny_dir, case), peftfast.IA3Config(task_type="CAUSAL_LM"))
    delattr(ia3.base_model.model, flag)
    want = ia3_bnb.Linear4bit if case == "nf4-dq" else ia3_bnb.Linear8bitLt
    assert sum(type(m) is want for m in ia3.modules()) == 6  # llama defaults: k, v, down in 2 layers
    with pytest.raises(ValueError, match="cannot be merged"):  # no flag to refuse early: the layers refuse
        ia3.merge_and_unload()


def test_eval_train_eval_on_cpu_never_rewrites_the_storage(tiny_dir):
    fresh = load_quantized(tiny_dir, "nf4-dq")
    model = peftfast.get_peft_model(load_quantized(tiny_dir, "nf4-dq"), peftfast.LoraConfig(**lora_kwargs()))
    randomise(model)
    ids = torch.randint(0, 101, (2, 9))
    logits = []
    for mode in ("eval", "train", "eval", "train"):
        if mode == "eval":
            with torch.no_grad():
                logits.append(model.eval()(input_ids=ids).logits)
        else:
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            assert torch.isfinite(loss)
    assert torch.equal(logits[0], logits[1])
    for name, module in fresh.named_modules():
        if lora_bnb.quantized_kind(module):
            layer = model.base_model.model.get_submodule(name)
            assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
            assert torch.equal(layer.weight.data, module.weight.data)


def test_untargeted_4bit_layers_keep_their_gradient_path_after_an_eval_pass(tiny_dir):
    # bnb's CPU repack (an eval forward without grad) turns a Linear4bit into an inference-only op: in
    # training its output no longer carries a gradient to its input. Untargeted layers still run bnb's own
    # forward, so prepare_model_for_kbit_training switches the repack off for every Linear4bit.
    def prepared():
        model = peftfast.prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4-dq"))
        return peftfast.get_peft_model(model, peftfast.LoraConfig(**lora_kwargs(target_modules=["q_proj"])))

    evaluated, fresh = prepared(), prepared()
    randomise(evaluated)
    copy_adapters(evaluated, fresh)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        evaluated.eval()(input_ids=ids)
    (_, loss_a, grads_a), (_, loss_b, grads_b) = train_step(evaluated, ids), train_step(fresh, ids)
    assert torch.equal(loss_a, loss_b)
    for name in grads_b:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights for CPU "
                    "inference only on CPUs with AVX512-BF16")
def test_base_repacked_by_bitsandbytes_before_wrapping_is_read_back(tiny_dir):
    # Running the quantised model in eval mode without grad makes bnb rewrite every Linear4bit into its
    # CPU layout with bf16-rounded scales. Wrapping it afterwards must read that storage correctly.
    fresh = load_quantized(tiny_dir, "nf4-dq")
    model = load_quantized(tiny_dir, "nf4-dq").eval()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        model(input_ids=ids)
    names = [n for n, m in model.named_modules() if lora_bnb.quantized_kind(m)]
    assert all(model.get_submodule(n).weight.quant_state.packing_format_for_cpu for n in names)
    lora = peftfast.get_peft_model(model, peftfast.LoraConfig(**lora_kwargs()))
    randomise(lora)
    with pytest.warns(UserWarning, match="CPU layout"):
        _, loss, grads = train_step(lora, ids)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    for name in names:
        layer = lora.base_model.model.get_submodule(name)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        p0 = packed4bit_from_bnb(fresh.get_submodule(name))
        scales = decode_absmax(p0).to(torch.bfloat16).float()  # what bnb's repack kept
        p_expected = Packed4bit(p0.data, scales, p0.code, p0.blocksize, p0.shape, torch.float32)
        expected = dequantize_4bit(p_expected)
        assert torch.equal(layer.dequantized_weight(), expected), name


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, "off"])
def test_prepare_model_for_kbit_training_matches_peft(tiny_dir, kwargs):
    def prepare(lib):
        # bf16 norms, embeddings and head: the upcast to fp32 has work to do
        model = load_quantized(tiny_dir, "nf4-dq", dtype=torch.bfloat16)
        if kwargs == "off":
            return lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return lib.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=kwargs)

    ours, theirs = prepare(peftfast), prepare(peft)
    assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.dtype, p.requires_grad) for n, p in theirs.named_parameters()]
    assert any(p.dtype == torch.float32 for p in ours.parameters())  # the upcast happened
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing == (kwargs != "off")
    ids = torch.randint(0, 101, (1, 4))
    assert ours.get_input_embeddings()(ids).requires_grad == theirs.get_input_embeddings()(ids).requires_grad


def test_cast_mixed_precision_params_matches_peft_and_keeps_quantised_storage(tiny_dir):
    def wrapped(lib, model):
        return lib.get_peft_model(model, lib.LoraConfig(**lora_kwargs()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = wrapped(peftfast, LlamaForCausalLM.from_pretrained(tiny_dir))
        theirs = wrapped(peft, LlamaForCausalLM.from_pretrained(tiny_dir))
    peftfast.cast_mixed_precision_params(ours, torch.float16)
    peft.cast_mixed_precision_params(theirs, torch.float16)
    dtypes = [[(n, p.dtype) for n, p in m.named_parameters()] for m in (ours, theirs)]
    assert dtypes[0] == dtypes[1]

    # On a quantised model the packed storage is not a float value and must not be converted (PEFT's
    # version converts a bf16 quant_storage numerically, which scrambles the packed bytes).
    for case, extra in (("nf4-dq", dict(bnb_4bit_quant_storage=torch.bfloat16)), ("int8", {})):
        model = wrapped(peftfast, load_quantized(tiny_dir, case, **extra))
        before = {n: exact_weight(m) for n, m in model.named_modules() if lora_bnb.quantized_kind(m)}
        peftfast.cast_mixed_precision_params(model, torch.float16)
        for name, weight in before.items():
            assert torch.equal(exact_weight(model.get_submodule(name)), weight), name
        assert all(p.dtype == torch.float32 for p in trainable(model).values())


# ------------------------------------------------------------------------------------------- layer-level

N_OUT, K_IN, RANK = 113, 203, 7
LAYER_CASES = {
    "nf4-dq-u8-fp32": dict(quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8,
                           compute_dtype=torch.float32, x_dtype=torch.float32),
    "fp4-bf16storage-bf16": dict(quant_type="fp4", compress_statistics=False, quant_storage=torch.bfloat16,
                                 compute_dtype=torch.bfloat16, x_dtype=torch.float32),
    "nf4-dq-f16storage-fp16": dict(quant_type="nf4", compress_statistics=True, quant_storage=torch.float16,
                                   compute_dtype=torch.float16, x_dtype=torch.float16),
    "int8-fp32": dict(x_dtype=torch.float32),
    "int8-bf16": dict(x_dtype=torch.bfloat16),
}


def make_base(case: str) -> torch.nn.Module:
    spec = dict(LAYER_CASES[case])
    spec.pop("x_dtype")
    if case.startswith("int8"):
        layer = bnb.nn.Linear8bitLt(K_IN, N_OUT, bias=True, has_fp16_weights=False, threshold=6.0)
    else:
        layer = bnb.nn.Linear4bit(K_IN, N_OUT, bias=True, **spec)
    with torch.no_grad():
        layer.bias.normal_()
    return layer.to("cpu").train()  # quantised on the move


def make_lora(base: torch.nn.Module, cls=None) -> torch.nn.Module:
    cls = cls or (lora_bnb.Linear4bit if lora_bnb.quantized_kind(base) == "4bit" else lora_bnb.Linear8bitLt)
    layer = cls(base, "default", r=RANK, lora_alpha=2 * RANK)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    return layer


def peft_lora(base: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    from peft.tuners.lora import bnb as peft_bnb

    cls = peft_bnb.Linear4bit if lora_bnb.quantized_kind(base) == "4bit" else peft_bnb.Linear8bitLt
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK)
    layer = cls(base, "default", config=config, r=RANK, lora_alpha=2 * RANK)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            getattr(layer, name)["default"].weight.copy_(getattr(ours, name)["default"].weight)
    return layer


def layer_step(layer, x, g):
    """Output and gradients (x, A, B, bias) for the upstream gradient g, in float64."""
    x = x.detach().clone().requires_grad_(True)
    base = layer.get_base_layer()
    base.bias.requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y.float() * g).sum().backward()
    params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, base.bias)
    return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in params]


def exact_layer_step(layer, x, g):
    w = exact_weight(layer.get_base_layer()).requires_grad_(False)
    a, b = (getattr(layer, n)["default"].weight.detach().double().requires_grad_(True)
            for n in ("lora_A", "lora_B"))
    bias = layer.get_base_layer().bias.detach().double().requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    y = x @ w.T + bias + layer.scaling["default"] * (x @ a.T) @ b.T
    (y * g.double()).sum().backward()
    return [y.detach(), x.grad, a.grad, b.grad, bias.grad]


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_forward_and_gradients_match_float64(case):
    ours = make_lora(make_base(case))
    theirs = peft_lora(copy.deepcopy(ours.get_base_layer()), ours)
    dtype = LAYER_CASES[case]["x_dtype"]
    x = torch.randn(3, 5, K_IN).to(dtype)
    g = torch.randn(3, 5, N_OUT)
    got, ref, exact = layer_step(ours, x, g), layer_step(theirs, x, g), exact_layer_step(ours, x, g)
    assert got[0].dtype == ref[0].dtype and got[0].shape == (3, 5, N_OUT)
    compute = getattr(ours.get_base_layer(), "compute_dtype", None) or dtype
    floor_dtype = max((dtype, compute), key=eps)
    for what, o, t, e in zip(("y", "dx", "dA", "dB", "dbias"), got, ref, exact):
        err_o, err_t = (o - e).abs().max().item(), (t - e).abs().max().item()
        floor = eps(floor_dtype) * e.abs().max().item()
        assert err_o <= K_ERR * max(err_t, floor), f"{case} {what}: {err_o:.3e} vs PEFT {err_t:.3e}"


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "feedforward"])
@pytest.mark.parametrize("case", ["nf4-dq-u8-fp32", "fp4-bf16storage-bf16", "int8-fp32"])
def test_ia3_layer_forward_and_gradients_match_float64(case, feedforward):
    from peft.tuners.ia3 import bnb as peft_ia3_bnb

    kind = "4bit" if not case.startswith("int8") else "8bit"
    config = peftfast.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    ours = (ia3_bnb.Linear4bit if kind == "4bit" else ia3_bnb.Linear8bitLt)(
        make_base(case), "default", config=config, is_feedforward=feedforward)
    theirs = (peft_ia3_bnb.Linear4bit if kind == "4bit" else peft_ia3_bnb.Linear8bitLt)(
        copy.deepcopy(ours.get_base_layer()), "default", config=peft.IA3Config(
            target_modules=["proj"], feedforward_modules=["proj"] if feedforward else []),
        is_feedforward=feedforward)
    with torch.no_grad():
        ours.ia3_l["default"].copy_(1 + 0.3 * torch.randn_like(ours.ia3_l["default"]))
        theirs.ia3_l["default"].copy_(ours.ia3_l["default"])
    x = torch.randn(3, 5, K_IN, dtype=LAYER_CASES[case]["x_dtype"])
    g = torch.randn(3, 5, N_OUT)

    def step(layer):
        xr = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(xr)
        (y.float() * g).sum().backward()
        return [y.detach().double(), xr.grad.double(), layer.ia3_l["default"].grad.double()]

    w = exact_weight(ours.get_base_layer())
    bias = ours.get_base_layer().bias.detach().double()
    xe = x.double().requires_grad_(True)
    le = ours.ia3_l["default"].detach().double().flatten().requires_grad_(True)
    ye = (xe * le) @ w.T + bias if feedforward else (xe @ w.T + bias) * le
    (ye * g.double()).sum().backward()
    compute = getattr(ours.get_base_layer(), "compute_dtype", None) or x.dtype
    floor_dtype = max((x.dtype, compute), key=eps)
    for what, o, t, e in zip(("y", "dx", "dl"), step(ours), step(theirs), (ye.detach(), xe.grad, le.grad)):
        e = e.reshape(o.shape)
        err_o, err_t = (o - e).abs().max().item(), (t - e).abs().max().item()
        floor = eps(floor_dtype) * e.abs().max().item()
        assert err_o <= K_ERR * max(err_t, floor), f"{case} {what}: {err_o:.3e} vs PEFT {err_t:.3e}"


@pytest.mark.parametrize("case", ["nf4-dq-u8-fp32", "int8-fp32"])
def test_no_dequantised_weight_is_saved_for_backward(case):
    layer = make_lora(make_base(case))
    x = torch.randn(3, 5, K_IN, requires_grad=True)
    y, saved = record_saved(lambda: layer(x))
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= N_OUT * K_IN]
    assert not big, f"a weight-sized tensor was saved for backward: {big}"

    measured = measure_saved_bytes(layer, lambda: layer(x).sum())
    base = layer.get_base_layer()
    if case.startswith("int8"):
        metadata = int8_from_bnb(base)[1].nbytes
    else:
        p = packed4bit_from_bnb(base)
        metadata = sum(t.nbytes for t in (p.absmax, p.code, p.nested_absmax, p.nested_code) if t is not None)
    activations = x.nbytes + x[..., 0].numel() * RANK * 4  # x and its rank-r projection (adapter grads)
    assert measured.total <= activations + metadata + 64, measured.as_row()
    assert measured.total < N_OUT * K_IN * 2, "less than even a 16-bit copy of the weight"
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def requantised_like(layer, weight: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes itself stores for ``weight`` with the layer's settings, dequantised exactly."""
    base = layer.get_base_layer()
    if lora_bnb.quantized_kind(base) == "8bit":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        return cb.double() * scb.double()[:, None] / 127
    state = base.weight.quant_state
    data, fresh = bnb.functional.quantize_4bit(weight.to(state.dtype), blocksize=state.blocksize,
                                               compress_statistics=state.nested, quant_type=state.quant_type,
                                               quant_storage=base.weight.dtype)
    return bnb.functional.dequantize_4bit(data, fresh).double()


@pytest.mark.parametrize("case", ["nf4-dq-u8-fp32", "fp4-bf16storage-bf16", "int8-fp32"])
def test_merge_and_unmerge_requantise_with_the_layer_settings(case):
    layer = make_lora(make_base(case))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)  # a delta as large as the weight itself
    x = torch.randn(4, K_IN)
    base = layer.get_base_layer()
    def settings():
        if case.startswith("int8"):
            return base.weight.dtype, base.weight.shape
        state = base.weight.quant_state
        return (base.weight.dtype, base.weight.shape, state.quant_type, state.blocksize, state.nested,
                state.dtype)

    before = settings()
    with torch.no_grad():
        adapted = layer(x).double()
    w0, w0_fp32 = exact_weight(base), layer.dequantized_weight()
    # the fp32 weight merging starts from is what the layer stands for (exactly, or to 1 ulp for int8)
    assert ((w0_fp32.double() - w0).abs() <= eps(torch.float32) * w0.abs()).all()
    delta_fp32 = layer.get_delta_weight("default")
    delta = delta_fp32.double()

    with pytest.warns(UserWarning, match="requantises"):
        layer.merge()
    assert layer.merged and settings() == before
    w1, w1_fp32 = exact_weight(layer.get_base_layer()), layer.dequantized_weight()
    assert torch.equal(w1, requantised_like(layer, w0_fp32 + delta_fp32))
    with torch.no_grad():
        merged = layer(x).double()
    # the merged output differs from the adapter's by the requantisation error E only: |E| @ |x| plus
    # fp32 rounding of the two products (gamma_K bound)
    err = w1 - (w0 + delta)
    slack = 2 * K_IN * eps(torch.float32) * (x.double().abs() @ (w0.abs() + delta.abs()).T)
    assert ((merged - adapted).abs() <= x.double().abs() @ err.abs().T + slack).all()
    assert err.abs().max() > 0  # (a requantisation that changed nothing would make this test vacuous)

    with pytest.warns(UserWarning, match="requantises"):
        layer.unmerge()
    assert not layer.merged and settings() == before
    w2 = exact_weight(layer.get_base_layer())
    assert torch.equal(w2, requantised_like(layer, w1_fp32 - delta_fp32))
    with torch.no_grad():
        unmerged = layer(x).double()
    err2 = w2 - (w1 - delta)
    assert ((unmerged - adapted).abs() <= x.double().abs() @ (err.abs() + err2.abs()).T + 2 * slack).all()


@pytest.mark.parametrize("case", ["nf4-dq-u8-fp32", "int8-fp32"])
def test_safe_merge_refuses_non_finite_and_leaves_the_weight(case):
    layer = make_lora(make_base(case))
    with torch.no_grad():
        layer.lora_B["default"].weight[3, 2] = float("inf")
    data = layer.get_base_layer().weight.data.clone()
    with pytest.raises(ValueError, match="NaNs detected"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.get_base_layer().weight.data, data)
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.check_merge()


def test_disabled_and_mixed_batch_use_the_quantised_path():
    base = make_base("nf4-dq-u8-fp32")
    layer = make_lora(base)
    layer.update_layer("other", 3, 5.0, 0.0, init_lora_weights=True)
    with torch.no_grad():
        layer.lora_B["other"].weight.normal_()
    x = torch.randn(4, 6, K_IN)
    with torch.no_grad():
        plain = base(x)  # bnb's own forward (train mode: no CPU repack)
        layer.set_adapter(["default"])
        y_default = layer(x)
        layer.set_adapter(["other"])
        y_other = layer(x)
        layer.enable_adapters(False)
        disabled = layer(x)
        layer.enable_adapters(True)
        layer.eval()
        mixed = layer(x, adapter_names=["default", "__base__", "other", "default"])
    tol = 8 * K_IN * eps(torch.float32) * (x.abs() @ exact_weight(base).float().abs().T)
    assert ((disabled - plain).abs() <= tol).all()
    # the same math on a sub-batch (fp32 rounding may differ with the batch size)
    for row, want in ((0, y_default), (1, disabled), (2, y_other), (3, y_default)):
        torch.testing.assert_close(mixed[row], want[row])
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("case", ["nf4-dq-u8-fp32", "int8-fp32"])
def test_hooks_on_the_base_layer_still_run(case):
    # A hook on the quantised base (a user's, or accelerate's) needs the module to be called: the layer
    # then falls back to bitsandbytes' own forward, still without letting it repack the storage.
    base = make_base(case)
    layer = make_lora(base)
    x = torch.randn(2, 3, K_IN)
    with torch.no_grad():
        fused = layer(x)
    seen = []
    handle = base.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    layer.eval()
    with torch.no_grad():
        hooked = layer(x)
    handle.remove()
    assert seen == [(2, 3, N_OUT)]
    if case.startswith("int8"):
        return  # bnb's int8 eval path quantises the activations: another function
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    tol = 8 * K_IN * eps(torch.float32) * (x.abs() @ exact_weight(base).float().abs().T)
    assert ((hooked - fused).abs() <= tol).all()
