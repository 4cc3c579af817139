"""Step time of ``beta_head.objective=validation`` against the plain DPO step (``objective=dpo``), in one process.

    python benchmarks/beta_validation_cost.py                          # embedded SmolLM2-135M, sentiment pairs, CPU
    python benchmarks/beta_validation_cost.py --model tiny_random --steps 8
    python benchmarks/beta_validation_cost.py --accum 4 --batch-size 2  # more micro-batches per step
    python benchmarks/beta_validation_cost.py --gpu                     # trainer=gpu's precision on a CUDA device

Builds two real training runs (``lbdpo.train.setup.setup``: same model, data, seed and options but the objective)
and times their optimizer steps (:func:`lbdpo.train.trainer.optimizer_step`: forward, backward, the held-out pass
and finite differences under validation, clipping, AdamW) alternately, step after step, so that a load that changes
over time weighs on both alike. Prints each objective's median seconds per step after one warm-up step and the ratio
of the medians (validation / dpo). The validation step adds one held-out micro-batch forward + backward (and its
reference forward with ``--reference copy``) and two no-grad float32 forwards per training micro-batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lbdpo.paths import find_project
from lbdpo.train.setup import setup
from lbdpo.train.trainer import optimizer_step

MODELS = {"smollm2": "smollm2_135m", "tiny_random": "tiny_random"}


def build(objective: str, args, folder: Path):
    overrides = ["trainer=gpu"] if args.gpu else []
    overrides += [f"model={MODELS[args.model]}", "logger=none", f"beta_head.objective={objective}",
                 "beta_head.w_init=0.05", "data.beta_val_fraction=0.1",  # the same training pairs in both runs
                 f"trainer.batch_size={args.batch_size}", f"trainer.gradient_accumulation_steps={args.accum}",
                 f"trainer.max_steps={args.steps + 1}", f"trainer.reference={args.reference}",
                 "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_pairs=false", "trainer.warmup_steps=0",
                 f"data.max_train_pairs={max(200, 2 * (args.steps + 1) * args.batch_size * args.accum)}"]
    with initialize_config_dir(config_dir=str(find_project() / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return setup(cfg, folder / objective)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (trainer.batch_size)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient_accumulation_steps)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per objective (after one warm-up)")
    parser.add_argument("--reference", choices=["copy", "precompute"], default="copy")
    parser.add_argument("--gpu", action="store_true", help="trainer=gpu (bf16 autocast, gradient checkpointing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {objective: build(objective, args, Path(tmp)) for objective in ("dpo", "validation")}
        for run in runs.values():
            run.model.train()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for step in range(args.steps + 1):
            for objective, run in runs.items():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                optimizer_step(run)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if step:  # the first step warms up (allocators, w_init)
                    times[objective].append(time.perf_counter() - t0)
        device = runs["dpo"].accelerator.device
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"model={args.model} device={device} batch_size={args.batch_size} accum={args.accum} "
          f"reference={args.reference} threads={torch.get_num_threads()}, median of {args.steps} steps:")
    for objective, sec in median.items():
        print(f"  {objective:<10} {sec:.3f} s/step  (all: {', '.join(f'{t:.3f}' for t in times[objective])})")
    print(f"  ratio validation / dpo: {median['validation'] / median['dpo']:.2f}")


if __name__ == "__main__":
    main()
