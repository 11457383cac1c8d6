"""``peftfast bench --quick``: labelled tables, and JSON rows holding computed, self-consistent numbers.

One run of the console script (as a user runs it: Triton's interpreter off) is shared by the tests.
They recompute what can be recomputed from first principles (the bytes of a bf16 GEMM, of an NF4
weight, of the decode GEMM's operands) and check every ratio against the row's own numbers.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

T, D = 8192, 4096


def _command() -> list[str]:
    script = Path(sys.executable).with_name("peftfast")
    found = str(script) if script.exists() else shutil.which("peftfast")
    if found:
        return [found]
    return [sys.executable, "-I", "-c", "import sys; from peftfast.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFTFAST_BACKEND")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(_command() + ["bench", "--quick", "--out", str(out)], capture_output=True,
                          text=True, env=env, cwd=out.parent, timeout=600, check=False)
    assert out.exists(), f"no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text()), out


def rows(doc, section, **match):
    return [r for r in doc["rows"]
            if r["section"] == section and all(r.get(k) == v for k, v in match.items())]


def test_runs_and_prints_labelled_tables(run):
    proc, doc, out = run
    assert proc.returncode == (0 if doc["meta"]["calibrated"] else 1), proc.stderr[-2000:]
    for title in ("== Calibration: bytes and launches counted",
                  "== Modelled time (from counted traffic, NOT measured)", "-- H100:", "-- RTX 4090:",
                  "One LoRA linear", "NF4 QLoRA linear", "IA3 linear", "NF4 decode, T=1..16",
                  "== Measured memory (CPU, this machine)",
                  "== Measured CPU wall time (this machine, 1 torch thread)", "== Targets (DESIGN)",
                  f"rows: {out}"):
        assert title in proc.stdout, f"missing {title!r} in the output"
    assert "Traceback" not in proc.stderr


def test_json_records_device_versions_and_sha(run):
    _, doc, out = run
    meta = doc["meta"]
    assert meta["cpu"] and meta["torch_threads"] == 1 and meta["quick"] is True
    for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        assert meta["versions"][dist], dist
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    if head:
        assert meta["git_sha"] == head and isinstance(meta["git_dirty"], bool)
    datetime.fromisoformat(meta["timestamp"])
    png = Path(meta["plot"])
    assert png == out.with_suffix(".png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_rows_agree_with_their_own_counts(run):
    _, doc, _ = run
    checks = [r for r in rows(doc, "calibration") if not r.get("error")]
    names = " ".join(r["name"] for r in checks)
    for part in ("eager PEFT path", "peftfast lora_linear", "4-bit decode", "4-bit GEMM dX",
                 "IA3 fused matmul"):
        assert part in names, part
    for r in checks:
        close = abs(r["counted_bytes"] - r["modelled_bytes"]) <= r["tolerance"] * r["modelled_bytes"]
        assert r["ok"] == (close and r["counted_launches"] == r["modelled_launches"]), r
        assert r["counted_bytes"] > 0
    every = rows(doc, "calibration")
    assert doc["meta"]["calibrated"] == (bool(checks) and all(r["ok"] for r in every))


def test_modelled_ratios_follow_from_the_rows(run):
    _, doc, _ = run
    modelled = rows(doc, "modelled")
    assert {r["gpu"] for r in modelled} == {"H100", "RTX 4090"}
    gemm_bytes = 2 * (T * D * 2) + D * D * 2  # X and Y in bf16, plus W
    for r in modelled:
        for key in ("fwd", "bwd"):
            if f"{key}_ratio" not in r:
                continue
            time_s, base_s = r[f"{key}_time_s"], r[f"{key}_base_time_s"]
            assert math.isclose(r[f"{key}_ratio"], time_s / base_s, rel_tol=1e-12)
            ovh_s, base_ovh_s = r[f"{key}_time_ovh_s"], r[f"{key}_base_time_ovh_s"]
            assert math.isclose(r[f"{key}_ratio_ovh"], ovh_s / base_ovh_s, rel_tol=1e-12)
            # a path can never beat its own bytes at the GPU's bandwidth
            assert time_s >= r[f"{key}_bytes"] / r["bandwidth"] * (1 - 1e-12)
            assert ovh_s == pytest.approx(time_s + r[f"{key}_launches"] * r["launch_overhead_s"])
            if f"{key}_target" in r:
                assert r[f"{key}_met"] == (r[f"{key}_ratio_ovh"] <= r[f"{key}_target"])
        if "base" in r["path"]:
            assert r["fwd_bytes"] == gemm_bytes and r["fwd_ratio"] == 1.0
    for op, path, targets in (
            ("lora", "peftfast, fp32 adapters, dropout 0.1", (1.07, 1.13)),
            ("qlora_nf4", "peftfast: fused 4-bit GEMM + lora_linear, dropout 0.1", (1.11, 1.18))):
        found = rows(doc, "modelled", op=op, path=path)
        assert len(found) == 2 and all((r["fwd_target"], r["bwd_target"]) == targets for r in found)
    peft = rows(doc, "modelled", gpu="H100", op="lora", path="PEFT, bf16 adapters, dropout 0.1")[0]
    assert 1.5 < peft["fwd_ratio"] < 1.7 and 1.6 < peft["bwd_ratio"] < 1.9  # DESIGN: PEFT ~1.6 / ~1.75


def test_decode_rows_against_the_nf4_storage(run):
    _, doc, _ = run
    decode = rows(doc, "decode")
    assert sorted({r["T"] for r in decode}) == list(range(1, 17))
    weight = math.ceil(D * D / 2) + (D * D // 64) * 4 + 16 * 4  # packed nibbles, fp32 absmax per 64, code
    for r in decode:
        assert r["packed_absmax_code_bytes"] == weight
        assert r["gemm_read"] == weight + r["T"] * D * 2  # the weight once, plus x
        assert r["reduce_read"] == (r["split"] * r["T"] * D * 4 if r["split"] > 1 else 0)  # no split: no reduce
        assert math.isclose(r["total_ratio"], (r["gemm_read"] + r["reduce_read"]) / weight, rel_tol=1e-12)
        assert r["met"] == (r["total_ratio"] <= 1.05)
        assert r["met"], r  # the decode bound holds for every T


def test_memory_rows_measure_what_dropout_costs(run):
    proc, doc, _ = run
    saved = {(r["path"], r["dropout"]): r for r in rows(doc, "memory", what="saved_activations")}
    assert set(saved) == {("peftfast", 0.1), ("peftfast", 0.0), ("peft", 0.1), ("peft", 0.0)}
    # the measurement sees PEFT's dropout, and peftfast's dropout costs nothing on top of no dropout
    assert saved["peft", 0.1]["saved_bytes"] > saved["peft", 0.0]["saved_bytes"]
    assert saved["peftfast", 0.1]["saved_bytes"] <= saved["peft", 0.0]["saved_bytes"]
    assert saved["peftfast", 0.1]["bool_bytes"] == 0
    qlora = {r["path"]: r for r in rows(doc, "memory", what="qlora_step")}
    assert set(qlora) == {"peftfast", "peft"}, [r for r in doc["rows"] if r.get("available") is False]
    for r in qlora.values():
        assert r["weights_packed_4bit"] * 2 == r["weights_quantised_numel"]  # two 4-bit values per byte
        assert r["quantised_as_bf16"] == 2 * r["weights_quantised_numel"]
        assert r["optimizer_state"] >= 2 * r["weights_trainable"]  # AdamW's two moments per adapter weight
        assert r["saved_bytes"] > 0
    assert qlora["peftfast"]["saved_bytes"] < qlora["peft"]["saved_bytes"]
    assert re.search(r"saved activations\s+[\d.]+\s+[\d.]+\s+0\.\d+", proc.stdout)


def test_cpu_time_rows_are_quantiles_of_measured_pairs(run):
    _, doc, _ = run
    timed = rows(doc, "cpu_time")
    assert {r["key"] for r in timed} >= {"lora_linear_p0", "lora_linear_p0.1", "llama_step_p0.1", "ia3_ff",
                                         "qlora_nf4_p0.1"}
    for r in timed:
        assert r["available"], r
        samples = np.array(r["ratio_samples"])
        assert len(samples) == r["repeats"] and (samples > 0).all() and r["threads"] == 1
        q1, med, q3 = np.percentile(samples, [25, 50, 75])
        assert (r["ratio_q1"], r["ratio_median"], r["ratio_q3"]) == pytest.approx((q1, med, q3), rel=1e-12)
        assert r["peftfast_median_s"] > 0 and r["peft_median_s"] > 0


def test_bad_arguments_say_what_is_allowed(capsys):
    from peftfast.tools.bench import main

    with pytest.raises(SystemExit) as err:
        main(["--threads", "0"])
    assert err.value.code == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_unusable_parts_degrade_to_a_stated_reason(monkeypatch):
    from peftfast.tools import bench
    from peftfast.tools.bench import cpu_time, memory

    def broken():
        raise ImportError("the 4-bit LoRA layer cannot be imported")

    monkeypatch.setattr(memory, "lora_memory_rows", lambda: [])
    monkeypatch.setattr(memory, "prompt_memory_rows", lambda: [])
    monkeypatch.setattr(memory, "qlora_memory_rows", broken)
    mem_rows, errors = bench.measure_memory()
    assert mem_rows == [] and errors == {"qlora": "ImportError: the 4-bit LoRA layer cannot be imported"}
    assert "QLoRA memory: not available: ImportError: the 4-bit LoRA layer cannot be imported" in \
        bench.memory_lines(mem_rows, errors)
    failing = [bench.Comparison("q", "QLoRA layer", broken)]
    monkeypatch.setattr(cpu_time, "cpu_comparisons", lambda quick: failing)
    timed = bench.cpu_time_rows(quick=True)
    assert timed[0]["available"] is False and "cannot be imported" in timed[0]["reason"]
    assert "QLoRA layer: not available: ImportError: the 4-bit LoRA layer cannot be imported" in \
        bench.cpu_time_lines(timed)
    assert any(line.startswith("not available: QLoRA layer") for line in bench.summary_lines(timed))


def test_gpu_timing_rows_are_ratios_to_the_base(monkeypatch):
    """The CUDA path (do_bench on the Triton kernels) cannot run here: drive its bookkeeping with
    the same builders on CPU tensors and a wall-clock stand-in for do_bench."""
    import torch

    from peftfast.tools import bench
    from peftfast.tools.bench import cuda_time

    def fake_do_bench(fn, quick):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return tuple(float(v) for v in np.percentile(times, [50, 25, 75]))

    comps = [bench.Comparison("lora", "LoRA linear", lambda: bench.build_lora_linear(64, 48, 4, 0.1)),
             bench.Comparison("ia3", "IA3 linear", lambda: bench.build_ia3_linear(64, 48, True))]
    monkeypatch.setattr(cuda_time, "do_bench_ms", fake_do_bench)
    monkeypatch.setattr(cuda_time, "cuda_comparisons", lambda quick: comps)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    timed = bench.cuda_time_rows(quick=True)
    want = {(key, path) for key in ("lora", "ia3") for path in ("peftfast", "peft")}
    assert {(r["key"], r["path"]) for r in timed} == want
    for r in timed:
        assert r["fwd_ratio"] == pytest.approx(r["fwd_ms"][0] / r["base_fwd_ms"][0])
        base_bwd = r["base_step_ms"][0] - r["base_fwd_ms"][0]
        if base_bwd > 0:
            assert r["bwd_ratio"] == pytest.approx((r["step_ms"][0] - r["fwd_ms"][0]) / base_bwd)
    lines = bench.cuda_time_lines(timed, "some GPU")
    assert lines[0].startswith("== Measured GPU time (some GPU, triton.testing.do_bench")
    assert len(lines) == 3 + 4  # title, header, rule, one row per comparison and library


def test_gpu_timing_reports_which_dispatch_path_won(monkeypatch, tmp_path):
    """The keys the comparisons decided (kernels/autotune.py) come back as "dispatch" rows of their comparison
    and as a table of the winners; PEFTFAST_AUTOTUNE=0 is said instead."""
    import torch

    from peftfast.kernels import autotune
    from peftfast.tools import bench
    from peftfast.tools.bench import cuda_time

    times = {"fused": 1.25, "unfused": 1.0}
    tuner = autotune.Tuner(timer=lambda fn, warmup, repeats: times[fn.__name__], directory=tmp_path, version="t")
    key = ("lora_linear_fused", 2048, 4096, 4096, 16, 1, "bf16", "fp32", "fwd+bwd+dropout")

    def fused():
        return None

    def unfused():
        return None

    def build():
        tuner.choose("Some GPU", key, {"fused": fused, "unfused": unfused}, "fused")
        return {"base": bench.Side(lambda: None, lambda: None), "peftfast": bench.Side(lambda: None, lambda: None)}

    monkeypatch.setattr(autotune, "TUNER", tuner)
    monkeypatch.setattr(cuda_time, "do_bench_ms", lambda fn, quick: (1.0, 0.9, 1.1))
    monkeypatch.setattr(cuda_time, "cuda_comparisons", lambda quick: [bench.Comparison("lora", "LoRA linear", build),
                                                                      bench.Comparison("again", "same key", build)])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = bench.cuda_time_rows(quick=True)
    picked = [r for r in rows if r["section"] == "dispatch"]
    assert picked == [{"section": "dispatch", "key": "lora", "label": "LoRA linear", "device": "Some GPU",
                       "op": "lora_linear_fused", "shape": "T<=2048 4096->4096 r=16 bf16/fp32 fwd+bwd+dropout",
                       "choice": "unfused", "source": "measured", "ms": {"fused": 1.25, "unfused": 1.0}}]
    lines = bench.cuda_time_lines(rows, "Some GPU")
    assert any(line.startswith("== Dispatch: the path that won per key") for line in lines)
    row = next(line for line in lines if line.startswith("LoRA linear  T<=2048"))
    assert row.split()[-4:] == ["unfused", "1.250", "1.000", "measured"]
    monkeypatch.setenv("PEFTFAST_AUTOTUNE", "0")
    assert bench.cuda_time_lines(rows, "Some GPU")[-1] == \
        "dispatch: PEFTFAST_AUTOTUNE=0: the fused paths ran, nothing was measured"


def test_rows_are_written_when_the_plot_cannot_be(monkeypatch, tmp_path):
    """Without matplotlib (or with one that fails to import its parts) the JSON is still written,
    records no plot, and the last line says the plot was skipped."""
    from peftfast.tools.bench import cli

    rows = [{"section": "modelled", "path": "x"}]
    out = tmp_path / "rows.json"
    monkeypatch.setattr(cli, "plotting_available", lambda: False)
    note = cli.write_outputs(out, {"quick": True}, rows, [], plot=True)
    assert note == "; plot skipped: matplotlib is not installed"
    assert json.loads(out.read_text()) == {"meta": {"quick": True, "plot": None}, "rows": rows}
    assert not out.with_suffix(".png").exists()

    def broken(model_rows, path):
        raise ImportError("no module named 'matplotlib.backends'")

    monkeypatch.setattr(cli, "plotting_available", lambda: True)
    monkeypatch.setattr(cli, "write_plot", broken)
    note = cli.write_outputs(out, {"quick": True}, rows, [], plot=True)
    assert note.startswith("; plot skipped: ImportError") and json.loads(out.read_text())["meta"]["plot"] is None
    assert cli.write_outputs(out, {"quick": True}, rows, [], plot=False) == ""
