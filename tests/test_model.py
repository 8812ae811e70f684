"""The Pythia sizes, their parameter counts and Pythia's initialisation."""

import math

import pytest
import torch

from polypythia.config.jobconfig import model_preset
from polypythia.model import build_model, count_parameters, gpt_neox_config, init_stds, padded_vocab_size

# The published figures, written here independently of conf/model/*.yaml (the only size table the
# code reads): layers, d_model, heads and peak lr from EleutherAI/pythia models/*/pythia-*.yml and
# the Pythia paper (Biderman et al. 2023, arXiv:2304.01373, Table 1); parameter counts (total with
# the 50,304-row vocabulary, non-embedding) as the released checkpoints have them.
PUBLISHED = {
    "14m": (6, 128, 4, 1.0e-3, 14_067_712, 1_189_888),
    "31m": (6, 256, 8, 1.0e-3, 30_494_720, 4_739_072),
    "70m": (6, 512, 8, 1.0e-3, 70_426_624, 18_915_328),
    "160m": (12, 768, 12, 6.0e-4, 162_322_944, 85_056_000),
    "410m": (24, 1024, 16, 3.0e-4, 405_334_016, 302_311_424),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_sizes_match_published(name):
    s = model_preset(name)
    assert (s.name, s.num_layers, s.hidden_size, s.num_heads, s.lr) == (name, *PUBLISHED[name][:4])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    s = model_preset(name)
    assert count_parameters(gpt_neox_config(s.num_layers, s.hidden_size, s.num_heads)) == PUBLISHED[name][4:]
    assert count_parameters(s.gpt_neox_config()) == PUBLISHED[name][4:]


def test_published_init_stds():
    expected = {
        "14m": (0.0559, 0.0295),
        "31m": (0.0395, 0.0208),
        "70m": (0.0280, 0.0147),
        "160m": (0.0228, 0.0060),
        "410m": (0.0198, 0.0026),
    }
    for name, (small, wang) in expected.items():
        s = model_preset(name)
        got = init_stds(s.num_layers, s.hidden_size)
        assert got[0] == pytest.approx(small, abs=6e-5) and got[1] == pytest.approx(wang, abs=6e-5)


def test_config_is_pythia_block():
    cfg = gpt_neox_config(6, 512, 8)
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    rope = getattr(cfg, "rope_parameters", None) or {}
    assert rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", None)) == 0.25
    assert cfg.intermediate_size == 2048 and cfg.layer_norm_eps == 1e-5 and cfg.hidden_act == "gelu"
    assert padded_vocab_size(50277) == 50304


def test_initialisation_per_kind_of_matrix():
    layers, d = 6, 256
    model = build_model(layers, d, 8, 2048, weight_seed=3)
    small, wang = init_stds(layers, d)
    seen = set()
    for name, p in model.named_parameters():
        if "layernorm" in name or "final_layer_norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
            seen.add("ln")
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
            seen.add("bias")
        else:
            want = wang if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")) else small
            assert p.std().item() == pytest.approx(want, rel=0.03), name
            assert abs(p.mean().item()) < want * 0.02, name
            seen.add("wang" if want == wang else "small")
    assert seen == {"ln", "bias", "small", "wang"}
    assert model.get_output_embeddings().weight.data_ptr() != model.gpt_neox.embed_in.weight.data_ptr()


def test_weight_seed_decides_weights():
    a = build_model(2, 64, 4, 256, weight_seed=1)
    b = build_model(2, 64, 4, 256, weight_seed=1)
    c = build_model(2, 64, 4, 256, weight_seed=2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), n
    assert math.isclose(sum(p.numel() for p in a.parameters()), count_parameters(a.config)[0])


def test_model_config_builds_the_same_network():
    """``ModelConfig.build`` is :func:`build_model` with the config's shape."""
    tiny = model_preset("tiny")
    a = tiny.build(256, weight_seed=5)
    b = build_model(2, 64, 4, 256, weight_seed=5)
    assert a.config.to_dict() == b.config.to_dict()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert tiny.padded_vocab_size(8000) == 8064 and model_preset("70m").padded_vocab_size(50277) == 50304
