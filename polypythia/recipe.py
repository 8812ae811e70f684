"""Constants of the Pythia recipe that the config schema and the model code both need, and the one
vocabulary padding rule.

From the GPT-NeoX configs of the Pythia suite (EleutherAI/pythia, ``models/*/pythia-*.yml``) and
Biderman et al., "Pythia", ICML 2023. Kept apart so that :mod:`polypythia.model` need not import
the config schema (which builds models and so imports :mod:`polypythia.model`), and so that the
config's checks need not import torch.
"""

import math

PYTHIA_MAX_POSITIONS = 2048  # GPT-NeoX "max-position-embeddings" of every Pythia size
VOCAB_MULTIPLE = 128  # GPT-NeoX "make-vocab-size-divisible-by"
GPT_NEOX_20B_TOKENS = 50277  # the tokenizer of every Pythia model (added tokens included)
# transformers' attention kernel: torch's scaled_dot_product_attention (``train.attn_implementation``)
ATTN_IMPLEMENTATION = "sdpa"


def padded_vocab_size(tokenizer_vocab_size: int) -> int:
    """The embedding rows for a tokenizer: its vocabulary padded to a multiple of :data:`VOCAB_MULTIPLE`,
    as GPT-NeoX pads it (50,277 -> 50,304)."""
    return int(math.ceil(tokenizer_vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


PYTHIA_VOCAB_SIZE = padded_vocab_size(GPT_NEOX_20B_TOKENS)  # 50,304 embedding rows
