"""The package layout promises of DESIGN.md."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import peftfast


def test_kernels_is_not_a_top_level_module():
    # bitsandbytes and transformers probe `import kernels` (the kernel-hub package, which transformers >= 5.25
    # installs) and change behaviour if found: the name must never resolve to this project's kernels/ folder, neither
    # the checkout's nor a copy installed top-level. (A virtual environment may live inside the checkout, and a
    # non-editable install puts peftfast next to the kernel-hub package, so the test compares the folder itself.)
    own = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return
    found = Path(spec.origin).resolve()
    assert found != own and found.read_bytes() != own.read_bytes(), spec.origin

def test_kernels_installed_as_peftfast_kernels():
    import peftfast.kernels as k

    assert k.__name__ == "peftfast.kernels"
    assert callable(k.use_triton)


def test_peft_api_names_exist():
    for name in ["PeftConfig", "LoraConfig", "PeftType", "TaskType", "get_peft_config", "get_peft_model",
                 "inject_adapter_in_model", "get_peft_model_state_dict", "set_peft_model_state_dict",
                 "cast_mixed_precision_params", "PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
                 "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
                 "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction"]:
        assert hasattr(peftfast, name), name
    from peftfast.mapping import get_peft_model  # noqa: F401
    from peftfast.tuners.lora import Linear, LoraConfig, LoraLayer, LoraModel  # noqa: F401
    from peftfast.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: F401
    from peftfast.utils import ModulesToSaveWrapper, PeftType, TaskType  # noqa: F401


def test_peftfast_never_imports_peft(tmp_path):
    # cwd outside the checkout: `python -c` puts the cwd on sys.path, which would shadow the installed package
    code = ("import sys, peftfast, peftfast.tuners.lora, peftfast.tuners.ia3; "
            "assert 'peft' not in sys.modules, sorted(m for m in sys.modules if m.startswith('peft.'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_every_package_folder_is_listed_in_pyproject():
    # pyproject lists packages by hand (kernels/ must map to peftfast.kernels): a folder left out is missing
    # from a non-editable install although an editable one works
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "peftfast").rglob("__init__.py")}
    found.add("peftfast.kernels")
    assert found == listed, f"in the tree but not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_python_m_pytest_from_the_checkout_root():
    # `python -m pytest` puts the checkout root first on sys.path; the root conftest.py takes it off again
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_packaging.py::test_kernels_is_not_a_top_level_module",
                        "tests/test_packaging.py::test_kernels_installed_as_peftfast_kernels"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


ROOT = Path(__file__).resolve().parents[1]
# From the clone root `python -c`/`python -m` import the source folder peftfast/, not the install. The checks below
# run there twice: as installed (editable or not), and with setuptools' editable finder taken off sys.meta_path,
# which is what a non-editable install (`pip install .`, CI's) leaves: nothing then maps kernels/ to peftfast.kernels.
NOT_EDITABLE = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(f)]; "
CHECKS = ("import importlib.util, os, sys, peftfast, peftfast.kernels as k, peftfast.tuners.lora; "
          "root = os.getcwd(); assert peftfast.__file__.startswith(root), peftfast.__file__; "
          "assert k.__name__ == 'peftfast.kernels' and callable(k.use_triton), k; "
          "assert k.__file__ == os.path.join(root, 'kernels', '__init__.py'), k.__file__; "
          "spec = importlib.util.find_spec('kernels'); "
          "own = os.path.join(root, 'kernels') + os.sep; "
          "assert spec is None or not spec.origin.startswith(own), spec.origin; "
          "import bitsandbytes, transformers.utils.import_utils as iu; iu.is_kernels_available(); "
          "stray = sys.modules.get('kernels'); "
          "assert stray is None or not (stray.__file__ or '').startswith(own), stray.__file__; "
          "import tests._models; print('ok')")


@pytest.mark.parametrize("install", ["as installed", "not editable"])
def test_python_c_from_the_checkout_root(install):
    # peftfast.kernels imports; the clone's kernels/ never shows up as a top-level `kernels`, even to the probes of
    # bitsandbytes and transformers; other top-level folders of the clone (tests) stay importable
    code = (NOT_EDITABLE if install == "not editable" else "") + CHECKS
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("install", ["as installed", "not editable"])
def test_python_m_from_the_checkout_root(install, tmp_path):
    # `python -m peftfast` (the CLI) from the clone root
    code = (NOT_EDITABLE if install == "not editable" else "") + "import runpy; runpy.run_module('peftfast', " \
        "run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "bench" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
