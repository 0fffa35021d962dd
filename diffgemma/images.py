"""Images read and cut into patches for the vision tower, as Gemma 4's image processor prepares them.

An image (a file, its bytes, a `data:` URL, or a PIL image) is turned to RGB (transparency over white), resized
with its aspect kept (bicubic, Pillow's) to the largest size whose sides are multiples of patch x pooling
kernel and whose patches fit the budget (`max_soft_tokens` x kernel^2), scaled to [0, 1] and cut into
patch x patch squares, row by row, each flattened as (row, column, channel). It becomes `rows x columns /
kernel^2` soft tokens in the prompt.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import VisionConfig, read_json
from .errors import DiffGemmaError

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # the budgets Gemma 4's processor takes
DEFAULT_SOFT_TOKENS = 280
MAX_IMAGE_PIXELS = 100_000_000  # larger is refused before decoding (Pillow's own guard warns at 89M)

ImageLike = Any  # str | os.PathLike | bytes | PIL.Image.Image


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the tower: patches [rows x columns, 3 x patch^2] in [0, 1], and its soft tokens."""

    patches: torch.Tensor
    rows: int
    columns: int
    soft_tokens: int

    @functools.cached_property
    def fingerprint(self) -> bytes:
        """A digest of the patches (the same picture at the same size has the same one)."""
        digest = hashlib.blake2b(self.patches.numpy().tobytes(), digest_size=16)
        digest.update(f"{self.rows}x{self.columns}".encode())
        return digest.digest()


def soft_token_budget(folder: Path | None) -> int:
    """`max_soft_tokens` from the checkpoint's processor config (either file name; nested under
    `image_processor` or not), else Gemma 4's default of 280."""
    for name in PROCESSOR_FILES:
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            continue
        raw = read_json(path)
        section = raw.get("image_processor", raw)
        budget = section.get("max_soft_tokens") if isinstance(section, dict) else None
        if budget is not None:
            return check_budget(budget, f"{path}: `max_soft_tokens`")
    return DEFAULT_SOFT_TOKENS


def check_budget(budget: Any, what: str = "max_soft_tokens") -> int:
    if budget not in SOFT_TOKEN_BUDGETS or isinstance(budget, bool):
        raise DiffGemmaError(f"{what} must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, got {budget!r}")
    return budget


def open_image(image: ImageLike, what: str = "image"):
    """A PIL image from a path, bytes, a `data:` URL or a PIL image (files turned as their EXIF says)."""
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise DiffGemmaError("images need Pillow: pip install pillow") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise DiffGemmaError(f"{what}: images are not fetched from the web; give a file or a data: URL (base64)")
    if isinstance(image, str) and image.startswith("data:"):
        header, _, payload = image.partition(",")
        if not header.endswith(";base64"):
            raise DiffGemmaError(f"{what}: a data: URL must be base64 (data:image/png;base64,...)")
        try:
            image = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise DiffGemmaError(f"{what}: the data: URL's base64 does not decode") from None
    if isinstance(image, bytes | bytearray):
        source, name = io.BytesIO(image), what
    elif isinstance(image, str | os.PathLike):
        source = name = Path(image)
        if not source.is_file():
            raise DiffGemmaError(f"{source}: image file not found")
    else:
        kind = type(image).__name__
        raise DiffGemmaError(f"{what} must be a file path, bytes, a data: URL or a PIL image, got {kind}")
    try:
        opened = Image.open(source)
        if opened.width * opened.height > MAX_IMAGE_PIXELS:
            raise DiffGemmaError(f"{name}: {opened.width} x {opened.height} pixels is more than diffgemma reads")
        opened.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        reason = "no format it knows" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DiffGemmaError(f"{name}: not an image Pillow can read ({reason})") from None
    return ImageOps.exif_transpose(opened)


def target_size(height: int, width: int, patch: int, kernel: int, budget: int) -> tuple[int, int]:
    """The resized (height, width): the largest with the aspect kept, sides multiples of patch x kernel, and at
    most budget x kernel^2 patches; a side rounding to nothing gets one step, the other side its ratio."""
    step = patch * kernel
    max_patches = budget * kernel * kernel
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    new_height = math.floor(factor * height / step) * step
    new_width = math.floor(factor * width / step) * step
    longest = (max_patches // (kernel * kernel)) * step
    if new_height == 0 and new_width == 0:
        raise DiffGemmaError(f"an image of {width} x {height} pixels is too small to cut into patches")
    if new_height == 0:
        new_height, new_width = step, min(math.floor(width / height) * step, longest)
    elif new_width == 0:
        new_height, new_width = min(math.floor(height / width) * step, longest), step
    return new_height, new_width


def prepare_image(
    image: ImageLike, config: VisionConfig, budget: int = DEFAULT_SOFT_TOKENS, what: str = "image"
) -> PreparedImage:
    """An image -> `PreparedImage` for `config`'s patch size and pooling kernel, within `budget` soft tokens."""
    from PIL import Image

    picture = _rgb(open_image(image, what))
    given = f"{picture.width} x {picture.height} pixels"
    patch, kernel = config.patch_size, config.pooling_kernel_size
    height, width = target_size(picture.height, picture.width, patch, kernel, budget)
    if (height, width) != (picture.height, picture.width):
        picture = picture.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) * np.float32(1 / 255))  # [H, W, 3]
    rows, columns = height // patch, width // patch
    if max(rows, columns) > config.position_embedding_size:
        raise DiffGemmaError(
            f"{what}: {given} is too long and thin for the vision tower "
            f"({rows} x {columns} patches; at most {config.position_embedding_size} a side)"
        )
    patches = pixels.view(rows, patch, columns, patch, 3).permute(0, 2, 1, 3, 4).reshape(rows * columns, -1)
    return PreparedImage(patches.contiguous(), rows, columns, rows * columns // (kernel * kernel))


def _rgb(picture):
    """RGB, any transparency laid over white (as the reference's processor does)."""
    from PIL import Image

    if "A" in picture.getbands() or picture.info.get("transparency") is not None:
        background = Image.new("RGBA", picture.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, picture.convert("RGBA")).convert("RGB")
    return picture.convert("RGB")


IMAGE_PART_TYPES = ("image", "image_url", "input_image")


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[ImageLike]]:
    """Chat messages -> (the messages with each image part reduced to `{"type": "image"}`, which a Gemma 4
    template writes as the image token; the images, in order). An image part is transformers' `{"type":
    "image", "image" | "url" | "path": ...}`, OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` or the
    Responses API's `{"type": "input_image", "image_url": ...}`."""
    images: list[ImageLike] = []
    if not isinstance(messages, list):  # (not a conversation: the template's check says so)
        return messages, images
    plain = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            plain.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in IMAGE_PART_TYPES:
                parts.append(part)
                continue
            images.append(_image_of_part(part, f"messages[{index}]"))
            parts.append({"type": "image"})
        plain.append({**message, "content": parts})
    return plain, images


def _image_of_part(part: dict[str, Any], where: str) -> ImageLike:
    found = part.get("image", part.get("url", part.get("path"))) if part["type"] == "image" else part.get("image_url")
    if isinstance(found, dict):
        found = found.get("url")
    if found is None:
        raise DiffGemmaError(f"{where}: an image part of type {part['type']!r} carries no image (or its url)")
    return found


def expand_placeholders(
    ids: list[int], counts: list[int], config: VisionConfig, marker: str | None = None
) -> list[int]:
    """A prompt's image ids (one a picture, as a template writes it) -> `boi`, one image id per soft token of
    that picture (`counts`: per picture), `eoi`. The prompt must hold exactly one image id per picture
    (`marker`: the image token's text, for the error)."""
    spots = [i for i, token in enumerate(ids) if token == config.image_token_id]
    if len(spots) != len(counts):
        named = f"{marker!r} (id {config.image_token_id})" if marker else f"id {config.image_token_id}"
        raise DiffGemmaError(
            f"the prompt has {len(spots)} image placeholder(s) for {len(counts)} image(s): put the image "
            f"token {named} where each image goes (a chat's image parts write it)"
        )
    out, start = [], 0
    for spot, count in zip(spots, counts, strict=True):
        out += ids[start:spot] + [config.boi_token_id] + [config.image_token_id] * count + [config.eoi_token_id]
        start = spot + 1
    return out + ids[start:]
