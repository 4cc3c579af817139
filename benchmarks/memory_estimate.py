"""On paper: what packed pairs and chunked log-probs save for the GPU targets at 1024 tokens per row.

    python benchmarks/memory_estimate.py                     # Qwen2.5-0.5B and DeepSeek-R1-Distill-Qwen-1.5B
    python benchmarks/memory_estimate.py --pairs 4 --prompt-fraction 0.5

Counts bytes, it measures nothing: the architectures' public config values are below (no network here). For a
batch of ``pairs`` pairs with rows of ``length`` tokens, ``prompt_fraction`` of them prompt (0.7 on HH and the
sentiment set), bf16 activations (autocast), no activation checkpointing, AdamW with float32 master weights:

- logits: rows path = (2B, T, V) bf16 logits + their gradient + one (T, V) float32 row in the log-sum-exp;
  chunked = one (chunk, V) float32 block and its gradient;
- activations: tokens × layers × the tensors a decoder layer keeps for backward (≈ 4·d + 2·kv + 4·ffn values
  per token; attention kernels keep O(T) extra), rows path = 2B·T tokens, packed = B·(p + 2·r) tokens;
- weights, gradients, AdamW moments (float32) and a bf16 reference copy are the same in both.
"""

from __future__ import annotations

import argparse

# public config.json values: hidden, layers, ffn (intermediate), kv width (key_value_heads × head_dim), vocab, params
CONFIGS = {
    "Qwen2.5-0.5B": dict(hidden=896, layers=24, ffn=4864, kv=2 * 64, vocab=151_936, params=494e6),
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(hidden=1536, layers=28, ffn=8960, kv=2 * 128, vocab=151_936, params=1.78e9),
}
GB = 1e9


def estimate(c: dict, pairs: int, length: int, prompt_fraction: float, chunk: int) -> dict[str, float]:
    prompt = int(prompt_fraction * length)
    per_token = c["layers"] * (4 * c["hidden"] + 2 * c["kv"] + 4 * c["ffn"]) * 2  # bf16 bytes kept for backward
    rows_tokens, packed_tokens = 2 * pairs * length, pairs * (prompt + 2 * (length - prompt))
    logits_rows = 2 * (2 * pairs * length * c["vocab"] * 2) + length * c["vocab"] * 4
    logits_chunked = 2 * chunk * c["vocab"] * 4
    states = c["params"] * (4 + 4 + 8) + c["params"] * 2  # fp32 weights, grads, AdamW moments; bf16 reference
    return {"states": states / GB, "act_rows": rows_tokens * per_token / GB, "act_packed": packed_tokens * per_token / GB,
            "logits_rows": logits_rows / GB, "logits_chunked": logits_chunked / GB, "tokens_rows": rows_tokens,
            "tokens_packed": packed_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompt-fraction", type=float, default=0.7)
    parser.add_argument("--chunk", type=int, default=1024, help="logps_chunk_size")
    args = parser.parse_args()
    print(f"{args.pairs} pairs × 2 rows × {args.length} tokens, prompt {args.prompt_fraction:.0%}, bf16 activations, "
          f"chunk {args.chunk}\n")
    print("| model | weights+grads+AdamW+ref | activations rows → packed | logits rows → chunked | total rows → packed "
          "| saved |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, c in CONFIGS.items():
        e = estimate(c, args.pairs, args.length, args.prompt_fraction, args.chunk)
        rows = e["states"] + e["act_rows"] + e["logits_rows"]
        packed = e["states"] + e["act_packed"] + e["logits_chunked"]
        print(f"| {name} | {e['states']:.1f} GB | {e['act_rows']:.1f} → {e['act_packed']:.1f} GB "
              f"({e['tokens_rows']} → {e['tokens_packed']} tokens) | {e['logits_rows']:.1f} → "
              f"{e['logits_chunked']:.2f} GB | {rows:.1f} → {packed:.1f} GB | {rows - packed:.1f} GB |")


if __name__ == "__main__":
    main()
