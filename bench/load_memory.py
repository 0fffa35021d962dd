"""Peak host memory while loading a ~1 GB random checkpoint, as a multiple of the checkpoint's size; and while
rewriting it a shard at a time (`lora-merge` folding an adapter in, `quantize` to int4) against loading the
model, changing it and saving it.

Each load or merge runs in a fresh child process, which reports its own peak RSS (ru_maxrss) and its RSS just
before loading (the interpreter with torch imported), so the table shows both the whole process and what
the work itself added.

    python bench/load_memory.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

from diffgemma.presets import random_checkpoint

# bench-90m widened to about 1 GB of float32 weights
SHAPE = {"hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 512, "num_hidden_layers": 5}

# Each child reports its RSS before the work (torch and diffgemma imported) and its peak (ru_maxrss).
CHILD_START = r"""
import json, resource, sys
from pathlib import Path
import torch
import diffgemma
from diffgemma.train.lora import load_adapter, merge_adapter_files, merge_lora
def rss_now():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss_now()
"""

CHILD = (
    CHILD_START
    + r"""
model = diffgemma.load(sys.argv[1], dtype=sys.argv[2])
weights = sum(t.numel() * t.element_size() for t in model.network.state_dict().values())
print(json.dumps({"before": before, "peak": peak(), "weights": weights}))
"""
)

WAYS = ("lora: load, merge, save", "lora-merge on disk", "int4: load quantized, save", "quantize int4 on disk")
REWRITE_CHILD = (
    CHILD_START
    + r"""
from diffgemma.quant import QuantFormat, quantize_checkpoint
base, adapter, out, way = sys.argv[1:]
if way == "lora-merge on disk":
    merge_adapter_files(base, adapter, out, max_shard_bytes=SHARD_BYTES)
elif way == "lora: load, merge, save":
    model = diffgemma.load(base, dtype="stored")
    load_adapter(model.network, adapter)
    merge_lora(model.network)
    model.save(out, max_shard_bytes=SHARD_BYTES)
elif way == "quantize int4 on disk":
    quantize_checkpoint(Path(base), out, QuantFormat("int4"), torch.bfloat16, max_shard_bytes=SHARD_BYTES)
else:
    diffgemma.load(base, dtype="bfloat16", quant="int4").save(out, max_shard_bytes=SHARD_BYTES)
print(json.dumps({"before": before, "peak": peak()}))
"""
)
SHARD_BYTES = 128 * 2**20  # both ways write the same shards; on disk, one is in memory at a time


def write_checkpoint(folder: Path) -> None:
    random_checkpoint(folder, preset="bench-90m", **SHAPE)


def write_adapter(base: Path, folder: Path) -> None:
    """Rank-16 adapters with random (non-zero) B, so merging changes every adapted weight."""
    import torch

    import diffgemma
    from diffgemma.train.lora import LoraSettings, add_lora, save_adapter

    model = diffgemma.load(base)
    settings = LoraSettings(16)
    add_lora(model.network, settings)
    with torch.no_grad():
        for name, tensor in model.network.named_parameters():
            if name.endswith("lora_B.weight"):
                tensor.normal_(0, 0.01)
    save_adapter(model.network, settings, folder)


def in_child(target, *args) -> None:
    """Run `target` in a fresh spawned process: ru_maxrss survives fork+exec, so a big parent would inflate the
    readings of the children measured after it."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join()


def measure(folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_rewrite(base: Path, adapter: Path, out: Path, way: str) -> dict:
    code = REWRITE_CHILD.replace("SHARD_BYTES", str(SHARD_BYTES))
    argv = [sys.executable, "-c", code, str(base), str(adapter), str(out), way]
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="write the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or Path(tmp) / "ckpt")
        if not (folder / "config.json").exists():
            in_child(write_checkpoint, folder)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        rows = ["| load as | checkpoint | peak RSS | RSS before load | added by loading | peak / size | added / size |"]
        rows.append("|---|---|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            m = measure(folder, dtype)
            added = m["peak"] - m["before"]
            rows.append(
                f"| {dtype} | {size / 1e9:.2f} GB | {m['peak'] / 1e9:.2f} GB | {m['before'] / 1e9:.2f} GB | "
                f"{added / 1e9:.2f} GB | {m['peak'] / size:.2f}x | {added / size:.2f}x |"
            )
        in_child(write_adapter, folder, Path(tmp) / "adapter")
        rows += ["", "| rewriting the float32 checkpoint | peak RSS | added | added / size |", "|---|---|---|---|"]
        outputs = {way: Path(tmp) / f"out{n}" for n, way in enumerate(WAYS)}
        for way in WAYS:
            m = measure_rewrite(folder, Path(tmp) / "adapter", outputs[way], way)
            added = m["peak"] - m["before"]
            rows.append(f"| {way} | {m['peak'] / 1e9:.2f} GB | {added / 1e9:.2f} GB | {added / size:.2f}x |")
        for first, second in (WAYS[:2], WAYS[2:]):
            same = all(
                a.read_bytes() == b.read_bytes()
                for a, b in zip(*(sorted(outputs[w].glob("*.safetensors")) for w in (first, second)), strict=True)
            )
            rows.append(f"\n'{first}' and '{second}': weight files {'byte-identical' if same else 'DIFFERENT'}.")
    append_results(
        "Load memory (bench/load_memory.py)",
        "\n".join(rows),
        "Target: loading adds at most 1.3x the checkpoint size. bfloat16 loads convert through one tensor-sized "
        "buffer, so they add about half the float32 file size. `lora-merge` (`merge_adapter_files`) and `quantize` "
        f"(`quantize_checkpoint`) read, change and write one shard ({SHARD_BYTES // 2**20} MiB here; 5 GiB by "
        "default) at a time.",
    )


if __name__ == "__main__":
    main()
