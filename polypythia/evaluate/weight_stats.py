"""Per-checkpoint weight statistics: the 14 features that training maps are fitted on.

Hu, Chen, Saphra and Cho ("Latent State Models of Training Dynamics", TMLR 2023) describe a
checkpoint by statistics of its weight matrices; a Gaussian HMM over these features, fitted on
all seeds of a size, gives each seed its "training map". The features, per checkpoint: for every
weight matrix W, the L1 norm sum|w|, the L2 (Frobenius) norm, the trace (sum of the main diagonal,
also for non-square W), the spectral norm lambda_max (largest singular value), the code sparsity
L1/L2, the computational sparsity trace/lambda_max, and the mean and variance of W's singular
values, each averaged over the matrices (the ratios are taken per matrix, then averaged); then
the mean, median and variance of all weights pooled together, and of all biases.

Two definitions. The paper's prose and the code PolyPythias released for its training maps
(EleutherAI/pythia, branch ``polypythias``, ``polypythias/training-maps/extract_metrics.py``)
do not compute the same numbers, so both are offered, under the same 14 ``FEATURE_NAMES``:

``"polypythias"`` (the default): exactly what that released code computes, so that our maps can
be compared with the published PolyPythias ones. It iterates the parameters of a transformers 4.x
``GPTNeoXForCausalLM`` and skips names that *start with* ``embed`` and names containing ``norm``
(in lower case); every other ``.weight`` is one matrix ``param.view(shape[0], -1)`` and every
``.bias`` a bias. Hence:

* the fused ``attention.query_key_value`` weight (3 d x d) is *one* matrix;
* the input embedding ``gpt_neox.embed_in.weight`` does not start with ``embed``: it is *kept*,
  as a vocab x d matrix (its singular values cost one ``svdvals`` of a tall matrix), in the matrix
  averages and in the pooled weights; the output head, ``embed_out.weight`` under 4.x, is skipped.
  transformers 5.x names the head ``lm_head.weight``, which that rule would keep, so every name is
  first mapped to its 4.x name (:func:`hf4_name`; prefixes such as ``module.`` or ``_orig_mod.``
  are dropped; buffers that are no parameter of the model are ignored) and the rule applied to it;
* singular values below 1e-5 are set to 0 before their mean and variance (``lambda_max`` is
  ``torch.linalg.matrix_norm(W, 2)``, taken before);
* every variance (singular values, all weights, all biases) is ``torch.var``'s, unbiased
  (ddof = 1), and the medians are ``torch.median``'s: for an even count the *lower* of the two
  middle values.

``"hu"``: the paper's prose. Every GPT-NeoX block contributes six matrices: the attention query,
key, value and output projections and the MLP input and output projections. Hugging Face stores
Q, K and V fused in one ``attention.query_key_value.weight`` of shape (3 d, d) whose output rows
are laid out as [heads, 3, head_dim]: row ``h * 3 * head_dim + j * head_dim + i`` is dimension
``i`` of head ``h`` of Q (j = 0), K (j = 1) or V (j = 2). That is how ``GPTNeoXAttention.forward``
views its projection (``view(..., heads, 3 * head_dim)`` then ``chunk(3)``), so :func:`split_qkv`
splits the fused weight into three (d, d) matrices whose rows are ordered (head, head_dim), exactly
like the query/key/value states the model attends with; Q, K and V count as three matrices in every
average (which needs the head count). Embeddings (``gpt_neox.embed_in``, the head) and LayerNorms
are left out of every feature: the pooled weights and biases are those of the block linears only
(fused QKV, attention dense, MLP in and out). Every variance is the population variance (ddof = 0,
like ``numpy.var``); the median is ``numpy.median``'s (the mean of the two middle values when the
count is even); no singular value is zeroed.

Cost and precision: one ``torch.linalg.svdvals`` per matrix in float32, batched over matrices of
the same shape (a wide matrix is transposed to share a batch with the tall ones, e.g. the MLP output
projection with the input projection; that leaves its singular values unchanged); the other
statistics are accumulated in float64. The released code works in the parameters' dtype, and
torch's float32 vector norms of a 50304 x 1024 embedding are a few percent off on CPU (L1 by 5% in
torch 2.13), so its L1 and L2 can differ from ours by that rounding; everything else agrees to
float32 precision. ``benchmarks/bench_weight_stats.py`` times a 410m-shaped model under both
definitions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from polypythia.errors import PolypythiaError

FEATURE_NAMES: tuple[str, ...] = (
    "l1",
    "l2",
    "trace",
    "spectral",
    "code_sparsity",
    "computational_sparsity",
    "sv_mean",
    "sv_var",
    "w_mean",
    "w_median",
    "w_var",
    "b_mean",
    "b_median",
    "b_var",
)

# The two definitions (see the module docstring); FEATURE_NAMES are the same under both.
DEFINITIONS: tuple[str, ...] = ("polypythias", "hu")
DEFAULT_DEFINITION = "polypythias"

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

# extract_metrics.py zeroes singular values below this before their mean and variance.
_POLYPYTHIAS_SV_FLOOR = 1e-5

# How many same-shaped matrices go through svdvals at once: bounds the memory of the stack.
_SVD_BATCH_MATRICES = 16


class WeightStatsError(PolypythiaError, ValueError):
    """A model or checkpoint that the weight statistics cannot be computed from."""


def check_definition(definition: str) -> str:
    """``definition`` if it is one of ``DEFINITIONS``; a WeightStatsError otherwise."""
    if definition not in DEFINITIONS:
        raise WeightStatsError(
            f"Unknown weight-statistics definition '{definition}'; choose one of {', '.join(DEFINITIONS)}."
        )
    return definition


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
    for (layer, linear_index), tensor in sorted(weights.items()):
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


def _singular_values(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values (float32, descending) of each matrix, batched over equal shapes."""
    oriented = [m.float() if m.shape[0] >= m.shape[1] else m.float().T for m in matrices]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, matrix in enumerate(oriented):
        by_shape.setdefault(tuple(matrix.shape), []).append(index)
    result: list[torch.Tensor | None] = [None] * len(matrices)
    for indices in by_shape.values():
        for start in range(0, len(indices), _SVD_BATCH_MATRICES):
            chunk = indices[start : start + _SVD_BATCH_MATRICES]
            values = torch.linalg.svdvals(torch.stack([oriented[i] for i in chunk]))
            for i, row in zip(chunk, values):
                result[i] = row
    return result  # type: ignore[return-value]


def matrix_features(matrices: list[torch.Tensor], *, unbiased: bool = False, sv_floor: float = 0.0) -> dict[str, float]:
    """The eight per-matrix statistics, each averaged over ``matrices``.

    ``sv_floor``: singular values below it count as 0 in their mean and variance (not in the
    spectral norm); ``unbiased``: their variance with ddof = 1 instead of 0.
    """
    per_matrix = {name: [] for name in FEATURE_NAMES[:8]}
    for matrix, singular in zip(matrices, _singular_values(matrices)):
        matrix = matrix.double()
        singular = singular.double()
        l1, l2 = matrix.abs().sum().item(), torch.linalg.norm(matrix).item()
        trace, spectral = torch.diagonal(matrix).sum().item(), singular.max().item()
        if sv_floor:
            singular = torch.where(singular < sv_floor, torch.zeros_like(singular), singular)
        per_matrix["l1"].append(l1)
        per_matrix["l2"].append(l2)
        per_matrix["trace"].append(trace)
        per_matrix["spectral"].append(spectral)
        per_matrix["code_sparsity"].append(l1 / l2)
        per_matrix["computational_sparsity"].append(trace / spectral)
        per_matrix["sv_mean"].append(singular.mean().item())
        per_matrix["sv_var"].append(
            singular.var(unbiased=unbiased).item() if singular.numel() > unbiased else float("nan")
        )
    return {name: float(np.mean(values)) for name, values in per_matrix.items()}


def pooled_features(
    tensors: list[torch.Tensor], prefix: str, *, unbiased: bool = False, lower_median: bool = False
) -> dict[str, float]:
    """Mean, median and variance of all entries of ``tensors`` pooled together.

    ``unbiased``: the variance with ddof = 1 (``torch.var``) instead of 0 (``numpy.var``);
    ``lower_median``: for an even count the lower middle value (``torch.median``) instead of the
    mean of the two (``numpy.median``). Mean and variance are accumulated tensor by tensor in
    float64 (two passes), so no float64 copy of all weights is made; the median needs one float32
    copy of every entry.
    """
    nan = {f"{prefix}_mean": float("nan"), f"{prefix}_median": float("nan"), f"{prefix}_var": float("nan")}
    count = sum(t.numel() for t in tensors)
    if not count:
        return nan
    mean = sum(t.detach().double().sum().item() for t in tensors) / count
    squares = sum((t.detach().double() - mean).square().sum().item() for t in tensors)
    var = squares / (count - unbiased) if count > unbiased else float("nan")
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors]).numpy()
    if lower_median:
        middle = (count - 1) // 2
        flat.partition(middle)
        median = float(flat[middle])
    else:
        median = float(np.median(flat, overwrite_input=True))
    return {f"{prefix}_mean": mean, f"{prefix}_median": median, f"{prefix}_var": var}


def _as_state_dict(model_or_state_dict) -> tuple[Mapping[str, torch.Tensor], int | None]:
    """A name -> tensor mapping and the head count, if the object carries a config."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        config = getattr(model_or_state_dict, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        return model_or_state_dict.state_dict(), heads
    return model_or_state_dict, None


@torch.no_grad()
def weight_stats(
    model_or_state_dict, num_attention_heads: int | None = None, definition: str = DEFAULT_DEFINITION
) -> dict[str, float]:
    """The 14 training-map features (names in ``FEATURE_NAMES``) of a GPT-NeoX model.

    Accepts a ``GPTNeoXForCausalLM`` or a state dict with Hugging Face GPT-NeoX names (any
    prefix, transformers 4.x or 5.x naming). ``definition`` is ``"polypythias"`` (the released
    PolyPythias code) or ``"hu"`` (the paper's prose; see the module docstring). ``hu`` splits the
    fused QKV, so it needs the head count: read from the model's config, or ``num_attention_heads``
    for a state dict.
    """
    check_definition(definition)
    state_dict, config_heads = _as_state_dict(model_or_state_dict)
    if definition == "polypythias":
        weights, biases = polypythias_parameters(state_dict)
        features = matrix_features(weights, unbiased=True, sv_floor=_POLYPYTHIAS_SV_FLOOR)
        features.update(pooled_features(weights, "w", unbiased=True, lower_median=True))
        features.update(pooled_features(biases, "b", unbiased=True, lower_median=True))
        return {name: features[name] for name in FEATURE_NAMES}
    heads = num_attention_heads or config_heads
    if heads is None:
        raise WeightStatsError("num_attention_heads is needed to split the fused QKV weight of a state dict; pass it.")
    parameters = _block_parameters(state_dict)
    features = matrix_features(block_matrices(state_dict, heads))
    features.update(pooled_features([t for (_, _, k), t in sorted(parameters.items()) if k == "weight"], "w"))
    features.update(pooled_features([t for (_, _, k), t in sorted(parameters.items()) if k == "bias"], "b"))
    return {name: features[name] for name in FEATURE_NAMES}


def _checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors file(s) of a Hugging Face checkpoint folder, single or sharded."""
    single = checkpoint_dir / "model.safetensors"
    if single.exists():
        return [single]
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / shard for shard in shards]
    raise WeightStatsError(
        f"{checkpoint_dir} has no model.safetensors (nor a sharded index); save the model with save_pretrained."
    )


def weight_stats_from_checkpoint(checkpoint_dir: str | Path, definition: str = DEFAULT_DEFINITION) -> dict[str, float]:
    """The 14 features of a saved Hugging Face GPT-NeoX checkpoint folder, without building the model.

    Reads ``config.json`` (the head count, for ``hu``) and from the safetensors file(s) only the
    tensors the definition uses: the block linears, plus ``gpt_neox.embed_in.weight`` for
    ``polypythias`` (never the LayerNorms nor the head).
    """
    from safetensors import safe_open

    check_definition(definition)
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        raise WeightStatsError(f"{checkpoint_dir} has no config.json; point at a folder written by save_pretrained.")
    heads = json.loads(config_path.read_text())["num_attention_heads"]
    if definition == "polypythias":
        wanted = lambda name: _polypythias_keeps(hf4_name(name))  # noqa: E731
    else:
        wanted = lambda name: _LAYER_PATTERN.search(name) is not None  # noqa: E731
    state_dict = {}
    for path in _checkpoint_files(checkpoint_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if wanted(name):
                    state_dict[name] = handle.get_tensor(name)
    return weight_stats(state_dict, num_attention_heads=heads, definition=definition)
