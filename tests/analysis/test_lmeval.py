"""lm-eval 0.3 files in the Pythia suite's published layout (EleutherAI/pythia, evals/pythia-v1/) beside
lm-eval 0.4 files in the PolyPythias layout: identity from config and path, values equal to the files."""

import csv
import json

import pytest

from analysis import AnalysisError, load_study
from analysis.__main__ import main
from analysis.check import CONFIG_PATH_DISAGREE
from analysis.lmeval_file import lm_eval_metrics, task_shots
from analysis.lmeval_layout import pythia_identity
from analysis.load import choose_source
from polypythia.evaluate.integrity import FOREIGN_FILE

STAMP = "2024-09-01T10-00-00.000000"


def suite_file(root, where, name, step, values, pretrained=None, shots=None, accelerate=False):
    """An lm-eval 0.3 file as the Pythia suite published it, ``root/where/<name>_step<step>.json`` (``where``:
    the model folder and its setting folder, ``pythia-160m/zero-shot``): results (with stderrs and a
    perplexity), versions and config; ``values`` maps task -> acc."""
    size = where.split("/")[0].removeprefix("pythia-")
    pretrained = pretrained or f"EleutherAI/pythia-v1.1-{size}"
    args = f"pretrained={pretrained},revision=step{step}"
    shots = (5 if where.endswith("/five-shot") else 0) if shots is None else shots
    results = {
        task: {"acc": acc, "acc_stderr": 0.01, "acc_norm": acc + 0.02, "acc_norm_stderr": 0.01}
        for task, acc in values.items()
    }
    results["lambada_openai"] = {"ppl": 30.0 + step / 1e4, "ppl_stderr": 1.0, "acc": 0.3}
    data = {
        "results": results,
        "versions": {task: 0 for task in results},
        "config": {
            "model": "hf-causal",
            "model_args": ("use_accelerate=True," if accelerate else "") + args,
            "num_fewshot": shots,
            "batch_size": 16,
            "device": "cuda:7",
            "no_cache": True,
            "limit": None,
            "bootstrap_iters": 100000,
            "description_dict": {},
        },
    }
    path = root / where / f"{name}_step{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def polypythias_file(root, size, seed, step, values, n_shot=None):
    """An lm-eval 0.4 file in the PolyPythias layout."""
    name = f"pythia-{size}-seed{seed}"
    folder = root / name / f"step{step}" / f"EleutherAI__{name}"
    folder.mkdir(parents=True, exist_ok=True)
    results = {task: {"alias": task, "acc,none": acc, "acc_stderr,none": 0.01} for task, acc in values.items()}
    data = {
        "results": results,
        "config": {"model": "hf", "model_args": f"pretrained=EleutherAI/{name},revision=step{step}"},
    }
    if n_shot is not None:
        data["n-shot"] = n_shot
    (folder / f"results_{STAMP}.json").write_text(json.dumps(data))


def value(metrics, model, seed, step, metric):
    rows = metrics[
        (metrics.model.astype(str) == model)
        & (metrics.seed.astype(str) == str(seed))
        & (metrics.step == step)
        & (metrics.metric.astype(str) == metric)
    ]
    return rows["value"].tolist()


@pytest.fixture
def suite(tmp_path):
    """pythia-160m and pythia-160m-deduped zero-shot (3 steps) and five-shot (1 step) as the suite released
    them, beside PolyPythias seeds 1 and 2 of 160m; returns (root, {(model, seed, step, metric): value})."""
    root, expected = tmp_path / "evals", {}
    steps = (0, 1000, 143000)
    for folder, offset in (("pythia-160m", 0.0), ("pythia-160m-deduped", 0.1)):
        size = folder.removeprefix("pythia-")
        for i, step in enumerate(steps):
            accs = {"arc_easy": 0.3 + offset + 0.01 * i, "piqa": 0.55 + offset + 0.01 * i}
            suite_file(root, f"{folder}/zero-shot", size, step, accs, accelerate=step == 0)
            for task, acc in accs.items():
                expected[(size, 0, step, f"{task}/acc")] = acc
                expected[(size, 0, step, f"{task}/acc_norm")] = acc + 0.02
            expected[(size, 0, step, "lambada_openai/ppl")] = 30.0 + step / 1e4
            expected[(size, 0, step, "lambada_openai/acc")] = 0.3
        suite_file(root, f"{folder}/five-shot", f"{size}-5shot", 143000, {"arc_easy": 0.7 + offset})
        expected[(size, 0, 143000, "arc_easy@5shot/acc")] = 0.7 + offset
        expected[(size, 0, 143000, "arc_easy@5shot/acc_norm")] = 0.72 + offset
        expected[(size, 0, 143000, "lambada_openai@5shot/ppl")] = 30.0 + 14.3
        expected[(size, 0, 143000, "lambada_openai@5shot/acc")] = 0.3
    for seed in (1, 2):
        for step in steps:
            polypythias_file(root, "160m", seed, step, {"arc_easy": 0.35 + 0.001 * seed})
            expected[("160m", seed, step, "arc_easy/acc")] = 0.35 + 0.001 * seed
    return root, expected


def test_the_suite_layout_is_read_as_released_beside_polypythias_seeds(suite):
    root, expected = suite
    assert choose_source(root).kind == "lm-eval"
    study = load_study(root)
    metrics = study.metrics
    got = {(str(r.model), int(r.seed), int(r.step), str(r.metric)): r.value for r in metrics.itertuples()}
    assert got == pytest.approx(expected)  # every value, each once, nothing else
    assert study.models == ["160m", "160m-deduped"]  # the deduped model is its own, never merged
    seeds = metrics[metrics.model.astype(str) == "160m"]["seed"].astype(str).unique()
    assert sorted(seeds, key=int) == ["0", "1", "2"]  # the original Pythia is seed 0, beside PolyPythias' 1 and 2
    assert sorted(metrics[metrics.model.astype(str) == "160m-deduped"]["seed"].astype(str).unique()) == ["0"]
    assert not study.notes
    # One model's folder, or its zero-shot folder alone, reads the same values.
    alone = load_study(root / "pythia-160m" / "zero-shot").metrics
    assert sorted(alone["step"].unique()) == [0, 1000, 143000] and set(alone["model"].astype(str)) == {"160m"}
    assert value(alone, "160m", 0, 1000, "arc_easy/acc") == pytest.approx([0.31])


def test_metric_names_of_lm_eval_03_and_04_and_their_shots():
    assert pythia_identity("EleutherAI/pythia-v1.1-160m-deduped") == ("160m-deduped", 0)
    assert pythia_identity("EleutherAI/pythia-160m-v0") == ("160m-v0", 0)  # the old suite: another model
    assert pythia_identity("EleutherAI/intervention-pythia-v1.1-410m-deduped") is None
    v03 = {"results": {"arc_easy": {"acc": 0.4, "acc_stderr": 0.01}}, "config": {"num_fewshot": 5}}
    v04 = {
        "results": {
            "arc_easy": {"acc,none": 0.4, "acc_stderr,none": 0.01, "alias": "arc_easy"},
            "gsm8k": {"exact_match,flexible-extract": 0.1},
        },
        "n-shot": {"arc_easy": 0, "gsm8k": 8},
    }
    assert lm_eval_metrics(v03["results"]) == [("arc_easy/acc", 0.4)]
    assert lm_eval_metrics(v03["results"], task_shots(v03)) == [("arc_easy@5shot/acc", 0.4)]
    assert lm_eval_metrics(v04["results"], task_shots(v04)) == [
        ("arc_easy/acc", 0.4),
        ("gsm8k@8shot/exact_match@flexible-extract", 0.1),
    ]


def test_a_file_whose_config_and_path_disagree_is_read_as_its_config_says_and_found_by_check(suite, tmp_path, capsys):
    """Identity comes from the file's own config where it has one; the disagreement is a --check finding. A file
    filed under its own identity wins over one that the config places on the same point."""
    root, expected = suite
    zero = root / "pythia-160m" / "zero-shot"
    # Path says step 3000, config step 1000 (which 160m_step1000.json gives: that one wins); path says step 4000,
    # config step 2000 (no other file: read at 2000); path says 160m, config 410m; a 5-shot run in zero-shot/.
    for path_step, config_step in ((3000, 1000), (4000, 2000)):
        suite_file(root, "pythia-160m/zero-shot", "160m", path_step, {"arc_easy": 0.9}).write_text(
            (zero / f"160m_step{path_step}.json")
            .read_text()
            .replace(f"revision=step{path_step}", f"revision=step{config_step}")
        )
    suite_file(root, "pythia-160m/zero-shot", "160m", 13000, {"arc_easy": 0.8}, pretrained="EleutherAI/pythia-410m")
    suite_file(root, "pythia-160m/zero-shot", "160m", 23000, {"arc_easy": 0.7}, shots=5)
    suite_file(
        root,
        "pythia-160m/zero-shot",
        "160m",
        33000,
        {"arc_easy": 0.6},
        pretrained="EleutherAI/intervention-pythia-v1.1-160m",
    )  # no Pythia model: left out
    study = load_study(root)
    got = {(str(r.model), int(r.seed), int(r.step), str(r.metric)): r.value for r in study.metrics.itertuples()}
    for (model, step, path_step, task), acc in {
        ("160m", 2000, 4000, "arc_easy"): 0.9,
        ("410m", 13000, 13000, "arc_easy"): 0.8,
        ("160m", 23000, 23000, "arc_easy@5shot"): 0.7,
    }.items():
        expected[(model, 0, step, f"{task}/acc")] = acc
        expected[(model, 0, step, f"{task}/acc_norm")] = acc + 0.02
        expected[(model, 0, step, f"{task.replace('arc_easy', 'lambada_openai')}/ppl")] = 30.0 + path_step / 1e4
        expected[(model, 0, step, f"{task.replace('arc_easy', 'lambada_openai')}/acc")] = 0.3
    assert got == pytest.approx(expected)  # step 1000 keeps its own file's values; nothing at 3000, 4000 or 33000
    placed, left_out = study.notes
    assert "\n" not in placed and placed.startswith("4 of 19 lm-eval result files name another model, step or number")
    assert left_out.startswith("1 of 19 lm-eval result files were left out because their config names no Pythia model")
    out = tmp_path / "check"
    assert main([str(root), "--check", "--out", str(out)]) == 1
    rows = [r for r in csv.DictReader((out / "check.csv").open()) if "evaluation file" in r["problem"]]
    found = {(r["model"], r["seed"], r["problem"], r["steps"], r["detail"].split(" is for ")[1]) for r in rows}
    read = "it was read as its config says"
    assert found == {
        ("160m", "0", CONFIG_PATH_DISAGREE, "3000", f"step 1000; {read}"),
        ("160m", "0", CONFIG_PATH_DISAGREE, "4000", f"step 2000; {read}"),
        ("160m", "0", FOREIGN_FILE, "13000", f"EleutherAI/pythia-410m; {read}"),
        ("160m", "0", CONFIG_PATH_DISAGREE, "23000", f"5-shot; {read}"),
        ("160m", "0", FOREIGN_FILE, "33000", "EleutherAI/intervention-pythia-v1.1-160m; it was left out"),
    }
    capsys.readouterr()


def test_setting_folders_other_than_shots_are_read_only_on_their_own(tmp_path, capsys):
    """The suite re-evaluated checkpoints for its gender-bias case study in baseline/ (the same model, other
    values) and intervention/ (another model): read from above, they would mix with zero-shot/."""
    root = tmp_path / "pythia-v1"
    suite_file(root, "pythia-410m-deduped/zero-shot", "410m-deduped", 143000, {"arc_easy": 0.51})
    suite_file(root, "pythia-410m-deduped/baseline", "baseline-410m-deduped", 143000, {"arc_easy": 0.52})
    suite_file(
        root,
        "pythia-410m-deduped/intervention",
        "intervention-410m-deduped",
        143000,
        {"arc_easy": 0.53},
        pretrained="EleutherAI/intervention-pythia-v1.1-410m-deduped",
    )
    study = load_study(root)
    assert value(study.metrics, "410m-deduped", 0, 143000, "arc_easy/acc") == pytest.approx([0.51])
    assert [n for n in study.notes if "setting folders" in n] == [
        "2 lm-eval result files in setting folders other than zero-shot/ or five-shot/ were not read (baseline/, "
        "intervention/ e.g. pythia-410m-deduped/baseline/baseline-410m-deduped_step143000.json); point the source "
        "at such a folder to read it alone."
    ]
    baseline = load_study(root / "pythia-410m-deduped" / "baseline")
    assert value(baseline.metrics, "410m-deduped", 0, 143000, "arc_easy/acc") == pytest.approx([0.52])
    # The intervention model is no Pythia model: nothing to read, and --check lists the file.
    intervention = root / "pythia-410m-deduped" / "intervention"
    with pytest.raises(AnalysisError, match="No lm-eval result file under .* could be read"):
        load_study(intervention)
    assert main([str(intervention), "--check", "--out", str(tmp_path / "out")]) == 1
    [row] = csv.DictReader((tmp_path / "out" / "check.csv").open())
    assert row["problem"] == FOREIGN_FILE and "EleutherAI/intervention-pythia-v1.1-410m-deduped" in row["detail"]
    capsys.readouterr()


def test_undated_files_that_contradict_each_other_are_an_error(tmp_path):
    root = tmp_path / "evals"
    suite_file(root, "pythia-70m/zero-shot", "70m", 1000, {"arc_easy": 0.40})
    suite_file(root, "pythia-70m/0-shot", "70m", 1000, {"arc_easy": 0.41})
    with pytest.raises(
        AnalysisError,
        match=r"give different values of arc_easy/acc for model 70m seed 0 step 1000 "
        r"\(0.41 and 0.4\).*no timestamp",
    ) as caught:
        load_study(root)
    assert "\n" not in str(caught.value)
    (root / "pythia-70m" / "0-shot" / "70m_step1000.json").write_text(
        (root / "pythia-70m" / "zero-shot" / "70m_step1000.json").read_text()
    )  # the same values: one of each
    assert len(load_study(root).metrics) == 4


def test_files_of_neither_layout_are_counted_not_read(tmp_path):
    root = tmp_path / "evals"
    suite_file(root / "pythia-v1", "pythia-70m/zero-shot", "70m", 1000, {"arc_easy": 0.40})
    # The old suite's files (another model of the same folder name) and a baseline suite's.
    old = root / "pythia-v0" / "pythia-70m" / "zero-shot" / "pythia-70m-0shot-global_step1000_eval_results_1.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"results": {"arc_easy": {"acc": 0.1}}, "config": {"model_args": {"seed": 1234}}}))
    (root / "opt").mkdir()
    (root / "opt" / "opt-125m.json").write_text(json.dumps({"results": {"arc_easy": {"acc": 0.2}}}))
    # A file right in pythia-v1/ has no model folder: "pythia-v1" names none.
    suite_file(root, "pythia-v1", "70m", 2000, {"arc_easy": 0.3})
    study = load_study(root)
    assert sorted(study.metrics["step"].unique()) == [1000] and set(study.metrics["model"].astype(str)) == {"70m"}
    assert [n for n in study.notes if "neither" in n] == [
        f"3 .json files below {root} are in neither lm-eval layout and were not read (e.g. opt/opt-125m.json)."
    ]


def test_the_command_line_says_what_an_evaluation_folder_holds(suite, capsys):
    root, _ = suite
    assert main([str(root)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no train/loss to summarise" in out
    assert "│ 160m │ 0 │ 3 │ 0-143000 │ 10 │" in out
    assert "│ 160m │ 2 │ 3 │ 0-143000 │ 1 │" in out
    assert "│ 160m-deduped │ 0 │ 3 │ 0-143000 │ 10 │" in out
