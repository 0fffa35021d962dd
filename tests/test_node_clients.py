"""The JavaScript ecosystem's clients against the server, over real HTTP: the official OpenAI, Anthropic and Ollama
SDKs for Node and the Vercel AI SDK (its OpenAI-compatible, OpenAI and Anthropic providers), at the versions
`tests/clients/package.json` pins (`npm ci --prefix tests/clients`, as CI does; without them this is skipped).
They parse strictly (the AI SDK checks every streamed chunk against a schema), so a field out of shape fails."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from assets.make_demo_adapter import PIRATE as PIRATE_ANSWERS
from assets.make_demo_model import ANSWERS, FRUIT, SKY, THINKING, WEATHER_ANSWER
from conftest import DEMO
from server_util import running

import diffgemma
from diffgemma.server import ServerOptions, create_app

CLIENTS = Path(__file__).parent / "clients"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (CLIENTS / "node_modules").is_dir(),
    reason="the JavaScript clients are not installed (npm ci --prefix tests/clients)",
)


def test_javascript_clients_get_each_answer_in_their_shape():
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", DEMO.parent / "demo-pirate")
    with running(create_app(model, ServerOptions(model_name="demo"))) as url:
        ran = subprocess.run(
            ["node", str(CLIENTS / "check.mjs"), url], capture_output=True, text=True, timeout=300, check=False
        )
    assert ran.returncode == 0, ran.stderr[-2000:]
    results = json.loads(ran.stdout.strip().splitlines()[-1])
    thought, answer = THINKING["What is 3 + 4?"]
    call = ["get_weather", {"city": "Paris"}]
    expected = {
        "openai models": ["demo", "pirate"],
        "openai chat": [ANSWERS[SKY], "stop"],
        "openai chat, the adapter": PIRATE_ANSWERS[FRUIT],
        "openai chat stream": [ANSWERS[FRUIT], True],
        "openai stream helper": ANSWERS[FRUIT],
        "openai thinking": [thought, answer],
        "openai tool call": ["tool_calls", *call],
        "openai runTools": WEATHER_ANSWER,
        "openai responses": ANSWERS[SKY],
        "openai responses stream": [ANSWERS[FRUIT], "response.completed"],
        "openai embeddings": [model.config.hidden_size] * 2,
        "anthropic message": [ANSWERS[SKY], "end_turn"],
        "anthropic stream": [ANSWERS[FRUIT], "end_turn"],
        "anthropic tool use": ["tool_use", *call],
        "anthropic count tokens": True,
        "ollama chat": ANSWERS[FRUIT],
        "ollama chat stream": PIRATE_ANSWERS[FRUIT],
        "ollama tool call": call,
        "ollama list": ["demo", "pirate"],
        "ollama embed": 2,
        "ai-sdk openai-compatible reasoning": [thought, answer],
        "ai-sdk embedMany": [model.config.hidden_size] * 2,
    }
    for provider in ("ai-sdk openai-compatible", "ai-sdk openai", "ai-sdk anthropic"):
        expected[f"{provider} generateText"] = [ANSWERS[SKY], "stop"]
        expected[f"{provider} streamText"] = [ANSWERS[FRUIT], "stop", []]
    assert results == expected
