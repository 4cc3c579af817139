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

Every arm's seed s shares its data order with every other arm's seed s, so seeds are blocks: :func:`blocked_table`
repeats the comparisons with paired t-tests over shared seeds and each seed's gap to its own seed's fixed-β frontier
— a secondary analysis beside the pre-registered Welch rule, not a replacement.
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


def _best_and_beta_dpo(arms: list[dict], acc_key: str) -> tuple[list[dict], dict | None, dict | None]:
    """The fixed arms with an accuracy, the best of them by mean accuracy, and the β-DPO arm (mode beta_dpo).

    While an experiment is under way, a fixed arm with one finished seed is not eligible as the best when another
    has two or more: one seed is one draw (the seed-to-seed sd is as large as the arms' differences), and nothing
    can be tested against it."""
    fixed = [a for a in arms if a["kind"] == "fixed" and _values(a, acc_key)]
    eligible = [a for a in fixed if len(_values(a, acc_key)) >= 2] or fixed
    best = max(eligible, key=lambda a: _mean(_values(a, acc_key))) if eligible else None
    return fixed, best, next((a for a in arms if a["runs"][0].get("mode") == "beta_dpo"), None)


def _gap_cell(gaps: Sequence[float], run: dict) -> str:
    """mean ± std (n) of an arm's gaps; when it has none, why (``run``: one of its runs)."""
    if not gaps:
        if run["values"].get("KL") is None or run["values"].get("reward") is None:
            return "no reward/KL (no generation)"
        return "outside the fixed-β KL range"
    return (f"{_mean(gaps):+.4f} ± " + (f"{statistics.pstdev(gaps):.4f}" if len(gaps) > 1 else "–")
            + f" (n={len(gaps)})")


def _verdict_row(a: dict, n: int, gap_cell: str, tests: list, no_dpo_test: bool) -> str:
    """One table row: the four tests (acc vs best fixed, gap vs fixed, acc vs β-DPO, gap vs β-DPO), the moonshot."""
    margins = (ACC_MARGIN, GAP_MARGIN, ACC_MARGIN, GAP_MARGIN)
    acc_fixed, gap_fixed, acc_dpo, gap_dpo = [_fmt_test(t, m) for t, m in zip(tests, margins)]
    moonshot = "–" if no_dpo_test else moonshot_verdict(*(verdict(t, m) for t, m in zip(tests, margins)))
    return f"| {a['arm']} | {n} | {acc_fixed} | {acc_dpo} | {gap_cell} | {gap_fixed} | {gap_dpo} | {moonshot} |"


def moonshot_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: each non-fixed arm against the best fixed β (highest mean accuracy) and against β-DPO (the arm
    whose ``mode`` is beta_dpo), on accuracy and on the frontier gap (against the fixed-β seeds' gaps and against
    β-DPO's), the moonshot's verdict per arm, and a power note.

    ``arms``: :func:`lbdpo.eval.compare.group_arms` entries (``arm``, ``kind``, ``runs`` with ``values`` and
    ``mode``). Returns "" when there is no fixed arm to compare with."""
    fixed, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    if best is None:
        return ""
    points = []
    for a in fixed:
        kls, rewards = _values(a, "KL"), _values(a, "reward")
        if kls and rewards:
            points.append((_mean(kls), _mean(rewards)))
    fixed_gaps = [g for a in fixed for g in run_gaps(a["runs"], points)]
    dpo_gaps = run_gaps(beta_dpo["runs"], points) if beta_dpo else []
    waiting = [a["arm"] for a in fixed if a is not best and len(_values(a, acc_key)) < 2 <= len(_values(best, acc_key))]
    lines = [f"Best fixed β by held-out accuracy: **{best['arm']}**"
             + (f" (not eligible until a second seed: {', '.join(waiting)})" if waiting else "")
             + ". Cells: mean difference [95 % CI], Welch p over "
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
        no_dpo_test = beta_dpo is None or a is beta_dpo
        tests = [welch(acc, _values(best, acc_key)), welch(gaps, fixed_gaps),
                 None if no_dpo_test else welch(acc, _values(beta_dpo, acc_key)),
                 None if no_dpo_test else welch(gaps, dpo_gaps)]
        lines.append(_verdict_row(a, a["n_seeds"], _gap_cell(gaps, a["runs"][0]), tests, no_dpo_test))
    note = power_note(arms, acc_key, all_gaps)
    return "\n".join(lines + (["", note] if note else []))


def accuracy_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: every accuracy beside the main held-out one (each run's ``accuracies``: per domain of the held-out
    pairs, each extra evaluation set and its domains), per arm mean ± std over seeds, and each non-fixed arm's Welch
    test against the best fixed β (chosen on the main held-out accuracy, as in :func:`moonshot_table`) and against
    β-DPO. A secondary analysis: many measures, no correction for multiple comparisons. "" when no run has one."""
    _, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    measures = list(dict.fromkeys(m for a in arms for r in a["runs"] for m in r.get("accuracies", {})))
    if best is None or not measures:
        return ""

    def values(arm, measure):
        return [r["accuracies"][measure] for r in arm["runs"] if r.get("accuracies", {}).get(measure) is not None]

    lines = [f"Best fixed β: **{best['arm']}** (by the main held-out accuracy, as above, for every row). Cells: "
             f"mean difference [95 % CI], Welch p over seeds and the rule's verdict (matches: CI within "
             f"±{ACC_MARGIN}). Secondary: {len(measures)} measures, no correction for multiple comparisons.", "",
             f"| measure | arm | seeds | accuracy | − best fixed ({best['arm']}) | − β-DPO |", "|---|---|---|---|---|---|"]
    for measure in measures:
        for a in arms:
            own = values(a, measure)
            if not own:
                continue
            mean = _mean(own)
            spread = f"{statistics.pstdev(own):.4f}" if len(own) > 1 else "–"
            tests = ["–", "–"]
            if a["kind"] != "fixed":
                tests[0] = _fmt_test(welch(own, values(best, measure)), ACC_MARGIN)
                if beta_dpo is not None and a is not beta_dpo:
                    tests[1] = _fmt_test(welch(own, values(beta_dpo, measure)), ACC_MARGIN)
            lines.append(f"| {measure} | {a['arm']} | {len(own)} | {mean:.4f} ± {spread} | {tests[0]} | {tests[1]} |")
    return "\n".join(lines)


# -- blocked by seed: every arm's seed s trains on the same data order, so seeds are blocks --------------------------

def paired(a: dict[int, float], b: dict[int, float] | None = None) -> dict[str, float] | None:
    """Mean of a[s] − b[s] over the seeds s both have (``b`` None: of a[s], against 0), its 95 % CI and the
    two-sided p of the paired t-test (t = mean / (sd/√n), n − 1 df); None with fewer than 2 seeds or differences
    constant up to float rounding. Same keys as :func:`welch`."""
    seeds = sorted(set(a) if b is None else set(a) & set(b))
    d = [a[s] - (0.0 if b is None else b[s]) for s in seeds]
    if len(d) < 2 or max(d) - min(d) <= 1e-12 * max(1.0, max(abs(x) for x in d)):  # constant up to rounding
        return None
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(0.95)
    return {"diff": sum(d) / len(d), "low": float(ci.low), "high": float(ci.high), "p": float(result.pvalue),
            "n_a": len(d), "n_b": len(d)}


def _by_seed(arm: dict, key: str) -> dict[int, float]:
    return {int(r["seed"]): r["values"][key] for r in arm["runs"]
            if r.get("seed") is not None and r["values"].get(key) is not None}


def seed_gaps(arm: dict, fixed: list[dict]) -> dict[int, float]:
    """{seed s: reward − R*_s(KL)} of the arm's runs, R*_s the frontier of the fixed arms' runs of seed s (so a
    fixed run's own gap is 0); seeds whose KL falls outside that frontier's range are left out."""
    out = {}
    for run in arm["runs"]:
        seed = run.get("seed")
        points = [(f["values"]["KL"], f["values"]["reward"]) for a in fixed for f in a["runs"]
                  if f.get("seed") == seed and f["values"].get("KL") is not None
                  and f["values"].get("reward") is not None]
        gaps = run_gaps([run], points) if seed is not None else []
        if gaps:
            out[int(seed)] = gaps[0]
    return out


def paired_ci_half_width(sd: float, n: int) -> float:
    """The half-width of the 95 % CI of a mean paired difference over ``n`` seeds (sd ``sd`` of the differences):
    t_{0.975, n−1} · sd / √n."""
    return float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def blocked_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: :func:`moonshot_table`'s comparisons with seeds as blocks — paired t-tests over the seeds two arms
    share, and the frontier gap of each seed against the frontier of that seed's fixed-β runs — with a power note
    from the paired differences. Secondary to the pre-registered Welch rule. "" without fixed arms or seeds."""
    fixed, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    if best is None or not _by_seed(best, acc_key):
        return ""
    lines = ["Every arm's seed s trains on the same data order (and holds out the same pairs where the split is "
             "seeded), so an arm's seed s is compared with the other arm's seed s: paired t-tests over the seeds both "
             "have (n − 1 df), the frontier gap against the frontier of the same seed's fixed-β runs (tested "
             f"against 0). Best fixed β as above: **{best['arm']}**. Not the pre-registered rule (the Welch table "
             "above is); it removes what a seed does to every arm alike.", "",
             f"| arm | paired seeds | acc − best fixed ({best['arm']}) | acc − β-DPO | frontier gap, own seed's "
             "frontier | gap vs 0 | gap − β-DPO | moonshot |",
             "|---|---|---|---|---|---|---|---|"]
    best_acc = _by_seed(best, acc_key)
    dpo_acc, dpo_gaps = (_by_seed(beta_dpo, acc_key), seed_gaps(beta_dpo, fixed)) if beta_dpo else ({}, {})
    acc_diffs, gap_lists = [], []
    for a in arms:
        if a["kind"] == "fixed":
            continue
        acc, gaps = _by_seed(a, acc_key), seed_gaps(a, fixed)
        no_dpo_test = beta_dpo is None or a is beta_dpo
        tests = [paired(acc, best_acc), paired(gaps),
                 None if no_dpo_test else paired(acc, dpo_acc), None if no_dpo_test else paired(gaps, dpo_gaps)]
        lines.append(_verdict_row(a, len(set(acc) & set(best_acc)), _gap_cell(list(gaps.values()), a["runs"][0]), tests,
                                  no_dpo_test))
        acc_diffs.append([acc[s] - best_acc[s] for s in sorted(set(acc) & set(best_acc))])
        gap_lists.append(list(gaps.values()))
    parts, n = [], len(best_acc)
    for name, groups, margin in (("accuracy − best fixed", acc_diffs, ACC_MARGIN), ("frontier gap", gap_lists,
                                                                                      GAP_MARGIN)):
        pooled = pooled_sd(groups)
        if pooled is None:
            continue
        sd, df = pooled
        need = next((k for k in range(2, 201) if paired_ci_half_width(sd, k) <= margin), None)
        parts.append(f"{name}: sd of the per-seed differences {sd:.4f} (pooled over the arms, {df} df); the 95 % CI "
                     f"of a mean over {n} seeds is ± {paired_ci_half_width(sd, n):.4f} (*matches* needs ± {margin}: "
                     f"{need or '> 200'} seeds)")
    return "\n".join(lines + (["", "Power (blocked) — " + "; ".join(parts) + "."] if parts else []))


# -- the held-out pairs as a sample: how much of an accuracy difference is the choice of test pairs -----------------

def pair_bootstrap(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], reps: int = 2000,
                   seed: int = 0) -> dict[str, float] | None:
    """Accuracy of arm a − arm b on the same held-out pairs, and the 2.5/97.5 percentiles of that difference over
    ``reps`` resamplings of the pairs (with replacement, the same pairs for both arms; each arm's runs fixed).

    ``a``, ``b``: per run, per pair, whether the pair was ranked right; every run of both arms over the same pairs
    in the same order. None when an arm has no run or the runs' pair counts differ."""
    import numpy as np

    if not a or not b or len({len(r) for r in (*a, *b)}) != 1:
        return None
    d = np.asarray(a, dtype=float).mean(0) - np.asarray(b, dtype=float).mean(0)  # (pairs,) seed-averaged
    draws = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    means = d[draws].mean(1)
    return {"diff": float(d.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "pairs": len(d)}


def pair_sampling_note(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """One paragraph: for each non-fixed arm, the bootstrap interval of its accuracy difference to the best fixed β
    and to β-DPO from resampling the held-out pairs alone (:func:`pair_bootstrap`): the uncertainty that a larger
    test set would shrink, against the seed-to-seed one of the tables above. "" without per-pair files."""
    _, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    if best is None:
        return ""

    def correct(arm):
        return [r["pairs_correct"] for r in arm["runs"] if r.get("pairs_correct")]

    cells = []
    for a in arms:
        if a["kind"] == "fixed":
            continue
        for other in (best, beta_dpo):
            t = pair_bootstrap(correct(a), correct(other)) if other is not None and other is not a else None
            if t is not None:
                cells.append(f"{a['arm']} − {other['arm']} {t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}]")
    if not cells:
        return ""
    return ("Held-out pairs as a sample (each arm's accuracy averaged over its seeds, the pairs resampled 2,000 "
            "times, seeds fixed; `significance.pair_bootstrap`): " + "; ".join(cells) + ". Compare "
            "them with the seed intervals above: the wider of the two is what limits a verdict.")
