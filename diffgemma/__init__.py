"""diffgemma: DiffusionGemma (block text diffusion) in plain PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DiffGemmaError

if TYPE_CHECKING:
    from .api import DiffGemma, load

__all__ = ["DiffGemma", "DiffGemmaError", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`DiffGemma` and `load` come with PyTorch, imported when first asked for: so `diffgemma --help`, `--version`
    and a mistyped option answer at once, not after the two seconds importing PyTorch takes."""
    if name in ("DiffGemma", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffgemma' has no attribute {name!r}")
