"""Training the sudoku model: batches made on the device from a puzzle pool under random symmetries, an
embedding table that starts with the board's structure, and the run itself (stages, resume, a time budget)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ...errors import DiffGemmaError
from .puzzles import CELLS, FEW_GIVENS, check_givens_range, make_puzzle, puzzle_pool
from .solver import MASKED_KEY, PRIOR_KEY, check_model, evaluate, recorded, solve_autoregressive
from .tokens import CANVAS, VOCAB, candidate_prior, cell_token, write_tokenizer


def structured_embeddings_(network, seed: int, std: float = 0.02) -> None:
    """Start the embedding table with the board's structure in it: the token of a cell holding d is the sum
    of a row, a column, a box and a digit vector (d = 0, empty, has its own). Cells that share a unit then
    share a component from the first step, so attention can find a cell's peers before it has learned
    anything; training is free to move every vector."""
    generator = torch.Generator().manual_seed(seed)
    table = network.embed_tokens.weight
    hidden = table.shape[1]

    def vectors(count: int) -> torch.Tensor:
        return torch.randn(count, hidden, generator=generator) * std

    rows, cols, boxes, digits = vectors(9), vectors(9), vectors(9), vectors(10)
    for cell in range(CELLS):
        row, col = divmod(cell, 9)
        place = rows[row] + cols[col] + boxes[(row // 3) * 3 + col // 3]
        for value in range(10):
            table[cell_token(cell, value)] = (place + digits[value]).to(table)


def random_symmetries(
    count: int, generator: torch.Generator, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random elements of the sudoku symmetry group for `count` boards, drawn on the device: (cell orders
    [count, 81], digit relabellings [count, 10] with 0 kept for empty). Board b moves to
    `digits[b][grid[order[b]]]`; bands, rows within a band, stacks, columns within a stack, transposition
    and the nine digits relabelled keep a grid valid and a puzzle's solution unique."""

    def lines() -> torch.Tensor:
        groups = torch.rand(count, 3, generator=generator, device=device).argsort(dim=1)
        within = torch.rand(count, 3, 3, generator=generator, device=device).argsort(dim=2)
        return (groups[:, :, None] * 3 + within).reshape(count, 9)

    rows, cols = lines(), lines()
    order = rows[:, :, None] * 9 + cols[:, None, :]
    transpose = torch.rand(count, generator=generator, device=device) < 0.5
    order = torch.where(transpose[:, None, None], order.transpose(1, 2), order).reshape(count, CELLS)
    digits = torch.rand(count, 9, generator=generator, device=device).argsort(dim=1) + 1
    return order, torch.cat([torch.zeros_like(digits[:, :1]), digits], dim=1)


def check_detached_passes(count: int) -> None:
    if count < 1:
        raise DiffGemmaError(f"detached self-conditioning passes must be at least 1, got {count}")


def check_draft_temperatures(temperatures: tuple[float, float] | None) -> None:
    if temperatures is not None and not 0 < temperatures[0] <= temperatures[1]:
        raise DiffGemmaError(f"draft temperatures must be a range low:high above 0, low first, got {temperatures}")


class DeviceBatches:
    """Training batches made where the model trains: each example a pool puzzle under a fresh random symmetry.
    Diffusion: prompt BOS, canvas the solution's 81 cell tokens; the objective's corruption (t ~ U(eps, 1))
    reaches the empty cells only, each replaced by a uniformly random one of its nine digit tokens, as solving
    re-noises it (givens stay clean: they are clamped at solve time). `autoregressive`: the prompt is BOS and
    the puzzle's cells, for the left-to-right baseline. Batch k depends on (seed, k) alone: a resumed run sees
    the same data and noise. `max_detached_passes` > 1: each batch draws how many detached self-conditioning
    passes precede the scored one, uniformly from 1 to it (`Batch.detached_passes`). `masked_cells`: a corrupted
    cell shows its empty token instead of a random digit (masked diffusion within the same machinery: every
    digit the model sees is then right, so it can trust what the sampler accepted)."""

    def __init__(
        self,
        pool: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        seed: int,
        device,
        autoregressive: bool = False,
        max_detached_passes: int = 1,
        candidate_prior: bool = False,
        draft_temperatures: tuple[float, float] | None = None,
        masked_cells: bool = False,
    ) -> None:
        check_detached_passes(max_detached_passes)
        check_draft_temperatures(draft_temperatures)
        self.candidate_prior, self.draft_temperatures = candidate_prior, draft_temperatures
        self.device = torch.device(device)
        self.puzzles = torch.tensor([list(p) for p, _ in pool], dtype=torch.long, device=self.device)
        self.solutions = torch.tensor([list(s) for _, s in pool], dtype=torch.long, device=self.device)
        self.batch_size, self.seed, self.autoregressive = batch_size, seed, autoregressive
        self.max_detached_passes = max_detached_passes
        self.cells = cell_token(torch.arange(CELLS, device=self.device), 0)
        self.masked_cells = masked_cells

    def __call__(self, index: int):
        from ...train.objective import EPSILON, Batch

        count, device = self.batch_size, self.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + index)
        pick = torch.randint(0, len(self.puzzles), (count,), generator=generator, device=device)
        order, digits = random_symmetries(count, generator, device)
        puzzle = digits.gather(1, self.puzzles[pick].gather(1, order))
        solution = digits.gather(1, self.solutions[pick].gather(1, order))
        bos = torch.full((count, 1), VOCAB["<bos>"], device=device)
        prompt = torch.cat([bos, self.cells + puzzle], dim=1) if self.autoregressive else bos
        canvas = self.cells + solution
        t = EPSILON + (1 - EPSILON) * torch.rand(count, generator=generator, device=device)
        keep = (torch.rand(count, CANVAS, generator=generator, device=device) >= t[:, None]) | (puzzle > 0)
        noise = self.cells + torch.randint(1, 10, (count, CANVAS), generator=generator, device=device)
        if self.masked_cells:  # drawn all the same, so the draws after it do not move
            noise = self.cells.expand(count, -1)
        ids = torch.cat([prompt, canvas], dim=1)
        use_self_conditioning = torch.rand(count, generator=generator, device=device) < 0.5
        # drawn last, so a run with one pass sees the data and noise it always did; and only when there is a
        # choice, since reading the draw back waits for the device
        passes = 1
        if self.max_detached_passes > 1:
            passes = int(torch.randint(1, self.max_detached_passes + 1, (1,), generator=generator, device=device))
        temperature = None
        if self.draft_temperatures is not None:
            low, high = self.draft_temperatures
            temperature = low + (high - low) * torch.rand(count, generator=generator, device=device)
        return Batch(
            ids=ids,
            valid=torch.ones_like(ids, dtype=torch.bool),
            canvas_start=torch.full((count,), prompt.shape[1]),
            clean=canvas,
            noisy=torch.where(keep, canvas, noise),
            keep=keep,
            t=t,
            use_self_conditioning=use_self_conditioning,
            response_start=prompt.shape[1],
            tokens=ids.numel(),
            detached_passes=passes,
            self_conditioning_prior=candidate_prior(puzzle) if self.candidate_prior else None,
            draft_temperature=temperature,
        )


PROBE_STEPS = 30  # timed to size a run given in seconds; inside the warmup, so the steps count cannot change them


def train_sudoku(
    out: str | Path,
    steps: int = 20000,
    batch_size: int = 64,
    seed: int = 0,
    peak_lr: float = 2e-3,
    ar_weight: float = 0.0,
    givens: tuple[int, int] = (24, 36),
    pool_size: int = 4000,
    eval_every: int = 500,
    eval_puzzles: int = 64,
    objective: str = "diffusion",
    resume: bool = False,
    init: str | Path | None = None,
    device: str = "cpu",
    seconds: float | None = None,
    pool_workers: int = 1,
    pool_cache: str | Path | None = None,
    max_detached_passes: int = 1,
    layers: int | None = None,
    candidate_prior: bool = False,
    draft_temperatures: tuple[float, float] | None = None,
    masked_cells: bool = False,
    log=print,
):
    """Train the sudoku model into `out` (checkpoints as it goes; `resume` continues a stopped run).

    Data: a seeded pool of unique puzzles with `givens` in range, each drawn under a fresh random symmetry,
    batches made on `device` (`DeviceBatches`). `objective="autoregressive"` trains the same network left to
    right (the encoder alone): the baseline. `seconds`: a time budget instead of a step count: the first
    steps are timed and the run sized to fit (the log gives the step count, which `steps` reproduces), then it
    stops at the budget whatever the estimate said. `init`: a sudoku checkpoint whose weights start the run
    (a second stage with a fresh optimizer and schedule) instead of random ones. `max_detached_passes` > 1:
    each batch recycles the self-conditioning through up to that many detached passes (`DeviceBatches`).
    `layers`: the network's depth (the preset's 6 if not given); with `init`, a deeper network than the init's
    repeats its layers, the repeats starting switched off (`train.grow.deepen`). `candidate_prior`: the model
    reads the puzzle's `candidate_prior` as its first self-conditioning (recorded in its config; a model trained
    with it keeps it in later stages). `draft_temperatures` (low, high): see `DeviceBatches`. `masked_cells`:
    see `DeviceBatches` (recorded in its config like the prior; solving re-noises to empty cells)."""
    from ...train.trainer import TrainConfig, save_state, train

    started = time.perf_counter()
    folder = Path(out)
    if resume and init is not None:
        raise DiffGemmaError("--resume continues the run in --out; --init starts a new one: give one of them")
    check_detached_passes(max_detached_passes)  # before anything is written into `out`
    check_draft_temperatures(draft_temperatures)
    check_givens_range(givens)
    if eval_every < 0:
        raise DiffGemmaError(f"--eval-every must be 0 (only the final checkpoint) or more, got {eval_every}")
    if objective == "autoregressive" and (candidate_prior or masked_cells or draft_temperatures is not None):
        raise DiffGemmaError(
            "--candidate-prior, --masked-cells and --draft-temperature shape the diffusion objective's passes"
        )
    model, candidate_prior, masked_cells = _model_to_train(
        folder, resume, init, layers, seed, device, objective, candidate_prior, masked_cells
    )
    low, high = givens
    if low < FEW_GIVENS:
        log(
            f"puzzles under {FEW_GIVENS} givens take seconds each to make: a pool of {pool_size} may take long "
            "(--pool-workers to spread it, --pool-file to make it once)"
        )
    pool = puzzle_pool(seed, pool_size, givens, workers=pool_workers, cache=pool_cache)
    log(f"puzzle pool: {len(pool)} unique puzzles, {low}-{high} givens ({time.perf_counter() - started:.0f} s)")
    eval_rng = random.Random(10_000 + seed)
    held_out = [make_puzzle(eval_rng, eval_rng.randint(24, 36))[0] for _ in range(eval_puzzles if eval_every else 0)]
    batches = DeviceBatches(
        pool,
        batch_size,
        seed,
        model.network.device,
        objective == "autoregressive",
        max_detached_passes,
        candidate_prior,
        draft_temperatures,
        masked_cells,
    )

    def settings(total: int) -> TrainConfig:
        return TrainConfig(
            steps=total,
            batch_size=batch_size,
            peak_lr=peak_lr,
            warmup=200,
            ar_weight=ar_weight,
            seed=seed,
            objective=objective,
            recipe=(
                ("pool", pool_size),
                ("givens", givens),
                ("self_conditioning_passes", max_detached_passes),
                ("layers", layers),
                ("candidate_prior", candidate_prior),
                ("draft_temperatures", draft_temperatures),
                ("masked_cells", masked_cells),
            ),
        )

    config = settings(steps)

    def report(step: int, losses: list[float]) -> None:
        solve = solve_autoregressive if objective == "autoregressive" else evaluate
        metrics = solve(model, held_out, batch_size=64, seed=seed)
        model.network.train()
        log(
            f"step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}, solved {metrics['solved_rate']:.1%}, "
            f"cells {metrics['cell_accuracy']:.1%}, steps {metrics['mean_steps']:.1f} "
            f"(24-36 givens, {metrics['n']} puzzles, {(time.perf_counter() - started) / 60:.1f} min)"
        )

    def checkpoint(step: int, optimizer, losses: list[float]) -> None:
        model.save(folder)
        save_state(folder, step, optimizer, config, losses)
        if eval_every and step % eval_every == 0:
            report(step, losses)

    stamps: list[float] = []

    def progress(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            log(f"step {step + 1}/{config.steps}: loss {loss:.4f} ({elapsed / 60:.1f} min)")

    def run(stop_at: int | None = None, deadline: float | None = None, resume_from: Path | None = None):
        return train(
            model.network,
            batches,
            config,
            eos_id=VOCAB["<eos>"],
            pad_id=VOCAB["<pad>"],
            on_step=progress,
            checkpoint=checkpoint,
            checkpoint_every=eval_every,
            resume_from=resume_from,
            show_progress=False,
            stop_at=stop_at,
            deadline=deadline,
        )

    if seconds is None:
        losses = run(resume_from=folder if resume else None)
    else:
        if resume:
            raise DiffGemmaError("--seconds sizes a new run; resume one with its step count (--steps) instead")
        deadline = time.monotonic() + seconds - (time.perf_counter() - started)
        config = settings(10**9)  # the probe runs inside the warmup, where the total does not matter
        run(stop_at=PROBE_STEPS)
        first = PROBE_STEPS // 3  # the first steps pay for warming up
        per_step = (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
        config = settings(PROBE_STEPS + max(1, int((deadline - time.monotonic()) / per_step)))
        log(
            f"timed {per_step * 1000:.1f} ms a step: the run is {config.steps} steps of {batch_size} "
            f"(reproduce with steps={config.steps})"
        )
        losses = run(deadline=deadline, resume_from=folder)
        if len(losses) < config.steps:
            log(f"stopped at step {len(losses)} of {config.steps}: the time budget was spent")
    if eval_every and losses and len(losses) % eval_every:
        report(len(losses), losses)
    return losses


def _model_to_train(
    folder: Path,
    resume: bool,
    init: str | Path | None,
    layers: int | None,
    seed: int,
    device: str,
    objective: str,
    candidate_prior: bool,
    masked_cells: bool,
):
    """The model a run starts from, saved in `folder` (a resumed run's is there already): the run's own
    (`resume`), a trained one (`init`, deepened to `layers`), or a new random one; with whether it reads the
    candidate prior and re-noises to empty cells (a choice the model was trained with, an init or a resumed
    run, stays on; recorded in its config, which solving reads)."""
    from ...api import load
    from ...presets import random_checkpoint
    from ...train.grow import deepen

    if resume:
        model = load(folder, device=device)
    elif init is not None:
        model = load(init, device=device)  # its tokenizer files go with it when it is saved below
        check_model(model, str(init))
        if layers is not None and layers != model.config.num_hidden_layers:
            model = deepen(model, layers)
    else:
        depth = {} if layers is None else {"num_hidden_layers": layers}
        random_checkpoint(folder, preset="sudoku", seed=seed, **depth)
        write_tokenizer(folder)
        model = load(folder, device=device)
        structured_embeddings_(model.network, seed)
        model.settings = model.settings.replace(max_denoising_steps=64)

    def kept(asked: bool, key: str) -> bool:
        chosen = asked or (objective == "diffusion" and recorded(model, key))
        if chosen:
            model.config.raw[key] = True
        return chosen

    candidate_prior, masked_cells = kept(candidate_prior, PRIOR_KEY), kept(masked_cells, MASKED_KEY)
    # a grid has no EOS (a saved "none" reads back as the config's EOS, so a resumed run says it again)
    model.settings = model.settings.replace(max_new_tokens=CANVAS, eos_token_id=[])
    if not resume:
        model.save(folder)
    return model, candidate_prior, masked_cells
