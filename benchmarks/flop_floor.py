"""The floor of an exact DPO training step on this machine: FLOPs the step cannot avoid ÷ the CPU's measured
matrix-product throughput, and bytes it cannot avoid + the runtime's own RSS. Against TRL's measured step, this
says how large a speed-up or memory saving *any* exact float32 implementation could reach here.

    python benchmarks/flop_floor.py                        # the HH batches of dpo_speed.py (8 pairs, 256 tokens)
    python benchmarks/flop_floor.py --trl-s 33.66 --trl-precompute-s 26.69 --trl-rss-gb 8.5 --trl-precompute-rss-gb 8.4

Run it alone on the machine (it times matrix products). The TRL and lbdpo step times and peak RSS come from
``benchmarks/dpo_speed.py`` (defaults: an earlier TRL run, ``git show 02521af:benchmarks/RESULTS.md``; pass this
machine's figures with the flags above).

FLOPs are counted from the model's configuration and the real token counts of the batches (a multiply-add is 2
FLOPs), for the least work an exact step does — each distinct token once, each query attending only to its own
causal context:

    body forward     2 · W · N                   W: weights of the decoder's Linear layers, N: distinct tokens
    attention fwd    4 · layers · heads · head_dim · K        K: (query, key) pairs inside each causal context
    lm_head fwd      2 · d · V · S               S: scored positions (policy: prompt tokens 2..p for log PPL and
                                                  both responses; reference: both responses)
    backward         2 × the body and attention forward, 2 × lm_head at the response positions (log PPL detached)

The optimizer, norms, activations, softmax and the log-sum-exp are left out, so the floor is a lower bound on time.
Memory: float32 weights, gradients and two AdamW moments (16 bytes a parameter), + 4 for a reference copy, + the
RSS of a process that has imported torch and transformers and loaded the tokenizer; activations left out.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "preference" / "hh_helpful-base_train_sample.jsonl"


def batch_counts(lengths: list[tuple[int, int, int]]) -> dict[str, int]:
    """Token counts of one batch of pairs given as (prompt, chosen, rejected) lengths."""
    keys = sum((p + c) * (p + c + 1) // 2 + r * p + r * (r + 1) // 2 for p, c, r in lengths)
    return {"tokens": sum(p + c + r for p, c, r in lengths), "keys": keys,
            "policy_scored": sum(p - 1 + c + r for p, c, r in lengths), "responses": sum(c + r for _, c, r in lengths),
            "rows_positions": 2 * len(lengths) * max(p + max(c, r) for p, c, r in lengths)}


def step_flops(counts: dict[str, float], linear_weights: int, layers: int, attn_width: int, hidden: int,
               vocab: int) -> dict[str, float]:
    """The FLOPs of one exact step's phases (see the module docstring)."""
    body = 2 * linear_weights * counts["tokens"] + 4 * layers * attn_width * counts["keys"]
    head = 2 * hidden * vocab
    return {"policy forward": body + head * counts["policy_scored"],
            "policy backward": 2 * body + 2 * head * counts["responses"],
            "reference forward": body + head * counts["responses"]}


def matmul_gflops(shapes: list[tuple[int, int, int]], repeats: int = 5) -> dict[tuple[int, int, int], float]:
    """Best-of-``repeats`` float32 GFLOP/s of ``(m, k) @ (k, n)`` for each shape."""
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        out[(m, k, n)] = 2 * m * k * n / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batches", type=int, default=7, help="batches counted (dpo_speed.py reads pairs × (steps+1))")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-s", type=float, default=33.66, help="TRL DPOTrainer s/step, reference copy")
    parser.add_argument("--trl-precompute-s", type=float, default=26.69, help="TRL s/step, precompute_ref_log_probs")
    parser.add_argument("--trl-rss-gb", type=float, default=8.5)
    parser.add_argument("--trl-precompute-rss-gb", type=float, default=8.4)
    parser.add_argument("--lbdpo-s", type=float, default=20.56, help="lbdpo fixed β s/step, reference copy")
    parser.add_argument("--lbdpo-precompute-s", type=float, default=14.87)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig, AutoModelForCausalLM

    from lbdpo.data import load_preference_pairs
    from lbdpo.data.tokenize import TokenizeConfig, tokenize_pairs
    from lbdpo.models import load_tokenizer, smollm2_local_dir

    tokenizer = load_tokenizer({"source": "smollm2_gguf"})
    runtime_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # torch + transformers + tokenizer
    rows = load_preference_pairs(str(DATA)).select(range(args.pairs * args.batches))
    ds, _ = tokenize_pairs(rows, tokenizer, TokenizeConfig(max_length=args.max_length,
                                                           max_prompt_length=args.max_prompt_length))
    lengths = [(len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in ds]
    per_batch = [batch_counts(lengths[i:i + args.pairs]) for i in range(0, len(lengths), args.pairs)]
    counts = {k: statistics.fmean(b[k] for b in per_batch) for k in per_batch[0]}

    config = AutoConfig.from_pretrained(smollm2_local_dir())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    params = sum(p.numel() for p in model.parameters())
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    flops = step_flops(counts, linear, config.num_hidden_layers, heads * head_dim, config.hidden_size,
                       config.vocab_size)

    n = int(counts["tokens"])
    d, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = [(n, d, inter), (n, inter, d), (n, d, d), (1024, d, v), (2048, 2048, 2048)]
    rates = matmul_gflops(shapes)
    peak = max(rates.values())

    print(f"{args.pairs} pairs a batch, mean of {len(per_batch)} batches: {counts['tokens']:.0f} distinct tokens "
          f"({counts['rows_positions']:.0f} positions as two padded rows a pair), "
          f"{counts['responses']:.0f} response tokens; {params / 1e6:.1f} M parameters ({linear / 1e6:.1f} M in "
          f"the decoder's Linear layers), vocabulary {v}\n")
    print(f"float32 matrix products, {args.threads} threads (best of 5):\n")
    print("| (m, k) @ (k, n) | GFLOP/s |\n|---|---:|")
    for (m, k, nn), rate in rates.items():
        print(f"| ({m}, {k}) @ ({k}, {nn}) | {rate:.0f} |")
    print("\nexact-step FLOPs (GFLOP): " + ", ".join(f"{k} {f / 1e9:.0f}" for k, f in flops.items()))

    copy = sum(flops.values())
    pre = copy - flops["reference forward"]
    mem_copy = runtime_gb + 20 * params / 1024**3
    mem_pre = runtime_gb + 16 * params / 1024**3
    print(f"\nruntime RSS before any model: {runtime_gb:.2f} GB\n")
    print("| reference | exact FLOPs | floor at the best matmul rate | TRL s/step | best speed-up possible | target "
          "| lbdpo s/step (its achieved GFLOP/s) | memory floor | TRL peak RSS | floor / TRL | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, f, trl, target, ours, mem, trl_mem in (
            ("copy", copy, args.trl_s, 3, args.lbdpo_s, mem_copy, args.trl_rss_gb),
            ("precompute", pre, args.trl_precompute_s, 4, args.lbdpo_precompute_s, mem_pre, args.trl_precompute_rss_gb)):
        floor = f / (peak * 1e9)
        print(f"| {name} | {f / 1e9:.0f} G | {floor:.1f} s | {trl:.2f} | {trl / floor:.2f}× | {target}× | "
              f"{ours:.2f} ({f / ours / 1e9:.0f}) | {mem:.2f} GB | {trl_mem:.1f} GB | {mem / trl_mem:.2f}× | 0.33× |")


if __name__ == "__main__":
    main()
