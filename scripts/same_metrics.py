"""Check that two runs logged the same numbers: every step's and every eval's values in two ``metrics.jsonl``.

    python scripts/same_metrics.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl            # default tolerance 1e-6
    python scripts/same_metrics.py A B --tol 0 --ignore grad_norm/                       # exact; skip a key prefix

Used to prove that a refactor or a speed-up changed no number: ``make train`` on CPU is deterministic, so the
same config must give the same losses and eval metrics. Wall-clock keys (``pairs_per_s``, ``tokens_per_s``)
are always ignored. Prints the largest difference per key and the keys only one file has; exit 1 when a shared
key differs by more than ``--tol`` or the files have different steps.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from lbdpo.eval.plots import read_metrics_jsonl

TIMING_KEYS = ("pairs_per_s", "tokens_per_s")


def read_lines(path: Path) -> dict[tuple[int, str], dict]:
    """{(step, "train" | "eval"): record} from :func:`lbdpo.eval.plots.read_metrics_jsonl`."""
    train, evals = read_metrics_jsonl(path)
    return {**{(r["step"], "train"): r for r in train}, **{(r["step"], "eval"): r for r in evals}}


def compare(a: dict, b: dict, tol: float, ignore: tuple[str, ...]) -> tuple[dict[str, float], set[str], list]:
    """(largest |a − b| per shared key, keys in only one file, lines in only one file)."""
    worst: dict[str, float] = {}
    only: set[str] = set()
    for line in sorted(set(a) & set(b)):
        ra, rb = a[line], b[line]
        for key in set(ra) | set(rb):
            if key in TIMING_KEYS or key.startswith(ignore) or key == "step":
                continue
            if key not in ra or key not in rb:
                only.add(key)
                continue
            x, y = float(ra[key]), float(rb[key])
            diff = 0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y)
            worst[key] = max(worst.get(key, 0.0), diff)
    return worst, only, sorted(set(a) ^ set(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--ignore", action="append", default=[], help="key prefix to skip (repeatable)")
    args = parser.parse_args(argv)
    worst, only, unmatched = compare(read_lines(args.a), read_lines(args.b), args.tol, tuple(args.ignore))
    bad = {k: v for k, v in worst.items() if not v <= args.tol}
    losses = [v for k, v in worst.items() if k == "loss" or k.endswith("/loss")]
    evals = [v for k, v in worst.items() if k.startswith("eval/")]
    print(f"{len(worst)} keys compared; max |Δ| loss {max(losses, default=0):.3g}, eval/* {max(evals, default=0):.3g}, "
          f"all {max(worst.values(), default=0):.3g}")
    for key in sorted(only):
        print(f"only in one file: {key}")
    for line in unmatched:
        print(f"line only in one file: step {line[0]} ({line[1]})")
    for key, value in sorted(bad.items(), key=lambda kv: -kv[1]):
        print(f"DIFFERS {key}: {value:.3g}")
    ok = not bad and not unmatched
    print("same numbers" if ok else "NUMBERS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
