"""The GPU acceptance script (peftfast/tools/gpu_check.py) in its dry mode: what CI can prove
about it without a GPU. The sections' checks run here in Triton's interpreter (the kernel
tests' TRITON_INTERPRET=1), the parent's child processes and watchdog on real subprocesses."""
import json
import os
import sys

import pytest
import torch

from peftfast.tools import gpu_check as gc


@pytest.fixture
def interpreted(triton_backend):
    from peftfast.kernels.backend import interpreting

    if not interpreting():
        pytest.skip("the dry sections run the kernels in Triton's interpreter (TRITON_INTERPRET=1)")


def test_kernels_section_dry(interpreted):
    result = gc.section_kernels(dry=True)
    names = [c["name"] for c in result["checks"]]
    assert result["status"] == "pass", [c for c in result["checks"] if not c["ok"]]
    # fused LoRA (training and decode shapes, 16-bit and fp32 adapters), every quantised path, every gradient
    for part in ("lora_fused[x=float32,ad=float32,T=37", "lora_fused[x=float16,ad=float32,T=3,", "qlora_nf4[",
                 "qlora_nf4-nested[", "qlora_int8["):
        assert any(n.startswith(part) for n in names), part
    for part in ("lora_grouped_linear[", "lora_grouped[", "lora_grouped_qlinear_nf4-nested[", "lora_grouped_qlinear_int8["):
        assert any(n.startswith(part) for n in names), part
    assert {n.rsplit(" ", 1)[1] for n in names} == {"out", "dX", "db", "dA", "dB", "dbase", "dA0", "dA1", "dA2",
                                                    "dB0", "dB1", "dB2"}


def test_stress_section_dry_checks_counters(interpreted):
    result = gc.section_stress(dry=True)
    assert result["status"] == "pass", result
    assert "epoch counters within their epoch" in result["checks"][0]["name"]
    assert len(result["checks"]) > 3


def test_compare_fails_on_a_wrong_result():
    ref = torch.randn(5, 7, dtype=torch.float64)
    plain = ref.float()
    ok = gc.compare_to_float64("x", ref.float(), plain, ref)
    bad = gc.compare_to_float64("x", ref.float() + 1e-3, plain, ref)
    assert ok["ok"] and not bad["ok"] and "allowed" in bad["detail"]


def test_watchdog_reports_a_hang_and_a_crash():
    hang = gc.run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout=2)
    assert hang["status"] == "hang" and "watchdog" in hang["error"] and hang["seconds"] < 30
    crash = gc.run_child([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)
    assert crash["status"] == "fail" and "exited with 3" in crash["error"]


def test_dry_run_writes_json_and_summary(tmp_path):
    # the parent: one section child (bench) and the graphs section skipped without CUDA
    assert gc.main(["--dry", "--out", str(tmp_path), "--sections", "graphs,bench"]) == 0
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["ok"] and data["environment"]["mode"].startswith("dry")
    assert data["sections"]["graphs"]["status"] == "skipped"
    bench = data["sections"]["bench"]
    assert bench["status"] == "pass" and any(c["name"].startswith("modelled H100 lora") for c in bench["checks"])
    text = (tmp_path / "gpu-check.txt").read_text()
    assert "overall: PASS" in text and "[   PASS] bench" in text


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gc.main(["--dry", "--out", str(tmp_path), "--sections", "kernels,nope"])


def test_dispatch_section_dry(interpreted):
    """Dry: nothing is timed in the interpreter (a timer that fails if called), every path matches float64,
    and the selection runs with set timings."""
    result = gc.section_dispatch(dry=True)
    assert result["status"] == "pass", [c for c in result["checks"] if not c["ok"]]
    names = [c["name"] for c in result["checks"]]
    assert sum(n.startswith("dispatch T<=") for n in names) == len(gc.DRY_DISPATCH_CASES)
    for label in ("chosen", "fused", "unfused"):
        assert any(f" {label} dX" in n for n in names) and any(f" {label} out" in n for n in names)
    assert "selection with set timings (fused 2 ms, unfused 1 ms)" in names


def test_dispatch_checks_of_the_cuda_run_on_cpu(interpreted, monkeypatch, tmp_path):
    """The CUDA half of the section, driven on the interpreter's CPU tensors: measurement allowed there and
    CUDA events replaced by set times (unfused faster), each candidate run once."""
    from peftfast.kernels import autotune

    def timer(fn, warmup, repeats):
        fn()
        return {"fused": 2.0, "unfused": 1.0}[fn.__name__]

    monkeypatch.setattr(autotune, "tunable", lambda device: autotune.autotune_enabled())
    monkeypatch.setattr(autotune, "may_measure", lambda device: True)
    monkeypatch.setattr(autotune, "cuda_event_timer", timer)
    monkeypatch.setenv("PEFTFAST_AUTOTUNE", "0")  # the section measures even so (and restores the setting)
    checks = gc.dispatch_checks(torch.device("cpu"), gc.DRY_DISPATCH_CASES, tmp_path, expect_measured=True)
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    details = {c["name"]: c["detail"] for c in checks}
    assert sum(d.startswith("unfused won: fused 2.000 ms, unfused 1.000 ms") for d in details.values()) == 2
    assert details["decisions written and read back by a fresh tuner"].startswith("2 key(s) in dispatch-cpu-")
    assert details["PEFTFAST_AUTOTUNE=0: nothing timed"] == "0 decision(s)"
    assert os.environ["PEFTFAST_AUTOTUNE"] == "0"
    # and it fails when a candidate could not be timed

    def failing(fn, warmup, repeats):
        if fn.__name__ == "unfused":
            raise RuntimeError("launch failed")
        return 1.0

    monkeypatch.setattr(autotune, "cuda_event_timer", failing)
    checks = gc.dispatch_checks(torch.device("cpu"), gc.DRY_DISPATCH_CASES[:1], tmp_path / "b", expect_measured=True)
    assert not next(c for c in checks if c["name"].startswith("dispatch T<="))["ok"]


def test_bench_section_lists_the_dispatch_winners(monkeypatch):
    """The measured half of the bench section (CUDA) on stand-in rows: a dispatch row becomes a check that
    names the winner and every candidate's time."""
    from peftfast.tools.bench import cuda_time

    rows = [{"section": "cuda_time", "key": "lora", "label": "LoRA linear", "path": "peftfast", "available": True,
             "fwd_ratio": 1.01, "bwd_ratio": 1.1},
            {"section": "dispatch", "key": "lora", "label": "LoRA linear", "device": "G", "op": "lora_linear_fused",
             "shape": "T<=2048 4096->4096 r=16 bf16/fp32 fwd+bwd", "choice": "unfused", "source": "measured",
             "ms": {"fused": None, "unfused": 1.0}}]
    monkeypatch.setattr(cuda_time, "cuda_time_rows", lambda quick: rows)
    result = gc.section_bench(dry=False)
    assert result["status"] == "pass"
    check = next(c for c in result["checks"] if c["name"].startswith("dispatch "))
    assert check["name"] == "dispatch LoRA linear: T<=2048 4096->4096 r=16 bf16/fp32 fwd+bwd"
    assert check["detail"] == "unfused won (fused failed, unfused 1.000 ms; measured)"
