"""lbdpo.eval.headroom: the split-choose-score oracle on synthetic data with known answers, alignment by pair
identity, the frontier oracle, the command's outputs, and the key rebuild on a committed experiment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lbdpo.errors import LbdpoError
from lbdpo.eval import headroom

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_accuracy(p_correct: dict[str, list[float]], n_keys: int = 120, n_seeds: int = 3, seed: int = 0) -> dict:
    """accuracy_data-shaped arrays: domain → each arm's probability of ranking a pair right (independent draws)."""
    rng = np.random.default_rng(seed)
    domains = sorted(p_correct)
    dom = np.repeat(np.arange(len(domains)), n_keys)
    probs = np.array([p_correct[d] for d in domains]).T[:, dom]  # (arm, key)
    correct = (rng.random((probs.shape[0], n_seeds, len(dom))) < probs[:, None, :]).astype(float)
    return {"correct": correct, "mask": np.ones((n_seeds, len(dom))), "dom": dom, "domains": domains,
            "seeds": list(range(n_seeds)), "keys": [f"k{i}" for i in range(len(dom))]}


def test_domains_with_different_best_beta_gain():
    # arm 0 is right on "a", arm 1 on "b": the oracle gets 0.9 everywhere, a single β 0.75 → +0.15
    data = synthetic_accuracy({"a": [0.9, 0.6], "b": [0.6, 0.9]})
    out = headroom.accuracy_headroom(data, n_splits=200, n_boot=200, boot_splits=5)
    assert out["gain"][-1] == pytest.approx(0.15, abs=0.03)
    assert out["ci"][-1, 0] > 0.05
    assert out["choice_share"][0, 0] > 0.99 and out["choice_share"][1, 1] > 0.99


@pytest.mark.parametrize("probs", [[0.8, 0.65], [0.7, 0.7]], ids=["one-beta-best-everywhere", "no-difference"])
def test_identical_domains_gain_zero(probs):
    data = synthetic_accuracy({"a": probs, "b": probs}, n_keys=300, seed=1)
    out = headroom.accuracy_headroom(data, n_splits=200, n_boot=300, boot_splits=5)
    assert abs(out["gain"][-1]) < 0.03  # the sampling noise of this data set: sd ≈ 0.02
    assert out["ci"][-1, 0] <= 0 <= out["ci"][-1, 1]
    if probs[0] > probs[1]:  # a strictly better arm is chosen everywhere: no deviation, gain exactly 0
        assert out["gain"][-1] == pytest.approx(0, abs=1e-3)


def test_tie_keeps_the_single_beta():
    # both arms right on every pair: every choice is a tie, the per-domain choice keeps the single β → gain 0
    data = synthetic_accuracy({"a": [1.0, 1.0], "b": [1.0, 1.0]})
    out = headroom.accuracy_headroom(data, n_splits=50, n_boot=20, boot_splits=2)
    assert out["gain"][-1] == 0 and (out["ci"] == 0).all()


def test_make_splits_halves_each_domain():
    dom = np.array([0] * 7 + [1] * 10)
    halves = headroom.make_splits(dom, 30, np.random.default_rng(0))
    assert (halves[:, :7].sum(1) == 3).all() and (halves[:, 7:].sum(1) == 5).all()
    assert len({tuple(h) for h in halves}) > 20


# ---------------------------------------------------------------- experiment folders

def write_run(exp: Path, arm: str, beta: float, seed: int, pairs: list[dict], samples: list[dict] | None = None):
    run = exp / f"{arm}__seed-{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "beta_head": {"mode": "fixed",
                                                                                             "beta": beta}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["beta_head=fixed", f"beta_head.beta={beta}",
                                                                   f"seed={seed}"]))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    (run / "eval.json").write_text(json.dumps({"preference": {}}))
    (run / "eval_pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    if samples is not None:
        (run / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def fake_experiment(exp: Path, shuffle: bool, with_samples: bool = False) -> Path:
    """Two fixed arms × 3 seeds over the same 80 pairs, two domains (one named in Chinese); each pair has a
    difficulty shared by every seed and arm, so aligning by position instead of identity changes the answer."""
    rng = np.random.default_rng(0)
    domains = ["en", "中文"]
    easy = rng.random(80) < 0.6
    for seed in range(3):
        for arm, beta, bias in (("fixed_b01", 0.1, 0.0), ("fixed_b03", 0.3, 0.15)):
            p = np.where(easy, 0.9, 0.3) + np.where(np.arange(80) % 2 == 1, bias, -bias)
            pairs = [{"key": f"pair{k}", "domain": domains[k % 2], "margin": 1.0, "correct": bool(rng.random() < p[k])}
                     for k in range(80)]
            if shuffle:
                pairs = [pairs[i] for i in np.random.default_rng(100 + seed).permutation(80)]
            samples = [{"prompt": f"prompt {k}", "domain": domains[k % 2], "kl": 20.0 / beta ** 0.5 + rng.random(),
                        "reward_policy_sample": 0.5 + beta + 0.01 * rng.random()} for k in range(8)]
            write_run(exp, arm, beta, seed, pairs, samples if with_samples else None)
    return exp


def test_alignment_is_by_pair_identity(tmp_path):
    results = []
    for shuffle in (False, True):
        arms = headroom.fixed_arms(fake_experiment(tmp_path / f"shuffled_{shuffle}", shuffle))
        data = headroom.accuracy_data(arms)
        results.append((data, headroom.accuracy_headroom(data, n_splits=100, n_boot=50, boot_splits=5)))
    (plain, plain_out), (shuffled, shuffled_out) = results
    assert plain["keys"] == shuffled["keys"]
    np.testing.assert_array_equal(plain["correct"], shuffled["correct"])
    for name in ("gain", "ci", "split_range", "choice_share"):
        np.testing.assert_array_equal(plain_out[name], shuffled_out[name])


def test_arms_of_one_seed_must_hold_out_the_same_pairs(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp, "fixed_b01", 0.1, 0, [{"key": "a", "domain": "x", "correct": True}])
    write_run(exp, "fixed_b03", 0.3, 0, [{"key": "b", "domain": "x", "correct": True}])
    with pytest.raises(LbdpoError, match="seed 0 hold out different pairs"):
        headroom.accuracy_data(headroom.fixed_arms(exp))


# ---------------------------------------------------------------- frontier

def test_upper_frontier_is_concave_and_non_decreasing():
    kl, reward = np.array([1.0, 10.0, 100.0, 30.0]), np.array([0.2, 0.5, 0.55, 0.3])
    at = np.array([0.5, 1.0, np.sqrt(10), 10.0, 30.0, 100.0, 1000.0])
    np.testing.assert_allclose(headroom.upper_frontier(kl, reward, at), [0.2, 0.2, 0.35, 0.5, 0.5 + 0.05 * np.log(3)
                                                                         / np.log(10), 0.55, 0.55])
    np.testing.assert_allclose(headroom.upper_frontier(np.array([1.0, 10.0]), np.array([0.5, 0.4]),
                                                       np.array([1.0, 5.0, 10.0])), [0.5, 0.5, 0.5])


def synthetic_frontier(curves: dict[str, tuple[list[float], list[float]]], n_seeds: int = 5, n_prompts: int = 10):
    """frontier_data-shaped: domain → (KL per arm, reward per arm), small per-prompt noise."""
    rng = np.random.default_rng(0)
    domains = sorted(curves)
    dom = np.repeat(np.arange(len(domains)), n_prompts)
    kl = np.array([curves[d][0] for d in domains]).T[:, dom]
    reward = np.array([curves[d][1] for d in domains]).T[:, dom]
    per_seed = [(dom, kl * (1 + 0.01 * rng.standard_normal(kl.shape)), reward + 0.002 * rng.standard_normal(kl.shape))
                for _ in range(n_seeds)]
    return {"seeds": list(range(n_seeds)), "domains": domains, "per_seed": per_seed}


def test_frontier_known_gain():
    # arms: β small (KL 40) → large (KL 3). Domain "a" peaks at the middle β, "b" keeps gaining with KL. Within the
    # budget of the smallest β, ("a": middle, "b": smallest) gives 0.93 reward at KL 25, where the single-β frontier
    # (log-KL chord from (10, 0.755) to (40, 0.925)) is at 0.755 + 0.17 · log(2.5)/log(4) → gain ≈ +0.063
    kl = [40.0, 10.0, 3.0]
    data = synthetic_frontier({"a": (kl, [0.90, 0.91, 0.5]), "b": (kl, [0.95, 0.60, 0.3])})
    out = headroom.frontier_headroom(data, n_boot=100)
    expected = 0.93 - (0.755 + 0.17 * np.log(2.5) / np.log(4))
    assert out["gain"][0] == pytest.approx(expected, abs=0.01)
    assert out["ci"][0, 0] > 0.03
    np.testing.assert_allclose(out["gain"][1:], 0, atol=1e-9)
    assert out["choice_share"][0, 0, 1] == 1 and out["choice_share"][0, 1, 0] == 1
    assert len(out["splits"]) == 10 and all(len(c) == 3 for c, _ in out["splits"])


def test_frontier_identical_domains_no_gain():
    curve = ([40.0, 10.0, 3.0], [0.95, 0.8, 0.5])
    out = headroom.frontier_headroom(synthetic_frontier({"a": curve, "b": curve}), n_boot=100)
    np.testing.assert_allclose(out["gain"], 0, atol=1e-9)
    assert (out["ci"][:, 0] <= 0).all() and (out["ci"][:, 1] >= 0).all()


def test_frontier_choose_seeds_checked():
    data = synthetic_frontier({"a": ([4.0, 2.0], [0.9, 0.5])}, n_seeds=3)
    with pytest.raises(LbdpoError, match="--choose-seeds=3"):
        headroom.frontier_headroom(data, choose_seeds=3, n_boot=1)


# ---------------------------------------------------------------- the command

def test_main_writes_table_and_figure(tmp_path, capsys):
    exp = fake_experiment(tmp_path / "exp", shuffle=True, with_samples=True)
    headroom.main([str(exp), "--splits", "50", "--boot", "30", "--boot-splits", "3", "--choose-seeds", "2"])
    md = (exp / "compare" / "headroom.md").read_text()
    assert "| 中文 | 40 |" in md and "| **all** | 80 |" in md
    assert "## Frontier: β per domain chosen on 2 seeds, scored on 1" in md and "| β = 0.1 |" in md
    assert (exp / "compare" / "headroom.png").stat().st_size > 1000
    assert "accuracy: per-domain oracle − best single β =" in capsys.readouterr().out


def test_main_one_fixed_arm_is_an_error(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp, "fixed_b01", 0.1, 0, [{"key": "a", "domain": "x", "correct": True}])
    with pytest.raises(LbdpoError, match="two or more fixed-β arms"):
        headroom.main([str(exp)])


@pytest.mark.skipif(not (REPO_ROOT / "results" / "sentiment_v1" / "fixed_b01__seed-1").is_dir(),
                    reason="needs the committed results/sentiment_v1")
def test_keys_rebuilt_for_a_committed_experiment_align_pairs(monkeypatch):
    """eval_pairs.jsonl has no key: rebuilt from the run's data config and seed, the held-out pairs of seeds 0 and 1
    (shuffled differently) line up, shown by their β-free margins: near-identical pairs-wise, unrelated by position."""
    monkeypatch.chdir(REPO_ROOT)
    arms = headroom.fixed_arms(REPO_ROOT / "results" / "sentiment_v1")
    arm = next(a for a in arms if a["arm"] == "fixed_b01")
    keyed = [headroom.held_out_pairs(arm["runs"][s]) for s in (0, 1)]
    assert set(keyed[0]) == set(keyed[1]) and len(keyed[0]) == 259
    margins = [[json.loads(line)["margin"] for line in (arm["runs"][s]["eval_json"].parent / "eval_pairs.jsonl")
                .read_text().splitlines()] for s in (0, 1)]
    order = [list(k) for k in keyed]
    aligned = [margins[1][order[1].index(k)] for k in order[0]]
    assert np.corrcoef(margins[0], aligned)[0, 1] > 0.6
    assert abs(np.corrcoef(margins[0], margins[1])[0, 1]) < 0.3
