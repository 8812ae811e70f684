"""Which tensors of a GPT-NeoX model the weight statistics (:mod:`polypythia.evaluate.weight_stats`) read,
under each of the two definitions described there: the released PolyPythias code's parameters, named
as transformers 4.x names them (:func:`polypythias_parameters`), or the paper's six matrices per block,
the fused query/key/value weight split into Q, K and V (:func:`block_matrices`)."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from polypythia.errors import PolypythiaError

# Suffixes of the four stored linear layers of a GPT-NeoX block (any prefix, e.g. "module.").
_QKV = "attention.query_key_value"
_BLOCK_LINEARS = (_QKV, "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_LAYER_PATTERN = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(" + "|".join(re.escape(n) for n in _BLOCK_LINEARS) + r")\.(weight|bias)$"
)

# The parameters of a transformers 4.x GPTNeoXForCausalLM, below "gpt_neox." (any prefix before it) ...
_HF4_BODY = re.compile(
    r"(?:^|\.)(?P<tail>embed_in\.weight|final_layer_norm\.(?:weight|bias)|layers\.\d+\.(?:input_layernorm|"
    r"post_attention_layernorm|" + "|".join(re.escape(n) for n in _BLOCK_LINEARS) + r")\.(?:weight|bias))$"
)
# ... and its output head: "embed_out" under transformers 4.x, "lm_head" under 5.x.
_HF4_HEAD = re.compile(r"(?:^|\.)(?:embed_out|lm_head)\.weight$")


class WeightStatsError(PolypythiaError, ValueError):
    """A model or checkpoint that the weight statistics cannot be computed from."""


def split_qkv(qkv_weight: torch.Tensor, num_attention_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused GPT-NeoX (3 d, d) query_key_value weight into Q, K and V, each (d, d).

    Rows are [heads, 3, head_dim]-interleaved (see the module docstring); each returned matrix
    has rows ordered (head, head_dim), as the model's own query/key/value states are.
    """
    rows, d_model = qkv_weight.shape
    if rows != 3 * d_model or d_model % num_attention_heads:
        raise WeightStatsError(
            f"query_key_value weight of shape {tuple(qkv_weight.shape)} does not fit "
            f"{num_attention_heads} heads: expected (3 d, d) with d divisible by the head count."
        )
    head_dim = d_model // num_attention_heads
    per_head = qkv_weight.reshape(num_attention_heads, 3, head_dim, d_model)
    return tuple(per_head[:, j].reshape(d_model, d_model) for j in range(3))  # type: ignore[return-value]


_NO_BLOCKS = (
    "No GPT-NeoX block weights found (expected names like "
    "'gpt_neox.layers.0.attention.query_key_value.weight'); pass a GPTNeoXForCausalLM or its state dict."
)


def _block_parameters(state_dict: Mapping[str, torch.Tensor]) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, linear name, 'weight'|'bias') -> tensor, for the block linears of a state dict."""
    found = {}
    for name, tensor in state_dict.items():
        match = _LAYER_PATTERN.search(name)
        if match:
            found[(int(match.group(1)), match.group(2), match.group(3))] = tensor
    if not any(kind == "weight" for _, _, kind in found):
        raise WeightStatsError(_NO_BLOCKS)
    return found


def block_matrices(state_dict: Mapping[str, torch.Tensor], num_attention_heads: int) -> list[torch.Tensor]:
    """The ``hu`` matrices: Q, K, V, attention out, MLP in, MLP out, layer by layer."""
    weights = {
        (layer, _BLOCK_LINEARS.index(linear)): t
        for (layer, linear, kind), t in _block_parameters(state_dict).items()
        if kind == "weight"
    }
    matrices = []
    for (_, linear_index), tensor in sorted(weights.items()):
        if _BLOCK_LINEARS[linear_index] == _QKV:
            matrices.extend(split_qkv(tensor, num_attention_heads))
        else:
            matrices.append(tensor)
    return matrices


def hf4_name(name: str) -> str | None:
    """The transformers 4.x ``GPTNeoXForCausalLM.named_parameters()`` name of a state-dict entry.

    ``module.gpt_neox.layers.0.attention.dense.weight`` -> ``gpt_neox.layers.0.attention.dense.weight``,
    ``layers.0...`` (a bare GPTNeoXModel) -> ``gpt_neox.layers.0...``, ``lm_head.weight`` (5.x) ->
    ``embed_out.weight``. None for an entry that is no parameter of that model (e.g. a buffer).
    """
    if _HF4_HEAD.search(name):
        return "embed_out.weight"
    match = _HF4_BODY.search(name)
    return "gpt_neox." + match.group("tail") if match else None


def _polypythias_keeps(hf4: str | None) -> bool:
    """extract_metrics.py's rule on a 4.x parameter name: skip ``embed*`` and anything with ``norm``."""
    return hf4 is not None and not hf4.startswith("embed") and "norm" not in hf4.lower()


def polypythias_parameters(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weight matrices, biases) as the released PolyPythias extraction collects them.

    Every kept ``.weight`` becomes one matrix ``view(shape[0], -1)`` (the fused QKV stays one
    3 d x d matrix; ``gpt_neox.embed_in.weight`` is kept, the head skipped), every ``.bias`` a bias.
    """
    weights, biases, blocks = [], [], False
    for name, tensor in state_dict.items():
        hf4 = hf4_name(name)
        if not _polypythias_keeps(hf4):
            continue
        if hf4.endswith(".weight"):
            weights.append(tensor.reshape(tensor.shape[0], -1))
            blocks = blocks or ".layers." in hf4
        elif hf4.endswith(".bias"):
            biases.append(tensor.reshape(-1))
    if not blocks:
        raise WeightStatsError(_NO_BLOCKS)
    return weights, biases
