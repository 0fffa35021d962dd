"""Peak host memory while loading a ~1 GB random checkpoint, as a multiple of the checkpoint's size; and while
folding a LoRA adapter into it (`lora-merge`, a shard at a time) against loading, merging and saving the model.

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

MERGE_CHILD = (
    CHILD_START
    + r"""
base, adapter, out, way = sys.argv[1:]
if way == "on disk":
    merge_adapter_files(base, adapter, out, max_shard_bytes=MERGE_SHARD_BYTES)
else:
    model = diffgemma.load(base, dtype="stored")
    load_adapter(model.network, adapter)
    merge_lora(model.network)
    model.save(out, max_shard_bytes=MERGE_SHARD_BYTES)
print(json.dumps({"before": before, "peak": peak()}))
"""
)
MERGE_SHARD_BYTES = 128 * 2**20  # both ways write the same shards; on disk, one is in memory at a time


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


def measure_merge(base: Path, adapter: Path, out: Path, way: str) -> dict:
    code = MERGE_CHILD.replace("MERGE_SHARD_BYTES", str(MERGE_SHARD_BYTES))
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
        rows += ["", "| lora-merge (float32 base) | peak RSS | added | added / size |", "|---|---|---|---|"]
        outputs = {}
        for way in ("load, merge, save", "on disk"):
            outputs[way] = Path(tmp) / way.replace(" ", "").replace(",", "-")
            m = measure_merge(folder, Path(tmp) / "adapter", outputs[way], way)
            added = m["peak"] - m["before"]
            rows.append(f"| {way} | {m['peak'] / 1e9:.2f} GB | {added / 1e9:.2f} GB | {added / size:.2f}x |")
        same = all(
            a.read_bytes() == b.read_bytes()
            for a, b in zip(*(sorted(o.glob("*.safetensors")) for o in outputs.values()), strict=True)
        )
        rows.append(f"\nThe two merged checkpoints' weight files are {'byte-identical' if same else 'DIFFERENT'}.")
    append_results(
        "Load memory (bench/load_memory.py)",
        "\n".join(rows),
        "Target: loading adds at most 1.3x the checkpoint size. bfloat16 loads convert through one tensor-sized "
        "buffer, so they add about half the float32 file size. `lora-merge` (`merge_adapter_files`) reads, folds "
        f"and writes one shard ({MERGE_SHARD_BYTES // 2**20} MiB here; 5 GiB by default) at a time.",
    )


if __name__ == "__main__":
    main()
