"""Memory of one training step (the block-diffusion loss and its backward pass), three ways.

- "whole logits, kept activations": the loss over the whole batch's float32 logits, every layer's
  intermediates kept for the backward pass (what training did before the chunked loss);
- "chunked loss": the head's logits made and scored a chunk of tokens at a time (`objective.head_cross_entropy`);
- "chunked loss + checkpointed layers": also `DiffusionGemma.checkpoint_layers` (gradient checkpointing);
- and the same with LoRA adapters of rank 16 on a frozen base (what `train chat --lora-rank 16` trains).

A full fine-tune (every weight takes a gradient; in the LoRA way only the adapters do) of bench-90m's layers
with the 26B's vocabulary (262,144), so the vocabulary weighs what it does on the real model. Each way runs in a
child process of its own; the peak is what the step added above the weights (the CPU: peak resident memory less
the resident memory before the step; CUDA: peak allocated less allocated before), the gradients included.

    python bench/train_memory.py [--vocab 262144] [--batch 4] [--response 512] [--device cpu] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

WAYS = {  # (chunked loss, checkpointed layers, LoRA rank: 0 trains every weight)
    "whole logits, kept activations": (False, False, 0),
    "chunked loss": (True, False, 0),
    "chunked loss + checkpointed layers": (True, True, 0),
    "LoRA rank 16 (the base frozen), chunked loss + checkpointed layers": (True, True, 16),
}

CHILD = r"""
import json, resource, sys, time
import torch
from diffgemma.config import parse_model_config
from diffgemma.model import DiffusionGemma
from diffgemma.presets import init_random_, preset_config
from diffgemma.train import objective

args = json.loads(sys.argv[1])
device = torch.device(args["device"])


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


config = parse_model_config(preset_config(args["preset"], vocab_size=args["vocab"]), args["preset"])
torch.manual_seed(0)
with device:
    network = DiffusionGemma(config)
init_random_(network, 0)
if not args["chunked"]:
    objective.LOSS_CHUNK_BYTES = 2**62
network.checkpoint_layers(args["checkpointed"])
if args["lora"]:
    from diffgemma.train.lora import LoraSettings, add_lora

    add_lora(network, LoraSettings(args["lora"]))
examples = [
    objective.Example(
        torch.randint(3, args["vocab"], (args["prompt"],)).tolist(),
        torch.randint(3, args["vocab"], (args["response"],)).tolist(),
        id=i,
    )
    for i in range(args["batch"])
]
batch = objective.make_batch(examples, config.canvas_length, args["vocab"], 1, 0, seed=0, epoch=0)
weights = sum(p.numel() * p.element_size() for p in network.parameters())
if device.type == "cuda":
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
else:
    before = rss()
started = time.perf_counter()
losses = objective.block_diffusion_loss(network, batch)
losses.total.backward()
loss = float(losses.total)
seconds = time.perf_counter() - started
if device.type == "cuda":
    peak = torch.cuda.max_memory_allocated() - before
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"peak": peak, "weights": weights, "seconds": seconds, "loss": loss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="bench-90m")
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ways", type=int, nargs="*", default=None, help="run only these ways (0-3)")
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    rows, measured = [], {}
    ways = {name: way for index, (name, way) in enumerate(WAYS.items()) if args.ways is None or index in args.ways}
    for name, (chunked, checkpointed, lora) in ways.items():
        spec = {**vars(args), "chunked": chunked, "checkpointed": checkpointed, "lora": lora}
        for option in ("results", "ways"):
            spec.pop(option)
        run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{name}: the child failed\n{run.stderr}")
        measured[name] = json.loads(run.stdout.strip().splitlines()[-1])
    first = next(iter(measured.values()))
    for name, result in measured.items():
        rows.append(
            f"| {name} | {result['peak'] / 2**30:.2f} | {first['peak'] / result['peak']:.1f}x "
            f"| {result['seconds']:.1f} | {result['loss']:.4f} |"
        )
    table = "\n".join(
        [
            "| training step | peak above the weights, GiB | less than the first | seconds | loss |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    tokens = args.batch * (args.prompt + args.response)
    append_results(
        "Training memory: the loss a chunk of tokens at a time, checkpointed layers (bench/train_memory.py)",
        table,
        f"{args.preset}'s layers with a vocabulary of {args.vocab:,} ({first['weights'] / 2**30:.2f} GiB of float32 "
        f"weights, every one trained but in the LoRA way), batch {args.batch}, prompt {args.prompt}, "
        f"response {args.response} "
        f"({tokens:,} tokens), device {args.device}; one step (loss and backward) in a child process each way.",
        args.results,
    )


if __name__ == "__main__":
    main()
