"""evaluate.py on tiny-model checkpoints: eval.json contents, identities when policy == reference, robustness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT, fresh_cache
from lbdpo.eval.evaluate import evaluate_checkpoint
from lbdpo.eval.evaluation import kl_estimate, reward_comparison
from lbdpo.train.trainer import train

CONF = str(REPO_ROOT / "conf")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-step run whose policy did not move (policy_lr=0): policy == reference."""
    return train_run(tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run"), "trainer.policy_lr=0")


def train_run(data_dir, run_dir, *overrides):
    """A 2-step tiny run on 32 pairs (8 held out) with the given overrides; returns its final checkpoint."""
    data = data_dir / "pairs.jsonl"
    words = "good fine great bad awful nice poor lovely".split()
    data.write_text("".join(json.dumps({"prompt": f"Say something about {w} thing {i}.", "chosen": f"It is {w}.",
                                        "rejected": "No.", "domain": "a" if i % 2 else "b"}) + "\n"
                            for i, w in enumerate(words * 4)))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny_random", "trainer=tiny", "logger=none", "data=jsonl", f"data.path={data}",
            "data.max_length=40", "data.max_prompt_length=24", "data.eval_size=8", "data.eval_fraction=null",
            "trainer.max_steps=2", "trainer.eval_every=0", "beta_head.epsilon=0.3", *overrides])
    train(cfg, run_dir)
    return run_dir / "checkpoints" / "final"


def eval_cfg(checkpoint, out_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"output_dir={out_dir}",
                                              "generation.num_prompts=6", "generation.max_new_tokens=8",
                                              "generation.batch_size=4", *overrides])


def test_eval_json_report_and_plots(checkpoint, tmp_path, monkeypatch):
    import lbdpo.data.tokenize as tokenize

    tokenized, real = [], tokenize.tokenize_pairs
    monkeypatch.setattr(tokenize, "tokenize_pairs", lambda ds, *a, **k: tokenized.append(len(ds)) or real(ds, *a, **k))
    result = evaluate_checkpoint(eval_cfg(checkpoint, tmp_path))
    assert tokenized == [8]  # only the 8 held-out pairs: the training split is read (to cut it) but not tokenized
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["preference"]["num_pairs"] == 8 and saved["step"] == 2
    assert set(saved["preference"]["per_domain"]) == {"a", "b"}
    for key in ("own_beta", "common_beta"):
        assert {"loss", "rewards/accuracies", "rewards/margins", "beta/mean"} <= set(saved["preference"][key])
    # policy == reference: log 2 loss, zero margins, KL exactly 0
    assert saved["preference"]["own_beta"]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert saved["generation"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert saved["generation"]["num_prompts"] == 6
    assert "reward" in saved["skipped"]  # the jsonl data has no ground-truth reward
    samples = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"policy_greedy", "reference_greedy", "policy_sample", "reference_sample"} <= set(samples[0])
    assert all(s["policy_greedy"] == s["reference_greedy"] for s in samples)  # same model, greedy
    assert all(s["kl"] == pytest.approx(0.0, abs=1e-5) for s in samples)  # per-prompt KL, policy == reference
    by_domain = saved["generation"]["per_domain"]
    assert set(by_domain) <= {"a", "b"} and sum(d["n"] for d in by_domain.values()) == 6
    pairs = [json.loads(l) for l in (tmp_path / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and {p["domain"] for p in pairs} == {"a", "b"}
    # each pair's identity (runs are aligned by it): the key the statistics rebuild from the run's data config and seed
    from omegaconf import OmegaConf

    from lbdpo.eval.pair_sample import held_out_keys

    run_config = OmegaConf.to_container(OmegaConf.load(checkpoint / "config.yaml"))
    assert [p["key"] for p in pairs] == held_out_keys(run_config, saved, pairs) and len({p["key"] for p in pairs}) == 8
    assert all(p["margin"] == pytest.approx(0.0, abs=1e-5) for p in pairs)
    report = (tmp_path / "eval_report.md").read_text()
    assert "Preference metrics" in report and "KL" in report
    for name in ("beta_hist_by_domain.png", "beta_vs_log_ppl.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    assert result["preference"] == saved["preference"]


def test_common_beta_accuracy_matches_own_beta_sign(checkpoint, tmp_path):
    """Accuracy only depends on the sign of the log-ratio margin, so any positive β gives the same accuracy."""
    # a checkpoint whose policy moved: train a copy of the run 2 more steps with a real learning rate
    from lbdpo import AutoModelForCausalLMWithBetaHead
    from lbdpo.data.collator import PreferenceCollator
    from lbdpo.dpo_model import DynamicBetaDPOModel
    from lbdpo.eval.evaluation import preference_eval
    from lbdpo.models import freeze, load_model

    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(checkpoint)
    policy, tok, head = lm.policy, lm.tokenizer, lm.beta_head
    cfg = {"model": lm.base_model}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = freeze(load_model(dict(cfg["model"]), vocab_size=len(tok)))
    feats = [{"prompt_input_ids": [5, 6, 7 + i], "chosen_input_ids": [8 + i, 9], "rejected_input_ids": [10, 11 + i, 12],
              "domain": "x"} for i in range(12)]
    pref = preference_eval(DynamicBetaDPOModel(policy, head, reference), feats, PreferenceCollator(tok.pad_token_id),
                           4, common_beta=0.37, device=torch.device("cpu"))
    own, common = pref["own_beta"], pref["common_beta"]
    assert 0 < own["rewards/accuracies"] < 1  # a non-trivial case
    assert common["rewards/accuracies"] == own["rewards/accuracies"]
    assert common["beta/mean"] == pytest.approx(0.37)
    assert own["rewards/margins"] != pytest.approx(common["rewards/margins"])
    # per-pair rows (eval_pairs.jsonl): Δ > 0 is the accuracy, mean β·Δ the margin, and a pair scored alone (no
    # padding, batch of one) has the margin it had in its padded batch
    margins, betas = pref["per_pair"]["margin"], pref["per_pair"]["beta"]
    assert sum(m > 0 for m in margins) / 12 == pytest.approx(own["rewards/accuracies"])
    assert sum(b * m for b, m in zip(betas, margins)) / 12 == pytest.approx(own["rewards/margins"], rel=1e-4)
    for i in (0, 5, 11):
        alone = preference_eval(DynamicBetaDPOModel(policy, head, reference), [feats[i]],
                                PreferenceCollator(tok.pad_token_id), 1, common_beta=0.37, device=torch.device("cpu"))
        assert alone["per_pair"]["margin"][0] == pytest.approx(margins[i], abs=1e-4)
        assert alone["per_pair"]["beta"][0] == pytest.approx(betas[i], rel=1e-5)


def test_generation_by_domain_is_reward_comparison_of_each_domains_prompts():
    from lbdpo.eval.evaluation import generation_by_domain

    domains = ["x", "y", "x", "x", "y"]
    kl = [1.0, 2.0, 3.0, 5.0, 4.0]
    pol, ref = [0.9, 0.1, 0.5, 0.2, 0.3], [0.1, 0.2, 0.5, 0.4, 0.3]
    out = generation_by_domain(domains, kl, pol, ref)
    assert out["x"]["n"] == 3 and out["x"]["kl"] == pytest.approx(3.0) and out["y"]["kl"] == pytest.approx(3.0)
    assert out["x"]["reward"] == reward_comparison([0.9, 0.5, 0.2], [0.1, 0.5, 0.4])
    assert out["y"]["reward"]["win_rate"] == pytest.approx(0.25)  # one loss, one tie
    assert "reward" not in generation_by_domain(domains, kl, None, None)["x"]


def test_win_rate_half_and_kl_zero_for_identical_models():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(400, generator=g).tolist()
    b = torch.rand(400, generator=g).tolist()  # same distribution, independent draws
    assert reward_comparison(a, b)["win_rate"] == pytest.approx(0.5, abs=0.07)
    assert reward_comparison(a, a)["win_rate"] == 0.5  # ties count half
    lp = torch.randn(50)
    assert kl_estimate(lp, lp.clone())["mean"] == 0.0


def test_missing_reference_and_partial_checkpoint(checkpoint, tmp_path):
    out = evaluate_checkpoint(eval_cfg(checkpoint, tmp_path / "noref", "reference=none"))
    assert "preference" not in out and {"reference", "preference"} <= set(out["skipped"])
    assert (tmp_path / "noref" / "eval_report.md").is_file()
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "beta_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is incomplete \(missing \['beta_head.safetensors'\]\)"):
        evaluate_checkpoint(eval_cfg(broken, tmp_path / "b"))


def test_a_bad_reward_model_fails_in_one_line_before_the_preference_pass(checkpoint, tmp_path, monkeypatch):
    import lbdpo.eval.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "preference_eval", lambda *a, **k: pytest.fail("ran before the check"))
    with pytest.raises(ValueError, match=r"reward_model=/nonexistent/rm: cannot load") as err:
        evaluate_checkpoint(eval_cfg(checkpoint, tmp_path / "out", "reward_model=/nonexistent/rm"))
    assert "\n" not in str(err.value)
    assert not Path("/nonexistent").exists()


def test_a_mistyped_checkpoint_path_is_not_created(tmp_path):
    """The real CLI: one clear error, exit ≠ 0, and the path that does not exist stays absent (Hydra's log folder
    used to be derived from it)."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-run" / "checkpoints" / "final"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate.py"), f"checkpoint={missing}",
                          f"hydra.run.dir={tmp_path / 'logs'}"], capture_output=True, text=True, cwd=REPO_ROOT,
                         timeout=300)
    assert out.returncode != 0 and "config.yaml is missing: checkpoint= must be a training checkpoint" in out.stderr
    assert not (tmp_path / "no-such-run").exists()


def test_reference_log_probs_of_held_out_pairs_come_from_the_store_and_equal_fresh_ones(tmp_path, monkeypatch):
    import lbdpo.train.reference as reference

    monkeypatch.setenv("LBDPO_CACHE", fresh_cache(tmp_path / "cache"))
    # a policy that moved, its reference precomputed: training scores its 8 held-out pairs into the per-pair store
    (tmp_path / "data").mkdir()
    ckpt = train_run(tmp_path / "data", tmp_path / "run", "trainer.reference=precompute", "trainer.policy_lr=1e-2")
    scored, real = [], reference.compute_reference_logps
    monkeypatch.setattr(reference, "compute_reference_logps",
                        lambda score, ds, *a, **k: scored.append(len(ds)) or real(score, ds, *a, **k))
    fast = ("generation.enabled=false", "plots=false")
    cached = evaluate_checkpoint(eval_cfg(ckpt, tmp_path / "cached", *fast))
    assert scored == [] and cached["reference_logps"] == "per-pair store"  # all 8 read, none scored
    fresh = evaluate_checkpoint(eval_cfg(ckpt, tmp_path / "fresh", "reference_cache=false", *fast))
    assert scored == [] and fresh["reference_logps"] == "scored now"  # the reference model itself, every pair
    margins = {name: [json.loads(line)["margin"] for line in (tmp_path / name / "eval_pairs.jsonl").open()]
               for name in ("cached", "fresh")}
    assert max(abs(m) for m in margins["fresh"]) > 1e-3  # the policy moved: margins are not trivially 0
    assert margins["cached"] == pytest.approx(margins["fresh"], abs=1e-5)
    for key in ("own_beta", "common_beta"):
        for metric, value in fresh["preference"][key].items():
            assert cached["preference"][key][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, metric)
    # a store without these pairs (another machine): scored once, then read
    shutil.rmtree(tmp_path / "cache" / "reference_logps")
    evaluate_checkpoint(eval_cfg(ckpt, tmp_path / "again", *fast))
    evaluate_checkpoint(eval_cfg(ckpt, tmp_path / "again", *fast))
    assert scored == [8]
    with pytest.raises(ValueError, match="reference_cache='yes' must be true or false"):
        evaluate_checkpoint(eval_cfg(ckpt, tmp_path / "bad", "reference_cache=yes"))


def test_reference_generations_are_generated_once_and_equal_fresh_ones(checkpoint, tmp_path, monkeypatch):
    import lbdpo.eval.evaluate as evaluate

    monkeypatch.setenv("LBDPO_CACHE", fresh_cache(tmp_path / "cache"))
    calls, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda model, *a, **k: calls.append(k["sample"]) or real(model, *a, **k))

    def samples(name, *overrides):
        calls.clear()
        evaluate_checkpoint(eval_cfg(checkpoint, tmp_path / name, "plots=false", *overrides))
        rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").open()]
        return len(calls), [(r["reference_greedy"], r["reference_sample"]) for r in rows]

    n_first, first = samples("first")
    n_second, second = samples("second")
    n_fresh, fresh = samples("fresh", "reference_cache=false")
    assert (n_first, n_second, n_fresh) == (4, 2, 4)  # the second run generates for the policy only
    assert first == second == fresh  # the reference's continuations read back are the ones generated
    assert samples("longer", "generation.max_new_tokens=9")[0] == 4  # other settings: generated anew
    assert samples("other_seed", "seed=1")[0] == 4


def test_reference_generations_started_side_by_side_are_generated_once(tmp_path, monkeypatch):
    # Two evaluations that reach the same reference generations at once (the runner's --jobs 2): one generates
    # while the other waits on the lock, then reads what the first wrote.
    import threading
    import time

    from lbdpo.train.reference import cached_generations

    monkeypatch.setenv("LBDPO_CACHE", fresh_cache(tmp_path / "cache"))
    calls, results = [], {}

    def generate():
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other thread to reach the lock while this one holds it
        return [[1, 2, 3], [4, 5]]

    def evaluate(name):
        results[name] = cached_generations(generate, {"name_or_path": "m"}, prompts=[[7], [8]], sample=True, seed=0)

    threads = [threading.Thread(target=evaluate, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results["a"] == results["b"] == [[1, 2, 3], [4, 5]]


def test_samples_per_prompt_averages_over_k_samples_and_keeps_the_first_draws(checkpoint, tmp_path, monkeypatch):
    # generation.samples_per_prompt=2: each prompt sampled twice (prompt list repeated), reward and KL over all 12
    # samples; with num_prompts a multiple of batch_size the first 6 samples are exactly the ones k = 1 draws.
    import lbdpo.eval.evaluate as evaluate

    drawn, scored, real = [], [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate",
                        lambda model, rows, *a, **k: (out := real(model, rows, *a, **k), k["sample"] and drawn.append(out))[0])
    monkeypatch.setattr(evaluate, "resolve_reward_fn",
                        lambda *a: lambda texts: scored.append(list(texts)) or [float(len(t)) for t in texts])

    def run(name, k):
        drawn.clear(), scored.clear()
        evaluate_checkpoint(eval_cfg(checkpoint, tmp_path / name, "plots=false", "reference_cache=false",
                                     "generation.batch_size=3", f"generation.samples_per_prompt={k}"))
        rows = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").open()]
        return json.loads((tmp_path / name / "eval.json").read_text())["generation"], rows, list(drawn), list(scored)

    gen1, rows1, drawn1, _ = run("one", 1)
    gen2, rows2, drawn2, scored2 = run("two", 2)
    assert [len(d) for d in drawn1] == [6, 6] and [len(d) for d in drawn2] == [12, 12]  # policy, reference
    assert drawn2[0][:6] == drawn1[0] and drawn2[1][:6] == drawn1[1]
    assert (gen2["num_prompts"], gen2["samples_per_prompt"], gen2["kl"]["n"]) == (6, 2, 12)
    assert gen2["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    policy_texts = scored2[1]  # scored in the order policy greedy, policy sample, reference greedy, reference sample
    assert len(policy_texts) == 12 and len(scored2[0]) == 6
    assert gen2["reward"]["policy_mean"] == pytest.approx(sum(map(len, policy_texts)) / 12)
    assert gen2["reward"]["n"] == 12 and sum(d["n"] for d in gen2["per_domain"].values()) == 12
    assert len(rows2) == 6 and [r["policy_sample"] for r in rows2] == policy_texts[:6]
    for i, row in enumerate(rows2):  # each prompt's value: the mean of its two samples
        assert row["reward_policy_sample"] == pytest.approx((len(policy_texts[i]) + len(policy_texts[i + 6])) / 2)
    assert [r["policy_sample"] for r in rows1] == policy_texts[:6]
    with pytest.raises(ValueError, match="generation.samples_per_prompt=0 must be ≥ 1"):
        evaluate_checkpoint(eval_cfg(checkpoint, tmp_path / "bad", "plots=false", "generation.samples_per_prompt=0"))
