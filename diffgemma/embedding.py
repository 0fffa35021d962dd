"""Embedding text: one vector a text, from the causal encoder, for retrieval and clustering clients.

A text's embedding is the mean of the encoder's final hidden states (after its last norm) over the text's tokens,
unit length unless asked otherwise, as Ollama's `/api/embed` gives a generative model's. A leading BOS is left
out of the mean: its state is the same for every text (it sees only itself), so it would pull every vector the
same way. The model was not trained to embed (no contrastive objective): the vectors place texts on what the
encoder reads in them, which serves search over one's own notes, not what a trained embedding model serves.
"""

from __future__ import annotations

import torch

from .config import is_int
from .errors import DiffGemmaError
from .model import PREFILL_CHUNK, DiffusionGemma
from .scoring import check_rows

EMBED_PASS_TOKENS = 4096  # padded tokens the encoder reads in one pass (a longer text goes alone)


def passes(lengths: list[int]) -> list[list[int]]:
    """Indices of texts of these lengths in groups read together: similar lengths side by side (shortest first),
    each group's rows times its longest at most EMBED_PASS_TOKENS padded tokens (a longer text goes alone)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * lengths[index] <= EMBED_PASS_TOKENS:
            group.append(index)
        else:
            groups.append([index])
    return groups


def check_dimensions(dimensions: int | None, hidden: int) -> None:
    if dimensions is not None and (not is_int(dimensions) or not 0 < dimensions <= hidden):
        raise DiffGemmaError(f"dimensions must be an integer from 1 to the model's {hidden}, got {dimensions!r}")


@torch.no_grad()
def embed_batch(
    network: DiffusionGemma, rows: list[list[int]], normalize: bool = True, dimensions: int | None = None
) -> torch.Tensor:
    """Embeddings [N, dimensions or hidden] (float32, on the CPU) of rows of ids, in their order: each row's mean
    final hidden state (a leading BOS left out), its first `dimensions` kept, then scaled to unit length with
    `normalize`. Rows are read in passes of similar lengths (`passes`), padded at their end, which a causal
    encoder never lets a row's tokens see (each is embedded as it would be alone); each pass goes through the
    encoder in chunks (`PREFILL_CHUNK`), so memory stays that of a chunk, not of the longest text."""
    check_rows(network, rows, "embed")
    if not isinstance(normalize, bool):
        raise DiffGemmaError(f"normalize must be True or False, got {normalize!r:.40}")
    hidden_size = network.config.hidden_size
    check_dimensions(dimensions, hidden_size)
    bos = network.config.bos_token_id
    pooled = torch.empty(len(rows), hidden_size)
    for group in passes([len(ids) for ids in rows]):
        width = max(len(rows[index]) for index in group)
        sequence = torch.tensor([rows[i] + [0] * (width - len(rows[i])) for i in group], device=network.device)
        starts = torch.tensor([int(rows[i][0] == bos and len(rows[i]) > 1) for i in group], device=network.device)
        ends = torch.tensor([len(rows[i]) for i in group], device=network.device)
        positions = torch.arange(width, device=network.device)
        weights = ((positions >= starts[:, None]) & (positions < ends[:, None])).float()
        weights /= weights.sum(-1, keepdim=True)
        cache = network.new_cache(len(group), width)
        sums = torch.zeros(len(group), hidden_size, device=network.device)
        for start in range(0, width, PREFILL_CHUNK):
            states = network.encode(sequence[:, start : start + PREFILL_CHUNK], cache)
            sums += torch.einsum("bth,bt->bh", states.float(), weights[:, start : start + states.shape[1]])
        pooled[group] = sums.cpu()
    if dimensions is not None:
        pooled = pooled[:, :dimensions].contiguous()
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled
