"""The `diffgemma` command: argument parsing and printing only; the work is the public API's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import DiffGemmaError

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def cmd_info(args: argparse.Namespace) -> None:
    from .api import resolve_folder
    from .config import load_configs

    folder = resolve_folder(args.model)
    config, settings = load_configs(folder)
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
    print("weights         " + ", ".join(f"{name} {_gib(total * size)}" for name, size in BYTES_PER_DTYPE.items()))
    print(
        f"sampler         {settings.max_denoising_steps} steps, entropy bound {settings.entropy_bound}, "
        f"temperature {settings.t_max} -> {settings.t_min}, stop after {settings.stability_threshold} stable "
        f"step(s) below entropy {settings.confidence_threshold}"
    )


def cmd_random_checkpoint(args: argparse.Namespace) -> None:
    from .api import resolve_dtype
    from .presets import random_checkpoint

    path = random_checkpoint(args.folder, preset=args.preset, seed=args.seed, dtype=resolve_dtype(args.dtype))
    print(f"wrote a random {args.preset} checkpoint to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffgemma", description="DiffusionGemma block text diffusion")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="summarise a checkpoint: shape, parameters, memory, sampler")
    info.add_argument("--model", required=True, help="checkpoint folder")
    info.set_defaults(run=cmd_info)

    random = commands.add_parser("random-checkpoint", help="write a random-weight checkpoint of a named shape")
    random.add_argument("folder")
    random.add_argument("--preset", default="tiny", help="tiny, bench-90m or 26b-a4b")
    random.add_argument("--seed", type=int, default=0)
    random.add_argument("--dtype", default="float32")
    random.set_defaults(run=cmd_random_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DiffGemmaError as err:
        print(f"diffgemma: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
