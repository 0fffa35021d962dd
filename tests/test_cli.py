"""The `diffgemma` command: outputs, errors (one line, exit 2), atomic edits, and the live canvas in a terminal."""

import fcntl
import io
import itertools
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from assets.make_demo_model import ANSWERS, FRUIT, SKY
from screen_util import Terminal, sized_terminal

import diffgemma
from diffgemma import DiffGemmaError, sampling
from diffgemma.cli import SUDOKU_MODEL, main

DEMO = str(Path(__file__).parent / "assets" / "demo")
PIRATE = Path(__file__).parent / "assets" / "demo-pirate"  # a LoRA adapter of the demo (make_demo_adapter.py)


def chat_text(model, question: str) -> str:
    """A question's chat prompt as the text `generate` takes (it adds the BOS itself): the demo's taught answer
    follows it, where free text would end wherever the tiny model's babble does."""
    return model.tokenizer.apply_chat_template([{"role": "user", "content": question}]).removeprefix("<bos>")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"diffgemma {diffgemma.__version__}"
    module = subprocess.run([sys.executable, "-m", "diffgemma", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.strip() == f"diffgemma {diffgemma.__version__}"  # python -m
    failed = subprocess.run([sys.executable, "-m", "diffgemma", "info", "--model", "/nowhere"], capture_output=True)
    assert failed.returncode == 2 and failed.stderr.startswith(b"diffgemma: ")  # its exit status passed on


def test_help_version_and_option_errors_answer_without_importing_torch():
    """PyTorch takes about two seconds to import: the command line parses its options and answers --help,
    --version and a mistyped option without it, and a command that runs a model imports it then."""
    script = (
        "import sys\nfrom diffgemma.cli import main\n"
        "for argv in (['--version'], ['generate', '--help'], ['chat', '--bogus']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)\n"
    )
    quick = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert quick.returncode == 0 and quick.stdout.strip().splitlines()[-1] == "False"
    assert "unrecognized arguments: --bogus" in quick.stderr
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, diffgemma\ndiffgemma.load\nprint('torch' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert loaded.stdout.strip() == "True"  # `load` brings it


def test_info(capsys):
    code, out, _ = run(capsys, "info", "--model", DEMO)
    assert code == 0 and "experts" in out and "parameters" in out and "bfloat16" in out
    int4 = next(line for line in out.splitlines() if line.strip().startswith("int4"))
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    sizes = [float(n) * scale[unit] for n, unit in re.findall(r"([\d.]+) (KiB|MiB|GiB)", int4)]
    whole, weights, cache, prefix, sampler, activations, step, prompt, expanded, direct = sizes
    rounding = 0.3 * 2**20  # each figure is printed to a tenth of its unit
    assert activations > 0 and activations == pytest.approx(step + prompt, abs=rounding)
    assert whole == pytest.approx(weights + cache + prefix + sampler + activations + expanded, abs=rounding)
    assert direct == pytest.approx(whole - expanded, abs=rounding) and "where a kernel takes int4" in int4


@pytest.mark.parametrize(
    "option, expected",
    [
        (("--context", "-5"), "--context must be between 0 and"),
        (("--context", str(10**11)), "max_position_embeddings"),
    ],
)
def test_info_rejects_a_context_or_batch_it_cannot_estimate(capsys, option, expected):
    code, _, err = run(capsys, "info", "--model", DEMO, *option)
    assert code == 2 and expected in err and "Traceback" not in err


def test_info_says_which_cpu_kernels_this_machine_gives(capsys, monkeypatch):
    from diffgemma import quant

    layout = quant.cpu_int4_kernel_layout()  # x86 builds of PyTorch: one we know
    code, out, _ = run(capsys, "info", "--model", DEMO)
    line = next(line for line in out.splitlines() if line.startswith("this CPU"))
    int8 = "int8 in the int8 matrix units (AMX" if quant.cpu_int8_units() else "int8 yes"
    assert code == 0 and int8 in line
    for units in (True, False):  # (whichever this CPU is, both are told)
        monkeypatch.setattr(quant, "_amx_int8", lambda units=units: units)
        _, out, _ = run(capsys, "info", "--model", DEMO)
        assert ("int8 in the int8 matrix units" in out) == units and ("int8 yes" in out) != units
    if layout is not None:
        assert f"int4 yes (blocks of {layout[0]} outputs" in line and ("j + " in line) == layout[1]
    monkeypatch.setattr(quant, "cpu_int4_kernel_layout", lambda: None)
    _, out, _ = run(capsys, "info", "--model", DEMO)
    assert "int4 no (a weight layout we do not know: expands)" in out
    monkeypatch.setenv("DIFFGEMMA_CPU_KERNELS", "0")
    _, out, _ = run(capsys, "info", "--model", DEMO)
    assert "this CPU        off (DIFFGEMMA_CPU_KERNELS=0)" in out


def test_info_says_what_memory_a_load_here_would_find(capsys, monkeypatch):
    from diffgemma import cli

    monkeypatch.setattr(cli.checkpoints, "free_memory", lambda device: 3 * 2**30 if device.type == "cpu" else None)
    _, out, _ = run(capsys, "info", "--model", DEMO)
    assert "free here       3.00 GiB on cpu\n" in out


def test_info_says_what_auto_loads_a_checkpoint_in(capsys, monkeypatch, tmp_path):
    from diffgemma import api
    from diffgemma.presets import random_checkpoint

    _, out, _ = run(capsys, "info", "--model", DEMO)
    assert "stored dtype    float32; --dtype auto loads it in float32 on cpu" in out
    folder = random_checkpoint(tmp_path / "bf16", preset="tiny", dtype=torch.bfloat16)
    for fast, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(api, "bf16_is_fast", lambda device, fast=fast: fast)
        _, out, _ = run(capsys, "info", "--model", str(folder))
        assert f"stored dtype    bfloat16; --dtype auto loads it in {expected} on cpu" in out
        cpu = next(line for line in out.splitlines() if line.startswith("this CPU"))
        assert cpu.endswith("; bf16 products in hardware" if fast else "(float32 is faster)")


def test_commands_that_run_a_model_load_it_in_auto_training_in_float32_and_merging_as_stored():
    from diffgemma.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "hi"], ["chat"], ["serve"], ["sudoku", "--puzzle", "0" * 81]):
        assert parser.parse_args(argv).dtype == "auto", argv
    assert parser.parse_args(["train", "chat", "--data", "d.jsonl", "--out", "o"]).dtype == "float32"
    assert parser.parse_args(["lora-merge", "--adapter", "a", "--out", "o"]).dtype == "stored"  # keeps a bf16 base


def test_every_option_of_every_command_says_what_it_is():
    """`--help` explains each option (an option listed with no words is one a user must guess at)."""
    from diffgemma.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    unexplained = [
        f"{name} {action.option_strings[-1]}"
        for name, command in commands.items()
        for action in command._actions
        if action.option_strings and not action.help and action.dest != "help"
    ]
    assert len(commands) >= 16 and unexplained == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "--port", "70000"], "--port: must be between 0 and 65535, got 70000"),
        (["serve", "--max-batch", "0"], "--max-batch: must be at least 1, got 0"),
        (["serve", "--max-runs", "0"], "--max-runs: must be at least 1, got 0"),
        (["train", "sudoku", "--out", "o", "--steps", "0"], "--steps: must be at least 1, got 0"),  # not 20000
        (["train", "chat", "--out", "o", "--batch-size", "-2"], "--batch-size: must be at least 1, got -2"),
        (["sudoku-puzzles", "0"], "count: must be at least 1, got 0"),
        (["info", "--model", DEMO, "--batch", "0"], "--batch: must be at least 1, got 0"),
        (["quantize", DEMO, "o", "--to", "int8", "--group-size", "32"], "are int4's"),
    ],
)
def test_numbers_out_of_range_are_refused_before_anything_runs(capsys, argv, expected):
    try:
        code = main(argv)
    except SystemExit as usage_error:  # argparse's own exit
        code = usage_error.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--steps", "0"], "--steps must be a positive integer up to 1,000,000, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        (["--top-p", "2"], "--top-p must be a number from 0 to 1"),
        (["--frequency-penalty", "3"], "--frequency-penalty must be a number from -2 to 2 (0: off), got 3.0"),
        (["--t-max", "-1"], "--t-max must be a number > --t-min (0.0), got -1.0"),  # (any t_min would be >= 0)
        (["--t-min", "0.3", "--t-max", "0.2"], "--t-max must be a number > --t-min (0.3), got 0.2"),
    ],
)
def test_sampler_options_out_of_range_are_refused_before_the_model_loads(options, expected, monkeypatch, capsys):
    """A large checkpoint takes minutes to load: an option it would refuse is refused first, named as typed."""
    import diffgemma.api

    monkeypatch.setattr(diffgemma.api, "load", lambda *args, **kwargs: pytest.fail("the model loaded first"))
    assert main(["generate", "x", "--model", DEMO, *options]) == 2
    assert f"diffgemma: {expected}" in capsys.readouterr().err


def test_sampler_options_are_checked_against_the_checkpoints_schedule(capsys):
    """Where one end of the temperature schedule is given, the checkpoint's other end decides (demo: 0.4 to 0.8)."""
    assert main(["generate", "x", "--model", DEMO, "--t-max", "0.3"]) == 2
    assert "diffgemma: --t-max must be a number > --t-min (0.4), got 0.3" in capsys.readouterr().err


def test_info_on_a_quantized_checkpoint_gives_its_format_alone(capsys, tmp_path):
    from diffgemma.presets import random_checkpoint

    source = random_checkpoint(tmp_path / "float", preset="tiny", seed=3)
    quantized = tmp_path / "int4"
    assert main(["quantize", str(source), str(quantized), "--to", "int4", "--group-size", "32"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "info", "--model", str(quantized))
    memory, training = out.split("training state")
    rows = [line.split()[0] for line in memory.splitlines() if line.startswith("  ") and "MiB (" in line]
    assert code == 0 and "quantized       int4, groups of 32, attention 16" in out
    assert rows == ["int4", "int4"]  # its own format, the rest in bf16 and in float32; no float rows
    trained = [line.split("  ")[1] for line in training.splitlines() if line.startswith("  ")]
    assert trained == ["QLoRA 16, int4 + float32", "QLoRA 16, int4 + bf16"]  # adapters alone over it


def test_info_needs_only_a_config(capsys, tmp_path):
    """A folder with the real model's config.json alone gives its memory per format (no 50 GB download)."""
    import json

    from diffgemma.presets import preset_config

    (tmp_path / "config.json").write_text(json.dumps(preset_config("26b-a4b")))
    code, out, _ = run(capsys, "info", "--model", str(tmp_path), "--context", "4096")
    assert code == 0 and "25.25B total" in out
    int4 = next(line for line in out.splitlines() if line.strip().startswith("int4 (bf16)"))
    # bench/RESULTS.md's 14.75, the prefix cache's 0.2 and a system turn's kept for new conversations, 0.33
    assert "15.27 GiB where a kernel takes int4" in int4
    cpu = next(line for line in out.splitlines() if line.strip().startswith("int4 (fp32)"))
    assert "weights 15.07 GiB" in cpu  # README's "On a CPU" (the rest in float32)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi"],
        ["chat"],
        ["infill", "--prefix", "a", "--suffix", "b"],
        ["edit", "{file}", "--lines", "1:1"],
        ["score", "some text"],
        ["embed", "some text"],
        ["serve"],
        ["bench"],
        ["sudoku", "--puzzle", "0" * 81],
        ["eval", "sudoku", "--puzzles", "p.txt"],
    ],
)
def test_every_command_that_runs_the_model_takes_the_loading_options(argv, monkeypatch, capsys, tmp_path):
    """Each command reaches the loader with --quant and --compile (`serve` once lacked them and crashed), its
    --threads set first."""
    import diffgemma.api

    (tmp_path / "some.txt").write_text("a line\n")
    argv = [part.replace("{file}", str(tmp_path / "some.txt")) for part in argv]

    calls = []

    def load(path, **options):
        calls.append(options)
        raise DiffGemmaError("stop here")

    monkeypatch.setattr(diffgemma.api, "load", load)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # the test process keeps its own
    code = main([*argv, "--model", DEMO, "--quant", "int4", "--compile", "--device", "cpu", "--threads", "3"])
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert calls and calls[0]["quant"] == "int4" and calls[0]["compile"] is True
    assert threads == [3]


def test_the_device_is_auto_unless_given(monkeypatch, capsys):
    """`--device auto` (the default): a CUDA GPU if there is one, else the CPU (MPS only when asked for)."""
    import diffgemma.api

    assert diffgemma.api.resolve_device("auto") == torch.device("cpu")  # this machine has no GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert diffgemma.api.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert diffgemma.api.resolve_device("auto") == torch.device("cuda")
    monkeypatch.undo()
    devices = []

    def load(path, **options):
        devices.append(options["device"])
        raise DiffGemmaError("stop here")

    monkeypatch.setattr(diffgemma.api, "load", load)
    assert main(["generate", "hi", "--model", DEMO]) == 2 and devices == ["cpu"]


def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFGEMMA_MODEL", raising=False)
    for argv, expected in (
        (["generate", "hi"], "no model given: pass --model PATH"),
        (["generate", "hi", "--model", str(tmp_path / "missing")], "folder not found"),
        (["edit", str(tmp_path / "nofile.txt"), "--lines", "1:2", "--model", DEMO], "file not found"),
        (["edit", str(tmp_path), "--lines", "1:2", "--model", DEMO], "cannot read it"),  # a folder
        (["generate", "hi", "--model", DEMO, "--threads", "0"], "--threads must be at least 1, got 0"),
        (["generate", "hi", "--model", DEMO, "--top-p", "2"], "--top-p must be a number from 0 to 1"),
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and expected in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as bad_option:
        main(["generate", "hi", "--steps", "many"])
    assert bad_option.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    # a task that sets its own length takes no --max-new-tokens (it was a traceback: two values for one argument)
    for argv in (["infill", "--prefix", "a", "--suffix", "b"], ["sudoku", "--tries", "1"]):
        with pytest.raises(SystemExit) as refused:
            main([*argv, "--model", DEMO, "--max-new-tokens", "5"])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "--max-new-tokens" in err and err.count("\n") == 1


def test_top_k_top_p_and_min_p_options_reach_the_sampler(capsys, demo):
    argv = ["generate", "Hello", "--model", DEMO, "--seed", "1", "--max-new-tokens", "40", "--no-stream"]
    cuts = (
        (["--top-k", "2"], {"top_k": 2}),
        (["--top-p", "0.2"], {"top_p": 0.2}),
        (["--min-p", "0.5"], {"min_p": 0.5}),
    )
    for options, cut in cuts:
        code, out, _ = run(capsys, *argv, *options)
        assert code == 0 and out == demo.generate("Hello", 40, seed=1, **cut).text + "\n"
        assert out != demo.generate("Hello", 40, seed=1).text + "\n"  # (the cut changes this text)


def test_loading_shows_its_progress_on_a_terminal(monkeypatch, capsys, tmp_path):
    """`load(progress=...)` is told the bytes read after each tensor, up to the checkpoint's whole; a command shows
    them as a bar on a terminal's stderr, gone once loaded, and writes nothing of it where stderr is no terminal."""
    import diffgemma

    told = []
    diffgemma.load(DEMO, progress=lambda done, total: told.append((done, total)))
    weights = sum(path.stat().st_size for path in Path(DEMO).glob("*.safetensors"))
    assert len(told) > 10 and told[-1][0] == told[-1][1] and 0.9 * weights < told[-1][1] <= weights
    assert all(a[0] < b[0] for a, b in itertools.pairwise(told))
    argv = ["generate", "Hi", "--model", DEMO, "--max-new-tokens", "4", "--no-stream"]
    assert main(argv) == 0 and capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    assert "loading" in capsys.readouterr().err
    # writing a checkpoint tells the bytes made as well: quantize and lora-merge show them
    assert main(["quantize", DEMO, str(tmp_path / "q"), "--to", "int8"]) == 0
    assert "quantizing to int8" in capsys.readouterr().err
    assert main(["lora-merge", "--model", DEMO, "--adapter", str(PIRATE), "--out", str(tmp_path / "m")]) == 0
    assert "merging" in capsys.readouterr().err
    from diffgemma.quant import QuantFormat, quantize_checkpoint

    made = []
    int4 = QuantFormat("int4")
    quantize_checkpoint(Path(DEMO), tmp_path / "q2", int4, torch.float32, progress=lambda *n: made.append(n))
    assert made[-1][0] == made[-1][1] and all(a[0] < b[0] for a, b in itertools.pairwise(made))


def test_generate_chat_and_infill(capsys):
    code, out, err = run(
        capsys, "generate", "Hello", "--model", DEMO, "--seed", "1", "--max-new-tokens", "20", "--stats"
    )
    assert code == 0 and out.endswith("\n") and "denoising steps" in err
    code, out, _ = run(
        capsys,
        "infill",
        "--prefix",
        "Hello! I am a ",
        "--suffix",
        " model.",
        "--length",
        "3",
        "--model",
        DEMO,
        "--seed",
        "2",
    )
    assert code == 0 and out.startswith("Hello! I am a ") and out.rstrip("\n").endswith(" model.")


def test_score_says_how_likely_a_text_is(capsys, tmp_path, demo):
    """`score`: the log-likelihood and perplexity `DiffGemma.score` gives, each token's with --tokens, JSON."""
    text = "Why is the sky blue?"
    expected = demo.score(text)
    code, out, _ = run(capsys, "score", text, "--model", DEMO)
    scored = len(expected.ids) - 1
    assert code == 0
    assert out == (
        f"{scored} tokens scored, log-likelihood {expected.total:.3f} ({expected.total / scored:.4f} a token), "
        f"perplexity {expected.perplexity:.3f}\n"
    )
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    code, out, _ = run(capsys, "score", "--file", str(tmp_path / "text.txt"), "--model", DEMO, "--json", "--tokens")
    record = json.loads(out)
    assert record["tokens"] == scored and record["logprob"] == pytest.approx(expected.total, abs=1e-4)
    assert [entry["token"] for entry in record["per_token"]][1:] == list(text)  # byte-level: a character a token
    assert record["per_token"][0]["logprob"] is None
    code, out, _ = run(capsys, "score", text, "--model", DEMO, "--tokens")
    lines = out.splitlines()
    assert len(lines) == scored + 2 and lines[1].split()[1] == "'W'" and lines[-1].startswith(f"{scored} tokens")
    code, _, err = run(capsys, "score", "--model", DEMO)
    assert code == 2 and "give a text" in err


def test_embed_writes_each_texts_vector_or_their_similarities(capsys, tmp_path, demo):
    """`embed`: {"text", "embedding"} a text in order, as `DiffGemma.embed` gives them (a file's texts in batches);
    --similarity prints the cosine table."""
    texts = ["Why is the sky blue?", "Name a fruit.", "Hi"]
    code, out, _ = run(capsys, "embed", *texts, "--model", DEMO, "--dimensions", "5")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [record["text"] for record in records] == texts
    expected = demo.embed(texts, dimensions=5)
    assert torch.allclose(torch.tensor([record["embedding"] for record in records]), expected, atol=1e-6)
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    code, out, _ = run(capsys, "embed", "--file", str(tmp_path / "texts.jsonl"), "--batch-size", "2", "--model", DEMO)
    vectors = torch.tensor([json.loads(line)["embedding"] for line in out.splitlines()])
    assert code == 0 and torch.allclose(vectors, demo.embed(texts), atol=1e-6)
    code, out, _ = run(capsys, "embed", *texts, "--model", DEMO, "--similarity")
    rows = out.splitlines()[1:]
    assert code == 0 and len(rows) == 3
    cosine = vectors @ vectors.T
    for i, row in enumerate(rows):
        values = [float(v) for v in row.split()[1:4]]
        assert values == pytest.approx(cosine[i].tolist(), abs=1e-3) and row.endswith(repr(texts[i]))
    for argv, says in (
        ([], "give texts"),
        (["a", "--file", "x.txt"], "give texts"),
        (["a", "--similarity"], "two texts or more"),
        (["a", "b", "--similarity", "--no-normalize"], "at unit length"),
    ):
        code, _, err = run(capsys, "embed", *argv, "--model", DEMO)
        assert code == 2 and says in err


def test_a_text_cut_at_the_token_limit_says_so(capsys, monkeypatch, demo):
    """Cut at --max-new-tokens (no EOS before it), the text says so on stderr; `chat` answers run to EOS (its
    limit 4096 unless set), not the checkpoint's one canvas."""
    code, out, err = run(
        capsys, "generate", chat_text(demo, SKY), "--model", DEMO, "--seed", "0", "--max-new-tokens", "9"
    )
    assert code == 0 and out.strip() == ANSWERS[SKY][:9].strip()
    assert "[cut at the 9-token limit; --max-new-tokens sets it]" in err
    code, out, err = run(
        capsys, "chat", "Why is the sky blue?", "--model", DEMO, "--seed", "1", "--max-new-tokens", "9"
    )
    assert out.strip() == ANSWERS["Why is the sky blue?"][:9].strip() and "cut at the 9-token limit" in err
    asked = []
    original = diffgemma.DiffGemma.stream
    monkeypatch.setattr(diffgemma.DiffGemma, "stream", lambda self, *a, **k: asked.append(k) or original(self, *a, **k))
    code, out, err = run(capsys, "chat", "Why is the sky blue?", "--model", DEMO, "--seed", "1")
    assert out.strip() == ANSWERS["Why is the sky blue?"] and "cut" not in err
    assert asked[0]["max_new_tokens"] == 4096
    assert demo.generate(chat_text(demo, SKY), max_new_tokens=9, seed=0).reached_limit == [True]
    assert demo.chat([{"role": "user", "content": "Why is the sky blue?"}], seed=1).result.reached_limit == [False]
    stopped = demo.generate(chat_text(demo, SKY), max_new_tokens=40, seed=0, stop=" ")
    assert stopped.stopped == [True] and stopped.reached_limit == [False]


def test_chat_session_with_reset(tmp_path):
    session = "Say hello.\n/think off\n/reset\nCount to five.\n/exit\n"
    out = subprocess.run(
        [sys.executable, "-m", "diffgemma.cli", "chat", "--model", DEMO, "--seed", "0"],
        input=session,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert out == [ANSWERS["Say hello."], "(thinking off)", "(history cleared)", ANSWERS["Count to five."]]


def test_chat_answers_one_message_and_keeps_a_system_prompt_across_reset(capsys, monkeypatch):
    import io

    sky = "Why is the sky blue?"
    code, out, _ = run(capsys, "chat", sky, "--model", DEMO, "--seed", "0")
    assert code == 0 and out == ANSWERS[sky] + "\n"
    asked = chat_prompts(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{sky}\n/reset\nCount to five.\n"))
    code, out, _ = run(capsys, "chat", "--model", DEMO, "--seed", "0", "--system", "Be brief.")
    system = {"role": "system", "content": "Be brief."}
    assert code == 0 and [messages[0] for messages, _ in asked] == [system, system]
    assert asked[1][0] == [system, {"role": "user", "content": "Count to five."}]  # the reset kept the system prompt


def test_chat_reads_a_system_prompt_from_a_file(capsys, monkeypatch, tmp_path):
    """`--system-file FILE` is `--system` with the file's text (its surrounding blank lines left out); a missing
    file is a clear error before the model loads, and both options at once are refused."""
    instructions = tmp_path / "system.txt"
    instructions.write_text("Be brief.\nAnswer in plain words.\n\n", encoding="utf-8")
    asked = chat_prompts(monkeypatch)
    code, _, _ = run(
        capsys, "chat", "Name a fruit.", "--model", DEMO, "--seed", "0", "--system-file", str(instructions)
    )
    assert code == 0 and asked[0][0][0] == {"role": "system", "content": "Be brief.\nAnswer in plain words."}
    code, _, err = run(capsys, "chat", "hi", "--model", DEMO, "--system-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt: file not found" in err
    with pytest.raises(SystemExit):
        run(capsys, "chat", "hi", "--model", DEMO, "--system", "x", "--system-file", str(instructions))


def chat_prompts(monkeypatch) -> list[tuple[list, int | None]]:
    """What each chat answer is asked, (its messages, its seed), recorded as `DiffGemma.stream` is called."""
    from diffgemma.api import DiffGemma

    asked = []
    stream = DiffGemma.stream

    def recorded(self, messages, **kw):
        asked.append((list(messages), kw.get("seed")))
        return stream(self, messages, **kw)

    monkeypatch.setattr(DiffGemma, "stream", recorded)
    return asked


def test_chat_saves_and_loads_its_conversation(capsys, monkeypatch, tmp_path):
    """`/save FILE` writes the conversation as {"messages": [...]} (a `chat --file` record); `/load FILE` puts a
    saved one in place of the chat's (the system prompt first where it has none), and the next question goes on
    from it; what fails (no file, no JSON, an unwritable place) is said and the chat goes on."""
    import io
    import json

    asked = chat_prompts(monkeypatch)
    saved, bad = tmp_path / "chat.json", tmp_path / "bad.json"
    bad.write_text("not json")
    session = [
        SKY,
        f"/save {saved}",
        "/reset",
        f"/load {tmp_path / 'missing.json'}",
        f"/load {bad}",
        f"/save {tmp_path / 'no' / 'such' / 'folder.json'}",
        f"/load {saved}",
        FRUIT,
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(session) + "\n"))
    code, out, _ = run(capsys, "chat", "--model", DEMO, "--seed", "0", "--system", "Be brief.")
    lines = out.splitlines()
    system = {"role": "system", "content": "Be brief."}  # (the demo, trained without one, answers it its way)
    first = [system, {"role": "user", "content": SKY}, {"role": "assistant", "content": lines[0]}]
    assert code == 0 and json.loads(saved.read_text()) == {"messages": first}
    assert asked[1][0] == [*first, {"role": "user", "content": FRUIT}]  # the loaded conversation went on
    assert lines[1] == f"(saved 3 messages to {saved})" and lines[2] == "(history cleared)"
    assert "file not found" in lines[3] and "not valid JSON" in lines[4] and lines[5].startswith("(cannot write")
    assert lines[6] == f"(loaded 3 messages from {saved})"
    saved.write_text(json.dumps({"messages": first[1:]}))  # (no system message of its own: --system's first)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/load {saved}\n{FRUIT}\n"))
    asked.clear()
    run(capsys, "chat", "--model", DEMO, "--seed", "0", "--system", "Be brief.")
    assert asked[0][0] == [*first, {"role": "user", "content": FRUIT}]


def test_chat_retry_answers_the_last_question_again_with_the_next_seed(capsys, monkeypatch):
    """`/retry` drops the last answer (and what came with it) and asks its question again, the given seed moved on
    by one (the same seed would draw the same answer); with nothing asked yet it says so."""
    import io

    asked = chat_prompts(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/retry\n{SKY}\n{FRUIT}\n/retry\n"))
    code, out, _ = run(capsys, "chat", "--model", DEMO, "--seed", "4")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "(nothing to answer again yet)" and len(asked) == 3
    first_turn = [{"role": "user", "content": SKY}, {"role": "assistant", "content": ANSWERS[SKY]}]
    assert asked[1][0] == [*first_turn, {"role": "user", "content": FRUIT}] and asked[1][1] == 4
    assert asked[2] == (asked[1][0], 5)  # the same question after the same history, the next seed
    assert lines[1] == ANSWERS[SKY] and len(lines) == 4  # (a second turn is beyond the demo: its answers vary)


def test_generate_and_chat_print_the_text_as_it_settles(monkeypatch, demo):
    """By default the text comes out in pieces as canvases settle (every step run here: no early stop), and
    adds up to what a generation that fixes settled prefixes gives; chat's thinking comes on its own line."""
    import io

    from assets.make_demo_model import THINKING

    from diffgemma.generate import run_to_end

    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    # every step run (no early stop), and few positions accepted a step: the text settles a piece at a time
    slow = ["--confidence", "1e-9", "--entropy-bound", "0.001", "--seed", "3", "--max-new-tokens", "60"]
    monkeypatch.setattr(sys, "stdout", Recorder())
    prompt = chat_text(demo, SKY)
    assert main(["generate", prompt, "--model", DEMO, *slow]) == 0
    settings = {"seed": 3, "max_new_tokens": 60, "confidence_threshold": 1e-9, "entropy_bound": 0.001}
    expected = run_to_end(demo.stream(prompt, commit_stable_prefix=True, **settings)).text
    assert sys.stdout.getvalue() == expected + "\n" and expected == ANSWERS[SKY][:60]
    assert len([piece for piece in writes if piece.strip()]) > 2
    question = "What is 3 + 4?"
    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["chat", question, "--think", "--model", DEMO, "--seed", "1"]) == 0
    thought, answer = THINKING[question]
    assert sys.stdout.getvalue() == f"[thinking] {thought}\n{answer}\n"


def test_chat_thinking_budget_ends_the_thought_there(capsys, tmp_path, monkeypatch):
    """`chat --think --thinking-budget N`: at most N tokens of thought (the demo's are bytes), streamed, printed
    whole and for a --file of conversations; with thinking off the budget is not used."""
    from assets.make_demo_model import THINKING

    question = "What is 3 + 4?"
    thought = THINKING[question][0]
    for shown in ([], ["--no-stream"]):
        argv = ["chat", question, "--think", "--thinking-budget", "10", "--model", DEMO, "--seed", "0", *shown]
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith(f"[thinking] {thought[:10]}\n"), shown
    conversations = tmp_path / "chats.jsonl"
    conversations.write_text(json.dumps({"messages": [{"role": "user", "content": question}]}) + "\n")
    argv = ["chat", "--file", str(conversations), "--think", "--thinking-budget", "5", "--model", DEMO, "--seed", "0"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["reasoning"] == thought[:5]
    assert main(["chat", "Name a fruit.", "--thinking-budget", "5", "--model", DEMO, "--seed", "1"]) == 0
    assert capsys.readouterr().out == "An apple.\n"
    # in a session: /think N turns thinking on within N tokens; /think alone turns it the other way
    session = f"/think 10\n{question}\n/think off\n/think\n/think maybe\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(session))
    assert main(["chat", "--model", DEMO, "--seed", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(thinking on, at most 10 tokens of thought)" and out[1] == f"[thinking] {thought[:10]}"
    assert out[3:] == [
        "(thinking off)",
        "(thinking on, at most 10 tokens of thought)",
        "(/think on, /think off, or /think N: on, at most N tokens of thought)",
    ]


def on_a_terminal(monkeypatch, width: int = 80) -> tuple[Terminal, list[tuple[int, int]]]:
    """The commands' progress notes drawn on one emulated terminal `width` cells wide (stdout's text there too),
    and the (canvas, step) each note was told, in order."""
    from diffgemma.cli import progress
    from diffgemma.cli import text as commands

    terminal, told = sized_terminal(monkeypatch, width), []

    class Note(progress.ProgressNote):
        def step(self, draft) -> None:
            told.append((draft.canvas_index + 1, draft.step))
            super().step(draft)

    monkeypatch.setattr(commands, "terminal_note", lambda steps: Note(steps, out=terminal, err=terminal, tick=0))
    return terminal, told


def test_on_a_terminal_a_note_after_the_text_says_how_far_the_denoising_is(capsys, monkeypatch, demo):
    """On a terminal, `chat` (and `generate`) say on stderr which canvas and step the denoising is on, a note after
    the text shown so far (a large model on a CPU takes minutes to a canvas, and the next canvas's text settles only
    after some steps), erased before more text and at the end: the screen then holds the answer alone, as
    streamed without it. Piped, there is no note (the other tests)."""
    from diffgemma.generate import run_to_end

    terminal, told = on_a_terminal(monkeypatch)
    hot = {"t_max": 3.0, "t_min": 2.0}  # (the demo then takes a dozen steps before anything settles)
    assert main(["chat", SKY, "--model", DEMO, "--seed", "0", "--t-max", "3", "--t-min", "2"]) == 0
    streamed = run_to_end(demo.stream([{"role": "user", "content": SKY}], seed=0, commit_stable_prefix=True, **hot))
    answer = demo.settled_text(True).parts(streamed.new_tokens[0])[0]
    assert terminal.screen() == [answer, ""] and capsys.readouterr().out == ""
    assert told[:2] == [(1, 1), (1, 2)] and max(told)[0] >= 2  # (its answer takes more than one canvas)
    shown = terminal.getvalue()
    first_text = shown.index(answer.split()[0])
    assert "\x1b[2m⠋ reading the prompt" in shown[:first_text] and "canvas 1, step 1 of 16" in shown[:first_text]
    assert re.search(r"\x1b\[2m ⠋ denoising: canvas 2, step \d+ of 16", shown[first_text:])  # (after the text)


def test_without_streaming_or_with_tools_the_note_shows_until_the_whole_answer_does(
    capsys, monkeypatch, demo, tmp_path
):
    """`--no-stream` on a terminal: the note runs through every canvas (nothing else shows until the end), gone
    before the text, which is the Python API's for the seed; so it does while an agent's turn is denoised, a
    note for each of its rounds."""
    from assets.make_demo_model import WEATHER_ANSWER, WEATHER_QUESTION, WEATHER_RESULT

    terminal, told = on_a_terminal(monkeypatch)
    assert main(["chat", SKY, "--model", DEMO, "--seed", "0", "--no-stream"]) == 0  # (its answer: two canvases)
    assert (2, 1) in told and terminal.screen() == [""]
    assert capsys.readouterr().out == demo.chat([{"role": "user", "content": SKY}], seed=0).content + "\n"
    tools = tmp_path / "weather.py"
    tools.write_text(
        f'def get_weather(city: str) -> str:\n    """The weather now in a city"""\n    return {WEATHER_RESULT!r}\n'
    )
    told.clear()
    assert main(["chat", WEATHER_QUESTION, "--tools", str(tools), "--model", DEMO, "--seed", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == WEATHER_ANSWER
    assert told.count((1, 1)) == 2 and terminal.getvalue().count("reading the prompt") == 3  # (a call, an answer)


def test_files_fills_and_edits_show_the_note_while_they_denoise(capsys, monkeypatch, tmp_path):
    """The note shows for the other commands that denoise for long on a terminal (a `--file`'s batches, `infill`,
    `edit` of lines or by an instruction), each erased before its output, which is as piped."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a", "max_denoising_steps": 4}\n{"prompt": "b", "max_denoising_steps": 6}\n')
    notes = tmp_path / "notes.txt"
    notes.write_text("one\ntwo\nthree\n")
    runs = (
        ["generate", "--file", str(prompts), "--max-new-tokens", "8"],
        ["infill", "--prefix", "The sky ", "--suffix", " blue.", "--length", "3"],
        ["edit", str(notes), "--lines", "2:2"],
        ["edit", str(notes), "--instruction", "Capitalise the words."],
    )
    piped = []
    for argv in runs:
        assert main([*argv, "--model", DEMO, "--seed", "0"]) == 0
        piped.append(capsys.readouterr().out)
    for argv, out in zip(runs, piped, strict=True):
        terminal, told = on_a_terminal(monkeypatch)
        assert main([*argv, "--model", DEMO, "--seed", "0"]) == 0
        assert capsys.readouterr().out == out and told and told[0] == (1, 1), argv
        steps = 6 if argv[0] == "generate" else 16  # (a batch whose rows differ in steps: the most)
        assert terminal.screen() == [""] and f"denoising: canvas 1, step 1 of {steps}" in terminal.getvalue()


def test_chat_sets_sampler_settings_in_a_session(capsys, monkeypatch):
    """`/set NAME VALUE` (the option's spelling or the field's) changes a sampler setting for the answers that
    follow, `/set NAME default` gives the model's back, `/set` alone lists them; a bad name or value is said
    and the settings stay as they were."""
    from diffgemma.api import DiffGemma

    asked = []
    stream = DiffGemma.stream

    def recorded(self, messages, **kw):
        asked.append({key: kw.get(key) for key in ("t_max", "max_denoising_steps", "frequency_penalty")})
        return stream(self, messages, **kw)

    monkeypatch.setattr(DiffGemma, "stream", recorded)
    session = [
        "/set t-max 1.5",
        "/set max_denoising_steps 4",
        "/set frequency-penalty 9",
        "/set top-p x",
        "/set bogus 1",
        FRUIT,
        "/set steps default",
        FRUIT,
        "/set",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(session) + "\n"))
    assert main(["chat", "--model", DEMO, "--seed", "0", "--frequency-penalty", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "(t_max 1.5)",
        "(max_denoising_steps 4)",
        "(call arguments: `frequency_penalty` must be a number from -2 to 2 (0: off), got 9.0)",
        "(top-p takes a number, got 'x')",
    ]
    assert out[4].startswith("(/set NAME VALUE or /set NAME default, NAME one of ") and "t-max" in out[4]
    assert asked == [
        {"t_max": 1.5, "max_denoising_steps": 4, "frequency_penalty": 0.5},
        {"t_max": 1.5, "max_denoising_steps": None, "frequency_penalty": 0.5},
    ]
    assert out[6] == "(max_denoising_steps 16)"
    assert (
        out[-1].startswith("(max_denoising_steps 16, entropy_bound 0.1, t_max 1.5,")
        and "max_new_tokens 4096" in out[-1]
    )


def test_bench_times_every_step_and_prints_a_table(capsys, demo, monkeypatch):
    """`diffgemma bench`: each step of each canvas runs (no early stop, no EOS, whatever the model writes), a row
    of figures for each batch size asked, as a table or JSON lines."""
    from diffgemma.benchmark import _timed, measure_speed

    every_step = {"confidence_threshold": sys.float_info.min, "eos_token_id": [], "max_denoising_steps": 5}
    question = demo.tokenizer.encode_chat([{"role": "user", "content": SKY}])  # (an answer that converges at once)
    firsts, others = _timed(demo, [question], 3, every_step, cuda=False)
    assert (len(firsts), len(others)) == (3, 12) and min(firsts + others) > 0
    told = []
    report = measure_speed(demo, batch=2, prompt_tokens=10, canvases=2, steps=3, progress=lambda *n: told.append(n))
    assert told == [(k, 9) for k in range(1, 10)]  # (3 steps of warm-up, then 2 canvases of 3)
    kept, held = demo.prefix_cache, list(demo.prefix_cache.snapshots)
    measure_speed(demo, batch=1, prompt_tokens=10, canvases=1, steps=3)
    assert demo.prefix_cache is kept and kept.snapshots == held  # (a bench's prompts are neither read nor kept)
    assert report.tokens_per_second == pytest.approx(2 * 32 * 1000 / (3 * report.step_ms))
    assert report.whole_tokens_per_second < report.tokens_per_second  # (the encodings, counted)
    assert report.peak_bytes > 0
    with pytest.raises(DiffGemmaError, match="exceed the model's"):
        measure_speed(demo, prompt_tokens=demo.config.max_position_embeddings)
    with pytest.raises(DiffGemmaError, match="ask 2 or more"):
        measure_speed(demo, steps=1)

    argv = ["bench", "--model", DEMO, "--batch", "1", "3", "--prompt-tokens", "12", "--canvases", "1", "--steps", "3"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{DEMO}: float32 weights on cpu") and "3 steps each" in lines[1]
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["1", "3"]
    assert main([*argv, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["batch"], row["steps"], row["prompt_tokens"]) for row in rows] == [(1, 3, 12), (3, 3, 12)]
    assert all(row["tokens_per_second"] > 0 for row in rows)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # on a terminal, a bar counts each batch's steps
    assert main([*argv, "--json"]) == 0
    shown = capsys.readouterr().err
    assert "timing 1 row(s)" in shown and "timing 3 row(s)" in shown and "6/6" in shown
    seen = []  # a client's cuts, timed as they run: the steps sample with them
    monkeypatch.setattr(sampling, "truncate", lambda logits, **cut: seen.append(cut) or logits)
    assert main([*argv, "--top-k", "40", "--top-p", "0.9"]) == 0
    assert "3 steps each (every step run), top-k 40, top-p 0.9" in capsys.readouterr().out
    assert seen and all(cut["top_k"] == 40 and cut["top_p"] == 0.9 for cut in seen)
    assert main([*argv, "--min-p", "2"]) == 2 and "--min-p must be a number from 0 to 1" in capsys.readouterr().err


def test_chat_with_tools_runs_the_calls_and_answers(capsys, tmp_path, monkeypatch):
    """`chat --tools FILE`: the file's public functions are the tools; each call the model makes is run and
    shown, its result told to the model, and the answer printed. A bad file is one line, exit 2."""
    from assets.make_demo_model import WEATHER_ANSWER, WEATHER_QUESTION, WEATHER_RESULT

    tools = tmp_path / "weather.py"
    tools.write_text(
        "from json import dumps\n\n\n"
        f'def get_weather(city: str) -> str:\n    """The weather now in a city"""\n    return {WEATHER_RESULT!r}\n\n\n'
        "def _unoffered():\n    return dumps\n"
    )
    code, out, _ = run(capsys, "chat", WEATHER_QUESTION, "--tools", str(tools), "--model", DEMO, "--seed", "0")
    assert code == 0 and out.splitlines() == [f"[tool] get_weather(city='Paris') -> {WEATHER_RESULT}", WEATHER_ANSWER]
    monkeypatch.setattr("diffgemma.cli.text.MAX_TOOL_ROUNDS", 1)  # a model that would call on and on is made to answer
    code, out, err = run(capsys, "chat", WEATHER_QUESTION, "--tools", str(tools), "--model", DEMO, "--seed", "0")
    assert code == 0 and "[1 rounds of tool calls; answering without tools]" in err
    assert out.startswith("[tool] get_weather") and out.count("[tool]") == 1  # one round, then an answer
    named_otherwise = tmp_path / "weather.tools"  # Python whatever the file is named (was an AttributeError)
    named_otherwise.write_text(tools.read_text())
    code, out, _ = run(
        capsys, "chat", WEATHER_QUESTION, "--tools", str(named_otherwise), "--model", DEMO, "--seed", "0"
    )
    assert code == 0 and out.splitlines()[-1] == WEATHER_ANSWER
    (tmp_path / "none.py").write_text("import json\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('no network')\n")
    (tmp_path / "untyped.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "binary.dat").write_bytes(b"\x00\xff\x01")
    for name, message in (
        ("missing.py", "no such file"),
        ("none.py", "defines no public function"),
        ("broken.py", "RuntimeError: no network"),
        ("untyped.py", "needs a type hint"),
        ("binary.dat", "SyntaxError"),
    ):
        code, _, err = run(capsys, "chat", "hi", "--tools", str(tmp_path / name), "--model", DEMO)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, name


def test_a_chat_template_given_in_the_checkpoints_place(capsys, tmp_path):
    """`--chat-template FILE` renders the chat (here a template that always asks the demo for a fruit, so the
    answer shows whose template ran); an unreadable or broken file is one line, exit 2."""
    fruit = "{{ bos_token }}<|turn>user\nName a fruit.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    (tmp_path / "fruit.jinja").write_text(fruit)
    (tmp_path / "broken.jinja").write_text("{% if %}")
    code, out, _ = run(capsys, "chat", SKY, "--chat-template", str(tmp_path / "fruit.jinja"), "--model", DEMO)
    assert code == 0 and out.strip() == ANSWERS["Name a fruit."]
    for name, message in (("missing.jinja", "file not found"), ("broken.jinja", "syntax error")):
        code, _, err = run(capsys, "chat", SKY, "--chat-template", str(tmp_path / name), "--model", DEMO)
        assert code == 2 and message in err and name in err


def test_ctrl_c_in_a_terminal_chat_stops_the_answer_not_the_chat(capsys, monkeypatch):
    import io

    from diffgemma.api import DiffGemma

    class TypedInput(io.StringIO):  # (what a terminal's keyboard gives)
        def isatty(self) -> bool:
            return True

    stream, calls = DiffGemma.stream, []

    def interrupted_once(self, messages, **kw):
        calls.append(list(messages))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return stream(self, messages, **kw)

    monkeypatch.setattr(DiffGemma, "stream", interrupted_once)
    monkeypatch.setattr(sys, "stdin", TypedInput("Why is the sky blue?\nSay hello.\n"))
    code, out, _ = run(capsys, "chat", "--model", DEMO, "--seed", "0")
    assert code == 0 and "(interrupted)" in out and ANSWERS["Say hello."] in out
    assert calls[1] == [{"role": "user", "content": "Say hello."}]  # the interrupted question left the history


def test_stop_strings_end_chat_answers_and_generated_text(capsys, monkeypatch, demo):
    import io

    sky = "Why is the sky blue?"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{sky}\n/reset\nCount to five.\n"))
    code, out, _ = run(capsys, "chat", "--model", DEMO, "--seed", "0", "--stop", " so ", "--stop", ", 3")
    assert code == 0 and out.splitlines() == [ANSWERS[sky][: ANSWERS[sky].index(" so ")], "(history cleared)", "1, 2"]
    args = ("generate", chat_text(demo, sky), "--model", DEMO, "--seed", "1", "--max-new-tokens", "20")
    code, free, _ = run(capsys, *args)
    assert free == ANSWERS[sky][:20] + "\n"
    stop = free[5:7]
    code, cut, _ = run(capsys, *args, "--stop", stop)
    assert code == 0 and cut == free[: free.index(stop)] + "\n"


def test_warnings_come_as_one_line_for_a_person(capsys):
    suffix = "x" * 60  # more than fits on the demo's 32-token canvas after 4 free positions
    argv = ["infill", "--prefix", "a", "--suffix", suffix, "--length", "4", "--model", DEMO, "--seed", "1"]
    code, _, err = run(capsys, *argv)
    assert code == 0 and err.startswith("diffgemma: warning: infill: the suffix is 60 tokens")
    assert "UserWarning" not in err and ".py:" not in err


def test_edit_writes_atomically_with_backup(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    original = "first line\nsecond line\nthird line\n"
    path.write_text(original)
    code, out, _ = run(capsys, "edit", str(path), "--lines", "2:2", "--model", DEMO, "--seed", "1")
    assert code == 0 and path.read_text() == original  # without --write it only prints
    printed = out.splitlines()
    assert printed[0] == "first line" and printed[-1] == "third line"
    code, _, _ = run(capsys, "edit", str(path), "--lines", "2:2", "--model", DEMO, "--seed", "1", "--write")
    lines = path.read_text().splitlines()
    assert code == 0 and lines[0] == "first line" and lines[-1] == "third line"
    assert (tmp_path / "notes.txt.bak").read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "notes.txt.bak"]
    code, _, err = run(capsys, "edit", str(path), "--lines", "9:12", "--model", DEMO)
    assert code == 2 and "outside the file" in err
    code, _, err = run(capsys, "edit", str(path), "--lines", "3:2", "--model", DEMO)
    assert code == 2 and "ends before it starts" in err


def test_edit_keeps_the_files_line_endings_and_refuses_what_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"first\r\nsecond\r\nthird\fpage\r\nlast")  # a form feed is not a line end
    code, _, _ = run(capsys, "edit", str(path), "--lines", "2:2", "--model", DEMO, "--seed", "1", "--write")
    written = path.read_bytes()  # (what the model wrote on line 2 is its own; the rest is kept byte for byte)
    assert code == 0 and written.startswith(b"first\r\n") and written.endswith(b"\r\nthird\fpage\r\nlast")
    marked, plain = tmp_path / "marked.txt", tmp_path / "plain.txt"  # a byte-order mark (Windows editors write one)
    marked.write_bytes(b"\xef\xbb\xbffirst\nsecond\nthird\n")
    plain.write_bytes(b"first\nsecond\nthird\n")
    for path in (marked, plain):
        code, _, _ = run(capsys, "edit", str(path), "--lines", "2:2", "--model", DEMO, "--seed", "1", "--write")
        assert code == 0
    assert marked.read_bytes() == b"\xef\xbb\xbf" + plain.read_bytes()  # kept, and not shown to the model
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\x00\xff\xfe")
    code, _, err = run(capsys, "edit", str(binary), "--lines", "1:1", "--model", DEMO)
    assert code == 2 and "not UTF-8 text (byte 5" in err
    wide = tmp_path / "wide.txt"  # Windows PowerShell 5's `>` writes UTF-16
    wide.write_bytes("first\r\n".encode("utf-16"))
    code, _, err = run(capsys, "edit", str(wide), "--lines", "1:1", "--model", DEMO)
    assert code == 2 and "UTF-16 text; save it as UTF-8" in err


def test_chat_a_file_of_conversations_as_jsonl(capsys, tmp_path, demo):
    """`chat --file`: each conversation's next answer, in batches, as JSONL in the file's order; conversation i
    seeded seed + i, so each answer is what `chat` gives that conversation alone; bad records named."""
    questions = ["Why is the sky blue?", "Name a fruit.", "Why is the sky blue?"]
    conversations = [[{"role": "user", "content": question}] for question in questions]
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    options = ["--model", DEMO, "--seed", "3", "--max-new-tokens", "80", "--batch-size", "2"]
    code, out, err = run(capsys, "chat", "--file", str(path), *options, "--stats")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [record["messages"] for record in records] == conversations
    for index, record in enumerate(records):
        alone = demo.chat(conversations[index], seed=3 + index, max_new_tokens=80)
        assert record["text"] == alone.content == ANSWERS[questions[index]]
        assert record["finish_reason"] == "stop" and "reasoning" not in record
    assert err.startswith("[3 prompts, ")
    # a .json array of them, one in ShareGPT's form: the same answers
    sharegpt = {"conversations": [{"from": "human", "value": questions[1]}]}
    array = tmp_path / "conversations.json"
    array.write_text(json.dumps([{"messages": conversations[0]}, sharegpt, {"messages": conversations[2]}]))
    code, again, _ = run(capsys, "chat", "--file", str(array), *options)
    assert code == 0 and [json.loads(line)["text"] for line in again.splitlines()] == [r["text"] for r in records]
    path.write_text('{"messages": "hi"}\n')
    code, _, err = run(capsys, "chat", "--file", str(path), "--model", DEMO)
    assert code == 2 and "conversations.jsonl:1: expected an object with" in err
    code, _, err = run(capsys, "chat", "hi", "--file", str(path), "--model", DEMO)
    assert code == 2 and "--file answers many conversations" in err
    code, _, err = run(capsys, "chat", "hi", "--stats", "--model", DEMO)
    assert code == 2 and "--stats sums up a --file run" in err
    from diffgemma.presets import random_checkpoint

    bare = random_checkpoint(tmp_path / "bare", preset="tiny", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    code, _, err = run(capsys, "chat", "--file", str(path), "--model", str(bare))  # (an AttributeError, before)
    assert code == 2 and "this checkpoint has no tokenizer" in err


def test_generate_a_file_of_prompts_as_jsonl(capsys, tmp_path, demo):
    """`generate --file`: every prompt, in batches, as JSONL in the file's order; prompt i seeded seed + i, so
    each line is what that prompt alone gives with its seed; a .jsonl of {"prompt": ...} too; bad input named."""
    prompts = ["Once upon a time", "Hello", "The sky"]
    lines = tmp_path / "prompts.txt"
    lines.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    options = ["--model", DEMO, "--seed", "3", "--max-new-tokens", "12", "--batch-size", "2"]
    code, out, _ = run(capsys, "generate", "--file", str(lines), *options)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in records] == prompts
    for index, record in enumerate(records):
        alone = demo.generate(prompts[index], seed=3 + index, max_new_tokens=12)
        assert record["text"] == alone.text
        assert record["finish_reason"] == ("length" if alone.reached_limit[0] else "stop")
    question = tmp_path / "question.jsonl"
    rendered = demo.tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}])
    question.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"prompt": rendered}) + "\r\n").encode())  # BOM, CRLF
    code, answered, _ = run(capsys, "generate", "--file", str(question), "--model", DEMO, "--seed", "0")
    assert json.loads(answered)["finish_reason"] == "stop" and json.loads(answered)["text"] == "An apple."
    records_file = tmp_path / "prompts.jsonl"
    records_file.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    code, again, _ = run(capsys, "generate", "--file", str(records_file), *options)
    assert code == 0 and again == out
    records_file.write_text('{"text": "no prompt"}\n')
    code, _, err = run(capsys, "generate", "--file", str(records_file), *options)
    assert code == 2 and 'prompts.jsonl:1: expected an object with a "prompt" text' in err
    code, _, err = run(capsys, "generate", "--model", DEMO)
    assert code == 2 and "give a prompt" in err


def test_a_files_records_may_carry_settings_of_their_own(capsys, tmp_path, demo):
    """A --file record's own seed, token limit and sampler settings (a sweep in one file) go over the options'
    for its row alone, the rows of a batch denoised each with its own: each line is what its prompt gives alone
    with those settings; `chat --file`'s records too; a bad setting is named with its record."""
    own = [
        {"prompt": "Hello", "max_new_tokens": 8},
        {"prompt": "Hello", "t_max": 2.0, "t_min": 1.0, "seed": 11},
        {"prompt": "The sky", "frequency_penalty": 1.0, "max_denoising_steps": 5},
    ]
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in own))
    options = ["--model", DEMO, "--seed", "3", "--max-new-tokens", "40", "--batch-size", "3", "--no-stream"]
    code, out, _ = run(capsys, "generate", "--file", str(path), *options)
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert code == 0 and len(texts) == 3
    for index, record in enumerate(own):
        settings = {key: value for key, value in record.items() if key not in ("prompt", "seed")}
        alone = demo.generate(
            record["prompt"], seed=record.get("seed", 3 + index), **{"max_new_tokens": 40, **settings}
        )
        assert texts[index] == alone.text, index
    assert texts[0] != texts[1]  # (one prompt, other settings)
    chats = tmp_path / "sweep-chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": FRUIT}], "t_max": 3.0, "t_min": 2.0}) + "\n")
    code, answered, _ = run(capsys, "chat", "--file", str(chats), "--model", DEMO, "--seed", "0")
    hot = demo.chat([{"role": "user", "content": FRUIT}], seed=0, t_max=3.0, t_min=2.0)
    assert code == 0 and json.loads(answered)["text"] == hot.content
    path.write_text(json.dumps({"prompt": "x", "top_p": 2}) + "\n")
    code, _, err = run(capsys, "generate", "--file", str(path), "--model", DEMO)
    assert code == 2 and "sweep.jsonl:1: " in err and "`top_p` must be a number from 0 to 1" in err


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`diffgemma generate --file F | head -1`: the pipe closes early; no traceback, the usual exit status."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n" * 20)  # (lines after the first come long after `head` has gone)
    command = f"{sys.executable} -m diffgemma.cli generate --file {prompts} --model {DEMO} --batch-size 1 "
    command += "--max-new-tokens 4 --seed 0 | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 141 and "Traceback" not in done.stderr and len(done.stdout.splitlines()) == 1


def test_watch_piped_writes_the_text_alone_to_stdout():
    """`generate --watch > file`: the live view goes to stderr, stdout gets the text as without --watch."""
    command = [sys.executable, "-m", "diffgemma.cli", "generate", "x", "--model", DEMO, "--seed", "0"]
    command += ["--max-new-tokens", "8"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    watched = subprocess.run([*command, "--watch"], capture_output=True, text=True, timeout=120, check=True)
    assert watched.stdout == plain.stdout and "canvas 1" in watched.stderr


def test_watch_shows_the_canvas_converge_in_a_terminal():
    """Under a pseudo-terminal, `generate --watch` redraws the canvas: several distinct drafts, then the text."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffgemma.cli",
            "generate",
            "Tell me about canvases",
            "--watch",
            "--model",
            DEMO,
            "--seed",
            "3",
            "--max-new-tokens",
            "32",
            "--confidence",
            "1e-9",
            "--steps",
            "6",
        ],
        stdout=follower,
        stderr=follower,
        stdin=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert process.wait(timeout=120) == 0
    screen = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    frames = re.findall(r"canvas 1 · step (\d+)[^\n]*\n(.*?)(?=╰)", screen, flags=re.S)
    steps = {int(step) for step, _ in frames}
    bodies = {re.sub(r"[│\s]", "", body) for _, body in frames}
    assert steps >= {1, 2, 6} and len(bodies) > 1
    final = screen.rstrip().splitlines()[-1]
    assert "╰" not in final  # the final text comes after the live panel


def test_serve_hands_its_limits_to_the_server(monkeypatch, capsys):
    """The server's limits, and its sampler defaults (a request's own fields override them)."""
    import diffgemma.server

    served = []
    monkeypatch.setattr(diffgemma.server, "serve", lambda model, host, port, options: served.append((model, options)))
    argv = ["serve", "--model", DEMO, "--port", "0", "--max-batch", "4", "--max-runs", "3", "--max-concurrent", "9"]
    assert main([*argv, "--steps", "7", "--top-p", "0.9"]) == 0
    model, options = served[0]
    assert (options.max_batch, options.max_runs, options.max_concurrent, options.model_name) == (4, 3, 9, "demo")
    assert (model.settings.max_denoising_steps, model.settings.top_p) == (7, 0.9)
    assert options.join_first is None  # (by the device)
    assert main([*argv, "--join-first"]) == 0 and served[-1][1].join_first is True
    assert main([*argv, "--no-join-first"]) == 0 and served[-1][1].join_first is False
    assert options.thinking_budget is None
    assert main([*argv, "--thinking-budget", "512"]) == 0 and served[-1][1].thinking_budget == 512
    code, _, err = run(capsys, *argv, "--top-k", "-3")
    assert code == 2 and "--top-k must be an integer >= 0" in err and err.count("\n") == 1
    # LoRA adapters served beside the model, each by its name (vLLM's NAME=FOLDER)
    assert main([*argv, "--lora-modules", f"pirate={PIRATE}"]) == 0 and served[-1][0].adapters == ("pirate",)
    assert not served[-1][1].allow_adapter_loading
    assert main([*argv, "--allow-adapter-loading"]) == 0 and served[-1][1].allow_adapter_loading
    assert main([*argv, "--lora-modules", f"{PIRATE}/"]) == 0 and served[-1][0].adapters == ("demo-pirate",)
    for extra, message in [
        (["--lora-modules", "=x"], "expected NAME=FOLDER (or a FOLDER), got '=x'"),
        (["--lora-modules", f"a={PIRATE}", f"a={PIRATE}"], "each adapter needs a name of its own"),
        (["--lora-modules", f"demo={PIRATE}"], "not the model's ('demo')"),
        (["--lora-modules", f"a={PIRATE}", "--adapter", str(PIRATE)], "serve it with --lora-modules beside"),
        (["--lora-modules", "a=/no/such/adapter"], "/no/such/adapter/adapter_config.json: not found"),
    ]:
        try:
            code = main([*argv, *extra])
        except SystemExit as usage_error:  # argparse's own exit
            code = usage_error.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)


@pytest.mark.parametrize(
    "argv, entries, shared",
    [
        (["chat"], 1, 1),
        (["serve"], 2, 1),
        (["chat", "--prefix-cache", "3", "--system-cache", "4"], 3, 4),
        (["serve", "--system-cache", "0"], 2, 0),
        (["chat", "--prefix-cache", "0"], 0, 0),
    ],
)
def test_prefix_cache_options(argv, entries, shared):
    from diffgemma.cli import build_parser
    from diffgemma.cli.common import load_model

    model = load_model(build_parser().parse_args([*argv, "--model", DEMO]))
    cache = model.prefix_cache
    assert ((cache.entries, cache.shared) if cache is not None else (0, 0)) == (entries, shared)


@pytest.mark.parametrize(
    "command",
    [
        ["chat", SKY, "--chat-template", "{file}"],
        ["generate", "--file", "{file}"],
        ["generate", "--file", "{file}.jsonl"],
        ["score", "--file", "{file}"],
        ["eval", "sudoku", "--puzzles", "{file}", "--model", str(SUDOKU_MODEL)],
        ["train", "chat", "--data", "{file}.jsonl", "--out", "{file}.out"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_a_file_that_is_not_utf8_is_an_error_that_names_it(capsys, tmp_path, command):
    path = tmp_path / "latin1"
    for file in (path, path.with_suffix(".jsonl")):
        file.write_bytes("caf\xe9\n".encode("latin-1"))
    argv = [part.replace("{file}", str(path)) for part in command]
    argv += [] if "--model" in argv else ["--model", DEMO]
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"{path}" in err and "not UTF-8 text" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."),
        MemoryError(),
    ],
)
def test_running_out_of_memory_is_one_line_with_what_takes_less(capsys, monkeypatch, error):
    from diffgemma import cli

    def exhausted(args):
        raise error

    monkeypatch.setattr(cli.checkpoints, "cmd_info", exhausted)
    code, out, err = run(capsys, "info", "--model", DEMO)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("diffgemma: out of memory (") and "--quant int4" in err
    first = str(error).splitlines()[0] if str(error) else "MemoryError"
    assert first in err


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch):
    from diffgemma import cli

    def broken(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli.checkpoints, "cmd_info", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["info", "--model", DEMO])


def test_chat_takes_a_message_of_several_lines(capsys, monkeypatch):
    """A line ending in a backslash goes on to the next, and the lines between \"\"\" lines are one message (code
    pasted into a terminal chat would otherwise be sent a line at a time)."""
    import io

    from diffgemma.api import DiffGemma

    asked = []
    stream = DiffGemma.stream

    def recorded(self, messages, **kw):
        asked.append(messages[-1]["content"])
        return stream(self, messages, **kw)

    monkeypatch.setattr(DiffGemma, "stream", recorded)
    typed = 'first \\\nsecond\n"""\ndef f():\n    return 1\n"""\n"""one line"""\nSay hello.\n"""\nunclosed'
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    code, out, _ = run(capsys, "chat", "--model", DEMO, "--seed", "0")
    assert code == 0 and len(out.splitlines()) >= len(asked)  # an answer each
    assert asked == ["first \nsecond", "def f():\n    return 1", "one line", "Say hello.", "unclosed"]
