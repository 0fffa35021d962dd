"""The uniform-state block-diffusion objective, as the public recipes for this model define it.

Per example: the response is cut into canvases (the last filled with EOS to the boundary) and one canvas
is chosen at random. The encoder reads the prompt and the clean canvases (causally, in one pass); the
decoder sees what inference would have cached before the chosen canvas, plus that canvas corrupted at a
random level t ~ U(eps, 1): each token kept with probability 1 - t, else replaced by a uniform random id
(no mask token; the model is not told t). Self-conditioning: a first decoder pass without it, detached;
then, per example with probability 1/2, its distribution feeds the second pass, the only one scored.
A batch may ask for more detached passes first (`Batch.detached_passes`), each fed the one before, as
AlphaFold recycles: the scored pass then learns to refine a draft that was itself refined, as every step
of the sampler asks it to. A task may give a prior (`Batch.self_conditioning_prior`): what is known before
any pass, read where the recipe has no signal.
Loss: cross-entropy over every canvas position (no 1/t weight) plus the encoder's next-token
cross-entropy over prompt and clean response (weight `ar_weight`).

Corruption is drawn from a generator seeded by (seed, example id, epoch), so a resumed run sees the
same noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..cache import EncoderCache
from ..errors import DiffGemmaError
from ..model import DiffusionGemma

EPSILON = 1e-3
IGNORE = -100  # a target that is not scored
LOSS_CHUNK_BYTES = 256 * 2**20  # float32 logits a loss holds at a time (the 26B's vocabulary: 256 tokens)


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    response: list[int]
    id: int = 0


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L] left-padded prompt, then response canvases (EOS-filled), right-padded
    valid: torch.Tensor  # [B, L]
    canvas_start: torch.Tensor  # [B] position of the chosen canvas
    clean: torch.Tensor  # [B, C] the chosen canvas
    noisy: torch.Tensor  # [B, C] the same, corrupted
    keep: torch.Tensor  # [B, C] positions left clean
    t: torch.Tensor  # [B] corruption level
    use_self_conditioning: torch.Tensor  # [B]
    response_start: int  # where every row's response begins (prompts are left-padded to this length)
    tokens: int  # valid tokens (known without asking the device)
    detached_passes: int = 1  # decoder passes without gradients before the scored one (the recipe: 1)
    # [B, C, V] what is known before any pass (a task's prior: sudoku's candidates), or None (the recipe):
    # the first pass's self-conditioning instead of no signal, the scored pass's when it goes without, and
    # every draft's support (a draft's distribution keeps to the ids the prior allows)
    self_conditioning_prior: torch.Tensor | None = None
    # [B] temperature of each row's detached drafts (None: 1); the sampler hands each step a distribution
    # sharpened by its temperature schedule, which a row can meet in training this way
    draft_temperature: torch.Tensor | None = None


def example_generator(seed: int, example_id: int, epoch: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + example_id * 7_919 + epoch * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def response_canvases(example: Example, canvas_length: int) -> int:
    """The canvases an example's response fills (at least one; the last filled with EOS to its end)."""
    return max(1, math.ceil(len(example.response) / canvas_length))


def make_batch(
    examples: list[Example], canvas_length: int, vocab_size: int, eos_id: int, pad_id: int, seed: int, epoch: int
) -> Batch:
    """Lay out a batch and draw its per-example corruption."""
    if not examples:
        raise DiffGemmaError("a training batch needs at least one example")
    prompt_length = max(len(e.prompt) for e in examples)
    canvases = [response_canvases(e, canvas_length) for e in examples]
    total = prompt_length + max(canvases) * canvas_length
    ids = torch.full((len(examples), total), pad_id, dtype=torch.long)
    valid = torch.zeros((len(examples), total), dtype=torch.bool)
    starts, cleans, noisies, keeps, levels, self_cond = [], [], [], [], [], []
    for row, (example, count) in enumerate(zip(examples, canvases, strict=True)):
        if not example.prompt:
            raise DiffGemmaError(f"example {example.id} has an empty prompt")
        response = example.response + [eos_id] * (count * canvas_length - len(example.response))
        offset = prompt_length - len(example.prompt)
        ids[row, offset:prompt_length] = torch.tensor(example.prompt)
        ids[row, prompt_length : prompt_length + len(response)] = torch.tensor(response)
        valid[row, offset : prompt_length + len(response)] = True
        generator = example_generator(seed, example.id, epoch)
        chosen = int(torch.randint(0, count, (1,), generator=generator))
        start = prompt_length + chosen * canvas_length
        t = EPSILON + (1 - EPSILON) * float(torch.rand((), generator=generator))
        keep = torch.rand(canvas_length, generator=generator) >= t
        noise = torch.randint(0, vocab_size, (canvas_length,), generator=generator)
        clean = ids[row, start : start + canvas_length]
        starts.append(start)
        cleans.append(clean)
        noisies.append(torch.where(keep, clean, noise))
        keeps.append(keep)
        levels.append(t)
        self_cond.append(bool(torch.rand((), generator=generator) < 0.5))
    return Batch(
        ids=ids,
        valid=valid,
        canvas_start=torch.tensor(starts),
        clean=torch.stack(cleans),
        noisy=torch.stack(noisies),
        keep=torch.stack(keeps),
        t=torch.tensor(levels),
        use_self_conditioning=torch.tensor(self_cond),
        response_start=prompt_length,
        tokens=int(valid.sum()),
    )


@dataclass
class Losses:
    total: torch.Tensor
    diffusion: torch.Tensor
    autoregressive: torch.Tensor


def block_diffusion_loss(network: DiffusionGemma, batch: Batch, ar_weight: float = 1.0) -> Losses:
    """Loss of one batch; gradients flow through the encoder (both terms) and the second decoder pass."""
    device = network.device
    ids, valid = batch.ids.to(device), batch.valid.to(device)
    context_end = batch.canvas_start.to(device)
    noisy, clean = batch.noisy.to(device), batch.clean.to(device)

    if not ar_weight:  # nothing reads the encoder past the last chosen canvas: leave the rest out
        end = int(batch.canvas_start.max())
        ids, valid = ids[:, :end], valid[:, :end]
    cache = network.new_cache(ids.shape[0], ids.shape[1], keep_all=True)
    encoded = network.encode(ids, cache, valid)
    prior = None if batch.self_conditioning_prior is None else batch.self_conditioning_prior.to(device)
    use_self_conditioning = batch.use_self_conditioning.to(device)
    self_conditioning = _detached_drafts(network, batch, noisy, cache, context_end, prior)
    if prior is not None:  # rows that go without the draft read the prior instead
        self_conditioning = torch.where(use_self_conditioning[:, None, None], self_conditioning, prior)
    # The scored pass is given the signal as embeddings and the distribution goes: with a frozen embedding (LoRA)
    # nothing keeps it, a vocabulary-sized float32 tensor less through the pass and the loss.
    soft = None if self_conditioning is None else network.soft_embed(self_conditioning)
    del self_conditioning
    hidden = network.denoise(
        noisy,
        cache,
        self_conditioning_mask=use_self_conditioning if prior is None else None,
        context_end=context_end,
        return_hidden=True,
        soft_embeds=soft,
    )
    diffusion = head_cross_entropy(network, hidden, clean)

    autoregressive = next_token_loss(network, encoded, ids, valid) if ar_weight else torch.zeros((), device=device)
    return Losses(diffusion + ar_weight * autoregressive, diffusion, autoregressive)


@torch.no_grad()
def _detached_drafts(
    network: DiffusionGemma,
    batch: Batch,
    noisy: torch.Tensor,
    cache: EncoderCache,
    context_end: torch.Tensor,
    prior: torch.Tensor | None,
) -> torch.Tensor | None:
    """The distribution of the last of the batch's detached passes, each fed the one before (the first: the prior,
    or nothing). Each draft's logits become its distribution in place: one vocabulary-sized tensor, not two."""
    self_conditioning = prior
    for _ in range(batch.detached_passes):
        draft = network.denoise(noisy, cache, self_conditioning, context_end=context_end)
        if batch.draft_temperature is not None:
            draft.div_(batch.draft_temperature.to(draft.device)[:, None, None])
        if prior is not None:
            draft.masked_fill_(prior == 0, float("-inf"))
        draft.sub_(draft.amax(dim=-1, keepdim=True)).exp_()
        self_conditioning = draft.div_(draft.sum(dim=-1, keepdim=True))
    return self_conditioning


def next_token_loss(
    network: DiffusionGemma, hidden: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, first_target: int = 1
) -> torch.Tensor:
    """The encoder's next-token cross-entropy over valid pairs whose target sits at `first_target` or later."""
    targets = ids[:, first_target:].masked_fill(~(valid[:, first_target:] & valid[:, first_target - 1 : -1]), IGNORE)
    return head_cross_entropy(network, hidden[:, first_target - 1 : -1], targets)


def head_cross_entropy(network: DiffusionGemma, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's logits for final hidden states [..., H] against `targets` [...]
    (IGNORE: not scored; those get no logits at all).

    A batch's float32 logits are vocabulary-sized many times over (at the 26B's vocabulary 1 GiB per 1,024
    tokens, and autograd keeps several such tensors: the logits, the soft cap, the log-softmax), so past
    `LOSS_CHUNK_BYTES` of logits the tokens are scored a chunk at a time: each chunk's logits are made, scored
    and dropped, and made again in the backward pass (torch.utils.checkpoint). The same loss and gradients.
    """
    scored = targets != IGNORE
    hidden, targets = hidden[scored], targets[scored]
    chunk = max(1, LOSS_CHUNK_BYTES // (4 * network.config.vocab_size))
    if targets.numel() <= chunk:
        return _summed_cross_entropy(network, hidden, targets) / targets.numel()
    total = torch.zeros((), device=hidden.device)
    for start in range(0, targets.numel(), chunk):
        part = (network, hidden[start : start + chunk], targets[start : start + chunk])
        total = total + checkpoint(_summed_cross_entropy, *part, use_reentrant=False)
    return total / targets.numel()


def _summed_cross_entropy(network: DiffusionGemma, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(network.head(hidden), targets, reduction="sum")


def autoregressive_loss(network: DiffusionGemma, batch: Batch) -> Losses:
    """The left-to-right baseline on the same network: the causal encoder alone, next-token cross-entropy
    over the response (the prompt is context, not a target)."""
    ids, valid = batch.ids.to(network.device), batch.valid.to(network.device)
    cache = network.new_cache(ids.shape[0], ids.shape[1], keep_all=True)
    hidden = network.encode(ids, cache, valid)
    loss = next_token_loss(network, hidden, ids, valid, first_target=batch.response_start)
    return Losses(loss, torch.zeros_like(loss), loss)
