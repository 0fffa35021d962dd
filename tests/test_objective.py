"""The training objective: corruption, the training attention path, and that it actually trains."""

import itertools

import torch

import diffgemma
from diffgemma.train.objective import Example, block_diffusion_loss, make_batch
from diffgemma.train.trainer import TrainConfig, epoch_batches, learning_rate, train


def test_corruption_ids_are_valid_and_clean_fraction_tracks_t():
    vocab, length = 300, 64
    examples = [Example([2, 3, 4], list(range(10, 10 + 150)), id=i) for i in range(400)]
    batch = make_batch(examples, length, vocab, eos_id=1, pad_id=0, seed=0, epoch=0)
    assert int(batch.noisy.min()) >= 0 and int(batch.noisy.max()) < vocab
    assert (batch.t > 0).all() and (batch.t < 1).all()
    kept = batch.keep.float().mean(-1)
    # E[kept] = 1 - t per example: the residual averages out over 400 examples
    assert abs(float((kept - (1 - batch.t)).mean())) < 0.02
    assert float(torch.corrcoef(torch.stack([kept, 1 - batch.t]))[0, 1]) > 0.9
    assert torch.equal(batch.noisy[batch.keep], batch.clean[batch.keep])
    # the last canvas is filled with EOS up to its boundary
    assert batch.ids[0, 3 + 150 : 3 + 3 * length].eq(1).all()


def test_corruption_is_seeded_per_example():
    examples = [Example([2, 3], list(range(5, 70)), id=7)]
    a = make_batch(examples, 32, 100, 1, 0, seed=3, epoch=2)
    b = make_batch(examples, 32, 100, 1, 0, seed=3, epoch=2)
    c = make_batch(examples, 32, 100, 1, 0, seed=3, epoch=3)
    assert torch.equal(a.noisy, b.noisy) and a.t == b.t
    assert not torch.equal(a.noisy, c.noisy)


def test_training_attention_path_equals_inference(reference_checkpoints):
    """The decoder in training (one encoder pass, per-row context) sees what inference would have cached."""
    model = diffgemma.load(reference_checkpoints["A"])
    network, config = model.network, model.config
    length = config.canvas_length
    torch.manual_seed(0)
    sequence = torch.randint(3, config.vocab_size, (2, 5 + 3 * length))
    canvas = torch.randint(0, config.vocab_size, (2, length))
    cache = network.new_cache(2, sequence.shape[1], keep_all=True)
    with torch.no_grad():
        network.encode(sequence, cache)
        context_end = torch.tensor([5 + length, 5 + 2 * length])
        training = network.denoise(canvas, cache, context_end=context_end)
        for row in range(2):
            end = int(context_end[row])
            expected = network.denoise_logits(sequence[row : row + 1, :end], canvas[row : row + 1])
            assert (training[row] - expected[0]).abs().max() < 1e-4


def test_loss_falls_on_a_toy_task(tmp_path):
    from diffgemma.presets import random_checkpoint

    model = diffgemma.load(random_checkpoint(tmp_path / "toy", preset="tiny", seed=1))
    examples = [Example([2, 10 + i], [40 + i] * 20 + [60 + i] * 12, id=i) for i in range(4)]
    config = TrainConfig(steps=40, batch_size=4, peak_lr=5e-3, warmup=5, seed=0)
    losses = train(model.network, epoch_batches(examples, 4, 0), config, eos_id=1, pad_id=0, show_progress=False)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3


def test_training_runs_under_bf16_autocast_where_the_device_multiplies_bf16(tmp_path, monkeypatch):
    """Products in bf16, weights and their gradients in float32: on CPUs with bf16 instructions as on GPUs;
    elsewhere, or with DIFFGEMMA_AUTOCAST=0, float32 throughout."""
    from diffgemma.presets import random_checkpoint
    from diffgemma.train import trainer

    model = diffgemma.load(random_checkpoint(tmp_path / "toy", preset="tiny", seed=1))
    examples = [Example([2, 10 + i], [40 + i] * 20, id=i) for i in range(2)]
    seen = []
    model.network.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    for fast, switch, expected in ((True, None, True), (False, None, False), (True, "0", False)):
        monkeypatch.setattr(trainer, "bf16_is_fast", lambda device, fast=fast: fast)
        if switch is None:
            monkeypatch.delenv("DIFFGEMMA_AUTOCAST", raising=False)
        else:
            monkeypatch.setenv("DIFFGEMMA_AUTOCAST", switch)
        seen.clear()
        config = TrainConfig(steps=1, batch_size=2, warmup=1)
        train(model.network, epoch_batches(examples, 2, 0), config, eos_id=1, pad_id=0, show_progress=False)
        assert seen and set(seen) == {expected}, (fast, switch)
        assert all(p.dtype == torch.float32 for p in model.network.parameters())
    assert not trainer.bf16_autocast(torch.device("meta"))  # devices other than CUDA and the CPU: float32


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, peak_lr=1.0, warmup=10)
    assert learning_rate(0, config) == 0.1
    assert learning_rate(9, config) == 1.0
    assert abs(learning_rate(99, config) - 0.1) < 1e-3
    assert 0.1 < learning_rate(50, config) < 1.0


def test_gradients_reach_encoder_and_decoder(tmp_path):
    from diffgemma.presets import random_checkpoint

    model = diffgemma.load(random_checkpoint(tmp_path / "grad", preset="tiny", seed=2))
    network = model.network
    network.requires_grad_(True)
    batch = make_batch([Example([2, 5, 6], list(range(20, 50)), id=0)], 32, 265, 1, 0, seed=0, epoch=0)
    block_diffusion_loss(network, batch).total.backward()
    assert network.self_conditioning.gate_proj.weight.grad is not None
    assert network.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def _recorded_denoise_calls(network, monkeypatch) -> list[tuple]:
    """Every decoder pass of `network` from now on, as (its self-conditioning signal: the distribution, or the
    embeddings the scored pass is given; its mask; its output; whether gradients were on)."""
    calls = []
    denoise = network.denoise

    def recorded(canvas, cache, self_conditioning=None, self_conditioning_mask=None, **kwargs):
        logits = denoise(canvas, cache, self_conditioning, self_conditioning_mask, **kwargs)
        signal = self_conditioning if "soft_embeds" not in kwargs else kwargs["soft_embeds"].detach()
        calls.append((signal, self_conditioning_mask, logits.detach().clone(), torch.is_grad_enabled()))
        return logits

    monkeypatch.setattr(network, "denoise", recorded)
    return calls


def test_detached_passes_each_feed_the_next(tmp_path, monkeypatch):
    """Recycled self-conditioning: k passes without gradients, each given the one before's distribution,
    then the scored pass given the last of them, as embeddings (k = 1 is the recipe's single first pass)."""
    from dataclasses import replace

    from diffgemma.presets import random_checkpoint

    network = diffgemma.load(random_checkpoint(tmp_path / "passes", preset="tiny", seed=3)).network
    batch = make_batch([Example([2, 5, 6], list(range(20, 50)), id=i) for i in range(2)], 32, 265, 1, 0, 0, 0)
    batch = replace(batch, use_self_conditioning=torch.tensor([True, False]))
    calls = _recorded_denoise_calls(network, monkeypatch)
    losses = []
    for passes in (1, 3):
        calls.clear()
        losses.append(float(block_diffusion_loss(network, replace(batch, detached_passes=passes)).diffusion))
        assert len(calls) == passes + 1 and calls[0][0] is None
        assert [grad for *_, grad in calls] == [False] * passes + [True]
        for before, after in itertools.pairwise(calls[:-1]):
            assert torch.allclose(after[0], before[2].softmax(dim=-1))
        with torch.no_grad():  # the scored pass: the last draft's distribution as embeddings
            assert torch.allclose(calls[-1][0], network.soft_embed(calls[-2][2].softmax(dim=-1)), atol=1e-6)
        assert all(mask is None for _, mask, *_ in calls[:-1])
        assert torch.equal(calls[-1][1].cpu(), batch.use_self_conditioning)
    assert losses[0] != losses[1]  # the scored pass saw another draft


def test_resume_continues_exactly(tmp_path):
    """N steps straight, and N/2 + checkpoint + resume + N/2, end with identical weights and losses."""
    from diffgemma.presets import random_checkpoint
    from diffgemma.train.trainer import save_state

    folder = random_checkpoint(tmp_path / "start", preset="tiny", seed=4)
    examples = [Example([2, 10 + i, 11], list(range(30 + i, 70 + i)), id=i) for i in range(6)]
    config = TrainConfig(steps=8, batch_size=3, peak_lr=3e-3, warmup=2, seed=1)
    batches = epoch_batches(examples, config.batch_size, config.seed)

    straight = diffgemma.load(folder)
    straight_losses = train(straight.network, batches, config, 1, 0, show_progress=False)

    halves = diffgemma.load(folder)
    state_dir = tmp_path / "run"

    def checkpoint(step, optimizer, losses):
        halves.save(state_dir)
        save_state(state_dir, step, optimizer, config, losses)

    train(halves.network, batches, config, 1, 0, show_progress=False, checkpoint=checkpoint, stop_at=4)
    resumed = diffgemma.load(state_dir)
    resumed_losses = train(resumed.network, batches, config, 1, 0, show_progress=False, resume_from=state_dir)

    assert resumed_losses == straight_losses
    for (name, a), (_, b) in zip(
        straight.network.state_dict().items(), resumed.network.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from server_util import free_port

    from diffgemma.presets import random_checkpoint

    folder = random_checkpoint(tmp_path / "start", preset="tiny", seed=5)
    worker = Path(__file__).with_name("ddp_worker.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(worker),
        str(folder),
        str(tmp_path),
    ]
    log = tmp_path / "torchrun.log"
    with log.open("w") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=300).returncode
    assert code == 0, log.read_text()[-3000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start = diffgemma.load(folder).network.state_dict()
    changed = False
    for name, weight in first["state"].items():
        assert torch.equal(weight, second["state"][name]), name
        changed |= not torch.equal(weight, start[name])
    assert changed  # they trained, and stayed in step
    assert first["losses"] != second["losses"]  # each rank saw its own batches


def test_a_prior_feeds_the_first_pass_and_bounds_every_draft(tmp_path, monkeypatch):
    """A task's prior (sudoku's candidates) is the first pass's self-conditioning, the scored pass's for rows
    without self-conditioning, and every draft's support; each row's drafts take its temperature."""
    from dataclasses import replace

    from diffgemma.presets import random_checkpoint

    network = diffgemma.load(random_checkpoint(tmp_path / "prior", preset="tiny", seed=3)).network
    vocabulary = network.config.vocab_size
    batch = make_batch([Example([2, 5, 6], list(range(20, 50)), id=i) for i in range(2)], 32, vocabulary, 1, 0, 0, 0)
    support = torch.rand(2, 32, vocabulary, generator=torch.Generator().manual_seed(0)) < 0.3
    support[..., 7] = True  # every position keeps an id
    support.scatter_(-1, batch.clean[..., None], True)  # and its right one
    prior = support.float() / support.sum(-1, keepdim=True)
    temperature = torch.tensor([0.5, 2.0])
    batch = replace(
        batch,
        use_self_conditioning=torch.tensor([True, False]),
        detached_passes=2,
        self_conditioning_prior=prior,
        draft_temperature=temperature,
    )
    calls = _recorded_denoise_calls(network, monkeypatch)
    block_diffusion_loss(network, batch)
    assert len(calls) == 3 and torch.equal(calls[0][0], prior)
    drafts = [
        (logits / temperature[:, None, None]).masked_fill(~support, float("-inf")).softmax(-1)
        for _, _, logits, _ in calls[:2]
    ]
    assert torch.allclose(calls[1][0], drafts[0]) and bool((calls[1][0][~support] == 0).all())
    scored, mask = calls[2][0], calls[2][1]  # the scored pass's signal, as embeddings
    assert mask is None  # the prior stands in for "no signal"
    with torch.no_grad():
        assert torch.allclose(scored, network.soft_embed(torch.stack([drafts[1][0], prior[1]])), atol=1e-6)


def _training_network(seed: int, **shape):
    from diffgemma.config import parse_model_config
    from diffgemma.model import DiffusionGemma
    from diffgemma.presets import init_random_, preset_config

    torch.manual_seed(seed)
    network = DiffusionGemma(parse_model_config(preset_config("tiny", **shape), "tiny"))
    init_random_(network, seed)
    return network


def _loss_and_gradients(network, batch):
    from test_engine import PeakMemory

    network.zero_grad(set_to_none=True)
    with PeakMemory() as memory:
        losses = block_diffusion_loss(network, batch)
        losses.total.backward()
    gradients = {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}
    return losses, gradients, memory.peak


def _assert_same(losses, gradients, expected_losses, expected_gradients):
    for name in ("diffusion", "autoregressive"):
        assert torch.allclose(getattr(losses, name), getattr(expected_losses, name), rtol=1e-5), name
    assert gradients.keys() == expected_gradients.keys()
    for name, grad in gradients.items():
        scale = expected_gradients[name].abs().max().clamp_min(1e-12)
        assert (grad - expected_gradients[name]).abs().max() / scale < 1e-4, name


def test_the_head_loss_goes_a_chunk_of_tokens_at_a_time_with_the_same_loss_and_gradients(monkeypatch):
    """Past LOSS_CHUNK_BYTES of float32 logits the loss scores the tokens a chunk at a time and makes each
    chunk's logits again in the backward pass: the loss and every gradient as with the whole batch's logits,
    at a fraction of the memory (here the vocabulary dominates, as the 26B's does)."""
    from diffgemma.train import objective

    vocab = 20000
    network = _training_network(5, vocab_size=vocab)
    examples = [Example([2, 5, 6, 7], list(range(20, 90)), id=i) for i in range(3)]
    batch = make_batch(examples, 32, vocab, 1, 0, seed=0, epoch=0)
    monkeypatch.setattr(objective, "LOSS_CHUNK_BYTES", 2**40)
    whole_losses, whole_gradients, whole_peak = _loss_and_gradients(network, batch)

    chunk = 8
    monkeypatch.setattr(objective, "LOSS_CHUNK_BYTES", 4 * vocab * chunk)
    head_rows = []
    head = network.head

    def recorded_head(hidden, *args, **kwargs):
        if hidden.ndim == 2:  # the loss's rows (the detached draft's pass gives [batch, canvas, hidden])
            head_rows.append(hidden.shape[0])
        return head(hidden, *args, **kwargs)

    monkeypatch.setattr(network, "head", recorded_head)
    losses, gradients, peak = _loss_and_gradients(network, batch)
    _assert_same(losses, gradients, whole_losses, whole_gradients)
    # 96 canvas tokens and 3 x 99 next-token pairs (valid ones only), each chunk's logits made twice
    scored = 96 + 3 * (4 + 96 - 1)
    assert max(head_rows) == chunk and sum(head_rows) == 2 * scored
    assert peak < 0.4 * whole_peak, (peak, whole_peak)


def test_checkpointed_layers_give_the_same_gradients_and_hold_less(monkeypatch):
    """Gradient checkpointing (`checkpoint_layers`): each layer's halves around attention run again in the
    backward pass; the loss and every gradient are those of a pass that kept its activations, and the peak
    falls where the layers dominate (a small vocabulary, a long sequence)."""
    network = _training_network(6)
    examples = [Example([2, 5, 6, 7], list(range(20, 210)), id=i) for i in range(4)]
    batch = make_batch(examples, 32, network.config.vocab_size, 1, 0, seed=0, epoch=0)
    kept_losses, kept_gradients, kept_peak = _loss_and_gradients(network, batch)

    runs = []
    layer = network.layers[1]
    feed_forward = layer.feed_forward
    monkeypatch.setattr(layer, "feed_forward", lambda *a: runs.append(torch.is_grad_enabled()) or feed_forward(*a))
    network.checkpoint_layers()
    losses, gradients, peak = _loss_and_gradients(network, batch)
    _assert_same(losses, gradients, kept_losses, kept_gradients)
    # forward: the encoder, the detached draft (no gradients), the scored pass; backward: the encoder and the
    # scored pass again
    assert runs == [True, False, True, True, True]
    assert peak < 0.6 * kept_peak, (peak, kept_peak)
    network.checkpoint_layers(False)
    runs.clear()
    _loss_and_gradients(network, batch)
    assert len(runs) == 3


def test_the_scored_pass_holds_no_distribution_when_the_embedding_is_frozen(monkeypatch):
    """The scored pass gets the draft's distribution as embeddings; with the embedding frozen (LoRA) nothing
    keeps the vocabulary-sized distribution while the layers run, as autograd does when the embedding trains."""
    import weakref

    network = _training_network(7, vocab_size=2000)
    batch = make_batch([Example([2, 5, 6], list(range(20, 60)), id=0)], 32, 2000, 1, 0, seed=0, epoch=0)
    distributions, alive = [], []
    soft_embed = network.soft_embed
    layer = network.layers[0]
    feed_forward = layer.feed_forward

    def recorded_soft_embed(probs):
        distributions.append(weakref.ref(probs))
        return soft_embed(probs)

    def recorded_feed_forward(*args):
        if distributions:  # the scored pass (the one detached pass had no signal to embed)
            alive.append(distributions[-1]() is not None)
        return feed_forward(*args)

    monkeypatch.setattr(network, "soft_embed", recorded_soft_embed)
    monkeypatch.setattr(layer, "feed_forward", recorded_feed_forward)
    for embedding_trains in (False, True):
        network.embed_tokens.weight.requires_grad_(embedding_trains)
        distributions.clear()
        alive.clear()
        block_diffusion_loss(network, batch).total.backward()
        assert alive == [embedding_trains], (embedding_trains, alive)
