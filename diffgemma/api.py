"""The loaded model as users see it: network, tokenizer and sampler defaults behind one object."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import StoredTensor, load_weights, save_checkpoint
from .config import ModelConfig, SamplerSettings, load_configs
from .errors import DiffGemmaError
from .model import DiffusionGemma
from .tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise DiffGemmaError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise DiffGemmaError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def resolve_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffGemmaError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffGemmaError("device 'cuda' was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffGemmaError("device 'mps' was asked for, but Apple MPS is not available")
    return device


def _download(repo_id: str) -> Path:
    """Fetch a checkpoint from the Hugging Face Hub; offline, say so plainly."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as err:  # network, auth and missing-repo errors all mean the same thing here
        raise DiffGemmaError(
            f"{repo_id}: not a local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(err).__name__}). Offline? Download the checkpoint elsewhere and pass its local folder."
        ) from None


def resolve_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise DiffGemmaError(f"{folder}: not a folder (pass the checkpoint folder, not a file in it)")
    if HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
        return _download(str(path))
    raise DiffGemmaError(f"{folder}: folder not found")


class DiffGemma:
    """A loaded DiffusionGemma checkpoint.

    `denoise_logits` is the stable parity surface; generation methods come from `diffgemma.generate`.
    """

    def __init__(
        self,
        network: DiffusionGemma,
        tokenizer: Tokenizer | None,
        settings: SamplerSettings,
        folder: Path | None = None,
        passthrough: dict[str, StoredTensor] | None = None,
    ) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.settings = settings
        self.folder = folder
        self._passthrough = passthrough or {}

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def denoise_logits(
        self,
        prompt_ids: torch.Tensor,
        canvas_ids: torch.Tensor,
        self_conditioning_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode `prompt_ids` [B, P], then one decoder pass over `canvas_ids` [B, C]: logits [B, C, V]."""
        return self.network.denoise_logits(prompt_ids, canvas_ids, self_conditioning_logits)

    def save(self, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
        """Write this model (and its tokenizer files) as a checkpoint `transformers` loads too; atomic."""
        extra = {}
        if self.folder is not None:
            extra = {name: self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()}
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        return save_checkpoint(self.network, self.settings, folder, extra, self._passthrough, **kwargs)


def load(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> DiffGemma:
    """Load a DiffusionGemma checkpoint folder (the `google/diffusiongemma-26B-A4B-it` layout).

    Weights go straight to `device` in `dtype`: the model is built without memory, then each tensor is read
    from disk into its final place.
    """
    folder = resolve_folder(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    config, settings = load_configs(folder)
    tokenizer = load_tokenizer(folder)
    with torch.device("meta"):
        network = DiffusionGemma(config)
    network = network.to(dtype).to_empty(device=device)
    passthrough = load_weights(network, folder)
    network.eval()
    network.requires_grad_(False)
    return DiffGemma(network, tokenizer, settings, folder, passthrough)
