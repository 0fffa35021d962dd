"""`train`: fine-tuning on chat JSONL (full, LoRA or QLoRA; one process or torchrun) or the sudoku model."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shlex
from pathlib import Path

from ..errors import DiffGemmaError
from .common import model_path, range_option, terminal_progress, with_template
from .tasks import givens_range


def _join_torchrun(args: argparse.Namespace) -> int:
    """Under `torchrun`, join its process group: each rank on its own GPU (LOCAL_RANK, NCCL) or on the CPU
    (gloo). Returns this process's rank."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if args.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank()


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed)
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_torchrun and args.task != "chat":
        raise DiffGemmaError("train sudoku runs in one process (its model is small); torchrun is for train chat")
    rank = _join_torchrun(args) if under_torchrun else 0
    log = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)
    if args.task == "chat":
        from ..api import load
        from ..train.lora import LoraSettings
        from ..train.sft import FinetuneOptions, finetune

        if not args.data:
            raise DiffGemmaError('train chat needs --data FILE.jsonl (one {"messages": [...]} a line)')
        every = 100 if args.eval_every is None else args.eval_every
        if every < 0:
            raise DiffGemmaError(f"--eval-every must be 0 (only the final checkpoint) or more, got {every}")
        if args.quant and not args.lora_rank:
            raise DiffGemmaError("--quant trains adapters over a quantized base: give --lora-rank too")
        with terminal_progress("loading") if rank == 0 else contextlib.nullcontext() as progress:  # (one bar in all)
            model = load(model_path(args), device=args.device, dtype=args.dtype, quant=args.quant, progress=progress)
        model = with_template(model, args)
        lora = LoraSettings(args.lora_rank, args.lora_alpha, args.lora_self_conditioning) if args.lora_rank else None
        options = FinetuneOptions(
            data=args.data,
            out=args.out,
            eval_data=args.eval_data,
            lora=lora,
            steps=args.steps or 1000,
            batch_size=args.batch_size or 8,
            accumulation=args.accumulation,
            peak_lr=1e-4 if args.lr is None else args.lr,
            ar_weight=1.0 if args.ar_weight is None else args.ar_weight,
            eval_every=every,
            save_every=every,
            seed=args.seed,
            enable_thinking=args.thinking,
            resume=args.resume,
            gradient_checkpointing=args.gradient_checkpointing,
            max_length=args.max_length,
        )
        finetune(model, options, log=log)
        base, out, name = (shlex.quote(str(path)) for path in (model_path(args), args.out, Path(args.out).name))
        if lora is not None:
            log(f"try it: diffgemma chat --model {base} --adapter {out}; or serve it beside the model (and other")
            log(f"adapters): diffgemma serve --model {base} --lora-modules {name}={out}")
        else:
            log(f"try it: diffgemma chat --model {out}")
        return
    from ..tasks import sudoku

    if args.quant:
        raise DiffGemmaError("--quant is for `train chat` with --lora-rank (a sudoku model trains in full)")
    draft_temperatures = None
    if args.draft_temperature is not None:
        expected = "--draft-temperature must be a number or a range like 0.4:0.8"
        draft_temperatures = range_option(args.draft_temperature, float, expected)
    sudoku.train_sudoku(
        args.out,
        steps=args.steps or 20000,
        batch_size=args.batch_size or 64,
        seed=args.seed,
        peak_lr=2e-3 if args.lr is None else args.lr,
        ar_weight=args.ar_weight or 0.0,
        objective=args.objective,
        pool_size=args.pool,
        givens=givens_range(args.givens),
        eval_every=500 if args.eval_every is None else args.eval_every,
        eval_puzzles=args.eval_puzzles,
        resume=args.resume,
        init=args.init,
        device=args.device,
        seconds=args.seconds,
        pool_workers=args.pool_workers,
        pool_cache=args.pool_file,
        max_detached_passes=args.self_conditioning_passes,
        layers=args.layers,
        candidate_prior=args.candidate_prior,
        draft_temperatures=draft_temperatures,
        masked_cells=args.masked_cells,
        log=log,
    )
