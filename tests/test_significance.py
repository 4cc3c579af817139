"""lbdpo.eval.significance: Welch tests against their formula, the fixed-β frontier interpolation, the moonshot table
on synthetic arms whose answer is known, and the experiment-style comparison (arm names, order, per-domain table)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from lbdpo.eval.compare import write_comparison
from lbdpo.eval.significance import (_fmt_test, blocked_table, ci_half_width, detectable_difference, frontier_reward,
                                     moonshot_table, moonshot_verdict, pair_bootstrap, paired, paired_ci_half_width,
                                     pooled_sd, run_gaps, seed_gaps, verdict, welch)
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


def test_frontier_is_linear_in_log_kl_and_never_extrapolates():
    points = [(10.0, 0.9), (1.0, 0.5), (100.0, 1.0)]  # any order
    assert frontier_reward(points, math.sqrt(10)) == pytest.approx(0.7)  # half way in log KL
    assert frontier_reward(points, 10.0) == pytest.approx(0.9)
    assert frontier_reward(points, 10 ** 1.5) == pytest.approx(0.95)
    assert frontier_reward(points, 0.5) is None and frontier_reward(points, 200.0) is None
    assert frontier_reward(points[:1], 1.0) is None
    runs = [{"values": {"reward": 0.8, "KL": math.sqrt(10)}}, {"values": {"reward": 0.8, "KL": 500.0}}]
    assert run_gaps(runs, points) == pytest.approx([0.1])  # the second run is outside the range


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
    assert "Best fixed β by held-out accuracy: **fixed_20.0**" in table
    row = next(line for line in table.splitlines() if line.startswith("| learn_above"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("-0.1000")  # accuracy 0.10 below the best fixed β ...
    assert cells[3].startswith("-0.0900")  # ... and 0.09 below β-DPO
    gap = 0.95 - (0.80 + 0.10 * math.log(2) / math.log(4))  # frontier at KL 10, between (5, .80) and (20, .90)
    assert cells[4].startswith(f"+{gap:.4f}")
    assert float(cells[5].split("p=")[1].split(":")[0]) < 0.01  # far above the fixed seeds' scatter
    assert cells[2].endswith(": worse") and cells[5].endswith(": beats")
    # β-DPO's seeds sit on the frontier point (20, 0.90): their gaps are the jitter, mean 0
    assert cells[6].startswith(f"+{gap:.4f}") and cells[6].endswith(": beats")
    assert cells[7] == "fails"  # above the frontier, but worse than the best fixed β on accuracy
    dpo_row = [c.strip() for c in next(line for line in table.splitlines()
                                       if line.startswith("| beta_dpo")).strip("|").split("|")]
    assert dpo_row[3] == dpo_row[6] == dpo_row[7] == "–"  # β-DPO is not compared with itself
    assert "Power — held-out accuracy: seed-to-seed sd 0.0040" in table  # every arm's seeds spread by ±0.004


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


def test_detectable_difference_has_the_power_it_claims_and_pooled_sd_is_the_textbook_one():
    sd, n = 0.02, 3
    delta = detectable_difference(sd, n)
    df = 2 * n - 2
    nc = delta / (sd * math.sqrt(2 / n))  # noncentrality of the two-sample t statistic at that difference
    crit = stats.t.ppf(0.975, df)
    power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    assert power == pytest.approx(0.8, abs=0.03)  # the usual t-quantile approximation of the exact power
    assert detectable_difference(sd, 12) < delta / 2  # more seeds, smaller detectable differences
    a, b = [0.70, 0.72, 0.74], [0.60, 0.62, 0.64]  # sd 0.02 each: the half-width is welch()'s own
    assert ci_half_width(0.02, 3) == pytest.approx((welch(a, b)["high"] - welch(a, b)["low"]) / 2)
    groups = [[1.0, 2.0, 3.0], [5.0, 7.0], [9.0]]  # the lone value adds no degree of freedom
    assert pooled_sd(groups) == pytest.approx((math.sqrt((2.0 + 2.0) / 3), 3))
    assert pooled_sd([[1.0], [2.0]]) is None


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
    assert _fmt_test(welch(accs["learn"], accs["fixed_a"]), 0.03) in row
    assert _fmt_test(welch(accs["learn"], accs["dpo"]), 0.03) in row
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
    on_frontier = 0.80 + 0.10 * math.log(2) / math.log(4)  # at KL 10, between (5, .80) and (20, .90)
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


def test_pair_bootstrap_resamples_the_pairs_both_arms_share():
    same = [[True, False, True, True]] * 2
    assert pair_bootstrap(same, same) == {"diff": 0.0, "low": 0.0, "high": 0.0, "pairs": 4}
    n, k = 400, 100  # a ranks 100 more of 400 pairs right than b, in both of its runs
    a = [[True] * n] * 2
    b = [[i >= k for i in range(n)], [i >= k for i in range(n)]]
    t = pair_bootstrap(a, b, reps=4000)
    p = k / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation of a proportion's interval
    assert t["diff"] == pytest.approx(p) and t["low"] < p < t["high"]
    assert (t["high"] - t["low"]) / 2 == pytest.approx(half, rel=0.1)
    # seeds are averaged first: b's two runs disagreeing on a pair make it half right there
    half_right = pair_bootstrap([[True, True]], [[True, False], [False, True]])
    assert half_right["diff"] == pytest.approx(0.5)
    assert pair_bootstrap(a, [[True] * 3]) is None and pair_bootstrap([], b) is None  # other pairs, no run


def test_pair_sampling_note_reads_each_runs_per_pair_file(tmp_path):
    for name, mode, right in (("fixed_b01", "fixed", 6), ("learn", "learnable", 8)):
        for seed in (0, 1):
            fake_run(tmp_path, f"{name}__seed-{seed}", name, seed, mode, right / 8, 0.1, kl=5.0, reward=0.9)
            with open(tmp_path / f"{name}__seed-{seed}" / "eval_pairs.jsonl", "w") as f:
                for i in range(8):
                    f.write(json.dumps({"domain": "x", "margin": 1.0, "correct": i < right}) + "\n")
    write_comparison(tmp_path, tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Held-out pairs as a sample" in md and "learn − fixed_b01 +0.2500 [" in md
