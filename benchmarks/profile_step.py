"""Where a Learnable-β DPO training step spends its time and memory, on the same HH pairs as ``dpo_speed.py``.

    python benchmarks/profile_step.py                                   # today's defaults
    python benchmarks/profile_step.py trainer.forward=rows          # any Hydra override of the run
    python benchmarks/profile_step.py --device cuda --model random_qwen2_5_0_5b --steps 5   # a GPU, bf16 autocast

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
from dpo_speed import DATA, DEVICE_OVERRIDES, REPO  # the same pairs and numerics as the speed table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of the benchmark's")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config (random_qwen2_5_0_5b, ...)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"

    def clock() -> float:  # wall time after the device's queued work is done
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    from hydra import compose, initialize_config_dir

    from lbdpo.train.setup import setup

    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model={args.model}", *DEVICE_OVERRIDES[args.device], "logger=none", "data=jsonl",
            f"data.path={args.data}", "data.eval_size=null",
            "data.eval_fraction=null", "data.max_length=256", "data.max_prompt_length=192",
            f"data.max_train_pairs={args.pairs * (args.steps + 3)}", f"trainer.batch_size={args.pairs}",
            "trainer.eval_every=0", "trainer.save_every=0", *args.overrides])
        run = setup(cfg, Path(tmp))
        model, optimizer = run.model, run.optimizer
        phases: dict[str, list[float]] = {"reference forward": [], "policy forward + β + loss": [], "backward": [],
                                          "optimizer": []}
        for step in range(args.steps + 1):
            batch = next(run.batches)
            t0 = clock()
            with torch.no_grad():
                ref = run.inner.reference_logps(batch)  # what the forward would compute; timed on its own
            t1 = clock()
            out = model({**batch, "reference_chosen_logps": ref[0], "reference_rejected_logps": ref[1]})
            t2 = clock()
            out.loss.backward()
            t3 = clock()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = clock()
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
        if cuda:
            print(f"peak GPU memory allocated so far: {torch.cuda.max_memory_allocated() / 1024**3:.2f} GB")

        batch = next(run.batches)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        averages = prof.key_averages()
        print("\nby self CPU time:\n" + averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
        if cuda:  # host time far above device time = launch/sync-bound
            torch.cuda.synchronize()
            print("by self CUDA time:\n" + averages.table(sort_by="self_cuda_time_total", row_limit=args.top))
        print("by self CPU memory allocated:\n" + averages.table(sort_by="self_cpu_memory_usage", row_limit=args.top))


if __name__ == "__main__":
    main()
