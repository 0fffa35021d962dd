"""int8 weights on the CPU: PyTorch's weight-only int8 kernel (one byte a weight read) against expanding each
weight to float32 for the product, where `quant.direct_kernel` picks between them (CPU_INT8_MAX_ROWS,
CPU_INT8_MIN_VALUES).

1. One weight of each size against a number of rows (8 experts' worth of products, as the experts run them).
2. A whole mixture-of-experts layer of the 26B shape (128 experts x 704, top-8, hidden 2816) over a canvas of
   256 tokens at batch 1 and 4, random routing: float32 weights, int8 expanded, int8 through the kernel.

    python bench/cpu_int8.py [--repeats 3] [--results FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

from diffgemma import quant
from diffgemma.config import parse_model_config
from diffgemma.model import Experts
from diffgemma.presets import preset_config

WEIGHTS = [(1408, 2816), (2816, 704), (1024, 1024), (512, 512)]  # [out, in]: the 26B's expert halves, smaller
ROWS = [16, 48, 96, 128, 192]


def median_ms(repeats: int, work: Callable[..., object], *args: object) -> float:
    work(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def expanded_product(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, (qweight.float() * scale).transpose(1, 2))


def weight_sweep(repeats: int) -> str:
    experts = 8
    lines = ["| weight [out, in] | " + " | ".join(f"{rows} rows" for rows in ROWS) + " |"]
    lines.append("|---|" + "---|" * len(ROWS))
    for out_features, in_features in WEIGHTS:
        stored = quant.quantize(torch.randn(experts, out_features, in_features) * 0.02, quant.QuantFormat("int8"))
        qweight, scale = stored["qweight"], stored["scale"]
        cells = []
        for rows in ROWS:
            x = torch.randn(experts, rows, in_features)
            expanded = median_ms(repeats, expanded_product, x, qweight, scale)
            kernel = median_ms(repeats, quant.cpu_int8_grouped_linear, x, qweight, scale, None)
            picked = quant.direct_kernel(quant.QuantFormat("int8"), x, (out_features, in_features), rows)
            mark = " (picked)" if picked else ""
            cells.append(f"{expanded:.1f} / {kernel:.1f}: {expanded / kernel:.1f}x{mark}")
        lines.append(f"| {out_features} x {in_features} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_rows(repeats: int) -> str:
    config = parse_model_config(preset_config("26b-a4b"), "26b-a4b")
    torch.manual_seed(0)
    experts = Experts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    int8 = quant.QuantExperts(experts, quant.QuantFormat("int8"))
    for name in ("gate_up_proj", "down_proj"):
        int8.load_float(name, experts._parameters[name].detach())
    header = ["batch", "tokens", "rows per expert (largest)", "float32 ms", "int8 expanded ms", "int8 kernel ms"]
    lines = ["| " + " | ".join([*header, "kernel vs expanded"]) + " |", "|---|---|---|---|---|---|---|"]
    for batch in (1, 4):
        tokens = batch * config.canvas_length
        x = torch.randn(tokens, config.hidden_size)
        chosen = torch.rand(tokens, config.num_experts).topk(config.top_k_experts, dim=-1).indices
        weights = torch.rand(tokens, config.top_k_experts).softmax(-1)
        largest = int(torch.bincount(chosen.reshape(-1), minlength=config.num_experts).max())
        with torch.no_grad():
            plain = median_ms(repeats, experts, x, chosen, weights)
            quant.set_direct_kernels(False)
            expanded = median_ms(repeats, int8, x, chosen, weights)
            quant.set_direct_kernels(True)
            kernel = median_ms(repeats, int8, x, chosen, weights)
        cells = [
            batch,
            tokens,
            largest,
            f"{plain:.0f}",
            f"{expanded:.0f}",
            f"{kernel:.0f}",
            f"{expanded / kernel:.1f}x",
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    sweep = weight_sweep(args.repeats)
    layer = layer_rows(args.repeats)
    append_results(
        "CPU: int8 weights through PyTorch's int8 kernel, or expanded (bench/cpu_int8.py)",
        "One weight, 8 experts' products, expanded / kernel ms (float32 activations; the kernel takes them as "
        "bf16):\n\n"
        + sweep
        + "\n\nOne mixture-of-experts layer of the 26B shape (canvas 256, random routing):\n\n"
        + layer,
        f"`quant.direct_kernel` picks the kernel for at most {quant.CPU_INT8_MAX_ROWS} rows a weight and weights of "
        f"at least {quant.CPU_INT8_MIN_VALUES:,} values; median of {args.repeats}.",
        args.results,
    )


if __name__ == "__main__":
    main()
