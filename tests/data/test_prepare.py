"""polypythia-prepare: folders of .txt/.jsonl into a .bin/.idx pair that a run trains on."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_job, train_here

from polypythia.data import prepare as prepare_module
from polypythia.data.embedded import EOD_TOKEN, train_tokenizer
from polypythia.data.indexed import IndexedDataset
from polypythia.data.prepare import main


def stdlib_texts(total_chars: int) -> list[str]:
    """Real text of about ``total_chars`` characters: standard-library modules in name order."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")[:6000]
        texts.append(text)
        size += len(text)
        if size >= total_chars:
            return texts
    return texts


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(stdlib_texts(60_000), 600).save(str(path))
    return path


def make_corpus(root: Path) -> list[str]:
    """A folder of .txt and .jsonl files; returns the documents in the order prepare must write them."""
    texts = stdlib_texts(12_000)
    (root / "b_sub").mkdir(parents=True)
    (root / "a.txt").write_text(texts[0])
    (root / "b_sub" / "c.jsonl").write_text(
        json.dumps({"text": texts[1], "id": 1}) + "\n\n" + json.dumps({"text": "héllo wörld"}) + "\n"
    )
    (root / "b_sub" / "d.txt").write_text(texts[2])
    (root / "notes.md").write_text("not an input")
    return [texts[0], texts[1], "héllo wörld", texts[2]]


def read_documents(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_documents_are_tokens_plus_eod_in_sorted_file_order(tmp_path, tokenizer_file, capsys, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setattr(prepare_module, "CHUNK_DOCUMENTS", 2)  # several encode_batch chunks
    expected_texts = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out" / "mycorpus"
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tokenizer_file), "--out", str(out), "--quiet"]) == 0
    tok = Tokenizer.from_file(str(tokenizer_file))
    eod = tok.token_to_id(EOD_TOKEN)
    expected = [tok.encode(t).ids + [eod] for t in expected_texts]
    assert read_documents(out) == expected
    assert IndexedDataset(out).dtype == np.uint16
    printed = capsys.readouterr().out
    assert f"{len(expected)} documents, {sum(map(len, expected)):,} tokens, from 3 files" in printed
    assert f"data=indexed data.path={out} data.tokenizer={tokenizer_file}" in printed


def test_single_files_and_text_key(tmp_path, tokenizer_file):
    from tokenizers import Tokenizer

    (tmp_path / "z.jsonl").write_text(json.dumps({"body": "second"}) + "\n")
    (tmp_path / "y.txt").write_text("first")
    out = tmp_path / "d"
    args = [
        str(tmp_path / "z.jsonl"),
        str(tmp_path / "y.txt"),
        "--text-key",
        "body",
        "--tokenizer",
        str(tokenizer_file),
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    tok = Tokenizer.from_file(str(tokenizer_file))
    eod = tok.token_to_id(EOD_TOKEN)
    assert read_documents(out) == [tok.encode("first").ids + [eod], tok.encode("second").ids + [eod]]


def test_train_tokenizer_saves_it_next_to_the_output(tmp_path, capsys):
    from tokenizers import Tokenizer

    texts = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out" / "c"
    assert main([str(tmp_path / "corpus"), "--train-tokenizer", "400", "--out", str(out), "--quiet"]) == 0
    tok_path = tmp_path / "out" / "c.tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    assert tok.get_vocab_size() == 400
    eod = tok.token_to_id(EOD_TOKEN)
    assert read_documents(out) == [tok.encode(t).ids + [eod] for t in texts]
    assert f"data.tokenizer={tok_path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_folder", "No .txt or .jsonl files found in"),
        ("bad_json", "bad.jsonl, line 2 is not valid JSON"),
        ("missing_key", "bad.jsonl, line 1 has no string field 'text'; pass --text-key"),
        ("missing_tokenizer", "nothing.json does not exist"),
        ("missing_eod", "has no token '</s>'; pass --eod-token"),
        ("exists", "already exists; pass --overwrite"),
    ],
)
def test_errors_are_one_clear_sentence(tmp_path, tokenizer_file, capsys, case, message):
    inputs, tokenizer, extra = tmp_path / "in", str(tokenizer_file), []
    inputs.mkdir()
    if case == "bad_json":
        (inputs / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    elif case == "missing_key":
        (inputs / "bad.jsonl").write_text('{"content": "x"}\n')
    elif case != "empty_folder":
        (inputs / "a.txt").write_text("some text")
    if case == "missing_tokenizer":
        tokenizer = str(tmp_path / "nothing.json")
    if case == "missing_eod":
        extra = ["--eod-token", "</s>"]
    if case == "exists":
        (tmp_path / "out.bin").write_bytes(b"")
    assert main([str(inputs), "--tokenizer", tokenizer, "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polypythia-prepare: error: ") and "\n" not in err
    assert message in err
    assert not list(tmp_path.glob("out.*.tmp"))  # no temporary files left behind


@pytest.mark.integration
def test_a_run_trains_on_a_prepared_dataset(tmp_path, cache_dir, tokenizer_file):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_texts(40_000)):
        (corpus / f"{i:03d}.txt").write_text(text)
    prefix = tmp_path / "data" / "stdlib"
    assert main([str(corpus), "--tokenizer", str(tokenizer_file), "--out", str(prefix), "--quiet"]) == 0
    cfg = tiny_job(
        tmp_path, cache_dir, data__kind="indexed", data__path=str(prefix), data__tokenizer=str(tokenizer_file)
    )
    result = train_here(cfg)
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
