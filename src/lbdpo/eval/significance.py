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
large effects: the tables give the difference, its 95 % confidence interval and p next to the verdict of the
pre-registered rule (report.md §6), and a power note says what the seeds at hand can resolve.
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


def moonshot_verdict(acc_vs_fixed: str, gap_vs_fixed: str, acc_vs_dpo: str, gap_vs_dpo: str) -> str:
    """The moonshot (issue 14) for one arm, from the four verdicts of :func:`verdict`: *holds* when the arm matches
    or beats the best fixed β on accuracy and on the frontier gap, and beats β-DPO on one of the two while worse on
    neither; *fails* when it is worse than the best fixed β on either, worse than β-DPO on either, or matches β-DPO
    on both (so cannot beat it); *undecided* otherwise (an inconclusive or missing test in the way)."""
    good = ("matches", "beats")
    vs_dpo = (acc_vs_dpo, gap_vs_dpo)
    if "worse" in (acc_vs_fixed, gap_vs_fixed, *vs_dpo) or vs_dpo == ("matches", "matches"):
        return "fails"
    if acc_vs_fixed in good and gap_vs_fixed in good and "beats" in vs_dpo:
        return "holds"
    return "undecided"


def ci_half_width(sd: float, n: int) -> float:
    """The half-width of the 95 % CI of a difference between two arms of ``n`` seeds each with seed-to-seed
    standard deviation ``sd``: t_{0.975, 2n−2} · sd · √(2/n). *matches* needs it inside the margin."""
    return float(stats.t.ppf(0.975, 2 * n - 2) * sd * math.sqrt(2 / n))


def detectable_difference(sd: float, n: int, power: float = 0.8) -> float:
    """The smallest true difference between two arms of ``n`` seeds each (seed-to-seed sd ``sd``) that a two-sided
    t-test at p < 0.05 detects with probability ``power``: (t_{0.975} + t_{power}) · sd · √(2/n), 2n − 2 df."""
    return ci_half_width(sd, n) + float(stats.t.ppf(power, 2 * n - 2) * sd * math.sqrt(2 / n))


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int] | None:
    """The pooled within-group standard deviation (ddof 1 per group) over the groups with ≥ 2 values, and its
    degrees of freedom; None when no group has two values."""
    groups = [list(g) for g in groups if len(g) >= 2]
    df = sum(len(g) - 1 for g in groups)
    if not df:
        return None
    ss = sum(sum((x - statistics.fmean(g)) ** 2 for x in g) for g in groups)
    return math.sqrt(ss / df), df


def power_note(arms: list[dict], acc_key: str, gaps: Sequence[Sequence[float]], n: int = 3) -> str:
    """One paragraph: the seed-to-seed spread pooled over every arm, and what ``n`` seeds per arm can resolve."""
    parts = []
    for name, groups, margin in (("held-out accuracy", [_values(a, acc_key) for a in arms], ACC_MARGIN),
                                 ("frontier gap", gaps, GAP_MARGIN)):
        pooled = pooled_sd(groups)
        if pooled is None:
            continue
        sd, df = pooled
        need = next((k for k in range(2, 201) if detectable_difference(sd, k) <= margin), None)
        need_ci = next((k for k in range(2, 201) if ci_half_width(sd, k) <= margin), None)
        parts.append(f"{name}: seed-to-seed sd {sd:.4f} (pooled over the arms, {df} df); with {n} seeds per arm a "
                     f"true difference of {detectable_difference(sd, n):.4f} is detected with 80 % power at p < "
                     f"0.05 (one of {margin} needs {need or '> 200'} seeds per arm), and the 95 % CI of a "
                     f"difference is ± {ci_half_width(sd, n):.4f} wide (*matches* needs it within ± {margin}: "
                     f"{need_ci or '> 200'} seeds)")
    return ("Power — " + "; ".join(parts) + ".") if parts else ""


def moonshot_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: each non-fixed arm against the best fixed β (highest mean accuracy) and against β-DPO (the arm
    whose ``mode`` is beta_dpo), on accuracy and on the frontier gap (against the fixed-β seeds' gaps and against
    β-DPO's), the moonshot's verdict per arm, and a power note.

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
    dpo_gaps = run_gaps(beta_dpo["runs"], points) if beta_dpo else []
    lines = [f"Best fixed β by held-out accuracy: **{best['arm']}**. Cells: mean difference [95 % CI], Welch p over "
             f"seeds and the verdict of report.md's rule (matches: CI within ±{ACC_MARGIN} accuracy, ±{GAP_MARGIN} "
             "reward); frontier gap = reward − fixed-β frontier at the run's KL (mean ± std over seeds), compared "
             "with the fixed-β seeds' gaps and with β-DPO's; moonshot: holds = matches or beats the best fixed β on "
             "both, beats β-DPO on one and is worse on neither (`significance.moonshot_verdict`).", "",
             f"| arm | seeds | acc − best fixed ({best['arm']}) | acc − β-DPO | frontier gap | gap vs fixed seeds "
             "| gap − β-DPO | moonshot |",
             "|---|---|---|---|---|---|---|---|"]
    all_gaps = [run_gaps(a["runs"], points) for a in arms]
    for a, gaps in zip(arms, all_gaps):
        if a["kind"] == "fixed":
            continue
        acc = _values(a, acc_key)
        gap_cell = "outside the fixed-β KL range" if not gaps else (
            f"{_mean(gaps):+.4f} ± " + (f"{statistics.pstdev(gaps):.4f}" if len(gaps) > 1 else "–") + f" (n={len(gaps)})")
        no_dpo_test = beta_dpo is None or a is beta_dpo
        tests = [(welch(acc, _values(best, acc_key)), ACC_MARGIN), (welch(gaps, fixed_gaps), GAP_MARGIN),
                 (None if no_dpo_test else welch(acc, _values(beta_dpo, acc_key)), ACC_MARGIN),
                 (None if no_dpo_test else welch(gaps, dpo_gaps), GAP_MARGIN)]
        (acc_fixed, gap_fixed, acc_dpo, gap_dpo) = [_fmt_test(t, m) for t, m in tests]
        moonshot = "–" if no_dpo_test else moonshot_verdict(*(verdict(t, m) for t, m in tests))
        lines.append(f"| {a['arm']} | {a['n_seeds']} | {acc_fixed} | {acc_dpo} | {gap_cell} | {gap_fixed} | "
                     f"{gap_dpo} | {moonshot} |")
    note = power_note(arms, acc_key, all_gaps)
    return "\n".join(lines + (["", note] if note else []))
