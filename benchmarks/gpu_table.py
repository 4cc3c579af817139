"""Issue 39's GPU table: TRL against lbdpo's GPU default and each packed layout, at the small and the realistic
shapes, in one process (one call of a lent GPU: ``bash benchmarks/gpu_bench.sh $OUT``, the ``table`` stage).

    python benchmarks/gpu_table.py --device cuda                       # the three shapes below, every arm
    python benchmarks/gpu_table.py --device cpu --steps 2 --skip 0 --shapes small --scale tiny   # a dry run here

Shapes (``--shapes``, comma-separated names): ``small`` = random Qwen2.5-0.5B architecture, 8 HH pairs × 256 tokens
(prompt ≤ 192), no checkpointing (RESULTS.md's earlier GPU runs); ``qwen_long`` = the same architecture, 16 pairs ×
1024 (prompt ≤ 768); ``r1d_long`` = DeepSeek-R1-Distill-Qwen-1.5B's architecture, 8 pairs × 1024. The long shapes run
activation checkpointing on both sides (as ``trainer=gpu`` does; without it rows of 1024 tokens do not fit an 80 GB
GPU, ``benchmarks/memory_estimate.py``). Arms: ``trl`` (TRL 1.16 ``DPOTrainer``), ``rows`` (lbdpo's GPU default:
``trainer=gpu``, one padded row per response, full logits, fused AdamW), ``block_mask`` (packed pairs under the
block mask, bucketed shapes), ``segments`` (packed, attention per segment), ``flex`` (the block mask's rows under
FlexAttention's BlockMask, ``src/lbdpo/packed_flex.py``: empty tiles skipped; its first steps pay flex_attention's
compilation, which ``--skip`` leaves out). Same numerics on both sides: float32
master weights, bf16 autocast, bf16 reference copy; HH pairs from ``--data``.

Why one process: a process per arm paid ≈ 100 s of start-up on the 2026-12-04 H200 (imports, two random models
built on the host), which would not fit 15 arms in one call. Here the imports are paid once and each shape's two
models are built once on the host and deep-copied for every arm (``lbdpo.train.setup``'s model builder is swapped
for the copy; TRL is handed the copies). Each step is timed to the end of its device work (a synchronize after it,
both sides); peak GPU memory is reset before every arm. A time budget (``--budget-s``) skips the arms that would not
start in time, so the call prints its table whatever it reached.

Prints one markdown table: shape, arm, median s/step and spread (min–max over the timed steps), pairs/s, real tokens/s
(attention-mask tokens of the 2B rows, both sides), peak memory (GPU: ``max_memory_allocated``), speed vs TRL.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference" / "hh_helpful-base_train_sample.jsonl"
SHAPES = {  # name → (model, pairs, max_length, max_prompt_length, activation checkpointing)
    "small": ("random_qwen2_5_0_5b", 8, 256, 192, False),
    "qwen_long": ("random_qwen2_5_0_5b", 16, 1024, 768, True),
    "r1d_long": ("random_r1_distill_qwen_1_5b", 8, 1024, 768, True),
}
ARMS = {  # lbdpo arms: Hydra overrides on top of trainer=gpu (forward=auto is rows on a GPU)
    "rows": ["trainer.forward=rows"],
    "block_mask": ["trainer.forward=packed", "trainer.packed_attention=block_mask"],
    "segments": ["trainer.forward=packed", "trainer.packed_attention=segments"],
    "flex": ["trainer.forward=packed", "trainer.packed_attention=flex"],
}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lbdpo_config(args, shape: tuple, arm: str, steps: int):
    from hydra import compose, initialize_config_dir

    model, pairs, length, prompt, ckpt = shape
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"model={model}", "trainer=gpu", f"trainer.cpu={str(args.device == 'cpu').lower()}",
            *(["trainer.mixed_precision=no"] if args.device == "cpu" else []),
            "trainer.gradient_accumulation_steps=1", f"trainer.gradient_checkpointing={str(ckpt).lower()}",
            "trainer.reference=copy", "logger=none", "data=jsonl", f"data.path={args.data}", "data.eval_size=null",
            "data.eval_fraction=null", f"data.max_length={length}", f"data.max_prompt_length={prompt}",
            f"data.max_train_pairs={pairs * (steps + 1)}",
            f"trainer.batch_size={pairs}", f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.warmup_steps=0", "trainer.policy_lr=5e-7", "trainer.log_every=1", "trainer.log_pairs=false",
            *ARMS[arm]])


def run_lbdpo(args, shape: tuple, arm: str, models: tuple) -> dict:
    """lbdpo's real loop (``train``) with the shape's models copied in; step times from its metrics.jsonl."""
    import lbdpo.train.setup as setup_module
    import lbdpo.train.trainer as trainer_module

    build, step = setup_module.build_policy_and_reference, trainer_module.optimizer_step
    setup_module.build_policy_and_reference = lambda cfg, need_reference: (
        copy.deepcopy(models[0]), copy.deepcopy(models[1]) if need_reference else None, models[2])

    def timed_step(run):  # to the end of the step's device work, as TRL's below
        result = step(run)
        synchronize(args.device)
        return result

    trainer_module.optimizer_step = timed_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer_module.train(lbdpo_config(args, shape, arm, args.steps), tmp)
            lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    finally:
        setup_module.build_policy_and_reference, trainer_module.optimizer_step = build, step
    steps = [line for line in lines if "pairs_per_s" in line][args.skip:]
    pairs = shape[1]
    return {"steps_s": [pairs / s["pairs_per_s"] for s in steps],
            "tokens": [s["tokens_per_s"] * pairs / s["pairs_per_s"] for s in steps]}


def run_trl(args, shape: tuple, models: tuple) -> dict:
    """TRL's DPOTrainer on the same pairs, handed copies of the same models (conversational rows, as dpo_speed.py)."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lbdpo.data import load_preference_pairs
    from lbdpo.data.tokenize import prompt_messages_of

    _, pairs, length, _, ckpt = shape
    rows = load_preference_pairs(str(args.data)).select(range(pairs * (args.steps + 1)))
    convo = [{"prompt": prompt_messages_of(r), "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
              "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    times, tokens = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            synchronize(args.device)
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=pairs, max_steps=args.steps, learning_rate=5e-7,
                           warmup_steps=0, beta=0.1, max_length=length, truncation_mode="keep_end", logging_steps=1,
                           save_strategy="no", report_to=[], use_cpu=args.device == "cpu", bf16=args.device == "cuda",
                           seed=0, dataloader_num_workers=0, gradient_checkpointing=ckpt)
        trainer = DPOTrainer(model=copy.deepcopy(models[0]), ref_model=copy.deepcopy(models[1]), args=config,
                             processing_class=models[2], train_dataset=datasets.Dataset.from_list(convo),
                             callbacks=[StepTimer()])
        training_step = trainer.training_step

        def counted(model, inputs, *a, **k):  # the collator's host tensors, before they move: no device read
            tokens.append(sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask")))
            return training_step(model, inputs, *a, **k)

        trainer.training_step = counted
        trainer.train()
    return {"steps_s": times[args.skip:], "tokens": tokens[args.skip:]}


def build_models(args, shape: tuple) -> tuple:
    """(policy, reference, tokenizer) as lbdpo's set-up builds them for this shape (on the host)."""
    from lbdpo.build import build_policy_and_reference

    return build_policy_and_reference(lbdpo_config(args, shape, "rows", 1), need_reference=True)


def measure(args, shape: tuple, arm: str, models: tuple) -> dict:
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # each arm its own Accelerator, as in its own process
    GradientState._reset_state()
    got = run_trl(args, shape, models) if arm == "trl" else run_lbdpo(args, shape, arm, models)
    synchronize(args.device)
    got["peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3 if args.device == "cuda" else None
    return got


def row(name: str, arm: str, pairs: int, r: dict, trl: dict | None) -> str:
    s = statistics.median(r["steps_s"])
    tokens = statistics.median(t / x for t, x in zip(r["tokens"], r["steps_s"])) if r["tokens"] else float("nan")
    speed = f"{statistics.median(trl['steps_s']) / s:.2f}×" if trl else "–"
    peak = f"{r['peak_gb']:.2f} GB" if r.get("peak_gb") is not None else "–"
    return (f"| {name} | {arm} | {s:.3f} | {min(r['steps_s']):.3f}–{max(r['steps_s']):.3f} | {pairs / s:.1f} | "
            f"{tokens:,.0f} | {peak} | {speed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--arms", default=",".join(["trl", *ARMS]))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out (new shapes, allocator)")
    parser.add_argument("--budget-s", type=float, default=450, help="start no arm after this many seconds")
    parser.add_argument("--scale", default="full", choices=["full", "tiny"],
                        help="tiny: every shape as tiny_random, 2 pairs × 64 tokens (a dry run of every code path)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data} not found (pass --data)")
    start, table = time.perf_counter(), []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if args.scale == "tiny":
            shape = ("tiny_random", 2, 64, 48, shape[4])
        if time.perf_counter() - start > args.budget_s:
            table.append(f"| {name} | (not run: the {args.budget_s:.0f} s budget was spent) | | | | | | |")
            continue
        t0 = time.perf_counter()
        models, results = build_models(args, shape), {}
        print(f"{name}: models built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for arm in args.arms.split(","):
            if time.perf_counter() - start > args.budget_s:
                table.append(f"| {name} | {arm}: not run (budget) | | | | | | |")
                continue
            t0 = time.perf_counter()
            try:
                results[arm] = measure(args, shape, arm, models)
            except Exception as err:  # one failed arm is reported in the table, the others still run
                table.append(f"| {name} | {arm}: failed ({type(err).__name__}: {str(err)[:80]}) | | | | | | |")
                print(f"{name}/{arm} failed: {err!r}", file=sys.stderr, flush=True)
                continue
            print(f"{name}/{arm}: {json.dumps(results[arm])} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
            table.append(row(name, arm, shape[1], results[arm], results.get("trl")))
        del models
    shown = {n: ("tiny_random", 2, 64, 48, SHAPES[n][4]) if args.scale == "tiny" else SHAPES[n]
             for n in args.shapes.split(",")}
    print(f"{args.device}, bf16 autocast on cuda; median of steps {args.skip + 1}–{args.steps}; shapes: " + "; ".join(
        f"{n} = {m}, {p} pairs × {t} tokens (prompt ≤ {q}){', checkpointing' if c else ''}"
        for n, (m, p, t, q, c) in shown.items()) + "\n")
    print("| shape | arm | median s/step | spread (min–max) | pairs/s | real tokens/s | peak memory | speed vs TRL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(table))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
