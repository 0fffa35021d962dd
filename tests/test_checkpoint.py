"""Saving, reloading, and every kind of bad checkpoint input."""

import errno
import json
import shutil

import pytest
import torch
from reference import load_reference, make_reference_checkpoint

import diffgemma
import diffgemma.api
from diffgemma import DiffGemmaError, resources
from diffgemma.checkpoint import read_header
from diffgemma.presets import random_checkpoint
from diffgemma.quant import QuantFormat, weight_bytes


def random_inputs(config, batch=2, prompt=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, config.vocab_size, (batch, prompt), generator=generator),
        torch.randint(0, config.vocab_size, (batch, config.canvas_length), generator=generator),
    )


def test_vision_tower_is_read_when_first_asked_for(reference_checkpoints):
    model = diffgemma.load(reference_checkpoints["A"])
    assert model.config.vision is not None and model._vision is None  # a text-only user holds none of it
    assert model.vision.embed_vision.embedding_projection.weight.shape == (model.config.hidden_size, 16)
    assert model.vision is model.vision


def test_saved_checkpoint_loads_in_transformers_with_same_logits(ours, tmp_path):
    model = ours["A"]
    saved = model.save(tmp_path / "saved")
    prompt, canvas = random_inputs(model.config)
    expected = model.denoise_logits(prompt, canvas)
    with torch.no_grad():
        reference = load_reference(saved)(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (reference - expected).abs().max().item() <= 1e-4
    again = diffgemma.load(saved)
    assert torch.equal(again.denoise_logits(prompt, canvas), expected)
    # tokenizer, sampler defaults and the vision tower travel with the save
    assert again.tokenizer is not None
    assert again.settings == model.settings
    assert any(name.startswith("model.encoder.vision_tower.") for name in read_header(saved / "model.safetensors"))


@torch.no_grad()
def share_attention_biases(model) -> None:
    """The encoder's attention biases set to the decoder's (the reference ties every other weight itself)."""
    for encoder, decoder in zip(model.model.encoder.language_model.layers, model.model.decoder.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(decoder.self_attn, name, None) is not None:
                getattr(encoder.self_attn, name).bias.copy_(getattr(decoder.self_attn, name).bias)


def test_attention_biases_load_when_shared_and_are_refused_when_not(tmp_path):
    shared = make_reference_checkpoint(tmp_path / "shared", "A", attention_bias=True, prepare=share_attention_biases)
    model = diffgemma.load(shared)
    prompt, canvas = random_inputs(model.config)
    with torch.no_grad():
        expected = load_reference(shared)(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (model.denoise_logits(prompt, canvas) - expected).abs().max().item() <= 1e-4
    # saved, the biases are the encoder's and the decoder's again, for both implementations
    saved = model.save(tmp_path / "saved")
    assert torch.equal(diffgemma.load(saved).denoise_logits(prompt, canvas), model.denoise_logits(prompt, canvas))
    with torch.no_grad():
        reread = load_reference(saved)(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (reread - expected).abs().max().item() <= 1e-4

    # the reference's own initialisation gives the encoder biases of its own: one network cannot run both
    untied = make_reference_checkpoint(tmp_path / "untied", "A", attention_bias=True)
    name = "model.encoder.language_model.layers.0.self_attn.k_proj.bias"
    with pytest.raises(DiffGemmaError, match=rf"model.safetensors: `{name}` differs from `model.decoder.layers.0"):
        diffgemma.load(untied)


def test_sharded_save_round_trips(ours, tmp_path):
    model = ours["B"]
    saved = model.save(tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    prompt, canvas = random_inputs(model.config)
    assert torch.equal(diffgemma.load(saved).denoise_logits(prompt, canvas), model.denoise_logits(prompt, canvas))


def test_failed_save_keeps_the_previous_checkpoint(ours, tmp_path, monkeypatch):
    model = ours["A"]
    target = model.save(tmp_path / "keep")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("diffgemma.checkpoint.save_file", broken_save_file)
    with pytest.raises(DiffGemmaError, match="keep: could not be written .No space left on device.; nothing"):
        model.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]  # no staging folder left behind


def test_a_save_the_disk_has_no_room_for_is_refused_before_it_starts(ours, tmp_path, monkeypatch):
    model = ours["A"]
    weights = sum(t.numel() * t.element_size() for t in model.network.state_dict().values())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: usage._replace(free=weights // 2))
    written = []
    monkeypatch.setattr("diffgemma.checkpoint.save_file", lambda *args, **kwargs: written.append(args))
    with pytest.raises(DiffGemmaError, match=r"new: writing it takes [\d.]+ MiB, and its disk has [\d.]+ MiB free"):
        model.save(tmp_path / "new")
    with pytest.raises(DiffGemmaError, match="deeper: writing it takes"):  # (its disk: the nearest folder that is)
        model.save(tmp_path / "not" / "yet" / "deeper")
    assert written == [] and list(tmp_path.iterdir()) == []


def test_a_load_the_memory_cannot_hold_is_refused_with_what_would_fit(reference_checkpoints, monkeypatch):
    folder = reference_checkpoints["A"]
    config = diffgemma.load(folder).config
    float32, int8 = (weight_bytes(config, torch.float32, fmt)[0] for fmt in (None, QuantFormat("int8")))
    bfloat16 = weight_bytes(config, torch.bfloat16)[0]
    assert int8 < bfloat16 < float32
    filled = []
    monkeypatch.setattr(diffgemma.api, "load_weights", lambda *args: filled.append(args))
    for free, fits in ((bfloat16, "bfloat16 would fit, in .* MiB .--dtype bfloat16;"), (int8, "int8 .the rest in")):
        monkeypatch.setattr(resources, "free_memory", lambda device, free=free: free)
        with pytest.raises(DiffGemmaError, match=f"weights in float32 need .* MiB free; {fits}"):
            diffgemma.load(folder, dtype="float32")
    monkeypatch.setattr(resources, "free_memory", lambda device: 1000)
    with pytest.raises(DiffGemmaError, match=r"even the smallest load, int4 \(the rest in bfloat16\), needs"):
        diffgemma.load(folder, dtype="float32")
    assert filled == []  # refused before a byte was read
    monkeypatch.setattr(resources, "free_memory", lambda device: float32)
    diffgemma.load(folder, dtype="float32")
    monkeypatch.setattr(resources, "free_memory", lambda device: 1000)
    monkeypatch.setenv(resources.SKIP_CHECK_ENV, "1")
    diffgemma.load(folder, dtype="float32")
    assert len(filled) == 2


@pytest.mark.parametrize(
    ("files", "room"),
    [
        ({"v2/memory.max": "1073741824", "v2/memory.stat": "anon 268435456\nfile 900000000\n"}, 768 * 2**20),
        ({"v2/memory.max": "max", "v2/memory.stat": "anon 1\n"}, None),
        ({"v1/memory.limit_in_bytes": "2147483648", "v1/memory.stat": "cache 5\ntotal_rss 1073741824\n"}, 2**30),
        ({"v1/memory.limit_in_bytes": "9223372036854771712", "v1/memory.stat": "total_rss 1\n"}, None),
        ({}, None),
    ],
)
def test_free_memory_counts_a_containers_limit_less_what_it_holds(tmp_path, monkeypatch, files, room):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(resources, "CGROUP_V2", tmp_path / "v2")
    monkeypatch.setattr(resources, "CGROUP_V1", tmp_path / "v1")
    assert resources._container_room() == room
    free = resources.free_memory(torch.device("cpu"))
    assert free > 0 and (room is None or free <= room)


def test_save_never_replaces_a_folder_that_is_not_a_checkpoint(ours, tmp_path):
    """A save replaces its folder whole, so a folder holding other files (a folder of models, a project) is
    refused before anything is written; an empty folder or an earlier checkpoint is replaced."""
    model = ours["A"]
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "notes.txt").write_text("mine")
    with pytest.raises(DiffGemmaError, match="no checkpoint"):
        model.save(models)
    assert sorted(p.name for p in models.iterdir()) == ["notes.txt", "other-model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no staging folder either
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (model.save(empty) / "config.json").is_file()
    assert (model.save(empty) / "model.safetensors").is_file()  # a checkpoint is replaced


def test_auto_dtype_follows_the_checkpoint_and_the_device(tmp_path, monkeypatch):
    """dtype="auto" (the default): a float32 checkpoint stays float32; a bf16 one runs in bf16 where the device
    multiplies bf16 in hardware and in float32 where it would emulate it; a named dtype is taken as named."""
    from diffgemma import api

    bf16 = random_checkpoint(tmp_path / "bf16", preset="tiny", dtype=torch.bfloat16)
    fp32 = random_checkpoint(tmp_path / "fp32", preset="tiny")
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(api, "bf16_is_fast", lambda device, fast=fast: fast)
        assert diffgemma.load(bf16).dtype == expected
        assert diffgemma.load(fp32).dtype == torch.float32
        assert diffgemma.load(bf16, dtype="float16").dtype == torch.float16
        assert diffgemma.load(bf16, dtype="stored").dtype == torch.bfloat16  # the checkpoint's own, anywhere
        assert diffgemma.load(fp32, dtype="stored").dtype == torch.float32
    for name in ("auto", "stored"):
        with pytest.raises(DiffGemmaError, match=f"'{name}' chooses for a checkpoint being loaded"):
            api.resolve_dtype(name)


def test_a_quantized_checkpoint_is_stored_in_the_dtype_of_its_float_weights(tmp_path):
    """fp8 codes are floating point too, and most of a quantized tiny model's values: they do not count."""
    from diffgemma.checkpoint import stored_float_dtype

    fp32 = random_checkpoint(tmp_path / "fp32", preset="tiny")
    assert stored_float_dtype(fp32) == torch.float32
    for fmt in ("fp8", "int4"):
        saved = diffgemma.load(fp32, dtype="bfloat16", quant=fmt).save(tmp_path / fmt)
        assert stored_float_dtype(saved) == torch.bfloat16, fmt


@pytest.mark.parametrize(
    "capabilities, fast",
    [
        ({"avx512_bf16": True, "avx512_f": True}, True),  # Cooper Lake, Zen 4 and later
        ({"amx_bf16": True, "avx512_bf16": False}, True),  # Sapphire Rapids's tiles
        ({"avx512_f": True, "avx2": True}, False),  # AVX512 without bf16 (Skylake): emulated
        ({}, False),  # a PyTorch that reads no capabilities (ARM)
    ],
)
def test_bf16_is_fast_on_cpus_with_bf16_instructions(monkeypatch, capabilities, fast):
    from diffgemma.api import bf16_is_fast

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert bf16_is_fast(torch.device("cpu")) is fast


@pytest.mark.parametrize("avx512_bf16, amx, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_is_fast_without_the_capability_table(monkeypatch, avx512_bf16, amx, fast):
    """PyTorch 2.9 (the oldest we take) has no `torch.cpu.get_capabilities`: its x86 probes decide."""
    from diffgemma.api import bf16_is_fast

    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_is_fast(torch.device("cpu")) is fast


def test_bfloat16_load_is_close_to_float32(ours, reference_checkpoints):
    model = diffgemma.load(reference_checkpoints["A"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    prompt, canvas = random_inputs(model.config)
    full = ours["A"].denoise_logits(prompt, canvas)
    half = model.denoise_logits(prompt, canvas)
    assert half.dtype == torch.float32
    agreement = (half.argmax(-1) == full.argmax(-1)).float().mean()
    assert agreement > 0.8


@pytest.fixture()
def checkpoint_copy(reference_checkpoints, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoints["A"], target)
    return target


def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("text_"):
            config["text_config"][key[5:]] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder(tmp_path):
    with pytest.raises(DiffGemmaError, match="folder not found"):
        diffgemma.load(tmp_path / "nowhere")


def test_missing_config(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(DiffGemmaError, match="no config.json"):
        diffgemma.load(checkpoint_copy)


def test_wrong_model_type(checkpoint_copy):
    rewrite_config(checkpoint_copy, model_type="gemma4")
    with pytest.raises(DiffGemmaError, match=r"config.json: `model_type` is 'gemma4'; expected 'diffusion_gemma'"):
        diffgemma.load(checkpoint_copy)


def test_missing_required_key(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["text_config"]["num_experts"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffGemmaError, match="config.json: text_config: required key `num_experts` is missing"):
        diffgemma.load(checkpoint_copy)


def test_invalid_value(checkpoint_copy):
    rewrite_config(checkpoint_copy, text_top_k_experts=99)
    with pytest.raises(DiffGemmaError, match="`top_k_experts` .99. exceeds `num_experts`"):
        diffgemma.load(checkpoint_copy)


def test_missing_tensor(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda t: t.pop("model.decoder.layers.1.router.proj.weight"))
    with pytest.raises(DiffGemmaError, match=r"missing tensor `model.decoder.layers.1.router.proj.weight`"):
        diffgemma.load(checkpoint_copy)


def test_unexpected_tensor(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda t: t.update({"model.decoder.extra.weight": torch.zeros(3)}))
    with pytest.raises(DiffGemmaError, match=r"model.safetensors: unexpected tensor `model.decoder.extra.weight`"):
        diffgemma.load(checkpoint_copy)


def test_wrong_shape(checkpoint_copy):
    name = "model.decoder.layers.0.mlp.up_proj.weight"
    rewrite_tensors(checkpoint_copy, lambda t: t.update({name: torch.zeros(3, 4)}))
    with pytest.raises(DiffGemmaError, match=rf"tensor `{name}` has shape \[3, 4\], expected \[96, 64\]"):
        diffgemma.load(checkpoint_copy)


def test_truncated_file(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DiffGemmaError, match="model.safetensors: truncated safetensors file"):
        diffgemma.load(checkpoint_copy)


def test_not_a_safetensors_file(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(DiffGemmaError, match="not a safetensors file"):
        diffgemma.load(checkpoint_copy)


NOT_ENTRIES = [{"dtype": "F32", "shape": [2]}, {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}, 5]


@pytest.mark.parametrize("entry", NOT_ENTRIES)
def test_a_header_entry_not_a_tensors_is_refused_by_name(checkpoint_copy, entry):
    """(an entry without its byte range was a KeyError from deep in the reader before)"""
    path = checkpoint_copy / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["model.decoder.norm.weight"] = entry
    written = json.dumps(header).encode()
    path.write_bytes(len(written).to_bytes(8, "little") + written + data[8 + size :])
    with pytest.raises(DiffGemmaError, match=r"model.safetensors: tensor `model.decoder.norm.weight`'s header entry"):
        diffgemma.load(checkpoint_copy)


def test_missing_shard(ours, tmp_path):
    saved = ours["A"].save(tmp_path / "sharded", max_shard_bytes=200_000)
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(DiffGemmaError, match=rf"names shard '{shard.name}', which is missing"):
        diffgemma.load(saved)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("tokenizer_config.json", b'{"bos_token": "\xff"}', "not UTF-8 text"),
        ("tokenizer_config.json", b'["a list"]', "expected a JSON object"),
        ("chat_template.jinja", b"{{ bos_token }}\xfe", "not UTF-8 text"),
        ("config.json", b"\xff{}", "not UTF-8 text"),
        ("generation_config.json", b"\x80", "not UTF-8 text"),
        ("model.safetensors.index.json", b"\xff", "not UTF-8 text"),
        ("model.safetensors.index.json", b'{"weight_map": ["model.safetensors"]}', "not a valid safetensors index"),
        ("model.safetensors.index.json", b'{"weight_map": {"a.weight": 3}}', "not a valid safetensors index"),
    ],
)
def test_a_garbled_text_file_is_an_error_that_names_it(tmp_path, name, content, says):
    """Each of a checkpoint's text files, undecodable or of the wrong shape: a DiffGemmaError naming the file (a
    UnicodeDecodeError or AttributeError from deep in a reader before)."""
    folder = random_checkpoint(tmp_path / "m", preset="tiny")
    (folder / name).write_bytes(content)
    with pytest.raises(DiffGemmaError, match=rf"{name}: .*{says}") as caught:
        diffgemma.load(folder)
    assert str(folder) in str(caught.value)


def test_checkpoint_without_vision_or_tokenizer(tmp_path):
    folder = random_checkpoint(tmp_path / "plain", preset="tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    model = diffgemma.load(folder)
    assert model.tokenizer is None
    assert model.config.vision is None


def test_bad_device_and_dtype(reference_checkpoints):
    with pytest.raises(DiffGemmaError, match="unknown dtype 'int3'"):
        diffgemma.load(reference_checkpoints["A"], dtype="int3")
    assert diffgemma.load(reference_checkpoints["A"], dtype=None).network.dtype == torch.float32  # (None: "auto")
    with pytest.raises(DiffGemmaError, match="unknown device"):
        diffgemma.load(reference_checkpoints["A"], device="warp-drive")
    with pytest.raises(DiffGemmaError, match="quant must be one of int8, int4, fp8"):
        diffgemma.load(reference_checkpoints["A"], quant=4)
    for nothing in (None, 5):  # not paths: TypeErrors from pathlib, before
        with pytest.raises(DiffGemmaError, match="a checkpoint .* is a path"):
            diffgemma.load(nothing)
        with pytest.raises(DiffGemmaError, match="the folder to write the checkpoint to is a path"):
            diffgemma.load(reference_checkpoints["A"]).save(nothing)
    with pytest.raises(DiffGemmaError, match="device 'meta' was asked for, but this machine or PyTorch build has none"):
        diffgemma.load(reference_checkpoints["A"], device="meta")  # (as Intel's xpu is where there is none)
    with pytest.raises(DiffGemmaError, match=r"device 'cpu:1' was asked for, but this machine has 1 cpu device\(s\)"):
        diffgemma.load(reference_checkpoints["A"], device="cpu:1")


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiffGemmaError, match="downloading the checkpoint from the Hugging Face Hub failed"):
        diffgemma.load("google/diffusiongemma-26B-A4B-it")


def test_info_on_a_hub_id_fetches_the_configs_alone(monkeypatch, tmp_path, capsys):
    """`info` on a Hub id asks for config.json and generation_config.json, not the 50 GB of weights."""
    import huggingface_hub

    from diffgemma.cli import main

    source = random_checkpoint(tmp_path / "tiny", preset="tiny")
    asked = {}

    def fake_download(repo_id, allow_patterns, repo_type="model"):
        assert repo_type == "model"
        asked[repo_id] = allow_patterns
        configs = tmp_path / "configs"
        configs.mkdir(exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            shutil.copy(source / name, configs / name)
        return str(configs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert main(["info", "--model", "google/diffusiongemma-26B-A4B-it"]) == 0
    assert asked == {"google/diffusiongemma-26B-A4B-it": ["config.json", "generation_config.json"]}
    assert "parameters" in capsys.readouterr().out


def test_a_hub_model_that_cannot_fit_is_refused_before_its_weights_download(monkeypatch, tmp_path):
    """From a Hub id, `load` fetches the two config files first and refuses a model the device cannot hold
    (its dtype as config.json declares it, bf16 where it says none) before asking for the weights; one that
    fits is then downloaded whole and loaded (and checked again, exactly)."""
    import huggingface_hub

    source = random_checkpoint(tmp_path / "tiny", preset="tiny")
    asked = []

    def fake_download(repo_id, allow_patterns, repo_type="model"):
        assert repo_type == "model"
        asked.append(allow_patterns)
        target = tmp_path / f"download{len(asked)}"
        target.mkdir()
        for path in source.iterdir():
            if any(path.match(pattern) for pattern in allow_patterns):
                shutil.copy(path, target / path.name)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    config = diffgemma.load(source).config
    float32 = weight_bytes(config, torch.float32)[0]
    monkeypatch.setattr(resources, "free_memory", lambda device: float32 - 1)
    with pytest.raises(DiffGemmaError, match="google/tiny: its weights in float32 need .*; bfloat16 would fit"):
        diffgemma.load("google/tiny", dtype="float32")
    assert asked == [["config.json", "generation_config.json"]]
    assert diffgemma.api.declared_dtype({}) == torch.bfloat16
    assert diffgemma.api.declared_dtype({"text_config": {"dtype": "float32"}}) == torch.float32
    assert diffgemma.api.declared_dtype({"torch_dtype": "float16"}) == torch.float16
    monkeypatch.setattr(resources, "free_memory", lambda device: float32)
    assert diffgemma.load("google/tiny", dtype="float32").config.hidden_size == config.hidden_size
    assert len(asked) == 3 and "*.safetensors" in asked[2]
