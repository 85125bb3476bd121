"""Where the vLLM plugin lives (amp/export/vllm_plugin, a package of its own) and how it gets into the Python
environment that runs vLLM: one pip command, repeated only when the plugin's files change."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1] / "export" / "vllm_plugin"


def install_command(pip: str = "pip") -> str:
    return f"{pip} install --no-deps {PLUGIN}"


def _signature() -> str:
    digest = hashlib.sha256()
    for path in sorted(PLUGIN.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def ensure_installed(python: str) -> None:
    """Installs (or refreshes) the plugin into the environment of `python`, which has vLLM (--no-deps: the
    plugin's only dependency is vLLM itself, and pip must not swap the environment's vLLM build)."""
    env = Path(python).resolve().parent.parent
    marker = env / "amp_vllm_plugin"
    want = _signature()
    if marker.is_file() and marker.read_text().strip() == want:
        return
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(PLUGIN)],
                   check=True, capture_output=True)
    try:
        marker.write_text(want + "\n")
    except OSError:  # a read-only environment: the plugin is installed, only the marker is missing
        pass
