"""int8 and int4 weights on the CPU: PyTorch's weight-only kernels (`quant.cpu_linear`: one byte, or half a
byte, a weight read) against expanding each weight to float32 for the product, where `quant.direct_kernel`
picks between them (CPU_KERNEL_MAX_ROWS, CPU_KERNEL_MIN_VALUES).

1. One weight of each size against a number of rows (8 experts' worth of products, as the experts run them); on
   a CPU with int8 matrix units (AMX), int8 through them too (`quant.int8_units_linear`, which int8 takes there).
2. A whole mixture-of-experts layer of the 26B shape (128 experts x 704, top-8, hidden 2816) over a canvas of
   256 tokens at batch 1 and 4, random routing: float32 weights, then each format expanded and through its kernel.
3. Quantizing that layer's experts from bf16 (as loading with `quant=` does, an expert at a time): int8, and
   int4 eagerly and compiled (`quant.COMPILED_INT4_VALUES`).

`--dtype bfloat16` runs the activations, the expanded weights and the float layer in bf16 (what `--dtype auto`
picks for a bf16 checkpoint on CPUs with bf16 instructions).

    python bench/cpu_quant.py [--repeats 3] [--dtype float32] [--results FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu
from common import append_results

from diffgemma import quant
from diffgemma.config import parse_model_config
from diffgemma.model import Experts
from diffgemma.presets import preset_config

WEIGHTS = [(1408, 2816), (2816, 704), (1024, 1024), (512, 512)]  # [out, in]: the 26B's expert halves, smaller
ROWS = [16, 48, 96, 128, 192]
FORMATS = ("int8", "int4")
CONFIG = parse_model_config(preset_config("26b-a4b"), "26b-a4b")


def median_ms(repeats: int, work: Callable[..., object], *args: object) -> float:
    return gpu.median_ms(partial(work, *args), repeats, torch.device("cpu"), warmup=1)


def random_experts() -> Experts:
    """A mixture-of-experts layer's experts of the 26B shape, float32, random (seeded)."""
    torch.manual_seed(0)
    experts = Experts(CONFIG).requires_grad_(False)
    experts.gate_up_proj.normal_(0, 0.02)
    experts.down_proj.normal_(0, 0.02)
    return experts


def weight_sweep(fmt: quant.QuantFormat, repeats: int, dtype: torch.dtype) -> str:
    experts = 8
    lines = [f"| {fmt.name} weight [out, in] | " + " | ".join(f"{rows} rows" for rows in ROWS) + " |"]
    lines.append("|---|" + "---|" * len(ROWS))
    for out_features, in_features in WEIGHTS:
        stored = quant.quantize(torch.randn(experts, out_features, in_features) * 0.02, fmt)
        cells = []
        for rows in ROWS:
            x = torch.randn(experts, rows, in_features).to(dtype)
            qweight, scale = stored["qweight"], stored["scale"]
            expanded = median_ms(repeats, quant.expanded_product, x, qweight, scale, fmt, dtype, None, True)
            kernel = median_ms(repeats, quant.cpu_grouped_linear, x, stored["qweight"], stored["scale"], None)
            picked = quant.direct_kernel(fmt, x, (out_features, in_features), rows)
            mark = " (picked)" if picked == quant.CPU_KERNEL else ""
            cell = f"{expanded:.1f} / {kernel:.1f}: {expanded / kernel:.1f}x{mark}"
            if picked == quant.CPU_INT8_UNITS:  # (int8 on a CPU with int8 matrix units: this one is picked)
                units_product = quant.int8_units_linear
                units = median_ms(repeats, quant.cpu_grouped_linear, x, qweight, scale, None, False, units_product)
                cell += f"; units {units:.1f}: {expanded / units:.1f}x (picked)"
            cells.append(cell)
        lines.append(f"| {out_features} x {in_features} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_rows(experts: Experts, repeats: int, dtype: torch.dtype) -> str:
    experts = experts.to(dtype)  # the quantized modules' products run in their float layer's dtype, as loaded
    quantized = {}
    for name in FORMATS:
        quantized[name] = quant.QuantExperts(experts, quant.QuantFormat(name))
        for weight in ("gate_up_proj", "down_proj"):
            quantized[name].load_float(weight, experts._parameters[weight].detach())
    header = ["batch", "tokens", "rows per expert (largest)", f"{str(dtype)[6:]} ms"]
    for name in FORMATS:
        header += [f"{name} expanded ms", f"{name} kernel ms"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for batch in (1, 4):
        tokens = batch * CONFIG.canvas_length
        x = torch.randn(tokens, CONFIG.hidden_size).to(dtype)
        chosen = torch.rand(tokens, CONFIG.num_experts).topk(CONFIG.top_k_experts, dim=-1).indices
        weights = torch.rand(tokens, CONFIG.top_k_experts).softmax(-1)
        largest = int(torch.bincount(chosen.reshape(-1), minlength=CONFIG.num_experts).max())
        with torch.no_grad():
            cells = [str(batch), str(tokens), str(largest), f"{median_ms(repeats, experts, x, chosen, weights):.0f}"]
            for module in quantized.values():
                quant.set_direct_kernels(False)
                expanded = median_ms(repeats, module, x, chosen, weights)
                quant.set_direct_kernels(True)
                kernel = median_ms(repeats, module, x, chosen, weights)
                cells += [f"{expanded:.0f}", f"{kernel:.0f} ({expanded / kernel:.1f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quantize_rows(experts: Experts) -> str:
    stacks = {name: experts._parameters[name].bfloat16() for name in ("gate_up_proj", "down_proj")}
    lines = ["| format | s for one layer's experts | min for 30 layers |", "|---|---|---|"]
    compiled_from = quant.COMPILED_INT4_VALUES
    for label, name, compiled in (
        ("int8", "int8", False),
        ("int4, eager", "int4", False),
        ("int4, compiled", "int4", True),
    ):
        quant.COMPILED_INT4_VALUES = compiled_from if compiled else 2**62
        module = quant.QuantExperts(experts, quant.QuantFormat(name))
        for weight, stack in stacks.items():
            module.load_float(weight, stack[:1])  # compiles each shape once, outside the timing
        started = time.perf_counter()
        for weight, stack in stacks.items():
            module.load_float(weight, stack)
        seconds = time.perf_counter() - started
        lines.append(f"| {label} | {seconds:.1f} | {seconds * CONFIG.num_hidden_layers / 60:.1f} |")
    quant.COMPILED_INT4_VALUES = compiled_from
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activations")
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    sweeps = [weight_sweep(quant.QuantFormat(name), args.repeats, dtype) for name in FORMATS]
    experts = random_experts()  # the same layer for both parts (3 GiB in float32)
    layer = layer_rows(experts, args.repeats, dtype)
    quantizing = quantize_rows(experts)
    append_results(
        f"CPU: int8 and int4 weights through PyTorch's weight-only kernels, or expanded, {args.dtype} "
        "(bench/cpu_quant.py)",
        f"One weight, 8 experts' products, expanded / kernel ms ({args.dtype} activations; the kernels take them "
        "as bf16):\n\n"
        + "\n\n".join(sweeps)
        + "\n\nOne mixture-of-experts layer of the 26B shape (canvas 256, random routing):\n\n"
        + layer
        + "\n\nQuantizing that layer's experts from bf16, an expert at a time as loading does:\n\n"
        + quantizing,
        f"`quant.direct_kernel` picks the kernel for at most {quant.CPU_KERNEL_MAX_ROWS} rows a weight and weights "
        f"of at least {quant.CPU_KERNEL_MIN_VALUES:,} values; median of {args.repeats}."
        + (
            " This CPU has int8 matrix units (AMX): int8 takes them for every product (`units` in the first table;"
            " the layer's int8 kernel column is them)."
            if quant.cpu_int8_units()
            else ""
        ),
        args.results,
    )


if __name__ == "__main__":
    main()
