"""AMP: structured pruning of attention heads and MLP neurons (arXiv 2504.21174)."""
from .api import load_pruned, prune_, prune_checkpoint
from .arch import SUPPORTED
from .config import CRITERIA, PruneConfig
from .data import Calibration, load_calibration
from .errors import AmpError
from .evaluation import evaluate
from .inference import accelerate_
from . import heterogeneous as _heterogeneous
from .models import load_model
from .recover import RecoverConfig, recover_checkpoint, recover_model

__all__ = ["prune_", "prune_checkpoint", "load_pruned", "PruneConfig", "CRITERIA", "SUPPORTED",
           "Calibration", "load_calibration", "AmpError", "load_model", "evaluate", "accelerate_",
           "RecoverConfig", "recover_model", "recover_checkpoint"]
__version__ = "0.3.0"

_heterogeneous.install()  # per-layer checkpoints build through from_pretrained once amp is imported
