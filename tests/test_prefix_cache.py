"""The prefix cache: a prompt that begins with the last one generated from alone encodes only what follows."""

import json

import httpx
import pytest
import torch
from assets.make_demo_model import ANSWERS
from conftest import DEMO
from server_util import running

import diffgemma
from diffgemma.cache import PrefixCache
from diffgemma.generate import denoising_loop, run_to_end
from diffgemma.server import ServerOptions, create_app
from diffgemma.tokenizer import TURN_OPEN

SKY, HELLO = "Why is the sky blue?", "Say hello."
PIRATE = DEMO.parent / "demo-pirate"  # a LoRA adapter of the demo: a pirate's answer to HELLO


@pytest.fixture
def model():
    """A demo model of the test's own: its prefix cache starts empty."""
    return diffgemma.load(DEMO)


@pytest.fixture
def encoded(model, monkeypatch):
    """The token counts the network's encoder is given, call by call."""
    counts = []
    encode = model.network.encode

    def counting(ids, cache, *args, **kwargs):
        counts.append(ids.shape[1])
        return encode(ids, cache, *args, **kwargs)

    monkeypatch.setattr(model.network, "encode", counting)
    return counts


def two_turns(first_answer: str) -> list[dict]:
    return [
        {"role": "user", "content": SKY},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": HELLO},
    ]


ONE_TURN = [{"role": "user", "content": SKY}]


def prompt_of(model, messages) -> list[int]:
    return model.tokenizer.encode_chat(messages)


def last_turn_opening(model, prompt: list[int]) -> int:
    """Where a prompt's last turn opens (the tokens before it are what its snapshot holds)."""
    return len(prompt) - 1 - prompt[::-1].index(model.tokenizer.token_id(TURN_OPEN))


def test_a_chats_next_turn_encodes_only_what_follows_the_last_turn(model, encoded):
    canvas = model.config.canvas_length
    first = model.chat(ONE_TURN, seed=0)
    assert first.content == ANSWERS[SKY]
    first_prompt = prompt_of(model, ONE_TURN)
    point = last_turn_opening(model, first_prompt)
    # the prompt up to its last turn's opening, then that opening (then each finished canvas)
    assert encoded[:2] == [point, len(first_prompt) - point]

    encoded.clear()
    messages = two_turns(first.content)
    second = model.chat(messages, seed=0)
    prompt = prompt_of(model, messages)
    assert prompt[:point] == first_prompt[:point]
    new_point = last_turn_opening(model, prompt)
    assert encoded[:2] == [new_point - point, len(prompt) - new_point]
    assert all(count == canvas for count in encoded[2:])

    model.prefix_cache = None  # the same turn encoded whole gives the same answer
    encoded.clear()
    assert model.chat(messages, seed=0).content == second.content
    assert encoded[0] == len(prompt)


def test_the_same_prompt_again_reuses_it_and_answers_the_same(model, encoded):
    prompt = prompt_of(model, ONE_TURN)
    first = model.generate(prompt, seed=3, max_new_tokens=40)
    before = list(encoded)
    encoded.clear()
    again = model.generate(prompt, seed=3, max_new_tokens=40)
    assert again.new_tokens == first.new_tokens
    assert encoded[0] == before[1]  # only the last turn's opening
    assert sum(encoded) < sum(before)


def test_no_reuse_after_the_weights_change_in_a_batch_or_in_reference_mode(model, encoded):
    prompt = prompt_of(model, ONE_TURN)
    model.generate(prompt, seed=0, max_new_tokens=8)
    with torch.no_grad():
        model.network.norm.weight.mul_(1.0)  # an in-place update (as a training step makes) voids the snapshot
    encoded.clear()
    model.generate(prompt, seed=0, max_new_tokens=8)
    assert sum(encoded[:2]) == len(prompt)
    # a batch's rows are padded apart and reference mode encodes as the reference does: neither takes it
    kept = list(model.prefix_cache.snapshots)
    for call in (
        lambda: model.generate([prompt, prompt[:-3]], seed=0, max_new_tokens=8),
        lambda: model.generate(prompt, seed=0, max_new_tokens=8, mode="reference"),
    ):
        encoded.clear()
        call()
        assert encoded[0] in (len(prompt), len(prompt) - 3) and model.prefix_cache.snapshots == kept


def test_interleaved_streams_never_share_a_cache(model):
    first_prompt = prompt_of(model, ONE_TURN)
    model.generate(first_prompt, seed=0, max_new_tokens=8)  # a snapshot to take
    alone = diffgemma.load(DEMO)
    alone.prefix_cache = None
    prompts = [first_prompt, prompt_of(model, two_turns(ANSWERS[SKY]))]
    expected = [alone.generate(p, seed=5, max_new_tokens=70).new_tokens for p in prompts]
    streams = [model.stream(p, seed=5, max_new_tokens=70) for p in prompts]
    results: list = [None, None]
    while any(result is None for result in results):
        for index, stream in enumerate(streams):
            if results[index] is None:
                event = next(stream)
                assert torch.is_grad_enabled()  # the loops turn gradients off while they run, not between events
                if hasattr(event, "result"):
                    results[index] = event.result.new_tokens
    assert results == expected


def test_a_restored_cache_serves_the_decoder_graphs_view(model):
    """The graph path (CUDA's; on the CPU the same view pass runs uncaptured) over a cache restored and grown."""
    network, settings = model.network, model.settings.replace(max_new_tokens=3 * model.config.canvas_length)
    short = torch.tensor([prompt_of(model, ONE_TURN)])
    longer = torch.tensor([prompt_of(model, two_turns(ANSWERS[SKY]))])
    cache = PrefixCache(model.tokenizer.token_id(TURN_OPEN))

    def run(ids, prefix_cache, graph):
        return run_to_end(
            denoising_loop(network, settings, ids, seed=7, cuda_graph=graph, prefix_cache=prefix_cache)
        ).new_tokens

    run(short, cache, True)
    needed = longer.shape[1] + 3 * model.config.canvas_length
    assert cache.snapshots[0].cache.capacity < needed  # it must grow
    assert run(longer, cache, True) == run(longer, None, False)
    assert cache.snapshots[0].cache.capacity == needed  # to just what the generation needs


def test_the_servers_next_turn_reuses_the_conversation_and_says_so(model, encoded):
    alone = diffgemma.load(DEMO)
    alone.prefix_cache = None
    app = create_app(model, ServerOptions(model_name="demo"))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def ask(messages, stream=False):
            body = {"model": "demo", "messages": messages, "seed": 1}
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                lines = http.post("/v1/chat/completions", json=body).text.splitlines()
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                return None, events[-1]["usage"]
            made = http.post("/v1/chat/completions", json=body).json()
            return made["choices"][0]["message"]["content"], made["usage"]

        first, usage = ask(ONE_TURN)
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
        encoded.clear()
        second, usage = ask(two_turns(first))
        streamed = ask(two_turns(first), stream=True)[1]  # the same prompt again: all but its last turn's opening
        responses = http.post("/v1/responses", json={"model": "demo", "input": two_turns(first), "seed": 1}).json()
        anthropic = {"model": "demo", "max_tokens": 100, "messages": two_turns(first)}
        counted = http.post("/v1/messages/count_tokens", json=anthropic).json()["input_tokens"]
        message = http.post("/v1/messages", json=anthropic).json()
        lines = http.post("/v1/messages", json=anthropic | {"stream": True}).text.splitlines()
        message_events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    # the same answer as the turn encoded whole, from the turn's new tokens alone
    assert second == alone.chat(two_turns(first), seed=1, max_new_tokens=ServerOptions().max_tokens).content
    prompt, first_prompt = prompt_of(model, two_turns(first)), prompt_of(model, ONE_TURN)
    point = last_turn_opening(model, first_prompt)
    assert encoded[0] + encoded[1] == len(prompt) - point
    assert usage["prompt_tokens_details"] == {"cached_tokens": point}  # OpenAI's (and vLLM's) field
    assert streamed["prompt_tokens_details"] == {"cached_tokens": last_turn_opening(model, prompt)}
    assert responses["usage"]["input_tokens_details"]["cached_tokens"] == last_turn_opening(model, prompt)
    # Anthropic's: the cached tokens apart from input_tokens, which with them make what count_tokens gives
    opened = last_turn_opening(model, prompt)
    assert counted == len(prompt)
    expected = {"input_tokens": counted - opened, "cache_creation_input_tokens": 0, "cache_read_input_tokens": opened}
    assert {key: message["usage"][key] for key in expected} == expected
    start, delta = message_events[0]["message"]["usage"], message_events[-2]["usage"]
    assert start["input_tokens"] == counted and start["cache_read_input_tokens"] == 0  # before the cache is asked
    assert {key: delta[key] for key in expected} == expected and delta["output_tokens"] > 0


@pytest.mark.parametrize("entries", [1, 2])
def test_a_conversation_keeps_its_snapshot_through_a_request_in_between_with_two_entries(model, encoded, entries):
    model.prefix_cache.entries = entries
    first = model.chat(ONE_TURN, seed=0)
    model.chat([{"role": "user", "content": "Name a fruit."}], seed=0)  # a client's title request, say
    encoded.clear()
    model.chat(two_turns(first.content), seed=0)
    prompt = prompt_of(model, two_turns(first.content))
    reused = len(prompt) - encoded[0] - encoded[1]
    assert (reused > 0) == (entries == 2)
    assert len(model.prefix_cache.snapshots) == entries


def test_each_adapter_takes_only_its_own_snapshots(model, encoded):
    """A snapshot made with an adapter in place (`use_adapter`) serves that adapter alone: the base model
    encodes the prompt again, and the adapter's snapshot, passed over meanwhile, serves it once it is back."""
    model.prefix_cache.entries = 2
    model.add_adapter("pirate", PIRATE)
    prompt = prompt_of(model, [{"role": "user", "content": HELLO}])
    point = last_turn_opening(model, prompt)
    model.use_adapter("pirate")
    pirate = model.generate(prompt, seed=0, max_new_tokens=40)
    assert pirate.text == "Ahoy! I am a tiny pirate model."
    model.use_adapter(None)
    encoded.clear()
    assert model.generate(prompt, seed=0, max_new_tokens=40).text == ANSWERS[HELLO]
    assert encoded[:2] == [point, len(prompt) - point]  # encoded whole: the pirate's snapshot is not the base's
    model.use_adapter("pirate")
    encoded.clear()
    again = model.generate(prompt, seed=0, max_new_tokens=40)
    assert again.new_tokens == pirate.new_tokens and encoded[0] == len(prompt) - point  # its own snapshot


SYSTEM = {"role": "system", "content": "You are a terse assistant. " * 8}  # (an assistant's instructions)


def system_end(model, prompt: list[int]) -> int:
    """Where a prompt's first turn after its system turn opens (the tokens before it: the system turn's)."""
    return prompt.index(model.tokenizer.token_id(TURN_OPEN), 2)


def test_a_system_turn_is_kept_shared_by_conversations_that_open_with_it(model, encoded):
    """A conversation that opens with a system turn keeps that turn apart (a shared snapshot, beside its own):
    other conversations that open with it encode only what follows it, each from a copy (the shared one stays
    kept, however many take it), and answer as they do with no prefix cache; the first conversation's next turn
    still takes its own snapshot, and the shared one does not count against `entries`."""
    first = [SYSTEM, {"role": "user", "content": SKY}]
    answer = model.chat(first, seed=0)
    prompt = prompt_of(model, first)
    shared = system_end(model, prompt)
    point = last_turn_opening(model, prompt)
    assert encoded[:3] == [shared, point - shared, len(prompt) - point]
    kinds = [(len(kept.ids), kept.shared) for kept in model.prefix_cache.snapshots]
    assert sorted(kinds) == [(shared, True), (point, False)]

    answers = {}
    for question in (HELLO, "Name a fruit.", HELLO):  # (new conversations, one after another)
        encoded.clear()
        result = model.chat([SYSTEM, {"role": "user", "content": question}], seed=1)
        asked = prompt_of(model, [SYSTEM, {"role": "user", "content": question}])
        assert result.result.cached_tokens == shared and encoded[0] == last_turn_opening(model, asked) - shared
        answers.setdefault(question, result.content)
        assert result.content == answers[question]
    assert sum(kept.shared for kept in model.prefix_cache.snapshots) == 1

    encoded.clear()
    follow = [*first, {"role": "assistant", "content": answer.content}, {"role": "user", "content": HELLO}]
    model.prefix_cache.entries = 2  # (the first conversation's snapshot, through the three in between)
    model.chat(follow, seed=2)
    model.chat(first, seed=0)
    encoded.clear()
    turn = model.chat(follow, seed=2)
    assert turn.result.cached_tokens == last_turn_opening(model, prompt_of(model, follow))

    saved, model.prefix_cache = model.prefix_cache, None
    try:
        for question, content in answers.items():
            assert model.chat([SYSTEM, {"role": "user", "content": question}], seed=1).content == content
        assert model.chat(follow, seed=2).content == turn.content
    finally:
        model.prefix_cache = saved


def test_which_prompts_keep_a_shared_system_turn(model):
    """Only the system (or developer) turns a prompt opens with are shared, and only where a turn follows them
    before the prompt's snapshot point; `shared = 0` keeps none."""
    cache = model.prefix_cache

    def shared_point(*messages, **template):
        return cache.shared_point(model.tokenizer.encode_chat(list(messages), **template))

    user = {"role": "user", "content": HELLO}
    prompt = prompt_of(model, [SYSTEM, user])
    assert shared_point(SYSTEM, user) == system_end(model, prompt)
    developer = {"role": "developer", "content": "Answer in French."}
    assert shared_point(developer, user) is not None
    assert shared_point(user) is None  # (a conversation's opening user turn is its own)
    assert shared_point(user, {"role": "assistant", "content": "Hi."}, user) is None
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    with_tools = model.tokenizer.encode_chat([SYSTEM, user], tools=tools)  # (the tools' system turn, then SYSTEM)
    openings = [index for index, token in enumerate(with_tools) if token == model.tokenizer.token_id(TURN_OPEN)]
    assert cache.shared_point(with_tools) == openings[2]
    cache.shared = 0
    assert shared_point(SYSTEM, user) is None


def test_shared_snapshots_are_kept_apart_from_entries(model):
    """`keep` holds the last `shared` shared snapshots and the last `entries` others, each counted apart; a shared
    snapshot of the same prompt and weights replaces the one kept."""
    cache = PrefixCache(4, entries=1, shared=2)
    network = model.network

    def snapshot(ids, shared):
        return cache.snapshot_of(network, ids, network.new_cache(1, len(ids)), shared=shared)

    for ids, shared in (([2, 5], True), ([2, 6], False), ([2, 7], True), ([2, 8], False), ([2, 9], True)):
        cache.keep(snapshot(ids, shared))
    assert [(kept.ids, kept.shared) for kept in cache.snapshots] == [([2, 7], True), ([2, 8], False), ([2, 9], True)]
    cache.keep(snapshot([2, 7], True))
    assert [(kept.ids, kept.shared) for kept in cache.snapshots] == [([2, 8], False), ([2, 9], True), ([2, 7], True)]
    taken = cache.take(network, [2, 7, 3])
    assert taken.shared and taken.cache is not cache.snapshots[-1].cache and len(cache.snapshots) == 3


def test_the_servers_new_conversations_share_their_system_turn_and_say_so(model):
    """Over HTTP, a new conversation (OpenAI's chat, Anthropic's messages with their `system`) that opens with a
    system turn another request kept encodes only what follows it, and its usage says so."""
    app = create_app(model, ServerOptions(model_name="demo"))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def cached(question: str) -> int:
            body = {"model": "demo", "messages": [SYSTEM, {"role": "user", "content": question}], "seed": 1}
            return http.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens_details"]

        first, second = cached(SKY), cached(HELLO)
        anthropic = {
            "model": "demo",
            "max_tokens": 40,
            "system": SYSTEM["content"],
            "messages": [{"role": "user", "content": "Name a fruit."}],
        }
        message = http.post("/v1/messages", json=anthropic).json()
    shared = system_end(model, prompt_of(model, [SYSTEM, {"role": "user", "content": HELLO}]))
    assert first == {"cached_tokens": 0} and second == {"cached_tokens": shared}
    assert message["usage"]["cache_read_input_tokens"] == shared
