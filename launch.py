"""Train Pythia-architecture models across seeds: one Hydra job per (model, seed).

python launch.py -m seed=1,2,3 model=70m          # a sweep, each job a Ray task
python launch.py model=tiny budget=smoke          # one job in this process
python launch.py --help                           # every config group and option
"""

import hydra
from omegaconf import DictConfig

import polypythia.config.jobconfig  # noqa: F401  (registers the config defaults with Hydra's ConfigStore)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    from polypythia.driver.single import run_from_hydra

    return run_from_hydra(cfg)


if __name__ == "__main__":
    main()
