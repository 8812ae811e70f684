"""GPT-NeoX / Megatron indexed datasets (``.bin`` + ``.idx``), read and written with numpy memmaps.

This is the format of the pre-tokenised Pile that Pythia trained on. Layout of the ``.idx`` file,
little-endian: magic ``b"MMIDIDX\\x00\\x00"``; version u64 = 1; dtype code u8; number of sequences
u64; number of documents u64; sizes int32[n]; byte offsets int64[n]; doc_idx int64[docs].
The ``.bin`` file holds every document's tokens back to back.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from polypythia.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype GPT-NeoX would use: uint16 below 65,500 tokens, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def write_indexed_dataset(prefix: str | Path, documents: Iterable[np.ndarray], dtype) -> int:
    """Write ``documents`` (1-D token arrays) as ``prefix.bin`` / ``prefix.idx``; returns #tokens.

    Both files are written under temporary names and renamed at the end, so a reader never sees
    a half-written dataset.
    """
    dtype = np.dtype(dtype)
    bin_path, idx_path = _paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = bin_path.with_suffix(".bin.tmp"), idx_path.with_suffix(".idx.tmp")
    sizes: list[int] = []
    with open(tmp_bin, "wb") as out:
        for doc in documents:
            arr = np.asarray(doc, dtype=dtype)
            out.write(arr.tobytes(order="C"))
            sizes.append(arr.size)
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    offsets = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes_arr[:-1].astype(np.int64) * dtype.itemsize, out=offsets[1:])
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(tmp_idx, "wb") as out:
        out.write(MAGIC)
        out.write(struct.pack("<Q", VERSION))
        out.write(struct.pack("<B", _CODE_OF_DTYPE[dtype]))
        out.write(struct.pack("<Q", len(sizes)))
        out.write(struct.pack("<Q", len(doc_idx)))
        out.write(sizes_arr.astype("<i4").tobytes())
        out.write(offsets.astype("<i8").tobytes())
        out.write(doc_idx.astype("<i8").tobytes())
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    return int(sizes_arr.sum())


HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, number of sequences, number of documents


def _missing(path: Path) -> DataError:
    return DataError(
        f"Indexed dataset file {path} does not exist; point data.path at the common "
        "prefix of a .bin/.idx pair (or build one with polypythia-prepare)."
    )


def read_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    """(token dtype, number of sequences, number of documents) of an ``.idx`` file, checked against
    the file's size: a truncated or foreign file is a DataError naming it."""
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if header[:9] != MAGIC[: min(9, len(header))]:
        raise DataError(
            f"{idx_path} is not a GPT-NeoX/Megatron index file (bad magic bytes); rebuild the pair with polypythia-prepare."
        )
    if len(header) < HEADER_BYTES:
        raise DataError(
            f"The index file {idx_path} is truncated ({len(header)} bytes, shorter than its {HEADER_BYTES}-byte header); "
            "re-run polypythia-prepare to rebuild the .bin/.idx pair."
        )
    (version,) = struct.unpack("<Q", header[9:17])
    if version != VERSION:
        raise DataError(f"{idx_path} has index version {version}; only version 1 is supported.")
    code = header[17]
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path} names unknown dtype code {code}.")
    (n_seqs,) = struct.unpack("<Q", header[18:26])
    (n_docs,) = struct.unpack("<Q", header[26:34])
    expected = HEADER_BYTES + 12 * n_seqs + 8 * n_docs
    actual = idx_path.stat().st_size
    if actual < expected:
        raise DataError(
            f"The index file {idx_path} is truncated: its header lists {n_seqs:,} sequences and {n_docs:,} documents "
            f"({expected:,} bytes) but the file has {actual:,} bytes; re-run polypythia-prepare to rebuild the "
            ".bin/.idx pair."
        )
    return np.dtype(DTYPE_CODES[code]), n_seqs, n_docs


def _bin_size_problem(bin_path: Path, expected_bytes: int) -> DataError | None:
    actual_bytes = bin_path.stat().st_size
    if actual_bytes == expected_bytes:
        return None
    how = "truncated or mismatched" if actual_bytes < expected_bytes else "mismatched (longer than its index says)"
    return DataError(
        f"The token file {bin_path} is {how}: it holds {actual_bytes:,} bytes but its index describes "
        f"{expected_bytes:,}; re-run polypythia-prepare to rebuild the .bin/.idx pair."
    )


def check_indexed_files(prefix: str | Path) -> None:
    """Check a ``.bin/.idx`` pair without reading it: the ``.idx`` header against the ``.idx`` file's size,
    and the end of the last sequence (two numbers read) against the ``.bin`` file's size."""
    bin_path, idx_path = _paths(prefix)
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise _missing(path)
    dtype, n_seqs, _ = read_header(idx_path)
    if n_seqs == 0:
        expected = 0
    else:
        with open(idx_path, "rb") as f:
            f.seek(HEADER_BYTES + 4 * (n_seqs - 1))
            (last_size,) = struct.unpack("<i", f.read(4))
            f.seek(HEADER_BYTES + 4 * n_seqs + 8 * (n_seqs - 1))
            (last_offset,) = struct.unpack("<q", f.read(8))
        expected = last_offset + last_size * dtype.itemsize
    problem = _bin_size_problem(bin_path, expected)
    if problem:
        raise problem


class IndexedDataset:
    """Read-only view of a ``.bin/.idx`` pair: documents by index, or all tokens as one array."""

    def __init__(self, prefix: str | Path):
        bin_path, idx_path = _paths(prefix)
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise _missing(path)
        self.prefix = str(bin_path)[:-4]
        self.dtype, n_seqs, n_docs = read_header(idx_path)
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        pos = HEADER_BYTES
        self.sizes = np.frombuffer(index, dtype="<i4", count=n_seqs, offset=pos)
        pos += 4 * n_seqs
        self.offsets = np.frombuffer(index, dtype="<i8", count=n_seqs, offset=pos)
        pos += 8 * n_seqs
        self.doc_idx = np.frombuffer(index, dtype="<i8", count=n_docs, offset=pos)
        expected_bytes = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        problem = _bin_size_problem(bin_path, expected_bytes)
        if problem:
            raise problem
        self.tokens = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if expected_bytes else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


SAMPLE_CHUNKS = 16
SAMPLE_CHUNK_BYTES = 1 << 20


def sample_token_range(
    prefix: str | Path, chunks: int = SAMPLE_CHUNKS, chunk_bytes: int = SAMPLE_CHUNK_BYTES
) -> tuple[int, int, int]:
    """(smallest id, largest id, tokens read) of ``chunks`` evenly spaced slices of ``chunk_bytes``
    of the ``.bin`` file (all of it when it is smaller): 16 MiB by default, tens of milliseconds
    from a page cache, however large the dataset. A check before any job starts, not a proof: every
    batch is checked again when it is trained on."""
    bin_path, idx_path = _paths(prefix)
    dtype = read_header(idx_path)[0]
    tokens = np.memmap(bin_path, mode="r", dtype=dtype) if bin_path.stat().st_size >= dtype.itemsize else None
    if tokens is None or not len(tokens):
        return 0, 0, 0
    per_chunk = max(1, chunk_bytes // dtype.itemsize)
    if len(tokens) <= chunks * per_chunk:
        starts = [0]
        per_chunk = len(tokens)
    else:
        starts = np.linspace(0, len(tokens) - per_chunk, chunks).astype(np.int64).tolist()
    lows, highs = zip(*((int(s.min()), int(s.max())) for s in (tokens[a : a + per_chunk] for a in starts)))
    return min(lows), max(highs), per_chunk * len(starts)
