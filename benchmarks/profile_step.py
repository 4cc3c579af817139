"""Where a Learnable-β DPO training step spends its time and memory, on the same HH pairs as ``dpo_speed.py``.

    python benchmarks/profile_step.py                                   # today's defaults
    python benchmarks/profile_step.py trainer.pack_pairs=false          # any Hydra override of the run

Builds the run through the real set-up (``lbdpo.train.setup``), takes the first micro-batches, and times the
phases of one optimizer step separately (policy forward with β and loss, reference forward, backward, AdamW
update), median over ``--steps`` steps after one warm-up; then profiles one more step with ``torch.profiler``
and prints the operators that take the most time and allocate the most memory. Prints the batch's real and
padded token counts, so that padding waste is visible.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference" / "hh_helpful-base_train_sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of the benchmark's")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hydra import compose, initialize_config_dir

    from lbdpo.train.setup import setup

    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=smollm2_135m", "logger=none", "data=jsonl", f"data.path={DATA}", "data.eval_size=null",
            "data.eval_fraction=null", "data.max_length=256", "data.max_prompt_length=192",
            f"data.max_train_pairs={args.pairs * (args.steps + 3)}", f"trainer.batch_size={args.pairs}",
            "trainer.eval_every=0", "trainer.save_every=0", *args.overrides])
        run = setup(cfg, Path(tmp))
        model, optimizer = run.model, run.optimizer
        phases: dict[str, list[float]] = {"reference forward": [], "policy forward + β + loss": [], "backward": [],
                                          "optimizer": []}
        for step in range(args.steps + 1):
            batch = next(run.batches)
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = run.inner.reference_logps(batch)  # what the forward would compute; timed on its own
            t1 = time.perf_counter()
            out = model({**batch, "reference_chosen_logps": ref[0], "reference_rejected_logps": ref[1]})
            t2 = time.perf_counter()
            out.loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if step:
                for name, sec in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    phases[name].append(sec)
        real = int(batch["attention_mask"].sum())
        print(f"batch: {batch['input_ids'].shape[0]} rows × {batch['input_ids'].shape[1]} columns = "
              f"{batch['input_ids'].numel()} positions, {real} real tokens "
              f"({real / batch['input_ids'].numel():.0%}); prompts {int(batch['prompt_lengths'].sum())} tokens")
        total = sum(statistics.median(v) for v in phases.values())
        print("\n| phase | s | share |\n|---|---:|---:|")
        for name, v in phases.items():
            print(f"| {name} | {statistics.median(v):.2f} | {statistics.median(v) / total:.0%} |")
        print(f"| step | {total:.2f} | |")
        print(f"\npeak RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")

        batch = next(run.batches)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        averages = prof.key_averages()
        print("\nby self CPU time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
        print("by self CPU memory allocated:\n" + averages.table(sort_by="self_cpu_memory_usage", row_limit=args.top))


if __name__ == "__main__":
    main()
