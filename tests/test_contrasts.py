"""Named contrasts (eval/contrasts.py): two arms compared seed by seed, against scipy's paired t-test and Holm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from scipy import stats

from lbdpo.errors import LbdpoError
from lbdpo.eval.contrasts import contrast, contrasts_section, design_sections
from lbdpo.eval.frontier import fit_frontier, frontier_at
from lbdpo.experiment import Experiment

SEEDS = range(5)


def arm(name, kind, by_seed):
    """An arm of compare.group_arms' shape: one run per seed with its values."""
    return {"arm": name, "kind": kind, "n_seeds": len(by_seed), "beta": None,
            "runs": [{"seed": s, "values": v, "mode": kind} for s, v in by_seed.items()]}


def fixed_arms():
    """Three fixed arms per seed on reward = 0.7 + 0.1·log10(KL) (concave enough in log KL: a straight line), each
    seed shifted by its own offset so that seeds are blocks."""
    out = []
    for kl in (2.0, 10.0, 50.0):
        out.append(arm(f"fixed_{kl}", "fixed", {s: {"held-out acc": 0.75, "reward": 0.7 + 0.1 * math.log10(kl) + 0.01 * s,
                                                     "KL": kl} for s in SEEDS}))
    return out


def test_contrast_is_scipys_paired_t_with_holm_over_accuracy_and_gap():
    rng = np.random.default_rng(0)
    acc_a, acc_b = 0.78 + 0.02 * rng.standard_normal(5), 0.75 + 0.02 * rng.standard_normal(5)
    rew_a, rew_b = 0.82 + 0.004 * rng.standard_normal(5), 0.80 + 0.004 * rng.standard_normal(5)
    a = arm("learn", "learnable", {s: {"held-out acc": acc_a[s], "reward": rew_a[s] + 0.01 * s, "KL": 5.0}
                                   for s in SEEDS})
    b = arm("schedule", "rule", {s: {"held-out acc": acc_b[s], "reward": rew_b[s] + 0.01 * s, "KL": 8.0}
                                 for s in SEEDS})
    fixed = fixed_arms()
    c = contrast(a, b, fixed)
    ref = stats.ttest_rel(acc_a, acc_b)
    assert c["seeds"] == list(SEEDS)
    assert c["acc"]["diff"] == pytest.approx(float(np.mean(acc_a - acc_b)))
    assert c["acc"]["p"] == pytest.approx(ref.pvalue)
    assert (c["acc"]["low"], c["acc"]["high"]) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    # the gap of each seed against that seed's own fixed runs: the seed offsets cancel
    gap = [rew_a[s] + 0.01 * s - (0.7 + 0.1 * math.log10(5.0) + 0.01 * s)
           - (rew_b[s] + 0.01 * s - (0.7 + 0.1 * math.log10(8.0) + 0.01 * s)) for s in SEEDS]
    fit0 = fit_frontier([(r["values"]["KL"], r["values"]["reward"]) for f in fixed for r in f["runs"] if r["seed"] == 0])
    assert frontier_at(fit0, 5.0) == pytest.approx(0.7 + 0.1 * math.log10(5.0), abs=1e-9)
    ref_gap = stats.ttest_rel(gap, [0.0] * 5)
    assert c["gap"]["diff"] == pytest.approx(float(np.mean(gap)), abs=1e-9)
    assert c["gap"]["p"] == pytest.approx(ref_gap.pvalue, rel=1e-6)
    lo, hi = sorted([c["acc"]["p"], c["gap"]["p"]])  # Holm over the family of two
    holm = {lo: min(1.0, 2 * lo), hi: max(min(1.0, 2 * lo), hi)}
    assert c["acc"]["p_holm"] == pytest.approx(holm[c["acc"]["p"]])
    assert c["gap"]["p_holm"] == pytest.approx(holm[c["gap"]["p"]])
    assert c["kl"] is None  # constant difference (5 − 8 every seed): nothing to test
    assert c["reward"]["diff"] == pytest.approx(float(np.mean(rew_a - rew_b)))


def test_section_rows_verdicts_and_waiting_contrasts():
    fixed = fixed_arms()
    same = {s: {"held-out acc": 0.75 + 0.001 * (-1) ** s, "reward": 0.7 + 0.1 * math.log10(5.0) + 0.01 * s
                + 0.0005 * (-1) ** s, "KL": 5.0} for s in SEEDS}
    twin = {s: {"held-out acc": 0.75 - 0.001 * (-1) ** s, "reward": 0.7 + 0.1 * math.log10(5.0) + 0.01 * s
                - 0.0005 * (-1) ** s, "KL": 5.0} for s in SEEDS}
    arms = [*fixed, arm("learn", "learnable", same), arm("schedule", "rule", twin)]
    md = contrasts_section(arms, [["learn", "schedule"], ["learn", "missing"]])
    row = next(line for line in md.splitlines() if line.startswith("| learn − schedule"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "5" and cells[2].endswith(": matches") and cells[3].endswith(": matches")
    assert float(cells[6].split()[0]) == pytest.approx(0.95, abs=0.005)  # ±0.002 apart: the CI is always inside
    # ±0.03, so P(matches) is P(p ≥ 0.05) = 0.95 at a true difference of 0
    assert "Waiting for runs of both arms: learn − missing." in md
    assert design_sections(arms) == []
    sections = design_sections(arms, contrasts=[["learn", "schedule"]])
    assert sections[0] == "## Named contrasts, paired by seed"


def test_experiment_file_contrasts_are_checked(tmp_path):
    path = tmp_path / "x.yaml"  # outside a checkout: the runs would use the one the tests run from
    spec = {"name": "x", "arms": {"a": ["beta_head=fixed"], "b": ["beta_head=linear"]}}
    for bad in ([["a"]], [["a", "a"]], [["a", "c"]], {"a": "b"}):
        path.write_text(yaml.safe_dump({**spec, "contrasts": bad}))
        with pytest.raises(LbdpoError, match="contrasts"):
            Experiment.load(path)
    path.write_text(yaml.safe_dump({**spec, "contrasts": [["b", "a"]]}))
    assert Experiment.load(path).contrasts == [["b", "a"]]
    path.write_text(yaml.safe_dump(spec))
    assert Experiment.load(path).contrasts is None
