"""Writing results: everything goes to a temporary sibling folder, renamed into place only when complete,
so that an interrupted run never leaves something that looks finished."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..common.errors import AmpError
from ..runtime import per_layer

REPORT_NAME = "amp_report.json"


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise AmpError(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise AmpError(f"output path {out} exists and is not a folder")
    return out


@contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pruned(model, tokenizer, report: dict, out, overwrite: bool = False) -> Path:
    with staged_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        per_layer.write_standalone(tmp)  # a per-layer result loads in plain transformers (trust_remote_code)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return Path(out)


def read_report(folder) -> dict | None:
    path = Path(folder) / REPORT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path, payload: dict) -> None:
    """Writes JSON to a sibling temporary file, then renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def rewrite_report(folder, report: dict) -> None:
    """Replaces the report of a finished folder atomically."""
    write_json_atomic(Path(folder) / REPORT_NAME, report)
