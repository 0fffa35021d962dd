"""Run with TRITON_INTERPRET=1 (Triton's CPU interpreter): the fused int4 kernel against expanded weights.

Prints one JSON object of measurements; tests/test_kernels.py holds the thresholds.
"""

import json
import sys
from pathlib import Path

import torch

import diffgemma
from diffgemma import kernels, quant
from diffgemma.model import grouped_linear
from diffgemma.quant import QuantFormat, dequantize, quantize


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def dense_errors() -> dict[str, float]:
    """One weight, odd row counts (partial blocks), groups below, at and above the kernel's K block."""
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        for rows, columns, outputs, group in ((70, 128, 96, 64), (5, 96, 40, 16), (130, 256, 72, 128), (1, 64, 16, 32)):
            fmt = QuantFormat("int4", group, group)
            stored = quantize(torch.randn(outputs, columns), fmt)
            x = torch.randn(3, rows, columns).to(dtype)
            out = kernels.int4_linear(x, stored["qweight"], stored["scale"])
            assert out.shape == (3, rows, outputs) and out.dtype == dtype
            ref = x.float() @ dequantize(stored["qweight"], stored["scale"], fmt, torch.float32).t()
            errors[f"{str(dtype)[6:]} {rows}x{columns}->{outputs} g{group}"] = relative(out, ref)
    return errors


def grouped_errors() -> dict[str, float]:
    """Experts with empty and multi-block groups; the blocks past the last group must come back zero."""
    fmt = QuantFormat("int4", 64, 16)
    experts, outputs, columns = 6, 48, 128
    stored = quantize(torch.randn(experts, outputs, columns), fmt)
    sizes = torch.tensor([5, 0, 17, 32, 1, 3])
    ends = torch.cumsum((sizes + 15) // 16 * 16, 0).to(torch.int32)
    slots = int(sizes.sum()) + experts * 15
    rows = torch.randn(slots, columns)
    out = kernels.int4_grouped_linear(rows, stored["qweight"], stored["scale"], ends)
    ref = grouped_linear(rows, dequantize(stored["qweight"], stored["scale"], fmt, torch.float32), ends)
    used = int(ends[-1])
    return {"experts": relative(out[:used], ref[:used]), "padding_max": float(out[used:].abs().max())}


def model_errors(demo: Path) -> dict[str, object]:
    """The demo model in int4: logits through the kernel against the expanding path, and how often each
    kernel entry ran."""
    calls = {"dense": 0, "grouped": 0}
    for name, key in (("int4_linear", "dense"), ("int4_grouped_linear", "grouped")):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        setattr(kernels, name, counted)
    results: dict[str, object] = {}
    for dtype in ("float32", "bfloat16"):
        network = diffgemma.load(demo, quant="int4", dtype=dtype).network
        for layer in network.layers:
            layer.experts.group_align = kernels.EXPERT_BLOCK_ROWS  # the CUDA layout, which the kernel takes
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, network.config.vocab_size, (2, 20), generator=generator)
        canvas = torch.randint(3, network.config.vocab_size, (2, network.config.canvas_length), generator=generator)
        logits = {}
        for direct in (True, False):
            quant.set_direct_kernels(direct)
            logits[direct] = network.denoise_logits(prompt, canvas)
        quant.set_direct_kernels(True)
        results[dtype] = relative(logits[True], logits[False])
        results[f"{dtype}_top1"] = float((logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean())
    results["calls"] = calls
    results["failures"] = quant.direct_kernel_failures()
    return results


def main() -> None:
    torch.manual_seed(0)
    report = {"dense": dense_errors(), **grouped_errors(), "model": model_errors(Path(sys.argv[1]))}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
