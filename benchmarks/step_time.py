"""Time Learnable-β DPO training steps (forward + backward + AdamW) on synthetic pairs.

    python benchmarks/step_time.py                       # embedded SmolLM2-135M, 4 pairs × 96 tokens, CPU
    python benchmarks/step_time.py --model tiny_random --pairs 8 --length 64
    python benchmarks/step_time.py --reference precompute  # no reference forward in the step
    python benchmarks/step_time.py --rows                  # one padded row per response, full logits (no packing)
    python benchmarks/step_time.py --sweep                 # scaling table: lengths × pairs, packed vs rows

Prints seconds per step, tokens per second and peak RSS (median of --steps after one warm-up step). ``--sweep``
runs each configuration in its own process (so each peak RSS is its own) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
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
    parser.add_argument("--chunk", type=int, default=0, help="logps_chunk_size (0: 1024 packed, full logits with --rows)")
    parser.add_argument("--rows", action="store_true", help="one padded row per response (trainer.forward=rows)")
    parser.add_argument("--sweep", action="store_true", help="scaling table over --sweep-lengths × --sweep-pairs")
    parser.add_argument("--sweep-lengths", default="128,256,512,1024")
    parser.add_argument("--sweep-pairs", default="1,4")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, tok = load_model_and_tokenizer(MODELS[args.model])
    ref = freeze(load_model(MODELS[args.model], vocab_size=len(tok))) if args.reference == "copy" else None
    head = BetaHead(BetaHeadConfig(hidden_size=hidden_size_of(policy), w_init=0.05))
    model = DynamicBetaDPOModel(policy, head, ref, logps_chunk_size=args.chunk or None,
                                forward="rows" if args.rows else "packed").train()
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
          f"rows={args.rows} "
          f"threads={torch.get_num_threads()}: {sec:.2f} s/step, {tokens / sec:.0f} tokens/s, {args.pairs / sec:.2f} "
          f"pairs/s, peak RSS {peak_gb:.2f} GB")


def sweep(args) -> None:
    """One process per (length, pairs, forward); prompts are 70 % of each row, as on HH and the sentiment set."""
    print(f"model={args.model}, reference={args.reference}, threads={args.threads or torch.get_num_threads()}, "
          f"median of {args.steps} steps after one warm-up\n")
    print("| tokens per row | pairs | packed s/step | packed peak RSS | rows s/step | rows peak RSS | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in map(int, args.sweep_lengths.split(",")):
        for pairs in map(int, args.sweep_pairs.split(",")):
            got = {}
            for rows in (False, True):
                cmd = [sys.executable, __file__, "--model", args.model, "--pairs", str(pairs), "--length", str(length),
                       "--prompt", str(int(0.7 * length)), "--steps", str(args.steps), "--reference", args.reference,
                       "--threads", str(args.threads)] + (["--rows"] if rows else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else ""
                got[rows] = (float(line.split(": ")[1].split(" s/step")[0]), float(line.split("peak RSS ")[1].split()[0])) \
                    if line else (float("nan"), float("nan"))  # nan: the process failed (e.g. out of memory)
            (ps, pm), (rs, rm) = got[False], got[True]
            print(f"| {length} | {pairs} | {ps:.2f} | {pm:.2f} GB | {rs:.2f} | {rm:.2f} GB | {rs / ps:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
