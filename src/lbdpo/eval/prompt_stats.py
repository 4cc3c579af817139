"""Per-domain prompt statistics under a model: the β formula's inputs, log PPL(x) and h.

    python -m lbdpo.eval.prompt_stats data/sentiment/test.jsonl                # embedded SmolLM2
    python -m lbdpo.eval.prompt_stats ../shared/data/preference/oasst1_zh_pairs.jsonl --domain oasst_zh

Prints a markdown table: domain, prompts, mean prompt tokens, log PPL mean ± std (population std), and the scale
of h (the last hidden state at the prompt's last token, what f(h) = 1 + ε·tanh(NN(h)) reads): mean ‖h‖₂ and
‖h‖₁. ‖h‖₁ bounds how far one Adam step of size lr per weight can move a linear NN(h): by lr·‖h‖₁, so with
‖h‖₁ in the hundreds a head learning rate of 1e-3 can saturate tanh within a few steps (report.md §5).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from ..data.collator import pad_rows
from ..data.loading import load_preference_pairs
from ..data.tokenize import PairEncoder, TokenizeConfig
from ..scoring import hidden_at_prompt_end
from ..logprobs import forward_model, masked_mean_nll, sequence_ppl_mask, token_logps
from ..models import load_model_and_tokenizer


@torch.no_grad()
def prompt_features(policy, prompts: list[list[int]], pad_token_id: int, batch_size: int = 16) -> dict[str, list]:
    """Each prompt's log PPL (mean NLL of its tokens after the first) and h (last hidden state at its last token),
    as the β head sees them, from one forward per batch (any padding is masked out).

    Args:
        prompts: token ids of each (templated) prompt.

    Returns:
        ``log_ppl``, ``h_l2``, ``h_l1``, ``tokens``: one float (int) per prompt.
    """
    policy.eval()
    out = defaultdict(list)
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_rows(prompts[start:start + batch_size], pad_token_id)
        model_out = forward_model(policy, ids, mask, output_hidden_states=True)
        out["log_ppl"] += masked_mean_nll(token_logps(model_out.logits, ids), sequence_ppl_mask(mask)).tolist()
        h = hidden_at_prompt_end(model_out.hidden_states[-1], mask, mask.sum(dim=-1)).float()  # (B, H)
        out["h_l2"] += h.norm(dim=-1).tolist()
        out["h_l1"] += h.abs().sum(dim=-1).tolist()
        out["tokens"] += mask.sum(dim=-1).tolist()
    return dict(out)


def table(rows, features: dict[str, list]) -> str:
    """The markdown table of :func:`prompt_features` per domain (rows' ``domain``, else ``all``)."""
    groups = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.get("domain") or "all"].append(i)
    lines = ["| domain | prompts | prompt tokens (mean) | log PPL mean ± std | ‖h‖₂ mean | ‖h‖₁ mean |",
             "|---|---|---|---|---|---|"]
    for domain, idx in sorted(groups.items()):
        col = {k: torch.tensor([float(v[i]) for i in idx]) for k, v in features.items()}
        lines.append(f"| {domain} | {len(idx)} | {col['tokens'].mean():.1f} | {col['log_ppl'].mean():.3f} ± "
                     f"{col['log_ppl'].std(unbiased=False):.3f} | {col['h_l2'].mean():.1f} | {col['h_l1'].mean():.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--domain", default=None, help="domain label (default: the file's domain column, else its name)")
    parser.add_argument("--limit", type=int, default=None, help="rows per file (seeded sample)")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (the last ones)")
    args = parser.parse_args(argv)
    rows = []
    for path in args.paths:
        ds = load_preference_pairs(path, domain=args.domain, limit=args.limit)
        if "domain" not in ds.column_names:
            ds = ds.add_column("domain", [Path(path).stem] * len(ds))
        rows.extend(ds)
    policy, tokenizer = load_model_and_tokenizer({"source": "smollm2_gguf", "dtype": "float32"})
    encoder = PairEncoder(tokenizer, TokenizeConfig(max_length=args.max_prompt_length + 1,
                                                    max_prompt_length=args.max_prompt_length))
    prompts = [encoder.prompt_ids(row)[-args.max_prompt_length:] for row in rows]
    print(table(rows, prompt_features(policy, prompts, tokenizer.pad_token_id)))


if __name__ == "__main__":
    main()
