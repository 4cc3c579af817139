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
    estimate for what is left: each pending run at its own arm's median minutes of the machine (the median over
    every finished run where its arm has none yet)."""
    lines = ["| run | state | train min | eval min | jobs | pairs/s (median) |", "|---|---|---:|---:|---:|---:|"]
    measured: dict[str, list[float]] = {}
    pending: list[str] = []
    for arm, _, run_dir in exp.runs():
        folder = next((d for d in (exp.results / run_dir.name, run_dir) if (d / "runner.json").is_file()), run_dir)
        times = read_runner_json(folder)
        state = state_of(run_dir, exp.results / run_dir.name)
        if state == "done":  # a run that shared the machine with jobs - 1 others took 1/jobs of it
            measured.setdefault(arm, []).append((times.get("train_s", 0.0) + times.get("eval_s", 0.0))
                                                / times.get("jobs", 1) / 60)
        else:
            pending.append(arm)
        rate = median_pairs_per_s(folder / "metrics.jsonl")
        lines.append(f"| {run_dir.name} | {state} | {times.get('train_s', 0) / 60:.1f} | "
                     f"{times.get('eval_s', 0) / 60:.1f} | {times.get('jobs', 1)} | "
                     f"{'–' if rate is None else f'{rate:.2f}'} |")
    done = [m for ms in measured.values() for m in ms]
    if not done:
        return "\n".join(lines + [f"\nnothing finished yet; {len(pending)} runs left"])
    overall = upper_median(done)
    guessed = sorted({arm for arm in pending if arm not in measured})
    to_go = sum(upper_median(measured[arm]) if arm in measured else overall for arm in pending)
    lines.append(f"\n{len(done)} done, {len(pending)} left; median {overall:.1f} min of the machine per finished run; "
                 f"each arm's own median → about {to_go:.0f} min to go"
                 + (f" ({', '.join(guessed) if len(guessed) <= 4 else f'{len(guessed)} arms'}: no finished run yet, "
                    "counted at the overall median)" if guessed else ""))
    return "\n".join(lines)


def upper_median(values: list[float]) -> float:
    """The upper median (the middle value; of two, the larger): a measured minute count, never an average of two."""
    return sorted(values)[len(values) // 2]
