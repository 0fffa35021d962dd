"""Run under `torchrun --nproc_per_node 2`: train a tiny model a few steps with gloo, write each rank's weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import diffgemma
from diffgemma.train.objective import Example
from diffgemma.train.trainer import TrainConfig, epoch_batches, train


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = diffgemma.load(folder)
    examples = [Example([2, 10 + i, 11], list(range(30 + i, 70 + i)), id=i) for i in range(8)]
    config = TrainConfig(steps=3, batch_size=2, peak_lr=3e-3, warmup=1, seed=0)
    losses = train(model.network, epoch_batches(examples, 2, 0), config, 1, 0, show_progress=False)
    torch.save({"state": model.network.state_dict(), "losses": losses}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
