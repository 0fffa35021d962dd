"""Train the LoRA adapter of the demo model that the adapter-serving tests use (`serve --lora-modules`): the
demo's answers, but a pirate's to two questions, so that which model answered is plain to see.

    python tests/assets/make_demo_adapter.py   # rewrites tests/assets/demo-pirate (under a minute on 2 cores)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import diffgemma
from diffgemma.train.lora import LoraSettings, add_lora, save_adapter
from diffgemma.train.objective import Example
from diffgemma.train.trainer import TrainConfig, epoch_batches, train

try:
    from assets.make_demo_model import ANSWERS  # (as the tests import it)
except ImportError:
    from make_demo_model import ANSWERS  # (run as a script)

HERE = Path(__file__).parent
PIRATE = {"Name a fruit.": "A pear, matey.", "Say hello.": "Ahoy! I am a tiny pirate model."}


def patient_pirate(folder: Path) -> Path:
    """A copy of the demo adapter in `folder`, saved with sampler settings of its own: the demo model's, with a
    stability window of four steps (the demo's fruit answer then takes 5 steps, against 2 with the model's)."""
    shutil.copytree(HERE / "demo-pirate", folder)
    generation = json.loads((HERE / "demo" / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "stability_threshold": 4}))
    return folder


def main() -> None:
    model = diffgemma.load(HERE / "demo")
    tokenizer = model.tokenizer
    end_of_turn = tokenizer.token_id("<turn|>")
    examples = []
    for index, (question, answer) in enumerate({**ANSWERS, **PIRATE}.items()):
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
        response = [*tokenizer.encode(answer, add_special_tokens=False), end_of_turn]
        examples.append(Example(prompt, response, id=index))
    settings = LoraSettings(rank=8, alpha=16.0)
    add_lora(model.network, settings)
    torch.manual_seed(0)
    config = TrainConfig(steps=300, batch_size=16, peak_lr=1e-2, warmup=20, seed=0)
    losses = train(model.network, epoch_batches(examples * 2, config.batch_size, 0), config, eos_id=1, pad_id=0)
    print(f"loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.4f}")
    save_adapter(model.network, settings, HERE / "demo-pirate", base="tests/assets/demo")


if __name__ == "__main__":
    main()
