"""Throughput of an experiment's runs on a small CPU machine: one run with every core, or several runs at once with
one core each? (Decides how ``lbdpo.experiment`` should use the machine.)

    python benchmarks/parallel_runs.py --steps 30 --skip 5            # ~8 min on 2 cores; run it alone

Each arm trains ``train.py`` (sentiment data, SmolLM2-135M, learnable β, reference precomputed — the experiment-1
setting) for ``--steps`` steps in its own folder under /tmp, then reads every step's time from ``metrics.jsonl``
(``pairs_per_s``). ``one`` is one process with ``--cores`` threads, ``single thread`` one process with one thread,
``parallel`` is ``--cores`` processes of one thread each, started together. Throughput = Σ over processes of pairs per second (median over the steps after
``--skip``); the ratio parallel / one is the gain of running runs side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(run_dir: Path, steps: int, seed: int) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "data=sentiment", "trainer=cpu", "logger=none",
            "beta_head=linear", f"trainer.max_steps={steps}", "trainer.reference=precompute", "trainer.eval_every=0",
            "trainer.save_every=0", f"seed={seed}", f"hydra.run.dir={run_dir}"]


def median_pairs_per_s(run_dir: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs_per_s"] for r in rows if "pairs_per_s" in r and r["step"] > skip]
    return statistics.median(rates)


def run_arm(processes: int, threads: int, steps: int, skip: int, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    dirs = [root / f"p{processes}x{threads}_{i}" for i in range(processes)]
    start = time.perf_counter()
    logs = [root / f"{d.name}.log" for d in dirs]  # files, not pipes: a full pipe would stall a process
    procs = []
    for i, (d, log) in enumerate(zip(dirs, logs)):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(command(d, steps, seed=i), cwd=REPO, env=env, stdout=f,
                                          stderr=subprocess.STDOUT))
    for p, log in zip(procs, logs):
        if p.wait() != 0:
            raise SystemExit(f"train.py failed:\n{log.read_text()[-3000:]}")
    rates = [median_pairs_per_s(d, skip) for d in dirs]
    return {"processes": processes, "threads": threads, "pairs_per_s": sum(rates),
            "per_process": rates, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the median (warm-up)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run_arm(1, args.cores, args.steps, args.skip, Path(tmp))
        single = run_arm(1, 1, args.steps, args.skip, Path(tmp))
        parallel = run_arm(args.cores, 1, args.steps, args.skip, Path(tmp))
    print(f"| arm | processes × threads | pairs/s (sum, median of steps > {args.skip}) | per process | wall s |")
    print("|---|---|---:|---|---:|")
    for name, r in (("one", one), ("single thread", single), ("parallel", parallel)):
        print(f"| {name} | {r['processes']} × {r['threads']} | {r['pairs_per_s']:.3f} | "
              f"{', '.join(f'{x:.3f}' for x in r['per_process'])} | {r['wall_s']:.0f} |")
    print(f"\n{args.cores} threads / 1 thread (one process): {one['pairs_per_s'] / single['pairs_per_s']:.2f}×; "
          f"parallel / one throughput: {parallel['pairs_per_s'] / one['pairs_per_s']:.2f}×")


if __name__ == "__main__":
    main()
