"""LoRA adapters for the attention and dense-MLP projections (optionally the self-conditioning block).

The encoder and the decoder are one set of weights, so one adapter serves both roles (an adapter PEFT trained on
the reference model's two copies has a half for each, each run in its own pass). Adapters are saved in
PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A
.weight`), written under both the decoder's and the encoder's module names of the reference model, so PEFT
on `transformers` applies the same adapter to both of its copies; an adapter PEFT made on the reference loads
as PEFT applies it (the projections its weights adapt, each at its rank and scale). Merging folds
W + scale * B @ A into the base weights and gives back plain linear layers, ready to save as a full checkpoint.

A quantized base (loaded with `quant=`) takes adapters too (QLoRA): its projections stay frozen as stored and
the adapters train in the model's dtype; such an adapter merges into the float checkpoint, not the quantized one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import (
    DECODER,
    DEFAULT_SHARD_BYTES,
    ENCODER,
    Derived,
    StoredTensor,
    generation_config_dict,
    read_tensor,
    reference_entries,
    stored_as,
    stored_float_dtype,
    weight_plan,
    write_checkpoint,
)
from ..config import (
    GENERATION_FILE,
    SamplerSettings,
    as_path,
    is_int,
    is_number,
    load_configs,
    parse_sampler_settings,
    read_json,
)
from ..errors import DiffGemmaError
from ..model import DiffusionGemma, PassRole
from ..quant import QuantLinear, format_from_config, meta_network
from ..resources import check_disk, usual_permissions, writing
from ..tokenizer import tokenizer_files

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LAYER_TARGETS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
SELF_CONDITIONING_TARGETS = r"self_conditioning\.(gate|up|down)_proj"
ENCODER_DROPPED = (
    "the adapter's encoder half differs from its decoder half (PEFT trained the reference model's two copies "
    "apart): a merged checkpoint has one set of weights for both passes, and takes the decoder's; `--adapter` "
    "runs both halves exactly"
)
QUANTIZED_BASE = (  # why an adapter is not folded into quantized weights: they would be rounded a second time
    "the base model is quantized ({}): merge the adapter into the float checkpoint it was quantized from "
    "(`diffgemma lora-merge --model FLOAT_FOLDER --adapter ...`)"
)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    self_conditioning: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise DiffGemmaError(f"LoRA rank must be a whole number of at least 1, got {self.rank!r}")
        if not is_number(self.alpha):
            raise DiffGemmaError(f"LoRA alpha must be a number, got {self.alpha!r}")

    @property
    def pattern(self) -> str:
        parts = [LAYER_TARGETS] + ([SELF_CONDITIONING_TARGETS] if self.self_conditioning else [])
        return "|".join(parts)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LowRank(nn.Module):
    """A low-rank update (`lora_A`, `lora_B`, `scale`) beside a projection; with `encoder` (rank, scale), a
    second one (`lora_A_encoder`, ...) that the encoder's pass takes instead: an adapter PEFT trained on the
    reference model, whose encoder and decoder are two copies of the weights, each adapted apart."""

    def _add_low_rank(
        self, in_features: int, out_features: int, rank: int, scale: float, device, dtype, encoder, role: PassRole
    ) -> None:
        def linear(inputs: int, outputs: int) -> nn.Linear:
            return nn.Linear(inputs, outputs, bias=False, device=device, dtype=dtype)

        self.role = role  # (a plain attribute: the network's, not a submodule)
        self.scale = scale
        self.row_groups: RowGroups | None = None  # rows of several adapters in one pass (`AdapterBank.for_rows`)
        self.lora_A, self.lora_B = linear(in_features, rank), linear(rank, out_features)
        # The usual start: A random, B zero, so the adapted model begins exactly where the base model is.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A_encoder = self.lora_B_encoder = self.scale_encoder = None
        if encoder is not None:
            encoder_rank, self.scale_encoder = encoder
            self.lora_A_encoder = linear(in_features, encoder_rank)
            self.lora_B_encoder = linear(encoder_rank, out_features)

    def adapted(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The projection's output `out` of `x`, plus the update (none while an `AdapterBank` has no adapter of
        this projection in place; each row's own where it has put several, one a row)."""
        if self.row_groups is not None:
            return self.row_groups.adapted(out, x, self.role.encoding)
        if self.lora_A is None:
            return out
        return out + self.update(x, self.role.encoding)

    def update(self, x: torch.Tensor, encoding: bool) -> torch.Tensor:
        """This adapter's update of `x`: its encoder half's in an encoding pass, where it has one."""
        if self.lora_A_encoder is not None and encoding:
            return self.lora_B_encoder(self.lora_A_encoder(x)) * self.scale_encoder
        return self.lora_B(self.lora_A(x)) * self.scale

    def put(self, source: LowRank | None) -> None:
        """Take `source`'s update (its matrices themselves, not copies), or none."""
        for part in ("lora_A", "lora_B", "scale", "lora_A_encoder", "lora_B_encoder", "scale_encoder"):
            setattr(self, part, getattr(source, part) if source is not None else None)
        self.row_groups = None


@dataclass(frozen=True)
class RowGroup:
    """The rows of a pass that run with one adapter: their indices (on the device) and the same as runs of
    consecutive rows, (start, stop) each, through which its update is added."""

    rows: torch.Tensor
    runs: tuple[tuple[int, int], ...]
    source: LowRank

    def add_update(self, out: torch.Tensor, x: torch.Tensor, encoding: bool) -> None:
        """`out` [B, ...] += this adapter's update of `x`, on its rows alone, in place."""
        if len(self.runs) == 1:  # (a view, no gather)
            start, stop = self.runs[0]
            out[start:stop] += self.source.update(x[start:stop], encoding)
            return
        update = self.source.update(x.index_select(0, self.rows), encoding)
        taken = 0
        for start, stop in self.runs:  # (slices: an index_add_ of the rows takes four times as long on a CPU)
            out[start:stop] += update[taken : taken + stop - start]
            taken += stop - start


def consecutive_runs(rows: list[int]) -> tuple[tuple[int, int], ...]:
    """Ascending row indices as runs of consecutive ones, (start, stop) each: [0, 1, 3] -> ((0, 2), (3, 4))."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    return tuple((start, stop) for start, stop in runs)


@dataclass(frozen=True)
class RowGroups:
    """One projection's updates for a pass of `rows` rows of several adapters: the rows of each adapter that adapts
    it; rows of none get no update."""

    rows: int
    groups: tuple[RowGroup, ...]

    def adapted(self, out: torch.Tensor, x: torch.Tensor, encoding: bool) -> torch.Tensor:
        if x.shape[0] != self.rows:
            raise DiffGemmaError(f"adapters were put in place for {self.rows} rows, and a pass has {x.shape[0]}")
        for group in self.groups:
            group.add_update(out, x, encoding)
        return out


class LoraLinear(LowRank):
    """A linear layer plus a low-rank update. The base weight keeps its name (`weight`), so the rest of
    the state dict and the checkpoint layout are unchanged; the adapter adds `lora_A` and `lora_B`."""

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, role: PassRole, encoder: tuple[int, float] | None = None
    ) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        weight = base.weight
        self._add_low_rank(base.in_features, base.out_features, rank, scale, weight.device, weight.dtype, encoder, role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted(F.linear(x, self.weight, self.bias), x)

    def merged(self) -> nn.Linear:
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        with torch.no_grad():  # (the decoder's half, where the encoder has its own: `merge_lora` warns)
            fold_(self.weight, self.lora_A.weight, self.lora_B.weight, self.scale)
        return linear


def fold_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """weight += scale * B @ A, in place: the product in float32 of the adapter as the model holds it (in the
    weight's dtype), rounded once to that dtype."""
    update = lora_b.to(weight.dtype).float() @ lora_a.to(weight.dtype).float()
    return weight.add_((update * scale).to(weight.dtype))


class LoraQuantLinear(QuantLinear, LowRank):
    """A quantized projection (frozen, as stored) plus a low-rank update in the model's dtype: QLoRA. Its
    buffers keep their names; the adapter is saved, and merges into a float checkpoint, as any other."""

    def __init__(
        self,
        base: QuantLinear,
        rank: int,
        scale: float,
        dtype: torch.dtype,
        role: PassRole,
        encoder: tuple[int, float] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.fmt, self.source_shapes, self.bias = base.fmt, base.source_shapes, base.bias
        for name, buffer in base.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        out_features, in_features = self.source_shapes["weight"]
        device = self.weight_qweight.device
        self._add_low_rank(in_features, out_features, rank, scale, device, dtype, encoder, role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted(super().forward(x), x)

    def merged(self) -> nn.Module:
        """Refused: folding the update into quantized weights would requantize them (a second rounding)."""
        raise DiffGemmaError(QUANTIZED_BASE.format(self.fmt.name))


ADAPTED = (LoraLinear, LoraQuantLinear)


def _replace(network: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent_name) if parent_name else network, child, module)


PROJECTIONS = (nn.Linear, QuantLinear)


def add_lora(network: DiffusionGemma, settings: LoraSettings) -> list[str]:
    """Wrap the targeted projections with adapters and freeze everything else; returns the wrapped names."""
    targets = _targeted(network, settings)
    _wrap(network, {name: ((settings.rank, settings.scale), None) for name in targets})
    return targets


def _targeted(network: DiffusionGemma, settings: LoraSettings) -> list[str]:
    """The names of the projections `settings` targets (adapted already or not), in the network's order."""
    pattern = re.compile(settings.pattern)
    kinds = (*PROJECTIONS, *ADAPTED)
    return [name for name, module in network.named_modules() if isinstance(module, kinds) and pattern.fullmatch(name)]


Shape = tuple[int, float]  # an adapter's rank and scale


def _wrap(network: DiffusionGemma, adapters: dict[str, tuple[Shape, Shape | None]], off: bool = False) -> None:
    """Freeze the network and wrap each named projection with an adapter of its (rank, scale), and the
    encoder's own where it has one; `off`: with no update at all, beside other adapters (an `AdapterBank`'s)."""
    if has_lora(network) and not off:
        raise DiffGemmaError("this network already has LoRA adapters")
    network.requires_grad_(False)
    for name, ((rank, scale), encoder) in adapters.items():
        base = network.get_submodule(name)
        if isinstance(base, QuantLinear):
            adapted = LoraQuantLinear(base, rank, scale, network.dtype, network.role, encoder)
        else:
            adapted = LoraLinear(base, rank, scale, network.role, encoder)
        if off:
            adapted.put(None)
        _replace(network, name, adapted)


def has_encoder_adapters(network: nn.Module) -> bool:
    """Whether some adapter has an encoder half of its own (PEFT's, trained on the reference's two copies)."""
    return any(isinstance(m, ADAPTED) and m.lora_A_encoder is not None for m in network.modules())


def warn_if_encoder_dropped(network: nn.Module) -> None:
    """Merging keeps one set of weights for both passes: say so when the adapter's encoder half differs."""
    if has_encoder_adapters(network):
        warnings.warn(ENCODER_DROPPED, stacklevel=3)  # (where the merge was asked for)


def has_lora(network: nn.Module) -> bool:
    return any(isinstance(m, ADAPTED) for m in network.modules())


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The adapters' weights when the network has adapters, else every parameter."""
    if has_encoder_adapters(network):
        # (a checkpointed half recomputed in the backward pass could run with the other pass's adapter)
        raise DiffGemmaError(
            "this adapter's encoder and decoder halves differ (PEFT trained the reference model's two copies "
            "apart): it runs here, but trains as one adapter for both passes; start from one of those"
        )
    if has_lora(network):
        return [p for n, p in network.named_parameters() if ".lora_" in n]
    return list(network.parameters())


def merge_lora(network: DiffusionGemma) -> int:
    """Fold every adapter into its base weight and drop it; returns how many were merged."""
    wrapped = [(n, m) for n, m in network.named_modules() if isinstance(m, ADAPTED)]
    for _, module in wrapped:  # refused before anything changes
        if isinstance(module, LoraQuantLinear):
            module.merged()
    warn_if_encoder_dropped(network)
    for name, module in wrapped:
        _replace(network, name, module.merged())
    return len(wrapped)


def save_adapter(
    network: DiffusionGemma,
    settings: LoraSettings,
    folder: str | os.PathLike,
    base: str = "",
    generation: SamplerSettings | None = None,
) -> Path:
    """Write the adapters in PEFT's layout, atomically (a staging folder swapped into place); `generation`: the
    sampler defaults a model with them generates with (a generation_config.json beside them, which
    `diffgemma lora-merge` gives the merged checkpoint: the EOS ids fine-tuning taught, say)."""
    adapters = {n: t for n, t in network.state_dict().items() if ".lora_" in n}
    if not adapters:
        raise DiffGemmaError("this network has no LoRA adapters to save")
    halves = {name.replace("_encoder.", ".") for name in adapters if "_encoder." in name}
    tensors = {}
    for name, tensor in adapters.items():
        # an adapter with an encoder half of its own: each half under its copy's names; else one under both (the
        # decoder's alone for a module the reference's encoder does not have)
        if "_encoder." in name:
            roles, name = (ENCODER,), name.replace("_encoder.", ".")
        else:
            roles = (DECODER,) if name in halves or name.startswith(DECODER_ONLY) else (DECODER, ENCODER)
        for role in roles:
            tensors[PEFT_PREFIX + role + name] = tensor.detach().to("cpu").clone().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        **_peft_targets(network, settings),
    }
    destination = as_path(folder, "the folder to write the adapter to").absolute()
    check_disk(destination, sum(t.numel() * t.element_size() for t in tensors.values()))
    with writing(destination):
        destination.mkdir(parents=True, exist_ok=True)
        # Each file is written whole beside its final name and renamed over it; other files in the folder (a
        # trainer state) stay. The weights go first, so a config never describes weights that are not there.
        staging = Path(tempfile.mkdtemp(prefix=".adapter.saving-", dir=destination))
        try:
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
            names = [WEIGHTS_FILE, CONFIG_FILE]
            if generation is not None:
                text = json.dumps(generation_config_dict(generation), indent=2)
                (staging / GENERATION_FILE).write_text(text, encoding="utf-8")
                names.append(GENERATION_FILE)
            usual_permissions(staging / name for name in names)  # (mkdtemp's folder is private, and so its files)
            for name in names:
                os.replace(staging / name, destination / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return destination


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter_config.json says that the adapted model's numbers depend on (PEFT's LoRA settings)."""

    rank: int
    alpha: float
    rslora: bool = False  # scale alpha / sqrt(rank), not alpha / rank
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module name patterns -> their own rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # ... -> their own alpha

    def rank_of(self, module: str) -> int:
        return _by_pattern(self.rank_pattern, module, self.rank)

    def scale_of(self, module: str, rank: int) -> float:
        alpha = _by_pattern(self.alpha_pattern, module, self.alpha)
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def _by_pattern(patterns: dict, module: str, default):
    """The value of the first pattern that names `module` (a full module name of the reference model), as PEFT
    matches `rank_pattern` and `alpha_pattern` keys: the key as a regular expression for the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _peft_targets(network: DiffusionGemma, settings: LoraSettings) -> dict:
    """PEFT's config keys for the adapters `network` carries (both roles of the reference model each):
    `target_modules` (a regular expression PEFT matches against full module names: `settings`' compact one when
    they are the projections it names, else their names), and `r` and `lora_alpha` with a `rank_pattern` and
    `alpha_pattern` entry for each adapter of another rank or scale (one loaded from PEFT, say)."""
    roles = "(" + "|".join(re.escape(role) for role in (DECODER, ENCODER)) + ")"
    wrapped = {name: module for name, module in network.named_modules() if isinstance(module, ADAPTED)}
    compact = set(_targeted(network, settings)) == set(wrapped)
    names = settings.pattern if compact else "|".join(re.escape(name) for name in sorted(wrapped))
    ranks, alphas = {}, {}
    for name, module in sorted(wrapped.items()):
        halves = [(roles, module.lora_A, module.scale)]
        if module.lora_A_encoder is not None:  # each copy's rank and scale under its own name
            halves = [(re.escape(DECODER), module.lora_A, module.scale)]
            halves.append((re.escape(ENCODER), module.lora_A_encoder, module.scale_encoder))
        for role, lora_a, scale in halves:
            rank = lora_a.out_features
            if rank != settings.rank:
                ranks[role + re.escape(name)] = rank
            if not math.isclose(scale * rank, settings.alpha):
                alphas[role + re.escape(name)] = scale * rank
    return {
        "target_modules": f"{roles}({names})",
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
    }


def read_adapter_config(folder: Path) -> AdapterConfig:
    """An adapter folder's config, refusing what would change the numbers in ways these adapters do not model
    (DoRA, trained biases, whole modules saved beside the adapters)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise DiffGemmaError(f"{path}: not found (expected a PEFT LoRA adapter folder)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise DiffGemmaError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise DiffGemmaError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not is_int(rank) or rank < 1:
        raise DiffGemmaError(f"{path}: `r` must be a whole number of at least 1, got {rank!r}")
    if not is_number(alpha):
        raise DiffGemmaError(f"{path}: `lora_alpha` must be a number, got {alpha!r}")
    refused = {
        "use_dora": (bool(config.get("use_dora")), "a DoRA adapter (weight-decomposed: a magnitude per output)"),
        "bias": (config.get("bias") not in (None, "none"), f"trained biases (bias: {config.get('bias')!r})"),
        "lora_bias": (bool(config.get("lora_bias")), "a bias on each adapter's B matrix"),
        "modules_to_save": (bool(config.get("modules_to_save")), "whole modules saved beside the adapters"),
    }
    for key, (present, what) in refused.items():
        if present:
            raise DiffGemmaError(f"{path}: `{key}`: {what}; diffgemma applies plain LoRA adapters only")
    patterns = {}
    for key, valid, kind in (("rank_pattern", is_int, "whole number"), ("alpha_pattern", is_number, "number")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(valid(v) and v > 0 for v in pattern.values()):
            raise DiffGemmaError(f"{path}: `{key}` must map module names to a positive {kind} each, got {pattern!r}")
        patterns[key] = pattern
    return AdapterConfig(rank, float(alpha), bool(config.get("use_rslora")), **patterns)


def adapter_generation(folder: str | os.PathLike) -> SamplerSettings | None:
    """The sampler defaults an adapter was saved with (None: it carries none, as PEFT's own adapters)."""
    path = Path(folder) / GENERATION_FILE
    return parse_sampler_settings(read_json(path), str(path)) if path.is_file() else None


class AdapterBank:
    """Several LoRA adapters over one network's base weights, none folded in: `use(name)` puts one in place for
    the passes that follow (None: the base model alone), as a server serves fine-tunes of one model under names
    of their own. Each adapter is read once (`add`), its matrices kept on the network's device; the network's
    projections that some adapter adapts are wrapped once, and take the matrices of the adapter in use (or run
    without an update, where it leaves them alone). Switching moves no weights: it points each wrapped
    projection at other matrices. Rows of several adapters also share a pass (`for_rows`): each wrapped
    projection adds each adapter's update to the rows of that adapter."""

    def __init__(self, network: DiffusionGemma) -> None:
        if has_lora(network):
            raise DiffGemmaError("this network has a LoRA adapter of its own already: load the base model alone")
        self.network = network
        self.adapters: dict[str, dict[str, LowRank]] = {}  # name -> projection name -> its update
        self.wrapped: dict[str, LowRank] = {}  # the network's projections some adapter adapts
        self.in_use: str | dict[str, RowGroups | None] | None = None  # a name, None, or the rows' (`for_rows`)

    def add(self, name: str, folder: str | os.PathLike) -> None:
        """Read the adapter in `folder` (PEFT's layout) under `name`; the one in use stays in use."""
        if not isinstance(name, str) or not name:
            raise DiffGemmaError(f"an adapter's name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise DiffGemmaError(f"an adapter named {name!r} is loaded already")
        network = self.network
        skeleton = meta_network(network.config, network.dtype)  # (the shapes to read it by; no memory)
        tensors = read_adapter(skeleton, folder)
        updates = {module_name: m for module_name, m in skeleton.named_modules() if isinstance(m, ADAPTED)}
        for module in updates.values():
            for matrix in module.children():  # (its LoRA matrices; the base weight stays on the meta device)
                matrix.to_empty(device=network.device).requires_grad_(False)
        _fill_adapters(skeleton, tensors)
        # the projections no adapter adapted before: wrapped, without an update while another is in place
        _wrap(network, {module_name: ((1, 0.0), None) for module_name in updates.keys() - self.wrapped}, off=True)
        self.wrapped |= {module_name: network.get_submodule(module_name) for module_name in updates}
        self.adapters[name] = updates

    def remove(self, name: str) -> None:
        """Drop adapter `name` (the base model in place, if it was); its projections stay wrapped, without it."""
        self._check_known(name)
        if self.in_use == name:
            self.use(None)
        del self.adapters[name]

    def use(self, name: str | None) -> None:
        """Put adapter `name` in place (None: none, the base model)."""
        if name is not None:
            self._check_known(name)
        if name == self.in_use:
            return
        updates = self.adapters[name] if name is not None else {}
        for module_name, module in self.wrapped.items():
            module.put(updates.get(module_name))
        self.in_use = name

    def for_rows(self, names: Sequence[str | None]) -> RowAdapters:
        """What puts each row's adapter in place for the passes that follow: row i of a pass runs with adapter
        `names[i]` (None: the base model alone), so that requests for several fine-tunes share their passes as
        those of one do. Where every row names the same, `use` puts it in place. The rows' indices are made on
        the device once, here, and kept by what is returned: a CUDA graph captured with them in place replays
        safely while its holder keeps that."""
        names = tuple(names)
        if not names:
            raise DiffGemmaError("adapters are put in place for one row or more, got none")
        for name in set(names) - {None}:
            self._check_known(name)
        if len(set(names)) == 1:
            return RowAdapters(self, names, lambda: self.use(names[0]))
        device = self.network.device
        present = sorted(set(names) - {None})
        rows = {}  # each adapter's rows: their indices on the device, and as runs
        for name in present:
            indices = [index for index, named in enumerate(names) if named == name]
            rows[name] = torch.tensor(indices, device=device), consecutive_runs(indices)
        in_place: dict[str, RowGroups | None] = {}
        for module_name in self.wrapped:
            groups = tuple(
                RowGroup(*rows[name], self.adapters[name][module_name])
                for name in present
                if module_name in self.adapters[name]
            )
            in_place[module_name] = RowGroups(len(names), groups) if groups else None

        def put() -> None:
            if self.in_use is in_place:
                return
            for module_name, module in self.wrapped.items():
                module.put(None)
                module.row_groups = in_place.get(module_name)  # (None: wrapped since, by an adapter added later)
            self.in_use = in_place

        return RowAdapters(self, names, put)

    def _check_known(self, name: str) -> None:
        if name not in self.adapters:
            known = ", ".join(repr(known) for known in self.adapters) or "none"
            raise DiffGemmaError(f"no adapter named {name!r} (loaded: {known})")


class RowAdapters:
    """Each row's adapter (`names`) put in place for a pass (`AdapterBank.for_rows`), when called: with no rows,
    for a pass of every row; with some rows' indices (ascending), for a pass of those alone (a batch's rows
    still denoising once others have stopped)."""

    def __init__(self, bank: AdapterBank, names: tuple[str | None, ...], put: Callable[[], None]) -> None:
        self.bank, self.names, self._put = bank, names, put
        self._subset: tuple[list[int], RowAdapters] | None = None  # the last subset's (a canvas keeps one a while)

    def __call__(self, rows: list[int] | None = None) -> None:
        if rows is None or len(rows) == len(self.names):
            self._put()
            return
        if self._subset is None or self._subset[0] != rows:
            self._subset = list(rows), self.bank.for_rows([self.names[index] for index in rows])
        self._subset[1]()


def load_adapter(network: DiffusionGemma, folder: str | os.PathLike) -> list[str]:
    """Add adapters from a PEFT-layout folder to `network` (frozen base, adapters loaded); returns the names of
    the projections adapted."""
    tensors = read_adapter(network, folder)
    _fill_adapters(network, tensors)
    return sorted({name.rpartition(".lora_")[0] for name in tensors})


def _fill_adapters(network: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The adapters `read_adapter` wrapped into `network` given its `tensors`, by name."""
    with torch.no_grad():
        for name, target in network.state_dict(keep_vars=True).items():
            if ".lora_" in name:
                target.copy_(tensors[name])


LORA_MATRICES = (".lora_A.weight", ".lora_B.weight")


def read_adapter(network: DiffusionGemma, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors (on the CPU, by our names: `...q_proj.lora_A.weight`), after wrapping the
    projections they adapt in `network` (the meta device serves: it gives the names and shapes looked for).

    The weights say which projections are adapted, each with its own rank (a PEFT adapter may adapt any of
    them: `q_proj` and `v_proj` alone, say, or the self-conditioning block too). The reference model has two
    copies of the text layers, so PEFT trains an encoder and a decoder adapter for each: where they are equal
    (as `save_adapter` writes them) one adapter serves both passes; where they differ, or one copy has none
    (a zero update), each pass takes its own half (`lora_A_encoder`, ...). Adapters of the vision tower are
    left out (text never reaches it); any other tensor is refused, naming it.
    """
    folder = as_path(folder, "an adapter (its folder)")
    config = read_adapter_config(folder)
    weights_path = folder / WEIGHTS_FILE
    try:
        stored = load_file(str(weights_path))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise DiffGemmaError(f"{weights_path}: cannot read adapter weights ({err})") from None
    by_role: dict[str, dict[str, dict[str, torch.Tensor]]] = {DECODER: {}, ENCODER: {}}
    vision = 0
    for key, tensor in stored.items():
        module, matrix = _adapted_module(key, weights_path)
        role = next((role for role in (DECODER, ENCODER) if module.startswith(role)), None)
        if role is None:
            if "vision" not in module:
                raise DiffGemmaError(f"{weights_path}: {key} adapts `{module}`, which is not in the text model")
            vision += 1
            continue
        by_role[role].setdefault(module.removeprefix(role), {})[matrix] = tensor
    adapters, tensors = {}, {}
    for name in sorted(set(by_role[DECODER]) | set(by_role[ENCODER])):
        halves = {role: _half(network, config, name, role, by_role[role].get(name), weights_path) for role in by_role}
        decoder, encoder = halves[DECODER], halves[ENCODER]
        if decoder is None or encoder is None:
            if name.startswith(DECODER_ONLY):  # (the encoder never runs it)
                encoder = None
            else:  # the other copy unadapted: an update of zero
                given = decoder or encoder
                zero = (given[0], given[1], torch.zeros_like(given[2]), torch.zeros_like(given[3]))
                decoder, encoder = decoder or zero, encoder or zero
        elif decoder[:2] == encoder[:2] and all(map(torch.equal, decoder[2:], encoder[2:])):
            encoder = None  # one adapter for both passes (what `save_adapter` writes)
        adapters[name] = (decoder[:2], None if encoder is None else encoder[:2])
        for suffix, half in (("", decoder), ("_encoder", encoder)):
            if half is not None:
                tensors[f"{name}.lora_A{suffix}.weight"], tensors[f"{name}.lora_B{suffix}.weight"] = half[2:]
    if not adapters:
        raise DiffGemmaError(f"{weights_path}: no LoRA adapters of the text model in it")
    if vision:
        message = f"{weights_path}: {vision} tensor(s) adapt the vision tower, which diffgemma does not run: left out"
        warnings.warn(message, stacklevel=3)
    _wrap(network, adapters)
    return tensors


DECODER_ONLY = ("self_conditioning.",)  # modules only the decoder's pass runs


def _half(
    network: DiffusionGemma,
    config: AdapterConfig,
    name: str,
    role: str,
    pair: dict[str, torch.Tensor] | None,
    weights_path: Path,
) -> tuple[int, float, torch.Tensor, torch.Tensor] | None:
    """One copy's adapter of projection `name` (rank, scale, A, B), checked; None where that copy has none."""
    if pair is None:
        return None
    where = f"{weights_path}: {PEFT_PREFIX}{role}{name}"
    in_features, out_features = _projection_shape(network, name, where)
    if set(pair) != set(LORA_MATRICES):
        raise DiffGemmaError(f"{where}: has {sorted(pair)} but not both LoRA matrices")
    lora_a, lora_b = pair[LORA_MATRICES[0]], pair[LORA_MATRICES[1]]
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    if lora_a.shape != (rank, in_features) or lora_b.shape != (out_features, rank):
        expected = f"[r, {in_features}] and [{out_features}, r]"
        found = f"{list(lora_a.shape)} and {list(lora_b.shape)}"
        raise DiffGemmaError(f"{where}: LoRA matrices of shapes {found}, expected {expected}")
    if rank != config.rank_of(role + name):
        message = f"`r` is {config.rank_of(role + name)}, but the adapter's weights have rank {rank} ({role}{name})"
        raise DiffGemmaError(f"{weights_path.parent / CONFIG_FILE}: {message}")
    return rank, config.scale_of(role + name, rank), lora_a, lora_b


def _adapted_module(key: str, weights_path: Path) -> tuple[str, str]:
    """(the reference model's module name, ".lora_A.weight" or ".lora_B.weight") of a PEFT adapter tensor."""
    matrix = next((matrix for matrix in LORA_MATRICES if key.endswith(matrix)), None)
    if not key.startswith(PEFT_PREFIX) or matrix is None:
        raise DiffGemmaError(
            f"{weights_path}: {key} is not a LoRA matrix of a linear layer ({PEFT_PREFIX}<module>"
            f"{LORA_MATRICES[0]} or {LORA_MATRICES[1]}); diffgemma applies plain LoRA adapters only"
        )
    return key[len(PEFT_PREFIX) : -len(matrix)], matrix


def _projection_shape(network: DiffusionGemma, name: str, where: str) -> tuple[int, int]:
    """(in, out) features of the projection `name` of `network`, or an error naming the adapter tensor."""
    try:
        module = network.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, PROJECTIONS):
        raise DiffGemmaError(f"{where}: adapts `{name}`, which is not a linear projection of this model")
    out_features, in_features = (
        module.source_shapes["weight"] if isinstance(module, QuantLinear) else module.weight.shape
    )
    return in_features, out_features


def merge_adapter_files(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Fold an adapter into a float checkpoint on disk, a shard at a time: the checkpoint `merge_lora` and a
    save would write from the loaded base (in `dtype`, or the stored one), without holding the model, so a base
    larger than memory merges (the 26B's 47 GiB of bf16 on a machine that trained its QLoRA adapter in 16).
    The adapter's generation config, if any, goes with it (`progress`: as `write_checkpoint` tells it). Returns
    how many adapters were folded in."""
    base = as_path(base, "the base checkpoint (its folder)")
    config, settings = load_configs(base)
    saved = format_from_config(config.raw)
    if saved is not None:
        raise DiffGemmaError(f"{base}: {QUANTIZED_BASE.format(saved.name)}")
    dtype = dtype or stored_float_dtype(base)
    network = meta_network(config, dtype)
    shapes = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    plan, passthrough = weight_plan(base, shapes)
    tensors = read_adapter(network, adapter)
    warn_if_encoder_dropped(network)
    folds = {
        f"{name}.weight": (tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"], module.scale)
        for name, module in network.named_modules()
        if isinstance(module, ADAPTED)
    }

    def written(name: str) -> StoredTensor | Derived:
        stored = plan[name]
        if name in folds:
            return Derived(stored.shape, dtype, lambda: fold_(read_tensor(stored).to(dtype), *folds[name]))
        return stored_as(stored, dtype)

    entries = reference_entries({name: written(name) for name in shapes}, passthrough)
    generation = adapter_generation(adapter) or settings
    write_checkpoint(entries, config.raw, generation, out, tokenizer_files(base), max_shard_bytes, progress)
    return len(folds)
