"""pytest plugin used by conformance/run.py for both runs (real peft and peftfast).

* Optional test dependencies that are not installed here (``diffusers``, ``datasets``) get an
  empty placeholder module so that PEFT's ``testing_common.py`` / ``testing_utils.py`` import;
  a test that really uses them fails in both runs and so never counts as PEFT-passing.
* ``--conf-methods lora,ia3`` keeps the tests whose id names a selected method's config class
  (``LoraConfig``, ``IA3Config``; ``adalora``, ``loha``, ``lokr``: their config classes, or a test class
  named after them) and, outside test_custom_models.py, also the tests that name no method at all;
  tests that name only other methods are deselected.
* ``--conf-out FILE`` writes one JSON line per test: nodeid, outcome, method, exception type and
  the first line of its message.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import signal

from conformance_ids import norm_id
import time
import types
import zlib

PLACEHOLDER_DEPS = ("diffusers", "datasets")

# config class -> method label; the PEFT config classes of the methods peftfast implements
METHOD_CONFIGS = {"lora": "LoraConfig", "ia3": "IA3Config", "prompt_tuning": "PromptTuningConfig",
                  "p_tuning": "PromptEncoderConfig", "prefix_tuning": "PrefixTuningConfig",
                  "adalora": "AdaLoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}
# any PEFT config class name (to tell "names another method" from "names no method")
_ANY_CONFIG = re.compile(r"(?<![A-Za-z0-9])([A-Z][A-Za-z0-9]*Config)(?![A-Za-z0-9])")


def _placeholder(name):
    class _Absent:
        def __init__(self, *a, **k):
            raise ModuleNotFoundError(f"{name} is not installed (conformance placeholder)")

        @classmethod
        def from_pretrained(cls, *a, **k):
            raise ModuleNotFoundError(f"{name} is not installed (conformance placeholder)")

    mod = types.ModuleType(name)
    mod.__conformance_placeholder__ = True
    mod.__version__ = "0.0.0"

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (_Absent,), {})

    def load_dataset(*a, **k):
        raise ModuleNotFoundError(f"{name} is not installed (conformance placeholder)")

    mod.__getattr__ = __getattr__
    mod.load_dataset = load_dataset
    return mod


for _dep in PLACEHOLDER_DEPS:
    if _dep not in sys.modules and importlib.util.find_spec(_dep) is None:
        sys.modules[_dep] = _placeholder(_dep)


class ConformanceTimeout(Exception):
    """A test phase ran past --conf-test-timeout (e.g. retrying an unreachable Hub)."""


def _alarm(signum, frame):
    raise ConformanceTimeout("test phase exceeded --conf-test-timeout")


def _timed(item):
    limit = item.config.getoption("--conf-test-timeout")
    if limit and hasattr(signal, "SIGALRM"):
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    else:
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _timed(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _timed(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _timed(item)


class _NoSleepTime:
    """``time`` for huggingface_hub's HTTP retry loop without the back-off sleeps: this machine has no
    route to the Hub, and PEFT's ``hub_online_once`` turns offline mode off for a model's first use,
    so each download would otherwise retry with exponential back-off. Same in both runs."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        pass


try:
    import huggingface_hub.utils._http as _hf_http

    if hasattr(_hf_http, "time"):
        _hf_http.time = _NoSleepTime()
except Exception:  # pragma: no cover - a huggingface_hub without that module
    pass


def pytest_addoption(parser):
    g = parser.getgroup("conformance")
    g.addoption("--conf-methods", default="lora,ia3")
    g.addoption("--conf-out", default=None)
    g.addoption("--conf-test-timeout", type=int, default=60, help="seconds per test phase (0: none)")
    g.addoption("--conf-sample", type=int, default=1, help="keep 1 in N selected tests (by crc32 of the id)")
    g.addoption("--conf-ids", default=None,
                help="file with one node id a line: run only these (the oracle's PEFT-passing tests)")


# Test classes named after a method (TestLoraInitialization, TestHiraInitialization, ...) in files
# whose ids name no config class. Methods with their own config class are "other"; LoRA options
# configured through LoraConfig (PiSSA, OLoRA, LoftQ, CorDA, EVA, BD-LoRA, KaSA, ...) count as LoRA
# when the class name says "lora", else as general.
_OTHER_METHOD_CLASS = re.compile(
    r"adalora|vblora|randlora|tinylora|unilora|xlora|delora|gralora|"
    r"loha|lokr|boft|oft|vera|hira|hra|fourierft|lntuning|prefix|prompt|poly|shira|c3a|road|miss|waveft|"
    r"osf|cpt|trainabletoken|lily|adamss|frod|deft|beft|glora|psoft|peanut|shadow|supertuning|arrow|"
    r"bone|adaption"
)
_NEVER = re.compile(r"(?!)")  # prompt methods are selected by their config class names only
_SELECTED_CLASS = {"lora": re.compile(r"lora"), "ia3": re.compile(r"ia3"),
                   "prompt_tuning": _NEVER, "p_tuning": _NEVER, "prefix_tuning": _NEVER}
# methods whose own name is one of the "other" names above: matched on the test class name before those are removed
_NAMED_CLASS = {"adalora": re.compile(r"adalora"), "loha": re.compile(r"loha"), "lokr": re.compile(r"lokr")}


def method_of(nodeid: str, methods: list[str]) -> str | None:
    """'lora' / 'ia3' / 'general' (names no method) / None (names only other methods).

    First by config class names in the id (``LoraConfig``, ``IA3Config``: exact tokens, so
    ``AdaLoraConfig`` is not LoRA); else by the test class name (``TestLoraInitialization``)."""
    names = set(_ANY_CONFIG.findall(nodeid))
    names.discard("PeftConfig")
    for m in methods:
        if METHOD_CONFIGS[m] in names:
            return m
    if names:
        return None
    cls = next((p for p in nodeid.split("::")[1:] if p.startswith("Test")), "").lower()
    if cls:
        for m in methods:
            if m in _NAMED_CLASS and _NAMED_CLASS[m].search(cls[4:]):
                return m
        rest = _OTHER_METHOD_CLASS.sub("", cls[4:])
        for m in methods:
            if m in _SELECTED_CLASS and _SELECTED_CLASS[m].search(rest):
                return m
        if rest != cls[4:] or any(p.search(rest) for p in _SELECTED_CLASS.values()):
            return None  # names another method, or LoRA / IA3 when they are not selected
    return "general"


def pytest_collection_modifyitems(session, config, items):
    methods = [m for m in config.getoption("--conf-methods").split(",") if m]
    sample = config.getoption("--conf-sample")
    ids_file = config.getoption("--conf-ids")
    only = {norm_id(n) for n in open(ids_file).read().split("\n") if n} if ids_file else None
    keep, drop = [], []
    for item in items:
        if only is not None and norm_id(item.nodeid) not in only:
            drop.append(item)
            continue
        m = method_of(item.nodeid, methods)
        if m == "general" and "test_custom_models.py" in item.nodeid:
            m = None  # the custom-model cases all name their config class
        if m is None:
            drop.append(item)
        elif sample > 1 and zlib.crc32(item.nodeid.encode()) % sample:
            drop.append(item)
        else:
            item.user_properties.append(("conf_method", m))
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_records: dict[str, dict] = {}


def _first_line(longrepr) -> tuple[str, str]:
    crash = getattr(longrepr, "reprcrash", None)
    msg = crash.message if crash is not None else str(longrepr)
    if isinstance(longrepr, tuple):  # skip: (path, lineno, reason)
        msg = str(longrepr[2])
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Missing|Warning|Exit|Interrupt|Failed)):\s*(.*)$", first)
    if m:
        return m.group(1), m.group(2)[:300]
    if first.startswith("assert") or first.startswith("AssertionError"):
        return "AssertionError", first[:300]
    return "", first[:300]


def pytest_runtest_logreport(report):
    rec = _records.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed"})
    for k, v in report.user_properties:
        if k == "conf_method":
            rec["method"] = v
    if report.when == "call" and report.outcome == "passed":
        if hasattr(report, "wasxfail"):
            rec["outcome"] = "xpassed"
        return
    if report.outcome == "passed":
        return
    if report.outcome == "skipped":
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    else:
        outcome = "failed" if report.when == "call" else "error"
    if rec["outcome"] in ("failed", "error"):
        return  # keep the first failure (e.g. call) over a later teardown error
    rec["outcome"] = outcome
    rec["when"] = report.when
    rec["exc"], rec["msg"] = _first_line(report.longrepr)


def pytest_collectreport(report):
    if report.failed:
        exc, msg = _first_line(report.longrepr)
        _records[report.nodeid] = {"nodeid": report.nodeid, "outcome": "collect-error", "exc": exc, "msg": msg}


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--conf-out")
    if not out:
        return
    extra = {}
    alias = sys.modules.get("peft_alias")
    if alias is not None:
        extra["missing_names"] = alias.missing_names()
        extra["shimmed"] = alias.shimmed_names()
    with open(out, "w") as f:
        for rec in _records.values():
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"_meta": extra}) + "\n")
