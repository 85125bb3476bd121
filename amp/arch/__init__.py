"""Registry of supported families, keyed by Hugging Face class name."""
from __future__ import annotations

from ..common.errors import AmpError
from .base import ArchSpec, Geometry
from .llama import LLAMA, MISTRAL_QWEN2
from .phi import PHI
from .phi3 import PHI3

_SPECS = (LLAMA, MISTRAL_QWEN2, PHI, PHI3)
REGISTRY: dict[str, ArchSpec] = {cls: spec for spec in _SPECS for cls in spec.classes}
SUPPORTED = tuple(sorted(REGISTRY))

__all__ = ["ArchSpec", "Geometry", "REGISTRY", "SUPPORTED", "spec_for", "spec_for_class"]


def spec_for_class(class_name: str) -> ArchSpec:
    try:
        return REGISTRY[class_name]
    except KeyError:
        raise AmpError(f"unsupported model class {class_name}; supported: {', '.join(SUPPORTED)}") from None


def spec_for(model) -> ArchSpec:
    return spec_for_class(type(model).__name__)
