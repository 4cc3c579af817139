"""lbdpo.eval.significance and the modules it stands on (power, frontier, pair_sample): Welch and paired tests against
their formulas, Holm against a hand-computed example, the power of each verdict against simulation, the concave
frontier fit on known concave functions with noise and its gap interval's coverage by simulation, the pair bootstrap
aligned by pair identity against positional alignment, the moonshot table on synthetic arms whose answer is known,
and the experiment-style comparison (arm names, order, per-domain table)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

import numpy as np

from lbdpo.eval.compare import write_comparison
from lbdpo.eval.frontier import (concave_slack, fit_frontier, frontier_at, frontier_bootstrap, gap_test, run_gaps,
                                 seed_gaps)
from lbdpo.eval.pair_sample import pair_bootstrap, pair_key, read_held_out
from lbdpo.eval.power import (ci_half_width, detectable_difference, matches_power, paired_ci_half_width, pooled_sd,
                              prob_beats, seeds_for_matches)
from lbdpo.eval.significance import (_fmt_test, blocked_table, holm, moonshot_table, moonshot_verdict, paired,
                                     verdict, welch, with_holm)
from test_plots_compare import fake_run


def test_welch_is_the_textbook_formula():
    a, b = [0.81, 0.83, 0.80], [0.76, 0.78, 0.75, 0.77]
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2
    vb = sum((x - mb) ** 2 for x in b) / 3
    se = math.sqrt(va / 3 + vb / 4)
    df = (va / 3 + vb / 4) ** 2 / ((va / 3) ** 2 / 2 + (vb / 4) ** 2 / 3)  # Welch–Satterthwaite
    t = (ma - mb) / se
    out = welch(a, b)
    assert out["diff"] == pytest.approx(ma - mb)
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    half = stats.t.ppf(0.975, df) * se
    assert (out["low"], out["high"]) == pytest.approx((ma - mb - half, ma - mb + half))
    assert welch([0.8], b) is None and welch([0.8, 0.8], [0.7, 0.7]) is None  # nothing to test


def frontier_runs(truth, rng, seeds=5, sds=(0.002, 0.003, 0.004, 0.005), centers=(1.6, 2.25, 3.1, 4.0)):
    """Four fixed arms (centres in log KL) × ``seeds`` runs on the curve ``truth`` with noise: each run's log KL
    jittered by 0.1, its reward by that arm's sd (the arms' spreads differ, as in experiment 1)."""
    runs = []
    for s in range(seeds):
        for c, sd in zip(centers, sds):
            x = c + rng.normal(0, 0.1)
            runs.append({"values": {"KL": math.exp(x), "reward": truth(x) + rng.normal(0, sd)}, "seed": s})
    return runs


def test_frontier_fit_is_the_least_squares_concave_increasing_function():
    from scipy import optimize

    rng = np.random.default_rng(0)
    truth = lambda x: 1.0 - 0.6 * np.exp(-0.9 * x)  # concave and increasing in log KL
    pts = [(r["values"]["KL"], r["values"]["reward"]) for r in frontier_runs(truth, rng)]
    fit = fit_frontier(pts)
    slopes = np.diff(fit["values"]) / np.diff(fit["knots"])
    assert (slopes >= -1e-12).all() and (np.diff(slopes) <= 1e-9).all()  # increasing, concave
    for c in (1.6, 2.25, 3.1, 4.0):  # at each fixed arm the fit recovers the truth within its noise
        assert frontier_at(fit, math.exp(c)) == pytest.approx(truth(c), abs=0.004)
    # the same problem by a general solver: minimise the squared error over fitted values whose slopes fall and
    # stay ≥ 0 (SLSQP); the fitted values agree
    x, y = np.log([k for k, _ in pts]), np.array([r for _, r in pts])
    order = np.argsort(x)
    x, y = x[order], y[order]
    cons = [{"type": "ineq", "fun": lambda f: -np.diff(np.diff(f) / np.diff(x))},
            {"type": "ineq", "fun": lambda f: np.diff(f)[-1:] / np.diff(x)[-1:]}]
    ref = optimize.minimize(lambda f: ((f - y) ** 2).sum(), y.copy(), constraints=cons, method="SLSQP",
                            options={"ftol": 1e-14, "maxiter": 1000})
    assert [frontier_at(fit, math.exp(v)) for v in x] == pytest.approx(ref.x, abs=2e-5)
    # known answers: points on a concave curve are fitted exactly; convex points get their least-squares line;
    # falling points a flat line at their mean; no extrapolation, and three distinct KLs at least
    exact = [(math.exp(v), float(truth(v))) for v in (1.5, 2.0, 2.7, 3.3, 4.1)]
    assert [frontier_at(fit_frontier(exact), k) for k, _ in exact] == pytest.approx([r for _, r in exact])
    xs = np.array([1.0, 2.0, 3.0, 4.0])
    convex = fit_frontier([(math.exp(v), v ** 2) for v in xs])
    assert [frontier_at(convex, math.exp(v)) for v in xs] == pytest.approx(np.polyval(np.polyfit(xs, xs ** 2, 1), xs))
    falling = fit_frontier([(math.exp(v), -v) for v in (1.0, 2.0, 3.0)])
    assert [frontier_at(falling, math.exp(v)) for v in (1.0, 2.5, 3.0)] == pytest.approx([-2.0] * 3)
    assert frontier_at(fit, fit["lo"] * 0.9) is None and frontier_at(fit, fit["hi"] * 1.1) is None
    assert frontier_at(fit, -1.0) is None and fit_frontier([(1.0, 0.5), (2.0, 0.6), (2.0, 0.7)]) is None
    from lbdpo.eval.significance import frontier_reward  # benchmarks/eval_noise.py's name for it

    assert frontier_reward(exact, exact[2][0]) == pytest.approx(exact[2][1]) and frontier_reward(exact[:2], 1.0) is None


def test_between_fixed_arms_the_concave_slack_covers_what_a_straight_fit_misses():
    quad = lambda x: 0.3 + 0.35 * x - 0.04 * x ** 2  # a concave frontier; fixed arms exactly on it
    centers = (1.6, 2.25, 3.1, 4.0)
    fixed = [{"arm": f"f{c}", "runs": [{"values": {"KL": math.exp(c), "reward": quad(c)}}]} for c in centers]
    fit = fit_frontier([(math.exp(c), quad(c)) for c in centers])
    x = 2.4  # an arm on the true frontier between the second and third fixed arm
    chord_bias = 0.04 * (x - 2.25) * (3.1 - x)  # a concave quadratic lies this far above the chord
    gap = quad(x) - frontier_at(fit, math.exp(x))
    assert gap == pytest.approx(chord_bias) and gap > 0.003  # a straight piece between arms: the gap is biased up
    slack = concave_slack(fixed, fit, math.exp(x))
    assert slack >= gap and gap - slack <= 0  # ... by no more than the stated room
    assert concave_slack(fixed, fit, math.exp(2.25)) == pytest.approx(0.0, abs=1e-12)  # none at an arm
    assert concave_slack(fixed, fit, math.exp(1.0)) is None  # outside the arms
    runs = [{"values": {"reward": quad(2.25), "KL": math.exp(2.25)}}, {"values": {"reward": 0.8, "KL": 500.0}}]
    assert [g for g, _ in run_gaps(runs, fit)] == pytest.approx([0.0], abs=1e-9)  # the second: out of range


def test_gap_interval_covers_a_true_gap_of_zero_with_the_frontier_uncertainty_included():
    """Simulated experiments: fixed arms with unequal spreads, an arm of 5 seeds on the frontier at a fixed arm's
    KL. The gap's 95 % interval covers 0 about 95 % of the time; without the frontier's variance it covers less."""
    rng = np.random.default_rng(1)
    quad = lambda x: 0.3 + 0.35 * x - 0.04 * x ** 2
    covered, covered_naive, sims = 0, 0, 200
    for sim in range(sims):
        fixed = frontier_runs(quad, rng, sds=(0.003, 0.01, 0.02, 0.03))
        xs = 2.25 + rng.normal(0, 0.05, 5)
        arm = [{"values": {"KL": math.exp(v), "reward": quad(v) + rng.normal(0, 0.01)}, "seed": s}
               for s, v in enumerate(xs)]
        boot = frontier_bootstrap([{"runs": fixed}], reps=300, seed=sim)
        t = gap_test(arm, boot)
        covered += t["low"] <= 0 <= t["high"]
        g = [gap for gap, _ in run_gaps(arm, boot["fit"])]
        half = stats.t.ppf(0.975, 4) * np.std(g, ddof=1) / math.sqrt(5)
        covered_naive += abs(np.mean(g)) <= half
    assert 0.91 <= covered / sims <= 0.99
    assert covered_naive < covered - 10


def arm(name, kind, runs, mode=None):
    return {"arm": name, "kind": kind, "n_seeds": len(runs), "beta": None,
            "runs": [{"values": v, "mode": mode or kind} for v in runs]}


def test_moonshot_table_finds_an_arm_above_the_frontier_and_one_below_the_best_accuracy():
    jitter = (-0.004, 0.0, 0.004)
    fixed = [arm(f"fixed_{kl}", "fixed", [{"held-out acc": acc + j, "reward": r + j, "KL": kl * (1 + j)}
                                          for j in jitter])
             for kl, r, acc in ((5.0, 0.80, 0.78), (20.0, 0.90, 0.80), (60.0, 0.95, 0.76))]
    above = arm("learn_above", "learnable", [{"held-out acc": 0.70 + j, "reward": 0.95 + j, "KL": 10.0} for j in jitter])
    dpo = arm("beta_dpo", "learnable", [{"held-out acc": 0.79 + j, "reward": 0.9 + j, "KL": 20.0} for j in jitter],
              mode="beta_dpo")
    table = moonshot_table([*fixed, above, dpo])
    fit = fit_frontier([(r["values"]["KL"], r["values"]["reward"]) for a in fixed for r in a["runs"]])
    gap = 0.95 - frontier_at(fit, 10.0)
    dpo_gap = sum(g for g, _ in run_gaps(dpo["runs"], fit)) / 3
    assert "Best fixed β by held-out accuracy: **fixed_20.0**" in table
    row = next(line for line in table.splitlines() if line.startswith("| learn_above"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("-0.1000")  # accuracy 0.10 below the best fixed β ...
    assert cells[3].startswith("-0.0900")  # ... and 0.09 below β-DPO
    assert gap > 0.05 and cells[4].startswith(f"+{gap:.4f}")  # far above the fitted frontier at KL 10
    assert float(cells[5].split("(Holm ")[1].split(")")[0]) < 0.01  # far above the frontier and its uncertainty
    assert cells[2].endswith(": worse") and cells[5].endswith(": beats")
    # β-DPO's seeds sit at the frontier point (20, 0.90): their gaps are near 0
    assert abs(dpo_gap) < 0.005 and cells[6].startswith(f"{gap - dpo_gap:+.4f}") and cells[6].endswith(": beats")
    assert cells[7] == "fails"  # above the frontier, but worse than the best fixed β on accuracy
    dpo_row = [c.strip() for c in next(line for line in table.splitlines()
                                       if line.startswith("| beta_dpo")).strip("|").split("|")]
    assert dpo_row[3] == dpo_row[6] == dpo_row[7] == "–"  # β-DPO is not compared with itself
    assert "held-out accuracy: seed-to-seed sd 0.0040" in table  # every arm's seeds spread by ±0.004
    assert "Holm" in cells[2] and "Frontier — the least-squares concave" in table


def test_moonshot_holds_for_an_arm_as_accurate_as_the_best_fixed_above_the_frontier_and_above_beta_dpo():
    jitter = (-0.004, 0.0, 0.004)
    fixed = [arm(f"fixed_{kl}", "fixed", [{"held-out acc": acc + j, "reward": r + j, "KL": kl * (1 + j)}
                                          for j in jitter])
             for kl, r, acc in ((5.0, 0.80, 0.78), (20.0, 0.90, 0.80), (60.0, 0.95, 0.76))]
    good = arm("learn_good", "learnable", [{"held-out acc": 0.80 + j, "reward": 0.95 + j, "KL": 10.0}
                                           for j in (0.004, -0.004, 0.0)])
    dpo = arm("beta_dpo", "learnable", [{"held-out acc": 0.70 + j, "reward": 0.9 + j, "KL": 20.0} for j in jitter],
              mode="beta_dpo")
    row = next(line for line in moonshot_table([*fixed, good, dpo]).splitlines() if line.startswith("| learn_good"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].endswith(": matches") and cells[5].endswith(": beats") and cells[3].endswith(": beats")
    assert cells[7] == "holds"


def test_a_fixed_arm_with_one_seed_is_not_the_best_while_another_has_more():
    """Mid-experiment: a fixed β with one finished seed, however high, is one draw and cannot be tested against; the
    best is chosen among the fixed arms with two or more seeds, and the table says which arm waits."""
    jitter = (-0.004, 0.0, 0.004)
    three = arm("fixed_b03", "fixed", [{"held-out acc": 0.56 + j} for j in jitter])
    one = arm("fixed_b01", "fixed", [{"held-out acc": 0.70}])
    learn = arm("learn", "learnable", [{"held-out acc": 0.58 + j} for j in jitter])
    table = moonshot_table([one, three, learn])
    assert "Best fixed β by held-out accuracy: **fixed_b03** (not eligible until a second seed: fixed_b01)" in table
    row = [c.strip() for c in next(l for l in table.splitlines() if l.startswith("| learn")).strip("|").split("|")]
    assert row[2].startswith("+0.0200")  # tested against fixed_b03, not against fixed_b01's single 0.70
    one["runs"].append({"values": {"held-out acc": 0.71}, "mode": "fixed"})  # its second seed lands: now eligible
    table = moonshot_table([one, three, learn])
    assert "Best fixed β by held-out accuracy: **fixed_b01**." in table
    # when no fixed arm has two seeds yet, the best of the one-seed arms is still named
    assert "**fixed_b01**" in moonshot_table([arm("fixed_b01", "fixed", [{"held-out acc": 0.7}]),
                                              arm("fixed_b03", "fixed", [{"held-out acc": 0.6}]), learn])


def test_moonshot_verdict_needs_every_condition():
    assert moonshot_verdict("matches", "beats", "beats", "inconclusive") == "holds"
    assert moonshot_verdict("beats", "matches", "matches", "beats") == "holds"
    assert moonshot_verdict("matches", "matches", "matches", "matches") == "fails"  # cannot beat β-DPO
    assert moonshot_verdict("worse", "beats", "beats", "beats") == "fails"
    assert moonshot_verdict("beats", "beats", "beats", "worse") == "fails"  # worse than β-DPO on the frontier
    assert moonshot_verdict("inconclusive", "beats", "beats", "beats") == "undecided"
    assert moonshot_verdict("matches", "matches", "inconclusive", "inconclusive") == "undecided"
    assert moonshot_verdict("matches", "–", "beats", "–") == "undecided"  # a missing test decides nothing


def simulate_verdicts(n, sd, margin, delta, paired=False, sims=200_000, seed=0):
    """Monte-Carlo frequency of *matches* and *beats* for two arms of n seeds (pooled-variance t) or n paired
    differences, a true difference ``delta``: the decision rule applied to each simulated experiment."""
    rng = np.random.default_rng(seed)
    if paired:
        d = rng.normal(delta, sd, (sims, n))
        diff, se, df = d.mean(1), d.std(1, ddof=1) / math.sqrt(n), n - 1
    else:
        a, b = rng.normal(delta, sd, (sims, n)), rng.normal(0.0, sd, (sims, n))
        diff, df = a.mean(1) - b.mean(1), 2 * n - 2
        se = np.sqrt((a.var(1, ddof=1) + b.var(1, ddof=1)) / 2 * 2 / n)
    tc = stats.t.ppf(0.975, df)
    significant = np.abs(diff) > tc * se
    matches = ~significant & (np.abs(diff) + tc * se <= margin)
    return matches.mean(), (significant & (diff > 0)).mean()


@pytest.mark.parametrize("n, sd, margin, delta, paired", [(3, 0.0175, 0.03, 0.0, False), (8, 0.0175, 0.03, 0.01, False),
                                                          (26, 0.0179, 0.01, 0.0, False), (5, 0.0149, 0.03, 0.0, True)])
def test_power_of_matches_is_the_probability_of_the_verdict(n, sd, margin, delta, paired):
    from lbdpo.eval.power import _two_sample, prob_matches

    simulated, _ = simulate_verdicts(n, sd, margin, delta, paired)
    assert prob_matches(margin, *_two_sample(sd, n, paired), delta=delta) == pytest.approx(simulated, abs=0.005)


def test_power_of_matches_from_welchs_own_verdicts_and_the_seeds_it_needs():
    sd, margin, n = 0.0175, 0.03, 10
    rng = np.random.default_rng(3)
    hits = sum(verdict(welch(rng.normal(0, sd, n), rng.normal(0, sd, n)), margin) == "matches" for _ in range(4000))
    assert matches_power(sd, n, margin) == pytest.approx(hits / 4000, abs=0.03)  # Welch's df: a little lower
    # the old note's n (expected CI half-width = margin) gets *matches* at a true 0 far less than 80 % of the time
    n_ci = next(k for k in range(2, 200) if ci_half_width(sd, k) <= margin)
    assert matches_power(sd, n_ci, margin) < 0.5
    need = seeds_for_matches(sd, margin)
    assert matches_power(sd, need, margin) >= 0.8 > matches_power(sd, need - 1, margin)
    assert seeds_for_matches(0.0179, 0.01) in range(60, 71)  # the frontier gap of experiment 1 by Welch: ≈ 65
    assert seeds_for_matches(1.0, 0.01, max_n=50) is None


def test_power_of_beats_is_the_noncentral_t_and_pooled_sd_is_the_textbook_one():
    sd, n = 0.02, 3
    delta = detectable_difference(sd, n)
    _, simulated = simulate_verdicts(n, sd, 0.03, delta)
    assert simulated == pytest.approx(0.8, abs=0.005) and prob_beats(delta, sd * math.sqrt(2 / n), 4) == \
        pytest.approx(0.8)
    assert detectable_difference(sd, 12) < delta / 2  # more seeds, smaller detectable differences
    a, b = [0.70, 0.72, 0.74], [0.60, 0.62, 0.64]  # sd 0.02 each: the half-width is welch()'s own
    assert ci_half_width(0.02, 3) == pytest.approx((welch(a, b)["high"] - welch(a, b)["low"]) / 2)
    groups = [[1.0, 2.0, 3.0], [5.0, 7.0], [9.0]]  # the lone value adds no degree of freedom
    assert pooled_sd(groups) == pytest.approx((math.sqrt((2.0 + 2.0) / 3), 3))
    assert pooled_sd([[1.0], [2.0]]) is None


def test_holm_against_a_hand_computed_example_and_in_the_verdict():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.02]) == [pytest.approx(0.5), None, pytest.approx(0.04)]  # None: not a test
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0]) and holm([0.02, 0.3]) == pytest.approx([0.04, 0.3])
    # "beats β-DPO" at p = 0.036 among the design's four tests fails Holm (report round 1)
    tests = with_holm([{"diff": 0.005, "low": -0.02, "high": 0.03, "p": 0.67},
                       {"diff": 0.012, "low": -0.01, "high": 0.04, "p": 0.31},
                       {"diff": 0.034, "low": 0.003, "high": 0.065, "p": 0.036}, None])
    assert tests[2]["p_holm"] == pytest.approx(0.108) and verdict(tests[2], 0.03) == "inconclusive"
    assert verdict({**tests[2], "p_holm": 0.036}, 0.03) == "beats" and tests[3] is None
    assert _fmt_test(tests[2], 0.03) == "+0.0340 [+0.0030, +0.0650] p=0.036 (Holm 0.11): inconclusive"


def test_experiment_comparison_names_orders_and_splits_by_domain(tmp_path):
    for name, mode, acc in (("fixed_b01", "fixed", 0.8), ("learn", "learnable", 0.7)):
        for seed in (0, 1):
            fake_run(tmp_path, f"{name}__seed-{seed}", name, seed, mode, acc + 0.01 * seed, 0.1, kl=5.0 + seed,
                     reward=0.9)
            path = tmp_path / f"{name}__seed-{seed}" / "eval.json"
            data = json.loads(path.read_text())
            data["preference"]["per_domain"] = {d: {"common_beta": {"rewards/accuracies": acc + 0.01 * seed + k}}
                                                for k, d in ((0.0, "en"), (0.1, "zh"))}
            data["generation"]["per_domain"] = {"en": {"kl": 4.0, "reward": {"policy_mean": 0.5}},
                                                "zh": {"kl": 8.0 + seed, "reward": {"policy_mean": 0.7}}}
            path.write_text(json.dumps(data))
    table, _ = write_comparison(tmp_path, tmp_path / "cmp", arm_order=["learn", "fixed_b01"])
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == ["learn", "fixed_b01"]  # named by folder, in the experiment's order
    md = (tmp_path / "cmp" / "compare.md").read_text()
    learn_row = next(line for line in md.split("## Per domain")[1].splitlines() if line.startswith("| learn"))
    assert "0.7050 ± 0.0050 | 0.5000 ± 0.0000 | 4.0000 ± 0.0000 | 0.8050 ± 0.0050 | 0.7000 ± 0.0000 | " \
           "8.5000 ± 0.5000" in learn_row
    assert "## Against the best fixed β and β-DPO" in md and "| learn | 2 | -0.1000" in md
    # seeds read from each run's config: acc learn − fixed is −0.1 at both seeds, a constant difference, no test
    assert "## The same, blocked by seed" in md and "| learn | 2 | – |" in md


def test_accuracy_per_domain_and_set_tested_against_best_fixed_and_beta_dpo(tmp_path):
    """Experiment-2-like runs (no generation): held-out pairs of two domains, an extra set of two test files. The
    per-domain and per-set tables show acc and the margin at the common β; every one of those accuracies is tested
    with the same Welch test as the main one, against the best fixed β chosen on the main accuracy."""
    accs = {}
    for name, mode, base in (("fixed_a", "fixed", 0.60), ("fixed_b", "fixed", 0.55), ("dpo", "beta_dpo", 0.50),
                             ("learn", "learnable", 0.58)):
        for seed in (0, 1, 2):
            run = f"{name}__seed-{seed}"
            fake_run(tmp_path, run, name, seed, mode, base + 0.01 * seed, 0.1, kl=1.0, reward=0.0)
            path = tmp_path / run / "eval.json"
            data = json.loads(path.read_text())
            del data["generation"]
            data["preference"]["per_domain"] = {
                d: {"common_beta": {"rewards/accuracies": base + k + 0.02 * seed * k,
                                    "rewards/margins": 0.1 * k + seed}} for k, d in ((0.1, "en"), (0.2, "zh"))}
            path.write_text(json.dumps(data))
            (tmp_path / run / "eval_test").mkdir()
            test = {"preference": {"common_beta": {"rewards/accuracies": base + 0.05, "rewards/margins": 1.0},
                                   "per_domain": {d: {"common_beta": {"rewards/accuracies": base - k + 0.03 * seed,
                                                                      "rewards/margins": k}}
                                                  for k, d in ((0.01, "online"), (0.02, "rejection"))}}}
            (tmp_path / run / "eval_test" / "eval.json").write_text(json.dumps(test))
            accs.setdefault(name, []).append(base - 0.02 + 0.03 * seed)  # its "test rejection" accuracy
    write_comparison(tmp_path, tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    per_domain = md.split("## Per domain")[1].split("##")[0]
    assert "| arm | en acc | en margin | zh acc | zh margin |" in per_domain  # no reward/KL columns: none recorded
    assert "| learn | 0.6820 ± 0.0016 | 1.0100 ± 0.8165 |" in per_domain  # en: 0.58 + 0.1 + 0.002 s; margin 0.01 + s
    other = md.split("## Other evaluation sets")[1].split("##")[0]
    assert "| arm | test acc | test margin | test online acc | test online margin | test rejection acc |" in other
    table = md.split("## Accuracy per domain and evaluation set")[1]
    assert "Best fixed β: **fixed_a**" in table
    assert "| test rejection | fixed_a | 3 | 0.6100 ± 0.0245 | – | – |" in table  # 0.58 + 0.03 s
    row = next(line for line in table.splitlines() if line.startswith("| test rejection | learn |"))
    for other in ("fixed_a", "dpo"):  # Welch's test, its p Holm-adjusted over the arm's 5 measures × 2 comparisons
        t = welch(accs["learn"], accs[other])
        assert f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={t['p']:.2g} (Holm " in row
    assert "p=0.031 (Holm 0.12): inconclusive" in row  # p < 0.05 alone, not after Holm
    measures = {line.split("|")[1].strip() for line in table.splitlines()
                if line.startswith("| ") and not line.startswith("| measure")}
    assert measures == {"held-out en", "held-out zh", "test", "test online", "test rejection"}


def test_verdict_follows_the_decision_rule():
    assert verdict({"diff": 0.05, "low": 0.01, "high": 0.09, "p": 0.01}, 0.03) == "beats"
    assert verdict({"diff": -0.05, "low": -0.09, "high": -0.01, "p": 0.01}, 0.03) == "worse"
    assert verdict({"diff": 0.005, "low": -0.02, "high": 0.03, "p": 0.6}, 0.03) == "matches"
    assert verdict({"diff": 0.005, "low": -0.05, "high": 0.06, "p": 0.8}, 0.03) == "inconclusive"
    assert verdict(None, 0.03) == "–"


def test_paired_is_the_textbook_paired_t_test_over_the_shared_seeds():
    a = {0: 0.80, 1: 0.75, 2: 0.79, 3: 0.70}
    b = {0: 0.78, 1: 0.74, 2: 0.75, 9: 0.10}  # seed 3 and 9 unpaired: left out
    d = [0.02, 0.01, 0.04]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    t = m / (sd / math.sqrt(3))
    out = paired(a, b)
    assert out["diff"] == pytest.approx(m) and out["n_a"] == 3
    assert out["p"] == pytest.approx(2 * stats.t.sf(abs(t), 2))
    assert out["p"] == pytest.approx(stats.ttest_rel([0.80, 0.75, 0.79], [0.78, 0.74, 0.75]).pvalue)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert (out["low"], out["high"]) == pytest.approx((m - half, m + half))
    assert half == pytest.approx(paired_ci_half_width(sd, 3))
    assert paired({0: 0.1, 1: 0.3})["diff"] == pytest.approx(0.2)  # one sample against 0
    assert paired({0: 0.8}, {0: 0.7}) is None and paired({0: 0.8, 1: 0.9}, {0: 0.7, 1: 0.8}) is None


def blocked_arms(offsets, lift):
    """Fixed arms at KL 5 / 20 / 60 and a learnable arm at KL 10, seed s shifting every reward and accuracy by
    offsets[s]; the learnable arm sits ``lift`` above its own seed's frontier and ``lift`` above the best fixed
    accuracy, and β-DPO on the frontier at the best fixed accuracy."""
    def runs(acc, reward, kl, extra=0.0):
        return [{"values": {"held-out acc": acc + o + extra, "reward": reward + o + extra, "KL": kl}, "seed": s,
                 "mode": None} for s, o in enumerate(offsets)]
    fixed = [{"arm": f"fixed_{kl}", "kind": "fixed", "runs": runs(acc, r, kl)}
             for kl, r, acc in ((5.0, 0.80, 0.78), (20.0, 0.90, 0.80), (60.0, 0.95, 0.76))]
    on_frontier = frontier_at(fit_frontier([(5.0, 0.80), (20.0, 0.90), (60.0, 0.95)]), 10.0)  # the fit at KL 10
    learn = {"arm": "learn", "kind": "learnable", "runs": runs(0.80, on_frontier, 10.0, lift)}
    dpo = {"arm": "beta_dpo", "kind": "learnable", "runs": runs(0.80, 0.90, 20.0)}
    for r in dpo["runs"]:
        r["mode"] = "beta_dpo"
    for a in (*fixed, learn, dpo):
        a["n_seeds"] = len(a["runs"])
    return fixed, learn, dpo


def test_seed_gaps_use_the_frontier_of_the_same_seed():
    fixed, learn, _ = blocked_arms(offsets=(0.0, 0.1, -0.1), lift=0.02)
    assert seed_gaps(learn, fixed) == pytest.approx({0: 0.02, 1: 0.02, 2: 0.02})
    assert seed_gaps(fixed[1], fixed) == pytest.approx({0: 0.0, 1: 0.0, 2: 0.0})  # a fixed run is on its frontier
    learn["runs"][2]["seed"] = 7  # no fixed run of seed 7: no frontier, no gap
    assert set(seed_gaps(learn, fixed)) == {0, 1}


def test_blocking_by_seed_resolves_what_a_large_seed_effect_hides_from_welch():
    # seed effects of ±0.05 on every arm alike, the learnable arm 0.015 above the frontier of its own seed (give or
    # take 0.002) and as accurate as the best fixed β
    fixed, learn, dpo = blocked_arms(offsets=(0.0, 0.05, -0.05, 0.03), lift=0.0)
    for r, e in zip(learn["runs"], (0.013, 0.017, 0.015, 0.015)):
        r["values"]["reward"] += e
        r["values"]["held-out acc"] += e - 0.015
    arms = [*fixed, learn, dpo]
    welch_row = next(line for line in moonshot_table(arms).splitlines() if line.startswith("| learn"))
    blocked = blocked_table(arms)
    blocked_row = next(line for line in blocked.splitlines() if line.startswith("| learn"))
    welch_cells = [c.strip() for c in welch_row.strip("|").split("|")]
    cells = [c.strip() for c in blocked_row.strip("|").split("|")]
    assert welch_cells[5].endswith(": inconclusive") and welch_cells[7] == "undecided"  # the seed effect swamps it
    assert cells[1] == "4" and cells[4].startswith("+0.0150 ± 0.0014 (n=4)")
    assert cells[5].endswith(": beats") and cells[2].endswith(": matches") and cells[6].endswith(": beats")
    assert cells[7] == "holds"
    for r in learn["runs"]:  # an arm evaluated without generation (experiment 2) has no gap, and says why
        r["values"]["KL"] = None
    assert "| learn | 4 | " in blocked_table(arms) and "no reward/KL (no generation)" in blocked_table(arms)
    assert "no reward/KL (no generation)" in moonshot_table(arms)
    assert "Power (blocked) — accuracy − best fixed: sd of the per-seed differences" in blocked
    for a in arms:  # runs without a seed: nothing to pair
        for r in a["runs"]:
            r["seed"] = None
    assert blocked_table(arms) == ""


def test_pair_bootstrap_aligns_pairs_by_identity_not_position():
    """Three seeds hold out the same 200 pairs, each in its own order. Arm a ranks every pair right; arm b misses
    the same 50 pairs in every seed (a pair effect, not noise). By identity a pair's difference is 0 or 1, and the
    interval is a proportion's; by position each entry mixes three different pairs, and the interval comes out
    √3 times too narrow."""
    n, k, seeds = 200, 50, 3
    keys = [f"pair{i}" for i in range(n)]
    orders = [np.random.default_rng(s).permutation(n) for s in range(seeds)]
    a = [{keys[i]: True for i in order} for order in orders]
    b = [{keys[i]: i >= k for i in order} for order in orders]
    t = pair_bootstrap(a, b, reps=4000)
    p = k / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation of a proportion's interval
    assert t["diff"] == pytest.approx(p) and t["pairs"] == n
    assert (t["high"] - t["low"]) / 2 == pytest.approx(half, rel=0.1)
    # the same files aligned by row position (what the bootstrap did before): too narrow by about √3
    by_row = lambda runs, orders: [{pos: run[keys[i]] for pos, i in enumerate(order)} for run, order in zip(runs, orders)]
    positional = pair_bootstrap(by_row(a, orders), by_row(b, orders), reps=4000)
    assert positional["diff"] == pytest.approx(p)
    width, width_positional = t["high"] - t["low"], positional["high"] - positional["low"]
    assert width / width_positional == pytest.approx(math.sqrt(3), rel=0.15)
    same = [{"x": True, "y": False}] * 2
    assert pair_bootstrap(same, same) == {"diff": 0.0, "low": 0.0, "high": 0.0, "pairs": 2}
    assert pair_bootstrap([], b) is None


def test_pair_bootstrap_keeps_seeds_as_seeds_when_each_seed_holds_out_other_pairs():
    # seed 0 holds out p0..p3, seed 1 p2..p5: each run's accuracy is over its own pairs, the arm's the mean of its
    # seeds; a resample draws pair identities, and p2 drawn twice counts twice in both seeds
    a = [{"p0": True, "p1": True, "p2": True, "p3": False}, {"p2": True, "p3": True, "p4": True, "p5": False}]
    b = [{"p0": False, "p1": True, "p2": True, "p3": False}, {"p2": False, "p3": True, "p4": True, "p5": False}]
    t = pair_bootstrap(a, b, reps=500)
    assert t["diff"] == pytest.approx(((0.75 - 0.5) + (0.75 - 0.5)) / 2) and t["pairs"] == 6
    assert t["low"] <= t["diff"] <= t["high"]


def test_pair_keys_are_reconstructed_from_the_runs_config_and_seed(tmp_path):
    """eval_pairs.jsonl without keys: each seed's held-out order is rebuilt from the run's data config and seed (as
    evaluate.py loads it) and checked against the file's domains; the same pair gets the same key in every seed."""
    from lbdpo.data.loading import load_mixture

    data_file = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "domain": "ab"[i % 2]}
            for i in range(40)]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"seed": 0, "data": {"train": None, "eval": [{"path": str(data_file)}]}}
    found = {}
    for seed in (0, 1):
        held, _ = load_mixture([{"path": str(data_file)}], seed=seed)  # the order evaluate.py scores them in
        run = tmp_path / f"run{seed}"
        run.mkdir()
        (run / "eval.json").write_text("{}")
        (run / "eval_pairs.jsonl").write_text("".join(
            json.dumps({"domain": d, "correct": int(p[1:]) % 3 == 0}) + "\n"
            for p, d in zip(list(held["prompt"])[:30], list(held["domain"])[:30])))  # max_pairs 30: the first 30
        found[seed] = read_held_out(run / "eval.json", {**config, "seed": seed}, {})
        assert list(found[seed]) != [pair_key(r["prompt"], r["chosen"], r["rejected"]) for r in rows[:30]]
    for seed, correct in found.items():  # every key is its pair's: ranked right exactly where the content says so
        truth = {pair_key(r["prompt"], r["chosen"], r["rejected"]): int(r["prompt"][1:]) % 3 == 0 for r in rows}
        assert len(correct) == 30 and all(truth[k] == v for k, v in correct.items())
    assert set(found[0]) != set(found[1])  # different seeds, different first-30 pairs, aligned by key all the same
    run = tmp_path / "run0"
    lines = run.joinpath("eval_pairs.jsonl").read_text().splitlines()
    run.joinpath("eval_pairs.jsonl").write_text("\n".join(lines[1:] + lines[:1]))  # rows out of order: domains differ
    assert read_held_out(run / "eval.json", config, {}) is None
    skipped = {"data": {"filters": {"eval_tokenizer_skips": {"too_long": 1}}}}  # a pair the tokenizer dropped
    assert read_held_out(tmp_path / "run1" / "eval.json", {**config, "seed": 1}, skipped) is None
    keyed = tmp_path / "keyed"
    keyed.mkdir()
    keyed.joinpath("eval_pairs.jsonl").write_text('{"key": "k1", "correct": true}\n{"key": "k2", "correct": false}\n')
    assert read_held_out(keyed / "eval.json", {}, {}) == {"k1": True, "k2": False}  # a file's own keys come first


def test_pair_sampling_note_reads_each_runs_per_pair_file(tmp_path):
    for name, mode, right in (("fixed_b01", "fixed", 6), ("learn", "learnable", 8)):
        for seed in (0, 1):
            fake_run(tmp_path, f"{name}__seed-{seed}", name, seed, mode, right / 8, 0.1, kl=5.0, reward=0.9)
            with open(tmp_path / f"{name}__seed-{seed}" / "eval_pairs.jsonl", "w") as f:
                for i in range(8):
                    f.write(json.dumps({"key": f"k{(i + seed) % 8}", "domain": "x", "margin": 1.0,
                                        "correct": (i + seed) % 8 < right}) + "\n")
    write_comparison(tmp_path, tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Held-out pairs as a sample" in md and "learn − fixed_b01 +0.2500 [" in md


def test_comparison_draws_the_concave_frontier_fit(tmp_path):
    for name, beta, kl, reward in (("fixed_b1", 1.0, 5.0, 0.80), ("fixed_b03", 0.3, 10.0, 0.89),
                                   ("fixed_b01", 0.1, 22.0, 0.96), ("learn", None, 11.0, 0.91)):
        for seed in (0, 1, 2):
            fake_run(tmp_path, f"{name}__seed-{seed}", name, seed, "learnable" if beta is None else "fixed", 0.75,
                     0.1, kl=kl * (1 + 0.02 * seed), reward=reward + 0.003 * seed)
    _, outputs = write_comparison(tmp_path, tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert outputs["frontier_fit.png"].is_file() and "![the concave fit](frontier_fit.png)" in md
    assert "| learn | 3 |" in md and "Frontier — the least-squares concave" in md
