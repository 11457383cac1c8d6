"""Where the bench's rows go: the environment they were measured in, and the JSON file.

Every results file records the device (CPU model and count, GPU name), the versions of the
libraries, the git sha (and whether the tree differs from it), the torch thread count and the
time; by default it is written to ``bench/results/bench-<sha>.json``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def repo_root() -> Path:
    """The checkout this package lives in (peftfast/tools/bench/ -> three folders up)."""
    return Path(__file__).resolve().parents[3]


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(repo_root()), *args],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Device, versions, git sha (and whether the tree differs from it), threads, time."""
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".", ":(exclude)bench/results") if sha else None
    dists = ("peftfast", "torch", "triton", "transformers", "peft", "bitsandbytes")
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in dists},
        "git_sha": sha or "unknown",
        "git_dirty": bool(status) if status is not None else None,
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def default_out(env: dict) -> Path:
    root = repo_root() if (repo_root() / ".git").exists() else Path.cwd()
    name = f"bench-{env['git_sha'][:12]}{'-dirty' if env['git_dirty'] else ''}.json"
    return root / "bench" / "results" / name


def write_rows(path: Path, meta: dict[str, Any], rows: list[dict]) -> None:
    """The results file: ``{"meta": ..., "rows": [...]}`` (values JSON cannot hold as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
