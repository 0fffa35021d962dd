"""Deepen a trained network: new layers that start switched off, so training goes on from where it stands.

A deeper copy keeps the model's layers first and repeats them after (new layer i copies layer i mod n, so
its kind, sliding or full, is the one it copies; the last must be full, as the reference requires). Each
repeat's two residual branches end in a post-norm whose scale is set to zero: the repeat adds nothing, the
deeper network computes exactly what the shallower one did, and training grows the scales from there.
(Zeroing the output projections instead would put a zero vector into the post-norm, whose gradient there is
1/sqrt(eps): a thousandfold first step.)
"""

from __future__ import annotations

import copy

import torch

from ..api import DiffGemma
from ..config import FULL, parse_model_config
from ..errors import DiffGemmaError
from ..model import DiffusionGemma


def deepen(model: DiffGemma, layers: int) -> DiffGemma:
    """A copy of `model` with `layers` layers, equal to it in every output until it is trained."""
    have = model.config.num_hidden_layers
    if layers <= have:
        raise DiffGemmaError(f"--layers {layers}: the model already has {have} layers; a deeper one needs more")
    if model.quant is not None:
        raise DiffGemmaError(f"the model is quantized ({model.quant.name}); deepen a float checkpoint")
    types = model.config.layer_types
    last = types[(layers - 1) % have]
    if last != FULL:  # the reference makes the last layer full attention whatever it was
        fits = [n for n in range(have + 1, 3 * have + 1) if types[(n - 1) % have] == FULL]
        raise DiffGemmaError(
            f"--layers {layers}: the last layer would repeat layer {(layers - 1) % have}, a {last} "
            f"layer, and the last must be full attention; with this model's layers give one of {fits} (or more)"
        )
    raw = copy.deepcopy(model.config.raw)
    text = raw["text_config"]
    text["num_hidden_layers"] = layers
    text["layer_types"] = [types[i % have] for i in range(layers)]
    if "per_layer_config" in text:  # the shapes the reference writes per layer index go with the copies too
        shapes = text["per_layer_config"]
        text["per_layer_config"] = {str(i): shapes[str(i % have)] for i in range(layers) if str(i % have) in shapes}
    source = model.network
    with torch.device("meta"):
        deeper = DiffusionGemma(parse_model_config(raw, "the deepened config"))
    deeper = deeper.to(source.dtype).to_empty(device=source.device)
    weights = source.state_dict()
    with torch.no_grad():
        for name, tensor in deeper.state_dict().items():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                name = f"layers.{int(index) % have}.{rest}"
            tensor.copy_(weights[name])
        for layer in deeper.layers[have:]:
            layer.post_attention_layernorm.weight.zero_()
            layer.post_feedforward_layernorm.weight.zero_()
    deeper.train(source.training)
    deeper.requires_grad_(any(p.requires_grad for p in source.parameters()))
    return DiffGemma(deeper, model.tokenizer, model.settings, model.folder)
