"""Time Learnable-β DPO training steps (forward + backward + AdamW) on synthetic pairs.

    python benchmarks/step_time.py                       # embedded SmolLM2-135M, 4 pairs × 96 tokens, CPU
    python benchmarks/step_time.py --model tiny_random --pairs 8 --length 64
    python benchmarks/step_time.py --reference precompute  # no reference forward in the step
    python benchmarks/step_time.py --chunk 256             # policy log-probs without vocab-sized logits

Prints seconds per step and tokens per second (median of --steps after one warm-up step).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.data import PreferenceCollator
from lbdpo.dpo_model import DynamicBetaDPOModel
from lbdpo.models import freeze, hidden_size_of, load_model, load_model_and_tokenizer

MODELS = {"smollm2": {"source": "smollm2_gguf", "dtype": "float32"},
          "tiny_random": {"source": "tiny_random", "dtype": "float32"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
    parser.add_argument("--length", type=int, default=96, help="tokens per row (prompt + response)")
    parser.add_argument("--prompt", type=int, default=56, help="prompt tokens per row")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reference", choices=["copy", "precompute"], default="copy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--chunk", type=int, default=0, help="logps_chunk_size (0 = full logits)")
    parser.add_argument("--share", action="store_true", help="share_prompt: each prompt computed once per pair")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, tok = load_model_and_tokenizer(MODELS[args.model])
    ref = freeze(load_model(MODELS[args.model], vocab_size=len(tok))) if args.reference == "copy" else None
    head = BetaHead(BetaHeadConfig(hidden_size=hidden_size_of(policy), w_init=0.05))
    model = DynamicBetaDPOModel(policy, head, ref, logps_chunk_size=args.chunk or None, share_prompt=args.share).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(100, len(tok), (n,), generator=g).tolist()

    feats = [{"prompt_input_ids": ids(args.prompt), "chosen_input_ids": ids(args.length - args.prompt),
              "rejected_input_ids": ids(args.length - args.prompt)} for _ in range(args.pairs)]
    if args.reference == "precompute":
        for f in feats:
            f["reference_chosen_logps"], f["reference_rejected_logps"] = -100.0, -100.0
    batch = PreferenceCollator(tok.pad_token_id)(feats)
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    tokens = 2 * args.pairs * args.length
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    print(f"model={args.model} pairs={args.pairs} length={args.length} reference={args.reference} chunk={args.chunk} "
          f"share={args.share} "
          f"threads={torch.get_num_threads()}: {sec:.2f} s/step, {tokens / sec:.0f} tokens/s, {args.pairs / sec:.2f} "
          f"pairs/s, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
