"""What a training job reads: the configured dataset as rows, its seeded order, and its tokenizer."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polypythia.config.jobconfig import JobConfig
from polypythia.data.embedded import ensure_embedded_dataset
from polypythia.data.indexed import IndexedDataset
from polypythia.data.sequences import SeededOrder, TokenSequences, out_of_vocabulary, vocabulary_fix
from polypythia.errors import DataError


def dataset_files(cfg: JobConfig) -> tuple[str, str]:
    """(``.bin/.idx`` prefix, ``tokenizer.json``) of the configured data, building the embedded corpus if needed."""
    if cfg.data.kind == "embedded":
        folder = ensure_embedded_dataset(cfg.data.cache_dir, cfg.data.vocab_size)
        return str(folder / "corpus"), str(folder / "tokenizer.json")
    return cfg.data.path, cfg.data.tokenizer


def tokenizer_vocab_size(tokenizer_file: str) -> int:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(tokenizer_file).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for unreadable files
        raise DataError(
            f"Cannot read tokenizer {tokenizer_file} ({exc}); give a Hugging Face tokenizer.json."
        ) from None


@dataclass
class TrainingData:
    sequences: TokenSequences
    order: SeededOrder
    global_batch_size: int
    tokenizer_file: str
    tokenizer_vocab_size: int
    vocab_size: int | None = None  # the model's embedding rows: every batch's ids are checked against it

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Rank's rows of the batch trained on at 0-based optimizer step ``step``; a token id the model
        has no embedding row for is a DataError naming the step and row (the one-line form of the
        IndexError torch's embedding would raise, or of a wrong lookup on a GPU)."""
        indices = self.order.batch_indices(step, self.global_batch_size, rank, world_size)
        rows = self.sequences.rows(indices)
        found = None if self.vocab_size is None else out_of_vocabulary(rows, self.vocab_size)
        if found:
            row = int(indices[found[0]])
            raise DataError(
                f"The batch of step {step + 1} holds token id {found[1]} in row {row} of {self.sequences.prefix}.bin "
                f"(polypythia-batch --step {step + 1} shows it), beyond {vocabulary_fix(self.vocab_size)}."
            )
        return rows

    def save_tokenizer(self, directory: Path) -> None:
        """Write the tokenizer so the checkpoint folder loads with transformers' Auto classes."""
        shutil.copyfile(self.tokenizer_file, directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": "<|padding|>",
                    "model_max_length": 2048,
                },
                indent=1,
            )
        )


def load_training_data(cfg: JobConfig) -> TrainingData:
    prefix, tokenizer_file = dataset_files(cfg)
    tokenizer_size = tokenizer_vocab_size(tokenizer_file)
    vocab_size = cfg.model.padded_vocab_size(tokenizer_size)  # as train() builds the model
    sequences = TokenSequences(IndexedDataset(prefix), cfg.budget.seq_length, cfg.data.valid_fraction, vocab_size)
    return TrainingData(
        sequences=sequences,
        order=SeededOrder(sequences.num_train_rows, cfg.effective_data_seed),
        global_batch_size=cfg.budget.global_batch_size,
        tokenizer_file=tokenizer_file,
        tokenizer_vocab_size=tokenizer_size,
        vocab_size=vocab_size,
    )
