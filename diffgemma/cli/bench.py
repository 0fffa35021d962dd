"""`diffgemma bench`: how fast the model given denoises here (`benchmark.measure_speed`), a table to paste."""

from __future__ import annotations

import argparse
import json

from ..resources import size_text
from .common import load_model, model_path, terminal_progress

CUTS = ("top_k", "top_p", "min_p")


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from ..api import load_label
    from ..benchmark import measure_speed

    model = load_model(args)
    cuts = {name: getattr(args, name) for name in CUTS if getattr(args, name) is not None}
    model.settings = model.settings.replace(**cuts)
    reports = []
    for batch in args.batch:
        with terminal_progress(f"timing {batch} row(s)", unit="steps") as progress:
            reports.append(
                measure_speed(model, batch, args.prompt_tokens, args.canvases, args.steps, args.seed or 0, progress)
            )
    if args.json:
        for report in reports:
            print(json.dumps(report.as_dict()))
        return
    device = model.device
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{device} ({torch.get_num_threads()} threads)"
    weights = load_label(model.dtype, model.quant.name if model.quant else None)
    print(f"{model_path(args)}: {weights} weights on {where}, torch {torch.__version__}")
    print(
        f"prompt {args.prompt_tokens} tokens, {args.canvases} canvas(es) of {model.config.canvas_length}, "
        f"{args.steps} steps each (every step run)" + "".join(f", {k.replace('_', '-')} {v}" for k, v in cuts.items())
    )
    memory = "peak GPU memory" if device.type == "cuda" else "peak resident memory"
    print(f"| rows | ms a step | tokens/s ({args.steps} steps) | tokens/s, whole run | prompt tokens/s | {memory} |")
    print("|---|---|---|---|---|---|")
    for report in reports:
        prompt = report.prompt_tokens_per_second
        peak = size_text(report.peak_bytes) if report.peak_bytes is not None else "?"
        print(
            f"| {report.batch} | {report.step_ms:.1f} | {report.tokens_per_second:,.0f} | "
            f"{report.whole_tokens_per_second:,.0f} | {f'{prompt:,.0f}' if prompt else '?'} | {peak} |"
        )
