"""How much of the seed-to-seed spread of reward and KL is the evaluation's own sampling noise?

Each checkpoint is evaluated again with other sampling seeds (``evaluate.py seed=k``: the policy's sampled
continuations, on which reward and the KL estimate are computed, are drawn anew; the model is the same). The spread
of reward and KL across these evaluation seeds is pure measurement noise; the spread across training seeds (the
experiment's other runs of the same arm, from their ``eval.json``, all evaluated at seed 0) is training noise plus
that measurement noise. With ``--results``, the frontier gap too (reward − R*(KL), R* from the fixed arms' mean
(KL, reward) over their seeds, as in compare.md's Welch test). If the two are of the same size, more prompts
(``generation.num_prompts``) or samples (``generation.samples_per_prompt``) per evaluation shrink the frontier gap's
error more cheaply than more training seeds; ``--samples-per-prompt k`` measures the noise left with k samples.

    python benchmarks/eval_noise.py outputs/experiments/sentiment_v1/fixed_b03__seed-4 \\
        outputs/experiments/sentiment_v1/learn_design__seed-4 --seeds 1 2 3 4 5 6 7 --results results/sentiment_v1

Per checkpoint: ~1.5 min per evaluation seed on 2 cores (64 prompts; preference pass cut to 16 pairs, as it
does not depend on the sampling seed). The run's own eval.json (seed 0) is the first evaluation seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lbdpo.eval.significance import frontier_reward

REPO = Path(__file__).resolve().parents[1]


def generation_numbers(eval_json: Path) -> tuple[float, float]:
    """(mean reward of the policy's sampled continuations, mean KL estimate) of one eval.json."""
    gen = json.loads(eval_json.read_text())["generation"]
    return gen["reward"]["policy_mean"], gen["kl"]["mean"]


def evaluate(run: Path, out: Path, seed: int, num_prompts: int, samples_per_prompt: int) -> tuple[float, float]:
    subprocess.run([sys.executable, str(REPO / "evaluate.py"), f"checkpoint={run / 'checkpoints' / 'final'}",
                    f"output_dir={out}", f"seed={seed}", "max_pairs=16", "plots=false",
                    f"generation.num_prompts={num_prompts}", f"generation.samples_per_prompt={samples_per_prompt}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return generation_numbers(out / "eval.json")


def arm_values(results: Path, arm: str) -> list[tuple[float, float]]:
    """(reward, KL) of each seed of an arm in an experiment's results/."""
    return [generation_numbers(p) for p in sorted(results.glob(f"{arm}__seed-*/eval.json"))]


def frontier(results: Path, arms: list[str]) -> list[tuple[float, float]]:
    """The fixed arms' (mean KL, mean reward) over their seeds."""
    points = []
    for arm in arms:
        values = arm_values(results, arm)
        if values:
            points.append((statistics.mean(v[1] for v in values), statistics.mean(v[0] for v in values)))
    return points


def spread(values: list[tuple[float, float]], points: list[tuple[float, float]]) -> str:
    """'sd of reward | sd of KL | sd of the frontier gap' (population std; nan below two values or off the frontier)."""
    nan = float("nan")
    gaps = [r - star for r, k in values if (star := frontier_reward(points, k)) is not None] if points else []
    sd = [statistics.pstdev(x) if len(x) > 1 else nan for x in ([v[0] for v in values], [v[1] for v in values], gaps)]
    return f"{sd[0]:.4f} | {sd[1]:.2f} | {sd[2]:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with checkpoints/final and eval.json")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="evaluation seeds besides 0")
    parser.add_argument("--num-prompts", type=int, default=64, help="generation.num_prompts (the run's was 64)")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="generation.samples_per_prompt (run's: 1)")
    parser.add_argument("--results", type=Path, default=None, help="the experiment's results/ for the seed spread")
    parser.add_argument("--frontier-arms", nargs="+", default=["fixed_b003", "fixed_b01", "fixed_b03", "fixed_b1"])
    args = parser.parse_args()
    points = frontier(args.results, args.frontier_arms) if args.results else []
    print("| run | eval seeds | reward per eval seed | KL per eval seed | over eval seeds: sd reward | sd KL | sd gap "
          "| training seeds | over training seeds: sd reward | sd KL | sd gap |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            own = args.num_prompts == 64 and args.samples_per_prompt == 1  # the run's own evaluation is seed 0's
            values = [generation_numbers(run / "eval.json")] if own else []
            values += [evaluate(run, Path(tmp) / f"{run.name}_{s}", s, args.num_prompts, args.samples_per_prompt)
                       for s in args.seeds]
            trained = arm_values(args.results, run.name.split("__seed-")[0]) if args.results else []
            print(f"| {run.name} | {len(values)} | {', '.join(f'{v[0]:.3f}' for v in values)} | "
                  f"{', '.join(f'{v[1]:.2f}' for v in values)} | {spread(values, points)} | {len(trained)} | "
                  f"{spread(trained, points)} |", flush=True)


if __name__ == "__main__":
    main()
