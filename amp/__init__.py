"""AMP: structured pruning of attention heads and MLP neurons (arXiv 2504.21174).

The public API, re-exported from the layers below (docs/architecture.md draws them)."""
from .api import prune_, prune_checkpoint
from .arch import SUPPORTED
from .common.errors import AmpError
from .export import FORMATS as EXPORT_FORMATS, export_checkpoint
from .io.calibration import Calibration, load_calibration
from .io.loading import load_pruned
from .io.models import load_model
from .prune.config import CRITERIA, PruneConfig
from .quality.evaluate import evaluate
from .recover.config import RecoverConfig
from .recover.run import recover_checkpoint
from .recover.train import recover_model
from .runtime import per_layer as _per_layer
from .runtime.fused import accelerate_

__all__ = ["prune_", "prune_checkpoint", "load_pruned", "PruneConfig", "CRITERIA", "SUPPORTED",
           "Calibration", "load_calibration", "AmpError", "load_model", "evaluate", "accelerate_",
           "RecoverConfig", "recover_model", "recover_checkpoint", "export_checkpoint", "EXPORT_FORMATS"]
__version__ = "0.4.0"

_per_layer.install()  # per-layer checkpoints build through from_pretrained once amp is imported
