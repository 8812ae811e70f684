"""The last failure cases of issue #14, each reproduced: a home Hydra cannot write, a disk that fills
during a checkpoint, a corrupt checkpoint in ``python -m polypythia.evaluate``, and token ids beyond
the model's vocabulary. Each is one line saying what and how to fix it; nothing earlier is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from polypythia.train.distributed import RENDEZVOUS_ENV

# ---------------------------------------------------------------------------------------------
# a POLYPYTHIA_HOME that Hydra cannot write its own folder into (issue #14, item 12)


def launch_quick(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``launch.py`` with ``POLYPYTHIA_HOME=home``: expected to stop before anything starts."""
    env = {k: v for k, v in os.environ.items() if k not in (*RENDEZVOUS_ENV, "MLFLOW_TRACKING_URI")}
    env["POLYPYTHIA_HOME"] = str(home)
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line(out: subprocess.CompletedProcess, *fragments: str) -> str:
    err = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in err and "Traceback" not in out.stderr + out.stdout, out.stderr
    assert err.startswith("polypythia: error: ") and err.endswith("to a folder you can write to."), err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("mode", [["-m", "seed=1,2"], ["seed=1"]], ids=["sweep", "single-job"])
def test_a_home_under_a_file_is_one_line_and_starts_nothing(tmp_path, mode):
    """A home that cannot be created (here a path under a regular file: mkdir fails with
    NotADirectoryError, for root too) was a NotADirectoryError traceback from Hydra's mkdir."""
    (tmp_path / "file").write_text("x")
    home = tmp_path / "file" / "home"
    out = launch_quick(home, *mode, "model=tiny", "budget=smoke")
    assert_one_line(out, f"POLYPYTHIA_HOME={home} cannot be written ({tmp_path / 'file'} is a file, not a folder)",
                    "set POLYPYTHIA_HOME (or home=...)")
    assert "Ray" not in out.stdout and "MLflow" not in out.stdout  # nothing started


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_home_on_a_file_system_nobody_can_write_is_one_line(tmp_path):
    """/proc refuses new folders even to root, whatever os.access says: the folder is really created."""
    out = launch_quick(Path("/proc/polypythia-home"), "-m", "seed=1", "model=tiny", "budget=smoke")
    assert_one_line(out, "POLYPYTHIA_HOME=/proc/polypythia-home cannot be written (")


def test_output_folder_problem_names_the_key_outside_the_home(tmp_path, monkeypatch):
    from hydra_plugins.polypythia_launcher.output_folder import output_folder_problem

    (tmp_path / "file").write_text("x")
    monkeypatch.delenv("POLYPYTHIA_HOME", raising=False)
    assert output_folder_problem(str(tmp_path / "home"), "hydra.run.dir", str(tmp_path / "home" / "hydra" / "t")) is None
    assert (tmp_path / "home" / "hydra" / "t").is_dir()  # created, as Hydra would next
    message = output_folder_problem(str(tmp_path / "home"), "hydra.sweep.dir", str(tmp_path / "file" / "x"))
    assert message == (f"hydra.sweep.dir={tmp_path / 'file' / 'x'} cannot be written ({tmp_path / 'file'} is a file, "
                       "not a folder); set hydra.sweep.dir to a folder you can write to.")
    home = tmp_path / "file" / "home"
    message = output_folder_problem(str(home), "hydra.run.dir", str(home / "hydra" / "t"))
    assert message.startswith(f"home={home} (POLYPYTHIA_HOME) cannot be written")


def test_read_only_home_as_os_access_reports_it(tmp_path, monkeypatch):
    """A home with mode 0500, as anyone but root sees it (these tests run as root)."""
    from hydra_plugins.polypythia_launcher.output_folder import output_folder_problem

    home = tmp_path / "home"
    home.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
        False if Path(path) == home and mode & os.W_OK else real(path, mode, *a, **k)))
    monkeypatch.setenv("POLYPYTHIA_HOME", str(home))
    assert output_folder_problem(str(home), "hydra.sweep.dir", str(home / "hydra" / "multirun" / "t")) == (
        f"POLYPYTHIA_HOME={home} cannot be written (the folder {home} is not writable), so Hydra cannot create "
        f"{home / 'hydra' / 'multirun' / 't'}; set POLYPYTHIA_HOME (or home=...) to a folder you can write to.")
    assert not (home / "hydra").exists()


# ---------------------------------------------------------------------------------------------
# token ids beyond the model's vocabulary (issue #14, item 12): a sample before anything starts,
# every batch when it is trained on


def small_job(tmp_path: Path, folder: Path, **overrides) -> dict:
    """A tiny/smoke job on the .bin/.idx pair ``folder/d`` with ``folder/tokenizer.json``."""
    from test_bad_inputs import indexed, job

    return job(tmp_path, **indexed(folder), **overrides)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A 300-token byte-level BPE tokenizer (a model of 384 rows) and a .bin/.idx pair of its ids."""
    import numpy as np

    from polypythia.data.embedded import EOD_TOKEN, train_tokenizer
    from polypythia.data.indexed import write_indexed_dataset

    folder = tmp_path_factory.mktemp("pair")
    texts = ["the quick brown fox jumps over the lazy dog " * 6, "pack my box with five dozen liquor jugs " * 6] * 12
    tokenizer = train_tokenizer(texts, 300)
    tokenizer.save(str(folder / "tokenizer.json"))
    eod = tokenizer.token_to_id(EOD_TOKEN)
    docs = [np.asarray(e.ids + [eod], dtype=np.uint16) for e in tokenizer.encode_batch(texts)]
    write_indexed_dataset(folder / "d", docs, np.uint16)
    return folder


def copy_with_token(source: Path, target: Path, position: int, token: int) -> Path:
    """The pair at ``source`` copied to ``target`` with the token at ``position`` set to ``token``."""
    import numpy as np

    target.mkdir(exist_ok=True)
    for name in ("d.idx", "tokenizer.json"):
        (target / name).write_bytes((source / name).read_bytes())
    tokens = np.fromfile(source / "d.bin", dtype=np.uint16)
    tokens[position] = token
    tokens.tofile(target / "d.bin")
    return target


def test_token_ids_beyond_the_vocabulary_are_one_error_before_anything_starts(tmp_path, small_pair):
    from polypythia.config import job_config
    from polypythia.errors import ConfigError
    from polypythia.preflight import short_count

    job_config(small_job(tmp_path, small_pair))  # the clean pair fits the 384 rows
    bad = copy_with_token(small_pair, tmp_path / "bad", 100, 1000)
    tokens = (bad / "d.bin").stat().st_size // 2  # a small file is read whole
    with pytest.raises(ConfigError) as caught:
        job_config(small_job(tmp_path, bad))
    assert str(caught.value) == (
        f"data.path={bad / 'd'}: the token file {bad / 'd.bin'} holds token id 1,000 (in a sample of "
        f"{short_count(tokens)} tokens), beyond the model's vocabulary of "
        "384 rows (model.vocab_size=null: the tokenizer's 300 tokens padded to a multiple of 128); check that "
        "data.tokenizer is the tokenizer the data was prepared with (re-run polypythia-prepare with it), or raise "
        "model.vocab_size.")
    with pytest.raises(ConfigError, match=r"beyond the model's vocabulary of 512 rows \(model\.vocab_size=512\)"):
        job_config(small_job(tmp_path, bad, model__vocab_size=512))
    job_config(small_job(tmp_path, bad, model__vocab_size=1024))  # an explicit, larger vocabulary


def test_the_sample_reads_slices_of_a_large_file(tmp_path):
    import numpy as np

    from polypythia.data.indexed import sample_token_range, write_indexed_dataset

    tokens = np.arange(200_000, dtype=np.int32) % 5000
    tokens[150_000] = -7  # a signed dtype can hold negative ids
    write_indexed_dataset(tmp_path / "d", [tokens], np.int32)
    assert sample_token_range(tmp_path / "d") == (-7, 4999, 200_000)  # smaller than the sample: read whole
    low, high, read = sample_token_range(tmp_path / "d", chunks=4, chunk_bytes=4000)
    assert read == 4 * 1000 and low == 0 and high == 4999  # 4 slices of 1,000 ids; the -7 lies between them


def test_each_batch_is_checked_where_the_sample_saw_nothing(tmp_path, small_pair):
    """A bad id that the sample before the start missed (here written after validation) stops the
    batch that holds it, naming its step and row, instead of an IndexError deep in torch."""
    import numpy as np

    from polypythia.config import job_config
    from polypythia.errors import DataError
    from polypythia.train.data import load_training_data

    folder = copy_with_token(small_pair, tmp_path / "pair", 0, 5)
    cfg = job_config(small_job(tmp_path, folder, budget__steps=200))
    data = load_training_data(cfg)
    assert data.vocab_size == 384
    seq = cfg.budget.seq_length
    position = 7 * seq + 3  # inside training row 7 only
    tokens = np.memmap(folder / "d.bin", dtype=np.uint16, mode="r+")
    tokens[position] = 999
    tokens.flush()
    del tokens
    first = next(step for step in range(200) if 7 in data.order.batch_indices(step, data.global_batch_size))
    for step in range(first):
        data.batch(step)
    with pytest.raises(DataError) as caught:
        data.batch(first)
    assert str(caught.value) == (
        f"The batch of step {first + 1} holds token id 999 in row 7 of {folder / 'd'}.bin (polypythia-batch --step "
        f"{first + 1} shows it), beyond the model's vocabulary of 384 rows (model.vocab_size); check that "
        "data.tokenizer is the tokenizer the data was prepared with (re-run polypythia-prepare with it), or raise "
        "model.vocab_size.")
    data.sequences.rows(np.array([7]))  # the rows themselves stay readable (polypythia-batch shows them)


def test_validation_rows_are_checked_too(tmp_path, small_pair):
    import numpy as np

    from polypythia.data.indexed import IndexedDataset
    from polypythia.data.sequences import TokenSequences
    from polypythia.errors import DataError

    sequences = TokenSequences(IndexedDataset(small_pair / "d"), 32, valid_fraction=0.2, vocab_size=384)
    assert sequences.valid_rows().shape[0] == sequences.num_valid_rows
    folder = copy_with_token(small_pair, tmp_path / "pair", (sequences.num_train_rows + 1) * 32 + 5, 400)
    sequences = TokenSequences(IndexedDataset(folder / "d"), 32, valid_fraction=0.2, vocab_size=384)
    with pytest.raises(DataError, match=rf"^Validation row {sequences.num_train_rows + 1} of .*d\.bin holds token id 400, "
                       r"beyond the model's vocabulary of 384 rows"):
        sequences.valid_rows()
    assert np.asarray(TokenSequences(IndexedDataset(folder / "d"), 32, 0.2).valid_rows()).max() == 400  # unchecked without a vocabulary
