"""β-DPO (beta_head=beta_dpo) against the paper's formula and the authors' procedure, computed by hand: moving
averages, β_batch = β₀·[1 + α·(mean kept margin − M₀)], Gaussian filtering, detached β, the masked loss; and a
training run that resumes exactly (its statistics live in the checkpoint)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lbdpo.beta_dpo import BetaDPO
from lbdpo.beta_head import BetaHead, BetaHeadConfig
from lbdpo.dpo_model import DynamicBetaDPOModel

from test_train import make_cfg, pairs_file, read_metrics  # noqa: F401  (pairs_file is a fixture)
from lbdpo.train.trainer import train


def hand_update(m0: float, s0: float, margins: list[float], gamma: float) -> tuple[float, float]:
    mean = sum(margins) / len(margins)
    std = math.sqrt(sum((m - mean) ** 2 for m in margins) / (len(margins) - 1))  # unbiased, as the authors
    return gamma * m0 + (1 - gamma) * mean, gamma * s0 + (1 - gamma) * std


def test_beta_follows_the_formula_without_filtering():
    module = BetaDPO(beta=0.1, alpha=0.6, filter_fraction=0.0, momentum=0.9)
    batches = [[0.5, -0.2, 1.0, 0.3], [2.0, 1.5, -0.5, 0.0], [0.1, 0.2, 0.3, 0.4]]
    m0, s0 = 0.0, 0.0
    for margins in batches:
        beta, keep = module(torch.tensor(margins), update=True)
        m0, s0 = hand_update(m0, s0, margins, 0.9)
        expected = 0.1 * (1 + 0.6 * (sum(margins) / len(margins) - m0))
        assert beta.tolist() == pytest.approx([expected] * 4, rel=1e-5)
        assert keep.tolist() == [1.0] * 4
        assert float(module.margin_mean) == pytest.approx(m0, rel=1e-5)
        assert float(module.margin_std) == pytest.approx(s0, rel=1e-5)


def test_filtering_keeps_the_share_and_prefers_margins_near_the_running_mean():
    module = BetaDPO(beta=0.1, alpha=0.6, filter_fraction=0.25, momentum=0.9)
    margins = torch.tensor([0.0, 0.1, -0.1, 0.05, 6.0, -6.0, 0.02, -0.03])  # two outliers
    kept_outlier, kept_central = 0, 0
    for _ in range(200):
        beta, keep = module(margins, update=True)
        assert int(keep.sum()) == 6  # ⌊(1 − 0.25)·8⌋
        m0 = float(module.margin_mean)
        expected = 0.1 * (1 + 0.6 * (float(margins[keep.bool()].mean()) - m0))
        assert float(beta[0]) == pytest.approx(max(expected, 1e-3), rel=1e-5)
        kept_outlier += int(keep[4] + keep[5])
        kept_central += int(keep[0] + keep[1])
    assert kept_outlier < 0.5 * kept_central  # outliers are dropped far more often


def test_evaluation_updates_nothing_and_keeps_every_pair():
    module = BetaDPO(beta=0.1, alpha=0.6, filter_fraction=0.2, momentum=0.9)
    module(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), update=True)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    beta, keep = module(torch.tensor([0.0, 1.0]), update=False)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert keep.tolist() == [1.0, 1.0]
    assert float(beta[0]) == pytest.approx(max(0.1 * (1 + 0.6 * (0.5 - float(module.margin_mean))), 1e-3))


def test_draws_depend_only_on_the_state():
    a, b = BetaDPO(0.1, 0.6, 0.5, 0.9), BetaDPO(0.1, 0.6, 0.5, 0.9)
    margins = torch.randn(16)
    torch.manual_seed(1)
    keep_a = a(margins, update=True)[1]
    torch.manual_seed(2)  # the global RNG does not matter: every process draws the same pairs
    keep_b = b(margins, update=True)[1]
    assert torch.equal(keep_a, keep_b)


def test_dpo_model_uses_the_batch_beta_detached_and_the_masked_mean(tiny_model, tiny_model_and_tokenizer):
    from conftest import random_pairs
    from lbdpo.data.collator import PreferenceCollator

    tokenizer = tiny_model_and_tokenizer[1]
    head = BetaHead(BetaHeadConfig(mode="beta_dpo", hidden_size=tiny_model.config.hidden_size, beta=0.1,
                                   beta_dpo_alpha=0.6, beta_dpo_filter=0.25))
    reference = __import__("copy").deepcopy(tiny_model).eval()
    model = DynamicBetaDPOModel(tiny_model, head, ref_model=reference, forward="packed").train()
    with torch.no_grad():  # a policy that differs from its reference, so margins are not all 0
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = PreferenceCollator(tokenizer.pad_token_id)(random_pairs(8, tokenizer.vocab_size, seed=3))
    out = model(batch)
    margins = (out.policy_chosen_logps - out.reference_chosen_logps) - (out.policy_rejected_logps
                                                                           - out.reference_rejected_logps)
    kept = out.kept.bool()
    assert int(kept.sum()) == 6 and not out.beta.requires_grad
    m0 = float(head.batch_level.margin_mean)
    beta = 0.1 * (1 + 0.6 * (float(margins[kept].mean().detach()) - m0))
    assert out.beta.tolist() == pytest.approx([beta] * 8, rel=1e-5)
    brute = -F.logsigmoid(beta * margins.detach())
    assert float(out.loss.detach()) == pytest.approx(float(brute[kept].mean()), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in head.parameters())  # β-DPO has no learnable β


def test_training_run_logs_beta_dpo_and_resumes_exactly(pairs_file, tmp_path):  # noqa: F811
    args = ("beta_head=beta_dpo", "trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_last=0",
            "trainer.eval_every=3")
    train(make_cfg(pairs_file, *args), tmp_path / "full")
    steps, evals = read_metrics(tmp_path / "full")
    assert all(s["beta_dpo/kept_fraction"] == pytest.approx(0.75) for s in steps)  # 3 of each 4 pairs
    assert len({round(s["beta/mean"], 8) for s in steps}) > 1 and all(s["beta/std"] == 0 for s in steps)
    assert "beta_dpo/M0" in steps[-1] and evals
    # pairs.jsonl: each pair's kept flag (3 of 4 per step) and the batch's one β on every pair of the step
    rows = [json.loads(line) for line in (tmp_path / "full" / "pairs.jsonl").read_text().splitlines()]
    for s in steps:
        step_rows = [r for r in rows if r["step"] == s["step"]]
        assert sorted(r["kept"] for r in step_rows) == [0.0, 1.0, 1.0, 1.0]
        assert all(r["beta"] == pytest.approx(s["beta/mean"], rel=1e-5) for r in step_rows)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    train(make_cfg(pairs_file, *args, "trainer.resume_from=auto"), resumed)
    again, _ = read_metrics(resumed)
    assert [s["step"] for s in again] == [4, 5, 6]
    for a, b in zip(steps[3:], again, strict=True):
        for key in ("loss", "beta/mean", "beta_dpo/M0", "beta_dpo/sigma"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)


def test_bad_beta_dpo_options_name_the_key():
    with pytest.raises(ValueError, match="beta_head.beta_dpo_filter"):
        BetaHeadConfig(mode="beta_dpo", beta_dpo_filter=1.0).validate()
    with pytest.raises(ValueError, match="beta_head.beta_dpo_momentum"):
        BetaHeadConfig(mode="beta_dpo", beta_dpo_momentum=1.0).validate()
