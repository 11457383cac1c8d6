"""Mixed batches of many LoRA adapters (``adapter_names``): the grouped path (kernels/lora_grouped.py,
tuners/lora/grouped.py) against running each sample alone with its adapter, and against float64.

Inference and training (each sample's loss reaches only its own adapter), 1 / 3 / 17 adapters with ranks
1 / 8 / 64 mixed, adapters no sample uses (empty segments), odd feature sizes, per-token names, bad input.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftfast as fast
from peftfast import zoo
from peftfast.kernels.lora_grouped import group_plan, lora_grouped
from peftfast.utils import routing
from tests.conftest import select_backend
from tests.numerics import assert_matches_float64

RANKS = (1, 8, 64)
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set")


class Net(nn.Module):
    """Embedding -> Linear -> Conv1D (transformers', fan_in_fan_out) -> Linear, odd sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(29, 13)
        self.lin0 = nn.Linear(13, 17)
        self.c1d = Conv1D(11, 17)  # nf=11 outputs, nx=17 inputs
        self.lin1 = nn.Linear(11, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.c1d(torch.tanh(self.lin0(self.emb(ids))))))


def make_model(n: int, dtype=torch.float32, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    base = Net().to(dtype)
    names = [f"a{i}" for i in range(n)]
    pm = None
    for i, name in enumerate(names):
        cfg = fast.LoraConfig(r=RANKS[i % 3], lora_alpha=2 + i, target_modules=["emb", "lin0", "c1d", "lin1"],
                              fan_in_fan_out=False, lora_dropout=dropout)
        if pm is None:
            pm = fast.get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn_like(p) * 0.3)  # B non-zero: every adapter changes the output
    for pname, p in pm.named_parameters():
        p.requires_grad_("lora_" in pname)
    return pm, names


def alone_outputs(pm, ids, names, run=lambda pm, ids: pm(ids)):
    """Each sample run alone (``run(pm, its ids)``) with its adapter active (or adapters disabled for '__base__')."""
    outs = []
    for i, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                outs.append(run(pm, ids[i:i + 1]))
        else:
            pm.base_model.set_adapter(name)
            outs.append(run(pm, ids[i:i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("n,batch", [(1, 3), (3, 5), (17, 11)])
def test_mixed_batch_equals_each_sample_alone(n, batch):
    pm, names = make_model(n)
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 29, (batch, 6), generator=g)
    choice = names + ["__base__"]
    per_sample = [choice[int(i)] for i in torch.randint(0, len(choice), (batch,), generator=g)]
    per_sample[0] = names[-1]
    pm.eval()
    with torch.no_grad():
        mixed = pm(ids, adapter_names=per_sample)
        alone = alone_outputs(pm, ids, per_sample)
        pm64, _ = make_model(n, torch.float64)
        pm64.eval()
        ref = alone_outputs(pm64, ids, per_sample)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    # against float64: no further from it than running each sample alone in fp32 (a few roundings)
    assert_matches_float64("mixed", mixed, alone, ref, k=4)


@pytest.mark.parametrize("n,batch", [(3, 5), (4, 4)])
def test_long_samples_mixed_batch_and_training(n, batch):
    """Samples of at least the stores' rank in tokens take the CPU run plan: outputs equal each sample alone and
    float64, and training gradients equal each adapter trained alone on its samples; also with batch == number
    of adapters but samples not in adapter order, and with a '__base__' sample (back to the dense plan)."""
    pm, names = make_model(n)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 29, (batch, 67), generator=g)  # 67 tokens >= the stores' rank 64
    per_sample = [names[(i * 2 + 1) % n] for i in range(batch)]
    for names_now in (per_sample, per_sample[:-1] + ["__base__"]):
        pm.eval()
        with torch.no_grad():
            mixed = pm(ids, adapter_names=names_now)
            alone = alone_outputs(pm, ids, names_now)
            pm64, _ = make_model(n, torch.float64)
            pm64.eval()
            ref = alone_outputs(pm64, ids, names_now)
        torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
        assert_matches_float64("mixed", mixed, alone, ref, k=4)
    pm.train()
    pm.base_model.train_mixed_batches = True
    params = {k: p for k, p in pm.named_parameters() if p.requires_grad}
    pm(ids, adapter_names=per_sample).pow(2).sum().backward()
    got = {k: p.grad.clone() for k, p in params.items()}
    want = {k: torch.zeros_like(p) for k, p in params.items()}
    for i, name in enumerate(per_sample):
        pm.zero_grad()
        pm.base_model.set_adapter(name)
        pm(ids[i:i + 1]).pow(2).sum().backward()
        for k, p in params.items():
            if p.grad is not None:
                want[k] += p.grad
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)


def test_store_follows_adapter_changes():
    """Adding, deleting, reloading (in-place writes) and rescaling adapters between mixed calls: the stacked
    store follows, outputs equal each sample alone."""
    pm, names = make_model(3)
    pm.eval()
    ids = torch.randint(0, 29, (4, 5))
    per_sample = ["a0", "a2", "__base__", "a1"]
    with torch.no_grad():
        pm(ids, adapter_names=per_sample)
        pm.add_adapter("new", fast.LoraConfig(r=5, lora_alpha=3, target_modules=["lin0", "lin1"]))
        for pname, p in pm.named_parameters():
            if ".new." in pname:
                p.copy_(torch.randn_like(p))
        pm.delete_adapter("a2")
        layer = pm.base_model.model.lin0
        layer.lora_B["a1"].weight.mul_(-2.0)  # an in-place write, as load_adapter / an optimizer step does
        layer.set_scale("a0", 0.5)
        names2 = ["a0", "new", "__base__", "a1"]
        mixed = pm(ids, adapter_names=names2)
        alone = alone_outputs(pm, ids, names2)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)



def test_store_reuses_its_bundle_until_a_weight_changes():
    """A layer's mixed calls reuse the adapters' bundle while nothing it reads changes (``_plain_adapters_key``);
    each change between calls is seen: a factor written in place (an optimizer step), a factor's ``.data``
    replaced by new values of the same shape, a factor replaced by a new Parameter, a scaling changed. Outputs
    equal each sample alone after each change."""
    pm, names = make_model(3)
    pm.eval()
    ids = torch.randint(0, 29, (4, 5))
    per_sample = ["a0", "a2", "__base__", "a1"]
    layer = pm.base_model.model.lin0
    with torch.no_grad():
        first = pm(ids, adapter_names=per_sample)
        bundle = layer._grouped_store.bundle[1]
        assert bundle is not None
        assert torch.equal(pm(ids, adapter_names=per_sample), first)
        assert layer._grouped_store.bundle[1] is bundle  # reused, not rebuilt

        def new_parameter():
            layer.lora_B["a1"].weight = nn.Parameter(torch.randn_like(layer.lora_B["a1"].weight))

        changes = {
            "in place": lambda: layer.lora_A["a2"].weight.add_(0.7),
            ".data replaced": lambda: setattr(layer.lora_B["a0"].weight, "data",
                                              torch.randn_like(layer.lora_B["a0"].weight)),
            "new Parameter": new_parameter,
            "scaling": lambda: layer.set_scale("a1", 0.25),
        }
        before = first
        for what, change in changes.items():
            change()
            mixed = pm(ids, adapter_names=per_sample)
            assert not torch.allclose(mixed, before), what  # the change shows in the output
            torch.testing.assert_close(mixed, alone_outputs(pm, ids, per_sample), rtol=1e-5, atol=1e-5, msg=what)
            before = mixed


@pytest.mark.parametrize("hooked", [False, True])
def test_mixed_batch_adds_into_the_fresh_base_output_only(monkeypatch, hooked):
    """Without autograd, a plain nn.Linear base's output (fresh, seen by no one else) is updated in place, as PEFT's
    loop does; a base with a forward hook (which may keep its output) gets a new tensor: what the hook kept is
    the base output, unchanged. Outputs equal each sample alone either way."""
    pm, names = make_model(3)
    pm.eval()
    ids = torch.randint(0, 29, (4, 5))
    per_sample = ["a0", "a2", "__base__", "a1"]
    layer = pm.base_model.model.lin1
    kept = []
    if hooked:
        layer.base_layer.register_forward_hook(lambda mod, args, out: kept.append((out, out.clone())))
    base_outputs = []
    linear = torch.nn.functional.linear

    def recording_linear(*args, **kwargs):
        out = linear(*args, **kwargs)
        base_outputs.append(out)
        return out

    with torch.no_grad():
        alone = alone_outputs(pm, ids, per_sample)
        monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
        mixed = pm(ids, adapter_names=per_sample)
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    lin1_out = base_outputs[-1]  # lin1 is the last layer: its output is the model's
    assert (mixed.data_ptr() == lin1_out.data_ptr()) == (not hooked)
    for out, copy in kept:
        assert torch.equal(out, copy)

@pytest.mark.parametrize("n", [3, 17])
def test_training_gradients_equal_each_adapter_alone(n):
    """Several adapters trained on one mixed batch: each adapter's gradients equal training it alone on its
    samples (the loss is a sum over samples), other adapters' gradients zero where they have no sample."""
    check_training_gradients(n)


def test_training_gradients_on_the_triton_kernels(triton_backend, monkeypatch):
    """The same on the Triton backend (interpreter): the grouped forward and backward kernels in a model (the
    base layers' fresh outputs updated in place under autograd); the reference backward never runs."""
    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels.backend import interpreting

    if not interpreting():
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    calls = []
    monkeypatch.setattr(G, "backward_reference", lambda *a, **k: calls.append(1))
    real = G.backward_triton
    monkeypatch.setattr(G, "backward_triton", lambda *a: calls.append(0) or real(*a))
    check_training_gradients(3)
    assert calls and set(calls) == {0}


def check_training_gradients(n):
    pm, names = make_model(n)
    pm.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        pm(torch.randint(0, 29, (2, 4)), adapter_names=[names[0], "__base__"])  # PEFT's rule by default
    pm.base_model.train_mixed_batches = True
    batch = 7
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 29, (batch, 4), generator=g)
    per_sample = [names[i % min(n, 3)] for i in range(batch)]
    per_sample[2] = "__base__"
    weight = torch.randn(batch, 4, 7, generator=g)
    check_mixed_grads_equal_alone(pm, names, per_sample, ids, weight)


def check_mixed_grads_equal_alone(pm, names, per_sample, inputs, weight, params=None, tol=None, own_count=None,
                                  nonzero=False) -> dict:
    """One mixed batch (``per_sample`` names over the samples of ``inputs``, loss sum(out * weight)): each adapter's
    gradients equal training it alone on its samples, adapters without samples get none. ``params``: the
    parameters to differentiate (default: those requiring grad); ``tol(r)``: assert_close's keywords for the
    reference gradient r (default rtol 1e-4, atol 1e-5); ``own_count``: parameters per adapter; ``nonzero``: every
    reference gradient is non-zero."""
    params = {k: p for k, p in pm.named_parameters() if p.requires_grad} if params is None else params
    out = pm(inputs, adapter_names=per_sample)
    grads = dict(zip(params, torch.autograd.grad((out.float() * weight).sum(), list(params.values()),
                                                 allow_unused=True)))
    for name in names:
        rows = [i for i, s in enumerate(per_sample) if s == name]
        own = {k: p for k, p in params.items() if f".{name}." in k or k.endswith(f".{name}")}
        assert own_count is None or len(own) == own_count, (name, list(own))
        if not rows:
            assert all(grads[k] is None or not grads[k].any() for k in own), name
            continue
        pm.base_model.set_adapter(name)
        for p in own.values():
            p.requires_grad_(True)
        ref = torch.autograd.grad((pm(inputs[rows]).float() * weight[rows]).sum(), list(own.values()))
        for (k, _), r in zip(own.items(), ref):
            torch.testing.assert_close(grads[k], r, msg=k, **(dict(rtol=1e-4, atol=1e-5) if tol is None else tol(r)))
            assert not nonzero or r.abs().max() > 0, k
    return grads


def train_mixed(pm, names) -> dict:
    """``pm`` in training with mixed batches allowed and every adapter of ``names`` trainable: its LoRA parameters."""
    pm.train()
    pm.base_model.train_mixed_batches = True
    for name in names:
        pm.base_model.set_adapter(name)
    params = {k: p for k, p in pm.named_parameters() if "lora_" in k}
    for p in params.values():
        p.requires_grad_(True)
    return params


def test_training_dropout_per_adapter_masks_rows():
    """lora_dropout in training: a mixed batch still runs (one mask per row with its adapter's p), and an
    adapter with p close to 1 differs from its eval output while a sample of the base model does not."""
    pm, names = make_model(2, dropout=0.5)
    pm.base_model.train_mixed_batches = True
    ids = torch.randint(0, 29, (4, 3))
    per_sample = ["a0", "a1", "__base__", "a0"]
    pm.train()
    torch.manual_seed(0)
    tr = pm(ids, adapter_names=per_sample)
    pm.eval()
    ev = pm(ids, adapter_names=per_sample)
    assert torch.equal(tr[2], ev[2])
    assert (tr[0] - ev[0]).abs().max() > 1e-3


def test_per_token_adapter_names():
    """One adapter name per token on linear layers: each token as if its sample used that token's adapter."""
    pm, names = make_model(3)
    pm.eval()
    lin = pm.base_model.model.lin0
    x = torch.randn(2, 3, 13)
    per_token = [["a0", "a1", "__base__"], ["a2", "a2", "a0"]]
    with torch.no_grad():
        got = lin(x, adapter_names=per_token)
        for b in range(2):
            for t in range(3):
                name = per_token[b][t]
                if name == "__base__":
                    want = lin.base_layer(x[b, t])
                else:
                    lin.set_adapter(name)
                    want = lin(x[b, t][None])[0]
                torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-5)


def test_per_token_adapter_names_through_modules_to_save():
    """Per-token names on a model whose last linear layer is in ``modules_to_save`` (each adapter's copy of it, as
    for an LM head): each token's output is the one its sample gives with every token on that token's adapter (the
    model works token by token); before, the wrapper took the lists for names and failed ('unhashable type')."""
    torch.manual_seed(0)
    pm = None
    for i, name in enumerate(("a0", "a1")):
        cfg = fast.LoraConfig(r=2 + i, target_modules=["lin0", "c1d"], modules_to_save=["lin1"],
                              fan_in_fan_out=False, init_lora_weights=False)
        pm = fast.get_peft_model(Net(), cfg, adapter_name=name) if pm is None else pm.add_adapter(name, cfg) or pm
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "modules_to_save" in pname:
                p.add_(torch.randn_like(p))  # each adapter's copy of lin1 differs from the original
    pm.eval()
    ids = torch.randint(0, 29, (3, 4), generator=torch.Generator().manual_seed(1))
    per_token = [["a0", "a1", "__base__", "a0"], ["a1", "a1", "a1", "a1"], ["__base__", "a0", "a1", "a0"]]
    with torch.no_grad():
        got = pm(ids, adapter_names=per_token)
        each = {n: pm(ids, adapter_names=[[n] * 4] * 3) for n in ("a0", "a1", "__base__")}
    want = torch.stack([torch.stack([each[per_token[b][t]][b, t] for t in range(4)]) for b in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(each["a0"], each["a1"])
    # a module that does not work token by token, or sees fewer tokens than the names, is refused clearly
    wrapper = pm.base_model.model.lin1
    from peftfast.utils.other import mixed_parts
    with pytest.raises(ValueError, match="per token"):
        mixed_parts(torch.randn(3, 2, 11), per_token, lambda n, part: part, wrapper.original_module, "lin1")


def test_mixed_batch_under_inference_mode_then_in_any_mode():
    """A mixed call under torch.inference_mode(): the plan and the stacked store it makes and keeps are plain
    tensors, so it runs (an inference tensor has no version counter: the call failed) and later calls of the same
    names under no_grad and in training (gradients through the kept plan and store) still equal each sample alone."""
    pm = _mixed_llama(0.0).eval()
    ids = torch.randint(3, zoo.VOCAB, (4, 5), generator=torch.Generator().manual_seed(2))
    names = ["a2", "__base__", "a0", "a1"]
    with torch.no_grad():
        alone = _llama_alone(pm, ids, names)
    with torch.inference_mode():
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=names).logits, alone, rtol=1e-5, atol=1e-5)
        pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=2, do_sample=False)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=names).logits, alone, rtol=1e-5, atol=1e-5)
    pm.train()
    out = pm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(out.detach(), alone, rtol=1e-5, atol=1e-5)
    out.pow(2).mean().backward()
    grads = _lora_grads(pm)
    assert grads and all(g.abs().sum() > 0 for k, g in grads.items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------------------
# the op on its own
# ------------------------------------------------------------------------------------------------------
def op_case(n, m, k, o, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, k, generator=g).to(dtype).requires_grad_() for r in ranks]
    b = [torch.randn(o, r, generator=g).to(dtype).requires_grad_() for r in ranks]
    scal = [0.25 + i for i in range(n)]
    index = torch.randint(-1, max(1, n - 2), (m,), generator=g)  # the last adapters unused: empty segments
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    base = torch.randn(m, o, generator=g).to(dtype).requires_grad_()
    return a, b, scal, index, x, base


def stacked_store(a, b, scal):
    r = 1 << (max(w.shape[0] for w in a) - 1).bit_length()
    st_a = torch.zeros(len(a), r, a[0].shape[1], dtype=a[0].dtype)
    st_b = torch.zeros(len(a), b[0].shape[0], r, dtype=a[0].dtype)
    for i, (wa, wb) in enumerate(zip(a, b)):
        st_a[i, :wa.shape[0]] = wa.detach()
        st_b[i, :, :wb.shape[1]] = wb.detach()
    return st_a, st_b, torch.tensor(scal, dtype=torch.float32)


def loop_reference(x, base, a, b, scal, index, masks=None, ps=None):
    """Each adapter alone on its rows; with ``masks`` (one [M, K] keep mask per adapter) and ``ps``, the inverted
    dropout of training that adapter alone with those masks."""
    out = base.clone()
    for i in range(len(a)):
        rows = (index == i).nonzero().flatten()
        xi = x[rows] if masks is None else x[rows] * masks[i][rows].to(x.dtype) / (1.0 - ps[i])
        out = out.index_add(0, rows, (xi @ a[i].T) @ b[i].T * scal[i])
    return out


def run_op_case(n, m, k, o, ranks, ps=None, fresh_base=False, run=None):
    """lora_grouped (whatever backend is selected) vs a per-adapter loop in fp32 and float64: forward and
    every gradient; with dropout probabilities ``ps`` (one per adapter) the loop uses the masks regenerated
    from the op's seed (adapter i: stream i, x's row and column). ``run``: rows in runs of that many with one
    adapter each (a sample's tokens), passed to the op as a CPU run plan (``run_plan``)."""
    from peftfast.kernels import dropout as D
    from peftfast.kernels.lora_grouped import dropout_tables, make_plan

    a, b, scal, index, x, base = op_case(n, m, k, o, ranks, torch.float32)
    plan = None
    if run is not None:
        g = torch.Generator().manual_seed(m)
        index = torch.randint(0, n, (m // run,), generator=g).repeat_interleave(run)
        plan = make_plan(index, n, False, run=run, rank=1)
        assert torch.equal(plan[0].flatten(), torch.arange(m)), "not a run plan"
    masks = None
    # fresh_base: the op gets a fresh non-leaf output, as from a base layer (the Triton path updates it in place)
    base_in = base * 1.0 if fresh_base else base
    if ps is None:
        y = lora_grouped(x, base_in, a, b, *stacked_store(a, b, scal), index, plan=plan)
    else:
        st_a, st_b, _ = stacked_store(a, b, scal)
        scale, thresholds = dropout_tables(scal, ps, x.device)
        seed = int(D.draw_seed())
        y = lora_grouped(x, base_in, a, b, st_a, st_b, scale, index, plan=plan, thresholds=thresholds, seed=seed)
        masks = [D.keep_mask_torch(seed, i, m, k, p) for i, p in enumerate(ps)]
        assert any(not mk[index == i].all() for i, mk in enumerate(masks))  # something is dropped
    plain = loop_reference(x, base, a, b, scal, index, masks, ps)
    leaves = [x, base, *a, *b]
    d = [t.detach().double().requires_grad_() for t in leaves]
    ref = loop_reference(d[0], d[1], d[2:2 + n], d[2 + n:], scal, index, masks, ps)
    assert_matches_float64("y", y, plain, ref, k=8)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy)
    pl = torch.autograd.grad(plain, leaves, gy)
    rf = torch.autograd.grad(ref, d, gy.double())
    for i, (g1, g2, g3) in enumerate(zip(got, pl, rf)):
        assert_matches_float64(f"grad {i}", g1, g2, g3, k=8)


@pytest.mark.parametrize("n,m,k,o", [(1, 5, 7, 3), (3, 37, 23, 19), (17, 41, 13, 9)])
def test_op_reference_vs_float64(n, m, k, o):
    run_op_case(n, m, k, o, [RANKS[i % 3] for i in range(n)])


DROPOUT_PS = (0.3, 0.0, 0.6, 0.1)  # per adapter, cycled: one adapter without dropout among them


@pytest.mark.parametrize("n,m,k,o", [(1, 7, 9, 5), (3, 37, 23, 19), (17, 41, 13, 9)])
def test_op_dropout_reference_vs_float64(n, m, k, o):
    """Dropout inside the op: output and every gradient equal each adapter trained alone with the same masks
    (float64)."""
    run_op_case(n, m, k, o, [RANKS[i % 3] for i in range(n)], [DROPOUT_PS[i % 4] for i in range(n)])


@pytest.mark.parametrize("n,m,run", [(3, 35, 7), (17, 48, 16), (4, 36, 9)])
@pytest.mark.parametrize("dropout", [False, True])
def test_op_run_plan_vs_float64(n, m, run, dropout):
    """The CPU run plan (a block per run of rows, x and base_out used in place): output and every gradient
    against a per-adapter loop and float64; fewer, as many or more runs than adapters (run i is not adapter i)."""
    run_op_case(n, m, 23, 19, [RANKS[i % 3] for i in range(n)], [DROPOUT_PS[i % 4] for i in range(n)] if dropout
                else None, run=run)



@pytest.mark.parametrize("layout", ["run", "full", "empty"])
def test_op_update_base_out_without_grad(torch_backend, layout):
    """``update_base_out`` with no gradient recorded: a run plan, and a dense plan with no empty slot (every adapter
    the same row count, rows shuffled), add into base_out itself and return it, bit for bit what the op returns
    without it, and the per-adapter loop (float64); a plan with empty slots returns a new tensor and leaves
    base_out as it was; with autograd recording base_out is never written."""
    from peftfast.kernels.lora_grouped import make_plan

    n, m, k, o = 5, 40, 23, 19
    a, b, scal, _, x, base = op_case(n, m, k, o, [RANKS[i % 3] for i in range(n)], torch.float32)
    g = torch.Generator().manual_seed(3)
    if layout == "run":
        index = torch.randint(0, n, (m // 8,), generator=g).repeat_interleave(8)
        plan = make_plan(index, n, False, run=8, rank=1)
        assert torch.equal(plan[0].flatten(), torch.arange(m))
    elif layout == "full":
        index = (torch.arange(m) % n)[torch.randperm(m, generator=g)]
        plan = make_plan(index, n, False)
        assert plan[0].shape == (n, m // n) and not (plan[0] == m).any()  # one full block per adapter
    else:
        index = torch.randint(-1, n, (m,), generator=g)
        plan = make_plan(index, n, False)
        assert (plan[0] == m).any()
    stores = stacked_store(a, b, scal)
    with torch.no_grad():
        want = lora_grouped(x, base, a, b, *stores, index, plan=plan)
        fresh = base.detach().clone()
        got = lora_grouped(x, fresh, a, b, *stores, index, plan=plan, update_base_out=True)
    assert torch.equal(got, want)
    if layout == "empty":
        assert got is not fresh and torch.equal(fresh, base)
    else:
        assert got is fresh
    d = [t.detach().double() for t in (x, base, *a, *b)]
    ref = loop_reference(d[0], d[1], d[2:2 + n], d[2 + n:], scal, index)
    assert_matches_float64("y", got, loop_reference(x, base, a, b, scal, index).detach(), ref, k=8)
    fresh = base.detach().clone()
    y = lora_grouped(x, fresh, a, b, *stores, index, plan=plan, update_base_out=True)  # autograd recording
    assert y is not fresh and y.requires_grad and torch.equal(fresh, base) and torch.equal(y.detach(), want)

def test_run_plan_only_for_runs_of_one_adapter():
    from peftfast.kernels.lora_grouped import make_plan, run_plan

    index = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    table, badapter = run_plan(index, 3)
    assert torch.equal(table, torch.arange(12).view(4, 3)) and badapter.tolist() == [1, 0, 1, 2]
    assert run_plan(index, 4) is None  # runs of 4 mix adapters
    assert run_plan(torch.tensor([1, 1, -1, -1]), 2) is None  # a base sample: in no block
    assert run_plan(index, 5) is None  # 12 rows are not runs of 5
    # the choice: runs of at least the store's rank, never on the Triton path
    assert make_plan(index, 3, False, run=3, rank=4)[0].shape != (4, 3)
    assert make_plan(index, 3, True, run=3, rank=2)[0].shape != (4, 3)
    assert make_plan(index, 3, False, run=3, rank=2)[0].shape == (4, 3)


def test_group_plan_blocks():
    """Every non-base row in exactly one block slot of its adapter; base rows in none; no host sync needed."""
    index = torch.tensor([2, -1, 0, 2, 2, 0, -1, 2, 2])
    table, badapter = group_plan(index, 4, 2)
    assert table.shape == (4 + 5, 2)
    seen = {}
    for blk in range(table.shape[0]):
        for row in table[blk].tolist():
            if row < 9:
                assert row not in seen
                seen[row] = int(badapter[blk])
    assert seen == {i: int(a) for i, a in enumerate(index.tolist()) if a >= 0}


# ------------------------------------------------------------------------------------------------------
# a causal LM: forward and generate (prefill, then decode one token per sequence)
# ------------------------------------------------------------------------------------------------------
def _llama_with_adapters(n: int):
    from tests._models import tiny_llama

    pm = None
    names = [f"t{i}" for i in range(n)]
    for i, name in enumerate(names):
        cfg = fast.LoraConfig(r=RANKS[i % 3], lora_alpha=4 + i, target_modules=["q_proj", "v_proj", "o_proj",
                                                                               "down_proj"], task_type="CAUSAL_LM")
        pm = fast.get_peft_model(tiny_llama(), cfg, adapter_name=name) if pm is None else pm.add_adapter(name, cfg) or pm
    torch.manual_seed(1)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn_like(p) * 0.5)
    return pm.eval(), names


def test_causal_lm_generate_with_many_adapters():
    pm, names = _llama_with_adapters(5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, zoo.VOCAB, (6, 5), generator=g)
    mask = torch.ones_like(ids)
    per_sample = ["t4", "t0", "__base__", "t2", "t4", "t1"]
    gen = dict(do_sample=False, max_new_tokens=4)
    with torch.no_grad():
        mixed_logits = pm(input_ids=ids, attention_mask=mask, adapter_names=per_sample).logits
        mixed = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=per_sample, **gen)
        for i, name in enumerate(per_sample):
            one = dict(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
            if name == "__base__":
                with pm.disable_adapter():
                    logits, out = pm(**one).logits, pm.generate(**one, **gen)
            else:
                pm.set_adapter(name)
                logits, out = pm(**one).logits, pm.generate(**one, **gen)
            torch.testing.assert_close(mixed_logits[i], logits[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(mixed[i], out[0]), name
    assert len({tuple(r.tolist()) for r in mixed}) > 2  # the adapters change what is generated


# ------------------------------------------------------------------------------------------------------
# bad input: a clear error, the model unchanged
# ------------------------------------------------------------------------------------------------------
def _snapshot(pm):
    return {k: v.clone() for k, v in pm.state_dict().items()}, pm.active_adapters, pm.training


def _unchanged(pm, before):
    state, active, training = before
    now = pm.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in now)
    assert pm.active_adapters == active and pm.training == training


@pytest.mark.parametrize("names,match", [
    (["a0", "nope", "a1", "a0"], "unknown adapters \\['nope'\\]"),
    (["a0", "a1", "a0"], "3 entries for a batch of 4"),
    (["a0", "a1"], "2 entries for a batch of 4"),  # a divisor of the batch too (not repeated: PEFT refuses it)
    ("a0", "must be a non-empty list"),
    ([], "must be a non-empty list"),
    (["a0", 3, "a1", "a0"], "mixes names and other values"),
    ([["a0", "a1"], ["a0"]], "lengths \\[1, 2\\]"),
])
def test_bad_adapter_names_leave_model_unchanged(names, match):
    pm, _ = make_model(3)
    pm.eval()
    ids = torch.randint(0, 29, (4, 2))
    before = _snapshot(pm)
    with pytest.raises(ValueError, match=match):
        pm(ids, adapter_names=names)
    _unchanged(pm, before)
    pm(ids, adapter_names=["a0", "a1", "a2", "__base__"])  # still usable


def test_merged_and_dora_adapters_are_refused():
    pm, _ = make_model(2)
    pm.eval()
    ids = torch.randint(0, 29, (2, 2))
    pm.base_model.merge_adapter(["a0"])
    before = _snapshot(pm)
    with pytest.raises(ValueError, match="merged"):
        pm(ids, adapter_names=["a0", "a1"])
    _unchanged(pm, before)
    pm.base_model.unmerge_adapter()
    pm.add_adapter("d", fast.LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    before = _snapshot(pm)
    with pytest.raises(ValueError, match="DoRA"):
        pm(ids, adapter_names=["d", "a1"])
    _unchanged(pm, before)


def test_unmixable_method_is_refused():
    base = Net()
    pm = fast.get_peft_model(base, fast.LoHaConfig(r=2, target_modules=["lin0"]))
    pm.eval()
    before = _snapshot(pm)
    with pytest.raises(ValueError, match="adapter_names"):
        pm(torch.randint(0, 29, (2, 2)), adapter_names=["default", "__base__"])
    _unchanged(pm, before)


# ------------------------------------------------------------------------------------------------------
# bitsandbytes bases: 8-bit (Linear8bitLt) and 4-bit (Linear4bit)
# ------------------------------------------------------------------------------------------------------
# (base, activation dtype, backend); the Triton interpreter computes bf16 wrongly (raw uint16), so fp32 there
BNB_CASES = {"int8-fp32": ("int8", torch.float32, "default"), "int8-bf16": ("int8", torch.bfloat16, "default"),
             "nf4-fp32": ("nf4", torch.float32, "default"), "int8-fp32-triton": ("int8", torch.float32, "triton")}


def _bnb_model(kind: str, n: int = 3):
    """Two quantised linears (23 -> 37 -> 19, bias) with ``n`` LoRA adapters of ranks 1 / 8 / 64 (fp32, as PEFT
    creates them on a quantised base), B non-zero."""
    import bitsandbytes as bnb

    def linear(i, o):
        if kind == "int8":
            return bnb.nn.Linear8bitLt(i, o, bias=True, has_fp16_weights=False, threshold=6.0)
        return bnb.nn.Linear4bit(i, o, bias=True, quant_type="nf4", compute_dtype=torch.float32)

    class QNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0, self.l1 = linear(23, 37), linear(37, 19)

        def forward(self, x):
            return self.l1(torch.tanh(self.l0(x)))

    torch.manual_seed(0)
    base = QNet().to("cpu")  # quantised on the move
    names = [f"q{i}" for i in range(n)]
    pm = None
    for i, name in enumerate(names):
        cfg = fast.LoraConfig(r=RANKS[i % 3], lora_alpha=2 + i, target_modules=["l0", "l1"])
        pm = fast.get_peft_model(base, cfg, adapter_name=name) if pm is None else pm.add_adapter(name, cfg) or pm
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn_like(p) * 0.3)
    for pname, p in pm.named_parameters():
        p.requires_grad_("lora_" in pname)
    return pm, names


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_quantised_base_mixed_batch_equals_each_sample_alone(case, monkeypatch):
    kind, dtype, backend = BNB_CASES[case]
    select_backend(monkeypatch, backend)
    pm, names = _bnb_model(kind)
    layer = pm.base_model.model.l0
    assert type(layer).__name__ == ("Linear8bitLt" if kind == "int8" else "Linear4bit")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 23, generator=g).to(dtype)
    per_sample = ["q2", "__base__", "q0", "q2", "q1"]
    pm.eval()
    with torch.no_grad():
        mixed = pm(x, adapter_names=per_sample)
        alone = alone_outputs(pm, x, per_sample)
    assert mixed.dtype == dtype
    # the same math on a sub-batch: within a few roundings of the output's dtype
    tol = 4 * torch.finfo(dtype).eps * alone.abs().max().item()
    torch.testing.assert_close(mixed, alone, rtol=0, atol=tol)
    with pm.disable_adapter(), torch.no_grad():
        assert (mixed[0] - pm(x[:1])[0]).abs().max() > 5 * tol  # the adapters do change the output


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_quantised_base_training_gradients_equal_each_adapter_alone(case, monkeypatch):
    kind, dtype, backend = BNB_CASES[case]
    select_backend(monkeypatch, backend)
    pm, names = _bnb_model(kind)
    pm.train()
    pm.base_model.train_mixed_batches = True
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 23, generator=g).to(dtype)
    per_sample = ["q1", "q0", "__base__", "q1", "q0", "q1"]  # q2 has no sample: an empty segment
    weight = torch.randn(6, 3, 19, generator=g)

    def tol(r):  # fp32 gradients of a bf16 model: the activations are rounded to bf16 either way; in fp32 the
        # mixed call and the one alone sum a weight gradient's rows in another order (seen: 10 eps x the largest)
        return dict(rtol=0, atol=16 * torch.finfo(dtype).eps * r.abs().max().item())

    check_mixed_grads_equal_alone(pm, names, per_sample, x, weight, tol=tol, own_count=4, nonzero=True)


# ------------------------------------------------------------------------------------------------------
# (IA)^3
# ------------------------------------------------------------------------------------------------------
def test_ia3_mixed_batch_equals_each_sample_alone_and_trains():
    torch.manual_seed(0)
    pm = None
    names = [f"i{k}" for k in range(3)]
    for name in names:
        cfg = fast.IA3Config(target_modules=["lin0", "c1d", "lin1"], feedforward_modules=["c1d"])
        pm = fast.get_peft_model(Net(), cfg, adapter_name=name) if pm is None else pm.add_adapter(name, cfg) or pm
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "ia3_l" in pname:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    for pname, p in pm.named_parameters():
        p.requires_grad_("ia3_l" in pname)
    pm.eval()
    ids = torch.randint(0, 29, (5, 3))
    per_sample = ["i2", "__base__", "i0", "i2", "i1"]
    with torch.no_grad():
        torch.testing.assert_close(pm(ids, adapter_names=per_sample), alone_outputs(pm, ids, per_sample),
                                   rtol=1e-5, atol=1e-5)
    pm.train()
    for pname, p in pm.named_parameters():
        p.requires_grad_("ia3_l" in pname)  # set_adapter above left one adapter trainable
    params = {k: p for k, p in pm.named_parameters() if p.requires_grad}
    weight = torch.randn(5, 3, 7)
    grads = dict(zip(params, torch.autograd.grad((pm(ids, adapter_names=per_sample) * weight).sum(),
                                                 list(params.values()), allow_unused=True)))
    for name in names:
        rows = [i for i, s in enumerate(per_sample) if s == name]
        own = {k: p for k, p in params.items() if f".{name}" in k}
        pm.base_model.set_adapter(name)
        for p in own.values():
            p.requires_grad_(True)
        ref = torch.autograd.grad((pm(ids[rows]) * weight[rows]).sum(), list(own.values()))
        for (k, _), r in zip(own.items(), ref):
            torch.testing.assert_close(grads[k], r, rtol=1e-4, atol=1e-6, msg=k)
    before = _snapshot(pm)
    with pytest.raises(ValueError, match="unknown adapters"):
        pm(ids, adapter_names=["i0", "x", "i0", "i0", "i0"])
    _unchanged(pm, before)


def _saved_activation_bytes(n: int) -> int:
    """Bytes autograd saves in one training forward of a 16-sample mixed batch over ``n`` adapters (all rank
    8), parameters and the layers' adapter stores (persistent, not activations) excluded."""
    torch.manual_seed(0)
    pm = None
    for i in range(n):
        cfg = fast.LoraConfig(r=8, lora_alpha=8, target_modules=["lin0", "c1d", "lin1"])
        pm = fast.get_peft_model(Net(), cfg, adapter_name=f"a{i}") if pm is None else pm.add_adapter(f"a{i}", cfg) or pm
    for pname, p in pm.named_parameters():
        p.requires_grad_("lora_" in pname)
    pm.train()
    pm.base_model.train_mixed_batches = True
    ids = torch.randint(0, 29, (16, 9))
    names = [f"a{i % n}" for i in range(16)]
    pm(ids, adapter_names=names)  # builds the stores
    keep = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    for m in pm.modules():
        store = m.__dict__.get("_grouped_store")
        if store is not None:
            keep |= {store.a.untyped_storage().data_ptr(), store.b.untyped_storage().data_ptr(),
                     store.scale.untyped_storage().data_ptr()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in keep and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pm(ids, adapter_names=names).sum()
    return total


def test_saved_activations_do_not_grow_with_adapters():
    two, sixteen = _saved_activation_bytes(2), _saved_activation_bytes(16)
    assert sixteen <= 1.25 * two, (two, sixteen)


def _grouped_layer_saved(n: int, dropout: float) -> dict:
    """What autograd saves in one training forward of a LoRA ``nn.Linear`` (64 -> 48) holding ``n`` adapters
    (rank 8, ``lora_dropout``) on a 16-sample mixed batch x [16, 9, 64]: the bytes of x's own storage, of
    every other saved tensor (parameters and the layer's adapter store excluded: they persist), and the
    largest other saved tensor's element count."""
    torch.manual_seed(0)
    pm = None
    for i in range(n):
        cfg = fast.LoraConfig(r=8, lora_alpha=8, lora_dropout=dropout, target_modules=["0"])
        pm = (fast.get_peft_model(nn.Sequential(nn.Linear(64, 48)), cfg, adapter_name=f"a{i}") if pm is None
              else pm.add_adapter(f"a{i}", cfg) or pm)
    for pname, p in pm.named_parameters():
        p.requires_grad_("lora_" in pname)
    pm.train()
    pm.base_model.train_mixed_batches = True
    x = torch.randn(16, 9, 64, requires_grad=True)
    names = [f"a{i % n}" for i in range(16)]
    pm(x, adapter_names=names)  # builds the store
    layer = pm.base_model.model[0]
    store = layer.__dict__["_grouped_store"]
    persistent = [*pm.parameters(), *(t for t in vars(store).values() if isinstance(t, torch.Tensor))]
    keep = {t.untyped_storage().data_ptr() for t in persistent}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in keep:
            seen[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pm(x, adapter_names=names)
    out.sum().backward()  # the saved tensors serve a real backward
    x_ptr = x.untyped_storage().data_ptr()
    others = [t for p, t in seen.items() if p != x_ptr]
    return dict(x=seen[x_ptr].untyped_storage().nbytes() if x_ptr in seen else 0,
                other=sum(t.untyped_storage().nbytes() for t in others),
                largest=max((t.numel() for t in others), default=0), x_numel=x.numel())


def test_dropout_saves_no_copy_of_x_and_does_not_grow_with_adapters():
    """Dropout in a mixed batch: the masks are regenerated inside the op, so autograd keeps x itself and small
    tensors (h, the plan), the same with and without dropout, and not growing with the number of adapters."""
    two, sixteen = _grouped_layer_saved(2, 0.3), _grouped_layer_saved(16, 0.3)
    for n, saved in ((2, two), (16, sixteen)):
        assert saved["largest"] < saved["x_numel"] // 4, saved  # no dropped copy of x, no [M, K] mask
        plain = _grouped_layer_saved(n, 0.0)
        assert saved["other"] <= plain["other"], (saved, plain)
    assert sixteen["other"] <= 1.25 * two["other"], (two, sixteen)


# ------------------------------------------------------------------------------------------------------
# LoRA on nn.Embedding: one grouped op (kernels/lora_grouped_embedding.py)
# ------------------------------------------------------------------------------------------------------
def three_adapters(base: nn.Module, names: list[str], target_modules: list[str], init_scale: float = 1.0):
    """A PeftModel over ``base`` with LoRA adapters ``names`` of ranks RANKS (alpha 3, 4, ...) on
    ``target_modules``, every factor drawn at random (times ``init_scale``): non-zero adapter terms."""
    pm = None
    for i, name in enumerate(names):
        cfg = fast.LoraConfig(r=RANKS[i % 3], lora_alpha=3 + i, target_modules=target_modules)
        pm = fast.get_peft_model(base, cfg, adapter_name=name) if pm is None else pm
        if i:
            pm.add_adapter(name, cfg)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_" in k:
                p.copy_(torch.randn_like(p) * init_scale)
    return pm


def _embedding_model(padding_idx=None, max_norm=None):
    torch.manual_seed(4)
    names = ["e0", "e1", "e2"]
    return three_adapters(nn.Sequential(nn.Embedding(31, 11, padding_idx=padding_idx, max_norm=max_norm)), names,
                          ["0"]), names


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_mixed_batch_is_one_op(monkeypatch, padding_idx):
    """nn.Embedding with three adapters (ranks 1/8/64, e1 without tokens), per sample and per token: one
    lora_grouped_embedding call per forward, the output equal to each sample alone, every adapter's gradients
    equal to training it alone on its tokens (none to padding_idx's row, as F.embedding)."""
    from peftfast.kernels import lora_grouped_embedding as E

    calls = []
    real = E.lora_grouped_embedding
    monkeypatch.setattr(sys.modules["peftfast.tuners.lora.layer"], "lora_grouped_embedding",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    pm, names = _embedding_model(padding_idx)
    ids = torch.randint(0, 31, (5, 7))
    ids[1, 2] = ids[3, 0] = 3
    per_sample = ["e2", "e0", "__base__", "e2", "e0"]
    pm.eval()
    with torch.no_grad():
        y = pm(ids, adapter_names=per_sample)
        torch.testing.assert_close(y, alone_outputs(pm, ids, per_sample), rtol=1e-6, atol=1e-6)
    assert calls == [1]
    per_token = [[["e0", "e2", "__base__"][(i + j) % 3] for j in range(7)] for i in range(5)]
    with torch.no_grad():
        y = pm(ids, adapter_names=per_token)
        for i in range(5):
            for j in range(7):
                torch.testing.assert_close(y[i, j], alone_outputs(pm, ids[i:i + 1, j:j + 1], [per_token[i][j]])[0, 0])
    pm.train()
    pm.base_model.train_mixed_batches = True
    params = {k: p for k, p in pm.named_parameters() if "lora_" in k}
    for p in params.values():
        p.requires_grad_(True)
    weight = torch.randn(5, 7, 11)
    grads = check_mixed_grads_equal_alone(pm, names, per_sample, ids, weight, params, own_count=2, nonzero=True)
    if padding_idx is not None:
        for name in ("e0", "e2"):
            assert not grads[f"base_model.model.0.lora_embedding_A.{name}"][:, padding_idx].any()


def test_embedding_with_max_norm_keeps_one_op_per_adapter(monkeypatch):
    """max_norm renormalises the rows F.embedding reads: such an embedding keeps PEFT's op per adapter."""
    from peftfast.kernels import lora_grouped_embedding as E

    monkeypatch.setattr(E, "_op_forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("grouped")))
    pm, names = _embedding_model(max_norm=1.0)
    ids = torch.randint(0, 31, (3, 4))
    with torch.no_grad():
        pm.eval()
        y = pm(ids, adapter_names=["e0", "e2", "__base__"])
    assert y.shape == (3, 4, 11)


@pytest.mark.parametrize("block_rows", [None, 4, "runs"])
def test_grouped_embedding_op_vs_float64(block_rows):
    """The op on its own, the dense plan, a plan of 4-row blocks (unused blocks, adapters over several blocks)
    and one block per sample (``run_plan``: blocks not in adapter order, as many as adapters): output and every
    gradient against a per-adapter F.embedding loop in float64."""
    from peftfast.kernels.lora_grouped import run_plan
    from peftfast.kernels.lora_grouped_embedding import lora_grouped_embedding

    g = torch.Generator().manual_seed(7)
    n, v, d, m = 4, 23, 9, 37
    ranks = [3, 8, 1, 5]
    a = [torch.randn(r, v, generator=g).requires_grad_() for r in ranks]
    b = [torch.randn(d, r, generator=g).requires_grad_() for r in ranks]
    scal = [0.5, 1.5, 2.0, 0.25]
    tokens = torch.randint(0, v, (m,), generator=g)
    index = torch.randint(-1, n - 1, (m,), generator=g)  # the last adapter unused
    if block_rows == "runs":  # 4 samples of 9 tokens (m = 36), adapters 2, 0, 1, 0: four blocks, not adapter i
        m, tokens = 36, tokens[:36]
        index = torch.tensor([2, 0, 1, 0]).repeat_interleave(9)
    base = torch.randn(m, d, generator=g).requires_grad_()
    st_a, st_b, st_s = stacked_store(a, b, scal)
    plan = {None: None, 4: group_plan(index, n, 4), "runs": run_plan(index, 9)}[block_rows]
    y = lora_grouped_embedding(tokens, base, a, b, st_a, st_b, st_s, index, plan=plan, padding_idx=tokens[0].item())

    def loop(base_, a_, b_):
        out = base_
        for i in range(n):
            rows = (index == i).nonzero().flatten()
            delta = torch.nn.functional.embedding(tokens[rows], a_[i].T, padding_idx=tokens[0].item()) @ b_[i].T
            out = out.index_add(0, rows, delta * scal[i])
        return out

    leaves = [base, *a, *b]
    d64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = loop(d64[0], d64[1:1 + n], d64[1 + n:])
    plain = loop(base, a, b)
    assert_matches_float64("y", y, plain, ref, k=8)
    gy = torch.randn(y.shape, generator=g)
    for i, (g1, g2, g3) in enumerate(zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(plain, leaves, gy),
                                         torch.autograd.grad(ref, d64, gy.double()))):
        assert_matches_float64(f"grad {i}", g1, g2, g3, k=8)


def test_grouped_embedding_torch_compile_fullgraph():
    """torch.compile(fullgraph=True, backend="aot_eager") of the embedding op with its plan: eager's output and
    gradients."""
    from peftfast.kernels.lora_grouped import make_plan
    from peftfast.kernels.lora_grouped_embedding import lora_grouped_embedding

    g = torch.Generator().manual_seed(8)
    a = [torch.randn(r, 19, generator=g).requires_grad_() for r in (2, 8)]
    b = [torch.randn(6, r, generator=g).requires_grad_() for r in (2, 8)]
    st_a, st_b, st_s = stacked_store(a, b, [1.0, 0.5])
    tokens, index = torch.randint(0, 19, (13,), generator=g), torch.randint(-1, 2, (13,), generator=g)
    base = torch.randn(13, 6, generator=g).requires_grad_()

    def f(tokens, base, index):
        return lora_grouped_embedding(tokens, base, a, b, st_a, st_b, st_s, index, plan=make_plan(index, 2, False))

    want = f(tokens, base, index)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(tokens, base, index)
    torch.testing.assert_close(got, want)
    gy = torch.randn(want.shape, generator=g)
    leaves = [base, *a, *b]
    for g1, g2 in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(g1, g2)


# ------------------------------------------------------------------------------------------------------
# LoRA on convolutions: one pair of convolutions per layer (the batch as groups)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_mixed_batch_without_a_loop(monkeypatch, dims):
    """Conv1d/2d/3d (stride 2, padding 1, kernel 3) with three adapters (ranks 1/8/64, c1 without samples): no
    per-adapter step runs, the output equals each sample alone, and in training each adapter's gradients equal
    training it alone on its samples."""
    from peftfast.tuners.lora.layer import ConvNd

    monkeypatch.setattr(ConvNd, "_with_adapter", lambda *a: (_ for _ in ()).throw(AssertionError("loop")))
    conv = getattr(nn, f"Conv{dims}d")
    torch.manual_seed(6)
    names = ["c0", "c1", "c2"]
    pm = three_adapters(nn.Sequential(conv(5, 7, 3, stride=2, padding=1), nn.Tanh(), conv(7, 3, 1)), names,
                        ["0", "2"])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 5, *(9,) * dims, generator=g)
    per_sample = ["c2", "__base__", "c0", "c2", "c0"]
    pm.eval()
    with torch.no_grad():
        y = pm(x, adapter_names=per_sample)
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(y, alone_outputs(pm, x, per_sample), rtol=1e-4, atol=1e-6 * y.abs().max().item())
    params = train_mixed(pm, names)
    check_mixed_grads_equal_alone(pm, names, per_sample, x, torch.randn(y.shape, generator=g), params,
                                  tol=lambda r: dict(rtol=1e-4, atol=1e-5 * r.abs().max().item()), own_count=4,
                                  nonzero=True)  # fp32 sums over many more terms than a linear's: 3e-6 of the max


def test_adapter_names_reach_the_same_modules_as_a_full_walk():
    """The per-call routing of adapter_names skips LoRA layers' adapter containers: it must still find every LoRA
    layer (also one nested in another's base layer: MultiheadAttention's out_proj), ModulesToSaveWrapper and
    trainable-token layer that a walk of every module finds, and nothing else."""
    from peftfast.tuners.lora.layer import LoraLayer
    from peftfast.tuners.lora.model import routed_modules
    from peftfast.utils.other import ModulesToSaveWrapper

    class Tree(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(29, 16)
            self.attn = nn.MultiheadAttention(16, 2)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
                                         for _ in range(2)])
            self.head = nn.Linear(16, 5)

    torch.manual_seed(0)
    model = None
    for i in range(3):
        cfg = fast.LoraConfig(r=4, target_modules=r"attn|blocks\.\d\.(0|2)", modules_to_save=["head"],
                              trainable_token_indices={"emb": [1, 3]} if i == 0 else None)
        if model is None:
            model = fast.get_peft_model(Tree(), cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
    root = model.base_model.model
    full = [m for m in root.modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))
            or getattr(m, "merge_replaces_rows", False)]
    got = routed_modules(root)
    assert len(got) == len({id(m) for m in got})
    assert {id(m) for m in got} == {id(m) for m in full}
    kinds = {type(m).__name__ for m in got}
    assert {"MultiheadAttention", "Linear", "ModulesToSaveWrapper", "TrainableTokensLayer"} <= kinds, kinds
    assert sum(type(m).__name__ == "Linear" for m in got) == 5  # 4 in the blocks + attn's out_proj


def _mixed_llama(dropout: float):
    pm = fast.get_peft_model(zoo.llama(seed=3, hidden=16, layers=2),
                             fast.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name="a0")
    for i, r in ((1, 2), (2, 5)):
        pm.add_adapter(f"a{i}", fast.LoraConfig(r=r, lora_alpha=3, lora_dropout=dropout, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in pm.named_parameters():
        p.requires_grad_("lora_" in name)
    pm.base_model.train_mixed_batches = True
    return pm.train()


def _lora_grads(pm) -> dict:  # the gradients of every trainable parameter
    return {k: p.grad.clone() for k, p in pm.named_parameters() if p.grad is not None}


def _checkpointed_mixed_llama(dropout: float = 0.0, reentrant: bool = True):
    pm = _mixed_llama(dropout)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    pm.enable_input_require_grads()
    return pm


@pytest.mark.parametrize("reentrant", [True, False])
def test_mixed_training_under_activation_checkpointing(reentrant):
    """A mixed batch trained with activation checkpointing (transformers' gradient_checkpointing_enable, reentrant or
    not): the backward recomputes each decoder layer with the batch's adapter_names, so every adapter's gradients
    equal those of the same step without checkpointing, which equal each adapter trained alone on its samples
    (also with dropout: the recomputation regenerates the same masks); the next call drops that routing."""
    names = ["a2", "a0", "__base__", "a1", "a2"]
    ids = torch.randint(3, zoo.VOCAB, (5, 6), generator=torch.Generator().manual_seed(11))
    for dropout in (0.0, 0.3):
        grads = []
        for checkpointing in (False, True):
            pm = _checkpointed_mixed_llama(dropout, reentrant) if checkpointing else _mixed_llama(dropout)
            torch.manual_seed(5)
            pm(input_ids=ids, adapter_names=names).logits.pow(2).sum().backward()
            grads.append(_lora_grads(pm))
        plain, ckpt = grads
        assert set(ckpt) == set(plain) and any(".a1." in k for k in plain) and any(".a2." in k for k in plain)
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
        if dropout == 0.0:  # each adapter alone on its samples
            want: dict = {}
            for i, name in enumerate(names):
                if name == "__base__":
                    continue
                pm.zero_grad()
                pm.base_model.set_adapter(name)
                pm(input_ids=ids[i:i + 1]).logits.pow(2).sum().backward()
                for k, g in _lora_grads(pm).items():
                    want[k] = want.get(k, 0) + g
            for k in plain:
                torch.testing.assert_close(plain[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
        layers = [m for m in pm.modules() if isinstance(m, fast.tuners.lora.LoraLayer)]
        pm.base_model.set_adapter("a1")
        pm.zero_grad()
        pm(input_ids=ids)  # a call without adapter_names: the earlier call's backward may still come
        assert any(m._forward_pre_hooks for m in layers)
        for _ in range(routing.KEPT_CALLS):  # once every kept call is one without names, the routing is removed
            pm(input_ids=ids)
        assert not any(m._forward_pre_hooks for m in layers)


@pytest.mark.parametrize("reentrant", [True, False])
def test_several_training_calls_before_their_backward(reentrant):
    """Three training calls, two with different adapter_names and one without between them, then their backward
    (one sum, or each loss on its own in reverse order), under activation checkpointing: each recomputation gets the
    names of the call whose forward it recomputes (the autograd sequence numbers of the call's forward tell them
    apart), so every gradient equals that of the same calls without checkpointing (before, every recomputation took
    the last call's names, or none after a call without them: silently wrong gradients)."""
    ids = torch.randint(3, zoo.VOCAB, (3, 5), generator=torch.Generator().manual_seed(12))
    for order in ("sum", "reversed"):
        grads = []
        for checkpointing in (False, True):
            pm = _checkpointed_mixed_llama(reentrant=reentrant) if checkpointing else _mixed_llama(0.0)
            losses = [pm(input_ids=ids, adapter_names=["a1", "a0", "a2"]).logits.pow(2).sum(),
                      pm(input_ids=ids).logits.pow(2).mean(),  # the active adapter, a0
                      pm(input_ids=ids.flip(0), adapter_names=["a2", "__base__", "a2"]).logits.pow(3).sum()]
            if order == "sum":
                sum(losses).backward()
            else:
                for loss in reversed(losses):
                    loss.backward()
            grads.append(_lora_grads(pm))
        plain, ckpt = grads
        assert set(ckpt) == set(plain) and all(any(f".{a}." in k for k in plain) for a in ("a0", "a1", "a2"))
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=f"{order} {k}")


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_backward_too_late_for_its_names_raises(reentrant):
    """The backward of a training call with adapter_names after more training calls than the routing keeps: a clear
    error (its recomputation would otherwise run without the call's names: wrong gradients)."""
    pm = _checkpointed_mixed_llama(reentrant=reentrant)
    ids = torch.randint(3, zoo.VOCAB, (3, 4), generator=torch.Generator().manual_seed(13))
    first = pm(input_ids=ids, adapter_names=["a1", "a0", "a2"]).logits.pow(2).sum()
    for _ in range(routing.KEPT_CALLS):
        pm(input_ids=ids, adapter_names=["a0", "a0", "a1"])
    with pytest.raises(RuntimeError, match=f"more than {routing.KEPT_CALLS} training calls ago"):
        first.backward()


def test_recompute_routing_only_inside_backward():
    """After a training call with adapter_names, a forward outside any backward (no recomputation) and a new call
    without names see no names: the active adapter applies; an eval call removes nothing it should keep."""
    pm = _mixed_llama(0.0)
    ids = torch.randint(3, zoo.VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    pm(input_ids=ids, adapter_names=["a1", "a2", "a0"]).logits.sum().backward()
    pm.eval()
    with torch.no_grad():
        pm.base_model.set_adapter("a2")
        direct = pm.base_model.model(input_ids=ids).logits  # the routing hooks are still there, outside a backward
        called = pm(input_ids=ids).logits
        mixed = pm(input_ids=ids, adapter_names=["a2"] * 3).logits
    torch.testing.assert_close(direct, called, rtol=0, atol=0)
    torch.testing.assert_close(mixed, called, rtol=1e-5, atol=1e-6)
    import copy
    import pickle
    pm.train()
    pm(input_ids=ids, adapter_names=["a1", "a2", "a0"]).logits.sum().backward()
    assert len(pickle.dumps(pm)) > 0  # the hook left for the backward is a picklable object
    twin = copy.deepcopy(pm).eval()  # and a copy (a reference model) runs
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids, adapter_names=["a1", "a2", "a0"]).logits,
                                   pm.eval()(input_ids=ids, adapter_names=["a1", "a2", "a0"]).logits)


def test_ia3_mixed_training_under_activation_checkpointing():
    """(IA)^3 routes adapter_names the same way: with reentrant checkpointing each adapter's gradients equal those of
    the step without checkpointing (without the routing kept for the backward, adapter b got none)."""
    ids = torch.randint(3, zoo.VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        cfg = dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                   init_ia3_weights=False)
        pm = fast.get_peft_model(zoo.llama(seed=3), fast.IA3Config(**cfg), adapter_name="a")
        pm.add_adapter("b", fast.IA3Config(**cfg))
        for name, p in pm.named_parameters():
            p.requires_grad_("ia3_" in name)
        pm.train()
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            pm.enable_input_require_grads()
        pm(input_ids=ids, adapter_names=["b", "a", "b"]).logits.pow(2).sum().backward()
        grads.append(_lora_grads(pm))
    assert set(grads[1]) == set(grads[0]) and any(".b" in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)


def _llama_alone(pm, ids, names):
    """Each sample's logits run alone with its adapter active (adapters disabled for '__base__')."""
    out = alone_outputs(pm, ids, names, run=lambda pm, ids: pm(input_ids=ids).logits)
    for pname, p in pm.named_parameters():  # set_adapter froze the other adapters: all train again
        p.requires_grad_("lora_" in pname)
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_store_follows_optimizer_steps(fused):
    """A fused optimizer (AdamW(fused=True), transformers' default adamw_torch_fused) writes the adapters without
    bumping their version counters: the layers' stacked stores follow every optimizer step anyway, so after each
    step the mixed batch, in training and then in eval, equals each sample run alone with the updated weights
    (before, the store kept the weights of the first call: lora_A never moved under Trainer, B = 0 at the start)."""
    pm = _mixed_llama(0.0)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05, fused=fused)
    ids = torch.randint(3, zoo.VOCAB, (4, 5), generator=torch.Generator().manual_seed(8))
    names = ["a2", "a0", "__base__", "a1"]
    for _ in range(3):
        out = pm(input_ids=ids, adapter_names=names).logits
        with torch.no_grad():
            torch.testing.assert_close(out, _llama_alone(pm, ids, names), rtol=1e-5, atol=1e-5)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=names).logits, _llama_alone(pm, ids, names),
                                   rtol=1e-5, atol=1e-5)


def test_mixed_batches_through_trainer(tmp_path):
    """Several adapters trained on mixed batches by transformers' Trainer (its default fused AdamW, activation
    checkpointing on, the names from the collator): every adapter's lora_A and lora_B move, and afterwards a mixed
    batch equals each sample run alone with its adapter (the stores hold the weights the optimizer wrote)."""
    from transformers import Trainer, TrainingArguments

    pm = _mixed_llama(0.0)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)  # the usual start: B = 0, so lora_A moves only if the step-1 B reaches it
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, zoo.VOCAB, (6,), generator=g), "adapter": ("a0", "a1", "a2")[i % 3]}
            for i in range(12)]

    def collate(batch):
        ids = torch.stack([b["input_ids"] for b in batch])
        return {"input_ids": ids, "labels": ids, "adapter_names": [b["adapter"] for b in batch]}

    before = {k: p.detach().clone() for k, p in pm.named_parameters() if p.requires_grad}
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=6, max_steps=3, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
                             gradient_checkpointing=True, disable_tqdm=True)
    Trainer(model=pm, args=args, train_dataset=rows, data_collator=collate).train()
    still = sorted(k for k, p in pm.named_parameters() if k in before and torch.equal(p.detach(), before[k]))
    assert not still, still
    pm.eval()
    batch = collate(rows[:6])
    with torch.no_grad():
        mixed = pm(input_ids=batch["input_ids"], adapter_names=batch["adapter_names"]).logits
        torch.testing.assert_close(mixed, _llama_alone(pm, batch["input_ids"], batch["adapter_names"]),
                                   rtol=1e-5, atol=1e-5)




def test_recompute_routing_survives_a_reference_forward():
    """As TRL's DPO does: the policy's mixed forward, then a reference forward without gradients (adapters
    disabled), then the policy's backward: the recomputation still sees the policy call's names (gradients equal
    those without the reference forward in between)."""
    ids = torch.randint(3, zoo.VOCAB, (3, 5), generator=torch.Generator().manual_seed(6))
    names = ["a1", "a0", "a2"]
    grads = []
    for reference in (False, True):
        pm = _checkpointed_mixed_llama()
        loss = pm(input_ids=ids, adapter_names=names).logits.pow(2).sum()
        if reference:
            with torch.no_grad(), pm.disable_adapter():
                pm(input_ids=ids)
        loss.backward()
        grads.append(_lora_grads(pm))
    assert set(grads[1]) == set(grads[0]) and any(".a2." in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_recompute_routing_ends_with_a_call_that_bypasses_it():
    """After a mixed training step, a training call on the base model itself (no adapter_names, not through the
    PEFT model's forward) with checkpointing: its recomputation sees no names (the active adapter's gradients only,
    equal to the same call through the PEFT model)."""
    ids = torch.randint(3, zoo.VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    grads = []
    for direct in (False, True):
        pm = _checkpointed_mixed_llama()
        pm(input_ids=ids, adapter_names=["a1", "a0", "a2"]).logits.pow(2).sum().backward()
        pm.zero_grad()
        model = pm.get_base_model() if direct else pm
        model(input_ids=ids).logits.pow(2).sum().backward()
        grads.append(_lora_grads(pm))
    assert set(grads[1]) == set(grads[0]) and all(".a0." in k for k in grads[0])  # "a0": the active adapter
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_concurrent_mixed_calls_from_two_threads():
    """Two threads serve mixed batches through one model at the same time (a threaded server): thread A's call is
    held inside its forward while thread B's call has registered its routing on the same modules; each call still
    equals its own samples run alone (with a forward pre-hook per call, as PEFT routes them, A's layers took B's
    names, or torch raised as A's hooks were removed while B's forward iterated them)."""
    import threading

    pm, names = make_model(3)
    pm.eval()
    ids = torch.randint(0, 29, (4, 5), generator=torch.Generator().manual_seed(3))
    names_a, names_b = ["a0", "a1", "a2", "a0"], ["a2", "__base__", "a1", "a1"]
    with torch.no_grad():
        want_a, want_b = alone_outputs(pm, ids, names_a), alone_outputs(pm, ids, names_b)
    b_inside, a_done = threading.Event(), threading.Event()
    first = pm.base_model.model.lin0

    def hold(module, args):
        if threading.current_thread().name == "A":
            assert b_inside.wait(10)  # A's routing and B's are both on the layers now
        else:
            b_inside.set()
            assert a_done.wait(10)

    handle = first.register_forward_pre_hook(hold)
    got, errors = {}, []

    def call(tag, adapter_names):
        try:
            with torch.no_grad():
                got[tag] = pm(ids, adapter_names=adapter_names)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            if tag == "A":
                a_done.set()

    threads = [threading.Thread(target=call, args=("A", names_a), name="A"),
               threading.Thread(target=call, args=("B", names_b), name="B")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        handle.remove()
    assert not errors, errors
    torch.testing.assert_close(got["A"], want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["B"], want_b, rtol=1e-5, atol=1e-5)
