"""The loaded model as users see it: network, tokenizer and sampler defaults behind one object."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import PrefixCache
from .checkpoint import StoredTensor, load_weights, save_checkpoint, stored_float_dtype
from .config import (
    QUANT_FORMATS,
    SAMPLER_FIELDS,
    ModelConfig,
    SamplerSettings,
    VisionConfig,
    as_path,
    is_int,
    load_configs,
)
from .embedding import embed_batch
from .errors import DiffGemmaError
from .generate import (
    CanvasCommit,
    ChatResult,
    Done,
    Draft,
    GenerationResult,
    InfillResult,
    Prompt,
    ThinkingBudget,
    attach_text,
    banned_mask,
    cut_at_stops,
    denoising_loop,
    infill_clamp,
    is_conversation,
    logit_bias_rows,
    prepare_prompts,
    run_to_end,
    seed_int64,
)
from .images import (
    PreparedImage,
    check_budget,
    expand_placeholders,
    prepare_image,
    soft_token_budget,
    split_images,
)
from .model import DiffusionGemma, ImageInputs
from .open_batch import OpenBatch
from .quant import QuantFormat, float_sinks, format_from_config, held_bytes, meta_network, weight_bytes
from .reply import SettledText, StopStrings
from .resources import check_memory, size_text
from .scoring import TokenScores, score_batch
from .structured import DEFAULT_TRIES, json_format
from .tokenizer import (
    SYSTEM_ROLES,
    THINKING_CLOSE,
    TURN_OPEN,
    Tokenizer,
    check_messages,
    load_tokenizer,
    tokenizer_files,
)
from .toolcalls import FORCED_CALL, Tool, forced_call_fault, tool_plan
from .vision import ImageEncoder, load_image_encoder

if TYPE_CHECKING:
    from .train.lora import AdapterBank, RowAdapters

IMAGES_REMEMBERED = 16  # pictures whose soft tokens are kept (the 26B's: 1.6 MB each in bf16)

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO_DTYPE = "auto"  # for the device: `auto_dtype`
STORED_DTYPE = "stored"  # the checkpoint's own
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# `chat`'s token limit unless one is given: answers end at EOS well before it, where the checkpoint's own limit
# (the reference's 256, one canvas) would cut most of them.
CHAT_MAX_NEW_TOKENS = 4096
# A prediction is where an answer's canvas starts, position by position; a thinking answer's thoughts come first.
PREDICTION_WITH_THINKING = "a prediction lines up with the answer's start, but thinking puts its thoughts there"
# `rewrite`'s system turn: the answer must be the text alone for the prediction (the text) to line up with it.
REWRITE_SYSTEM = (
    "Rewrite the text the user gives, as they ask. Answer with the whole rewritten text and nothing else: "
    "no explanation, no code fences."
)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if dtype in (AUTO_DTYPE, STORED_DTYPE):
        raise DiffGemmaError(f"dtype {dtype!r} chooses for a checkpoint being loaded; name a dtype here")
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise DiffGemmaError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise DiffGemmaError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: CUDA GPUs from Ampere on, MPS from macOS 14, and
    x86 CPUs with AVX512-BF16 or AMX (on this AMD EPYC bf16 products run 7x float32's; CPUs without such
    instructions emulate them, 3x slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)
    if device.type != "cpu":
        return False
    if hasattr(torch.cpu, "get_capabilities"):
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    # PyTorch 2.9 has no capability table; its x86 probes answer the same question (AMX's tiles come
    # with its bf16 products)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """dtype="auto": a checkpoint stored in bf16 or float16 (the real model) runs in bf16 where `device` has
    bf16 matrix instructions and in float32 elsewhere; one stored in float32 stays float32."""
    if stored == torch.float32:
        return torch.float32
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def load_dtype(dtype: torch.dtype | str | None, device: torch.device, folder: Path) -> torch.dtype:
    """`load`'s dtype: a dtype or its name, or "auto" (None too) or "stored", which read the checkpoint's."""
    return _chosen_dtype(dtype, device, lambda: stored_float_dtype(folder))


def _chosen_dtype(
    dtype: torch.dtype | str | None, device: torch.device, stored: Callable[[], torch.dtype]
) -> torch.dtype:
    dtype = AUTO_DTYPE if dtype is None else dtype  # (None: the default, as transformers reads it)
    if dtype not in (AUTO_DTYPE, STORED_DTYPE):
        return resolve_dtype(dtype)
    return auto_dtype(device, stored()) if dtype == AUTO_DTYPE else stored()


def declared_dtype(raw: dict) -> torch.dtype:
    """The dtype a config.json says its weights are in (`dtype`, or the older `torch_dtype`, at its top or in its
    text config); bf16, the published checkpoint's, where it says none (before the weights can be read)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    for source in (raw, text):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str) and source[key] in DTYPE_NAMES:
                return DTYPE_NAMES[source[key]]
    return torch.bfloat16


def resolve_device(device: torch.device | str) -> torch.device:
    """A device or its name; "auto" is a CUDA GPU where this machine has one, else the CPU (Apple's MPS when asked
    for by name: no test here has run on it)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffGemmaError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffGemmaError("device 'cuda' was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffGemmaError("device 'mps' was asked for, but Apple MPS is not available")
    if device.type not in ("cpu", "cuda", "mps"):  # Intel's xpu, say: untested here, but PyTorch's ops run there
        backend = getattr(torch, device.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise DiffGemmaError(f"device {device.type!r} was asked for, but this machine or PyTorch build has none")
    count = getattr(getattr(torch, device.type, None), "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise DiffGemmaError(
            f"device {str(device)!r} was asked for, but this machine has {count} {device.type} device(s)"
        )
    return device


CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja")
CONFIG_FILES = ("config.json", "generation_config.json")  # what `info` reads: kilobytes, not 50 GB


def download(repo_id: str, patterns: Sequence[str] = CHECKPOINT_FILES, kind: str = "model") -> Path:
    """Fetch a checkpoint (`kind` "model") or a dataset ("dataset"), the files that match `patterns`, from the
    Hugging Face Hub; offline, say so plainly."""
    what = "checkpoint" if kind == "model" else kind
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, repo_type=kind, allow_patterns=list(patterns)))
    except Exception as err:  # network, auth and missing-repo errors all mean the same thing here
        raise DiffGemmaError(
            f"{repo_id}: not a local path, and downloading the {what} from the Hugging Face Hub failed "
            f"({type(err).__name__}). Offline? Download the {what} elsewhere and pass its local path."
        ) from None


def resolve_folder(path: str | os.PathLike, patterns: Sequence[str] = CHECKPOINT_FILES) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (the files matching `patterns`)."""
    folder = as_path(path, "a checkpoint (its folder, or a Hub id)")
    if folder.is_dir():
        return folder
    if folder.exists():
        raise DiffGemmaError(f"{folder}: not a folder (pass the checkpoint folder, not a file in it)")
    if on_hub(path):
        return download(str(path), patterns)
    raise DiffGemmaError(f"{folder}: folder not found")


def on_hub(path: str | os.PathLike) -> bool:
    """Whether `path` names a Hub checkpoint (`owner/name`, no such local path) rather than a folder here."""
    text = str(path)
    return not Path(text).expanduser().exists() and bool(HUB_ID.match(text)) and not text.startswith((".", "/"))


class DiffGemma:
    """A loaded DiffusionGemma checkpoint.

    `denoise_logits` is the stable parity surface; generation methods come from `diffgemma.generate`.
    `prefix_cache` keeps the encoder cache of the last prompt generated from alone, so that a prompt beginning
    with it (a chat's next turn) encodes only the rest; None turns that off (its memory: the sliding layers'
    windows, about 0.2 GB on the 26B shape in bf16, besides the cache itself).
    """

    def __init__(
        self,
        network: DiffusionGemma,
        tokenizer: Tokenizer | None,
        settings: SamplerSettings,
        folder: Path | None = None,
        passthrough: dict[str, StoredTensor] | None = None,
        quant: QuantFormat | None = None,
    ) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.settings = settings
        self.folder = folder
        self.quant = quant
        self.adapter: Path | None = None  # the LoRA adapter applied (`load_adapter`)
        self._bank: AdapterBank | None = None  # adapters kept beside the base weights (`add_adapter`)
        self._adapter_in_use: str | None = None  # `use_adapter`'s: what a call that names none runs with
        self._adapter_sampling: dict[str, dict[str, Any]] = {}  # an adapter's own denoising settings, by name
        self._passthrough = passthrough or {}
        self._vision: ImageEncoder | None = None
        self._image_soft_tokens: int | None = None
        self._images_seen: dict[bytes, torch.Tensor] = {}  # picture fingerprint -> its soft tokens (`image_features`)
        self.prefix_cache: PrefixCache | None = _prefix_cache(tokenizer)

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def vision(self) -> ImageEncoder:
        """The image encoder (vision tower and projection), read from the checkpoint when first asked for, so a
        text-only user holds none of it (Gemma 4's default shape: 0.17B parameters)."""
        if self._vision is None:
            config = self._vision_config()
            if not self._passthrough:
                raise DiffGemmaError("this model's vision tower weights are not at hand (no checkpoint folder)")
            self._vision = load_image_encoder(
                config, self.config.hidden_size, self._passthrough, self.device, self.dtype
            )
        return self._vision

    def _vision_config(self) -> VisionConfig:
        if self.config.vision is None:
            raise DiffGemmaError("this checkpoint has no vision tower (no `vision_config`): it reads text, not images")
        return self.config.vision

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def denoise_logits(
        self,
        prompt_ids: torch.Tensor,
        canvas_ids: torch.Tensor,
        self_conditioning_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode `prompt_ids` [B, P], then one decoder pass over `canvas_ids` [B, C]: logits [B, C, V]."""
        self._adapter_back_in_place()
        return self.network.denoise_logits(prompt_ids, canvas_ids, self_conditioning_logits)

    def _events(
        self,
        prompt: Prompt,
        max_new_tokens: int | list[int] | None,
        seed: int | list[int] | None,
        mode: str,
        clamp: torch.Tensor | list | None,
        enable_thinking: bool,
        stop_at_eos: bool,
        sampler: dict[str, Any],
        commit_stable_prefix: bool = False,
        token_ranges: torch.Tensor | list | None = None,
        banned_tokens: torch.Tensor | Sequence | None = None,
        first_self_conditioning: torch.Tensor | None = None,
        noise_ranges: torch.Tensor | list | None = None,
        end_rows: Callable[[list[list[int]]], Sequence[bool]] | None = None,
        images: Sequence | None = None,
        prediction: str | Sequence | torch.Tensor | None = None,
        thinking_budget: int | None = None,
        adapter: str | Sequence[str | None] | None = None,
        logit_bias: dict[int, float] | Sequence[dict[int, float] | None] | torch.Tensor | None = None,
    ) -> tuple[Iterator[Draft | CanvasCommit | Done], bool]:
        row_limits = None
        if isinstance(max_new_tokens, list | tuple):
            if not all(is_int(limit) for limit in max_new_tokens):
                raise DiffGemmaError(f"max_new_tokens: a whole number, or one a row, got {max_new_tokens!r:.80}")
            row_limits, max_new_tokens = list(max_new_tokens), max(max_new_tokens, default=0)
        # a denoising setting given as a list: one a row (the others one for all)
        per_row = {k: list(v) for k, v in sampler.items() if k in SAMPLER_FIELDS and isinstance(v, list | tuple)}
        asked = {"max_new_tokens": max_new_tokens, **{k: v for k, v in sampler.items() if k not in per_row}}
        settings = self.settings.replace(**asked)
        if prediction is not None and enable_thinking:  # (before the prompt's pictures go through the tower)
            raise DiffGemmaError(PREDICTION_WITH_THINKING)
        budget = None if thinking_budget is None else self.thinking_budget(thinking_budget)
        if images is not None and not isinstance(images, list | tuple):
            given = f"{type(images).__name__} {images!r:.40}"
            raise DiffGemmaError(
                f"images must be a list of pictures (files, bytes, data: URLs or PIL images), got {given}"
            )
        if is_conversation(prompt):
            prompt, found = split_images(list(prompt))
            if found and images:
                raise DiffGemmaError("images come either in the messages' image parts or in `images`, not both")
            images = images or found
        elif isinstance(prompt, Sequence) and prompt and all(is_conversation(p) for p in prompt):
            prompt, found = zip(*(split_images(list(conversation)) for conversation in prompt), strict=True)
            if any(found) and images:
                raise DiffGemmaError("images come either in the messages' image parts or in `images`, not both")
            images = images or (list(found) if any(found) else None)
        ids, mask, batched = prepare_prompts(prompt, self.tokenizer, settings.pad_id, enable_thinking)
        image_inputs = None
        if images:
            ids, mask, image_inputs = self._with_images(ids, mask, images, batched, settings.pad_id)
        elif self.config.vision is not None and bool((ids == self.config.vision.image_token_id).any()):
            import warnings

            # (as the reference warns: the ids are read as the image token's own embedding, no picture)
            warnings.warn("the prompt holds image ids but no images were given: they are read as text", stacklevel=2)
        if clamp is not None and not isinstance(clamp, torch.Tensor):
            clamp = _clamp_ids(clamp)
        token_ranges = _ranges_for_rows(token_ranges, ids.shape[0], "token_ranges")
        noise_ranges = _ranges_for_rows(noise_ranges, ids.shape[0], "noise_ranges")
        if isinstance(banned_tokens, list | tuple):
            banned_tokens = banned_mask(banned_tokens, ids.shape[0], self.config.vocab_size, self.device)
        else:
            banned_tokens = _for_every_row(banned_tokens, ids.shape[0], "banned_tokens must be a boolean tensor")
        first_self_conditioning = _for_every_row(
            first_self_conditioning, ids.shape[0], "first_self_conditioning must be a tensor of probabilities"
        )
        logit_bias = logit_bias_rows(logit_bias, ids.shape[0], self.config.vocab_size)
        predictions = None if prediction is None else self._predictions(prediction, ids.shape[0])
        names = self._adapter_names(adapter, ids.shape[0])
        adapters = self._row_adapters(names)
        row_settings = None
        if per_row or any(name in self._adapter_sampling for name in names):  # (adapters' own settings)
            for key, values in per_row.items():
                if len(values) != len(names):
                    raise DiffGemmaError(f"{key}: one for all rows, or one a row ({len(names)}), got {len(values)}")
            row_settings = [
                self.sampler_defaults(name).replace(**asked, **{key: values[row] for key, values in per_row.items()})
                for row, name in enumerate(names)
            ]
        events = denoising_loop(
            self.network,
            settings,
            ids,
            mask,
            mode,
            seed,
            clamp,
            stop_at_eos,
            self.tokenizer,
            row_limits,
            commit_stable_prefix,
            token_ranges=token_ranges,
            banned_tokens=banned_tokens,
            first_self_conditioning=first_self_conditioning,
            noise_ranges=noise_ranges,
            end_rows=end_rows,
            prefix_cache=self.prefix_cache,
            images=image_inputs,
            predictions=predictions,
            thinking_budget=budget,
            adapters=adapters,
            row_settings=row_settings,
            logit_bias=logit_bias,
        )
        return events, batched

    def thinking_budget(self, tokens: int) -> ThinkingBudget:
        """A reply's thinking held to at most `tokens` tokens of thought (`ThinkingBudget`), in this checkpoint's
        thinking channel."""
        if not is_int(tokens) or tokens < 0:
            raise DiffGemmaError(f"thinking_budget must be a whole number of tokens, 0 or more, got {tokens!r}")
        opening, close = self._need_tokenizer().thinking_ids
        if close is None:
            raise DiffGemmaError(f"this checkpoint's tokenizer has no thinking channel ({THINKING_CLOSE}) to budget")
        return ThinkingBudget(tokens, opening, close)

    def prediction_ids(self, prediction: str | Sequence[int]) -> list[int]:
        """A prediction's token ids: a text tokenized as it would be generated (no BOS), or ids as they are (-1:
        no prediction at that position)."""
        if isinstance(prediction, str):
            return self._need_tokenizer().encode(prediction, add_special_tokens=False)
        if not isinstance(prediction, Sequence) or not all(is_int(token) for token in prediction):
            raise DiffGemmaError("a prediction must be a text or token ids")
        vocab = self.config.vocab_size
        if any(not -1 <= token < vocab for token in prediction):
            raise DiffGemmaError(f"a prediction's ids must be token ids below {vocab} (or -1: none there)")
        return list(prediction)

    def _predictions(self, prediction: str | Sequence | torch.Tensor, batch: int) -> list[list[int]]:
        """`generate`'s `prediction` as one id list a row: a text or ids for every row, or one of them a row; a
        tensor [L] or [B, L] of ids."""
        if isinstance(prediction, torch.Tensor):
            if prediction.ndim not in (1, 2) or prediction.dtype not in (torch.int64, torch.int32):
                raise DiffGemmaError("a prediction tensor must hold token ids, shaped [tokens] or [batch, tokens]")
            prediction = prediction.tolist()
        if isinstance(prediction, str) or (
            isinstance(prediction, Sequence) and all(is_int(token) for token in prediction)
        ):
            return [self.prediction_ids(prediction)] * batch
        if isinstance(prediction, Sequence) and len(prediction) == batch:
            return [self.prediction_ids(row) for row in prediction]
        raise DiffGemmaError(f"prediction must be a text or token ids, or {batch} of them (one a row)")

    def _with_images(
        self, ids: torch.Tensor, mask: torch.Tensor | None, images: Sequence, batched: bool, pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, ImageInputs | None]:
        """Prompt ids with one image id per picture -> the ids with each picture's run in its place
        (`image_prompt`), padded again, and where the pictures' soft tokens go. `images`: the pictures of a
        prompt, or for a batch a list of them per row."""
        rows_images = list(images) if batched else [list(images)]
        if len(rows_images) != ids.shape[0] or not all(isinstance(row, list | tuple) for row in rows_images):
            raise DiffGemmaError(f"images for a batch of {ids.shape[0]} prompts must be a list of images per prompt")
        valid = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        rows, pictures = [], []
        for row, row_valid, row_images in zip(ids, valid, rows_images, strict=True):
            expanded, prepared = self.image_prompt(row[row_valid].tolist(), row_images)
            rows.append(expanded)
            pictures.append(list(self.image_features(prepared)))
        ids, mask, _ = prepare_prompts(rows, None, pad_id)
        return ids, mask, ImageInputs.in_prompts(ids, mask, pictures, self.config.vision.image_token_id)

    def image_prompt(self, ids: list[int], images: Sequence) -> tuple[list[int], list[PreparedImage]]:
        """A prompt's ids with one image id per picture (as a chat template writes an image part) -> (the ids
        with each picture's run in its place: begin-of-image, an image id a soft token, end-of-image; the
        pictures read, resized within `image_soft_tokens` and cut into patches). No network runs."""
        config = self._vision_config()
        prepared = [
            prepare_image(image, config, self.image_soft_tokens, f"image {i + 1}") for i, image in enumerate(images)
        ]
        marker = self.tokenizer.decode([config.image_token_id], False) if self.tokenizer is not None else None
        return expand_placeholders(list(ids), [p.soft_tokens for p in prepared], config, marker), prepared

    def image_features(self, prepared: Sequence[PreparedImage]) -> tuple[torch.Tensor, ...]:
        """Pictures (`image_prompt`) through the vision tower: each one's soft tokens [count, hidden]. The last
        `IMAGES_REMEMBERED` pictures' are kept, so a chat about a picture runs the tower once, not every turn (on
        a CPU, seconds a turn)."""
        return tuple(self._soft_tokens(picture) for picture in prepared)

    def _soft_tokens(self, picture: PreparedImage) -> torch.Tensor:
        remembered = self._images_seen.pop(picture.fingerprint, None)
        if remembered is None:
            remembered = self.vision(picture.patches, picture.rows, picture.columns)
        self._images_seen[picture.fingerprint] = remembered  # (the newest last)
        while len(self._images_seen) > IMAGES_REMEMBERED:
            del self._images_seen[next(iter(self._images_seen))]
        return remembered

    @property
    def image_soft_tokens(self) -> int:
        """The most soft tokens an image becomes (70, 140, 280, 560 or 1120; the checkpoint's processor config,
        else 280): larger images are shrunk to fit. Settable."""
        if self._image_soft_tokens is None:
            self._image_soft_tokens = soft_token_budget(self.folder)
        return self._image_soft_tokens

    @image_soft_tokens.setter
    def image_soft_tokens(self, value: int) -> None:
        self._image_soft_tokens = check_budget(value, "image_soft_tokens")

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int | list[int] | None = None,
        seed: int | list[int] | None = None,
        mode: str = "fast",
        clamp: torch.Tensor | list | None = None,
        enable_thinking: bool = False,
        commit_stable_prefix: bool = False,
        token_ranges: torch.Tensor | list | None = None,
        banned_tokens: torch.Tensor | Sequence | None = None,
        first_self_conditioning: torch.Tensor | None = None,
        noise_ranges: torch.Tensor | list | None = None,
        stop: str | Sequence[str] | StopStrings | None = None,
        images: Sequence | None = None,
        prediction: str | Sequence | torch.Tensor | None = None,
        thinking_budget: int | None = None,
        adapter: str | Sequence[str | None] | None = None,
        logit_bias: dict[int, float] | Sequence[dict[int, float] | None] | torch.Tensor | None = None,
        progress: Callable[[Draft], None] | None = None,
        **sampler: Any,
    ) -> GenerationResult:
        """Generate after `prompt` (ids, text, chat messages, or a batch of ids, texts or conversations).

        Sampler settings (`max_denoising_steps`, `entropy_bound`, `t_max`, `t_min`, `stability_threshold`,
        `confidence_threshold`, `eos_token_id`, `pad_token_id`) override the checkpoint's defaults for this
        call; `top_k`, `top_p` and `min_p` cut what a position may draw (`sampling.truncate`; off by default);
        `presence_penalty`, `frequency_penalty` and `repetition_penalty` penalise what the prompt and the answer
        hold so far (`sampling.penalize`; off by default): the answer's committed canvases and, with
        `commit_stable_prefix`, the settled start of the one under way.
        The denoising ones (`SAMPLER_FIELDS`: all these but the ids) may be lists, one a row of a batch, which
        then shares every pass (a sweep of temperatures in one batch, say).
        `clamp` fixes generated positions to given ids (-1 or None = free), in every step and in the output.
        With `seed` the run is reproducible; without it the global torch RNG is used. For a batch, `seed` and
        `max_new_tokens` may be lists (one per row). `commit_stable_prefix` fixes each canvas's settled leading
        tokens as it goes (what `stream` needs to send text before a canvas ends).
        `token_ranges` ([L, 2] for every row, or [B, L, 2]) limits generated position i to ids in its half-open
        range (low, high): a vocabulary constrained per position (a sudoku cell takes only its nine digits).
        `banned_tokens` ([L, V] or [B, L, V] booleans) names ids position i never samples (a sudoku cell's
        digits that a given among its peers holds); the re-noising may still draw them. A list of ids (or one
        list per row) bans them at every position (an API's `logit_bias` of -100).
        `first_self_conditioning` ([L, V] or [B, L, V] probabilities) is each canvas's first-step
        self-conditioning input instead of no signal (a sudoku model trained with its candidates there).
        `noise_ranges` ([L, 2] or [B, L, 2]) is where position i's starting token and its re-noising draw from
        instead of `token_ranges`: one id makes it a mask (a sudoku model trained on masked cells).
        `stop` (a string or several) ends a row where one first appears in its text: no canvas after that one
        is denoised for it, its text comes back without the string (its `new_tokens` run through the token
        that completed it) and `result.stopped` says which rows a stop string ended.
        `images` (files, bytes, `data:` URLs or PIL images; for a batch, a list per prompt) go where the prompt's
        image ids are, one each (chat messages carry theirs as image parts instead); the checkpoint's vision
        tower reads them. `result.sequences` holds the prompt with each image's run of soft-token ids.
        `prediction` (a text, ids, or one of them per row) is what the output is expected to be, mostly (OpenAI's
        predicted outputs: a file to edit, say; -1: none at that position): the canvases start from its tokens
        instead of random ones, each from the part that follows what has been written (`predicted_start`), so
        what the output shares with it settles in a step or two and the rest is rewritten. It leans the answer
        towards the prediction where the model is unsure.
        `thinking_budget` (for a reply that thinks: its prompt turned thinking on) is the most tokens of thought
        it writes: where it is still thinking on the canvas that reaches that many, its thinking channel's close
        is held in place there (`ThinkingBudget`), and the answer follows; 0 makes the thought empty.
        `adapter`: the LoRA adapter (`add_adapter`) this call runs with, whatever `use_adapter` put in place: a
        name for every row, or a list of one a row (None there: the base model), the rows of several sharing
        every pass; left out, the one in place.
        `logit_bias` (token id: bias, for every row; a list of them, one a row; or a float tensor [V] or [B, V])
        is added to the logits of every generated position before the temperature and the cuts read them, as
        OpenAI's `logit_bias`: +100 makes a token all but certain wherever it is allowed, -5 rare; `banned_tokens`
        is the exact ban.
        `progress` is called with each denoising step's `Draft` (its canvas, its step, the draft so far): a
        progress bar's hook, where `stream` would be more than it needs.
        """
        return run_to_end(
            self.stream(
                prompt,
                max_new_tokens,
                seed,
                mode,
                clamp,
                enable_thinking,
                commit_stable_prefix,
                token_ranges,
                banned_tokens,
                first_self_conditioning,
                noise_ranges,
                stop=stop,
                images=images,
                prediction=prediction,
                thinking_budget=thinking_budget,
                adapter=adapter,
                logit_bias=logit_bias,
                **sampler,
            ),
            progress,
        )

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int | list[int] | None = None,
        seed: int | list[int] | None = None,
        mode: str = "fast",
        clamp: torch.Tensor | list | None = None,
        enable_thinking: bool = False,
        commit_stable_prefix: bool = False,
        token_ranges: torch.Tensor | list | None = None,
        banned_tokens: torch.Tensor | Sequence | None = None,
        first_self_conditioning: torch.Tensor | None = None,
        noise_ranges: torch.Tensor | list | None = None,
        stop: str | Sequence[str] | StopStrings | None = None,
        end_rows: Callable[[list[list[int]]], Sequence[bool]] | None = None,
        images: Sequence | None = None,
        prediction: str | Sequence | torch.Tensor | None = None,
        thinking_budget: int | None = None,
        adapter: str | Sequence[str | None] | None = None,
        logit_bias: dict[int, float] | Sequence[dict[int, float] | None] | torch.Tensor | None = None,
        **sampler: Any,
    ) -> Iterator[Draft | CanvasCommit | Done]:
        """Like `generate`, as events: a `Draft` after every denoising step, a `CanvasCommit` per canvas,
        then `Done` with the result. Closing the iterator (or breaking out of the loop) stops the work.
        With `commit_stable_prefix`, each draft's `settled` says how many leading canvas tokens are final.
        `end_rows`, called at each canvas's end with every row's generated ids so far, names rows to end there
        (a server's cancelled requests); drafts of ended rows may still come until the batch ends."""
        stops = self._stop_strings(stop)
        events, batched = self._events(
            prompt,
            max_new_tokens,
            seed,
            mode,
            clamp,
            enable_thinking,
            True,
            sampler,
            commit_stable_prefix,
            token_ranges,
            banned_tokens,
            first_self_conditioning,
            noise_ranges,
            end_rows if stops is None else _ended_by(stops, end_rows),
            images,
            prediction,
            thinking_budget,
            adapter,
            logit_bias,
        )
        try:
            for event in events:
                if isinstance(event, Done):
                    if stops is not None:
                        cut_at_stops(event.result, stops)
                    attach_text(event.result, self.tokenizer, batched, stops)
                yield event
        finally:
            events.close()

    def open_batch(self, **sampler: Any) -> OpenBatch:
        """A batch that rows join and leave between canvases (`open_batch`: a server's engine): `add` rows of
        token ids (`BatchRow`: prompt, limit, seed, a fill's clamp, banned ids) whenever, and iterate `events()`
        to run it (a `RowsStep` a denoising step, `RowsCommitted` a canvas, `RowFinished` as each row ends).
        Fast mode, settled prefixes committed early; `sampler` as `generate` takes it, for the rows that bring no
        settings of their own (`BatchRow.settings`: rows of other settings share the batch's passes), over an
        adapter's own (`sampler_defaults`) for a row that names one. Rows may name adapters (`add_adapter`;
        `BatchRow.adapter`), each its own: rows of several share the batch's passes."""
        adapters = self._bank.for_rows if self._bank is not None else None
        settings = self.settings.replace(**sampler)

        def adapter_defaults(name: str) -> SamplerSettings:
            return self.sampler_defaults(name).replace(**sampler)

        return OpenBatch(
            self.network,
            settings,
            self.prefix_cache,
            self.tokenizer,
            adapters=adapters,
            adapter_defaults=adapter_defaults,
        )

    def chat(
        self,
        messages: list[dict[str, Any]],
        enable_thinking: bool = False,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        mode: str = "fast",
        stop: str | Sequence[str] | None = None,
        prefill: str = "",
        sanitize: bool = False,
        tools: Sequence[Tool] | None = None,
        tool_choice: str = "auto",
        json_schema: dict[str, Any] | bool | None = None,
        json_tries: int = DEFAULT_TRIES,
        prediction: str | Sequence[int] | None = None,
        thinking_budget: int | None = None,
        adapter: str | None = None,
        progress: Callable[[Draft], None] | None = None,
        **sampler: Any,
    ) -> ChatResult:
        """One model turn through the checkpoint's chat template; the thinking channel comes back apart.
        `stop` strings end the answer (never the thinking) where one first appears. `prefill` begins the answer
        (say "{" for JSON): the model goes on from it, and the reply is what follows it. `sanitize`: special
        tokens' texts in the messages are read as text (`Tokenizer.encode_chat`), for messages from others.
        A message's content may hold image parts (`{"type": "image", "image": a file, bytes, a data: URL or a PIL
        image}`, or OpenAI's `image_url`), which the vision tower reads (`images.split_images`).

        `tools` (OpenAI's shape: `{"type": "function", "function": {"name", "description", "parameters"}}`, or
        Python functions: `toolcalls.function_tool`, or an MCP server's: `tool_servers`) may be called: the calls
        come back in `tool_calls` (answer them with `{"role": "tool", "tool_call_id" or "name", "content"}`
        messages after the assistant's message with its `tool_calls`, and chat again).
        `tool_choice`: "auto" (the model decides), "none" (no tools offered), "required" (some call), or a
        tool's name (a call to it). A reply that must call and does not (no call reads from it, or its arguments
        do not match its tool's `parameters` schema) is drawn again as a JSON answer is (`json_tries`).

        `json_schema` asks for a JSON answer (True: any object; or a JSON schema, or OpenAI's `response_format`):
        the system turn tells the model the schema, and an answer that does not read as JSON matching it is
        drawn again (seed + 1, ...), at most `json_tries` times in all; its value comes back in `parsed`, the
        JSON text in `content`. None reading raises DiffGemmaError with the last answer's fault. An answer cut
        at `max_new_tokens`, or one that calls tools, comes back as it is (`parsed` None). Without
        `max_new_tokens` an answer runs to its EOS, up to `CHAT_MAX_NEW_TOKENS` (not the checkpoint's limit, the
        reference's one canvas of 256, which would cut most answers).

        `prediction`: the answer expected, mostly (a text or its ids: the file an edit request will give back
        changed): its canvas starts from it (`generate`), so the text the answer keeps settles in a step or two.
        Without thinking: a thinking answer begins with its thoughts, where the prediction would not line up.

        `thinking_budget` (with `enable_thinking`): the most tokens of thought before the answer (`generate`'s);
        0: none. Not with a `prefill` or a forced tool call, which begin the reply where the thought would.

        `adapter`: the LoRA adapter (`add_adapter`) that answers, whatever `use_adapter` put in place.
        `progress`: called with each denoising step's `Draft` (`generate`'s), a JSON answer's tries all told."""
        tokenizer = self._need_tokenizer()
        check_messages(messages, prefill)  # (before a JSON answer's instruction is added to them)
        answer_format = json_format(json_schema, "json_schema")
        offered, lead = tool_plan(tools, tool_choice)
        if thinking_budget is not None and not enable_thinking:
            raise DiffGemmaError("thinking_budget limits the thought of a chat that thinks: ask enable_thinking too")
        if thinking_budget is not None and (prefill or lead):
            begun = "a prefill" if prefill else f"tool_choice {tool_choice!r}"
            raise DiffGemmaError(f"{begun} begins the reply where its thought would go: no thinking_budget with it")
        if (answer_format is not None or lead) and (not is_int(json_tries) or json_tries < 1):
            raise DiffGemmaError(f"json_tries must be a positive integer, got {json_tries!r}")
        if answer_format is not None:
            if prefill:
                raise DiffGemmaError("a prefill gives the answer's start, so its JSON (json_schema) is not whole")
            messages = answer_format.with_instruction(messages)
        if prediction is not None and enable_thinking:
            raise DiffGemmaError(PREDICTION_WITH_THINKING)
        if "images" in sampler:
            raise DiffGemmaError("chat takes pictures as image parts of its messages, not as images=")
        messages, images = split_images(messages)
        prompt = tokenizer.encode_chat(messages, enable_thinking, prefill, sanitize, tools=offered)
        lead_ids = tokenizer.encode(lead, add_special_tokens=False) if lead else []
        stops = self._stop_strings(stop)
        text = self.settled_text(True, stops.stops if stops else (), tools=bool(offered), lead=lead_ids)
        seed = None if seed is None else seed_int64(seed)  # (a chat is one row: one seed, not a list)
        if max_new_tokens is None:
            pictures = len(images) * (self.image_soft_tokens + 2) if images else 0  # (each at most, with its marks)
            max_new_tokens = self.chat_limit(len(prompt) + len(lead_ids) + pictures)
        for attempt in range(json_tries if answer_format is not None or lead else 1):
            try_seed = None if seed is None else seed + attempt
            result = self.generate(
                prompt + lead_ids,
                max_new_tokens,
                try_seed,
                mode,
                stop=text.stops,
                images=images,
                prediction=prediction,
                thinking_budget=thinking_budget,
                adapter=adapter,
                progress=progress,
                **sampler,
            )
            tokens = result.new_tokens[0]
            content, reasoning = text.parts(tokens)
            reply = ChatResult(content, reasoning, result, text.tool_calls(tokens))
            if lead and not result.reached_limit[0]:
                fault = forced_call_fault(reply.tool_calls, offered, content)
                if fault is None:
                    return reply
                continue
            if answer_format is None or reply.tool_calls or result.reached_limit[0]:
                return reply
            try:
                parsed = answer_format.read(content)
            except DiffGemmaError as err:
                fault = str(err)
                continue
            return replace(reply, content=answer_format.text(content), parsed=parsed)
        what = FORCED_CALL if lead else answer_format.what
        raise DiffGemmaError(f"no {what} in {json_tries} tries; the last: {fault}")

    def infill(
        self,
        prefix: str,
        suffix: str,
        length: int,
        seed: int | None = None,
        mode: str = "fast",
        progress: Callable[[Draft], None] | None = None,
        **sampler: Any,
    ) -> InfillResult:
        """Fill `length` tokens between `prefix` (encoded as the prompt) and `suffix` (clamped on the canvas);
        `progress`: `generate`'s."""
        tokenizer, settings = self._need_tokenizer(), self.settings
        prompt, clamp = self.infill_inputs(prefix, suffix, length)
        events, _ = self._events([prompt], self.config.canvas_length, seed, mode, [clamp], False, False, sampler)
        result = run_to_end(events, progress)
        fill_ids = result.new_tokens[0][:length]
        for index, token in enumerate(fill_ids):
            if token in settings.eos_token_id or token == settings.pad_id:
                fill_ids = fill_ids[:index]
                break
        fill = tokenizer.decode(fill_ids)
        result.text = prefix + fill + suffix
        return InfillResult(result.text, fill, result)

    def infill_inputs(self, prefix: str, suffix: str, length: int, warn: bool = True) -> tuple[list[int], list[int]]:
        """(prompt ids, canvas clamp) of a fill: the prefix as the prompt; on the canvas `length` free positions
        (-1), then the suffix and an EOS held in place (the suffix's end cut where it does not fit, with a
        warning unless `warn` is False)."""
        settings = self.settings
        eos = settings.eos_token_id[0] if settings.eos_token_id else self.config.eos_token_id[0]
        canvas = self.config.canvas_length
        return infill_clamp(self._need_tokenizer(), prefix, suffix, length, canvas, eos, settings.pad_id, warn)

    def settled_text(
        self, chat: bool, stops: Sequence[str] = (), tools: bool = False, lead: Sequence[int] = ()
    ) -> SettledText:
        """A row's text as it settles (`SettledText`: deltas never taken back, the thinking apart in a `chat`,
        ending before the first of `stops`, tool calls apart if `tools` were offered, `lead` the reply's made
        start), with this checkpoint's tokenizer, EOS and pad."""
        settings = self.settings
        tokenizer = self._need_tokenizer()
        return SettledText(tokenizer, settings.eos_token_id, settings.pad_token_id, chat, stops, tools, lead)

    def chat_limit(self, prompt_tokens: int | None = None) -> int:
        """A chat answer's default token limit: `CHAT_MAX_NEW_TOKENS` (or the checkpoint's, if more); given the
        prompt's length, within the canvases that fit after it in the model's positions."""
        limit = max(CHAT_MAX_NEW_TOKENS, self.settings.max_new_tokens)
        if prompt_tokens is None:
            return limit
        length = self.config.canvas_length
        room = (self.config.max_position_embeddings - prompt_tokens) // length * length
        return max(min(limit, room), length)

    def rewrite(
        self, text: str, instruction: str, seed: int | None = None, max_new_tokens: int | None = None, **sampler: Any
    ) -> ChatResult:
        """`text` rewritten as `instruction` asks (a file to change: "rename x to y"), the way OpenAI's predicted
        outputs serve edits: a chat turn asks for the whole text back changed, and its canvas starts from the
        text itself (`prediction`), so what stays settles in a step or two. `content` is the new text (a code
        fence around the answer taken off; the text's last newline kept). `max_new_tokens`: by default twice
        the text's tokens, and a canvas more."""
        if not isinstance(text, str) or not isinstance(instruction, str) or not instruction.strip():
            raise DiffGemmaError("rewrite takes a text and an instruction (what to change)")
        predicted = self.prediction_ids(text)
        if max_new_tokens is None:
            max_new_tokens = 2 * len(predicted) + self.config.canvas_length
        messages = [
            {"role": "system", "content": REWRITE_SYSTEM},
            {"role": "user", "content": f"{instruction.strip()}\n\n{text}"},
        ]
        reply = self.chat(messages, max_new_tokens=max_new_tokens, seed=seed, prediction=predicted, **sampler)
        content = _unfenced(reply.content)
        if text.endswith("\n") and not content.endswith("\n"):
            content += "\n"
        return replace(reply, content=content)

    def edit(
        self,
        text: str,
        start: int,
        end: int,
        length: int | None = None,
        seed: int | None = None,
        mode: str = "fast",
        **sampler: Any,
    ) -> InfillResult:
        """Regenerate the characters `text[start:end]` in place (as many tokens as they had, or `length`); the
        sampler settings and `progress` are `infill`'s."""
        if not isinstance(text, str) or not (is_int(start) and is_int(end)):
            raise DiffGemmaError("edit takes a text and a span of integer character offsets (start, end)")
        if not 0 <= start <= end <= len(text):
            raise DiffGemmaError(f"edit span {start}:{end} is outside the text (length {len(text)})")
        tokenizer = self._need_tokenizer()
        if length is None:
            length = max(1, len(tokenizer.encode(text[start:end], add_special_tokens=False)))
            canvas = self.config.canvas_length
            if length > canvas:  # (a fill is one canvas: the suffix must be on it for the fill to see it)
                raise DiffGemmaError(
                    f"the span to edit is {length} tokens; an edit rewrites at most one canvas ({canvas} tokens): "
                    "edit a shorter span, or say how many tokens to write in its place (length; --length)"
                )
        return self.infill(text[:start], text[end:], length, seed, mode, **sampler)

    def score(
        self,
        text: str | Sequence[int] | torch.Tensor | Sequence[str] | Sequence[Sequence[int]],
        top: int = 0,
        soft_tokens: Sequence | None = None,
    ) -> TokenScores | list[TokenScores]:
        """Each token's log-probability given the ones before it, from the causal encoder (`scoring`): a text
        (tokenized with BOS) or token ids as given; `top` likeliest alternatives per position (up to 20).
        `.total` sums them, `.perplexity` is exp of their negative mean. A batch (a list of texts, or of id
        lists) is scored in one pass, each as alone, and gives a list. `soft_tokens`: for ids that hold pictures'
        runs (`image_prompt`), each picture's soft tokens (`image_features`); for a batch, a list per row."""
        batched, rows = self._text_rows(text, "score")
        pictures = None
        if soft_tokens is not None:
            pictures = [list(row) for row in soft_tokens] if batched else [list(soft_tokens)]
        self._adapter_back_in_place()
        scores = score_batch(self.network, rows, top, pictures)
        return scores if batched else scores[0]

    def embed(
        self,
        text: str | Sequence[int] | torch.Tensor | Sequence[str] | Sequence[Sequence[int]],
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> torch.Tensor:
        """A text's embedding (`embedding`): the mean of the causal encoder's final hidden states over its tokens
        (a text tokenized with BOS, or token ids as given), float32 [hidden] on the CPU, unit length unless
        `normalize` is False; `dimensions` keeps its first so many (then scaled to unit length). A batch (a list
        of texts, or of id lists) gives [N, hidden], each row as the text alone gives it. Not a trained
        embedding model's vectors: good for search among one's own texts, not for a benchmark."""
        batched, rows = self._text_rows(text, "embed")
        self._adapter_back_in_place()
        vectors = embed_batch(self.network, rows, normalize, dimensions)
        return vectors if batched else vectors[0]

    def _text_rows(self, text: Any, verb: str) -> tuple[bool, list[list[int]]]:
        """Whether `text` is a batch, and its rows of ids: a text (tokenized with BOS) or ids as given, or a list
        of either."""
        batched = isinstance(text, list | tuple) and bool(text) and all(isinstance(t, str | list | tuple) for t in text)
        return batched, [self._text_ids(one, verb) for one in text] if batched else [self._text_ids(text, verb)]

    def _text_ids(self, text: Any, verb: str) -> list[int]:
        if isinstance(text, str):
            return self._need_tokenizer().encode(text)
        if isinstance(text, torch.Tensor) and text.ndim == 1 and not text.is_floating_point():
            return text.tolist()
        if isinstance(text, Sequence) and all(is_int(t) for t in text):
            return list(text)
        raise DiffGemmaError(f"{verb} takes a text, or token ids (a list of ints or a 1-D integer tensor), or a list")

    def _stop_strings(self, stop: str | Sequence[str] | StopStrings | None) -> StopStrings | None:
        if isinstance(stop, StopStrings):
            return stop
        if stop is None or (isinstance(stop, str | Sequence) and not stop):  # "" and [] stop nothing, as OpenAI's
            return None
        return StopStrings(stop, self._need_tokenizer().decode)  # (which names what is not a string)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise DiffGemmaError("this checkpoint has no tokenizer (tokenizer.json); text features need one")
        return self.tokenizer

    def load_adapter(self, folder: str | os.PathLike) -> None:
        """Apply a LoRA adapter (PEFT's layout, as `train chat --lora-rank` saves one) to this model: folded into
        float weights (as `lora-merge` folds it on disk: no cost a step), or run beside them: over weights loaded
        quantized, as it was trained in QLoRA (requantizing the sum would round it a second time), and where
        its encoder and decoder halves differ (PEFT's, trained on the reference model's two copies: one set of
        weights cannot hold both). Its generation settings (the EOS ids training added), if it carries them,
        become the model's."""
        from .train.lora import adapter_generation, has_encoder_adapters, load_adapter, merge_lora

        if self.adapter is not None:
            raise DiffGemmaError(f"this model has an adapter already ({self.adapter}): load the base again for another")
        if self._bank is not None:
            raise DiffGemmaError("this model keeps adapters to switch between (`add_adapter`): add this one too")
        load_adapter(self.network, folder)
        if self.quant is None and not has_encoder_adapters(self.network):
            merge_lora(self.network)
        self.network.requires_grad_(False)
        self.settings = adapter_generation(folder) or self.settings
        self.adapter = Path(folder)
        if self.prefix_cache is not None:  # (caches of the weights before)
            self.prefix_cache.clear()

    def add_adapter(self, name: str, folder: str | os.PathLike) -> None:
        """Keep a LoRA adapter (PEFT's layout) beside the base weights under `name`, for `use_adapter` to put in
        place: one base model, several fine-tunes of it, switched between without reloading (the server's
        `--lora-modules`). Nothing is folded in, so each adapted projection costs its update a pass; the base
        model stays in use. An adapter saved with sampler settings of its own (a generation_config.json beside
        it, as `train` saves one) has its generations denoise with its own (`sampler_defaults`); the EOS ids its
        training added (where a fine-tune's turns end: its replies are read by them too) join the model's."""
        from .train.lora import AdapterBank, adapter_generation

        if self.adapter is not None:
            raise DiffGemmaError(f"this model has an adapter applied ({self.adapter}): load the base model alone")
        bank = self._bank or AdapterBank(self.network)
        bank.add(name, folder)
        self._bank = bank  # (kept once an adapter is in it: a first that fails leaves `load_adapter` free)
        generation = adapter_generation(folder)
        if generation is not None:
            self._adapter_sampling[name] = {field: getattr(generation, field) for field in SAMPLER_FIELDS}
        eos = self.settings.eos_token_id
        added = [token for token in (generation.eos_token_id if generation else ()) if token not in eos]
        if added:
            self.settings = self.settings.replace(eos_token_id=[*eos, *added])

    def use_adapter(self, name: str | None) -> None:
        """Run what follows with the adapter kept as `name` (`add_adapter`), or the base model (None): the
        generations that name no adapter of their own (`generate(adapter=...)`), scoring and embedding. Never
        from another thread while a pass runs. The prefix cache keeps each one's snapshots apart."""
        if name is not None or self._bank is not None:
            self._adapter_bank(name).use(name)
        self._adapter_in_use = name

    def remove_adapter(self, name: str) -> None:
        """Drop the adapter kept as `name` (`add_adapter`); the base model is put in place if it was in use."""
        self._adapter_bank(name).remove(name)
        self._adapter_sampling.pop(name, None)
        if self._adapter_in_use == name:
            self._adapter_in_use = None

    def sampler_defaults(self, adapter: str | None = None) -> SamplerSettings:
        """The sampler settings a generation with `adapter` (`add_adapter`; None: the base model) starts from: the
        model's, with the adapter's own denoising settings over them where it was saved with some (steps,
        temperatures, bounds, cuts: `SAMPLER_FIELDS`); the token limit, EOS and padding ids stay the model's."""
        own = self._adapter_sampling.get(adapter) if adapter is not None else None
        return self.settings if own is None else replace(self.settings, **own)

    def _adapter_back_in_place(self) -> None:
        """`use_adapter`'s adapter in place again (a generation that named its own leaves that one)."""
        if self._bank is not None:
            self._bank.use(self._adapter_in_use)

    def _adapter_names(self, adapter: str | Sequence[str | None] | None, rows: int) -> list[str | None]:
        """Each row's adapter: `adapter` for every row, or one a row (None: `use_adapter`'s)."""
        if adapter is None:
            adapter = self._adapter_in_use
        if adapter is None or isinstance(adapter, str):
            names = [adapter] * rows
        elif isinstance(adapter, Sequence) and all(name is None or isinstance(name, str) for name in adapter):
            names = list(adapter)
        else:
            raise DiffGemmaError(f"adapter: a name, or a list of names (None: the base model), got {adapter!r:.60}")
        if len(names) != rows:
            raise DiffGemmaError(f"adapter: give one a row ({rows}), got {len(names)}")
        return names

    def _row_adapters(self, names: list[str | None]) -> RowAdapters | None:
        """What puts a generation's adapters (one a row) in place before its passes; None where no adapters are
        kept."""
        if not any(names) and self._bank is None:
            return None  # (the base model everywhere, and nothing else in place to put aside)
        return self._adapter_bank(next((name for name in names if name), None)).for_rows(names)

    def _adapter_bank(self, name: str | None) -> AdapterBank:
        if self._bank is None:
            raise DiffGemmaError(f"no adapter named {name!r} (none added: `add_adapter`)")
        return self._bank

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the adapters kept to switch between (`add_adapter`), in the order they came."""
        return tuple(self._bank.adapters) if self._bank is not None else ()

    def save(self, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
        """Write this model (and its tokenizer files) as a checkpoint `transformers` loads too; atomic."""
        from .train.lora import has_lora

        if has_lora(self.network):
            raise DiffGemmaError(
                "this network carries LoRA adapters: save them with train.lora.save_adapter, "
                "or fold them in with merge_lora (`diffgemma lora-merge`) before saving a full checkpoint"
            )
        extra = tokenizer_files(self.folder) if self.folder is not None else {}
        kwargs: dict[str, Any] = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        if self.quant is not None:  # self-describing: the format rides in config.json
            raw = {**self.config.raw, "quantization_config": self.quant.config()}
            kwargs["config"] = replace(self.config, raw=raw)
        return save_checkpoint(self.network, self.settings, folder, extra, self._passthrough, **kwargs)


def _ended_by(
    stops: StopStrings, end_rows: Callable[[list[list[int]]], Sequence[bool]] | None
) -> Callable[[list[list[int]]], list[bool]]:
    """Rows that a stop string ends, or that `end_rows` names."""

    def ended(rows: list[list[int]]) -> list[bool]:
        named = end_rows(rows) if end_rows is not None else [False] * len(rows)
        return [bool(name) or stops.ends(row) for row, name in zip(rows, named, strict=True)]

    return ended


def _for_every_row(values: torch.Tensor | None, batch: int, expected: str) -> torch.Tensor | None:
    """A per-position [L, V] tensor given once for every row, as [B, L, V]; [B, L, V] and None pass through."""
    if values is None:
        return None
    if not isinstance(values, torch.Tensor):
        raise DiffGemmaError(f"{expected}, [L, V] or [B, L, V]")
    return values[None].expand(batch, -1, -1) if values.ndim == 2 else values


def _ranges_for_rows(ranges: torch.Tensor | list | None, batch: int, name: str) -> torch.Tensor | None:
    """(low, high) id pairs, one a position, given once for every row ([L, 2]) or per row, as [B, L, 2]."""
    if ranges is None:
        return None
    if not isinstance(ranges, torch.Tensor):
        try:
            ranges = torch.tensor(ranges)
        except (TypeError, ValueError, RuntimeError) as error:
            raise DiffGemmaError(f"{name} must be (low, high) id pairs, one a position: {error}") from None
    if ranges.dtype.is_floating_point or ranges.dtype.is_complex or ranges.dtype == torch.bool:
        raise DiffGemmaError(f"{name} must be (low, high) id pairs of whole numbers, got {ranges.dtype}")
    return _for_every_row(ranges.long(), batch, name)


def _network_that_fits(
    where: str, config: ModelConfig, dtype: torch.dtype, quant: str | QuantFormat | None, device: torch.device
) -> tuple[DiffusionGemma, QuantFormat | None, QuantFormat | None]:
    """The network `load` builds (on the meta device), once its weights are known to fit on `device` (refused
    with what would fit otherwise); with the format it is quantized to and the one it was saved in, if any."""
    saved = format_from_config(config.raw)
    if quant is not None and not isinstance(quant, str | QuantFormat):
        raise DiffGemmaError(f"quant must be one of {', '.join(QUANT_FORMATS)} (or a QuantFormat), got {quant!r}")
    wanted = QuantFormat(quant) if isinstance(quant, str) else quant
    # a bare name ("int4") asks for the format, not its groups: the checkpoint's own groups serve
    if saved is not None and wanted is not None and wanted != saved and quant != saved.name:
        raise DiffGemmaError(
            f"{where}: the checkpoint is already quantized ({saved.describe()}); "
            f"cannot load it as {wanted.describe()}: quantize the float checkpoint instead"
        )
    fmt = saved or wanted
    network = meta_network(config, dtype, fmt)
    quant_name = None if fmt is None else fmt.name
    hint = functools.partial(_lighter_load, config, dtype, quant_name, requantize=saved is None)
    check_memory(held_bytes(network), device, f"{where}: its weights in {load_label(dtype, quant_name)}", hint)
    return network, fmt, saved


def load_label(dtype: torch.dtype, quant: str | None) -> str:
    """How weights loaded in `dtype` (and `quant`) are told: \"int4 (the rest in bfloat16)\"."""
    name = str(dtype).removeprefix("torch.")
    return name if quant is None else f"{quant} (the rest in {name})"


def _lighter_load(config: ModelConfig, dtype: torch.dtype, quant: str | None, free: int, requantize: bool) -> str:
    """What else `load` could be asked for that fits in `free` bytes (the largest such: the least rounding), or
    the smallest there is: bf16 in place of float32, int8 or int4 weights (a checkpoint saved quantized keeps
    its format)."""
    current = (dtype, quant)
    dtypes = dict.fromkeys([dtype, torch.bfloat16] if dtype == torch.float32 else [dtype])
    quants = dict.fromkeys([quant, *(("int8", "int4") if requantize else ())])
    sizes = {
        (option_dtype, option_quant): weight_bytes(config, option_dtype, option_quant and QuantFormat(option_quant))[0]
        for option_dtype in dtypes
        for option_quant in quants
        if (option_dtype, option_quant) != current
    }
    if not sizes:
        return ""
    fitting = [option for option, size in sizes.items() if size <= free]
    if not fitting:
        smallest = min(sizes, key=sizes.__getitem__)
        return f"; even the smallest load, {load_label(*smallest)}, needs {size_text(sizes[smallest])}"
    best_dtype, best_quant = best = max(fitting, key=sizes.__getitem__)
    flags = [f"--quant {best_quant}"] if best_quant != quant else []
    flags += [f"--dtype {load_label(best_dtype, None)}"] if best_dtype != dtype else []
    size = size_text(sizes[best])
    return f"; {load_label(*best)} would fit, in {size} ({' '.join(flags)}; `load` takes the same names)"


def _unfenced(answer: str) -> str:
    """An answer without the markdown code fence wrapped around it, if one is (```lang ... ```)."""
    stripped = answer.strip()
    if stripped.startswith("```") and stripped.endswith("```") and "\n" in stripped:
        body = stripped[stripped.index("\n") + 1 : -3]
        return body[:-1] if body.endswith("\n") else body
    return answer


def _prefix_cache(tokenizer: Tokenizer | None) -> PrefixCache:
    """A prefix cache that knows the tokenizer's turn opening and what a system (or developer) turn writes after
    it, so that a system turn many conversations open with is kept shared."""
    if tokenizer is None:
        return PrefixCache()
    turn_open = tokenizer.token_id(TURN_OPEN)
    heads = []
    for role in SYSTEM_ROLES:
        ids = tokenizer.encode(f"{TURN_OPEN}{role}", add_special_tokens=False)
        if ids[:1] == [turn_open] and len(ids) > 1:
            heads.append(tuple(ids[1:]))
    return PrefixCache(turn_open, system_heads=tuple(heads))


def _clamp_ids(clamp: Sequence) -> torch.Tensor:
    """A clamp given as ids (None or -1: free), one list for every row or a list per row (shorter ones free at
    their end), as a [B, L] tensor."""
    rows = clamp if isinstance(clamp, Sequence) and clamp and isinstance(clamp[0], list | tuple) else [clamp]
    if not all(isinstance(row, Sequence) and all(t is None or is_int(t) for t in row) for row in rows):
        raise DiffGemmaError("clamp must be token ids (None or -1: free): a list, or a list for each row")
    width = max(len(row) for row in rows)
    padded = [[-1 if t is None else t for t in row] + [-1] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.long)


def load(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = AUTO_DTYPE,
    quant: str | QuantFormat | None = None,
    compile: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DiffGemma:
    """Load a DiffusionGemma checkpoint folder (the `google/diffusiongemma-26B-A4B-it` layout).

    Weights go straight to `device` in `dtype`: the model is built without memory, then each tensor is read
    from disk into its final place. "auto" (`auto_dtype`) keeps a float32 checkpoint in float32 and runs a bf16
    one in bf16 where the device multiplies bf16 in hardware (GPUs, recent CPUs), else in float32; "stored"
    takes the dtype the checkpoint's weights are stored in (`stored_float_dtype`). `quant`
    ("int8", "int4", "fp8") quantizes the projections and experts tensor by tensor while loading; a checkpoint
    written quantized loads in its own format. `compile` runs the decoder's layers through torch.compile: the
    first generation compiles (tens of seconds), then each step launches far fewer kernels (on an H100, 26B
    shape, with the CUDA graph: 34 ms a step in bf16 against 41, bench/RESULTS.md). Weights the device has no
    room for are refused before any is read (a Hub id's, before they download), with what would fit
    (`resources.check_memory`). `progress` is told (bytes read, bytes in all) as the weights come in (the 26B
    model's 50 GB take minutes; quantizing them as they come, longer).
    """
    device = resolve_device(device)
    if on_hub(path):
        # its two config files first (kilobytes): a model this device cannot hold is refused before 50 GB come down
        config, _ = load_configs(resolve_folder(path, CONFIG_FILES))
        _network_that_fits(
            str(path), config, _chosen_dtype(dtype, device, lambda: declared_dtype(config.raw)), quant, device
        )
    folder = resolve_folder(path)
    config, settings = load_configs(folder)
    tokenizer = load_tokenizer(folder)
    network, fmt, saved = _network_that_fits(str(folder), config, load_dtype(dtype, device, folder), quant, device)
    network = network.to_empty(device=device)
    sinks = float_sinks(network) if fmt is not None and saved is None else None
    passthrough = load_weights(network, folder, sinks, progress)
    network.eval()
    network.requires_grad_(False)
    if compile:
        if device.type != "cuda" and network.dtype != torch.bfloat16:
            # (the compiled grouped matmul of the experts takes bf16; CUDA casts to it, other devices do not)
            raise DiffGemmaError(f"compile=True needs dtype bfloat16 on {device.type} (got {network.dtype})")
        network.compile_decoder()
    return DiffGemma(network, tokenizer, settings, folder, passthrough, fmt)
