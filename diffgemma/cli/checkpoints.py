"""Commands about checkpoints: `info` (shape, parameters, memory), `random-checkpoint`, `quantize`, `lora-merge`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import QUANT_FORMATS
from ..errors import DiffGemmaError
from ..resources import free_memory, size_text
from .common import model_path, terminal_progress

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from ..api import CONFIG_FILES, DTYPE_NAMES, auto_dtype, bf16_is_fast, resolve_folder
    from ..checkpoint import stored_float_dtype
    from ..config import load_configs
    from ..quant import QuantFormat, cpu_kernels_here, format_from_config, memory_estimate

    folder = resolve_folder(model_path(args), CONFIG_FILES)  # a Hub id: its configs alone
    config, settings = load_configs(folder)
    room = config.max_position_embeddings - config.canvas_length  # a canvas follows the context
    if not 0 <= args.context <= room:
        raise DiffGemmaError(
            f"--context must be between 0 and {room} (max_position_embeddings {config.max_position_embeddings}"
            f" less one canvas of {config.canvas_length}), got {args.context}"
        )
    total, active = config.parameter_counts()
    kinds = {kind: config.layer_types.count(kind) for kind in dict.fromkeys(config.layer_types)}
    print(f"checkpoint      {folder}")
    print(f"layers          {config.num_hidden_layers} ({', '.join(f'{n} {k}' for k, n in kinds.items())})")
    print(f"hidden          {config.hidden_size}, {config.num_attention_heads} query heads")
    for kind in kinds:
        shape = config.layers[config.layer_types.index(kind)]
        print(f"  {kind:<18}{shape.num_kv_heads} KV heads x {shape.head_dim}, RoPE {shape.rope_type}")
    print(f"sliding window  {config.sliding_window}")
    print(f"experts         {config.num_experts} x {config.moe_intermediate_size}, top-{config.top_k_experts}")
    print(f"dense MLP       {config.intermediate_size}")
    print(f"vocabulary      {config.vocab_size}")
    print(f"canvas          {config.canvas_length} tokens")
    print(f"parameters      {_count(total)} total, {_count(active)} active per token")
    if config.vision is not None:
        from ..images import soft_token_budget
        from ..vision import parameter_count

        vision = config.vision
        tower = parameter_count(vision, config.hidden_size)
        sizes = " / ".join(size_text(tower * BYTES_PER_DTYPE[name]) for name in ("bfloat16", "float32"))
        print(
            f"vision tower    {_count(tower)} parameters, {vision.patch_size}-pixel patches pooled "
            f"{vision.pooling_kernel_size} x {vision.pooling_kernel_size}; an image is at most "
            f"{soft_token_budget(folder)} soft tokens; read when a first image comes, its weights add {sizes} "
            "(bf16 / float32, unquantized) to the figures below"
        )
    print("weights         " + ", ".join(f"{name} {size_text(total * size)}" for name, size in BYTES_PER_DTYPE.items()))
    stored_format = format_from_config(config.raw)
    if stored_format is not None:
        print(f"quantized       {stored_format.describe()} (as stored; it loads so)")
    print(
        f"memory for {args.context} tokens of context, batch {args.batch} (weights + cache and what the prefix "
        "cache keeps + sampler buffers + activations: a denoising step's and a prompt chunk's largest temporaries):"
    )
    rows = [(name, DTYPE_NAMES[name], None) for name in BYTES_PER_DTYPE]
    rows += [(f"{fmt} (bf16)", torch.bfloat16, QuantFormat(fmt)) for fmt in QUANT_FORMATS]
    # on a CPU without bf16 instructions (`--dtype auto`): the rest in float32, int8 / int4 through its kernels
    rows += [(f"{fmt} (fp32)", torch.float32, QuantFormat(fmt)) for fmt in ("int8", "int4")]
    if stored_format is not None:  # it loads in its own format only: the rows of that format, with its groups
        rows = [(label, dtype, stored_format) for label, dtype, fmt in rows if fmt and fmt.name == stored_format.name]
    for label, dtype, fmt in rows:
        parts = memory_estimate(config, dtype, fmt, args.context, args.batch)
        whole = sum(parts.values())
        detail = f"weights {size_text(parts['weights'])}, cache {size_text(parts['cache'])}"
        detail += f" (+ {size_text(parts['prefix'])} prefix)"
        detail += f", sampler {size_text(parts['sampler'])}"
        detail += f", activations {size_text(parts['step'] + parts['prompt'])} (a step {size_text(parts['step'])}"
        detail += f", a prompt chunk {size_text(parts['prompt'])})"
        detail += f", one weight expanded {size_text(parts['expanded'])}" if fmt is not None else ""
        # kernels that read weights as stored: on a GPU int4, int8, fp8 (Triton; fp8 on Hopper: its matrix units),
        # on a CPU int8 and int4 where few rows meet a weight (an expert's share of a canvas at batch 1)
        direct = f"; {size_text(whole - parts['expanded'])} where a kernel takes {fmt.name}" if fmt is not None else ""
        print(f"  {label:<14}{size_text(whole)} ({detail}{direct})")
    _print_training_state(config, stored_format)
    cpu = torch.device("cpu")
    bf16 = "bf16 products in hardware" if bf16_is_fast(cpu) else "no bf16 products in hardware (float32 is faster)"
    print(f"this CPU        {cpu_kernels_here()}; {bf16}")
    free = [(device, free_memory(device)) for device in _local_devices()]
    shown = [f"{size_text(room)} on {device}" for device, room in free if room is not None]
    if shown:  # what a load is checked against (swap counts on the CPU)
        print(f"free here       {', '.join(shown)}")
    if any(folder.glob("*.safetensors")):  # (a config alone gives the rest)
        stored = stored_float_dtype(folder)
        autos = ", ".join(f"{_dtype_name(auto_dtype(device, stored))} on {device}" for device in _local_devices())
        print(f"stored dtype    {_dtype_name(stored)}; --dtype auto loads it in {autos}")
    print(
        f"sampler         {settings.max_denoising_steps} steps, entropy bound {settings.entropy_bound}, "
        f"temperature {settings.t_max} -> {settings.t_min}, stop after {settings.stability_threshold} stable "
        f"step(s) below entropy {settings.confidence_threshold}"
    )


def _local_devices() -> list:
    import torch

    return [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]


def _print_training_state(config, stored_format) -> None:
    """`info`'s training rows: what `train chat` holds whatever its batch (its `--dtype`: float32 by default, bf16
    products under autocast; bfloat16 halves the weights), every weight trained or LoRA adapters of rank 16, over
    a base in that dtype or quantized (`--quant`, QLoRA; a checkpoint stored quantized: its own format)."""
    import torch

    from ..quant import QuantFormat
    from ..train.lora import LoraSettings
    from ..train.memory import training_state_bytes

    lora = LoraSettings(16)
    formats = [stored_format] if stored_format is not None else [None, QuantFormat("int4")]
    ways = []  # (label, the dtype of what is not quantized, the base's format, adapters)
    if stored_format is None:  # weights stored quantized train adapters alone
        ways.append(("full, float32", torch.float32, None, None))
    for fmt in formats:
        for dtype, dtype_name in ((torch.float32, "float32"), (torch.bfloat16, "bf16")):
            label = f"LoRA 16, {dtype_name}" if fmt is None else f"QLoRA 16, {fmt.name} + {dtype_name}"
            ways.append((label, dtype, fmt, lora))
    print("training state (weights, gradients, AdamW's moments; each step's activations come on top):")
    for label, dtype, fmt, adapters in ways:
        parts = training_state_bytes(config, dtype, fmt, adapters)
        whole = parts["weights"] + parts["gradients"] + parts["optimizer"]
        detail = f"weights {size_text(parts['weights'])}, gradients {size_text(parts['gradients'])}"
        detail += f", AdamW {size_text(parts['optimizer'])}; {_count(parts['trained'])} values trained"
        print(f"  {label:<26}{size_text(whole)} ({detail})")


def cmd_random_checkpoint(args: argparse.Namespace) -> None:
    from ..api import resolve_dtype
    from ..presets import random_checkpoint

    path = random_checkpoint(args.folder, preset=args.preset, seed=args.seed, dtype=resolve_dtype(args.dtype))
    print(f"wrote a random {args.preset} checkpoint to {path}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from ..api import load_dtype, resolve_device, resolve_folder
    from ..quant import QuantFormat, quantize_checkpoint

    groups = {"group_size": args.group_size, "attention_group_size": args.attention_group_size}
    if args.to != "int4" and any(value is not None for value in groups.values()):
        raise DiffGemmaError(f"--group-size and --attention-group-size are int4's; {args.to} scales each output")
    fmt = QuantFormat(args.to, **{key: value for key, value in groups.items() if value is not None})
    _check_output(args.destination, args.source)
    folder, device = resolve_folder(args.source), resolve_device(args.device)
    # a shard at a time: the model is never whole in memory, quantized or not
    with terminal_progress(f"quantizing to {args.to}") as progress:
        dtype = load_dtype(args.dtype, device, folder)
        held = quantize_checkpoint(folder, args.destination, fmt, dtype, device, progress=progress)
    print(f"wrote {args.destination} ({fmt.describe()}, {size_text(held)} of weights)")


def _check_output(destination: str, source: str) -> None:
    """Before loading anything: a new checkpoint goes to a folder of its own, never over the one it is made from."""
    from ..checkpoint import check_replaceable

    target = Path(destination).expanduser().absolute()
    if Path(source).expanduser().exists() and target.exists() and target.samefile(Path(source).expanduser()):
        raise DiffGemmaError(f"{destination}: is the checkpoint being read; write the new one to another folder")
    check_replaceable(target)


def cmd_lora_merge(args: argparse.Namespace) -> None:
    import torch

    from ..api import load_dtype, resolve_folder
    from ..train.lora import merge_adapter_files

    _check_output(args.out, model_path(args))
    folder = resolve_folder(model_path(args))
    dtype = load_dtype(args.dtype, torch.device("cpu"), folder)
    with terminal_progress("merging") as progress:
        merged = merge_adapter_files(folder, args.adapter, args.out, dtype, progress=progress)
    print(f"merged {merged} adapters into {args.out}")
