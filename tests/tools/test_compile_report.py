"""The AOT compile report: measured on small kernels defined here, then run over the real kernels.

The kernels below exist only to exercise the report: a masked copy and a small matmul that must
pass on every architecture, and kernels built to fail one specific check (a compile error, a
block too big for the 99 KiB of sm_86/sm_89 but not for sm_80/sm_90, a register-hungry block
that spills, a spec claiming tensor cores for an elementwise kernel). The compile workers load
this file by path (``SpecSource(path=__file__, factory=...)``).
"""
import json

import pytest
import triton
import triton.language as tl
from peftfast.kernels.aot import AotSpec

from peftfast.tools import compile_report as cr

pytestmark = pytest.mark.slow


@triton.jit
def toy_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def toy_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k + offs_k)[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & ((k + offs_k)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=((k + offs_k)[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def toy_transpose(x_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the transposed store goes through shared memory: BLOCK_M * BLOCK_N elements of it
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    x = tl.load(x_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask)
    tl.store(y_ptr + offs_n[:, None] * M + offs_m[None, :], tl.trans(x), mask=tl.trans(mask))


@triton.jit
def toy_normalize(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # every element stays live across the reductions: BLOCK / (32 * num_warps) values per thread
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    for _ in range(4):
        x = x - tl.sum(x, axis=0) / BLOCK
        x = x * tl.rsqrt(tl.sum(x * x, axis=0) / BLOCK + 1e-6)
    tl.store(y_ptr + offs, x, mask=offs < n)


@triton.jit
def toy_broken(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK = 48: not a power of two, rejected by the compiler
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


@triton.jit
def toy_scaled_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr, SCALE: tl.constexpr = 2):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)


_COPY_SIG = {"x_ptr": "", "y_ptr": "", "n": "i32", "BLOCK": "constexpr"}


def _copy(dtype):
    sig = dict(_COPY_SIG, x_ptr=f"*{dtype}", y_ptr=f"*{dtype}")
    return AotSpec(f"toy_copy[{dtype}]", toy_copy, sig, {"BLOCK": 1024}, num_warps=4, num_stages=1)


def _matmul(dtype, bm, bn, bk):
    ints = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn"]
    sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", **{k: "i32" for k in ints},
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    return AotSpec(f"toy_matmul[{dtype},{bm}x{bn}x{bk}]", toy_matmul, sig,
                   {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=3, uses_dot=True)


def good_specs():
    return [_copy("fp16"), _copy("bf16"), _copy("fp32"), _matmul("bf16", 64, 64, 32), _matmul("fp16", 64, 64, 32)]


def bad_specs():
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "N": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    return [
        AotSpec("broken", toy_broken, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 48}),
        AotSpec("big_transpose", toy_transpose, sig, {"BLOCK_M": 256, "BLOCK_N": 256}, num_warps=16, num_stages=1),
        AotSpec("spills", toy_normalize, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                {"BLOCK": 8192}, num_warps=1, num_stages=1),
        AotSpec("no_dot", toy_copy, dict(_COPY_SIG, x_ptr="*fp16", y_ptr="*fp16"), {"BLOCK": 1024}, uses_dot=True),
        # SCALE (a constexpr with a default) left out of the constexprs: it would compile as an i32 argument
        AotSpec("constexpr_as_argument", toy_scaled_copy, dict(_COPY_SIG, x_ptr="*fp32", y_ptr="*fp32", SCALE="i32"),
                {"BLOCK": 1024}),
    ]


def all_toy_specs():
    return good_specs() + bad_specs()


@pytest.fixture(scope="module")
def toy_report():
    missing = cr.SpecSource(module="peftfast.kernels.no_such_module")
    return cr.run_report([cr.SpecSource(path=__file__, factory="all_toy_specs"), missing])


def _rows(report, spec):
    rows = {r.arch: r for r in report.rows if r.spec == spec}
    assert sorted(rows) == sorted(cr.ARCHS), f"{spec}: expected one row per arch, got {sorted(rows)}"
    return rows


def test_shared_memory_limits_per_arch():
    # CUDA C++ Programming Guide, max shared memory per block (opt-in), in KiB
    assert {cc: v // 1024 for cc, v in cr.SHARED_LIMIT.items()} == {80: 163, 86: 99, 89: 99, 90: 227}


def test_good_kernels_pass_everywhere(toy_report):
    for spec in good_specs():
        for arch, row in _rows(toy_report, spec.name).items():
            assert row.ok, f"{spec.name} sm_{arch}: {row.errors}"
            assert row.registers and 0 < row.registers <= 255
            assert row.spill_stores == 0 and row.spill_loads == 0
            assert row.shared is not None and row.shared <= cr.SHARED_LIMIT[arch]
            assert row.compile_s > 0


def test_matmul_uses_tensor_cores(toy_report):
    for spec in good_specs():
        if not spec.uses_dot:
            continue
        rows = _rows(toy_report, spec.name)
        for arch in (80, 86, 89):
            assert rows[arch].tensor_cores_ptx == "mma"
        # a 64x64 tile with 4 warps is big enough for Hopper's warp-group MMA
        assert rows[90].tensor_cores_ptx == "wgmma"
        assert rows[80].shared > 0  # operands staged through shared memory


def test_compile_error_is_a_failure(toy_report):
    for row in _rows(toy_report, "broken").values():
        assert not row.ok and row.errors[0].startswith("compile failed")
        assert row.registers is None


def test_shared_memory_over_the_arch_limit_fails(toy_report):
    rows = _rows(toy_report, "big_transpose")
    assert all(r.shared == 256 * 256 * 2 for r in rows.values())  # 128 KiB for the fp16 transpose
    smem_fail = {arch for arch, r in rows.items() if any("shared memory" in e for e in r.errors)}
    assert smem_fail == {86, 89}  # over 99 KiB, under 163 KiB (sm_80) and 227 KiB (sm_90)


def test_constexpr_compiled_as_an_argument_fails(toy_report):
    for row in _rows(toy_report, "constexpr_as_argument").values():
        assert [e for e in row.errors if e.startswith("constexpr parameters compiled as runtime arguments: SCALE")]


def test_spills_fail(toy_report):
    for row in _rows(toy_report, "spills").values():
        assert row.spill_stores > 0
        assert any("register spills" in e for e in row.errors)


def test_missing_tensor_cores_fail(toy_report):
    for row in _rows(toy_report, "no_dot").values():
        assert row.tensor_cores_ptx == ""
        assert row.errors == ["uses_dot but no tensor-core instruction (mma.sync / wgmma) in the PTX"]


def test_report_table_and_status(toy_report):
    assert not toy_report.ok
    text = cr.format_report(toy_report)
    assert "toy_matmul[bf16,64x64x32]" in text and "FAIL: register spills" in text
    assert f"{len(toy_report.rows)} compiles" in text


def test_sass_check_and_json(tmp_path):
    report = cr.run_report([cr.SpecSource(path=__file__, factory="good_specs")], archs=(80, 90), sass=True)
    assert report.ok, cr.format_report(report)
    sass = {(r.spec, r.arch): r.tensor_cores_sass for r in report.rows if r.uses_dot}
    assert sass and all(v for v in sass.values())
    assert sass[("toy_matmul[bf16,64x64x32]", 90)] == "HGMMA"
    assert sass[("toy_matmul[bf16,64x64x32]", 80)] == "HMMA"
    data = cr.report_json(report)
    assert data["ok"] and data["triton"] == triton.__version__ and data["git_sha"]
    assert len(data["rows"]) == len(report.rows) == 2 * len(good_specs())
    json.dumps(data)


def test_main_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cr, "discover_sources", lambda: [cr.SpecSource(path=__file__, factory="bad_specs")])
    out = tmp_path / "report.json"
    assert cr.main(["--arch", "86", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert not data["ok"] and {r["arch"] for r in data["rows"]} == {86}
    assert "FAIL" in capsys.readouterr().out


def test_module_that_does_not_import_is_reported(toy_report):
    assert len(toy_report.problems) == 1
    assert "no_such_module: cannot load specs: ModuleNotFoundError" in toy_report.problems[0]


def test_real_kernels_compile_cleanly():
    """Every hand-written AotSpec of every kernel module, for sm_80, sm_86, sm_89 and sm_90, and a subset of
    the launched ones (``launch_specs.ci_specs``: aligned shapes, decode, double-quantised QLoRA on sm_86;
    the whole launched list is the manual ``peftfast compile-report``)."""
    report = cr.run_report(cr.ci_sources())
    assert any("launch_specs" in r.source for r in report.rows)
    print(cr.format_report(report))
    assert report.rows, "no kernel module defines aot_specs()"
    assert report.ok, cr.format_report(report)


def test_only_compiles_the_matching_specs():
    source = cr.SpecSource(path=__file__, factory="good_specs")
    report = cr.run_report([source], archs=(86,), only=r"^toy_copy\[")
    assert report.rows and {r.spec.split("[")[0] for r in report.rows} == {"toy_copy"}, cr.format_report(report)
    assert len(report.rows) < len(good_specs())
    none = cr.run_report([source], archs=(86,), only="no_such_spec")
    assert not none.ok and "no spec name matches --only 'no_such_spec'" in none.problems[0]


def aligned_specs():
    sig = dict(_COPY_SIG, x_ptr="*fp16", y_ptr="*fp16")
    return [AotSpec("toy_copy_aligned[fp16]", toy_copy, sig, {"BLOCK": 1024}, num_warps=4, num_stages=1,
                    aligned=("x_ptr", "y_ptr", "n"), options={"enable_fp_fusion": False}, archs=(86,))]


def test_aligned_spec_builds_for_its_archs_only():
    """A launched spec (divisibility attributes, compile options, one architecture) is built for that
    architecture alone, with tt.divisibility on the aligned arguments."""
    spec = aligned_specs()[0]
    assert spec.attrs() == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                            (2,): [["tt.divisibility", 16]]}
    report = cr.run_report([cr.SpecSource(path=__file__, factory="aligned_specs")])
    assert [(r.spec, r.arch) for r in report.rows] == [("toy_copy_aligned[fp16]", 86)], cr.format_report(report)
    assert report.ok, cr.format_report(report)
