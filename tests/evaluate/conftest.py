"""A tiny Pythia-shaped GPT-NeoX shared by the evaluate tests."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

TINY_HEADS = 4


def build_tiny_model(seed: int = 0, bias_std: float = 0.05) -> GPTNeoXForCausalLM:
    """vocab 256, d 32, 2 layers, 4 heads, MLP 128; biases given spread so bias stats are not all zero."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=TINY_HEADS,
        intermediate_size=128,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, bias_std)
            elif name.endswith("layernorm.weight"):
                parameter.normal_(1.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model() -> GPTNeoXForCausalLM:
    return build_tiny_model()


@pytest.fixture
def make_tiny_model():
    """The builder itself, for tests that need a fresh or differently seeded model."""
    return build_tiny_model
