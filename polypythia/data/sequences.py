"""Training sequences and the seeded order in which a run sees them.

The token stream of an indexed dataset is cut into rows of ``seq_length + 1`` tokens (the extra
token is the last target), each row starting ``seq_length`` tokens after the previous one, as in
GPT-NeoX. The last ``valid_fraction`` of rows is held out for validation.

The order is a permutation of the training rows drawn from ``data_seed`` alone (one permutation per
epoch), like the per-seed pre-shuffled Pile of PolyPythias. Step ``s`` trains on positions
``[s * B, (s + 1) * B)`` of that order, where ``B`` is the global batch in sequences; a worker of
a data-parallel run takes its contiguous slice of those positions, so the global batch of a step
does not depend on the number of workers, the process, or the machine (numpy's PCG64 is portable).
"""

from __future__ import annotations

import numpy as np

from polypythia.data.indexed import IndexedDataset
from polypythia.errors import DataError


def out_of_vocabulary(rows: np.ndarray, vocab_size: int) -> tuple[int, int] | None:
    """(row, token id) of the first id in ``rows`` that the model has no embedding row for (negative,
    or ``vocab_size`` and above), or None. A max and a min over the batch: 5 us for 16 x 2,049 ids,
    0.8 ms for a whole Pythia batch of 1,024 x 2,049 (2 cores), against a training step of seconds;
    the search for the row runs only when there is one to find."""
    if rows.size == 0 or (rows.max() < vocab_size and rows.min() >= 0):
        return None
    row, column = np.argwhere((rows >= vocab_size) | (rows < 0))[0]
    return int(row), int(rows[row, column])


def vocabulary_fix(vocab_size: int) -> str:
    return (
        f"the model's vocabulary of {vocab_size:,} rows (model.vocab_size); check that data.tokenizer is the "
        "tokenizer the data was prepared with (re-run polypythia-prepare with it), or raise model.vocab_size"
    )


class TokenSequences:
    """Fixed-length rows over the token stream of an indexed dataset. With ``vocab_size``, the
    validation rows are checked against the model's vocabulary (training batches are checked by
    :meth:`polypythia.train.data.TrainingData.batch`, which knows their step)."""

    def __init__(
        self, dataset: IndexedDataset, seq_length: int, valid_fraction: float = 0.0, vocab_size: int | None = None
    ):
        self.tokens = dataset.tokens
        self.prefix = dataset.prefix
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        total_rows = (dataset.num_tokens - 1) // seq_length
        num_valid = int(total_rows * valid_fraction)
        self.num_train_rows = total_rows - num_valid
        self.num_valid_rows = num_valid
        if self.num_train_rows < 1:
            raise DataError(
                f"The dataset at {dataset.prefix} has {dataset.num_tokens} tokens, too few for one "
                f"training sequence of {seq_length + 1} tokens; use more data or a shorter seq_length."
            )

    def row(self, i: int) -> np.ndarray:
        start = i * self.seq_length
        return np.asarray(self.tokens[start : start + self.seq_length + 1], dtype=np.int64)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows by global index as an int64 array [len(indices), seq_length + 1]."""
        if len(indices) == 0:
            return np.zeros((0, self.seq_length + 1), dtype=np.int64)
        return np.stack([self.row(int(i)) for i in indices])

    def valid_rows(self, max_rows: int | None = None) -> np.ndarray:
        """The held-out rows (the last ones of the stream)."""
        count = self.num_valid_rows if max_rows is None else min(max_rows, self.num_valid_rows)
        indices = np.arange(self.num_train_rows, self.num_train_rows + count)
        rows = self.rows(indices)
        found = None if self.vocab_size is None else out_of_vocabulary(rows, self.vocab_size)
        if found:
            raise DataError(
                f"Validation row {indices[found[0]]} of {self.prefix}.bin holds token id {found[1]}, "
                f"beyond {vocabulary_fix(self.vocab_size)}."
            )
        return rows


class SeededOrder:
    """The order of training rows for one data seed: a fresh permutation for every epoch."""

    def __init__(self, num_rows: int, data_seed: int):
        self.num_rows = num_rows
        self.data_seed = data_seed
        self._epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.data_seed, epoch])
            self._permutation = rng.permutation(self.num_rows)
            self._epoch = epoch
        return self._permutation

    def positions(self, start: int, count: int) -> np.ndarray:
        """Row indices at order positions ``[start, start + count)``."""
        out = np.empty(count, dtype=np.int64)
        for j, pos in enumerate(range(start, start + count)):
            epoch, within = divmod(pos, self.num_rows)
            out[j] = self._epoch_permutation(epoch)[within]
        return out

    def batch_indices(self, step: int, global_batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Row indices of ``rank``'s share of the global batch of ``step``."""
        per_rank = global_batch_size // world_size
        return self.positions(step * global_batch_size + rank * per_rank, per_rank)
