"""Does one arm beat another? Welch tests over seeds, and each run's gap to the fixed-β reward-vs-KL frontier.

The question of issue 14: does a learnable-β arm match or beat the best fixed β of a sweep — on held-out preference
accuracy, and on the reward-vs-KL frontier at equal KL — and beat β-DPO? One run (one seed) gives:

    acc     held-out preference accuracy: the fraction of pairs with Δ > 0, Δ the β-free log-ratio margin, so the
            same at every β > 0 (eval.json ``preference.common_beta``)
    reward  mean ground-truth reward of the policy's samples; KL  Monte-Carlo KL(π‖πref) of the same samples

The fixed-β frontier R*(KL) joins the fixed-β arms' (mean KL, mean reward) points, sorted by KL, piecewise
linearly in log KL. A run's **gap** is reward − R*(its KL) (None outside the fixed arms' KL range: no
extrapolation). The fixed-β seeds' own gaps measure how far one seed scatters around the frontier; an arm is above
the frontier when its gaps exceed theirs (Welch's t-test, two-sided). With three seeds per arm a test detects only
large effects: the tables give the difference, its 95 % confidence interval and p, never a bare verdict.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy import stats

Point = tuple[float, float]  # (KL, reward)


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    """mean(a) − mean(b), its 95 % CI and the two-sided p of Welch's t-test; None with fewer than 2 values in either
    or when both are constant (no variance to test against)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2 or (max(a) == min(a) and max(b) == min(b)):
        return None
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(0.95)
    return {"diff": sum(a) / len(a) - sum(b) / len(b), "low": float(ci.low), "high": float(ci.high),
            "p": float(result.pvalue), "n_a": len(a), "n_b": len(b)}


def frontier_reward(points: Sequence[Point], kl: float) -> float | None:
    """R*(kl): the fixed-β points (KL, reward) joined linearly in log KL; None outside their KL range, for a KL ≤ 0,
    or with fewer than two points."""
    pts = sorted((k, r) for k, r in points if k > 0)
    if len(pts) < 2 or kl <= 0 or not pts[0][0] <= kl <= pts[-1][0]:
        return None
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            if k1 == k0:
                return (r0 + r1) / 2
            t = (math.log(kl) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return r0 + t * (r1 - r0)
    return None


def run_gaps(runs: Sequence[dict], points: Sequence[Point]) -> list[float]:
    """reward − R*(KL) of each run (``values`` with "reward" and "KL") inside the frontier's KL range."""
    gaps = []
    for run in runs:
        reward, kl = run["values"].get("reward"), run["values"].get("KL")
        star = frontier_reward(points, kl) if reward is not None and kl is not None else None
        if star is not None:
            gaps.append(reward - star)
    return gaps


def _values(arm: dict, key: str) -> list[float]:
    return [r["values"][key] for r in arm["runs"] if r["values"].get(key) is not None]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# equivalence margins of the decision rule (report.md §6): accuracy, and reward for the frontier gap
ACC_MARGIN, GAP_MARGIN = 0.03, 0.01


def verdict(t: dict | None, margin: float) -> str:
    """The decision rule: *beats* / *worse* = a difference of that sign with p < 0.05; *matches* = the 95 % CI
    inside ±margin (so it contains 0); else *inconclusive*; "–" without a test."""
    if t is None:
        return "–"
    if t["p"] < 0.05:
        return "beats" if t["diff"] > 0 else "worse"
    if -margin <= t["low"] and t["high"] <= margin:
        return "matches"
    return "inconclusive"


def _fmt_test(t: dict | None, margin: float) -> str:
    if t is None:
        return "–"
    return f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.2g}: {verdict(t, margin)}"


def moonshot_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: each non-fixed arm against the best fixed β (highest mean accuracy) and against β-DPO (the arm
    whose ``mode`` is beta_dpo), on accuracy, and its frontier gap against the fixed-β seeds' gaps.

    ``arms``: :func:`lbdpo.eval.compare.group_arms` entries (``arm``, ``kind``, ``runs`` with ``values`` and
    ``mode``). Returns "" when there is no fixed arm to compare with."""
    fixed = [a for a in arms if a["kind"] == "fixed" and _values(a, acc_key)]
    if not fixed:
        return ""
    best = max(fixed, key=lambda a: _mean(_values(a, acc_key)))
    beta_dpo = next((a for a in arms if a["runs"][0].get("mode") == "beta_dpo"), None)
    points = []
    for a in fixed:
        kls, rewards = _values(a, "KL"), _values(a, "reward")
        if kls and rewards:
            points.append((_mean(kls), _mean(rewards)))
    fixed_gaps = [g for a in fixed for g in run_gaps(a["runs"], points)]
    lines = [f"Best fixed β by held-out accuracy: **{best['arm']}**. Cells: mean difference [95 % CI], Welch p over "
             f"seeds and the verdict of report.md's rule (matches: CI within ±{ACC_MARGIN} accuracy, ±{GAP_MARGIN} "
             "reward); frontier gap = reward − fixed-β frontier at the run's KL (mean ± std over seeds, "
             "compared with the fixed-β seeds' gaps).", "",
             f"| arm | seeds | acc − best fixed ({best['arm']}) | acc − β-DPO | frontier gap | gap vs fixed seeds |",
             "|---|---|---|---|---|---|"]
    for a in arms:
        if a["kind"] == "fixed":
            continue
        acc = _values(a, acc_key)
        gaps = run_gaps(a["runs"], points)
        gap_cell = "outside the fixed-β KL range" if not gaps else (
            f"{_mean(gaps):+.4f} ± " + (f"{statistics.pstdev(gaps):.4f}" if len(gaps) > 1 else "–") + f" (n={len(gaps)})")
        vs_dpo = "–" if beta_dpo is None or a is beta_dpo else _fmt_test(welch(acc, _values(beta_dpo, acc_key)),
                                                                          ACC_MARGIN)
        lines.append(f"| {a['arm']} | {a['n_seeds']} | {_fmt_test(welch(acc, _values(best, acc_key)), ACC_MARGIN)} | "
                     f"{vs_dpo} | {gap_cell} | {_fmt_test(welch(gaps, fixed_gaps), GAP_MARGIN)} |")
    return "\n".join(lines)
