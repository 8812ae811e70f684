"""Per-checkpoint weight statistics: the features that training maps are fitted on (:data:`WEIGHT_STATISTICS`).

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
do not compute the same numbers, so both are offered, under the same ``FEATURE_NAMES``:

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

The statistics are a table, :data:`WEIGHT_STATISTICS`: a row names a statistic, says what it is taken
over (each weight matrix, then averaged over the matrices; or all weights, or all biases, pooled) and
gives its function (of a :class:`Matrix` or of a :class:`Pooled`). A new statistic is one new row;
``FEATURE_NAMES`` (the order of the ``weights/*`` metrics) follows the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from polypythia.evaluate.weight_parameters import (
    _LAYER_PATTERN,
    WeightStatsError,
    _block_parameters,
    _polypythias_keeps,
    block_matrices,
    hf4_name,
    polypythias_parameters,
)
from polypythia.evaluate.weight_parameters import split_qkv as split_qkv

# The two definitions (see the module docstring); the statistics are the same under both.
DEFINITIONS: tuple[str, ...] = ("polypythias", "hu")
DEFAULT_DEFINITION = "polypythias"

# extract_metrics.py zeroes singular values below this before their mean and variance.
_POLYPYTHIAS_SV_FLOOR = 1e-5

# How many same-shaped matrices go through svdvals at once: bounds the memory of the stack.
_SVD_BATCH_MATRICES = 16


def check_definition(definition: str) -> str:
    """``definition`` if it is one of ``DEFINITIONS``; a WeightStatsError otherwise."""
    if definition not in DEFINITIONS:
        raise WeightStatsError(
            f"Unknown weight-statistics definition '{definition}'; choose one of {', '.join(DEFINITIONS)}."
        )
    return definition


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


class Matrix:
    """One weight matrix as the per-matrix statistics read it: float64 copies of the matrix and of its
    singular values, computed once and shared by the statistics of the table."""

    def __init__(self, matrix: torch.Tensor, singular: torch.Tensor, unbiased: bool, sv_floor: float):
        self.matrix, self.all_singular = matrix.double(), singular.double()
        self.unbiased, self.sv_floor = unbiased, sv_floor

    @cached_property
    def l1(self) -> float:
        return self.matrix.abs().sum().item()

    @cached_property
    def l2(self) -> float:
        return torch.linalg.norm(self.matrix).item()

    @cached_property
    def trace(self) -> float:
        return torch.diagonal(self.matrix).sum().item()

    @cached_property
    def spectral(self) -> float:
        return self.all_singular.max().item()  # before the floor

    @cached_property
    def singular(self) -> torch.Tensor:
        """The singular values, those below ``sv_floor`` counted as 0 (for their mean and variance)."""
        values = self.all_singular
        return torch.where(values < self.sv_floor, torch.zeros_like(values), values) if self.sv_floor else values

    def singular_var(self) -> float:
        values = self.singular
        return values.var(unbiased=self.unbiased).item() if values.numel() > self.unbiased else float("nan")


class Pooled:
    """All entries of some tensors pooled together, as the pooled statistics read them.

    ``unbiased``: the variance with ddof = 1 (``torch.var``) instead of 0 (``numpy.var``);
    ``lower_median``: for an even count the lower middle value (``torch.median``) instead of the
    mean of the two (``numpy.median``). Mean and variance are accumulated tensor by tensor in
    float64 (two passes), so no float64 copy of all weights is made; the median needs one float32
    copy of every entry. NaN for no entries."""

    def __init__(self, tensors: list[torch.Tensor], unbiased: bool, lower_median: bool):
        self.tensors, self.unbiased, self.lower_median = tensors, unbiased, lower_median
        self.count = sum(t.numel() for t in tensors)

    @cached_property
    def mean(self) -> float:
        if not self.count:
            return float("nan")
        return sum(t.detach().double().sum().item() for t in self.tensors) / self.count

    def var(self) -> float:
        if self.count <= self.unbiased:
            return float("nan")
        squares = sum((t.detach().double() - self.mean).square().sum().item() for t in self.tensors)
        return squares / (self.count - self.unbiased)

    def median(self) -> float:
        if not self.count:
            return float("nan")
        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in self.tensors]).numpy()
        if self.lower_median:
            middle = (self.count - 1) // 2
            flat.partition(middle)
            return float(flat[middle])
        return float(np.median(flat, overwrite_input=True))


@dataclass(frozen=True)
class Statistic:
    """One row of :data:`WEIGHT_STATISTICS`: ``over`` is ``"matrix"`` (``of`` takes a :class:`Matrix`;
    the feature is its mean over the weight matrices), ``"weights"`` or ``"biases"`` (``of`` takes the
    :class:`Pooled` entries of all of them)."""

    name: str
    over: str
    of: Callable[[Matrix | Pooled], float]


WEIGHT_STATISTICS: tuple[Statistic, ...] = (
    Statistic("l1", "matrix", lambda m: m.l1),
    Statistic("l2", "matrix", lambda m: m.l2),
    Statistic("trace", "matrix", lambda m: m.trace),
    Statistic("spectral", "matrix", lambda m: m.spectral),
    Statistic("code_sparsity", "matrix", lambda m: m.l1 / m.l2),
    Statistic("computational_sparsity", "matrix", lambda m: m.trace / m.spectral),
    Statistic("sv_mean", "matrix", lambda m: m.singular.mean().item()),
    Statistic("sv_var", "matrix", lambda m: m.singular_var()),
    Statistic("w_mean", "weights", lambda p: p.mean),
    Statistic("w_median", "weights", lambda p: p.median()),
    Statistic("w_var", "weights", lambda p: p.var()),
    Statistic("b_mean", "biases", lambda p: p.mean),
    Statistic("b_median", "biases", lambda p: p.median()),
    Statistic("b_var", "biases", lambda p: p.var()),
)
FEATURE_NAMES: tuple[str, ...] = tuple(statistic.name for statistic in WEIGHT_STATISTICS)
MATRIX_FEATURES: tuple[str, ...] = tuple(s.name for s in WEIGHT_STATISTICS if s.over == "matrix")


def matrix_features(matrices: list[torch.Tensor], *, unbiased: bool = False, sv_floor: float = 0.0) -> dict[str, float]:
    """The per-matrix statistics of :data:`WEIGHT_STATISTICS`, each averaged over ``matrices``.

    ``sv_floor``: singular values below it count as 0 in their mean and variance (not in the
    spectral norm); ``unbiased``: their variance with ddof = 1 instead of 0.
    """
    rows = [s for s in WEIGHT_STATISTICS if s.over == "matrix"]
    per_matrix: dict[str, list[float]] = {s.name: [] for s in rows}
    for matrix, singular in zip(matrices, _singular_values(matrices)):
        view = Matrix(matrix, singular, unbiased, sv_floor)
        for statistic in rows:
            per_matrix[statistic.name].append(statistic.of(view))
    return {name: float(np.mean(values)) for name, values in per_matrix.items()}


def pooled_features(
    weights: list[torch.Tensor], biases: list[torch.Tensor], *, unbiased: bool = False, lower_median: bool = False
) -> dict[str, float]:
    """The pooled statistics of :data:`WEIGHT_STATISTICS`: over all ``weights`` or all ``biases``
    (see :class:`Pooled` for ``unbiased`` and ``lower_median``)."""
    pooled = {
        "weights": Pooled(weights, unbiased, lower_median),
        "biases": Pooled(biases, unbiased, lower_median),
    }
    return {s.name: s.of(pooled[s.over]) for s in WEIGHT_STATISTICS if s.over != "matrix"}


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
    """The training-map features (the statistics in :data:`WEIGHT_STATISTICS`) of a GPT-NeoX model.

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
        features.update(pooled_features(weights, biases, unbiased=True, lower_median=True))
        return {s.name: features[s.name] for s in WEIGHT_STATISTICS}
    heads = num_attention_heads or config_heads
    if heads is None:
        raise WeightStatsError("num_attention_heads is needed to split the fused QKV weight of a state dict; pass it.")
    parameters = _block_parameters(state_dict)
    features = matrix_features(block_matrices(state_dict, heads))
    by_kind = sorted(parameters.items())
    features.update(
        pooled_features(
            [t for (_, _, k), t in by_kind if k == "weight"], [t for (_, _, k), t in by_kind if k == "bias"]
        )
    )
    return {s.name: features[s.name] for s in WEIGHT_STATISTICS}


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
    """The features (:data:`WEIGHT_STATISTICS`) of a saved Hugging Face GPT-NeoX checkpoint folder, without
    building the model.

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
