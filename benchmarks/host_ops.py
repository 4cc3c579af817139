"""Host work of one optimizer step, counted on the CPU: aten ops per phase, and how many would stall a GPU.

    python benchmarks/host_ops.py --models tiny_random               # TRL, lbdpo fixed β and linear head (≈ 5 min)
    python benchmarks/host_ops.py --models smollm2_135m --max-length 64 --max-prompt-length 48 --shapes no
    python benchmarks/host_ops.py --shapes only                      # only the packed forward's shapes per epoch
    (--cache FILE keeps finished arms, so that arms can run one call at a time: each is its own process)

A GPU step on a small model is bound by the host (RESULTS.md, "On a GPU, second session"): every aten op is a
Python → dispatcher → kernel-launch round trip, and every read of a device value waits for the whole queue. Both can
be counted without a GPU, deterministically: each arm runs two optimizer steps on the CPU (float32, reference a
frozen copy, no activation checkpointing, AdamW, log every step) on the first 24 pairs of the HH sample (8 pairs a
step, 256 tokens, prompt ≤ 192: the pairs of ``dpo_speed.py``; lbdpo drops the pairs whose chosen equals rejected,
TRL does not), and the second step is counted — from fetching its batch to the end of its logging, which includes
collating the third batch (both loaders fetch one batch ahead) — by a ``TorchDispatchMode`` (every aten op) under a
``TorchFunctionMode`` (the Python calls that read a tensor or move it between devices). Device ops and syncs do not
depend on the row length (tiny_random at 64 and 256 tokens: the same counts but for the collators' host ops), so
SmolLM2-135M can be counted at 64 tokens where 256 would need ≈ 13 GB (full logits of 16 rows).

Phases: ``forward`` (batch, collation, policy and reference forward, loss), ``backward``, ``clipping`` (everything
between the last backward and the optimizer: gradient norms, clipping, the NaN guard and its read), ``optimizer``
(update, schedule, zero_grad), ``logging`` (the step's metrics and their output). TRL: the same cut through
``Trainer._inner_training_loop`` (its metric reads inside ``compute_loss`` fall in ``forward``).

The counting and its classification rule (device / host / sync): ``op_count.py``.

Also printed: the distinct (rows, width) shapes that the packed forward under its block mask (the layout a GPU
packs in) produces over one epoch of the whole HH sample at 8 pairs a step with ``trainer=gpu``'s batching
(``group_by_length``, ``pad_to_multiple_of=8``): a GPU's attention kernels and compiled graphs are planned per shape.
The last line: ``ops/step lbdpo <N> vs TRL <M> = <ratio>x; syncs/step lbdpo <a> vs TRL <b>; shapes/epoch <S>``,
lbdpo = its GPU default (``trainer.forward=rows``, full logits), fixed β, on the first model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from op_count import (KINDS, PHASES, DispatchCounter, FunctionCounter, Ledger, Phases,  # noqa: F401 (tests use them)
                      foreach_adamw, seed_device, summary)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference" / "hh_helpful-base_train_sample.jsonl"
ROWS = ["trainer.forward=rows", "trainer.logps_chunk_size=null"]  # trainer.forward=auto on a GPU: the GPU default
LBDPO_ARMS = {"fixed": ["beta_head=fixed", *ROWS], "linear": ["beta_head=linear", "beta_head.w_init=0.03", *ROWS],
              "mlp": ["beta_head=mlp", "beta_head.w_init=0.03", *ROWS],
              "packed_block_mask": ["beta_head=fixed", "trainer.forward=packed", "trainer.packed_attention=block_mask"]}
ARMS = ["trl", *LBDPO_ARMS]
def compose(args, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[
            f"model={args.model}", "trainer=gpu", "trainer.cpu=true", "trainer.mixed_precision=no",
            "trainer.gradient_checkpointing=false", "trainer.gradient_accumulation_steps=1", "trainer.reference=copy",
            "logger=none", "data=jsonl", f"data.path={args.data}", "data.eval_size=null", "data.eval_fraction=null",
            f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_prompt_length}",
            f"trainer.batch_size={args.pairs}", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
            "trainer.warmup_steps=0", "trainer.policy_lr=5e-7", *overrides])


def count_lbdpo_step(run) -> Ledger:
    """Two optimizer steps of lbdpo's loop on ``run`` (a :class:`lbdpo.train.setup.Run`): ``optimizer_step`` then
    ``log_step``; the second counted."""
    from lbdpo.train.trainer import log_step, optimizer_step

    ledger = Ledger()
    foreach_adamw(run.optimizer)
    phases = Phases(ledger)
    run.accelerator.backward = phases.wrap(run.accelerator.backward, "backward", after="clipping")
    run.optimizer.step = phases.wrap(run.optimizer.step, "optimizer")
    run.model.register_forward_pre_hook(lambda *_: phases.set("forward"))
    with FunctionCounter(ledger), DispatchCounter(ledger):
        for step in range(2):
            seed_device(ledger, [run.inner, run.inner.ref_model], run.optimizer)
            if step == 1:
                phases.start()
            result = optimizer_step(run)
            phases.set("logging")
            log_step(run, result, 1.0)
            phases.stop()
    return ledger


def count_lbdpo(arm: str, args) -> dict:
    """:func:`count_lbdpo_step` of one arm on the benchmark's pairs."""
    from lbdpo.train.setup import setup

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(args, [f"data.max_train_pairs={3 * args.pairs}", "trainer.max_steps=2", *LBDPO_ARMS[arm]])
        run = setup(cfg, Path(tmp))
        ledger = count_lbdpo_step(run)
        run.logger.close()
    return summary(ledger)


def count_trl(args) -> dict:
    """Two optimizer steps of TRL 1.16's ``DPOTrainer`` on the same pairs, the second counted."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lbdpo.data import load_preference_pairs
    from lbdpo.data.tokenize import prompt_messages_of
    from lbdpo.models import freeze, load_model, load_model_and_tokenizer, reference_model_config
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml"), resolve=True)
    policy, tokenizer = load_model_and_tokenizer(model_cfg)
    reference = freeze(load_model(reference_model_config(model_cfg), vocab_size=len(tokenizer)))
    rows = load_preference_pairs(str(args.data)).select(range(3 * args.pairs))
    convo = [{"prompt": prompt_messages_of(r), "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
              "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    ledger = Ledger()
    phases, steps = Phases(ledger), {"n": 0}

    class PhaseCallback(TrainerCallback):
        def on_pre_optimizer_step(self, *_, **__):
            phases.set("optimizer")

        def on_step_end(self, *_, **__):
            phases.set("logging")

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.pairs, max_steps=2, learning_rate=5e-7,
                           warmup_steps=0, beta=0.1, max_length=args.max_length, truncation_mode="keep_end",
                           logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
                           dataloader_num_workers=0, gradient_checkpointing=False)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(convo), callbacks=[PhaseCallback()])
        get_batch_samples, log_save = trainer.get_batch_samples, trainer._maybe_log_save_evaluate
        create_optimizer = trainer.create_optimizer

        def batch_samples(*a, **k):
            steps["n"] += 1
            seed_device(ledger, [trainer.model, trainer.ref_model], trainer.optimizer)
            if steps["n"] == 2:
                phases.start()
            return get_batch_samples(*a, **k)

        def log_then_stop(*a, **k):
            phases.set("logging")
            try:
                return log_save(*a, **k)
            finally:
                phases.stop()

        def optimizer_as_on_gpu(*a, **k):
            optimizer = create_optimizer(*a, **k)
            foreach_adamw(optimizer)
            return optimizer

        trainer.get_batch_samples, trainer._maybe_log_save_evaluate = batch_samples, log_then_stop
        trainer.create_optimizer = optimizer_as_on_gpu
        trainer.accelerator.backward = phases.wrap(trainer.accelerator.backward, "backward", after="clipping")
        with FunctionCounter(ledger), DispatchCounter(ledger):
            trainer.train()
    return summary(ledger)


def packed_shapes(args) -> dict:
    """Distinct (rows, width) of the block-mask packing over one epoch of the whole HH sample, batched as
    ``trainer=gpu`` batches (``group_by_length``, ``pad_to_multiple_of=8``), with and without the bucketing a GPU
    uses (:func:`lbdpo.packed_pairs.pack_pairs`); the layout only (:func:`lbdpo.packed_pairs.pair_layout`), no
    model forward. Also the positions that go through the layers a step (mean), against the real tokens."""
    from lbdpo.packed_pairs import pair_layout
    from lbdpo.train.setup import setup

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(args, ["model=tiny_random", "trainer.group_by_length=true", "trainer.pad_to_multiple_of=8",
                             "trainer.forward=rows", "beta_head=fixed", "trainer.max_steps=1"])
        run = setup(cfg, Path(tmp))
        steps = run.train_pairs // run.pairs_per_step
        shapes = {"unbucketed": Counter(), "bucketed": Counter()}
        for _ in range(steps):
            batch = next(run.batches)
            for name, counter in shapes.items():
                packed = pair_layout(batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"],
                                     multiple_of=8, bucketed=name == "bucketed")[0]
                counter[tuple(packed.input_ids.shape)] += 1
        run.logger.close()
    return {"steps": steps, **{name: {"shapes": len(c), "positions": sum(r * w * n for (r, w), n in c.items()) / steps,
                                      "most_common": [[list(k), n] for k, n in c.most_common(8)]}
                               for name, c in shapes.items()}}


def run_child(what: str, args) -> dict:
    """One arm in its own process (fresh accelerate state, attention registry and allocator)."""
    cmd = [sys.executable, __file__, "--child", what, "--model", args.model, "--data", str(args.data),
           "--pairs", str(args.pairs), "--max-length", str(args.max_length),
           "--max-prompt-length", str(args.max_prompt_length), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"host_ops.py: {what} on {args.model} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def total(result: dict, kind: str | None = None) -> int:
    return sum(n for p in result["phases"].values() for k, n in p.items() if kind in (None, k))


def print_tables(results: dict) -> None:
    print("| model | arm | forward | backward | clipping | optimizer | logging | total ops | device | host | syncs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (model, arm), r in results.items():
        cells = [f"{sum(r['phases'][p].values())} ({r['phases'][p]['sync']})" for p in PHASES]
        print(f"| {model} | {arm} | " + " | ".join(cells) +
              f" | **{total(r)}** | {total(r, 'device')} | {total(r, 'host')} | **{total(r, 'sync')}** |")
    print("\n(each phase: ops (of which syncs))\n")
    for (model, arm), r in results.items():
        print(f"{model} / {arm}: syncs {r['syncs']}; most frequent host ops {r['top']['host'][:6]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny_random", help="conf/model configs (e.g. tiny_random,smollm2_135m); "
                        "the first is the last line's")
    parser.add_argument("--arms", default="trl,fixed,linear", help=f"comma-separated, from {ARMS}")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DATA, help="preference JSONL (default: the shared HH sample)")
    parser.add_argument("--shapes", choices=["yes", "no", "only"], default="yes",
                        help="count the packed forward's shapes per epoch (tiny_random's tokenizer = SmolLM2's)")
    parser.add_argument("--cache", type=Path, default=None, help="JSON file of finished arms: reused, extended (lets "
                        "the arms run one call at a time)")
    parser.add_argument("--model", default="tiny_random", help=argparse.SUPPRESS)  # child: its model
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one arm in this process
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        if args.child == "shapes":
            result = packed_shapes(args)
        else:
            result = count_trl(args) if args.child == "trl" else count_lbdpo(args.child, args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not args.data.is_file():
        sys.exit(f"{args.data} not found: this benchmark reads the shared HH sample (or pass --data)")
    models = args.models.split(",")
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.is_file() else {}

    def child(key: str, what: str, model: str) -> dict:
        if key not in cache:
            cache[key] = run_child(what, argparse.Namespace(**{**vars(args), "model": model}))
            if args.cache:
                args.cache.write_text(json.dumps(cache))
        return cache[key]

    shapes = None
    if args.shapes != "no":
        shapes = child(f"shapes/{args.pairs}x{args.max_length}", "shapes", "tiny_random")
        print(f"packed forward (block mask), one epoch of {args.data.name} at {args.pairs} pairs a step "
              f"({shapes['steps']} steps), distinct (rows, width) shapes:")
        for name in ("unbucketed", "bucketed"):
            if name in shapes:
                got = shapes[name]
                print(f"- {name}: {got['shapes']} shapes, {got['positions']:.0f} positions a step; most common "
                      f"{got['most_common']}")
        print()
    if args.shapes == "only":
        return
    print(f"{args.pairs} HH pairs a step, {args.max_length} tokens a row (prompt ≤ {args.max_prompt_length}); "
          f"counted: the second optimizer step, from its batch to the end of its logging\n")
    results = {}
    for model in models:
        for arm in args.arms.split(","):
            if arm not in ARMS:
                sys.exit(f"unknown arm {arm!r}; known: {ARMS}")
            results[model, arm] = child(f"{model}/{arm}/{args.pairs}x{args.max_length}", arm, model)
            print(f"{model} / {arm}: {total(results[model, arm])} ops", file=sys.stderr, flush=True)
    print_tables(results)
    lb, trl = results.get((models[0], "fixed")), results.get((models[0], "trl"))
    if lb and trl:
        print(f"\nops/step lbdpo {total(lb)} vs TRL {total(trl)} = {total(lb) / total(trl):.2f}x; "
              f"syncs/step lbdpo {total(lb, 'sync')} vs TRL {total(trl, 'sync')}; "
              f"shapes/epoch {shapes['bucketed']['shapes'] if shapes and 'bucketed' in shapes else '–'}")


if __name__ == "__main__":
    main()
