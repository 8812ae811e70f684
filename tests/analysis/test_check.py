"""``python -m analysis SOURCE --check`` (analysis/check.py) on small lm-eval folders, tables and checkpoints."""

import csv
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analysis.__main__ import main
from analysis.check import check_study, foreign_files
from analysis.load import load_study
from polypythia.evaluate.integrity import FOREIGN_FILE, IDENTICAL_HINT, MISSING, NOT_DESCENDED


def write_result(root, folder: str, step: int, named: str, values: dict, stamp="2024-01-01T00-00-00.000000"):
    inner = root / folder / f"step{step}" / named.replace("/", "__")
    inner.mkdir(parents=True, exist_ok=True)
    data = {
        "results": {task: {"acc,none": value, "acc_stderr,none": 0.01} for task, value in values.items()},
        "config": {"model_args": f"pretrained={named},revision=step{step}"},
    }
    (inner / f"results_{stamp}.json").write_text(json.dumps(data))


@pytest.fixture
def evals(tmp_path):
    """Two seeds at steps 0, 1, 2, 4 with three faults: seed 1 lacks step 2; seed 2's steps 0 and 1
    give the same metrics; seed 2's step 4 also holds a file of the base model pythia-70m."""
    root = tmp_path / "evals"
    for seed in (1, 2):
        for step in (0, 1, 2, 4):
            if seed == 1 and step == 2:
                continue
            same = seed == 2 and step == 1
            values = {"arc_easy": 0.25 + 0.01 * (0 if same else step) + 0.001 * seed, "piqa": 0.5 + 0.01 * step}
            values["piqa"] = 0.5 if same else values["piqa"]
            write_result(root, f"pythia-70m-seed{seed}", step, f"EleutherAI/pythia-70m-seed{seed}", values)
    write_result(root, "pythia-70m-seed2", 4, "EleutherAI/pythia-70m", {"arc_easy": 0.9}, stamp="2024-02-01T00-00-00")
    return root


def test_each_planted_problem_is_found_in_an_lm_eval_folder(evals):
    study = load_study(evals)
    problems = check_study(study, foreign=foreign_files(evals))
    assert {(p.seed, p.problem, p.steps) for p in problems} == {
        ("1", MISSING, "2"),
        ("2", IDENTICAL_HINT, "0,1"),
        ("2", FOREIGN_FILE, "4"),
    }
    foreign = next(p for p in problems if p.problem == FOREIGN_FILE)
    assert "is for EleutherAI__pythia-70m;" in foreign.detail and foreign.detail.startswith("pythia-70m-seed2/step4/")


def test_cli_prints_writes_check_csv_and_exits_1_on_problems(evals, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(evals), "--check", "--out", str(out), "--no-plots"]) == 1
    assert "Integrity of" in capsys.readouterr().out
    with (out / "check.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["model", "seed", "weight_seed", "data_seed", "problem", "steps", "detail"]
    assert len(rows) == 3


def test_cli_exits_0_on_a_clean_source_and_2_on_a_user_error(tmp_path, capsys):
    root = tmp_path / "clean"
    for step in (0, 1, 2, 4):
        write_result(root, "pythia-70m-seed3", step, "EleutherAI/pythia-70m-seed3", {"arc_easy": 0.3 + 0.01 * step})
    assert main([str(root), "--check", "--out", str(tmp_path / "out")]) == 0
    assert "no problem found" in " ".join(capsys.readouterr().out.split())
    assert main([str(root), "--check", "--steps", "zero"]) == 2


def test_steps_polypythias_asks_only_for_the_study_steps(tmp_path):
    root = tmp_path / "evals"
    for step in (0, 1, 2, 8, 16, 1000):  # 4 is missing of the 27; 3, 5, ..., 2000 are not asked for
        write_result(root, "pythia-70m", step, "EleutherAI/pythia-70m", {"arc_easy": 0.3 + 0.0001 * step})  # <= 1
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 3000]
    problems = check_study(load_study(root, steps="polypythias"), steps=steps)
    assert [(p.seed, p.problem, p.steps) for p in problems] == [("0", MISSING, "4,32,64,128,256,512")]


def test_a_table_with_equal_weight_metrics_gives_the_hint(tmp_path):
    rows = [
        ("70m", 1, step, metric, value)
        for step in (0, 1, 2)
        for metric, value in (
            ("weights/mean", 0.1 if step < 2 else 0.2),
            ("weights/std", 0.02 * (1 + (step == 2))),
            ("train/loss", 5.0 - step),
        )
    ]
    path = tmp_path / "study.csv"
    pd.DataFrame(rows, columns=["model", "seed", "step", "metric", "value"]).to_csv(path, index=False)
    problems = check_study(load_study(path))
    assert [(p.problem, p.steps) for p in problems] == [(IDENTICAL_HINT, "0,1")]


def test_a_checkpoint_folder_is_checked_on_its_weights(tmp_path):
    root = tmp_path / "ckpts"
    for seed in (1, 2):
        torch.manual_seed(seed)
        init = {"layers.0.dense.weight": torch.randn(8, 8)}
        for step in (0, 1, 2):
            folder = root / f"pythia-14m-seed{seed}" / f"step{step}"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text("{}")
            base = init if seed == 1 or step == 0 else {"layers.0.dense.weight": torch.zeros(8, 8)}
            if seed == 2 and step > 0:
                torch.manual_seed(1)
                base = {"layers.0.dense.weight": torch.randn(8, 8)}
            save_file({k: v + 0.001 * step for k, v in base.items()}, str(folder / "model.safetensors"))
    assert main([str(root), "--check", "--out", str(tmp_path / "out")]) == 1
    rows = list(csv.DictReader((tmp_path / "out" / "check.csv").open()))
    assert {(r["seed"], r["problem"], r["steps"]) for r in rows} == {("2", NOT_DESCENDED, "1,2")}
