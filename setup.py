from setuptools import find_packages, setup

setup(
    name="amp-prune",
    version="0.4.0",
    description="AMP structured pruning (attention heads and MLP neurons) for decoder-only LLMs",
    packages=find_packages(include=["amp", "amp.*", "amp_kernels", "amp_kernels.*"]),
    package_data={"amp": ["resources/*.json", "resources/*.jsonl", "resources/*.py",
                          # the vLLM plugin, a package of its own that `amp export --format vllm` points to
                          "export/vllm_plugin/pyproject.toml", "export/vllm_plugin/amp_vllm/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=4.57,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tqdm>=4.60",
        "lm-eval>=0.4.9",
        "peft>=0.13",
        "matplotlib>=3.5",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["amp=amp.cli:main"]},
)
