"""beta_head=per_domain_learned (src/lbdpo/beta_domains.py): one learned β per training domain. The head alone, its
refusals, the look-ahead hypergradient of objective=validation against double backward, what that hypergradient does
to a noisy domain, and training runs (β per domain logged and used, checkpoints, model folders, resume, evaluate.py)."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch

from conftest import TINY_CFG, random_pairs, train_two_processes
from test_beta_modes import evaluate, read_lines, steps_of
from test_beta_validation import exact_hypergradients, flat, perturbed_policy
from test_train import make_cfg, pairs_file  # noqa: F401  (the fixture: 48 pairs, domains en and fr)
from lbdpo import AutoModelForCausalLMWithBetaHead
from lbdpo.beta_domains import bind_domains, domain_metrics
from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.data.collator import PreferenceCollator
from lbdpo.dpo_model import DynamicBetaDPOModel
from lbdpo.errors import LbdpoError
from lbdpo.train import beta_validation as bv
from lbdpo.train.trainer import train

H = 8
LEARN = ("beta_head=per_domain_learned", "beta_head.beta=0.1")
VAL = (*LEARN, "beta_head.objective=validation")


def learned_head(domains=("en", "fr", "zh"), hidden_size=H, **kwargs) -> BetaHead:
    head = BetaHead(BetaHeadConfig(hidden_size=hidden_size, mode="per_domain_learned", **kwargs))
    if domains is not None:
        bind_domains(head, set(domains))
    return head


def call(head: BetaHead, domains) -> torch.Tensor:
    n = len(domains)
    return head(torch.randn(n, head.config.hidden_size), log_ppl=torch.rand(n) + 1, domains=domains)


# ---------------------------------------------------------------------------------------------------- the head alone


def test_each_pair_gets_its_domains_learned_beta_and_only_its_domain_gets_gradient():
    head = learned_head(beta=0.1, domain_betas={"fr": 0.5})
    (name, theta), = head.named_parameters()
    assert name == "domain_table.log_beta" and head.config.domains == ["en", "fr", "zh"]  # sorted, kept in the config
    torch.testing.assert_close(theta.detach().exp(), torch.tensor([0.1, 0.5, 0.1]))  # starts at domain_betas, else beta
    with torch.no_grad():
        theta.copy_(torch.log(torch.tensor([0.2, 0.7, 3.0])))
    beta = call(head, ["fr", "en", "fr"])
    torch.testing.assert_close(beta, torch.tensor([0.7, 0.2, 0.7]))
    (beta * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    # ∂β_i/∂θ_d = β_d·[domain_i = d]: fr gets (1 + 3)·0.7, en 2·0.2, zh (no pair) exactly 0
    torch.testing.assert_close(theta.grad, torch.tensor([0.4, 2.8, 0.0]))
    assert domain_metrics(head) == pytest.approx({"beta_head/beta/en": 0.2, "beta_head/beta/fr": 0.7,
                                                  "beta_head/beta/zh": 3.0})
    assert domain_metrics(BetaHead(BetaHeadConfig(hidden_size=H, mode="fixed"))) == {}
    with torch.no_grad():  # clamped to [beta_min, beta_max] as every head, with no gradient beyond
        theta.copy_(torch.tensor([-20.0, 20.0, 0.0]))
    torch.testing.assert_close(call(head, ["en", "fr"]), torch.tensor([1e-4, 1e4]))


def test_an_unseen_domain_gets_its_starting_beta_with_a_warning(caplog):
    head = learned_head(beta=0.1)
    with torch.no_grad():
        head.domain_table.log_beta.fill_(0.0)  # every trained domain at β = 1
    with caplog.at_level(logging.WARNING, logger="lbdpo.beta_domains"):
        beta = call(head, ["de", "en", "de", "it"])
        call(head, ["de"])  # once per domain, not per batch
    torch.testing.assert_close(beta, torch.tensor([0.1, 1.0, 0.1, 0.1]))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "'de' is not among the head's training domains ['en', 'fr', 'zh']" in warnings[0]
    assert "'it'" in warnings[1] and "0.1" in warnings[1]
    beta.sum().backward()
    assert head.domain_table.log_beta.grad.tolist() == [1.0, 0.0, 0.0]  # only en's pair reaches θ
    with pytest.raises(LbdpoError, match="per_domain_learned needs each pair's domain"):
        head(torch.randn(2, H), log_ppl=torch.ones(2))
    with pytest.raises(LbdpoError, match="1 domains for 2 pairs"):
        head(torch.randn(2, H), log_ppl=torch.ones(2), domains=["en"])


def test_binding_takes_the_training_domains_once():
    head = learned_head(domains=None)
    assert list(head.parameters()) == [] and head.config.domains is None
    torch.testing.assert_close(call(head, ["en"]), torch.tensor([0.1]))  # unbound: every domain unseen
    bind_domains(head, {"fr", "en"})
    bind_domains(head, {"en", "fr"})  # the same set again (e.g. a resumed head): nothing changes
    assert len(list(head.parameters())) == 1
    with pytest.raises(LbdpoError, match=r"beta_head.domains=\['en', 'fr'\] but the training pairs' domains"):
        bind_domains(head, {"en", "de"})
    with pytest.raises(LbdpoError, match="training pairs' domain names"):
        bind_domains(learned_head(domains=None), set())
    with pytest.raises(LbdpoError, match=r"beta_head.domain_betas names \['de'\]"):
        learned_head(domains={"en"}, domain_betas={"de": 0.3})
    # a config that lists its domains (a saved head's) builds the table at once, in that order
    saved = BetaHead(BetaHeadConfig(hidden_size=H, mode="per_domain_learned", domains=["en", "fr"]))
    assert saved.domain_table.index == {"en": 0, "fr": 1} and saved.domain_table.log_beta.shape == (2,)


@pytest.mark.parametrize("kwargs, key", [
    ({"domain_betas": {"fr": 0.0}}, "beta_head.domain_betas"),
    ({"domain_betas": {"fr": 2e4}}, "beta_head.domain_betas.fr=20000.0: an initial β"),
    ({"beta": 1e-5}, "beta_head.beta=1e-05: an initial β"),
    ({"domains": ["en", "en"]}, "beta_head.domains"),
    ({"domains": []}, "beta_head.domains"),
    ({"w_prior_weight": 0.1}, "beta_head.w_prior_weight"),
])
def test_bad_options_name_their_key(kwargs, key):
    with pytest.raises(LbdpoError, match=re.escape(key)):
        BetaHeadConfig(hidden_size=H, mode="per_domain_learned", **kwargs)


def test_only_this_mode_reads_domains_and_both_objectives_train_it():
    with pytest.raises(LbdpoError, match="beta_head.domains is read only by beta_head=per_domain_learned"):
        BetaHeadConfig(hidden_size=H, mode="per_domain", domain_betas={"fr": 1.0}, domains=["fr"])
    with pytest.raises(LbdpoError, match="mode=per_domain has no trainable β"):
        BetaHeadConfig(hidden_size=H, mode="per_domain", domain_betas={"fr": 1.0}, objective="validation")
    # objective=validation: the formula's own requirements (detached h, no dropout) do not apply here
    BetaHeadConfig(hidden_size=H, mode="per_domain_learned", objective="validation", detach_hidden=False, dropout=0.5,
                   context_net_type="mlp")


# ---------------------------------------------------------------------------------------------- the hypergradient


@pytest.fixture(scope="module")
def policy_pair():
    """A policy a little away from its reference (margins ≠ 0), eager attention (double backward on CPU)."""
    policy, reference, tok = perturbed_policy()
    return policy, reference, PreferenceCollator(tok.pad_token_id)


def tagged(feats, domains):
    return [{**f, "domain": d} for f, d in zip(feats, domains)]


def test_hypergradient_matches_double_backward(policy_pair):
    """The finite-difference hypergradient of the per-domain table against exact autograd (the tolerance of
    test_beta_validation, 1e-2): fr and en pairs in two micro-batches; zh, in the table, has none and gets exactly 0.
    Measured (η = 1e-4): relative error 2.4e-4 against the first-order formula, 1.2e-3 against the look-ahead itself.
    The finite difference's error is relative to the size of each pair's term, so a domain whose pairs' terms nearly
    cancel shows a larger relative error: fr starting at 0.4 instead of 1.0 gives 5.5e-3 and 1.0e-2."""
    policy, reference, collate = policy_pair
    head = learned_head(hidden_size=64, beta=0.1, domain_betas={"fr": 1.0, "zh": 0.2})
    model = DynamicBetaDPOModel(policy, head, ref_model=reference)
    batches = [collate(tagged(random_pairs(3, 2000, seed=s), d)) for s, d in
               ((1, ["en", "fr", "fr"]), (2, ["fr", "en", "en"]))]
    val_batch = collate(tagged(random_pairs(3, 2000, seed=3), ["en", "fr", "en"]))
    records = [bv.MicroBatch.of(b, model(b)) for b in batches]
    assert records[0].domains == ["en", "fr", "fr"] and all(r.delta.abs().max() > 0.1 for r in records)
    first, ahead = exact_hypergradients(model, batches, val_batch, 1e-4, 0.1)
    grads, _ = bv.hypergradient(model, records, val_batch, 1e-4, 0.1)
    found = flat(grads)
    assert found.shape == (3,) and found[2] == 0 and first[2] == 0  # en, fr, zh
    assert bool((found[:2].abs() > 0).all())
    assert (found - first).norm() / first.norm() < 1e-2
    assert (found - ahead).norm() / ahead.norm() < 1e-2


def one_validation_step(policy_pair, train_feats, val_feats):
    """One objective=validation update of a fresh table (en, fr, noisy; all at β 0.1) from a training micro-batch of
    noisy pairs only: (β before, β after), by domain."""
    policy, reference, collate = policy_pair
    head = learned_head(domains=("en", "fr", "noisy"), hidden_size=64, beta=0.1)
    model = DynamicBetaDPOModel(policy, head, ref_model=reference)
    batch = collate(tagged(train_feats, ["noisy"] * len(train_feats)))
    val_batch = collate(tagged(val_feats, ["en", "fr"] * (len(val_feats) // 2)))
    grads, _ = bv.hypergradient(model, [bv.MicroBatch.of(batch, model(batch))], val_batch, 1e-4, 0.1)
    before = domain_metrics(head)
    theta = head.domain_table.log_beta
    theta.grad = grads[0]
    torch.optim.AdamW([theta], lr=0.05, weight_decay=0.0).step()  # the trainer's optimizer for θ
    return before, domain_metrics(head)


def test_validation_lowers_a_domain_whose_pairs_contradict_the_held_out_ones(policy_pair):
    """The behaviour the objective is for: a micro-batch of only `noisy` pairs, each a held-out pair with chosen and
    rejected swapped, would raise the held-out loss if trained on, so the hypergradient lowers that domain's β (less
    weight on those pairs), and leaves en and fr, which have no pair in the step, exactly where they were. The same
    pairs unswapped (they agree with the held-out pairs) raise it: the direction comes from the data."""
    feats = random_pairs(4, 2000, seed=7)
    swapped = [{**f, "chosen_input_ids": f["rejected_input_ids"], "rejected_input_ids": f["chosen_input_ids"]}
               for f in feats]
    before, after = one_validation_step(policy_pair, swapped, feats)
    assert after["beta_head/beta/noisy"] < 0.99 * before["beta_head/beta/noisy"]
    for d in ("en", "fr"):
        assert after[f"beta_head/beta/{d}"] == before[f"beta_head/beta/{d}"]
    before, after = one_validation_step(policy_pair, feats, feats)
    assert after["beta_head/beta/noisy"] > 1.01 * before["beta_head/beta/noisy"]
    assert after["beta_head/beta/en"] == before["beta_head/beta/en"]


# ---------------------------------------------------------------------------------------------- saving and loading


def test_model_folder_round_trip(tmp_path):
    lm = AutoModelForCausalLMWithBetaHead.from_pretrained(TINY_CFG, beta_head={"mode": "per_domain_learned"})
    bind_domains(lm.beta_head, {"en", "fr"})
    with torch.no_grad():
        lm.beta_head.domain_table.log_beta.copy_(torch.log(torch.tensor([0.05, 0.8])))
    lm.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "beta_head_config.json").read_text())
    assert saved["mode"] == "per_domain_learned" and saved["domains"] == ["en", "fr"]
    assert "β per domain, learned" in (tmp_path / "m" / "README.md").read_text()
    loaded = AutoModelForCausalLMWithBetaHead.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.beta_head.domain_table.log_beta, lm.beta_head.domain_table.log_beta,
                               atol=0, rtol=0)
    beta = loaded.beta(["Tell me about tea.", "Et le café ?", "Und Kuchen?"], domains=["en", "fr", "de"])
    torch.testing.assert_close(beta, torch.tensor([0.05, 0.8, 0.1]))  # de: not trained on, its starting β


# ---------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def dpo_run(pairs_file, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("learned_dpo")
    train(make_cfg(pairs_file, *LEARN, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.beta_head_lr=0.05"),
          run)
    return run


def test_dpo_run_logs_each_domains_beta_and_uses_it(dpo_run, tmp_path):
    """objective=dpo: β of each domain logged at every step (beta_head/beta/<d>) is the β that step's pairs of that
    domain trained at (pairs.jsonl: the forward's, before the update); the final table (checkpoint) is the held-out
    evaluation's and evaluate.py's."""
    from safetensors.torch import load_file

    steps = steps_of(dpo_run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    logged = [{d: s[f"beta_head/beta/{d}"] for d in ("en", "fr")} for s in steps]
    assert logged[0] == pytest.approx({"en": 0.1, "fr": 0.1}, rel=1e-6)  # step 1's forward: the starting β
    assert all(b != pytest.approx(0.1, rel=1e-3) for b in logged[-1].values())  # both learned by step 4
    pairs = read_lines(dpo_run, "pairs.jsonl")
    for s, used in zip(steps, logged):
        rows = [r for r in pairs if r["step"] == s["step"]]
        assert rows and all(r["beta"] == pytest.approx(used[r["domain"]], abs=1e-6) for r in rows), s["step"]
    folder = dpo_run / "checkpoints" / "final"
    head = BetaHead(BetaHeadConfig.from_mapping(json.loads((folder / "beta_head_config.json").read_text())))
    head.load_state_dict(load_file(folder / "beta_head.safetensors"))
    final = {d: domain_metrics(head)[f"beta_head/beta/{d}"] for d in ("en", "fr")}
    assert final != pytest.approx(logged[-1], rel=1e-6)  # step 4's update moved it after its forward
    last_eval = [r for r in read_lines(dpo_run) if "eval/loss" in r][-1]
    for d in ("en", "fr"):
        assert last_eval[f"eval/{d}/beta/mean"] == pytest.approx(final[d], rel=1e-5)
    assert "lr/beta_head_w" in steps[0] and "lr/beta_head" not in steps[0]  # θ: the no-weight-decay group
    rows = evaluate(folder, tmp_path / "eval")
    assert len(rows) == 8 and all(r["beta"] == pytest.approx(final[r["domain"]], rel=1e-5) for r in rows)


def test_checkpoint_rebuilds_the_table(dpo_run, validation_run):
    """A checkpoint's config names the domains and its table is the one the next step trained at: step-2's
    checkpoint holds the β that step 3's forward logged."""
    from safetensors.torch import load_file

    config = json.loads((dpo_run / "checkpoints" / "final" / "beta_head_config.json").read_text())
    assert config["domains"] == ["en", "fr"] and config["objective"] == "dpo"
    folder = validation_run / "checkpoints" / "step-2"
    head = BetaHead(BetaHeadConfig.from_mapping(json.loads((folder / "beta_head_config.json").read_text())))
    head.load_state_dict(load_file(folder / "beta_head.safetensors"))
    step3 = steps_of(validation_run)[2]
    assert step3["step"] == 3
    assert domain_metrics(head) == pytest.approx({k: v for k, v in step3.items() if k.startswith("beta_head/beta/")},
                                                 rel=1e-6)


@pytest.fixture(scope="module")
def validation_run(pairs_file, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("learned_val")
    train(make_cfg(pairs_file, *VAL, "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=0",
                   "trainer.eval_every=0", "trainer.beta_head_lr=0.05"), run)
    return run


def test_validation_run_moves_only_the_domains_of_its_first_step(validation_run):
    """objective=validation through the trainer: the hypergradient is the head's gradient, and at step 1 (Adam has
    no momentum yet) a domain with no pair in the step keeps its β exactly; every domain's β is logged."""
    steps = steps_of(validation_run)
    assert all(s["beta_val/hypergrad_norm"] > 0 and s["grad_norm/beta_head"] == pytest.approx(
        s["beta_val/hypergrad_norm"], rel=1e-5) for s in steps)
    first = {r["domain"] for r in read_lines(validation_run, "pairs.jsonl") if r["step"] == 1}
    assert first == {"en"}  # the seeded order's first 4 pairs: fr has none (what this test needs)
    assert all(steps[0][f"beta_head/beta/{d}"] == pytest.approx(0.1, rel=1e-6) for d in ("en", "fr"))
    for d in ("en", "fr"):  # step 2's forward: the table after step 1's update
        moved = steps[1][f"beta_head/beta/{d}"] != pytest.approx(0.1, rel=1e-6)
        assert moved == (d in first), (d, first)
    assert len({round(s["beta_head/beta/en"], 9) for s in steps}) > 1


def test_resume_reproduces_the_uninterrupted_run(validation_run, pairs_file, tmp_path):  # noqa: F811
    shutil.copytree(validation_run / "checkpoints" / "step-2", tmp_path / "checkpoints" / "step-2")
    lines = (validation_run / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    train(make_cfg(pairs_file, *VAL, "trainer.max_steps=4", "trainer.save_every=2", "trainer.eval_every=0",
                   "trainer.beta_head_lr=0.05", "trainer.resume_from=auto"), tmp_path)
    whole, resumed = steps_of(validation_run), steps_of(tmp_path)
    assert [s["step"] for s in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        for key in ("loss", "beta/mean", "beta_head/beta/en", "beta_head/beta/fr", "beta_val/loss",
                    "beta_val/hypergrad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.parametrize("objective", ["dpo", "validation"])
def test_two_processes_match_one_process(pairs_file, tmp_path, objective):  # noqa: F811
    """DDP (torchrun, gloo, 2 CPU processes) = one process with the same global batch: β of each domain per step
    (the DPO loss's gradient all-reduced by DDP, or the hypergradient averaged by beta_validation)."""
    options = [*LEARN, f"beta_head.objective={objective}", "trainer.max_steps=3", "trainer.eval_every=0",
               "trainer.beta_head_lr=0.05"]
    train(make_cfg(pairs_file, *options), tmp_path / "one")  # in this process, batch_size 4
    train_two_processes(pairs_file, options, tmp_path / "two")
    one, two = steps_of(tmp_path / "one"), steps_of(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "beta/mean", "beta_head/beta/en", "beta_head/beta/fr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert one[-1]["beta_head/beta/en"] != pytest.approx(0.1, rel=1e-3)
