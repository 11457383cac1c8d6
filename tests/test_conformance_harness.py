"""conformance/run.py's bookkeeping (no pytest run): id normalisation, filing failures into expected.json's groups,
pruning ids that pass, and the CI selection."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parent.parent / "conformance"


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(CONF))
    spec = importlib.util.spec_from_file_location("conformance_run_under_test", CONF / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "EXPECTED", tmp_path / "expected.json")
    yield mod
    sys.modules.pop("conformance_run_under_test", None)


def row(nodeid, ok, full=""):
    return {"id": nodeid, "ok": ok, "text": full[:40], "full": full}


def test_norm_id_drops_only_the_class_list_index(run):
    a = "tests/test_config.py::TestPeftConfig::test_x[LoHaConfig-mandatory_kwargs11]"
    b = "tests/test_config.py::TestPeftConfig::test_x[LoHaConfig-mandatory_kwargs1]"
    assert run.norm_id(a) == run.norm_id(b)
    c = "tests/test_custom_models.py::T::test_y[MLP-LoraConfig-config_kwargs6]"
    assert run.norm_id(c) == c


def test_update_expected_files_prunes_and_groups_by_cause(run):
    data = {"groups": [
        {"cause": "lora_bias", "category": "not-implemented", "reason": "r", "match": [r"lora_bias=True asks"],
         "ids": ["t::fixed_now", "t::out_of_scope"]},
    ]}
    rows = [
        row("t::fixed_now", True),
        row("t::bias", False, "ConfigError: lora_bias=True asks for a bias"),
        row("t::odd1", False, "ValueError: something else"),
        row("t::odd2", False, "ValueError: something else"),
        row("t::other", False, "TypeError: another thing"),
    ]
    removed, added, untriaged = run.update_expected(data, rows, {r["id"] for r in rows})
    assert (removed, added, untriaged) == (1, 4, 3)
    saved = json.loads(run.EXPECTED.read_text())
    groups = {g["cause"]: g for g in saved["groups"]}
    assert groups["lora_bias"]["ids"] == ["t::bias", "t::out_of_scope"]  # pruned in scope only
    auto = [g for g in saved["groups"] if g["category"] == "untriaged"]
    assert sorted(len(g["ids"]) for g in auto) == [1, 2]  # one group per distinct message, never merged
    assert all(not g["match"] for g in auto)


def test_ci_selection_is_every_peft_passing_test_of_the_methods(run):
    oracle = {"files": {"test_custom_models.py": {"passing": {f"tests/test_custom_models.py::t[{i}]": "lora"
                                                             for i in range(300)}},
                        "test_config.py": {"passing": {"tests/test_config.py::a": "ia3",
                                                       "tests/test_config.py::b": "boft"}}}}
    sel = run.select(oracle, ["test_custom_models.py", "test_config.py"], "lora,ia3", 1, run.CI_SAMPLE)
    again = run.select(oracle, ["test_custom_models.py", "test_config.py"], "lora,ia3", 1, run.CI_SAMPLE)
    assert sel == again
    assert len(sel["test_custom_models.py"]) == 300
    sampled = run.select(oracle, ["test_custom_models.py"], "lora", 1, {"test_custom_models.py": 3})
    assert 60 < len(sampled["test_custom_models.py"]) < 140  # a per-file sample stays available, by id
    assert sel["test_config.py"] == ["tests/test_config.py::a"]  # other methods' tests are not selected
