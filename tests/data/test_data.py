"""Indexed .bin/.idx files, the embedded corpus and the seeded order."""

import struct

import numpy as np
import pytest

from polypythia.data.embedded import ensure_embedded_dataset
from polypythia.data.indexed import MAGIC, IndexedDataset, write_indexed_dataset
from polypythia.data.sequences import SeededOrder, TokenSequences
from polypythia.errors import DataError


def test_index_header_bytes_and_round_trip(tmp_path):
    docs = [np.array([5, 6, 7], dtype=np.uint16), np.array([1], dtype=np.uint16), np.array([9, 9], dtype=np.uint16)]
    write_indexed_dataset(tmp_path / "d", docs, np.uint16)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == MAGIC == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)  # version
    assert raw[17] == 8  # uint16
    assert struct.unpack("<QQ", raw[18:34]) == (3, 4)  # sequences, documents (+1)
    assert struct.unpack("<3i", raw[34:46]) == (3, 1, 2)  # sizes
    assert struct.unpack("<3q", raw[46:70]) == (0, 6, 8)  # byte offsets
    assert struct.unpack("<4q", raw[70:102]) == (0, 1, 2, 3)  # doc_idx
    assert len(raw) == 102
    assert (tmp_path / "d.bin").read_bytes() == np.concatenate(docs).tobytes()
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == 3 and ds.num_tokens == 6
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)


def test_truncated_bin_is_reported(tmp_path):
    write_indexed_dataset(tmp_path / "d", [np.arange(10, dtype=np.uint16)], np.uint16)
    (tmp_path / "d.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="truncated or mismatched"):
        IndexedDataset(tmp_path / "d")


def test_missing_dataset_is_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        IndexedDataset(tmp_path / "nothing")


def test_embedded_corpus_builds_once_and_reads(cache_dir):
    folder = ensure_embedded_dataset(cache_dir, 8192)
    assert ensure_embedded_dataset(cache_dir, 8192) == folder
    ds = IndexedDataset(folder / "corpus")
    assert ds.num_tokens > 500_000 and ds.dtype == np.uint16
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == 8192
    text = tok.decode(ds[len(ds) - 1][:50].tolist())
    assert len(text) > 20


def test_order_is_a_seeded_permutation():
    a, b, c = SeededOrder(1000, 1), SeededOrder(1000, 1), SeededOrder(1000, 2)
    first_epoch = a.positions(0, 1000)
    assert sorted(first_epoch) == list(range(1000))
    np.testing.assert_array_equal(first_epoch, b.positions(0, 1000))
    assert not np.array_equal(first_epoch, c.positions(0, 1000))
    second_epoch = a.positions(1000, 1000)
    assert sorted(second_epoch) == list(range(1000)) and not np.array_equal(first_epoch, second_epoch)


def test_global_batch_does_not_depend_on_workers():
    order = SeededOrder(500, 3)
    whole = order.batch_indices(7, 8)
    halves = np.concatenate([order.batch_indices(7, 8, rank=r, world_size=2) for r in range(2)])
    np.testing.assert_array_equal(whole, halves)


def test_rows_overlap_by_one_token(tmp_path):
    write_indexed_dataset(tmp_path / "d", [np.arange(100, dtype=np.uint16)], np.uint16)
    seqs = TokenSequences(IndexedDataset(tmp_path / "d"), seq_length=10, valid_fraction=0.25)
    assert (seqs.num_train_rows, seqs.num_valid_rows) == (7, 2)
    np.testing.assert_array_equal(seqs.row(1), np.arange(10, 21))
    assert seqs.valid_rows().shape == (seqs.num_valid_rows, 11)
