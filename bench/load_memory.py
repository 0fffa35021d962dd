"""Peak host memory while loading a ~1 GB random checkpoint, as a multiple of the checkpoint's size.

Each load runs in a fresh child process, which reports its own peak RSS (ru_maxrss) and its RSS just
before loading (the interpreter with torch imported), so the table shows both the whole process and what
loading itself added.

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

CHILD = r"""
import json, resource, sys
import torch
import diffgemma
def rss_now():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
before = rss_now()
model = diffgemma.load(sys.argv[1], dtype=sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(t.numel() * t.element_size() for t in model.network.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "weights": weights}))
"""


def write_checkpoint(folder: Path) -> None:
    random_checkpoint(folder, preset="bench-90m", **SHAPE)


def measure(folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="write the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or Path(tmp) / "ckpt")
        if not (folder / "config.json").exists():
            # In a child of its own: ru_maxrss survives fork+exec, so a big parent would inflate the readings.
            writer = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(folder,))
            writer.start()
            writer.join()
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
    append_results(
        "Load memory (bench/load_memory.py)",
        "\n".join(rows),
        "Target: loading adds at most 1.3x the checkpoint size. bfloat16 loads convert through one tensor-sized "
        "buffer, so they add about half the float32 file size.",
    )


if __name__ == "__main__":
    main()
