"""One-command summary of a Hydra multirun directory: final held-out metrics of every run.

    python -m lbdpo.summary outputs/multirun/<experiment>/<date>            # a table on the console
    python -m lbdpo.summary outputs/multirun/<experiment>/<date> --markdown # the same as markdown
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

COLUMNS = [
    ("eval/rewards/accuracies", "acc"),
    ("eval/rewards/margins", "margin"),
    ("eval/loss", "loss"),
    ("eval/beta/mean", "β mean"),
    ("eval/beta/std", "β std"),
]


def read_run(run_dir: Path) -> dict | None:
    """Last eval metrics, last train step, final w and overrides of one run dir (None when it has no metrics)."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        return None
    last_eval, last_train = {}, {}
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        (last_eval if "eval/loss" in record else last_train).update(record)
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
    return {
        "run": run_dir.name,
        "overrides": " ".join(overrides) or run_dir.name,
        "step": last_train.get("step"),
        "w": last_train.get("beta_head/w"),
        "finished": (run_dir / "checkpoints" / "final").is_dir(),
        **{short: last_eval.get(key) for key, short in COLUMNS},
    }


def collect(multirun_dir: Path) -> list[dict]:
    runs = [read_run(d) for d in sorted(multirun_dir.iterdir()) if d.is_dir()]
    return [r for r in runs if r is not None]


def fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(runs: list[dict]) -> str:
    header = ["run", "step", *(short for _, short in COLUMNS), "w", "done"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [r["overrides"], fmt(r["step"]), *(fmt(r[short]) for _, short in COLUMNS), fmt(r["w"]),
                 "yes" if r["finished"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print markdown instead of a rich table")
    args = parser.parse_args(argv)
    if not args.multirun_dir.is_dir():
        parser.error(f"{args.multirun_dir} is not a directory")
    runs = collect(args.multirun_dir)
    if not runs:
        parser.error(f"no run with a metrics.jsonl under {args.multirun_dir}")
    if args.markdown:
        print(markdown_table(runs))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(args.multirun_dir))
    for name in ["run", "step", *(short for _, short in COLUMNS), "w", "done"]:
        table.add_column(name)
    for r in runs:
        table.add_row(r["overrides"], fmt(r["step"]), *(fmt(r[short]) for _, short in COLUMNS), fmt(r["w"]),
                      "yes" if r["finished"] else "no")
    Console().print(table)


if __name__ == "__main__":
    main()
