"""Every shipped config composes and validates; bad values give one clear error."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from polypythia.config.jobconfig import job_config, model_preset
from polypythia.errors import ConfigError

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def compose_job(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("model", ["14m", "31m", "70m", "160m", "410m", "tiny"])
@pytest.mark.parametrize("budget", ["smoke", "demo", "pythia"])
def test_shipped_configs_validate(model, budget, tmp_path):
    slow = (
        ["launcher.allow_slow=true"] if budget == "pythia" else []
    )  # the full schedule on CPU: see test_bad_inputs.py
    cfg = job_config(compose_job(f"model={model}", f"budget={budget}", *slow), str(tmp_path))
    assert cfg.model.name == model and cfg.budget.name == budget
    assert cfg.model == model_preset(model)  # the size is conf/model/<model>.yaml's (tests/test_model.py: published)


def test_pythia_budget_is_the_full_schedule(tmp_path):
    b = job_config(compose_job("budget=pythia", "launcher.num_gpus_per_job=1"), str(tmp_path)).budget
    assert (b.steps, b.global_batch_size, b.seq_length, b.checkpoint_every_steps) == (143_000, 1024, 2048, 1000)


def test_seeds_and_run_names(tmp_path, monkeypatch):
    monkeypatch.delenv("POLYPYTHIA_HOME")  # the default home, .polypythia/ relative to where the job is launched
    cfg = job_config(compose_job("seed=4", "model=tiny"), str(tmp_path))
    assert (cfg.effective_weight_seed, cfg.effective_data_seed, cfg.run_name) == (4, 4, "tiny-seed4")
    cfg = job_config(compose_job("seed=4", "data_seed=7", "model=tiny"), str(tmp_path))
    assert (cfg.effective_weight_seed, cfg.effective_data_seed, cfg.run_name) == (4, 7, "tiny-wseed4-dseed7")
    assert cfg.runs_dir.startswith(str(tmp_path))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("seed=-1", "seed must be a non-negative integer"),
        ("budget.steps=0", "budget.steps must be at least 1"),
        ("budget.micro_batch_size=3", "multiple of"),
        ("seed=abc", "seed"),
        ("data=indexed", "data.path"),
        ("train.precision=fp16", "fp16 needs a GPU per worker"),
        (
            "train.precision=fp16 launcher.num_gpus_per_job=1 train.zero_stage=0 train.autocast=false",
            "zero_stage=0 is refused",
        ),
        ("launcher.num_gpus_per_job=1 train.zero_stage=0 train.autocast=false", "zero_stage=0 is refused"),  # auto
        (  # DeepSpeed's fp16 weights on two workers, where train.autocast does not apply
            "train.precision=fp16 launcher.num_gpus_per_job=1 train.zero_stage=0 launcher.workers_per_run=2 "
            "budget.micro_batch_size=4",
            "zero_stage=0 is refused",
        ),
    ],
)
def test_bad_values_raise_config_error(override, fragment, tmp_path):
    try:
        raw = compose_job(*override.split())
    except Exception as exc:  # noqa: BLE001 - Hydra itself may refuse the override (e.g. mandatory values)
        assert fragment.split(".")[0] in str(exc)
        return
    with pytest.raises(ConfigError, match=fragment):
        job_config(raw, str(tmp_path))


def test_missing_indexed_data_is_reported(tmp_path):
    raw = compose_job("data=indexed", f"data.path={tmp_path}/nothing", f"data.tokenizer={tmp_path}/tok.json")
    with pytest.raises(ConfigError, match="has no .bin file"):
        job_config(raw, str(tmp_path))


@pytest.mark.parametrize("name, budget", [("polypythias", "pythia"), ("polypythias_demo", "smoke")])
def test_study_presets_sweep_five_sizes_by_ten_seeds(name, budget, tmp_path):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    overrides = [f"{k}={v}" for k, v in params.items()]
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    assert len(jobs) == 50
    assert {tuple(sorted(j)) for j in jobs} >= {("model=410m", "seed=9"), ("model=14m", "seed=0")}
    job = job_config({k: v for k, v in cfg.items() if k != "hydra"}, str(tmp_path))
    assert job.budget.name == budget and job.study == name


def test_a_job_that_finds_a_gpu_refuses_fp16_at_zero0(monkeypatch, tmp_path):
    """precision=auto means fp16 on a GPU; a job the launcher gave no GPU may still find one. DeepSpeed's
    fp16 weights at ZeRO 0 are refused there; train.autocast's fp32 weights on one worker are not."""
    from polypythia.train import engine

    cfg = job_config(compose_job("model=tiny", "train.zero_stage=0", "train.autocast=false"), str(tmp_path))
    assert engine.effective_zero_stage(cfg, 1) == 0  # fp32 on the CPU
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="zero_stage=0 is refused"):
        engine.effective_zero_stage(cfg, 1)
    autocast = job_config(compose_job("model=tiny", "train.zero_stage=0"), str(tmp_path))
    assert engine.autocast_dtype(autocast, 1) == engine.torch.float16 and engine.effective_zero_stage(autocast, 1) == 0
    with pytest.raises(ConfigError, match="zero_stage=0 is refused"):
        engine.effective_zero_stage(autocast, 2)
