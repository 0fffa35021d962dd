"""The sudoku report: a model on freshly generated unique puzzles (24-36 givens by default), overall and
per number of givens, as `diffgemma sudoku` solves them on its first try (givens clamped, each empty cell
sampling among its candidates), beside the model alone (no candidates), a one-step row, a single longer try
(`--long-try`), rule-checked retries (solved within k tries, as the solver goes on), the same model under
int8 and int4 weights (with the paired change from float), and the autoregressive baseline (the same network
trained left to right), all on the same puzzles.

    python bench/sudoku.py --model diffgemma/models/sudoku --ar runs/ar --puzzles 1000 --note "training: ..."
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

import diffgemma
from diffgemma.quant import QuantFormat
from diffgemma.tasks import sudoku


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="diffgemma/models/sudoku")
    parser.add_argument("--ar", default=None, help="the autoregressive baseline's checkpoint")
    parser.add_argument("--puzzles", type=int, default=1000)
    parser.add_argument("--puzzles-file", default=None, help="read the puzzles (one a line) instead of making them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    parser.add_argument("--givens", default="24:36")
    parser.add_argument("--seed", type=int, default=2026, help="puzzle generator seed (not the training seed)")
    parser.add_argument(
        "--quant",
        default="int8,int4",
        help="quantized variants to score; int4:32 for a group size, int4:64:16 with attention's ('' for none)",
    )
    parser.add_argument(
        "--quant-puzzles", type=int, default=None, help="score the quantized rows on the first N puzzles"
    )
    parser.add_argument("--tries-puzzles", type=int, default=None, help="score the tries row on the first N puzzles")
    parser.add_argument(
        "--alone",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a row without candidates (the model alone)",
    )
    parser.add_argument(
        "--sampling-seed", type=int, default=0, help="puzzle i is solved with seed N + i (another N: another draw)"
    )
    parser.add_argument("--note", default="", help="how the model was trained (written under the table)")
    parser.add_argument("--tries", type=int, default=1, help="also a row where rule-breaking grids are re-solved")
    parser.add_argument("--long-try", type=int, default=None, help="also a row of one try of up to N steps")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    low, high = (int(v) for v in args.givens.split(":"))
    if args.puzzles_file:
        puzzles = sudoku.read_puzzles(args.puzzles_file)[: args.puzzles]
        source = f"{len(puzzles)} puzzles from {Path(args.puzzles_file).name}"
    else:
        rng = random.Random(args.seed)
        puzzles = [sudoku.make_puzzle(rng, rng.randint(low, high))[0] for _ in range(args.puzzles)]
        source = f"{args.puzzles} fresh unique-solution puzzles, {low}-{high} givens, generator seed {args.seed}"
    batch, seed = args.batch_size, args.sampling_seed

    runs: list[tuple[str, dict, float]] = []

    def run(label: str, score) -> None:
        started = time.perf_counter()
        metrics = score()
        seconds = time.perf_counter() - started
        runs.append((label, metrics, seconds))
        print(f"{label}: solved {metrics['solved_rate']:.1%} ({seconds:.0f} s)", flush=True)

    model = diffgemma.load(args.model, device=args.device)
    float_rows: list[dict] = []

    def float_run() -> dict:
        float_rows.extend(sudoku.evaluate_rows(model, puzzles, batch, seed))
        return sudoku.summarize(float_rows)

    run("diffusion, givens clamped, candidates", float_run)
    if args.alone:
        run(
            "diffusion, no candidates (the model alone: a cell may sample a digit a given peer holds)",
            lambda: sudoku.evaluate(model, puzzles, batch, seed, candidates=False),
        )
    run("diffusion, 1 step", lambda: sudoku.evaluate(model, puzzles, batch, seed, max_denoising_steps=1))
    if args.long_try:
        run(
            f"diffusion, one try of up to {args.long_try} steps",
            lambda: sudoku.evaluate(model, puzzles, batch, seed, max_denoising_steps=args.long_try),
        )

    def leading(count: int | None) -> tuple[list[list[int]], str]:
        chosen = puzzles[: count or len(puzzles)]
        return chosen, f" (first {len(chosen)})" if len(chosen) < len(puzzles) else ""

    tries_puzzles, tries_label = leading(args.tries_puzzles)
    tries_rows: list[dict] = []
    if args.tries > 1:

        def tries_run() -> dict:
            # the first try is the float run's (same puzzles, same seeds): only its unsolved grids go on
            previous = float_rows[: len(tries_puzzles)]
            tries_rows.extend(sudoku.evaluate_rows(model, tries_puzzles, batch, seed, args.tries, previous))
            return sudoku.summarize(tries_rows)

        run(
            f"diffusion, up to {args.tries} tries{tries_label} (a grid that breaks a rule is solved again, fresh seed)",
            tries_run,
        )
    subset, quant_label = leading(args.quant_puzzles)
    if len(subset) < len(puzzles) and args.quant:
        # the float model on the same puzzles, same seeds: its rows of the full run
        runs.append((f"diffusion, float weights{quant_label}", sudoku.summarize(float_rows[: len(subset)]), 0))
    paired: list[str] = []
    for spec in filter(None, args.quant.split(",")):
        name, *groups = spec.split(":")
        if len(groups) > 2 or not all(group.isdigit() for group in groups):
            parser.error(f"--quant {spec}: group sizes are whole numbers (int4:32, or int4:64:16 with attention's)")
        fmt = QuantFormat(name, *(int(group) for group in groups))
        quantized = diffgemma.load(args.model, device=args.device, quant=fmt)
        groups_note = f" (groups of {fmt.group_size}, attention {fmt.attention_group_size})" if name == "int4" else ""
        label = f"diffusion, {name} weights{groups_note}{quant_label}"
        quant_rows: list[dict] = []

        def quant_run(quantized=quantized, rows=quant_rows) -> dict:
            rows.extend(sudoku.evaluate_rows(quantized, subset, batch, seed))
            return sudoku.summarize(rows)

        run(label, quant_run)
        paired.append(paired_difference(label, float_rows[: len(subset)], quant_rows))
    if args.ar:
        baseline = diffgemma.load(args.ar, device=args.device)
        run("autoregressive baseline", lambda: sudoku.solve_autoregressive(baseline, puzzles, batch_size=batch))
        run(
            "autoregressive baseline, givens forced",
            lambda: sudoku.solve_autoregressive(baseline, puzzles, batch_size=batch, clamp=True),
        )
        run(
            "autoregressive baseline, givens forced, candidates",
            lambda: sudoku.solve_autoregressive(baseline, puzzles, batch_size=batch, clamp=True, candidates=True),
        )

    header = "| run | solved | cells right | givens kept | mean steps | seconds |\n|---|---|---|---|---|---|"
    rows = [
        f"| {label} | {m['solved_rate']:.1%} | {m['cell_accuracy']:.1%} | {m['givens_kept_rate']:.1%} | "
        f"{m['mean_steps']:.1f} | {seconds:.0f} |"
        for label, m, seconds in runs
    ]
    givens = sorted(runs[0][1]["per_givens"], key=int)
    per_header = "| givens | n | " + " | ".join(label for label, _, _ in runs) + " |"
    per_rows = [per_header, "|---|---|" + "---|" * len(runs)]
    for g in givens:
        cells = [f"{m['per_givens'][g]['solved_rate']:.1%}" if g in m["per_givens"] else "-" for _, m, _ in runs]
        per_rows.append(f"| {g} | {runs[0][1]['per_givens'][g]['n']} | " + " | ".join(cells) + " |")
    steps = " | ".join(f"{runs[0][1]['per_givens'][g]['mean_steps']:.1f}" for g in givens)
    table = "\n".join([header, *rows, "", "Solved by number of givens:", "", *per_rows])
    if tries_rows:
        within = [
            sum(r["solved"] and r["tries"] <= k for r in tries_rows) / len(tries_rows) for k in range(1, args.tries + 1)
        ]
        curve = "| tries | " + " | ".join(str(k) for k in range(1, args.tries + 1)) + " |"
        curve += (
            "\n|---|" + "---|" * args.tries + "\n| solved within | " + " | ".join(f"{v:.1%}" for v in within) + " |"
        )
        table += f"\n\nSolved within k tries{tries_label}:\n\n{curve}"
    if paired:
        paired_header = "| quantized run | solved, change from float | standard error (paired) |\n|---|---|---|"
        intro = "The same puzzles and seeds under float and quantized weights:"
        table += "\n\n" + "\n".join([intro, "", paired_header, *paired])
    notes = (
        f"{source}; "
        f"model `{args.model}`, sampler defaults from its generation_config.json "
        f"({model.settings.max_denoising_steps} steps at most), sampling seed {seed} (puzzle i: seed + i). "
        f"Mean denoising steps by givens: {steps}.\n"
        f"{args.note}"
    )
    if args.no_append:
        print(table + "\n\n" + notes)
    else:
        append_results("Sudoku: the shipped model (bench/sudoku.py)", table, notes, args.results)


def paired_difference(label: str, float_rows: list[dict], quant_rows: list[dict]) -> str:
    """A table row: the solve-rate change from float to quantized weights on the same puzzles and seeds, with
    its paired standard error (from the puzzles only one of the two solved)."""
    n = len(float_rows)
    gained = sum(q["solved"] and not f["solved"] for f, q in zip(float_rows, quant_rows, strict=True))
    lost = sum(f["solved"] and not q["solved"] for f, q in zip(float_rows, quant_rows, strict=True))
    error = math.sqrt(max(0.0, (gained + lost) / n**2 - (gained - lost) ** 2 / n**3))
    return f"| {label} | {(gained - lost) / n:+.1%} ({gained} gained, {lost} lost) | {error:.1%} |"


if __name__ == "__main__":
    main()
