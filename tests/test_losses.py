"""The DPO loss: reference identities and a hand-written formula."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_pairs
from lbdpo.beta_head import BetaHead, BetaHeadConfig, DynamicBetaDPOModel
from lbdpo.data import PreferenceCollator
from lbdpo.losses import dpo_loss


def hand_written_dpo(pc, pr, rc, rr, beta):
    out = []
    for a, b, c, d, bt in zip(pc, pr, rc, rr, beta):
        z = bt * ((a - c) - (b - d))
        out.append(-math.log(1 / (1 + math.exp(-z))))
    return out


def test_dpo_loss_matches_hand_written_formula_with_tensor_beta():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 10 for _ in range(4))
    beta = torch.rand(5, generator=g) + 0.05
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    expected = hand_written_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta.tolist())
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(cr, beta * (pc - rc))
    torch.testing.assert_close(rj, beta * (pr - rr))
    assert not cr.requires_grad


def test_float_beta_and_label_smoothing():
    pc, pr, rc, rr = torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0])
    losses, _, _ = dpo_loss(pc, pr, rc, rr, 0.5)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, 0.5, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, 0.5, label_smoothing=0.5)


def test_beta_receives_gradient_with_documented_sign():
    """dL/dβ = −Δ·σ(−βΔ): negative for a positive margin (the w-drift trap of the module docstring)."""
    beta = torch.tensor([0.5], requires_grad=True)
    losses, _, _ = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta)
    losses.sum().backward()
    assert beta.grad.item() == pytest.approx(-2.0 * torch.sigmoid(torch.tensor(-1.0)).item(), rel=1e-6)


@pytest.mark.parametrize("head_cfg", [
    {"w_init": 0.01}, {"w_init": 5.0, "epsilon": 0.5}, {"mode": "fixed", "beta": 3.0},
    {"ppl_transform": "ppl", "w_init": 1e-3},
])
def test_policy_equal_reference_gives_log2(tiny_model, tiny_model_and_tokenizer, head_cfg):
    tok = tiny_model_and_tokenizer[1]
    batch = PreferenceCollator(tok.pad_token_id)(random_pairs(4, len(tok), seed=5))
    model = DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(hidden_size=64, **head_cfg)), tiny_model)
    out = model(batch)
    torch.testing.assert_close(out.losses, torch.full((4,), math.log(2.0)), atol=1e-6, rtol=0)
    assert out.metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_fixed_beta_model_matches_hand_written_dpo(tiny_model, tiny_model_and_tokenizer):
    """Plain DPO through the same code path: precomputed reference values, constant β."""
    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(4, len(tok), seed=6)
    for i, p in enumerate(pairs):
        p["reference_chosen_logps"], p["reference_rejected_logps"] = -30.0 - i, -25.0 + i
    batch = PreferenceCollator(tok.pad_token_id)(pairs)
    model = DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(mode="fixed", beta=0.2)))
    out = model(batch)
    expected = hand_written_dpo(out.policy_chosen_logps.tolist(), out.policy_rejected_logps.tolist(),
                                batch["reference_chosen_logps"].tolist(), batch["reference_rejected_logps"].tolist(),
                                [0.2] * 4)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert out.beta.tolist() == pytest.approx([0.2] * 4)
    assert out.loss.item() == pytest.approx(sum(expected) / 4, rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_missing_reference_is_a_clear_error(tiny_model, tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    batch = PreferenceCollator(tok.pad_token_id)(random_pairs(2, len(tok)))
    model = DynamicBetaDPOModel(tiny_model, BetaHead(BetaHeadConfig(mode="fixed")))
    with pytest.raises(ValueError, match="no reference"):
        model(batch)


def test_learnable_w_gets_gradient_through_full_model(tiny_model, tiny_model_and_tokenizer):
    tok = tiny_model_and_tokenizer[1]
    pairs = random_pairs(4, len(tok), seed=7)
    for p in pairs:  # a non-zero margin so that dL/dβ ≠ 0
        p["reference_chosen_logps"], p["reference_rejected_logps"] = -40.0, -20.0
    batch = PreferenceCollator(tok.pad_token_id)(pairs)
    head = BetaHead(BetaHeadConfig(hidden_size=64, w_init=0.01, epsilon=0.2, init_std=0.2))
    model = DynamicBetaDPOModel(tiny_model, head)
    model(batch).loss.backward()
    assert head.w.grad is not None and head.w.grad.abs() > 0
    assert head.context_net.weight.grad.abs().sum() > 0
