"""Derived config values equal the reference's `__post_init__`."""

import json

import pytest
import torch

from diffgemma import DiffGemmaError
from diffgemma.config import load_configs, parse_model_config, parse_sampler_settings
from diffgemma.presets import preset_config


@pytest.mark.parametrize("which", ["A", "B"])
def test_per_layer_shapes_match_reference(reference_models, ours, which):
    reference = reference_models[which].config.text_config
    config = ours[which].config
    assert list(config.layer_types) == reference.layer_types
    for index, shape in enumerate(config.layers):
        layer = reference.per_layer_config[index]
        assert shape.head_dim == layer.head_dim
        assert shape.num_kv_heads == layer.num_key_value_heads
    assert config.sliding_window == reference.sliding_window


def test_global_head_dim_form_equals_per_layer_form():
    """Google's config.json writes global_head_dim; transformers rewrites it as per_layer_config."""
    raw = preset_config("tiny")
    via_global = parse_model_config(raw)
    text = dict(raw["text_config"])
    text.pop("global_head_dim")
    text.pop("num_global_key_value_heads")
    full = [i for i, kind in enumerate(via_global.layer_types) if kind == "full_attention"]
    text["per_layer_config"] = {str(i): {"head_dim": 32, "num_key_value_heads": 1} for i in full}
    assert parse_model_config({**raw, "text_config": text}).layers == via_global.layers


def test_defaults_follow_reference():
    raw = preset_config("tiny")
    text = dict(raw["text_config"])
    for key in ("layer_types", "rope_parameters", "global_head_dim", "num_global_key_value_heads"):
        text.pop(key)
    text["num_hidden_layers"] = 7
    config = parse_model_config({**raw, "text_config": text})
    assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention",) * 2
    full = config.layers[-1]
    assert (full.head_dim, full.num_kv_heads) == (512, 2)
    assert (full.rope_type, full.partial_rotary_factor) == ("proportional", 0.25)
    assert config.layers[0].rope_theta == 10_000.0


def test_sampler_settings_defaults_and_overrides(tmp_path):
    settings = parse_sampler_settings({})
    assert (settings.max_denoising_steps, settings.entropy_bound, settings.t_max, settings.t_min) == (48, 0.1, 0.8, 0.4)
    assert (settings.stability_threshold, settings.confidence_threshold) == (1, 0.005)
    assert settings.replace(max_denoising_steps=8).max_denoising_steps == 8
    with pytest.raises(DiffGemmaError, match="`t_max` must be a number > `t_min`"):
        settings.replace(t_max=0.1)
    with pytest.raises(DiffGemmaError, match="unknown sampler setting"):
        settings.replace(temperature=3)
    with pytest.raises(DiffGemmaError, match="generation_config.json: `max_denoising_steps` must be a positive"):
        parse_sampler_settings({"max_denoising_steps": 0})


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DiffGemmaError, match="config.json: not valid JSON"):
        load_configs(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny")))
    (tmp_path / "generation_config.json").write_text(json.dumps({"sampler_config": {"entropy_bound": -1.0}}))
    with pytest.raises(DiffGemmaError, match="generation_config.json: `entropy_bound` must be a number > 0"):
        load_configs(tmp_path)


def test_parameter_counts_of_the_real_shape():
    total, active = parse_model_config(preset_config("26b-a4b")).parameter_counts()
    assert 25.1e9 < total < 25.3e9
    assert 3.7e9 < active < 3.9e9


def test_memory_estimate_matches_what_is_allocated():
    from diffgemma.cache import EncoderCache

    config = parse_model_config(preset_config("tiny"))
    for context, batch in ((10, 1), (100, 3)):
        cache = EncoderCache(config, batch, context, "cpu", torch.float32)
        assert config.cache_bytes(context, batch, 4) == cache.memory_bytes()
    assert config.sampler_bytes(2) == 2 * 2 * config.canvas_length * config.vocab_size * 4


def test_prefix_cache_estimate_matches_what_a_snapshot_holds():
    from diffgemma.cache import EncoderCache, PrefixCache

    config = parse_model_config(preset_config("tiny"))
    network = torch.nn.Linear(1, 1)
    snapshot = PrefixCache.snapshot_of(network, [1, 2], EncoderCache(config, 1, 50, "cpu", torch.bfloat16))
    windows = sum(t.numel() * t.element_size() for kept in snapshot.windows if kept is not None for t in kept)
    assert windows > 0 and config.prefix_cache_bytes(50, 1, 2, shared=0) == windows
    # while a batch of several runs, the kept snapshots' caches live on beside it; so do all but one at batch 1
    assert config.prefix_cache_bytes(50, 4, 2, shared=0) == windows + config.cache_bytes(50, 1, 2)
    assert config.prefix_cache_bytes(50, 1, 2, entries=2, shared=0) == 2 * windows + config.cache_bytes(50, 1, 2)
    # a shared system turn's snapshot is a cache of its own, as long as that turn
    system_turn = PrefixCache.snapshot_of(network, [1] * 50, EncoderCache(config, 1, 50, "cpu", torch.bfloat16), True)
    held = sum(
        t.numel() * t.element_size()
        for layer in system_turn.cache.layers
        for t in vars(layer).values()
        if isinstance(t, torch.Tensor)
    )
    assert system_turn.windows is None and config.prefix_cache_bytes(50, 1, 2) == windows + held


@pytest.mark.parametrize("factor", [None, "0.25", -0.5, 1.5, float("nan"), True, [0.25]])
def test_a_bad_partial_rotary_factor_is_refused_by_name(factor):
    """(a string or null was a ValueError / TypeError from float() before)"""
    raw = preset_config("tiny")
    raw["text_config"]["rope_parameters"]["full_attention"]["partial_rotary_factor"] = factor
    expected = r"`rope_parameters.full_attention.partial_rotary_factor` must be a number"
    with pytest.raises(DiffGemmaError, match=expected):
        parse_model_config(raw)


def test_shapes_the_reference_cannot_run_are_refused_by_name():
    """(each was an error deep in torch at the first pass before)"""
    raw = preset_config("tiny")
    raw["text_config"]["max_position_embeddings"] = None
    with pytest.raises(DiffGemmaError, match="`max_position_embeddings` must be an integer >= canvas_length"):
        parse_model_config(raw)
    raw = preset_config("tiny")
    raw["text_config"]["rope_parameters"]["full_attention"].pop("rope_type")  # (default RoPE, a part of the head)
    with pytest.raises(DiffGemmaError, match="turns part of the head .0.25. with `rope_type` default"):
        parse_model_config(raw)


def test_text_files_are_read_from_pipes_and_refused_clearly_otherwise(tmp_path):
    """`--file <(...)` hands a command a pipe, not a regular file: read as one. A folder or a missing path is an
    error naming it."""
    import os
    import threading

    from diffgemma.config import read_text

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text("first\nsecond\n", encoding="utf-8"))
    writer.start()
    assert read_text(pipe) == "first\nsecond\n"
    writer.join()
    with pytest.raises(DiffGemmaError, match=f"{tmp_path}: cannot read it"):
        read_text(tmp_path)
    with pytest.raises(DiffGemmaError, match="nowhere.txt: file not found"):
        read_text(tmp_path / "nowhere.txt")
