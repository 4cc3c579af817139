"""The out-of-sample (leave-one-seed-out) oracle of an arm family (lbdpo.eval.oracle): the choice, its unbiasedness
where the in-sample maximum is biased, the compare.md section, and the experiment key that declares it."""

import math

import numpy as np
import pytest

from lbdpo.errors import LbdpoError
from lbdpo.eval.oracle import leave_one_seed_out, oracle_runs, oracle_section


def test_each_seed_gets_the_arm_best_on_the_other_seeds():
    scores = {"A": {0: 1.0, 1: 0.0, 2: 0.0}, "B": {0: 0.5, 1: 0.5, 2: 0.5}, "C": {0: 0.0, 1: 0.9, 2: 0.2}}
    # s0: means over {1, 2}: A 0.0, B 0.5, C 0.55 → C; s1: over {0, 2}: A 0.5, B 0.5, C 0.1 → A (first of a tie);
    # s2: over {0, 1}: A 0.5, B 0.5, C 0.45 → A
    assert leave_one_seed_out(scores) == {0: "C", 1: "A", 2: "A"}
    assert leave_one_seed_out({"A": {0: 1.0}, "B": {0: 2.0}}) == {}  # one seed: nothing to choose on
    assert leave_one_seed_out({"A": {0: 1.0, 1: 0.0}, "B": {1: 2.0, 2: 0.0}}) == {}  # one shared seed


def test_the_out_of_sample_choice_is_unbiased_where_the_in_sample_maximum_is_not():
    """Four arms with the same true score (0) and seed noise: the best arm scored on the seeds it was chosen on is
    biased upward; the leave-one-seed-out choice scored on its held-out seed is not."""
    rng = np.random.default_rng(0)
    arms, seeds, sims = 4, 5, 4000
    in_sample, out_of_sample = [], []
    for _ in range(sims):
        x = rng.normal(0.0, 1.0, size=(arms, seeds))
        scores = {f"a{i}": {s: float(x[i, s]) for s in range(seeds)} for i in range(arms)}
        in_sample.append(x.mean(1).max())
        chosen = leave_one_seed_out(scores)
        out_of_sample.append(np.mean([scores[a][s] for s, a in chosen.items()]))
    se = np.std(out_of_sample) / math.sqrt(sims)
    assert abs(np.mean(out_of_sample)) < 3 * se  # unbiased
    assert np.mean(in_sample) > 0.4  # E max of 4 normals with sd 1/√5 ≈ 1.03/√5 ≈ 0.46


def runs_of(name, kind, per_seed, mode=None, beta=None):
    """An arm as lbdpo.eval.compare.group_arms gives it: ``per_seed`` = [(acc, reward, kl)] for seeds 0, 1, …"""
    runs = [{"values": {"held-out acc": a, "reward": r, "KL": k}, "seed": s, "mode": mode or kind}
            for s, (a, r, k) in enumerate(per_seed)]
    return {"arm": name, "kind": kind, "beta": beta, "n_seeds": len(runs), "runs": runs}


def frontier(kl):
    return 0.2 * math.log(kl)  # the fixed runs lie on it


def noisy_experiment(lift: float, seeds: int = 5, seed: int = 0):
    """Fixed arms on the frontier (accuracy 0.70); two per-domain arms, one ``lift`` above the frontier and in
    accuracy, one below, both inside the fixed arms' KL range; seed noise 0.002."""
    rng = np.random.default_rng(seed)
    noise = lambda: rng.normal(0, 0.002)  # noqa: E731
    fixed = [runs_of(f"fixed_{kl}", "fixed", [(0.70 + noise(), frontier(kl * (1 + 0.01 * s)) + noise(),
                                                kl * (1 + 0.01 * s)) for s in range(seeds)], beta=1 / kl)
             for kl in (2.0, 4.0, 8.0, 16.0)]
    good = runs_of("good", "learnable", [(0.70 + lift + noise(), frontier(6.0) + lift + noise(), 6.0)
                                         for _ in range(seeds)], mode="per_domain")
    bad = runs_of("bad", "learnable", [(0.70 - lift + noise(), frontier(6.0) - lift + noise(), 6.0)
                                       for _ in range(seeds)], mode="per_domain")
    return fixed, good, bad


def test_the_section_finds_the_headroom_that_one_arm_of_the_family_has():
    fixed, good, bad = noisy_experiment(lift=0.02)
    runs, chosen = oracle_runs([good, bad, fixed[1]], lambda r: r["values"]["held-out acc"])
    assert set(chosen.values()) == {"good"} and [r["seed"] for r in runs] == [0, 1, 2, 3, 4]
    text = oracle_section([*fixed, good, bad], ["bad", "good"])
    acc_row = next(line for line in text.splitlines() if line.startswith("| held-out acc"))
    gap_row = next(line for line in text.splitlines() if line.startswith("| frontier gap"))
    assert "s0: good" in acc_row and "s0: good" in gap_row
    acc_diff = float(acc_row.split("|")[5].split()[0])
    gap_diff = float(gap_row.split("|")[5].split()[0])
    assert acc_diff == pytest.approx(0.02, abs=0.004) and gap_diff == pytest.approx(0.02, abs=0.004)
    assert "p=0.000" in acc_row  # 0.02 against noise 0.002 over 5 seeds


def test_without_headroom_the_section_shows_none():
    fixed, good, bad = noisy_experiment(lift=0.0, seed=1)
    text = oracle_section([*fixed, good, bad], ["good", "bad"])
    for row in (r for r in text.splitlines() if r.startswith(("| held-out acc", "| frontier gap"))):
        low, high = (float(v) for v in row.split("[")[1].split("]")[0].split(","))
        assert low < 0 < high, row  # the intervals cover 0


def test_a_family_with_an_unfinished_arm_waits_and_no_fixed_arm_is_an_error():
    fixed, good, bad = noisy_experiment(lift=0.01)
    assert "waiting for later" in oracle_section([*fixed, good], ["good", "later"])
    with pytest.raises(LbdpoError, match="no fixed-β arm"):
        oracle_section([good, bad], ["good", "bad"])


def test_the_experiment_file_declares_the_family(tmp_path):
    from lbdpo.experiment import Experiment

    path = tmp_path / "exp.yaml"  # outside a checkout: the runs would use the one the tests run from
    path.write_text("name: e\narms: {a: [], b: [], c: []}\noracle: [a, b]\n")
    assert Experiment.load(path).oracle == ["a", "b"]
    path.write_text("name: e\narms: {a: [], b: []}\noracle: [a, z]\n")
    with pytest.raises(LbdpoError, match="oracle"):
        Experiment.load(path)
