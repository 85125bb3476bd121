"""The one benchmark harness: warm-up, repeats, median/min/max, and results appended under
benchmarks/results/ (CSV and Markdown) with the command, machine, versions and git commit."""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, warmup: int = 1, repeats: int = 3, sync=None) -> dict:
    """Seconds per call of fn(): median, min, max over `repeats` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def gpu_ms(fn) -> dict:
    """Milliseconds per call on CUDA via triton.testing.do_bench (median, min, max quantiles)."""
    from triton.testing import do_bench
    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.0, 1.0])
    return {"median": med / 1e3, "min": lo / 1e3, "max": hi / 1e3, "repeats": "do_bench"}


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command() -> str:
    script = Path(sys.argv[0])
    if script.parent.name == "benchmarks" and script.suffix == ".py":  # run as python -m benchmarks.x
        return " ".join(["python", "-m", f"benchmarks.{script.stem}", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def machine() -> dict:
    info = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(), "torch": torch.__version__, "commit": git_commit(),
            "command": _command()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def record(name: str, rows: list[dict], summary: list[str] | None = None, results_dir: Path = RESULTS) -> dict:
    """Appends rows to results/<name>.csv and a dated section to results/<name>.md; returns the run header."""
    results_dir.mkdir(parents=True, exist_ok=True)
    head = machine()
    csv_path = results_dir / f"{name}.csv"
    fields = list(head) + [k for r in rows for k in r if k not in head]
    fields = list(dict.fromkeys(fields))
    old_rows: list[dict] = []
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields = reader.fieldnames or []
            if old_fields != fields[:len(old_fields)] or len(old_fields) < len(fields):
                old_rows = list(reader)  # new columns: the file is rewritten with the union of both headers
                fields = list(dict.fromkeys(old_fields + fields))
            else:
                fields = old_fields
    rewrite = bool(old_rows) or not csv_path.exists()
    with csv_path.open("w" if rewrite else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if rewrite:
            writer.writeheader()
            writer.writerows(old_rows)
        for row in rows:
            writer.writerow({**head, **row})
    with (results_dir / f"{name}.md").open("a") as f:
        f.write(f"\n## {head['date']} · commit {head['commit']}\n\n")
        f.write("; ".join(f"{k}: {v}" for k, v in head.items() if k not in ("date", "commit")) + "\n\n")
        cols = list(dict.fromkeys(k for r in rows for k in r))  # rows of different kinds: every column, blanks
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for row in rows:
            f.write("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |\n")
        for line in summary or []:
            f.write(f"\n{line}\n")
    return head


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
