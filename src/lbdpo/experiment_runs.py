"""An experiment's run folders as state: what the runner records (``runner.json``), each run's state, and the
``python -m lbdpo.experiment status`` table (every run's state, measured minutes, throughput, what is left)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .experiment import Experiment


def read_runner_json(run_dir: Path) -> dict:
    path = run_dir / "runner.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_runner_json(run_dir: Path, **values) -> None:
    (run_dir / "runner.json").write_text(json.dumps({**read_runner_json(run_dir), **values}, indent=2))


def record(run_dir: Path, key: str, seconds: float) -> None:
    """Add ``seconds`` to ``key`` in runner.json: summed over the sessions a run spans."""
    update_runner_json(run_dir, **{key: read_runner_json(run_dir).get(key, 0.0) + seconds})


def evaluated(run_dir: Path) -> bool:
    """The runner's own record that every evaluation set finished (eval.json alone does not say that all did)."""
    return bool(read_runner_json(run_dir).get("evaluated"))


def state_of(run_dir: Path, archive: Path | None = None) -> str:
    """``done`` (evaluated: its results archived, or evaluated in the run folder), ``trained`` (final checkpoint,
    not evaluated), ``partial`` (a step-N checkpoint), or ``pending``."""
    if (archive is not None and (archive / "eval.json").is_file()) or evaluated(run_dir):
        return "done"
    if (run_dir / "checkpoints" / "final" / "trainer_state.pt").is_file():
        return "trained"
    if any((run_dir / "checkpoints").glob("step-*/trainer_state.pt")):
        return "partial"
    return "pending"


def median_pairs_per_s(metrics: Path, skip: int = 5) -> float | None:
    """Median training throughput of a run (``pairs_per_s`` of metrics.jsonl after the first ``skip`` steps)."""
    if not metrics.is_file():
        return None
    rates = sorted(row["pairs_per_s"] for row in map(json.loads, metrics.read_text().splitlines())
                   if "pairs_per_s" in row and row.get("step", 0) > skip)
    return rates[len(rates) // 2] if rates else None


def status(exp: Experiment) -> str:
    """A table of every run's state, measured minutes, runs side by side (jobs) and median pairs/s, and the
    estimate for what is left."""
    lines = ["| run | state | train min | eval min | jobs | pairs/s (median) |", "|---|---|---:|---:|---:|---:|"]
    measured = []
    for _, _, run_dir in exp.runs():
        folder = next((d for d in (exp.results / run_dir.name, run_dir) if (d / "runner.json").is_file()), run_dir)
        times = read_runner_json(folder)
        state = state_of(run_dir, exp.results / run_dir.name)
        if state == "done":  # a run that shared the machine with jobs - 1 others took 1/jobs of it
            measured.append((times.get("train_s", 0.0) + times.get("eval_s", 0.0)) / times.get("jobs", 1))
        rate = median_pairs_per_s(folder / "metrics.jsonl")
        lines.append(f"| {run_dir.name} | {state} | {times.get('train_s', 0) / 60:.1f} | "
                     f"{times.get('eval_s', 0) / 60:.1f} | {times.get('jobs', 1)} | "
                     f"{'–' if rate is None else f'{rate:.2f}'} |")
    left = sum(state_of(d, exp.results / d.name) != "done" for _, _, d in exp.runs())
    if measured:
        per_run = sorted(measured)[len(measured) // 2] / 60
        lines.append(f"\n{len(measured)} done, {left} left; median {per_run:.1f} min of the machine per finished "
                     f"run → about {left * per_run:.0f} min to go")
    else:
        lines.append(f"\nnothing finished yet; {left} runs left")
    return "\n".join(lines)
