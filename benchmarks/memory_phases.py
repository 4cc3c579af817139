"""Where a training run's peak RSS comes from: resident memory sampled every 20 ms through ``dpo_speed.py``'s run
of one arm, printed at each log line of the run, every ``--every`` seconds until the peak, and at the peak (with
the run's progress bars on stderr, the times say which phase it is in).

    python benchmarks/memory_phases.py fixed_precompute_ckpt --steps 4
    python benchmarks/memory_phases.py fixed trainer.logps_chunk_size=256 --steps 4     # extra Hydra overrides

Run it alone on the machine. The arms are ``dpo_speed.py``'s (same HH pairs, 8 a step, 256 tokens).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import psutil

import dpo_speed


class Sampler(threading.Thread):
    """Samples this process's RSS; ``marks`` are (time, label) from the run's log lines."""

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.samples, self.marks, self.done = every, [], [], threading.Event()
        self.process = psutil.Process()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            time.sleep(self.every)

    def mark(self, label: str) -> None:
        self.marks.append((time.perf_counter(), label))


class MarkHandler(logging.Handler):
    def __init__(self, sampler: Sampler):
        super().__init__(logging.INFO)
        self.sampler = sampler

    def emit(self, record: logging.LogRecord) -> None:
        self.sampler.mark(f"{record.name}: {' '.join(record.getMessage().split())[:90]}")


def marked(sampler: Sampler, owner, name: str) -> None:
    """Mark the start and end of every call of ``owner.name``."""
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        sampler.mark(f"{name} starts")
        out = fn(*a, **k)
        sampler.mark(f"{name} done")
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arm", choices=list(dpo_speed.LBDPO_ARMS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to the arm's")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between the rows of the RSS series")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    dpo_speed.LBDPO_ARMS[args.arm] = [*dpo_speed.LBDPO_ARMS[args.arm], *args.overrides]
    sampler = Sampler()
    logging.getLogger().addHandler(MarkHandler(sampler))
    logging.getLogger().setLevel(logging.INFO)
    import lbdpo.train.setup as run_setup

    for owner, name in ((run_setup, "build_policy_and_reference"), (run_setup, "add_reference_columns"),
                        (torch.Tensor, "backward"), (torch.optim.AdamW, "step")):
        marked(sampler, owner, name)
    sampler.start()
    sampler.mark("start (torch imported)")
    run_args = argparse.Namespace(pairs=args.pairs, steps=args.steps, skip=1, max_length=256, max_prompt_length=192,
                                  model="smollm2_135m", device="cpu", data=dpo_speed.DATA)
    result = dpo_speed.run_lbdpo(args.arm, run_args)
    sampler.mark("run returned")
    time.sleep(0.1)
    sampler.done.set()
    sampler.join()

    gb = 1024**3
    peak_t, peak = max(sampler.samples, key=lambda s: s[1])
    print(f"arm {args.arm} {' '.join(args.overrides)}: {result['s_per_step']:.2f} s/step, "
          f"peak RSS {peak / gb:.2f} GB\n")
    print("| t (s) | RSS at the mark (GB) | highest until the next mark (GB) | log line |\n|---:|---:|---:|---|")
    t0 = sampler.samples[0][0]
    ticks = [(t0 + k * args.every, f"({k * args.every:.0f} s)") for k in range(int((peak_t - t0) / args.every) + 2)]
    sampler.marks = sorted(sampler.marks + ticks + [(peak_t, "peak")])
    for i, (t, label) in enumerate(sampler.marks):
        until = sampler.marks[i + 1][0] if i + 1 < len(sampler.marks) else float("inf")
        now = next((r for s, r in sampler.samples if s >= t), sampler.samples[-1][1])
        high = max((r for s, r in sampler.samples if t <= s < until), default=now)
        star = " ← peak" if label == "peak" else ""
        print(f"| {t - t0:.1f} | {now / gb:.2f} | {high / gb:.2f}{star} | {label.replace('|', '/')} |")


if __name__ == "__main__":
    main()
