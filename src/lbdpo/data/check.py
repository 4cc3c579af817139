"""Check preference files before training: rows read, kept, and skipped by reason, per file.

    python -m lbdpo.data.check ../shared/data/preference/*.jsonl
    python -m lbdpo.data.check my_pairs.csv --columns prompt=question chosen=good rejected=bad
    python -m lbdpo.data.check data/sentiment/train.jsonl --max-length 112 --max-prompt-length 80

Loads each file with :func:`lbdpo.data.load_preference_pairs` (the loader's filters), then tokenizes the
kept pairs with the embedded SmolLM2's tokenizer and chat template (``--model tiny_random`` is the same
tokenizer; a hub id or local directory for another) to count what truncation drops too. Prints one markdown
row per file; nothing is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .loading import load_preference_pairs_with_report
from .tokenize import TokenizeConfig, tokenize_pairs


def check_file(path: str, tokenizer, tok_cfg: TokenizeConfig, columns: dict[str, str] | None = None) -> dict:
    """Loader and tokenizer counts of one file: ``rows_in``, ``loader_skips``, ``tokenizer_skips``, ``pairs``."""
    ds, report = load_preference_pairs_with_report(path, columns=columns)
    tokenized, tok_skips = tokenize_pairs(ds, tokenizer, tok_cfg, desc=f"tokenize {Path(path).name}")
    return {"file": Path(path).name, "rows_in": report.rows_in,
            "loader_skips": {k: v for k, v in report.skipped.items() if v},
            "tokenizer_skips": dict(tok_skips), "pairs": len(tokenized)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="files or folders (.json/.jsonl/.csv/.parquet)")
    parser.add_argument("--columns", nargs="*", default=[], metavar="OURS=THEIRS",
                        help="column mapping, e.g. prompt=question chosen=good rejected=bad")
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny_random | a hub id or local dir (tokenizer)")
    parser.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "raw"))
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    args = parser.parse_args(argv)

    from ..models import load_tokenizer

    columns = dict(item.split("=", 1) for item in args.columns)
    source = {"source": "smollm2_gguf"} if args.model in ("smollm2", "tiny_random") else \
        {"source": "hub", "name_or_path": args.model}
    tokenizer = load_tokenizer(source)
    tok_cfg = TokenizeConfig(prompt_format=args.prompt_format, max_length=args.max_length,
                             max_prompt_length=args.max_prompt_length)
    print(f"tokenizer {args.model}, prompt_format={args.prompt_format}, max_length={args.max_length}, "
          f"max_prompt_length={args.max_prompt_length}\n")
    print("| file | rows | skipped by the loader | skipped at tokenization | pairs |")
    print("|---|---:|---|---|---:|")
    for path in args.paths:
        r = check_file(path, tokenizer, tok_cfg, columns or None)

        def fmt(skips: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(skips.items())) or "none"

        print(f"| {r['file']} | {r['rows_in']} | {fmt(r['loader_skips'])} | {fmt(r['tokenizer_skips'])} | {r['pairs']} |")


if __name__ == "__main__":
    main()
