"""The real 26B-A4B shape on the CPU, in int4 (the format that fits 18 GB): one denoising step, timed.

The network is built with random weights straight into its quantized buffers (random nibbles and scales of the
size real weights get: quantizing 25B random floats would take this machine most of an hour), the rest in
float32. A prompt of 128 tokens is encoded, then denoising steps of a 256-token canvas (decoder pass and fast
sampler) are timed with PyTorch's CPU int4 kernel taking the experts (`quant.cpu_kernel_takes`) and with every
weight expanded, as before it. Resident memory is read from /proc.

    python bench/cpu_26b.py [--format int4] [--steps 2] [--results FILE]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results
from gpu import CANVAS_STEPS, denoise_step

from diffgemma import quant
from diffgemma.config import parse_model_config
from diffgemma.model import DiffusionGemma
from diffgemma.presets import preset_config


def random_quantized_network(config, fmt: quant.QuantFormat) -> DiffusionGemma:
    """float32 where unquantized (normal weights, unit norms), quantized buffers filled with random codes."""
    with torch.device("meta"):
        network = DiffusionGemma(config)
        quant.convert_(network, fmt)
    network = network.to_empty(device="cpu").requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name.endswith("_qweight"):
                low, high = (-127, 128) if tensor.dtype == torch.int8 else (0, 256)
                tensor.copy_(torch.randint(low, high, tensor.shape, generator=generator, dtype=torch.int16))
            elif name.endswith("_scale"):  # weights of about 0.02: a scale per level of the format's range
                tensor.fill_(0.06 / (127 if fmt.name == "int8" else 7))
            elif tensor.ndim >= 2:
                tensor.normal_(0.0, 0.02, generator=generator)
            elif tensor.is_floating_point():
                tensor.fill_(1.0)
    return network.eval()


def resident_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", default="int4", choices=quant.FORMATS)
    parser.add_argument("--steps", type=int, default=2, help="timed steps each way, after one to warm up")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    config = parse_model_config(preset_config("26b-a4b"), "26b-a4b")
    fmt = quant.QuantFormat(args.format)
    started = time.perf_counter()
    network = random_quantized_network(config, fmt)
    built, loaded = time.perf_counter() - started, resident_gib()
    rows = []
    with torch.no_grad():
        for kernels in (True, False):
            quant.set_direct_kernels(kernels)
            step = denoise_step(network, 1, args.prompt)
            step()
            times = []
            for _ in range(args.steps):
                begun = time.perf_counter()
                step()
                times.append(time.perf_counter() - begun)
            seconds = statistics.median(times)
            way = "CPU kernels for the experts" if kernels else "every weight expanded"
            tokens_per_s = config.canvas_length / (CANVAS_STEPS * seconds)
            rows.append(f"| {fmt.name}, {way} | {seconds:.1f} | {tokens_per_s:.2f} |")
    quant.set_direct_kernels(True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    table = "\n".join(["| weights | s per denoising step | tokens/s at 16 steps |", "|---|---|---|", *rows])
    append_results(
        "CPU: the 26B-A4B shape in int4, one denoising step (bench/cpu_26b.py)",
        table,
        f"26B-A4B shape, random weights ({fmt.describe()}; embedding, norms, routers and self-conditioning in "
        f"float32), prompt {args.prompt}, canvas {config.canvas_length}, batch 1; median of {args.steps} steps "
        f"after one to warm up. Resident memory {loaded:.1f} GiB once built (in {built:.0f} s), peak "
        f"{peak:.1f} GiB.",
        args.results,
    )


if __name__ == "__main__":
    main()
