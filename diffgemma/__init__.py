"""diffgemma: DiffusionGemma (block text diffusion) in plain PyTorch."""

from .api import DiffGemma, load
from .errors import DiffGemmaError

__all__ = ["DiffGemma", "DiffGemmaError", "load"]
__version__ = "0.1.0"
