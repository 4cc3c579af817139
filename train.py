"""Train a policy with Learnable-β DPO.

    python train.py                                   # defaults: embedded SmolLM2, sentiment data, learnable β
    python train.py beta_head=mlp beta_head.epsilon=0.1
    python train.py beta_head=fixed beta_head.beta=0.1  # plain DPO baseline
    python train.py -m                                # the default sweep (conf/config.yaml: hydra.sweeper.params)
    python train.py -m +sweep=cpu_small               # a named sweep from sweeps/
    torchrun --nproc_per_node 2 train.py model=tiny_random      # DDP on CPU (FSDP: docs/training.md)

Writes metrics.jsonl, checkpoints/ and (offline) W&B files into the Hydra run directory.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def dirname_of(overrides: str) -> str:
    """A multirun subfolder name from ``hydra.job.override_dirname``: one path component (an override's "/",
    e.g. in data.path=/a/b.jsonl, becomes "_"), at most 150 characters (file systems cap names at 255)."""
    return overrides.replace("/", "_")[:150]


OmegaConf.register_new_resolver("lbdpo_dirname", dirname_of, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from lbdpo.cli import one_line_errors
    from lbdpo.train.trainer import train

    with one_line_errors():  # a bad option, file or path: one line naming it (lbdpo/cli.py)
        metrics = train(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    return metrics.get("eval/rewards/accuracies", float("nan"))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from lbdpo.cli import check_overrides

    check_overrides(sys.argv[1:], Path(__file__).resolve().parent / "conf", "config")  # a typo'd key: one line, exit 2
    main()
