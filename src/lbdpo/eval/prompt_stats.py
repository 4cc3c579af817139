"""Per-domain prompt statistics under a model: templated prompt length and log PPL (the β formula's input).

    python -m lbdpo.eval.prompt_stats data/sentiment/test.jsonl                # embedded SmolLM2
    python -m lbdpo.eval.prompt_stats ../shared/data/preference/oasst1_zh_pairs.jsonl --domain oasst_zh

Prints a markdown table: domain, prompts, mean prompt tokens, log PPL mean ± std (population std).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from ..data.collator import pad_rows
from ..data.loading import load_preference_pairs
from ..data.tokenize import PairEncoder, TokenizeConfig
from ..logprobs import sequence_log_ppl
from ..models import load_model_and_tokenizer


@torch.no_grad()
def prompt_log_ppl(model_cfg: dict, rows, max_prompt_length: int = 256, batch_size: int = 16):
    """(log PPL, token count) of each row's templated prompt under the model, as two lists."""
    policy, tokenizer = load_model_and_tokenizer(model_cfg)
    encoder = PairEncoder(tokenizer, TokenizeConfig(max_length=max_prompt_length + 1,
                                                    max_prompt_length=max_prompt_length))
    policy.eval()
    prompts = [encoder.prompt_ids(row)[-max_prompt_length:] for row in rows]
    log_ppl = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_rows(prompts[start:start + batch_size], tokenizer.pad_token_id)
        log_ppl.extend(sequence_log_ppl(policy, ids, mask).tolist())
    return log_ppl, [len(p) for p in prompts]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--domain", default=None, help="domain label (default: the file's domain column, else its name)")
    parser.add_argument("--limit", type=int, default=None, help="rows per file (seeded sample)")
    args = parser.parse_args(argv)
    rows = []
    for path in args.paths:
        ds = load_preference_pairs(path, domain=args.domain, limit=args.limit)
        if "domain" not in ds.column_names:
            ds = ds.add_column("domain", [Path(path).stem] * len(ds))
        rows.extend(ds)
    log_ppl, lengths = prompt_log_ppl({"source": "smollm2_gguf", "dtype": "float32"}, rows)
    groups = defaultdict(list)
    for row, lp, n in zip(rows, log_ppl, lengths):
        groups[row.get("domain") or "all"].append((lp, n))
    print("| domain | prompts | prompt tokens (mean) | log PPL mean ± std |")
    print("|---|---|---|---|")
    for domain, values in sorted(groups.items()):
        lp = torch.tensor([v[0] for v in values])
        n = sum(v[1] for v in values) / len(values)
        print(f"| {domain} | {len(values)} | {n:.1f} | {lp.mean():.3f} ± {lp.std(unbiased=False):.3f} |")


if __name__ == "__main__":
    main()
