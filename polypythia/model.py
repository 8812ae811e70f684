"""The Pythia network: its GPT-NeoX configuration and Pythia's weight initialisation.

The architecture is transformers' ``GPTNeoXForCausalLM`` configured exactly as the Pythia suite
(parallel residual, rotary embeddings on 25% of each head, untied input/output embeddings).
transformers initialises every matrix as N(0, 0.02); Pythia (GPT-NeoX ``init_method: small_init``,
``output_layer_init_method: wang_init``) does not, so :func:`init_pythia_weights` re-initialises.

The sizes (14m ... 410m) are the files in ``conf/model/`` (:func:`polypythia.config.jobconfig.model_preset`);
:meth:`polypythia.config.schema.ModelConfig.build` builds one. Sources: EleutherAI/pythia
``models/*/pythia-*.yml`` (GPT-NeoX configs) and the Pythia paper (Biderman et al. 2023,
arXiv:2304.01373); GPT-NeoX ``megatron/model/init_functions.py`` for ``small_init`` and ``wang_init``.
"""

from __future__ import annotations

import math

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from polypythia.recipe import ATTN_IMPLEMENTATION, PYTHIA_MAX_POSITIONS, PYTHIA_VOCAB_SIZE
from polypythia.recipe import padded_vocab_size as padded_vocab_size  # the rule, re-exported (benchmarks)


def gpt_neox_config(
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    vocab_size: int = PYTHIA_VOCAB_SIZE,
    max_positions: int = PYTHIA_MAX_POSITIONS,
) -> GPTNeoXConfig:
    """A transformers config for a Pythia-shaped GPT-NeoX network."""
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=max_positions,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def init_stds(num_layers: int, hidden_size: int) -> tuple[float, float]:
    """(small_init std, wang_init std) of GPT-NeoX: sqrt(2 / 5d) and 2 / (L sqrt(d))."""
    small = math.sqrt(2.0 / (5.0 * hidden_size))
    wang = 2.0 / (num_layers * math.sqrt(hidden_size))
    return small, wang


# Parameter-name suffixes initialised with wang_init (the layers that write into the residual stream).
_WANG_INIT_SUFFIXES = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


@torch.no_grad()
def init_pythia_weights(model: GPTNeoXForCausalLM, generator: torch.Generator) -> None:
    """Re-initialise ``model`` in place as GPT-NeoX does for Pythia.

    small_init for embeddings, QKV, MLP up-projection and the unembedding; wang_init for the
    attention output and MLP down-projection; biases 0; LayerNorm weight 1 and bias 0.
    Parameters are visited in name order so that one generator seed gives one set of weights.
    """
    cfg = model.config
    small, wang = init_stds(cfg.num_hidden_layers, cfg.hidden_size)
    for name, param in sorted(model.named_parameters()):
        is_layernorm = "layernorm" in name or "final_layer_norm" in name
        if is_layernorm:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            std = wang if name.endswith(_WANG_INIT_SUFFIXES) else small
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def build_model(
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    vocab_size: int,
    weight_seed: int,
    max_positions: int = PYTHIA_MAX_POSITIONS,
    attn_implementation: str = ATTN_IMPLEMENTATION,
    qk_layernorm: bool = False,
) -> GPTNeoXForCausalLM:
    """Build a Pythia-initialised GPT-NeoX whose weights depend only on ``weight_seed``; with
    ``qk_layernorm``, the network of :mod:`polypythia.qknorm` (its norms start at weight 1, bias 0)."""
    config = gpt_neox_config(num_layers, hidden_size, num_heads, vocab_size, max_positions)
    if qk_layernorm:
        from polypythia.qknorm import QKNormGPTNeoXForCausalLM, qk_config

        config = qk_config(config)
    config._attn_implementation = attn_implementation
    model = QKNormGPTNeoXForCausalLM(config) if qk_layernorm else GPTNeoXForCausalLM(config)
    generator = torch.Generator().manual_seed(weight_seed)
    init_pythia_weights(model, generator)
    return model


def count_parameters(config: GPTNeoXConfig) -> tuple[int, int]:
    """(total, non-embedding) parameter counts, computed without allocating the weights."""
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.gpt_neox.embed_in.weight.numel() + model.get_output_embeddings().weight.numel()
    return total, total - embedding
