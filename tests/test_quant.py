"""Weight-only quantization: logits close to float (thresholds), self-describing checkpoints, exact sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.cli import main
from diffgemma.presets import random_checkpoint
from diffgemma.quant import QuantFormat, dequantize, quantize, weight_bytes

sys.path.insert(0, str(Path(__file__).parent / "assets"))
from make_demo_model import ANSWERS

DEMO = Path(__file__).parent / "assets" / "demo"


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || out) per position)."""
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    return top1, kl.item()


@pytest.mark.parametrize(("name", "max_error"), [("int8", 0.015), ("fp8", 0.045), ("int4", 0.14)])
def test_round_trip_error_is_bounded(name, max_error):
    weight = torch.randn(3, 48, 128)  # a stacked (experts) weight: every row scaled on its own
    weight[1] *= 50  # one expert far larger than the others must not swamp their scales
    fmt = QuantFormat(name, group_size=32)
    stored = quantize(weight, fmt)
    back = dequantize(stored["qweight"], stored["scale"], fmt, torch.float32)
    assert back.shape == weight.shape
    relative = (back - weight).norm(dim=-1) / weight.norm(dim=-1)
    assert relative.max() < max_error


@pytest.fixture(scope="module")
def demo_inputs():
    """The demo model's own prompts and converged canvases: the inputs it is used on."""
    model = diffgemma.load(DEMO)
    length = model.config.canvas_length
    prompts, canvases = [], []
    for question in list(ANSWERS)[:4]:
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": question}])
        result = model.generate([prompt], seed=0, max_new_tokens=length)
        canvas = result.sequences[0, result.prompt_length : result.prompt_length + length].tolist()
        prompts.append(prompt)
        canvases.append(canvas + [model.settings.pad_token_id] * (length - len(canvas)))
    return model, prompts, canvases


def _demo_logits(model, prompts, canvases) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model.network.denoise_logits(torch.tensor([p]), torch.tensor([c]))
                for p, c in zip(prompts, canvases, strict=True)
            ]
        )


@pytest.mark.parametrize(
    ("name", "min_top1", "max_kl"), [("int8", 0.99, 1e-3), ("fp8", 0.99, 5e-3), ("int4", 0.97, 0.02)]
)
def test_trained_model_logits_stay_close(demo_inputs, name, min_top1, max_kl):
    model, prompts, canvases = demo_inputs
    reference = _demo_logits(model, prompts, canvases)
    quantized = diffgemma.load(DEMO, quant=name)
    top1, kl = _agreement(_demo_logits(quantized, prompts, canvases), reference)
    assert top1 >= min_top1 and kl <= max_kl, (name, top1, kl)


@pytest.mark.parametrize(("name", "min_top1", "max_kl"), [("int8", 0.99, 1e-3), ("int4", 0.97, 0.02)])
def test_the_cpu_kernels_keep_the_logits_close(demo_inputs, monkeypatch, name, min_top1, max_kl):
    """With their limits lifted (the demo model's weights are too small to take them by default), the products go
    through PyTorch's CPU weight-only kernels (bf16 activations): the format's bounds above still hold. int8 takes
    every weight so; int4 the experts and dense MLP (attention's groups of 16 are not the kernel's)."""
    from diffgemma import quant

    model, prompts, canvases = demo_inputs
    reference = _demo_logits(model, prompts, canvases)
    quantized = diffgemma.load(DEMO, quant=name)
    monkeypatch.setattr(quant, "cpu_int8_units", lambda: False)  # (int8 takes the int8 matrix units where there are)
    monkeypatch.setattr(quant, "CPU_KERNEL_MIN_VALUES", 0)
    monkeypatch.setattr(quant, "CPU_KERNEL_MAX_ROWS", 10**9)
    used, expanded = [], []
    kernel, expand = quant.cpu_linear, quant.dequantize
    monkeypatch.setattr(quant, "cpu_linear", lambda *args: used.append(args[1].shape) or kernel(*args))
    monkeypatch.setattr(
        quant, "dequantize", lambda *args, **kwargs: expanded.append(args[0].data_ptr()) or expand(*args, **kwargs)
    )
    top1, kl = _agreement(_demo_logits(quantized, prompts, canvases), reference)
    assert top1 >= min_top1 and kl <= max_kl, (top1, kl)
    expert_weights = {tuple(quantized.network.layers[0].experts.gate_up_proj_qweight.shape[1:])}
    assert expert_weights <= set(map(tuple, used))
    attention = {buffer.data_ptr() for layer in quantized.network.layers for buffer in layer.self_attn.buffers()}
    assert set(expanded) <= (attention if name == "int4" else set()), name


def test_the_int8_matrix_units_keep_the_logits_close(demo_inputs, monkeypatch):
    """Where the CPU has int8 matrix units (AMX), every int8 product goes there, activations made int8 a row at a
    time: int8's bounds above still hold. (`torch._int_mm` runs on any CPU, so this runs everywhere.)"""
    from diffgemma import quant

    model, prompts, canvases = demo_inputs
    reference = _demo_logits(model, prompts, canvases)
    quantized = diffgemma.load(DEMO, quant="int8")
    monkeypatch.setattr(quant, "cpu_int8_units", lambda: True)
    used, product = [], quant.int8_units_linear
    monkeypatch.setattr(quant, "int8_units_linear", lambda *args: used.append(args[1].shape) or product(*args))
    monkeypatch.setattr(quant, "dequantize", lambda *args, **kwargs: pytest.fail("an int8 weight was expanded"))
    top1, kl = _agreement(_demo_logits(quantized, prompts, canvases), reference)
    assert top1 >= 0.99 and kl <= 1e-3, (top1, kl)
    shapes = {tuple(buffer.shape[-2:]) for name, buffer in quantized.network.named_buffers() if "qweight" in name}
    assert set(map(tuple, used)) == shapes  # every projection and expert


def test_the_int8_matrix_units_multiply_as_the_expanded_weights():
    from diffgemma.quant import cpu_grouped_linear, int8_units_linear

    fmt = QuantFormat("int8")
    experts = torch.randn(3, 96, 64) * 0.05
    stored = quantize(experts, fmt)
    weights = dequantize(stored["qweight"], stored["scale"], fmt, torch.float32)
    rows = torch.randn(3, 5, 64)
    given = rows.clone()
    for dtype in (torch.float32, torch.bfloat16):
        out = int8_units_linear(rows[0].to(dtype), stored["qweight"][0], stored["scale"][0])
        expected = rows[0] @ weights[0].t()
        assert out.dtype == dtype and ((out.float() - expected).norm() / expected.norm()) < 0.02
    batched = cpu_grouped_linear(rows, stored["qweight"], stored["scale"], None, product=int8_units_linear)
    packed = cpu_grouped_linear(
        rows.reshape(15, 64), stored["qweight"], stored["scale"], torch.tensor([5, 10, 15]), product=int8_units_linear
    )
    assert torch.equal(batched.reshape(15, -1), packed)  # (a row is made int8 on its own, whatever its group)
    assert torch.equal(rows, given)  # (the activations are read, not written)
    expected = rows @ weights.transpose(1, 2)
    assert (batched - expected).norm() / expected.norm() < 0.02


def test_the_cpu_kernels_take_large_weights_that_meet_few_rows(monkeypatch):
    from diffgemma import quant
    from diffgemma.quant import CPU_INT8_UNITS, CPU_KERNEL, CPU_KERNEL_MAX_ROWS, direct_kernel

    int8, int4, x = QuantFormat("int8"), QuantFormat("int4"), torch.randn(4, 2816)
    monkeypatch.setattr(quant, "_amx_int8", lambda: True)  # a CPU with int8 matrix units: int8 goes there, always
    for shape, rows in (((1408, 2816), 16), ((1408, 2816), 10**4), ((8, 8), 1)):
        assert direct_kernel(int8, x, shape, rows) == CPU_INT8_UNITS
    assert direct_kernel(int8, x.clone().requires_grad_(), (1408, 2816), 16) is None  # no backward
    assert direct_kernel(int4, x, (1408, 2816), 16) == CPU_KERNEL
    monkeypatch.setattr(quant, "_amx_int8", lambda: False)  # one without: the weight-only kernels, within limits
    for fmt in (int8, int4):
        assert direct_kernel(fmt, x, (1408, 2816), 16) == CPU_KERNEL  # a 26B expert at batch 1
        assert direct_kernel(fmt, x, (128, 1408, 2816), 16) == CPU_KERNEL  # the stack: each expert's size counts
        assert direct_kernel(fmt, x, (1408, 2816), CPU_KERNEL_MAX_ROWS + 1) is None  # compute-bound: expand
        assert direct_kernel(fmt, x, (512, 512), 16) is None  # expands in cache: cheap
        assert direct_kernel(fmt, x.clone().requires_grad_(), (1408, 2816), 16) is None  # no backward
    assert direct_kernel(int8, torch.randn(4, 2824), (1408, 2824), 16) is None  # inputs not a multiple of 16
    assert direct_kernel(int4.for_attention(), x, (4096, 2816), 16) is None  # groups of 16: not the kernel's
    assert direct_kernel(int4, x, (1400, 2816), 16) is None  # outputs not in blocks of 64
    assert direct_kernel(QuantFormat("fp8"), x, (1408, 2816), 16) is None
    monkeypatch.setenv("DIFFGEMMA_CPU_KERNELS", "0")  # the user's switch: expand everything
    assert direct_kernel(int8, x, (1408, 2816), 16) is None and direct_kernel(int4, x, (1408, 2816), 16) is None


def tiny_experts(fmt: QuantFormat):
    """The tiny shape's experts, float (seeded) and quantized from them in `fmt`: (config, float, quantized)."""
    from diffgemma import quant
    from diffgemma.config import parse_model_config
    from diffgemma.model import Experts
    from diffgemma.presets import preset_config

    config = parse_model_config(preset_config("tiny"), "tiny")
    torch.manual_seed(0)
    float_experts = Experts(config).requires_grad_(False)
    float_experts.gate_up_proj.normal_(0, 0.05)
    float_experts.down_proj.normal_(0, 0.05)
    module = quant.QuantExperts(float_experts, fmt)
    for weight in ("gate_up_proj", "down_proj"):
        module.load_float(weight, float_experts._parameters[weight])
    return config, float_experts, module


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_experts_through_a_cpu_kernel_are_packed_not_padded(monkeypatch, name):
    """The float experts pad every group to the largest for one batched product; where a CPU kernel takes the
    quantized ones (an expert at a time, at a cost in proportion to the rows) the groups go packed, with the same
    outputs; expanded (no kernel), they are batched as the float ones."""
    from diffgemma import quant

    monkeypatch.setattr(quant, "CPU_KERNEL_MIN_VALUES", 0)  # the tiny shape's experts through the kernel
    config, float_experts, module = tiny_experts(QuantFormat(name))
    tokens, experts = 40, config.num_experts
    x = torch.randn(tokens, config.hidden_size)
    # a spread routing: every expert gets 10 of the 80 pairs but one, which gets 13 (padding: 1.3x the rows)
    routing = torch.stack([torch.tensor([t % experts, (t + 1 + t // experts) % experts]) for t in range(tokens)])
    routing[:3, 1] = 0
    routing = routing.where(routing[:, :1] != routing[:, 1:], (routing + 1) % experts)
    weights = torch.rand(tokens, config.top_k_experts)
    routed = routing.reshape(-1)
    rank = torch.tensor([int((routed[:p] == e).sum()) for p, e in enumerate(routed.tolist())])
    sizes = torch.bincount(routed, minlength=experts).int()
    assert int(sizes.max()) * experts > routed.numel()  # (batching would pad)
    kernel = quant.direct_kernel(module.fmt, x, module.source_shapes["gate_up_proj"], routed.numel() // experts)
    if kernel not in (quant.CPU_KERNEL, quant.CPU_INT8_UNITS):
        pytest.skip(f"this CPU's {name} kernel does not take the tiny shape's experts")
    assert float_experts.group_layout(x, routed, rank, sizes)[1] is None  # float: batched, padded
    _, ends, slots = module.group_layout(x, routed, rank, sizes)
    assert slots == routed.numel() and torch.equal(ends, sizes.cumsum(0).int())  # packed, no padding
    packs = quant.QuantExperts.batches_groups
    with torch.no_grad():
        packed = module(x, routing, weights)
        monkeypatch.setattr(quant.QuantExperts, "batches_groups", lambda self, x, pairs: True)
        assert module.group_layout(x, routed, rank, sizes)[1] is None
        padded = module(x, routing, weights)
    assert torch.allclose(packed, padded, rtol=1e-3, atol=1e-5)
    monkeypatch.setattr(quant.QuantExperts, "batches_groups", packs)
    monkeypatch.setenv("DIFFGEMMA_CPU_KERNELS", "0")  # expanded: batched, as the float experts
    assert module.group_layout(x, routed, rank, sizes)[1] is None


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_the_cpu_kernels_multiply_as_the_expanded_weights(name):
    from diffgemma.quant import cpu_grouped_linear, cpu_int4_layout

    fmt = QuantFormat(name, group_size=32)
    experts = torch.randn(3, 128, 64) * 0.05
    stored = quantize(experts, fmt)
    weights = dequantize(stored["qweight"], stored["scale"], fmt, torch.float32)
    rows = torch.randn(3, 5, 64)  # batched: each expert's rows padded to one size
    batched = cpu_grouped_linear(rows, stored["qweight"], stored["scale"], None)
    _assert_bf16_close(batched, rows @ weights.transpose(1, 2))
    packed = torch.randn(15, 64)  # packed, sorted by expert: 5 rows, none, 10 rows
    ends = torch.tensor([5, 5, 15])
    out = cpu_grouped_linear(packed, stored["qweight"], stored["scale"], ends)
    _assert_bf16_close(out, torch.cat([packed[:5] @ weights[0].t(), packed[5:] @ weights[2].t()]))
    if name == "int4":  # the nibbles rearranged as PyTorch's own conversion lays them out on this CPU
        for shape in ((64, 32), (128, 64), (192, 2816)):
            nibbles = torch.randint(0, 16, shape, dtype=torch.int32)
            ours = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)
            expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 2)
            assert torch.equal(cpu_int4_layout(ours), expected), shape


def test_every_cpu_int4_layout_is_the_one_its_description_gives():
    """PyTorch's CPU int4 kernel reads one layout per vector width (AVX512, AVX2, neither; the converter's own
    comments describe them); each of ours against those words spelled out one nibble at a time."""
    from diffgemma.quant import CPU_INT4_LAYOUTS, cpu_int4_layout

    nibbles = torch.randint(0, 16, (128, 16), dtype=torch.int32)
    ours = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)
    for block, halves in CPU_INT4_LAYOUTS:
        expected = []
        for start in range(0, nibbles.shape[0], block):
            for k in range(nibbles.shape[1]):
                for j in range(block // 2):
                    low, high = (j, j + block // 2) if halves else (2 * j, 2 * j + 1)
                    expected.append(int(nibbles[start + low, k]) | int(nibbles[start + high, k]) << 4)
        laid_out = cpu_int4_layout(ours, (block, halves))
        assert laid_out.reshape(-1).tolist() == expected, (block, halves)


def test_restoring_undoes_every_cpu_int4_layout():
    from diffgemma.quant import CPU_INT4_LAYOUTS, cpu_int4_layout, cpu_int4_restored

    ours = torch.randint(0, 256, (192, 40), dtype=torch.uint8)
    for layout in CPU_INT4_LAYOUTS:
        laid_out = cpu_int4_layout(ours, layout)
        assert not torch.equal(laid_out, ours)
        assert torch.equal(cpu_int4_restored(laid_out, layout), ours), layout


def test_int4_experts_are_laid_out_for_the_cpu_kernel_once_and_read_in_our_layout(monkeypatch):
    """The CPU kernel's first product over an int4 stack rearranges it in place; later products take it as it is
    (nothing rearranged per call) and give the same values as rearranging for each call. A state dict (made or
    loaded), a move, the properties, an expanded product and a product under autograd all see our layout, which
    all but the properties restore in place."""
    from diffgemma import quant

    if quant.cpu_int4_kernel_layout() is None:
        pytest.skip("this CPU's int4 kernel reads a layout diffgemma does not know (int4 expands)")
    monkeypatch.setattr(quant, "CPU_KERNEL_MIN_VALUES", 0)  # the tiny shape's experts through the kernel
    config, _, module = tiny_experts(QuantFormat("int4"))
    per_call = tiny_experts(QuantFormat("int4"))[2]
    per_call._lay_out_for_cpu = lambda name: None  # rearranges for each call, as before
    ours = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    tokens = torch.randn(20, config.hidden_size)
    routed = torch.randint(0, config.num_experts, (20, config.top_k_experts))
    weights = torch.rand(20, config.top_k_experts)
    rearranged = []
    rearrange = quant.cpu_int4_layout
    monkeypatch.setattr(quant, "cpu_int4_layout", lambda *args: rearranged.append(1) or rearrange(*args))
    with torch.no_grad():
        expected = per_call(tokens, routed, weights)
        rearranged.clear()
        first = module(tokens, routed, weights)
        assert set(module.cpu_laid_out) == {"gate_up_proj", "down_proj"}
        assert not torch.equal(module.gate_up_proj_qweight, ours["gate_up_proj_qweight"])  # in place
        assert len(rearranged) == 2 * config.num_experts  # each expert of each stack, once
        second = module(tokens, routed, weights)
        assert len(rearranged) == 2 * config.num_experts  # and never again
        assert torch.equal(first, expected) and torch.equal(second, expected)
        assert torch.equal(module.gate_up_proj, per_call.gate_up_proj)  # expanded from our layout
        assert module.cpu_laid_out  # (the properties read a restored copy)
        monkeypatch.setitem(quant._DIRECT, "enabled", False)  # expanded products: back in place, then stay so
        assert torch.equal(module(tokens, routed, weights), per_call(tokens, routed, weights))
        assert not module.cpu_laid_out and torch.equal(module.gate_up_proj_qweight, ours["gate_up_proj_qweight"])
        rearranged.clear()
        assert torch.equal(module(tokens, routed, weights), per_call(tokens, routed, weights))
        assert not rearranged and not module.cpu_laid_out  # nothing back and forth while products expand
        monkeypatch.setitem(quant._DIRECT, "enabled", True)
        module(tokens, routed, weights)
        state = module.state_dict()  # saving: back in our layout, in place
        assert not module.cpu_laid_out and all(torch.equal(state[name], ours[name]) for name in ours)
        module(tokens, routed, weights)
        module.to("cpu")  # a move (to any device) takes our layout
        assert not module.cpu_laid_out and torch.equal(module.down_proj_qweight, ours["down_proj_qweight"])
        module(tokens, routed, weights)
        module.load_state_dict(ours)  # bytes in our layout replace the laid-out ones: the flag goes with them
        assert not module.cpu_laid_out and torch.equal(module(tokens, routed, weights), expected)
    # autograd keeps the module's own bytes, so the stacks go back in place rather than as copies
    x, x_per_call = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    module(x, routed, weights).square().sum().backward()
    per_call(x_per_call, routed, weights).square().sum().backward()
    assert not module.cpu_laid_out and torch.equal(x.grad, x_per_call.grad)


def test_an_int4_model_laid_out_for_the_cpu_saves_and_generates_as_before(tmp_path, monkeypatch):
    from diffgemma import quant

    if quant.cpu_int4_kernel_layout() is None:
        pytest.skip("this CPU's int4 kernel reads a layout diffgemma does not know (int4 expands)")
    monkeypatch.setattr(quant, "CPU_KERNEL_MIN_VALUES", 0)
    folder = random_checkpoint(tmp_path / "tiny", preset="tiny")
    model = diffgemma.load(folder, quant="int4")
    prompt = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    before = model.generate(prompt, max_new_tokens=40, seed=3).new_tokens
    assert all(layer.experts.cpu_laid_out for layer in model.network.layers)
    saved = model.save(tmp_path / "int4")
    assert not any(layer.experts.cpu_laid_out for layer in model.network.layers)
    fresh = diffgemma.load(tmp_path / "int4")
    for loaded in (model, fresh):
        assert loaded.generate(prompt, max_new_tokens=40, seed=3).new_tokens == before
    monkeypatch.setattr(quant, "CPU_KERNEL_MIN_VALUES", 10**12)  # expanded from the saved bytes: the same codes
    expanded = diffgemma.load(saved)
    reference = diffgemma.load(folder, quant="int4")
    canvas = torch.randint(3, model.config.vocab_size, (1, model.config.canvas_length))
    assert torch.equal(expanded.denoise_logits(prompt, canvas), reference.denoise_logits(prompt, canvas))


def test_the_int4_cpu_kernel_on_a_cpu_without_wide_vectors():
    """With PyTorch told to use no vector instructions (ATEN_CPU_CAPABILITY=default, as on CPUs it has no wider
    kernels for), its int4 kernel reads another layout: found, and the product is the expanded weights'."""
    script = """
import torch
from diffgemma.quant import QuantFormat, cpu_int4_kernel_layout, cpu_linear, dequantize, quantize
fmt = QuantFormat("int4", group_size=32)
weight, x = torch.randn(128, 64) * 0.05, torch.randn(5, 64)
stored = quantize(weight, fmt)
expanded = x @ dequantize(stored["qweight"], stored["scale"], fmt, torch.float32).t()
error = (cpu_linear(x, stored["qweight"], stored["scale"]) - expanded).norm() / expanded.norm()
print(cpu_int4_kernel_layout(), float(error))
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    layout, error = done.stdout.rsplit(" ", 1)
    assert layout in ("(32, False)", "(16, False)") and float(error) < 0.01, done.stdout


def _assert_bf16_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Within what bf16 activations (and int4's bf16 scales) give, yet not the same arithmetic."""
    error = float((out - expected).norm() / expected.norm())
    assert 0 < error < 0.01, error


def test_int4_quantization_of_a_large_weight_runs_compiled_on_the_cpu(monkeypatch):
    """Large weights are quantized to int4 by the compiled search (small ones eagerly): the same scales and
    codes but for a few groups in a thousand where a rounding picks a neighbouring clip, and the same error.
    A compiler that fails leaves quantization eager, with one warning."""
    from diffgemma import quant

    fmt = QuantFormat("int4")
    weight = torch.randn(1024, 1024) * 0.02
    assert quant._int4_quantizer(weight) is quant._compiled_int4_codes
    assert quant._int4_quantizer(weight[:64]) is quant._int4_codes
    compiled = quantize(weight, fmt)
    packed, scale = quant._int4_codes(weight, 64)
    assert (compiled["scale"] != scale).float().mean() < 0.01
    assert (compiled["qweight"] != packed).float().mean() < 0.01

    def error(stored: dict[str, torch.Tensor]) -> float:
        return float((dequantize(stored["qweight"], stored["scale"], fmt, torch.float32) - weight).norm())

    assert error(compiled) <= 1.001 * error({"qweight": packed, "scale": scale})

    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(quant, "_COMPILED_INT4", {"codes": broken})
    with pytest.warns(UserWarning, match="int4 quantization runs eagerly"):
        fallback = quantize(weight, fmt)
    assert torch.equal(fallback["qweight"], packed) and quant._int4_quantizer(weight) is quant._int4_codes


def test_quantized_chat_gives_the_same_answer(demo_inputs):
    model, _, _ = demo_inputs
    question = list(ANSWERS)[1]
    expected = model.chat([{"role": "user", "content": question}], seed=2).content
    assert expected == ANSWERS[question]
    quantized = diffgemma.load(DEMO, quant="int4")
    assert quantized.chat([{"role": "user", "content": question}], seed=2).content == expected


@pytest.mark.parametrize(("name", "max_kl"), [("int8", 0.003), ("fp8", 0.01), ("int4", 0.05)])
def test_random_checkpoint_logits_stay_close(tmp_path_factory, name, max_kl):
    folder = tmp_path_factory.mktemp("q") / "tiny"
    random_checkpoint(folder, preset="tiny", seed=11)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(9, 250, (2, 20), generator=generator)
    canvas = torch.randint(9, 250, (2, 32), generator=generator)
    with torch.no_grad():
        reference = diffgemma.load(folder).network.denoise_logits(prompt, canvas)
        out = diffgemma.load(folder, quant=name).network.denoise_logits(prompt, canvas)
    _, kl = _agreement(out, reference)
    assert kl <= max_kl, (name, kl)


def test_quantize_command_writes_a_self_describing_checkpoint(tmp_path, capsys):
    source = random_checkpoint(tmp_path / "float", preset="tiny", seed=12)
    destination = tmp_path / "int4"
    assert main(["quantize", str(source), str(destination), "--to", "int4", "--dtype", "float32"]) == 0
    config = json.loads((destination / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "diffgemma",
        "format": "int4",
        "group_size": 64,
        "attention_group_size": 16,
    }
    assert (destination / "tokenizer.json").is_file()
    direct = diffgemma.load(source, quant="int4")
    saved = diffgemma.load(destination)
    assert saved.quant == QuantFormat("int4")
    for (name, a), (_, b) in zip(direct.network.state_dict().items(), saved.network.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # the loaded network holds exactly what the estimate says, far less than float32
    held = sum(t.numel() * t.element_size() for t in (*saved.network.parameters(), *saved.network.buffers()))
    assert held == weight_bytes(saved.config, torch.float32, QuantFormat("int4"))[0]
    assert (destination / "model.safetensors").stat().st_size < 0.5 * (source / "model.safetensors").stat().st_size
    with pytest.raises(DiffGemmaError, match="already quantized"):
        diffgemma.load(destination, quant="int8")
    with pytest.raises(DiffGemmaError, match="quantization must be one of"):
        diffgemma.load(source, quant="int3")


@pytest.mark.parametrize(
    ("name", "stored"), [("int8", torch.float32), ("int4", torch.bfloat16), ("fp8", torch.float32)]
)
def test_quantizing_on_disk_writes_what_loading_quantized_and_saving_writes(tmp_path, monkeypatch, name, stored):
    """`quantize` writes a shard at a time, the model never loaded: the same files, bit for bit, as loading the
    float checkpoint quantized and saving it (a bf16 base kept bf16, a float32 one cast to the bf16 asked for)."""
    from diffgemma import checkpoint
    from diffgemma.quant import quantize_checkpoint

    source = random_checkpoint(tmp_path / "float", preset="tiny", seed=12, dtype=stored)
    expected = diffgemma.load(source, dtype="bfloat16", quant=name).save(tmp_path / "expected")
    shards = []
    save_file = checkpoint.save_file
    monkeypatch.setattr(
        checkpoint, "save_file", lambda tensors, *a, **k: shards.append(tensors) or save_file(tensors, *a, **k)
    )
    monkeypatch.setattr(checkpoint, "load_weights", lambda *args: pytest.fail("the model was loaded"))
    held = quantize_checkpoint(source, tmp_path / "streamed", QuantFormat(name), torch.bfloat16, max_shard_bytes=50_000)
    monkeypatch.undo()
    assert len(shards) > 2 and all(
        sum(t.numel() * t.element_size() for t in shard.values()) <= 150_000 for shard in shards
    )
    assert held == weight_bytes(diffgemma.load(expected).config, torch.bfloat16, QuantFormat(name))[0]
    expected_tensors = load_file(str(expected / "model.safetensors"))
    streamed = {}
    for shard in (tmp_path / "streamed").glob("*.safetensors"):
        streamed |= load_file(str(shard))
    assert streamed.keys() == expected_tensors.keys()
    for key, tensor in expected_tensors.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(
            streamed[key].view(torch.uint8), tensor.view(torch.uint8)
        ), key
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (expected / "config.json").read_text()
    )
    assert main(["quantize", str(source), str(tmp_path / "cli"), "--to", name]) == 0
    assert load_file(str(tmp_path / "cli" / "model.safetensors")).keys() == expected_tensors.keys()


def test_quantize_refuses_to_write_over_its_source(tmp_path, capsys):
    source = random_checkpoint(tmp_path / "float", preset="tiny", seed=12)
    before = (source / "model.safetensors").read_bytes()
    for destination in (source, tmp_path / "." / "float"):
        assert main(["quantize", str(source), str(destination), "--to", "int8"]) == 2
        assert "is the checkpoint being read" in capsys.readouterr().err
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "train.py").write_text("")
    assert main(["quantize", str(source), str(tmp_path / "project"), "--to", "int8"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert (source / "model.safetensors").read_bytes() == before
    assert (tmp_path / "project" / "train.py").is_file()


def test_int4_groups_attention_finer_and_reads_older_checkpoints(tmp_path):
    source = random_checkpoint(tmp_path / "float", preset="tiny", seed=14)
    network = diffgemma.load(source, quant="int4").network
    hidden = network.config.hidden_size
    layer = network.layers[0]
    assert layer.self_attn.q_proj.weight_scale.shape[-1] == hidden // 16
    assert layer.mlp.gate_proj.weight_scale.shape[-1] == hidden // 64
    # a checkpoint written before attention had its own groups (no attention_group_size) loads as written
    older = tmp_path / "older"
    flags = ["--to", "int4", "--attention-group-size", "64", "--dtype", "float32"]
    assert main(["quantize", str(source), str(older), *flags]) == 0
    config = json.loads((older / "config.json").read_text())
    del config["quantization_config"]["attention_group_size"]
    (older / "config.json").write_text(json.dumps(config))
    model = diffgemma.load(older, quant="int4")  # the bare name takes the checkpoint's own groups
    assert model.quant == QuantFormat("int4", 64, 64)
    assert model.network.layers[0].self_attn.q_proj.weight_scale.shape[-1] == hidden // 64
    with pytest.raises(DiffGemmaError, match="groups of 64, attention 64.*cannot load it as int4, groups of 32"):
        diffgemma.load(older, quant=QuantFormat("int4", 32))
    config["quantization_config"]["group_size"] = "64"
    (older / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffGemmaError, match="group_size must be a whole number"):
        diffgemma.load(older)
    # groups are int4's alone: an int8 checkpoint records none
    int8 = tmp_path / "int8"
    assert main(["quantize", str(source), str(int8), "--to", "int8", "--dtype", "float32"]) == 0
    config = json.loads((int8 / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "diffgemma", "format": "int8"}
    assert diffgemma.load(int8, quant=QuantFormat("int8")).quant == QuantFormat("int8")
    # another tool's quantized checkpoint (vLLM's fp8 ones, say) is refused before its weights are misread
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (int8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffGemmaError, match="quant_method 'fp8'.* not one diffgemma wrote .*--quant int8.int4.fp8"):
        diffgemma.load(int8)


def test_quantizing_leaves_no_float_copy_of_projections(tmp_path):
    model = diffgemma.load(random_checkpoint(tmp_path / "f", preset="tiny", seed=13), quant="int8")
    names = [name for name, _ in model.network.named_parameters()]
    assert not any(n.endswith(("q_proj.weight", "experts.gate_up_proj", "mlp.down_proj.weight")) for n in names)
    assert "embed_tokens.weight" in names  # the tied embedding/head stays in the model dtype


def test_int4_expansion_holds_only_the_output_and_small_temporaries():
    """Expanding a stacked int4 tensor must not add full-size temporaries beside the expanded weight (on the
    26B shape, one would push int4 with a 4k context past 18 GB)."""
    from test_engine import PeakMemory

    from diffgemma import quant

    fmt = quant.QuantFormat("int4")
    stored = quant.quantize(torch.randn(8, 256, 1024) * 0.02, fmt)
    expanded_bytes = 8 * 256 * 1024 * 4
    original = quant.NIBBLE_CHUNK_BYTES
    quant.NIBBLE_CHUNK_BYTES = 64 * 1024
    try:
        with PeakMemory() as memory:
            chunked = quant.dequantize(stored["qweight"], stored["scale"], fmt, torch.float32)
    finally:
        quant.NIBBLE_CHUNK_BYTES = original
    whole = quant.dequantize(stored["qweight"], stored["scale"], fmt, torch.float32)
    assert torch.equal(chunked, whole)
    assert memory.peak < expanded_bytes * 1.05, memory.peak / expanded_bytes


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_cpu_expansions_reuse_one_buffer_per_thread(name, monkeypatch):
    """Inference on the CPU expands weights into one buffer a thread (fresh pages cost more than filling them):
    products are those of fresh expansions and stay intact as the buffer is reused, repeated expansions make no
    new weight-sized memory, each thread has its own buffer, and a weight over the cap gets a fresh tensor."""
    import threading

    from test_engine import PeakMemory

    from diffgemma import quant

    fmt = quant.QuantFormat(name)
    generator = torch.Generator().manual_seed(4)
    stored = [quant.quantize(torch.randn(rows, 256, generator=generator) * 0.02, fmt) for rows in (192, 128)]
    x = torch.randn(5, 256, generator=generator)

    def product(index: int) -> torch.Tensor:
        return quant.expanded_product(x, stored[index]["qweight"], stored[index]["scale"], fmt, torch.float32)

    expected = [x @ dequantize(s["qweight"], s["scale"], fmt, torch.float32).t() for s in stored]
    monkeypatch.setattr(quant, "_EXPANSION", threading.local())
    first = product(0)
    buffer = quant._EXPANSION.buffers[torch.float32]
    with PeakMemory() as memory:
        second = product(1)
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    assert memory.peak < 192 * 256 * 4 / 4, memory.peak  # the smaller weight went into the same buffer
    assert quant._EXPANSION.buffers[torch.float32] is buffer and buffer.numel() == 192 * 256
    other = {}
    worker = threading.Thread(target=lambda: other.update(out=product(0), buffers=dict(quant._EXPANSION.buffers)))
    worker.start()
    worker.join()
    assert torch.equal(other["out"], expected[0])
    assert other["buffers"][torch.float32].data_ptr() != buffer.data_ptr()
    monkeypatch.setattr(quant, "EXPANSION_BUFFER_BYTES", 128 * 256 * 4 - 1)
    monkeypatch.setattr(quant, "_EXPANSION", threading.local())
    assert torch.equal(product(1), expected[1])
    assert not getattr(quant._EXPANSION, "buffers", {})


@pytest.mark.parametrize("layout", ["batched", "grouped"])
def test_frozen_quantized_weights_train_their_inputs_without_keeping_expanded_copies(layout):
    """Under autograd a quantized projection (QLoRA's frozen base) gives its input the gradient of the expanded
    weights, but keeps no expanded weight for the backward pass (it expands it again there): the tensors saved
    between forward and backward are the input-sized ones, never a weight-sized one."""
    from diffgemma.config import parse_model_config
    from diffgemma.model import Experts
    from diffgemma.presets import preset_config
    from diffgemma.quant import QuantExperts, QuantFormat, QuantLinear, dequantize

    torch.manual_seed(0)
    fmt = QuantFormat("int4", 32, 32)
    config = parse_model_config(preset_config("tiny"), "tiny")
    float_experts = Experts(config)
    torch.nn.init.normal_(float_experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(float_experts.down_proj, std=0.05)
    experts = QuantExperts(float_experts, fmt)
    for name in ("gate_up_proj", "down_proj"):
        experts.load_float(name, getattr(float_experts, name).detach())
    experts.group_align = 1 if layout == "grouped" else None
    linear = torch.nn.Linear(64, 96, bias=True)
    projection = QuantLinear(linear, fmt)
    projection.load_float("weight", linear.weight.detach())
    tokens = torch.randn(7, config.hidden_size)
    routed = torch.randint(0, config.num_experts, (7, config.top_k_experts))
    weights = torch.rand(7, config.top_k_experts)
    inputs = torch.randn(5, 64)

    stored = {b.untyped_storage().data_ptr() for m in (experts, projection) for b in m.buffers()}
    saved = []  # sizes of the tensors autograd keeps that are not the modules' own quantized buffers

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in stored:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        x, y = tokens.clone().requires_grad_(), inputs.clone().requires_grad_()
        (experts(x, routed, weights).square().sum() + projection(y).square().sum()).backward()
    smallest_weight = min(float_experts.down_proj.numel(), linear.weight.numel())
    assert saved and max(saved) < smallest_weight, (max(saved), smallest_weight)

    # the same gradients as autograd through the expanded weights
    expanded = Experts(config)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            stored = getattr(experts, f"{name}_qweight"), getattr(experts, f"{name}_scale")
            getattr(expanded, name).copy_(dequantize(*stored, fmt, torch.float32))
    expanded.group_align = experts.group_align
    plain_weight = dequantize(projection.weight_qweight, projection.weight_scale, fmt, torch.float32)
    x2, y2 = tokens.clone().requires_grad_(), inputs.clone().requires_grad_()
    plain = torch.nn.functional.linear(y2, plain_weight, linear.bias)
    (expanded(x2, routed, weights).square().sum() + plain.square().sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad, y2.grad, rtol=1e-5, atol=1e-6)
