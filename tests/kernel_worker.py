"""Run with TRITON_INTERPRET=1 (Triton's CPU interpreter): the fused kernel (int4, int8, fp8) against expanded
weights.

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
    """One weight, odd row counts (partial blocks), int4 groups below, at and above the kernel's K block."""
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        for rows, columns, outputs, group in ((70, 128, 96, 64), (5, 96, 40, 16), (130, 256, 72, 128), (1, 64, 16, 32)):
            for fmt in (QuantFormat("int4", group, group), QuantFormat("int8"), QuantFormat("fp8")):
                stored = quantize(torch.randn(outputs, columns), fmt)
                x = torch.randn(3, rows, columns).to(dtype)
                out = kernels.quantized_linear(x, stored["qweight"], stored["scale"])
                assert out.shape == (3, rows, outputs) and out.dtype == dtype
                ref = x.float() @ dequantize(stored["qweight"], stored["scale"], fmt, torch.float32).t()
                errors[f"{fmt.name} {str(dtype)[6:]} {rows}x{columns}->{outputs} g{group}"] = relative(out, ref)
    return errors


def grouped_errors() -> dict[str, float]:
    """Experts with empty and multi-block groups; the blocks past the last group must come back zero."""
    experts, outputs, columns = 6, 48, 128
    sizes = torch.tensor([5, 0, 17, 32, 1, 3])
    ends = torch.cumsum((sizes + 15) // 16 * 16, 0).to(torch.int32)
    rows = torch.randn(int(sizes.sum()) + experts * 15, columns)
    used = int(ends[-1])
    results = {}
    for fmt in (QuantFormat("int4", 64, 16), QuantFormat("int8"), QuantFormat("fp8")):
        stored = quantize(torch.randn(experts, outputs, columns), fmt)
        out = kernels.quantized_grouped_linear(rows, stored["qweight"], stored["scale"], ends)
        ref = grouped_linear(rows, dequantize(stored["qweight"], stored["scale"], fmt, torch.float32), ends)
        results[f"{fmt.name} experts"] = relative(out[:used], ref[:used])
        results[f"{fmt.name} padding_max"] = float(out[used:].abs().max())
    return results


def fp8_byte_mismatches() -> int:
    """Every finite e4m3 byte (subnormals, both zeros, the largest) through the kernel's integer rebuild, against
    torch's own conversion: an identity input gives the weight back, column by column. Returns the mismatches."""
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    weight = codes.view(torch.float8_e4m3fn)
    finite = weight.float().isfinite()
    qweight = torch.where(finite, codes, torch.zeros_like(codes)).view(torch.float8_e4m3fn)  # NaNs out
    out = kernels.quantized_linear(torch.eye(16), qweight, torch.ones(16, 1))
    return int((out.t() != qweight.float()).sum())


def model_errors(demo: Path) -> dict[str, object]:
    """The demo model quantized: logits through the kernel against the expanding path, and how often each
    kernel entry ran."""
    calls = {"dense": 0, "grouped": 0}
    for name, key in (("quantized_linear", "dense"), ("quantized_grouped_linear", "grouped")):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        setattr(kernels, name, counted)
    results: dict[str, object] = {}
    for fmt in ("int4", "int8", "fp8"):
        for dtype in ("float32", "bfloat16"):
            network = diffgemma.load(demo, quant=fmt, dtype=dtype).network
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
            results[f"{fmt} {dtype}"] = relative(logits[True], logits[False])
            top1 = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean()
            results[f"{fmt} {dtype} top1"] = float(top1)
    results["calls"] = calls
    results["failures"] = quant.direct_kernel_failures()
    return results


def main() -> None:
    torch.manual_seed(0)
    report = {
        "dense": dense_errors(),
        "grouped": grouped_errors(),
        "fp8_byte_mismatches": fp8_byte_mismatches(),
        "model": model_errors(Path(sys.argv[1])),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
