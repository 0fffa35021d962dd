"""Images: the processor against Gemma 4's (Pillow backend), the vision tower against the reference's image
features, and generation from a prompt with images against the reference's `generate` given pixel values."""

import json

import numpy as np
import pytest
import torch
from reference import load_reference, make_reference_checkpoint

import diffgemma
from diffgemma.errors import DiffGemmaError
from diffgemma.images import prepare_image

PIL = pytest.importorskip("PIL.Image")
IMAGE_IDS = {"image_token_id": 262, "boi_token_id": 260, "eoi_token_id": 261}
# Patches of 4 pixels pooled 3 x 3, two layers, grouped KV heads, standardized and clipped projections.
VISION = {
    "num_hidden_layers": 2,
    "position_embedding_size": 256,
    "num_key_value_heads": 1,
    "standardize": True,
    "use_clipped_linears": True,
}


def vision_checkpoint_in(folder, **overrides):
    """A random reference checkpoint with a vision tower, its image ids inside the vocabulary, and a processor
    config that sets the soft-token budget to 70 (as the reference processor of these tests has it)."""
    make_reference_checkpoint(
        folder, "A", scale=0.5, vision=VISION, top=IMAGE_IDS, prepare=randomize_vision_buffers, **overrides
    )
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 70}}))
    return folder


def randomize_vision_buffers(model) -> None:
    """The clip bounds and standardization are buffers a random init leaves at no-ops: make them bite."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                buffer.fill_(-1.5)
            elif name.endswith(("input_max", "output_max")):
                buffer.fill_(1.5)
            elif name.endswith("std_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
            elif name.endswith("std_scale"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    return vision_checkpoint_in(tmp_path_factory.mktemp("vision") / "A", seed=5)


def random_picture(width: int, height: int, seed: int, mode: str = "RGB"):
    shape = (height, width, len(mode)) if len(mode) > 1 else (height, width)
    return PIL.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def reference_processor(budget: int = 70):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=budget, pooling_kernel_size=3)


SIZES = [((100, 60), "RGB"), ((37, 211), "RGBA"), ((300, 9), "RGB"), ((24, 24), "L")]


@pytest.mark.parametrize(("size", "mode"), SIZES)
def test_patches_equal_the_reference_processor(vision_checkpoint, size, mode):
    model = diffgemma.load(vision_checkpoint)
    picture = random_picture(*size, seed=sum(size), mode=mode)
    assert model.image_soft_tokens == 70  # the checkpoint's processor config
    ours = prepare_image(picture, model.config.vision, budget=70)
    theirs = reference_processor()(picture, return_tensors="pt")
    assert ours.soft_tokens == theirs["num_soft_tokens_per_image"][0]
    real = (theirs["image_position_ids"][0] >= 0).all(-1)
    torch.testing.assert_close(ours.patches, theirs["pixel_values"][0][real].float(), atol=1e-6, rtol=0)
    positions = theirs["image_position_ids"][0][real]
    assert positions[:, 0].max() + 1 == ours.columns and positions[:, 1].max() + 1 == ours.rows


def test_image_features_equal_the_reference(vision_checkpoint):
    model = diffgemma.load(vision_checkpoint)
    reference = load_reference(vision_checkpoint)
    picture = random_picture(90, 57, seed=3)
    theirs = reference_processor()(picture, return_tensors="pt")
    with torch.no_grad():
        expected = reference.model.encoder.get_image_features(
            theirs["pixel_values"], theirs["image_position_ids"]
        ).pooler_output
    prepared = prepare_image(picture, model.config.vision, budget=70)
    features = model.vision(prepared.patches, prepared.rows, prepared.columns)
    assert features.shape == expected.shape == (prepared.soft_tokens, model.config.hidden_size)
    torch.testing.assert_close(features, expected, atol=2e-5, rtol=2e-5)


def test_bad_images_are_named(vision_checkpoint, tmp_path):
    model = diffgemma.load(vision_checkpoint)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    for image, words in [
        (tmp_path / "missing.png", "not found"),
        (text, "not an image"),
        ("https://example.com/cat.png", "not fetched"),
        ("data:image/png;base64,@@@", "does not decode"),
        (42, "must be a file path"),
        (b"\x89PNG\r\n\x1a\n" + b"0" * 50, "not an image"),
        (PIL.new("RGB", (1, 5000)), "too long and thin"),
    ]:
        with pytest.raises(DiffGemmaError, match=words):
            prepare_image(image, model.config.vision)
    for images in (text, float("nan"), 3, torch.tensor([1, 2])):  # (a picture, not a list of them)
        with pytest.raises(DiffGemmaError, match="images must be a list of pictures"):
            model.generate([2, 5], images=images, max_new_tokens=4)


@pytest.fixture(scope="module")
def vision_pairs(tmp_path_factory):
    """(ours, reference) on checkpoints whose encoder sees images both ways ("vision") and causally (None)."""
    pairs = {}
    for bidirectional in ("vision", None):
        folder = tmp_path_factory.mktemp("vision-generation") / str(bidirectional)
        vision_checkpoint_in(folder, seed=11, use_bidirectional_attention=bidirectional)
        pairs[bidirectional] = (diffgemma.load(folder), load_reference(folder))
    return pairs


def reference_inputs(rows: list[list[int]], pictures: list[list], pad: int = 0) -> dict:
    """What Gemma 4's processor hands the reference for prompt ids with one image id per picture."""
    processor = reference_processor()
    expanded = []
    for row, row_pictures in zip(rows, pictures, strict=True):
        out = []
        counts = iter(processor(p, return_tensors="pt")["num_soft_tokens_per_image"][0] for p in row_pictures)
        for token in row:
            out += [260, *[262] * next(counts), 261] if token == 262 else [token]
        expanded.append(out)
    longest = max(map(len, expanded))
    ids = torch.tensor([[pad] * (longest - len(row)) + row for row in expanded])
    mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in expanded])
    flat = [p for row in pictures for p in row]
    processed = processor(flat, return_tensors="pt")
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": processed["pixel_values"],
        "image_position_ids": processed["image_position_ids"],
        "mm_token_type_ids": (ids == 262).long(),
    }


@pytest.mark.parametrize("bidirectional", ["vision", None])
@pytest.mark.parametrize("seed", [0, 1])
def test_generation_with_an_image_equals_the_reference(vision_pairs, bidirectional, seed):
    ours, reference = vision_pairs[bidirectional]
    picture = random_picture(70, 50, seed=seed)  # 30 soft tokens: more than the sliding window of 8
    prompt = [2, 40, 41, 262, 42, 43, 44]
    inputs = reference_inputs([prompt], [[picture]])
    settings = {"max_new_tokens": 2 * ours.config.canvas_length}
    torch.manual_seed(seed)
    expected = reference.generate(**inputs, **settings)
    torch.manual_seed(seed)
    got = ours.generate(prompt, images=[picture], mode="reference", **settings)
    assert torch.equal(got.sequences, expected.sequences)
    torch.manual_seed(seed)
    with pytest.warns(UserWarning, match="image ids but no images"):  # the same ids, no picture: another answer
        blind = ours.generate(prompt, mode="reference", **settings)
    assert not torch.equal(blind.sequences[:, len(prompt) :], got.sequences[:, inputs["input_ids"].shape[1] :])


def test_a_batch_with_images_equals_the_reference(vision_pairs):
    ours, reference = vision_pairs["vision"]
    pictures = [[random_picture(40, 40, seed=3), random_picture(25, 90, seed=4)], [random_picture(60, 36, seed=5)]]
    prompts = [[2, 262, 50, 51, 262, 52], [2, 53, 262, 54]]
    inputs = reference_inputs(prompts, pictures)
    torch.manual_seed(4)
    expected = reference.generate(**inputs, max_new_tokens=ours.config.canvas_length)
    torch.manual_seed(4)
    got = ours.generate(prompts, images=pictures, mode="reference", max_new_tokens=ours.config.canvas_length)
    assert torch.equal(got.sequences, expected.sequences)


def test_an_image_is_never_cut_between_prompt_chunks(vision_pairs, monkeypatch):
    from diffgemma import model as network_module

    ours, _ = vision_pairs["vision"]
    pictures = [random_picture(70, 50, seed=6), random_picture(40, 40, seed=7)]
    prompt = [2, *range(30, 45), 262, *range(45, 50), 262, 60, 61]
    whole = ours.generate(prompt, images=pictures, seed=3, max_new_tokens=ours.config.canvas_length)
    monkeypatch.setattr(network_module, "PREFILL_CHUNK", 12)  # both images' runs are longer than a chunk
    chunked = ours.generate(prompt, images=pictures, seed=3, max_new_tokens=ours.config.canvas_length)
    assert chunked.sequences.tolist() == whole.sequences.tolist()


def test_images_seen_both_ways_change_the_answer(vision_pairs):
    """The two checkpoints differ only in `use_bidirectional_attention`: the parity above is not vacuous."""
    picture = random_picture(70, 50, seed=0)
    answers = [
        vision_pairs[kind][0].generate([2, 40, 262, 41], images=[picture], seed=0, max_new_tokens=16).sequences
        for kind in ("vision", None)
    ]
    assert not torch.equal(*answers)


def test_rows_with_images_join_an_open_batch_as_alone(vision_pairs):
    """A row with a picture starts a batch, another joins it after a canvas: each gives what it gives alone."""
    from diffgemma.generate import run_to_end
    from diffgemma.open_batch import BatchRow, RowFinished, RowsCommitted

    ours = vision_pairs["vision"][0]
    length = ours.config.canvas_length
    two = [random_picture(30, 60, seed=9), random_picture(48, 48, seed=2)]
    asked = [
        ([2, 262, 50, 262, 51, 52], two, 3 * length, 1),
        ([2, 40, 262, 41], [random_picture(36, 36, seed=8)], 2 * length, 2),
    ]
    rows = []
    for prompt, pictures, limit, seed in asked:
        ids, prepared = ours.image_prompt(prompt, pictures)
        rows.append(BatchRow(ids, limit, seed, images=ours.image_features(prepared)))
    batch = ours.open_batch()
    batch.add(rows[0])
    finished, commits = {}, 0
    for event in batch.events():
        if isinstance(event, RowsCommitted):
            commits += 1
            if commits == 1:
                batch.add(rows[1])
        elif isinstance(event, RowFinished):
            finished[event.row] = event
    for index, (prompt, pictures, limit, seed) in enumerate(asked):
        result = run_to_end(ours.stream([prompt], [limit], [seed], images=[pictures], commit_stable_prefix=True))
        assert finished[index].new_tokens == result.new_tokens[0], index
    with pytest.raises(DiffGemmaError, match="image ids"):
        batch.add(BatchRow([2, 40, 41], length, 3, images=rows[0].images))


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    """A random `tiny-vision` checkpoint served over HTTP: its URL and the model."""
    from server_util import running

    from diffgemma.presets import random_checkpoint
    from diffgemma.server import ServerOptions, create_app

    model = diffgemma.load(random_checkpoint(tmp_path_factory.mktemp("served") / "tiny-vision", "tiny-vision", seed=4))
    with running(create_app(model, ServerOptions(model_name="seer", max_tokens=24))) as url:
        yield url, model


def png_base64(picture) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_every_api_takes_images_and_reads_them_alike(vision_server, monkeypatch):
    """OpenAI's chat (an image_url part), the Responses API (input_image), Anthropic's Messages (a base64 image
    block) and Ollama's chat (`images`) put the same picture in the same prompt, so the same seed gives the same
    answer; another picture gives another, and the usage counts the picture's soft tokens."""
    import anthropic
    import ollama
    import openai

    url, model = vision_server
    picture, other = random_picture(64, 40, seed=1), random_picture(40, 64, seed=2)
    data = png_base64(picture)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    question = {"type": "text", "text": "What is in the picture?"}

    def openai_chat(encoded: str):
        part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
        messages = [{"role": "user", "content": [part, question]}]
        return client.chat.completions.create(model="seer", messages=messages, seed=3, max_tokens=24, logprobs=True)

    scoring, score = [], model.score
    monkeypatch.setattr(model, "score", lambda *args: scoring.append(args[2]) or score(*args))
    answer = openai_chat(data)
    text = answer.choices[0].message.content
    assert len(scoring) == 1 and len(scoring[0][0]) == 1  # the answer's logprobs read the picture's soft tokens
    scored = [entry.logprob for entry in answer.choices[0].logprobs.content]  # (scored with the picture's soft tokens)
    assert len(scored) == answer.usage.completion_tokens and all(value <= 0 for value in scored)
    assert answer.usage.prompt_tokens > len(model.tokenizer.encode_chat([{"role": "user", "content": "x"}])) + 10
    assert openai_chat(png_base64(other)).choices[0].message.content != text
    image = {"type": "input_image", "image_url": f"data:image/png;base64,{data}"}
    content = [image, {"type": "input_text", "text": question["text"]}]
    response = client.responses.create(
        model="seer", input=[{"role": "user", "content": content}], max_output_tokens=24, extra_body={"seed": 3}
    )
    assert response.output_text == text
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    said = claude.messages.create(
        model="seer", max_tokens=24, messages=[{"role": "user", "content": [block, question]}], extra_body={"seed": 3}
    )
    assert said.content[0].text == text
    chatted = ollama.Client(host=url).chat(
        model="seer",
        messages=[{"role": "user", "content": question["text"], "images": [data]}],
        options={"seed": 3, "num_predict": 24},
    )
    assert chatted.message.content == text
    generated = ollama.Client(host=url).generate(
        model="seer", prompt=question["text"], images=[data], options={"seed": 3, "num_predict": 24}
    )
    assert generated.response == text
    assert "vision" in ollama.Client(host=url).show("seer").capabilities  # (what Open WebUI asks before uploads)


def test_bad_images_are_the_requests_errors(vision_server):
    import openai

    url, _ = vision_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for image_url, says in [
        ("https://example.com/cat.png", "data: URL"),
        ("/etc/hostname", "reads no files"),  # (a client names no file on the server's disk)
        ("data:image/png;base64,bm90IGFuIGltYWdl", "not an image"),
    ]:
        part = {"type": "image_url", "image_url": {"url": image_url}}
        with pytest.raises(openai.BadRequestError, match=says) as refused:
            client.chat.completions.create(model="seer", messages=[{"role": "user", "content": [part]}])
        assert refused.value.param == "messages"


def test_the_command_line_shows_pictures(vision_server, tmp_path, capsys, monkeypatch):
    """`chat --image` shows a picture with the first message, `/image FILE` with the next one; `generate
    --image` fills the prompt's image token; each answer is the API's for the same seed. `info` names the tower."""
    import io

    from diffgemma.cli import main

    _, model = vision_server
    folder = str(model.folder)
    picture, other = tmp_path / "a.png", tmp_path / "b.png"
    random_picture(64, 40, seed=1).save(picture)
    random_picture(40, 64, seed=2).save(other)
    settings = {"seed": 5, "max_new_tokens": 12}

    def said(*argv, stdin: str = "") -> list[str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main([*argv, "--model", folder, "--seed", "5", "--max-new-tokens", "12", "--no-stream"])
        out = capsys.readouterr().out
        assert code == 0, out
        return out.splitlines()

    first = [{"role": "user", "content": [{"type": "image", "image": str(picture)}, {"type": "text", "text": "Hi"}]}]
    expected = model.chat(first, **settings).content
    assert said("chat", "Hi", "--image", str(picture)) == [expected]
    second = [*first, {"role": "assistant", "content": expected}]
    second.append(
        {"role": "user", "content": [{"type": "image", "image": str(other)}, {"type": "text", "text": "And?"}]}
    )
    lines = said("chat", "--image", str(picture), stdin=f"Hi\n/image {other}\nAnd?\n")
    assert lines == [expected, f"(image {other} goes with your next message)", model.chat(second, **settings).content]
    marker = model.tokenizer.decode([model.config.vision.image_token_id], False)
    text = model.generate(f"Look: {marker}", images=[str(picture)], **settings).text
    assert said("generate", f"Look: {marker}", "--image", str(picture)) == [text]
    assert main(["chat", "Hi", "--model", folder, "--image", str(tmp_path / "none.png")]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert main(["info", "--model", folder]) == 0  # (the tower: its parameters, and what they add, loaded)
    tower = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("vision tower"))
    loaded = sum(parameter.numel() for parameter in model.vision.parameters())
    assert f"{loaded / 1e6:.2f}M parameters" in tower
    assert f"add {loaded * 2 / 2**20:.1f} MiB / {loaded * 4 / 2**20:.1f} MiB (bf16 / float32" in tower
    conversations = tmp_path / "talks.jsonl"  # chat --file: image parts in the records, a batch of two
    talks = [first, [{"role": "user", "content": "Hi"}]]
    conversations.write_text("".join(json.dumps({"messages": talk}) + "\n" for talk in talks))
    records = [json.loads(line) for line in said("chat", "--file", str(conversations))]
    alone = [model.chat(talk, seed=5 + index, max_new_tokens=12) for index, talk in enumerate(talks)]
    assert [record["text"] for record in records] == [reply.content for reply in alone]
    # the Python API: a batch of conversations to `generate`, each with the pictures its messages hold
    batch = model.generate(talks, seed=[5, 6], max_new_tokens=12)
    assert batch.new_tokens == [reply.result.new_tokens[0] for reply in alone]


def test_image_ids_without_pictures_are_told(vision_server):
    """As the reference warns: image ids with no pictures are read as text (an Ollama context holding a picture's
    run is refused: the picture cannot be sent again with it)."""
    import ollama

    url, model = vision_server
    image_id = model.config.vision.image_token_id
    with pytest.warns(UserWarning, match="image ids but no images"):
        model.generate([2, image_id, 40], max_new_tokens=4, seed=0)
    with pytest.raises(ollama.ResponseError, match="context holds a picture") as refused:
        ollama.Client(host=url).generate(model="seer", prompt="And?", context=[2, image_id, 40])
    assert refused.value.status_code == 400


def test_training_data_with_images_is_refused(vision_server):
    from diffgemma.train.data import conversation_examples

    _, model = vision_server
    picture = {"type": "image", "image": "cat.png"}
    talk = [
        {"role": "user", "content": [picture, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "A"},
    ]
    with pytest.raises(DiffGemmaError, match="training reads text only"):
        conversation_examples(talk, model.tokenizer, 1)


def test_a_chat_about_a_picture_keeps_it_in_the_prefix_cache(vision_server):
    """A chat's next turn encodes only its new turn, the picture included in what is kept; the same text with
    another picture is another prompt: what was kept with the first picture is not reused for it."""
    _, served = vision_server
    model = diffgemma.load(served.folder)  # (a prefix cache of its own)
    picture = {"type": "image", "image": random_picture(64, 40, seed=1)}
    first = [{"role": "user", "content": [picture, {"type": "text", "text": "Hi"}]}]
    settings = {"seed": 2, "max_new_tokens": 8}
    answer = model.chat(first, **settings)
    second = [*first, {"role": "assistant", "content": answer.content}, {"role": "user", "content": "And?"}]
    again = model.chat(second, **settings)
    soft_tokens = 16 * 10 // 4  # (64 x 40 pixels in 8-pixel patches, pooled 2 x 2)
    assert again.result.cached_tokens > soft_tokens
    fresh = diffgemma.load(served.folder)
    fresh.prefix_cache = None
    assert fresh.chat(second, **settings).result.new_tokens == again.result.new_tokens
    other = {"type": "image", "image": random_picture(64, 40, seed=3)}
    swapped = [{**second[0], "content": [other, {"type": "text", "text": "Hi"}]}, *second[1:]]
    assert model.chat(swapped, **settings).result.cached_tokens == 0  # (a kept prompt is reused whole, or not)


def test_the_tower_runs_once_for_a_picture_seen_again(vision_server, monkeypatch):
    from diffgemma import api

    _, served = vision_server
    model = diffgemma.load(served.folder)
    runs = []
    forward = model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda *args: runs.append(1) or forward(*args))
    pictures = [random_picture(64, 40, seed=seed) for seed in range(4)]
    question = [{"role": "user", "content": [{"type": "image", "image": pictures[0]}, {"type": "text", "text": "Hi"}]}]
    first = model.chat(question, seed=1, max_new_tokens=8)
    assert model.chat(question, seed=1, max_new_tokens=8).result.new_tokens == first.result.new_tokens
    assert len(runs) == 1
    monkeypatch.setattr(api, "IMAGES_REMEMBERED", 2)  # the oldest goes beyond the limit
    placeholder = [model.config.vision.image_token_id]
    for picture in [*pictures[1:], pictures[0]]:
        model.image_features(model.image_prompt(placeholder, [picture])[1])
    assert len(runs) == 5


def test_scores_with_pictures_equal_the_reference_encoder(vision_pairs, monkeypatch):
    """`score` with a prompt's pictures gives the reference encoder's log-probabilities for pixel values (the
    causal checkpoint: the reference's plain forward builds no image masks), in one piece or in chunks."""
    from diffgemma import scoring

    ours, reference = vision_pairs[None]
    pictures = [random_picture(70, 50, seed=1), random_picture(40, 40, seed=2)]
    prompt = [2, 40, 262, 41, 42, 262, 43, 44, 45]
    inputs = reference_inputs([prompt], [pictures])
    canvas = torch.zeros(1, ours.config.canvas_length, dtype=torch.long)
    with torch.no_grad():
        hidden = reference(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            image_position_ids=inputs["image_position_ids"],
            decoder_input_ids=canvas,
        ).encoder_last_hidden_state
        cap = reference.config.text_config.final_logit_softcapping
        expected = torch.log_softmax(torch.tanh(reference.lm_head(hidden).float() / cap)[0] * cap, dim=-1)
    ids, prepared = ours.image_prompt(prompt, pictures)
    assert ids == inputs["input_ids"][0].tolist()
    soft = ours.image_features(prepared)
    want = expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    scores = ours.score(ids, soft_tokens=soft)
    assert (torch.tensor(scores.logprobs[1:]) - want).abs().max().item() <= 1e-4
    blind = ours.score(ids)  # (the image ids read as text: other log-probabilities)
    assert (torch.tensor(blind.logprobs[1:]) - want).abs().max().item() > 0.1
    monkeypatch.setattr(scoring, "PREFILL_CHUNK", 8)  # chunks shorter than either picture's run
    first = ids[: ids.index(IMAGE_IDS["eoi_token_id"]) + 1]  # (a second row: up to the first picture's end)
    chunked = ours.score([ids, first], soft_tokens=[soft, soft[:1]])
    assert (torch.tensor(chunked[0].logprobs[1:]) - want).abs().max().item() <= 1e-4
    assert (torch.tensor(chunked[1].logprobs[1:]) - want[: len(first) - 1]).abs().max().item() <= 1e-4
