"""Weight-only quantization: int8 (per output channel), int4 (groups along the input), fp8 (e4m3, per channel).

What is quantized: every projection of attention and of the dense MLP, and the stacked expert tensors
(each expert's rows scaled on their own, so the fused layout needs no unfusing). int4 gives attention's
projections smaller groups (16 weights a scale, against 64 elsewhere): they are where int4 hurt the sudoku
model (bench/RESULTS.md), and on the 26B shape they are 4.5% of the weights, so the finer scales cost about
0.1 GB. What stays in the model dtype: the embedding (it is also the tied output head), norms, routers and
the self-conditioning block, which are small and sensitive. Weights are stored quantized, so memory at rest
is what the format promises. Where a kernel takes the format as stored (fp8 on Hopper's matrix units; int4,
int8, and fp8 on Ampere and Ada, through kernels.py; int8 on CPUs with int8 matrix units (AMX), activations
made int8 too; int8 and int4 on other CPUs where few rows meet a large weight, through PyTorch's weight-only
kernels) they are multiplied as they are; elsewhere they are expanded to the activation dtype one weight at a
time as they are used.

Loading with `quant=` quantizes tensor by tensor as they come off disk: the float model is never whole in
memory. A quantized checkpoint carries `quantization_config` in its config.json and loads as it was saved.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .checkpoint import (
    DEFAULT_SHARD_BYTES,
    Derived,
    Written,
    read_tensor,
    reference_entries,
    stored_as,
    weight_plan,
    write_checkpoint,
)
from .config import QUANT_FORMATS, is_int, load_configs
from .errors import DiffGemmaError
from .model import DiffusionGemma, Experts, activation_bytes, each_group, grouped_linear, raise_recompile_limits
from .tokenizer import tokenizer_files

INT4_GROUP = 64
INT4_ATTENTION_GROUP = 16
QUANT_METHOD = "diffgemma"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
NIBBLE_CHUNK_BYTES = 32 * 2**20  # int4 expansion: packed bytes unpacked at a time (26B-A4B: 8 of a 0.24 GB tensor)


@dataclass(frozen=True)
class QuantFormat:
    name: str
    group_size: int = INT4_GROUP
    attention_group_size: int = INT4_ATTENTION_GROUP  # int4: the group of attention's projections

    def __post_init__(self) -> None:
        if self.name not in QUANT_FORMATS:
            raise DiffGemmaError(f"quantization must be one of {', '.join(QUANT_FORMATS)}, got {self.name!r}")
        for label, size in (("group size", self.group_size), ("attention group size", self.attention_group_size)):
            if size < 2 or size % 2:
                raise DiffGemmaError(f"int4 {label} must be an even number of at least 2, got {size}")

    def config(self) -> dict:
        spec = {"quant_method": QUANT_METHOD, "format": self.name}
        if self.name == "int4":
            spec.update(group_size=self.group_size, attention_group_size=self.attention_group_size)
        return spec

    def describe(self) -> str:
        if self.name != "int4":
            return self.name
        return f"int4, groups of {self.group_size}, attention {self.attention_group_size}"

    def for_attention(self) -> QuantFormat:
        """The format of attention's projections: the same, grouped by `attention_group_size`."""
        return replace(self, group_size=self.attention_group_size)

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The buffers that hold one weight of `shape` [..., out, in]."""
        *lead, columns = shape
        if self.name == "int4":
            group = self.group_for(columns)
            return {
                "qweight": ((*lead, columns // 2), torch.uint8),
                "scale": ((*lead, columns // group), torch.float16),
            }
        dtype = torch.int8 if self.name == "int8" else torch.float8_e4m3fn
        return {"qweight": (shape, dtype), "scale": ((*lead, 1), torch.float32)}

    def group_for(self, columns: int) -> int:
        """The int4 group along an input of `columns`: the configured size, or the largest even common
        divisor of the two when the input is not a multiple of it (small models)."""
        group = math.gcd(columns, self.group_size)
        if group < 2 or group % 2:
            raise DiffGemmaError(f"int4 needs an even input size; this model has a projection of {columns} inputs")
        return group


def quantize(weight: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """A float weight [..., out, in] -> its quantized buffers (see `QuantFormat.stored_shapes`)."""
    w = weight.float()
    if fmt.name == "int4":
        packed, scale = _int4_quantizer(w)(w, fmt.group_for(w.shape[-1]))
        return {"qweight": packed, "scale": scale}
    amax = w.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    if fmt.name == "int8":
        scale = amax / 127
        return {"qweight": (w / scale).round_().clamp_(-127, 127).to(torch.int8), "scale": scale}
    scale = amax / FP8_MAX
    return {"qweight": (w / scale).to(torch.float8_e4m3fn), "scale": scale}


def quantized_blocks(weight: torch.Tensor, fmt: QuantFormat, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """A float weight's quantized buffers a block of rows at a time (an expert of a stack; a 2-D weight whole),
    each quantized on `device`: the float32 working copy stays one block's size."""
    for block in weight if weight.ndim == 3 else weight[None]:
        yield quantize(block.to(device), fmt)


def _int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 weight [..., in] -> (nibble pairs [..., in / 2], float16 scales [..., in / group])."""
    groups = w.reshape(*w.shape[:-1], -1, group)
    scale = _int4_scales(groups)
    steps = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
    q = (groups / steps).round_().clamp_(-8, 7).to(torch.int16).add_(8).reshape(w.shape)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8), scale


# On the CPU, int4 quantization of a large weight runs compiled: its clipping search is some fifty elementwise
# passes, which torch.compile fuses into one loop (a 26B expert: 156 -> 18 ms, attention's groups of 16 12x;
# about 5 s to compile each new shape). A rounding in the fused code may pick a neighbouring clip for a few
# groups in a thousand (each within the search's own tolerance). Small weights stay eager: not worth compiling.
COMPILED_INT4_VALUES = 2**20
_COMPILED_INT4: dict = {}


def _int4_quantizer(w: torch.Tensor) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """What quantizes `w` to int4: `_int4_codes`, compiled on the CPU for a large weight."""
    if w.device.type != "cpu" or w.numel() < COMPILED_INT4_VALUES or _COMPILED_INT4.get("failed"):
        return _int4_codes
    return _compiled_int4_codes


def _compiled_int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    if "codes" not in _COMPILED_INT4:
        raise_recompile_limits()  # a compiled entry per weight shape: the 26B has about ten
        _COMPILED_INT4["codes"] = torch.compile(_int4_codes, dynamic=False)
    try:
        return _COMPILED_INT4["codes"](w, group)
    except Exception as err:  # no C++ compiler, an unsupported platform: eager from now on
        import warnings

        _COMPILED_INT4["failed"] = True
        warnings.warn(f"int4 quantization runs eagerly (compiling failed: {type(err).__name__})", stacklevel=2)
        return _int4_codes(w, group)


def _int4_scales(groups: torch.Tensor) -> torch.Tensor:
    """Per-group scales [..., groups] in float16. Sixteen levels are few: rather than always fitting the
    largest weight, each group takes the clipping (a fraction of its largest magnitude) with the least
    squared error, so the bulk of its weights get finer steps."""
    amax = groups.abs().amax(-1)
    best = (amax / 7).to(torch.float16)
    best_error = None
    for fraction in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        scale = (amax * (fraction / 7)).to(torch.float16)
        steps = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
        error = ((groups / steps).round().clamp(-8, 7) * steps - groups).square().sum(-1)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best = torch.where(better, scale, best)
        best_error = torch.where(better, error, best_error)
    return best


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The quantized buffers -> a weight in `dtype`, made as it is used and dropped after. Written in place
    into one output tensor (`out` when given: contiguous, of the weight's shape), so the transient memory is
    the expanded weight plus a fraction of it."""
    shape = _expanded_shape(qweight, fmt)
    out = torch.empty(shape, dtype=dtype, device=qweight.device) if out is None else out.view(shape)
    if fmt.name == "int4":
        packed, pairs = qweight.reshape(-1, qweight.shape[-1]), out.view(-1, qweight.shape[-1], 2)
        rows = max(1, NIBBLE_CHUNK_BYTES // qweight.shape[-1])  # the nibbles pass through small temporaries
        for start in range(0, packed.shape[0], rows):
            pairs[start : start + rows, :, 0] = packed[start : start + rows] & 0xF
            pairs[start : start + rows, :, 1] = packed[start : start + rows] >> 4
        out.view(*scale.shape, -1).sub_(8).mul_(scale[..., None].to(dtype))
        return out
    return out.copy_(qweight).mul_(scale.to(dtype))


def _expanded_shape(qweight: torch.Tensor, fmt: QuantFormat) -> tuple[int, ...]:
    """The shape of the weight `qweight` stores (int4: two values a byte)."""
    return (*qweight.shape[:-1], qweight.shape[-1] * (2 if fmt.name == "int4" else 1))


# On the CPU an expansion of over 32 MB gets fresh pages from the system each time (glibc's allocator maps
# blocks that large and unmaps them when freed), and faulting them in costs more than filling them: 26B-A4B's
# 4096 x 2816 query projection expanded to float32 in 27 ms, 9 ms into memory already touched. So a thread
# expanding weights for inference keeps one buffer for them, as large as the largest it has expanded up to
# EXPANSION_BUFFER_BYTES (a stack of large experts, met only by long prompts, stays a fresh tensor).
EXPANSION_BUFFER_BYTES = 256 * 2**20
_EXPANSION = threading.local()


def _expansion_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A reusable flat buffer of at least `numel` values for this thread's expansions on the CPU (None where a
    fresh tensor serves: another device, whose allocator keeps its blocks, or a weight over the cap)."""
    if device.type != "cpu" or numel * dtype.itemsize > EXPANSION_BUFFER_BYTES:
        return None
    buffers = _EXPANSION.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def expanded_product(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    fmt: QuantFormat,
    dtype: torch.dtype,
    offsets: torch.Tensor | None = None,
    stacked: bool = False,
) -> torch.Tensor:
    """x through quantized weights expanded to `dtype` for this product: `F.linear` for one weight, or
    `grouped_linear` for a stack of experts (`stacked`, with their `offsets`). Under autograd the expanded
    weight is not kept for the backward pass but expanded again there (`_FrozenExpansion`), so training
    adapters over a quantized base (QLoRA) holds activations, not a float copy of every weight it used."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenExpansion.apply(x, qweight, scale, fmt, dtype, offsets, stacked)
    buffer = _expansion_buffer(math.prod(_expanded_shape(qweight, fmt)), dtype, qweight.device)
    return _product(x, dequantize(qweight, scale, fmt, dtype, out=buffer), offsets, stacked)


def _product(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None, stacked: bool) -> torch.Tensor:
    return grouped_linear(x, weight, offsets) if stacked else F.linear(x.to(weight.dtype), weight)


class _FrozenExpansion(torch.autograd.Function):
    """`expanded_product` with a gradient for its input only (the quantized weights are frozen)."""

    @staticmethod
    def forward(ctx, x, qweight, scale, fmt, dtype, offsets, stacked):
        ctx.fmt, ctx.dtype, ctx.stacked, ctx.input_dtype = fmt, dtype, stacked, x.dtype
        ctx.save_for_backward(qweight, scale, offsets)  # buffers the model holds anyway: nothing new is kept
        return _product(x, dequantize(qweight, scale, fmt, dtype), offsets, stacked)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale, offsets = ctx.saved_tensors
        weight = dequantize(qweight, scale, ctx.fmt, ctx.dtype)
        # grad @ W, for one weight or group by group: the product by the transpose of what it is given
        grad_x = _product(grad, weight.transpose(-2, -1), offsets, ctx.stacked)
        return grad_x.to(ctx.input_dtype), None, None, None, None, None, None


class _Quantized:
    """Registers the quantized buffers of named float weights and fills them from float tensors."""

    fmt: QuantFormat
    source_shapes: dict[str, tuple[int, ...]]

    def _register(self: nn.Module, name: str, shape: tuple[int, ...], device) -> None:
        for suffix, (stored_shape, dtype) in self.fmt.stored_shapes(shape).items():
            self.register_buffer(f"{name}_{suffix}", torch.empty(stored_shape, dtype=dtype, device=device))
        self.source_shapes[name] = shape

    @torch.no_grad()
    def load_float(self: nn.Module, name: str, weight: torch.Tensor) -> None:
        device = getattr(self, f"{name}_qweight").device  # quantize where the model lives (a GPU is quick)
        for index, buffers in enumerate(quantized_blocks(weight, self.fmt, device)):
            for suffix, value in buffers.items():
                target = getattr(self, f"{name}_{suffix}")
                (target[index] if weight.ndim == 3 else target).copy_(value)

    def weight_for(self: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scale"), self.fmt, dtype)


class QuantLinear(_Quantized, nn.Module):
    def __init__(self, linear: nn.Linear, fmt: QuantFormat) -> None:
        super().__init__()
        self.fmt = fmt
        self.source_shapes = {}
        self._register("weight", tuple(linear.weight.shape), linear.weight.device)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight, scale = self.weight_qweight, self.weight_scale
        path = direct_kernel(self.fmt, x, self.source_shapes["weight"], x.numel() // x.shape[-1])
        if path:
            try:
                out = direct_product(path, x, qweight, scale)
                return out if self.bias is None else out + self.bias
            except Exception as err:  # any refusal (a shape, a kernel build) falls back
                direct_kernel_failed(self.fmt, err, per_shape=path != FUSED)
        out = expanded_product(x, qweight, scale, self.fmt, x.dtype)
        return out if self.bias is None else out + self.bias


class QuantExperts(_Quantized, Experts):
    """The stacked experts, stored quantized; `gate_up_proj`/`down_proj` are expanded when read.

    On a CPU whose int4 kernel takes the experts, each int4 stack is rearranged in place into the kernel's
    layout the first time the kernel meets it (`cpu_laid_out` names those stacks), rather than an expert's
    nibbles being rearranged for every call (on the 26B shape a sixth of a denoising step). Whatever reads the
    bytes as stored gets them back in our layout first, in place: a state dict (saving), a move to another
    device, and an expanded product (more rows than the kernel takes, or autograd), so that a run of expanded
    products (a larger batch) pays for it once; the properties read a restored copy."""

    def __init__(self, experts: Experts, fmt: QuantFormat) -> None:
        nn.Module.__init__(self)
        self.fmt = fmt
        self.source_shapes = {}
        self.cpu_laid_out: dict[str, tuple[int, bool]] = {}
        self.act = experts.act
        self.num_experts = experts.num_experts
        self.group_align = experts.group_align
        self.compute_dtype = experts.gate_up_proj.dtype
        for name in ("gate_up_proj", "down_proj"):
            tensor = experts._parameters[name]
            self._register(name, tuple(tensor.shape), tensor.device)
        self.register_state_dict_pre_hook(_restore_layout)
        self.register_load_state_dict_pre_hook(_restore_layout)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.weight_for("gate_up_proj", self.compute_dtype)

    @property
    def down_proj(self) -> torch.Tensor:
        return self.weight_for("down_proj", self.compute_dtype)

    def weight_for(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        qweight, layout = getattr(self, f"{name}_qweight"), self.cpu_laid_out.get(name)
        if layout is not None:  # a restored copy: the stack stays as the kernel reads it
            qweight = torch.stack([cpu_int4_restored(expert, layout) for expert in qweight])
        return dequantize(qweight, getattr(self, f"{name}_scale"), self.fmt, dtype)

    def restore_layout_(self, names: tuple[str, ...] = ("gate_up_proj", "down_proj")) -> None:
        """Stacks back in our layout, in place."""
        for name in names:
            layout = self.cpu_laid_out.pop(name, None)
            if layout is not None:
                self._rearrange_(name, cpu_int4_restored, layout)

    def _lay_out_for_cpu(self, name: str) -> None:
        layout = cpu_int4_kernel_layout()
        self._rearrange_(name, cpu_int4_layout, layout)
        self.cpu_laid_out[name] = layout

    @torch.no_grad()
    def _rearrange_(self, name: str, rearrange: Callable, layout: tuple[int, bool]) -> None:
        for expert in getattr(self, f"{name}_qweight"):  # an expert at a time: no second copy of the stack
            expert.copy_(rearrange(expert, layout))

    def _apply(self, fn, recurse=True):
        self.restore_layout_()  # a move to another device (or a copy) takes the bytes in our layout
        return super()._apply(fn, recurse)

    def batches_groups(self, x: torch.Tensor, pairs: int) -> bool:
        """Not where a CPU kernel takes the products: it runs one an expert, at a cost in proportion to its rows,
        so padding every group to the largest only adds rows (on the 26B shape's routing of 256 tokens, about
        half as many again)."""
        per_expert = pairs // self.num_experts
        kernel = direct_kernel(self.fmt, x, self.source_shapes["gate_up_proj"], per_expert)
        return kernel not in (CPU_KERNEL, CPU_INT8_UNITS)

    def project(self, rows: torch.Tensor, name: str, offsets: torch.Tensor | None) -> torch.Tensor:
        qweight, scale = getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scale")
        per_expert = rows.shape[-2] if offsets is None else rows.shape[0] // self.num_experts
        path = direct_kernel(self.fmt, rows, self.source_shapes[name], per_expert)
        # The GPU's kernels take grouped rows (`offsets`), the fused one a row block from one expert only.
        misaligned = path == FUSED and self.row_alignment(rows) % kernels.EXPERT_BLOCK_ROWS
        if path in (FP8_UNITS, FUSED) and (offsets is None or misaligned):
            path = None
        lay_out = path == CPU_KERNEL and self.fmt.name == "int4" and name not in self.cpu_laid_out
        if lay_out and not torch.compiler.is_compiling():  # (compiled, a graph rearranges for each call)
            self._lay_out_for_cpu(name)
        if path:
            laid_out = name in self.cpu_laid_out
            try:
                product = direct_product(path, rows, qweight, scale, offsets, stacked=True, laid_out=laid_out)
                return product.to(self.compute_dtype)
            except Exception as err:  # any refusal (a shape, a kernel build) falls back
                direct_kernel_failed(self.fmt, err, per_shape=path != FUSED)
        self.restore_layout_((name,))  # in place (autograd keeps what it is given: the module's own bytes)
        if name != "gate_up_proj":
            return expanded_product(rows, qweight, scale, self.fmt, self.compute_dtype, offsets, stacked=True)
        # Gate and up expanded one at a time: the transient copy is half as large (on the 26B shape 0.5 GB
        # rather than 1 GB), a saving that counts where int4 has to fit in 18 GB.
        half = qweight.shape[1] // 2
        parts = (slice(0, half), slice(half, None))
        return torch.cat(
            [
                expanded_product(rows, qweight[:, p], scale[:, p], self.fmt, self.compute_dtype, offsets, stacked=True)
                for p in parts
            ],
            dim=-1,
        )


def _restore_layout(module: QuantExperts, *hook_args) -> None:
    """Before a state dict is made or loaded: our layout (a function of its own, not a lambda)."""
    module.restore_layout_()


# Where a kernel takes the stored format as it is, the weights are not expanded in memory: fp8 weights meet fp8
# activations (scaled per row) in the matrix units of GPUs that have them (Hopper and later); int4, int8, and fp8
# on Ampere and Ada, go through the fused Triton kernel (kernels.py), so a step reads one byte, or half a byte, a
# weight; on the CPU, int8 and int4 weights that meet few rows (the experts') go through PyTorch's weight-only
# kernels. Elsewhere, under autograd, or when a kernel refuses a call, the weights are expanded.
_DIRECT: dict = {"enabled": True, "failures": [], "broken": set()}
FP8_UNITS, FUSED, CPU_KERNEL = "fp8 matrix units", "fused kernel", "CPU weight-only kernel"
# On CPUs that multiply int8 matrices in their tiles (AMX: Intel Sapphire Rapids and later), int8 weights meet
# int8 activations there (each row scaled to int8 on its own, as the fp8 matrix units take them): PyTorch's
# weight-only int8 kernel uses no tiles, and ran 2.7x slower than bf16 weights on such a CPU, where the tiles run
# a 26B mixture-of-experts layer 2.4-3x faster than that kernel (bench/cpu_quant.py).
CPU_INT8_UNITS = "CPU int8 matrix units"
# On the CPU, where PyTorch's int8 / int4 kernels beat expanding a weight: few rows meet it in a call (more, and
# the product is compute-bound), and the weight is too large to expand in cache (1.5M values, 6 MB in float32).
# The 26B's experts (bench/cpu_quant.py, 2 cores, two runs): int8 16 rows 5-8x faster, 96 rows 1.4-1.9x, 128 rows
# 0.9-1.5x; int4 3.4-3.9x, 1.4-1.6x, 1.1-1.2x. A 1024 x 1024 weight: int8 2.2x at 48 rows, int4 1.0x; 512 x 512:
# slower from 48 rows in both.
CPU_KERNEL_MAX_ROWS = 96
CPU_KERNEL_MIN_VALUES = 3 * 2**19
CPU_INT4_GROUPS = (32, 64, 128, 256)  # the groups PyTorch's CPU int4 kernel takes


def direct_kernel(fmt: QuantFormat, x: torch.Tensor, shape: tuple[int, ...], rows: int = 1) -> str | None:
    """The kernel in which `x` meets `fmt`'s weights of `shape` ([..., out, in]; each weight meeting `rows` rows
    of `x`) as stored: FP8_UNITS, FUSED or CPU_KERNEL; None where they are expanded."""
    if not _DIRECT["enabled"] or fmt.name in _DIRECT["broken"] or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if fp8_matrix_units(fmt, x):
        return FP8_UNITS
    columns = shape[-1]
    group = fmt.group_for(columns) if fmt.name == "int4" else None
    if kernels.kernel_takes(x, fmt.name, columns, group):
        return FUSED
    if x.device.type == "cpu" and fmt.name == "int8" and cpu_int8_units():
        return CPU_INT8_UNITS
    if x.device.type == "cpu" and cpu_kernel_takes(fmt, shape, rows):
        return CPU_KERNEL
    return None


def cpu_int8_units() -> bool:
    """Whether this CPU multiplies int8 matrices in hardware tiles (AMX-INT8), which int8 weights then take
    (`CPU_INT8_UNITS`; DIFFGEMMA_CPU_KERNELS=0 expands them instead)."""
    return not _cpu_kernels_off() and _amx_int8()


@functools.cache
def _amx_int8() -> bool:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # (PyTorch 2.10 and later)
    return bool(capabilities is not None and capabilities().get("amx_int8"))


def cpu_kernel_takes(fmt: QuantFormat, shape: tuple[int, ...], rows: int) -> bool:
    """Whether PyTorch's CPU kernel for `fmt` is the faster way through a weight of `shape` meeting `rows` rows
    (CPU_KERNEL_MAX_ROWS, CPU_KERNEL_MIN_VALUES), and takes it: int8 inputs a multiple of 16 (it reads past the
    end of others), int4 groups it knows, outputs in blocks of 64, and a layout of its that we know on this CPU
    (`cpu_int4_kernel_layout`). The limits were measured on x86 CPUs; DIFFGEMMA_CPU_KERNELS=0 expands every weight
    instead (say, where bf16 is slow)."""
    out_features, columns = shape[-2:]
    if _cpu_kernels_off():
        return False
    if rows > CPU_KERNEL_MAX_ROWS or out_features * columns < CPU_KERNEL_MIN_VALUES:
        return False
    if fmt.name == "int8":
        return columns % 16 == 0 and _cpu_int8_kernel()
    if fmt.name == "int4":
        fits = fmt.group_for(columns) in CPU_INT4_GROUPS and out_features % 64 == 0 and columns % 8 == 0
        return fits and cpu_int4_kernel_layout() is not None
    return False


def _cpu_kernels_off() -> bool:
    return os.environ.get("DIFFGEMMA_CPU_KERNELS") == "0"


def _cpu_int8_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def cpu_kernels_here() -> str:
    """Which of PyTorch's weight-only CPU kernels this machine gives diffgemma, in words (`diffgemma info`)."""
    if _cpu_kernels_off():
        return "off (DIFFGEMMA_CPU_KERNELS=0): int8 and int4 weights expand"
    int8 = "int8 yes" if _cpu_int8_kernel() else "int8 no (expands)"
    if cpu_int8_units():
        int8 = "int8 in the int8 matrix units (AMX; activations made int8 a row at a time)"
    layout = cpu_int4_kernel_layout()
    if layout is None:
        return f"{int8}; int4 no (a weight layout we do not know: expands)"
    block, halves = layout
    pairs = f"outputs j and j + {block // 2}" if halves else "neighbouring outputs"
    return f"{int8}; int4 yes (blocks of {block} outputs, a byte pairing {pairs})"


def fp8_matrix_units(fmt: QuantFormat, x: torch.Tensor) -> bool:
    """fp8 weights on a GPU with fp8 matrix units (Hopper and later): activations are made fp8 too. With
    DIFFGEMMA_FP8_MATRIX_UNITS=0 such GPUs take the fused weight-only kernel instead (bf16 activations, one byte
    a weight read as well; `bench/kernel_tiles.py --format fp8` times both)."""
    if fmt.name != "fp8" or not x.is_cuda or os.environ.get("DIFFGEMMA_FP8_MATRIX_UNITS") == "0":
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def set_direct_kernels(enabled: bool) -> None:
    """Switch the direct kernels (on by default where the GPU has them); off expands weights instead."""
    _DIRECT["enabled"] = enabled


def direct_kernel_failures() -> list[str]:
    """Why a direct kernel fell back to expanded weights (one message per kind of failure)."""
    return list(_DIRECT["failures"])


def direct_kernel_failed(fmt: QuantFormat, err: Exception, per_shape: bool = False) -> None:
    """A call a kernel refuses is served by expanded weights, said once per message. The fp8 matrix units'
    refusals are `per_shape`; a fused kernel that fails to build would fail again, so its format stops trying
    (a retry inside a CUDA graph's capture would spoil it)."""
    message = f"{fmt.name}: " + (str(err).splitlines()[0] if str(err) else type(err).__name__)
    if not per_shape:
        _DIRECT["broken"].add(fmt.name)
    if message not in _DIRECT["failures"]:
        import warnings

        _DIRECT["failures"].append(message)
        warnings.warn(f"{message}; expanding the weights instead", stacklevel=3)


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] through an fp8 weight [N, K] (float32 scales [N, 1]) in the fp8 matrix units -> [..., N]."""
    rows, row_scale = fp8_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(
        rows,
        qweight.t(),
        scale_a=row_scale,
        scale_b=scale.reshape(1, -1),
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )
    return out.view(*x.shape[:-1], -1).to(x.dtype)


def fp8_grouped_linear(
    rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """rows [S, K] sorted by expert (`ends`: the groups' cumulative ends) through each expert's fp8 weight
    [E, N, K] in the fp8 matrix units -> bf16 [S, N]."""
    quantized, row_scale = fp8_rows(rows)
    return torch._scaled_grouped_mm(
        quantized,
        qweight.transpose(-2, -1),
        row_scale.reshape(-1),
        scale.reshape(qweight.shape[:2]),
        offs=ends,
        out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )


def direct_product(
    path: str,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    ends: torch.Tensor | None = None,
    stacked: bool = False,
    laid_out: bool = False,
) -> torch.Tensor:
    """x through weights as stored, in the kernel `path` names (`direct_kernel`): one weight, or a stack of
    experts (`stacked`, x's rows grouped by expert, `ends` the groups' cumulative ends); `laid_out`: int4
    codes already in the CPU kernel's layout."""
    if path == FP8_UNITS:
        return fp8_grouped_linear(x, qweight, scale, ends) if stacked else fp8_linear(x, qweight, scale)
    if path == FUSED:
        if stacked:
            return kernels.quantized_grouped_linear(x, qweight, scale, ends)
        return kernels.quantized_linear(x, qweight, scale)
    product = int8_units_linear if path == CPU_INT8_UNITS else cpu_linear
    if stacked:
        return cpu_grouped_linear(x, qweight, scale, ends, laid_out, product)
    return product(x, qweight, scale, laid_out)


def int8_units_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, _: bool = False) -> torch.Tensor:
    """x [..., K] through an int8 weight [N, K] (float32 scales [N, 1]) in the CPU's int8 matrix units: each row
    of x scaled to int8 on its own, int32 sums, both scales applied after in float32 -> [..., N] in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()  # (x itself where it is float32: not written to)
    row_scale = rows.abs().amax(-1, keepdim=True).clamp_min_(1e-12).div_(127)
    quantized = (rows / row_scale).round_().clamp_(-127, 127).to(torch.int8)
    sums = torch._int_mm(quantized, qweight.t())
    out = sums.float().mul_(row_scale).mul_(scale.reshape(1, -1))
    return out.to(x.dtype).view(*x.shape[:-1], -1)


def cpu_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, laid_out: bool = False) -> torch.Tensor:
    """x [..., K] through an int8 weight [N, K] (float32 scales [N, 1]) or an int4 one (nibble pairs [N, K/2],
    float16 scales [N, K / group]) in PyTorch's CPU weight-only kernel for its format, which the stored dtype
    tells -> [..., N] in x's dtype. The kernels read the weights as stored; the activations go in as bf16,
    their fast path (float32 and float16 run 10-40x slower). int8's scales multiply the sums in float32 after
    (as bf16 they would round); int4's go into the kernel in bf16, its nibbles rearranged for the call unless
    they are `laid_out` already."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    if qweight.dtype == torch.int8:
        unscaled = torch.ones(qweight.shape[0], dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(rows, qweight.contiguous(), unscaled).float().mul_(scale.reshape(-1))
    else:
        group = 2 * qweight.shape[-1] // scale.shape[-1]
        scales = scale.t().to(torch.bfloat16)
        scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1)  # (q - 8) * scale + 0
        packed = qweight if laid_out else cpu_int4_layout(qweight)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group, scales_and_zeros)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


_HIGH_NIBBLES = 0xF0F0F0F0 - 2**32  # as an int32
# How PyTorch's CPU int4 kernel lays out a block of outputs, which depends on the vector width it chose for
# this CPU (`_convert_weight_to_int4pack_for_cpu`): (outputs a block, whether a byte pairs outputs j and
# j + block/2, else 2j and 2j + 1). AVX512: 64, paired halves; AVX2: 32, halves; otherwise 32 or 16, neighbours.
CPU_INT4_LAYOUTS = ((64, True), (32, True), (32, False), (16, False))


def cpu_int4_layout(qweight: torch.Tensor, layout: tuple[int, bool] | None = None) -> torch.Tensor:
    """Our int4 packing [N, K/2] (a byte holds inputs 2k and 2k+1 of one output) -> the layout of PyTorch's CPU
    int4 kernel on this CPU (`cpu_int4_kernel_layout`, or `layout`): outputs in blocks, the bytes of a block
    ordered by input, then by output pair, a byte holding one input of two outputs. Nibbles are regrouped four
    bytes at a time in int32 words, then each block is transposed byte by byte."""
    layout = layout or cpu_int4_kernel_layout()
    if layout is None:
        raise DiffGemmaError("PyTorch's CPU int4 kernel lays out its weights in no way diffgemma knows on this CPU")
    block, halves = layout
    outputs, half = qweight.shape
    words = qweight.contiguous().view(torch.int32)
    if halves:  # outputs j and j + block/2 share a byte
        blocks = words.view(outputs // block, 2, block // 2, half // 4)
        first, second = blocks[:, 0], blocks[:, 1]
    else:  # outputs 2j and 2j + 1
        blocks = words.view(outputs // block, block // 2, 2, half // 4)
        first, second = blocks[:, :, 0], blocks[:, :, 1]
    even = (first & 0x0F0F0F0F) | ((second & 0x0F0F0F0F) << 4)  # inputs 2k
    odd = ((first >> 4) & 0x0F0F0F0F) | (second & _HIGH_NIBBLES)  # inputs 2k + 1
    out = torch.empty(outputs // block, half, 2, block // 2, dtype=torch.uint8)
    for parity, nibbles in enumerate((even, odd)):
        out[:, :, parity] = nibbles.view(torch.uint8).view(outputs // block, block // 2, half).transpose(1, 2)
    return out.view(outputs, half)


def cpu_int4_restored(packed: torch.Tensor, layout: tuple[int, bool]) -> torch.Tensor:
    """`cpu_int4_layout`'s inverse: codes [N, K/2] in the CPU kernel's `layout` -> our packing. Each byte of the
    kernel's holds one input of two outputs; ours, two inputs of one output."""
    block, halves = layout
    outputs, half = packed.shape
    # [block, input pair, input parity, output pair]: one byte holds that input of both outputs of the pair
    pairs = packed.contiguous().view(outputs // block, half, 2, block // 2).permute(0, 3, 1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # inputs 2k and 2k + 1
    first = (even & 0x0F) | ((odd & 0x0F) << 4)  # the outputs in a byte's low nibbles
    second = (even >> 4) | (odd & 0xF0)  # and in its high nibbles
    ours = torch.empty(outputs // block, 2, block // 2, half, dtype=torch.uint8, device=packed.device)
    if halves:  # outputs j and j + block/2
        ours[:, 0], ours[:, 1] = first, second
    else:  # outputs 2j and 2j + 1
        ours = ours.view(outputs // block, block // 2, 2, half)
        ours[:, :, 0], ours[:, :, 1] = first, second
    return ours.view(outputs, half)


@functools.cache
def cpu_int4_kernel_layout() -> tuple[int, bool] | None:
    """Which of `CPU_INT4_LAYOUTS` PyTorch's CPU int4 kernel reads here, found once by asking its own converter
    to lay out a small random weight; None where it lays out none of them, or this PyTorch has no such kernel
    (int4 then expands on this CPU)."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return None
    qweight = torch.randint(0, 256, (64, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    nibbles = torch.stack([qweight & 15, qweight >> 4], dim=-1).view(64, 32).to(torch.int32)
    try:
        expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1).view(torch.uint8).reshape(-1)
    except RuntimeError:
        return None
    for layout in CPU_INT4_LAYOUTS:
        if torch.equal(cpu_int4_layout(qweight, layout).reshape(-1), expected):
            return layout
    return None


def cpu_grouped_linear(
    rows: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    ends: torch.Tensor | None,
    laid_out: bool = False,
    product: Callable[..., torch.Tensor] = cpu_linear,
) -> torch.Tensor:
    """Rows through each expert's weight [E, N, K] in a CPU kernel (`product`: the weight-only one, `cpu_linear`,
    or the int8 matrix units, `int8_units_linear`), one product an expert: rows [E, capacity, K] (batched layout,
    `ends` None) or [S, K] sorted by expert (`ends`: the groups' cumulative ends) -> the same layout with N
    columns."""
    if ends is None:
        return torch.stack([product(group, qweight[e], scale[e], laid_out) for e, group in enumerate(rows)])
    return each_group(
        rows, ends, qweight.shape[1], rows.dtype, lambda part, e: product(part, qweight[e], scale[e], laid_out)
    )


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, 1]), each row scaled to the format's range."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def _quantized_targets(network: DiffusionGemma) -> list[tuple[str, nn.Module]]:
    targets = []
    for layer_index, layer in enumerate(network.layers):
        prefix = f"layers.{layer_index}"
        attention = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(attention, name) is not None:
                targets.append((f"{prefix}.self_attn.{name}", getattr(attention, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            targets.append((f"{prefix}.mlp.{name}", getattr(layer.mlp, name)))
        targets.append((f"{prefix}.experts", layer.experts))
    return targets


def convert_(network: DiffusionGemma, fmt: QuantFormat) -> None:
    """Swap the quantized modules in (their buffers uninitialised); works on a meta-device network too."""
    for path, module in _quantized_targets(network):
        if isinstance(module, Experts):
            replacement = QuantExperts(module, fmt)
        else:
            replacement = QuantLinear(module, fmt.for_attention() if ".self_attn." in path else fmt)
        parent, _, child = path.rpartition(".")
        setattr(network.get_submodule(parent), child, replacement)


def float_sinks(network: DiffusionGemma) -> dict[str, tuple[tuple[int, ...], Callable[[torch.Tensor], None]]]:
    """For a converted network: float weight name -> (its shape, a function that quantizes it into place)."""
    sinks = {}
    for path, module in network.named_modules():
        if isinstance(module, _Quantized):
            for name, shape in module.source_shapes.items():
                key = f"{path}.{name}"
                sinks[key] = (shape, lambda tensor, m=module, n=name: m.load_float(n, tensor))
    return sinks


def quantize_checkpoint(
    source: Path,
    destination: str | os.PathLike,
    fmt: QuantFormat,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write a quantized copy of the float checkpoint in `source` a shard at a time: the checkpoint that
    `load(source, dtype=dtype, quant=fmt)` and a save would write (`dtype`: what is not quantized), without the
    model ever whole in memory; each weight is quantized on `device` as its shard is written (`progress`: as
    `write_checkpoint` tells it). Returns the bytes of weights the copy holds."""
    config, settings = load_configs(source)
    if format_from_config(config.raw) is not None:
        raise DiffGemmaError(f"{source}: already quantized; quantize the float checkpoint it was made from")
    plan, passthrough = weight_plan(
        source, {n: tuple(t.shape) for n, t in meta_network(config, dtype).state_dict().items()}
    )
    network = meta_network(config, dtype, fmt)
    sources = {  # a quantized buffer -> (the float weight it comes from, which of its buffers, the format)
        f"{path}.{name}_{suffix}": (f"{path}.{name}", suffix, module.fmt)
        for path, module in network.named_modules()
        if isinstance(module, _Quantized)
        for name, shape in module.source_shapes.items()
        for suffix in module.fmt.stored_shapes(shape)
    }
    made: dict[str, dict[str, torch.Tensor]] = {}  # the weight last quantized: its buffers go out one after another

    def buffer(weight: str, suffix: str, weight_fmt: QuantFormat) -> torch.Tensor:
        if weight not in made:
            made.clear()
            blocks = list(quantized_blocks(read_tensor(plan[weight]), weight_fmt, device))
            stacked = len(plan[weight].shape) == 3
            made[weight] = {
                key: torch.stack([b[key] for b in blocks]) if stacked else blocks[0][key] for key in blocks[0]
            }
        return made[weight][suffix]

    entries: dict[str, Written] = {}
    for name, tensor in network.state_dict().items():
        if name in sources:
            entries[name] = Derived(tuple(tensor.shape), tensor.dtype, functools.partial(buffer, *sources[name]))
        else:
            entries[name] = stored_as(plan[name], tensor.dtype)
    raw = {**config.raw, "quantization_config": fmt.config()}
    entries_written = reference_entries(entries, passthrough)
    write_checkpoint(entries_written, raw, settings, destination, tokenizer_files(source), max_shard_bytes, progress)
    return held_bytes(network)


def format_from_config(raw: dict) -> QuantFormat | None:
    """The quantization a checkpoint's config.json declares, if any."""
    spec = raw.get("quantization_config")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("quant_method") != QUANT_METHOD:
        method = spec.get("quant_method") if isinstance(spec, dict) else spec
        raise DiffGemmaError(
            f"config.json: quantization_config (quant_method {method!r}) is not one diffgemma wrote "
            f"(expected quant_method '{QUANT_METHOD}'); load the model's float checkpoint instead, quantized as it "
            "loads (`--quant int8|int4|fp8`, `load(..., quant=...)`)"
        )
    if spec.get("format") != "int4":
        return QuantFormat(spec.get("format"))  # groups are int4's alone
    group = spec.get("group_size", INT4_GROUP)
    # written before attention had its own groups: attention was grouped like the rest
    attention = spec.get("attention_group_size", group)
    for key, value in (("group_size", group), ("attention_group_size", attention)):
        if not is_int(value):
            raise DiffGemmaError(f"config.json: quantization_config.{key} must be a whole number, got {value!r}")
    return QuantFormat("int4", group, attention)


def meta_network(config, dtype: torch.dtype, fmt: QuantFormat | None = None) -> DiffusionGemma:
    """The network as loading builds it (in `dtype`, quantized to `fmt`), on the meta device: shapes and
    dtypes without memory, for counting bytes exactly and for free."""
    with torch.device("meta"):
        network = DiffusionGemma(config).to(dtype)
        if fmt is not None:
            convert_(network, fmt)
    return network


def held_bytes(network: nn.Module) -> int:
    """Bytes of every tensor a network holds: its parameters and its buffers."""
    return sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))


def weight_bytes(config, dtype: torch.dtype, fmt: QuantFormat | None = None) -> tuple[int, int]:
    """(bytes of every tensor the loaded network holds, bytes of the largest weight expanded for use, the
    experts' gate/up halves one at a time as `QuantExperts` expands them), for the model in `dtype` with `fmt`
    quantization; counted on a meta-device build (`meta_network`). A weight over the CPU's expansion buffer
    (`EXPANSION_BUFFER_BYTES`) is expanded beside it, so the largest that fits the buffer counts too."""
    network = meta_network(config, dtype, fmt)
    held = held_bytes(network)
    sizes = [0]
    if fmt is not None:
        for module in network.modules():
            if isinstance(module, _Quantized):
                for name, shape in module.source_shapes.items():
                    halves = 2 if isinstance(module, QuantExperts) and name == "gate_up_proj" else 1
                    sizes.append(math.prod(shape) * dtype.itemsize // halves)
    largest = max(sizes)
    buffered = max(size for size in sizes if size <= EXPANSION_BUFFER_BYTES)
    return held, largest + (buffered if largest > EXPANSION_BUFFER_BYTES else 0)


def memory_estimate(config, dtype: torch.dtype, fmt: QuantFormat | None, context: int, batch: int) -> dict[str, int]:
    """Bytes of inference by part, for `context` tokens of context and `batch` rows: `weights` as held,
    `expanded` (the largest weight expanded for use, where no kernel takes the format as stored), the `cache`,
    what the `prefix` cache keeps beside it, the `sampler`'s buffers, and the largest temporaries of a denoising
    `step` and of a `prompt` chunk (both held at once on CUDA, where the decoder's graph has its own memory
    pool; `model.activation_bytes`)."""
    weights, expanded = weight_bytes(config, dtype, fmt)
    step, prompt = activation_bytes(config, context, batch, dtype.itemsize)
    return {
        "weights": weights,
        "expanded": expanded,
        "cache": config.cache_bytes(context, batch, dtype.itemsize),
        "prefix": config.prefix_cache_bytes(context, batch, dtype.itemsize),
        "sampler": config.sampler_bytes(batch),
        "step": step,
        "prompt": prompt,
    }
