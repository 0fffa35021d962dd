"""The fused kernel's tile settings, timed on the 26B-A4B shape's experts (the bulk of a step's bytes), in int4
(the default), int8 or fp8 (--format; on Hopper fp8 is timed in the fp8 matrix units too, and the faster way
is named as DIFFGEMMA_FP8_MATRIX_UNITS).

For each candidate (BLOCK_N, BLOCK_K, warps, stages) it times one layer's expert projections (gate/up, then
down) on a batch-1 and a batch-4 canvas's routing, beside the expanding path (weights expanded to bf16, then
the grouped GEMM), and prints the bandwidth each reaches over the packed bytes read. The fastest setting can be
passed to every later run as DIFFGEMMA_KERNEL_TILE.

    python bench/kernel_tiles.py                       # on the device (bench/device.sh runs it first)
    python bench/kernel_tiles.py --device cpu --shape tiny --candidates 64,64,4,3   # a dry run (interpreter)
    python bench/kernel_tiles.py --compile-only 90   # no GPU: each tile compiled for sm_90, registers and spills
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import median_ms

from diffgemma import kernels
from diffgemma.config import parse_model_config
from diffgemma.model import GPU_GROUP_ALIGN, grouped_linear
from diffgemma.presets import preset_config
from diffgemma.quant import QuantFormat, dequantize, fp8_grouped_linear, fp8_matrix_units, quantize

MAX_ERROR = 0.02  # against the expanded weights in bf16: rounding is about 0.004
CANDIDATES = "64,64,4,3 128,64,4,3 64,128,4,3 128,128,8,3 32,128,4,4 64,256,4,3"


def compile_for_gpu(arch: int, fmt: str, dtype: str, block_rows: int, one_weight: bool, tile: dict, group: int = 64):
    """The kernel compiled ahead of time for an NVIDIA GPU of compute capability `arch` (no GPU needed: Triton
    brings its own ptxas), with the alignment hints a launch on real tensors gives (aligned pointers, sizes
    that are multiples of 16). `one_weight`: a dense projection (a stack of one), else 128 experts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = kernels._quantized_matmul_kernel
    packed = fmt == "int4"
    group = group if packed else 1
    signature = dict.fromkeys(kernel.arg_names, "i32")
    signature.update(
        x_ptr=f"*{dtype}",
        out_ptr=f"*{dtype}",
        q_ptr={"int4": "*u8", "int8": "*i8", "fp8": "*u8"}[fmt],  # fp8 is read as bytes
        scale_ptr="*fp16" if packed else "*fp32",
        block_weight_ptr="*i32",
    )
    constants, options = kernels.launch_parameters(fmt, not one_weight, block_rows, group, tile)
    aligned = ["x_ptr", "q_ptr", "scale_ptr", "out_ptr", "out_features", "in_features"]
    if one_weight:  # no block-to-weight table (a launch passes None), and Triton makes an argument of 1 a constant
        constants.update(block_weight_ptr=None, weights_in_stack=1)
    else:
        aligned += ["block_weight_ptr", "weights_in_stack"]
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = kernel.arg_names
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constants.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def register_use(compiled, arch: int) -> str:
    """Registers and spills a thread, from Triton's bundled ptxas (-v) over the kernel's PTX; '' if not found."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    assemblers = [path for path in (folder / "ptxas-blackwell", folder / "ptxas") if path.exists()]
    with tempfile.TemporaryDirectory() as scratch:
        ptx = Path(scratch, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        for assembler in assemblers:
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            command = [str(assembler), "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(scratch, "kernel.cubin"))]
            done = subprocess.run(command, capture_output=True, text=True)
            registers = re.search(r"Used (\d+) registers", done.stdout + done.stderr)
            spills = re.search(r"(\d+) bytes spill stores", done.stdout + done.stderr)
            if done.returncode == 0 and registers and spills:
                return f"{registers.group(1)} registers, {spills.group(1)} bytes spilled"
    return ""


def compile_report(arch: int, candidates: str) -> None:
    """Without a GPU: each candidate compiled for `arch`, with its shared memory, registers and pipelining."""
    print("| tile (N,K,warps,stages) | format | rows a block | shared memory | registers | loads pipelined |")
    print("|---|---|---|---|---|---|")
    for text in candidates.split():
        tile = kernels.parse_tile(text)
        for fmt, group in (("int4", 64), ("int4", 16), ("int8", 1), ("fp8", 1)):
            label = f"{fmt}, groups of {group}" if fmt == "int4" else fmt
            for block_rows, one_weight in ((kernels.EXPERT_BLOCK_ROWS, False), (kernels.DENSE_BLOCK_ROWS, True)):
                compiled = compile_for_gpu(arch, fmt, "bf16", block_rows, one_weight, tile, group)
                pipelined = "yes" if "async_copy_global_to_local" in compiled.asm["ttgir"] else "no"
                print(
                    f"| {text} | {label} | {block_rows} | {compiled.metadata.shared} B | "
                    f"{register_use(compiled, arch)} | {pipelined} |",
                    flush=True,
                )


def expert_weights(config, fmt: QuantFormat, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    experts, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
    shapes = {"gate_up": (2 * inner, hidden), "down": (hidden, inner)}
    stored = {}
    for name, (outputs, inputs) in shapes.items():
        parts = [quantize(torch.randn(outputs, inputs, device=device) * 0.02, fmt) for _ in range(experts)]
        stored[name] = {key: torch.stack([part[key] for part in parts]) for key in ("qweight", "scale")}
    return stored


def routed_rows(config, canvases: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Each group's padded end for random top-k routing of `canvases` canvases, and the layout's row count."""
    pairs = canvases * config.canvas_length * config.top_k_experts
    routed = torch.randint(0, config.num_experts, (pairs,), device=device)
    sizes = torch.bincount(routed, minlength=config.num_experts)
    ends = torch.cumsum((sizes + GPU_GROUP_ALIGN - 1) // GPU_GROUP_ALIGN * GPU_GROUP_ALIGN, 0).to(torch.int32)
    return ends, pairs + config.num_experts * (GPU_GROUP_ALIGN - 1)


def run_experts(
    weights: dict, inputs: dict, ends: torch.Tensor, expand: QuantFormat | None, dtype, units: bool = False
) -> list[torch.Tensor]:
    """One layer's expert projections: through the fused kernel, the fp8 matrix units (`units`), or
    (`expand`) expanded then grouped GEMMs."""
    outputs = []
    for name, stored in weights.items():
        if units:
            outputs.append(fp8_grouped_linear(inputs[name], stored["qweight"], stored["scale"], ends).to(dtype))
        elif expand is None:
            outputs.append(kernels.quantized_grouped_linear(inputs[name], stored["qweight"], stored["scale"], ends))
        else:
            weight = dequantize(stored["qweight"], stored["scale"], expand, dtype)
            outputs.append(grouped_linear(inputs[name], weight, ends))
    return outputs


def relative_error(outputs: list[torch.Tensor], references: list[torch.Tensor], rows: int) -> float:
    """The largest relative difference over the used rows (padding past the last group is left out)."""
    return max(
        float((out[:rows].float() - ref[:rows].float()).norm() / ref[:rows].float().norm())
        for out, ref in zip(outputs, references, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="26b-a4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--candidates", default=CANDIDATES, help="space-separated BLOCK_N,BLOCK_K,warps,stages")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--format", default="int4", choices=list(kernels.KERNEL_FORMATS))
    parser.add_argument(
        "--compile-only", type=int, default=None, metavar="ARCH", help="no GPU: compile for sm_ARCH (80, 89, 90)"
    )
    args = parser.parse_args()
    if args.compile_only is not None:
        compile_report(args.compile_only, args.candidates)
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16
    config = parse_model_config(preset_config(args.shape), f"preset {args.shape}")
    fmt = QuantFormat(args.format)
    torch.manual_seed(0)
    weights = expert_weights(config, fmt, device)
    packed = sum(t.numel() * t.element_size() for w in weights.values() for t in w.values())
    print(f"{fmt.describe()} experts of one layer, shape {args.shape}")
    print("| tile (N,K,warps,stages) | canvases | ms (gate/up + down) | GB/s over packed bytes | rel. error |")
    print("|---|---|---|---|---|")
    best: dict[int, tuple[float, str]] = {}
    unit_ms: dict[int, float] = {}
    for canvases in (1, 4):
        ends, slots = routed_rows(config, canvases, device, dtype)
        inputs = {
            "gate_up": torch.randn(slots, config.hidden_size, device=device, dtype=dtype),
            "down": torch.randn(slots, config.moe_intermediate_size, device=device, dtype=dtype),
        }

        fused = partial(run_experts, weights, inputs, ends, None, dtype)
        expanded = partial(run_experts, weights, inputs, ends, fmt, dtype)

        references = expanded()
        used = int(ends[-1])
        for text in args.candidates.split():
            kernels.TILE = kernels.parse_tile(text)
            try:
                ms = median_ms(fused, args.iters, device)
                error = relative_error(fused(), references, used)
            except Exception as err:  # a tile this GPU cannot hold (shared memory, registers)
                print(f"| {text} | {canvases} | failed: {type(err).__name__}: {str(err).splitlines()[0]} | | |")
                continue
            if error < MAX_ERROR:  # only a tile that computes the product may win
                best[canvases] = min(best.get(canvases, (float("inf"), "")), (ms, text))
            print(f"| {text} | {canvases} | {ms:.3f} | {packed / ms / 1e6:,.0f} | {error:.4f} |", flush=True)
        ms = median_ms(expanded, args.iters, device)
        print(f"| expanded to bf16 + grouped GEMM | {canvases} | {ms:.3f} | {packed / ms / 1e6:,.0f} | |", flush=True)
        if args.format == "fp8" and fp8_matrix_units(fmt, inputs["down"]):
            units = partial(run_experts, weights, inputs, ends, None, dtype, True)
            ms, error = median_ms(units, args.iters, device), relative_error(units(), references, used)
            print(
                f"| fp8 matrix units (_scaled_grouped_mm) | {canvases} | {ms:.3f} | {packed / ms / 1e6:,.0f} | "
                f"{error:.4f} |",
                flush=True,
            )
            unit_ms[canvases] = ms
    for canvases, (ms, text) in best.items():
        print(f"fastest for {canvases} canvas(es): DIFFGEMMA_KERNEL_TILE={text} ({ms:.3f} ms)")
        if canvases in unit_ms:
            choice = "0 (the fused kernel)" if ms < unit_ms[canvases] else "1 (the matrix units)"
            print(f"fp8 for {canvases} canvas(es): DIFFGEMMA_FP8_MATRIX_UNITS={choice}")


if __name__ == "__main__":
    main()
