"""The checkpoint integrity check on tiny fake checkpoint folders (polypythia/evaluate/integrity.py)."""

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from polypythia.evaluate import integrity
from polypythia.evaluate.__main__ import check_integrity
from polypythia.evaluate.targets import targets_from_folder
from polypythia.train.schedule import checkpoint_steps

SCHEDULE = checkpoint_steps(20, 10, True)  # 0, 1, 2, 4, 8, 10, 16, 20


def weights(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "gpt_neox.embed_in.weight": (64, 16),
        "gpt_neox.layers.0.attention.dense.weight": (16, 16),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (32, 16),
        "gpt_neox.layers.0.mlp.dense_h_to_4h.bias": (32,),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def nudged(base: dict, step: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(1000 * seed + step)
    return {name: t + 0.001 * step * torch.randn(t.shape, generator=generator) for name, t in base.items()}


def write_checkpoint(folder, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture
def study(tmp_path):
    """Two runs laid out as trained here (run_config.json + checkpoints/step<S>/) with three faults:
    seed 1's step 1 is a copy of its step 0 and its step 16 is missing; seed 2's step 10 descends
    from seed 1's step 0."""
    root = tmp_path / "study"
    inits = {seed: weights(seed) for seed in (1, 2)}
    for seed in (1, 2):
        run = root / f"tiny-seed{seed}"
        run.mkdir(parents=True)
        (run / "run_config.json").write_text(
            json.dumps({"budget": {"steps": 20, "checkpoint_every_steps": 10, "log_spaced_checkpoints": True}})
        )
        for step in SCHEDULE:
            write_checkpoint(run / "checkpoints" / f"step{step}", nudged(inits[seed], step, seed))
    ones = root / "tiny-seed1" / "checkpoints"
    shutil.copy(ones / "step0" / "model.safetensors", ones / "step1" / "model.safetensors")
    shutil.rmtree(ones / "step16")
    write_checkpoint(root / "tiny-seed2" / "checkpoints" / "step10", nudged(inits[1], 10, 2))
    return root


def test_finds_each_planted_problem_and_nothing_else(study, tmp_path):
    targets = targets_from_folder(study, tmp_path / "out")
    found = {(p.seed, p.problem, p.steps) for p in integrity.check_targets(targets)}
    assert found == {
        ("1", integrity.MISSING, "16"),
        ("1", integrity.IDENTICAL, "0,1"),
        ("2", integrity.NOT_DESCENDED, "10"),
    }


def test_evaluation_end_prints_the_table_and_writes_check_csv(study, tmp_path, capsys):
    out = tmp_path / "out"
    check_integrity(targets_from_folder(study, out), out)
    printed = capsys.readouterr().out
    assert "Integrity of the checkpoints" in printed and "check.csv" in printed.replace("\n", "")
    with (out / integrity.CHECK_FILE).open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["model", "seed", "weight_seed", "data_seed", "problem", "steps", "detail"]
    assert {(r["model"], r["weight_seed"], r["data_seed"]) for r in rows} == {("tiny", "1", "1"), ("tiny", "2", "2")}
    assert "from tiny-seed1's step 0" in next(r["detail"] for r in rows if r["problem"] == integrity.NOT_DESCENDED)


def test_published_folders_use_the_pythia_schedule_in_their_range(tmp_path):
    for step in (0, 1, 2, 8):  # 4 is missing; 1000 (beyond the range) is not asked for
        write_checkpoint(tmp_path / "pythia-tiny-seed3" / f"step{step}", nudged(weights(3), step, 3))
    problems = integrity.check_targets(targets_from_folder(tmp_path, tmp_path / "out"))
    assert [(p.problem, p.steps, p.weight_seed) for p in problems] == [(integrity.MISSING, "4", 3)]
    assert integrity.report(problems, "t", None) == 1 and integrity.report([], "t", None) == 0


def test_sampled_digest_of_large_files_is_confirmed_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "_FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(integrity, "_SAMPLE_BYTES", 16)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(bytes(range(256)) * 40)
    b.write_bytes(bytes(range(256)) * 40)
    assert integrity.file_digest(a).startswith("sampled:") and integrity.file_digest(a) == integrity.file_digest(b)
    assert integrity.file_digest(a, whole=True) == integrity.file_digest(b, whole=True)


def test_identical_runs_groups_consecutive_equal_values():
    assert integrity.identical_runs([(4, "c"), (0, "a"), (1, "a"), (2, "a"), (8, "c"), (16, None), (32, None)]) == [
        [0, 1, 2],
        [4, 8],
    ]
    assert integrity.shown_steps(",".join(map(str, range(12)))).endswith("... (12 in all)")
