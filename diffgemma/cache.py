"""The encoder KV cache: preallocated per layer, a fixed window on sliding-window layers.

Every layer's buffer ends with `canvas_length` spare slots. The decoder writes the canvas keys and values
there on each denoising step, so a step concatenates nothing and never changes what the encoder stored.

Positions are absolute token indices shared by the batch (left padding included, as in the reference);
`valid` marks which stored slots are real tokens of each row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import SYSTEM_SNAPSHOTS, ModelConfig


@dataclass
class LayerCache:
    keys: torch.Tensor  # [batch, kv_heads, slots, head_dim]
    values: torch.Tensor  # [batch, kv_heads, slots, head_dim]
    positions: torch.Tensor  # [slots] absolute position held by each slot, -1 when empty
    valid: torch.Tensor  # [batch, slots] slot holds a real (non-padding) token of that row
    ring: int | None  # sliding layers: slots of the kept window (sliding_window - 1), oldest first; None for full


class EncoderCache:
    """Keys and values the encoder wrote, read by every decoder step of the following canvas."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
        keep_all: bool = False,
    ) -> None:
        """`keep_all` keeps every token on sliding layers too (training: each row's decoder may look back
        from a different point, so no window can be dropped)."""
        self.config = config
        self.keep_all = keep_all
        self.batch_size = batch_size
        self.capacity = capacity
        self.length = 0  # tokens encoded so far: the next token's position
        self.decoder_masks: dict = {}  # the decoder's attention masks for the current contents (model.denoise)
        self.layers: list[LayerCache] = []
        for shape in config.layers:
            ring = config.sliding_window - 1 if shape.is_sliding and not keep_all else None
            stored = ring if ring is not None else capacity
            self.layers.append(
                self._allocate(stored + config.canvas_length, shape.num_kv_heads, shape.head_dim, ring, device, dtype)
            )

    def _allocate(
        self, slots: int, kv_heads: int, head_dim: int, ring: int | None, device: torch.device | str, dtype
    ) -> LayerCache:
        shape = (self.batch_size, kv_heads, slots, head_dim)
        return LayerCache(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            positions=torch.full((slots,), -1, dtype=torch.long, device=device),
            valid=torch.zeros((self.batch_size, slots), dtype=torch.bool, device=device),
            ring=ring,
        )

    def ensure_capacity(self, new_tokens: int, exact: bool = False) -> None:
        """Grow the full-attention buffers when the sequence outgrows them: doubling, or to just the room
        needed (`exact`: a caller that knows its final size)."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        capacity = needed if exact else max(needed, 2 * self.capacity)
        tail = self.config.canvas_length
        for index, layer in enumerate(self.layers):
            if layer.ring is not None:
                continue
            grown = self._allocate(
                capacity + tail, layer.keys.shape[1], layer.keys.shape[3], None, layer.keys.device, layer.keys.dtype
            )
            grown.keys[:, :, : self.length] = layer.keys[:, :, : self.length]
            grown.values[:, :, : self.length] = layer.values[:, :, : self.length]
            grown.positions[: self.length] = layer.positions[: self.length]
            grown.valid[:, : self.length] = layer.valid[:, : self.length]
            self.layers[index] = grown
        self.capacity = capacity

    def stored_slots(self, layer: LayerCache) -> int:
        """How many leading slots hold encoder tokens (the decoder's canvas goes right after them)."""
        return layer.ring if layer.ring is not None else self.length

    def select_rows(self, rows: torch.Tensor) -> EncoderCache:
        """A copy holding only `rows` ([k] indices) of every layer, for decoder passes over those rows alone.
        What the encoder stored is copied; the copy's canvas slots are its own (a decoder pass writes there)."""
        subset = copy.copy(self)
        subset.batch_size = len(rows)
        subset.decoder_masks = {}
        subset.layers = [
            LayerCache(layer.keys[rows], layer.values[rows], layer.positions, layer.valid[rows], layer.ring)
            for layer in self.layers
        ]
        return subset

    def skip_to(self, length: int) -> None:
        """An empty cache made to begin at position `length`: the first token encoded goes there, the slots
        before hold nothing (a row joining a batch whose cache is longer than its prompt, `joined`)."""
        if self.length:
            raise ValueError("only an empty cache begins later")
        self.ensure_capacity(length, exact=True)
        self.length = length

    def joined(self, others: list[EncoderCache], capacity: int) -> EncoderCache:
        """A new cache of this one's rows, then each of `others`' in turn, with room for `capacity` tokens on full
        layers. Each of `others` ends where this one ends (rows joining a batch: prompts encoded to end there,
        `skip_to`), so a slot holds the same position in all wherever any's rows hold a token; the positions are
        this one's."""
        for other in others:
            if other.length != self.length or other.keep_all != self.keep_all:
                raise ValueError(f"a cache of {other.length} tokens cannot join one of {self.length}")
        first = self.layers[0].keys
        rows = [self.batch_size, *(other.batch_size for other in others)]
        merged = EncoderCache(self.config, sum(rows), max(capacity, self.length), first.device, first.dtype)
        for index, into in enumerate(merged.layers):
            stored = self.stored_slots(self.layers[index])
            into.positions[:stored] = self.layers[index].positions[:stored]
            row = 0
            for cache, count in zip([self, *others], rows, strict=True):
                part = cache.layers[index]
                into.keys[row : row + count, :, :stored] = part.keys[:, :, :stored]
                into.values[row : row + count, :, :stored] = part.values[:, :, :stored]
                into.valid[row : row + count, :stored] = part.valid[:, :stored]
                row += count
        merged.length = self.length
        return merged

    def place(self, source: EncoderCache, start: int, turn: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
        """Take in `source`'s tokens from position `start` on (both batches of one, this one empty: new, or made to
        begin later by `skip_to`; `source` may be a row of a padded batch, whose tokens from `start` on are its
        own), each moved `shift` = this cache's length - `start` positions: a prompt's snapshot put where a row
        joining a batch needs it, or a joined row's prompt kept as a snapshot from 0.
        Keys carry their positions (RoPE), so `turn(keys, layer index, shift)` turns them by the shift; values
        and sliding windows move as they are (a window keeps its slots: its layout follows the length alone)."""
        if source.batch_size != 1 or self.batch_size != 1 or source.keep_all or self.keep_all:
            raise ValueError("only inference caches of one row move their tokens")
        tokens, shift = source.length - start, self.length - start
        self.ensure_capacity(tokens, exact=True)
        for index, (mine, theirs) in enumerate(zip(self.layers, source.layers, strict=True)):
            if mine.ring is None:
                into, taken = slice(self.length, self.length + tokens), slice(start, source.length)
                mine.positions[into] = theirs.positions[taken] + shift
            else:
                into = taken = slice(0, mine.ring)
                held = theirs.positions[taken]  # (a slot before `start`: another row's, in a padded batch)
                mine.positions[into] = torch.where(held >= start, held + shift, -1)
            mine.keys[:, :, into] = turn(theirs.keys[:, :, taken], index, shift)
            mine.values[:, :, into] = theirs.values[:, :, taken]
            mine.valid[:, into] = theirs.valid[:, taken]
        self.length += tokens
        self.decoder_masks = {}

    def copied(self) -> EncoderCache:
        """A copy whose tensors are its own (a shared snapshot's cache, for a generation to write)."""
        twin = copy.copy(self)
        twin.decoder_masks = {}
        twin.layers = [
            LayerCache(
                layer.keys.clone(), layer.values.clone(), layer.positions.clone(), layer.valid.clone(), layer.ring
            )
            for layer in self.layers
        ]
        return twin

    def windows(self) -> list[tuple[torch.Tensor, ...] | None]:
        """A copy of each sliding layer's kept window as it stands (keys, values, positions, validity; None for
        full layers), for `rewind`."""
        return [
            None if layer.ring is None else tuple(view.clone() for view in _window_views(layer))
            for layer in self.layers
        ]

    def rewind(self, length: int, windows: list[tuple[torch.Tensor, ...] | None]) -> None:
        """Back to holding its first `length` tokens, as it did when `windows` were copied then: full layers
        still hold them (later tokens went to later slots), sliding layers get their windows back."""
        for layer, window in zip(self.layers, windows, strict=True):
            if window is not None:
                for view, kept in zip(_window_views(layer), window, strict=True):
                    view.copy_(kept)
        self.length = length
        self.decoder_masks = {}

    def memory_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            for t in (layer.keys, layer.values, layer.positions, layer.valid)
        )


class DecoderView:
    """What a decoder pass reads besides the cache's keys and values, at addresses that stay put.

    A CUDA graph replays fixed kernels over fixed addresses, so a pass it captures cannot slice the cache by
    its current length or take new masks each canvas. Through a view the decoder attends over every slot of
    each layer's buffer: the canvas's keys go to slots named by a device tensor, and a mask hides slots not
    yet written. `refresh` rewrites the positions, slots and masks in place when the cache has grown (one
    canvas encoded), outside any capture; the same graph then serves every canvas of a generation.
    """

    def __init__(self, cache: EncoderCache, length: int) -> None:
        if cache.keep_all:
            raise ValueError("a decoder view serves inference caches (training's keep_all cache has no window)")
        device = cache.layers[0].keys.device
        self.length = length
        self.capacity = cache.capacity
        self.cache_length = -1  # what the tensors below describe; -1: not yet filled
        self.positions = torch.empty(length, dtype=torch.long, device=device)
        self.masks: dict[bool, torch.Tensor] = {}  # by "is a ring (sliding window)": [B, 1, 1, slots]
        for layer in cache.layers:
            self.masks.setdefault(
                layer.ring is not None,
                torch.empty(cache.batch_size, 1, 1, layer.keys.shape[2], dtype=torch.bool, device=device),
            )

    def refresh(self, cache: EncoderCache) -> None:
        if cache.capacity != self.capacity:
            raise RuntimeError("the cache grew after its decoder view was made; make a new view")
        if cache.length == self.cache_length:
            return
        self.positions.copy_(torch.arange(cache.length, cache.length + self.length, device=self.positions.device))
        for ring, mask in self.masks.items():
            layer = next(layer for layer in cache.layers if (layer.ring is not None) == ring)
            stored = cache.stored_slots(layer)
            mask.fill_(False)
            mask[:, 0, 0, :stored] = layer.valid[:, :stored]
            mask[:, 0, 0, stored : stored + self.length] = True
        self.cache_length = cache.length

    def canvas_slots(self, layer: LayerCache) -> torch.Tensor | slice:
        """Where the canvas's keys go in `layer`: right after what the encoder stored."""
        if layer.ring is not None:
            return slice(layer.ring, layer.ring + self.length)
        return self.positions  # a full layer's slot i holds position i


def _window_views(layer: LayerCache) -> tuple[torch.Tensor, ...]:
    """A sliding layer's kept window in place: its keys, values, positions and validity before the ring's end."""
    ring = layer.ring
    return layer.keys[:, :, :ring], layer.values[:, :, :ring], layer.positions[:ring], layer.valid[:, :ring]


def _weights_state(network: torch.nn.Module) -> tuple | None:
    """What the network's weights are now: each tensor's identity, storage and version (in-place updates, a
    training step or a merged adapter, bump it); None where that cannot be read (tensors made in inference
    mode keep no version)."""
    try:
        return tuple((id(t), t.data_ptr(), t._version) for t in (*network.parameters(), *network.buffers()))
    except RuntimeError:
        return None


@dataclass
class PromptSnapshot:
    """A batch-of-one cache as it stood once its prompt (`ids`) was encoded: the cache itself, whose full layers
    keep the prompt's slots whatever came after, and a copy of its sliding layers' `windows` then
    (`EncoderCache.rewind` puts it back); `weights`, the network's state then. A `shared` one (a system turn that
    many conversations open with) is never written: each taker gets a copy, and it has no windows to put back."""

    ids: list[int]
    cache: EncoderCache
    windows: list[tuple[torch.Tensor, ...] | None] | None
    weights: tuple | None
    shared: bool = False


class PrefixCache:
    """The encoder caches of the last prompts generated from alone (a batch of one; the last `entries` of
    them), kept so that a prompt that begins with one encodes only what follows. A chat's next turn repeats the
    conversation but not the last turn's opening as the model was prompted with it (an empty thinking block,
    say), so a snapshot is taken before the prompt's last `turn_open` token, where one is. More than one entry
    keeps a conversation's snapshot through requests of other prompts in between (a chat client's title or
    follow-up requests), at the memory of one more cache each. A snapshot is handed over to the generation that
    takes it and kept again when that one ends, so two generations never share a cache; weights changed since
    it was made void it.

    A conversation's snapshot serves its own next turn, not another conversation that opens with the same system
    turn (an assistant's instructions and tools, often thousands of tokens, each new conversation's first). So a
    prompt that opens with system turns (a turn opening followed by one of `system_heads`, the ids a system or
    developer role writes there) also keeps those turns, up to the next turn's opening, as a `shared` snapshot:
    the last `shared` of them, apart from `entries`; taking one gives a copy and leaves it kept for the next."""

    def __init__(
        self,
        turn_open: int | None = None,
        entries: int = 1,
        shared: int = SYSTEM_SNAPSHOTS,
        system_heads: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        if entries < 1:
            raise ValueError(f"a prefix cache keeps at least one snapshot, got {entries}")
        if shared < 0:
            raise ValueError(f"a prefix cache keeps zero or more shared snapshots, got {shared}")
        self.turn_open = turn_open
        self.entries = entries
        self.shared = shared
        self.system_heads = system_heads
        self.snapshots: list[PromptSnapshot] = []  # the oldest first

    def point(self, ids: list[int]) -> int:
        """How many of a prompt's ids its snapshot holds: those before its last turn opening (all of them
        without one)."""
        if self.turn_open is not None and self.turn_open in ids[1:]:
            return len(ids) - 1 - ids[::-1].index(self.turn_open)
        return len(ids)

    def shared_point(self, ids: list[int]) -> int | None:
        """How many of a prompt's ids its opening system turns hold (up to the next turn's opening), for a shared
        snapshot; None where it opens with none, keeps no shared snapshots, or those turns reach its snapshot
        point (`point`)."""
        if not self.shared or self.turn_open is None or not self.system_heads:
            return None
        openings = [index for index, token in enumerate(ids) if token == self.turn_open]
        leading = 0
        while leading < len(openings) and any(
            ids[openings[leading] + 1 : openings[leading] + 1 + len(head)] == list(head) for head in self.system_heads
        ):
            leading += 1
        if leading == 0 or leading == len(openings) or openings[leading] >= self.point(ids):
            return None
        return openings[leading]

    def take(self, network: torch.nn.Module, ids: list[int]) -> PromptSnapshot | None:
        """The kept snapshot of the longest prompt `ids` begin with, its cache restored to hold that prompt
        (None: none begins them); it is the caller's until handed back (`keep`), but for a shared one, of which
        the caller gets a copy (`shared` still set: nothing to hand back). Snapshots made with other weights are
        passed over, not dropped: another adapter's (`AdapterBank`) serve again once it is back in place; the
        oldest go as new ones are kept."""
        snapshot = self._begun(network, ids)
        if snapshot is None:
            return None
        if snapshot.shared:
            return PromptSnapshot(snapshot.ids, snapshot.cache.copied(), None, snapshot.weights, shared=True)
        self.snapshots = [kept for kept in self.snapshots if kept.cache is not snapshot.cache]
        snapshot.cache.rewind(len(snapshot.ids), snapshot.windows)
        return snapshot

    def holds(self, network: torch.nn.Module, ids: list[int]) -> bool:
        """Whether `take` would find a snapshot `ids` begin with (nothing is taken)."""
        return self._begun(network, ids) is not None

    def _begun(self, network: torch.nn.Module, ids: list[int]) -> PromptSnapshot | None:
        """The kept snapshot of the longest prompt `ids` begin with, made with the weights now in place."""
        weights = _weights_state(network)
        usable = [kept for kept in self.snapshots if weights is not None and kept.weights == weights]
        begun = [kept for kept in usable if ids[: len(kept.ids)] == kept.ids]
        return max(begun, key=lambda kept: len(kept.ids), default=None)

    @staticmethod
    def snapshot_of(
        network: torch.nn.Module, ids: list[int], cache: EncoderCache, shared: bool = False
    ) -> PromptSnapshot:
        """`cache` (batch of one) right after `ids` were encoded into it, to be kept once its generation ends;
        `shared`: a cache of its own, kept as it is (`shared_point`)."""
        windows = None if shared else cache.windows()
        return PromptSnapshot(list(ids), cache, windows, _weights_state(network), shared)

    def keep(self, snapshot: PromptSnapshot) -> None:
        """Keep `snapshot` as the newest, the oldest of its kind going beyond `entries` (or `shared`); a shared
        one replaces one of the same prompt and weights."""
        if snapshot.shared:
            same = (snapshot.ids, snapshot.weights)
            others = [kept for kept in self.snapshots if not (kept.shared and (kept.ids, kept.weights) == same)]
        else:
            others = [kept for kept in self.snapshots if kept.cache is not snapshot.cache]
        kind = [kept for kept in others if kept.shared == snapshot.shared]
        limit = self.shared if snapshot.shared else self.entries
        dropped = {id(kept) for kept in kind[: max(0, len(kind) - limit + 1)]}
        self.snapshots = [*(kept for kept in others if id(kept) not in dropped), snapshot] if limit else others

    def clear(self) -> None:
        self.snapshots = []
