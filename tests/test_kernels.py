"""The fused int4 / int8 / fp8 kernel (diffgemma/kernels.py), run on the CPU by Triton's interpreter, against the
weights expanded as the portable path does; and the fallback when a kernel refuses a call."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffgemma import DiffGemmaError, kernels, quant
from diffgemma.quant import QuantFormat, QuantLinear

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "bench"))
from kernel_tiles import compile_for_gpu  # noqa: E402 - bench/ is not a package


def test_fused_kernel_matches_expanded_weights():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(HERE / "kernel_worker.py"), str(HERE / "assets" / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["dense"]) == 24
    for case, error in report["dense"].items():
        assert error < (1e-5 if "float32" in case else 6e-3), (case, error)  # bf16: its output rounding
    for fmt in kernels.KERNEL_FORMATS:
        assert report["grouped"][f"{fmt} experts"] < 1e-5
        assert report["grouped"][f"{fmt} padding_max"] == 0.0
    assert report["fp8_byte_mismatches"] == 0  # e4m3 rebuilt from its bits, exactly, on any GPU
    model = report["model"]
    assert model["failures"] == []
    assert model["calls"]["dense"] > 0 and model["calls"]["grouped"] > 0  # both entries served the model
    for fmt in kernels.KERNEL_FORMATS:
        assert model[f"{fmt} float32"] < 1e-5 and model[f"{fmt} float32 top1"] == 1.0
        # bf16: the kernel rounds differently from the expanded weights (int8's, fp8's scale after the sums)
        assert model[f"{fmt} bfloat16"] < 0.03 and model[f"{fmt} bfloat16 top1"] > 0.95


def test_a_refused_kernel_falls_back_to_expanded_weights(monkeypatch):
    fmt = QuantFormat("int4", 32, 32)
    linear = torch.nn.Linear(64, 24, bias=False)
    module = QuantLinear(linear, fmt)
    module.load_float("weight", linear.weight.detach())
    x = torch.randn(5, 64)
    expected = module(x)  # no kernel on a CPU without the interpreter: the expanding path

    def refuse(*args):
        raise RuntimeError("no kernel image for this device\nsecond line")

    monkeypatch.setattr(kernels, "kernel_takes", lambda *args: True)
    monkeypatch.setattr(kernels, "quantized_linear", refuse)
    monkeypatch.setitem(quant._DIRECT, "failures", [])
    monkeypatch.setitem(quant._DIRECT, "broken", set())
    assert quant.direct_kernel(fmt, x, (24, 64))
    with pytest.warns(UserWarning, match="int4: no kernel image for this device; expanding"):
        out = module(x)
    torch.testing.assert_close(out, expected)
    assert quant.direct_kernel_failures() == ["int4: no kernel image for this device"]
    assert not quant.direct_kernel(fmt, x, (24, 64))  # a kernel that failed to build is not tried again


def test_no_kernel_under_autograd_or_for_shapes_it_does_not_take(monkeypatch):
    fmt = QuantFormat("int4", 64, 16)
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    x = torch.randn(4, 96)
    if kernels.triton is None:
        assert not quant.direct_kernel(fmt, x, (24, 96))
        return
    assert quant.direct_kernel(fmt, x, (24, 96))  # group 32 (the common divisor with 96)
    assert not quant.direct_kernel(QuantFormat("int4", 48, 48), x, (24, 96))  # groups of 48: not a power of two
    assert not kernels.kernel_takes(torch.randn(4, 96, dtype=torch.float64), "int4", 96, 32)
    assert quant.direct_kernel(QuantFormat("int8"), x, (24, 96))  # int8 has no groups
    assert quant.direct_kernel(QuantFormat("fp8"), x, (24, 96))  # fp8 off Hopper: this kernel
    assert not quant.fp8_matrix_units(QuantFormat("fp8"), x)
    assert not quant.direct_kernel(fmt, x.requires_grad_(), (24, 96))  # the kernel has no backward


def test_fp8_takes_the_matrix_units_on_hopper_unless_told_otherwise(monkeypatch):
    from types import SimpleNamespace

    on_gpu = SimpleNamespace(is_cuda=True, device="cuda:0")  # what fp8_matrix_units reads of a tensor
    fp8 = QuantFormat("fp8")
    monkeypatch.delenv("DIFFGEMMA_FP8_MATRIX_UNITS", raising=False)
    for capability, expected in (((9, 0), True), ((10, 0), True), ((8, 9), False), ((8, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert quant.fp8_matrix_units(fp8, on_gpu) is expected
        assert not quant.fp8_matrix_units(QuantFormat("int8"), on_gpu)
    monkeypatch.setenv("DIFFGEMMA_FP8_MATRIX_UNITS", "0")  # the fused weight-only kernel instead
    assert not quant.fp8_matrix_units(fp8, on_gpu)


def test_tile_settings_are_checked_and_the_tile_bench_dry_runs(monkeypatch):
    assert kernels.parse_tile("128,64,8,4") == {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4}
    for bad in ("64,64,4", "48,64,4,3", "8,64,4,3", "64,64,4,0", "a,b,c,d"):
        with pytest.raises(DiffGemmaError, match="DIFFGEMMA_KERNEL_TILE"):
            kernels.parse_tile(bad)
    monkeypatch.setenv("DIFFGEMMA_KERNEL_TILE", "128,32,8,2")
    assert kernels.tile() == {"BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2}
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    monkeypatch.setenv("DIFFGEMMA_KERNEL_TILE", "64,64")
    with pytest.raises(DiffGemmaError, match="DIFFGEMMA_KERNEL_TILE='64,64'"):  # an error, not a quiet fallback
        quant.direct_kernel(QuantFormat("int8"), torch.randn(2, 64), (24, 64))
    monkeypatch.delenv("DIFFGEMMA_KERNEL_TILE")
    script = HERE.parent / "bench" / "kernel_tiles.py"
    options = ["--device", "cpu", "--shape", "tiny", "--candidates", "64,64,4,3 32,128,4,4", "--iters", "1"]
    done = subprocess.run(
        [sys.executable, str(script), *options],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| expanded to bf16 + grouped GEMM | 4 |" in done.stdout
    assert "fastest for 1 canvas(es): DIFFGEMMA_KERNEL_TILE=" in done.stdout


@pytest.mark.parametrize("arch", [80, 89, 90])
def test_kernel_compiles_for_ampere_ada_and_hopper(arch):
    """The interpreter runs Python, not the GPU compiler: this builds the real kernel for A100/L40/H100-class GPUs
    for each format, activation dtype and row block (experts, dense), and checks the weight loads are
    pipelined (asynchronous copies a stage ahead) at the default tile."""
    pytest.importorskip("triton")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    for fmt, group in (("int4", 64), ("int4", 16), ("int8", 1), ("fp8", 1)):
        if fmt == "fp8" and arch >= 90:
            continue  # Hopper: fp8 takes the fp8 matrix units
        for dtype in ("bf16", "fp16") if arch == 80 else ("bf16",):
            for block_rows, one_weight in ((kernels.EXPERT_BLOCK_ROWS, False), (kernels.DENSE_BLOCK_ROWS, True)):
                compiled = compile_for_gpu(arch, fmt, dtype, block_rows, one_weight, kernels.tile(), group)
                assert "async_copy_global_to_local" in compiled.asm["ttgir"], (fmt, dtype, block_rows)
                assert compiled.asm["cubin"]


def test_every_benchmarked_tile_compiles_for_hopper():
    pytest.importorskip("triton")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from kernel_tiles import CANDIDATES

    for text in CANDIDATES.split():
        tile = kernels.parse_tile(text)
        for fmt in ("int4", "int8"):
            assert compile_for_gpu(90, fmt, "bf16", kernels.EXPERT_BLOCK_ROWS, False, tile).asm["cubin"]
