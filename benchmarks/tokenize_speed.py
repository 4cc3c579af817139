"""Time tokenizing preference pairs (chat template, exact boundaries, truncation) with SmolLM2's tokenizer.

    python benchmarks/tokenize_speed.py                      # 10,000 pairs from the shared HH/OASST/... files
    python benchmarks/tokenize_speed.py --pairs 2000 --num-proc 2

Uses every ``../shared/data/preference/*.jsonl`` file (repeated to reach --pairs), or the built-in sentiment
pairs where that folder is absent. Prints pairs per second for ``lbdpo.data.tokenize.tokenize_pairs``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets

from lbdpo.data import load_preference_pairs
from lbdpo.data.tokenize import TokenizeConfig, tokenize_pairs
from lbdpo.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "preference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    args = parser.parse_args()

    files = sorted(SHARED.glob("*.jsonl")) or [REPO / "data" / "sentiment" / "train.jsonl"]
    parts = [load_preference_pairs(str(f)).select_columns(["prompt", "chosen", "rejected", "prompt_messages",
                                                           "transcript_format"]) for f in files]
    pool = datasets.concatenate_datasets(parts)
    rows = datasets.concatenate_datasets([pool] * (args.pairs // len(pool) + 1)).select(range(args.pairs))
    tokenizer = load_tokenizer({"source": "smollm2_gguf"})
    cfg = TokenizeConfig(prompt_format="chat", max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                         num_proc=args.num_proc)
    start = time.perf_counter()
    encoded, skips = tokenize_pairs(rows, tokenizer, cfg)
    wall = time.perf_counter() - start
    print(f"{args.pairs} pairs from {len(files)} file(s) tokenized in {wall:.1f} s ({args.pairs / wall:.0f} pairs/s, "
          f"num_proc={args.num_proc}); kept {len(encoded)}, skipped {dict(skips)}")


if __name__ == "__main__":
    main()
