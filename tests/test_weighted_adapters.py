"""``add_weighted_adapter`` and ``peftfast.utils.merge_utils`` against the real PEFT 0.21.

Two LoRA adapters with random weights (B too) on a model with nn.Linear, GPT-2's Conv1D, nn.Embedding and
nn.Conv2d (3x3 and 1x1); each combination type builds the new adapter in PEFT and here from the same
weights and, for the random DARE steps, the same torch seed (both libraries draw one Bernoulli tensor per
task tensor in the same order). The combined adapter's output must match PEFT's, and for the
factor-wise types its A and B too (SVD factors are compared through the output: their signs are free).
"""
from __future__ import annotations

import copy
import warnings

import peft
import peft.utils.merge_utils as ref_mu
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftfast
import peftfast.utils.merge_utils as mu
from tests.numerics import max_err

TARGETS = ["lin", "c1d", "emb", "conv", "conv1x1"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(21, 10)
        self.lin = nn.Linear(10, 9)
        self.c1d = Conv1D(8, 9)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.conv1x1 = nn.Conv2d(6, 7, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1d(torch.tanh(self.lin(self.emb(ids))))  # [N, L, 8]
        h = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3)
        return self.conv1x1(torch.tanh(self.conv(h)))


IDS = torch.randint(0, 21, (2, 7), generator=torch.Generator().manual_seed(2))


def make_pair(ranks=(4, 4), use_dora: bool = False):
    torch.manual_seed(0)
    base = Net()
    models = []
    for lib in (peft, peftfast):
        m = None
        for name, r in zip(("a", "b"), ranks):
            cfg = lib.LoraConfig(r=r, lora_alpha=r + 3, target_modules=TARGETS, use_dora=use_dora)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if m is None:
                    m = lib.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
                else:
                    m.add_adapter(name, cfg)
        models.append(m.eval())
    theirs, ours = models
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(0.4 * torch.randn_like(p))
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    return theirs, ours


def combine(model, kind, **kw):
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", combination_type=kind, **kw)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)  # added frozen
    model.set_adapter("mix")
    return model(IDS).detach()


FACTORWISE = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


@pytest.mark.parametrize("kind", FACTORWISE + ["cat"] + SVD)
def test_combined_adapter_matches_peft(kind):
    ranks = (4, 6) if kind == "cat" or kind in SVD else (4, 4)
    theirs, ours = make_pair(ranks)
    kw = {} if kind in ("linear", "cat", "svd") else {"density": 0.6}
    if "ties" in kind:
        kw["majority_sign_method"] = "frequency" if kind.startswith("dare") else "total"
    if kind == "svd":
        kw["svd_clamp"] = 0.9
    out_t, out_o = combine(theirs, kind, **kw), combine(ours, kind, **kw)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    assert ours.peft_config["mix"].target_modules == theirs.peft_config["mix"].target_modules
    # a truncated SVD amplifies fp32 rounding of its input by 1 / (gap between kept and dropped singular values)
    tol = (1e-4 if kind in SVD else 1e-5) * out_t.abs().max().item()
    assert max_err(out_o, out_t) <= tol
    without = copy.deepcopy(ours)
    without.set_adapter("a")
    assert max_err(out_o, without(IDS)) > 100 * tol  # the combined adapter changes the output
    sd_t = {k: v for k, v in theirs.state_dict().items() if ".mix" in k}
    sd_o = {k: v for k, v in ours.state_dict().items() if ".mix" in k}
    assert sd_t.keys() == sd_o.keys() and sd_o
    flags = [{n: p.requires_grad for n, p in m.named_parameters() if ".mix." in n} for m in (theirs, ours)]
    assert flags[0] == flags[1]
    if kind in FACTORWISE or kind == "cat":
        for k in sd_t:
            assert sd_o[k].shape == sd_t[k].shape and max_err(sd_o[k], sd_t[k]) <= 1e-6 * sd_t[k].abs().max(), k


def test_svd_rank_and_driver_options_match_peft():
    theirs, ours = make_pair((4, 6))
    kw = dict(svd_rank=3, svd_full_matrices=False, svd_driver=None)
    out_t, out_o = combine(theirs, "svd", **kw), combine(ours, "svd", **kw)
    assert ours.peft_config["mix"].r == 3
    assert max_err(out_o, out_t) <= 1e-5 * out_t.abs().max().item()


def test_dora_adapters_combine_like_peft():
    theirs, ours = make_pair(use_dora=True)
    out_t, out_o = combine(theirs, "linear"), combine(ours, "linear")
    assert max_err(out_o, out_t) <= 1e-5 * out_t.abs().max().item()


def test_dare_matches_its_defining_formula():
    # independent of PEFT: with the seed, the masks are torch.bernoulli(density) draws, one per tensor in order
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(5, 7, generator=g) for _ in range(3)]
    w = torch.tensor([0.5, -1.0, 2.0])
    torch.manual_seed(9)
    got = mu.dare_linear(ts, w, 0.3)
    torch.manual_seed(9)
    masks = [torch.bernoulli(torch.full_like(t, 0.3)) for t in ts]
    want = sum(wi * t * m / 0.3 for wi, t, m in zip(w, ts, masks))
    assert max_err(got, want) <= 1e-6
    assert 0 < sum(int(m.sum()) for m in masks) < 3 * 35


@pytest.mark.parametrize("fn", ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_merge_utils_match_peft(fn, method):
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(6, 11, generator=g) for _ in range(3)]
    w = torch.tensor([1.5, -0.4, 0.8])
    args = {"task_arithmetic": (), "magnitude_prune": (0.4,), "dare_linear": (0.4,)}.get(fn, (0.4, method))
    torch.manual_seed(3)
    want = getattr(ref_mu, fn)(ts, w, *args)
    torch.manual_seed(3)
    got = getattr(mu, fn)(ts, w, *args)
    assert max_err(got, want) <= 1e-6 * want.abs().max()
    assert want.abs().max() > 0


def test_merge_util_helpers_match_peft():
    g = torch.Generator().manual_seed(8)
    t = torch.randn(4, 9, 5, generator=g)
    for method in ("total", "frequency"):
        assert torch.equal(mu.calculate_majority_sign_mask(t, method), ref_mu.calculate_majority_sign_mask(t, method))
    mask = ref_mu.calculate_majority_sign_mask(t)
    assert torch.equal(mu.disjoint_merge(t, mask), ref_mu.disjoint_merge(t, mask))
    assert torch.equal(mu.prune(t[0], 0.3, "magnitude"), ref_mu.prune(t[0], 0.3, "magnitude"))
    assert torch.equal(mu.magnitude_based_pruning(t[0], 0.5), ref_mu.magnitude_based_pruning(t[0], 0.5))
    torch.manual_seed(1)
    a = mu.random_pruning(t[0], 0.5, rescale=True)
    torch.manual_seed(1)
    assert torch.equal(a, ref_mu.random_pruning(t[0], 0.5, rescale=True))
    with pytest.warns(UserWarning, match="no pruning"):
        assert torch.equal(mu.prune(t[0], 1.0, "random"), t[0])
    with pytest.raises(ValueError, match="Density"):
        mu.prune(t[0], -0.1, "magnitude")
    with pytest.raises(ValueError, match="Unknown method"):
        mu.prune(t[0], 0.5, "other")


@pytest.mark.parametrize("call,match", [
    (dict(adapters=["a", "b"], combination_type="linear"), "same r value"),
    (dict(adapters=["a", "zz"], combination_type="svd"), "Adapter zz does not exist"),
    (dict(adapters=["a", "b"], combination_type="mean"), "Invalid combination_type"),
    (dict(adapters=["a", "b"], combination_type="ties_svd"), "density"),
    (dict(adapters=["a", "b"], combination_type="ties_svd", density=0.5, majority_sign_method="max"),
     "majority_sign_method"),
    # larger than a layer's delta allows (PEFT: a bare shape error, and a half-built adapter left behind)
    (dict(adapters=["a", "b"], combination_type="svd", svd_rank=12), r"svd_rank=12 is larger than .* allows"),
])
def test_errors_leave_the_model_unchanged(call, match):
    theirs, ours = make_pair((4, 6))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    configs = dict(ours.peft_config)
    with pytest.raises(ValueError, match=match):
        ours.add_weighted_adapter(weights=[1.0, 1.0], adapter_name="mix", **call)
    if match == "same r value":
        with pytest.raises(ValueError, match="same r value"):
            theirs.add_weighted_adapter(weights=[1.0, 1.0], adapter_name="mix", **call)
    assert ours.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert ours.peft_config == configs and ours.active_adapters == ["a"]


def test_failure_while_combining_is_rolled_back(monkeypatch):
    _, ours = make_pair((4, 6))
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("svd did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(torch.linalg.LinAlgError):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd")
    assert "mix" not in ours.peft_config
    assert ours.state_dict().keys() == before.keys()
    assert not any(".mix" in n for n, _ in ours.named_modules())


def test_existing_name_is_left_alone():
    _, ours = make_pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "b", combination_type="linear")
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(19, 23)
        self.b = nn.Linear(23, 11)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("combination_type", ["cat", "linear", "svd", "ties"])
def test_combined_adapter_dtypes_on_a_bf16_model_match_peft(combination_type):
    """The combined adapter is made in the base's dtype, as PEFT makes it: 'cat' fills it in place (bf16 here),
    the other types replace its tensors (the float32 sources' dtype); its output then equals PEFT's."""
    got = {}
    for lib in (peft, peftfast):
        torch.manual_seed(0)
        model = lib.get_peft_model(_TwoLinear().to(torch.bfloat16),
                                   lib.LoraConfig(target_modules=["a", "b"], r=3, init_lora_weights=False),
                                   adapter_name="x")
        model.add_adapter("y", lib.LoraConfig(target_modules=["a", "b"], r=3, init_lora_weights=False))
        model.add_weighted_adapter(["x", "y"], [0.7, -1.3], "m", combination_type=combination_type, density=0.5)
        got[lib.__name__] = {n: p.detach() for n, p in model.named_parameters() if ".m." in f"{n}."}
    assert got["peft"].keys() == got["peftfast"].keys() and got["peft"]
    for name, theirs in got["peft"].items():
        assert got["peftfast"][name].dtype == theirs.dtype, name
        torch.testing.assert_close(got["peftfast"][name], theirs, rtol=1e-5, atol=1e-6, msg=name)
    assert {t.dtype for t in got["peft"].values()} == {torch.bfloat16 if combination_type == "cat" else torch.float32}
