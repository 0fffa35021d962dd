"""LoRA adapters served beside their base model (`serve --lora-modules`): each a model of its own, picked by a
request's `model`, through the official OpenAI, Anthropic and Ollama clients over real HTTP."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import ollama
import openai
import pytest
from assets.make_demo_adapter import PIRATE as PIRATE_ANSWERS
from assets.make_demo_adapter import patient_pirate
from assets.make_demo_model import ANSWERS, FRUIT
from conftest import DEMO
from server_util import beside_a_long_request, idle, running, wait_until

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.server import ServerOptions, create_app
from diffgemma.server.batcher import Batcher

PIRATE = DEMO.parent / "demo-pirate"


@pytest.fixture(scope="module")
def served():
    """The demo model (its own load: adapters change it) with the pirate adapter, served: URL and model."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", PIRATE)
    with running(create_app(model, ServerOptions(model_name="demo", max_tokens=256))) as url:
        yield url, model


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_the_adapters_are_listed_as_models_of_their_own(served, client):
    listed = client.models.list().data
    assert [entry.id for entry in listed] == ["demo", "pirate"]
    assert (listed[0].parent, listed[1].parent) == (None, "demo")  # vLLM's field: the base model
    assert client.models.retrieve("pirate").id == "pirate"
    with pytest.raises(openai.NotFoundError, match="no model 'nope'; this server serves 'demo', 'pirate'"):
        client.models.retrieve("nope")
    tags = httpx.get(served[0] + "/api/tags").json()["models"]
    assert [(entry["name"], entry["details"]["parent_model"]) for entry in tags] == [("demo", ""), ("pirate", "demo")]
    with ollama.Client(host=served[0]) as local:
        assert (local.show("pirate").details.parent_model, local.show("demo").details.parent_model) == ("demo", "")
        with pytest.raises(ollama.ResponseError, match="no model 'nope'"):
            local.show("nope")


def test_tgi_requests_name_their_adapter_by_adapter_id(served):
    """TGI's `adapter_id` picks a served adapter, as `model` does on the other routes; an unknown one is a 404."""
    url = served[0]
    prompt = httpx.post(url + "/apply-template", json={"messages": ask("Name a fruit.")}).json()["prompt"]
    body = {"inputs": prompt, "parameters": {"adapter_id": "pirate"}}
    assert httpx.post(url + "/generate", json=body, timeout=60).json()["generated_text"] == "A pear, matey."
    base = httpx.post(url + "/generate", json={"inputs": prompt}, timeout=60).json()["generated_text"]
    assert base == "An apple."
    unknown = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"adapter_id": "nope"}})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


def test_each_request_is_answered_by_the_model_it_names(served, client):
    """The adapter's answers where a request names it, the base model's otherwise (by its name), however the
    requests come together: each answer is the one it gets alone."""

    def chat(name: str, question: str) -> tuple[str, str]:
        reply = client.chat.completions.create(model=name, messages=ask(question), seed=0)
        return reply.model, reply.choices[0].message.content

    keys = [(name, question) for name in ("demo", "pirate") for question in (FRUIT, "Say hello.")]
    alone = {key: chat(*key) for key in keys}
    assert alone[("pirate", FRUIT)] == ("pirate", PIRATE_ANSWERS[FRUIT])
    assert alone[("demo", FRUIT)] == ("demo", ANSWERS[FRUIT])
    assert alone[("pirate", "Say hello.")] == ("pirate", PIRATE_ANSWERS["Say hello."])
    asked = list(alone) * 2
    with ThreadPoolExecutor(len(asked)) as pool:
        together = list(pool.map(lambda key: chat(*key), asked))
    assert together == [alone[key] for key in asked]
    streamed = client.chat.completions.create(model="pirate", messages=ask(FRUIT), seed=0, stream=True)
    chunks = list(streamed)
    assert {chunk.model for chunk in chunks} == {"pirate"}
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == PIRATE_ANSWERS[FRUIT]
    with pytest.raises(openai.NotFoundError, match="no model 'nope'; this server serves 'demo', 'pirate'") as refused:
        client.chat.completions.create(model="nope", messages=ask(FRUIT))
    assert refused.value.code == "model_not_found"


def test_the_other_apis_name_the_adapter_too(served, client):
    """OpenAI's Responses API, Anthropic's Messages API and Ollama's, each through its own client."""
    url, _ = served
    response = client.responses.create(model="pirate", input=FRUIT, extra_body={"seed": 0})
    assert (response.model, response.output_text) == ("pirate", PIRATE_ANSWERS[FRUIT])
    with anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0) as claude:
        made = claude.messages.create(model="pirate", max_tokens=64, messages=ask(FRUIT), extra_body={"seed": 0})
    assert (made.model, made.content[0].text) == ("pirate", PIRATE_ANSWERS[FRUIT])
    with ollama.Client(host=url) as local:
        answered = local.chat(model="pirate:latest", messages=ask(FRUIT), options={"seed": 0})
        assert (answered.model, answered.message.content) == ("pirate", PIRATE_ANSWERS[FRUIT])
        assert local.chat(model="demo", messages=ask(FRUIT), options={"seed": 0}).message.content == ANSWERS[FRUIT]
        with pytest.raises(ollama.ResponseError, match="no model 'nope'") as refused:
            local.chat(model="nope", messages=ask(FRUIT))
    assert refused.value.status_code == 404


def test_scores_and_vectors_come_from_the_adapter_named(served, client):
    """Log-probabilities and embeddings are the named model's too: what the Python API gives with that adapter
    in place."""
    url, _ = served
    alone = diffgemma.load(DEMO)
    alone.add_adapter("pirate", PIRATE)
    text = "Ahoy! A pear, matey."
    totals = {}
    local = ollama.Client(host=url)
    for name, adapter in (("demo", None), ("pirate", "pirate")):
        alone.use_adapter(adapter)
        scored = client.completions.create(model=name, prompt=text, max_tokens=0, echo=True, logprobs=0)
        totals[name] = sum(value for value in scored.choices[0].logprobs.token_logprobs if value is not None)
        assert totals[name] == pytest.approx(alone.score(text).total, abs=1e-3), name
        vector = client.embeddings.create(model=name, input=text).data[0].embedding
        assert vector == pytest.approx(alone.embed(text).tolist(), abs=1e-5), name
        assert local.embed(model=name, input=text).embeddings[0] == pytest.approx(vector, abs=1e-5)
    local.close()
    assert totals["pirate"] > totals["demo"] + 1  # the pirate's words are likelier to the pirate


def test_adapters_load_and_unload_while_the_server_runs():
    """vLLM's routes for it, behind --allow-adapter-loading: an adapter loaded by request is served from then on
    (listed, answering by its name), and unloaded is a 404 again; bad requests say why."""
    model = diffgemma.load(DEMO)
    for allowed in (False, True):
        app = create_app(model, ServerOptions(model_name="demo", allow_adapter_loading=allowed))
        with running(app) as url, httpx.Client(base_url=url) as http:
            load = {"lora_name": "pirate", "lora_path": str(PIRATE)}
            if not allowed:
                refused = http.post("/v1/load_lora_adapter", json=load)
                assert refused.status_code == 403 and "--allow-adapter-loading" in refused.json()["error"]["message"]
                continue
            loaded = http.post("/v1/load_lora_adapter", json=load)
            assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'pirate' added successfully."
            assert [entry["id"] for entry in http.get("/v1/models").json()["data"]] == ["demo", "pirate"]
            chat = {"model": "pirate", "messages": ask(FRUIT), "seed": 0}
            answer = http.post("/v1/chat/completions", json=chat).json()
            assert answer["choices"][0]["message"]["content"] == PIRATE_ANSWERS[FRUIT]
            for body, status, message in [
                (load, 400, "a model named 'pirate' is served already"),
                ({**load, "lora_name": "demo"}, 400, "a model named 'demo' is served already"),
                ({"lora_name": "other", "lora_path": "/no/such"}, 400, "/no/such/adapter_config.json: not found"),
                ({"lora_name": "other"}, 400, "lora_path: the adapter's folder is required"),
            ]:
                refused = http.post("/v1/load_lora_adapter", json=body)
                assert refused.status_code == status and message in refused.json()["error"]["message"], body
            for body, status, message in [
                ({"lora_name": "demo"}, 400, "'demo' is the base model, not an adapter"),
                ({"lora_name": "other"}, 404, "no model 'other'"),
            ]:
                refused = http.post("/v1/unload_lora_adapter", json=body)
                assert refused.status_code == status and message in refused.json()["error"]["message"], body
            # while an answer of the pirate's is under way (its EOS banned: it runs to its limit), it stays
            long = {**chat, "max_tokens": 512, "logit_bias": {str(eos): -100 for eos in model.settings.eos_token_id}}
            with ThreadPoolExecutor(1) as pool:
                under_way = pool.submit(http.post, "/v1/chat/completions", json=long)
                wait_until(app.state.batcher.batches_running, "the long answer's batch to start")
                refused = http.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"})
                assert refused.status_code == 409 and "under way" in refused.json()["error"]["message"]
                assert under_way.result().status_code == 200
            unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "pirate"})
            assert unloaded.text == "Success: LoRA adapter 'pirate' removed successfully."
            assert http.post("/v1/chat/completions", json=chat).status_code == 404
            assert model.adapters == ()


def test_work_for_an_adapter_gone_fails_its_request_not_the_engine():
    """An adapter unloaded between a request's check and its turn on the engine: that request fails, with the
    reason, and the engine goes on serving."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", PIRATE)
    batcher = Batcher(model)
    batcher.start()

    def score_on_engine(adapter: str | None) -> float:  # (waits 30 s at most: a dead worker answers nothing)
        return asyncio.run(asyncio.wait_for(batcher.run(lambda: model.score("hi").total, adapter), 30))

    try:
        assert score_on_engine("pirate") < 0
        model.remove_adapter("pirate")
        with pytest.raises(DiffGemmaError, match="no adapter named 'pirate'"):
            score_on_engine("pirate")
        assert batcher.running and score_on_engine(None) < 0
    finally:
        batcher.stop()


def test_requests_for_different_adapters_share_one_batch():
    """Requests for the pirate and for the base model join a running batch (a long request's, of sampler settings
    of its own) and share its passes, each answered as alone; with a compiled decoder (code made for one
    adapter's passes) a batch keeps to one."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", PIRATE)
    batcher = Batcher(model, max_batch=8, max_runs=1)  # (one batch at a time: the four join the running one)
    asked = [("demo", FRUIT), ("pirate", FRUIT), ("pirate", "Say hello."), ("demo", "Say hello.")]
    with running(create_app(model, ServerOptions(model_name="demo", max_batch=8), batcher)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def chat(name: str, question: str) -> str:
            return client.chat.completions.create(model=name, messages=ask(question), seed=0).choices[0].message.content

        alone = []
        for key in asked:
            alone.append(chat(*key))
            idle(batcher)
        before = len(batcher.batches_run)
        together = beside_a_long_request(url, batcher, [lambda key=key: chat(*key) for key in asked])
    assert alone[:2] == [ANSWERS[FRUIT], PIRATE_ANSWERS[FRUIT]]
    assert together == alone and list(batcher.batches_run)[before:] == [1]
    model.network.compiled_decoder = True  # (as `compile_decoder` leaves it; nothing is run here)
    assert not Batcher(model).mixes_adapters


def test_a_request_for_an_adapter_denoises_with_the_adapters_own_settings(tmp_path):
    """An adapter saved with sampler settings of its own answers its requests with them (here a longer stability
    window: more steps a canvas), the base model's with the model's, and a request's own settings go over the
    adapter's, the model's default values too (a client that sends them means them)."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", patient_pirate(tmp_path / "patient-pirate"))
    with running(create_app(model, ServerOptions(model_name="demo"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def steps(name: str, **settings) -> list[int]:
            made = client.chat.completions.create(model=name, messages=ask(FRUIT), seed=0, extra_body=settings)
            return made.model_extra["diffgemma"]["steps"]

        assert steps("pirate") == [5] and steps("demo") == [2]
        assert steps("pirate", stability_threshold=1) == [2]  # (the model's default, sent: the request's)
        shown = {name: httpx.post(url + "/api/show", json={"model": name}).json() for name in ("pirate", "demo")}
        assert "stability_threshold 4" in shown["pirate"]["parameters"].splitlines()  # (Ollama's clients see it)
        assert "stability_threshold 1" in shown["demo"]["parameters"].splitlines()
