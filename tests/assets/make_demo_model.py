"""Train the demo model the server, CLI and streaming tests use: the `tiny` shape, taught a handful of
canned chat answers, so that its canvases really converge (settle, stop early, end with EOS).

    python tests/assets/make_demo_model.py   # rewrites tests/assets/demo (about a minute on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import torch

import diffgemma
from diffgemma.presets import random_checkpoint
from diffgemma.train.objective import Example
from diffgemma.train.trainer import TrainConfig, epoch_batches, train

HERE = Path(__file__).parent
ANSWERS = {
    "Why is the sky blue?": "Air scatters blue sunlight more than red, so the sky looks blue.",
    "Say hello.": "Hello! I am a tiny diffusion model.",
    "What is 2 + 2?": "2 + 2 = 4.",
    "Name a fruit.": "An apple.",
    "Tell me a joke.": "Why did the canvas stop? It was fully denoised.",
    "What are you?": "A small DiffusionGemma model trained on a few answers.",
    "Count to five.": "1, 2, 3, 4, 5.",
    "Write a haiku about rain.": "Soft rain on the roof / canvases fill, step by step / every token lands.",
}

# Asked with enable_thinking=True, these answer in the thinking channel first, then aloud.
THINKING = {
    "What is 3 + 4?": ("Three plus four: count on from three, four five six seven.", "3 + 4 = 7."),
}


def main() -> None:
    folder = random_checkpoint(HERE / "demo", preset="tiny", seed=0)
    model = diffgemma.load(folder)
    tokenizer = model.tokenizer
    end_of_turn = tokenizer.token_id("<turn|>")
    examples = []
    for index, (question, answer) in enumerate(ANSWERS.items()):
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
        response = [*tokenizer.encode(answer, add_special_tokens=False), end_of_turn]
        examples.append(Example(prompt, response, id=index))
    for index, (question, (thought, answer)) in enumerate(THINKING.items(), start=len(examples)):
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}], enable_thinking=True)
        text = f"<|channel>thought\n{thought}<channel|>{answer}"
        response = [*tokenizer.encode(text, add_special_tokens=False), end_of_turn]
        examples.append(Example(prompt, response, id=index))
    torch.manual_seed(0)
    config = TrainConfig(steps=1500, batch_size=16, peak_lr=3e-3, warmup=100, seed=0)
    losses = train(model.network, epoch_batches(examples * 4, config.batch_size, 0), config, eos_id=1, pad_id=0)
    print(f"loss {losses[0]:.3f} -> {sum(losses[-50:]) / 50:.4f}")
    model.settings = model.settings.replace(eos_token_id=[1, end_of_turn], max_denoising_steps=16)
    model.save(folder)


if __name__ == "__main__":
    main()
