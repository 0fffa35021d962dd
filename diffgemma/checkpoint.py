"""Safetensors checkpoints in the reference layout: read straight into the model, written atomically.

Reading parses each file's header itself and reads every tensor's bytes directly into the parameter that
will hold it (or through one tensor-sized buffer when the dtype or device differs), so loading never keeps
a second copy of the model in host memory, and a truncated or inconsistent file is caught before any read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import GENERATION_FILE, ModelConfig, SamplerSettings, as_path, is_int, read_json
from .errors import DiffGemmaError
from .model import DiffusionGemma
from .resources import check_disk, usual_permissions, writing

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
DEFAULT_SHARD_BYTES = 5 * 1024**3

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Derived:
    """A tensor to write that is made as its shard is written (from stored ones: an adapter folded in, a weight
    quantized, a dtype changed), so a checkpoint can be rewritten a shard at a time, never whole in memory."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]  # the tensor written (cast to `dtype`)


Written = torch.Tensor | StoredTensor | Derived


def stored_as(stored: StoredTensor, dtype: torch.dtype) -> StoredTensor | Derived:
    """A stored tensor to write in `dtype`: its bytes as they are, or read and cast as its shard is written."""
    if stored.dtype == dtype:
        return stored
    return Derived(stored.shape, dtype, lambda: read_tensor(stored))


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise DiffGemmaError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise DiffGemmaError(f"{path}: truncated safetensors file (header runs past the end)")
            raw = f.read(header_len)
    except OSError as err:
        raise DiffGemmaError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DiffGemmaError(f"{path}: not a safetensors file (unreadable header)") from None
    base = 8 + header_len
    tensors = {}
    if not isinstance(header, dict):
        raise DiffGemmaError(f"{path}: not a safetensors file (its header is not an object)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not _header_entry(entry):
            raise DiffGemmaError(
                f"{path}: tensor `{name}`'s header entry is not {{dtype, shape: [sizes], data_offsets: [start, end]}}"
            )
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise DiffGemmaError(f"{path}: tensor `{name}` has unsupported dtype {entry.get('dtype')!r}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * dtype.itemsize:
            raise DiffGemmaError(f"{path}: tensor `{name}` byte range does not match its shape {list(shape)}")
        if base + end > size:
            raise DiffGemmaError(
                f"{path}: truncated safetensors file: tensor `{name}` needs bytes up to {base + end}, "
                f"the file has {size}"
            )
        tensors[name] = StoredTensor(path, name, dtype, shape, base + start, base + end)
    return tensors


def _header_entry(entry: Any) -> bool:
    """Whether a safetensors header entry has the fields a tensor is read by, of their kinds."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    sizes = isinstance(shape, list) and all(is_int(size) and size >= 0 for size in shape)
    span = isinstance(offsets, list) and len(offsets) == 2 and all(is_int(at) and at >= 0 for at in offsets)
    return sizes and span and offsets[0] <= offsets[1]


def stored_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint folder, single-file or sharded through the index."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise DiffGemmaError(f"{index_path}: not a valid safetensors index (no `weight_map` of shard names)")
        tensors: dict[str, StoredTensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise DiffGemmaError(f"{index_path}: names shard {shard!r}, which is missing from {folder}")
            tensors.update(read_header(shard_path))
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].path.name != shard:
                raise DiffGemmaError(f"{index_path}: tensor `{name}` is not in shard {shard!r}")
        return tensors
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise DiffGemmaError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    return read_header(single)


def stored_float_dtype(folder: Path) -> torch.dtype:
    """The dtype holding most of a checkpoint's floating-point weights (float32, bf16 or float16; a quantized
    checkpoint's int and fp8 codes aside): what its weights were saved in."""
    counts: dict[torch.dtype, int] = {}
    for stored in stored_tensors(folder).values():
        if stored.dtype.is_floating_point and stored.dtype.itemsize >= 2:
            counts[stored.dtype] = counts.get(stored.dtype, 0) + math.prod(stored.shape)
    if not counts:
        raise DiffGemmaError(f"{folder}: the checkpoint holds no float32, bf16 or float16 tensors")
    return max(counts, key=counts.__getitem__)


def reference_name(name: str) -> str:
    """Our state-dict name -> the reference checkpoint's tensor name."""
    layer_prefix, _, rest = name.partition(".")
    if layer_prefix == "layers" and rest.endswith(".encoder_layer_scalar"):
        return f"{ENCODER}layers.{rest.split('.')[0]}.layer_scalar"
    return DECODER + name


def _own_name(ref_name: str) -> tuple[str | None, bool]:
    """Reference name -> (our name or None, is a tied duplicate). Tied encoder copies and lm_head alias ours."""
    if ref_name.startswith(DECODER):
        return ref_name[len(DECODER) :], False
    if ref_name.startswith(ENCODER):
        rest = ref_name[len(ENCODER) :]
        if rest.startswith("layers.") and rest.endswith(".layer_scalar"):
            return rest.replace(".layer_scalar", ".encoder_layer_scalar"), False
        return rest, True
    if ref_name == "lm_head.weight":
        return "embed_tokens.weight", True
    return None, False


def _untied_copy(own: str) -> bool:
    """Whether the reference's encoder holds its own copy of this tensor of ours (the attention biases), which
    its tying leaves out."""
    return own.startswith("layers.") and own.endswith(".bias")


def _check_untied_copies(aliases: dict[str, StoredTensor], plan: dict[str, StoredTensor]) -> None:
    """The reference ties every encoder weight to the decoder's, but not the attention biases (`attention_bias`):
    a checkpoint may hold two different copies, and one network runs both passes here, so refuse those."""
    for own, copy in aliases.items():
        kept = plan[own]
        if copy is kept or not _untied_copy(own):
            continue
        if not torch.equal(read_tensor(copy), read_tensor(kept)):
            raise DiffGemmaError(
                f"{copy.path}: `{copy.name}` differs from `{kept.name}`: diffgemma runs the encoder and the decoder "
                "with one set of weights, and this checkpoint's attention biases are not shared between them"
            )


def _needs_buffer(stored: StoredTensor, target: torch.Tensor) -> bool:
    return not (target.device.type == "cpu" and target.dtype == stored.dtype and target.is_contiguous())


def _read_into(stored: StoredTensor, target: torch.Tensor, handle, scratch: torch.Tensor | None = None) -> None:
    """Read one tensor's bytes into `target`: directly when it is a CPU tensor of the stored dtype, else
    through `scratch` (a reusable byte buffer at least as large as the tensor), then converted by copy."""
    nbytes = stored.end - stored.start
    if _needs_buffer(stored, target):
        raw = scratch[:nbytes] if scratch is not None else torch.empty(nbytes, dtype=torch.uint8)
    else:
        raw = target.reshape(-1).view(torch.uint8)
    view = raw.numpy()
    handle.seek(stored.start)
    filled = 0
    while filled < nbytes:
        count = handle.readinto(view[filled:])
        if not count:
            raise DiffGemmaError(f"{stored.path}: truncated while reading tensor `{stored.name}`")
        filled += count
    if _needs_buffer(stored, target):
        target.copy_(raw.view(stored.dtype).view(stored.shape))


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    tensor = torch.empty(stored.shape, dtype=stored.dtype)
    with open(stored.path, "rb") as handle:
        _read_into(stored, tensor, handle)
    return tensor


Sink = tuple[tuple[int, ...], Callable[[torch.Tensor], None]]


def weight_plan(
    folder: Path, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, StoredTensor], dict[str, StoredTensor]]:
    """Which stored tensor fills each of our tensors (`shapes`: their names and shapes), checked: none missing,
    none unexpected, every shape right; and the tensors that are not part of the text model (the vision
    tower), by their names. A tied copy (the encoder's, `lm_head`) serves where the decoder's own is absent."""
    plan: dict[str, StoredTensor] = {}
    aliases: dict[str, StoredTensor] = {}
    passthrough: dict[str, StoredTensor] = {}
    for ref_name, stored in stored_tensors(folder).items():
        if ref_name.startswith(VISION_PREFIXES):
            passthrough[ref_name] = stored
            continue
        own, tied = _own_name(ref_name)
        if own is None or own not in shapes:
            raise DiffGemmaError(f"{stored.path}: unexpected tensor `{ref_name}` (not part of a DiffusionGemma model)")
        (aliases if tied else plan)[own] = stored
    for own, stored in aliases.items():
        plan.setdefault(own, stored)
    _check_untied_copies(aliases, plan)
    missing = [reference_name(name) for name in shapes if name not in plan]
    if missing:
        shown = ", ".join(f"`{name}`" for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DiffGemmaError(f"{folder}: checkpoint is missing tensor {shown}{more}")
    for own, stored in plan.items():
        if stored.shape != shapes[own]:
            raise DiffGemmaError(
                f"{stored.path}: tensor `{stored.name}` has shape {list(stored.shape)}, expected {list(shapes[own])}"
            )
    return plan, passthrough


def load_weights(
    model: DiffusionGemma,
    folder: Path,
    sinks: dict[str, Sink] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, StoredTensor]:
    """Fill every parameter and buffer of `model` from the checkpoint in `folder`.

    `sinks` take some stored tensors instead of a parameter: name -> (expected shape, a function handed the
    tensor once read; quantization on load). Each is read on its own, so only one is in memory at a time.
    `progress` is told (bytes read, bytes in all) after each tensor.
    Returns the tensors that are not part of the text model (the vision tower), kept by reference: read when an
    image first comes (`vision.load_image_encoder`), and carried over unchanged by a save.
    """
    sinks = sinks or {}
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update((name, buf) for name, buf in model.named_buffers())
    # What a sink fills (its module's quantized buffers) is not looked for on disk.
    covered = {name for name in targets if name.rpartition("_")[0] in sinks}
    targets = {name: t for name, t in targets.items() if name not in covered}
    targets.update((name, torch.empty(shape, device="meta")) for name, (shape, _) in sinks.items())
    plan, passthrough = weight_plan(folder, {name: tuple(t.shape) for name, t in targets.items()})

    by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
    for own, stored in plan.items():
        by_file.setdefault(stored.path, []).append((own, stored))
    # One scratch buffer serves every tensor that needs converting, so the allocator never piles up
    # tensor-sized temporaries of different sizes.
    converted = [s.end - s.start for own, s in plan.items() if own not in sinks and _needs_buffer(s, targets[own])]
    scratch = torch.empty(max(converted), dtype=torch.uint8) if converted else None
    total, done = sum(stored.end - stored.start for stored in plan.values()), 0
    with torch.no_grad():
        for path, entries in by_file.items():
            with open(path, "rb") as handle:
                for own, stored in sorted(entries, key=lambda item: item[1].start):
                    if own in sinks:
                        tensor = torch.empty(stored.shape, dtype=stored.dtype)
                        _read_into(stored, tensor, handle)
                        sinks[own][1](tensor)
                        del tensor
                    else:
                        _read_into(stored, targets[own], handle, scratch)
                    done += stored.end - stored.start
                    if progress is not None:
                        progress(done, total)
    return passthrough


def _shards(sizes: list[tuple[str, int]], max_bytes: int) -> Iterator[list[str]]:
    """Group tensor names into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shard: list[str] = []
    size = 0
    for name, nbytes in sizes:
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(name)
        size += nbytes
    if shard:
        yield shard


def generation_config_dict(settings: SamplerSettings) -> dict:
    """Sampler defaults in the reference's generation_config.json layout."""
    eos = list(settings.eos_token_id)
    return {
        "max_denoising_steps": settings.max_denoising_steps,
        "sampler_config": {"entropy_bound": settings.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": settings.t_min,
        "t_max": settings.t_max,
        "stability_threshold": settings.stability_threshold,
        "confidence_threshold": settings.confidence_threshold,
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": settings.pad_token_id,
        "return_dict_in_generate": True,
    }


def save_checkpoint(
    model: DiffusionGemma,
    settings: SamplerSettings,
    folder: str | os.PathLike,
    extra_files: dict[str, Path] | None = None,
    passthrough: dict[str, StoredTensor] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    config: ModelConfig | None = None,
) -> Path:
    """Write `model` in the reference layout (loadable by `transformers`), atomically (`write_checkpoint`)."""
    entries = reference_entries(model.state_dict(), passthrough)
    return write_checkpoint(entries, (config or model.config).raw, settings, folder, extra_files, max_shard_bytes)


def reference_entries(
    tensors: dict[str, Written], passthrough: dict[str, StoredTensor] | None = None
) -> list[tuple[str, Written]]:
    """Our tensors (by our names) under the reference's names, with `passthrough` tensors as they were named."""
    entries = [(reference_name(name), tensor) for name, tensor in tensors.items()]
    # the reference's encoder has attention biases of its own (untied): it reads ours there too (a tensor of
    # our own is copied: safetensors refuses two names over one memory)
    entries += [
        (ENCODER + name, tensor.clone() if isinstance(tensor, torch.Tensor) else tensor)
        for name, tensor in tensors.items()
        if _untied_copy(name)
    ]
    return entries + list((passthrough or {}).items())


def write_checkpoint(
    entries: list[tuple[str, Written]],
    raw: dict,
    settings: SamplerSettings,
    folder: str | os.PathLike,
    extra_files: dict[str, Path] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write named tensors (a `Derived` one made as its shard is written) in shards of at most
    `max_shard_bytes`, with `raw` as config.json (less its `vision_config` when no vision tensor goes with it),
    `settings` as generation_config.json and `extra_files`. `progress` is told (bytes made, bytes in all) after
    each tensor is read or made.

    Everything goes to a temporary folder beside `folder` first; only a complete write replaces it, so a
    failed save leaves the previous checkpoint (if any) as it was.
    """
    destination = as_path(folder, "the folder to write the checkpoint to").absolute()
    check_replaceable(destination)
    sizes = [(name, _nbytes(t)) for name, t in entries]
    extra_bytes = sum(Path(source).stat().st_size for source in (extra_files or {}).values())
    check_disk(destination, sum(size for _, size in sizes) + extra_bytes)
    with writing(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.saving-", dir=destination.parent))
        try:
            weight_map: dict[str, str] = {}
            shard_lists = list(_shards(sizes, max_shard_bytes))
            lookup, size_of = dict(entries), dict(sizes)
            total, made = sum(size_of.values()), 0
            for number, shard in enumerate(shard_lists, start=1):
                filename = SINGLE_FILE
                if len(shard_lists) > 1:
                    filename = f"model-{number:05d}-of-{len(shard_lists):05d}.safetensors"
                tensors = {}
                for name in shard:
                    tensors[name] = _materialize(lookup[name])
                    made += size_of[name]
                    if progress is not None:
                        progress(made, total)
                save_file(tensors, str(staging / filename), metadata={"format": "pt"})
                weight_map.update((name, filename) for name in tensors)
                del tensors
            if len(shard_lists) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
            if not any(name.startswith(VISION_PREFIXES) for name, _ in entries):
                raw = {key: value for key, value in raw.items() if key != "vision_config"}
            for name, content in (("config.json", raw), (GENERATION_FILE, generation_config_dict(settings))):
                (staging / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
            for name, source in (extra_files or {}).items():
                shutil.copyfile(source, staging / name)
            usual_permissions([staging, *staging.iterdir()])  # (mkdtemp's folder is private)
            _swap_into_place(staging, destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return destination


def _nbytes(tensor: Written) -> int:
    if isinstance(tensor, StoredTensor):
        return tensor.end - tensor.start
    if isinstance(tensor, Derived):
        return math.prod(tensor.shape) * tensor.dtype.itemsize
    return tensor.numel() * tensor.element_size()


def _materialize(tensor: Written) -> torch.Tensor:
    if isinstance(tensor, StoredTensor):
        return read_tensor(tensor)
    if isinstance(tensor, Derived):
        return tensor.make().to(device="cpu", dtype=tensor.dtype).contiguous()
    return tensor.detach().to("cpu").contiguous()


def check_replaceable(destination: Path) -> None:
    """A save replaces its folder whole: refuse one that holds files but no checkpoint (a folder of models, a
    project), before anything is written."""
    if not destination.exists():
        return
    if not destination.is_dir():
        raise DiffGemmaError(f"{destination}: exists and is not a folder")
    if not (destination / "config.json").is_file() and any(destination.iterdir()):
        raise DiffGemmaError(
            f"{destination}: holds files but no checkpoint (no config.json); a save replaces its folder whole, "
            "so give a new folder, an empty one, or a checkpoint to replace"
        )


def _swap_into_place(staging: Path, destination: Path) -> None:
    """Replace `destination` by the finished `staging` folder; the old one is removed only afterwards."""
    if not destination.exists():
        os.replace(staging, destination)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    os.rmdir(retired)
    os.replace(destination, retired)
    try:
        os.replace(staging, destination)
    except BaseException:
        os.replace(retired, destination)
        raise
    shutil.rmtree(retired, ignore_errors=True)
