"""Time the 14 training-map features on a 410m-shaped GPT-NeoX under both definitions, against naive baselines.

Run:  PYTHONPATH=. python benchmarks/bench_weight_stats.py [--baseline-layers 2] [--definitions polypythias hu]

Builds a Pythia-410m-shaped GPTNeoXForCausalLM (vocab 50304, 24 layers, d 1024, 16 heads, MLP 4096,
rotary_pct 0.25, parallel residual, untied embeddings) with transformers' random init, then prints
the machine and, per definition, the seconds ``weight_stats`` takes on the whole model and a
side-by-side ratio against a naive baseline measured on the first ``--baseline-layers`` layers (a
full-model baseline takes minutes; pass 24 to run it):

* ``hu``: per matrix (Q, K, V split), numpy ``np.linalg.svd`` with full U and V, plus numpy norms;
* ``polypythias``: the released PolyPythias extraction (EleutherAI/pythia, branch polypythias,
  ``polypythias/training-maps/extract_metrics.py``) ported as written: per matrix ``torch.svd`` and
  ``torch.linalg.matrix_norm(X, 2)`` (a second SVD); its subset also holds the 50304 x 1024 input
  embedding, which this definition keeps (one tall SVD: the largest single cost).

The two implementations' features on the subset are also compared, as a cross-check.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import cpu_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from polypythia.evaluate.weight_stats import DEFINITIONS, FEATURE_NAMES, weight_stats

LAYERS_410M = 24
HEADS_410M = 16


def build_410m_state_dict() -> dict[str, torch.Tensor]:
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=1024,
        num_hidden_layers=LAYERS_410M,
        num_attention_heads=HEADS_410M,
        intermediate_size=4096,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(config)
    # Biases are zero at HF init; give them spread so the bias features are not trivially zero.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.01)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def first_layers(state_dict: dict[str, torch.Tensor], layers: int, embedding: bool = False) -> dict[str, torch.Tensor]:
    keep = tuple(f"gpt_neox.layers.{i}." for i in range(layers)) + (("gpt_neox.embed_in.",) if embedding else ())
    return {n: t for n, t in state_dict.items() if n.startswith(keep)}


def released_polypythias_features(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """extract_metrics.py as written (transformers 4.x names: the 5.x head ``lm_head`` is its ``embed_out``)."""
    weights, biases = [], []
    for name, param in state_dict.items():
        name = "embed_out.weight" if name == "lm_head.weight" else name
        if name.startswith("embed") or "norm" in name.lower():
            continue
        if name.endswith(".weight"):
            weights.append(param.view(param.shape[0], -1))
        elif name.endswith(".bias"):
            biases.append(param.view(param.shape[0], -1))
    rows = []
    for X in weights:
        l1, l2 = torch.linalg.vector_norm(X, ord=1).item(), torch.linalg.vector_norm(X, ord=2).item()
        trace, spectral = torch.trace(X).item(), torch.linalg.matrix_norm(X, ord=2).item()
        singular = torch.svd(X, compute_uv=False).S
        singular[singular < 1e-5] = 0.0
        rows.append(
            [
                l1,
                l2,
                trace,
                spectral,
                l1 / l2,
                trace / spectral,
                torch.mean(singular).item(),
                torch.var(singular).item(),
            ]
        )
    features = dict(zip(FEATURE_NAMES[:8], np.mean(rows, axis=0)))
    for prefix, parts in (("w", weights), ("b", biases)):
        flat = torch.cat([p.flatten() for p in parts])
        features.update(
            {
                f"{prefix}_mean": torch.mean(flat).item(),
                f"{prefix}_median": torch.median(flat).item(),
                f"{prefix}_var": torch.var(flat).item(),
            }
        )
    return {k: float(v) for k, v in features.items()}


def naive_numpy_features(state_dict: dict[str, torch.Tensor], heads: int) -> dict[str, float]:
    """The same 14 features under the hu definition, one full numpy SVD per matrix, written the obvious way."""
    matrices, weights, biases = [], [], []
    for name, tensor in state_dict.items():
        array = tensor.numpy()
        if "layernorm" in name or not name.endswith((".weight", ".bias")):
            continue
        if name.endswith(".bias"):
            biases.append(array.ravel())
            continue
        weights.append(array.ravel())
        if "query_key_value" in name:
            d = array.shape[1]
            per_head = array.reshape(heads, 3, d // heads, d)
            matrices.extend(per_head[:, j].reshape(d, d) for j in range(3))
        else:
            matrices.append(array)
    rows = []
    for m in matrices:
        s = np.linalg.svd(m, full_matrices=True, compute_uv=True)[1].astype(np.float64)
        l1, l2, tr = (
            np.abs(m).sum(dtype=np.float64),
            np.linalg.norm(m.astype(np.float64)),
            np.trace(m, dtype=np.float64),
        )
        rows.append([l1, l2, tr, s.max(), l1 / l2, tr / s.max(), s.mean(), s.var()])
    features = dict(zip(FEATURE_NAMES[:8], np.mean(rows, axis=0)))
    for prefix, parts in (("w", weights), ("b", biases)):
        flat = np.concatenate(parts).astype(np.float64)
        features.update(
            {f"{prefix}_mean": flat.mean(), f"{prefix}_median": np.median(flat), f"{prefix}_var": flat.var()}
        )
    return {k: float(v) for k, v in features.items()}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-layers", type=int, default=2, help="layers the side-by-side comparison uses")
    parser.add_argument(
        "--definitions",
        nargs="+",
        default=list(DEFINITIONS),
        choices=DEFINITIONS,
        help="weight-statistics definitions to time (default: both)",
    )
    args = parser.parse_args()

    print(f"machine: nproc={len(os.sched_getaffinity(0))} torch_threads={torch.get_num_threads()} cpu={cpu_model()!r}")
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    state_dict, build_seconds = timed(build_410m_state_dict)
    print(f"built 410m-shaped model in {build_seconds:.1f} s")

    for definition in args.definitions:
        matrices = 6 * LAYERS_410M if definition == "hu" else 4 * LAYERS_410M + 1  # + 1: the input embedding
        for attempt in ("first call", "second call"):  # the first pays LAPACK's one-time start-up
            _, full_seconds = timed(weight_stats, state_dict, num_attention_heads=HEADS_410M, definition=definition)
            print(
                f"[{definition}] weight_stats, full 410m ({LAYERS_410M} layers, {matrices} matrices), {attempt}: "
                f"{full_seconds:.1f} s"
            )

        embedding = definition == "polypythias"
        subset = first_layers(state_dict, args.baseline_layers, embedding)
        ours, ours_seconds = timed(weight_stats, subset, num_attention_heads=HEADS_410M, definition=definition)
        if definition == "hu":
            naive, naive_seconds = timed(naive_numpy_features, subset, HEADS_410M)
            baseline = "naive numpy"
        else:
            naive, naive_seconds = timed(released_polypythias_features, subset)
            baseline = "released code"
        what = f"first {args.baseline_layers} layers" + (" + input embedding" if embedding else "")
        print(
            f"[{definition}] {what}: weight_stats {ours_seconds:.1f} s, {baseline} {naive_seconds:.1f} s, "
            f"ratio {baseline}/ours = {naive_seconds / ours_seconds:.1f}x"
        )
        if not embedding:
            estimate = naive_seconds * LAYERS_410M / args.baseline_layers
            print(f"[{definition}] {baseline} on the full model, extrapolated by layer count: ~{estimate:.0f} s")
        # Means and medians sit near zero: measure their difference in standard deviations instead.
        scale = {k: abs(naive[k]) for k in FEATURE_NAMES}
        scale.update({f"{p}_{s}": naive[f"{p}_var"] ** 0.5 for p in "wb" for s in ("mean", "median")})
        worst = max(FEATURE_NAMES, key=lambda k: abs(ours[k] - naive[k]) / scale[k])
        print(
            f"[{definition}] largest difference between the two: {worst}, "
            f"{abs(ours[worst] - naive[worst]) / scale[worst]:.1e} (relative)"
        )
        if embedding:
            print(
                f"[{definition}] (the released code sums in float32: torch's float32 vector norms of the 51M-entry "
                "embedding are a few percent off on CPU, so l1/l2 may differ by that; ours accumulate in float64)"
            )


if __name__ == "__main__":
    main()
