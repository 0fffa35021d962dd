"""What a picture costs: the vision tower at Gemma 4's default shape (random weights) over a picture of each soft-token
budget, in each dtype, and the same picture asked for again (its soft tokens kept: `DiffGemma.image_features`).

The tower is `vision.ImageEncoder` with `config.VisionConfig()`'s shape (hidden 768, 16 layers, 16-pixel patches
pooled 3 x 3) projecting to the 26B's hidden size (2816); the picture is square, resized to the budget's largest
size (`images.prepare_image`); reading and resizing it is timed apart.

    python bench/vision.py [--budgets 70 280 1120] [--dtypes bfloat16 float32] [--repeats 3] [--results FILE]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import gpu
from common import append_results

from diffgemma.config import VisionConfig
from diffgemma.images import SOFT_TOKEN_BUDGETS, prepare_image
from diffgemma.vision import ImageEncoder, parameter_count

TEXT_HIDDEN = 2816  # the 26B-A4B's


def seconds(work, repeats: int) -> float:
    """The median of `repeats` timed runs after one warm-up (`gpu.median_ms` on the CPU)."""
    return gpu.median_ms(work, repeats, torch.device("cpu"), warmup=1) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", type=int, nargs="+", default=[70, 280, 1120], choices=SOFT_TOKEN_BUDGETS)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    config = VisionConfig()
    torch.manual_seed(0)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    png = encoded.getvalue()
    lines = ["| soft tokens | patches | read + resize s | " + " | ".join(f"tower {d} s" for d in args.dtypes) + " |"]
    lines.append("|---|---|---|" + "---|" * len(args.dtypes))
    towers = {}
    for name in args.dtypes:
        tower = ImageEncoder(config, TEXT_HIDDEN).to(getattr(torch, name)).eval()
        for parameter in tower.parameters():
            torch.nn.init.normal_(parameter, 0.0, 0.02)
        towers[name] = tower
    for budget in args.budgets:
        prepared = prepare_image(png, config, budget)
        read = seconds(lambda budget=budget: prepare_image(png, config, budget), args.repeats)
        cells = [str(prepared.soft_tokens), str(prepared.rows * prepared.columns), f"{read:.2f}"]
        for tower in towers.values():
            run = (tower, prepared.patches, prepared.rows, prepared.columns)
            cells.append(f"{seconds(lambda run=run: run[0](*run[1:]), args.repeats):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    append_results(
        "Images: the vision tower at Gemma 4's default shape (bench/vision.py)",
        "\n".join(lines),
        f"Tower: {parameter_count(config, TEXT_HIDDEN) / 1e6:.0f}M parameters (random), a 1024 x 1024 PNG resized to "
        f"each budget; median of {args.repeats}. A picture asked for again costs its reading only: its soft tokens are "
        "kept (`DiffGemma.image_features`, the last 16 pictures).",
        args.results,
    )


if __name__ == "__main__":
    main()
