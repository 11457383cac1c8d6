"""transformers Trainer (and Seq2SeqTrainer) with peftfast models, with the real ``peft`` installed and without it.

Real libraries throughout (transformers' Trainer, PEFT 0.21.2 as the oracle), tiny zoo models, no downloads:
- the losses Trainer logs equal PEFT's under the same seed (LoRA on a causal LM, a sequence classifier trained
  from a ``label`` column, QLoRA on a 4-bit base);
- ``save_model`` and checkpoints hold PEFT's files only (adapter_config.json + adapter_model.safetensors), which
  load in PEFT and give the same outputs; ``resume_from_checkpoint`` ends where the uninterrupted run ends;
- ``load_best_model_at_end`` puts the best checkpoint's adapter back;
- default ``remove_unused_columns=True`` drops a text column (Trainer reads the base model's signature);
- gradient checkpointing from TrainingArguments gives the same losses;
- in a fresh interpreter where ``peft`` is not installed, the same runs (there with activation checkpointing on)
  give the same numbers and files.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import peftfast
from peftfast import zoo
from tests._integration import (adapter_files, lm_rows, lora_llama, losses, qlora, scenario_lora, without_peft_results,
                                scenario_qlora,
                                seq_cls_rows, tensors_json, train)

peft = pytest.importorskip("peft")

PEFT_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_args.bin"]
CHECKPOINT_FILES = sorted(PEFT_FILES + ["optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json"])


def assert_close_lists(ours, theirs, what, rtol=1e-5, atol=1e-6):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} values vs {len(theirs)}"
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_tensors(ours: dict, theirs: dict, what: str, rtol=1e-5, atol=1e-6):
    assert sorted(ours) == sorted(theirs), f"{what}: keys differ: {sorted(set(ours) ^ set(theirs))}"
    for k in ours:
        a, b = torch.as_tensor(ours[k], dtype=torch.float64), torch.as_tensor(theirs[k], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return scenario_lora(str(tmp_path_factory.mktemp("lora")))


@pytest.fixture(scope="module")
def peft_lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("peft-lora")
    trainer = train(lora_llama(peft), str(out / "full"), lm_rows())
    trainer.save_model(str(out / "final"))
    return {"losses": losses(trainer), "final": tensors_json(adapter_files(str(out / "final"))), "dir": out}


def test_same_start_as_peft():
    ours, theirs = lora_llama(peftfast), lora_llama(peft)
    assert_same_tensors(peftfast.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs), "init")


def test_lora_losses_and_saved_adapter_equal_peft(lora_run, peft_lora_run):
    assert len(lora_run["losses"]) == 4 and lora_run["losses"][0] != lora_run["losses"][-1]
    assert_close_lists(lora_run["losses"], peft_lora_run["losses"], "losses vs PEFT")
    assert_same_tensors(lora_run["final"], peft_lora_run["final"], "trained adapter vs PEFT")


def test_saves_are_peft_format_and_load_in_peft(lora_run, tmp_path_factory):
    assert lora_run["final_files"] == PEFT_FILES
    assert lora_run["checkpoint_files"] == CHECKPOINT_FILES
    folder = [p for p in tmp_path_factory.getbasetemp().glob("lora*/final")][0]
    theirs = peft.PeftModel.from_pretrained(zoo.llama(0), str(folder))
    ours = peftfast.PeftModel.from_pretrained(zoo.llama(0), str(folder))
    x = zoo.causal_inputs(batch=3, seq=5, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, theirs(**x).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(theirs(**x).logits, zoo.llama(0)(**x).logits, atol=1e-4), "adapter had no effect"


def test_resume_from_checkpoint_ends_where_the_full_run_ends(lora_run):
    assert_close_lists(lora_run["resumed_losses"], lora_run["losses"], "losses after resuming (2 from the checkpoint, 2 new)")
    assert_same_tensors(lora_run["resumed"], lora_run["final"], "adapter after resuming")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return scenario_qlora(str(tmp_path_factory.mktemp("qlora")))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_through_trainer_like_peft(qlora_run, bits, tmp_path):
    """Trainer refuses a quantized model without adapters ("purely quantized"); with peftfast's LoRA it trains,
    with PEFT's losses, and saves PEFT's files."""
    from transformers import Trainer

    from tests._integration import quantized_llama, training_args

    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(quantized_llama(str(tmp_path / "base"), bits), training_args(str(tmp_path / "x")))
    theirs = train(qlora(peft, str(tmp_path / "base"), bits), str(tmp_path / "theirs"), lm_rows(vocab=101),
                   max_steps=3, save_steps=100)
    ours = qlora_run[f"losses{bits}"]
    assert len(ours) == 3 and ours[0] != ours[-1]
    assert_close_lists(ours, losses(theirs), f"{bits}-bit QLoRA losses vs PEFT", rtol=1e-4, atol=1e-5)
    assert qlora_run[f"files{bits}"] == PEFT_FILES
    theirs.save_model(str(tmp_path / "theirs-final"))
    assert_same_tensors(qlora_run[f"final{bits}"], tensors_json(adapter_files(str(tmp_path / "theirs-final"))),
                        f"{bits}-bit QLoRA adapter vs PEFT", rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def without_peft(tmp_path_factory):
    return without_peft_results(tmp_path_factory)


def test_without_peft_installed_same_numbers_and_files(lora_run, without_peft):
    hidden = without_peft["lora"]
    assert hidden["final_files"] == PEFT_FILES and hidden["checkpoint_files"] == CHECKPOINT_FILES
    assert hidden["checkpointing"] is True and lora_run["checkpointing"] is False
    assert_close_lists(hidden["losses"], lora_run["losses"], "losses without peft")
    assert_close_lists(hidden["resumed_losses"], lora_run["losses"], "resumed losses without peft")
    assert_same_tensors(hidden["final"], lora_run["final"], "adapter without peft")
    assert_same_tensors(hidden["resumed"], lora_run["final"], "resumed adapter without peft")


def test_without_peft_installed_qlora(qlora_run, without_peft):
    for bits in (4,):
        hidden = without_peft["qlora"]
        assert hidden[f"files{bits}"] == PEFT_FILES
        assert_close_lists(hidden[f"losses{bits}"], qlora_run[f"losses{bits}"], f"{bits}-bit losses without peft")
        assert_same_tensors(hidden[f"final{bits}"], qlora_run[f"final{bits}"], f"{bits}-bit adapter without peft")


def test_without_peft_installed_really_and_hooked(without_peft):
    hidden = without_peft["checks"]
    assert hidden["peft_spec"] is False and hidden["is_peft_available"] is False
    assert hidden["is_peft_model"] is True and hidden["plain_is_peft_model"] is False


def test_without_the_hook_trainer_fails_as_reported(monkeypatch, tmp_path):
    """The check that the tests above rely on: with transformers' own ``_is_peft_model`` Trainer reads the wrapper's
    ``forward(*args, **kwargs)`` and drops every column (the failure reported in the issue); with it, the plain
    PeftModel trains."""
    import transformers.trainer as tr
    import transformers.trainer_utils as tu

    assert losses(train(lora_llama(peftfast, task_type=None), str(tmp_path / "ok"), lm_rows(), max_steps=1))
    original = tu._is_peft_model.original
    monkeypatch.setattr(tu, "_is_peft_model", original)
    monkeypatch.setattr(tr, "_is_peft_model", original)
    with pytest.raises(ValueError, match="The batch received was empty"):
        train(lora_llama(peftfast, task_type=None), str(tmp_path / "fails"), lm_rows(), max_steps=1)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    model = lora_llama(peftfast)
    rows = lm_rows()
    trainer = train(model, str(tmp_path), rows, eval_rows=rows[:4], eval_strategy="steps", eval_steps=1,
                    save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                    learning_rate=0.5)  # large steps: the eval loss moves and the best is not the last one
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isdir(best)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert best.endswith(f"checkpoint-{1 + evals.index(min(evals))}")
    assert not best.endswith("checkpoint-4"), f"the last checkpoint was best ({evals}): the test checks nothing"
    saved = adapter_files(best)
    now = {k: v for k, v in peftfast.get_peft_model_state_dict(model).items()}
    assert_same_tensors(now, saved, "model after load_best_model_at_end vs best checkpoint", rtol=0, atol=0)


def test_seq_cls_label_column_and_head_match_peft(tmp_path):
    def build(lib):
        model = zoo.bert_seq_cls(0)
        config = lib.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
        torch.manual_seed(3)
        return lib.get_peft_model(model, config)

    ours = train(build(peftfast), str(tmp_path / "ours"), seq_cls_rows())
    theirs = train(build(peft), str(tmp_path / "theirs"), seq_cls_rows())
    assert ours.label_names == theirs.label_names == ["labels"]
    assert_close_lists(losses(ours), losses(theirs), "seq-cls losses vs PEFT")
    ours.save_model(str(tmp_path / "ours-final"))
    theirs.save_model(str(tmp_path / "theirs-final"))
    a, b = adapter_files(str(tmp_path / "ours-final")), adapter_files(str(tmp_path / "theirs-final"))
    assert any("classifier" in k for k in a), sorted(a)
    assert_same_tensors(a, b, "seq-cls adapter + head vs PEFT")


def test_models_without_peftfast_are_left_alone(tmp_path):
    """A plain transformers model still saves its full weights; the patched check still says False for it."""
    import transformers.trainer_utils as tu

    model = zoo.llama(0)
    assert tu._is_peft_model(model) is False and tu._is_peft_model(lora_llama(peftfast)) is True
    trainer = train(model, str(tmp_path), lm_rows(), max_steps=1, save_steps=100)
    trainer.save_model(str(tmp_path / "final"))
    assert "model.safetensors" in os.listdir(tmp_path / "final")
    assert "adapter_config.json" not in os.listdir(tmp_path / "final")


def test_seq2seq_trainer_matches_peft_and_saves_adapters(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    def run(lib, name):
        config = lib.LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM", init_lora_weights=False)
        model = zoo.t5(0)
        torch.manual_seed(41)
        model = lib.get_peft_model(model, config)
        d = zoo.seq2seq_inputs(batch=4)
        rows = [{k: v[i] for k, v in d.items()} | {"text": "unused"} for i in range(4)]
        args = Seq2SeqTrainingArguments(str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                                        learning_rate=2e-2, logging_steps=1, save_steps=100, report_to=[], seed=0,
                                        use_cpu=True, disable_tqdm=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Seq2SeqTrainer(model, args, train_dataset=rows)
            trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        return losses(trainer), adapter_files(str(tmp_path / name / "final"))

    (ours, ours_sd), (theirs, theirs_sd) = run(peftfast, "ours"), run(peft, "theirs")
    assert len(ours) == 2
    assert_close_lists(ours, theirs, "Seq2SeqTrainer losses vs PEFT")
    assert_same_tensors(ours_sd, theirs_sd, "Seq2SeqTrainer adapter vs PEFT")
