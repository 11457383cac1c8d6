"""The demo: the shipped base has really learned its task, and the end-to-end run works and can fail."""

import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from peftfast.demo import base, main, run, task


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    # As the demo does: tiny matmuls gain nothing from more threads and crawl on busy cores.
    with task.cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def shipped():
    with base.quiet_loading():
        return base.load_base("cpu")


@pytest.fixture(scope="module")
def fresh_strings():
    # Disjoint from the demo's held-out set and drawn from a stream neither pretraining nor the demo uses.
    return task.random_strings(random.Random(20240607), 200, exclude=frozenset(task.eval_strings()))


def test_shipped_base_copies_strings_it_never_saw(shipped, fresh_strings):
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "pad_token_id",
              "bos_token_id", "eos_token_id"]
    expected = base.base_config()
    assert {f: getattr(shipped.config, f) for f in fields} == {f: getattr(expected, f) for f in fields}, (
        "the shipped config.json differs from base_config(); "
        "rebuild with `python -m peftfast.demo.base --rebuild`"
    )
    assert shipped.config.vocab_size == len(task.VOCAB)
    acc = task.exact_match(shipped, ">", fresh_strings, "cpu")
    assert acc >= base.MIN_COPY_ACCURACY, f"shipped base copies only {acc:.1%} of fresh strings"


def test_copying_is_learned_not_free(fresh_strings):
    # The same architecture untrained gets nothing right, so the accuracy above measures training.
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(base.base_config()).eval()
    assert task.exact_match(untrained, ">", fresh_strings, "cpu") < 0.05


def test_shipped_base_cannot_reverse(shipped, fresh_strings):
    # Reversal is new to the base: whatever the demo's adapter reaches, the base did not have.
    assert task.exact_match(shipped, "<", fresh_strings, "cpu") <= 0.2


def test_pretraining_is_seed_deterministic():
    a = base.pretrain(steps=3, progress=False).state_dict()
    b = base.pretrain(steps=3, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_rebuild_reaches_the_shipped_accuracy(tmp_path, capsys):
    assert base.main(["--rebuild", "--out", str(tmp_path)]) == 0
    rebuilt = base.load_base("cpu", tmp_path)
    assert base.copy_accuracy(rebuilt) >= base.MIN_COPY_ACCURACY
    assert (tmp_path / "config.json").is_file()


def read_results(out_dir):
    results = json.loads((out_dir / "demo_results.json").read_text())
    results["checks"] = {c["name"]: c["passed"] for c in results["checks"]}
    return results


def test_demo_fine_tunes_saves_reloads_and_merges(tmp_path, capsys):
    # 250 of the default 400 steps: seeds 1-3 reach 85-91% here (the default reaches 91-100%).
    code = main(["--steps", "250", "--seed", "1", "--device", "cpu", "--output-dir", str(tmp_path),
                 "--min-accuracy", "0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    r = read_results(tmp_path)
    assert all(r["checks"].values()), r["checks"]
    assert r["accuracy_before"] <= 0.2 and r["accuracy_after"] >= 0.5
    assert r["loss_after"] < r["loss_before"] / 10
    assert r["adapter_bytes"] < r["base_bytes"] / 4
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(run.TARGET_MODULES)
    assert "trainable%" in out and "fine-tuning" in out


def test_demo_exits_nonzero_when_a_check_fails(tmp_path, monkeypatch, capsys):
    # Too few steps to reach the accuracy, and the reload lands on a base that differs from
    # the trained one: both checks must fail and the exit status must say so.
    loads = []

    def tampered_base(device):
        model = base.load_base(device)
        loads.append(model)
        if len(loads) == 2:  # the fresh base PeftModel.from_pretrained loads onto
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.add_(0.05)
        return model

    monkeypatch.setattr(run, "load_base_model", tampered_base)
    assert main(["--steps", "2", "--device", "cpu", "--output-dir", str(tmp_path)]) == 1
    checks = read_results(tmp_path)["checks"]
    assert not checks["metric reached"] and not checks["reload matches"]
    assert checks["adapter saved"] and checks["base really copies"]
    assert "SOME CHECKS FAILED" in capsys.readouterr().out


BAD_ARGS = [["--steps", "0"], ["--device", "tpu"], ["--min-accuracy", "80"], ["--rank", "0"]]
if not torch.cuda.is_available():
    BAD_ARGS.append(["--device", "cuda"])


@pytest.mark.parametrize("argv", BAD_ARGS)
def test_demo_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err


def test_demo_4bit_trains_on_a_quantised_base_and_reports_memory(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    code = main(["--4bit", "--steps", "250", "--seed", "1", "--device", "cpu", "--output-dir", str(tmp_path),
                 "--min-accuracy", "0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    r = read_results(tmp_path)
    assert r["four_bit"] and all(r["checks"].values()), r["checks"]
    assert {"4-bit base is smaller", "merge keeps the metric (4-bit, requantised)"} <= set(r["checks"])
    assert r["accuracy_before"] <= 0.2 and r["accuracy_after"] >= 0.5
    assert r["loss_after"] < r["loss_before"] / 10
    assert r["reload_max_abs_diff"] <= r["tolerance"] and 0 < r["rounding_error"] < 1e-3

    # The reported sizes against an independent count from the config: each projection [n, k] stored in
    # NF4 is n*k/2 packed bytes, one uint8 scale code per 64-element block, the 16-entry fp32 code table,
    # and the double quantisation's fp32 scale per 256 blocks, 256-entry fp32 table and fp32 offset.
    cfg = base.base_config()
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = cfg.num_hidden_layers * ([(h, h)] * 4 + [(i, h), (i, h), (h, i)])
    nf4 = scales = 0
    for n, k in shapes:
        blocks = n * k // 64
        scales += blocks + 16 * 4 + -(-blocks // 256) * 4 + 256 * 4 + 4
        nf4 += n * k // 2
    nf4 += scales
    m = r["memory"]
    assert m["linear_fp32_bytes"] == 4 * sum(n * k for n, k in shapes)
    assert m["linear_4bit_bytes"] == nf4
    all_fp32 = 4 * sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert m["base_fp32_bytes"] == all_fp32
    assert m["base_4bit_bytes"] == all_fp32 - m["linear_fp32_bytes"] + nf4
    # The 4-bit base keeps no dequantised weight for backward: a training step saves what the fp32 base's
    # saves with the same checkpointing, plus at most the (resident) scale tables the quantised matmul holds.
    assert 0 <= m["step_saved_bytes_4bit"] - m["step_saved_bytes_fp32"] <= scales
    assert m["step_saved_bytes_4bit"] < m["step_saved_bytes_fp32_no_checkpointing"] / 4
    assert "4-bit NF4" in out and "memory: linear weights" in out and "saved for backward" in out
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(run.TARGET_MODULES)


def test_demo_4bit_needs_bitsandbytes(monkeypatch, capsys):
    real = run.importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["--4bit", "--device", "cpu"])
    assert exc.value.code == 2
    assert "bitsandbytes" in capsys.readouterr().err
