"""The embedded corpus: text that ships with every Python installation, so the demo needs no download.

Documents are the ``pydoc_data`` help topics and the top-level modules of the standard library's
sources. A byte-level BPE tokenizer (the kind GPT-NeoX uses) is trained on them with ``tokenizers``
and the corpus is tokenised into a GPT-NeoX ``.bin/.idx`` pair. Everything is cached under
``cache_dir`` in a folder named by the Python version and vocabulary size; the folder is built
under a temporary name and renamed, so concurrent jobs never see half of it.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from polypythia.data.indexed import token_dtype, write_indexed_dataset

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
CORPUS_VERSION = 1  # bump when the choice of documents changes


def corpus_documents() -> Iterator[str]:
    """Yield the corpus's documents in a fixed order: help topics, then stdlib modules by name."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for name in sorted(topics):
        yield topics[name]
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with GPT-NeoX's special tokens, trained on ``documents``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def embedded_dir(cache_dir: str | Path, vocab_size: int) -> Path:
    """Where the embedded corpus for this Python version and vocabulary lives."""
    py = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return Path(cache_dir).expanduser() / f"embedded-v{CORPUS_VERSION}-{py}-vocab{vocab_size}"


def ensure_embedded_dataset(cache_dir: str | Path, vocab_size: int) -> Path:
    """Build (once) and return the folder holding ``tokenizer.json`` and ``corpus.bin/.idx``."""
    target = embedded_dir(cache_dir, vocab_size)
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        documents = list(corpus_documents())
        tokenizer = train_tokenizer(documents, vocab_size)
        tokenizer.save(str(work / "tokenizer.json"))
        eod = tokenizer.token_to_id(EOD_TOKEN)
        encodings = tokenizer.encode_batch(documents)
        dtype = token_dtype(tokenizer.get_vocab_size())
        write_indexed_dataset(work / "corpus", (np.asarray(e.ids + [eod], dtype=dtype) for e in encodings), dtype)
        (work / "COMPLETE").write_text("ok\n")
        try:
            os.rename(work, target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "COMPLETE").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
