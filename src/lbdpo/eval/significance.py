"""Does one arm beat another? Welch tests over seeds, each run's gap to the fixed-β frontier, Holm within each arm.

The question of issue 14: does a learnable-β arm match or beat the best fixed β of a sweep — on held-out preference
accuracy, and on the reward-vs-KL frontier at equal KL — and beat β-DPO? One run (one seed) gives:

    acc     held-out preference accuracy: the fraction of pairs with Δ > 0, Δ the β-free log-ratio margin, so the
            same at every β > 0 (eval.json ``preference.common_beta``)
    reward  mean ground-truth reward of the policy's samples; KL  Monte-Carlo KL(π‖πref) of the same samples

The fixed-β frontier R*(KL) is a concave, increasing least-squares fit in log KL to every fixed-β run
(:mod:`lbdpo.eval.frontier`); a run's **gap** is reward − R*(its KL) (None outside the fixed runs' KL range). An
arm's gap is tested against 0 and against β-DPO's with the fit's own uncertainty (a bootstrap over seeds) in the
interval (:func:`lbdpo.eval.frontier.gap_test`). Accuracy: Welch's t-test over seeds. Each arm's tests form one
family: Holm's step-down correction (:func:`holm`) adjusts their p-values, and *beats* / *worse* need an adjusted
p < 0.05; *matches* is the 95 % CI inside the margin (an equivalence claim, TOST at 2.5 % per side; the moonshot asks
for several at once, an intersection–union test that needs no correction). The power notes give the probability of
each verdict (:mod:`lbdpo.eval.power`), and the held-out pairs' own sampling noise comes from a bootstrap over pairs
aligned by pair identity (:mod:`lbdpo.eval.pair_sample`).

Every arm's seed s shares its data order with every other arm's seed s, so seeds are blocks: :func:`blocked_table`
repeats the comparisons with paired t-tests over shared seeds and each seed's gap to its own seed's fitted frontier
— a secondary analysis beside the pre-registered Welch rule, not a replacement.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from scipy import stats

from .frontier import (concave_slack, fixed_residuals, frontier_bootstrap, frontier_reward,  # noqa: F401 (eval_noise)
                       gap_test, run_gaps, seed_gaps)
from .pair_sample import pair_bootstrap
from .power import detectable_difference, first_n, matches_power, pooled_sd, prob_matches

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



def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values of one family (None entries are not tests and stay None): the k-th
    smallest of m p-values becomes max over j ≤ k of min(1, (m − j + 1)·p_(j))."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out


def with_holm(tests: list[dict | None]) -> list[dict | None]:
    """The tests of one family, each (not None) given ``p_holm``, its Holm-adjusted p (in place; returned)."""
    for t, p in zip(tests, holm([None if t is None else t["p"] for t in tests])):
        if t is not None:
            t["p_holm"] = p
    return tests


def _values(arm: dict, key: str) -> list[float]:
    return [r["values"][key] for r in arm["runs"] if r["values"].get(key) is not None]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# equivalence margins of the decision rule (report.md §9): accuracy, and reward for the frontier gap
ACC_MARGIN, GAP_MARGIN = 0.03, 0.01


def verdict(t: dict | None, margin: float) -> str:
    """The decision rule: *beats* / *worse* = a difference of that sign with p < 0.05 (Holm-adjusted within the
    arm's family when ``p_holm`` is set); *matches* = the 95 % CI inside ±margin; else *inconclusive*; "–" without
    a test."""
    if t is None:
        return "–"
    if t.get("p_holm", t["p"]) < 0.05:
        return "beats" if t["diff"] > 0 else "worse"
    if -margin <= t["low"] and t["high"] <= margin:
        return "matches"
    return "inconclusive"


def _fmt_test(t: dict | None, margin: float) -> str:
    if t is None:
        return "–"
    holm_p = f" (Holm {t['p_holm']:.2g})" if "p_holm" in t else ""
    return f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.2g}{holm_p}: {verdict(t, margin)}"


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
        return "outside the fixed-β KL range (or no frontier)"
    return (f"{_mean(gaps):+.4f} ± " + (f"{statistics.pstdev(gaps):.4f}" if len(gaps) > 1 else "–")
            + f" (n={len(gaps)})")


def _verdict_row(a: dict, n: int, gap_cell: str, tests: list, no_dpo_test: bool) -> str:
    """One table row: the four tests (acc vs best fixed, gap vs frontier, acc vs β-DPO, gap vs β-DPO), Holm-adjusted
    as one family, and the moonshot."""
    margins = (ACC_MARGIN, GAP_MARGIN, ACC_MARGIN, GAP_MARGIN)
    tests = with_holm(tests)
    acc_fixed, gap_fixed, acc_dpo, gap_dpo = [_fmt_test(t, m) for t, m in zip(tests, margins)]
    moonshot = "–" if no_dpo_test else moonshot_verdict(*(verdict(t, m) for t, m in zip(tests, margins)))
    return f"| {a['arm']} | {n} | {acc_fixed} | {acc_dpo} | {gap_cell} | {gap_fixed} | {gap_dpo} | {moonshot} |"


RULE = ("Cells: mean difference [95 % CI], two-sided p and its Holm adjustment over the arm's own tests in the row "
        f"(*beats* / *worse* need Holm p < 0.05; *matches*: the 95 % CI within ±{ACC_MARGIN} accuracy, ±{GAP_MARGIN} "
        "reward)")


def moonshot_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: each non-fixed arm against the best fixed β (highest mean accuracy) and against β-DPO (the arm
    whose ``mode`` is beta_dpo), on accuracy (Welch) and on the frontier gap (against the fitted frontier, and
    against β-DPO's gap), Holm within each row, the moonshot's verdict per arm, the frontier and power notes.

    ``arms``: :func:`lbdpo.eval.compare.group_arms` entries (``arm``, ``kind``, ``runs`` with ``values``, ``mode``
    and ``seed``). Returns "" when there is no fixed arm to compare with."""
    fixed, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    if best is None:
        return ""
    boot = frontier_bootstrap(fixed)
    fit = boot["fit"] if boot else None
    waiting = [a["arm"] for a in fixed if a is not best and len(_values(a, acc_key)) < 2 <= len(_values(best, acc_key))]
    lines = [f"Best fixed β by held-out accuracy: **{best['arm']}**"
             + (f" (not eligible until a second seed: {', '.join(waiting)})" if waiting else "")
             + ". " + RULE + "; accuracy: Welch over seeds; frontier gap = reward − fixed-β frontier at the run's KL "
             "(mean ± std over seeds), tested against 0 (on the frontier) and against β-DPO's gap, the frontier's "
             "uncertainty included; moonshot: holds = matches or beats the best fixed β on both, beats β-DPO on one "
             "and is worse on neither (`significance.moonshot_verdict`).", "",
             f"| arm | seeds | acc − best fixed ({best['arm']}) | acc − β-DPO | frontier gap | gap vs frontier "
             "| gap − β-DPO | moonshot |",
             "|---|---|---|---|---|---|---|---|"]
    gap_groups, frontier_vars = [], []
    for a in arms:
        if a["kind"] == "fixed":
            continue
        acc, gaps = _values(a, acc_key), [g for g, _ in run_gaps(a["runs"], fit)]
        no_dpo_test = beta_dpo is None or a is beta_dpo
        tests = [welch(acc, _values(best, acc_key)), gap_test(a["runs"], boot),
                 None if no_dpo_test else welch(acc, _values(beta_dpo, acc_key)),
                 None if no_dpo_test else gap_test(a["runs"], boot, beta_dpo["runs"])]
        lines.append(_verdict_row(a, a["n_seeds"], _gap_cell(gaps, a["runs"][0]), tests, no_dpo_test))
        gap_groups.append(gaps)
        if tests[1] is not None:
            frontier_vars.append(tests[1]["frontier_var"] * boot["blocks"])
    others = [a for a in arms if a["kind"] != "fixed"]
    notes = [frontier_note(fixed, boot, others), power_note(arms, acc_key, gap_groups, frontier_vars)]
    return "\n".join(lines + [x for note in notes if note for x in ("", note)])


def frontier_note(fixed: list[dict], boot: dict | None, others: Sequence[dict] = ()) -> str:
    """One paragraph: how the frontier was fitted, how far it passes from each fixed arm, its uncertainty, and how
    much lower each other arm's gap could be against the most concave frontier the fixed arms allow."""
    if boot is None:
        return ""
    fit = boot["fit"]
    residuals = ", ".join(f"{arm} {r:+.4f}" for arm, r in fixed_residuals(fixed, fit).items())
    slack = []
    for a in others:
        room = [concave_slack(fixed, fit, r["values"].get("KL")) for r in a["runs"]]
        room = [x for x in room if x is not None]
        if room:
            slack.append(f"{a['arm']} {_mean(room):.4f}")
    return ("Frontier — the least-squares concave nondecreasing fit of reward in log KL over every fixed-β run "
            f"(`frontier.fit_frontier`, nonparametric), used for KL {fit['lo']:.2f}–{fit['hi']:.2f}; the fixed "
            f"arms' mean residuals: {residuals}. Its uncertainty: the fit repeated on 2,000 resamples of the fixed "
            f"runs' {boot['blocks']} seeds (each seed evaluates its own prompts, so prompts are resampled with "
            "them), added to each gap's variance (`frontier.gap_test`: Welch–Satterthwaite t). Between two fixed "
            "arms the fit is straight; a concave frontier may bulge above it, and against the most concave one the "
            "fixed arms allow each gap would be lower by up to (`frontier.concave_slack`, mean over the arm's runs): "
            + ("; ".join(slack) or "–") + ".")


def power_note(arms: list[dict], acc_key: str, gaps: Sequence[Sequence[float]],
               frontier_vars: Sequence[float] = ()) -> str:
    """One paragraph: the seed-to-seed spread pooled over the arms, and the probability of each verdict with the
    most seeds an arm has (:mod:`lbdpo.eval.power`)."""
    n = max((a["n_seeds"] for a in arms), default=0)
    parts = []
    pooled = pooled_sd([_values(a, acc_key) for a in arms])
    if pooled is not None and pooled[0] > 0 and n >= 2:
        sd, df = pooled
        need = first_n(lambda k: matches_power(sd, k, ACC_MARGIN))
        parts.append(f"held-out accuracy: seed-to-seed sd {sd:.4f} (pooled over the arms, {df} df); with {n} seeds "
                     f"per arm a true difference of 0 gets *matches* (±{ACC_MARGIN}) with probability "
                     f"{matches_power(sd, n, ACC_MARGIN):.2f} (80 % needs {need or '> 400'} seeds per arm), and "
                     f"*beats* has 80 % power at a true difference of {detectable_difference(sd, n):.4f} (p < 0.05 "
                     "before Holm)")
    pooled = pooled_sd(gaps)
    if pooled is not None and pooled[0] > 0 and n >= 2:
        sd, df = pooled
        vf = statistics.median(frontier_vars) if frontier_vars else 0.0

        def gap_matches(k: int) -> float:  # the arm's gaps over k seeds, the frontier fitted from k seeds too
            a, b = sd ** 2 / k, vf / k
            return prob_matches(GAP_MARGIN, (a + b) ** 0.5, (k - 1) * (a + b) ** 2 / (a ** 2 + b ** 2))

        need = first_n(gap_matches)
        parts.append(f"frontier gap: seed-to-seed sd {sd:.4f} (pooled over the non-fixed arms, {df} df), frontier "
                     f"variance ≈ {vf:.2e}/seeds; with {n} seeds (fixed arms too) a gap of 0 gets *matches* "
                     f"(±{GAP_MARGIN}) with probability {gap_matches(n):.2f} (80 % needs {need or '> 400'} seeds)")
    return ("Power (the probability of each verdict, `lbdpo.eval.power`) — " + "; ".join(parts) + ".") if parts else ""


def accuracy_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: every accuracy beside the main held-out one (each run's ``accuracies``: per domain of the held-out
    pairs, each extra evaluation set and its domains), per arm mean ± std over seeds, and each non-fixed arm's Welch
    test against the best fixed β (chosen on the main held-out accuracy, as in :func:`moonshot_table`) and against
    β-DPO, Holm-adjusted over all of that arm's tests in the table. "" when no run has one."""
    _, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    measures = list(dict.fromkeys(m for a in arms for r in a["runs"] for m in r.get("accuracies", {})))
    if best is None or not measures:
        return ""

    def values(arm, measure):
        return [r["accuracies"][measure] for r in arm["runs"] if r.get("accuracies", {}).get(measure) is not None]

    tests = {}
    for a in arms:
        if a["kind"] == "fixed":
            continue
        own = {m: [welch(values(a, m), values(best, m)),
                   welch(values(a, m), values(beta_dpo, m)) if beta_dpo is not None and a is not beta_dpo else None]
               for m in measures}
        with_holm([t for pair in own.values() for t in pair])
        tests.update({(m, a["arm"]): pair for m, pair in own.items()})
    lines = [f"Best fixed β: **{best['arm']}** (by the main held-out accuracy, as above, for every row). Cells: "
             "mean difference [95 % CI], Welch p over seeds, its Holm adjustment over all of the arm's tests in this "
             f"table ({len(measures)} measures × 2 comparisons) and the rule's verdict (matches: CI within "
             f"±{ACC_MARGIN}). Secondary.", "",
             f"| measure | arm | seeds | accuracy | − best fixed ({best['arm']}) | − β-DPO |", "|---|---|---|---|---|---|"]
    for measure in measures:
        for a in arms:
            own = values(a, measure)
            if not own:
                continue
            spread = f"{statistics.pstdev(own):.4f}" if len(own) > 1 else "–"
            cells = ["–", "–"]
            if (measure, a["arm"]) in tests:
                t_best, t_dpo = tests[(measure, a["arm"])]
                cells = [_fmt_test(t_best, ACC_MARGIN), "–" if t_dpo is None else _fmt_test(t_dpo, ACC_MARGIN)]
            lines.append(f"| {measure} | {a['arm']} | {len(own)} | {_mean(own):.4f} ± {spread} | {cells[0]} | "
                         f"{cells[1]} |")
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



def blocked_table(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """Markdown: :func:`moonshot_table`'s comparisons with seeds as blocks — paired t-tests over the seeds two arms
    share, and the frontier gap of each seed against the fit to that seed's fixed-β runs — Holm within each row,
    with a power note from the paired differences. Secondary to the pre-registered Welch rule. "" without fixed
    arms or seeds."""
    fixed, best, beta_dpo = _best_and_beta_dpo(arms, acc_key)
    if best is None or not _by_seed(best, acc_key):
        return ""
    lines = ["Every arm's seed s trains on the same data order (and holds out the same pairs where the split is "
             "seeded), so an arm's seed s is compared with the other arm's seed s: paired t-tests over the seeds both "
             "have (n − 1 df), the frontier gap against the concave fit to the same seed's fixed-β runs (tested "
             f"against 0). Best fixed β as above: **{best['arm']}**. " + RULE + ". Not the pre-registered rule (the "
             "Welch table above is); it removes what a seed does to every arm alike.", "",
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
        lines.append(_verdict_row(a, len(set(acc) & set(best_acc)), _gap_cell(list(gaps.values()), a["runs"][0]),
                                  tests, no_dpo_test))
        acc_diffs.append([acc[s] - best_acc[s] for s in sorted(set(acc) & set(best_acc))])
        gap_lists.append(list(gaps.values()))
    parts, n = [], len(best_acc)
    for name, groups, margin in (("accuracy − best fixed", acc_diffs, ACC_MARGIN),
                                 ("frontier gap", gap_lists, GAP_MARGIN)):
        pooled = pooled_sd(groups)
        if pooled is None or pooled[0] == 0 or n < 2:
            continue
        sd, df = pooled
        need = first_n(lambda k: matches_power(sd, k, margin, paired=True))
        parts.append(f"{name}: sd of the per-seed differences {sd:.4f} (pooled over the arms, {df} df); over {n} "
                     f"seeds a true difference of 0 gets *matches* (±{margin}) with probability "
                     f"{matches_power(sd, n, margin, paired=True):.2f} (80 % needs {need or '> 400'} seeds)")
    return "\n".join(lines + (["", "Power (blocked) — " + "; ".join(parts) + "."] if parts else []))


# -- the held-out pairs as a sample: how much of an accuracy difference is the choice of test pairs -----------------

def pair_sampling_note(arms: list[dict], acc_key: str = "held-out acc") -> str:
    """One paragraph: for each non-fixed arm, the bootstrap interval of its accuracy difference to the best fixed β
    and to β-DPO from resampling the held-out pairs alone, aligned by pair identity
    (:func:`lbdpo.eval.pair_sample.pair_bootstrap`): the uncertainty that a larger test set would shrink, against
    the seed-to-seed one of the tables above. "" without per-pair files with pair keys."""
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
    return ("Held-out pairs as a sample (each arm's accuracy averaged over its seeds; the pairs resampled 2,000 "
            "times by identity — the key of `pair_sample`, so a pair drawn counts in every seed that holds it out — "
            "seeds fixed): " + "; ".join(cells) + ". Compare them with the seed intervals above: the wider of the "
            "two is what limits a verdict.")
