"""The real 26B-A4B shape on the CPU, in int4 (the format that fits 18 GB): one denoising step, timed.

The network is built with random weights straight into its quantized buffers (random nibbles and scales of the
size real weights get: quantizing 25B random floats would take this machine most of an hour), the rest in
float32 (or `--dtype bfloat16`: CPUs with bf16 instructions multiply it several times faster). A prompt of 128
tokens is encoded, then denoising steps of a 256-token canvas (decoder pass and fast sampler) are timed with
PyTorch's CPU int4 kernel taking the experts (`quant.cpu_kernel_takes`) and with every weight expanded, as
before it. Resident memory is read from /proc. `--qlora` instead times one training step of LoRA adapters
(rank 16) over the frozen quantized base (`train chat --quant int4 --lora-rank 16`): the block-diffusion loss
and its backward pass over one example (the prompt and one canvas of response), with gradient checkpointing.

    python bench/cpu_26b.py [--format int4] [--dtype float32] [--steps 2] [--qlora] [--results FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, peak_resident_gib, resident_gib
from gpu import CANVAS_STEPS, denoise_step

from diffgemma import quant
from diffgemma.config import QUANT_FORMATS, parse_model_config
from diffgemma.model import DiffusionGemma
from diffgemma.presets import preset_config


def random_quantized_network(config, fmt: quant.QuantFormat, dtype: torch.dtype = torch.float32) -> DiffusionGemma:
    """`dtype` where unquantized (normal weights, unit norms), quantized buffers filled with random codes."""
    network = quant.meta_network(config, dtype, fmt).to_empty(device="cpu").requires_grad_(False)
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


def qlora_step(network: DiffusionGemma, fmt: quant.QuantFormat, prompt: int, built: float, loaded: float, results):
    from diffgemma.train.lora import LoraSettings, add_lora
    from diffgemma.train.objective import Example, block_diffusion_loss, make_batch

    config = network.config
    add_lora(network, LoraSettings(16))
    network.checkpoint_layers()
    adapters = sum(p.numel() for p in network.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(0)
    example = Example(
        torch.randint(3, config.vocab_size, (prompt,), generator=generator).tolist(),
        torch.randint(3, config.vocab_size, (config.canvas_length,), generator=generator).tolist(),
    )
    batch = make_batch([example], config.canvas_length, config.vocab_size, 1, 0, seed=0, epoch=0)
    before = resident_gib()
    begun = time.perf_counter()
    losses = block_diffusion_loss(network, batch)
    forward = time.perf_counter() - begun
    losses.total.backward()
    seconds = time.perf_counter() - begun
    peak = peak_resident_gib()
    # A first step: B starts at zero, so only B's gradients can be nonzero (A's are zero until B moves)
    trained = [(name, p.grad) for name, p in network.named_parameters() if p.requires_grad]
    reached = all(grad is not None for _, grad in trained) and all(
        bool(grad.abs().sum() > 0) for name, grad in trained if "lora_B" in name
    )
    table = "\n".join(
        [
            "| step | s (loss / with backward) | resident before, GiB | peak, GiB | every B has a gradient |",
            "|---|---|---|---|---|",
            f"| QLoRA rank 16 over {fmt.name} | {forward:.0f} / {seconds:.0f} | {before:.1f} | {peak:.1f} "
            f"| {reached} |",
        ]
    )
    append_results(
        "CPU: a QLoRA training step of the 26B-A4B shape (bench/cpu_26b.py --qlora)",
        table,
        f"26B-A4B shape, random weights ({fmt.describe()}; the rest in {str(network.dtype)[6:]}, {loaded:.1f} GiB "
        f"resident once built in {built:.0f} s), LoRA rank 16 on attention's and the dense MLP's projections "
        f"({adapters / 1e6:.1f}M parameters), gradient checkpointing, the chunked loss; one example: a prompt of "
        f"{prompt} tokens and one canvas of {config.canvas_length} (loss {float(losses.total):.3f}).",
        results,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", default="int4", choices=QUANT_FORMATS)
    parser.add_argument("--steps", type=int, default=2, help="timed steps each way, after one to warm up")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of what is not quantized")
    parser.add_argument("--qlora", action="store_true", help="time a QLoRA training step instead")
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    config = parse_model_config(preset_config("26b-a4b"), "26b-a4b")
    fmt = quant.QuantFormat(args.format)
    started = time.perf_counter()
    network = random_quantized_network(config, fmt, getattr(torch, args.dtype))
    built, loaded = time.perf_counter() - started, resident_gib()
    if args.qlora:
        qlora_step(network, fmt, args.prompt, built, loaded, args.results)
        return
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
    peak = peak_resident_gib()
    table = "\n".join(["| weights | s per denoising step | tokens/s at 16 steps |", "|---|---|---|", *rows])
    append_results(
        f"CPU: the 26B-A4B shape in {fmt.name}, the rest in {args.dtype}, one denoising step (bench/cpu_26b.py)",
        table,
        f"26B-A4B shape, random weights ({fmt.describe()}; embedding, norms, routers and self-conditioning in "
        f"{args.dtype}), prompt {args.prompt}, canvas {config.canvas_length}, batch 1; median of {args.steps} steps "
        f"after one to warm up. Resident memory {loaded:.1f} GiB once built (in {built:.0f} s), peak "
        f"{peak:.1f} GiB.",
        args.results,
    )


if __name__ == "__main__":
    main()
