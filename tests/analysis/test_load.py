"""Loading: lm-eval result folders in the PolyPythias layout and tidy CSV/TSV files."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisError, load_study, standardised_accuracy
from analysis.load import POLYPYTHIAS_EVAL_STEPS, parse_steps

TASKS = ("arc_easy", "lambada_openai", "piqa", "sciq")


def write_result(root, model_dir, step, stamp, accuracies, subdir="EleutherAI__pythia"):
    folder = root / model_dir / f"step{step}" / subdir
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        task: {"alias": task, "acc,none": acc, "acc_stderr,none": 0.01, "acc_norm,none": acc + 0.01}
        for task, acc in accuracies.items()
    }
    results["lambada_openai"]["perplexity,none"] = 20.0
    (folder / f"results_{stamp}.json").write_text(json.dumps({"results": results, "config": {}}))


@pytest.fixture
def lm_eval_folder(tmp_path):
    """pythia-70m (seed 0) and pythia-70m-seed1/-seed2 at steps 1000 and 2000, plus an older duplicate."""
    for seed_index, model_dir in enumerate(["pythia-70m", "pythia-70m-seed1", "pythia-70m-seed2"]):
        for step in (1000, 2000):
            base = 0.3 + 0.1 * (step // 1000) + 0.01 * seed_index
            accuracies = {task: base + 0.05 * i for i, task in enumerate(TASKS)}
            write_result(tmp_path, model_dir, step, "2024-06-02T10-00-00.000000", accuracies)
    # An older run of the same (model, seed, step), deeper down: must lose to the newer file.
    write_result(
        tmp_path,
        "pythia-70m-seed1",
        2000,
        "2024-05-01T09-00-00.000000",
        {task: 0.0 for task in TASKS},
        subdir="old/deeper",
    )
    return tmp_path


def test_lm_eval_folder_becomes_tidy_table(lm_eval_folder):
    study = load_study(lm_eval_folder)
    metrics = study.metrics
    assert list(metrics.columns) == ["model", "seed", "step", "metric", "value"]
    assert set(metrics["model"].astype(str)) == {"70m"}
    assert sorted(metrics["seed"].unique()) == ["0", "1", "2"]  # run labels
    assert sorted(metrics["step"].unique()) == [1000, 2000]
    names = set(metrics["metric"].astype(str))
    assert {"arc_easy/acc", "arc_easy/acc_norm", "lambada_openai/perplexity"} <= names
    assert not any("stderr" in n or "alias" in n for n in names)
    # The newer file wins for (70m, seed 1, step 2000).
    value = metrics[(metrics.seed == "1") & (metrics.step == 2000) & (metrics.metric == "arc_easy/acc")]["value"]
    assert value.tolist() == pytest.approx([0.51])
    assert len(metrics) == 3 * 2 * (4 * 2 + 1)


def test_standardised_accuracy_matches_direct_computation(lm_eval_folder):
    metrics = load_study(lm_eval_folder).metrics
    score = standardised_accuracy(metrics, TASKS)
    z = []
    for task in TASKS:
        rows = metrics[metrics.metric == f"{task}/acc"].sort_values(["seed", "step"])
        values = rows["value"].to_numpy()
        z.append((values - values.mean()) / values.std(ddof=1))
    expected = np.mean(z, axis=0)
    assert score.sort_values(["seed", "step"])["value"].to_numpy() == pytest.approx(expected)


def test_tidy_tsv_round_trip(tmp_path, stable_study):
    path = tmp_path / "study.tsv"
    small = stable_study[stable_study["metric"].astype(str).str.startswith("eval/")]
    small.to_csv(path, sep="\t", index=False)
    loaded = load_study(path).metrics
    assert len(loaded) == len(small)
    assert loaded["value"].sum() == pytest.approx(small["value"].sum())


def test_missing_sources_give_one_sentence_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(AnalysisError, match="no lm-eval result files"):
        load_study(tmp_path)
    with pytest.raises(AnalysisError, match="does not exist"):
        load_study(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(AnalysisError, match="is empty"):
        load_study(tmp_path / "empty.csv")
    with pytest.raises(AnalysisError, match="tracking URI"):
        load_study("some-experiment")
    pd.DataFrame({"model": ["70m"], "seed": [0]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(AnalysisError, match="lacks the column"):
        load_study(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------
# Published PolyPythias evaluations (HF dataset EleutherAI/polypythias-evals), as laid out there


def write_eval(root, seed_dir, step, stamp, accuracies, inner=None, model_args=None):
    """One lm-eval v0.4 result file at <seed_dir>/step<step>/<inner>/results_<stamp>.json."""
    inner = inner or f"EleutherAI__{seed_dir}"
    folder = root / seed_dir / f"step{step}" / inner
    folder.mkdir(parents=True, exist_ok=True)
    pretrained = model_args or f"EleutherAI/{seed_dir}"
    data = {
        "results": {
            task: {"alias": task, "acc,none": acc, "acc_stderr,none": 0.01} for task, acc in accuracies.items()
        },
        "config": {"model": "hf", "model_args": f"pretrained={pretrained},revision=step{step},dtype=float"},
    }
    path = folder / f"results_{stamp}.json"
    path.write_text(json.dumps(data))
    return path


def accuracy(metrics, seed, step, task):
    rows = metrics[
        (metrics.seed.astype(str) == str(seed)) & (metrics.step == step) & (metrics.metric.astype(str) == f"{task}/acc")
    ]
    return rows["value"].tolist()


def test_published_evals_drop_mislabeled_files_and_keep_latest_per_task(tmp_path, caplog):
    early, late = "2024-09-01T10-00-00.000000", "2024-10-01T10-00-00.000000"
    for seed_dir, base in (("pythia-410m", 0.40), ("pythia-410m-seed3", 0.30), ("pythia-410m-seed10", 0.20)):
        for step in (1000, 143000):
            write_eval(tmp_path, seed_dir, step, early, {"arc_easy": base, "sciq": base + 0.1})
    # The base model's results filed under seed 3: inner folder and model_args name EleutherAI/pythia-410m.
    mislabeled = write_eval(
        tmp_path,
        "pythia-410m-seed3",
        143000,
        "2024-12-01T00-00-00.000000",
        {"arc_easy": 0.99, "sciq": 0.99},
        inner="EleutherAI__pythia-410m",
        model_args="EleutherAI/pythia-410m",
    )
    # Only model_args gives it away (the inner folder is the right one).
    write_eval(
        tmp_path,
        "pythia-410m-seed10",
        1000,
        "2024-12-01T00-00-00.000000",
        {"arc_easy": 0.98},
        model_args="EleutherAI/pythia-410m-seed1",
    )
    # A newer rerun of seed 3 at step 1000 holds arc_easy only: sciq must keep the older file's value.
    write_eval(tmp_path, "pythia-410m-seed3", 1000, late, {"arc_easy": 0.35})

    with caplog.at_level("WARNING", logger="analysis"):
        study = load_study(tmp_path)
    metrics = study.metrics
    assert sorted(metrics["seed"].astype(str).unique(), key=int) == ["0", "3", "10"]
    assert set(metrics["model"].astype(str)) == {"410m"}
    assert accuracy(metrics, 3, 143000, "arc_easy") == pytest.approx([0.30])  # the mislabeled file is gone
    assert accuracy(metrics, 10, 1000, "arc_easy") == pytest.approx([0.20])
    assert accuracy(metrics, 3, 1000, "arc_easy") == pytest.approx([0.35])  # newer file, overlapping task
    assert accuracy(metrics, 3, 1000, "sciq") == pytest.approx([0.40])  # older file, task the newer lacks
    assert len(metrics) == 3 * 2 * 2
    # The base model's file under seed 3 is read as seed 0's, where seed 0's own file wins; the seed-10 file,
    # whose folder and config name different models, cannot be placed and is left out.
    placed = [r.getMessage() for r in caplog.records if "read as their config says" in r.getMessage()]
    left_out = [r.getMessage() for r in caplog.records if "were left out" in r.getMessage()]
    assert len(placed) == 1 and placed[0].startswith("1 of 9 lm-eval result files name another model")
    assert str(mislabeled.relative_to(tmp_path)) in placed[0]
    assert len(left_out) == 1 and left_out[0].startswith("1 of 9 lm-eval result files were left out")
    assert "pythia-410m-seed10/step1000/" in left_out[0] and "EleutherAI/pythia-410m-seed1)" in left_out[0]
    assert [n for n in study.notes if "were left out" in n] == left_out
    assert accuracy(metrics, 0, 143000, "arc_easy") == pytest.approx([0.40])  # seed 0's own file wins
    assert accuracy(metrics, 1, 1000, "arc_easy") == []  # no phantom seed 1


def test_published_evals_bad_files_give_clear_errors(tmp_path):
    write_eval(tmp_path, "pythia-70m-seed1", 1000, "2024-09-01T10-00-00.000000", {"arc_easy": 0.4})
    folder = tmp_path / "pythia-70m-seed2" / "step1000" / "EleutherAI__pythia-70m-seed2"
    folder.mkdir(parents=True)
    bad = folder / "results_2024-09-01T10-00-00.000000.json"
    bad.write_text(json.dumps([{"results": {}}]))
    with pytest.raises(AnalysisError, match=r"results_2024-09-01T10-00-00.000000.json holds a list.*remove or repair"):
        load_study(tmp_path)
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AnalysisError, match=r"results_2024-09-01T10-00-00.000000.json .*remove or repair it"):
        load_study(tmp_path)
    bad.write_text('{"results": ')
    with pytest.raises(AnalysisError, match="not valid JSON.*remove or repair it"):
        load_study(tmp_path)


def test_steps_restriction_with_the_polypythias_preset(tmp_path):
    for step in (0, 512, 1000, 2000, 3000, 143000):
        write_eval(tmp_path, "pythia-70m-seed1", step, "2024-09-01T10-00-00.000000", {"arc_easy": 0.4})
    study = load_study(tmp_path, steps=POLYPYTHIAS_EVAL_STEPS)
    assert sorted(study.metrics["step"].unique()) == [0, 512, 1000, 3000, 143000]
    assert any("22 of the 27 requested steps" in note for note in study.notes)
    assert sorted(load_study(tmp_path, steps="polypythias").metrics["step"].unique()) == [0, 512, 1000, 3000, 143000]
    assert sorted(load_study(tmp_path, steps=[2000]).metrics["step"].unique()) == [2000]
    with pytest.raises(AnalysisError, match="no metric values matching --steps"):
        load_study(tmp_path, steps=[7])
    # Tables are restricted too.
    table = tmp_path / "table.csv"
    pd.DataFrame({"model": "70m", "seed": 1, "step": [1, 5, 1000], "metric": "loss", "value": 1.0}).to_csv(
        table, index=False
    )
    assert sorted(load_study(table, steps="polypythias").metrics["step"]) == [1, 1000]


def test_polypythias_eval_steps_and_parse_steps():
    assert len(POLYPYTHIAS_EVAL_STEPS) == 27
    assert POLYPYTHIAS_EVAL_STEPS[:13] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 3000)
    assert POLYPYTHIAS_EVAL_STEPS[13:] == tuple(range(13000, 143001, 10000))
    assert parse_steps("polypythias") == list(POLYPYTHIAS_EVAL_STEPS)
    assert parse_steps(" PolyPythias ") == list(POLYPYTHIAS_EVAL_STEPS)
    assert parse_steps("0,1,2,512") == [0, 1, 2, 512]
    assert parse_steps("512, 0 ,512") == [0, 512]
    for text in ("", "pythia", "1,,2", "1.5", "-3", "0;1"):
        with pytest.raises(AnalysisError, match="comma-separated list of whole step numbers"):
            parse_steps(text)


# ---------------------------------------------------------------------------------------------
# Wide tables such as the study's training map table (EleutherAI/pythia, branch polypythias,
# polypythias/data/training_maps.tsv: unnamed index, score, state, step, seed, group)


def write_training_map(path, seeds=(0, 3, 4), steps=(0, 1000, 13000, 143000)):
    rows = []
    for seed in seeds:
        group = "[3, 4]" if seed in (3, 4) else "[0, 1, 2, 5, 6, 7, 8, 9]"
        for index, step in enumerate(steps):
            rows.append({"score": seed + step / 1e6, "state": index, "step": step, "seed": seed, "group": group})
    pd.DataFrame(rows).to_csv(path, sep="\t")  # index written as an unnamed first column, as released
    return rows


def test_wide_training_map_table_becomes_tidy_rows(tmp_path):
    path = tmp_path / "training_maps.tsv"
    rows = write_training_map(path)
    assert path.read_text().startswith("\tscore\tstate\tstep\tseed\tgroup\n")
    study = load_study(path, model="410m")
    metrics = study.metrics
    assert set(metrics["metric"].astype(str)) == {"score", "state"}
    assert set(metrics["model"].astype(str)) == {"410m"}
    assert len(metrics) == 2 * len(rows) == 2 * 3 * 4
    assert sorted(metrics["seed"].astype(str).unique(), key=int) == ["0", "3", "4"]
    state = metrics[(metrics.seed.astype(str) == "3") & (metrics.metric.astype(str) == "state")]
    assert state.sort_values("step")["value"].tolist() == [0, 1, 2, 3]
    score = metrics[
        (metrics.seed.astype(str) == "4") & (metrics.step == 13000) & (metrics.metric.astype(str) == "score")
    ]
    assert score["value"].tolist() == pytest.approx([4.013])
    assert any("group" in note for note in study.notes)


def test_wide_table_model_from_file_name_or_unknown(tmp_path):
    named = tmp_path / "pythia-160m-maps.tsv"
    write_training_map(named)
    study = load_study(named)
    assert set(study.metrics["model"].astype(str)) == {"160m"}
    assert any("file name" in note for note in study.notes)
    plain = tmp_path / "training_maps.tsv"
    write_training_map(plain)
    study = load_study(plain)
    assert set(study.metrics["model"].astype(str)) == {"unknown"}
    assert any("'unknown'" in note for note in study.notes)


def test_table_errors_and_repeated_rows(tmp_path):
    bad_seed = tmp_path / "bad_seed.csv"
    pd.DataFrame({"model": "70m", "seed": [1, "two"], "step": [1, 2], "metric": "loss", "value": 1.0}).to_csv(
        bad_seed, index=False
    )
    with pytest.raises(AnalysisError, match=r"column seed .*'two' \(data row 2\).*not a seed number"):
        load_study(bad_seed)
    bad_step = tmp_path / "bad_step.tsv"
    pd.DataFrame({"seed": [1, 1], "step": [1, 2.5], "score": 1.0}).to_csv(bad_step, sep="\t", index=False)
    with pytest.raises(AnalysisError, match=r"column step .*2\.5.*not a training step"):
        load_study(bad_step)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"model,seed\x00\x01\x02" + bytes(range(256)))
    with pytest.raises(AnalysisError, match="binary data"):
        load_study(binary)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"model,seed,step,metric,value\n70m,1,1,\xe9\xff\xfe,1.0\n")
    with pytest.raises(AnalysisError, match="not UTF-8"):
        load_study(latin)
    malformed = tmp_path / "malformed.csv"
    malformed.write_text("model,seed,step,metric,value\n70m,1,1,loss,1.0\n70m,1,2,loss,1.0,9,9\n")
    with pytest.raises(AnalysisError, match="not a well-formed CSV"):
        load_study(malformed)

    repeated = tmp_path / "repeated.csv"
    pd.DataFrame(
        {"model": "70m", "seed": 1, "step": [1, 1, 2, 2, 3], "metric": "loss", "value": [5.0, 4.0, 3.0, 3.0, 2.0]}
    ).to_csv(repeated, index=False)
    study = load_study(repeated)
    assert study.metrics.sort_values("step")["value"].tolist() == [4.0, 3.0, 2.0]
    assert [n for n in study.notes if "repeats" in n] == [
        "The table repeated.csv repeats 1 (model, seed, step, metric) row(s) with different values; "
        "the last row of each was kept."
    ]


def test_table_loader_passes_non_finite_values_on(tmp_path, monkeypatch):
    """The loaders keep NaN/inf rows; whether they stay is tidy()'s decision."""
    import analysis.table_file as table_file

    seen = {}
    real_tidy = table_file.tidy

    def spy(frame, notes=None):
        seen["values"] = frame["value"].tolist()
        return real_tidy(frame, notes)

    monkeypatch.setattr(table_file, "tidy", spy)
    path = tmp_path / "diverged.csv"
    path.write_text("model,seed,step,metric,value\n70m,1,1,loss,5.0\n70m,1,2,loss,nan\n70m,1,3,loss,inf\n")
    table_file.load_tidy_file(path)
    values = seen["values"]
    assert values[0] == 5.0 and np.isnan(values[1]) and np.isinf(values[2])


def test_one_run_has_one_label(tmp_path):
    """w3-d3 and 3 name the same run; a variant keeps its own label."""
    rows = [("70m", seed, 10, "valid/loss", 1.0) for seed in ("3", "w3-d3", "w1-d2", "4.0")]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["model", "seed", "step", "metric", "value"]).to_csv(path, index=False)
    assert sorted(load_study(path).runs["seed"]) == ["3", "4", "w1-d2"]
