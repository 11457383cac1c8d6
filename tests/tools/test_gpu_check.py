"""The GPU acceptance script (peftfast/tools/gpu_check.py) in its dry mode: what CI can prove
about it without a GPU. The sections' checks run here in Triton's interpreter (the kernel
tests' TRITON_INTERPRET=1), the parent's child processes and watchdog on real subprocesses."""
import json
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
    assert {n.rsplit(" ", 1)[1] for n in names} == {"out", "dX", "db", "dA", "dB"}


def test_stress_section_dry_checks_counters(interpreted):
    result = gc.section_stress(dry=True)
    assert result["status"] == "pass", result
    assert "arrival counters back at 0" in result["checks"][0]["name"]
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
