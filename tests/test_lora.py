"""LoRA: only adapters train, the PEFT layout round-trips, and merging gives the adapter's logits."""

import json
import warnings

import pytest
import torch
from assets.make_demo_adapter import PIRATE, patient_pirate
from assets.make_demo_model import ANSWERS, FRUIT
from conftest import DEMO
from safetensors.torch import load_file, save_file

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.cli import main
from diffgemma.open_batch import BatchRow, RowFinished
from diffgemma.presets import random_checkpoint
from diffgemma.train.lora import (
    LoraSettings,
    add_lora,
    consecutive_runs,
    load_adapter,
    merge_adapter_files,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from diffgemma.train.objective import Example
from diffgemma.train.trainer import TrainConfig, epoch_batches, train


def _logits(model) -> torch.Tensor:
    prompt = torch.tensor([[2, 40, 41, 42, 43, 44]])
    canvas = torch.randint(9, 200, (1, model.config.canvas_length), generator=torch.Generator().manual_seed(0))
    return model.network.denoise_logits(prompt, canvas)


@pytest.fixture()
def trained(tmp_path):
    """A tiny model with rank-4 adapters (self-conditioning included) trained for a few steps."""
    folder = random_checkpoint(tmp_path / "base", preset="tiny", seed=5)
    model = diffgemma.load(folder)
    settings = LoraSettings(rank=4, alpha=8.0, self_conditioning=True)
    wrapped = add_lora(model.network, settings)
    before = {n: t.clone() for n, t in model.network.state_dict().items()}
    examples = [Example([2, 10 + i], [40 + i] * 20 + [60 + i] * 12, id=i) for i in range(4)]
    config = TrainConfig(steps=12, batch_size=4, peak_lr=1e-2, warmup=2, seed=0)
    losses = train(model.network, epoch_batches(examples, 4, 0), config, eos_id=1, pad_id=0, show_progress=False)
    return folder, model, settings, wrapped, before, losses


def test_only_adapters_change(trained):
    _, model, _, wrapped, before, losses = trained
    layers = model.config.num_hidden_layers
    # q, k, o on every layer; v only where the layer has one (full layers use K as V); 3 MLP; 3 self-cond
    with_v = sum(1 for layer in model.network.layers if layer.self_attn.v_proj is not None)
    assert len(wrapped) == layers * 6 + with_v + 3
    after = model.network.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "training changed nothing"
    assert all(".lora_" in n for n in changed), sorted(n for n in changed if ".lora_" not in n)[:5]
    assert any(n.endswith("lora_B.weight") for n in changed)
    assert losses[-1] < losses[0]


def test_merged_checkpoint_matches_adapter_logits(trained, tmp_path):
    folder, model, settings, _, _, _ = trained
    with torch.no_grad():
        adapted = _logits(model)
        base = _logits(diffgemma.load(folder))
    assert (adapted - base).abs().max() > 1e-3, "the adapter should change the logits"

    adapter_dir = save_adapter(model.network, settings, tmp_path / "adapter", base=str(folder))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    keys = set(load_file(str(adapter_dir / "adapter_model.safetensors")))
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.encoder.language_model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    # the self-conditioning block is the decoder's alone in the reference model: no key for an encoder copy
    assert "base_model.model.model.decoder.self_conditioning.up_proj.lora_A.weight" in keys
    assert not any(key.startswith("base_model.model.model.encoder.language_model.self_") for key in keys)

    reloaded = diffgemma.load(folder)
    load_adapter(reloaded.network, adapter_dir)
    with torch.no_grad():
        assert (_logits(reloaded) - adapted).abs().max() < 1e-5

    assert merge_lora(model.network) > 0
    model.save(tmp_path / "merged")
    # written through private temporary files and folders, yet readable as any other file there (a server run
    # by another user loads them)
    probe = tmp_path / "probe"
    probe.write_text("")
    usual = probe.stat().st_mode & 0o777
    for path in [tmp_path / "merged", *(tmp_path / "merged").iterdir(), *adapter_dir.iterdir()]:
        assert path.stat().st_mode & 0o777 == (usual | 0o111 if path.is_dir() else usual), path
    merged = diffgemma.load(tmp_path / "merged")
    assert not any(".lora_" in n for n in merged.network.state_dict())
    with torch.no_grad():
        assert (_logits(merged) - adapted).abs().max() < 1e-4


def test_a_model_runs_an_adapter_without_a_merged_checkpoint(trained, tmp_path, capsys):
    """`DiffGemma.load_adapter` (`--adapter DIR`): over float weights the adapter is folded in (the adapted
    logits, no adapter modules left); over weights loaded quantized it runs beside them, as QLoRA trained it;
    a second adapter is refused; the command gives what the API gives."""
    from diffgemma.train.lora import has_lora

    folder, model, settings, _, _, _ = trained
    adapter_dir = save_adapter(model.network, settings, tmp_path / "adapter", base=str(folder))
    with torch.no_grad():
        adapted = _logits(model)
    folded = diffgemma.load(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our adapters hold the same tensors under the encoder's names: no warning
        folded.load_adapter(adapter_dir)
    assert not has_lora(folded.network) and folded.adapter == adapter_dir
    with torch.no_grad():
        assert (_logits(folded) - adapted).abs().max() < 1e-4
    with pytest.raises(DiffGemmaError, match="has an adapter already"):
        folded.load_adapter(adapter_dir)
    beside = diffgemma.load(folder, quant="int8")
    plain_int8 = _logits(beside)
    beside.load_adapter(adapter_dir)
    assert has_lora(beside.network)
    with torch.no_grad():
        over_int8 = _logits(beside)
    assert (over_int8 - plain_int8).abs().max() > 1e-3  # the adapter acts
    assert (over_int8 - adapted).abs().max() < (plain_int8 - adapted).abs().max()  # towards the adapted model
    text = folded.generate("abc", max_new_tokens=16, seed=3).text
    options = ["--model", str(folder), "--adapter", str(adapter_dir), "--seed", "3", "--max-new-tokens", "16"]
    assert main(["generate", "abc", "--no-stream", *options]) == 0
    assert capsys.readouterr().out == text + "\n"
    # an adapter whose encoder copy was trained apart (PEFT on the reference model): both halves run, each in its
    # own pass (kept beside the weights, which cannot hold both); merging keeps the decoder's, and says so
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    encoder_key = next(key for key in weights if ".encoder." in key and key.endswith("lora_B.weight"))
    weights[encoder_key] = weights[encoder_key] + 1
    save_file(weights, str(adapter_dir / "adapter_model.safetensors"))
    apart = diffgemma.load(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apart.load_adapter(adapter_dir)
    assert has_lora(apart.network)
    with torch.no_grad():
        assert (_logits(apart) - adapted).abs().max() > 1e-3  # the encoder's half acts (the prompt's cache)
    with pytest.warns(UserWarning, match="encoder half differs .* takes the decoder's"):
        merge_adapter_files(folder, adapter_dir, tmp_path / "merged")
    with pytest.raises(DiffGemmaError, match="encoder and decoder halves differ .* trains as one adapter"):
        trainable_parameters(apart.network)


def test_merge_command_and_bad_adapters(trained, tmp_path, capsys):
    folder, model, settings, _, _, _ = trained
    adapter_dir = save_adapter(model.network, settings, tmp_path / "adapter")
    code = main(["lora-merge", "--model", str(folder), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")])
    assert code == 0 and (tmp_path / "m" / "model.safetensors").is_file()
    with torch.no_grad():
        assert (_logits(diffgemma.load(tmp_path / "m")) - _logits(model)).abs().max() < 1e-4
    # a bf16 base merges into a bf16 checkpoint (the real model's 50 GB, not 100 in float32)
    from diffgemma.checkpoint import stored_float_dtype

    bf16 = diffgemma.load(folder, dtype="bfloat16").save(tmp_path / "bf16")
    code = main(["lora-merge", "--model", str(bf16), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m16")])
    assert code == 0 and stored_float_dtype(tmp_path / "m16") == torch.bfloat16
    # never over the base it merges into
    code = main(["lora-merge", "--model", str(bf16), "--adapter", str(adapter_dir), "--out", str(bf16)])
    assert code == 2 and "is the checkpoint being read" in capsys.readouterr().err

    with pytest.raises(DiffGemmaError, match="adapter_config.json: not found"):
        load_adapter(diffgemma.load(folder).network, tmp_path / "nowhere")
    written = json.loads((adapter_dir / "adapter_config.json").read_text())
    for changes, message in [
        ({"peft_type": "IA3"}, "expected 'LORA'"),
        ({"r": float("nan")}, "`r` must be a whole number of at least 1, got nan"),  # (a float() traceback)
        ({"r": 1.5}, "`r` must be a whole number"),
        ({"r": 10**9}, r"`r` is 1000000000, but the adapter.s weights have rank 4 "),  # (no allocation first)
        ({"lora_alpha": "8"}, "`lora_alpha` must be a number"),
    ]:
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**written, **changes}))
        with pytest.raises(DiffGemmaError, match=message):
            load_adapter(diffgemma.load(folder).network, adapter_dir)
    for rank in (0, "4", None, 1.5):
        with pytest.raises(DiffGemmaError, match="rank must be a whole number of at least 1"):
            LoraSettings(rank=rank)
    with pytest.raises(DiffGemmaError, match="LoRA alpha must be a number"):
        LoraSettings(4, alpha="8")
    with pytest.raises(DiffGemmaError, match="an adapter .* is a path"):
        load_adapter(diffgemma.load(folder).network, None)
    with pytest.raises(DiffGemmaError, match="carries LoRA adapters"):
        bare = diffgemma.load(folder)
        add_lora(bare.network, settings)
        bare.save(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_on_disk_writes_what_merging_the_loaded_model_writes(trained, tmp_path, monkeypatch, dtype):
    """`lora-merge` folds the adapter in a shard at a time, never loading the model: the same tensors, bit for
    bit, as loading the base, adding the adapter, merging and saving, for a float32 and a bf16 base."""
    from diffgemma import checkpoint

    folder, model, settings, _, _, _ = trained
    adapter_dir = save_adapter(model.network, settings, tmp_path / "adapter")
    base = diffgemma.load(folder, dtype=dtype).save(tmp_path / "base")
    in_memory = diffgemma.load(base, dtype="stored")
    load_adapter(in_memory.network, adapter_dir)
    merge_lora(in_memory.network)
    expected = load_file(str(in_memory.save(tmp_path / "expected") / "model.safetensors"))

    shards = []
    monkeypatch.setattr(checkpoint, "save_file", lambda tensors, *args, **kwargs: shards.append(tensors) or None)
    monkeypatch.setattr(checkpoint, "load_weights", lambda *args: pytest.fail("the model was loaded"))
    merge_adapter_files(base, adapter_dir, tmp_path / "merged", checkpoint.stored_float_dtype(base), 100_000)
    biggest = max(t.numel() * t.element_size() for t in expected.values())
    assert len(shards) > 1 and all(
        sum(t.numel() * t.element_size() for t in shard.values()) <= max(100_000, biggest) for shard in shards
    )
    monkeypatch.undo()

    merged = tmp_path / "merged"
    assert main(["lora-merge", "--model", str(base), "--adapter", str(adapter_dir), "--out", str(merged)]) == 0
    got = load_file(str(merged / "model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(got[name].dtype == dtype and torch.equal(got[name], expected[name]) for name in expected)
    assert json.loads((merged / "config.json").read_text()) == json.loads(
        (tmp_path / "expected" / "config.json").read_text()
    )
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in (tmp_path / "expected").iterdir())


def test_merging_into_a_quantized_checkpoint_is_refused(trained, tmp_path, capsys):
    folder, model, settings, _, _, _ = trained
    adapter_dir = save_adapter(model.network, settings, tmp_path / "adapter")
    quantized = diffgemma.load(folder, quant="int8").save(tmp_path / "int8")
    code = main(["lora-merge", "--model", str(quantized), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")])
    assert (
        code == 2 and "the base model is quantized (int8): merge the adapter into the float" in capsys.readouterr().err
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "dtype, fmt, rank",
    [(torch.float32, None, 0), (torch.float32, None, 4), (torch.bfloat16, None, 4), (torch.float32, "int4", 4)],
)
def test_training_state_counts_what_a_real_step_holds(tmp_path, dtype, fmt, rank):
    """`info`'s training rows (`training_state_bytes`, counted on the meta device) against a real network: its
    weights and buffers, the gradients of what it trains, and AdamW's state after a step."""
    from diffgemma.quant import QuantFormat
    from diffgemma.train.lora import add_lora, trainable_parameters
    from diffgemma.train.memory import training_state_bytes

    folder = random_checkpoint(tmp_path / "tiny", preset="tiny", seed=5)
    network = diffgemma.load(folder, dtype=dtype, quant=fmt).network
    settings = LoraSettings(rank) if rank else None
    if settings is not None:
        add_lora(network, settings)
    trained = trainable_parameters(network)
    optimizer = torch.optim.AdamW(trained)
    for parameter in trained:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    held = sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trained)
    state = [t for per in optimizer.state.values() for t in per.values() if isinstance(t, torch.Tensor)]
    counted = training_state_bytes(network.config, dtype, QuantFormat(fmt) if fmt else None, settings)
    assert counted == {
        "weights": held,
        "trained": sum(p.numel() for p in trained),
        "gradients": gradients,
        "optimizer": sum(t.numel() * t.element_size() for t in state),
    }


TEXT_PROJECTIONS = r"^model\.({})\..*\.({})$"  # (copies, projections)
BOTH = r"encoder\.language_model|decoder"


def _peft_adapter(folder, tmp_path, targets: str, **lora):
    """An adapter PEFT makes on the reference model (random matrices: its encoder and decoder copies differ, as
    training them leaves them), saved; and the reference model with it."""
    peft = pytest.importorskip("peft")
    from reference import load_reference

    adapted = peft.get_peft_model(load_reference(folder), peft.LoraConfig(target_modules=targets, **lora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        params = dict(adapted.named_parameters())
        for name, param in params.items():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    adapted.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", adapted.eval()


def _reference_and_ours(reference_model, ours):
    generator = torch.Generator().manual_seed(1)
    config = ours.config
    prompt = torch.randint(3, config.vocab_size, (2, 3 * config.sliding_window), generator=generator)
    canvas = torch.randint(3, config.vocab_size, (2, config.canvas_length), generator=generator)
    conditioning = torch.randn(2, config.canvas_length, config.vocab_size, generator=generator) * 4
    with torch.no_grad():
        expected = reference_model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=conditioning)
        return expected.logits, ours.network.denoise_logits(prompt, canvas, conditioning)


@pytest.mark.parametrize(
    "copies, projections, lora",
    [
        (BOTH, "q_proj|v_proj", {"r": 4, "lora_alpha": 8}),  # PEFT's usual pick: two of the attention projections
        ("decoder", "q_proj|o_proj", {"r": 2, "lora_alpha": 8}),  # the decoder's copy alone: the encoder's unadapted
        (
            BOTH,
            "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj",  # the self-conditioning block's too
            {
                "r": 4,
                "lora_alpha": 16,
                "use_rslora": True,
                "rank_pattern": {"o_proj": 2},
                "alpha_pattern": {"q_proj": 3},
            },
        ),
    ],
)
def test_adapters_peft_makes_on_the_reference_give_its_logits_here(
    generation_checkpoints, tmp_path, copies, projections, lora
):
    """A PEFT adapter of the reference model loads as PEFT applies it: the projections its weights adapt (any
    subset, the self-conditioning block's included), the encoder's copy and the decoder's each in its own pass
    (trained apart, or one alone), each at its rank (`rank_pattern`), with its alpha (`alpha_pattern`) and
    rsLoRA's scale; and what `save_adapter` writes, PEFT loads (without a warning) to the same logits."""
    folder = generation_checkpoints["A"]
    adapter, adapted = _peft_adapter(folder, tmp_path, TEXT_PROJECTIONS.format(copies, projections), **lora)
    ours = diffgemma.load(folder)
    names = load_adapter(ours.network, adapter)
    assert {name.rpartition(".")[2] for name in names} == set(projections.split("|"))
    assert any(name.startswith("self_conditioning.") for name in names) == ("gate_proj" in projections)
    expected, got = _reference_and_ours(adapted, ours)
    with adapted.disable_adapter():
        base, _ = _reference_and_ours(adapted, ours)
    assert (got - expected).abs().max() < 1e-3 < (base - expected).abs().max()

    peft = pytest.importorskip("peft")
    from reference import load_reference

    saved = save_adapter(ours.network, LoraSettings(4, 8.0, self_conditioning=True), tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unexpected keyword arguments" for a key of our own
        theirs = peft.PeftModel.from_pretrained(load_reference(folder), saved).eval()
    expected, got = _reference_and_ours(theirs, ours)
    assert (got - expected).abs().max() < 1e-3


def test_adapters_diffgemma_cannot_apply_are_refused(generation_checkpoints, tmp_path):
    """DoRA, trained biases, whole saved modules and tensors of unknown kinds are refused with a line naming
    them, where they would otherwise be dropped and the adapted model silently be another."""
    folder = generation_checkpoints["A"]
    adapter, _ = _peft_adapter(folder, tmp_path, TEXT_PROJECTIONS.format(BOTH, "q_proj"), r=2, lora_alpha=4)
    written = json.loads((adapter / "adapter_config.json").read_text())
    for changes, message in [
        ({"use_dora": True}, "`use_dora`: a DoRA adapter"),
        ({"bias": "lora_only"}, "`bias`: trained biases"),
        ({"modules_to_save": ["lm_head"]}, "`modules_to_save`: whole modules saved beside the adapters"),
        ({"rank_pattern": {"q_proj": 0}}, "`rank_pattern` must map module names to a positive whole number"),
    ]:
        (adapter / "adapter_config.json").write_text(json.dumps({**written, **changes}))
        with pytest.raises(DiffGemmaError, match=message):
            load_adapter(diffgemma.load(folder).network, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(written))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(iter(weights))
    for extra, message in [
        ({"base_model.model.model.decoder.norm.lora_A.weight": weights[key].clone()}, "adapts `norm`, which is not a"),
        ({key.replace("lora_A.weight", "lora_magnitude_vector"): weights[key][0].clone()}, "is not a LoRA matrix"),
        (
            {"base_model.model.lm_head.lora_A.weight": weights[key].clone()},
            "adapts `lm_head`, which is not in the text",
        ),
    ]:
        save_file({**weights, **extra}, str(adapter / "adapter_model.safetensors"))
        with pytest.raises(DiffGemmaError, match=message):
            load_adapter(diffgemma.load(folder).network, adapter)
    vision = {
        "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight": weights[key].clone()
    }
    save_file({**weights, **vision}, str(adapter / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match="1 tensor\\(s\\) adapt the vision tower, which diffgemma does not run"):
        assert load_adapter(diffgemma.load(folder).network, adapter)


def _two_adapters(trained, tmp_path):
    """(base folder, an adapter of every projection, one of the attention's alone at another rank whose encoder
    half differs, as PEFT trains on the reference's two copies, and whose sampler defaults add EOS id 99)."""
    folder, model, settings, _, _, _ = trained
    everything = save_adapter(model.network, settings, tmp_path / "everything", base=str(folder))
    other = diffgemma.load(folder)
    add_lora(other.network, LoraSettings(rank=2, alpha=4.0))
    with torch.no_grad():
        for name, param in other.network.named_parameters():
            if name.endswith("lora_B.weight"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    # saved with sampler defaults whose EOS ids gained one (as `train chat` adds the token its answers end with)
    other.settings = other.settings.replace(eos_token_id=[*other.settings.eos_token_id, 99])
    attention = save_adapter(
        other.network, LoraSettings(rank=2, alpha=4.0), tmp_path / "attention", generation=other.settings
    )
    weights_file = attention / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    # the attention's alone, its encoder copy trained apart (PEFT on the reference's two copies): two halves
    weights = {key: value for key, value in weights.items() if "self_attn" in key}
    encoder_key = next(key for key in weights if ".encoder." in key and key.endswith("lora_B.weight"))
    weights[encoder_key] = weights[encoder_key] + 0.5
    save_file(weights, weights_file)
    return folder, everything, attention


def test_an_adapter_bank_runs_each_adapter_as_it_runs_alone(trained, tmp_path):
    """`add_adapter` keeps adapters beside the base weights and `use_adapter` switches between them: each gives
    the logits it gives loaded alone (over float or int8 weights), None the base model's; adapters of other
    ranks and other projections (a projection one of them leaves alone runs without an update while it is in
    place), one with an encoder half of its own, live side by side."""
    folder, everything, attention = _two_adapters(trained, tmp_path)
    for quant in (None, "int8"):
        bank = diffgemma.load(folder, quant=quant)
        with torch.no_grad():
            base = _logits(bank)
            bank.add_adapter("everything", everything)
            bank.add_adapter("attention", attention)
            assert bank.adapters == ("everything", "attention")
            assert bank.settings.eos_token_id == (*diffgemma.load(folder).settings.eos_token_id, 99)
            assert torch.equal(_logits(bank), base)  # the base model stays in use
            for name, adapter in (("attention", attention), ("everything", everything), ("attention", attention)):
                alone = diffgemma.load(folder, quant=quant)
                load_adapter(alone.network, adapter)  # (beside the weights, as the bank keeps it)
                bank.use_adapter(name)
                assert torch.equal(_logits(bank), _logits(alone)), (quant, name)
                assert (_logits(bank) - base).abs().max() > 1e-3
            bank.use_adapter(None)
            assert torch.equal(_logits(bank), base)
    with pytest.raises(DiffGemmaError, match=r"no adapter named 'nope' \(loaded: 'everything', 'attention'\)"):
        bank.use_adapter("nope")
    with pytest.raises(DiffGemmaError, match="an adapter named 'attention' is loaded already"):
        bank.add_adapter("attention", attention)
    with pytest.raises(DiffGemmaError, match="keeps adapters to switch between"):
        bank.load_adapter(attention)
    with pytest.raises(DiffGemmaError, match="no adapter named 'nope' \\(none added"):
        diffgemma.load(folder).use_adapter("nope")
    folded = diffgemma.load(folder)
    with pytest.raises(DiffGemmaError, match="adapter_config.json: not found"):
        folded.add_adapter("nothing", tmp_path / "nothing")
    folded.load_adapter(everything)  # (a failed first add_adapter leaves the model as it was)
    with pytest.raises(DiffGemmaError, match="has an adapter applied"):
        folded.add_adapter("attention", attention)


def test_rows_of_several_adapters_share_a_pass_each_as_alone(trained, tmp_path):
    """`AdapterBank.for_rows`: one pass over rows of different adapters (and of none) gives each row the logits
    it gets alone with its adapter in place, the encoder half of an adapter that has one in the prompt's pass,
    over float or int8 weights; rows all of one adapter put it in place as `use` does; a pass of another
    number of rows, or an adapter not kept, is refused."""
    folder, everything, attention = _two_adapters(trained, tmp_path)
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(9, 200, (5, 6), generator=generator)
    canvases = torch.randint(9, 200, (5, 32), generator=generator)
    # each adapter's rows apart, and together (a view of them)
    mixes = [["everything", None, "attention", "everything", "attention"], ["attention"] * 3 + [None, "everything"]]
    for quant, names in [(None, mixes[0]), ("int8", mixes[0]), (None, mixes[1])]:
        model = diffgemma.load(folder, quant=quant)
        model.add_adapter("everything", everything)
        model.add_adapter("attention", attention)
        bank, network = model._bank, model.network
        with torch.no_grad():
            bank.for_rows(names)()
            together = network.denoise_logits(prompts, canvases)
            for row, name in enumerate(names):
                bank.use(name)
                alone = network.denoise_logits(prompts[row : row + 1], canvases[row : row + 1])[0]
                torch.testing.assert_close(together[row], alone, rtol=1e-4, atol=1e-4, msg=f"{quant} row {row}")
            base = names.index(None)
            differ = [
                (together[names.index(name)] - together[base]).abs().max() for name in ("everything", "attention")
            ]
            assert min(differ) > 1e-2  # (the rows' adapters do change their logits)
            bank.for_rows(["attention", "attention"])()
            assert bank.in_use == "attention"
            bank.for_rows(names)()
            with pytest.raises(DiffGemmaError, match="adapters were put in place for 5 rows, and a pass has 2"):
                network.denoise_logits(prompts[:2], canvases[:2])
    with pytest.raises(DiffGemmaError, match="no adapter named 'nope'"):
        bank.for_rows(["everything", "nope"])
    assert consecutive_runs([0, 1, 3, 5, 6, 7]) == ((0, 2), (3, 4), (5, 8)) and consecutive_runs([4]) == ((4, 5),)


def test_a_generation_names_its_adapters_one_a_row():
    """`generate(adapter=...)`: one adapter for every row, or one a row (None: the base model), the rows of
    several in one batch, each answering as it does alone; a chat names the adapter that answers. Whatever a
    call names, `use_adapter`'s choice is what the next call that names none, scoring and embedding run with."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", DEMO.parent / "demo-pirate")
    fruit, hello = ([{"role": "user", "content": question}] for question in ("Name a fruit.", "Say hello."))
    result = model.generate([fruit, fruit, hello, hello], seed=0, adapter=["pirate", None, None, "pirate"])
    expected = [PIRATE[FRUIT], ANSWERS[FRUIT], ANSWERS["Say hello."], PIRATE["Say hello."]]
    assert result.text == expected
    assert model.generate([fruit, hello], seed=0, adapter="pirate").text == [PIRATE[FRUIT], PIRATE["Say hello."]]
    base_score = model.score("Name a fruit.").total
    assert model.chat(fruit, seed=0, adapter="pirate").content == PIRATE[FRUIT]
    assert model.chat(fruit, seed=0).content == ANSWERS[FRUIT]  # (the base model, as use_adapter left it)
    assert model.score("Name a fruit.").total == base_score
    model.use_adapter("pirate")
    pirate_score = model.score("Name a fruit.").total
    assert pirate_score != base_score
    assert model.chat(fruit, seed=0, adapter=None).content == PIRATE[FRUIT]  # (None: the one in place)
    assert model.generate([fruit], seed=0, adapter=[None]).text == [ANSWERS[FRUIT]]  # (in a list: the base)
    assert model.score("Name a fruit.").total == pirate_score
    for adapter, message in [
        (["pirate"], r"adapter: give one a row \(2\), got 1"),
        ("parrot", "no adapter named 'parrot'"),
        ([3, None], "adapter: a name, or a list of names"),
    ]:
        with pytest.raises(DiffGemmaError, match=message):
            model.generate([fruit, hello], adapter=adapter)
    with pytest.raises(DiffGemmaError, match=r"no adapter named 'pirate' \(none added"):
        diffgemma.load(DEMO).chat(fruit, adapter="pirate")


def test_an_adapters_own_sampler_settings_are_what_its_generations_start_from(tmp_path):
    """An adapter saved with sampler settings of its own (a generation_config.json beside it: here a longer
    stability window) denoises with them wherever it runs: named by a call, put in place by `use_adapter`, as a
    row beside the base model's (each row with its own, its steps as alone), as an open batch's row; a call's own
    settings go over them, and the base model keeps the model's."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", patient_pirate(tmp_path / "patient-pirate"))
    assert model.sampler_defaults("pirate") == model.settings.replace(stability_threshold=4)
    assert model.sampler_defaults(None) == model.settings
    fruit = [{"role": "user", "content": FRUIT}]
    base = model.generate([fruit], seed=0)
    own = model.generate([fruit], seed=0, adapter="pirate")
    assert base.steps == [[2]] and own.steps == [[5]]  # (a draft stable over four more steps)
    assert model.generate([fruit], seed=0, adapter="pirate", stability_threshold=1).steps == [[2]]
    mixed = model.generate([fruit, fruit], seed=[0, 0], adapter=["pirate", None])
    assert mixed.steps == [[5, 2]] and mixed.text == [*own.text, *base.text]
    model.use_adapter("pirate")
    assert model.generate([fruit], seed=0).steps == [[5]]
    model.use_adapter(None)
    batch = model.open_batch()
    prompt = model.tokenizer.encode_chat(fruit)
    for adapter in ("pirate", None):
        batch.add(BatchRow(prompt, 16, 0, adapter=adapter))
    steps = {event.row: event.steps for event in batch.events() if isinstance(event, RowFinished)}
    assert steps[0][0] > steps[1][0]  # (the pirate's row took its longer window beside the base model's)
    model.remove_adapter("pirate")
    assert model.sampler_defaults("pirate") == model.settings
