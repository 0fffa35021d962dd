"""One script for the lent GPU: the real 26B-A4B shape with random weights, checked and timed in one call.

For bf16, fp8 and int4 weights, batch 1 and 4, prompt 512, canvas 256 it measures: ms per denoising step
(decoder pass + fast sampler, median over --iters), tokens/s at 16 steps a canvas, ms per token of the same
network run autoregressively (the encoder, one token at a time), peak GPU memory, and beside each step the
bandwidth floor: bytes the step must read (all weights, since a 256-token canvas routes to every expert,
plus the cache) over the copy bandwidth measured in the same run. Each step is timed eagerly and replayed
from a CUDA graph, beside the whole loop's tokens/s (`denoising_loop`, two canvases); `--compile` runs the
decoder's layers through torch.compile, `--profile DIR` writes a kernel table per format. Then the
reference implementation (transformers, eager and its compiled static-cache mode) on the same bf16 weights,
the sampler's extra
memory at vocabulary 262,144 and batch 8, int4 with a 4k context, each format's activations (a step's and
the prompt's temporaries) beside `info`'s estimate and its prefill of a 4k prompt in chunks of 512, 1024
and 2048 tokens (time to the first canvas), and a check that a canvas's steps never synchronise with the
host (torch.cuda.set_sync_debug_mode).
Each part that fails is reported, not fatal.

    python bench/gpu.py                         # on the device: everything, appended to bench/RESULTS.md
    python bench/gpu.py --shape tiny --device cpu --iters 2 --no-append   # the dry run the tests use
    python bench/gpu.py --formats "" --reference compiled --results out.md  # one part, in its own process
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

from diffgemma import sampling
from diffgemma.config import parse_model_config
from diffgemma.generate import DecoderGraph, Draft, RandomSource, denoising_loop, sampler_step
from diffgemma.model import DiffusionGemma, activation_bytes
from diffgemma.presets import preset_config
from diffgemma.quant import QuantFormat, _Quantized, convert_, memory_estimate, weight_bytes

CANVAS_STEPS = 16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], iters: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write), the ceiling a bandwidth-bound step can reach."""
    size = 2**30 if device.type == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), 10, device)
    return 2 * size / (ms / 1000)


@torch.no_grad()
def random_network(config, fmt: QuantFormat | None, device: torch.device, dtype: torch.dtype) -> DiffusionGemma:
    """The network in `dtype` (what stays unquantized) with random weights, quantized modules filled by
    quantizing random floats one weight at a time (so no full-precision copy of the model ever exists)."""
    with torch.device("meta"):
        network = DiffusionGemma(config).to(dtype)
        if fmt is not None:
            convert_(network, fmt)
    network = network.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for module in network.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if isinstance(module, _Quantized) and name.endswith(("_qweight", "_scale")):
                continue
            if tensor.ndim >= 2:
                tensor.normal_(0.0, 0.02, generator=generator)
            elif tensor.is_floating_point():
                tensor.fill_(1.0)
        if isinstance(module, _Quantized):
            for name, shape in module.source_shapes.items():
                module.load_float(name, torch.randn(shape, device=device, generator=generator).mul_(0.02))
    network.eval()
    return network


def denoise_step(network: DiffusionGemma, batch: int, prompt_length: int, graph: bool = False) -> Callable[[], object]:
    """One denoising step of the fast loop (decoder pass, temperature, sampler) over an encoded prompt;
    with `graph`, the decoder pass is replayed from a CUDA graph as the loop's `cuda_graph` does."""
    config, device = network.config, network.device
    cache = network.new_cache(batch, prompt_length + config.canvas_length)
    network.encode(
        torch.randint(3, config.vocab_size, (batch, prompt_length), device=device), cache, return_hidden=False
    )
    rng = RandomSource("fast", batch, device, 0)
    canvas = rng.tokens(batch, config.canvas_length, config.vocab_size)
    shape = (batch, config.canvas_length, config.vocab_size)
    logits_buffer, probs_buffer = torch.empty(shape, device=device), torch.empty(shape, device=device)
    decoder = DecoderGraph(network, cache, probs_buffer, logits_buffer) if graph else None
    state = {"probs": None}
    scale = torch.tensor(1 / 0.6, device=device)  # temperature 0.6, folded into the head as the loop does

    def step():
        if decoder is not None:
            logits = decoder(canvas, scale, first_step=state["probs"] is None)
        else:
            logits = network.denoise(canvas, cache, state["probs"], logits_out=logits_buffer, logit_scale=scale)
        out = sampler_step(logits, canvas, 0.1, rng, None, probs_buffer)
        state["probs"] = out.probs
        return out.canvas

    return step


def generation_tokens_per_s(network: DiffusionGemma, batch: int, prompt_length: int, canvases: int = 2) -> float:
    """Tokens/s of the whole loop (prompt encoding, 16 steps a canvas with no early stop, each finished canvas
    encoded, CUDA graph): the second of two runs, so capture and compilation stay out."""
    from diffgemma.config import SamplerSettings

    config, device = network.config, network.device
    settings = SamplerSettings(
        max_denoising_steps=CANVAS_STEPS, max_new_tokens=canvases * config.canvas_length, confidence_threshold=0.0
    )
    prompt = torch.randint(3, config.vocab_size, (batch, prompt_length), device=device)
    for _ in range(2):
        synchronize(device)
        started = time.perf_counter()
        for _event in denoising_loop(network, settings, prompt, seed=1, stop_at_eos=False, cuda_graph=True):
            pass
        synchronize(device)
        seconds = time.perf_counter() - started
    return batch * canvases * config.canvas_length / seconds


def ar_token(network: DiffusionGemma, batch: int, prompt_length: int, tokens: int) -> Callable[[], object]:
    """One autoregressive token: the causal encoder over one new token per row, then the head's argmax."""
    config, device = network.config, network.device
    cache = network.new_cache(batch, prompt_length + tokens + 8)
    hidden = network.encode(torch.randint(3, config.vocab_size, (batch, prompt_length), device=device), cache)
    state = {"next": network.head(hidden[:, -1:]).argmax(-1)}

    def token():
        hidden = network.encode(state["next"], cache)
        state["next"] = network.head(hidden[:, -1:]).argmax(-1)
        return state["next"]

    return token


def step_bytes(config, fmt: QuantFormat | None, dtype: torch.dtype, batch: int, prompt_length: int) -> int:
    """What one denoising step must read: every weight (a full canvas routes to all experts) and the cache."""
    held, _ = weight_bytes(config, dtype, fmt)
    return held + config.cache_bytes(prompt_length, batch, dtype.itemsize)


def reference_from(network: DiffusionGemma, raw: dict):
    """transformers' model over the very same tensors (no second copy of the weights)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from diffgemma.checkpoint import ENCODER, reference_name

    hf_config = DiffusionGemmaConfig(**{k: v for k, v in raw.items() if k != "quantization_config"})
    with torch.device("meta"):
        reference = DiffusionGemmaForBlockDiffusion(hf_config).to(network.dtype)
    state = {reference_name(name): tensor for name, tensor in network.state_dict().items()}
    for name, tensor in network.state_dict().items():
        if not name.endswith("encoder_layer_scalar"):
            state[ENCODER + name] = tensor
    state["lm_head.weight"] = network.embed_tokens.weight
    reference.load_state_dict(state, strict=False, assign=True)
    device = network.device
    for path, module in list(reference.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):  # its tables are computed, not loaded
            parent, _, child = path.rpartition(".")
            setattr(reference.get_submodule(parent), child, type(module)(module.config, device=device))
    for module in reference.modules():  # what is left on meta (a default vision tower) is made here
        for name, tensor in list(module.named_parameters(recurse=False)):
            if tensor.is_meta:
                module.register_parameter(name, torch.nn.Parameter(torch.zeros_like(tensor, device=device)))
        for name, tensor in list(module.named_buffers(recurse=False)):
            if tensor.is_meta:
                module.register_buffer(name, torch.zeros_like(tensor, device=device))
    return reference.eval()


def reference_step_ms(reference, batch: int, prompt_length: int, compiled: bool, device: torch.device) -> float:
    """ms per denoising step of the reference `generate` (time between consecutive drafts, no early stop)."""
    config = reference.config.get_text_config()

    class Timer:
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.last = time.perf_counter()

        def put(self, value) -> None:
            self.last = time.perf_counter()

        def put_draft(self, value=None, logits=None) -> None:
            synchronize(device)
            now = time.perf_counter()
            self.marks.append(now - self.last)
            self.last = now

        def end(self) -> None:
            pass

    prompt = torch.randint(3, config.vocab_size, (batch, prompt_length), device=device)
    settings = dict(max_new_tokens=256, max_denoising_steps=CANVAS_STEPS, confidence_threshold=1e-9, eos_token_id=None)
    if compiled:
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        reference.generate(prompt, **settings)  # warm up (and compile)
        timer = Timer()
        reference.generate(prompt, streamer=timer, **settings)
    return statistics.median(timer.marks[1:]) * 1000


def sampler_extra_bytes(device: torch.device, vocab: int, batch: int, length: int) -> tuple[int, int]:
    """(peak bytes one sampler step allocates beyond its inputs and the preallocated distribution buffer,
    bytes of one [batch, length, vocab] float32 tensor)."""
    one = batch * length * vocab * 4
    logits = torch.randn(batch, length, vocab, device=device)
    probs = torch.empty_like(logits)
    canvas = torch.zeros(batch, length, dtype=torch.long, device=device)
    rng = RandomSource("fast", batch, device, 0)
    if device.type != "cuda":
        return -1, one
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    sampler_step(logits, canvas, 0.1, rng, None, probs)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, one


def truncation_check(device: torch.device, vocab: int, length: int) -> str:
    """ms the fast sampler's cuts take on one canvas of logits (top-k 40 with top-p 0.9, as llama.vim sends them;
    top-p alone, which sorts whole rows; min-p), and the extra memory of the costliest."""
    logits = torch.randn(1, length, vocab, device=device) * 3
    scale = torch.tensor(0.8, device=device)
    parts = []
    for label, cut in (("top-k 40 + top-p 0.9", {"top_k": 40, "top_p": 0.9}), ("top-p 0.9", {"top_p": 0.9})):
        ms = median_ms(
            lambda c=cut: sampling.truncate(logits.clone(), scale=scale, reference_arithmetic=False, **c), 5, device
        )
        parts.append(f"{label} {ms:.2f} ms")
    ms = median_ms(lambda: sampling.truncate(logits.clone(), scale=scale, min_p=0.05), 5, device)
    parts.append(f"min-p 0.05 {ms:.2f} ms (a clone of the logits included in each)")
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        sampling.truncate(logits, top_p=0.9, scale=scale)
        synchronize(device)
        parts.append(f"top-p's peak extra memory {(torch.cuda.max_memory_allocated(device) - before) / 2**20:.0f} MiB")
    return f"sampler cuts, vocabulary {vocab}, one canvas of {length}: " + "; ".join(parts)


def prefill_check(network: DiffusionGemma, fmt: QuantFormat | None, device: torch.device, bandwidth: float) -> str:
    """How long a 4k-token prompt takes to encode (batch 1; the first token waits on it) in chunks of 512 (the
    default, `model.PREFILL_CHUNK`), 1024 and 2048 tokens, each beside reading every weight once a chunk (its
    bandwidth floor; compute is ~7.6 GFLOP a token on the 26B shape), and the chunk's peak memory on CUDA; then
    with all but its last 256 tokens kept by the prefix cache (a chat's next turn)."""
    import diffgemma.model as model_module

    config = network.config
    prompt_length = 4096
    ids = torch.randint(3, config.vocab_size, (1, prompt_length), device=device)
    default = model_module.PREFILL_CHUNK
    parts = []

    def encode() -> None:
        network.encode(ids, network.new_cache(1, prompt_length), return_hidden=False)

    try:
        for chunk in (default, 2 * default, 4 * default):
            model_module.PREFILL_CHUNK = chunk
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                ms = median_ms(encode, 3, device, warmup=1)
            floor = math.ceil(prompt_length / chunk) * weight_bytes(config, network.dtype, fmt)[0] / bandwidth * 1000
            parts.append(
                f"chunks of {chunk}: {ms:.0f} ms ({prompt_length / ms * 1000:,.0f} tokens/s; weights read "
                f"once a chunk {floor:.0f} ms; peak {peak_gib(device)} GiB)"
            )
    finally:
        model_module.PREFILL_CHUNK = default
    # a chat's next turn: the conversation's first tokens kept by the prefix cache, the last 256 encoded
    kept, cache = prompt_length - 256, network.new_cache(1, prompt_length)
    with torch.no_grad():
        network.encode(ids[:, :kept], cache, return_hidden=False)
        windows = cache.windows()

        def next_turn() -> None:
            cache.rewind(kept, windows)
            network.encode(ids[:, kept:], cache, return_hidden=False)

        parts.append(f"the first {kept} kept by the prefix cache: {median_ms(next_turn, 3, device, warmup=1):.0f} ms")
    return f"prefill of a {prompt_length}-token prompt: " + "; ".join(parts)


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"


def activation_check(network: DiffusionGemma, device: torch.device, batch: int, prompt_length: int) -> str:
    """Peak bytes a prompt's encoding and one eager decoder pass allocate beyond what they are given (the
    cache, the logits and distribution buffers), beside `info`'s estimate (`model.activation_bytes`)."""
    if device.type != "cuda":
        return "activations: measured on CUDA only"
    config, length = network.config, network.config.canvas_length
    cache = network.new_cache(batch, prompt_length + length)
    ids = torch.randint(3, config.vocab_size, (batch, prompt_length), device=device)
    canvas = torch.randint(3, config.vocab_size, (batch, length), device=device)
    logits = torch.empty(batch, length, config.vocab_size, device=device)
    probs = torch.full_like(logits, 1 / config.vocab_size)
    scale = torch.tensor(1 / 0.6, device=device)

    def peak_of(work: Callable[[], object]) -> int:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    with torch.no_grad():
        encoding = peak_of(lambda: network.encode(ids, cache, return_hidden=False))
        step = peak_of(lambda: network.denoise(canvas, cache, probs, logits_out=logits, logit_scale=scale))
    step_estimate, prompt_estimate = activation_bytes(config, prompt_length, batch, network.dtype.itemsize)
    mib = 2**20
    return (
        f"activations, batch {batch}, prompt {prompt_length}: a step {step / mib:.0f} MiB (estimate "
        f"{step_estimate / mib:.0f}), the prompt {encoding / mib:.0f} MiB (estimate {prompt_estimate / mib:.0f})"
    )


def syncs_per_step(
    network: DiffusionGemma, device: torch.device, cuda_graph: bool = False, logit_bias: bool = False, **cut
) -> str:
    """Run one canvas of the real loop with CUDA's sync debugging on; count synchronising calls per step
    (with `cuda_graph`, from step 3: step 1 warms the graph's pass up, step 2 captures it, which synchronises);
    `cut`: top_k / top_p / min_p, or penalties (then each settled prefix is committed as it goes, as a server
    streams, so that the penalties count it); `logit_bias`: a random one on every id."""
    if device.type != "cuda":
        return "skipped (not CUDA)"
    from diffgemma.config import SamplerSettings

    settings = SamplerSettings(max_denoising_steps=12, max_new_tokens=network.config.canvas_length, **cut)
    prompt = torch.randint(3, network.config.vocab_size, (1, 64), device=device)
    counts, seen = [], 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bias = torch.randn(1, network.config.vocab_size, device=device) if logit_bias else None
            events = denoising_loop(
                network,
                settings,
                prompt,
                seed=1,
                stop_at_eos=False,
                stop_check_every=100,
                cuda_graph=cuda_graph,
                commit_stable_prefix=settings.penalized,
                logit_bias=bias,
            )
            for event in events:
                if isinstance(event, Draft):
                    if event.step > (2 if cuda_graph else 1):
                        counts.append(len(caught) - seen)
                    seen = len(caught)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    first = 3 if cuda_graph else 2
    return f"steps {first}-{len(counts) + first - 1}: {sum(counts)} synchronising calls " + (
        "(OK)" if not any(counts) else f"({counts})"
    )


@torch.no_grad()
def experts_check(network: DiffusionGemma, device: torch.device) -> str:
    """Layer 0's experts (grouped GEMMs, groups padded on CUDA, fp8 matrix units where used) against a plain
    per-expert loop in float32 over the same (expanded) weights: relative error on random routing."""
    experts, config = network.layers[0].experts, network.config
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(256, config.hidden_size, device=device, generator=generator).to(network.dtype)
    routing = torch.randint(0, config.num_experts, (256, config.top_k_experts), device=device, generator=generator)
    weights = torch.rand(256, config.top_k_experts, device=device, generator=generator)
    out = experts(x, routing, weights).float()
    gate_up, down = experts.gate_up_proj.float(), experts.down_proj.float()
    expected = torch.zeros_like(out)
    for expert in routing.unique().tolist():
        token, slot = (routing == expert).nonzero(as_tuple=True)
        gate, up = (x[token].float() @ gate_up[expert].T).chunk(2, dim=-1)
        expected.index_add_(0, token, (experts.act(gate) * up) @ down[expert].T * weights[token, slot, None])
    error = float((out - expected).norm() / expected.norm())
    return f"experts of layer 0 vs a per-expert float32 loop: relative error {error:.4f}"


def graph_row(network: DiffusionGemma, name: str, batch: int, prompt: int, iters: int, floor: float, peak) -> str:
    """The table row of a step whose decoder pass is replayed from a CUDA graph, with the whole loop's
    tokens/s (two canvases, each finished one encoded) beside the step's."""
    label = f"diffgemma {name}, CUDA graph"
    try:
        ms = median_ms(denoise_step(network, batch, prompt, graph=True), iters, network.device)
    except Exception as err:
        traceback.print_exc()
        return f"| {label} | {batch} | failed: {type(err).__name__}: {err} |"
    tokens = batch * network.config.canvas_length / (CANVAS_STEPS * ms / 1000)
    try:
        whole = f"{generation_tokens_per_s(network, batch, prompt):,.0f}"
    except Exception as err:
        traceback.print_exc()
        whole = f"failed: {type(err).__name__}: {err}"
    return (
        f"| {label} | {batch} | {ms:.1f} | {floor:.1f} | {ms / floor:.2f}x | {tokens:,.0f} | {whole} | | | | {peak()} |"
    )


@torch.no_grad()
def graph_check(network: DiffusionGemma, device: torch.device) -> str:
    """Logits replayed from the CUDA graph against eager logits, for two different canvases."""
    if device.type != "cuda":
        return "CUDA graph: skipped (not CUDA)"
    config = network.config
    cache = network.new_cache(1, 64 + config.canvas_length)
    network.encode(torch.randint(3, config.vocab_size, (1, 64), device=device), cache)
    shape = (1, config.canvas_length, config.vocab_size)
    probs = torch.rand(shape, device=device).softmax(-1)
    eager_buffer, graph_buffer = torch.empty(shape, device=device), torch.empty(shape, device=device)
    decoder = DecoderGraph(network, cache, probs, graph_buffer)
    errors = []
    for trial in range(3):  # warm-up, capture + replay, replay (each at its own temperature)
        canvas = torch.randint(0, config.vocab_size, shape[:2], device=device)
        scale = torch.tensor(1.0 + trial, device=device)
        eager = network.denoise(canvas, cache, probs, logits_out=eager_buffer, logit_scale=scale).clone()
        replayed = decoder(canvas, scale)
        errors.append(float((replayed - eager).norm() / eager.norm()))
    return "CUDA graph vs eager decoder pass, relative error: " + ", ".join(f"{e:.2e}" for e in errors)


def direct_check(network: DiffusionGemma, fmt: QuantFormat, device: torch.device) -> str:
    """The direct kernels (fp8 matrix units, the fused int4 / int8 kernel) against expanded weights on layer 0 (random
    inputs): relative error, and any fallback."""
    from diffgemma.quant import direct_kernel, direct_kernel_failures, set_direct_kernels

    layer = network.layers[0]
    x = torch.randn(256, network.config.hidden_size, device=device, dtype=network.dtype)
    path = direct_kernel(fmt, x, layer.self_attn.q_proj.source_shapes["weight"], len(x))
    if not path:
        return f"{fmt.name}: weights expanded (no direct kernel here)"
    experts = torch.randint(0, network.config.num_experts, (256, network.config.top_k_experts), device=device)
    weights = torch.rand(256, network.config.top_k_experts, device=device)
    outputs = []
    with torch.no_grad():
        for direct in (True, False):
            set_direct_kernels(direct)
            outputs.append((layer.self_attn.q_proj(x), layer.experts(x, experts, weights)))
    set_direct_kernels(True)
    errors = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(*outputs, strict=True)]
    failures = direct_kernel_failures()
    return (
        f"{fmt.name} direct kernel ({path}) vs expanded weights, layer 0: q_proj rel. error {errors[0]:.4f}, "
        f"experts {errors[1]:.4f}" + (f"; fell back for: {'; '.join(failures)}" if failures else "")
    )


def kernel_profile(network: DiffusionGemma, prompt: int, path: Path) -> str:
    """Where a CUDA-graph step's GPU time goes (torch.profiler over three steps, batch 1): the table goes to
    `path`, the summary line is returned."""
    from torch.profiler import ProfilerActivity, profile

    step = denoise_step(network, 1, prompt, graph=True)
    with torch.no_grad():
        for _ in range(3):
            step()
        synchronize(network.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            synchronize(network.device)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    path.write_text(table)
    device_ms = sum(event.self_device_time_total for event in averages) / 1000 / 3
    kernels = sum(event.count for event in averages if event.device_type.name == "CUDA") / 3
    return f"profile ({path.name}): {device_ms:.1f} ms of GPU time a step, {kernels:.0f} GPU activities a step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="26b-a4b", help="preset shape (26b-a4b, or tiny for a dry run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--formats", default="none,fp8,int4", help="none: unquantized weights in --dtype; '' skips")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of unquantized weights (float32 for CPU runs)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--reference", default="eager,compiled", help="transformers modes to time on the same weights ('' for none)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="the decoder's layers through torch.compile (compile_decoder); no AR"
    )
    parser.add_argument("--profile", default=None, help="a folder for a kernel profile of each format's graph step")
    parser.add_argument("--no-append", action="store_true", help="print only; do not touch bench/RESULTS.md")
    parser.add_argument("--results", default=None, help="append to this file instead of bench/RESULTS.md")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    raw = preset_config(args.shape)
    config = parse_model_config(raw, f"preset {args.shape}")
    length = config.canvas_length
    batches = [int(b) for b in args.batches.split(",")]
    formats = [name for name in args.formats.split(",") if name]
    modes = [mode for mode in args.reference.split(",") if mode]
    if device.type != "cuda" and "compiled" in modes:
        modes.remove("compiled")
    bandwidth = copy_bandwidth(device)
    lines = [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s"]
    rows = []

    def peak() -> str:
        return peak_gib(device)

    def fresh_peak() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    for format_name in formats:
        fmt = None if format_name == "none" else QuantFormat(format_name)
        name = (short if fmt is None else f"{format_name} ({short} rest)") + (", compiled" if args.compile else "")
        try:
            fresh_peak()
            network = random_network(config, fmt, device, dtype)
            if format_name == "int4" and device.type == "cuda":  # first, before any graph holds a memory pool
                torch.cuda.reset_peak_memory_stats(device)
                with torch.no_grad():
                    median_ms(denoise_step(network, 1, 4096), 3, device)
                parts = memory_estimate(config, dtype, fmt, 4096, 1)
                # no graph here, one memory pool: the larger of the two passes' temporaries counts; no prefix
                # cache (a generation through the Python API keeps one: `parts["prefix"]` more)
                estimate = (sum(parts.values()) - parts["prefix"] - min(parts["step"], parts["prompt"])) / 2**30
                lines.append(
                    f"int4, 4k context, batch 1: peak GPU memory {peak()} GiB (target <= 16.8 GiB = 18 GB; `info`'s "
                    f"arithmetic: {estimate - parts['expanded'] / 2**30:.1f} GiB with the fused kernel, "
                    f"{estimate:.1f} expanding)"
                )
                print(lines[-1], flush=True)
            if args.compile:
                network.compile_decoder()
                for batch in batches:
                    started = time.perf_counter()
                    with torch.no_grad():
                        denoise_step(network, batch, args.prompt)()
                    synchronize(device)
                    lines.append(f"{name}, batch {batch}: first step (compiles) {time.perf_counter() - started:.0f} s")
                    print(lines[-1], flush=True)
            lines.append(f"{name}: {experts_check(network, device)}")
            try:
                lines.append(f"{name}: {graph_check(network, device)}")
            except Exception as err:
                lines.append(f"{name}: CUDA graph check failed: {type(err).__name__}: {err}")
                traceback.print_exc()
            if fmt is not None:
                lines.append(direct_check(network, fmt, device))
            if not args.compile:  # (compiling changes neither: the compiled run keeps its time for the steps)
                lines.append(f"{name}: {activation_check(network, device, max(batches), args.prompt)}")
                lines.append(f"{name}: {prefill_check(network, fmt, device, bandwidth)}")
                fresh_peak()  # the step rows' peak column: their own, not the checks' larger chunks
            with torch.no_grad():
                for batch in batches:
                    ms = median_ms(denoise_step(network, batch, args.prompt), args.iters, device)
                    floor = step_bytes(config, fmt, dtype, batch, args.prompt) / bandwidth * 1000
                    diffusion = batch * length / (CANVAS_STEPS * ms / 1000)
                    ar = "| | |"
                    if not args.compile:
                        ar_ms = median_ms(ar_token(network, batch, args.prompt, args.iters + 4), args.iters, device)
                        autoregressive = batch / (ar_ms / 1000)
                        ar = f"{ar_ms:.2f} | {autoregressive:,.0f} | {diffusion / autoregressive:.1f}x |"
                    rows.append(
                        f"| diffgemma {name} | {batch} | {ms:.1f} | {floor:.1f} | {ms / floor:.2f}x | "
                        f"{diffusion:,.0f} | | {ar} {peak()} |"
                    )
                    print(rows[-1], flush=True)
                    # (off CUDA the graph path runs uncaptured: the dry run still walks through it)
                    rows.append(graph_row(network, name, batch, args.prompt, args.iters, floor, peak))
                    print(rows[-1], flush=True)
            if args.profile and device.type == "cuda":
                try:
                    slug = format_name + ("-compiled" if args.compile else "")
                    lines.append(
                        f"{name}: {kernel_profile(network, args.prompt, Path(args.profile, f'profile-{slug}.txt'))}"
                    )
                except Exception as err:
                    lines.append(f"{name}: profile failed: {type(err).__name__}: {err}")
                    traceback.print_exc()
            if fmt is None:
                lines.append(f"no host sync inside a canvas: {syncs_per_step(network, device)}")
                lines.append(f"the same with CUDA graphs: {syncs_per_step(network, device, cuda_graph=True)}")
                graph_cut = syncs_per_step(network, device, cuda_graph=True, top_k=40, top_p=0.9, min_p=0.05)
                lines.append(f"the same with top-k 40, top-p 0.9, min-p 0.05: {graph_cut}")
                penalised = syncs_per_step(
                    network,
                    device,
                    cuda_graph=True,
                    logit_bias=True,
                    presence_penalty=0.5,
                    frequency_penalty=0.5,
                    repetition_penalty=1.1,
                )
                lines.append(f"the same with a logit bias and the three penalties (a stream's way): {penalised}")
            del network
            if args.compile:  # compiled code keeps the network's tensors alive until Dynamo's caches go
                torch._dynamo.reset()
            gc.collect()
        except Exception as err:
            rows.append(f"| diffgemma {name} | - | failed: {type(err).__name__}: {err} |")
            traceback.print_exc()

    if modes:
        try:
            fresh_peak()
            reference = reference_from(random_network(config, None, device, dtype), raw)  # the same seed: same weights
            for mode in modes:
                label = "transformers (static cache, compiled)" if mode == "compiled" else "transformers (eager)"
                for batch in batches:
                    try:
                        ms = reference_step_ms(reference, batch, args.prompt, mode == "compiled", device)
                        rows.append(
                            f"| {label} | {batch} | {ms:.1f} | | | "
                            f"{batch * length / (CANVAS_STEPS * ms / 1000):,.0f} | | | | | {peak()} |"
                        )
                        print(rows[-1], flush=True)
                    except Exception as err:
                        rows.append(f"| {label} | {batch} | failed: {type(err).__name__}: {err} |")
                        traceback.print_exc()
            del reference
        except Exception as err:
            rows.append(f"| transformers | - | failed: {type(err).__name__}: {err} |")
            traceback.print_exc()

    if formats:
        vocab = 262144 if device.type == "cuda" else config.vocab_size
        lines.append(truncation_check(device, vocab, length))
        extra, one = sampler_extra_bytes(device, vocab, 8, length)
        if extra >= 0:
            lines.append(
                f"sampler, vocabulary {vocab}, batch 8: one step allocates {extra / 2**20:.0f} MiB beyond logits and "
                f"its distribution buffer ({extra / one:.2f} of one [8, {length}, {vocab}] float32 tensor)"
            )
    header = (
        "| run | batch | ms/step | floor ms | vs floor | tokens/s (16 steps) | whole loop tokens/s | AR ms/token | "
        "AR tokens/s | diffusion/AR | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    notes = (
        f"Shape {args.shape}: {config.parameter_counts()[0] / 1e9:.2f}B parameters, random weights; prompt "
        f"{args.prompt}, canvas {length}, median of {args.iters}. Floor: bytes a step reads / copy bandwidth. "
        "Whole loop: two canvases of 16 steps (no early stop), the prompt and the first canvas encoded, CUDA "
        "graph, the second of two runs.\n" + "\n".join(f"- {line}" for line in lines)
    )
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append_results("GPU: diffgemma on the 26B-A4B shape (bench/gpu.py)", table, notes, args.results)
    if math.isnan(bandwidth):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
