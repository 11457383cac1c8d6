"""Run PEFT 0.21.2's own tests against peftfast and compare with what real PEFT passes.

    python conformance/run.py                       # CI: peftfast side only, against the committed oracle
    python conformance/run.py --update-oracle       # re-run real PEFT, rewrite conformance/oracle.json
    python conformance/run.py --update-expected     # run, then rewrite conformance/expected.json
    python conformance/run.py --files test_config.py --methods lora --sample 5   # quick look

1. Fetches PEFT 0.21.2's sdist with ``pip download peft==0.21.2 --no-binary :all: --no-deps``
   into conformance/.cache/ (reused when present) and unpacks its tests/.
2. ``--update-oracle``: runs each file with the real peft (offline, HF_HUB_OFFLINE=1) and records the
   tests it passes in conformance/oracle.json (committed: CI does not re-run the oracle).
3. Default: runs the oracle's PEFT-passing tests with ``peft`` served by peftfast
   (conformance/peft_alias.py), re-runs the unexpected failures once in a fresh process, and compares
   with conformance/expected.json. Writes conformance/out/results.json and summary.md.

Exit status 1 when a PEFT-passing test fails here (twice) and is not listed in expected.json; listed
tests that pass now are reported ("now passing, prune") without failing.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conformance_ids import norm_id  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
OUT = HERE / "out"
ORACLE = HERE / "oracle.json"
EXPECTED = HERE / "expected.json"
PEFT_VERSION = "0.21.2"
SRC = CACHE / f"peft-{PEFT_VERSION}"
METHODS = "lora,ia3,adalora,loha,lokr,prompt_tuning,p_tuning,prefix_tuning"
# files of PEFT's suite with tests of these methods (or method-independent ones) that can run offline
DEFAULT_FILES = [
    "test_custom_models.py",
    "test_config.py",
    "test_tuners_utils.py",
    "test_other.py",
    "test_low_level_api.py",
    "test_initialization.py",
    "test_mixed.py",
    "test_helpers.py",
    "test_mapping.py",
    "test_bufferdict.py",
    "test_loraplus.py",
    "test_lora_variants.py",
]
PYTEST_INI = """[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
"""
OK = ("passed", "xpassed", "xfailed")
# --ci runs every PEFT-passing test of the default files (6,949; 3 min 35 s with 2 processes on 2 cores). A file
# listed here with N > 1 would run 1 in N of its tests (by crc32 of the id), should CI ever need the time back.
CI_SAMPLE: dict[str, int] = {}
CHUNK = 1200  # tests per pytest process (a file's PEFT-passing tests are split into chunks that run in parallel)


def fetch() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"peft-{PEFT_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", f"peft=={PEFT_VERSION}", "--no-binary", ":all:",
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


def run_pytest(file: str | list[str], variant: str, tag: str, methods: str, ids: list[str] | None, sample: int,
               timeout: int, test_timeout: int) -> dict:
    """One pytest process on one file (or several); returns {normalised nodeid: record}, rc, wall."""
    OUT.mkdir(parents=True, exist_ok=True)
    files = [file] if isinstance(file, str) else list(file)
    stem = f"{files[0].removesuffix('.py')}{'+' if len(files) > 1 else ''}.{variant}{tag}"
    out, log = OUT / f"{stem}.jsonl", OUT / f"{stem}.log"
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    plugins = ["-p", "peft_alias"] if variant == "peftfast" else []
    cmd = [
        str(Path(sys.executable).with_name("pytest")), *plugins, "-p", "conformance_plugin", "-p", "no:cacheprovider",
        "-q", "-rN", "--tb=line", "-W", "ignore::DeprecationWarning", *(f"tests/{f}" for f in files), f"--conf-methods={methods}",
        f"--conf-sample={sample}", f"--conf-out={out}", f"--conf-test-timeout={test_timeout}",
    ]
    if ids is not None:
        idfile = OUT / f"{stem}.ids"
        idfile.write_text("\n".join(ids) + "\n")
        cmd.append(f"--conf-ids={idfile}")
    t0 = time.time()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=SRC, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    records, meta = {}, {}
    if out.exists():
        for line in out.read_text().splitlines():
            rec = json.loads(line)
            if "_meta" in rec:
                meta = rec["_meta"]
            else:
                records[norm_id(rec["nodeid"])] = rec
    return {"file": file, "variant": variant, "rc": rc, "wall_s": round(time.time() - t0, 1), "records": records,
            "meta": meta}


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
    msg = re.sub(r"(?<![\w.])(/[\w.@+\-]+)+/?", "<path>", msg)
    msg = re.sub(r"^'[^']+' object has no attribute", "'<model>' object has no attribute", msg)
    msg = re.sub(r"=\[[^\]]*\]", "=[...]", msg)
    msg = re.sub(r"=\{.*?\}(?= asks)", "={...}", msg)
    msg = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", msg)
    return f"{exc}: {msg[:160]}"


# ---------------------------------------------------------------------------------------------- oracle


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("peft", "torch", "transformers", "accelerate", "huggingface_hub", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def update_oracle(files, methods, jobs, timeout, test_timeout) -> int:
    data = json.loads(ORACLE.read_text()) if ORACLE.exists() else {}
    per_file = data.get("files", {})
    t0 = time.time()

    def write():
        ORACLE.write_text(json.dumps({
            "_doc": "Tests of PEFT 0.21.2's suite that the real PEFT passes on this project's CI machine (CPU, "
                    "offline), per file: node id -> method. Regenerate with `python conformance/run.py "
                    f"--update-oracle` (all methods: {METHODS}; about 40 min on 2 cores).",
            "methods": methods, "versions": versions(), "files": dict(sorted(per_file.items())),
        }, indent=0) + "\n")

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(run_pytest, f, "peft", "", methods, None, 1, timeout, test_timeout) for f in files]
        for fut in cf.as_completed(futs):
            r = fut.result()
            passing = {rec["nodeid"]: rec.get("method", "general") for _, rec in sorted(r["records"].items())
                       if rec["outcome"] in OK}
            collected = collections.Counter(rec.get("method", "collect") for rec in r["records"].values())
            per_file[r["file"]] = {"collected": dict(collected), "wall_s": r["wall_s"], "rc": r["rc"],
                                   "passing": passing}
            write()
            print(f"[peft] {r['file']}: {len(r['records'])} tests, {len(passing)} passing, rc={r['rc']}, "
                  f"{r['wall_s']} s", flush=True)
    print(f"oracle: {round(time.time() - t0, 1)} s")
    return 0


# ---------------------------------------------------------------------------------------------- expected


def load_expected() -> dict:
    return json.loads(EXPECTED.read_text()) if EXPECTED.exists() else {"groups": []}


def expected_index(data) -> dict[str, dict]:
    idx = {}
    for g in data["groups"]:
        for nodeid in g.get("ids", []):
            idx[nodeid] = g
    return idx


def classify(groups, nodeid, text):
    for g in groups:
        for pat in g.get("match", []):
            if re.search(pat, f"{nodeid} {text}"):
                return g
    return None


def update_expected(data, rows, in_scope) -> tuple[int, int, int]:
    """Rewrite the ids of every group from this run's failures: in-scope ids that now pass (or are no longer
    PEFT-passing) are dropped, new failures go to the first group whose ``match`` fits, else to ``unclassified``."""
    groups = data["groups"]
    failing = {r["id"]: r for r in rows if not r["ok"]}
    old = expected_index(data)
    removed = added = unclassified = 0
    for g in groups:
        keep = []
        for nodeid in g.get("ids", []):
            if nodeid in in_scope and nodeid not in failing:
                removed += 1
            else:
                keep.append(nodeid)
        g["ids"] = keep
    for nodeid, row in sorted(failing.items()):
        if nodeid in old and old[nodeid] in groups and nodeid in old[nodeid]["ids"]:
            continue
        g = classify([g for g in groups if g.get("match")], nodeid, row["full"])
        if g is None:  # one group per distinct failure (exception and message, numbers blanked)
            g = next((g for g in groups if g["category"] == "untriaged" and g["cause"] == row["text"]), None)
            if g is None:
                g = {"cause": row["text"], "category": "untriaged",
                     "reason": f"fails here since {time.strftime('%Y-%m-%d')}, cause not triaged yet: the message is "
                               "the cause key; fix it, or move the ids to a group with a reason",
                     "match": [], "ids": []}
                groups.append(g)
            unclassified += 1
        g["ids"].append(nodeid)
        added += 1
    for g in groups:
        g["ids"] = sorted(set(g["ids"]))
    data["groups"] = [g for g in groups if g["ids"] or g.get("match")]  # empty automatic groups go
    EXPECTED.write_text(json.dumps(data, indent=1) + "\n")
    return removed, added, unclassified


# ---------------------------------------------------------------------------------------------- compare


def select(oracle, files, methods, sample, per_file_sample=None):
    want = set(methods.split(",")) | {"general"}
    out = {}
    for f in files:
        if f not in oracle["files"]:
            raise SystemExit(f"{f} is not in {ORACLE.name}; run --update-oracle --files {f} first")
        ids = [n for n, m in oracle["files"][f]["passing"].items() if m in want]
        k = max(sample, (per_file_sample or {}).get(f, 1))
        if k > 1:
            ids = [n for n in ids if zlib.crc32(n.encode()) % k == 0]
        out[f] = ids
    return out


def reuse(dirs, selected):
    """Records of earlier peftfast runs (their .jsonl files) instead of running: for re-reporting or
    --update-expected without a second run."""
    records = {}
    for d in dirs:
        for path in sorted(Path(d).glob("*.peftfast*.jsonl")):
            if ".rerun" in path.name:
                continue
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if "nodeid" in rec:
                    records[norm_id(rec["nodeid"])] = rec
    out = {}
    for f in selected:
        prefix = f"tests/{f}::"
        out[f] = {"records": {k: v for k, v in records.items() if k.startswith(prefix)}, "wall_s": 0.0, "rc": [],
                  "meta": {}}
    return out


def run_peftfast(selected, methods, jobs, timeout, test_timeout, tag=""):
    """Run the selected ids of each file with peftfast: a big file split into chunks of at most CHUNK tests, small
    files together in one process (each pytest process pays ~20 s of imports and collection)."""
    tasks, small = [], []
    for f, ids in selected.items():
        if not ids:
            continue
        n = -(-len(ids) // CHUNK)
        if n == 1 and len(ids) < CHUNK // 2:
            small.append(f)
            continue
        for k in range(n):
            tasks.append(([f], f"{tag}.{k}" if n > 1 else tag, ids[k::n]))
    while small:  # pack the small files into processes of at most CHUNK tests
        group, count = [], 0
        for f in list(small):
            if not group or count + len(selected[f]) <= CHUNK:
                group.append(f)
                count += len(selected[f])
                small.remove(f)
        tasks.append((group, tag, [n for f in group for n in selected[f]]))
    tasks.sort(key=lambda t: -len(t[2]))  # longest first
    results = {f: {"records": {}, "wall_s": 0.0, "rc": [], "meta": {}} for f in selected}
    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = {pool.submit(run_pytest, fs, "peftfast", t, methods, part, 1, timeout, test_timeout): (fs, t, part)
                for fs, t, part in tasks}
        for fut in cf.as_completed(futs):
            fs, t, part = futs[fut]
            r = fut.result()
            for f in fs:
                agg = results[f]
                prefix = f"tests/{f}::"
                agg["records"].update({k: v for k, v in r["records"].items() if k.startswith(prefix)})
                agg["wall_s"] += r["wall_s"] / len(fs)
                agg["rc"].append(r["rc"])
                for k, v in r["meta"].items():
                    agg["meta"].setdefault(k, set()).update(v)
            print(f"[peftfast{t}] {'+'.join(fs)}: {len(r['records'])} of {len(part)} tests ran, rc={r['rc']}, "
                  f"{r['wall_s']} s", flush=True)
    return results


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--files", default=",".join(DEFAULT_FILES))
    ap.add_argument("--jobs", type=int, default=2, help="pytest processes at once")
    ap.add_argument("--sample", type=int, default=1, help="keep 1 in N PEFT-passing tests (deterministic, by id)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per pytest process")
    ap.add_argument("--test-timeout", type=int, default=60, help="seconds per test phase (setup, call, teardown)")
    ap.add_argument("--update-oracle", action="store_true", help="run the real PEFT and rewrite oracle.json")
    ap.add_argument("--update-expected", action="store_true",
                    help="after the run, rewrite expected.json's ids: drop the ones that pass, add new failures")
    ap.add_argument("--no-rerun", action="store_true", help="do not re-run unexpected failures once")
    ap.add_argument("--ci", action="store_true",
                    help="CI's selection: every PEFT-passing test of the default files; --jobs 2")
    ap.add_argument("--reuse", default=None, help="comma-separated folders of earlier runs: read their peftfast "
                    ".jsonl records instead of running (with --update-expected: rewrite the list from them)")
    ap.add_argument("--out", default=str(OUT), help="output folder (default conformance/out)")
    args = ap.parse_args(argv)
    OUT = Path(args.out).resolve()
    files = [f if f.endswith(".py") else f + ".py" for f in args.files.split(",") if f]

    t_all = time.time()
    fetch()
    if args.update_oracle:
        return update_oracle(files, args.methods, args.jobs, args.timeout, args.test_timeout)

    oracle = json.loads(ORACLE.read_text())
    if args.ci:
        args.jobs = max(args.jobs, 2)
    selected = select(oracle, files, args.methods, args.sample, CI_SAMPLE if args.ci else {})
    if args.reuse:
        results = reuse(args.reuse.split(","), selected)
    else:
        results = run_peftfast(selected, args.methods, args.jobs, args.timeout, args.test_timeout)

    data = load_expected()
    exp = expected_index(data)

    def failed(rec):
        return rec is None or rec["outcome"] not in OK

    # re-run, once and in a fresh process, what failed and is not expected (ordering effects, timeouts, crashes)
    first_fail = {f: [n for n in ids if failed(results[f]["records"].get(norm_id(n))) and n not in exp]
                  for f, ids in selected.items()}
    flaky = []
    if not args.no_rerun and any(first_fail.values()):
        print(f"re-running {sum(map(len, first_fail.values()))} unexpected failures once", flush=True)
        again = run_peftfast({f: ids for f, ids in first_fail.items() if ids}, args.methods, args.jobs, args.timeout,
                             args.test_timeout, tag=".rerun")
        for f, ids in first_fail.items():
            for n in ids:
                rec = again[f]["records"].get(norm_id(n)) if f in again else None
                if not failed(rec):
                    flaky.append(n)

    rows, per_file, per_method = [], {}, collections.defaultdict(collections.Counter)
    unexpected, prune, causes, examples = [], [], collections.Counter(), {}
    for f, ids in selected.items():
        c = collections.Counter()
        for n in ids:
            method = oracle["files"][f]["passing"][n]
            rec = results[f]["records"].get(norm_id(n)) or {"nodeid": n, "outcome": "missing", "exc": "NotRun",
                                                  "msg": "not collected or not run with peftfast"}
            ok = rec["outcome"] in OK or n in flaky
            g = exp.get(n)
            text = cause(rec) if not ok else ""
            row = {"id": n, "file": f, "method": method, "outcome": rec["outcome"], "ok": ok, "text": text,
                   "full": f"{rec.get('exc') or rec['outcome']}: {rec.get('msg') or ''}" if not ok else ""}
            if n in flaky:
                row["flaky"] = True
            keys = ["peft_passing"]
            if ok:
                keys.append("passing_here")
                if g is not None and g["category"] != "flaky":
                    keys.append("prune")
                    prune.append(n)
            elif g is not None:
                keys.append("expected_diff")
                row["expected"] = g["cause"]
            else:
                keys.append("failing_here")
                unexpected.append(n)
                causes[text] += 1
                examples.setdefault(text, (n, rec.get("msg", "")))
            for k in keys:
                c[k] += 1
                per_method[method][k] += 1
            rows.append(row)
        per_file[f] = {**c, "wall_s": round(results[f]["wall_s"], 1), "rc": results[f]["rc"]}

    missing = sorted({n for r in results.values() for n in r["meta"].get("missing_names", [])})
    shimmed = sorted({n for r in results.values() for n in r["meta"].get("shimmed", [])})
    summary = {
        "peft_version": PEFT_VERSION, "methods": args.methods, "files": files, "sample": args.sample,
        "wall_s": round(time.time() - t_all, 1), "per_file": per_file,
        "per_method": {k: dict(v) for k, v in sorted(per_method.items())},
        "top_causes": [{"count": n, "cause": k, "example": examples[k][0], "message": examples[k][1]}
                       for k, n in causes.most_common(40)],
        "peftfast_missing_names": missing, "shimmed_for_collection": shimmed,
        "unexpected_failures": sorted(unexpected), "now_passing_prune": sorted(prune), "flaky_passed_on_rerun": flaky,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({**summary, "tests": rows}, indent=1))
    (OUT / "summary.md").write_text(render(summary))
    print(render(summary))

    if args.update_expected:
        removed, added, unclassified = update_expected(data, rows, {r["id"] for r in rows})
        print(f"expected.json: {removed} ids removed (pass now), {added} added, {unclassified} of them untriaged")
    return 1 if unexpected else 0


def render(s) -> str:
    lines = [f"# PEFT {s['peft_version']} conformance, peftfast side ({s['methods']}; sample 1/{s['sample']}; "
             f"{s['wall_s']} s)", "",
             "| file | PEFT-passing | passing here | expected diff | failing here | now passing, listed | pytest s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for f, c in s["per_file"].items():
        lines.append(f"| {f} | {c.get('peft_passing', 0)} | {c.get('passing_here', 0)} | {c.get('expected_diff', 0)} "
                     f"| {c.get('failing_here', 0)} | {c.get('prune', 0)} | {c['wall_s']} |")
    lines += ["", "| method | PEFT-passing | passing here | expected diff | failing here | now passing, listed |",
              "|---|---:|---:|---:|---:|---:|"]
    for m, c in s["per_method"].items():
        lines.append(f"| {m} | {c.get('peft_passing', 0)} | {c.get('passing_here', 0)} | {c.get('expected_diff', 0)} "
                     f"| {c.get('failing_here', 0)} | {c.get('prune', 0)} |")
    lines += ["", "## Unexpected failures by cause (PEFT-passing, failing here twice, not in expected.json)", ""]
    for i, t in enumerate(s["top_causes"], 1):
        lines.append(f"{i}. **{t['count']}** `{t['cause']}`  \n   e.g. `{t['example']}`")
    if s["flaky_passed_on_rerun"]:
        lines += ["", f"Failed, then passed on the re-run (not counted as failures; investigate if they recur): "
                  f"{len(s['flaky_passed_on_rerun'])}"] + [f"- `{n}`" for n in s["flaky_passed_on_rerun"][:30]]
    if s["now_passing_prune"]:
        lines += ["", f"Now passing, prune from expected.json (`python conformance/run.py --update-expected`): "
                  f"{len(s['now_passing_prune'])}"] + [f"- `{n}`" for n in s["now_passing_prune"][:50]]
    lines += ["", f"Names PEFT's tests import that peftfast lacks ({len(s['peftfast_missing_names'])}): "
              + ", ".join(s["peftfast_missing_names"]), "",
              "Served by the alias only so that modules collect: " + (", ".join(s["shimmed_for_collection"]) or "none"),
              "", f"Unexpected failures: {len(s['unexpected_failures'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
