"""Train the demo model the server, CLI and streaming tests use: the `tiny` shape, taught a handful of
canned chat answers and one tool call, so that its canvases really converge (settle, stop early, end with EOS).

    python tests/assets/make_demo_model.py   # rewrites tests/assets/demo (about 20 minutes on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

import torch

import diffgemma
from diffgemma.presets import random_checkpoint
from diffgemma.train.objective import Example
from diffgemma.train.trainer import TrainConfig, epoch_batches, train

HERE = Path(__file__).parent
SKY, FRUIT = "Why is the sky blue?", "Name a fruit."  # (the questions tests ask most)
ANSWERS = {
    SKY: "Air scatters blue sunlight more than red, so the sky looks blue.",
    "Say hello.": "Hello! I am a tiny diffusion model.",
    "What is 2 + 2?": "2 + 2 = 4.",
    FRUIT: "An apple.",
    "Tell me a joke.": "Why did the canvas stop? It was fully denoised.",
    "What are you?": "A small DiffusionGemma model trained on a few answers.",
    "Count to five.": "1, 2, 3, 4, 5.",
    "Write a haiku about rain.": "Soft rain on the roof / canvases fill, step by step / every token lands.",
}

# Asked with enable_thinking=True, these answer in the thinking channel first, then aloud.
THINKING = {
    "What is 3 + 4?": ("Three plus four: count on from three, four five six seven.", "3 + 4 = 7."),
}

# Offered this tool, the question is answered with a call (the output then ends with <|tool_response>); given
# the tool's answer after the call, the model goes on to answer aloud.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_QUESTION = "What is the weather in Paris?"
WEATHER_CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
WEATHER_RESULT = "Sunny, 21 C"
WEATHER_ANSWER = "It is sunny in Paris, 21 C."


def weather_conversation(answered: bool) -> list[dict]:
    """The weather question, and with `answered` the model's call and the tool's answer after it."""
    messages = [{"role": "user", "content": WEATHER_QUESTION}]
    if answered:
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": WEATHER_RESULT},
        ]
    return messages


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
    tool_response = tokenizer.token_id("<|tool_response>")
    for answered, text, end in ((False, WEATHER_CALL, tool_response), (True, WEATHER_ANSWER, end_of_turn)):
        prompt = tokenizer.encode_chat(weather_conversation(answered), tools=[WEATHER_TOOL])
        response = [*tokenizer.encode(text, add_special_tokens=False), end]
        examples.append(Example(prompt, response, id=len(examples)))
    torch.manual_seed(0)
    config = TrainConfig(steps=1500, batch_size=16, peak_lr=3e-3, warmup=100, seed=0)
    losses = train(model.network, epoch_batches(examples * 4, config.batch_size, 0), config, eos_id=1, pad_id=0)
    print(f"loss {losses[0]:.3f} -> {sum(losses[-50:]) / 50:.4f}")
    model.settings = model.settings.replace(eos_token_id=[1, end_of_turn, tool_response], max_denoising_steps=16)
    model.save(folder)


if __name__ == "__main__":
    main()
