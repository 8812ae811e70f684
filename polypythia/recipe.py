"""Constants of the Pythia recipe that the config schema and the model code both need.

From the GPT-NeoX configs of the Pythia suite (EleutherAI/pythia, ``models/*/pythia-*.yml``) and
Biderman et al., "Pythia", ICML 2023. Kept apart so that :mod:`polypythia.model` need not import
the config schema (which builds models and so imports :mod:`polypythia.model`).
"""

PYTHIA_MAX_POSITIONS = 2048  # GPT-NeoX "max-position-embeddings" of every Pythia size
PYTHIA_VOCAB_SIZE = 50304  # GPT-NeoX-20B's tokenizer (50,277 tokens) padded to a multiple of 128
