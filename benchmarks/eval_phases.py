"""Where evaluate.py's generation section spends its time, and what scoring the samples through the run's forward
saves: SmolLM2-135M on the held-out sentiment prompts, n prompts × k samples as in experiment 3 (128 × 4).

    python benchmarks/eval_phases.py --prompts 32 --samples 4 --threads 1     # ~6 min on one core; run it alone

Phases (each timed once, one model: the policy and the reference are the same network at this size): greedy
continuations (n), sampled continuations (n·k), and the samples' log-probs — once as padded rows with full logits (the
path before: every position's logits, each prompt once per sample) and once through the forward that evaluation uses
now (``Scorer`` with the CPU default: packed pairs of two samples, each prompt once per two, lm_head on response
positions only). Evaluation scores the samples twice (policy and reference), so its saving is twice the difference.
Prints both paths' largest difference (the same numbers up to float rounding; tests/test_sample_logps.py checks each
against one sequence at a time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.data.tokenize import end_of_turn_ids, resolve_prompt_format
from lbdpo.dpo_model import DynamicBetaDPOModel
from lbdpo.eval.evaluation import generate, sample_logps
from lbdpo.models import hidden_size_of, load_model_and_tokenizer
from lbdpo.scoring import ForwardPlan, Scorer

REPO = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, tok = load_model_and_tokenizer({"source": "smollm2_gguf", "dtype": "float32"})
    policy.eval()
    rows = [json.loads(line) for line in (REPO / "data/sentiment/test.jsonl").open()][:args.prompts]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    eos = end_of_turn_ids(tok, resolve_prompt_format("auto", tok)) + [tok.eos_token_id]
    cpu = torch.device("cpu")
    common = dict(max_new_tokens=48, batch_size=64, seed=0, device=cpu)
    _, t_greedy = timed(lambda: generate(policy, prompts, tok.pad_token_id, eos, sample=False, **common))
    many = prompts * args.samples
    sampled, t_sample = timed(lambda: generate(policy, many, tok.pad_token_id, eos, sample=True, **common))
    head = BetaHead(BetaHeadConfig(hidden_size=hidden_size_of(policy), mode="fixed"))
    now = DynamicBetaDPOModel(policy, head, forward="auto", device=cpu).eval().scorer  # trainer=cpu: auto
    before = Scorer(ForwardPlan("rows", None, None))
    old, t_old = timed(lambda: sample_logps(before, policy, many, sampled, tok.pad_token_id, 64, cpu))
    new, t_new = timed(lambda: sample_logps(now, policy, many, sampled, tok.pad_token_id, 64, cpu))
    n = len(many)
    print(f"{args.prompts} prompts × {args.samples} samples, threads={torch.get_num_threads()}, "
          f"prompt {sum(map(len, prompts)) / len(prompts):.1f} tokens, sample {sum(map(len, sampled)) / n:.1f} tokens")
    print("| phase | s |\n|---|---:|")
    print(f"| greedy ({args.prompts}) | {t_greedy:.1f} |\n| sampled ({n}) | {t_sample:.1f} |")
    print(f"| log-probs of the samples, rows with full logits (before) | {t_old:.1f} |")
    print(f"| log-probs of the samples, {now.plan.describe()} (now) | {t_new:.1f} |")
    section_before, section_now = t_greedy + t_sample + 2 * t_old, t_greedy + t_sample + 2 * t_new
    print(f"log-probs {t_old / t_new:.2f}x faster; generation section (policy + reference scoring) "
          f"{section_before:.0f} s -> {section_now:.0f} s = {section_before / section_now:.2f}x; "
          f"largest difference {float((old - new).abs().max()):.2e} nats")


if __name__ == "__main__":
    main()
