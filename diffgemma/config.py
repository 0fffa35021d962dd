"""Model shape and sampler defaults, read from a checkpoint's `config.json` and `generation_config.json`.

The derived values (layer pattern, per-layer head shapes, RoPE tables) follow the reference
`DiffusionGemmaTextConfig.__post_init__` exactly, so the same file means the same network.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DiffGemmaError

GENERATION_FILE = "generation_config.json"  # sampler defaults, beside a checkpoint's config.json

MODEL_TYPE = "diffusion_gemma"
SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
SLIDING_PATTERN = 6  # reference default when `layer_types` is absent: five sliding layers, then one full
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")
ROPE_TYPES = ("default", "proportional")
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
DEFAULT_GLOBAL_HEAD_DIM = 512
SYSTEM_SNAPSHOTS = 1  # shared system turns a prefix cache (`cache.PrefixCache`) keeps, by default
QUANT_FORMATS = ("int8", "int4", "fp8")  # weight formats a checkpoint is stored or loaded in (`quant.QuantFormat`)

# Keys without a safe default: a config.json without them describes no particular network.
REQUIRED_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)


@dataclass(frozen=True)
class AttentionShape:
    """What differs between layers: attention kind, head size, KV heads and the RoPE table."""

    layer_type: str
    head_dim: int
    num_kv_heads: int
    rope_type: str
    rope_theta: float
    partial_rotary_factor: float
    rope_factor: float

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING

    @property
    def shares_kv(self) -> bool:
        """Full-attention layers have no v_proj: the key projection serves as the value (K=V)."""
        return not self.is_sliding


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape (`vision_config`; unset keys take the reference's defaults) and the ids that mark
    an image in a prompt: `boi` and `eoi` around one `image` id per soft token."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    use_clipped_linears: bool = False
    standardize: bool = False
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882


VISION_INT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "patch_size",
    "pooling_kernel_size",
    "position_embedding_size",
)
IMAGE_ID_KEYS = ("image_token_id", "boi_token_id", "eoi_token_id")


def parse_vision_config(raw: dict[str, Any], source: str) -> VisionConfig | None:
    """`vision_config` (None where the checkpoint has none), checked, with the image ids of the top level."""
    vision = raw.get("vision_config")
    if vision is None:
        return None
    where = f"{source}: vision_config"
    if not isinstance(vision, dict):
        raise DiffGemmaError(f"{where} must be an object")
    values: dict[str, Any] = {}
    for key in VISION_INT_KEYS:
        if vision.get(key) is not None:
            values[key] = vision[key]
            if not is_int(values[key]) or values[key] <= 0:
                raise DiffGemmaError(f"{where}: `{key}` must be a positive integer, got {values[key]!r}")
    for key in IMAGE_ID_KEYS:
        if raw.get(key) is not None:
            values[key] = raw[key]
            if not is_int(values[key]) or values[key] < 0:
                raise DiffGemmaError(f"{source}: `{key}` must be a token id, got {values[key]!r}")
    config = VisionConfig(**values)
    activation = vision.get("hidden_activation", config.hidden_activation)
    if activation not in ACTIVATIONS:
        raise DiffGemmaError(f"{where}: `hidden_activation` is {activation!r}; supported: {ACTIVATIONS}")
    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
        raise DiffGemmaError(f"{where}: `rope_parameters` must be axial RoPE ({{'rope_type': 'axial', ...}})")
    theta = rope.get("rope_theta", config.rope_theta)
    eps = vision.get("rms_norm_eps", config.rms_norm_eps)
    for key, value in (("rope_parameters.rope_theta", theta), ("rms_norm_eps", eps)):
        if not is_number(value) or value <= 0:
            raise DiffGemmaError(f"{where}: `{key}` must be a positive number, got {value!r}")
    config = dataclasses.replace(
        config,
        hidden_activation=activation,
        rope_theta=float(theta),
        rms_norm_eps=float(eps),
        use_clipped_linears=bool(vision.get("use_clipped_linears", False)),
        standardize=bool(vision.get("standardize", False)),
    )
    if config.head_dim % 4:
        raise DiffGemmaError(f"{where}: `head_dim` {config.head_dim} must be a multiple of 4 (2-D RoPE rotates pairs)")
    if config.num_attention_heads % config.num_key_value_heads:
        raise DiffGemmaError(
            f"{where}: num_attention_heads {config.num_attention_heads} is not a multiple of "
            f"its {config.num_key_value_heads} KV heads"
        )
    return config


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    layer_types: tuple[str, ...]
    layers: tuple[AttentionShape, ...]
    sliding_window: int
    canvas_length: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    attention_bias: bool = False
    max_position_embeddings: int = 131_072
    pad_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (1,)
    bos_token_id: int | None = 2
    use_bidirectional_attention: str | None = None
    vision: VisionConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) text parameters, counting the tied embedding once."""
        h = self.hidden_size
        total = active = self.vocab_size * h + h  # embeddings (tied head) and final norm
        sc = 3 * h * self.intermediate_size + h
        total += sc
        active += sc
        for shape in self.layers:
            q = self.num_attention_heads * shape.head_dim
            kv = shape.num_kv_heads * shape.head_dim
            attn = h * q + h * kv * (1 if shape.shares_kv else 2) + q * h + 2 * shape.head_dim
            dense = 3 * h * self.intermediate_size
            router = h * self.num_experts + h + self.num_experts
            expert = 3 * h * self.moe_intermediate_size
            norms = 7 * h
            total += attn + dense + router + norms + self.num_experts * expert
            active += attn + dense + router + norms + self.top_k_experts * expert
        return total, active

    def cache_bytes(self, context: int, batch: int, bytes_per_value: int) -> int:
        """The encoder cache diffgemma allocates for `context` tokens: keys and values on every layer (full
        layers hold the whole context, sliding layers a window's worth), each with a canvas of spare slots."""
        return sum(
            _slots_bytes(
                shape,
                (self.sliding_window - 1 if shape.is_sliding else context) + self.canvas_length,
                batch,
                bytes_per_value,
            )
            for shape in self.layers
        )

    def prefix_cache_bytes(
        self, context: int, batch: int, bytes_per_value: int, entries: int = 1, shared: int = SYSTEM_SNAPSHOTS
    ) -> int:
        """What a prefix cache of `entries` snapshots and `shared` system turns' (`cache.PrefixCache`) holds
        beside a generation's own cache: each snapshot's copy of the sliding layers' windows and its cache, but
        for the one a batch-of-one generation is using as its own; each shared one's cache (a system turn of at
        most the context)."""
        windows = sum(
            _slots_bytes(shape, self.sliding_window - 1, 1, bytes_per_value)
            for shape in self.layers
            if shape.is_sliding
        )
        caches = (entries - 1 if batch == 1 else entries) + shared
        return entries * windows + caches * self.cache_bytes(context, 1, bytes_per_value)

    def sampler_bytes(self, batch: int) -> int:
        """The fast sampler's two float32 vocabulary-sized buffers (logits and distribution) per canvas."""
        return 2 * batch * self.canvas_length * self.vocab_size * 4


def _slots_bytes(shape: AttentionShape, slots: int, batch: int, bytes_per_value: int) -> int:
    """One layer's cache slots: keys and values, positions (int64) and validity (bool, a row each)."""
    return 2 * batch * shape.num_kv_heads * shape.head_dim * slots * bytes_per_value + slots * 8 + batch * slots


MAX_DENOISING_STEPS = 1_000_000


# The settings of how a canvas is denoised, which each row of a batch may have of its own (an open batch's rows, an
# adapter's defaults); the token limit, EOS and padding ids are a generation's.
SAMPLER_FIELDS = (
    "max_denoising_steps",
    "entropy_bound",
    "t_max",
    "t_min",
    "stability_threshold",
    "confidence_threshold",
    "top_k",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
NEUTRAL_PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}  # (their "off")


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler defaults: a checkpoint's generation_config.json, then the reference's global defaults."""

    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_max: float = 0.8
    t_min: float = 0.4
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_new_tokens: int = 256
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Truncation a caller may ask for (`sampling.truncate`); the reference's generation_config.json has no place
    # for them, so checkpoints neither read nor write them. 0 / 1.0 / 0.0: off.
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    # Penalties for what is written already (`sampling.penalize`), as OpenAI's and vLLM's; checkpoints neither
    # read nor write them either.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def pad_id(self) -> int:
        """The id generation pads with: the checkpoint's, or 0 where it names none."""
        return self.pad_token_id if self.pad_token_id is not None else 0

    def replace(self, **overrides: Any) -> SamplerSettings:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            hint = " (the temperature is a schedule: t_max on a canvas's first step, falling to t_min)"
            hint = hint if "temperature" in unknown else ""
            raise DiffGemmaError(f"unknown sampler setting(s): {', '.join(sorted(unknown))}{hint}")
        if "eos_token_id" in overrides:
            overrides["eos_token_id"] = _as_id_tuple(overrides["eos_token_id"], "eos_token_id", "call")
        settings = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        settings.validate("call arguments")
        return settings

    def validate(self, source: str, names: Mapping[str, str] | None = None) -> None:
        """Each setting in its range, else DiffGemmaError naming `source` (none: "") and the setting (as `names`
        spells it: a command's options, say)."""

        def name(key: str) -> str:
            return (names or {}).get(key, f"`{key}`")

        def fail(key: str, expected: str) -> None:
            where = f"{source}: " if source else ""
            raise DiffGemmaError(f"{where}{name(key)} must be {expected}, got {getattr(self, key)!r}")

        # (a bound far past any use, where the schedule's step counts, int32 as the reference's, still hold)
        if not is_int(self.max_denoising_steps) or not 0 < self.max_denoising_steps <= MAX_DENOISING_STEPS:
            fail("max_denoising_steps", f"a positive integer up to {MAX_DENOISING_STEPS:,}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            fail("max_new_tokens", "a positive integer")
        if not is_number(self.entropy_bound) or self.entropy_bound <= 0:
            fail("entropy_bound", "a number > 0")
        if not is_number(self.t_min) or self.t_min < 0:
            fail("t_min", "a number >= 0")
        if not is_number(self.t_max) or self.t_max <= self.t_min:
            fail("t_max", f"a number > {name('t_min')} ({self.t_min})")
        if not is_int(self.stability_threshold) or not 0 <= self.stability_threshold <= MAX_DENOISING_STEPS:
            fail("stability_threshold", f"an integer from 0 to {MAX_DENOISING_STEPS:,} (the steps it looks back)")
        if not is_number(self.confidence_threshold) or self.confidence_threshold <= 0:
            fail("confidence_threshold", "a number > 0")
        if self.pad_token_id is not None and not is_int(self.pad_token_id):
            fail("pad_token_id", "an integer or null")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0: off)")
        if not is_number(self.top_p) or not 0 <= self.top_p <= 1:
            fail("top_p", "a number from 0 to 1 (1: off; 0: the likeliest token alone)")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "a number from 0 to 1 (0: off)")
        for key in ("presence_penalty", "frequency_penalty"):
            if not is_number(getattr(self, key)) or not -2 <= getattr(self, key) <= 2:
                fail(key, "a number from -2 to 2 (0: off)")
        if not is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            fail("repetition_penalty", "a number over 0, up to 10 (1: off)")

    @property
    def penalized(self) -> bool:
        """Whether any penalty for what is written already is on."""
        return any(getattr(self, key) != off for key, off in NEUTRAL_PENALTIES.items())


def is_int(value: Any) -> bool:
    """An integer, not a bool (JSON's `true` reads as one in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite integer or float, not a bool."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _as_id_tuple(value: Any, key: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list | tuple) else [value]
    if not all(is_int(v) and v >= 0 for v in values):
        raise DiffGemmaError(f"{source}: `{key}` must be a token id or a list of token ids, got {value!r}")
    return tuple(values)


def as_path(path: str | os.PathLike, what: str) -> Path:
    """A path a caller gave (`what` it names, for the error), `~` expanded."""
    if not isinstance(path, str | os.PathLike):
        raise DiffGemmaError(f"{what} is a path (a string or os.PathLike), got {type(path).__name__}")
    return Path(path).expanduser()


def read_text(path: str | Path, newline: str | None = None) -> str:
    """A UTF-8 text file's contents (a pipe's too: `--file <(...)`, /dev/stdin), without the byte-order mark some
    Windows tools begin a file with; a missing, unreadable or undecodable file is an error that names it.
    `newline` as `open` takes it ("": line endings kept as they are; by default each becomes a newline)."""
    file = Path(path)
    if not file.exists():
        raise DiffGemmaError(f"{file}: file not found")
    try:
        with open(file, encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        if err.object[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # (what Windows PowerShell 5 writes)
            raise DiffGemmaError(f"{file}: UTF-16 text; save it as UTF-8") from None
        raise DiffGemmaError(f"{file}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise DiffGemmaError(f"{file}: cannot read it ({err.strerror})") from None


def read_json_value(path: str | Path) -> Any:
    """A JSON file's value; a file that is not JSON is an error that names it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DiffGemmaError(f"{path}: not valid JSON ({err})") from None


def read_json(path: Path) -> dict[str, Any]:
    data = read_json_value(path)
    if not isinstance(data, dict):
        raise DiffGemmaError(f"{path}: expected a JSON object at the top level")
    return data


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """A JSONL file's records, each with where it is ("FILE:LINE", for the caller's errors); blank lines skipped,
    a line that is not JSON an error that names it."""
    file = Path(path)
    for number, line in enumerate(read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffGemmaError(f"{file}:{number}: not valid JSON ({err.msg})") from None
        yield f"{file}:{number}", record


def _layer_types(text: dict[str, Any], num_layers: int, where: str) -> tuple[str, ...]:
    layer_types = text.get("layer_types")
    if layer_types is None:
        layer_types = [SLIDING if (i + 1) % SLIDING_PATTERN else FULL for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise DiffGemmaError(f"{where}: `layer_types` must be a list of {num_layers} entries (num_hidden_layers)")
    for kind in layer_types:
        if kind not in LAYER_TYPES:
            raise DiffGemmaError(f"{where}: `layer_types` has {kind!r}; expected one of {LAYER_TYPES}")
    # The reference forces the last layer to full attention.
    return (*layer_types[:-1], FULL)


def _full_layer_overrides(text: dict[str, Any], layer_types: tuple[str, ...], where: str) -> dict[int, dict]:
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        overrides: dict[str, Any] = {"head_dim": text.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)}
        if text.get("num_global_key_value_heads") is not None:
            overrides["num_key_value_heads"] = text["num_global_key_value_heads"]
        return {i: overrides for i, kind in enumerate(layer_types) if kind == FULL}
    if not isinstance(per_layer, dict):
        raise DiffGemmaError(f"{where}: `per_layer_config` must be an object keyed by layer index")
    result: dict[int, dict] = {}
    for key, value in per_layer.items():
        try:
            index = int(key)
        except ValueError:
            raise DiffGemmaError(f"{where}: `per_layer_config` key {key!r} is not a layer index") from None
        if not 0 <= index < len(layer_types) or not isinstance(value, dict):
            raise DiffGemmaError(f"{where}: `per_layer_config.{key}` is not a valid layer entry")
        unknown = set(value) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise DiffGemmaError(f"{where}: `per_layer_config.{key}` has unsupported keys {sorted(unknown)}")
        result[index] = value
    return result


def _rope(text: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    rope = text.get("rope_parameters") or DEFAULT_ROPE
    if not isinstance(rope, dict):
        raise DiffGemmaError(f"{where}: `rope_parameters` must be an object keyed by layer type")
    for kind in LAYER_TYPES:
        params = rope.get(kind)
        if not isinstance(params, dict):
            raise DiffGemmaError(f"{where}: `rope_parameters.{kind}` is missing")
        if params.get("rope_type", "default") not in ROPE_TYPES:
            raise DiffGemmaError(
                f"{where}: `rope_parameters.{kind}.rope_type` is {params.get('rope_type')!r}; supported: {ROPE_TYPES}"
            )
        if not is_number(params.get("rope_theta")) or params["rope_theta"] <= 0:
            raise DiffGemmaError(f"{where}: `rope_parameters.{kind}.rope_theta` must be a positive number")
        factor = params.get("partial_rotary_factor", 1.0)
        if not is_number(factor) or not 0 <= factor <= 1:
            raise DiffGemmaError(
                f"{where}: `rope_parameters.{kind}.partial_rotary_factor` must be a number from 0 to 1, got {factor!r}"
            )
        if params.get("rope_type", "default") == "default" and factor != 1:
            # (the reference's default RoPE turns fewer angles than the head holds, and its pass then fails)
            raise DiffGemmaError(
                f"{where}: `rope_parameters.{kind}` turns part of the head ({factor}) with `rope_type` default, "
                "which turns all of it; a part is 'proportional' RoPE's"
            )
    return rope


def parse_model_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Validate a `config.json` dict and derive the per-layer shapes the reference derives."""
    if raw.get("model_type") != MODEL_TYPE:
        raise DiffGemmaError(f"{source}: `model_type` is {raw.get('model_type')!r}; expected {MODEL_TYPE!r}")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise DiffGemmaError(f"{source}: `text_config` is missing or not an object")
    where = f"{source}: text_config"
    for key in REQUIRED_TEXT_KEYS:
        if key not in text or text[key] is None:
            raise DiffGemmaError(f"{where}: required key `{key}` is missing")
        if not is_int(text[key]) or text[key] <= 0:
            raise DiffGemmaError(f"{where}: `{key}` must be a positive integer, got {text[key]!r}")
    if raw.get("tie_word_embeddings", True) is False or text.get("tie_word_embeddings", True) is False:
        raise DiffGemmaError(
            f"{source}: `tie_word_embeddings` is false; diffgemma runs the tied layout only "
            "(one set of weights for encoder, decoder and head)"
        )
    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision", "all"):
        raise DiffGemmaError(f"{where}: `use_bidirectional_attention` must be null, 'vision' or 'all'")
    if bidirectional == "all":
        raise DiffGemmaError(f"{where}: `use_bidirectional_attention: all` (a non-causal encoder) is not supported")
    activation = text.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ACTIVATIONS:
        raise DiffGemmaError(f"{where}: `hidden_activation` is {activation!r}; supported: {ACTIVATIONS}")

    num_layers = text["num_hidden_layers"]
    layer_types = _layer_types(text, num_layers, where)
    overrides = _full_layer_overrides(text, layer_types, where)
    rope = _rope(text, where)
    heads = text["num_attention_heads"]
    layers = []
    for index, kind in enumerate(layer_types):
        override = overrides.get(index, {})
        head_dim = override.get("head_dim", text["head_dim"])
        kv_heads = override.get("num_key_value_heads", text["num_key_value_heads"])
        for key, value in (("head_dim", head_dim), ("num_key_value_heads", kv_heads)):
            if not is_int(value) or value <= 0:
                raise DiffGemmaError(f"{where}: layer {index} `{key}` must be a positive integer, got {value!r}")
        if head_dim % 2:
            raise DiffGemmaError(f"{where}: layer {index} head_dim {head_dim} must be even (RoPE rotates pairs)")
        if heads % kv_heads:
            raise DiffGemmaError(
                f"{where}: layer {index}: num_attention_heads {heads} is not a multiple of its {kv_heads} KV heads"
            )
        params = rope[kind]
        layers.append(
            AttentionShape(
                layer_type=kind,
                head_dim=head_dim,
                num_kv_heads=kv_heads,
                rope_type=params.get("rope_type", "default"),
                rope_theta=float(params["rope_theta"]),
                partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                rope_factor=float(params.get("factor", 1.0)),
            )
        )

    if text["top_k_experts"] > text["num_experts"]:
        raise DiffGemmaError(
            f"{where}: `top_k_experts` ({text['top_k_experts']}) exceeds `num_experts` ({text['num_experts']})"
        )
    sliding_window = text.get("sliding_window", 512)
    if not is_int(sliding_window) or sliding_window < 2:
        raise DiffGemmaError(f"{where}: `sliding_window` must be an integer >= 2, got {sliding_window!r}")
    canvas_length = raw.get("canvas_length", 256)
    if not is_int(canvas_length) or canvas_length <= 0:
        raise DiffGemmaError(f"{source}: `canvas_length` must be a positive integer, got {canvas_length!r}")
    softcap = text.get("final_logit_softcapping", 30.0)
    if not is_number(softcap) or softcap <= 0:
        raise DiffGemmaError(f"{where}: `final_logit_softcapping` must be a positive number, got {softcap!r}")
    positions = text.get("max_position_embeddings", 131_072)
    if not is_int(positions) or positions < canvas_length:
        raise DiffGemmaError(
            f"{where}: `max_position_embeddings` must be an integer >= canvas_length, got {positions!r:.40}"
        )
    eps = text.get("rms_norm_eps", 1e-6)
    if not is_number(eps) or eps <= 0:
        raise DiffGemmaError(f"{where}: `rms_norm_eps` must be a positive number, got {eps!r}")

    return ModelConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"],
        num_experts=text["num_experts"],
        top_k_experts=text["top_k_experts"],
        moe_intermediate_size=text["moe_intermediate_size"],
        layer_types=layer_types,
        layers=tuple(layers),
        sliding_window=sliding_window,
        canvas_length=canvas_length,
        hidden_activation=activation,
        rms_norm_eps=float(eps),
        final_logit_softcapping=float(softcap),
        attention_bias=bool(text.get("attention_bias", False)),
        max_position_embeddings=positions,
        pad_token_id=text.get("pad_token_id", 0),
        eos_token_id=_as_id_tuple(text.get("eos_token_id", 1), "eos_token_id", where),
        bos_token_id=text.get("bos_token_id", 2),
        use_bidirectional_attention=bidirectional,
        vision=parse_vision_config(raw, source),
        raw=raw,
    )


def parse_sampler_settings(raw: dict[str, Any], source: str = GENERATION_FILE) -> SamplerSettings:
    """Read the sampler defaults a checkpoint ships; unset values take the reference's global defaults."""
    values: dict[str, Any] = {}
    for key in (
        "max_denoising_steps",
        "t_min",
        "t_max",
        "stability_threshold",
        "confidence_threshold",
        "max_new_tokens",
        "pad_token_id",
    ):
        if raw.get(key) is not None:
            values[key] = raw[key]
    sampler = raw.get("sampler_config")
    if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
        values["entropy_bound"] = sampler["entropy_bound"]
    elif sampler is not None and not isinstance(sampler, dict):
        raise DiffGemmaError(f"{source}: `sampler_config` must be an object with `entropy_bound`")
    values["eos_token_id"] = _as_id_tuple(raw.get("eos_token_id"), "eos_token_id", source)
    settings = SamplerSettings(**values)
    settings.validate(source)
    return settings


def load_configs(folder: Path) -> tuple[ModelConfig, SamplerSettings]:
    """Read `config.json` (required) and `generation_config.json` (optional) from a checkpoint folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DiffGemmaError(f"{folder}: no config.json (is this a DiffusionGemma checkpoint folder?)")
    config = parse_model_config(read_json(config_path), str(config_path))
    generation_path = folder / GENERATION_FILE
    generation_raw = read_json(generation_path) if generation_path.is_file() else {}
    settings = parse_sampler_settings(generation_raw, str(generation_path))
    # A checkpoint that names no EOS/pad for generation still has them in its model config.
    if not settings.eos_token_id:
        settings = dataclasses.replace(settings, eos_token_id=config.eos_token_id)
    if settings.pad_token_id is None:
        settings = dataclasses.replace(settings, pad_token_id=config.pad_token_id)
    return config, settings
