"""Run PEFT 0.21.2's own tests against peftfast and compare with real PEFT.

    .venv/bin/python conformance/run.py [--methods lora,ia3] [--files test_custom_models.py,...]
                                        [--jobs N] [--sample N] [--update-hub-only]

1. Fetches PEFT 0.21.2's sdist with ``pip download peft==0.21.2 --no-binary :all: --no-deps``
   into conformance/.cache/ (reused when present) and unpacks its tests/.
2. Runs each selected test file twice with pytest in subprocesses, offline (HF_HUB_OFFLINE=1):
   once against the real peft (the oracle: what PEFT itself passes here), once with ``peft``
   served by peftfast (conformance/peft_alias.py).
3. Writes conformance/out/results.json and conformance/out/summary.md, and exits non-zero when a
   test that PEFT passes fails here and is not listed in conformance/expected.json.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
OUT = HERE / "out"
PEFT_VERSION = "0.21.2"
SRC = CACHE / f"peft-{PEFT_VERSION}"
DEFAULT_FILES = [
    "test_custom_models.py",
    "test_config.py",
    "test_tuners_utils.py",
    "test_other.py",
    "test_low_level_api.py",
    "test_initialization.py",
    "test_mixed.py",
]
PYTEST_INI = """[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
"""
HUB_PATTERNS = re.compile(
    r"HF_HUB_OFFLINE|offline mode|LocalEntryNotFound|OfflineModeIsEnabled|We couldn't connect|"
    r"outgoing traffic has been disabled|Cannot find the requested files in the disk cache|"
    r"couldn't connect to 'https://huggingface.co'|is not a local folder and is not a valid model identifier|"
    r"Connection|resolve.*huggingface|hub_online_once|ConformanceTimeout",
    re.I,
)


def fetch() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"peft-{PEFT_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"peft=={PEFT_VERSION}", "--no-binary", ":all:",
             "--no-deps", "-d", str(CACHE)],
            check=True,
        )
    tests = SRC / "tests"
    if not tests.exists():
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{PEFT_VERSION}/tests/")]
            tar.extractall(CACHE, members=members, filter="data")
    # the sdist ships tests/ without __init__.py / conftest.py; the test modules use relative imports
    (tests / "__init__.py").touch()
    # our own ini: PEFT's [tool.pytest] adds --cov (pytest-cov is not a dependency here)
    (SRC / "pytest.ini").write_text(PYTEST_INI)
    return tests


def run_one(file: str, variant: str, methods: str, sample: int, timeout: int, test_timeout: int = 30) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    stem = file.removesuffix(".py")
    out = OUT / f"{stem}.{variant}.jsonl"
    log = OUT / f"{stem}.{variant}.log"
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    plugins = ["-p", "peft_alias"] if variant == "peftfast" else []
    cmd = [
        str(Path(sys.executable).with_name("pytest")), *plugins, "-p", "conformance_plugin", "-p", "no:cacheprovider",
        "-q", "-rN", "--tb=line", "-W", "ignore::DeprecationWarning", f"tests/{file}", f"--conf-methods={methods}",
        f"--conf-sample={sample}", f"--conf-out={out}", f"--conf-test-timeout={test_timeout}",
    ]
    t0 = time.time()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=SRC, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return read_run(file, variant, rc, time.time() - t0)


def read_run(file, variant, rc, wall) -> dict:
    out = OUT / f"{file.removesuffix('.py')}.{variant}.jsonl"
    records, meta = {}, {}
    if out.exists():
        for line in out.read_text().splitlines():
            rec = json.loads(line)
            if "_meta" in rec:
                meta = rec["_meta"]
            else:
                records[rec["nodeid"]] = rec
    return {"file": file, "variant": variant, "rc": rc, "wall_s": None if wall is None else round(wall, 1),
            "records": records, "meta": meta}


def previous_walls() -> dict:
    """Exit codes and wall times of the runs recorded in an earlier results.json (for --report-only)."""
    path = OUT / "results.json"
    if not path.exists():
        return {}
    walls = {}
    for f, c in json.loads(path.read_text())["per_file"].items():
        walls[(f, "peft")] = (c.get("rc_peft"), c.get("wall_s_peft"))
        walls[(f, "peftfast")] = (c.get("rc_peftfast"), c.get("wall_s_peftfast"))
    return walls


def load_expected() -> tuple[dict[str, str], list[tuple[re.Pattern, str]]]:
    path = HERE / "expected.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    exact, patterns = {}, []
    for entry in data.get("entries", []):
        reason = f"{entry['category']}: {entry.get('reason', '')}"
        if "id" in entry:
            exact[entry["id"]] = reason
        else:
            patterns.append((re.compile(entry["pattern"]), reason))
    return exact, patterns


def expected_reason(nodeid, exact, patterns):
    if nodeid in exact:
        return exact[nodeid]
    for pat, reason in patterns:
        if pat.search(nodeid):
            return reason
    return None


GENERIC = {"", "assert False", "AssertionError", "assert True", "Regex pattern did not match."}


def cause(rec) -> str:
    """Group key: exception type + first message line with numbers and addresses blanked; a
    generic message (``assert False``) is qualified by the test function name."""
    exc = rec.get("exc") or rec.get("outcome", "")
    msg = rec.get("msg", "") or ""
    if msg.strip() in GENERIC:
        func = rec["nodeid"].split("::")[-1].split("[")[0]
        return f"{exc}: {msg.strip() or '(no message)'} in {func}"
    msg = re.sub(r"0x[0-9a-f]+", "0x..", msg)
    msg = re.sub(r"^'[^']+' object has no attribute", "'<model>' object has no attribute", msg)
    msg = re.sub(r"=\[[^\]]*\]", "=[...]", msg)
    msg = re.sub(r"=\{.*?\}(?= asks)", "={...}", msg)
    msg = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", msg)
    return f"{exc}: {msg[:160]}"


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="lora,ia3")
    ap.add_argument("--files", default=",".join(DEFAULT_FILES))
    ap.add_argument("--jobs", type=int, default=2, help="pytest subprocesses at once")
    ap.add_argument("--sample", type=int, default=1, help="keep 1 in N selected tests (deterministic, by id)")
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds per pytest subprocess")
    ap.add_argument("--test-timeout", type=int, default=30,
                    help="seconds per test phase; offline, Hub downloads retry and sleep (oracle timeouts count as hub-only)")
    ap.add_argument("--update-hub-only", action="store_true",
                    help="add the oracle's Hub-dependent failures/skips to expected.json as hub-only")
    ap.add_argument("--out", default=str(OUT), help="output folder (default conformance/out)")
    ap.add_argument("--report-only", action="store_true", help="re-read the .jsonl files in --out, run nothing")
    args = ap.parse_args(argv)
    OUT = Path(args.out).resolve()

    t_all = time.time()
    fetch()
    files = [f if f.endswith(".py") else f + ".py" for f in args.files.split(",") if f]
    jobs = [(f, v) for f in files for v in ("peft", "peftfast")]
    results = {}
    if args.report_only:
        walls = previous_walls()
        for f, v in jobs:
            rc, wall = walls.get((f, v), (None, None))
            results[(f, v)] = read_run(f, v, rc, wall)
    else:
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futs = [pool.submit(run_one, f, v, args.methods, args.sample, args.timeout, args.test_timeout) for f, v in jobs]
            for fut in cf.as_completed(futs):
                r = fut.result()
                results[(r["file"], r["variant"])] = r
                print(f"[{r['variant']:8s}] {r['file']}: {len(r['records'])} tests, rc={r['rc']}, {r['wall_s']}s",
                      flush=True)

    exact, patterns = load_expected()
    per_file, per_method = {}, collections.defaultdict(collections.Counter)
    unexpected, causes, examples = [], collections.Counter(), {}
    hub_only_new = []
    tests = []
    for f in files:
        oracle, here = results[(f, "peft")], results[(f, "peftfast")]
        c = collections.Counter()
        for nodeid, orec in oracle["records"].items():
            hrec = here["records"].get(nodeid, {"outcome": "missing", "exc": "NotCollected",
                                                "msg": "not collected with peftfast"})
            method = orec.get("method", "general")
            o_ok = orec["outcome"] in ("passed", "xpassed", "xfailed")
            h_ok = hrec["outcome"] in ("passed", "xpassed", "xfailed")
            if orec["outcome"] == "collect-error":
                method = "collect"
            row = {"id": nodeid, "method": method, "peft": orec["outcome"], "peftfast": hrec["outcome"]}
            if not o_ok and HUB_PATTERNS.search(orec.get("msg", "") or ""):
                row["hub_only"] = True
                hub_only_new.append(nodeid)
            c["collected"] += 1
            per_method[method]["collected"] += 1
            if o_ok:
                c["peft_passing"] += 1
                per_method[method]["peft_passing"] += 1
                if h_ok:
                    c["passing_here"] += 1
                    per_method[method]["passing_here"] += 1
                else:
                    reason = expected_reason(nodeid, exact, patterns)
                    row["cause"] = cause(hrec)
                    if reason:
                        row["expected"] = reason
                        c["expected_diff"] += 1
                        per_method[method]["expected_diff"] += 1
                    else:
                        c["failing_here"] += 1
                        per_method[method]["failing_here"] += 1
                        unexpected.append(nodeid)
                        causes[row["cause"]] += 1
                        examples.setdefault(row["cause"], (nodeid, hrec.get("msg", "")))
            elif h_ok:
                c["passing_here_not_peft"] += 1
            tests.append(row)
        # collection errors with peftfast (whole modules/classes not collected)
        for nodeid, hrec in here["records"].items():
            if hrec["outcome"] == "collect-error":
                c["peftfast_collect_errors"] += 1
                row = {"id": nodeid, "method": "collect", "peft": oracle["records"].get(nodeid, {}).get("outcome", "ok"),
                       "peftfast": "collect-error", "cause": cause(hrec)}
                tests.append(row)
        per_file[f] = {**c, "wall_s_peft": oracle["wall_s"], "wall_s_peftfast": here["wall_s"],
                       "rc_peft": oracle["rc"], "rc_peftfast": here["rc"]}

    missing = sorted({n for r in results.values() for n in r["meta"].get("missing_names", [])})
    shimmed = sorted({n for r in results.values() for n in r["meta"].get("shimmed", [])})
    wall = round(time.time() - t_all, 1)
    if args.report_only and (OUT / "results.json").exists():
        wall = json.loads((OUT / "results.json").read_text())["wall_s"]
    summary = {
        "peft_version": PEFT_VERSION, "methods": args.methods, "files": files, "sample": args.sample,
        "wall_s": wall, "per_file": per_file, "per_method": {k: dict(v) for k, v in per_method.items()},
        "top_causes": [{"count": n, "cause": k, "example": examples[k][0], "message": examples[k][1]}
                       for k, n in causes.most_common(40)],
        "peftfast_missing_names": missing, "shimmed_for_collection": shimmed,
        "unexpected_failures": len(unexpected),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({**summary, "tests": tests}, indent=1))
    (OUT / "summary.md").write_text(render(summary))
    print(render(summary))

    if args.update_hub_only:
        path = HERE / "expected.json"
        data = json.loads(path.read_text()) if path.exists() else {"entries": []}
        have = {e.get("id") for e in data["entries"]}
        for nodeid in sorted(set(hub_only_new) - have):
            data["entries"].append({"id": nodeid, "category": "hub-only",
                                    "reason": "needs the Hugging Face Hub; fails or skips offline with real PEFT too"})
        path.write_text(json.dumps(data, indent=1) + "\n")
    return 1 if unexpected else 0


def render(s) -> str:
    lines = [f"# PEFT {s['peft_version']} conformance ({s['methods']}; sample 1/{s['sample']}; {s['wall_s']} s)", "",
             "| file | collected | PEFT-passing | passing here | expected diff | failing here | wall peft / peftfast (s) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for f, c in s["per_file"].items():
        lines.append(f"| {f} | {c.get('collected', 0)} | {c.get('peft_passing', 0)} | {c.get('passing_here', 0)} | "
                     f"{c.get('expected_diff', 0)} | {c.get('failing_here', 0)} | {c['wall_s_peft']} / {c['wall_s_peftfast']} |")
    lines += ["", "| method | collected | PEFT-passing | passing here | expected diff | failing here |",
              "|---|---:|---:|---:|---:|---:|"]
    for m, c in sorted(s["per_method"].items()):
        lines.append(f"| {m} | {c.get('collected', 0)} | {c.get('peft_passing', 0)} | {c.get('passing_here', 0)} | "
                     f"{c.get('expected_diff', 0)} | {c.get('failing_here', 0)} |")
    lines += ["", "## Top causes (PEFT-passing tests failing here, not expected)", ""]
    for i, t in enumerate(s["top_causes"][:25], 1):
        lines.append(f"{i}. **{t['count']}** `{t['cause']}`  \n   e.g. `{t['example']}`")
    lines += ["", f"Names PEFT's tests import that peftfast lacks ({len(s['peftfast_missing_names'])}): "
              + ", ".join(s["peftfast_missing_names"]), "",
              "Served by the alias only so that modules collect: " + (", ".join(s["shimmed_for_collection"]) or "none"),
              "", f"Unexpected failures: {s['unexpected_failures']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
