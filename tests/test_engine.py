"""The engine's promises, checked on the CPU: no host synchronisation inside a denoising step, a sampler
that adds no vocabulary-sized tensor, and the GPU benchmark script running end to end at a tiny shape.

Host-synchronising tensor operations (bool(), item(), tolist(), nonzero(), boolean-mask indexing, .cpu(),
...) are counted with a TorchFunctionMode; on a GPU, bench/gpu.py runs the same loop under
torch.cuda.set_sync_debug_mode. Allocations are tracked with a TorchDispatchMode that follows every tensor
an operation makes until it is freed.
"""

import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import diffgemma
from diffgemma.errors import DiffGemmaError
from diffgemma.generate import Draft, RandomSource, denoising_loop, sampler_step
from diffgemma.model import GPU_GROUP_ALIGN

SYNCING = {"__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "cpu", "numpy", "masked_select"}


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        indexes = args[1:2] if name in ("__getitem__", "__setitem__") else ()
        if name in SYNCING or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indexes):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _syncs_between_drafts(model, every: int | None, **cut) -> list[tuple[int, int]]:
    """(step, host syncs since the previous draft of the same canvas) for every draft after a canvas's first;
    `cut`: top_k / top_p / min_p."""
    settings = model.settings.replace(max_denoising_steps=12, max_new_tokens=2 * model.config.canvas_length, **cut)
    ids = torch.tensor([[2, 30, 31, 32], [2, 40, 41, 42]])
    events = denoising_loop(
        model.network, settings, ids, seed=[1, 2], stop_at_eos=False, stop_check_every=every, sync_free=every != 1
    )
    seen, counter = [], SyncCounter()
    # The experts as CUDA lays them out: the CPU's own layout reads the largest group's size, a free read
    # there that the counter would see and that CUDA never makes.
    all_experts = [layer.experts for layer in model.network.layers]
    for experts in all_experts:
        experts.group_align = GPU_GROUP_ALIGN
    try:
        with counter:
            for event in events:
                if isinstance(event, Draft):
                    if event.step > 1:
                        seen.append((event.step, counter.count))
                    counter.count = 0
    finally:
        for experts in all_experts:
            experts.group_align = None
    return seen


@pytest.mark.parametrize(
    "cut", [{}, {"top_k": 20, "top_p": 0.9}, {"top_p": 0.8, "min_p": 0.05}], ids=["plain", "top-k top-p", "top-p min-p"]
)
def test_fast_loop_reads_the_device_only_at_stop_checks(tiny, cut):
    seen = _syncs_between_drafts(tiny, every=4, **cut)
    assert len(seen) >= 11  # the random tiny model never converges: every canvas runs its 12 steps
    for step, syncs in seen:
        # what runs between draft k-1 and draft k: the stop check of step k-1, then all of step k
        assert syncs == (1 if (step - 1) % 4 == 0 else 0), (step, syncs)


def test_the_counter_sees_the_reads_the_cpu_way_makes(tiny):
    seen = _syncs_between_drafts(tiny, every=1)
    # the CPU way: the stop check every step, the sampler reads which positions were accepted, and the loop
    # reads which rows still run (those alone go through the decoder: `RowSubset`)
    assert seen and all(syncs == 3 for _, syncs in seen), seen


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors made inside the block and still alive (freed ones are subtracted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.seen or storage.nbytes() == 0:
                continue  # an in-place result or a view: no new memory
            self.seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


@pytest.mark.parametrize("sync_free", [False, True], ids=["cpu way", "accelerator way"])
@pytest.mark.parametrize("peaked", [False, True], ids=["few accepted", "all accepted"])
def test_sampler_step_adds_no_vocabulary_sized_tensor(sync_free, peaked):
    """Beyond the logits and its preallocated distribution buffer, one fast sampler step allocates less
    than a tenth of one [batch, canvas, vocabulary] float32 tensor (the GPU script measures vocab 262,144),
    however many positions it accepts (the CPU's way samples the accepted ones only)."""
    batch, length, vocab = 8, 64, 16384
    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(0))
    if peaked:  # one token far ahead at every position: every entropy is about 0
        logits[..., 7] += 40.0
    probs = torch.empty_like(logits)
    canvas = torch.zeros(batch, length, dtype=torch.long)
    rng = RandomSource("fast", batch, torch.device("cpu"), 0)
    rng.sync_free = sync_free
    one = logits.numel() * logits.element_size()
    with PeakMemory() as memory:
        out = sampler_step(logits, canvas, 0.5, rng, None, probs)
    assert out.probs is probs
    assert bool(out.accept.all()) if peaked else 0 < int(out.accept.sum()) < batch * length
    assert 0 < memory.peak < 0.1 * one, memory.peak / one
    # and the tracker does see a vocabulary-sized temporary when one is made
    with PeakMemory() as memory:
        torch.softmax(logits, dim=-1)
    assert memory.peak >= one


def test_top_k_and_top_p_cut_in_chunks_of_bounded_memory(monkeypatch):
    """The cut works a chunk of positions at a time (`TRUNCATE_CHUNK` elements): its sort's values, indices,
    running sums and masks come to a few chunks (16 positions of the 26B's vocabulary: 116 MiB), whatever
    the batch and canvas."""
    from diffgemma import sampling

    batch, length, vocab = 8, 64, 16384
    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(sampling, "TRUNCATE_CHUNK", 16 * vocab)
    chunk = 16 * vocab * logits.element_size()
    with PeakMemory() as memory:
        sampling.truncate(logits, 100, 0.9, scale=torch.tensor(0.5))
    assert (logits == sampling.MASKED_LOGIT).any()
    assert 4 * chunk < memory.peak <= 7.5 * chunk, memory.peak / chunk


@pytest.mark.parametrize("host_reads", [False, True], ids=["accelerator way", "cpu way"])
def test_penalties_work_in_bounded_memory(monkeypatch, host_reads):
    """The penalties add to the logits in place: the repetition penalty a chunk of positions at a time
    (`TRUNCATE_CHUNK` elements: a few chunks' temporaries, whatever the batch and canvas) or, the CPU's way,
    through the seen tokens' columns alone; the presence and frequency penalties as one [B, V] row."""
    from diffgemma import sampling

    batch, length, vocab = 8, 64, 16384
    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(batch, vocab)
    counts[:, :300] = 2.0
    seen = counts > 0
    monkeypatch.setattr(sampling, "TRUNCATE_CHUNK", 16 * vocab)
    chunk = 16 * vocab * logits.element_size()
    before = logits.clone()
    with PeakMemory() as memory:
        sampling.penalize(logits, counts, seen, 0.5, 0.5, 1.3, torch.tensor(0.5), host_reads=host_reads)
    assert not torch.equal(logits[:, :, :300], before[:, :, :300]) and torch.equal(
        logits[:, :, 300:], before[:, :, 300:] - 0.0
    )
    assert 0 < memory.peak <= 4.5 * chunk, memory.peak / chunk  # (the logits are 32 chunks)


def _cuda_like_attention(q, k, v, mask):
    """`model._sdpa`'s CUDA branch where flash attention cannot serve (a mask): `grouped_attention`."""
    import diffgemma.model as model_module

    if q.shape[1] != k.shape[1]:
        return model_module.grouped_attention(q, k, v, mask)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


@pytest.mark.parametrize("mask_kind", ["per query", "per key", "none"])
@pytest.mark.parametrize("queries", [5, 200])
def test_grouped_attention_equals_repeated_heads(mask_kind, queries):
    """CUDA's path for grouped heads that no fused kernel takes (`grouped_attention`: query heads stacked, or
    keys and values repeated, whichever copy is smaller) against the keys and values repeated to every query
    head, float32 and bf16, batch rows with their own masks; both of its ways are taken."""
    from diffgemma.model import grouped_attention, stacks_heads

    generator = torch.Generator().manual_seed(3)
    batch, heads, key_heads, keys, dim = 2, 8, 2, 37, 16
    q = torch.randn(batch, queries, heads, dim, generator=generator).transpose(1, 2)  # as projected: a view
    k = torch.randn(batch, key_heads, keys, dim, generator=generator)
    v = torch.randn(batch, key_heads, keys, dim, generator=generator)
    rows = {"per query": queries, "per key": 1, "none": 0}[mask_kind]
    mask = torch.rand(batch, 1, rows, keys, generator=generator) > 0.4 if rows else None
    if mask is not None:
        mask[..., 0] = True  # no empty row
    # a long per-query mask costs more stacked than the keys repeated; otherwise the heads are stacked
    assert stacks_heads(q, k, mask) is (mask_kind != "per query" or queries == 5)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        args = [t.to(dtype) for t in (q, k, v)]
        repeated = [t.repeat_interleave(heads // key_heads, dim=1) for t in args[1:]]
        expected = torch.nn.functional.scaled_dot_product_attention(args[0], *repeated, attn_mask=mask, scale=1.0)
        out = grouped_attention(*args, mask)
        assert out.shape == expected.shape and out.dtype == dtype
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


ACTIVATION_SHAPES = {
    "experts": dict(
        vocab_size=3000, hidden_size=256, intermediate_size=512, num_experts=16, top_k_experts=4,
        moe_intermediate_size=256, sliding_window=64,
    ),
    "attention": dict(
        vocab_size=3000, hidden_size=128, intermediate_size=256, num_experts=8, top_k_experts=2,
        moe_intermediate_size=64, sliding_window=64, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        global_head_dim=256, num_global_key_value_heads=1,
    ),
    "vocabulary": dict(
        vocab_size=40000, hidden_size=64, intermediate_size=128, num_experts=8, top_k_experts=2,
        moe_intermediate_size=64, sliding_window=64,
    ),
}  # fmt: skip


def _cuda_like_network(monkeypatch, shape: dict, dtype: torch.dtype):
    """A random network of the tiny preset with `shape`'s overrides and a 64-token canvas, run as on CUDA: the
    expert layout, the vocabulary slices and the attention branch for grouped heads."""
    import diffgemma.model as model_module
    from diffgemma.config import parse_model_config
    from diffgemma.presets import init_random_, preset_config

    monkeypatch.setattr(model_module, "_sdpa", _cuda_like_attention)
    monkeypatch.setattr(model_module, "HEAD_SLICE", model_module.VOCAB_SLICE)
    raw = preset_config("tiny", **shape)
    raw["canvas_length"] = 64
    config = parse_model_config(raw, "a CUDA-like test shape")
    with torch.device("meta"):
        network = model_module.DiffusionGemma(config)
    network = network.to(dtype).to_empty(device="cpu").eval()
    init_random_(network, 0)
    for layer in network.layers:
        layer.experts.group_align = GPU_GROUP_ALIGN
    return network, config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(ACTIVATION_SHAPES))
def test_activation_estimate_matches_what_a_pass_allocates(kind, dtype, monkeypatch):
    """`info`'s activation figures (`model.activation_bytes`) against the tensors a prompt's encoding and a
    denoising step allocate, on shapes where the experts, attention (grouped heads as on CUDA) or the
    vocabulary slices dominate; the expert layout and the vocabulary slices as on CUDA."""
    import diffgemma.model as model_module

    network, config = _cuda_like_network(monkeypatch, ACTIVATION_SHAPES[kind], dtype)
    batch, prompt = (3, 300) if dtype == torch.float32 else (2, 1100)  # one chunk; three chunks
    generator = torch.Generator().manual_seed(0)
    cache = network.new_cache(batch, prompt + 64)
    with torch.no_grad():
        with PeakMemory() as encoding:
            ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=generator)
            network.encode(ids, cache, return_hidden=False)  # as generation encodes
        canvas = torch.randint(3, config.vocab_size, (batch, 64), generator=generator)
        probs = torch.randn(batch, 64, config.vocab_size, generator=generator).softmax(-1)
        logits = torch.empty(batch, 64, config.vocab_size)
        with PeakMemory() as step:
            network.denoise(canvas, cache, probs, logits_out=logits)
    step_estimate, prompt_estimate = model_module.activation_bytes(config, prompt, batch, dtype.itemsize)
    assert 0.9 < step.peak / step_estimate < 1.1, (step.peak, step_estimate)
    assert 0.9 < encoding.peak / prompt_estimate < 1.1, (encoding.peak, prompt_estimate)


def test_prompt_estimate_takes_the_largest_chunk_without_visiting_each():
    """The prompt's figure is its largest chunk's, found from the last two chunks alone (so a context of a
    billion tokens is answered at once): the same as the maximum over every chunk."""
    import diffgemma.model as model_module
    from diffgemma.config import parse_model_config
    from diffgemma.presets import preset_config

    config = parse_model_config(preset_config("tiny"), "tiny")
    chunk = model_module.PREFILL_CHUNK
    for context in (0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk, 3 * chunk + 7, 5 * chunk - 1):
        each = [
            model_module.activation_bytes(config, start + min(chunk, context - start), 1, 2)[1]
            for start in range(0, context, chunk)
        ]
        assert model_module.activation_bytes(config, context, 1, 2)[1] == max(each, default=0), context
    assert model_module.activation_bytes(config, 10**9, 1, 2)[1] > 0


@pytest.mark.parametrize("dtype, batch, prompt", [(torch.float32, 1, 700), (torch.bfloat16, 2, 1100)])
def test_memory_estimate_of_a_whole_generation(dtype, batch, prompt, monkeypatch):
    """`info`'s parts for a prompt that fills the context (cache, sampler buffers, the larger pass's
    temporaries: the CPU has one memory pool) against every tensor a whole generation allocates, expert
    layout, vocabulary slices and grouped attention as on CUDA; two canvases, the second shorter."""
    from diffgemma.config import SamplerSettings
    from diffgemma.quant import memory_estimate

    network, config = _cuda_like_network(monkeypatch, ACTIVATION_SHAPES["experts"] | {"vocab_size": 20000}, dtype)
    settings = SamplerSettings(max_denoising_steps=3, max_new_tokens=100)
    ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with PeakMemory() as memory:
        for _ in denoising_loop(network, settings, ids, seed=0, stop_at_eos=False):
            pass
    parts = memory_estimate(config, dtype, None, prompt + 64, batch)  # the cache's last canvas is spare slots
    estimate = parts["cache"] + parts["sampler"] + max(parts["step"], parts["prompt"])
    assert 0.9 < memory.peak / estimate < 1.05, (memory.peak, parts)


def test_gpu_benchmark_dry_run_at_a_tiny_shape():
    script = Path(__file__).parent.parent / "bench" / "gpu.py"
    command = [sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--dtype", "float32"]
    command += ["--formats", "none,int4", "--iters", "1", "--prompt", "8", "--batches", "1", "--no-append"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("diffgemma fp32 | 1", "diffgemma int4 (fp32 rest) | 1", "transformers (eager) | 1", "sampler cuts"):
        assert row in done.stdout, row
    assert "failed" not in done.stdout, done.stdout


def test_expert_layouts_give_the_same_output_and_gradients(tiny):
    """The experts' rows packed (group_align 1), aligned to 16 as CUDA lays them out, and padded to the largest
    group for one batched product (the CPU's choice, None here) must compute the same thing, forward and
    backward, and a per-token loop over the experts' weights agrees with all three."""
    experts = tiny.network.layers[0].experts
    generator = torch.Generator().manual_seed(0)
    top_k = tiny.config.top_k_experts
    x = torch.randn(37, tiny.config.hidden_size, generator=generator, requires_grad=True)
    spread = torch.randint(0, experts.num_experts, (37, top_k), generator=generator)
    skewed = torch.stack([torch.zeros(37, dtype=torch.long), torch.ones(37, dtype=torch.long)], 1)[:, :top_k]
    weights = torch.rand(37, top_k, generator=generator)
    for routing in (spread, skewed):  # skewed: padding all groups to the largest would pass 2x, so packed
        expected = torch.stack(
            [
                sum(
                    float(weights[t, j])
                    * experts.down_proj[e]
                    @ (
                        experts.act(experts.gate_up_proj[e, : experts.down_proj.shape[2]] @ x[t])
                        * (experts.gate_up_proj[e, experts.down_proj.shape[2] :] @ x[t])
                    )
                    for j, e in enumerate(routing[t].tolist())
                )
                for t in range(37)
            ]
        ).detach()
        results = []
        for align in (1, 16, None):
            experts.group_align = align
            with torch.enable_grad():
                out = experts(x, routing, weights)
                (grad,) = torch.autograd.grad(out.square().sum(), x)
            results.append((out.detach(), grad))
        experts.group_align = None
        assert torch.allclose(results[0][0], expected, atol=1e-5)
        for out, grad in results[1:]:
            assert torch.allclose(results[0][0], out, atol=1e-6)
            assert torch.allclose(results[0][1], grad, atol=1e-5)

    def layout(routing: torch.Tensor, align: int | None) -> tuple:
        routed = routing.reshape(-1)
        rank = torch.tensor([int((routed[:p] == e).sum()) for p, e in enumerate(routed.tolist())])
        sizes = torch.bincount(routed, minlength=experts.num_experts).int()
        experts.group_align = align
        try:
            slot, ends, slots = experts.group_layout(x, routed, rank, sizes)
        finally:
            experts.group_align = None
        assert slot.unique().numel() == slot.numel() and int(slot.max()) < slots
        first = torch.full((experts.num_experts,), -1).scatter_(0, routed[rank == 0], slot[rank == 0])
        assert torch.equal(slot, first[routed] + rank)  # a group's pairs sit one after another, in rank order
        return routed, sizes, slot, ends, slots, first

    routed, sizes, slot, ends, slots, first = layout(spread, None)  # the CPU's batched layout
    capacity = int(sizes.max())
    assert ends is None and slots == experts.num_experts * capacity and torch.equal(slot // capacity, routed)
    assert layout(skewed, None)[3] is not None  # too skewed to pad: packed, with cumulative group ends
    _, _, slot, ends, slots, _ = layout(spread, 1)
    assert slots == routed.numel() and torch.equal(ends, torch.cumsum(sizes, 0).int())
    _, _, slot, ends, slots, first = layout(spread, 16)
    assert bool((ends % 16 == 0).all()) and int(ends[-1]) <= slots == routed.numel() + 15 * experts.num_experts
    assert bool((first[sizes > 0] % 16 == 0).all()) and bool(
        (ends - torch.cat([ends.new_zeros(1), ends[:-1]]) >= sizes).all()
    )


def test_graph_path_gives_the_eager_drafts_over_several_canvases(tiny):
    """`cuda_graph` sends every step through one `DecoderGraph` (a static view of the cache, a zeroed
    distribution on a canvas's first step); off CUDA that pass runs uncaptured, so here it must give the
    eager loop's drafts exactly, across canvases and with left-padded rows (bench/gpu.py checks the
    captured replay against eager logits on the device)."""
    from diffgemma.config import SamplerSettings

    length = tiny.config.canvas_length
    settings = SamplerSettings(max_denoising_steps=5, max_new_tokens=3 * length)
    prompt = torch.tensor([[0, 0, 2, 40], [2, 40, 41, 42]])
    mask = prompt != 0
    runs = []
    for cuda_graph in (False, True):
        events = denoising_loop(
            tiny.network, settings, prompt, mask, seed=3, stop_at_eos=False, stop_check_every=1, cuda_graph=cuda_graph
        )
        runs.append([(event.canvas_index, event.ids.clone()) for event in events if isinstance(event, Draft)])
    assert len(runs[0]) == len(runs[1]) > 3
    assert {canvas for canvas, _ in runs[1]} == {0, 1, 2}
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(*runs, strict=True))


def test_decoder_view_matches_the_sliced_cache(tiny):
    """A pass through a `DecoderView` (every slot, unwritten ones masked) gives the logits of the plain pass,
    before and after a canvas is encoded (the view refreshes in place), and a zero distribution gives the
    logits of no self-conditioning."""
    from diffgemma.cache import DecoderView

    network, length, vocab = tiny.network, tiny.config.canvas_length, tiny.config.vocab_size
    generator = torch.Generator().manual_seed(5)
    cache = network.new_cache(2, 4 + 2 * length)
    view = DecoderView(cache, length)
    with torch.no_grad():
        prompt = torch.tensor([[0, 2, 40, 41], [2, 40, 41, 42]])
        network.encode(prompt, cache, prompt != 0)
        for _ in range(2):
            canvas = torch.randint(0, vocab, (2, length), generator=generator)
            probs = torch.rand(2, length, vocab, generator=generator).softmax(-1)
            plain = network.denoise(canvas, cache, probs)
            viewed = network.denoise(canvas, cache, probs, view=view)
            torch.testing.assert_close(viewed, plain, rtol=1e-5, atol=1e-5)
            no_signal = network.denoise(canvas, cache, None)
            torch.testing.assert_close(network.denoise(canvas, cache, torch.zeros_like(probs), view=view), no_signal)
            network.encode(canvas, cache)
    assert view.cache_length == cache.length - length


def test_sampling_logits_are_the_tempered_logits_up_to_a_constant(tiny):
    """The fast loop asks the head for sampling logits (temperature folded in, the cap's constant dropped):
    the same distribution, entropy and argmax as the capped logits divided by the temperature."""
    network = tiny.network
    hidden = torch.randn(2, 5, tiny.config.hidden_size)
    with torch.no_grad():
        exact = network.head(hidden) / 0.7
        buffer = torch.empty(2, 5, tiny.config.vocab_size)
        scaled = network.head(hidden, buffer, torch.tensor(1 / 0.7))
    assert scaled.data_ptr() == buffer.data_ptr()
    shift = scaled - exact
    assert float((shift - shift.mean()).abs().max()) < 1e-3  # one constant everywhere
    assert torch.allclose(scaled.softmax(-1), exact.softmax(-1), atol=1e-6)
    assert torch.equal(scaled.argmax(-1), exact.argmax(-1))


@pytest.mark.parametrize("onednn", [True, False])
def test_the_cpu_head_in_vocabulary_slices_is_the_whole_product(tiny, monkeypatch, onednn):
    """Into a buffer the CPU computes the logits a slice of the vocabulary at a time (oneDNN on float32, or
    F.linear where the build lacks it); with slices that do not divide the vocabulary, the result is the one
    product's, capped the same way."""
    import diffgemma.model as model_module

    vocab = tiny.config.vocab_size
    monkeypatch.setattr(model_module, "HEAD_SLICE", vocab // 5 + 3)  # five full slices and a partial one
    if not onednn:
        monkeypatch.setattr(model_module, "_ONEDNN_LINEAR", None)
    hidden = torch.randn(2, 5, tiny.config.hidden_size)
    with torch.no_grad():
        whole = tiny.network.head(hidden)
        buffer = torch.full((2, 5, vocab), float("nan"))
        sliced = tiny.network.head(hidden, buffer)
    assert sliced.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_self_conditioning_casts_the_distribution_a_vocabulary_slice_at_a_time(tiny, monkeypatch):
    """bf16 weights and a float32 distribution: the soft embedding is summed over slices of the vocabulary (in
    float32), so the whole distribution is never cast to bf16, and it is the one product's within bf16 rounding."""
    import copy

    import diffgemma.model as model_module

    network = copy.deepcopy(tiny.network).to(torch.bfloat16)
    vocab = 16384  # a vocabulary large beside the hidden size, as in the real model, so a cast copy stands out
    network.embed_tokens.weight = torch.nn.Parameter(torch.randn(vocab, tiny.config.hidden_size) * 0.05)
    network.embed_tokens.to(torch.bfloat16)
    monkeypatch.setattr(model_module, "VOCAB_SLICE", vocab // 7 + 5)  # seven full slices and a partial one
    probs = torch.randn(3, 16, vocab).softmax(-1)
    with torch.no_grad():
        whole = (probs.to(torch.bfloat16) @ network.embed_tokens.weight) * network.config.embed_scale
        with PeakMemory() as memory:
            sliced = network.soft_embed(probs)
    assert sliced.dtype == torch.bfloat16
    torch.testing.assert_close(sliced.float(), whole.float(), rtol=0.02, atol=0.02 * float(whole.abs().max()))
    assert memory.peak < probs.numel() * 2 / 4, memory.peak / (probs.numel() * 2)  # a bf16 copy would be all of it


def test_the_head_of_bf16_weights_makes_no_whole_bf16_logits(tiny):
    """Without a buffer (and gradients) bf16 weights' logits go a vocabulary slice at a time into a new float32
    tensor: the one product's values, and no bf16 copy of the whole logits beside them (it was 1.5 times the
    float32 logits at once)."""
    import copy

    network = copy.deepcopy(tiny.network).to(torch.bfloat16)
    vocab = 16384  # several of the CPU's slices
    network.embed_tokens.weight = torch.nn.Parameter(torch.randn(vocab, tiny.config.hidden_size) * 0.05)
    network.embed_tokens.to(torch.bfloat16)
    hidden = torch.randn(3, 16, tiny.config.hidden_size).bfloat16()
    cap = network.config.final_logit_softcapping
    with torch.no_grad():
        expected = torch.tanh(torch.nn.functional.linear(hidden, network.embed_tokens.weight).float() / cap) * cap
        with PeakMemory() as memory:
            logits = network.head(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert memory.peak < 1.2 * logits.numel() * 4, memory.peak / (logits.numel() * 4)


def test_compiled_decoder_layers_match_eager(tiny):
    """`compile_decoder` (torch.compile of each layer's two halves) computes what the eager halves compute, and
    a whole decoder pass through it stays close to the eager pass (bf16: its kernels round differently)."""
    import copy

    network = copy.deepcopy(tiny.network).to(torch.bfloat16)
    config, length = tiny.config, tiny.config.canvas_length
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, length, config.hidden_size, generator=generator).bfloat16()
    network.compile_decoder()
    assert network.compiled_decoder and all(layer.compiled is not None for layer in network.layers)
    with torch.no_grad():
        for layer in (network.layers[0], network.layers[-1]):
            head_dim = config.layers[layer.index].head_dim
            attended = torch.randn(1, config.num_attention_heads, length, head_dim, generator=generator).bfloat16()
            eager = layer.feed_forward(hidden, attended, layer.layer_scalar).float()
            fused = layer.compiled[1](hidden, attended, layer.layer_scalar).float()
            assert float((fused - eager).norm() / eager.norm()) < 2e-2
            cos, sin = (t.bfloat16() for t in torch.randn(2, 1, length, 1, head_dim, generator=generator))
            for a, b in zip(layer.attention_inputs(hidden, cos, sin), layer.compiled[0](hidden, cos, sin), strict=True):
                assert float((b.float() - a.float()).norm() / a.float().norm()) < 2e-2


def test_compile_option_refuses_float32_off_cuda(tiny):
    with pytest.raises(DiffGemmaError, match="compile=True needs dtype bfloat16 on cpu"):
        diffgemma.load(tiny.folder, compile=True)


def test_compiled_decoder_also_encodes_finished_canvases(tiny):
    """A canvas-length encode goes through the compiled halves (the decoder's shape) and writes keys as close
    to float32's as the eager bf16 encode does; a prompt of another length stays eager."""
    import copy

    length, vocab = tiny.config.canvas_length, tiny.config.vocab_size
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(4))

    def encoded(network):
        cache = network.new_cache(1, 4 + length)
        with torch.no_grad():
            network.encode(torch.tensor([[2, 40, 41, 42]]), cache)
            network.encode(ids, cache)
        return cache

    network = copy.deepcopy(tiny.network).to(torch.bfloat16)
    exact, eager = encoded(tiny.network), encoded(network)
    network.compile_decoder()
    fused = encoded(network)
    # The first two layers' keys (deeper, bf16 rounding flips expert choices of a random MoE either way).
    for index in (0, 1):
        slots = exact.layers[index].ring or 4 + length
        reference = exact.layers[index].keys[:, :, :slots]
        error = {
            name: float((cache.layers[index].keys[:, :, :slots].float() - reference).norm() / reference.norm())
            for name, cache in (("eager", eager), ("fused", fused))
        }
        assert error["fused"] < 2 * error["eager"] + 1e-3, error
    calls = []
    for layer in network.layers:
        compiled_inputs, compiled_rest = layer.compiled
        layer.compiled = (lambda *a, f=compiled_inputs: calls.append(1) or f(*a), compiled_rest)
    with torch.no_grad():
        network.encode(ids, network.new_cache(1, length))
        assert len(calls) == len(network.layers)
        network.encode(ids[:, :5], network.new_cache(1, 5))
        assert len(calls) == len(network.layers)


def test_long_prompts_are_encoded_in_chunks_with_the_same_result(tiny, monkeypatch):
    """Without gradients a prompt longer than PREFILL_CHUNK is encoded chunk by chunk (bounded activations);
    the cache, the hidden states and the decoder's logits over it are those of one pass (up to float32
    summation order), with left padding and a sliding window shorter than the prompt."""
    import diffgemma.model as model_module

    network, config = tiny.network, tiny.config
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(3, config.vocab_size, (2, 41), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :9] = False
    canvas = torch.randint(0, config.vocab_size, (2, config.canvas_length), generator=generator)
    runs = []
    for chunk in (10_000, 7):
        monkeypatch.setattr(model_module, "PREFILL_CHUNK", chunk)
        cache = network.new_cache(2, 41 + config.canvas_length)
        with torch.no_grad():
            hidden = network.encode(ids, cache, mask)
            runs.append((hidden, cache, network.denoise(canvas, cache)))
    (hidden, cache, logits), (chunked_hidden, chunked_cache, chunked_logits) = runs
    assert cache.layers[0].ring is not None and cache.layers[0].ring < 41
    torch.testing.assert_close(chunked_hidden, hidden, rtol=1e-4, atol=1e-4)
    for layer, chunked_layer in zip(cache.layers, chunked_cache.layers, strict=True):
        torch.testing.assert_close(chunked_layer.keys, layer.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chunked_layer.values, layer.values, rtol=1e-4, atol=1e-4)
        assert torch.equal(chunked_layer.valid, layer.valid) and torch.equal(chunked_layer.positions, layer.positions)
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-4, atol=1e-4)
    kept, bare = network.new_cache(2, 41), network.new_cache(2, 41)
    with torch.no_grad():  # as generation encodes (chunks of 7 still): the same cache, no hidden states kept
        network.encode(ids, kept, mask)
        assert network.encode(ids, bare, mask, return_hidden=False) is None
    for layer, bare_layer in zip(kept.layers, bare.layers, strict=True):
        assert torch.equal(bare_layer.keys, layer.keys) and torch.equal(bare_layer.values, layer.values)
    calls = []
    monkeypatch.setattr(network, "_encode", lambda *args: calls.append(args[0].shape[1]) or hidden[:, :0])
    with torch.no_grad():
        network.encode(ids, network.new_cache(2, 41), mask)
    with torch.enable_grad():  # with gradients (training) the prompt goes in one pass
        network.encode(ids, network.new_cache(2, 41), mask)
    assert calls == [7, 7, 7, 7, 7, 6, 41]
