"""The weight features (WEIGHT_STATISTICS) under both definitions: numpy/torch recomputations on a tiny GPT-NeoX, and
hand-computed values on small hand-built state dicts for every point where the two definitions differ."""

import math

import numpy as np
import pytest
import torch
from transformers.models.gpt_neox import modeling_gpt_neox

from polypythia.evaluate.weight_stats import (
    DEFAULT_DEFINITION,
    DEFINITIONS,
    FEATURE_NAMES,
    MATRIX_FEATURES,
    WEIGHT_STATISTICS,
    Statistic,
    WeightStatsError,
    block_matrices,
    hf4_name,
    split_qkv,
    weight_stats,
    weight_stats_from_checkpoint,
)

TINY_HEADS = 4  # as in conftest.build_tiny_model
# The training-map features studies have logged as weights/<name> (Hu et al. 2023; the released
# PolyPythias extraction computes the same set): the table must keep these names in this order.
PUBLISHED_FEATURES = (
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


def numpy_matrices(model) -> list[np.ndarray]:
    """Q, K, V, attention out, MLP in, MLP out per layer, split by rows as written in the docstring."""
    matrices = []
    for layer in model.gpt_neox.layers:
        qkv = layer.attention.query_key_value.weight.detach().numpy()
        d = qkv.shape[1]
        head_dim = d // TINY_HEADS
        for j in range(3):  # rows h*3*hd + j*hd + i
            rows = [h * 3 * head_dim + j * head_dim + i for h in range(TINY_HEADS) for i in range(head_dim)]
            matrices.append(qkv[rows])
        for linear in (layer.attention.dense, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h):
            matrices.append(linear.weight.detach().numpy())
    return [m.astype(np.float64) for m in matrices]


def numpy_features(model) -> dict[str, float]:
    rows = []
    for m in numpy_matrices(model):
        s = np.linalg.svd(m, compute_uv=False)
        l1, l2, spectral = np.abs(m).sum(), np.linalg.norm(m), np.linalg.norm(m, 2)
        trace = sum(m[i, i] for i in range(min(m.shape)))
        rows.append([l1, l2, trace, spectral, l1 / l2, trace / spectral, s.mean(), s.var()])
    features = dict(zip(MATRIX_FEATURES, np.mean(rows, axis=0)))
    block = [
        (n, p.detach().numpy().astype(np.float64))
        for n, p in model.named_parameters()
        if ".layers." in n and "layernorm" not in n
    ]
    weights = np.concatenate([p.ravel() for n, p in block if n.endswith("weight")])
    biases = np.concatenate([p.ravel() for n, p in block if n.endswith("bias")])
    assert weights.size == 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 128)  # layers x (qkv + dense + mlp in/out)
    for prefix, values in (("w", weights), ("b", biases)):
        features.update(
            {f"{prefix}_mean": values.mean(), f"{prefix}_median": np.median(values), f"{prefix}_var": values.var()}
        )
    return features


@pytest.mark.parametrize("definition", DEFINITIONS)
def test_names_are_the_statistics_of_the_table(tiny_model, definition):
    stats = weight_stats(tiny_model, definition=definition)
    assert tuple(stats) == FEATURE_NAMES == tuple(s.name for s in WEIGHT_STATISTICS)
    assert FEATURE_NAMES == PUBLISHED_FEATURES  # logged studies stay readable
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())


def test_a_new_statistic_is_one_row_of_the_table(tiny_model, monkeypatch):
    """A row added to WEIGHT_STATISTICS is computed under both definitions, per matrix or pooled."""
    from polypythia.evaluate import weight_stats as module

    rows = (
        Statistic("fro_squared", "matrix", lambda m: m.l2**2),
        Statistic("w_count", "weights", lambda p: float(p.count)),
    )
    before = {d: weight_stats(tiny_model, definition=d) for d in DEFINITIONS}
    monkeypatch.setattr(module, "WEIGHT_STATISTICS", module.WEIGHT_STATISTICS + rows)
    for definition in DEFINITIONS:
        stats = weight_stats(tiny_model, definition=definition)
        assert tuple(stats) == (*FEATURE_NAMES, "fro_squared", "w_count")
        assert {k: stats[k] for k in FEATURE_NAMES} == before[definition]
        assert stats["w_count"] > 0 and stats["fro_squared"] >= stats["l2"] ** 2  # Jensen: mean of squares


def test_default_definition_is_polypythias(tiny_model):
    assert DEFAULT_DEFINITION == "polypythias" and DEFINITIONS == ("polypythias", "hu")
    assert weight_stats(tiny_model) == weight_stats(tiny_model, definition="polypythias")
    assert weight_stats(tiny_model) != weight_stats(tiny_model, definition="hu")


def test_unknown_definition_is_refused(tiny_model, tmp_path):
    with pytest.raises(WeightStatsError, match="Unknown weight-statistics definition 'paper'"):
        weight_stats(tiny_model, definition="paper")
    with pytest.raises(WeightStatsError, match="choose one of polypythias, hu"):
        weight_stats_from_checkpoint(tmp_path, definition="paper")


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_hu_feature_matches_numpy(tiny_model, name):
    expected = numpy_features(tiny_model)[name]
    assert weight_stats(tiny_model, definition="hu")[name] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_six_matrices_per_layer_with_pythia_shapes(tiny_model):
    shapes = [tuple(m.shape) for m in block_matrices(tiny_model.state_dict(), TINY_HEADS)]
    assert shapes == [(32, 32)] * 4 + [(128, 32), (32, 128)] + [(32, 32)] * 4 + [(128, 32), (32, 128)]


def test_singular_values_match_numpy_svd(tiny_model):
    from polypythia.evaluate.weight_stats import _singular_values

    ours = _singular_values(block_matrices(tiny_model.state_dict(), TINY_HEADS))
    for matrix, values in zip(numpy_matrices(tiny_model), ours):
        np.testing.assert_allclose(values.numpy(), np.linalg.svd(matrix, compute_uv=False), rtol=1e-4, atol=1e-6)


def test_hu_embeddings_and_layernorms_do_not_count(tiny_model, make_tiny_model):
    changed = make_tiny_model()
    with torch.no_grad():
        changed.gpt_neox.embed_in.weight.mul_(10.0)
        changed.get_output_embeddings().weight.add_(3.0)
        for layer in changed.gpt_neox.layers:
            layer.input_layernorm.weight.add_(5.0)
            layer.post_attention_layernorm.bias.add_(5.0)
    assert weight_stats(changed, definition="hu") == weight_stats(tiny_model, definition="hu")


def test_qkv_split_matches_the_models_own_attention(monkeypatch, make_tiny_model):
    """Q, K, V from split_qkv reproduce the query/key/value states the model attends with."""
    model = make_tiny_model(seed=1)
    model.config._attn_implementation = "eager"
    captured, layer_inputs = {}, {}
    original = modeling_gpt_neox.eager_attention_forward

    def capture(module, query, key, value, *args, **kwargs):
        captured.setdefault(module.layer_idx, (query, key, value))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt_neox, "eager_attention_forward", capture)
    qkv_module = model.gpt_neox.layers[0].attention.query_key_value
    qkv_module.register_forward_pre_hook(lambda module, args: layer_inputs.setdefault(0, args[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 17, 99]]))
    query, key, value = captured[0]  # [batch, heads, seq, head_dim]
    hidden = layer_inputs[0][0]  # [seq, d]
    weights = split_qkv(qkv_module.weight, TINY_HEADS)
    biases = split_qkv(qkv_module.bias.reshape(-1, 1).expand(-1, 32), TINY_HEADS)
    head_dim = 32 // TINY_HEADS
    for states, w, b in zip((query, key, value), weights, biases):
        ours = (hidden @ w.T + b[:, 0]).reshape(-1, TINY_HEADS, head_dim).transpose(0, 1)
        # Rotary embedding leaves position 0 unchanged; value is never rotated.
        torch.testing.assert_close(ours[:, 0], states[0, :, 0])
    torch.testing.assert_close(
        (hidden @ weights[2].T + biases[2][:, 0]).reshape(-1, TINY_HEADS, head_dim).transpose(0, 1), value[0]
    )


def test_swapping_q_and_k_rows_changes_trace_only_if_split_is_right():
    """A naive split into consecutive thirds would give different Q/K/V: the layouts must differ."""
    weight = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(24, 8)
    q, k, v = split_qkv(weight, num_attention_heads=2)
    torch.testing.assert_close(q[:4], weight[0:4])  # head 0 of Q
    torch.testing.assert_close(k[:4], weight[4:8])  # head 0 of K
    torch.testing.assert_close(q[4:], weight[12:16])  # head 1 of Q
    torch.testing.assert_close(v[4:], weight[20:24])  # head 1 of V


def test_state_dict_needs_head_count(tiny_model):
    with pytest.raises(WeightStatsError, match="num_attention_heads"):
        weight_stats(tiny_model.state_dict(), definition="hu")
    hu = weight_stats(tiny_model, definition="hu")
    assert weight_stats(tiny_model.state_dict(), num_attention_heads=TINY_HEADS, definition="hu") == hu
    # polypythias keeps the fused QKV whole: no head count needed
    assert weight_stats(tiny_model.state_dict()) == weight_stats(tiny_model)


@pytest.mark.parametrize("definition", DEFINITIONS)
def test_state_dict_without_gpt_neox_blocks_is_refused(definition):
    with pytest.raises(WeightStatsError, match="No GPT-NeoX block weights"):
        weight_stats({"encoder.weight": torch.zeros(3, 3)}, num_attention_heads=1, definition=definition)
    with pytest.raises(WeightStatsError, match="No GPT-NeoX block weights"):  # an embedding alone is no model
        weight_stats({"gpt_neox.embed_in.weight": torch.ones(3, 2)}, num_attention_heads=1, definition=definition)


@pytest.mark.parametrize("definition", DEFINITIONS)
def test_checkpoint_folder_matches_model(tiny_model, tmp_path, definition):
    tiny_model.save_pretrained(tmp_path)
    from_disk = weight_stats_from_checkpoint(tmp_path, definition=definition)
    in_memory = weight_stats(tiny_model, definition=definition)
    assert from_disk == pytest.approx(in_memory, rel=1e-12)


def test_checkpoint_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"num_attention_heads": 4}')
    with pytest.raises(WeightStatsError, match="model.safetensors"):
        weight_stats_from_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- the "polypythias" definition


def released_extract_metrics(named_parameters) -> dict[str, float]:
    """EleutherAI/pythia (branch polypythias) polypythias/training-maps/extract_metrics.py, ported line by line.

    ``named_parameters`` carry transformers 4.x names (head = ``embed_out.weight``).
    """
    weights, biases = [], []
    for name, param in named_parameters:
        if name.startswith("embed"):
            continue
        if "norm" in name.lower():
            continue
        if name.endswith(".weight"):
            weights.append(param.data.view(param.shape[0], -1))
        elif name.endswith(".bias"):
            biases.append(param.data.view(param.shape[0], -1))
    per_matrix = {}
    for X in weights:
        l1, l2 = torch.linalg.vector_norm(X, ord=1).item(), torch.linalg.vector_norm(X, ord=2).item()
        trace, spectral = torch.trace(X).item(), torch.linalg.matrix_norm(X, ord=2).item()
        singular_vals = torch.svd(X, compute_uv=False).S
        singular_vals[singular_vals < 1e-5] = 0.0
        values = [
            l1,
            l2,
            trace,
            spectral,
            l1 / l2,
            trace / spectral,
            torch.mean(singular_vals).item(),
            torch.var(singular_vals).item(),
        ]
        for key, value in zip(MATRIX_FEATURES, values):
            per_matrix.setdefault(key, []).append(value)
    metrics = {key: float(np.mean(values)) for key, values in per_matrix.items()}
    for parts, prefix in ((weights, "w"), (biases, "b")):
        flat = torch.concatenate([x.flatten() for x in parts]).flatten()
        metrics.update(
            {
                f"{prefix}_mean": torch.mean(flat).item(),
                f"{prefix}_median": torch.median(flat).item(),
                f"{prefix}_var": torch.var(flat).item(),
            }
        )
    return metrics


def hf4_named_parameters(model):
    """The model's parameters under transformers 4.x names: the head was ``embed_out``, not ``lm_head``."""
    return [("embed_out.weight" if name == "lm_head.weight" else name, p) for name, p in model.named_parameters()]


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_polypythias_matches_the_released_code(tiny_model, name):
    expected = released_extract_metrics(hf4_named_parameters(tiny_model))[name]
    assert weight_stats(tiny_model, definition="polypythias")[name] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_hf4_names():
    assert (
        hf4_name("gpt_neox.layers.3.attention.query_key_value.weight")
        == "gpt_neox.layers.3.attention.query_key_value.weight"
    )
    assert hf4_name("module.gpt_neox.layers.0.mlp.dense_4h_to_h.bias") == "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"
    assert hf4_name("_orig_mod.gpt_neox.embed_in.weight") == "gpt_neox.embed_in.weight"
    assert (
        hf4_name("layers.0.attention.dense.weight") == "gpt_neox.layers.0.attention.dense.weight"
    )  # a bare GPTNeoXModel
    assert hf4_name("lm_head.weight") == hf4_name("embed_out.weight") == "embed_out.weight"
    assert hf4_name("gpt_neox.final_layer_norm.bias") == "gpt_neox.final_layer_norm.bias"
    assert hf4_name("gpt_neox.layers.0.attention.bias") is None  # the causal-mask buffer of old checkpoints
    assert hf4_name("gpt_neox.rotary_emb.inv_freq") is None


# Hand-built state dicts (d = 2, one layer, one head), with values chosen so every number is done by hand.
QKV = torch.tensor(
    [[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0], [5.0, 0.0], [0.0, 6.0]]
)  # Q = diag(1, 2), K = diag(3, 4), V = diag(5, 6)
QKV_BIAS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
LAYER = "gpt_neox.layers.0."


def hand_stats(state_dict, definition):
    return weight_stats(state_dict, num_attention_heads=1, definition=definition)


def test_fused_qkv_is_one_matrix_for_polypythias_and_three_for_hu():
    state = {LAYER + "attention.query_key_value.weight": QKV}
    poly, hu = hand_stats(state, "polypythias"), hand_stats(state, "hu")
    # polypythias: one 6 x 2 matrix. trace = 1 + 2; L1 = 21; L2 = sqrt(91); X^T X = diag(35, 56)
    assert poly["trace"] == pytest.approx(3.0)
    assert poly["l1"] == pytest.approx(21.0) and poly["l2"] == pytest.approx(math.sqrt(91.0))
    assert poly["spectral"] == pytest.approx(math.sqrt(56.0))
    assert poly["code_sparsity"] == pytest.approx(21.0 / math.sqrt(91.0))
    assert poly["computational_sparsity"] == pytest.approx(3.0 / math.sqrt(56.0))
    assert poly["sv_mean"] == pytest.approx((math.sqrt(56.0) + math.sqrt(35.0)) / 2)
    # hu: Q, K, V = diag(1, 2), diag(3, 4), diag(5, 6), averaged
    assert hu["trace"] == pytest.approx((3.0 + 7.0 + 11.0) / 3)
    assert hu["l1"] == pytest.approx(7.0)
    assert hu["l2"] == pytest.approx((math.sqrt(5.0) + math.sqrt(25.0) + math.sqrt(61.0)) / 3)
    assert hu["spectral"] == pytest.approx((2.0 + 4.0 + 6.0) / 3)
    assert hu["computational_sparsity"] == pytest.approx((3.0 / 2.0 + 7.0 / 4.0 + 11.0 / 6.0) / 3)
    assert hu["sv_mean"] == pytest.approx((1.5 + 3.5 + 5.5) / 3)


def test_singular_value_variance_is_unbiased_for_polypythias_only():
    state = {LAYER + "attention.query_key_value.weight": QKV}
    s1, s2 = math.sqrt(56.0), math.sqrt(35.0)
    assert hand_stats(state, "polypythias")["sv_var"] == pytest.approx(
        (s1 - s2) ** 2 / 2
    )  # ddof 1: two values, n - 1 = 1
    # hu: singular values (2, 1), (4, 3), (6, 5): each population variance (1/2)^2 = 0.25
    assert hand_stats(state, "hu")["sv_var"] == pytest.approx(0.25)


def test_weight_and_bias_variance_and_median():
    state = {LAYER + "attention.query_key_value.weight": QKV, LAYER + "attention.query_key_value.bias": QKV_BIAS}
    poly, hu = hand_stats(state, "polypythias"), hand_stats(state, "hu")
    # weights: 1, 2, 3, 4, 5, 6 and six zeros; mean 21 / 12 = 1.75; squared deviations 91 - 12 * 1.75^2 = 54.25
    assert poly["w_mean"] == hu["w_mean"] == pytest.approx(1.75)
    assert poly["w_var"] == pytest.approx(54.25 / 11)  # ddof 1
    assert hu["w_var"] == pytest.approx(54.25 / 12)  # ddof 0
    # 12 values sorted 0 0 0 0 0 0 1 2 ...: the two middle ones are 0 and 1
    assert poly["w_median"] == 0.0  # torch.median: the lower one
    assert hu["w_median"] == 0.5  # numpy.median: their mean
    # biases 1..6: mean 3.5, squared deviations 17.5, middle values 3 and 4
    assert poly["b_mean"] == hu["b_mean"] == pytest.approx(3.5)
    assert poly["b_var"] == pytest.approx(17.5 / 5) and hu["b_var"] == pytest.approx(17.5 / 6)
    assert poly["b_median"] == 3.0 and hu["b_median"] == 3.5


def test_odd_count_median_is_the_middle_value_for_both():
    state = {
        LAYER + "attention.dense.weight": torch.tensor([[4.0, 1.0, 9.0]]),
        LAYER + "attention.dense.bias": torch.tensor([2.0, 7.0, 5.0]),
    }
    for definition in DEFINITIONS:
        stats = hand_stats(state, definition)
        assert (stats["w_median"], stats["b_median"]) == (4.0, 5.0)


def test_input_embedding_counts_for_polypythias_only():
    head = {"embed_out.weight": torch.full((3, 2), 100.0), "lm_head.weight": torch.full((3, 2), -100.0)}
    state = {LAYER + "attention.query_key_value.weight": QKV, LAYER + "attention.query_key_value.bias": QKV_BIAS}
    embedded = {**state, "gpt_neox.embed_in.weight": torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), **head}
    poly = hand_stats(embedded, "polypythias")
    # two matrices: QKV (L1 21, trace 3) and the 3 x 2 embedding (L1 3, trace 3, singular values 2, 1)
    assert poly["l1"] == pytest.approx((21.0 + 3.0) / 2) and poly["trace"] == pytest.approx(3.0)
    assert poly["spectral"] == pytest.approx((math.sqrt(56.0) + 2.0) / 2)
    assert poly["sv_mean"] == pytest.approx(((math.sqrt(56.0) + math.sqrt(35.0)) / 2 + 1.5) / 2)
    # pooled weights: the 12 QKV entries and the 6 embedding entries (2, 1 and four zeros): sum 24 over 18
    assert poly["w_mean"] == pytest.approx(24.0 / 18)
    # hu leaves the embedding out, and both leave the head out (embed_out under 4.x, lm_head under 5.x)
    assert hand_stats(embedded, "hu") == hand_stats(state, "hu")
    without_head = {k: v for k, v in embedded.items() if k not in head}
    assert hand_stats(without_head, "polypythias") == poly


def test_layernorms_and_head_do_not_count_for_polypythias(tiny_model, make_tiny_model):
    changed = make_tiny_model()
    with torch.no_grad():
        changed.get_output_embeddings().weight.add_(3.0)
        changed.gpt_neox.final_layer_norm.bias.add_(5.0)
        for layer in changed.gpt_neox.layers:
            layer.input_layernorm.weight.add_(5.0)
            layer.post_attention_layernorm.bias.add_(5.0)
    assert weight_stats(changed) == weight_stats(tiny_model)
    with torch.no_grad():
        changed.gpt_neox.embed_in.weight.mul_(10.0)
    assert weight_stats(changed)["l1"] > weight_stats(tiny_model)["l1"]


def test_prefixed_names_give_the_same_features(tiny_model):
    state = tiny_model.state_dict()
    for prefix in ("module.", "_orig_mod."):
        prefixed = {prefix + name: tensor for name, tensor in state.items()}
        assert weight_stats(prefixed) == weight_stats(state)


def test_singular_values_below_1e_5_are_zeroed_for_polypythias_only():
    state = {LAYER + "attention.dense.weight": torch.tensor([[1.0, 0.0], [0.0, 5e-6]])}
    poly, hu = hand_stats(state, "polypythias"), hand_stats(state, "hu")
    assert poly["sv_mean"] == pytest.approx(0.5, abs=1e-12)  # (1 + 0) / 2
    assert poly["sv_var"] == pytest.approx(0.5, abs=1e-12)  # ((1 - 0.5)^2 + (0 - 0.5)^2) / 1
    assert hu["sv_mean"] == pytest.approx((1.0 + 5e-6) / 2, abs=1e-9)
    assert poly["spectral"] == hu["spectral"] == pytest.approx(1.0)  # the norm is taken before zeroing


def test_trace_of_non_square_matrices():
    state = {
        LAYER + "mlp.dense_h_to_4h.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
        LAYER + "mlp.dense_4h_to_h.weight": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
    }
    for definition in DEFINITIONS:  # the main diagonal: 1 + 4 and 1 + 5
        assert hand_stats(state, definition)["trace"] == pytest.approx((5.0 + 6.0) / 2)
