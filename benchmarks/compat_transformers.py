"""Runs the tests against another transformers version and records the outcome.

    python -m benchmarks.compat_transformers 5.17.0 [--no-record] [-- PYTEST ARGUMENTS]
    python -m benchmarks.compat_transformers 3.6.0 --package triton -- tests/test_compiled.py

Why: per-layer checkpoints patch transformers' decoder-layer classes (amp/runtime/per_layer.py) and the runtime
registers an attention function, so a transformers release can break them while the project's own environment
stays green; the GPU machine runs 5.17 while this one installs the newest. The version is installed beside the
environment, not into it: `pip install --target $AMP_CACHE_DIR/compat/transformers-V` (~/.cache/amp by default)
of the wheel alone, plus only those of its requirements that the environment does not satisfy (5.17 wants
huggingface_hub < 2), and that folder goes first on PYTHONPATH of a pytest run. Everything else (torch, peft,
lm-eval, tokenizers) is the environment's. `--package triton` overlays a Triton release the same way (the GPU
machine runs 3.6): the compile check of amp_kernels/compiled.py must work with its compiler too.
The results go to benchmarks/results/compat_transformers.md; the exit status is pytest's.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from amp.io.models import cache_dir
from benchmarks.harness import record

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def unmet_requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements that the running environment does not satisfy."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    unmet = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or another platform's
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(str(req).split(";")[0].strip())
    return unmet


def install(version: str, package: str = "transformers") -> tuple[Path, list[str]]:
    """The overlay folder for `package` at `version` (built once, staged and renamed) and what it overlays."""
    cache = cache_dir() / "compat"
    target = cache / (f"transformers-{version}" if package == "transformers" else f"{package}-{version}")
    overlay_list = target / "amp_overlay.txt"
    if overlay_list.exists():
        return target, overlay_list.read_text().split()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheels, stage = Path(tmp) / "wheels", Path(tmp) / "stage"
        _pip("download", f"{package}=={version}", "--no-deps", "--only-binary", ":all:", "-d", str(wheels))
        wheel = next(wheels.glob(f"{package}-*.whl"))
        unmet = unmet_requirements(wheel)
        if unmet:
            _pip("install", "--target", str(stage), *unmet)
        _pip("install", "--no-deps", "--target", str(stage), str(wheel))
        (stage / "amp_overlay.txt").write_text("\n".join(unmet))
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    return target, unmet


def run_tests(target: Path, version: str, tests: list[str], package: str = "transformers") -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    found = subprocess.run([sys.executable, "-c", f"import {package}; print({package}.__version__)"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    if found.stdout.strip() != version:
        raise SystemExit(f"error: the overlay in {target} imports {package} {found.stdout.strip() or '?'}, "
                         f"not {version}: {found.stderr.strip().splitlines()[-1:] or ''}")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    proc.wait()
    summary = next((ln.strip("= \n") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)),
                   "no summary")
    return proc.returncode, summary, time.perf_counter() - start


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tests = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: pytest's (default: the whole suite)
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="python -m benchmarks.compat_transformers VERSION [...] [--no-record] "
                                      "[-- PYTEST ARGUMENTS]")
    p.add_argument("versions", nargs="+", help="versions, e.g. 5.17.0")
    p.add_argument("--package", default="transformers", help="what to overlay: transformers (default) or triton")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args(argv)
    rows, worst = [], 0
    for version in args.versions:
        target, overlay = install(version, args.package)
        rc, summary, seconds = run_tests(target, version, tests, args.package)
        print(f"{args.package} {version}: {summary} (exit {rc})")
        rows.append({"tested_transformers": version if args.package == "transformers" else "(environment's)",
                     **({"tested_triton": version} if args.package == "triton" else {}), "tests": " ".join(tests) or "tests/",
                     "result": summary, "exit": rc, "seconds": round(seconds),
                     "overlaid": ", ".join(overlay) or "nothing"})
        worst = worst or rc
    if not args.no_record:
        record("compat_transformers", rows, ["Each row: the project's tests run with that transformers version "
                                             "first on PYTHONPATH; 'overlaid' lists the requirements installed "
                                             "beside it because the environment's versions did not satisfy them."])
    return worst


if __name__ == "__main__":
    sys.exit(main())
