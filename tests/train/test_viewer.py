"""polypythia-batch: the batch behind the loss at MLflow step S, the same in every process."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, tiny_job

from polypythia.data.embedded import ensure_embedded_dataset
from polypythia.data.indexed import write_indexed_dataset
from polypythia.train.data import load_training_data
from polypythia.train.viewer import main

STEP = 5


def viewer_process(tmp_path, cache_dir, json_name, *overrides):
    """Start the viewer in its own process, as a user would: the run's overrides after --."""
    cmd = [
        sys.executable,
        "-m",
        "polypythia.train.viewer",
        "--step",
        str(STEP),
        "--json",
        str(tmp_path / json_name),
        "--",
        "model=tiny",
        "budget=smoke",
        f"data.cache_dir={cache_dir}",
        f"home={tmp_path}",
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_same_batch_in_separate_processes_and_equal_to_training_data(tmp_path, cache_dir):
    ensure_embedded_dataset(cache_dir, 8192)  # built once, not by three processes at once
    procs = {
        name: viewer_process(tmp_path, cache_dir, f"{name}.json", *ov)
        for name, ov in [("a", ["data_seed=3"]), ("b", ["data_seed=3"]), ("other", ["data_seed=4"])]
    }
    for proc in procs.values():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert f"Batch behind train/loss at step {STEP} (0-based batch index {STEP - 1}), data seed" in out
    views = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}
    assert views["a"] == views["b"]
    ids = np.array([r["ids"] for r in views["a"]["rows"]])
    assert not np.array_equal(ids, [r["ids"] for r in views["other"]["rows"]])
    expected = load_training_data(tiny_job(tmp_path, cache_dir, data_seed=3)).batch(STEP - 1)
    np.testing.assert_array_equal(ids, expected)
    assert views["a"]["batch_index"] == STEP - 1 and views["a"]["data_seed"] == 3
    assert all(r["text"] for r in views["a"]["rows"])


@pytest.fixture
def small_dataset(tmp_path, cache_dir):
    """A .bin/.idx prefix whose tokens come from the embedded corpus, with the embedded tokenizer."""
    folder = ensure_embedded_dataset(cache_dir, 8192)
    tokens = np.asarray(np.memmap(folder / "corpus.bin", dtype=np.uint16, mode="r")[:2000])
    write_indexed_dataset(tmp_path / "small", [tokens[:900], tokens[900:]], np.uint16)
    return str(tmp_path / "small"), str(folder / "tokenizer.json")


def test_explicit_flags_a_worker_share_and_ids_only(tmp_path, cache_dir, small_dataset, capsys):
    prefix, tokenizer = small_dataset
    args = [
        "--step",
        "3",
        "--data-seed",
        "7",
        "--budget",
        "smoke",
        "--data-path",
        prefix,
        "--tokenizer",
        tokenizer,
        "--rank",
        "1",
        "--workers",
        "2",
        "--json",
        str(tmp_path / "v.json"),
        "--ids-only",
    ]
    assert main(args) == 0
    cfg = tiny_job(tmp_path, cache_dir, data_seed=7, data__kind="indexed", data__path=prefix, data__tokenizer=tokenizer)
    expected = load_training_data(cfg).batch(2, rank=1, world_size=2)
    printed = [[int(t) for t in line.split()] for line in capsys.readouterr().out.strip().splitlines()]
    np.testing.assert_array_equal(printed, expected)
    view = json.loads((tmp_path / "v.json").read_text())
    assert [r["order_position"] for r in view["rows"]] == [2 * 4 + 2, 2 * 4 + 3]
    assert main(args[:-1] + ["--rows", "1", "--full"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nrow ") == 1 and " ".join(map(str, expected[0])) in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "0"], "--step must be at least 1, got 0: MLflow logs the first train/loss at step 1"),
        (["--step", "2", "--rank", "2", "--workers", "2"], "--rank must lie in [0, --workers)"),
        (["--step", "2", "--workers", "3"], "is not divisible by --workers 3"),
        (["--step", "2", "--data-path", "x"], "Give --data-path and --tokenizer together"),
        (["--step", "2", "--", "model=nonexistent"], "Cannot compose the config"),
    ],
)
def test_bad_requests_are_one_clear_sentence(tmp_path, cache_dir, capsys, args, message):
    args = args + ([] if "--" in args else ["--"]) + ["budget=smoke", f"data.cache_dir={cache_dir}", f"home={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polypythia-batch: error: ") and "\n" not in err
    assert message in err


def test_default_config_dir_is_the_repository_conf():
    from polypythia.train.viewer import default_config_dir

    assert default_config_dir() == REPO / "conf"


def test_the_viewer_reads_a_full_pythia_budget_on_a_cpu_machine():
    """The CPU-time check guards training; the viewer trains nothing."""
    from polypythia.train.viewer import compose_job_config

    cfg = compose_job_config(["model=410m", "budget=pythia"])
    assert cfg.budget.steps == 143_000 and cfg.launcher.num_gpus_per_job == 0
