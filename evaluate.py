"""Evaluate a training checkpoint.

    python evaluate.py checkpoint=outputs/lbdpo/<date>/checkpoints/final
    python evaluate.py checkpoint=... data=hh_local generation.num_prompts=32
    python evaluate.py checkpoint=... reward_model=/path/to/reward-model

Writes into the run dir (or output_dir=): eval.json (all metrics), samples.jsonl (policy and reference
generations side by side), eval_report.md and PNGs (β per domain, β vs log PPL, training curves).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from lbdpo.cli import one_line_errors
    from lbdpo.eval.evaluate import evaluate_checkpoint

    with one_line_errors():  # a bad option, file or path: one line naming it (lbdpo/cli.py)
        evaluate_checkpoint(cfg)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from lbdpo.cli import check_overrides

    check_overrides(sys.argv[1:], Path(__file__).resolve().parent / "conf", "evaluate")  # a typo: one line, exit 2
    main()
