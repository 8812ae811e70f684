"""The last failure cases of issue #14, each reproduced: a home Hydra cannot write, a disk that fills
during a checkpoint, a corrupt checkpoint in ``python -m polypythia.evaluate``, and token ids beyond
the model's vocabulary. Each is one line saying what and how to fix it; nothing earlier is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, write_small_pair

from polypythia.train.distributed import RENDEZVOUS_ENV

# ---------------------------------------------------------------------------------------------
# a POLYPYTHIA_HOME that Hydra cannot write its own folder into (issue #14, item 12)


def launch_quick(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``launch.py`` with ``POLYPYTHIA_HOME=home``: expected to stop before anything starts."""
    env = {k: v for k, v in os.environ.items() if k not in (*RENDEZVOUS_ENV, "MLFLOW_TRACKING_URI")}
    env["POLYPYTHIA_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


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
    assert_one_line(
        out,
        f"POLYPYTHIA_HOME={home} cannot be written ({tmp_path / 'file'} is a file, not a folder)",
        "set POLYPYTHIA_HOME (or home=...)",
    )
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
    assert (
        output_folder_problem(str(tmp_path / "home"), "hydra.run.dir", str(tmp_path / "home" / "hydra" / "t")) is None
    )
    assert (tmp_path / "home" / "hydra" / "t").is_dir()  # created, as Hydra would next
    message = output_folder_problem(str(tmp_path / "home"), "hydra.sweep.dir", str(tmp_path / "file" / "x"))
    assert message == (
        f"hydra.sweep.dir={tmp_path / 'file' / 'x'} cannot be written ({tmp_path / 'file'} is a file, "
        "not a folder); set hydra.sweep.dir to a folder you can write to."
    )
    home = tmp_path / "file" / "home"
    message = output_folder_problem(str(home), "hydra.run.dir", str(home / "hydra" / "t"))
    assert message.startswith(f"home={home} (POLYPYTHIA_HOME) cannot be written")


def test_read_only_home_as_os_access_reports_it(tmp_path, monkeypatch):
    """A home with mode 0500, as anyone but root sees it (these tests run as root)."""
    from hydra_plugins.polypythia_launcher.output_folder import output_folder_problem

    home = tmp_path / "home"
    home.mkdir()
    real = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, *a, **k: False if Path(path) == home and mode & os.W_OK else real(path, mode, *a, **k),
    )
    monkeypatch.setenv("POLYPYTHIA_HOME", str(home))
    assert output_folder_problem(str(home), "hydra.sweep.dir", str(home / "hydra" / "multirun" / "t")) == (
        f"POLYPYTHIA_HOME={home} cannot be written (the folder {home} is not writable), so Hydra cannot create "
        f"{home / 'hydra' / 'multirun' / 't'}; set POLYPYTHIA_HOME (or home=...) to a folder you can write to."
    )
    assert not (home / "hydra").exists()


# ---------------------------------------------------------------------------------------------
# token ids beyond the model's vocabulary (issue #14, item 12): a sample before anything starts,
# every batch when it is trained on


def small_job(tmp_path: Path, folder: Path, **overrides) -> dict:
    """A tiny/smoke job on the .bin/.idx pair ``folder/d`` with ``folder/tokenizer.json``."""
    from helpers import indexed, job

    return job(tmp_path, **indexed(folder), **overrides)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A 300-token byte-level BPE tokenizer (a model of 384 rows) and a .bin/.idx pair of its ids."""
    folder = tmp_path_factory.mktemp("pair")
    write_small_pair(folder, repeats=6, copies=12)
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
    from polypythia.config.jobconfig import job_config
    from polypythia.config.preflight import short_count
    from polypythia.errors import ConfigError

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
        "model.vocab_size."
    )
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

    from polypythia.config.jobconfig import job_config
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
        "model.vocab_size."
    )
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
    with pytest.raises(
        DataError,
        match=rf"^Validation row {sequences.num_train_rows + 1} of .*d\.bin holds token id 400, "
        r"beyond the model's vocabulary of 384 rows",
    ):
        sequences.valid_rows()
    assert (
        np.asarray(TokenSequences(IndexedDataset(folder / "d"), 32, 0.2).valid_rows()).max() == 400
    )  # unchecked without a vocabulary


# ---------------------------------------------------------------------------------------------
# a disk that fills up during a checkpoint (issue #14, item 12): one line, nothing earlier lost


def sealed_checkpoint(run_dir: Path, step: int, payload: int = 4096) -> Path:
    """A resumable checkpoint folder as the checkpointer seals it (state/, trainer state, manifest)."""
    from polypythia.train import checkpoint as ckpt

    folder = ckpt.begin(run_dir, step)
    (folder / "state").mkdir()
    (folder / "state" / "weights.bin").write_bytes(os.urandom(payload))
    ckpt.save_trainer_state(folder, {"step": step, "world_size": 1, "loss": 1.0})
    return ckpt.commit(run_dir, step)


@pytest.mark.parametrize("failure", ["oserror", "safetensors", "torch"])
def test_a_full_disk_while_writing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    import errno

    from safetensors import SafetensorError

    from polypythia.errors import DiskFullError
    from polypythia.train import checkpoint as ckpt
    from polypythia.train import diskfull

    run_dir = tmp_path / "run"
    sealed_checkpoint(run_dir, 16)
    raised = {  # the three shapes a full disk takes (seen on a 1 MiB tmpfs with torch 2.13)
        "oserror": OSError(errno.ENOSPC, "No space left on device"),
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    }[failure]
    partial = ckpt.begin(run_dir, 32)
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 4096)  # what torch leaves: nothing
    with pytest.raises(DiskFullError) as caught:
        with ckpt.writing(partial, 32):
            (partial / "model.safetensors").write_bytes(b"half")
            raise raised
    message = str(caught.value)
    assert message.startswith(
        f"disk full at {run_dir / 'checkpoints'}: free space there or point the runs at another "
        "disk (runs_dir, or POLYPYTHIA_HOME); the checkpoint of step 32 was not written ("
    )
    assert message.endswith("), the checkpoint of step 16 is the newest and a relaunch resumes from it.")
    assert "\n" not in message and not partial.exists()  # the half-written folder gave its space back
    assert ckpt.latest_valid_checkpoint(run_dir).step == 16


def test_other_write_failures_stay_what_they_are(tmp_path, monkeypatch):
    from polypythia.train import checkpoint as ckpt
    from polypythia.train import diskfull

    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 10 << 30)
    sealed_checkpoint(tmp_path / "run", 0)
    partial = ckpt.begin(tmp_path / "run", 1)
    for error in (
        ValueError("a bug"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0"),
    ):
        with pytest.raises(type(error)):  # with 10 GB free, torch's failure is not a full disk
            with ckpt.writing(partial, 1):
                raise error
    assert partial.exists()  # left as step1.partial, which resume ignores (as before)
    assert ckpt.latest_valid_checkpoint(tmp_path / "run").step == 0


def test_a_checkpoint_that_cannot_fit_is_refused_before_it_is_started(tmp_path, monkeypatch):
    from polypythia.errors import DiskFullError
    from polypythia.train import checkpoint as ckpt
    from polypythia.train import diskfull

    run_dir = tmp_path / "run"
    previous = sealed_checkpoint(run_dir, 4, payload=3 << 20)
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 1 << 20)
    with pytest.raises(
        DiskFullError,
        match=r"the checkpoint of step 8 was not written \(1 MB free, the previous "
        r"checkpoint takes 3\.\d+ MB\), the checkpoint of step 4 is the newest",
    ):
        ckpt.begin(run_dir, 8)
    assert not ckpt.partial_dir(run_dir, 8).exists() and ckpt.latest_valid_checkpoint(run_dir).path == previous
    monkeypatch.setattr(diskfull, "free_bytes", lambda path: 10 << 20)
    assert ckpt.begin(run_dir, 8).is_dir()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a really full disk), where this process may mount one; unmounted afterwards."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected failures above cover the logic")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_torch_save_onto_a_really_full_disk(tiny_tmpfs):
    import torch

    from polypythia.errors import DiskFullError
    from polypythia.train import checkpoint as ckpt

    partial = ckpt.begin(tiny_tmpfs / "run", 0)
    with pytest.raises(
        DiskFullError,
        match=r"the checkpoint of step 0 was not written \(RuntimeError: \[enforce fail at "
        r"inline_container\.cc.*\), there is no earlier checkpoint\.$",
    ):
        with ckpt.writing(partial, 0):
            torch.save({"optimizer": torch.zeros(1 << 20)}, partial / "optim_states.pt")  # 4 MiB onto 1 MiB
    assert not partial.exists()


@pytest.mark.integration
def test_a_job_whose_disk_fills_fails_with_the_one_line_as_its_failure_reason(
    tmp_path, mlflow_uri, cache_dir, monkeypatch
):
    """A tiny job of one step (checkpoints 0 and 1) whose disk fills while step 1 is sealed."""
    import uuid

    from helpers import tiny_job
    from mlflow.tracking import MlflowClient

    from polypythia import runfolder
    from polypythia.errors import DiskFullError
    from polypythia.job import run as job
    from polypythia.train import checkpoint as ckpt

    real = ckpt.write_manifest

    def full_at_step1(directory):
        if directory.name == "step1.partial":
            raise OSError(28, "No space left on device", str(directory / "MANIFEST.json"))
        real(directory)

    monkeypatch.setattr(ckpt, "write_manifest", full_at_step1)
    cfg = tiny_job(
        tmp_path,
        cache_dir,
        study=f"full-{uuid.uuid4().hex[:8]}",
        budget__steps=1,
        tracking__system_metrics=False,
        train__eval_every_checkpoint=False,
        train__threads=1,
    )
    try:
        with pytest.raises(DiskFullError) as caught:
            job.run(cfg, tracking_uri=mlflow_uri)
    finally:
        job.teardown()
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    assert str(caught.value) == (
        f"disk full at {checkpoints}: free space there or point the runs at another disk (runs_dir, or POLYPYTHIA_HOME); "
        "the checkpoint of step 1 was not written (ENOSPC: No space left on device), the checkpoint of step 0 is the "
        "newest and a relaunch resumes from it."
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step0"]  # no step1.partial left
    assert ckpt.latest_valid_checkpoint(cfg.run_dir).step == 0
    run = MlflowClient(mlflow_uri).get_run(runfolder.read_mlflow_record(cfg.run_dir)["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == f"DiskFullError: {caught.value}"
