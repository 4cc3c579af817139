"""Check preference files before training: rows read, kept, skipped by reason and cut by truncation, per file.

    python -m lbdpo.data.check ../shared/data/preference/*.jsonl
    python -m lbdpo.data.check my_pairs.jsonl --rows          # also list every skipped row: FILE:LINE: reason
    python -m lbdpo.data.check my_pairs.csv --columns prompt=question chosen=good rejected=bad
    python -m lbdpo.data.check data/sentiment/train.jsonl --max-length 112 --max-prompt-length 80

Reads each file as the training loader does (:mod:`lbdpo.data.loading`: the same rows, renaming and filters), then
tokenizes the kept pairs with the embedded SmolLM2's tokenizer and chat template (``--model tiny_random`` is the same
tokenizer; a hub id or local directory for another) to count what truncation drops and cuts. A folder is checked
file by file. Prints one markdown row per file and nothing is written.

Bad input never stops the check: a file that cannot be read (missing, not a data file, not UTF-8, a malformed JSON
line, a required column missing) gets its row with the reason in ``status``, and the other files are still checked.
Where the training loader refuses a whole file for a malformed or non-UTF-8 line, this lists each such line (with
``--rows``) and counts the rest. Exit code: 0 when every file is usable for training, 1 when one is not (unreadable,
empty, or every row skipped), 2 for a bad option (``error: …``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import LbdpoError
from .loading import COLUMN_ALIASES, CORE_COLUMNS, FilterReport, _convert_rows, _to_dataset
from .sources import LocatedRows, local_files, read_local_located
from .tokenize import CUT_COLUMN, MOSTLY_CUT, TokenizeConfig, count_cuts, encode_pairs

OK = "ok"


def csv_text_columns(columns: dict[str, str]) -> set[str]:
    """The CSV columns read as strings (as :func:`lbdpo.data.load_preference_pairs` reads them)."""
    return {columns.get(c, c) for c in CORE_COLUMNS[:3]} | {a for names in COLUMN_ALIASES.values() for a in names}


def _line_key(where: str) -> int:
    """Sort key of a ``LocatedRows.where`` label ("12" or "row 12")."""
    return int(re.sub(r"\D", "", where) or 0)


def _status(result: dict[str, Any], located: LocatedRows) -> str:
    """``ok``, or why training cannot use the file (see the module doc)."""
    if located.bad:
        (where, why), n = located.bad[0], len(located.bad)
        return (f"unusable: {n} unreadable line(s), the first line {where}: {why}; training refuses the whole file: "
                "fix or remove them (--rows lists them)")
    if result["rows_in"] == 0:
        return "unusable: empty (no rows)"
    if result["pairs"] == 0:
        return f"unusable: all {result['rows_in']} rows skipped (--rows lists them)"
    if result["truncated"].get("pairs_cut", 0) > MOSTLY_CUT * result["pairs"]:
        return f"{OK}, but most pairs are cut by truncation: raise data.max_length / data.max_prompt_length"
    return OK


def check_file(path: str | Path, tokenizer, tok_cfg: TokenizeConfig, columns: dict[str, str] | None = None) -> dict:
    """Everything the check reports about one file.

    Returns:
        dict with ``file`` (name), ``path``, ``rows_in``, ``loader_skips`` and ``tokenizer_skips`` ({reason: rows}),
        ``truncated`` ({``TRUNCATION_REASONS`` key or ``pairs_cut``: pairs}), ``pairs`` (usable pairs), ``status``
        (``"ok"``, or ``"unusable: <why>"``) and ``skipped_rows`` ([(where, reason)] in file order: malformed or
        non-UTF-8 lines, loader skips, tokenizer skips; where is the 1-based line, or ``row N`` for CSV/Parquet).
    """
    columns = dict(columns or {})
    result = {"file": Path(path).name, "path": str(path), "rows_in": 0, "loader_skips": {}, "tokenizer_skips": {},
              "truncated": {}, "pairs": 0, "status": OK, "skipped_rows": []}
    try:
        located = read_local_located(Path(path), csv_text_columns(columns))
        report, skipped_at = FilterReport(source=str(path)), []
        kept = _to_dataset(_convert_rows(located.rows, str(path), columns, report, skipped_at))
    except LbdpoError as err:  # a whole-file problem: one reason, and the next file is checked
        result["status"] = f"unusable: {err}"
        return result
    encoded = encode_pairs(kept, tokenizer, tok_cfg, desc=f"tokenize {Path(path).name}")
    skipped = {i for i, _ in skipped_at}
    kept_where = [where for i, where in enumerate(located.where) if i not in skipped]
    rows = located.bad + [(located.where[i], reason) for i, reason in skipped_at]
    rows += [(kept_where[j], reason) for j, reason in enumerate(encoded["skip_reason"]) if reason]
    result.update(rows_in=report.rows_in, loader_skips={k: v for k, v in report.skipped.items() if v},
                  tokenizer_skips=dict(Counter(r for r in encoded["skip_reason"] if r)),
                  truncated=dict(count_cuts(encoded[CUT_COLUMN])),
                  pairs=sum(1 for r in encoded["skip_reason"] if not r),
                  skipped_rows=sorted(rows, key=lambda row: _line_key(row[0])))
    result["status"] = _status(result, located)
    return result


def expand(path: str) -> tuple[list[Path], str]:
    """The data files of one command-line path (a folder: its data files), or ([], why) when there are none."""
    p = Path(path).expanduser()
    if not p.exists():
        return [], f"unusable: not found (resolved to {p.resolve()})"
    try:
        return local_files(p), ""
    except (LbdpoError, OSError) as err:  # an unsupported extension, an empty or unreadable folder
        return [], f"unusable: {err}"


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def print_table(results: list[dict]) -> None:
    """One markdown row per file."""
    print("| file | rows | skipped by the loader | skipped at tokenization | pairs | cut by truncation | status |")
    print("|---|---:|---|---|---:|---|---|")
    for r in results:
        print(f"| {r['file']} | {r['rows_in']} | {_fmt(r['loader_skips'])} | {_fmt(r['tokenizer_skips'])} | "
              f"{r['pairs']} | {_fmt(r['truncated'])} | {r['status']} |")


def print_rows(results: list[dict]) -> None:
    """``--rows``: every skipped row as ``PATH:WHERE: reason``, file by file, under a line with the file's status."""
    for r in results:
        print(f"\n{r['path']}: {r['status']}; {len(r['skipped_rows'])} skipped row(s)")
        for where, reason in r["skipped_rows"]:
            print(f"{r['path']}:{where}: {reason}")


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lbdpo.data.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="files or folders (.json/.jsonl/.csv/.parquet)")
    parser.add_argument("--rows", action="store_true", help="list every skipped row (FILE:LINE: reason)")
    parser.add_argument("--columns", nargs="*", default=[], metavar="OURS=THEIRS",
                        help="column mapping, e.g. prompt=question chosen=good rejected=bad")
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny_random | a hub id or local dir (tokenizer)")
    parser.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "raw"))
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Checks every path of ``args``; returns the exit code (see the module doc)."""
    import datasets

    from ..models import load_tokenizer

    bad = [item for item in args.columns if "=" not in item]
    if bad:
        raise LbdpoError(f"--columns takes OURS=THEIRS pairs (e.g. prompt=question), got {bad}")
    columns = dict(item.split("=", 1) for item in args.columns)
    tok_cfg = TokenizeConfig(prompt_format=args.prompt_format, max_length=args.max_length,
                             max_prompt_length=args.max_prompt_length)
    source = {"source": "smollm2_gguf"} if args.model in ("smollm2", "tiny_random") else \
        {"source": "hub", "name_or_path": args.model}
    tokenizer = load_tokenizer(source)
    datasets.disable_progress_bars()
    print(f"tokenizer {args.model}, prompt_format={args.prompt_format}, max_length={args.max_length}, "
          f"max_prompt_length={args.max_prompt_length}\n")
    results = []
    for path in args.paths:
        files, problem = expand(path)
        if problem:
            results.append({"file": Path(path).name or path, "path": path, "rows_in": 0, "loader_skips": {},
                            "tokenizer_skips": {}, "truncated": {}, "pairs": 0, "status": problem,
                            "skipped_rows": []})
        results += [check_file(file, tokenizer, tok_cfg, columns or None) for file in files]
    print_table(results)
    if args.rows:
        print_rows(results)
    unusable = [r["path"] for r in results if not r["status"].startswith(OK)]
    if unusable:
        print(f"\n{len(unusable)} of {len(results)} file(s) unusable for training: {', '.join(unusable)}",
              file=sys.stderr)
    return 1 if unusable else 0


def main(argv=None) -> int:
    """The command line; an :class:`LbdpoError` (a bad option, a tokenizer that cannot load) is one line, exit 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except LbdpoError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
