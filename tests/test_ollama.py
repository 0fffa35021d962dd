"""Ollama's API, driven by the official `ollama` client (and raw HTTP where the client reshapes what it sends)."""

import json

import httpx
import ollama
import openai
import pytest
import torch
from assets.make_demo_model import (
    ANSWERS,
    SKY,
    THINKING,
    WEATHER_ANSWER,
    WEATHER_RESULT,
    WEATHER_TOOL,
    weather_conversation,
)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server[0])


def ask(question):
    return [{"role": "user", "content": question}]


def test_what_is_served(server, client, demo):
    listed = client.list().models
    assert [entry.model for entry in listed] == ["demo"]
    assert listed[0].details.format == "safetensors" and listed[0].details.quantization_level == "F32"
    weights = [*demo.network.parameters(), *demo.network.buffers()]  # (the tied head counted once)
    assert listed[0].size == sum(tensor.numel() * tensor.element_size() for tensor in weights)
    shown = client.show("demo")
    assert {"completion", "insert", "tools"} <= set(shown.capabilities) and "vision" not in shown.capabilities
    openai_context = openai.OpenAI(base_url=server[0] + "/v1", api_key="-").models.list().data[0].max_model_len
    assert shown.modelinfo["diffusion_gemma.context_length"] == openai_context
    assert shown.modelinfo["diffusion_gemma.canvas_length"] == demo.config.canvas_length
    parameters = dict(line.split(" ", 1) for line in shown.parameters.splitlines())  # (a Modelfile's)
    assert parameters["max_denoising_steps"] == str(demo.settings.max_denoising_steps) and parameters["top_p"] == "1.0"
    assert [entry.model for entry in client.ps().models] == ["demo"]
    assert httpx.get(server[0] + "/api/version").json()["version"]


def test_chat_whole_and_streamed_equal_the_openai_routes(server, client):
    whole = client.chat(model="demo", messages=ask(SKY), options={"seed": 1})
    expected = openai.OpenAI(base_url=server[0] + "/v1", api_key="-").chat.completions.create(
        model="demo", messages=ask(SKY), seed=1
    )
    assert whole.message.content == expected.choices[0].message.content == ANSWERS[SKY]
    assert whole.done and whole.done_reason == "stop"
    assert whole.eval_count == expected.usage.completion_tokens
    assert whole.prompt_eval_count == expected.usage.prompt_tokens
    chunks = list(client.chat(model="demo", messages=ask(SKY), options={"seed": 1}, stream=True))
    assert "".join(chunk.message.content for chunk in chunks) == ANSWERS[SKY]
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].done_reason == "stop" and chunks[-1].eval_count == whole.eval_count
    # a body posted as curl posts Ollama's documented examples (`-d`, no header: form data) is read as JSON
    body = json.dumps({"model": "demo", "messages": ask(SKY), "options": {"seed": 1}, "stream": False})
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert httpx.post(server[0] + "/api/chat", content=body, headers=form).json()["message"]["content"] == ANSWERS[SKY]
    # any name is answered with the model served (as the OpenAI routes answer it)
    assert client.chat(model="gemma:latest", messages=ask(SKY), options={"seed": 1}).message.content == ANSWERS[SKY]


def test_thinking_comes_apart_from_the_answer(client):
    """`think` (true, or an effort) turns thinking on, as `enable_thinking` and `reasoning_effort` do on /v1; the
    thinking comes back as `thinking`, in the message (chat) or beside the response (generate), and in a stream."""
    question = "What is 3 + 4?"
    thought, answer = THINKING[question]
    for think in (True, "high"):
        message = client.chat(model="demo", messages=ask(question), think=think, options={"seed": 1}).message
        assert (message.content, message.thinking) == (answer, thought)
    lines = list(client.chat(model="demo", messages=ask(question), think=True, options={"seed": 1}, stream=True))
    assert "".join(line.message.thinking or "" for line in lines) == thought
    assert "".join(line.message.content for line in lines) == answer
    generated = client.generate(model="demo", prompt=question, think=True, options={"seed": 1})
    assert (generated.response, generated.thinking) == (answer, thought)
    unasked = client.chat(model="demo", messages=ask(question), think=False, options={"seed": 1}).message
    assert unasked.thinking is None


def test_logprobs_score_the_answer_as_the_openai_routes_do(server, client):
    asked = dict(model="demo", messages=ask(SKY), options={"seed": 1}, logprobs=True, top_logprobs=2)
    whole = client.chat(**asked)
    expected = openai.OpenAI(base_url=server[0] + "/v1", api_key="-").chat.completions.create(
        model="demo", messages=ask(SKY), seed=1, logprobs=True, top_logprobs=2
    )
    openai_scores = [(entry.token, entry.logprob) for entry in expected.choices[0].logprobs.content]
    assert [(entry.token, entry.logprob) for entry in whole.logprobs] == openai_scores
    assert "".join(entry.token for entry in whole.logprobs) == ANSWERS[SKY]
    assert all(len(entry.top_logprobs) == 2 for entry in whole.logprobs)
    lines = list(client.chat(**asked, stream=True))
    assert [line.logprobs for line in lines[:-1]] == [None] * (len(lines) - 1)  # (all with the last line)
    assert [(entry.token, entry.logprob) for entry in lines[-1].logprobs] == openai_scores
    raw = client.generate(model="demo", prompt="Name a fruit.", raw=True, logprobs=True, options={"seed": 2})
    assert "".join(entry.token for entry in raw.logprobs) == raw.response
    assert client.chat(model="demo", messages=ask(SKY), options={"seed": 1}).logprobs is None


def test_a_chat_over_the_prompt_limit_loses_its_oldest_turns(client):
    """As Ollama fits a long chat to its context: the oldest turns go (the system's stays, and a call's answers
    go with it); a last message over the limit alone is refused."""
    from diffgemma.server.ollama import without_oldest_turn

    earlier = [
        {"role": role, "content": f"{role} {index} " * 20} for index in range(6) for role in ("user", "assistant")
    ]
    system = {"role": "system", "content": "Be brief."}
    fitted = client.chat(model="demo", messages=[system, *earlier, *ask(SKY)], options={"seed": 1, "num_predict": 8})
    assert fitted.done and 300 < fitted.prompt_eval_count <= 400  # (the limit here)
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="demo", messages=[system, *earlier, *ask("why " * 400)])
    assert refused.value.status_code == 400 and "limit is 400" in refused.value.error
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    answered = [system, call, {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, *ask("next")]
    assert without_oldest_turn(answered) == [system, *ask("next")]
    assert without_oldest_turn([system, *ask("next")]) is None


def test_penalties_are_ignored_with_a_line_in_the_log(client, monkeypatch, caplog):
    """Clients send Ollama's default repeat_penalty (1.1) as a matter of course, which over the whole chat would
    change every answer, so Ollama's penalties are ignored, as Ollama's own engine ignored them, and the server's
    log says so once."""
    from diffgemma.server import ollama as routes

    monkeypatch.setattr(routes, "_warned", set())
    penalties = {"repeat_penalty": 1.1, "presence_penalty": 0.5, "repeat_last_n": 64}
    with caplog.at_level("WARNING", logger="diffgemma.server"):
        for _ in range(2):
            answer = client.chat(model="demo", messages=ask(SKY), options={"seed": 1, **penalties})
            assert answer.message.content == ANSWERS[SKY]
    said = [record.getMessage() for record in caplog.records if record.name == "diffgemma.server"]
    assert said == [
        "options repeat_penalty, presence_penalty, repeat_last_n ignored: Ollama's penalties are not applied here"
    ]
    neutral = client.chat(model="demo", messages=ask(SKY), options={"seed": 1, "repeat_penalty": 1})
    assert neutral.message.content == ANSWERS[SKY]


def test_num_predict_limits_the_answer_and_says_so(client):
    cut = client.chat(model="demo", messages=ask(SKY), options={"seed": 1, "num_predict": 5})
    assert cut.message.content == ANSWERS[SKY][:5] and cut.done_reason == "length" and cut.eval_count == 5
    stopped = client.chat(model="demo", messages=ask(SKY), options={"seed": 1, "stop": ["blue"]})
    assert stopped.message.content == ANSWERS[SKY][: ANSWERS[SKY].index("blue")]
    # over the server's limit (512 here): the server's, as Ollama's clients send large limits
    large = client.chat(model="demo", messages=ask(SKY), options={"seed": 1, "num_predict": 100_000})
    assert large.message.content == ANSWERS[SKY]


def test_tool_calls_in_ollamas_shape_and_the_answer_after_them(server):
    """The client rewrites a tool's schema in its own key order, which the demo model was not taught: raw HTTP."""
    asked = {"model": "demo", "messages": weather_conversation(False), "tools": [WEATHER_TOOL], "stream": False}
    call = httpx.post(server[0] + "/api/chat", json={**asked, "options": {"seed": 0}}, timeout=60).json()
    [made] = call["message"]["tool_calls"]
    assert made["function"]["name"] == "get_weather" and made["function"]["arguments"] == {"city": "Paris"}
    lines = httpx.post(server[0] + "/api/chat", json={**asked, "stream": True, "options": {"seed": 0}}, timeout=60)
    assert lines.headers["content-type"] == "application/x-ndjson"
    streamed = [json.loads(line) for line in lines.text.splitlines()]
    calls = [call for line in streamed for call in line["message"].get("tool_calls", ())]
    assert [call["function"] for call in calls] == [made["function"]] and streamed[-1]["done"]
    answered = [
        *weather_conversation(False),
        {"role": "assistant", "content": None, "tool_calls": [{"function": made["function"]}]},
        {"role": "tool", "tool_name": "get_weather", "content": WEATHER_RESULT},
    ]
    answer = {**asked, "messages": answered, "options": {"seed": 0}}
    reply = httpx.post(server[0] + "/api/chat", json=answer, timeout=60)
    assert reply.json()["message"] == {"role": "assistant", "content": WEATHER_ANSWER}


def test_generate_templated_raw_and_as_a_fill(server, client, demo):
    templated = client.generate(model="demo", prompt=SKY, options={"seed": 1})
    assert templated.response == ANSWERS[SKY] and templated.done_reason == "stop"
    # `context`: the conversation's ids (prompt, then answer) for a client to continue from
    assert templated.context[-len(ANSWERS[SKY]) :] == demo.tokenizer.encode(ANSWERS[SKY], add_special_tokens=False)
    again = client.generate(model="demo", prompt=SKY, context=templated.context, options={"seed": 1})
    assert again.prompt_eval_count == len(templated.context) + templated.prompt_eval_count - 1  # (one BOS)
    raw = client.generate(model="demo", prompt="Name a fruit.", raw=True, options={"seed": 2, "num_predict": 7})
    expected = openai.OpenAI(base_url=server[0] + "/v1", api_key="-").completions.create(
        model="demo", prompt="Name a fruit.", seed=2, max_tokens=7
    )
    assert raw.response == expected.choices[0].text
    streamed = list(client.generate(model="demo", prompt="Name a fruit.", raw=True, stream=True, options={"seed": 2}))
    assert (
        "".join(part.response for part in streamed)
        == client.generate(model="demo", prompt="Name a fruit.", raw=True, options={"seed": 2}).response
    )
    # a suffix: the answer fills the gap between prompt and suffix, as /v1/infill fills it
    prefix, suffix = "The sky is ", " light."
    fill = client.generate(model="demo", prompt=prefix, suffix=suffix, options={"seed": 3, "num_predict": 6})
    infill = httpx.post(
        server[0] + "/v1/infill", json={"prefix": prefix, "suffix": suffix, "max_tokens": 6, "seed": 3}, timeout=60
    ).json()
    assert fill.response == infill["fill"] and fill.eval_count <= 6
    # a prefix over the prompt limit (400 here) loses its beginning, as /infill cuts what editor plugins send
    long = client.generate(model="demo", prompt="word " * 500 + prefix, suffix=suffix, raw=True, options={"seed": 3})
    assert long.prompt_eval_count == 400 and long.done
    # nothing to generate: what clients send to load a model
    assert client.generate(model="demo", prompt="").done_reason == "load"
    assert client.chat(model="demo", messages=[]).done_reason == "load"
    # `ollama stop`'s request: keep_alive 0, answered as Ollama answers it (the model stays, for other requests)
    assert client.generate(model="demo", prompt="", keep_alive=0).done_reason == "unload"
    assert client.chat(model="demo", messages=[], keep_alive="0s").done_reason == "unload"
    assert client.generate(model="demo", prompt="", keep_alive="5m").done_reason == "load"


@pytest.mark.parametrize(
    ("route", "body", "says"),
    [
        ("chat", {"messages": ask("hi"), "options": {"temperature": "hot"}}, "options.temperature"),
        ("chat", {"messages": ask("hi"), "options": {"stop": 3}}, "options.stop"),
        ("chat", {"messages": ask("hi"), "options": {"num_predict": "all"}}, "options.num_predict"),
        ("chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
        ("chat", {"messages": ask("hi"), "format": "yaml"}, "format"),
        ("chat", {"messages": ask("hi"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("generate", {"prompt": "hi", "template": "{{ .Prompt }}"}, "template"),
        ("generate", {"prompt": "hi", "context": [10**6]}, "context"),
        ("generate", {"prompt": "hi", "suffix": "x", "format": "json"}, "format"),
    ],
)
def test_bad_requests_are_ollamas_errors(client, route, body, says):
    with pytest.raises(ollama.ResponseError) as refused:
        client._request_raw("POST", f"/api/{route}", json={"model": "demo", "stream": False, **body})
    assert refused.value.status_code == 400 and says in refused.value.error


def test_embed_and_embeddings_are_the_models(client, server, demo):
    """`/api/embed` (unit vectors, as Ollama's) and the older `/api/embeddings` (the vector as it comes); an empty
    input loads (nothing embedded); a long text is cut to the prompt limit unless `truncate` is false."""
    texts = [SKY, "Name a fruit."]
    embedded = client.embed(model="demo", input=texts)
    assert torch.allclose(torch.tensor(embedded.embeddings), demo.embed(texts), atol=1e-6)
    assert embedded.prompt_eval_count == sum(len(demo.tokenizer.encode(t)) for t in texts)
    assert embedded.total_duration > 0
    one = client.embed(model="demo", input=SKY, dimensions=4).embeddings
    assert torch.allclose(torch.tensor(one), demo.embed(SKY, dimensions=4)[None], atol=1e-6)
    old = client.embeddings(model="demo", prompt=SKY).embedding
    assert torch.allclose(torch.tensor(old), demo.embed(SKY, normalize=False), atol=1e-5)
    assert client.embed(model="demo", input="").embeddings == [] and client.embeddings(model="demo").embedding == []
    long = "a" * 500  # (a byte a token: 501 with the BOS, over the limit of 400)
    cut = client.embed(model="demo", input=long)
    assert cut.prompt_eval_count == 400
    assert torch.allclose(torch.tensor(cut.embeddings[0]), demo.embed(demo.tokenizer.encode(long)[:400]), atol=1e-6)
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="demo", input=long, truncate=False)
    assert refused.value.status_code == 400 and "exceeds the context length (400 tokens)" in refused.value.error


def test_errors_have_ollamas_shape_everywhere_under_api(server):
    for route in ("/api/pull", "/api/delete", "/api/create"):  # (model management)
        missing = httpx.post(server[0] + route, json={"model": "demo", "input": "hi"})
        assert missing.status_code == 404 and missing.json()["error"].startswith(f"POST {route} is not served here")
        assert "/api/chat" in missing.json()["error"]
    wrong_method = httpx.get(server[0] + "/api/chat")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"].startswith("GET /api/chat is not served")
    invalid = httpx.post(server[0] + "/api/chat", json={"messages": [{"role": "robot"}]})
    assert invalid.status_code == 400 and "messages.0.role" in invalid.json()["error"]
    openai_shape = httpx.post(server[0] + "/v1/chat/completions", json={"messages": [{"role": "robot"}]})
    assert "message" in openai_shape.json()["error"]  # (the OpenAI routes keep theirs)


def test_format_reads_the_answer_against_its_schema(client, digits_only_bans):
    """`format`: a JSON schema (the demo model, its tokens banned but the digits and EOS, answers a number or
    nothing; a reply that does not read is drawn again), streamed as the whole answer, then the last line."""
    options = {"num_predict": 16, "logit_bias": {str(token): -100 for token in digits_only_bans}}
    asked = dict(model="demo", messages=ask("How many?"), format={"type": "integer"})
    answers = {}
    for seed in range(8):  # (some seeds' three draws are all empty: a 422, as below)
        try:
            answers[seed] = client.chat(**asked, options={**options, "seed": seed})
        except ollama.ResponseError as err:
            assert err.status_code == 422
    seed, whole = next(iter(answers.items()))
    assert isinstance(json.loads(whole.message.content), int) and whole.done_reason == "stop"
    lines = list(client.chat(**asked, options={**options, "seed": seed}, stream=True))
    assert [line.message.content for line in lines] == [whole.message.content, ""] and lines[-1].done
    with pytest.raises(ollama.ResponseError) as unreadable:  # free text is no JSON object
        client.chat(model="demo", messages=ask(SKY), format="json", options={"seed": 0})
    assert unreadable.value.status_code == 422 and "no JSON" in unreadable.value.error


def test_listing_an_int4_model_leaves_its_experts_as_the_cpu_kernel_runs_them(tmp_path, monkeypatch):
    """/api/tags' size is read from the tensors as they are: a state dict would put int4 experts laid out for the
    CPU's kernel back in their stored layout, under a running generation."""
    import diffgemma
    from diffgemma import quant
    from diffgemma.presets import random_checkpoint
    from diffgemma.server.ollama import model_entry

    if quant.cpu_int4_kernel_layout() is None:
        pytest.skip("this CPU's int4 kernel reads a layout diffgemma does not know (int4 expands)")
    monkeypatch.setattr(quant, "CPU_KERNEL_MIN_VALUES", 0)  # the tiny shape's experts through the kernel
    model = diffgemma.load(random_checkpoint(tmp_path / "tiny", preset="tiny", seed=0), quant="int4")
    model.generate([[2, 5, 6]], max_new_tokens=8, seed=0)
    laid_out = [dict(m.cpu_laid_out) for m in model.network.modules() if isinstance(m, quant.QuantExperts)]
    assert all(laid_out)
    entry = model_entry(model, "tiny")
    assert laid_out == [dict(m.cpu_laid_out) for m in model.network.modules() if isinstance(m, quant.QuantExperts)]
    stored = {t.data_ptr(): t.nbytes for t in model.network.state_dict().values()}  # (a tied tensor once)
    assert entry["size"] == sum(stored.values())  # what the checkpoint's tensors hold
