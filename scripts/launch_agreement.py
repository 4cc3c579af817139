"""Per-step losses of the same tiny_random run launched three ways — 1 process (batch 4), DDP on 2 CPU processes
(torchrun, batch 2 each) and FSDP2 on 2 CPU processes (conf/accelerate/fsdp.yaml through
tests/launchers/fsdp_on_cpu.py, batch 2 each) — printed side by side with the largest difference.

    python scripts/launch_agreement.py [--steps 4] [--out /tmp/launch_agreement]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    from conftest import write_item_pairs
    from test_fsdp import fsdp_env  # the environment `accelerate launch --config_file conf/accelerate/fsdp.yaml` sets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/launch_agreement"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = write_item_pairs(args.out / "pairs.jsonl")
    common = ["model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={pairs}",
              "data.max_length=48", "data.max_prompt_length=32", "data.eval_size=8", "data.eval_fraction=null",
              f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "beta_head.w_init=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = {
        "1 process": ([sys.executable, str(REPO / "train.py"), *common, "trainer.batch_size=4"], env),
        "DDP ×2": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train.py"),
                    *common, "trainer.batch_size=2"], env),
        "FSDP2 ×2": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                      str(REPO / "tests" / "launchers" / "fsdp_on_cpu.py"), *common, "trainer.batch_size=2"],
                     fsdp_env()),
    }
    losses = {}
    for name, (cmd, launch_env) in launches.items():
        run_dir = args.out / name.split()[0].lower()
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        out = subprocess.run([*cmd, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=REPO,
                             env=launch_env)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        losses[name] = [r["loss"] for r in rows]
    print("| step | " + " | ".join(losses) + " |\n|---:|" + "---:|" * len(losses))
    for i in range(args.steps):
        print(f"| {i + 1} | " + " | ".join(f"{v[i]:.8f}" for v in losses.values()) + " |")
    base = losses["1 process"]
    for name, values in losses.items():
        print(f"max |Δ| {name} vs 1 process: {max(abs(a - b) for a, b in zip(values, base)):.2e}")


if __name__ == "__main__":
    main()
