"""Fused weight-only matrix multiplies for GPUs (Triton): int4, int8 and fp8 weights are read as stored and
expanded in registers.

Without them a quantized weight is expanded to the activation dtype in memory before each product, which makes
int4 slower than bf16 (the 26B shape: 270 ms a step on an H100 against 34 ms, bench/RESULTS.md) and adds the
largest expanded tensor (0.5 GB) to peak memory. Here each program loads a tile of packed nibbles (int4, with
their group scales) or of bytes (int8 or fp8, scaled per output after the product), rebuilds the weights in
registers and feeds them to the matrix units, so a step reads half a byte or one byte a weight. (fp8 on
Hopper and later takes the fp8 matrix units instead, quant.py; this serves it on Ampere and Ada, reading the
e4m3 bytes as integers and rebuilding them with integer operations, which needs no fp8 support in the GPU.)

One kernel serves the experts and the dense projections: rows come in blocks of `BLOCK_M`, each block belongs
to one weight of a stack (the experts' layout pads every group to a multiple of 16 rows, so no block spans two
experts, and blocks past the used rows write zeros); a dense projection is one weight, every block's.

Triton is optional: without it (or with a shape the kernel does not take) `quant.py` expands the weights as
before. `TRITON_INTERPRET=1` runs the same kernel on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import DiffGemmaError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs, macOS: the expanding path serves
    triton = None

EXPERT_BLOCK_ROWS = 16  # rows a program takes from an expert's group (the groups' alignment on CUDA)
DENSE_BLOCK_ROWS = 64  # rows a program takes from a dense projection's input
KERNEL_FORMATS = ("int4", "int8", "fp8")
# Tile and launch settings (a weight tile of BLOCK_N outputs by BLOCK_K inputs a loop step), chosen without
# a GPU to measure on; bench/kernel_tiles.py times alternatives on the 26B shape's experts, and
# DIFFGEMMA_KERNEL_TILE="BLOCK_N,BLOCK_K,num_warps,num_stages" (powers of two) sets them for a run.
TILE_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
DEFAULT_TILE = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
TILE: dict[str, int] | None = None  # set in-process (bench/kernel_tiles.py) ahead of the environment


def tile() -> dict[str, int]:
    """The tile settings in force: TILE, else DIFFGEMMA_KERNEL_TILE, else DEFAULT_TILE."""
    if TILE is not None:
        return TILE
    text = os.environ.get("DIFFGEMMA_KERNEL_TILE")
    return parse_tile(text) if text else DEFAULT_TILE


@functools.cache
def parse_tile(text: str) -> dict[str, int]:
    """ "64,128,4,3" -> the TILE settings it names, checked."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    fits = len(values) == len(TILE_KEYS) and min(values[:2]) >= 16 and min(values[2:]) >= 1
    if not fits or any(v & (v - 1) for v in values[:3]):
        raise DiffGemmaError(
            f"DIFFGEMMA_KERNEL_TILE={text!r}: expected four whole numbers BLOCK_N,BLOCK_K,num_warps,num_stages "
            "(the first three powers of two, the blocks at least 16), e.g. 64,64,4,3"
        )
    return dict(zip(TILE_KEYS, values, strict=True))


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_takes(x: torch.Tensor, fmt_name: str, columns: int, group: int | None) -> bool:
    """Whether the fused kernel can multiply `x` by a `fmt_name` weight of `columns` inputs (int4: grouped by
    `group`, which must be a power of two dividing them)."""
    if triton is None or fmt_name not in KERNEL_FORMATS or not (x.is_cuda or interpreting()):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    tile()  # a malformed DIFFGEMMA_KERNEL_TILE is an error here, where the kernel would run, not a fallback
    return fmt_name != "int4" or (group & (group - 1) == 0 and columns % group == 0)


if triton is not None:

    @triton.jit
    def _quantized_matmul_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        block_weight_ptr,
        out_ptr,
        rows,
        out_features,
        in_features,
        weights_in_stack,
        STACKED: tl.constexpr,
        PACKED: tl.constexpr,
        FP8: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """PACKED: int4, two inputs a byte, a float16 scale per GROUP inputs. Else int8 or (FP8) e4m3 bytes, a
        float32 scale a row. STACKED: `block_weight_ptr` names each row block's weight; else there is one."""
        block = tl.program_id(0)  # row blocks vary fastest: blocks of one weight share its tiles through L2
        n_start = tl.program_id(1) * BLOCK_N
        m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        n = n_start + tl.arange(0, BLOCK_N)
        m_ok = m < rows
        n_ok = n < out_features
        if STACKED:
            weight = tl.load(block_weight_ptr + block)
            # A block past the last group (padding) runs no iterations: it reads no weights and writes zeros.
            k_end = tl.where(weight < weights_in_stack, in_features, 0)
            weight = tl.minimum(weight, weights_in_stack - 1).to(tl.int64)
        else:
            weight = 0
            k_end = in_features
        if PACKED:
            stored_columns = in_features // 2
            groups = in_features // GROUP
        else:
            stored_columns = in_features
            groups = 1
        q_base = q_ptr + weight * out_features * stored_columns
        scale_base = scale_ptr + weight * out_features * groups
        accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, k_end, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + m[:, None].to(tl.int64) * in_features + k[None, :],
                mask=m_ok[:, None] & (k[None, :] < in_features),
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
            if PACKED:
                pair = k_start // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(
                    q_base + n[:, None] * stored_columns + pair[None, :],
                    mask=n_ok[:, None] & (pair[None, :] < stored_columns),
                    other=0x88,  # two zeros (stored as 8): masked columns add nothing
                ).to(tl.int32)
                # Byte j holds input 2j in its low nibble and 2j + 1 in its high one.
                nibbles = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K))
                group = k_start // GROUP + tl.arange(0, BLOCK_K // GROUP)
                scale = tl.load(
                    scale_base + n[:, None] * groups + group[None, :],
                    mask=n_ok[:, None] & (group[None, :] < groups),
                    other=0.0,
                ).to(tl.float32)
                values = tl.reshape(nibbles - 8, (BLOCK_N, BLOCK_K // GROUP, GROUP)).to(tl.float32)
                w = tl.reshape(values * scale[:, :, None], (BLOCK_N, BLOCK_K))
            else:  # int8 (whole numbers up to 127, exact in bf16) or fp8 (e4m3, exact in bf16 too)
                w_ok = n_ok[:, None] & (k[None, :] < in_features)
                w = tl.load(q_base + n[:, None] * stored_columns + k[None, :], mask=w_ok, other=0)
                if FP8:
                    # e4m3 (bias 7) moved into float16's fields (bias 15) is the value / 256 for every finite
                    # byte, subnormals included (they become float16 subnormals): one multiply restores it.
                    bits = w.to(tl.uint16)
                    bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
                    w = bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
                else:
                    w = w.to(tl.float32)
            accumulator = tl.dot(x, tl.trans(w.to(x.dtype)), accumulator)
        if not PACKED:  # int8, fp8: one scale per output row, applied once to the sums
            accumulator *= tl.load(scale_base + n, mask=n_ok, other=0.0)[None, :]
        out_ptrs = out_ptr + m[:, None].to(tl.int64) * out_features + n[None, :]
        tl.store(out_ptrs, accumulator.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@torch.library.custom_op("diffgemma::quantized_matmul", mutates_args=())
def quantized_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, block_weight: torch.Tensor | None, block_rows: int
) -> torch.Tensor:
    """x [M, K] times a stack of quantized weights [W, N, K] -> [M, N]. int4 (`qweight` uint8): packed [W, N, K/2]
    with `scale` [W, N, K/group]; int8 or fp8 (`qweight` int8 or float8_e4m3fn): [W, N, K] with `scale`
    [W, N, 1].

    Rows go in blocks of `block_rows`; `block_weight` [cdiv(M, block_rows)] names each block's weight (W or
    more for a block with nothing to multiply, which gets zeros); None when W is 1. An opaque operator to
    torch.compile, and free of host synchronisation, so a CUDA graph can hold it.
    """
    rows, in_features = x.shape
    stack, out_features, _ = qweight.shape
    weights = {torch.uint8: "int4", torch.int8: "int8", torch.float8_e4m3fn: "fp8"}[qweight.dtype]
    group = in_features // scale.shape[-1] if weights == "int4" else 1
    constants, options = launch_parameters(weights, block_weight is not None, block_rows, group, tile())
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(rows, block_rows) if block_weight is None else block_weight.numel()
    grid = (blocks, triton.cdiv(out_features, constants["BLOCK_N"]))
    _quantized_matmul_kernel[grid](
        x.contiguous(),
        qweight.view(torch.uint8) if weights == "fp8" else qweight,  # fp8 is read as bytes (see the kernel)
        scale,
        block_weight,
        out,
        rows,
        out_features,
        in_features,
        stack,
        **constants,
        **options,
    )
    return out


def launch_parameters(
    weights: str, stacked: bool, block_rows: int, group: int, settings: dict[str, int]
) -> tuple[dict[str, object], dict[str, int]]:
    """The kernel's compile-time constants and launch options for a weight format (`weights`, one of
    KERNEL_FORMATS; int4 with `group` inputs a scale), a stack of weights or one, a row block and tile
    `settings`."""
    constants = {
        "STACKED": stacked,
        "PACKED": weights == "int4",
        "FP8": weights == "fp8",
        "BLOCK_M": block_rows,
        "BLOCK_N": settings["BLOCK_N"],
        "BLOCK_K": max(settings["BLOCK_K"], group),  # a whole number of groups a step
        "GROUP": group,
        "UPCAST": interpreting(),  # Triton's CPU interpreter multiplies bf16 wrongly (3.5-3.9): float32 there
    }
    return constants, {"num_warps": settings["num_warps"], "num_stages": settings["num_stages"]}


@quantized_matmul.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, block_weight: torch.Tensor | None, block_rows: int):
    return x.new_empty(x.shape[0], qweight.shape[1])


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] through one quantized weight (`quantized_matmul`'s layout without the stack) -> [..., N]."""
    out = quantized_matmul(x.reshape(-1, x.shape[-1]), qweight[None], scale[None], None, DENSE_BLOCK_ROWS)
    return out.view(*x.shape[:-1], -1)


def quantized_grouped_linear(
    rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """rows [S, K] sorted by expert, every group starting on a multiple of `EXPERT_BLOCK_ROWS` (`ends`: the
    groups' cumulative padded ends) through each expert's quantized weight ([E, N, ...]) -> [S, N]."""
    starts = torch.arange(0, rows.shape[0], EXPERT_BLOCK_ROWS, device=rows.device, dtype=ends.dtype)
    block_weight = torch.searchsorted(ends, starts, right=True).to(torch.int32)  # E past the last group
    return quantized_matmul(rows, qweight, scale, block_weight, EXPERT_BLOCK_ROWS)
