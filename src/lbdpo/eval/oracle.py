"""The out-of-sample oracle among a family of arms: does choosing the best of several β assignments help on seeds
the choice was not made on?

Experiment 3 (``experiments/noisy_sentiment.yaml``) trains one arm per β of the noisy domain (the others at 0.1);
the best of them on the very seeds it is scored on would be biased upward (the maximum of noisy means). Leave one
seed out instead: for each seed s, the arm with the best mean score over the *other* seeds is chosen
(:func:`leave_one_seed_out`) and its seed-s run is scored. The same rule picks the best single fixed β, so the
comparison is like for like:

- accuracy: oracle's held-out accuracy − the leave-one-seed-out best fixed β's, paired by seed (seeds share the data
  order), a paired t interval over seeds (:func:`lbdpo.eval.significance.paired`);
- frontier: the oracle's runs' gap to the fixed-β frontier (reward − R*(KL), the concave fit to every fixed run),
  tested against 0 with the frontier's bootstrap uncertainty (:func:`lbdpo.eval.frontier.gap_test`). The choice uses
  the same gaps.

Declared in an experiment's YAML as ``oracle: [arm, …]`` (the family; it may include a fixed arm, e.g. the point
"noisy domain at 0.1" is the fixed β = 0.1 run); the section is added to ``compare.md``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import LbdpoError
from .frontier import frontier_bootstrap, gap_test, run_gaps
from .significance import paired

ACC_KEY = "held-out acc"


def leave_one_seed_out(scores: dict[str, dict[int, float]]) -> dict[int, str]:
    """{seed s: the arm whose mean score over the seeds other than s is highest} for every seed that every arm has
    (ties: the first arm in ``scores``' order). Needs ≥ 2 such seeds ({} otherwise): with one seed there is nothing
    to choose on."""
    arms = list(scores)
    seeds = sorted(set.intersection(*(set(scores[a]) for a in arms))) if arms else []
    if len(seeds) < 2:
        return {}
    chosen = {}
    for s in seeds:
        means = [np.mean([scores[a][t] for t in seeds if t != s]) for a in arms]
        chosen[s] = arms[int(np.argmax(means))]
    return chosen


def _run_of(arm: dict, seed: int) -> dict:
    return next(r for r in arm["runs"] if r.get("seed") is not None and int(r["seed"]) == seed)


def _scores(arms: Sequence[dict], score: Callable[[dict], float | None]) -> dict[str, dict[int, float]]:
    out = {}
    for a in arms:
        values = {int(r["seed"]): score(r) for r in a["runs"] if r.get("seed") is not None}
        out[a["arm"]] = {s: v for s, v in values.items() if v is not None}
    return out


def oracle_runs(arms: Sequence[dict], score: Callable[[dict], float | None]) -> tuple[list[dict], dict[int, str]]:
    """The chosen arm's run for each seed (:func:`leave_one_seed_out` on ``score`` of every run), and the choices."""
    by_name = {a["arm"]: a for a in arms}
    chosen = leave_one_seed_out(_scores(arms, score))
    return [_run_of(by_name[arm], s) for s, arm in chosen.items()], chosen


def _fmt(t: dict | None) -> str:
    if t is None:
        return "–"
    return f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.3f}"


def _choices(chosen: dict[int, str]) -> str:
    return ", ".join(f"s{s}: {arm}" for s, arm in chosen.items()) or "–"


def oracle_section(arms: Sequence[dict], family: Sequence[str]) -> str:
    """Markdown for ``compare.md``: the family's leave-one-seed-out oracle against the leave-one-seed-out best fixed
    β on held-out accuracy (paired by seed), and its frontier gap (against 0, frontier uncertainty included).
    ``arms``: :func:`lbdpo.eval.compare.group_arms` entries. "" when the family's arms have not all run yet."""
    by_name = {a["arm"]: a for a in arms}
    if unknown := [f for f in family if f not in by_name]:
        missing = ", ".join(unknown)
        return f"Oracle over {', '.join(family)}: waiting for {missing} (no finished run yet)."
    members = [by_name[f] for f in family]
    fixed = [a for a in arms if a["kind"] == "fixed"]
    if not fixed:
        raise LbdpoError("oracle: the experiment has no fixed-β arm to compare the oracle with")
    acc = lambda r: r["values"].get(ACC_KEY)  # noqa: E731
    acc_runs, acc_choice = oracle_runs(members, acc)
    best_runs, best_choice = oracle_runs(fixed, acc)
    acc_test = paired({int(r["seed"]): acc(r) for r in acc_runs}, {int(r["seed"]): acc(r) for r in best_runs})
    boot = frontier_bootstrap(fixed)
    fit = boot["fit"] if boot else None

    def gap(run: dict) -> float | None:
        gaps = run_gaps([run], fit)
        return gaps[0][0] if gaps else None

    gap_runs, gap_choice = oracle_runs(members, gap) if fit else ([], {})
    gap_t = gap_test(gap_runs, boot) if gap_runs else None
    return "\n".join([
        f"Family: {', '.join(family)}. For each seed the arm best on the other seeds is chosen and scored on that "
        "seed (leave one seed out), so the choice never sees the seed it is scored on; the best single fixed β is "
        "chosen by the same rule. Accuracy: paired by seed, t interval over seeds; frontier gap: reward − the "
        "fixed-β frontier at the run's KL, against 0, the frontier's bootstrap uncertainty included.", "",
        "| measure | seeds | oracle's choices | best fixed β's choices | oracle − best fixed β / gap vs frontier |",
        "|---|---|---|---|---|",
        f"| held-out acc | {len(acc_runs)} | {_choices(acc_choice)} | {_choices(best_choice)} | {_fmt(acc_test)} |",
        f"| frontier gap | {len(gap_runs)} | {_choices(gap_choice)} | – (on the frontier by construction) | "
        f"{_fmt(gap_t)} |",
    ])
