"""Training-step speed and peak memory: lbdpo's arms against TRL's ``DPOTrainer`` on the same HH pairs.

    pip install -r benchmarks/requirements.txt             # TRL: for this benchmark only, never a core dependency
    python benchmarks/dpo_speed.py                          # every arm, 10 steps each (steps 3.. timed)
    python benchmarks/dpo_speed.py --arms trl,rows,fixed --steps 6
    python benchmarks/dpo_speed.py --device cuda --model random_qwen2_5_0_5b --arms trl,fixed --steps 20   # GPU, bf16

Each arm runs in its own process (so its peak memory is its own): ``pairs`` pairs per optimizer step from
``../shared/data/preference/hh_helpful-base_train_sample.jsonl`` (``--data``), the ``--model`` config of
``conf/model`` (default SmolLM2-135M-Instruct; ``random_*`` = a target's architecture with random weights), its
chat template, ``max_length`` tokens per row (lbdpo: prompt ≤ ``max_prompt_length``, left-truncated; TRL:
``truncation_mode=keep_end``), reference as a frozen copy unless the arm says ``precompute``, AdamW, no eval.
Same numerics in both frameworks: on CPU float32 throughout; on CUDA float32 master weights with bf16 autocast
and a bf16 reference copy (``trainer=gpu``; TRL ``bf16=True``). Activation checkpointing only in the arms named
``*_ckpt``/``*lowmem`` (TRL's own default turns it on, and bf16 even on CPU: both are set explicitly here).
Prints a markdown table: median s/step over the timed steps, pairs/s, real tokens/s (lbdpo arms), peak memory
(RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and each arm's speed and memory relative to the TRL arm
with the same reference and checkpointing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference" / "hh_helpful-base_train_sample.jsonl"
ROWS = ["trainer.forward=rows", "trainer.logps_chunk_size=null"]  # one padded row per response, full logits
LOWMEM = ["trainer.gradient_checkpointing=true", "trainer.malloc_mmap_threshold=131072", "trainer.logps_chunk_size=256",
          "trainer.adamw_fused=true"]
PACKED = ["trainer.forward=packed"]  # packed pairs on any device (trainer.forward=auto packs on CPU only)
LBDPO_ARMS = {  # arm → Hydra overrides on top of the common ones (the defaults: trainer.forward=auto, docs/performance.md)
    "rows": ["beta_head=fixed", *ROWS],  # the forward before packing: the baseline of the speed-ups
    "rows_chunked": ["beta_head=fixed", "trainer.forward=rows", "trainer.logps_chunk_size=1024"],
    "fixed": ["beta_head=fixed"],
    # packed segments: rows under one block mask (the GPU default) against one row with attention per segment (the
    # CPU default: trainer.packed_attention=auto)
    "fixed_block_mask": ["beta_head=fixed", *PACKED, "trainer.packed_attention=block_mask"],
    "fixed_segments": ["beta_head=fixed", *PACKED, "trainer.packed_attention=segments"],
    "fixed_compile": ["beta_head=fixed", "trainer.compile=true"],  # the decoder through torch.compile (inductor)
    # GPU: the packed rows' width rounded to 8 (trainer=gpu's pad_to_multiple_of, the default since 2026-12-04),
    # not rounded (every batch a new shape), rounded to 64 (few shapes); and SDPA's cuDNN backend switched off
    # (it builds a plan per new shape: RESULTS.md, "On a GPU")
    "fixed_unrounded": ["beta_head=fixed", *PACKED, "trainer.pad_to_multiple_of=null"],
    "fixed_pad64": ["beta_head=fixed", *PACKED, "trainer.pad_to_multiple_of=64"],
    "fixed_no_cudnn_sdp": ["beta_head=fixed", *PACKED],
    "linear": ["beta_head=linear", "beta_head.w_init=0.03"],
    "mlp": ["beta_head=mlp", "beta_head.w_init=0.03"],
    "fixed_precompute": ["beta_head=fixed", "trainer.reference=precompute"],
    "fixed_precompute_block_mask": ["beta_head=fixed", "trainer.reference=precompute",
                                    "trainer.packed_attention=block_mask"],
    "fixed_precompute_compile": ["beta_head=fixed", "trainer.reference=precompute", "trainer.compile=true"],
    "rows_precompute": ["beta_head=fixed", "trainer.reference=precompute", *ROWS],
    "lora": ["beta_head=fixed", "trainer.lora.enabled=true", "trainer.reference=adapter_disabled",
             "trainer.policy_lr=1e-4"],
    "fixed_ckpt": ["beta_head=fixed", "trainer.gradient_checkpointing=true"],  # activations recomputed in backward
    "fixed_precompute_ckpt": ["beta_head=fixed", "trainer.reference=precompute", "trainer.gradient_checkpointing=true"],
    # least memory: + freed activations returned to the OS (glibc mmap threshold pinned), 256-position lm_head chunks,
    # fused AdamW (no parameter-sized temporaries in the update)
    "fixed_lowmem": ["beta_head=fixed", *LOWMEM],
    "fixed_precompute_lowmem_block_mask": ["beta_head=fixed", "trainer.reference=precompute", *LOWMEM,
                                           "trainer.packed_attention=block_mask"],
    "fixed_precompute_lowmem": ["beta_head=fixed", "trainer.reference=precompute", *LOWMEM],
    "fixed_lowmem_compile": ["beta_head=fixed", *LOWMEM, "trainer.compile=true"],
    "fixed_precompute_lowmem_compile": ["beta_head=fixed", "trainer.reference=precompute", *LOWMEM, "trainer.compile=true"],
}
TRL_ARMS = {"trl": {}, "trl_precompute": {"precompute_ref_log_probs": True},
            "trl_ckpt": {"gradient_checkpointing": True},
            "trl_precompute_ckpt": {"precompute_ref_log_probs": True, "gradient_checkpointing": True}}
ARMS = [*TRL_ARMS, *LBDPO_ARMS]


DEVICE_OVERRIDES = {  # lbdpo's side of "same numerics" (module docstring); checkpointing only in *_ckpt arms
    "cpu": ["trainer.cpu=true", "trainer.gradient_checkpointing=false", "trainer.reference=copy"],
    "cuda": ["trainer=gpu", "trainer.gradient_accumulation_steps=1", "trainer.gradient_checkpointing=false",
             "trainer.reference=copy"],
}


def model_config(name: str) -> dict:
    """``conf/model/<name>.yaml`` as a plain dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"), resolve=True)


def run_lbdpo(arm: str, args) -> dict:
    """One lbdpo run through the real training loop; step times from its metrics.jsonl."""
    from hydra import compose, initialize_config_dir

    from lbdpo.train.trainer import train

    if arm == "fixed_no_cudnn_sdp":
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)  # SDPA picks flash / memory-efficient / math instead
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model={args.model}", *DEVICE_OVERRIDES[args.device], "logger=none", "data=jsonl",
            f"data.path={args.data}", "data.eval_size=null",
            "data.eval_fraction=null", f"data.max_length={args.max_length}",
            f"data.max_prompt_length={args.max_prompt_length}", f"data.max_train_pairs={args.pairs * (args.steps + 1)}",
            f"trainer.batch_size={args.pairs}", f"trainer.max_steps={args.steps}", "trainer.eval_every=0",
            "trainer.warmup_steps=0", "trainer.policy_lr=5e-7", "trainer.save_every=0", "trainer.log_every=1",
            *LBDPO_ARMS[arm]])
        train(cfg, tmp)
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "pairs_per_s" in line][args.skip:]
    return {"steps_s": [round(args.pairs / s["pairs_per_s"], 3) for s in steps],  # each timed step, in order
            "s_per_step": statistics.median(args.pairs / s["pairs_per_s"] for s in steps),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps)}


def run_trl(arm: str, args) -> dict:
    """TRL's DPOTrainer on the same pairs (conversational rows: the chat template is applied by TRL)."""
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lbdpo.data import load_preference_pairs
    from lbdpo.data.tokenize import prompt_messages_of
    from lbdpo.models import freeze, load_model, load_model_and_tokenizer, reference_model_config

    model_cfg = model_config(args.model)
    policy, tokenizer = load_model_and_tokenizer(model_cfg)
    options = {"gradient_checkpointing": False, **TRL_ARMS[arm]}
    reference = None if options.get("precompute_ref_log_probs") else \
        freeze(load_model(reference_model_config(model_cfg), vocab_size=len(tokenizer)))  # bf16 on CUDA, as lbdpo's
    rows = load_preference_pairs(str(args.data)).select(range(args.pairs * (args.steps + 1)))
    convo = [{"prompt": prompt_messages_of(r), "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
              "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.pairs, max_steps=args.steps,
                           learning_rate=5e-7, warmup_steps=0, beta=0.1, max_length=args.max_length,
                           truncation_mode="keep_end", logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=args.device == "cpu", bf16=args.device == "cuda", seed=0,
                           dataloader_num_workers=0, **options)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(convo), callbacks=[StepTimer()])
        trainer.train()
    return {"steps_s": [round(t, 3) for t in times[args.skip:]], "s_per_step": statistics.median(times[args.skip:]),
            "tokens_per_s": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config (random_qwen2_5_0_5b, ...)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", type=Path, default=DATA, help="preference JSONL (default: the shared HH sample)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one arm in this process
    args = parser.parse_args()
    if args.run:
        import torch

        torch.set_num_threads(args.threads)
        result = run_trl(args.run, args) if args.run in TRL_ARMS else run_lbdpo(args.run, args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        result["peak_mem_gb"] = (torch.cuda.max_memory_allocated() / 1024**3 if args.device == "cuda"
                                 else result["peak_rss_gb"])
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not args.data.is_file():
        sys.exit(f"{args.data} not found: this benchmark reads the shared HH sample (or pass --data)")
    results = {}
    for arm in args.arms.split(","):
        if arm not in ARMS:
            sys.exit(f"unknown arm {arm!r}; known: {ARMS}")
        cmd = [sys.executable, __file__, "--run", arm] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                           if k not in ("run", "arms")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:  # one failed arm is reported, the others still run
            print(f"arm {arm} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results[arm] = json.loads(line[7:])
        print(f"{arm}: {results[arm]}", file=sys.stderr, flush=True)
    print_table(results, args)


def baseline(arm: str, results: dict) -> dict | None:
    """The TRL arm an lbdpo arm is compared with: same reference (copy/precompute) and checkpointing, where it ran."""
    pre = "_precompute" if "precompute" in arm else ""
    ckpt = "_ckpt" if ("ckpt" in arm or "lowmem" in arm) else ""
    for name in (f"trl{pre}{ckpt}", f"trl{pre}", "trl"):
        if name in results:
            return results[name]
    return None


def print_table(results: dict, args) -> None:
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    print(f"{args.model} on {args.device}, {args.pairs} pairs/step, max_length {args.max_length}, {args.threads} "
          f"threads, median of steps {args.skip + 1}–{args.steps}\n")
    print("(each arm against the TRL arm with the same reference mode and checkpointing, where it ran, else `trl`)\n")
    print(f"| arm | s/step | pairs/s | tokens/s | {memory} | speed vs TRL | memory vs TRL |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        tok = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "–"
        ref = baseline(arm, results)
        speed = f"{ref['s_per_step'] / r['s_per_step']:.2f}×" if ref else "–"
        mem = f"{r['peak_mem_gb'] / ref['peak_mem_gb']:.2f}×" if ref else "–"
        print(f"| {arm} | {r['s_per_step']:.3f} | {args.pairs / r['s_per_step']:.2f} | {tok} | "
              f"{r['peak_mem_gb']:.2f} GB | {speed} | {mem} |")


if __name__ == "__main__":
    main()
