"""Bad requests get the request's error, never the server's: well-formed bodies of every route with a few fields
(at any depth) swapped for random values or dropped, each answered below 500, streams included, in the route's
error shape. Seeded, so a failure names the body that made it."""

import copy
import json
import random

import httpx
import pytest
from assets.make_demo_model import WEATHER_TOOL as TOOL
from conftest import DEMO
from server_util import running

import diffgemma
from diffgemma.server import ServerOptions, create_app

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
BODIES = {
    "/v1/chat/completions": {
        "max_tokens": 8,
        "tools": [TOOL],
        "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        ],
        "logprobs": True,
        "top_logprobs": 2,
        "n": 2,
        "stop": ["x"],
        "seed": 0,
        "top_p": 0.9,  # (sampler settings: a row's own in a shared batch)
        "stability_threshold": 2,
        "t_max": 0.9,
        "frequency_penalty": 0.5,  # (penalties and biases: a row's own too)
        "presence_penalty": 0.2,
        "logit_bias": {"41": 3},
    },
    "/v1/responses": {
        "max_output_tokens": 8,
        "tools": [{"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        ],
        "reasoning": {"effort": "low"},
        "text": {"format": {"type": "json_object"}},
    },
    "/v1/messages": {
        "max_tokens": 8,
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [{"name": "get_weather", "input_schema": TOOL["function"]["parameters"]}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
                ],
            },
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"}]},
        ],
        "thinking": {"type": "enabled", "budget_tokens": 100},
        "tool_choice": {"type": "auto"},
        "stop_sequences": ["x"],
    },
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "hi"}], "tools": []},
    "/v1/completions": {
        "prompt": [[2, 40, 41], [2, 50]],
        "max_tokens": 4,
        "suffix": "x",
        "echo": True,
        "logprobs": 2,
        "logit_bias": {"40": -100, "41": 2.5},
        "repetition_penalty": 1.1,
        "top_k": 10,
        "entropy_bound": 0.2,
        "max_denoising_steps": 6,
    },
    "/v1/embeddings": {"input": ["hello", "there"], "encoding_format": "float", "dimensions": 8},
    "/tokenize": {"prompt": "hello", "add_special_tokens": True},
    "/detokenize": {"tokens": [40, 41]},
    "/infill": {"input_prefix": "Hello ", "input_suffix": " world", "n_predict": 4, "input_extra": []},
    "/completion": {
        "prompt": [2, "Hello", 40],
        "n_predict": 4,
        "stop": ["x"],
        "logit_bias": [[40, False], [41, 1.5]],
        "presence_penalty": 0.5,
        "seed": -1,
        "return_tokens": True,
        "response_fields": ["content", "timings/predicted_n"],
        "top_k": 5,
    },
    "/generate": {
        "inputs": "Hello",
        "parameters": {
            "max_new_tokens": 4,
            "stop": ["x"],
            "seed": 3,
            "do_sample": True,
            "top_k": 5,
            "details": True,
            "return_full_text": True,
            "truncate": 8,
            "repetition_penalty": 1.2,
            "adapter_id": "demo",
        },
    },
    "/": {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True, "stop": ["a"]}},  # (TGI's root)
    "/api/chat": {
        "stream": False,
        "messages": [{"role": "user", "content": "hi", "images": [PIXEL]}],
        "tools": [TOOL],
        "format": {"type": "object"},
        "options": {"num_predict": 8, "top_k": 5, "min_p": 0.1, "confidence_threshold": 0.01},
        "think": True,
    },
    "/api/generate": {"prompt": "Hello", "stream": False, "options": {"num_predict": 8}, "suffix": "x"},
    "/api/embed": {"input": ["hi"], "truncate": True},
}
TRIALS = 300
STREAMS = {
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/completions",
    "/completion",
    "/",
    "/api/chat",
    "/api/generate",
}
WORDS = ["", "x", "auto", "required", "none", "json_object", "function", "text", "image", "user", "🙂"]


def random_value(rng: random.Random, depth: int = 0):
    kinds = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-3, 3),
        lambda: rng.uniform(-2, 2),
        lambda: rng.choice(WORDS),
        lambda: rng.randint(10**18, 10**19),
    ]
    if depth < 2:
        kinds += [
            lambda: [random_value(rng, depth + 1) for _ in range(rng.randint(0, 2))],
            lambda: {rng.choice(["type", "text", "name", "role", "content"]): random_value(rng, depth + 1)},
        ]
    return rng.choice(kinds)()


def places(value, path=()):
    """Every place in a body, as its path of keys and indices."""
    if path:
        yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from places(item, (*path, key))


def mutated(body: dict, rng: random.Random) -> dict:
    """`body` with one to three places given random values, or dropped."""
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        every = list(places(body))
        if not every:  # (all dropped already)
            break
        path = rng.choice(every)
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.2:
            del parent[path[-1]]
        else:
            parent[path[-1]] = random_value(rng)
    return body


def error_shaped(route: str, reply: httpx.Response) -> bool:
    """Whether an error reply is in its route's API shape."""
    body = reply.json()
    if route.startswith("/api/"):
        return isinstance(body.get("error"), str)
    if route in ("/generate", "/"):  # (TGI's shape)
        return isinstance(body.get("error"), str) and isinstance(body.get("error_type"), str)
    if route.startswith("/v1/messages"):
        return body.get("type") == "error" and isinstance(body["error"].get("message"), str)
    return isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str)


@pytest.mark.filterwarnings("ignore:infill")  # (a fill whose suffix the canvas cannot hold, said as it is cut)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutated_requests_get_the_requests_error_never_the_servers(seed):
    model = diffgemma.load(DEMO)
    app = create_app(model, ServerOptions(model_name="demo", max_tokens=64))
    rng = random.Random(seed)
    refused = 0
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for trial in range(TRIALS):
            route = rng.choice(list(BODIES))
            body = mutated({"model": "demo", **BODIES[route]}, rng)
            if route in STREAMS and rng.random() < 0.3:
                body["stream"] = True
            reply = client.post(route, json=body)
            said = f"trial {trial}: {route} {json.dumps(body)[:1500]} -> {reply.status_code} {reply.text[:300]}"
            assert reply.status_code < 500, said
            assert "server_error" not in reply.text and "generation failed" not in reply.text, said
            if reply.status_code >= 400:
                refused += 1
                assert error_shaped(route, reply), said
    assert TRIALS // 10 < refused < TRIALS * 19 // 20  # (both kinds come: bodies refused, and bodies answered)
