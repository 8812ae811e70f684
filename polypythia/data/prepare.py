"""``polypythia-prepare``: tokenise your own text into a GPT-NeoX ``.bin/.idx`` pair to train on.

    polypythia-prepare corpus/ --tokenizer tokenizer.json --out data/mycorpus
    polypythia-prepare notes.txt shard.jsonl --train-tokenizer 8192 --out data/mycorpus

Inputs are ``.txt`` files (one document each) and ``.jsonl`` files (one JSON object per line, the
document's text under ``--text-key``), given as files or as folders searched recursively. Files
are read in sorted path order and streamed through the tokenizer in chunks, so the same inputs
always give the same bytes and the corpus never has to fit in memory. Every document is followed
by the end-of-document token, as GPT-NeoX's ``preprocess_data.py --append-eod`` does. The command
ends by printing the Hydra overrides that train on the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from polypythia.data.embedded import EOD_TOKEN, train_tokenizer
from polypythia.data.indexed import token_dtype, write_indexed_dataset
from polypythia.errors import DataError, PolypythiaError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
CHUNK_DOCUMENTS = 512  # documents per encode_batch call ...
CHUNK_BYTES = 8 * 2**20  # ... or fewer, once this much text is waiting


@dataclass
class PrepareResult:
    prefix: str  # absolute, without .bin/.idx
    tokenizer_file: str  # absolute
    num_files: int
    num_documents: int
    num_tokens: int
    num_empty_skipped: int

    def overrides(self) -> str:
        """The Hydra overrides that make a run train on this dataset."""
        return f"data=indexed data.path={self.prefix} data.tokenizer={self.tokenizer_file}"


def input_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files to read, in sorted order: explicit files as given, folders searched recursively."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found.update(
                p.resolve() for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
            )
        elif path.is_file():
            found.add(path.resolve())
        else:
            raise DataError(f"Input {raw} does not exist; give .txt/.jsonl files or folders that hold them.")
    if not found:
        listed = ", ".join(str(p) for p in paths) or "(none)"
        raise DataError(f"No .txt or .jsonl files found in {listed}; give files or folders that hold them.")
    return sorted(found, key=lambda p: p.parts)


def _decode_utf8(data: bytes, path: Path, line_number: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{path}, line {line_number}" if line_number else str(path)
        raise DataError(
            f"{where} is not valid UTF-8 (bad byte at offset {exc.start}); re-encode it as UTF-8 or leave it out."
        ) from None


def _jsonl_documents(path: Path, text_key: str) -> Iterator[tuple[str | None, int]]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                yield None, len(line)  # a blank line: no document, but bytes read
                continue
            try:
                record = json.loads(_decode_utf8(line, path, line_number))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {line_number} is not valid JSON ({exc.msg}); fix or remove that line."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(
                    f"{path}, line {line_number} has no string field '{text_key}'; pass --text-key with "
                    "the key that holds each document's text."
                )
            yield record[text_key], len(line)


def read_documents(files: Iterable[Path], text_key: str = "text") -> Iterator[tuple[str | None, int]]:
    """``(text, bytes read)`` of every document, file by file: ``.jsonl`` by line, others whole.

    A blank ``.jsonl`` line gives ``(None, bytes)``: no document, but progress all the same.
    """
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, text_key)
        else:
            data = path.read_bytes()
            yield _decode_utf8(data, path), len(data)


def load_tokenizer(tokenizer_file: str | Path):
    from tokenizers import Tokenizer

    if not Path(tokenizer_file).is_file():
        raise DataError(
            f"Tokenizer file {tokenizer_file} does not exist; give the path of a Hugging Face tokenizer.json "
            "or pass --train-tokenizer VOCAB to train one."
        )
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for unreadable files
        raise DataError(
            f"Cannot read tokenizer {tokenizer_file} ({exc}); give a Hugging Face tokenizer.json."
        ) from None


def eod_id(tokenizer, eod_token: str, tokenizer_file: str | Path) -> int:
    token_id = tokenizer.token_to_id(eod_token)
    if token_id is None:
        raise DataError(
            f"Tokenizer {tokenizer_file} has no token '{eod_token}'; pass --eod-token with the "
            "tokenizer's end-of-document token."
        )
    return token_id


def _chunks(documents: Iterator[tuple[str | None, int]]) -> Iterator[tuple[list[str], int, int]]:
    """``(texts, bytes read, empty documents skipped)``, a bounded amount of text at a time."""
    texts: list[str] = []
    chunk_bytes = empty = 0
    for text, size_bytes in documents:
        chunk_bytes += size_bytes
        if text:
            texts.append(text)
        elif text is not None:
            empty += 1
        if len(texts) >= CHUNK_DOCUMENTS or chunk_bytes >= CHUNK_BYTES:
            yield texts, chunk_bytes, empty
            texts, chunk_bytes, empty = [], 0, 0
    if texts or chunk_bytes or empty:
        yield texts, chunk_bytes, empty


def _progress_bar(total_bytes: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tokenising",
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
    )


def _output_prefix(out: str | Path) -> Path:
    prefix = str(Path(out).expanduser().resolve())
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return Path(prefix)


def prepare(
    inputs: Iterable[str | Path],
    out: str | Path,
    tokenizer_file: str | Path | None = None,
    train_vocab_size: int | None = None,
    text_key: str = "text",
    eod_token: str = EOD_TOKEN,
    overwrite: bool = False,
    quiet: bool = True,
) -> PrepareResult:
    """Tokenise ``inputs`` into ``out.bin/.idx``, with a given tokenizer file or one trained here."""
    if (tokenizer_file is None) == (train_vocab_size is None):
        raise DataError("Give exactly one of --tokenizer PATH and --train-tokenizer VOCAB.")
    files = input_files(inputs)
    prefix = _output_prefix(out)
    _check_output_folder(out, prefix)
    for suffix in (".bin", ".idx"):
        if Path(f"{prefix}{suffix}").exists() and not overwrite:
            raise DataError(f"{prefix}{suffix} already exists; pass --overwrite or choose another --out.")
    try:
        if train_vocab_size is not None:
            tokenizer_file = Path(f"{prefix}.tokenizer.json")
            tokenizer = _train_and_save(files, text_key, train_vocab_size, tokenizer_file, quiet)
        else:
            tokenizer_file = Path(tokenizer_file).expanduser().resolve()
            tokenizer = load_tokenizer(tokenizer_file)
        eod = eod_id(tokenizer, eod_token, tokenizer_file)
        num_documents, num_empty, num_tokens = _write_tokens(prefix, files, tokenizer, eod, text_key, quiet)
    except OSError as exc:  # permissions changed, disk full, ... after the checks above
        if exc.filename is None:
            raise
        action = "written" if str(exc.filename).startswith(str(prefix)) else "read"
        fix = "choose a --out in a folder you can write to" if action == "written" else "check the input's permissions"
        raise DataError(f"{exc.filename} could not be {action} ({exc.strerror or exc}); {fix}.") from None
    return PrepareResult(str(prefix), str(tokenizer_file), len(files), num_documents, num_tokens, num_empty)


def _check_output_folder(out: str | Path, prefix: Path) -> None:
    """The folder of ``--out`` must be a folder this process can write in (or be creatable in one)."""
    folder = prefix.parent
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--out {out} cannot be written: {existing} is a file, not a folder; choose another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(
            f"--out {out} cannot be written: the folder {existing} is not writable; "
            "choose a --out in a folder you can write to."
        )


def _write_tokens(prefix: Path, files: list[Path], tokenizer, eod: int, text_key: str, quiet: bool):
    """Stream every document through the tokenizer into ``prefix.bin/.idx``; (documents, empty, tokens)."""
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    counts = {"documents": 0, "empty": 0}
    with _progress_bar(sum(p.stat().st_size for p in files), quiet) as bar:

        def token_arrays() -> Iterator[np.ndarray]:
            for texts, chunk_bytes, empty in _chunks(read_documents(files, text_key)):
                for encoding in tokenizer.encode_batch(texts):
                    yield np.asarray(encoding.ids + [eod], dtype=dtype)
                counts["documents"] += len(texts)
                counts["empty"] += empty
                bar.update(chunk_bytes)

        prefix.parent.mkdir(parents=True, exist_ok=True)
        try:
            num_tokens = write_indexed_dataset(prefix, token_arrays(), dtype)
        finally:  # an input error mid-stream leaves only the temporary files behind
            _remove(f"{prefix}.bin.tmp", f"{prefix}.idx.tmp")
    if counts["documents"] == 0:
        _remove(f"{prefix}.bin", f"{prefix}.idx")
        raise DataError("The inputs hold only empty documents; give files with some text in them.")
    return counts["documents"], counts["empty"], num_tokens


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _train_and_save(files: list[Path], text_key: str, vocab_size: int, path: Path, quiet: bool):
    if vocab_size < 300:
        raise DataError(f"--train-tokenizer {vocab_size} is too small; a byte-level BPE needs at least 300 tokens.")
    if not quiet:
        print(f"Training a {vocab_size}-token byte-level BPE tokenizer on {len(files)} files ...", file=sys.stderr)
    texts = (text for text, _ in read_documents(files, text_key) if text)
    tokenizer = train_tokenizer(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


def summary(result: PrepareResult) -> str:
    lines = [
        f"Wrote {result.prefix}.bin / .idx: {result.num_documents:,} documents, "
        f"{result.num_tokens:,} tokens, from {result.num_files:,} files.",
    ]
    if result.num_empty_skipped:
        lines.append(f"Skipped {result.num_empty_skipped:,} empty document(s).")
    lines += [f"Tokenizer: {result.tokenizer_file}", "Train on it with these overrides:", f"  {result.overrides()}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polypythia-prepare",
        description="Tokenise .txt/.jsonl files (or folders of them) into a GPT-NeoX .bin/.idx dataset.",
    )
    parser.add_argument("inputs", nargs="+", help=".txt / .jsonl files, or folders searched recursively")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="PATH", help="a Hugging Face tokenizer.json")
    source.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB",
        help="train a byte-level BPE of VOCAB tokens on the inputs; saved as PREFIX.tokenizer.json",
    )
    parser.add_argument("--text-key", default="text", help="key of the text in each .jsonl object (default: text)")
    parser.add_argument(
        "--eod-token", default=EOD_TOKEN, help=f"token appended to every document (default: {EOD_TOKEN})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = prepare(
            args.inputs,
            args.out,
            tokenizer_file=args.tokenizer,
            train_vocab_size=args.train_tokenizer,
            text_key=args.text_key,
            eod_token=args.eod_token,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
    except PolypythiaError as exc:
        print(f"polypythia-prepare: error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
