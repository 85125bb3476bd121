"""Registry of supported families, keyed by Hugging Face class name. A new family is one file here (an ArchSpec)
and one line below."""
from __future__ import annotations

from ..common.errors import AmpError
from .base import ArchSpec, Geometry, MoESpec
from .gemma import GEMMA2, GEMMA3
from .llama import LLAMA, MISTRAL_QWEN2
from .mixtral import MIXTRAL
from .phi import PHI
from .phi3 import PHI3
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE
from .refused import REFUSED

SPECS = (LLAMA, MISTRAL_QWEN2, PHI, PHI3, QWEN3, GEMMA2, GEMMA3, MIXTRAL, QWEN3_MOE)
REGISTRY: dict[str, ArchSpec] = {cls: spec for spec in SPECS for cls in spec.classes}
SUPPORTED = tuple(sorted(REGISTRY))

__all__ = ["ArchSpec", "Geometry", "MoESpec", "REGISTRY", "SPECS", "SUPPORTED", "spec_for", "spec_for_class",
           "geometry_of"]


def spec_for_class(class_name: str) -> ArchSpec:
    if class_name in REFUSED:
        raise AmpError(f"{class_name} cannot be pruned: {REFUSED[class_name]}")
    try:
        return REGISTRY[class_name]
    except KeyError:
        raise AmpError(f"unsupported model class {class_name}; supported: {', '.join(SUPPORTED)}") from None


def spec_for(model) -> ArchSpec:
    return spec_for_class(type(model).__name__)


def geometry_of(model_or_config) -> Geometry:
    """The Geometry of a model (or of a config whose `architectures` names its class)."""
    config = getattr(model_or_config, "config", model_or_config)
    name = type(model_or_config).__name__ if hasattr(model_or_config, "config") else \
        (getattr(config, "architectures", None) or ["?"])[0]
    return Geometry.from_config(config, REGISTRY.get(name))
