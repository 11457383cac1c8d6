"""The ops are torch.library custom ops: schema, fake impls and autograd pass opcheck, and
torch.compile(fullgraph=True) traces a model using them without graph breaks."""
import pytest
import torch
from peftfast.kernels import ia3 as I
from peftfast.kernels import lora as L

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _lora_args(dropout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 24, generator=g, requires_grad=True)
    base = torch.randn(3, 11, 20, generator=g, requires_grad=True)
    a = [torch.randn(r, 24, generator=g, requires_grad=True) for r in (3, 5)]
    b = [torch.randn(20, r, generator=g, requires_grad=True) for r in (3, 5)]
    ps = [0.1, 0.3] if dropout else [0.0, 0.0]
    return (x, base, a, b, [0.5, 2.0], ps, torch.tensor(2**40 + 7))


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
def test_opcheck_lora_linear(backend, dropout):
    torch.library.opcheck(torch.ops.peftfast.lora_linear.default, _lora_args(dropout),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_ia3_linear(backend, feedforward, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=g, requires_grad=True)
    w = torch.randn(20, 24, generator=g, requires_grad=True)
    b = torch.randn(20, generator=g, requires_grad=True) if bias else None
    s = torch.randn(24 if feedforward else 20, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.peftfast.ia3_linear.default, (x, w, b, s, feedforward),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("round_to_scale", [True, False])
def test_opcheck_ia3_scale(backend, round_to_scale):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 24, generator=g, requires_grad=True)
    s = torch.randn(24, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.peftfast.ia3_scale.default, (x, s, round_to_scale),
                          test_utils=OPCHECK_TESTS)


class TinyModel(torch.nn.Module):
    """A LoRA layer with two adapters and dropout, an IA3 feedforward layer, an IA3 output scale."""

    def __init__(self, d=24, h=20):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.base = torch.nn.Linear(d, h)
        param = torch.nn.Parameter
        self.a = torch.nn.ParameterList(param(torch.randn(r, d, generator=g) * 0.2) for r in (4, 2))
        self.b = torch.nn.ParameterList(param(torch.randn(h, r, generator=g) * 0.2) for r in (4, 2))
        self.ff = torch.nn.Linear(h, d)
        self.ff_scale = torch.nn.Parameter(1 + 0.1 * torch.randn(h, generator=g))
        self.out_scale = torch.nn.Parameter(1 + 0.1 * torch.randn(d, generator=g))

    def forward(self, x):
        h = L.lora_linear(x, self.base(x), list(self.a), list(self.b), [2.0, 0.5], [0.1, 0.2], self.training)
        h = I.ia3_linear(torch.relu(h), self.ff.weight, self.ff.bias, self.ff_scale, True)
        return I.ia3_scale_output(h, self.out_scale)


def _step(model, x, seed, fwd=None):
    """One training step through ``fwd`` (the compiled model, or the model itself)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = (model if fwd is None else fwd)(x)
    y.pow(2).mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _graph_ops(model, x):
    """Compile with a backend that records the graph; fullgraph=True fails on any break."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=record)(x)
    assert len(graphs) == 1
    return {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}


def test_compiled_graph_holds_the_custom_ops(backend):
    """The LoRA and IA3 ops trace as custom ops; on the PyTorch path the IA3 linear is PEFT's own
    two aten ops (no custom op around them), which trace as they are."""
    ops = _graph_ops(TinyModel().train(), torch.randn(2, 5, 24))
    expected = ("peftfast.lora_linear", "peftfast.ia3_scale") + (("peftfast.ia3_linear",) if backend == "triton" else ())
    for name in expected:
        assert name in ops, f"{name} not in the compiled graph: {sorted(ops)}"
    if backend == "torch":
        assert "peftfast.ia3_linear" not in ops


def _aot_eager_matches_eager(model, x, seed):
    """torch.compile(fullgraph=True, backend="aot_eager") gives eager's output and every gradient for the same
    seed; returns (the compiled model, its output)."""
    y_eager, g_eager = _step(model, x, seed=seed)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_comp, g_comp = _step(model, x, seed=seed, fwd=compiled)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-5, atol=1e-6, msg=name)
    return compiled, y_comp

def test_compile_aot_eager_matches_eager(backend):
    torch._dynamo.reset()
    model = TinyModel().train()
    x = torch.randn(2, 5, 24, requires_grad=False)
    compiled, y_comp = _aot_eager_matches_eager(model, x, seed=7)
    # a second step with another seed: new dropout masks, still equal to eager
    y2_comp, _ = _step(model, x, seed=8, fwd=compiled)
    y2_eager, _ = _step(model, x, seed=8)
    torch.testing.assert_close(y2_comp, y2_eager, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y2_comp, y_comp)


def test_compile_inductor_matches_eager(torch_backend):
    """Inductor (CPU) with the reference backend; fallback_random so its seed draw matches eager."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = TinyModel().train()
    x = torch.randn(2, 5, 24)
    y_eager, g_eager = _step(model, x, seed=9)
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        y_comp, g_comp = _step(model, x, seed=9, fwd=compiled)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# qlora_linear_fused: one custom op per weight format (4-bit, int8), traced without a graph break
# ----------------------------------------------------------------------------------------------
def _quantised(kind, n=20, k=64):
    from peftfast.kernels.qlora import Int8Weight
    from peftfast.kernels.quant import Packed4bit

    g = torch.Generator().manual_seed(4)
    if kind == "int8":
        return Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                          torch.rand(n, generator=g) + 0.5)
    code = torch.sort(torch.randn(16, generator=g)).values
    return Packed4bit(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=g),
                      torch.rand(n * k // 64, generator=g) + 0.5, code, 64, (n, k), torch.float32)


class TinyQLoraModel(torch.nn.Module):
    """A QLoRA layer (quantised base + bias, two adapters with dropout)."""

    def __init__(self, kind, d=64, h=20):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.p = _quantised(kind, h, d)
        self.bias = torch.nn.Parameter(torch.randn(h, generator=g))
        param = torch.nn.Parameter
        self.a = torch.nn.ParameterList(param(torch.randn(r, d, generator=g) * 0.2) for r in (4, 2))
        self.b = torch.nn.ParameterList(param(torch.randn(h, r, generator=g) * 0.2) for r in (4, 2))

    def forward(self, x):
        from peftfast.kernels.qlora import qlora_linear_fused

        return qlora_linear_fused(x, self.p, self.bias, list(self.a), list(self.b), [2.0, 0.5], [0.1, 0.2],
                                  self.training)


@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_opcheck_qlora_linear_fused(backend, kind):
    g = torch.Generator().manual_seed(6)
    p = _quantised(kind)
    x = torch.randn(3, 4, 64, generator=g, requires_grad=True)
    bias = torch.randn(20, generator=g, requires_grad=True)
    a = [torch.randn(r, 64, generator=g, requires_grad=True) for r in (3, 5)]
    b = [torch.randn(20, r, generator=g, requires_grad=True) for r in (3, 5)]
    adapters = (a, b, [0.5, 2.0], [0.1, 0.3], torch.tensor(2**40 + 7))
    if kind == "int8":
        op, args = torch.ops.peftfast.qlora_linear_fused_int8.default, (x, p.cb, p.scb, bias, *adapters)
    else:
        op = torch.ops.peftfast.qlora_linear_fused_4bit.default
        args = (x, p.data, p.absmax, p.code, p.blocksize, 20, 64, p.dtype, None, None, 256, None, bias, *adapters)
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_qlora_compiles_to_one_op_and_matches_eager(torch_backend, kind):
    """The reference path under torch.compile(fullgraph=True): the graph holds the QLoRA op (not the
    quantised matmul followed by lora_linear), and aot_eager gives eager's output and gradients."""
    model = TinyQLoraModel(kind).train()
    x = torch.randn(2, 5, 64)
    ops = _graph_ops(model, x)
    assert f"peftfast.qlora_linear_fused_{kind}" in ops, sorted(ops)
    assert not {"peftfast.matmul_4bit", "peftfast.matmul_int8", "peftfast.lora_linear"} & ops, sorted(ops)
    torch._dynamo.reset()
    _aot_eager_matches_eager(model, x, seed=11)
