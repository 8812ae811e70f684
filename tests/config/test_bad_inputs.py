"""Every bad input is one sentence saying what is wrong and how to fix it, before anything starts
(issue #14, items 12-14): job configs (``job_config``), indexed datasets, ``polypythia-prepare``,
``python -m analysis`` and ``python -m polypythia.evaluate``'s source detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import indexed, job, write_small_pair

from polypythia.config.jobconfig import job_config
from polypythia.errors import ConfigError, DataError

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes through any mode bits


def one_sentence_error(tmp_path, match: str, **overrides) -> str:
    with pytest.raises(ConfigError, match=match) as caught:
        job_config(job(tmp_path, **overrides))
    message = str(caught.value)
    assert "\n" not in message and message.endswith("."), message
    return message


def test_the_tiny_job_itself_is_valid(tmp_path):
    job_config(job(tmp_path))


# ---------------------------------------------------------------------------------------------
# launcher, tracking, train, budget vs model


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "launcher__workers_per_run",
            0,
            r"launcher\.workers_per_run must be at least 1 .*got 0\.",
        ),  # was a ZeroDivisionError
        ("launcher__num_cpus_per_job", 0, r"launcher\.num_cpus_per_job must be a positive number of CPUs .*got 0"),
        ("launcher__num_cpus_per_job", -2, r"launcher\.num_cpus_per_job must be a positive"),
        ("launcher__num_gpus_per_job", -1, r"launcher\.num_gpus_per_job must be 0 \(CPU\) or a positive"),
        ("launcher__max_retries", -1, r"launcher\.max_retries must be 0 \(no retry\) or a positive .*got -1\."),
        ("tracking__uri", "file:/tmp/x", r"tracking\.uri=file:/tmp/x .*file store.*http:// server.*tracking\.uri=null"),
        ("tracking__uri", "/tmp/mlruns", r"file store"),
        (
            "tracking__port",
            99999,
            r"tracking\.port must be a TCP port from 1 to 65535 \(or 0 for any free port\), got 99999\.",
        ),
        ("tracking__port", -1, r"tracking\.port must be a TCP port"),
        ("tracking__flush_interval_s", 0, r"tracking\.flush_interval_s must be a positive number of seconds.*CPU core"),
        ("tracking__max_outage_s", -1, r"tracking\.max_outage_s must be 0 or a positive number of seconds"),
        ("train__adam_beta1", 2, r"train\.adam_beta1 must lie in \[0, 1\) .*got 2"),
        ("train__adam_beta2", 1, r"train\.adam_beta2 must lie in \[0, 1\)"),
        ("train__adam_beta2", -0.1, r"train\.adam_beta2 must lie in \[0, 1\)"),
        ("train__adam_eps", 0, r"train\.adam_eps must be a small positive number"),
        ("train__weight_decay", -0.1, r"train\.weight_decay must be 0 \(none\) or positive"),
        ("train__gradient_clipping", -1, r"train\.gradient_clipping must be 0 \(no clipping\) or a positive norm"),
        (
            "budget__seq_length",
            4096,
            r"budget\.seq_length \(4096\) exceeds model\.max_positions \(2048\).*lower budget\.seq_length",
        ),
        ("model__max_positions", 16, r"budget\.seq_length \(32\) exceeds model\.max_positions \(16\)"),
        ("model__vocab_size", 0, r"model\.vocab_size must be at least 1"),
    ],
)
def test_bad_values_are_one_config_error(tmp_path, key, value, match):
    one_sentence_error(tmp_path, match, **{key: value})


@pytest.mark.parametrize(
    "key, value",
    [
        ("tracking__uri", "http://127.0.0.1:5050"),
        ("tracking__port", 0),  # any free port (tracking_server.start_server)
        ("tracking__max_outage_s", 0),
        ("train__adam_beta1", 0.0),
        ("train__weight_decay", 0.0),
        ("train__gradient_clipping", 0.0),
        ("launcher__max_retries", 0),
    ],
)
def test_edge_values_that_are_fine(tmp_path, key, value):
    job_config(job(tmp_path, **{key: value}))


def test_mlflow_tracking_uri_env_with_a_file_store_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    raw = job(tmp_path)
    raw["tracking"].pop("uri")  # the default: ${oc.env:MLFLOW_TRACKING_URI,null}
    with pytest.raises(ConfigError, match=r"tracking\.uri=file:\./mlruns \(or MLFLOW_TRACKING_URI\)"):
        job_config(raw)


# ---------------------------------------------------------------------------------------------
# the model's vocabulary against the tokenizer's


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A byte-level BPE tokenizer of 300 tokens and a .bin/.idx pair of its ids."""
    folder = tmp_path_factory.mktemp("small")
    tokenizer = write_small_pair(folder, repeats=4, copies=8)
    return folder, tokenizer.get_vocab_size(with_added_tokens=True)


def test_vocab_below_an_indexed_datasets_tokenizer(tmp_path, small_dataset):
    folder, size = small_dataset
    one_sentence_error(
        tmp_path,
        rf"model\.vocab_size \(100\) is below the {size} tokens of the tokenizer "
        rf".*tokenizer\.json.*at least {size}, or null",
        model__vocab_size=100,
        **indexed(folder),
    )
    job_config(job(tmp_path, model__vocab_size=size, **indexed(folder)))
    job_config(job(tmp_path, **indexed(folder)))  # null: padded from the tokenizer


def test_vocab_below_the_embedded_tokenizer(tmp_path, small_dataset):
    """Before the embedded corpus is built, data.vocab_size is what its tokenizer will have; after, the
    tokenizer file in the cache decides."""
    message = one_sentence_error(
        tmp_path,
        r"model\.vocab_size \(8000\) is below the 8192 tokens of the embedded "
        r"tokenizer \(data\.vocab_size; its corpus is not built yet\)",
        model__vocab_size=8000,
    )
    assert "null" in message
    from polypythia.data.embedded import embedded_dir

    built = embedded_dir(tmp_path / "cache", 512)
    built.mkdir(parents=True)
    (built / "tokenizer.json").write_bytes((small_dataset[0] / "tokenizer.json").read_bytes())
    (built / "COMPLETE").write_text("ok\n")
    size = small_dataset[1]
    one_sentence_error(
        tmp_path,
        rf"below the {size} tokens of the embedded tokenizer {built}",
        model__vocab_size=size - 1,
        data__vocab_size=512,
    )
    job_config(job(tmp_path, model__vocab_size=size, data__vocab_size=512))


def test_an_unreadable_tokenizer_is_one_error(tmp_path, small_dataset):
    folder, _ = small_dataset
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    one_sentence_error(
        tmp_path,
        rf"The tokenizer {bad} cannot be read .*give data\.tokenizer a Hugging Face tokenizer\.json\.",
        model__vocab_size=512,
        **{**indexed(folder), "data__tokenizer": str(bad)},
    )


# ---------------------------------------------------------------------------------------------
# truncated indexed datasets


def copy_pair(source: Path, target: Path) -> Path:
    for suffix in (".bin", ".idx"):
        (target / f"d{suffix}").write_bytes((source / f"d{suffix}").read_bytes())
    return target / "d"


@pytest.mark.parametrize("cut", [5, 20, 40])
def test_truncated_idx_names_the_file_and_the_fix(tmp_path, small_dataset, cut):
    from polypythia.data.indexed import IndexedDataset

    prefix = copy_pair(small_dataset[0], tmp_path)
    idx = tmp_path / "d.idx"
    idx.write_bytes(idx.read_bytes()[:cut] if cut < 34 else idx.read_bytes()[:-cut])  # header cut, or the arrays
    with pytest.raises(DataError, match=rf"The index file {idx} is truncated.*re-run polypythia-prepare"):
        IndexedDataset(prefix)  # was: ValueError: buffer is smaller than requested size
    message = one_sentence_error(
        tmp_path,
        rf"data\.path=.*: The index file {idx} is truncated",
        **{**indexed(small_dataset[0]), "data__path": str(prefix)},
    )
    assert "polypythia-prepare" in message


def test_truncated_bin_is_caught_at_validation(tmp_path, small_dataset):
    prefix = copy_pair(small_dataset[0], tmp_path)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    one_sentence_error(
        tmp_path,
        rf"The token file {tmp_path / 'd.bin'} is truncated or mismatched: it holds "
        rf"{len(data) - 2:,} bytes but its index describes {len(data):,}; re-run polypythia-prepare",
        **{**indexed(small_dataset[0]), "data__path": str(prefix)},
    )


# ---------------------------------------------------------------------------------------------
# a budget far too large for the CPU


PYTHIA_410M = {
    "model__name": "410m",
    "model__num_layers": 24,
    "model__hidden_size": 1024,
    "model__num_heads": 16,
    "model__lr": 3e-4,
}
PYTHIA_BUDGET = {
    "budget__name": "pythia",
    "budget__steps": 143000,
    "budget__global_batch_size": 1024,
    "budget__micro_batch_size": 16,
    "budget__seq_length": 2048,
    "budget__checkpoint_every_steps": 1000,
}


def test_a_pythia_budget_on_cpu_needs_the_explicit_override(tmp_path):
    message = one_sentence_error(
        tmp_path,
        r"model=410m budget=pythia on the CPU .* would take about [\d,.]+ years per run",
        **PYTHIA_410M,
        **PYTHIA_BUDGET,
    )
    assert "6 x 310M weights x 300B tokens at an assumed 1e+11 FLOP/s" in message
    assert "launcher.allow_slow=true" in message and "launcher.num_gpus_per_job=1" in message
    job_config(job(tmp_path, launcher__allow_slow=True, **PYTHIA_410M, **PYTHIA_BUDGET))
    job_config(job(tmp_path, launcher__num_gpus_per_job=1, **PYTHIA_410M, **PYTHIA_BUDGET))
    job_config(job(tmp_path, budget__steps=70, **PYTHIA_410M))  # a small budget needs no override


def test_cpu_estimate_units():
    from polypythia.config.preflight import format_duration, short_count

    assert [format_duration(s) for s in (30, 700, 5 * 3600, 40 * 86400, 6.4e9)] == [
        "30 s",
        "12 min",
        "5.0 hours",
        "40 days",
        "203 years",
    ]
    assert [short_count(n) for n in (999, 72_000, 2.23e6, 3.0e11)] == ["999", "72k", "2.23M", "300B"]


# ---------------------------------------------------------------------------------------------
# folders a job or polypythia-prepare cannot write


def test_home_under_a_file_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    home = tmp_path / "file" / "home"
    raw = job(tmp_path, home=str(home), runs_dir=str(home / "runs"), tracking__dir=str(home / "mlflow"))
    with pytest.raises(
        ConfigError,
        match=rf"runs_dir={home / 'runs'} cannot be written \({tmp_path / 'file'} is a "
        r"file, not a folder\); set POLYPYTHIA_HOME \(or home=\.\.\.\) to a folder you can write to\.",
    ):
        job_config(raw)


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders; the file case above covers the check")
def test_read_only_home_is_one_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    try:
        raw = job(tmp_path, home=str(home), runs_dir=str(home / "runs"), tracking__dir=str(home / "mlflow"))
        with pytest.raises(ConfigError, match=rf"the folder {home} is not writable\); set POLYPYTHIA_HOME"):
            job_config(raw)
    finally:
        home.chmod(0o700)


def deny_writes_to(monkeypatch, folder: Path) -> None:
    """What os.access says of a read-only folder to anyone but root (these tests run as root)."""
    real = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, *a, **k: False if Path(path) == folder and mode & os.W_OK else real(path, mode, *a, **k),
    )


def test_read_only_home_as_os_access_reports_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    deny_writes_to(monkeypatch, home)
    raw = job(tmp_path, home=str(home), runs_dir=str(home / "runs"), tracking__dir=str(home / "mlflow"))
    with pytest.raises(
        ConfigError,
        match=rf"^runs_dir={home / 'runs'} cannot be written \(the folder {home} is not "
        r"writable\); set POLYPYTHIA_HOME \(or home=\.\.\.\) to a folder you can write to\.$",
    ):
        job_config(raw)
    raw["runs_dir"] = str(tmp_path / "runs")  # a runs_dir elsewhere: the error names the key to change
    raw["tracking"]["dir"] = str(tmp_path / "mlflow")
    raw["data"]["cache_dir"] = str(home / "cache")
    with pytest.raises(ConfigError, match=r"data\.cache_dir=.* set POLYPYTHIA_HOME"):
        job_config(raw)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    job_config(raw)


def test_prepare_out_in_a_read_only_folder_as_os_access_reports_it(tmp_path, capsys, monkeypatch):
    from polypythia.data.prepare import main

    folder = tmp_path / "ro"
    folder.mkdir()
    deny_writes_to(monkeypatch, folder)
    assert main([str(prepare_inputs(tmp_path)), "--train-tokenizer", "300", "--out", str(folder / "c")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"polypythia-prepare: error: --out {folder / 'c'} cannot be written: the folder {folder} is not writable; "
        "choose a --out in a folder you can write to."
    )


def prepare_inputs(tmp_path: Path) -> Path:
    (tmp_path / "doc.txt").write_text("some text to tokenise\n")
    return tmp_path / "doc.txt"


def test_prepare_out_under_a_file(tmp_path, capsys):
    from polypythia.data.prepare import main

    (tmp_path / "file").write_text("x")
    assert (
        main(
            [str(prepare_inputs(tmp_path)), "--train-tokenizer", "300", "--out", str(tmp_path / "file" / "data" / "c")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        f"polypythia-prepare: error: --out {tmp_path / 'file' / 'data' / 'c'} cannot be written: "
        f"{tmp_path / 'file'} is a file, not a folder; choose another --out."
    )


@pytest.mark.skipif(AS_ROOT, reason="root writes into read-only folders; the file case above covers the check")
def test_prepare_out_in_a_read_only_folder(tmp_path, capsys):
    from polypythia.data.prepare import main

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main([str(prepare_inputs(tmp_path)), "--train-tokenizer", "300", "--out", str(folder / "c")]) == 2
    finally:
        folder.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert err.startswith("polypythia-prepare: error: ") and "\n" not in err
    assert f"the folder {folder} is not writable; choose a --out in a folder you can write to." in err


# ---------------------------------------------------------------------------------------------
# python -m analysis


def run_analysis(argv, capsys) -> tuple[int, str, str]:
    from analysis.__main__ import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def losses_csv(path: Path, final_seed2: float = 2.0, metric: str = "train/loss") -> Path:
    rows = [("70m", seed, step, metric, 5.0 - step / 10) for seed in (1, 2, 3) for step in (1, 2, 3)]
    rows[5] = ("70m", 2, 3, metric, final_seed2)
    pd.DataFrame(rows, columns=["model", "seed", "step", "metric", "value"]).to_csv(path, index=False)
    return path


@pytest.fixture
def no_tracking(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("POLYPYTHIA_HOME", str(tmp_path / "home"))  # no local server to find


def test_analysis_table_errors(tmp_path, capsys, no_tracking):
    seed = tmp_path / "seed.csv"
    pd.DataFrame({"model": "70m", "seed": [1, "abc"], "step": [1, 2], "metric": "train/loss", "value": 1.0}).to_csv(
        seed, index=False
    )
    assert_one_error(*run_analysis([seed], capsys)[::2], "column seed of")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_error(*run_analysis([binary], capsys)[::2], "holds binary data")
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("model,seed,step,metric,value\n70m,1,1,train/loss,1.0\n70m,1,2,train/loss,1.0,9\n")
    assert_one_error(*run_analysis([malformed], capsys)[::2], "is not a well-formed CSV table")


def test_analysis_lm_eval_file_holding_a_list(tmp_path, capsys, no_tracking):
    folder = tmp_path / "evals" / "pythia-70m-seed1" / "step0" / "EleutherAI__pythia-70m-seed1"
    folder.mkdir(parents=True)
    (folder / "results_2024-01-01.json").write_text(json.dumps([{"acc": 1}]))
    assert_one_error(*run_analysis([tmp_path / "evals"], capsys)[::2], "holds a list, not an lm-eval result object")


def test_analysis_out_pointing_at_a_file(tmp_path, capsys, no_tracking):
    (tmp_path / "report.md").write_text("x")
    code, _, err = run_analysis([losses_csv(tmp_path / "l.csv"), "--out", tmp_path / "report.md"], capsys)
    assert_one_error(code, err, f"--out {tmp_path / 'report.md'} is a file, not a folder")
    code, _, err = run_analysis([losses_csv(tmp_path / "l.csv"), "--out", tmp_path / "report.md" / "sub"], capsys)
    assert_one_error(code, err, f"{tmp_path / 'report.md'} is a file, not a folder")


def test_analysis_repeated_rows_keep_the_last_with_a_note(tmp_path):
    from analysis.load import load_study

    path = tmp_path / "repeated.csv"
    pd.DataFrame(
        {"model": "70m", "seed": 1, "step": [1, 1, 2], "metric": "train/loss", "value": [5.0, 4.0, 3.0]}
    ).to_csv(path, index=False)
    study = load_study(path)
    assert study.metrics["value"].tolist() == [4.0, 3.0] and any("repeats 1" in n for n in study.notes)


@pytest.mark.parametrize("metric", ["train/loss", "valid/loss"])
@pytest.mark.parametrize("final", [float("nan"), float("inf")])
def test_a_final_non_finite_loss_marks_the_run_diverged(tmp_path, metric, final):
    from analysis.load import load_study
    from analysis.summary import final_loss_summary

    study = load_study(losses_csv(tmp_path / "study.csv", final, metric))
    assert len(study.metrics) == 8 and np.isfinite(study.metrics["value"]).all()  # the non-finite row is dropped ...
    runs = study.runs.set_index("seed")
    assert runs["diverged"].to_dict() == {"1": False, "2": True, "3": False}  # ... but the run is diverged
    assert any(f"run 2 ends with a non-finite {metric} at step 3" in note for note in study.notes)
    if metric == "train/loss":
        assert final_loss_summary(study.metrics, study.runs)["diverged_or_failed_seeds"].tolist() == [["2"]]


def test_an_earlier_nan_is_not_divergence(tmp_path):
    from analysis.load import load_study

    path = losses_csv(tmp_path / "study.csv")
    frame = pd.read_csv(path)
    frame.loc[4, "value"] = np.nan  # seed 2, step 2; its last value (step 3) is finite
    frame.to_csv(path, index=False)
    assert not load_study(path).runs["diverged"].any()


def test_a_run_with_only_nan_losses_is_still_listed(tmp_path):
    from analysis.load import load_study

    path = losses_csv(tmp_path / "study.csv")
    frame = pd.read_csv(path)
    frame.loc[frame["seed"] == 3, "value"] = np.nan
    frame.to_csv(path, index=False)
    runs = load_study(path).runs
    assert runs.set_index("seed").loc["3", "diverged"]


def test_cli_summary_of_a_csv_shows_the_diverged_seed(tmp_path, capsys, no_tracking):
    code, out, _ = run_analysis([losses_csv(tmp_path / "study.csv", float("nan"))], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("70m"))
    assert row.rstrip(" │").endswith("2")  # the "ended early" column


# ---------------------------------------------------------------------------------------------
# a folder without the data layout is never taken for data (README: `python -m analysis polypythia`)


def test_analysis_folder_without_results_is_an_experiment_name(tmp_path, capsys, no_tracking, monkeypatch):
    import analysis.load as load
    import analysis.summary as summary
    import analysis.tidy_table as tidy_table

    folder = tmp_path / "my-study"
    (folder / "sub").mkdir(parents=True)
    (folder / "__init__.py").write_text("")  # like the polypythia/ package folder
    assert load.choose_source(folder).kind == "mlflow" and load.choose_source(folder).name == "my-study"

    code, _, err = run_analysis([folder], capsys)
    assert_one_error(code, err, f"The folder {folder} holds no lm-eval result files laid out as ")
    assert "so it was read as the MLflow experiment name 'my-study', and no MLflow tracking URI is set" in err

    seen = {}

    def fake_load_mlflow(experiment, **kwargs):
        seen["experiment"] = experiment
        frame = pd.DataFrame({"model": "70m", "seed": [1], "step": [1], "metric": "train/loss", "value": [3.0]})
        return tidy_table.Study(
            metrics=tidy_table.tidy(frame), runs=tidy_table.runs_from_metrics(frame), source=experiment, kind="mlflow"
        )

    monkeypatch.setattr(load, "load_mlflow", fake_load_mlflow)
    study = load.load_study(folder)
    assert seen["experiment"] == "my-study"
    assert study.notes[0] == (
        f"The folder {folder} holds no lm-eval result files laid out as pythia-<size>[-seed<k>]/"
        "step<S>/.../results_<timestamp>.json (lm-eval 0.4) or pythia-<size>[-deduped]/zero-shot/"
        "<name>_step<S>.json (lm-eval 0.3), so it is read as the MLflow experiment name 'my-study'."
    )

    monkeypatch.setattr(summary, "print_summary", lambda uri, experiment, parent: seen.update(summary=experiment))
    code, _, err = run_analysis([folder, "--tracking-uri", "http://127.0.0.1:9"], capsys)
    assert code == 0 and seen["summary"] == "my-study"
    assert err.strip().splitlines() == [study.notes[0]]


def test_analysis_folder_with_results_is_still_a_folder(tmp_path):
    from analysis.load import choose_source

    folder = tmp_path / "my-study" / "pythia-70m-seed1" / "step0"
    folder.mkdir(parents=True)
    (folder / "results_2024.json").write_text("{}")
    assert choose_source(tmp_path / "my-study").kind == "lm-eval"


def test_evaluate_folder_without_checkpoints_is_an_experiment_name(tmp_path, capsys, no_tracking):
    from polypythia.evaluate.__main__ import choose_source, main

    folder = tmp_path / "my-study"
    (folder / "notes").mkdir(parents=True)
    assert choose_source(str(folder)) == (
        False,
        "my-study",
        (
            f"The folder {folder} holds no <name>/step<S>/ checkpoint folders with a config.json, so it is read as "
            "the MLflow experiment name 'my-study'."
        ),
    )
    with pytest.raises(SystemExit) as caught:
        main([str(folder), "--no-ray"])
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and "\n" not in err and err.startswith("polypythia: error: The folder ")
    assert (
        "read as the MLflow experiment name 'my-study', and 'my-study' needs an MLflow server; give --tracking-uri"
        in err
    )

    step = folder / "pythia-70m-seed1" / "step0"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    assert choose_source(str(folder)) == (True, str(folder), None)
