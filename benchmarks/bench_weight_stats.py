"""Time the 14 training-map features on a 410m-shaped GPT-NeoX, against a naive numpy baseline.

Run:  PYTHONPATH=. python benchmarks/bench_weight_stats.py [--baseline-layers 2]

Builds a Pythia-410m-shaped GPTNeoXForCausalLM (vocab 50304, 24 layers, d 1024, 16 heads, MLP 4096,
rotary_pct 0.25, parallel residual, untied embeddings) with transformers' random init, then prints
the machine, the seconds ``weight_stats`` takes on the whole model, and a side-by-side ratio against
a naive baseline (per matrix, numpy ``np.linalg.svd`` with full U and V, plus numpy norms) measured
on the first ``--baseline-layers`` layers (a full-model baseline takes minutes; pass 24 to run it).
The two implementations' features on those layers are also compared, as a cross-check.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from common import cpu_model
from polypythia.evaluate.weight_stats import FEATURE_NAMES, weight_stats

LAYERS_410M = 24
HEADS_410M = 16


def build_410m_state_dict() -> dict[str, torch.Tensor]:
    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=1024, num_hidden_layers=LAYERS_410M, num_attention_heads=HEADS_410M,
        intermediate_size=4096, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(config)
    # Biases are zero at HF init; give them spread so the bias features are not trivially zero.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.01)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def first_layers(state_dict: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    keep = {f"gpt_neox.layers.{i}." for i in range(layers)}
    return {n: t for n, t in state_dict.items() if any(n.startswith(p) for p in keep)}


def naive_numpy_features(state_dict: dict[str, torch.Tensor], heads: int) -> dict[str, float]:
    """The same 14 features, one full numpy SVD per matrix, written the obvious way."""
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
        l1, l2, tr = np.abs(m).sum(dtype=np.float64), np.linalg.norm(m.astype(np.float64)), np.trace(m, dtype=np.float64)
        rows.append([l1, l2, tr, s.max(), l1 / l2, tr / s.max(), s.mean(), s.var()])
    features = dict(zip(FEATURE_NAMES[:8], np.mean(rows, axis=0)))
    for prefix, parts in (("w", weights), ("b", biases)):
        flat = np.concatenate(parts).astype(np.float64)
        features.update({f"{prefix}_mean": flat.mean(), f"{prefix}_median": np.median(flat), f"{prefix}_var": flat.var()})
    return {k: float(v) for k, v in features.items()}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-layers", type=int, default=2, help="layers the side-by-side comparison uses")
    args = parser.parse_args()

    print(f"machine: nproc={len(os.sched_getaffinity(0))} torch_threads={torch.get_num_threads()} cpu={cpu_model()!r}")
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    state_dict, build_seconds = timed(build_410m_state_dict)
    print(f"built 410m-shaped model in {build_seconds:.1f} s")

    for attempt in ("first call", "second call"):  # the first pays LAPACK's one-time start-up
        _, full_seconds = timed(weight_stats, state_dict, num_attention_heads=HEADS_410M)
        print(f"weight_stats, full 410m ({LAYERS_410M} layers, {6 * LAYERS_410M} matrices), {attempt}: {full_seconds:.1f} s")

    subset = first_layers(state_dict, args.baseline_layers)
    ours, ours_seconds = timed(weight_stats, subset, num_attention_heads=HEADS_410M)
    naive, naive_seconds = timed(naive_numpy_features, subset, HEADS_410M)
    print(f"first {args.baseline_layers} layers: weight_stats {ours_seconds:.1f} s, naive numpy {naive_seconds:.1f} s, "
          f"ratio naive/ours = {naive_seconds / ours_seconds:.1f}x")
    estimate = naive_seconds * LAYERS_410M / args.baseline_layers
    print(f"naive numpy on the full model, extrapolated by layer count: ~{estimate:.0f} s")
    # Means and medians sit near zero: measure their difference in standard deviations instead.
    scale = {k: abs(naive[k]) for k in FEATURE_NAMES}
    scale.update({f"{p}_{s}": naive[f"{p}_var"] ** 0.5 for p in "wb" for s in ("mean", "median")})
    worst = max(FEATURE_NAMES, key=lambda k: abs(ours[k] - naive[k]) / scale[k])
    print(f"largest difference between the two: {worst}, {abs(ours[worst] - naive[worst]) / scale[worst]:.1e} (relative)")


if __name__ == "__main__":
    main()
