"""How well a β head's log-PPL approximation (``beta_head.use_ppl_approx``) does on held-out prompts.

    python -m lbdpo.eval.ppl_approx outputs/<run>/checkpoints/final                        # data/sentiment/test.jsonl
    python -m lbdpo.eval.ppl_approx CHECKPOINT --data ../shared/data/preference/oasst1_zh_pairs.jsonl --limit 300

Every distinct prompt of the file, tokenized as in training, goes through one forward of the checkpoint's
policy; prints, per domain and overall, the MAE and R² of the head's ℓ̂ against the exact log PPL, and the
Spearman correlation of the β it gives with the β the exact log PPL would give (does it rank prompts alike?).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.collator import pad_rows
from ..data.loading import load_preference_pairs
from ..metrics import ppl_approx_metrics, split_by_domain
from ..modeling import AutoModelForCausalLMWithBetaHead

KEYS = ("log_ppl", "log_ppl_approx", "beta", "beta_exact")


@torch.no_grad()
def approximation_values(lm: AutoModelForCausalLMWithBetaHead, prompt_ids: list[list[int]],
                         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """(N,) tensors ``log_ppl``, ``log_ppl_approx``, ``beta``, ``beta_exact`` of tokenized prompts."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in KEYS}
    for start in range(0, len(prompt_ids), batch_size):
        input_ids, mask = pad_rows(prompt_ids[start:start + batch_size], lm.tokenizer.pad_token_id)
        result = lm(input_ids, mask)
        for k in KEYS:
            out[k].append(getattr(result, k).float())
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.eval.ppl_approx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", default="data/sentiment/test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="rows of the file (seeded sample)")
    args = parser.parse_args(argv)
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(args.checkpoint)
    if not lm.beta_head.config.use_ppl_approx:
        parser.error(f"{args.checkpoint}: its β head was trained without use_ppl_approx")
    rows = list(load_preference_pairs(args.data, limit=args.limit))
    by_prompt = {tuple(ids): row.get("domain") or "all" for ids, row in zip(lm.encode_prompts(rows), rows)}
    values = approximation_values(lm, list(by_prompt))  # each distinct prompt once, tokenized once
    groups = {"all": values, **(split_by_domain(values, list(by_prompt.values())) if len(set(by_prompt.values())) > 1
                                else {})}
    print(f"{len(by_prompt)} distinct prompts of {args.data}")
    print("| prompts | n | MAE | R² | Spearman β(ℓ̂) vs β(log PPL) | log PPL mean ± std |")
    print("|---|---|---|---|---|---|")
    for name, sub in groups.items():
        m = ppl_approx_metrics(sub)
        lp = sub["log_ppl"]
        print(f"| {name} | {len(lp)} | {m['ppl_approx/mae']:.3f} | {m['ppl_approx/r2']:.3f} | "
              f"{m['ppl_approx/spearman_beta']:.3f} | {lp.mean():.3f} ± {lp.std(unbiased=False):.3f} |")


if __name__ == "__main__":
    main()
